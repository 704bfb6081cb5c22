"""`flowagg validate`: every stored batch file checked against SPEC §3 and §5, read-only.

Per file: it parses, has the batch shape and a version this flowagg reads, its name matches
its batchId, `entryCount` and `entriesSha256` match the entries, and every entry passes the
entry rules of §3 (the same validator the daemon uses) and carries an entryId. With `--full`,
the checks across files follow (`validate_full`). Files are read one at a time, so memory
does not grow with the number of files or entries.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from flowagg.batches.storage import TRIGGERS, CorruptBatch
from flowagg.core import formats
from flowagg.core.entries import (
    EntryError,
    plain_json,
    plainly_valid,
    short_repr,
    validate_entry_json,
)
from flowagg.delivery.recovery_format import BATCH_ID_RE, BATCH_KEYS, check_recovery_fields
from flowagg.read.batchread import (
    ABANDONED,
    AGGREGATED,
    FAILED,
    BatchPath,
    Unread,
    iter_batch_bytes,
)
from flowagg.read.fanout import map_chunks

_ADDED_METADATA = len(b',"metadata":{}')
_NO_ID = "-"  # what the validator's new_id hands back: a stored entry must bring its own


@dataclasses.dataclass(frozen=True)
class Finding:
    file: str
    what: str  # a short kind, the same for every finding of the kind (counted in the summary)
    detail: str
    expected: str | None = None
    found: str | None = None

    def line(self) -> str:
        text = f"{self.file}: {self.what}: {self.detail}"
        if self.expected is not None or self.found is not None:
            text += f" (expected {self.expected}, found {self.found})"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "what": self.what,
            "detail": self.detail,
            "expected": self.expected,
            "found": self.found,
        }


@dataclasses.dataclass
class Summary:
    files: Counter[str] = dataclasses.field(default_factory=Counter)
    entries: int = 0
    bad_files: set[str] = dataclasses.field(default_factory=set)  # shown names
    findings: Counter[str] = dataclasses.field(default_factory=Counter)
    notes: list[str] = dataclasses.field(default_factory=list)
    # Names that are not regular files, each with what it is: never opened for a read.
    skipped: list[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "files": {k: self.files[k] for k in (AGGREGATED, FAILED, ABANDONED)},
            "entries": self.entries,
            "badFiles": len(self.bad_files),
            "findings": dict(sorted(self.findings.items())),
            "findingCount": sum(self.findings.values()),
            "notes": self.notes,
            "skipped": self.skipped,
        }

    def skipped_line(self) -> str | None:
        if not self.skipped:
            return None
        return (
            f"skipped {len(self.skipped)} entries that are not regular files:"
            f" {', '.join(self.skipped)}; flowagg writes only regular files, move them away"
        )


@dataclasses.dataclass
class GoodBatch:
    """What the checks across files need from one file that passed."""

    shown: str
    batch_id: str
    doc: dict[str, Any]


Report = Callable[[Finding], None]


class FileChecker:
    def __init__(
        self, root: Path, *, now_ms: int, max_entry_bytes: int, limit: int, report: Report
    ) -> None:
        self.root = root
        self.now_ms = now_ms
        self.max_entry_bytes = max_entry_bytes
        self.limit = limit  # the most bytes a batch file may inflate to
        self._report = report
        self.summary = Summary()

    def report(self, finding: Finding) -> None:
        self.summary.bad_files.add(finding.file)
        self.summary.findings[finding.what] += 1
        self._report(finding)

    def check_all(
        self,
        files: list[BatchPath],
        on_good: Callable[[GoodBatch], None] | None = None,
        on_file: Callable[[], None] | None = None,
    ) -> Summary:
        """Every file checked, findings reported in file order. Without `on_good` the files
        are checked in worker processes (`fanout`): only findings and counts come back."""
        if on_good is None:
            self._check_in_workers(files, on_file)
            return self.summary
        return self.check_files(files, on_good, on_file)

    def _check_in_workers(self, files: list[BatchPath], on_file: Callable[[], None] | None) -> None:
        settings = (self.root, self.now_ms, self.max_entry_bytes, self.limit)
        summary = self.summary
        for part, (counted, found) in map_chunks(functools.partial(check_chunk, settings), files):
            summary.files.update(counted.files)
            summary.entries += counted.entries
            summary.skipped.extend(counted.skipped)
            for finding in found:
                self.report(finding)
            if on_file is not None:
                for _ in part:
                    on_file()

    def check_files(
        self,
        files: Sequence[BatchPath],
        on_good: Callable[[GoodBatch], None] | None,
        on_file: Callable[[], None] | None,
    ) -> Summary:
        for bp, data in iter_batch_bytes(files, self.limit):
            if on_file is not None:
                on_file()
            shown = bp.shown(self.root)
            if isinstance(data, Unread) and data.special is not None:
                self.summary.skipped.append(f"{shown} ({data.special})")
                self.report(Finding(shown, "not a regular file", data.reason))
                continue
            self.summary.files[bp.kind] += 1
            doc = self._check(bp, shown, data)
            if doc is not None and on_good is not None:
                on_good(GoodBatch(shown, doc["batchId"], doc))
        return self.summary

    def _check(self, bp: BatchPath, shown: str, data: bytes | Unread) -> dict[str, Any] | None:
        """The document when its entries could be checked, else None (findings reported)."""
        if isinstance(data, Unread):
            self.report(Finding(shown, "unreadable", data.reason))
            return None
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            self.report(
                Finding(shown, "not JSON", f"truncated or corrupt ({exc})", "a JSON object")
            )
            return None
        if not isinstance(doc, dict):
            self.report(Finding(shown, "shape", "not a batch", "a JSON object", short_repr(doc)))
            return None
        missing = [k for k in BATCH_KEYS if k not in doc]
        if missing:
            self.report(Finding(shown, "shape", f"missing {', '.join(missing)}"))
        if "version" in doc and not self._version_ok(shown, doc["version"]):
            return None
        self._check_header(bp, shown, doc)
        entries = doc.get("entries")
        if not isinstance(entries, list):
            if "entries" in doc:
                self.report(Finding(shown, "shape", "entries is not an array"))
            return None
        self.summary.entries += len(entries)
        if "entryCount" in doc and doc["entryCount"] != len(entries):
            self.report(
                Finding(
                    shown,
                    "entryCount",
                    "does not match the entries",
                    str(len(entries)),
                    short_repr(doc["entryCount"]),
                )
            )
        array = orjson.dumps(entries)
        if "entriesSha256" in doc:
            digest = hashlib.sha256(array).hexdigest()
            if digest != doc["entriesSha256"]:
                self.report(
                    Finding(
                        shown,
                        "checksum",
                        "entriesSha256 does not match the entries",
                        digest,
                        short_repr(doc["entriesSha256"]),
                    )
                )
        self._check_entries(shown, entries, array)
        return doc if "batchId" in doc and isinstance(doc["batchId"], str) else None

    def _version_ok(self, shown: str, version: Any) -> bool:
        """Older majors are read (formats.py); a newer one is a finding, not corruption."""
        expected = f"{formats.BATCH_MAJOR}.x or older"
        try:
            major = formats.major_of(version)
        except formats.BadVersionError:
            self.report(Finding(shown, "version", "not a version number", expected, repr(version)))
            return False
        if major > formats.BATCH_MAJOR:
            self.report(
                Finding(
                    shown,
                    "version",
                    "written by a newer flowagg; upgrade to read it",
                    expected,
                    str(version),
                )
            )
            return False
        return True

    def _check_header(self, bp: BatchPath, shown: str, doc: dict[str, Any]) -> None:
        batch_id = doc.get("batchId")
        if "batchId" in doc:
            if not isinstance(batch_id, str) or not BATCH_ID_RE.fullmatch(batch_id):
                self.report(
                    Finding(
                        shown,
                        "batchId",
                        "not a batch id",
                        "<13-digit ms>_<12-digit seq>",
                        short_repr(batch_id),
                    )
                )
            elif batch_id != bp.name_id:
                self.report(
                    Finding(shown, "batchId", "does not match the file name", bp.name_id, batch_id)
                )
        ts = doc.get("timestamp")
        if "timestamp" in doc and (type(ts) is not int or ts < 0):
            self.report(
                Finding(shown, "shape", "timestamp is not epoch ms", "an integer", short_repr(ts))
            )
        if "trigger" in doc and doc["trigger"] not in TRIGGERS:
            self.report(
                Finding(
                    shown,
                    "shape",
                    "unknown trigger",
                    "|".join(TRIGGERS),
                    short_repr(doc["trigger"]),
                )
            )
        if not isinstance(doc.get("recovered", False), bool):
            self.report(
                Finding(
                    shown,
                    "shape",
                    "recovered is not a boolean",
                    "true|false",
                    repr(doc["recovered"]),
                )
            )
        if bp.kind != AGGREGATED:
            try:
                check_recovery_fields(doc)
            except CorruptBatch as exc:
                self.report(Finding(shown, "shape", str(exc)))

    def _check_entries(self, shown: str, entries: list[Any], array: bytes) -> None:
        """`array`: the entries as compact JSON. When all of them together fit maxEntryBytes
        (with room for a `"metadata":{}` the validator adds) and are `plain_json`, an entry
        whose fields pass `plainly_valid` is valid without being rebuilt and dumped again."""
        now_ms = self.now_ms
        limit = self.max_entry_bytes
        cheap = len(array) + _ADDED_METADATA <= limit and plain_json(array)
        for index, raw in enumerate(entries):
            if cheap and plainly_valid(raw, now_ms):
                continue
            try:
                _, client_id, _ = validate_entry_json(
                    raw, index, now_ms=now_ms, max_entry_bytes=limit, new_id=_no_id
                )
            except EntryError as exc:
                self.report(Finding(shown, "entry", str(exc)))
                continue
            if not client_id:
                self.report(
                    Finding(
                        shown, "entry", f"entry {index + 1}: has no entryId (every stored one has)"
                    )
                )


def _no_id() -> str:
    return _NO_ID


def check_chunk(
    settings: tuple[Path, int, int, int], files: Sequence[BatchPath]
) -> tuple[Summary, list[Finding]]:
    """One worker's share: the counts of these files and their findings, in order."""
    root, now_ms, max_entry_bytes, limit = settings
    found: list[Finding] = []
    checker = FileChecker(
        root, now_ms=now_ms, max_entry_bytes=max_entry_bytes, limit=limit, report=found.append
    )
    return checker.check_files(files, None, None), found
