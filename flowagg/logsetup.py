"""The daemon's logs: aggregation.log and stderr get everything; recovery.log the recovery side."""

from __future__ import annotations

import logging
import logging.handlers
import sys

from .config import Config
from .layout import Layout

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(layout: Layout, config: Config) -> None:
    """aggregation.log and stderr get everything; recovery.log gets the recovery side too."""
    formatter = logging.Formatter(LOG_FORMAT)

    def rotating(name: str) -> logging.Handler:
        handler = logging.handlers.RotatingFileHandler(
            layout.logs / name,
            maxBytes=config.log_max_bytes,
            backupCount=config.log_backups,
            encoding="utf-8",
        )
        handler.setFormatter(formatter)
        return handler

    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(formatter)
    root = logging.getLogger("flowagg")
    root.setLevel(config.log_level)
    root.propagate = False
    for logger, handlers in (
        (root, [rotating("aggregation.log"), stderr]),
        (logging.getLogger("flowagg.recovery"), [rotating("recovery.log")]),
    ):
        for old in list(logger.handlers):
            logger.removeHandler(old)
            old.close()
        for handler in handlers:
            logger.addHandler(handler)
