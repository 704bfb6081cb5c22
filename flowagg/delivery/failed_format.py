"""The failed and abandoned batch formats as the flusher first writes them (SPEC §6).

A failed batch is the batch document plus its retry schedule; an abandoned one carries its
history instead. Both record what the sink did with the batch, so that recovery never sends
again what a sink accepted, and knows when a re-send may be a copy.
"""

from __future__ import annotations

import dataclasses

import orjson


@dataclasses.dataclass
class Delivery:
    """What the flusher knows of one batch's delivery while it retries it."""

    accepted_at: int | None = None  # when the sink accepted it: from then on, only write
    possibly_delivered: bool = False  # the last attempt was ambiguous


def failed_document(
    batch_bytes: bytes,
    *,
    error: str,
    now_ms: int,
    next_retry_ms: int | None,
    delivery: Delivery,
) -> bytes:
    """The failed-batch format; without a next retry it is the abandoned format."""
    doc = orjson.loads(batch_bytes)
    doc.update(
        {
            "retryCount": 0,
            "lastRetryAt": now_ms,
            "lastError": error,
            "failedAt": now_ms,
        }
    )
    if delivery.accepted_at is not None:
        doc["sinkAcceptedAt"] = delivery.accepted_at
    elif delivery.possibly_delivered:
        doc["possiblyDelivered"] = True
    if next_retry_ms is None:
        doc.update(
            {
                "history": [{"at": now_ms, "error": error, "kind": "permanent"}],
                "abandonedAt": now_ms,
                "abandonReason": "permanent error",
            }
        )
    else:
        doc["nextRetryAt"] = next_retry_ms
    return orjson.dumps(doc)
