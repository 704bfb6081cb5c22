"""The read commands against hostile files under the root: compression bombs, extra streams,
FIFOs and links to devices named like batches or journal segments, and a closed stdout."""

from __future__ import annotations

import gzip
import os
import resource
import subprocess
import sys
import zlib
from pathlib import Path

import orjson
import pytest

from flowagg.batches.storage import make_batch_id
from flowagg.core.compression import decompress
from flowagg.journal.format import segment_name
from flowagg.read.readout import iso
from tests.harness import clean_env, cli, flowagg_cmd
from tests.readfixture import Root, make_entry, standard_root

BOMB_BYTES = 300 << 20  # inflated; the old 2 GiB bound let every reader hold all of it
RSS_LIMIT_KIB = 100 << 10  # a reader bounded near maxBatchBytes peaks near 35 MiB
HANG_S = 30


def gzip_bomb(path: Path) -> None:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = b" " * (1 << 20)
    with path.open("wb") as fh:
        for _ in range(BOMB_BYTES // len(chunk)):
            fh.write(packer.compress(chunk))
        fh.write(packer.flush())


def zstd_bomb(path: Path) -> None:
    zstandard = pytest.importorskip("zstandard", reason="the zstd extra is missing")
    chunk = b" " * (1 << 20)
    # Streamed: the frame does not declare its size, so only the bound stops the inflating.
    with path.open("wb") as fh, zstandard.ZstdCompressor().stream_writer(fh) as writer:
        for _ in range(BOMB_BYTES // len(chunk)):
            writer.write(chunk)


# Linux carries a parent's peak RSS into a child it forks (and across exec), so the command
# is started by a small process of its own, which reports the command's peak alone.
_MEASURE = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(root: Path, *args: str, tmp: Path) -> tuple[int, bytes, int]:
    """Exit code, stdout + stderr and peak RSS (KiB) of one CLI call."""
    rss = tmp / "rss"
    with (tmp / "out").open("w+b") as out:
        code = subprocess.run(
            [sys.executable, "-c", _MEASURE, str(rss), *flowagg_cmd(root, *args)],
            stdout=out,
            stderr=out,
            env=clean_env(),
            check=False,
        ).returncode
        out.seek(0)
        return code, out.read(), int(rss.read_text())


@pytest.mark.parametrize("kind", ["gz", "zst"])
def test_a_compression_bomb_is_named_and_never_inflated(tmp_path: Path, kind: str) -> None:
    r = standard_root(tmp_path / "root")
    bomb = r.layout.aggregated / f"batch_{make_batch_id(1_704_067_299_000, 999)}.json.{kind}"
    (gzip_bomb if kind == "gz" else zstd_bomb)(bomb)
    assert bomb.stat().st_size < 2 << 20, "a few hundred KB on disk"
    for args in (("validate",), ("export",), ("report", "--json")):
        code, output, rss = run_measured(r.layout.root, *args, tmp=tmp_path)
        assert rss < RSS_LIMIT_KIB, f"{args}: peak RSS {rss} KiB"
        assert code == 1, (args, output)
        assert bomb.name.encode() in output and b"inflates past" in output, (args, output)
    exported = cli(r.layout.root, "export").stdout.splitlines()
    assert len(exported) == 40, "the other batches are read as ever"


def test_a_second_stream_or_trailing_bytes_is_corrupt(tmp_path: Path) -> None:
    doc = b'{"entries": []}'
    for bad in (gzip.compress(doc) + gzip.compress(b"{}"), gzip.compress(doc) + b"junk"):
        with pytest.raises(ValueError, match="after the gzip stream"):
            decompress("b.json.gz", bad)
    zstandard = pytest.importorskip("zstandard", reason="the zstd extra is missing")
    for bad in (zstandard.compress(doc) * 2, zstandard.compress(doc) + b"junk"):
        with pytest.raises(ValueError, match="more than one frame"):
            decompress("b.json.zst", bad)
    # Through validate: a batch with a second member behind it is not taken for clean.
    r = Root(tmp_path / "root")
    path = r.batch([make_entry(i) for i in range(5)], compress="gz")
    path.write_bytes(path.read_bytes() + gzip.compress(b'{"entries": [1]}'))
    r.write_journal()
    result = cli(r.layout.root, "validate")
    assert result.returncode == 1
    assert f"{path.name}: unreadable".encode() in result.stdout


def run_bounded(root: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """A CLI call that must neither hang nor eat memory: an address-space cap turns an endless
    read into a MemoryError instead of a starved machine."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    try:
        return subprocess.run(
            flowagg_cmd(root, *args),
            capture_output=True,
            timeout=HANG_S,
            env=clean_env(),
            preexec_fn=cap,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"flowagg {' '.join(args)} hung on a special file")


def special_batches(root: Path) -> tuple[Root, Path, Path]:
    """A root whose aggregated/ holds only a FIFO and a link to /dev/zero named like batches."""
    r = Root(root)
    r.write_journal()
    aggregated = r.layout.aggregated
    fifo = aggregated / f"batch_{make_batch_id(1_704_067_200_001, 1)}.json"
    link = aggregated / f"batch_{make_batch_id(1_704_067_200_002, 2)}.json.gz"
    os.mkfifo(fifo)
    link.symlink_to("/dev/zero")
    return r, fifo, link


def test_validate_names_special_files_named_like_batches(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _, fifo, link = special_batches(root)
    plain = cli(root, "validate")
    assert plain.returncode == 1, plain.stdout
    out = plain.stdout.decode()
    assert "clean" not in out
    assert "skipped 2 entries that are not regular files:" in out
    assert f"aggregated/{fifo.name} (a FIFO)" in out
    assert f"aggregated/{link.name} (a symbolic link)" in out
    export = cli(root, "export")
    assert export.returncode == 1 and fifo.name.encode() in export.stderr


def test_special_files_in_the_journal_and_logs_neither_hang_nor_eat_memory(
    tmp_path: Path,
) -> None:
    """A FIFO and a link to /dev/zero named like journal segments and logs."""
    root = tmp_path / "root"
    r, fifo, _ = special_batches(root)
    journal = r.layout.journal
    os.mkfifo(journal / segment_name(2))
    (journal / segment_name(3)).symlink_to("/dev/zero")
    os.mkfifo(r.layout.logs / "recovery.log")
    (r.layout.logs / "aggregation.log").symlink_to("/dev/zero")
    full = run_bounded(root, "validate", "--full", "--json")
    assert full.returncode == 1, full.stderr
    findings = {(f["file"], f["what"]) for f in orjson.loads(full.stdout)["findings"]}
    assert (f"journal/{segment_name(2)}", "not a regular file") in findings
    assert (f"journal/{segment_name(3)}", "not a regular file") in findings
    assert (f"aggregated/{fifo.name}", "not a regular file") in findings
    diagnostics = run_bounded(root, "diagnostics", "--json")
    assert diagnostics.returncode == 0, diagnostics.stderr
    skipped = orjson.loads(diagnostics.stdout)["journal"]["skipped"]
    assert skipped == [f"{segment_name(2)} (a FIFO)", f"{segment_name(3)} (a symbolic link)"]


def read_one_line_then_close(root: Path, *args: str) -> tuple[int, bytes]:
    proc = subprocess.Popen(
        flowagg_cmd(root, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env()
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline()
    proc.stdout.close()  # as `| head -1` does
    stderr = proc.stderr.read()
    return proc.wait(timeout=60), stderr


def test_a_closed_stdout_is_a_quiet_exit(tmp_path: Path) -> None:
    r = Root(tmp_path / "root")
    # Enough findings to fill any pipe buffer: validate is still writing when it closes.
    entries = [{**make_entry(i), "action": "bad action!"} for i in range(3000)]
    r.batch(entries)
    r.write_journal()
    code, stderr = read_one_line_then_close(r.layout.root, "validate", "--full")
    assert stderr == b"" and code == 1, (code, stderr)  # findings were reported before
    code, stderr = read_one_line_then_close(r.layout.root, "export")
    assert stderr == b"" and code == 0, (code, stderr)  # every file was read


def test_a_damaged_snapshot_time_is_shown_as_unknown() -> None:
    assert iso(1_704_067_200_000) == "2024-01-01T00:00:00+00:00"
    # A health snapshot is read back from disk: any of these made `status` die.
    for odd in (None, "2024", [], True, 10**20, -(10**20), float("nan"), float("inf")):
        assert iso(odd) == "unknown"
