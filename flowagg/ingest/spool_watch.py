"""What wakes the spool intake between its rescans: inbox/ events, seen by watchdog.

Apart from the intake because it runs on watchdog's own thread; all it does there is set the
intake's asyncio event, thread-safely, on the intake's loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer


class _Kick(FileSystemEventHandler):
    def __init__(self, kick: Callable[[], Any]) -> None:
        self._kick = kick

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("created", "moved", "closed"):
            self._kick()


class InboxWatch:
    def __init__(self, inbox: Path, wake: asyncio.Event) -> None:
        self._inbox = inbox
        self._wake = wake
        self._observer: Any = None

    def start(self) -> None:
        """Set `wake` on each file created in or moved into inbox/; call it on the loop."""
        loop = asyncio.get_running_loop()
        observer = Observer()
        observer.schedule(
            _Kick(lambda: loop.call_soon_threadsafe(self._wake.set)),
            str(self._inbox),
            recursive=False,
        )
        observer.daemon = True
        observer.start()
        self._observer = observer

    async def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            await asyncio.to_thread(self._observer.join)
