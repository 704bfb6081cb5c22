"""The `command` sink (SPEC §6a): runs a program with the batch JSON on stdin.

Exit 0 accepts, 75 = EX_TEMPFAIL retries, any other code is permanent, and a program that
cannot run means the sink is down; a program killed (by the timeout or a signal) may have
stored the batch, so that is an `AmbiguousDelivery`. Apart
from sink.py because running a child process (its group, its pipes, its stderr tail) is a
transport of its own; the breaker and the counters around every sink stay there.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import threading
from typing import IO

from flowagg.core.errors import AmbiguousDelivery, PermanentError, SinkDownError, TransientError

EX_TEMPFAIL = 75
STDERR_TAIL_BYTES = 4096


def _tail(stream: IO[bytes], keep: collections.deque[bytes]) -> None:
    """Drain a pipe, keeping only its last bytes: a chatty program never costs memory."""
    for chunk in iter(lambda: stream.read(4096), b""):
        keep.append(chunk)
        while sum(len(c) for c in keep) > STDERR_TAIL_BYTES and len(keep) > 1:
            keep.popleft()


class CommandSink:
    def __init__(self, argv: list[str], timeout_s: float) -> None:
        self.argv = argv
        self.timeout_s = timeout_s
        self.name = f"command {argv[0]}"

    def deliver(self, batch_id: str, data: bytes) -> None:
        try:
            # Its own process group, so a timeout kills the program and everything it started;
            # stdout is discarded (SPEC §6a), stderr keeps a bounded tail for the reason.
            proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            # A missing or unrunnable program is for an operator to fix: keep the batch.
            raise SinkDownError(f"sink command cannot run: {exc}") from None
        assert proc.stdin is not None and proc.stderr is not None
        tail: collections.deque[bytes] = collections.deque()
        reader = threading.Thread(target=_tail, args=(proc.stderr, tail), daemon=True)
        reader.start()
        writer = threading.Thread(target=_feed, args=(proc.stdin, data), daemon=True)
        writer.start()
        try:
            code = proc.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            # It may have stored the batch and hung on the way out.
            raise AmbiguousDelivery(
                f"sink command timed out after {self.timeout_s:g} s (killed with its children)"
            ) from None
        finally:
            writer.join(timeout=1.0)
            reader.join(timeout=1.0)
            proc.stderr.close()
        detail = b"".join(tail).decode(errors="replace").strip().splitlines()[-1:] or [""]
        if code == 0:
            return
        if code < 0:
            # Killed by a signal (a `systemctl stop` reaching it, the OOM killer): not a verdict
            # on the batch, and it may have stored it before it died.
            name = signal.Signals(-code).name if -code in signal.valid_signals() else -code
            raise AmbiguousDelivery(f"sink command killed by signal {name}: {detail[0][-200:]}")
        message = f"sink command exited {code}: {detail[0][-200:]}"
        if code == EX_TEMPFAIL:
            raise TransientError(message)
        raise PermanentError(message)


def _feed(stdin: IO[bytes], data: bytes) -> None:
    # A program that exits without reading its input is its own verdict, given by its code.
    with contextlib.suppress(OSError):
        stdin.write(data)
    with contextlib.suppress(OSError):
        stdin.close()


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5.0)
