"""Rate limits (SPEC §11): buckets per uid, process and (uid, userId); the client's retry."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson

from flowagg.ingest.peers import Peer
from flowagg.ingest.ratelimit import RateLimiter, add_limited
from tests.harness import cli, entry, request, start_daemon, stored_id_counts


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _limiter(clock: FakeClock, **kw: Any) -> RateLimiter:
    settings = {"per_user": 10.0, "per_connection": 0.0, "burst": 5, "size": 100, **kw}
    return RateLimiter(**settings, clock=clock)


def _peer(pid: int = 1, uid: int = 1000) -> Peer:
    return Peer(pid=pid, uid=uid, gid=uid)


def _user(name: str, n: int) -> list[dict[str, Any]]:
    return [{"userId": name}] * n


def test_a_burst_passes_then_the_rate_refills() -> None:
    clock = FakeClock()
    limiter = _limiter(clock)
    limited, retry_ms = limiter.split(_user("a", 8), _peer(1))
    assert limited == [5, 6, 7]
    assert retry_ms == 300  # three tokens at 10/s
    clock.now += 0.2
    assert limiter.split(_user("a", 3), _peer(1))[0] == [2]
    clock.now += 10
    assert limiter.split(_user("a", 5), _peer(1))[0] == []  # refilled to the burst, never above
    assert limiter.split(_user("a", 1), _peer(1))[0] == [0]
    assert limiter.limited_entries == 5


def test_users_are_limited_apart_and_the_connection_limits_them_all() -> None:
    clock = FakeClock()
    limiter = _limiter(clock)
    entries = _user("a", 6) + _user("b", 6) + [{"userId": 7}, "junk"]
    assert limiter.split(entries, _peer(1))[0] == [5, 11]
    limiter = _limiter(clock, per_user=0.0, per_connection=1.0)
    assert limiter.split(entries, _peer(1))[0] == list(range(5, 14))
    assert limiter.split(entries[:5], _peer(2))[0] == []  # another process, another bucket
    assert limiter.split(entries[:1], _peer(1))[0] == [0]  # a reconnect keeps its bucket


def test_buckets_are_bounded_by_the_setting_not_by_traffic() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, size=3)
    for i in range(1000):
        limiter.split(_user(f"u{i}", 5), _peer(i))
    assert limiter.status()["users"] == 3
    assert limiter.split(_user("u999", 1), _peer(1))[0] == [0]  # recent ones are remembered
    assert limiter.split(_user("u0", 5), _peer(1))[0] == []  # the oldest was forgotten


def test_off_means_no_limiter_work() -> None:
    limiter = _limiter(FakeClock(), per_user=0.0)
    assert not limiter.active


def test_the_reply_names_the_limited_indexes_and_maps_rejections_back() -> None:
    class Result:
        def __init__(self, reply: dict[str, Any]) -> None:
            self._reply = reply

        def reply(self) -> dict[str, Any]:
            return self._reply

    sent: list[list[Any]] = []

    async def add(entries: list[Any]) -> Result:
        sent.append(entries)
        return Result(
            {
                "ok": True,
                "accepted": 3,
                "duplicates": 0,
                "rejected": [{"index": 3, "error": "entry 3: x"}],
            }
        )

    limiter = _limiter(FakeClock(), per_user=1.0, burst=2)
    entries = [{"userId": "a"}, {"userId": "b"}, {"userId": "a"}, {"userId": "a"}, {"bad": 1}]
    reply = asyncio.run(add_limited(add, limiter, entries, _peer(1)))
    assert sent == [[entries[0], entries[1], entries[2], entries[4]]]
    assert reply["ok"] is False and reply["error"] == "rate_limited"
    assert reply["limited"] == [3] and reply["retryAfterMs"] == 1000
    assert reply["accepted"] == 3
    assert reply["rejected"] == [{"index": 4, "error": "entry 4: x"}]


def test_a_burst_over_the_limit_then_the_client_retries_until_all_are_stored(
    tmp_path: Path,
) -> None:
    root = tmp_path / "data"
    daemon = start_daemon(root, {"rateLimitPerUser": 100, "rateLimitBurst": 20})
    try:
        burst = [entry(i, userId="flood", entryId=f"b{i}") for i in range(60)]
        reply = request(daemon.layout.socket, {"op": "add", "entries": burst})
        assert reply["ok"] is False and reply["error"] == "rate_limited", reply
        assert reply["accepted"] == 20 and reply["limited"] == list(range(20, 60))
        assert reply["retryAfterMs"] >= 1
        # No entryIds: a retry of the whole request would store the accepted ones twice.
        more = [entry(i, userId="flood", metadata={"n": i}) for i in range(150)]
        proc = cli(root, "add", "--retry-timeout", "30", "--json", input=orjson.dumps(more))
        assert proc.returncode == 0, proc.stderr
        assert orjson.loads(proc.stdout)["accepted"] == 150
        assert cli(root, "flush").returncode == 0
        status = request(daemon.layout.socket, {"op": "status"})
        assert status["rateLimit"]["limitedEntries"] >= 40 + 130
    finally:
        assert daemon.stop() == 0
    counts = stored_id_counts(root)
    assert sum(counts.values()) == 20 + 150 and max(counts.values()) == 1
    assert {f"b{i}" for i in range(20)} <= set(counts)


def test_the_client_gives_up_with_a_clear_message(tmp_path: Path) -> None:
    root = tmp_path / "data"
    daemon = start_daemon(root, {"rateLimitPerUser": 0.1, "rateLimitBurst": 1})
    try:
        items = [entry(i, userId="slow") for i in range(5)]
        proc = cli(root, "add", "--retry-timeout", "0.3", input=orjson.dumps(items))
        message = proc.stderr.decode()
        assert proc.returncode == 1, message
        assert "gave up after --retry-timeout 0.3 s" in message and "rate_limited" in message
        assert "4 entries were not stored (the first is entry 2), 1 were" in message
        assert cli(root, "flush").returncode == 0
    finally:
        assert daemon.stop() == 0
    assert sum(stored_id_counts(root).values()) == 1


def test_a_claimed_user_id_is_counted_within_the_senders_uid() -> None:
    clock = FakeClock()
    limiter = _limiter(clock)
    assert limiter.split(_user("alice", 8), _peer(1, uid=1001))[0] == [5, 6, 7]
    assert limiter.split(_user("alice", 5), _peer(2, uid=1000))[0] == []  # alice's own bucket


def test_the_uid_bucket_holds_across_processes_and_reconnects() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, per_user=0.0, per_uid=1.0)
    assert limiter.split(_user("a", 3) + _user("b", 3), _peer(1))[0] == [5]
    assert limiter.split(_user("c", 1), _peer(2))[0] == [0]  # another process, the same uid
    assert limiter.split(_user("c", 5), _peer(2, uid=1001))[0] == []  # another uid
    assert limiter.status()["uids"] == 2
