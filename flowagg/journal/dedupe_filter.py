"""The Bloom filter behind the dedupe index: probes for one id fall in one 64-bit word."""

from __future__ import annotations

import functools
import struct
import zlib
from collections.abc import Iterable, Iterator
from hashlib import blake2b
from typing import Any, BinaryIO

import orjson

BITS_PER_ID = 10
PROBES = 7
CHUNK = 1 << 20


# Probe masks by table: two probes per 12 bits of h2, so a mask is four lookups, not seven
# shifts (the filter ran on the loop thread for every client id, twice).
_PAIRS = [(1 << (v & 63)) | (1 << (v >> 6)) for v in range(4096)]
_SINGLES = [1 << v for v in range(64)]
assert PROBES == 7  # the tables' layout: 2 + 2 + 2 + 1 probes of 6 bits

# A digest's two 64-bit halves, little-endian, for many digests at once.
_HALVES = struct.Struct("<QQ").iter_unpack
_BLAKE2B_16 = functools.partial(blake2b, digest_size=16)
_DIGEST = blake2b.digest

Key = tuple[int, int]  # (word index, probe mask): an id's place in every filter of one size


def key_of(entry_id: str, words: int) -> Key:
    return keys_of((entry_id,), words)[0]


def keys_of(entry_ids: Iterable[str], words: int) -> list[Key]:
    """Each id's key: blake2b's 16-byte digest, little-endian, split into h1 (the word) and
    h2 (the probes: consecutive 6-bit fields). On the loop thread for every client id.

    The hashing runs in C over the whole list (map, one join, one unpack): the two 64-bit
    halves come from `struct`, not from a 128-bit int cut apart in Python, which cost five
    times as much as the hash itself.
    """
    pairs, singles = _PAIRS, _SINGLES
    digests = b"".join(map(_DIGEST, map(_BLAKE2B_16, map(str.encode, entry_ids))))
    return [
        (
            h1 % words,
            pairs[h2 & 4095]
            | pairs[(h2 >> 12) & 4095]
            | pairs[(h2 >> 24) & 4095]
            | singles[(h2 >> 36) & 63],
        )
        for h1, h2 in _HALVES(digests)
    ]


def inflate(fh: BinaryIO, bufs: list[bytearray]) -> None:
    """Decompress the rest of `fh` into `bufs`, one after the other, exactly filling them."""
    unpacker = zlib.decompressobj()
    pending = b""
    for buf in bufs:
        view = memoryview(buf)
        at = 0
        while at < len(view):
            if not pending:
                pending = fh.read(CHUNK)
                if not pending:
                    raise ValueError("damaged: shorter than its header says")
            out = unpacker.decompress(pending, len(view) - at)
            pending = unpacker.unconsumed_tail
            view[at : at + len(out)] = out
            at += len(out)
    if unpacker.decompress(pending + fh.read()) or not unpacker.eof:
        raise ValueError("damaged: longer than its header says, or cut short")


def merge(src: Filter, dst: Filter) -> None:
    """OR `src` into `dst`, a chunk at a time (no whole-filter temporaries)."""
    a = memoryview(src.buf)
    b = memoryview(dst.buf)
    for at in range(0, len(a), CHUNK):
        n = len(a[at : at + CHUNK])
        x = int.from_bytes(a[at : at + n], "little") | int.from_bytes(b[at : at + n], "little")
        b[at : at + n] = x.to_bytes(n, "little")


class Filter:
    """A Bloom filter whose probes for one id all fall in one 64-bit word (one memory read)."""

    def __init__(self, words: int, buf: bytearray | None = None) -> None:
        self.buf = buf if buf is not None else bytearray(words * 8)
        self.words = memoryview(self.buf).cast("Q")

    def add(self, key: Key) -> None:
        self.words[key[0]] |= key[1]

    def __contains__(self, key: Key) -> bool:
        return self.words[key[0]] & key[1] == key[1]

    def add_all(self, keys: Iterable[Key]) -> None:
        words = self.words
        for word, mask in keys:
            words[word] |= mask

    def holds(self, keys: Iterable[Key]) -> list[bool]:
        """`key in self` for each of `keys`."""
        words = self.words
        return [words[word] & mask == mask for word, mask in keys]


def read_filters(fh: BinaryIO, gens: list[int], words: int) -> dict[int, Filter]:
    """The filters after a filter file's header line, one per generation it names."""
    bufs = [bytearray(words * 8) for _ in gens]
    inflate(fh, bufs)  # zlib checks its adler32
    return {gen: Filter(words, buf) for gen, buf in zip(gens, bufs, strict=True)}


def filter_chunks(head: dict[str, Any], filters: list[Filter]) -> Iterator[bytes]:
    """A filter file: the header line, then the filters' bits compressed."""
    yield orjson.dumps(head) + b"\n"
    # Compressed: a young filter is mostly zeros, and every clean stop writes it.
    packer = zlib.compressobj(1)
    for flt in filters:
        view = memoryview(flt.buf)
        for at in range(0, len(view), CHUNK):
            yield packer.compress(view[at : at + CHUNK])
    yield packer.flush()
