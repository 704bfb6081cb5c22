"""Which client entryIds of an add are new: decided on the loop, never guessed.

An id is *claimed* by the add that is deciding it or journaling it, until that add knows its
fate. Any other add carrying the id waits for the claim instead of answering for it: a resend
that answered `duplicate` for a write that then failed would hold an acknowledgement for an
entry never stored, and one that went ahead would store it twice. The claim's future says
whether the claimed ids are known now (stored, or found already remembered).

Memory answers almost every id (`DedupeIndex.check`); the filter hits that only SQLite can
settle go to its lookup thread in one batch per add, so the loop never waits on SQLite.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from itertools import compress
from operator import itemgetter
from typing import Any

from flowagg.journal.dedupe import DedupeIndex, LookupBusy
from flowagg.journal.dedupe_filter import Key

Valid = tuple[dict[str, Any], bool, bytes]  # entry, client-supplied id?, compact JSON
_ENTRY_ID = itemgetter("entryId")


@dataclasses.dataclass
class Screened:
    """An add's entries minus its duplicates, with its new client ids claimed."""

    datas: list[bytes]
    ids: list[str]
    client_idx: list[int]  # positions in `datas` of the entries with a client id
    client_ids: list[str]  # their ids
    duplicates: int
    claim: asyncio.Future[bool]
    claimed: list[str]  # every id the claim holds: the new ones and those found stored
    keys: dict[str, Key]  # filter keys of new ids, worked out by the screen, reused to add


class DedupeGate:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.claims: dict[str, asyncio.Future[bool]] = {}

    async def screen(
        self, valid: list[Valid], dedupe: DedupeIndex, now_ms: Callable[[], int]
    ) -> Screened:
        """Drop duplicates and claim the rest; raises LookupBusy when SQLite cannot tell.

        The caller must `release` the claim once the entries are durable or refused.
        """
        known: set[str] = set()  # settled by a claim this add waited for
        entries, client, datas = zip(*valid, strict=True) if valid else ((), (), ())
        all_ids = list(map(_ENTRY_ID, entries))
        ids = all_ids if all(client) else list(compress(all_ids, client))
        while True:
            claims = self.claims
            # A set operation, not a lookup per id: other adds' claims are many under load.
            waits = {i: claims[i] for i in claims.keys() & ids}
            if waits:
                await asyncio.wait(set(waits.values()))
                known.update(i for i, fut in waits.items() if fut.result())
                continue
            window_now = now_ms()
            verdicts, keys = dedupe.check_many(ids, window_now, known)
            claim: asyncio.Future[bool] = self.loop.create_future()
            new = [i for i, seen in verdicts.items() if not seen]
            for entry_id in new:
                self.claims[entry_id] = claim
            unsure = [i for i in new if verdicts[i] is None]
            if unsure:
                try:
                    found = await asyncio.wrap_future(dedupe.confirm_later(unsure, window_now))
                except BaseException:
                    self.release(claim, new, known=False)
                    raise
                verdicts.update((i, True) for i in found)
            if len(verdicts) == len(ids) and not any(verdicts.values()):
                # Every client id is new and named once: nothing to drop (the usual add).
                client_idx = list(range(len(ids))) if ids is all_ids else _where(client)
                return Screened(list(datas), all_ids, client_idx, ids, 0, claim, new, keys)
            return self._split(valid, verdicts, claim, new, keys)

    @staticmethod
    def _split(
        valid: list[Valid],
        verdicts: dict[str, bool | None],
        claim: asyncio.Future[bool],
        claimed: list[str],
        keys: dict[str, Key],
    ) -> Screened:
        datas: list[bytes] = []
        ids: list[str] = []
        client_idx: list[int] = []
        duplicates = 0
        taken: set[str] = set()
        for entry, client_id, data in valid:
            entry_id = entry["entryId"]
            if client_id:
                if verdicts[entry_id] or entry_id in taken:
                    duplicates += 1
                    continue
                taken.add(entry_id)
                client_idx.append(len(datas))
            datas.append(data)
            ids.append(entry_id)
        client_ids = [ids[i] for i in client_idx]
        return Screened(datas, ids, client_idx, client_ids, duplicates, claim, claimed, keys)

    def release(self, claim: asyncio.Future[bool], ids: list[str], *, known: bool) -> None:
        """End a claim: `known` when its ids are now remembered (stored or found stored)."""
        for entry_id in ids:
            del self.claims[entry_id]
        claim.set_result(known)


def _where(flags: tuple[bool, ...]) -> list[int]:
    return list(compress(range(len(flags)), flags))


__all__ = ["DedupeGate", "LookupBusy", "Screened", "Valid"]
