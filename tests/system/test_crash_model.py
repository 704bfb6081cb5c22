"""The crash-state model on hand-written operation lists whose state sets are known."""

from __future__ import annotations

from flowagg.core.fsutil import TEMP_MARK
from tests.crashmodel.explore import kill_points, ranked
from tests.crashmodel.model import DIR, Barrier, Data, Fs, Link, Op
from tests.crashmodel.record import Recording
from tests.crashmodel.states import crash_points, distinct_states, fixed_at
from tests.crashmodel.strace import parse


def base() -> Fs:
    return Fs.from_state({"d": DIR})  # the root is inode 0, d is inode 1


def test_publish_with_fsyncs_leaves_nothing_or_the_whole_file() -> None:
    # tmp created in d, written, fsynced, renamed to f, d fsynced.
    fs = base()
    ops = [
        Link(((1, "tmp", 7),)),
        Data(7, 0, b"abcd"),
        Barrier(7, False),
        Link(((1, "tmp", None), (1, "f", 7))),
        Barrier(1, True),
    ]
    assert fixed_at(ops) == [4, 2, 5, 4, 5]
    _, found = distinct_states(fs, ops, crash_points(ops))
    states = {tuple(sorted(f.state.items())) for f in found}
    assert states == {
        (("d", DIR),),
        (("d", DIR), ("d/tmp", b"")),
        (("d", DIR), ("d/tmp", b"ab")),  # the write cut short
        (("d", DIR), ("d/tmp", b"abcd")),
        (("d", DIR), ("d/f", b"abcd")),
    }  # never f without all its bytes: they were durable before the rename
    assert found[0].state == {"d": DIR, "d/f": b"abcd"}  # the end: all durable


def test_fsync_of_a_new_file_does_not_make_its_name_durable() -> None:
    ops = [Link(((1, "f", 7),)), Data(7, 0, b"x"), Barrier(7, False)]
    _, found = distinct_states(base(), ops, [len(ops)])
    assert {tuple(sorted(f.state)) for f in found} == {("d",), ("d", "d/f")}
    assert all(f.state.get("d/f", b"x") == b"x" for f in found)


def test_a_rename_needs_both_directories_fsynced() -> None:
    fs = Fs.from_state({"a": DIR, "b": DIR, "a/f": b"x"})  # a=1, b=2, a/f=3
    ops = [Link(((1, "f", None), (2, "f", 3))), Barrier(2, True)]
    assert fixed_at(ops) == [len(ops), len(ops)]
    ops.append(Barrier(1, True))
    assert fixed_at(ops)[0] == 2
    _, found = distinct_states(fs, ops, [2])
    assert {tuple(sorted(f.state)) for f in found} == {("a", "a/f", "b"), ("a", "b", "b/f")}


def test_unsynced_renames_may_be_lost_in_any_order() -> None:
    fs = Fs.from_state({"d": DIR, "d/t1": b"1", "d/t2": b"2"})  # t1=2, t2=3
    ops = [Link(((1, "t1", None), (1, "b1", 2))), Link(((1, "t2", None), (1, "b2", 3)))]
    subsets, found = distinct_states(fs, ops, [len(ops)])
    assert subsets == 4
    names = {tuple(sorted(n for n in f.state if n.startswith("d/b"))) for f in found}
    assert names == {(), ("d/b1",), ("d/b2",), ("d/b1", "d/b2")}  # b2 without b1 too


def test_strace_lines_are_parsed_and_interrupted_calls_joined() -> None:
    text = (
        '7 openat(AT_FDCWD<\\x2f>, "\\x2f\\x72\\x2f\\x66", O_WRONLY|O_CREAT, 0600)'
        " = 3<\\x2f\\x72\\x2f\\x66>\n"
        '8 write(3<\\x2f\\x72\\x2f\\x66>, "\\x61\\x62" <unfinished ...>\n'
        "7 fsync(4<\\x2f\\x72>) = 0\n"
        "8 <... write resumed>, 2) = 2\n"
        '7 unlink("\\x2f\\x72\\x2f\\x78") = -1 ENOENT (No such file or directory)\n'
    )
    calls = parse(text)
    assert [c.name for c in calls] == ["openat", "fsync", "write", "unlink"]
    assert calls[0].ret == 3 and calls[0].ret_path == b"/r/f"
    assert calls[2].args[1].path == b"ab" and calls[2].ret == 2
    assert calls[3].ret is None


def test_the_sample_takes_names_lost_out_of_order_first_then_the_most_names_lost() -> None:
    fs = Fs.from_state({"d": DIR, "d/t1": b"1", "d/t2": b"2", "d/t3": b"3"})
    ops: list[Op] = [Link(((1, f"t{n}", None), (1, f"b{n}", n + 1))) for n in (1, 2, 3)]
    _, found = distinct_states(fs, ops, [len(ops)])
    picked = [(f.reordered, f.names_lost, sorted(f.choice.dropped)) for f in ranked(found, ops, 5)]
    assert picked == [
        (True, 2, [0, 1]),  # b3 outlived b1 and b2
        (True, 2, [0, 2]),  # b2 outlived b1 and b3
        (True, 1, [0]),
        (True, 1, [1]),
        (False, 3, [0, 1, 2]),
    ]
    assert len(ranked(found, ops, None)) == len(found) == 8


def test_a_temp_file_lost_is_not_a_name_lost() -> None:
    fs = Fs.from_state({"d": DIR})
    ops: list[Op] = [Link(((1, f"{TEMP_MARK}x", 7),)), Link(((1, "b", 8),))]
    _, found = distinct_states(fs, ops, [len(ops)])
    temp_only = next(f for f in found if f.choice.dropped == frozenset([0]))
    assert temp_only.names_lost == 0 and not temp_only.reordered


def test_kill_points_with_a_budget_leave_the_most_names_unsynced_per_directory() -> None:
    base = {"aggregated": DIR, "inbox": DIR, "inbox/x.json": b"[]"}  # 1, 2, inbox/x 3
    ops: list[Op] = [
        Link(((1, "a", 10),)),
        Barrier(1, True),  # one name unsynced before it
        Link(((1, "b", 11),)),
        Link(((1, "c", 12),)),
        Barrier(1, True),  # two
        Link(((1, "d", 13),)),
        Barrier(1, True),  # one again
        Barrier(2, True),  # nothing unsynced in inbox/: no kill there
    ]
    rec = Recording(base, ops, Fs.from_state(base), [], [])
    assert kill_points(rec, None) == [
        (1, "aggregated"),
        (4, "aggregated"),
        (6, "aggregated"),
        (7, "inbox"),
    ]
    assert kill_points(rec, 3) == [(4, "aggregated")]
