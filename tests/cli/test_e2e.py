"""End to end: `flowagg run` as a subprocess, driven only through the CLI."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from flowagg.batches.storage import iter_batch_files, read_batch
from flowagg.core.layout import Layout
from tests.harness import (
    DaemonProc,
    clean_env,
    cli,
    entry,
    flowagg_cmd,
    ping,
    request,
    start_daemon,
    stored_entries,
    stored_id_counts,
    wait_for,
)

QUIET = {"maxAgeMs": 3_600_000}


def batches(root: Path) -> list[dict[str, Any]]:
    return [read_batch(p) for p in iter_batch_files(Layout(root))]


def add(root: Path, *entries: dict[str, Any]) -> dict[str, Any]:
    proc = cli(root, "add", "--json", input=orjson.dumps(list(entries)))
    assert proc.returncode == 0, proc.stderr.decode()
    reply: dict[str, Any] = orjson.loads(proc.stdout)
    return reply


def status(root: Path) -> dict[str, Any]:
    proc = cli(root, "status", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    reply: dict[str, Any] = orjson.loads(proc.stdout)
    return reply


def test_size_trigger_then_manual_flush(root: Path, daemons: list[DaemonProc]) -> None:
    daemons.append(start_daemon(root, {"batchSize": 5, **QUIET}))
    reply = add(root, *(entry(i) for i in range(12)))
    assert (reply["accepted"], reply["duplicates"], reply["rejected"]) == (12, 0, [])
    got = wait_for(lambda: len(batches(root)) == 2 and batches(root))
    assert [b["trigger"] for b in got] == ["size", "size"]
    assert [b["entryCount"] for b in got] == [5, 5]
    assert status(root)["buffered"]["entries"] == 2

    flushed = cli(root, "flush", "--json")
    assert flushed.returncode == 0
    assert orjson.loads(flushed.stdout) == {
        "ok": True,
        "batches": 1,
        "entries": 2,
        "storedBatches": 1,
        "storedEntries": 2,
        "failedBatches": 0,
        "failedEntries": 0,
    }
    got = batches(root)
    assert [b["trigger"] for b in got] == ["size", "size", "manual"]
    # Arrival order kept across batches; batch ids unique and sorted like the files.
    stored = [e["timestamp"] for b in got for e in b["entries"]]
    assert stored == [entry(i)["timestamp"] for i in range(12)]
    ids = [b["batchId"] for b in got]
    assert ids == sorted(ids) and len(set(ids)) == 3
    for b in got:
        assert b["version"] == "2.0.0" and b["recovered"] is False
    st = status(root)
    assert st["counters"]["batches"] == {"size": 2, "manual": 1}
    assert st["counters"]["accepted"] == 12
    assert st["lastFlushAt"] is not None
    assert st["flusher"] == {"stalledError": None, "parkedBatches": 0, "inlineRetries": 0}
    assert st["socket"]["badRequests"] == 0 and st["socket"]["requests"] >= 3


def test_age_trigger(root: Path, daemons: list[DaemonProc]) -> None:
    daemons.append(start_daemon(root, {"maxAgeMs": 150}))
    add(root, entry(1), entry(2), entry(3))
    got = wait_for(lambda: batches(root))
    assert [(b["trigger"], b["entryCount"]) for b in got] == [("age", 3)]


def test_threshold_trigger_respects_max_batch_bytes(root: Path, daemons: list[DaemonProc]) -> None:
    settings = {"batchSize": 1000, "maxBatchBytes": 2048, "flushThreshold": 0.5, **QUIET}
    daemons.append(start_daemon(root, settings))
    big = [entry(i, metadata={"note": "x" * 300}) for i in range(9)]
    add(root, *big)
    got = wait_for(lambda: len(batches(root)) >= 2 and batches(root))
    assert {b["trigger"] for b in got} == {"threshold"}
    for b in got:
        assert len(orjson.dumps(b["entries"])) <= 2048


def test_sigterm_flushes_then_exits_zero(root: Path) -> None:
    daemon = start_daemon(root, QUIET)
    add(root, entry(1), entry(2), entry(3))
    assert daemon.stop(signal.SIGTERM) == 0
    got = batches(root)
    assert [(b["trigger"], b["entryCount"]) for b in got] == [("shutdown", 3)]
    layout = Layout(root)
    assert not layout.socket.exists() and not layout.pid_file.exists()


def test_sigusr1_flushes(root: Path, daemons: list[DaemonProc]) -> None:
    daemon = start_daemon(root, QUIET)
    daemons.append(daemon)
    add(root, entry(1), entry(2))
    daemon.send(signal.SIGUSR1)
    got = wait_for(lambda: batches(root))
    assert [(b["trigger"], b["entryCount"]) for b in got] == [("manual", 2)]


def test_second_daemon_is_refused_with_exit_3(root: Path, daemons: list[DaemonProc]) -> None:
    first = start_daemon(root)
    daemons.append(first)
    second = cli(root, "run", timeout=30)
    assert second.returncode == 3
    message = second.stderr.decode()
    assert f"pid {first.proc.pid}" in message and "already running" in message
    assert request(first.layout.socket, {"op": "ping"}) == {"ok": True}


def test_a_second_daemon_with_another_run_dir_is_refused_by_the_roots_lock(
    tmp_path: Path, root: Path, daemons: list[DaemonProc]
) -> None:
    # Two run directories share nothing: only a lock in the root itself keeps the second
    # daemon from writing journal seqs beside the first's.
    first = start_daemon(root, {"runDir": str(tmp_path / "run-a"), **QUIET})
    daemons.append(first)
    assert add_via(first, entry(1))["accepted"] == 1
    log_path = tmp_path / "second.log"
    second = DaemonProc(root, env={"FLOWAGG_RUN_DIR": str(tmp_path / "run-b")}, log_path=log_path)
    daemons.append(second)
    # Exit, or (the bug) a second daemon answering on its own socket.
    wait_for(lambda: second.proc.poll() is not None or ping(tmp_path / "run-b" / "flowagg.sock"))
    assert second.stop() == 3, second.log()
    message = log_path.read_text()
    assert message.count("\n") == 1 and "already running" in message
    assert f"pid {first.proc.pid}" in message and str(root / "flowagg.lock") in message
    assert request(first.layout.socket, {"op": "flush"})["entries"] == 1
    assert first.stop() == 0
    # Stopped, the root is free again and no pid file names the old daemon.
    assert not (root / "flowagg.pid").exists()
    again = start_daemon(root, {"runDir": str(tmp_path / "run-b"), **QUIET})
    daemons.append(again)
    assert (root / "flowagg.pid").read_text() == f"{again.proc.pid}\n"


def add_via(daemon: DaemonProc, *entries: dict[str, Any]) -> dict[str, Any]:
    return request(daemon.layout.socket, {"op": "add", "entries": list(entries)})


@pytest.mark.parametrize("kind", ["missing-parent", "file"])
def test_unusable_root_exits_4(tmp_path: Path, kind: str) -> None:
    if kind == "missing-parent":
        root = tmp_path / "nope" / "data"
    else:
        root = tmp_path / "data"
        root.write_text("not a folder")
    proc = cli(root, "run", timeout=30)
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.decode().count("\n") == 1  # one line naming the cause and the fix


def test_root_and_socket_are_private(root: Path, daemons: list[DaemonProc]) -> None:
    daemons.append(start_daemon(root))
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(Layout(root).socket).st_mode) == 0o600


def test_no_daemon_means_exit_3(root: Path) -> None:
    for args in (["status"], ["flush"], ["add", orjson.dumps(entry(1)).decode()]):
        proc = cli(root, *args)
        assert proc.returncode == 3, args
        assert "flowagg run" in proc.stderr.decode()


def test_rejected_entries_are_answered_and_exit_2(root: Path, daemons: list[DaemonProc]) -> None:
    daemons.append(start_daemon(root, QUIET))
    bad = entry(2, timestamp="2024-01-01")
    proc = cli(root, "add", "--json", input=orjson.dumps([entry(1), bad]))
    assert proc.returncode == 2
    reply = orjson.loads(proc.stdout)
    assert reply["accepted"] == 1
    assert reply["rejected"] == [
        {
            "index": 1,
            "error": 'entry 2: timestamp: must be an integer (ms since epoch), got "2024-01-01"',
        }
    ]
    assert status(root)["counters"]["rejected"] == 1


def test_unparseable_cli_input_stores_nothing_and_exits_5(root: Path) -> None:
    proc = cli(root, "add", input=b'{"userId": "u", "action"')
    assert proc.returncode == 5
    assert b"not valid JSON" in proc.stderr


def test_entries_from_arguments_file_and_json_lines(
    root: Path, tmp_path: Path, daemons: list[DaemonProc]
) -> None:
    daemons.append(start_daemon(root, QUIET))
    arg = cli(root, "add", orjson.dumps(entry(1, entryId="a")).decode())
    assert arg.returncode == 0, arg.stderr
    lines = tmp_path / "in.jsonl"
    lines.write_bytes(b"\n".join(orjson.dumps(entry(i, entryId=f"l{i}")) for i in range(3)))
    from_file = cli(root, "add", "--file", str(lines))
    assert from_file.returncode == 0, from_file.stderr
    assert cli(root, "flush").returncode == 0
    assert set(stored_id_counts(root)) == {"a", "l0", "l1", "l2"}


def test_dedupe_survives_restart(root: Path) -> None:
    daemon = start_daemon(root, QUIET)
    assert add(root, entry(1, entryId="same"))["accepted"] == 1
    assert daemon.stop() == 0
    daemon = start_daemon(root, QUIET)
    reply = add(root, entry(1, entryId="same"), entry(2, entryId="other"))
    assert (reply["accepted"], reply["duplicates"]) == (1, 1)
    assert daemon.stop() == 0
    assert stored_id_counts(root) == {"same": 1, "other": 1}


def test_kill_9_then_restart_replays_the_journal_once(root: Path) -> None:
    daemon = start_daemon(root, {"batchSize": 4, **QUIET})
    add(root, *(entry(i, entryId=f"k{i}") for i in range(10)))
    wait_for(lambda: len(batches(root)) == 2)
    daemon.kill()
    daemon = start_daemon(root, {"batchSize": 4, **QUIET})
    assert cli(root, "flush").returncode == 0
    assert daemon.stop() == 0
    assert stored_id_counts(root) == {f"k{i}": 1 for i in range(10)}


def test_busy_at_the_buffer_bound(root: Path, daemons: list[DaemonProc]) -> None:
    settings = {"maxBufferedEntries": 10, "batchSize": 1000, **QUIET}
    daemons.append(start_daemon(root, settings))
    sock = Layout(root).socket
    assert request(sock, {"op": "add", "entries": [entry(i) for i in range(10)]})["accepted"] == 10
    reply = request(sock, {"op": "add", "entries": [entry(11)]})
    assert reply["ok"] is False and reply["error"] == "busy" and reply["retryAfterMs"] > 0
    assert status(root)["counters"]["busy"] == 1
    assert cli(root, "flush").returncode == 0
    assert request(sock, {"op": "add", "entries": [entry(11)]})["accepted"] == 1


def test_spool_files_dropped_while_down_are_ingested_at_start(root: Path) -> None:
    daemon = start_daemon(root, QUIET)  # creates the root
    assert daemon.stop() == 0
    inbox = Layout(root).inbox
    (inbox / "b.jsonl.tmp").write_bytes(b"partial, still being written")
    (inbox / "a.json").write_bytes(orjson.dumps([entry(1, entryId="s1"), entry(2, entryId="s2")]))
    (inbox / "b.json").write_bytes(orjson.dumps(entry(3, entryId="s3")))
    spooled = cli(root, "add", "--spool-if-down", orjson.dumps(entry(4, entryId="s4")).decode())
    assert spooled.returncode == 0 and b"spooled 1" in spooled.stdout
    daemon = start_daemon(root, QUIET)
    wait_for(lambda: status(root)["counters"]["accepted"] == 4)
    assert sorted(p.name for p in inbox.iterdir()) == ["b.jsonl.tmp"]  # a client's temp stays
    assert daemon.stop() == 0
    assert stored_id_counts(root) == {"s1": 1, "s2": 1, "s3": 1, "s4": 1}
    in_order = [e["entryId"] for e in stored_entries(root)]
    # Name order: the CLI's spool file (named <ms>-...) sorts before a.json, then b.json.
    assert in_order == ["s4", "s1", "s2", "s3"]


def test_spool_keeps_valid_entries_and_quarantines_the_rest(
    root: Path, daemons: list[DaemonProc]
) -> None:
    daemons.append(start_daemon(root, {"spoolRescanMs": 50, **QUIET}))
    layout = Layout(root)
    lines = [
        orjson.dumps(entry(1, entryId="ok1")),
        orjson.dumps(entry(2, action="has space")),
        b'{"userId": "u", "truncated',
        orjson.dumps(entry(3, entryId="ok2", colour="red")),
        orjson.dumps(entry(4, entryId="ok3")),
    ]
    tmp = layout.inbox / "mixed.jsonl.tmp"
    tmp.write_bytes(b"\n".join(lines) + b"\n")
    os.rename(tmp, layout.inbox / "mixed.jsonl")
    wait_for(lambda: status(root)["counters"]["accepted"] == 2)
    assert cli(root, "flush").returncode == 0
    assert stored_id_counts(root) == {"ok1": 1, "ok3": 1}
    [rejected] = layout.errors.glob("*mixed.jsonl.0.rejected.jsonl")
    # The raw bytes of the bad lines, in file order: never re-serialized.
    assert rejected.read_bytes() == b"".join(lines[i] + b"\n" for i in (1, 2, 3))
    reason = orjson.loads(Path(str(rejected) + ".reason.json").read_bytes())
    assert reason["component"] == "spool" and reason["errorCount"] == 3
    assert reason["originalName"] == "mixed.jsonl"
    errors = reason["errors"]
    # Lines count from 1, like an editor's: the bad ones are lines 2, 3 and 4.
    assert errors[0].startswith("line 2: action:"), errors
    assert errors[1].startswith("line 3: not valid JSON"), errors
    assert errors[2].startswith("line 4: unknown key") and "colour" in errors[2], errors
    assert f"spool file mixed.jsonl (lines 1 to {len(lines)})" in reason["reason"], reason
    st = status(root)
    assert st["counters"]["rejected"] == 3 and st["spool"]["entriesRejected"] == 3
    assert not list(layout.inbox.iterdir())


def test_unreadable_spool_file_is_quarantined_whole(root: Path, daemons: list[DaemonProc]) -> None:
    daemons.append(start_daemon(root, {"spoolRescanMs": 50, **QUIET}))
    layout = Layout(root)
    (layout.inbox / "broken.json").write_bytes(b'[{"userId": "u",')
    # The reason file is written after the move: wait for it, not for the moved file.
    found = wait_for(lambda: list(layout.errors.glob("*broken.json.reason.json")))
    reason = orjson.loads(found[0].read_bytes())
    assert "not valid JSON" in reason["reason"]


def test_config_shows_sources(root: Path, tmp_path: Path) -> None:
    conf = tmp_path / "flowagg.toml"
    conf.write_text("batchSize = 9\n")
    proc = cli(root, "--config", str(conf), "config", "--json")
    assert proc.returncode == 0, proc.stderr
    settings = orjson.loads(proc.stdout)["settings"]
    assert settings["batchSize"] == {"value": 9, "source": f"file {conf}"}
    assert settings["maxAgeMs"]["source"] == "default"
    assert settings["root"] == {"value": str(root), "source": "flag"}
    conf.write_text("batchSise = 9\n")
    bad = cli(root, "--config", str(conf), "config")
    assert bad.returncode == 2 and b"batchSize" in bad.stderr


def test_flush_writes_entries_waiting_on_disk_too(root: Path, daemons: list[DaemonProc]) -> None:
    settings = {"memoryWindowEntries": 10, "batchSize": 1000, **QUIET}
    daemons.append(start_daemon(root, settings))
    sock = Layout(root).socket
    for start in range(0, 100, 20):
        reply = request(
            sock, {"op": "add", "entries": [entry(i) for i in range(start, start + 20)]}
        )
        assert reply["accepted"] == 20
    assert status(root)["buffered"]["onDisk"] > 0
    flushed = orjson.loads(cli(root, "flush", "--json").stdout)
    assert flushed["entries"] == 100 and flushed["batches"] >= 10
    assert status(root)["buffered"]["entries"] == 0
    stored = [e["timestamp"] for e in stored_entries(root)]
    assert stored == [entry(i)["timestamp"] for i in range(100)]


def test_socket_path_too_long_is_a_clear_exit_4(tmp_path: Path) -> None:
    root = tmp_path / ("d" * 100) / "data"
    root.parent.mkdir()
    proc = cli(root, "run", timeout=60)
    assert proc.returncode == 4, proc.stderr
    assert b"shorter --root" in proc.stderr


def test_run_dir_holds_socket_pid_and_lock_apart_from_the_root(
    tmp_path: Path, root: Path, daemons: list[DaemonProc]
) -> None:
    run_dir = tmp_path / "run"
    daemon = start_daemon(root, {"runDir": str(run_dir)})
    daemons.append(daemon)
    assert sorted(os.listdir(run_dir)) == ["flowagg.lock", "flowagg.pid", "flowagg.sock"]
    assert not (root / "run").exists()
    env = {"FLOWAGG_RUN_DIR": str(run_dir)}
    proc = subprocess.run(
        flowagg_cmd(root, "status", "--json"),
        capture_output=True,
        env=clean_env(env),
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert orjson.loads(proc.stdout)["pid"] == daemon.proc.pid


def test_a_bad_config_file_never_blocks_client_commands(
    root: Path, daemons: list[DaemonProc]
) -> None:
    daemons.append(start_daemon(root, QUIET))
    # The operator breaks the file while the daemon runs: clients only need the socket.
    (root / "flowagg.toml").write_bytes(b"batchSize = 7\nbogusKey = 1\nlogLevel = 'caf\xe9'\n")
    assert add(root, entry(1))["accepted"] == 1
    for args in (["status", "--json"], ["flush"], ["health", "--json"]):
        proc = cli(root, *args)
        assert proc.returncode == 0, (args, proc.stderr)
    bridge = subprocess.run(
        [sys.executable, "-m", "flowagg.cli.bridge", "--root", str(root), "aggregate-status"],
        capture_output=True,
        env=clean_env(),
        timeout=60,
        check=False,
    )
    assert bridge.returncode == 0, bridge.stderr
    assert orjson.loads(bridge.stdout)["ok"] is True
    assert cli(root, "config", "--check", str(root / "flowagg.toml")).returncode == 2
