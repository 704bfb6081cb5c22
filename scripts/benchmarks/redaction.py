"""Durable `add` throughput with redaction on (10 keys, 3 patterns) beside redaction off.

The same entries, the same 8 clients; only the daemon's redaction settings differ, so the
ratio is redaction's cost on the ack path. The entries hold no secret: this is the common case,
every metadata key looked up and every string value scanned, nothing replaced.
"""

from __future__ import annotations

import orjson

from flowagg.redact import DEFAULT_KEYS

from .common import Bench
from .throughput import flowagg_throughput

KEYS = (*DEFAULT_KEYS, "privateKey")  # the 9 defaults and one more: 10 keys
PATTERNS = (
    r"[\w.+-]+@[\w-]+\.[\w.]+",  # e-mail address
    r"\b(?:\d[ -]?){13,16}\b",  # card number
    r"(?i)bearer\s+[\w.~+/-]+=*",  # bearer token
)
VARIANTS = {
    "off": {"redactKeys": "[]", "redactPatterns": "[]"},
    "on": {
        "redactKeys": orjson.dumps(list(KEYS)).decode(),
        "redactPatterns": orjson.dumps(list(PATTERNS)).decode(),
    },
}


def redaction(b: Bench) -> None:
    for name, settings in VARIANTS.items():
        flowagg_throughput(
            b,
            8,
            b.sizes.tp8_requests,
            f"redact_{name}",
            idle=False,
            settings=b.settings(**settings),
        )
    on, off = b.samples["redact_on.flowagg"][-1], b.samples["redact_off.flowagg"][-1]
    b.record("redact.overhead_pct", 100.0 * (off - on) / off)
