"""Redaction's edges (SPEC §11, issue #23 items 6 and 9): key variants are caught the way
Sentry's data scrubber catches them, and patterns cannot stall the daemon."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowagg.core.config import load_config
from flowagg.core.errors import ConfigError
from flowagg.core.redact import DEFAULT_KEYS, REDACTED, Redactor, normalize_key
from tests.harness import BASE_TS, ping, request, start_daemon, stored_entries

EMAIL = r"[\w.+-]+@[\w-]+\.[\w.]+"  # the README's example


@pytest.mark.parametrize(
    "key",
    [
        "password ",
        "user_password",
        "access_token",
        "api-key",
        "API KEY",
        "p\u0430ssword",  # a Cyrillic a
        "\u017fecret",  # a long s
        "X-Session.Token",
        "\uff50\uff41\uff53\uff53\uff57\uff44",  # fullwidth passwd
        "auth\u200borization",  # a zero-width space
    ],
)
def test_the_variants_of_a_listed_key_are_redacted(key: str) -> None:
    metadata = {key: "hunter2", "nested": [{key: {"deep": "x"}}], "taskId": "T-1"}
    Redactor().metadata(metadata)
    assert metadata == {key: REDACTED, "nested": [{key: REDACTED}], "taskId": "T-1"}


# How a key can be spelt so that a reader still sees the same word. The test's own table: the
# letters of the default keys and characters drawn like them in Cyrillic, Greek and Latin.
LOOKALIKE = {
    "a": "\u0430\u0410\u03b1\u0391\u0251",
    "c": "\u0441\u0421\u03f2",
    "d": "\u0501",
    "e": "\u0435\u0415\u03b5\u0395",
    "h": "\u04bb\u041d\u0397",
    "i": "\u0456\u0406\u03b9\u0399\u0131",
    "k": "\u043a\u041a\u03ba\u039a",
    "n": "\u039d",
    "o": "\u043e\u041e\u03bf\u039f",
    "p": "\u0440\u0420\u03c1\u03a1",
    "s": "\u0455\u0405\u017f",
    "t": "\u0422\u03c4\u03a4",
    "u": "\u03c5",
    "w": "\u051d",
    "y": "\u0443\u03a5",
    "z": "\u0396",
}
PLAIN = "abcdefghijklmnopqrstuvwxyz0123456789"
LISTED = sorted({k.lower().replace("_", "") for k in DEFAULT_KEYS})


def _spellings(char: str) -> list[str]:
    if char.isdigit():
        return [char, chr(0xFF10 + int(char))]
    return [
        char,
        char.upper(),
        chr(0xFF41 + ord(char) - ord("a")),  # fullwidth
        chr(0xFF21 + ord(char) - ord("a")),
        *LOOKALIKE.get(char, ""),
    ]


@st.composite
def disguised(draw: st.DrawFn) -> tuple[str, str]:
    """(a plain lowercase skeleton, a key spelt from it as a forger would)."""
    middle = draw(st.sampled_from(LISTED))
    if draw(st.booleans()):  # one letter changed: a near miss
        at = draw(st.integers(0, len(middle) - 1))
        other = draw(st.sampled_from(PLAIN.replace(middle[at], "")))
        middle = middle[:at] + other + middle[at + 1 :]
    skeleton = draw(st.text(PLAIN, max_size=8)) + middle + draw(st.text(PLAIN, max_size=8))
    key = ""
    for char in skeleton:
        key += draw(st.sampled_from(["", "", "", "_", "-", ".", " "]))
        key += draw(st.sampled_from(_spellings(char)))
    return skeleton, key


@given(disguised())
def test_a_key_is_redacted_exactly_when_its_skeleton_holds_a_listed_key(
    case: tuple[str, str],
) -> None:
    skeleton, key = case
    metadata: dict[str, Any] = {key: "v", "plain": "w"}
    Redactor().metadata(metadata)
    expected = REDACTED if any(listed in skeleton for listed in LISTED) else "v"
    assert metadata[key] == expected, (skeleton, key)
    assert metadata["plain"] == "w"


@pytest.mark.parametrize("letter", sorted(LOOKALIKE))
def test_every_look_alike_letter_folds_to_its_latin_one(letter: str) -> None:
    """Every entry of the table, not only those the random spellings happen to draw."""
    assert {c: normalize_key(c) for c in LOOKALIKE[letter]} == dict.fromkeys(
        LOOKALIKE[letter], letter
    )


def test_a_repeated_key_keeps_its_verdict_after_many_others() -> None:
    redactor = Redactor()
    for i in range(10_000):
        metadata = {f"k{i}": 1, "userPassword": "x", "x" * 100 + f"token{i}": "y"}
        redactor.metadata(metadata)
        assert metadata == {f"k{i}": 1, "userPassword": REDACTED, "x" * 100 + f"token{i}": REDACTED}


@pytest.mark.parametrize(
    "pattern",
    [r"(\w+)@\1", r"secret(?=\d)", r"(?<=key=)\w+", r"(?P<x>a)(?P=x)", r"(?!x)y"],
)
def test_a_pattern_that_needs_backtracking_is_refused_by_name(pattern: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(flags={"redactPatterns": orjson.dumps([pattern]).decode()}, environ={})
    message = str(info.value)
    assert message.startswith("redactPatterns (flag): ")
    assert repr(pattern) in message and "linear time" in message


def test_patterns_keep_pythons_unicode_classes() -> None:
    redactor = Redactor((), (EMAIL, r"\b\d{4}\s\d{4}\b", r"(?i)bearer\s+[\w.~+/-]+=*"))
    metadata = {
        "a": "to j\u00fcrgen@m\u00fcller.example ok",
        "b": "card 1234\u00a05678 ok",
        "c": "Authorization: BEARER abc.def= done",
        "d": "nothing here",
    }
    redactor.metadata(metadata)
    assert metadata == {
        "a": f"to {REDACTED} ok",
        "b": f"card {REDACTED} ok",
        "c": f"Authorization: {REDACTED} done",
        "d": "nothing here",
    }


def test_an_adversarial_megabyte_does_not_stall_the_daemon(tmp_path: Path) -> None:
    """A loop-stall detector: pings must keep being answered while a 1 MB value without `@`
    goes through the README's e-mail pattern (quadratic with backtracking: hours for 1 MB)."""
    root = tmp_path / "data"
    settings = {"redactPatterns": orjson.dumps([EMAIL]).decode(), "maxEntryBytes": 4 << 20}
    daemon = start_daemon(root, settings)
    value = "a" * (1 << 20) + " then mail bob@example.org"
    doc = {"userId": "u", "action": "a", "timestamp": BASE_TS, "entryId": "big"}
    replies: list[dict[str, Any]] = []

    def add() -> None:
        big = {**doc, "metadata": {"note": value}}
        replies.append(request(daemon.layout.socket, {"op": "add", "entries": [big]}, 120))

    sender = threading.Thread(target=add, daemon=True)
    try:
        sender.start()
        while sender.is_alive():
            # 10 s per ping: RE2 takes milliseconds for the megabyte, backtracking hours.
            assert ping(daemon.layout.socket, timeout=10), "the daemon's loop stalled"
        assert replies and replies[0]["accepted"] == 1, replies
        assert daemon.stop() == 0
    finally:
        if daemon.proc.poll() is None:
            daemon.kill()
    (stored,) = stored_entries(root)
    assert stored["metadata"]["note"] == f"{'a' * (1 << 20)} then mail {REDACTED}"


ALPHABET = (
    "abcXYZ019 _@.+-]\\[:^"
    "\u00e4\u00f6\u00fc\u00df\u00e9\u00f1\u00e6\u0153"  # Latin letters beyond ASCII
    "\u65e5\u672c\u03b1\u03b2\u0430\u0431"  # CJK, Greek, Cyrillic
    "\u0663\u0664\u0968\u00b2\u2460"  # Arabic-Indic and Devanagari digits, superscript, circled
    "\u00a0\u2003\u3000\t\n\x0b\x1c\u0301"  # spaces of every kind, a combining accent
)
SAME_AS_PYTHON = (
    r"\w+",
    r"\W+",
    r"\d+",
    r"\D+",
    r"\s+",
    r"\S+",
    r"[^\d\s]+",
    r"[\\\w]+",
    r"[]\w]+",
    r"[\w:]+x",
    EMAIL,
    r"(?i)[A-Z]\w*",
)


@given(st.sampled_from(SAME_AS_PYTHON), st.text(ALPHABET, max_size=40))
def test_patterns_match_what_pythons_re_matches(pattern: str, text: str) -> None:
    metadata = {"v": text}
    Redactor((), (pattern,)).metadata(metadata)
    assert metadata["v"] == re.sub(pattern, REDACTED, text)
