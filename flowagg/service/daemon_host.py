"""What the daemon's helpers may see of it: narrow interfaces, not `Daemon` itself.

`jobs`, `ops` and `metrics` serve the daemon but sit below it in the import order. Each
takes one of these protocols, which `Daemon` satisfies, so none of them imports `daemon`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from flowagg.core.clock import Clock
    from flowagg.core.config import Config
    from flowagg.core.layout import Layout
    from flowagg.delivery.recovery import Recovery
    from flowagg.delivery.sink import GuardedSink
    from flowagg.ingest.pipeline import Pipeline
    from flowagg.ingest.ratelimit import RateLimiter
    from flowagg.ingest.server import Peer, SocketServer
    from flowagg.ingest.spool import SpoolIntake


class MetricsStatus(Protocol):
    """The metrics export's part of `status --json`."""

    def status(self) -> dict[str, Any]: ...


class TimedWork(Protocol):
    """The jobs the scheduler runs."""

    config: Config

    async def scheduled_recovery(self) -> None: ...
    async def write_health(self) -> None: ...
    async def maintenance(self) -> None: ...
    async def check_socket(self) -> None: ...
    async def run_cleanup(self) -> None: ...


class MetricsSource(Protocol):
    """What a scrape reads."""

    config: Config
    layout: Layout
    pipeline: Pipeline | None


class DaemonHost(MetricsSource, Protocol):
    """What the socket's operations read and drive."""

    clock: Clock
    server: SocketServer | None
    spool: SpoolIntake | None
    sink: GuardedSink | None
    recovery: Recovery
    limiter: RateLimiter
    metrics: MetricsStatus
    stopping: bool
    started_mono: float
    socket_recreated: int
    last_reload: dict[str, Any] | None

    def reload(self, peer: Peer | None = None) -> dict[str, Any]: ...
    def health_snapshot(self, *, running: bool = True) -> dict[str, Any]: ...
    async def recover(
        self, *, force: bool, requeue: bool = False, batch: str | None = None
    ) -> dict[str, Any]: ...
