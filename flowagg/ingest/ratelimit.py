"""Rate limits on `add` (SPEC §11): token buckets per peer uid, per client process and per userId.

Off by default, and then `add` never gets here. Every bucket is keyed by what the kernel says
about the peer (SO_PEERCRED), never by what it claims alone: the per-userId bucket is per
(uid, userId), so a member sending as `userId "alice"` spends its own budget, not alice's.
The per-process bucket (`rateLimitPerConnection`) is keyed by (uid, pid), so reconnecting does
not refill it; the per-uid bucket bounds a uid whatever processes it starts.

Entries over a limit are answered `rate_limited` with `retryAfterMs` and their indexes; the
others in the same request are stored. Buckets live in LRU maps whose size is a setting
(`rateLimitUsers`), so memory never grows with traffic: a key pushed out comes back with a full
bucket. The clock is injected.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from flowagg.core.config import Config
from flowagg.ingest.peers import Peer


class Bucket:
    __slots__ = ("last", "tokens")

    def __init__(self, tokens: float, now: float) -> None:
        self.tokens = tokens
        self.last = now


class Buckets:
    """Token buckets by key, the least recently used dropped past `size`."""

    def __init__(self, rate: float, burst: int, size: int) -> None:
        self.rate = rate
        self.burst = burst
        self.size = size
        self._items: OrderedDict[Any, Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Any, now: float) -> Bucket:
        """The key's bucket, refilled up to `now`."""
        bucket = self._items.get(key)
        if bucket is None:
            bucket = self._items[key] = Bucket(float(self.burst), now)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(key)
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.last) * self.rate)
            bucket.last = now
        return bucket

    def wait_s(self, bucket: Bucket, wanted: int) -> float:
        """Seconds until `wanted` tokens (at most a burst) are back."""
        return max(0.0, (min(wanted, self.burst) - bucket.tokens) / self.rate)


class RateLimiter:
    def __init__(
        self,
        *,
        per_user: float,
        per_connection: float,
        burst: int,
        size: int,
        clock: Callable[[], float],
        per_uid: float = 0.0,
    ) -> None:
        self._clock = clock
        self.limited_entries = 0
        self.users: Buckets | None = None
        self.processes: Buckets | None = None
        self.uids: Buckets | None = None
        self.configure(
            per_user=per_user,
            per_connection=per_connection,
            per_uid=per_uid,
            burst=burst,
            size=size,
        )

    @classmethod
    def from_config(cls, config: Config, clock: Callable[[], float]) -> RateLimiter:
        return cls(**_settings(config), clock=clock)

    def reconfigure(self, config: Config) -> None:
        self.configure(**_settings(config))

    def configure(
        self, *, per_user: float, per_connection: float, per_uid: float, burst: int, size: int
    ) -> None:
        """Buckets start full again when a setting changes; unchanged ones are kept."""

        def rebuild(old: Buckets | None, rate: float) -> Buckets | None:
            if rate <= 0:
                return None
            if old is not None and (old.rate, old.burst, old.size) == (rate, burst, size):
                return old
            return Buckets(rate, burst, size)

        self.users = rebuild(self.users, per_user)
        self.processes = rebuild(self.processes, per_connection)
        self.uids = rebuild(self.uids, per_uid)

    @property
    def active(self) -> bool:
        return any(b is not None for b in (self.users, self.processes, self.uids))

    def split(self, entries: list[Any], peer: Peer) -> tuple[list[int], int]:
        """(indexes over a limit, retryAfterMs). An entry takes a token from its peer's uid
        bucket, its process's and its (uid, userId)'s; an entry without a string userId (to be
        rejected as invalid) only from the first two."""
        now = self._clock()
        users = self.users
        fixed = [
            (owner, owner.get(key, now))
            for owner, key in ((self.processes, (peer.uid, peer.pid)), (self.uids, peer.uid))
            if owner is not None
        ]
        seen: dict[str, Bucket] = {}
        denied: dict[int, tuple[Buckets, Bucket, int]] = {}  # id(bucket) -> map, bucket, denials
        limited: list[int] = []
        for index, entry in enumerate(entries):
            user = entry.get("userId") if isinstance(entry, dict) else None
            takes = fixed
            if users is not None and isinstance(user, str):
                user_bucket = seen.get(user)
                if user_bucket is None:
                    user_bucket = seen[user] = users.get((peer.uid, user), now)
                takes = [*fixed, (users, user_bucket)]
            blocking = [(owner, bucket) for owner, bucket in takes if bucket.tokens < 1.0]
            if blocking:
                limited.append(index)
                for owner, bucket in blocking:
                    _, _, count = denied.get(id(bucket), (owner, bucket, 0))
                    denied[id(bucket)] = (owner, bucket, count + 1)
                continue
            for _, bucket in takes:
                bucket.tokens -= 1.0
        self.limited_entries += len(limited)
        wait = max((owner.wait_s(b, n) for owner, b, n in denied.values()), default=0.0)
        return limited, max(1, math.ceil(wait * 1000))

    def status(self) -> dict[str, Any]:
        return {
            "limitedEntries": self.limited_entries,
            "users": len(self.users) if self.users is not None else 0,
            "processes": len(self.processes) if self.processes is not None else 0,
            "uids": len(self.uids) if self.uids is not None else 0,
        }


def _settings(config: Config) -> dict[str, Any]:
    return {
        "per_user": config.rate_limit_per_user,
        "per_connection": config.rate_limit_per_connection,
        "per_uid": config.rate_limit_per_uid,
        "burst": config.rate_limit_burst,
        "size": config.rate_limit_users,
    }


class Reply(Protocol):
    def reply(self) -> dict[str, Any]: ...


async def add_limited(
    add: Callable[[list[Any]], Awaitable[Reply]],
    limiter: RateLimiter,
    entries: list[Any],
    peer: Peer,
) -> dict[str, Any]:
    """`add` with the limits applied. When some entries are limited the reply is
    `{"ok": false, "error": "rate_limited", "retryAfterMs": n, "limited": [indexes], ...}`
    with the counts of the others, whose indexes refer to the request as sent."""
    limited, retry_ms = limiter.split(entries, peer)
    if not limited:
        return (await add(entries)).reply()
    out = set(limited)
    kept = [i for i in range(len(entries)) if i not in out]
    result: dict[str, Any] = {"ok": True, "accepted": 0, "duplicates": 0, "rejected": []}
    if kept:
        result = (await add([entries[i] for i in kept])).reply()
        if not result["ok"]:
            return result  # busy, disk full, stopping: nothing was stored, all is retried
    for rejection in result["rejected"]:
        sent = rejection["index"]
        rejection["index"] = kept[sent]
        rejection["error"] = rejection["error"].replace(f"entry {sent}:", f"entry {kept[sent]}:", 1)
    return {
        **result,
        "ok": False,
        "error": "rate_limited",
        "retryAfterMs": retry_ms,
        "limited": limited,
    }
