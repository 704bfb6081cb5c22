"""The daemon's logs: aggregation.log and stderr get everything; recovery.log the recovery side;
audit.log the state-changing operations (see audit.py)."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import time
from typing import TextIO

from flowagg.core import audit
from flowagg.core.config import Config
from flowagg.core.layout import Layout

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# At most one "cannot write the log" line per this many seconds, however often the disk
# flips between full and not.
REPORT_INTERVAL_S = 60.0


class LogFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating log file that, when it cannot be written (a full disk), says so once on
    stderr instead of logging's multi-line "--- Logging error ---" for every record, and says
    again when writing works."""

    def __init__(self, *args: object, report_to: TextIO | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.report_to = report_to
        self.failing = False
        self.lost = 0
        self._reported = False
        self._last_report = -REPORT_INTERVAL_S
        self._error: BaseException | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self._error = None
        super().emit(record)
        if self._error is None and self.failing:
            self.failing = False
            if self._reported:
                self._say(f"writing {self.baseFilename} works again; {self.lost} lines were lost")
            self.lost = 0

    def handleError(self, record: logging.LogRecord) -> None:
        self._error = sys.exc_info()[1]
        self.lost += 1
        if self.failing:
            return
        self.failing = True
        now = time.monotonic()
        self._reported = now - self._last_report >= REPORT_INTERVAL_S
        if self._reported:
            self._last_report = now
            self._say(
                f"cannot write {self.baseFilename} ({self._error}); log lines are dropped until"
                " it works again (free space if the disk is full)"
            )

    def _say(self, text: str) -> None:
        out = self.report_to or sys.stderr
        try:
            out.write(f"flowagg: {text}\n")
            out.flush()
        except (OSError, ValueError):
            pass  # stderr is gone too: nothing left to tell


class AuditFileHandler(LogFileHandler):
    """audit.log rotates by size into audit.log.<ms> files that no count limits: a flood of
    lines (junk files, each quarantined and audited) cannot push the last days of history out.
    Cleanup removes rotated logs older than cleanupAgeMs, so it is age that bounds them."""

    def doRollover(self) -> None:
        if self.stream:
            self.stream.close()
            self.stream = None  # type: ignore[assignment]
        ms = time.time_ns() // 1_000_000
        while os.path.lexists(f"{self.baseFilename}.{ms}"):
            ms += 1
        if os.path.exists(self.baseFilename):
            os.rename(self.baseFilename, f"{self.baseFilename}.{ms}")
        self.stream = self._open()


def setup_logging(layout: Layout, config: Config) -> None:
    """aggregation.log and stderr get everything; recovery.log gets the recovery side too."""
    formatter = logging.Formatter(LOG_FORMAT)

    def rotating(
        name: str, fmt: logging.Formatter = formatter, kind: type[LogFileHandler] = LogFileHandler
    ) -> logging.Handler:
        handler = kind(
            layout.logs / name,
            maxBytes=config.log_max_bytes,
            backupCount=config.log_backups,
            encoding="utf-8",
        )
        handler.setFormatter(fmt)
        return handler

    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(formatter)
    root = logging.getLogger("flowagg")
    root.setLevel(config.log_level)
    root.propagate = False
    # Audit lines are JSON in their own file whatever logLevel says, and not in the others.
    audit_log = logging.getLogger(audit.LOGGER)
    audit_log.setLevel(logging.INFO)
    audit_log.propagate = False
    for logger, handlers in (
        (root, [rotating("aggregation.log"), stderr]),
        (logging.getLogger("flowagg.recovery"), [rotating("recovery.log")]),
        (
            audit_log,
            [rotating(audit.FILE_NAME, logging.Formatter("%(message)s"), AuditFileHandler)],
        ),
    ):
        for old in list(logger.handlers):
            logger.removeHandler(old)
            old.close()
        for handler in handlers:
            logger.addHandler(handler)
