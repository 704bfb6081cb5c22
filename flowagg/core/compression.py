"""Batch file compression (SPEC §11 `batchCompression`): none, gzip or zstd, told by suffix.

Only the file's bytes change: the batch JSON inside, its `entriesSha256` and what a sink
receives are the same whatever the setting, and every reader decompresses by the name's
suffix, so a root may hold all three (the setting changed between starts).
"""

from __future__ import annotations

import gzip
import zlib
from types import ModuleType

from flowagg.core.errors import ConfigError

COMPRESSIONS = ("none", "gzip", "zstd")
SUFFIXES = {"none": ".json", "gzip": ".json.gz", "zstd": ".json.zst"}
# A batch holds at most maxBatchBytes of entries (1 GiB at most) unless one entry alone is
# bigger; anything that inflates past this is not a batch flowagg wrote.
MAX_INFLATED = 2 << 30
GZIP_LEVEL = 6
ZSTD_LEVEL = 3


class TooLarge(ValueError):
    pass


def zstd_module(needed_for: str = "batchCompression = zstd") -> ModuleType:
    try:
        import zstandard
    except ImportError:
        raise ConfigError(
            f"{needed_for} needs the zstandard package: pip install 'flowagg[zstd]'"
            + (" (or choose gzip, which needs nothing)" if needed_for.startswith("batch") else "")
        ) from None
    return zstandard


def compress(kind: str, data: bytes) -> bytes:
    if kind == "gzip":
        return gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0)
    if kind == "zstd":
        compressed: bytes = zstd_module().ZstdCompressor(level=ZSTD_LEVEL).compress(data)
        return compressed
    return data


def stored_limit(name: str, inflated_limit: int) -> int:
    """The most bytes a file named `name` may hold on disk when it inflates to at most
    `inflated_limit`: compressing incompressible data adds a few bytes per block."""
    if name.endswith((".gz", ".zst")):
        return inflated_limit + inflated_limit // 256 + 1024
    return inflated_limit


def decompress(
    name: str, data: bytes, limit: int = MAX_INFLATED, *, needed_for: str = "reading .zst files"
) -> bytes:
    """The JSON of a batch file named `name`; ValueError when it does not inflate to one
    stream of at most `limit` bytes (flowagg writes one gzip member or zstd frame, nothing
    after it)."""
    if name.endswith(".gz"):
        return _gunzip(data, limit)
    if name.endswith(".zst"):
        return _unzstd(data, limit, zstd_module(needed_for))
    return data


def _gunzip(data: bytes, limit: int) -> bytes:
    try:
        inflater = zlib.decompressobj(wbits=31)
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise ValueError(f"not valid gzip ({exc})") from None
    if len(out) > limit:
        raise TooLarge(f"inflates past {limit:,} bytes")
    if not inflater.eof:
        raise ValueError("truncated gzip stream")
    if inflater.unused_data:
        raise ValueError(
            f"{len(inflater.unused_data):,} bytes after the gzip stream (a second member"
            " or trailing data)"
        )
    return out


def _unzstd(data: bytes, limit: int, zstandard: ModuleType) -> bytes:
    try:
        declared = zstandard.frame_content_size(data)
        if declared > limit:
            raise TooLarge(f"inflates past {limit:,} bytes")
        # A frame that does not declare its size is cut off at the limit, never allocated.
        out: bytes = zstandard.ZstdDecompressor().decompress(
            data, max_output_size=limit, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        if _inflates_past(data, limit, zstandard):
            raise TooLarge(f"inflates past {limit:,} bytes") from None
        raise ValueError(f"not valid zstd, or more than one frame ({exc})") from None
    return out


def _inflates_past(data: bytes, limit: int, zstandard: ModuleType) -> bool:
    """Whether the first frame inflates past `limit`, reading at most limit + 1 bytes of it."""
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=False)
        return len(reader.read(limit + 1)) > limit
    except zstandard.ZstdError:
        return False
