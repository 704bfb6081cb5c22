"""Exit codes (SPEC §8) and the one-line user errors that carry them."""

from __future__ import annotations

EXIT_OK = 0
EXIT_DAEMON_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_ALREADY_RUNNING = 3
EXIT_ROOT_UNUSABLE = 4
# `add` only: the input or the command line was unusable, so nothing was sent or stored. Exit 2
# from `add` means the valid entries were stored and only the rejected ones were not.
EXIT_NOTHING_STORED = 5


class FlowaggError(Exception):
    """An error a user can cause: one line naming the cause and the fix, plus an exit code."""

    exit_code = EXIT_DAEMON_FAILURE

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(FlowaggError):
    exit_code = EXIT_USAGE


class RootUnusableError(FlowaggError):
    exit_code = EXIT_ROOT_UNUSABLE


class AlreadyRunningError(FlowaggError):
    exit_code = EXIT_ALREADY_RUNNING


class NotRunningError(FlowaggError):
    exit_code = EXIT_NOT_RUNNING


class DaemonError(FlowaggError):
    exit_code = EXIT_DAEMON_FAILURE


class PermanentError(Exception):
    """A batch failure that retrying cannot fix (an invalid batch, a sink's 4xx)."""


class TransientError(OSError):
    """A failure worth retrying that is not a file-system error (a sink's 5xx, a timeout)."""


class SinkDownError(TransientError):
    """The sink as a whole cannot take batches (unreachable, unavailable, cannot run, or its
    table, a column or a grant is gone): not a verdict on the batch, so it costs no retry
    (recovery pauses instead), and the breaker counts a failure."""


class AmbiguousDelivery(TransientError):
    """The sink may hold the batch (a timeout, a reset after the request went out, a killed
    command): retrying at once would likely send a second copy, so the batch waits."""


class CircuitOpenError(TransientError):
    """The sink's circuit breaker is open: the batch was not tried, so it costs no retry."""

    def __init__(self, message: str, retry_in_s: float = 0.0) -> None:
        super().__init__(message)
        self.retry_in_s = retry_in_s


def classify(exc: BaseException) -> str:
    """'permanent' skips the retries and goes straight to abandoned/; else 'transient'.

    Disk errors (ENOSPC, EACCES, EIO, EROFS, ...) are transient: an operator can free space
    or fix permissions, and the batch must still be there when they do.
    """
    return "permanent" if isinstance(exc, PermanentError) else "transient"
