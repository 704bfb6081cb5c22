"""What one recovery pass did, batch by batch, as `recover` and the scheduler report it.

Apart because reading, reconciling and retrying each add to it.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class RecoveryReport:
    recovered: list[str] = dataclasses.field(default_factory=list)
    retried_failed: list[str] = dataclasses.field(default_factory=list)
    abandoned: list[str] = dataclasses.field(default_factory=list)
    quarantined: list[str] = dataclasses.field(default_factory=list)
    waiting: int = 0
    reconciled: list[str] = dataclasses.field(default_factory=list)
    refused: list[str] = dataclasses.field(default_factory=list)
    circuit_open: bool = False
    breaker_retry_in_s: float | None = None
    stopped: bool = False
    # The environment-wide failure that stopped this pass (pause.py), without a retry charged.
    paused: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "recovered": self.recovered,
            "failedAgain": self.retried_failed,
            "abandoned": self.abandoned,
            "quarantined": self.quarantined,
            "waiting": self.waiting,
            "reconciled": self.reconciled,
            "refused": self.refused,
            "circuitOpen": self.circuit_open,
            "breakerRetryInS": (
                None if self.breaker_retry_in_s is None else round(self.breaker_retry_in_s, 1)
            ),
            "stopped": self.stopped,
            "paused": self.paused,
        }
