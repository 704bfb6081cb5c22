"""Deleting a step's finished spool files from journal/spool/ (step 5 of spool.py).

Apart from the intake because it is all blocking file-system work, run off the loop. The
unlinks run side by side: unlinking a file that holds data may wait for the disk to discard
its blocks (ext4 mounted with `discard` takes milliseconds per file), and those waits overlap.
The intake's one folder fsync then makes the step's deletions durable.
"""

from __future__ import annotations

import itertools
import logging
import threading
from pathlib import Path

log = logging.getLogger("flowagg.spool")

DELETE_THREADS = 8  # a step's unlinks in flight at once


def unlink_side_by_side(folder: Path, adopted: list[str]) -> list[str]:
    """Unlink adopted files (errors logged: they wait for the next rescan); returns those
    gone. Blocking: the threads are started here, off the loop, whose thread would otherwise
    wait for each to start."""
    parts = [adopted[k::DELETE_THREADS] for k in range(min(DELETE_THREADS, len(adopted)))]
    unlinked: list[list[str]] = [[] for _ in parts]

    def unlink(k: int) -> None:
        unlinked[k] = _unlink(folder, parts[k])

    threads = [
        threading.Thread(target=unlink, args=(k,), daemon=True) for k in range(1, len(parts))
    ]
    for thread in threads:
        thread.start()
    unlink(0)
    for thread in threads:
        thread.join()
    return list(itertools.chain.from_iterable(unlinked))


def _unlink(folder: Path, adopted: list[str]) -> list[str]:
    gone = []
    for name in adopted:
        try:
            (folder / name).unlink(missing_ok=True)
            gone.append(name)
        except OSError as exc:
            log.error(
                "spool file %s is stored but cannot be deleted (%s); trying again at the"
                " next rescan",
                name,
                exc,
            )
    return gone
