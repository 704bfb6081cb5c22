"""The dedupe filter's bits are its file format: a faster hash must set the same bits, so a
filter file written by an earlier flowagg still answers for the ids it holds."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from flowagg.journal.dedupe_filter import PROBES, Filter, key_of, keys_of

WORDS = 97  # not a power of two: the word index is a modulo


def reference_bits(entry_id: str, words: int) -> tuple[int, int]:
    """The filter's layout as first written: blake2b-128, low half picks the word, the high
    half's 6-bit fields pick PROBES bits of it."""
    digest = hashlib.blake2b(entry_id.encode(), digest_size=16).digest()
    h1, h2 = int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")
    mask = 0
    for _ in range(PROBES):
        mask |= 1 << (h2 & 63)
        h2 >>= 6
    return h1 % words, mask


@given(st.lists(st.text(min_size=1, max_size=128), max_size=50))
def test_filter_bits_match_the_written_format(ids: list[str]) -> None:
    flt = Filter(WORDS)
    expected = [0] * WORDS
    for entry_id in ids:
        flt.add(key_of(entry_id, WORDS))
        word, mask = reference_bits(entry_id, WORDS)
        expected[word] |= mask
    assert list(flt.words) == expected
    assert all(key_of(i, WORDS) in flt for i in ids)


@given(st.lists(st.text(min_size=1, max_size=128), max_size=50))
def test_keys_of_many_ids_match_the_written_format(ids: list[str]) -> None:
    """keys_of hashes a whole add at once (the loop's path): the same keys, one by one."""
    assert keys_of(ids, WORDS) == [reference_bits(i, WORDS) for i in ids]
    assert keys_of(ids, 1 << 20) == [reference_bits(i, 1 << 20) for i in ids]
