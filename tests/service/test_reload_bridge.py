"""Hot reload (SIGHUP and `flowagg reload`), `config --check`, and scripts/provider-bridge
end to end, from another directory."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest

from flowagg.batches.storage import iter_batch_files, read_batch
from flowagg.core.layout import Layout
from tests.harness import DaemonProc, clean_env, cli, entry, request, start_daemon, wait_for

BRIDGE = Path(__file__).resolve().parents[2] / "scripts" / "provider-bridge"


def batches(root: Path) -> list[dict[str, Any]]:
    return [read_batch(p) for p in iter_batch_files(Layout(root))]


def test_reload_changes_batch_size_while_entries_flow(
    root: Path, tmp_path: Path, daemons: list[DaemonProc]
) -> None:
    conf = tmp_path / "flowagg.toml"
    conf.write_text("batchSize = 20\nmaxAgeMs = 3600000\n")
    daemon = DaemonProc(root, {}, env={"FLOWAGG_CONFIG": str(conf)}).wait_ready()
    daemons.append(daemon)
    sock = Layout(root).socket

    def send(first: int, count: int) -> None:
        entries = [entry(i, entryId=f"r{i}") for i in range(first, first + count)]
        assert request(sock, {"op": "add", "entries": entries})["accepted"] == count

    send(0, 45)  # two batches of 20, 5 buffered
    wait_for(lambda: len(batches(root)) == 2)
    conf.write_text("batchSize = 7\nmaxAgeMs = 3600000\n")
    reloaded = cli(root, "reload", "--json")
    assert reloaded.returncode == 0, reloaded.stderr
    assert orjson.loads(reloaded.stdout)["changed"] == ["batchSize"]
    send(45, 30)
    wait_for(lambda: sum(b["entryCount"] for b in batches(root)) >= 75 - 75 % 7)
    counts = [b["entryCount"] for b in batches(root)]
    assert counts[:2] == [20, 20] and set(counts[2:]) == {7}
    assert cli(root, "config", "--json").returncode == 0

    conf.write_text("batchSize = 0\n")  # invalid: refused, the old config keeps running
    refused = cli(root, "reload")
    assert refused.returncode == 1
    assert b"batchSize" in refused.stderr and b"unchanged" in refused.stderr
    daemon.send(signal.SIGHUP)  # the same through the signal: logged, not fatal
    wait_for(lambda: "reload refused" in daemon.log())
    before = len(batches(root))
    send(75, 7)
    wait_for(lambda: len(batches(root)) > before)
    assert batches(root)[-1]["entryCount"] == 7

    conf.write_text("batchSize = 9\nmaxAgeMs = 3600000\nmaxRequestBytes = 2048\n")
    daemon.send(signal.SIGHUP)
    wait_for(lambda: "change only at the next start" in daemon.log())
    status = request(sock, {"op": "status"})
    assert status["ok"]


def test_config_check(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('batchSize = 10\nsinkType = "http"\nsinkUrl = "http://127.0.0.1:9/x"\n')
    ok = cli(tmp_path / "data", "config", "--check", str(good))
    assert ok.returncode == 0 and b"ok" in ok.stdout
    bad = tmp_path / "bad.toml"
    for text, key in (
        ('sinkType = "http"\n', "sinkUrl"),
        ("flushThreshold = 2.0\n", "flushThreshold"),
        ("retryBaseMs = 'soon'\n", "retryBaseMs"),
        ("batchsize = 3\n", "batchSize"),
        ("batchSize = \n", "TOML"),
    ):
        bad.write_text(text)
        proc = cli(tmp_path / "data", "config", "--check", str(bad))
        assert proc.returncode == 2, text
        assert key.encode() in proc.stderr, (text, proc.stderr)
        assert proc.stderr.count(b"\n") == 1


def bridge(
    cwd: Path, *args: str, input: bytes | None = None, root: Path | None = None
) -> tuple[int, dict[str, Any]]:
    env = clean_env({"FLOWAGG_ROOT": str(root)} if root else None)
    proc = subprocess.run(
        [str(BRIDGE), *args], input=input, capture_output=True, cwd=cwd, env=env, timeout=60
    )
    return proc.returncode, orjson.loads(proc.stdout)


def test_bridge_end_to_end_from_another_directory(
    root: Path, tmp_path: Path, daemons: list[DaemonProc]
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    daemons.append(start_daemon(root, {"maxAgeMs": 3_600_000}))
    entries = b"\n".join(orjson.dumps(entry(i, entryId=f"b{i}")) for i in range(5))
    code, reply = bridge(elsewhere, "aggregate", input=entries, root=root)
    assert (code, reply["accepted"], reply["duplicates"]) == (0, 5, 0)
    code, reply = bridge(elsewhere, "aggregate-status", root=root)
    assert code == 0 and reply["buffered"]["entries"] == 5
    code, reply = bridge(elsewhere, "aggregate-force", root=root)
    assert code == 0 and reply["entries"] == 5
    code, reply = bridge(elsewhere, "aggregate-recover", root=root)
    assert code == 0 and reply["recovered"] == [] and reply["failedAgain"] == []
    code, reply = bridge(elsewhere, "aggregate", input=b'{"userId": 5}', root=root)
    assert code == 2 and "userId" in reply["rejected"][0]["error"]
    # --root works as well as FLOWAGG_ROOT
    code, reply = bridge(elsewhere, "--root", str(root), "aggregate-status")
    assert code == 0 and reply["counters"]["accepted"] == 5


def test_bridge_without_a_daemon(root: Path, tmp_path: Path) -> None:
    start_daemon(root).stop()  # the root exists, no daemon runs
    for action in ("aggregate-status", "aggregate-force", "aggregate-recover"):
        code, reply = bridge(tmp_path, action, root=root)
        assert code == 3 and reply["ok"] is False and "flowagg run" in reply["error"]
    one = orjson.dumps(entry(1, entryId="down"))
    code, reply = bridge(tmp_path, "aggregate", input=one, root=root)
    assert code == 3
    code, reply = bridge(tmp_path, "aggregate", "--spool-if-down", input=one, root=root)
    assert code == 0 and reply["spooled"] == 1
    assert len(os.listdir(Layout(root).inbox)) == 1
    daemon = start_daemon(root, {"maxAgeMs": 3_600_000})
    wait_for(lambda: not os.listdir(Layout(root).inbox))
    assert daemon.stop() == 0
    assert [e["entryId"] for b in batches(root) for e in b["entries"]] == ["down"]


def run_bridge(*args: str, **kw: Any) -> subprocess.CompletedProcess[bytes]:
    kw.setdefault("stdin", subprocess.DEVNULL)
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.run([str(BRIDGE), *args], env=clean_env(), timeout=60, check=False, **kw)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ((), "required: action"),
        (("bogus",), "invalid choice: 'bogus'"),
        (("--nope", "aggregate-status"), "unrecognized arguments: --nope"),
        (("aggregate-recover", "--batch"), "expected one argument"),
    ],
)
def test_bridge_usage_errors_are_json(tmp_path: Path, args: tuple[str, ...], words: str) -> None:
    proc = run_bridge(*args, cwd=tmp_path)
    assert proc.returncode == 2
    reply = orjson.loads(proc.stdout)
    assert reply["ok"] is False and words in reply["error"]
    assert proc.stderr.count(b"\n") == 1


def test_bridge_help_is_json(tmp_path: Path) -> None:
    proc = run_bridge("aggregate", "--help", cwd=tmp_path)
    assert proc.returncode == 0
    assert "--spool-if-down" in orjson.loads(proc.stdout)["help"]


def test_bridge_with_stdin_closed_answers_json(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["bash", "-c", f"exec {BRIDGE} aggregate <&-"],
        capture_output=True,
        env=clean_env(),
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 5
    assert "stdin is closed" in orjson.loads(proc.stdout)["error"]


def test_bridge_with_a_full_stdout_says_so_on_stderr(tmp_path: Path) -> None:
    with open("/dev/full", "wb") as full:
        proc = run_bridge("aggregate-status", cwd=tmp_path, stdout=full, stderr=subprocess.PIPE)
    assert proc.returncode == 1
    assert proc.stderr.startswith(b"provider-bridge: cannot write the reply to stdout")
    assert b"Traceback" not in proc.stderr and proc.stderr.count(b"\n") == 1


def test_bridge_that_cannot_set_up_its_environment_answers_json(tmp_path: Path) -> None:
    # A checkout with no .venv on a machine where it cannot be made (no usable Python).
    scripts = tmp_path / "checkout" / "scripts"
    scripts.mkdir(parents=True)
    for name in ("provider-bridge", "_setup.sh"):
        shutil.copy2(BRIDGE.parent / name, scripts / name)
    env = clean_env({"PYTHON": str(tmp_path / "no-python")})
    proc = subprocess.run(
        [str(scripts / "provider-bridge"), "aggregate-status"],
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    reply = orjson.loads(proc.stdout)
    assert reply["ok"] is False and "cannot set up its Python environment" in reply["error"]


def test_dedupe_settings_are_reported_for_the_next_start_and_applied_there(
    root: Path, tmp_path: Path, daemons: list[DaemonProc]
) -> None:
    # Reported "changed", a longer window was not in force: a resend was stored twice.
    conf = tmp_path / "flowagg.toml"
    conf.write_text("dedupeWindowMs = 0\nmaxAgeMs = 3600000\n")
    env = {"FLOWAGG_CONFIG": str(conf)}
    daemon = DaemonProc(root, {}, env=env).wait_ready()
    daemons.append(daemon)
    sock = Layout(root).socket

    def add(entry_id: str) -> dict[str, Any]:
        return request(sock, {"op": "add", "entries": [entry(1, entryId=entry_id)]})

    conf.write_text("dedupeWindowMs = 86400000\ndedupeMaxIds = 5000\nmaxAgeMs = 3600000\n")
    reloaded = cli(root, "reload", "--json")
    assert reloaded.returncode == 0, reloaded.stderr
    reply = orjson.loads(reloaded.stdout)
    assert reply["changed"] == []
    assert sorted(reply["needsRestart"]) == ["dedupeMaxIds", "dedupeWindowMs"]
    assert daemon.stop() == 0
    daemon = DaemonProc(root, {}, env=env).wait_ready()
    daemons.append(daemon)
    assert add("w1")["accepted"] == 1
    assert add("w1")["duplicates"] == 1  # the window in force after the start
    assert request(sock, {"op": "flush"})["ok"]
    assert [e["entryId"] for b in batches(root) for e in b["entries"]] == ["w1"]
