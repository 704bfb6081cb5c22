"""Writing a run of batches side by side (batch_runs) and publishing them in order.

Apart from the flusher, which decides which batches go as a run and what happens to those a
run could not store: this only writes, renames and makes the names durable.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
from collections.abc import Callable

from flowagg.batches.batch_runs import Staged, Stager, stage
from flowagg.batches.storage import Batch, CompletedFiles
from flowagg.core.clock import Clock
from flowagg.core.fsutil import fsync_dir

# The flusher's own log: these lines tell what became of its batches.
log = logging.getLogger("flowagg.flusher")


class RunWriter:
    def __init__(
        self,
        stager: Stager,
        clock: Clock,
        published: Callable[[list[Staged], float], None],
    ) -> None:
        self.clock = clock
        self._stager = stager
        # Told of every group of files made durable, in order, with when the run started.
        self._published = published

    def write(
        self,
        run: list[Batch],
        files: CompletedFiles,
        started: float,
        fixed: dict[str, bytes] | None = None,
    ) -> int:
        """Write the run's files side by side and publish them in order, one directory fsync
        for the names renamed while the next file was still being written.

        Returns how many batches were stored; the rest go one at a time. `fixed`: the bytes
        a sink accepted, by batch id, which are what gets written.
        """
        if not run:
            return 0
        now_ms = self.clock.now_ms()
        fixed = fixed or {}

        def job(batch: Batch) -> Callable[[], Staged]:
            def make() -> Staged:
                data = fixed.get(batch.batch_id) or batch.encode(now_ms)
                return stage(batch, files.path(batch.batch_id), files.file_bytes(data))

            return make

        if len(run) == 1:
            done: concurrent.futures.Future[Staged] = concurrent.futures.Future()
            try:
                done.set_result(job(run[0])())
            except Exception as exc:
                done.set_exception(exc)
            futures = [done]
        else:
            self._stager.start()
            futures = [self._stager.submit(job(batch)) for batch in run]
        renamed: list[Staged] = []  # published, not yet durable: one directory fsync each group
        stored, end = 0, len(run)
        for n, future in enumerate(futures):
            if renamed and not future.done():
                if not self._publish(renamed, started):
                    end, renamed = n, []
                    break
                stored, renamed = n, []
            try:
                staged = future.result()
            except Exception as exc:
                log.warning("batch %s: run write failed (%s); retried alone", run[n].batch_id, exc)
                end = n
                break
            try:
                os.rename(staged.tmp, staged.target)
            except OSError as exc:
                staged.discard()
                log.warning("batch %s: rename failed (%s); retried alone", run[n].batch_id, exc)
                end = n
                break
            renamed.append(staged)
        if renamed and self._publish(renamed, started):
            stored += len(renamed)
        for future in futures[end:]:
            with contextlib.suppress(Exception):
                future.result().discard()
        return stored

    def _publish(self, renamed: list[Staged], started: float) -> bool:
        """Make the renamed files' names durable, then report them stored, in order."""
        try:
            fsync_dir(renamed[0].target.parent)
        except OSError as exc:
            # Visible but perhaps not durable: the one-at-a-time path writes them again.
            log.warning("run of %d batch files: directory fsync failed (%s)", len(renamed), exc)
            return False
        self._published(renamed, started)
        return True
