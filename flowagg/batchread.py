"""Reading stored batch files from every folder, compressed or not, without changing any.

Batch files may be written plain (`.json`), gzip'd (`.json.gz`) or zstd'd (`.json.zst`,
SPEC §11 batchCompression); every reader here opens them by suffix, so the read commands
never care which. Nothing here takes the daemon's lock or writes under the root.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator
from pathlib import Path

from .compression import decompress
from .layout import Layout
from .storage import read_regular

AGGREGATED = "aggregated"
FAILED = "failed"
ABANDONED = "abandoned"
_ID = r"(?P<id>[^/]+?)"
_COMPRESSION = r"(?P<ext>\.json(?:\.gz|\.zst)?)"
_NAMES = {
    AGGREGATED: re.compile(rf"batch_{_ID}{_COMPRESSION}"),
    FAILED: re.compile(rf"{_ID}\.failed{_COMPRESSION}"),
    ABANDONED: re.compile(rf"{_ID}\.abandoned{_COMPRESSION}"),
}


@dataclasses.dataclass(frozen=True)
class BatchPath:
    path: Path
    kind: str  # AGGREGATED, FAILED or ABANDONED
    name_id: str  # the batch id its name claims

    def shown(self, root: Path) -> str:
        """The path as findings and progress show it: relative to the root."""
        try:
            return str(self.path.relative_to(root))
        except ValueError:
            return str(self.path)


def folders(layout: Layout, *, include_failed: bool) -> list[tuple[str, Path]]:
    out = [(AGGREGATED, layout.aggregated)]
    if include_failed:
        out += [(FAILED, layout.recovery), (ABANDONED, layout.abandoned)]
    return out


def list_batch_files(layout: Layout, *, include_failed: bool = True) -> list[BatchPath]:
    """Every stored batch file, folder by folder, in name order (batch ids sort by time).

    Temp files (a publication in progress) never match the names; a missing folder is empty.
    """
    found: list[BatchPath] = []
    for kind, directory in folders(layout, include_failed=include_failed):
        pattern = _NAMES[kind]
        try:
            with os.scandir(directory) as it:
                names = sorted(
                    (e.name, m.group("id"))
                    for e in it
                    if (m := pattern.fullmatch(e.name)) and e.is_file(follow_symlinks=False)
                )
        except FileNotFoundError:
            continue
        found.extend(BatchPath(directory / name, kind, batch_id) for name, batch_id in names)
    return found


def read_batch_bytes(path: Path) -> bytes:
    """The JSON text of a batch file, decompressed by its suffix (a link or a FIFO named like
    one is refused, never followed or waited on)."""
    return decompress(path.name, read_regular(path), needed_for=f"reading {path.name}")


def iter_batch_bytes(files: list[BatchPath]) -> Iterator[tuple[BatchPath, bytes | OSError]]:
    """Each file's JSON text, or the error that kept it from being read (one bad file must
    not stop a reader from reporting or exporting the rest)."""
    for bp in files:
        try:
            yield bp, read_batch_bytes(bp.path)
        except (OSError, ValueError) as exc:
            yield bp, exc if isinstance(exc, OSError) else OSError(str(exc))
