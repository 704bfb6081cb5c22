"""`flowagg export` and `flowagg report` over a hand-built root (tests/readfixture.py)."""

from __future__ import annotations

import csv
import datetime
import gzip
import io
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from flowagg.cli.main import main
from flowagg.read import fanout
from flowagg.read.batchread import AGGREGATED, BatchPath
from flowagg.read.export import Sorter, lines_of_batches
from flowagg.read.selection import Selection, Skipped
from tests.harness import cli
from tests.readfixture import BASE_TS, Root, make_entry, standard_root

STORED = 40  # the aggregated batches of standard_root; failed and abandoned hold 20 more


def by_time(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(entries, key=lambda e: e["timestamp"])


def test_jsonl_round_trip_is_the_stored_entries_in_time_order(tmp_path: Path) -> None:
    r = standard_root(tmp_path / "root")
    result = cli(r.layout.root, "export")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    exported = [orjson.loads(line) for line in lines]
    assert exported == by_time(r.entries[:STORED])
    # The bytes are the stored ones: what a consumer of the batch files would read.
    assert lines[0] == orjson.dumps(exported[0])
    everything = cli(r.layout.root, "export", "--include-failed")
    assert [orjson.loads(x) for x in everything.stdout.splitlines()] == by_time(r.entries)


def test_filters_and_time_forms(tmp_path: Path) -> None:
    r = standard_root(tmp_path / "root")
    since = BASE_TS + 200 * 3_600_000
    until = BASE_TS + 600 * 3_600_000
    want = [
        e
        for e in by_time(r.entries)
        if since <= e["timestamp"] < until and e["userId"] == "bob" and e["action"] != "review"
    ]
    assert want
    iso_since = datetime.datetime.fromtimestamp(since / 1000, datetime.UTC).isoformat()
    for since_text in (str(since), iso_since, iso_since.replace("+00:00", "Z")):
        result = cli(
            r.layout.root,
            "export",
            "--include-failed",
            "--since",
            since_text,
            "--until",
            str(until),
            "--user",
            "bob",
            "--action",
            "code_edit",
            "--action",
            "meeting",
        )
        assert result.returncode == 0, result.stderr
        assert [orjson.loads(x) for x in result.stdout.splitlines()] == want
    # A relative time: everything in the fixture is long before "the last 7 days".
    recent = cli(r.layout.root, "export", "--since", "7d")
    assert recent.returncode == 0 and recent.stdout == b""
    bad = cli(r.layout.root, "export", "--since", "last tuesday")
    assert bad.returncode == 2
    assert b"--since 'last tuesday' is not a time" in bad.stderr


def test_csv_one_row_per_entry_with_metadata_columns(tmp_path: Path) -> None:
    r = standard_root(tmp_path / "root")
    out = tmp_path / "out.csv"
    result = cli(r.layout.root, "export", "--format", "csv", "-o", str(out))
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    want = by_time(r.entries[:STORED])
    assert len(rows) == len(want)
    for row, entry in zip(rows, want, strict=True):
        assert row["entryId"] == entry["entryId"]
        assert row["userId"] == entry["userId"]
        assert int(row["timestamp"]) == entry["timestamp"]
        assert row["metadata.duration"] == str(entry["metadata"]["duration"])
        assert row["metadata.taskId"] == entry["metadata"]["taskId"]
        assert row["metadata.sessionId"] == entry["metadata"].get("sessionId", "")
        tags = entry["metadata"].get("tags", {})
        assert row["metadata.tags.team"] == tags.get("team", "")
    assert not list(tmp_path.glob("*flowagg-tmp*"))  # the temp file became out.csv


def test_parquet_round_trip(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet", reason="the parquet extra (pyarrow) is missing")
    r = standard_root(tmp_path / "root")
    out = tmp_path / "out.parquet"
    result = cli(r.layout.root, "export", "--format", "parquet", "-o", str(out))
    assert result.returncode == 0, result.stderr
    table = pq.read_table(out).to_pylist()
    want = by_time(r.entries[:STORED])
    assert [row["entryId"] for row in table] == [e["entryId"] for e in want]
    assert [row["duration"] for row in table] == [e["metadata"]["duration"] for e in want]
    assert [orjson.loads(row["metadata"]) for row in table] == [e["metadata"] for e in want]
    first = table[0]["timestamp"]
    assert int(first.timestamp() * 1000) == want[0]["timestamp"]
    to_stdout = cli(r.layout.root, "export", "--format", "parquet")
    assert to_stdout.returncode == 2 and b"-o FILE" in to_stdout.stderr


def test_sorter_spills_runs_and_merges_in_order(tmp_path: Path) -> None:
    entries = [make_entry(i) for i in range(5000)]
    for e in entries[::7]:
        e["timestamp"] = BASE_TS  # ties across batches keep the stored order
    halves = []
    for n, part in enumerate((entries[:2500], entries[2500:])):
        path = tmp_path / f"batch_{n}.json"
        path.write_bytes(orjson.dumps({"entries": part}))
        halves.append((n, [BatchPath(path, AGGREGATED, str(n))]))
    runs = tmp_path / "runs"
    runs.mkdir()
    sorter = Sorter(run_entries=1000, tmp_dir=runs)
    # Two shares of 2500 lines: a run is cut inside each, and one spans both.
    for share in (halves[:1], halves[1:]):
        lines, skipped = lines_of_batches((Selection(), 1 << 30, False), share)
        assert skipped == Skipped() and lines.skipped == 0
        sorter.add(lines)
    merged = [orjson.loads(x) for x in sorter.sorted()]
    assert len(list(runs.glob("run-*"))) == 5
    assert sorter.count == 5000
    assert merged == sorted(entries, key=lambda e: e["timestamp"])


def test_export_output_is_atomic_and_a_bad_file_is_named(tmp_path: Path) -> None:
    r = standard_root(tmp_path / "root", compressed=False)
    victim = sorted(r.layout.aggregated.iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:100])
    out = tmp_path / "out.jsonl"
    result = cli(r.layout.root, "export", "-o", str(out))
    assert result.returncode == 1
    assert f"skipped {victim}".encode() in result.stderr
    assert len(out.read_bytes().splitlines()) == STORED - 10


def test_report_totals_equal_a_hand_computed_sum(tmp_path: Path) -> None:
    r = standard_root(tmp_path / "root")
    result = cli(r.layout.root, "report", "--by", "user,task", "--include-failed", "--json")
    assert result.returncode == 0, result.stderr
    doc = orjson.loads(result.stdout)
    counts: Counter[tuple[str, str]] = Counter()
    durations: Counter[tuple[str, str]] = Counter()
    for e in r.entries:
        key = (e["userId"], e["metadata"]["taskId"])
        counts[key] += 1
        durations[key] += e["metadata"]["duration"]
    got = {(g["key"]["user"], g["key"]["task"]): g for g in doc["groups"]}
    assert set(got) == set(counts)
    for key, group in got.items():
        assert group["entries"] == counts[key]
        assert group["durationMs"] == durations[key]
    assert doc["total"] == {
        "entries": len(r.entries),
        "durationMs": sum(e["metadata"]["duration"] for e in r.entries),
    }
    ordered = [g["durationMs"] for g in doc["groups"]]
    assert ordered == sorted(ordered, reverse=True)

    by_day = orjson.loads(cli(r.layout.root, "report", "--by", "day", "--json").stdout)
    days = Counter(
        datetime.datetime.fromtimestamp(e["timestamp"] / 1000, datetime.UTC).date().isoformat()
        for e in r.entries[:STORED]
    )
    assert {g["key"]["day"]: g["entries"] for g in by_day["groups"]} == dict(days)


def test_report_table_top_and_usage(tmp_path: Path) -> None:
    r = standard_root(tmp_path / "root")
    result = cli(r.layout.root, "report", "--by", "action", "--top", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "time by action (top 2 of 3 groups)"
    assert len(lines) == 5  # title, header, two groups, total
    total_ms = sum(e["metadata"]["duration"] for e in r.entries[:STORED])
    seconds = total_ms // 1000
    assert lines[-1].split()[-1] == f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    assert b"\x1b[" not in result.stdout
    bad = cli(r.layout.root, "report", "--by", "user,weekday")
    assert bad.returncode == 2
    assert b"group by one or more of user, action, task, day" in bad.stderr


def test_export_to_a_missing_folder_is_a_usage_error(tmp_path: Path) -> None:
    r = standard_root(tmp_path / "root")
    result = cli(r.layout.root, "export", "-o", str(tmp_path / "nope" / "out.jsonl"))
    assert result.returncode == 2
    assert b"its folder does not exist" in result.stderr


def test_a_batch_stored_under_several_names_is_counted_once(tmp_path: Path) -> None:
    r = standard_root(tmp_path / "root", compressed=False)
    first, second = sorted(r.layout.aggregated.iterdir())[:2]
    # The same batch under another suffix, and in recovery/ (a crash between two copies).
    copy = first.with_name(first.name + ".gz")
    copy.write_bytes(gzip.compress(first.read_bytes()))
    failed_copy = r.layout.recovery / first.name.replace("batch_", "").replace(
        ".json", ".failed.json"
    )
    failed_copy.write_bytes(first.read_bytes())
    result = cli(r.layout.root, "export", "--include-failed")
    assert result.returncode == 0, result.stderr
    assert [orjson.loads(x) for x in result.stdout.splitlines()] == by_time(r.entries)
    stderr = result.stderr.decode()
    assert f"not counted {copy}: batch" in stderr and f"copy {first}; keep one copy" in stderr
    assert f"not counted {failed_copy}" in stderr
    doc = orjson.loads(cli(r.layout.root, "report", "--json", "--include-failed").stdout)
    assert doc["total"]["entries"] == len(r.entries)
    assert {c["file"] for c in doc["copiesNotCounted"]} == {str(copy), str(failed_copy)}
    assert {c["readFrom"] for c in doc["copiesNotCounted"]} == {str(first)}
    # The first whole copy is read: a torn .json gives way to its whole .json.gz.
    torn = second.with_name(second.name + ".gz")
    torn.write_bytes(gzip.compress(second.read_bytes()))
    second.write_bytes(second.read_bytes()[:50])
    result = cli(r.layout.root, "export")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == STORED
    assert f"not counted {second} (not a batch" in result.stderr.decode()


def csv_rows(root: Path, tmp_path: Path) -> tuple[list[str], list[dict[str, str]], int]:
    out = tmp_path / "out.csv"
    result = cli(root, "export", "--format", "csv", "-o", str(out))
    assert result.returncode == 0, result.stderr
    with out.open(newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader), out.stat().st_size


def test_csv_cells_that_start_a_formula_are_escaped(tmp_path: Path) -> None:
    r = Root(tmp_path / "root")
    hostile = ['=HYPERLINK("http://x")', "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx"]
    entries = [
        {**make_entry(i), "userId": text, "metadata": {"note": text, "n": -5, "s": "-5"}}
        for i, text in enumerate(hostile)
    ]
    r.batch(entries)
    r.write_journal()
    _, rows, _ = csv_rows(r.layout.root, tmp_path)
    by_id = {row["entryId"]: row for row in rows}
    for e in entries:
        row = by_id[e["entryId"]]
        assert row["userId"] == "'" + e["userId"]
        assert row["metadata.note"] == "'" + e["metadata"]["note"]
        assert row["metadata.n"] == "-5", "a JSON number is written as it is"
        assert row["metadata.s"] == "'-5", "a text that starts with - is escaped"


def test_csv_columns_never_collide(tmp_path: Path) -> None:
    r = Root(tmp_path / "root")
    entry = {**make_entry(0), "metadata": {"a.b": 1, "a": {"b": 2}, "c\\.d": 3}}
    r.batch([entry])
    r.write_journal()
    columns, rows, _ = csv_rows(r.layout.root, tmp_path)
    assert rows[0]["metadata.a\\.b"] == "1"
    assert rows[0]["metadata.a.b"] == "2"
    assert rows[0]["metadata.c\\\\\\.d"] == "3"
    assert len(columns) == len(set(columns)) == 5 + 3


def test_csv_with_thousands_of_distinct_keys_stays_proportional(tmp_path: Path) -> None:
    r = Root(tmp_path / "root")
    common = {"taskId": "T-1", "duration": 60}
    entries = [{**make_entry(i), "metadata": {**common, f"key{i:05d}": i}} for i in range(10_000)]
    for start in range(0, len(entries), 1000):
        r.batch(entries[start : start + 1000])
    r.write_journal()
    columns, rows, size = csv_rows(r.layout.root, tmp_path)
    assert size < 3 << 20, f"{size:,} bytes for 10 000 short entries"
    assert len(columns) == 5 + 64 + 1 and columns[-1] == "otherMetadata"
    # The keys in the most entries have their columns; nothing is lost.
    assert "metadata.taskId" in columns and "metadata.duration" in columns
    by_id = {row["entryId"]: row for row in rows}
    for i, e in enumerate(entries):
        row = by_id[e["entryId"]]
        column = f"metadata.key{i:05d}"
        value = row[column] if column in row else orjson.loads(row["otherMetadata"])[column[9:]]
        assert int(value) == i
        assert row["metadata.duration"] == "60"


def test_a_selection_skips_entries_whose_user_or_action_is_not_text() -> None:
    # A damaged file's list or object here made `report --action` die with a TypeError.
    match = Selection(users=frozenset({"u"}), actions=frozenset({"a"})).matcher()
    assert match is not None
    good = {"timestamp": 1, "userId": "u", "action": "a"}
    assert match(good)
    for odd in ([], ["u"], {"x": 1}, None, 5):
        assert not match({**good, "userId": odd})
        assert not match({**good, "action": odd})


def test_a_timestamp_no_date_can_show_is_exported_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A damaged file's integer timestamp past the year 9999 or before the year 1 passes
    # export's check; csv's time cell and report's day died on it with a ValueError.
    monkeypatch.setattr(fanout, "worker_count", lambda: 1)  # in this process: cheap
    r = Root(tmp_path / "root")
    entries = [make_entry(i) for i in range(3)]
    entries[1]["timestamp"] = 10**15
    entries[2]["timestamp"] = -(10**15)
    r.batch(entries)
    r.write_journal()
    runner = CliRunner()
    root = ["--root", str(r.layout.root)]
    result = runner.invoke(main, [*root, "export", "--format", "csv"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(row["timestamp"], row["time"]) for row in rows] == [
        (str(-(10**15)), ""),
        (str(entries[0]["timestamp"]), "2024-01-01T00:00:00.000+00:00"),
        (str(10**15), ""),
    ]
    result = runner.invoke(main, [*root, "report", "--by", "day", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    groups = orjson.loads(result.stdout)["groups"]
    assert {g["key"]["day"]: g["entries"] for g in groups} == {"2024-01-01": 1, "(no time)": 2}
