"""Batch file compression (SPEC §11 `batchCompression`): none, gzip or zstd, told by suffix.

Only the file's bytes change: the batch JSON inside, its `entriesSha256` and what a sink
receives are the same whatever the setting, and every reader decompresses by the name's
suffix, so a root may hold all three (the setting changed between starts).
"""

from __future__ import annotations

import gzip
import zlib
from types import ModuleType

from .errors import ConfigError

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


def decompress(
    name: str, data: bytes, limit: int = MAX_INFLATED, *, needed_for: str = "reading .zst files"
) -> bytes:
    """The JSON of a batch file named `name`; ValueError when it does not inflate."""
    if name.endswith(".gz"):
        try:
            inflater = zlib.decompressobj(wbits=31)
            out = inflater.decompress(data, limit + 1)
        except zlib.error as exc:
            raise ValueError(f"not valid gzip ({exc})") from None
        if len(out) > limit:
            raise TooLarge(f"inflates past {limit} bytes")
        if not inflater.eof:
            raise ValueError("truncated gzip stream")
        return out
    if name.endswith(".zst"):
        zstandard = zstd_module(needed_for)
        try:
            if zstandard.frame_content_size(data) > limit:
                raise TooLarge(f"inflates past {limit} bytes")
            # Past the limit (a frame that does not declare its size) is an error too.
            out: bytes = zstandard.ZstdDecompressor().decompress(data, max_output_size=limit)
        except zstandard.ZstdError as exc:
            raise ValueError(f"not valid zstd, or over {limit} bytes ({exc})") from None
        return out
    return data
