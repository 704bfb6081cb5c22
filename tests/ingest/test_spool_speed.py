"""How the spool intake saves work (issue #26), held to giving the same answers.

- a chunk of valid lines takes the compiled decode (entry_codec), and its answer is the
  validator's (hypothesis: any lines, the validator's answer whenever the compiled path
  accepts them);
- a step's deletions overlap on the disk instead of waiting for each other;
- a burst of inbox/ events wakes the loop once, not once per event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from flowagg.ingest import entry_check, spool, spool_watch
from flowagg.ingest.entry_codec import decode_lines
from tests.ingest.test_entry_codec import (
    DAY,
    META_KEYS,
    NOW,
    compiled_answer,
    entries,
    json_values,
    validate_all,
)
from tests.ingest.test_spool import Rig, line, run

OVERLAP_WAIT_S = 2.0  # how long an unlink waits for a second one to be in flight
EVENTS_WAIT_S = 10.0


def compiled(lines: list[bytes]) -> list[tuple[Any, ...]] | None:
    """The compiled path's answer for a chunk's lines, None when it leaves them to the
    validator."""
    decoded = decode_lines(lines)
    return None if decoded is None else compiled_answer(decoded)


# Entries whose rules hold apart from their metadata's, so that whole chunks of them reach
# the compiled path's per-entry checks.
near_valid = st.fixed_dictionaries(
    {
        "userId": st.sampled_from(["u1", "é", "x" * 128]),
        "action": st.sampled_from(["code_edit", "a.b:c-d_9"]),
        "timestamp": st.integers(946_684_800_000, NOW + DAY),
    },
    optional={
        "metadata": st.dictionaries(
            st.sampled_from(META_KEYS),
            st.one_of(st.text(max_size=5), st.integers(0, 10**6), st.booleans(), json_values),
            max_size=3,
        ),
        "entryId": st.sampled_from(["id-1", "i" * 128]),
    },
)


@st.composite
def chunk_lines(draw: st.DrawFn) -> list[bytes]:
    """Lines of a .jsonl chunk: mostly entries, some damaged, blank, or two values on one."""
    lines = []
    for value in draw(st.lists(st.one_of(near_valid, entries()), min_size=1, max_size=4)):
        text = json.dumps(value, ensure_ascii=draw(st.booleans()), allow_nan=False)
        data = text.encode("utf-8", "surrogatepass")
        edit = draw(st.integers(0, 40))
        if edit == 0 and data:  # a damaged byte
            at = draw(st.integers(0, len(data) - 1))
            data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]
        elif edit == 1:
            data = b"  \t"
        elif edit == 2:  # two entries on one line is no line of one entry
            data = data + b"," + data
        elif edit == 3:  # whitespace around an entry is allowed
            data = b" " + data + b"\r"
        lines.append(data)
    return lines


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunk_lines())
@example([orjson.dumps({"userId": "u", "action": "a", "timestamp": NOW}), b""])
@example([b'{"userId":"u","action":"a","timestamp":1704067200000,"metadata":{"x":"\\u0000"}}'])
@example(
    [
        b'{"userId":"u","action":"a","timestamp":1704067200000,"metadata":{"s":"p',
        b'q"}}',
    ]
)
def test_the_compiled_path_answers_for_lines_as_the_validator(lines: list[bytes]) -> None:
    answer = compiled(lines)
    if answer is None:
        return  # the validator answers, as before
    parsed = [orjson.loads(data) for data in lines]  # the compiled path took only JSON lines
    assert answer == validate_all(parsed)


def test_valid_lines_take_the_compiled_path(root: Path, monkeypatch: Any) -> None:
    worded: list[int] = []
    real = entry_check.validate_entry_json

    def validate_entry_json(raw: Any, index: int, **kw: Any) -> Any:
        worded.append(index)
        return real(raw, index, **kw)

    monkeypatch.setattr(entry_check, "validate_entry_json", validate_entry_json)

    async def scenario(rig: Rig) -> None:
        (rig.layout.inbox / "a.jsonl").write_bytes(b"\n".join(line(i) for i in range(5)))
        (rig.layout.inbox / "b.jsonl").write_bytes(line(5) + b"\nnot json\n" + line(6) + b"\n")
        assert await rig.scan() == 2
        assert rig.left() == []

    run(root, scenario)
    assert worded == [0, 1]  # b.jsonl's two valid lines, worded beside the invalid one
    assert Rig(root).stored() == {f"e{i}": 1 for i in range(7)}


def test_a_steps_deletions_overlap(root: Path, monkeypatch: Any) -> None:
    """Unlinking a file that holds data can wait milliseconds on the disk (a discard): the
    step's unlinks wait side by side. Each unlink here waits until another is in flight."""
    in_flight = [0, 0]  # now, most at once
    changed = threading.Condition()
    real = os.unlink

    def unlink(path: Any, *args: Any, **kw: Any) -> None:
        if Path(os.fsdecode(path)).parent.name != "spool":
            return real(path, *args, **kw)
        with changed:
            in_flight[0] += 1
            in_flight[1] = max(in_flight)
            changed.notify_all()
            changed.wait_for(lambda: in_flight[1] >= 2, timeout=OVERLAP_WAIT_S)
        try:
            return real(path, *args, **kw)
        finally:
            with changed:
                in_flight[0] -= 1

    monkeypatch.setattr(os, "unlink", unlink)

    async def scenario(rig: Rig) -> None:
        for i in range(4):
            (rig.layout.inbox / f"{i}.jsonl").write_bytes(line(i) + b"\n")
        assert await rig.scan() == 4
        assert rig.left() == []  # deleted, and durably (test_dir_fsync) before scan_once returns

    run(root, scenario)
    assert in_flight[1] >= 2
    assert Rig(root).stored() == {f"e{i}": 1 for i in range(4)}


class CountingEvent(asyncio.Event):
    def __init__(self) -> None:
        super().__init__()
        self.sets = 0

    def set(self) -> None:
        self.sets += 1
        super().set()


def test_a_burst_of_inbox_events_wakes_the_loop_once(tmp_path: Path, monkeypatch: Any) -> None:
    inbox, staging = tmp_path / "inbox", tmp_path / "staging"
    inbox.mkdir()
    staging.mkdir()
    files = 50
    for i in range(files):
        (staging / f"{i}.jsonl").write_bytes(b"{}\n")
    delivered = [0]
    real = spool_watch._Kick.on_any_event

    def on_any_event(self: Any, event: Any) -> None:
        real(self, event)
        delivered[0] += 1  # after the handler's work: counted means done (a move in from
        # outside inbox/ is a "created" event)

    monkeypatch.setattr(spool_watch._Kick, "on_any_event", on_any_event)

    async def scenario() -> None:
        wake = CountingEvent()
        watch = spool_watch.InboxWatch(inbox, wake)
        watch.start()
        try:
            # The loop is busy (blocked here) while the events arrive, as during a scan.
            for i in range(files):
                os.rename(staging / f"{i}.jsonl", inbox / f"{i}.jsonl")
            deadline = time.monotonic() + EVENTS_WAIT_S
            while delivered[0] < files:
                assert time.monotonic() < deadline, f"{delivered[0]} of {files} events seen"
                time.sleep(0.01)
            for _ in range(3):  # let the loop run what the watch thread scheduled
                await asyncio.sleep(0)
            assert wake.is_set()
            assert wake.sets == 1
        finally:
            await watch.stop()

    asyncio.run(scenario())


def test_a_failed_deletion_is_tried_again_and_the_intake_goes_on(
    root: Path, monkeypatch: Any
) -> None:
    """A step's deletion that fails outright (no thread can be started, say) leaves its files
    adopted for the next rescan: it must not fail every scan after it."""
    real = spool.unlink_side_by_side
    calls = [0]

    def unlink_side_by_side(folder: Path, adopted: list[str]) -> list[str]:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("can't start new thread")
        return real(folder, adopted)

    monkeypatch.setattr(spool, "unlink_side_by_side", unlink_side_by_side)

    async def scenario(rig: Rig) -> None:
        (rig.layout.inbox / "a.jsonl").write_bytes(line(0) + b"\n")
        with contextlib.suppress(RuntimeError):  # the scan it happened in may say so
            await rig.scan()
        assert calls[0] == 1
        (rig.layout.inbox / "b.jsonl").write_bytes(line(1) + b"\n")
        await rig.scan()
        assert rig.left() == []

    run(root, scenario)
    assert Rig(root).stored() == {"e0": 1, "e1": 1}
