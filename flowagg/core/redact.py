"""Redaction of entry metadata before it reaches the journal (SPEC §11).

This runs for every valid entry on the event loop, so the common case (flat metadata, no
matching key, no patterns) costs one cached verdict per key. Only `metadata` is ever
touched: `userId`, `action`, `timestamp` and `entryId` pass as they are. Values are replaced in
place: the entries are the daemon's own parse of the request, nobody else holds them.

Keys are compared as Sentry's data scrubber does: normalized, then by substring, so that
`user_password`, `Access-Token`, `API KEY` and `password` spelt with a Cyrillic a are all caught.
"""

from __future__ import annotations

import unicodedata
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from flowagg.core.redact_patterns import PatternSet

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
    "аеорксухіјѕԁԛԝһӏАВЕКМНОРСТХІЈЅαβεικνορτυχημϲΑΒΕΖΗΙΚΜΝΟΡΤΥΧıɑɡ",
    "aeopkcyxijsdqwhlABEKMHOPCTXIJSabeikvoptuxnucABEZHIKMNOPTYXiag",
)
# Separators between the words of a key, and invisible characters that split it unseen.
_DROPPED = dict.fromkeys(map(ord, "_-. \t\n\r\f\v\u00ad\u200b\u200c\u200d\u2060\ufeff"))


def normalize_key(key: str) -> str:
    """The form keys are compared in: compatibility forms (fullwidth letters, the long s) and
    look-alike letters folded to ASCII, case folded, separators dropped."""
    # Folded before NFKC too: it turns some look-alikes (lunate sigma) into other letters.
    plain = unicodedata.normalize("NFKC", key.translate(_LOOKALIKES))
    folded = plain.translate(_LOOKALIKES).casefold()
    return folded.translate(_DROPPED)


def compile_patterns(patterns: Iterable[str], origin: str = "redactPatterns") -> PatternSet:
    """The patterns as one linear-time scan; one that RE2 cannot run is refused by its text."""
    return PatternSet(patterns, origin)


class Redactor:
    """Counts what it replaced; `reconfigure` keeps the counts across a reload.

    Verdicts on short keys, and pattern results on short values, are kept in bounded dicts
    (KEY_CACHE_SIZE each, the oldest dropped first): metadata repeats the same few keys and
    values, so the usual cost is one dict lookup, made inline in the loops below. Strict LRU
    order would need a reorder on every hit, which measured twice the cost of the lookup.
    Long strings are not kept, so the memory stays bounded whatever is sent.
    """

    def __init__(self, keys: Iterable[str] = DEFAULT_KEYS, patterns: Iterable[str] = ()) -> None:
        self.entries = 0  # entries with at least one redacted value
        self.values = 0  # values (or pattern matches) replaced
        self.reconfigure(keys, patterns)

    def reconfigure(self, keys: Iterable[str], patterns: Iterable[str]) -> None:
        # A key of separators only normalizes to "", which every key contains: it names nothing.
        self._needles = tuple(sorted({normalize_key(k) for k in keys} - {""}))
        self._verdicts: OrderedDict[str, bool] = OrderedDict()
        patterns = tuple(patterns)
        self._subn = compile_patterns(patterns).subn if patterns else None
        self._subbed: OrderedDict[str, tuple[str, int]] = OrderedDict()

    def _verdict(self, key: str) -> bool:
        """Whether `key`, normalized, contains one of `redactKeys` normalized (a cache miss)."""
        normal = normalize_key(key)
        secret = any(needle in normal for needle in self._needles)
        if len(key) <= KEY_CACHE_LENGTH:
            _keep(self._verdicts, key, secret)
        return secret

    def _sub(self, value: str) -> tuple[str, int]:
        """The patterns applied to one string value: task ids, session ids and tags repeat."""
        done = self._subbed.get(value)
        if done is None:
            assert self._subn is not None
            done = self._subn(value)
            if len(value) <= KEY_CACHE_LENGTH:
                _keep(self._subbed, value, done)
        return done

    @property
    def active(self) -> bool:
        return bool(self._needles) or self._subn is not None

    def metadata(self, metadata: dict[str, Any]) -> None:
        """Redact `metadata` in place, at any depth."""
        if self._subn is None:
            # The common case, flat metadata without a secret key, in one pass and no walk.
            verdicts, verdict = self._verdicts, self._verdict
            for key, value in metadata.items():
                secret = verdicts.get(key)
                if secret is None:
                    secret = verdict(key)
                if secret or type(value) is dict or type(value) is list:
                    break
            else:
                return
        hits = self._walk(metadata)
        if hits:
            self.entries += 1
            self.values += hits

    def metadata_many(self, metadatas: list[dict[str, Any]], flat: bool) -> None:
        """Redact each of `metadatas` in place; `flat` when none holds an object or array.

        Flat metadata without patterns can only hold a secret under one of its own keys, and a
        request repeats the same few keys: they are judged once per request, not per entry.
        """
        if flat and self._subn is None:
            verdicts, verdict = self._verdicts, self._verdict
            keys = set().union(*metadatas)
            if not any(verdict(k) if (v := verdicts.get(k)) is None else v for k in keys):
                return
        for metadata in metadatas:
            if metadata:
                self.metadata(metadata)

    def _walk(self, root: dict[str, Any]) -> int:
        verdicts, verdict = self._verdicts, self._verdict
        sub = self._sub if self._subn is not None else None
        hits = 0
        stack: list[Any] = [root]
        while stack:
            node = stack.pop()
            keyed = type(node) is dict
            # Assigning to an existing key or index does not resize, so iterating is safe.
            for key, value in node.items() if keyed else enumerate(node):
                if keyed:
                    secret = verdicts.get(key)
                    if secret is None:
                        secret = verdict(key)
                    if secret:
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


def _keep(cache: OrderedDict[str, Any], key: str, value: Any) -> None:
    if len(cache) >= KEY_CACHE_SIZE:
        cache.popitem(last=False)
    cache[key] = value
