"""What wakes the spool intake between its rescans: inbox/ events, seen by watchdog.

Apart from the intake because it runs on watchdog's own thread; all it does there is set the
intake's asyncio event, thread-safely, on the intake's loop. A burst of events costs one
wake-up of the loop, not one each: a wake-up that is pending takes the ones behind it along.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

# Only what can bring a file in: the kernel then leaves out the writes, attribute changes,
# opens and deletions (a client's .tmp file makes one event per write otherwise).
WAKING_EVENTS = [FileCreatedEvent, DirCreatedEvent, FileMovedEvent, DirMovedEvent, FileClosedEvent]


class _Kick(FileSystemEventHandler):
    def __init__(self, loop: asyncio.AbstractEventLoop, wake: Callable[[], Any]) -> None:
        self._loop = loop
        self._wake = wake
        self._pending = False  # a wake-up is scheduled on the loop and has not run yet

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("created", "moved", "closed") and not self._pending:
            self._pending = True
            self._loop.call_soon_threadsafe(self._run)

    def _run(self) -> None:
        # Cleared before the wake: an event after this line schedules a wake-up of its own,
        # one before it is seen by the scan this wake starts (it lists inbox/ afterwards).
        self._pending = False
        self._wake()


class InboxWatch:
    def __init__(self, inbox: Path, wake: asyncio.Event) -> None:
        self._inbox = inbox
        self._wake = wake
        self._observer: Any = None

    def start(self) -> None:
        """Set `wake` on each file created in or moved into inbox/; call it on the loop."""
        observer = Observer()
        observer.schedule(
            _Kick(asyncio.get_running_loop(), self._wake.set),
            str(self._inbox),
            recursive=False,
            event_filter=WAKING_EVENTS,
        )
        observer.daemon = True
        observer.start()
        self._observer = observer

    async def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            await asyncio.to_thread(self._observer.join)
