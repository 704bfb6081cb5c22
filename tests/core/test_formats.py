"""Format versions (SPEC §11): older versions read fine, a newer major is refused and left alone."""

from __future__ import annotations

import random
from pathlib import Path

import orjson
import pytest

from flowagg.batches.storage import CorruptBatch, batch_file_name, decode_batch, read_batch
from flowagg.core import formats
from flowagg.core.clock import FakeClock
from flowagg.core.formats import NewerFormatError
from flowagg.core.layout import Layout
from flowagg.delivery.recovery import Recovery
from flowagg.journal.public import encode_add
from flowagg.service.health import read_latest
from tests.delivery.test_recovery import B1, POLICY, failed_doc, make_layout, put_failed
from tests.harness import cli
from tests.journal.test_journal import NOW, entry, header, records_in, scan_dir, write_segment


@pytest.mark.parametrize(
    ("version", "major"), [(None, 0), (1, 1), ("1.0.0", 1), ("2.3.9", 2), ("10", 10)]
)
def test_major_of(version: object, major: int) -> None:
    assert formats.major_of(version) == major


@pytest.mark.parametrize("version", ["x.1", "", True, 1.5, [2]])
def test_a_version_that_is_no_version_is_damage(version: object) -> None:
    with pytest.raises(formats.BadVersionError):
        formats.major_of(version)
    doc = {**failed_doc(B1), "version": version}
    with pytest.raises(CorruptBatch, match="not a version number"):
        decode_batch(orjson.dumps(doc))


@pytest.mark.parametrize("version", ["1.0.0", "2.0.0", "2.9.1", None])
def test_older_and_current_batch_versions_read(tmp_path: Path, version: str | None) -> None:
    doc = failed_doc(B1)
    if version is None:
        del doc["version"]
    else:
        doc["version"] = version
    path = tmp_path / batch_file_name(B1)
    path.write_bytes(orjson.dumps(doc))
    assert read_batch(path)["entryCount"] == 3


def test_a_newer_major_is_refused_before_its_shape_is_judged() -> None:
    newer = orjson.dumps({"version": "3.0.0", "batchId": B1, "payload": "another shape"})
    with pytest.raises(NewerFormatError, match=r"3\.0\.0, newer than this flowagg reads \(2\.x\)"):
        decode_batch(newer, Path("batch_x.json"))
    assert NewerFormatError("x").exit_code == 4


def test_an_older_failed_batch_is_recovered_a_newer_one_left_alone(tmp_path: Path) -> None:
    layout = make_layout(tmp_path)
    put_failed(layout, failed_doc(B1, version="1.0.0"))
    newer = {"version": "3.0.0", "batchId": "1704067200000_000000000009", "shape": "new"}
    newer_path = layout.recovery / f"{newer['batchId']}.failed.json"
    newer_path.write_bytes(orjson.dumps(newer))
    before = newer_path.read_bytes()
    report = Recovery(layout, FakeClock(), random.Random(1), POLICY).run_once()
    assert report.recovered == [B1]
    assert report.refused == [newer_path.name] and report.quarantined == []
    assert newer_path.read_bytes() == before
    assert not list(layout.errors.iterdir())


def test_an_older_journal_segment_reads(tmp_path: Path) -> None:
    (tmp_path / "j").mkdir()
    (tmp_path / "e").mkdir()
    older = header(1, version=0)
    write_segment(tmp_path / "j", 1, [older, encode_add(1, NOW, [entry(1), entry(2)], [], None)])
    result = scan_dir(tmp_path / "j", tmp_path / "e")
    assert result.next_seq == 3
    assert records_in(tmp_path / "j") == [(1, ["id-1", "id-2"])]


def _put_health(layout: Layout, version: object) -> None:
    doc = {"timestamp": NOW, "status": "healthy", "queue": {"abandoned": 0}}
    if version is not None:
        doc["formatVersion"] = version
    layout.health.mkdir(parents=True, exist_ok=True)
    (layout.health / "latest.json").write_bytes(orjson.dumps(doc))


@pytest.mark.parametrize("version", [None, 0, 1, "1.2.0"])
def test_older_health_snapshots_read(tmp_path: Path, version: object) -> None:
    layout = Layout(tmp_path / "data")
    _put_health(layout, version)
    snapshot = read_latest(layout)
    assert snapshot is not None and snapshot["status"] == "healthy"


def test_a_newer_health_snapshot_is_refused_by_flowagg_health(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "data")
    layout.prepare()
    _put_health(layout, "2.0.0")
    proc = cli(layout.root, "health")
    message = proc.stderr.decode()
    assert proc.returncode == 4, message
    assert "health/latest.json has format version 2.0.0, newer than this flowagg reads" in message
    assert (layout.health / "latest.json").exists()


def test_every_written_format_declares_its_version() -> None:
    from flowagg import BATCH_FORMAT_VERSION
    from flowagg.core import audit
    from flowagg.journal import format as journal_format
    from flowagg.service import health

    assert formats.major_of(BATCH_FORMAT_VERSION) == formats.BATCH_MAJOR
    assert formats.major_of(health.HEALTH_FORMAT_VERSION) == formats.HEALTH_MAJOR
    assert formats.major_of(audit.AUDIT_FORMAT_VERSION) == 1
    assert journal_format.FORMAT_VERSION >= 1
