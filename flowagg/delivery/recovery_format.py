"""What a recovery file (recovery/*.failed.json, recovery/abandoned/*.abandoned.json) is named
and holds: the batch id pattern, the fields a pass computes with and their checks, the batch
keys that go back to aggregated/.

Apart from the loop because validate checks these files too, without running a pass.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from flowagg.batches.storage import CorruptBatch
from flowagg.core.entries import short_repr

FAILED_SUFFIX = ".failed.json"
ABANDONED_SUFFIX = ".abandoned.json"
# storage.make_batch_id: arrival ms (13 digits) and journal seq (12 digits); ASCII only.
BATCH_ID_RE = re.compile(r"[0-9]{13}_[0-9]{12}")
# Times and counts stay within what any JSON reader holds exactly (JavaScript's safe integers).
FIELD_MAX = 2**53 - 1
INT_FIELDS = (
    "retryCount",
    "lastRetryAt",
    "failedAt",
    "nextRetryAt",
    "requeuedAt",
    "abandonedAt",
    "sinkAcceptedAt",
)
STR_FIELDS = ("lastError", "abandonReason")
BATCH_KEYS = (
    "batchId",
    "timestamp",
    "version",
    "trigger",
    "entries",
    "entryCount",
    "entriesSha256",
)


def check_batch_id(text: str) -> str:
    """A batch id from a user (CLI, socket); anything else could name a path outside the root."""
    if not BATCH_ID_RE.fullmatch(text):
        raise ValueError(
            f"{short_repr(text)} is not a batch id; use one like 1704067200000_000000000001"
            " (the file name in recovery/abandoned/ without .abandoned.json)"
        )
    return text


def check_recovery_fields(doc: dict[str, Any]) -> None:
    """The fields a pass computes with, checked once on load: a hand-edited or damaged file
    is quarantined instead of raising out of every pass. Absent fields take their defaults."""
    for key in INT_FIELDS:
        value = doc.get(key, 0)
        if type(value) is not int or not 0 <= value <= FIELD_MAX:
            raise CorruptBatch(
                f"{key} must be an integer from 0 to 2^53-1, got {short_repr(value)}"
            )
    for key in STR_FIELDS:
        if not isinstance(doc.get(key, ""), str):
            raise CorruptBatch(f"{key} must be a string, got {short_repr(doc[key])}")
    if not isinstance(doc.get("possiblyDelivered", False), bool):
        raise CorruptBatch(
            f"possiblyDelivered must be true or false, got {short_repr(doc['possiblyDelivered'])}"
        )
    history = doc.get("history", [])
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise CorruptBatch(f"history must be an array of objects, got {short_repr(history)}")


def completed_document(doc: dict[str, Any]) -> bytes:
    """The batch as it goes to aggregated/: the batch keys only, marked recovered."""
    out = {key: doc[key] for key in BATCH_KEYS if key in doc}
    out["recovered"] = True
    return orjson.dumps(out)
