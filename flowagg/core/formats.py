"""Format versions of the files flowagg writes (SPEC §11), and the one rule for reading them.

A version is "major.minor.patch" (or a bare integer major). A reader takes every version whose
major it knows, older ones included; a newer major means a newer flowagg wrote the file, so it
is refused with a message and left exactly where it is: never quarantined, never deleted.

| file | field | version |
|---|---|---|
| batch, failed, abandoned | `version` | BATCH ("2.0.0") |
| journal segment header | `v` | journal_format.FORMAT_VERSION |
| health snapshot | `formatVersion` | HEALTH |
| audit log line | `v` | audit.AUDIT_FORMAT_VERSION |
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flowagg import BATCH_FORMAT_VERSION
from flowagg.core.errors import EXIT_ROOT_UNUSABLE, FlowaggError

BATCH = BATCH_FORMAT_VERSION
BATCH_MAJOR = 2
HEALTH = 1
HEALTH_MAJOR = 1


class NewerFormatError(FlowaggError):
    """A file written by a newer flowagg: refused, never quarantined or deleted."""

    exit_code = EXIT_ROOT_UNUSABLE


class BadVersionError(ValueError):
    """A version field that is no version at all: the file is damaged, not newer."""


def major_of(version: Any) -> int:
    """The major of `version`; a file without one is taken as the oldest format."""
    if version is None:
        return 0
    if isinstance(version, int) and not isinstance(version, bool):
        return version
    if isinstance(version, str):
        head = version.split(".", 1)[0]
        if head.isdigit():
            return int(head)
    raise BadVersionError(f"version {version!r} is not a version number")


def check(version: Any, known_major: int, path: Path | str) -> None:
    """Raise NewerFormatError for a major this flowagg does not know yet."""
    if major_of(version) > known_major:
        name = path.name if isinstance(path, Path) else path
        raise NewerFormatError(
            f"{name} has format version {version}, newer than this flowagg reads"
            f" ({known_major}.x); upgrade flowagg to read it (the file is left as it is)"
        )
