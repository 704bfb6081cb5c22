"""Redaction of entry metadata before it reaches the journal (SPEC §11).

This runs for every valid entry on the event loop, so the common case (flat metadata, no
matching key, no patterns) is one lower() and one set lookup per key. Only `metadata` is ever
touched: `userId`, `action`, `timestamp` and `entryId` pass as they are. Values are replaced in
place: the entries are the daemon's own parse of the request, nobody else holds them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from .errors import ConfigError

REDACTED = "[REDACTED]"
KEY_CACHE_SIZE = 4096
KEY_CACHE_LENGTH = 64
DEFAULT_KEYS = (
    "password",
    "passwd",
    "secret",
    "token",
    "apiKey",
    "api_key",
    "authorization",
    "cookie",
    "sessionToken",
)


def compile_patterns(patterns: Iterable[str], origin: str = "redactPatterns") -> re.Pattern[str]:
    """One alternation of every pattern, so a string value is scanned once whatever their
    number; a pattern that does not compile is refused with its text."""
    checked = []
    for text in patterns:
        try:
            re.compile(text)
        except re.error as exc:
            raise ConfigError(
                f"redactPatterns ({origin}): {text!r} is not a regular expression ({exc}); fix it"
            ) from None
        if re.fullmatch(text, ""):
            raise ConfigError(
                f"redactPatterns ({origin}): {text!r} matches the empty string and would"
                " redact between every character; anchor or tighten it"
            )
        checked.append(_scoped(text))
    try:
        return re.compile("|".join(checked))
    except re.error as exc:
        raise ConfigError(
            f"redactPatterns ({origin}): the patterns do not combine ({exc}); write inline"
            " flags as scoped groups such as (?i:...)"
        ) from None


_GLOBAL_FLAGS = re.compile(r"\(\?([aimsux]+)\)")


def _scoped(text: str) -> str:
    """The pattern as one group of an alternation: global flags such as `(?i)` are allowed
    only at the very start of the whole expression, so they become the group's own."""
    match = _GLOBAL_FLAGS.match(text)
    if match:
        return f"(?{match.group(1)}:{text[match.end() :]})"
    return f"(?:{text})"


class Redactor:
    """Counts what it replaced; `reconfigure` keeps the counts across a reload."""

    def __init__(self, keys: Iterable[str] = DEFAULT_KEYS, patterns: Iterable[str] = ()) -> None:
        self.entries = 0  # entries with at least one redacted value
        self.values = 0  # values (or pattern matches) replaced
        self._keys: frozenset[str] = frozenset()
        self._sub: Callable[[str], tuple[str, int]] | None = None
        self._subn: Callable[..., tuple[str, int]] | None = None
        self.reconfigure(keys, patterns)

    def reconfigure(self, keys: Iterable[str], patterns: Iterable[str]) -> None:
        self._keys = frozenset(k.lower() for k in keys)
        patterns = tuple(patterns)
        self._subn = compile_patterns(patterns).subn if patterns else None
        self._sub = self._sub_cached if patterns else None
        self._secret: dict[str, bool] = {}
        self._subbed: dict[str, tuple[str, int]] = {}

    def _sub_cached(self, value: str) -> tuple[str, int]:
        """The patterns applied to one string value. Short values repeat (task ids, session
        ids, tags): their results are kept like the keys', which saves a regex scan."""
        done = self._subbed.get(value)
        if done is None:
            assert self._subn is not None
            done = self._subn(REDACTED, value)
            if len(value) <= KEY_CACHE_LENGTH and len(self._subbed) < KEY_CACHE_SIZE:
                self._subbed[value] = done
        return done

    def _is_secret(self, key: str) -> bool:
        """Whether a key is one of `redactKeys` in any case. The answers for short keys are
        kept (at most KEY_CACHE_SIZE of them): metadata repeats the same few keys, and a dict
        lookup costs less than lower() and a set lookup."""
        secret = self._secret.get(key)
        if secret is None:
            secret = key.lower() in self._keys
            if len(key) <= KEY_CACHE_LENGTH and len(self._secret) < KEY_CACHE_SIZE:
                self._secret[key] = secret
        return secret

    @property
    def active(self) -> bool:
        return bool(self._keys) or self._sub is not None

    def metadata(self, metadata: dict[str, Any]) -> None:
        """Redact `metadata` in place, at any depth."""
        if self._sub is None:
            # The common case, flat metadata without a secret key, in one pass and no walk.
            is_secret = self._is_secret
            for key, value in metadata.items():
                if is_secret(key) or type(value) is dict or type(value) is list:
                    break
            else:
                return
        hits = self._walk(metadata)
        if hits:
            self.entries += 1
            self.values += hits

    def _walk(self, root: dict[str, Any]) -> int:
        is_secret, sub = self._is_secret, self._sub
        hits = 0
        stack: list[Any] = [root]
        while stack:
            node = stack.pop()
            keyed = type(node) is dict
            # Assigning to an existing key or index does not resize, so iterating is safe.
            for key, value in node.items() if keyed else enumerate(node):
                if keyed and is_secret(key):
                    node[key] = REDACTED
                    hits += 1
                    continue
                kind = type(value)
                if kind is dict or kind is list:
                    stack.append(value)
                elif kind is str and sub is not None:
                    new, count = sub(value)
                    if count:
                        node[key] = new
                        hits += count
        return hits
