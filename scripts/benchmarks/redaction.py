"""Durable `add` throughput with redaction on (10 keys, 3 patterns) beside redaction off.

The same entries, the same 8 clients; only the daemon's redaction settings differ, so the
ratio is redaction's cost on the ack path. The entries hold no secret: this is the common case,
every metadata key looked up and every string value scanned, nothing replaced.

Beside it, in process: the README's e-mail pattern on a 60 KB value without `@` (RE2 as the
daemon runs it, and Python's backtracking `re` once, for comparison), and the cost of the key
check per entry.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable

import orjson

from flowagg.core.redact import DEFAULT_KEYS, Redactor
from flowagg.core.redact_patterns import PatternSet

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
    scans(b)


ADVERSARIAL = "a" * 60_000  # word characters and no @: every start position fails late
METADATA = {"taskId": "T-1042", "project": "flowagg", "duration": 1200, "note": "review"}


def _median_s(func: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        func()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def scans(b: Bench) -> None:
    email = PatternSet([PATTERNS[0]])
    b.record("redact.email_60kb_re2_ms", 1000 * _median_s(lambda: email.subn(ADVERSARIAL), 21))
    megabyte = ADVERSARIAL * 17
    b.record("redact.email_1mb_re2_ms", 1000 * _median_s(lambda: email.subn(megabyte), 5))
    if "redact.email_60kb_re_s" not in b.samples:  # seconds a run: once is enough
        backtracking = re.compile(PATTERNS[0])
        b.record("redact.email_60kb_re_s", _median_s(lambda: backtracking.subn("", ADVERSARIAL), 1))
    redactor = Redactor(KEYS)
    batch = [dict(METADATA) for _ in range(100_000)]
    seconds = _median_s(lambda: [redactor.metadata(m) for m in batch], 3)
    b.record("redact.keys_us_per_entry", 1e6 * seconds / len(batch))
