"""Prometheus metrics (SPEC §11), checked by Prometheus' own tools against the batch files."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families

from flowagg.batches.storage import iter_batch_files, read_batch
from flowagg.core.latency import BUCKETS, LatencySamples
from flowagg.core.layout import Layout
from tests.harness import cli, entry, request, start_daemon, wait_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str, *, openmetrics: bool = False) -> Samples:
    parse = parse_om if openmetrics else text_string_to_metric_families
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in parse(text) for s in f.samples
    }


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        body: bytes = reply.read()
    return body.decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_latency_histogram_is_cumulative_and_keeps_counting_past_the_window() -> None:
    samples_ = LatencySamples(4)
    for seconds in (0.0001, 0.001, 0.003, 20.0, 0.001, 0.001):
        samples_.append(seconds)
    assert len(samples_) == 4 and samples_.total == 6
    buckets = dict(samples_.cumulative())
    assert buckets["0.0005"] == 1 and buckets["0.001"] == 4 and buckets["0.005"] == 5
    assert buckets[str(BUCKETS[-1])] == 5 and buckets["+Inf"] == 6


def _truth(root: Path) -> tuple[Counter[str], int]:
    triggers: Counter[str] = Counter()
    entries = 0
    for path in iter_batch_files(Layout(root)):
        batch = read_batch(path)
        triggers[batch["trigger"]] += 1
        entries += batch["entryCount"]
    return triggers, entries


def _check_against_files(got: Samples, root: Path) -> None:
    triggers, entries = _truth(root)
    assert got[("flowagg_entries_accepted_total", ())] == 120
    assert got[("flowagg_entries_duplicate_total", ())] == 3
    assert got[("flowagg_entries_rejected_total", (("source", "socket"),))] == 2
    assert got[("flowagg_entries_stored_total", ())] == entries == 120
    for trigger in ("size", "manual", "age"):
        key = ("flowagg_batches_written_total", (("trigger", trigger),))
        assert got[key] == triggers[trigger], trigger
    assert got[("flowagg_buffer_entries", ())] == 0
    assert (
        got[("flowagg_add_latency_seconds_count", ())] == 3
    )  # the add requests that stored entries
    assert got[("flowagg_flush_latency_seconds_count", ())] == sum(triggers.values())
    assert got[("flowagg_last_flush_timestamp_seconds", ())] > 0


def _workload(sock: Path) -> None:
    for chunk in range(3):
        batch = [entry(i, entryId=f"m{i}") for i in range(chunk * 40, chunk * 40 + 40)]
        assert request(sock, {"op": "add", "entries": batch})["accepted"] == 40
    dupes = [entry(i, entryId=f"m{i}") for i in range(3)]
    bad = [{"userId": "x"}, {"userId": "y", "action": "?", "timestamp": 1}]
    reply = request(sock, {"op": "add", "entries": dupes + bad})
    assert reply["duplicates"] == 3 and reply["rejectedCount"] == 2, reply


# What a Prometheus server sends: OpenMetrics preferred, the 0.0.4 text accepted.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def promtool() -> str:
    """promtool's path; in CI (where .ci/run installs it) its absence fails the test."""
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing in CI: .ci/run installs Debian's prometheus")
        pytest.skip("promtool (Debian's prometheus) is not installed")
    return found


def promtool_check(text: str) -> None:
    check = subprocess.run(
        [promtool(), "check", "metrics"], input=text.encode(), capture_output=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr


def fetch_as(url: str, accept: str | None) -> tuple[str, str]:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=10) as reply:
        body: bytes = reply.read()
        return body.decode(), reply.headers["Content-Type"]


def test_metrics_pass_promtool_and_agree_with_the_batch_files(tmp_path: Path) -> None:
    promtool()
    root = tmp_path / "data"
    daemon = start_daemon(root, {"metricsListen": "127.0.0.1:0", "maxAgeMs": 600_000})
    try:
        _workload(daemon.layout.socket)
        assert cli(root, "flush").returncode == 0
        listen = request(daemon.layout.socket, {"op": "status"})["metrics"]["listen"]
        assert listen.startswith("127.0.0.1:") and not listen.endswith(":0")
        url = f"http://{listen}/metrics"
        for accept in (None, "text/plain", "*/*"):
            text, content_type = fetch_as(url, accept)
            assert content_type.startswith("text/plain; version=0.0.4"), (accept, content_type)
            promtool_check(text)
            _check_against_files(samples(text), root)
        text, content_type = fetch_as(url, PROMETHEUS_ACCEPT)
        assert content_type.startswith("application/openmetrics-text"), content_type
        _check_against_files(samples(text, openmetrics=True), root)
        # The command's default is what promtool reads; OpenMetrics only when asked.
        shown = cli(root, "metrics")
        assert shown.returncode == 0, shown.stderr
        promtool_check(shown.stdout.decode())
        assert "# EOF" not in shown.stdout.decode()
        _check_against_files(samples(shown.stdout.decode()), root)
        shown = cli(root, "metrics", "--format", "openmetrics")
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.decode().endswith("# EOF\n")
        _check_against_files(samples(shown.stdout.decode(), openmetrics=True), root)
    finally:
        assert daemon.stop() == 0


@pytest.mark.skipif(
    shutil.which("prometheus-node-exporter") is None,
    reason="prometheus-node-exporter (Debian's package) is not installed",
)
def test_textfile_is_scraped_by_node_exporter_and_agrees(tmp_path: Path) -> None:
    root = tmp_path / "data"
    textdir = tmp_path / "textfile"
    textdir.mkdir()
    prom = textdir / "flowagg.prom"
    daemon = start_daemon(
        root,
        {"metricsTextfile": str(prom), "metricsTextfileIntervalMs": 100, "maxAgeMs": 600_000},
    )
    try:
        _workload(daemon.layout.socket)
        assert cli(root, "flush").returncode == 0
        wait_for(
            lambda: b'flowagg_batches_written_total{trigger="manual"} 1.0' in prom.read_bytes()
        )
    finally:
        assert daemon.stop() == 0
    assert not [p for p in textdir.iterdir() if p != prom], "no temp file is left behind"
    assert stat.S_IMODE(prom.stat().st_mode) == 0o644  # node_exporter is another user
    port = free_port()
    exporter = subprocess.Popen(
        [
            "prometheus-node-exporter",
            "--collector.disable-defaults",
            "--collector.textfile",
            f"--collector.textfile.directory={textdir}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        def scraped() -> str | None:
            assert exporter.poll() is None, exporter.stderr.read() if exporter.stderr else ""
            try:
                text = fetch(f"http://127.0.0.1:{port}/metrics")
            except OSError:
                return None
            return text if "flowagg_entries_accepted_total" in text else None

        text = wait_for(scraped)
    finally:
        exporter.terminate()
        exporter.wait(30)
    got = samples(text)
    assert got[("node_textfile_scrape_error", ())] == 0
    _check_against_files(got, root)
