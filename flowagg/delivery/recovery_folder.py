"""Reading recovery/ and recovery/abandoned/: which failed files there are, one file loaded and
verified, and the age of the oldest batch waiting. A file that cannot be trusted goes to
errors/ instead of raising out of every pass; one in a newer format is refused and left alone.

Apart from the loop because reconciling, retrying and requeueing all read through it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from flowagg.batches.storage import CorruptBatch, decode_batch, read_regular
from flowagg.core.clock import Clock
from flowagg.core.formats import NewerFormatError
from flowagg.core.fsutil import TEMP_MARK, quarantine_file
from flowagg.core.layout import Layout
from flowagg.delivery.recovery_format import (
    ABANDONED_SUFFIX,
    BATCH_ID_RE,
    FAILED_SUFFIX,
    check_recovery_fields,
)
from flowagg.delivery.recovery_report import RecoveryReport

# The recovery side's logger, which logsetup also sends to recovery.log.
log = logging.getLogger("flowagg.recovery")


def undelivered_lag_ms(layout: Layout, clock: Clock) -> int:
    """Age of the oldest batch waiting in recovery/, from its first entry's arrival (the
    batch id's prefix); 0 when none waits."""
    oldest = min(
        (
            name
            for name in os.listdir(layout.recovery)
            if name.endswith(FAILED_SUFFIX) and BATCH_ID_RE.fullmatch(name[: -len(FAILED_SUFFIX)])
        ),
        default=None,
    )
    return 0 if oldest is None else max(0, clock.now_ms() - int(oldest[:13]))


class RecoveryFolder:
    def __init__(self, layout: Layout, clock: Clock) -> None:
        self.layout = layout
        self.clock = clock

    def load(self, path: Path, report: RecoveryReport) -> dict[str, Any] | None:
        """Parse and verify a recovery file; quarantine it when it cannot be trusted."""
        try:
            doc = decode_batch(read_regular(path), path)
            expected = doc["batchId"] + (
                FAILED_SUFFIX if path.name.endswith(FAILED_SUFFIX) else ABANDONED_SUFFIX
            )
            if path.name != expected:
                raise CorruptBatch(f"file name does not match batchId {doc['batchId']!r}")
            check_recovery_fields(doc)
            return doc
        except NewerFormatError as exc:
            log.error("%s", exc)
            report.refused.append(path.name)
            return None
        except (CorruptBatch, OSError, TypeError, KeyError, AttributeError) as exc:
            self.quarantine(path, f"unreadable recovery file: {exc}", report)
            return None

    def quarantine(self, path: Path, reason: str, report: RecoveryReport) -> None:
        with contextlib.suppress(FileNotFoundError):
            target = quarantine_file(
                self.layout.errors,
                path,
                reason=reason,
                component="recovery",
                now_ms=self.clock.now_ms(),
            )
            report.quarantined.append(path.name)
            log.warning("quarantined %s to errors/%s: %s", path.name, target.name, reason)

    def failed_files(self, report: RecoveryReport) -> list[Path]:
        paths = []
        for name in sorted(os.listdir(self.layout.recovery)):
            path = self.layout.recovery / name
            if name.startswith((".", TEMP_MARK)) or path.is_dir():
                continue
            if name.endswith(FAILED_SUFFIX):
                paths.append(path)
            else:
                self.quarantine(path, "unexpected file in recovery/", report)
        return paths
