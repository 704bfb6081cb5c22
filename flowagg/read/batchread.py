"""Reading stored batch files from every folder, compressed or not, without changing any.

Batch files may be written plain (`.json`), gzip'd (`.json.gz`) or zstd'd (`.json.zst`,
SPEC §11 batchCompression); every reader here opens them by suffix, so the read commands
never care which. Nothing here takes the daemon's lock or writes under the root.

No read inflates or loads more than a batch within the configured `maxBatchBytes` may hold
(`inflate_limit`): a file past it is reported, never loaded. A name that is not a regular
file (a FIFO, a link, a device) is listed, so that it can be reported, and never opened for
a read that could wait or never end.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from flowagg.core.compression import TooLarge, decompress, stored_limit
from flowagg.core.layout import Layout
from flowagg.core.readsafe import NotRegular, kind_of, read_bounded

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
# Room beside the entries for a batch's own fields and a failed one's retry history.
BATCH_OVERHEAD = 1 << 20


def inflate_limit(values: Mapping[str, Any]) -> int:
    """The most bytes a batch file written under these settings inflates to: its entries fill
    at most maxBatchBytes, or one entry alone (at most maxEntryBytes) does."""
    return max(values["maxBatchBytes"], values["maxEntryBytes"]) + BATCH_OVERHEAD


@dataclasses.dataclass(frozen=True)
class BatchPath:
    path: Path
    kind: str  # AGGREGATED, FAILED or ABANDONED
    name_id: str  # the batch id its name claims
    special: str | None = None  # what the name is when not a regular file ("a FIFO")

    def __reduce__(self) -> tuple[Any, tuple[str, str, str, str | None]]:
        # Read commands send their files to worker processes: the path as one string pickles
        # in a fraction of a Path's parts.
        return _batch_path, (str(self.path), self.kind, self.name_id, self.special)

    def shown(self, root: Path) -> str:
        """The path as findings and progress show it: relative to the root."""
        try:
            return str(self.path.relative_to(root))
        except ValueError:
            return str(self.path)


def _batch_path(path: str, kind: str, name_id: str, special: str | None) -> BatchPath:
    return BatchPath(Path(path), kind, name_id, special)


def folders(layout: Layout, *, include_failed: bool) -> list[tuple[str, Path]]:
    out = [(AGGREGATED, layout.aggregated)]
    if include_failed:
        out += [(FAILED, layout.recovery), (ABANDONED, layout.abandoned)]
    return out


def list_batch_files(layout: Layout, *, include_failed: bool = True) -> list[BatchPath]:
    """Every stored batch file, folder by folder, in name order (batch ids sort by time).

    Temp files (a publication in progress) never match the names; a missing folder is empty.
    A name that is not a regular file is listed with `special` set.
    """
    found: list[BatchPath] = []
    for kind, directory in folders(layout, include_failed=include_failed):
        pattern = _NAMES[kind]
        try:
            with os.scandir(directory) as it:
                names = sorted(
                    (e.name, m.group("id"), _special(e))
                    for e in it
                    if (m := pattern.fullmatch(e.name))
                )
        except FileNotFoundError:
            continue
        found.extend(BatchPath(directory / n, kind, batch_id, sp) for n, batch_id, sp in names)
    return found


def _special(entry: os.DirEntry[str]) -> str | None:
    try:
        if entry.is_file(follow_symlinks=False):
            return None
        return kind_of(entry.stat(follow_symlinks=False).st_mode)
    except OSError:
        return None  # gone meanwhile: reading it says so


@dataclasses.dataclass(frozen=True)
class Unread:
    """Why a batch file was not read; `special` when its name is not a regular file."""

    reason: str
    special: str | None = None


def read_batch_bytes(path: Path, limit: int) -> bytes:
    """The JSON text of a batch file, decompressed by its suffix: at most `limit` bytes, read
    from at most as many as a file that inflates to that may hold (a link or a FIFO named like
    one is refused, never followed or waited on)."""
    raw = read_bounded(path, stored_limit(path.name, limit))
    return decompress(path.name, raw, limit, needed_for=f"reading {path.name}")


def iter_batch_bytes(
    files: Sequence[BatchPath], limit: int
) -> Iterator[tuple[BatchPath, bytes | Unread]]:
    """Each file's JSON text, or why it was not read (one bad file must not stop a reader
    from reporting or exporting the rest)."""
    for bp in files:
        if bp.special is not None:
            yield bp, Unread(str(NotRegular(bp.special)), bp.special)
            continue
        try:
            yield bp, read_batch_bytes(bp.path, limit)
        except NotRegular as exc:
            yield bp, Unread(str(exc), exc.kind)
        except TooLarge as exc:
            yield (
                bp,
                Unread(
                    f"{exc}, more than a batch within maxBatchBytes and maxEntryBytes holds;"
                    " if they were lowered since it was written, raise them for this read"
                ),
            )
        except OSError as exc:
            yield bp, Unread(exc.strerror or str(exc))
        except ValueError as exc:
            yield bp, Unread(str(exc))


_FOLDER_RANK = {AGGREGATED: 0, FAILED: 1, ABANDONED: 2}


def _suffix_rank(name: str) -> int:
    return 2 if name.endswith(".zst") else 1 if name.endswith(".gz") else 0


def copies_by_batch(files: list[BatchPath]) -> list[list[BatchPath]]:
    """The files grouped by the batch id their names claim, in the order of their first file.

    A batch id names one set of entries, so its copies (under other suffixes, or in another
    folder) hold the same entries. Each group is in the order a reader tries them, the order
    the daemon looks a batch up in: aggregated/ before recovery/ before recovery/abandoned/,
    then `.json` before `.json.gz` before `.json.zst`.
    """
    groups: dict[str, list[BatchPath]] = {}
    for bp in files:
        groups.setdefault(bp.name_id, []).append(bp)
    for group in groups.values():
        if len(group) > 1:
            group.sort(key=lambda bp: (_FOLDER_RANK[bp.kind], _suffix_rank(bp.path.name)))
    return list(groups.values())
