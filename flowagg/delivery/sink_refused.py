"""Entries a sink refused one by one (SPEC §6a): parked alone, their batch-mates delivered.

A sink's data error tied to one entry (PostgreSQL's 22xxx on a value) must not take the rest
of its batch down. The sink delivers the rest; each refused entry is written here, in
`recovery/refused/<batchId>.<index>.refused.json`, with the reason, before the batch counts
as accepted. The batch itself is stored whole in aggregated/ as usual: the entry is kept
locally, exactly once, and a refused file is not a batch file, so no reader counts it twice.
The name depends only on the batch id and the entry's place in it, and a batch id names one
set of entries forever, so a re-send after a crash rewrites the same file, never a second.
`Delivered` is what a sink reports beyond "accepted": these refusals, re-sends, collisions.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path
from typing import Any

import orjson

from flowagg.core.fsutil import atomic_write, fsync_dir

REFUSED_SUFFIX = ".refused.json"
FORMAT_VERSION = "1.0.0"


@dataclasses.dataclass(frozen=True)
class Refused:
    """One entry of a batch the sink would not store, and its reason."""

    index: int
    entry_id: str
    reason: str


class RefusedStore:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        # Batches are parked from several delivering threads: the one that finds the folder
        # made by another must not write into it before its name is durable.
        self._made = threading.Lock()

    def park(self, batch_id: str, data: bytes, refused: list[Refused], now_ms: int) -> None:
        """Write one file per refused entry, durable before the caller reports the batch
        accepted; raises OSError (the batch then fails and is delivered again later)."""
        entries: list[Any] = orjson.loads(data)["entries"]
        self._ensure_folder()
        for item in refused:
            doc = {
                "version": FORMAT_VERSION,
                "batchId": batch_id,
                "index": item.index,
                "entryId": item.entry_id,
                "reason": item.reason,
                "refusedAt": now_ms,
                "entry": entries[item.index],
            }
            atomic_write(
                self.folder / f"{batch_id}.{item.index}{REFUSED_SUFFIX}", orjson.dumps(doc)
            )

    def count(self) -> int:
        try:
            return sum(1 for name in os.listdir(self.folder) if name.endswith(REFUSED_SUFFIX))
        except FileNotFoundError:
            return 0

    def _ensure_folder(self) -> None:
        # Made on first use: a root whose sink never refused an entry has no such folder.
        with self._made:
            try:
                os.mkdir(self.folder, 0o700)
            except FileExistsError:
                return
            fsync_dir(self.folder.parent)


@dataclasses.dataclass(frozen=True)
class Delivered:
    """What a sink that reports more than "accepted" learnt while storing a batch."""

    # The receiver already held some of the batch's entries, the same content: a re-send.
    already_held: bool = False
    # Entries it would not store, each for a reason of its own; the rest were stored.
    refused: tuple[Refused, ...] = ()
    # Entries whose id it held with other content (two clients used one id), newly recorded.
    collisions: int = 0
