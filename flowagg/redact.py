"""Redaction of entry metadata before it reaches the journal (SPEC §11).

This runs for every valid entry on the event loop, so the common case (flat metadata, no
matching key, no patterns) costs one cached verdict per key. Only `metadata` is ever
touched: `userId`, `action`, `timestamp` and `entryId` pass as they are. Values are replaced in
place: the entries are the daemon's own parse of the request, nobody else holds them.

Keys are compared as Sentry's data scrubber does: normalized, then by substring, so that
`user_password`, `Access-Token`, `API KEY` and `password` spelt with a Cyrillic a are all caught.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Callable, Iterable
from typing import Any

from .redact_patterns import PatternSet

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

# Letters of other scripts drawn like Latin ones, as a key-name forger would use them. Mapped
# before case folding, since an uppercase Greek Eta looks like H and a lowercase one like n.
_LOOKALIKES = str.maketrans(
    "аеорсухіјѕԁԛԝһӏАВЕКМНОРСТХІЈЅαβεικνορτυχημϲΑΒΕΖΗΙΚΜΝΟΡΤΥΧıɑɡ",
    "aeopcyxijsdqwhlABEKMHOPCTXIJSabeikvoptuxnucABEZHIKMNOPTYXiag",
)
# Separators between the words of a key, and invisible characters that split it unseen.
_DROPPED = dict.fromkeys(map(ord, "_-. \t\n\r\f\v\u00ad\u200b\u200c\u200d\u2060\ufeff"))


def normalize_key(key: str) -> str:
    """The form keys are compared in: compatibility forms (fullwidth letters, the long s) and
    look-alike letters folded to ASCII, case folded, separators dropped."""
    folded = unicodedata.normalize("NFKC", key).translate(_LOOKALIKES).casefold()
    return folded.translate(_DROPPED)


def compile_patterns(patterns: Iterable[str], origin: str = "redactPatterns") -> PatternSet:
    """The patterns as one linear-time scan; one that RE2 cannot run is refused by its text."""
    return PatternSet(patterns, origin)


class Redactor:
    """Counts what it replaced; `reconfigure` keeps the counts across a reload."""

    def __init__(self, keys: Iterable[str] = DEFAULT_KEYS, patterns: Iterable[str] = ()) -> None:
        self.entries = 0  # entries with at least one redacted value
        self.values = 0  # values (or pattern matches) replaced
        self.reconfigure(keys, patterns)

    def reconfigure(self, keys: Iterable[str], patterns: Iterable[str]) -> None:
        # A key of separators only normalizes to "", which every key contains: it names nothing.
        self._needles = tuple(sorted({normalize_key(k) for k in keys} - {""}))
        self._is_secret = self._secret_cache = _Cached(self._verdict)
        patterns = tuple(patterns)
        # Short values repeat (task ids, session ids, tags): a kept result saves a scan.
        self._sub = self._sub_cache = _Cached(compile_patterns(patterns).subn) if patterns else None

    def _verdict(self, key: str) -> bool:
        """Whether `key`, normalized, contains one of `redactKeys` normalized."""
        normal = normalize_key(key)
        return any(needle in normal for needle in self._needles)

    @property
    def active(self) -> bool:
        return bool(self._needles) or self._sub is not None

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


class _Cached:
    """`func` with its answers for short arguments kept in a bounded LRU: metadata repeats the
    same few keys and values, so the usual cost is one lookup. Long ones are not kept, so the
    memory stays at KEY_CACHE_SIZE short strings whatever is sent."""

    __slots__ = ("_func", "_lru")

    def __init__(self, func: Callable[[str], Any]) -> None:
        self._func = func
        self._lru = functools.lru_cache(maxsize=KEY_CACHE_SIZE)(func)

    def __call__(self, text: str) -> Any:
        return self._lru(text) if len(text) <= KEY_CACHE_LENGTH else self._func(text)

    def size(self) -> int:
        return self._lru.cache_info().currsize
