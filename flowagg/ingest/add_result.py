"""The answer to an `add`: what was accepted, what was a duplicate, what was refused and why."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class AddResult:
    accepted: int = 0
    duplicates: int = 0
    rejected: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    rejected_count: int = 0
    error: str | None = None
    retry_after_ms: int | None = None

    def reply(self) -> dict[str, Any]:
        if self.error is not None:
            out: dict[str, Any] = {"ok": False, "error": self.error}
            if self.retry_after_ms is not None:
                out["retryAfterMs"] = self.retry_after_ms
            if self.rejected:
                out["rejected"] = self.rejected
                out["rejectedCount"] = self.rejected_count
            return out
        out = {
            "ok": True,
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
        }
        if self.rejected_count:
            out["rejectedCount"] = self.rejected_count
        return out
