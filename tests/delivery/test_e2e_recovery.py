"""End to end with a real daemon: an unwritable or full aggregated/, failed files, healing,
`flowagg recover`, abandonment and requeue, and health snapshots that tell the truth.

Unwritable: `chattr +i` on the folder (root ignores permission bits, not the immutable
flag); where chattr is unavailable, the folder is swapped for a plain file (ENOTDIR), a
stand-in with the same effect on writes. Full: a small tmpfs mounted on aggregated/; where
mounting is not permitted the test is skipped (the fault-injection tests cover ENOSPC).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from flowagg.core.layout import Layout
from tests.harness import DaemonProc, cli, entry, start_daemon, stored_id_counts, wait_for

FAST = {
    "maxAgeMs": 3_600_000,
    "immediateRetries": 1,
    "retryBaseMs": 20,
    "scheduleIntervalMs": 3_600_000,
    "healthCheckIntervalMs": 200,
}


@contextlib.contextmanager
def unwritable(directory: Path) -> Iterator[None]:
    chattr = shutil.which("chattr")
    if chattr and subprocess.run([chattr, "+i", str(directory)], check=False).returncode == 0:
        try:
            yield
        finally:
            subprocess.run([chattr, "-i", str(directory)], check=True)
        return
    aside = directory.with_name(directory.name + ".aside")
    directory.rename(aside)
    directory.write_text("stand-in: not a directory")
    try:
        yield
    finally:
        directory.unlink()
        aside.rename(directory)


def add(root: Path, ids: list[str]) -> None:
    proc = cli(root, "add", input=orjson.dumps([entry(i, entryId=x) for i, x in enumerate(ids)]))
    assert proc.returncode == 0, proc.stderr


def status(root: Path) -> dict[str, Any]:
    proc = cli(root, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = orjson.loads(proc.stdout)
    return result


def test_unwritable_aggregated_then_heal_and_recover(root: Path, daemons: list[DaemonProc]) -> None:
    daemon = start_daemon(root, FAST)
    daemons.append(daemon)
    layout = Layout(root)
    ids = [f"u{i}" for i in range(12)]
    with unwritable(layout.aggregated):
        add(root, ids[:6])
        flushed = cli(root, "flush")
        assert flushed.returncode == 1  # nothing was stored in aggregated/: said so
        assert b"stored 0 entries in 0 batches; 1 batches (6 entries) failed" in flushed.stdout
        add(root, ids[6:])
        reply = orjson.loads(cli(root, "flush", "--json").stdout)
        assert (reply["storedBatches"], reply["failedBatches"], reply["failedEntries"]) == (0, 1, 6)
        assert status(root)["queue"]["failed"] == 2
        assert stored_id_counts(root) == dict.fromkeys(ids, 1)  # in recovery/, once each
        again = cli(root, "recover", "--json")
        assert again.returncode == 1  # still broken: paused, reported, no retry charged
        paused = orjson.loads(again.stdout)["paused"]
        assert paused["folder"] == "aggregated/" and paused["cause"] in ("EPERM", "ENOTDIR")
    healed = cli(root, "recover", "--json")
    assert healed.returncode == 0, healed.stdout
    assert len(orjson.loads(healed.stdout)["recovered"]) == 2
    assert stored_id_counts(root) == dict.fromkeys(ids, 1)
    assert sorted(p.parent.name for p in layout.aggregated.glob("batch_*.json")) == [
        "aggregated",
        "aggregated",
    ]
    st = status(root)
    assert st["queue"]["failed"] == 0 and st["recovery"]["recovered"] == 2
    log = (layout.logs / "recovery.log").read_text()
    for name in layout.aggregated.glob("batch_*.json"):
        assert name.stem.removeprefix("batch_") in log


def test_an_unwritable_folder_for_longer_than_the_retry_limit_abandons_nothing(
    root: Path, daemons: list[DaemonProc]
) -> None:
    # Many passes at a short backoff while aggregated/ refuses every write: the folder's
    # failure, not the batches', so batchRetryLimit (2) is never reached.
    settings = {**FAST, "batchRetryLimit": 2, "retryMaxDelayMs": 100, "scheduleIntervalMs": 100}
    daemon = start_daemon(root, settings)
    daemons.append(daemon)
    layout = Layout(root)
    ids = ["a1", "a2", "a3"]
    with unwritable(layout.aggregated):
        add(root, ids)
        assert cli(root, "flush").returncode == 1
        wait_for(lambda: status(root)["recovery"]["runs"] >= 20, timeout=60)
        st = status(root)
        assert st["queue"]["abandoned"] == 0 and st["queue"]["failed"] == 1
        [failed] = layout.recovery.glob("*.failed.json")
        assert orjson.loads(failed.read_bytes())["retryCount"] == 0

        def names_the_cause() -> dict[str, Any] | None:
            proc = cli(root, "health", "--json")
            snap: dict[str, Any] = orjson.loads(proc.stdout)
            return snap if snap.get("recovery", {}).get("paused") else None

        snap = wait_for(names_the_cause)
        assert snap["recovery"]["paused"]["folder"] == "aggregated/"
        assert any("recovery paused" in issue for issue in snap["issues"])
        folders = snap["systemHealth"]["folders"]
        assert folders["aggregated/"]["available"] >= 0 and folders["./"]["total"] > 0
    # Writable again: the loop's next pass completes the batch, without an operator.
    wait_for(lambda: status(root)["queue"]["failed"] == 0, timeout=60)
    assert stored_id_counts(root) == dict.fromkeys(ids, 1)
    assert not list(layout.abandoned.iterdir())
    assert status(root)["recovery"]["paused"] is None


def test_retry_limit_abandons_then_requeue_recovers(
    tmp_path: Path, root: Path, daemons: list[DaemonProc]
) -> None:
    # A sink that answers EX_TEMPFAIL for this batch while up: the batch's own failure, so
    # each retry counts.
    gate = tmp_path / "refuse"
    gate.touch()
    sink = f"sh -c 'cat >/dev/null; test -e {gate} && exit 75; exit 0'"
    settings = {**FAST, "batchRetryLimit": 2, "sinkType": "command", "sinkCommand": sink}
    daemon = start_daemon(root, {**settings, "breakerFailures": 1000})
    daemons.append(daemon)
    layout = Layout(root)
    wait_for(lambda: cli(root, "health").returncode == 0)
    add(root, ["a1", "a2", "a3"])
    assert cli(root, "flush").returncode == 1
    assert cli(root, "recover").returncode == 1
    assert cli(root, "recover").returncode == 1
    assert status(root)["queue"]["abandoned"] == 1

    def abandoned_reported() -> bool:
        # Only the snapshot right after the abandonment says so; the kept files show it.
        for path in layout.health.glob("health-*.json"):
            snap = orjson.loads(path.read_bytes())
            if snap["status"] == "critical" and any(
                "abandoned since" in issue for issue in snap["issues"]
            ):
                return True
        return False

    wait_for(abandoned_reported)
    gate.unlink()
    [parked] = layout.abandoned.glob("*.abandoned.json")
    batch_id = parked.name.removesuffix(".abandoned.json")
    requeue = cli(root, "recover", "--abandoned", "--batch", batch_id, "--json")
    assert requeue.returncode == 0, requeue.stdout
    reply = orjson.loads(requeue.stdout)
    assert reply["requeued"] == [batch_id] and reply["recovered"] == [batch_id]
    assert stored_id_counts(root) == {"a1": 1, "a2": 1, "a3": 1}
    assert not list(layout.abandoned.iterdir())


@pytest.fixture
def small_tmpfs(root: Path, daemons: list[DaemonProc]) -> Iterator[Path]:
    daemon = start_daemon(root, FAST)
    daemons.append(daemon)
    target = Layout(root).aggregated
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(target)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()})")
    try:
        yield target
    finally:
        daemon.stop()
        subprocess.run(["umount", str(target)], check=False)


def test_full_aggregated_then_space_returns(root: Path, small_tmpfs: Path) -> None:
    filler = small_tmpfs / "filler"
    with contextlib.suppress(OSError), filler.open("wb") as fh:
        while True:
            fh.write(b"\0" * 65536)
    ids = [f"f{i}" for i in range(20)]
    add(root, ids)
    assert cli(root, "flush").returncode == 1
    assert status(root)["queue"]["failed"] == 1
    filler.unlink()
    assert cli(root, "recover").returncode == 0
    assert stored_id_counts(root) == dict.fromkeys(ids, 1)
    assert status(root)["queue"]["failed"] == 0


def test_health_snapshots_survive_an_unwritable_health_folder(
    root: Path, daemons: list[DaemonProc]
) -> None:
    daemons.append(start_daemon(root, FAST))
    layout = Layout(root)
    wait_for(lambda: (layout.health / "latest.json").exists())
    with unwritable(layout.health):
        before = orjson.loads((layout.health / "latest.json").read_bytes())["timestamp"]
        add(root, ["h1"])  # the daemon keeps serving
        live = cli(root, "health", "--json")  # and answers health live from memory
        assert live.returncode == 0 and orjson.loads(live.stdout)["timestamp"] > before
        wait_for(
            lambda: (
                "cannot write the health snapshot" in (layout.logs / "aggregation.log").read_text()
            )
        )
    wait_for(
        lambda: orjson.loads((layout.health / "latest.json").read_bytes())["timestamp"] > before
    )
    snap = orjson.loads((layout.health / "latest.json").read_bytes())
    for key in ("daemonHealth", "aggregatorHealth", "systemHealth", "queue", "latencyMs"):
        assert key in snap
    assert snap["systemHealth"]["processRss"] > 0
    assert cli(root, "health").returncode == 0
