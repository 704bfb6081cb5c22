"""`flowagg validate`: a clean root passes; every planted fault is reported with its file."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.harness import cli, entry, start_daemon
from tests.readfixture import Root, make_entry, standard_root


def rewrite(path: Path, change: Any, *, fix_checksum: bool = True) -> None:
    doc = orjson.loads(path.read_bytes())
    change(doc)
    if fix_checksum:
        doc["entriesSha256"] = hashlib.sha256(orjson.dumps(doc["entries"])).hexdigest()
    path.write_bytes(orjson.dumps(doc))


def run_json(root: Path, *args: str) -> tuple[int, dict[str, Any]]:
    result = cli(root, "validate", "--json", *args)
    assert not result.stderr, result.stderr
    return result.returncode, orjson.loads(result.stdout)


def test_clean_root_with_compressed_files_passes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    standard_root(root)
    for args in ((), ("--full",)):
        code, doc = run_json(root, *args)
        assert code == 0, doc
        assert doc["ok"] is True and doc["findings"] == []
        assert doc["summary"]["files"] == {"aggregated": 4, "failed": 1, "abandoned": 1}
        assert doc["summary"]["entries"] == 60
    plain = cli(root, "validate", "--full")
    assert plain.returncode == 0
    assert b"validate --full: clean" in plain.stdout
    assert b"\x1b[" not in plain.stdout  # piped: no colour codes


def planted_root(root: Path) -> tuple[Root, dict[str, Path]]:
    r = Root(root)
    e = [make_entry(i) for i in range(80)]
    files = {
        "good": r.batch(e[0:10]),
        "duplicate": r.batch([*e[10:19], {**e[19], "entryId": e[3]["entryId"]}]),
        "checksum": r.batch(e[20:30]),
        "count": r.batch(e[30:40]),
        "truncated": r.batch(e[40:50]),
        "version": r.batch(e[50:60], kind="failed"),
        "entry": r.batch(e[60:70], kind="abandoned"),
        "journal": r.batch(e[70:80], done=False),
    }
    rewrite(files["checksum"], lambda d: d.update(entriesSha256="0" * 64), fix_checksum=False)
    rewrite(files["count"], lambda d: d.update(entryCount=11))
    data = files["truncated"].read_bytes()
    files["truncated"].write_bytes(data[: len(data) // 2])
    rewrite(files["version"], lambda d: d.update(version="3.0.0"))
    rewrite(files["entry"], lambda d: d["entries"][4].update(action="bad action!"))
    r.write_journal()
    return r, files


def test_every_planted_fault_is_reported_with_its_file(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _, files = planted_root(root)
    code, doc = run_json(root, "--full")
    assert code == 1
    found = {(f["file"], f["what"]) for f in doc["findings"]}

    def rel(name: str) -> str:
        return str(files[name].relative_to(root))

    expected = {
        (rel("duplicate"), "duplicate entryId"),
        (rel("checksum"), "checksum"),
        (rel("count"), "entryCount"),
        (rel("truncated"), "not JSON"),
        (rel("version"), "version"),
        (rel("entry"), "entry"),
        (rel("journal"), "journal"),
    }
    assert expected <= found, doc["findings"]
    assert not any(f["file"] == rel("good") for f in doc["findings"])
    by_what = {f["what"]: f for f in doc["findings"]}
    assert by_what["entryCount"]["expected"] == "10" and by_what["entryCount"]["found"] == "11"
    assert by_what["version"]["found"] == "3.0.0"
    assert "entry 5: action" in by_what["entry"]["detail"]
    assert "e-000003" in by_what["duplicate entryId"]["detail"]
    assert "waiting" in by_what["journal"]["detail"]
    assert doc["summary"]["badFiles"] == 7
    # The journal's pending batch is the only journal finding: the done cursor is right.
    assert [f["file"] for f in doc["findings"] if f["what"] == "journal"] == [rel("journal")]

    # Without --full the cross checks stay out; the plain output has one line per finding.
    plain = cli(root, "validate")
    assert plain.returncode == 1
    lines = plain.stdout.decode().splitlines()
    assert any(line.startswith(f"{rel('checksum')}: checksum:") for line in lines)
    assert any(line.startswith(f"{rel('truncated')}: not JSON:") for line in lines)
    assert not any("duplicate entryId" in line for line in lines)


def test_a_duplicate_within_one_file_and_a_batch_id_stored_twice(tmp_path: Path) -> None:
    root = tmp_path / "root"
    r = Root(root)
    e = [make_entry(i) for i in range(20)]
    first = r.batch(e[0:10])
    r.batch([*e[10:19], {**e[19], "entryId": e[10]["entryId"]}])
    r.write_journal()
    copy = r.layout.recovery / first.name.replace("batch_", "").replace(".json", ".failed.json")
    doc = orjson.loads(first.read_bytes())
    doc.update(retryCount=1, failedAt=1, lastRetryAt=1, nextRetryAt=1, lastError="x")
    copy.write_bytes(orjson.dumps(doc))
    code, out = run_json(root, "--full")
    assert code == 1
    whats = [f["what"] for f in out["findings"]]
    assert "batch id" in whats
    assert whats.count("duplicate entryId") == 11  # 10 ids in both copies, one inside a batch


def test_journal_done_record_naming_a_missing_batch(tmp_path: Path) -> None:
    root = tmp_path / "root"
    r = Root(root)
    path = r.batch([make_entry(i) for i in range(5)])
    r.write_journal()
    path.unlink()
    code, out = run_json(root, "--full")
    assert code == 1
    assert [f["what"] for f in out["findings"]] == ["journal"]
    assert "no batch file holds it" in out["findings"][0]["detail"]


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    result = cli(tmp_path / "missing", "validate")
    assert result.returncode == 2
    assert b"does not exist" in result.stderr
    assert cli(tmp_path, "validate", "--bogus").returncode == 2


def test_zst_without_zstandard_names_the_extra(tmp_path: Path) -> None:
    root = tmp_path / "root"
    r = Root(root)
    r.batch([make_entry(1)], compress="gz")
    pytest.importorskip("zstandard")
    r.batch([make_entry(2)], compress="zst")
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "zstandard.py").write_text("raise ImportError('blocked for the test')\n")
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWAGG_")}
    env["PYTHONPATH"] = str(blocker)
    result = subprocess.run(
        [sys.executable, "-m", "flowagg", "--root", str(root), "validate"],
        capture_output=True,
        env=env,
        check=False,
    )
    assert result.returncode == 2
    assert b"flowagg[zstd]" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_validate_while_the_daemon_runs(tmp_path: Path) -> None:
    root = tmp_path / "root"
    daemon = start_daemon(root, {"batchSize": 7})
    try:
        entries = [entry(i, entryId=f"live-{i}") for i in range(30)]
        added = cli(root, "add", "--file", "-", input=b"\n".join(map(orjson.dumps, entries)))
        assert added.returncode == 0, added.stderr
        assert cli(root, "flush").returncode == 0
        code, doc = run_json(root, "--full")
        assert code == 0, doc
        assert doc["summary"]["entries"] == 30
        assert any("daemon is running" in note for note in doc["summary"]["notes"])
    finally:
        daemon.stop()
    code, doc = run_json(root, "--full")
    assert code == 0, doc
    assert doc["summary"]["notes"] == []


def test_an_entry_without_entry_id_is_named_so(tmp_path: Path) -> None:
    # The validator's placeholder id was U+0000, which the NUL rule then refused: the finding
    # said "must not contain U+0000" about an entryId the file did not have.
    root = tmp_path / "root"
    r = Root(root)
    path = r.batch([make_entry(i) for i in range(3)])
    rewrite(path, lambda d: d["entries"][1].pop("entryId"))
    r.write_journal()
    code, out = run_json(root)
    assert code == 1
    [finding] = out["findings"]
    assert finding["detail"] == "entry 2: has no entryId (every stored one has)", finding
