"""What a request line costs before it is parsed (SPEC §4.1): its shape, in linear time.

A parse costs memory per value, so a line that would cost far more than its bytes is measured
first and refused unparsed.
"""

from __future__ import annotations

import re

# Lines from this size on are measured before they are parsed: a parse costs ~14 bytes of
# memory per byte of tiny values (`[0,0,...]`), so 16 MiB of them would cost ~230 MB.
PRECHECK_BYTES = 1 << 20
# Past this many arrays and objects per allowed entry a request is refused unparsed: each
# container costs a Python object, and a line of `[],[],...` would cost ~40 bytes per byte.
CONTAINERS_PER_ENTRY = 16
MAX_DEPTH = 1024  # orjson refuses deeper documents anyway
_STRING = re.compile(rb'"[^"]*"')
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b"[]{},")
_STRUCTURE = re.compile(rb"[\[\]{}]|,+")


def request_shape(line: bytes) -> bytes:
    """The structure of a JSON line (brackets, braces, commas), strings removed, in linear time.

    Escapes go first (an escaped backslash, then an escaped quote), so every quote left opens or
    closes a string and `"[^"]*"` never backtracks: a line full of `\\"` stays linear.
    """
    unescaped = line.replace(b"\\\\", b"").replace(b'\\"', b"")
    return _STRING.sub(b"", unescaped).translate(None, _NOT_STRUCTURE)


def largest_top_array(shape: bytes) -> int:
    """Elements of the largest array directly inside the request object (see request_shape).

    A run of commas is one match, so a million scalars cost one step.
    """
    depth = commas = largest = 0
    in_array = False
    for match in _STRUCTURE.finditer(shape):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > MAX_DEPTH:
                break
            if depth == 2:
                in_array, commas = token == b"[", 0
        elif token in (b"]", b"}"):
            depth -= 1
        elif depth == 2 and in_array:
            commas += len(token)
            largest = max(largest, commas + 1)
    return largest
