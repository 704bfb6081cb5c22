"""`redactPatterns` on RE2 (SPEC §11): time linear in the value, whatever the pattern.

Python's `re` backtracks: the README's own e-mail pattern took seconds on one 60 KB value
without an `@`, and the event loop stood still meanwhile. RE2 (google-re2) runs a pattern as
an automaton, so a scan costs time proportional to the value; the price is that
backreferences and lookaround, which need backtracking, are refused at start.

RE2's `\\w`, `\\d` and `\\s` are ASCII; Python's match letters, digits and spaces of every
script. Patterns written for `re` keep their meaning (an e-mail address with an `ü` in it
is redacted whole, not from the `ü` on) because those three are rewritten as Unicode classes.
`\\b` stays ASCII: RE2 has no Unicode word boundary.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from flowagg.core.errors import ConfigError

REDACTED_BYTES = b"[REDACTED]"

# Python's classes in RE2 syntax: str.isalnum() is the L and N categories; str.isspace() also
# takes \v, the information separators and the Unicode spaces, which RE2's \s does not.
_SPACE = (
    r"\t\n\x0b\f\r\x1c-\x1f \x{85}\x{a0}\x{1680}\x{2000}-\x{200a}"
    r"\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}"
)
_INSIDE = {"w": r"\p{L}\p{N}_", "d": r"\p{Nd}", "s": _SPACE, "D": r"\P{Nd}"}
_OUTSIDE = {
    "w": r"[\p{L}\p{N}_]",
    "W": r"[^\p{L}\p{N}_]",
    "d": r"\p{Nd}",
    "D": r"\P{Nd}",
    "s": f"[{_SPACE}]",
    "S": f"[^{_SPACE}]",
}


def unicode_classes(text: str) -> str:
    """`text` with Python's Unicode meaning of \\w, \\d and \\s spelt out for RE2. Inside a
    bracket class only the unions can be spelt out: `[\\W]` and `[\\S]` keep RE2's ASCII sense."""
    out: list[str] = []
    i, end, in_class = 0, len(text), False
    while i < end:
        char = text[i]
        if char == "\\" and i + 1 < end:
            escaped = text[i + 1]
            out.append((_INSIDE if in_class else _OUTSIDE).get(escaped, text[i : i + 2]))
            i += 2
            continue
        if in_class and text.startswith("[:", i):  # [:alpha:] inside a class
            close = text.find(":]", i + 2)
            if close != -1:
                out.append(text[i : close + 2])
                i = close + 2
                continue
        if char == "[" and not in_class:
            in_class = True
            start = i + 1 + text.startswith("^", i + 1)
            start += text.startswith("]", start)  # a ] first in a class is a literal
            out.append(text[i:start])
            i = start
            continue
        if char == "]" and in_class:
            in_class = False
        out.append(char)
        i += 1
    return "".join(out)


def _re2() -> Any:
    import re2  # google-re2; imported here so commands without patterns do not load it

    return re2


def _options() -> Any:
    re2 = _re2()
    options = re2.Options()
    options.never_capture = True  # only the whole match is replaced
    options.log_errors = False  # a refused pattern is reported once, by ConfigError
    return options


def _refuse(text: str, origin: str, exc: Exception) -> ConfigError:
    reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
    try:
        re.compile(text)
    except re.error as py_exc:
        return ConfigError(
            f"redactPatterns ({origin}): {text!r} is not a regular expression ({py_exc}); fix it"
        )
    return ConfigError(
        f"redactPatterns ({origin}): {text!r} cannot run in linear time ({reason}):"
        " backreferences, lookaround and the flags a, u, x are not supported; rewrite it"
        " without them"
    )


class PatternSet:
    """Every pattern as one RE2 alternation, so a value is scanned once whatever their number."""

    def __init__(self, patterns: Iterable[str], origin: str = "redactPatterns") -> None:
        re2, options = _re2(), _options()
        parts = []
        for text in patterns:
            try:
                single = re2.compile(unicode_classes(text).encode(), options)
            except re2.error as exc:
                raise _refuse(text, origin, exc) from None
            if single.fullmatch(b"") is not None:
                raise ConfigError(
                    f"redactPatterns ({origin}): {text!r} matches the empty string and would"
                    " redact between every character; anchor or tighten it"
                )
            # A group scopes the pattern's own flags, such as a leading (?i), to it.
            parts.append(b"(?:" + single.pattern + b")")
        try:
            self._search = re2.compile(b"|".join(parts), options).search
        except re2.error as exc:  # each compiles, but together they are over RE2's memory
            raise ConfigError(
                f"redactPatterns ({origin}): the patterns together are too large for RE2"
                f" ({exc}); use fewer or simpler ones"
            ) from None

    def subn(self, value: str) -> tuple[str, int]:
        """`value` with every match replaced by [REDACTED], and the number of matches."""
        data = value.encode()
        match = self._search(data)
        if match is None:
            return value, 0
        pieces: list[bytes] = []
        done = count = 0
        while match is not None:
            start, end = match.span()
            pieces += (data[done:start], REDACTED_BYTES)
            count += 1
            done = pos = end
            if start == end:  # an empty match (\b): step over one character to move on
                if end >= len(data):
                    break
                pos = end + _utf8_length(data[end])
            match = self._search(data, pos)
        pieces.append(data[done:])
        # RE2 matches whole code points of valid UTF-8, so every cut is a character boundary.
        return b"".join(pieces).decode(), count


def _utf8_length(lead: int) -> int:
    return 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
