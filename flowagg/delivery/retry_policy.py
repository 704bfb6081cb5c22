"""When a failed batch is tried again (SPEC §6): `nextRetryAt = now + U(0, min(retryMaxDelayMs,
retryBaseMs * 2^retryCount))` (full jitter), and how many failed retries a batch gets.

Apart from the loop because the daemon builds and reloads it from the config, and the
loop's pause backs off with the same cap.
"""

from __future__ import annotations

import dataclasses
import random

from flowagg.core.config import Config


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    base_ms: int
    max_delay_ms: int
    limit: int

    @classmethod
    def from_config(cls, config: Config) -> RetryPolicy:
        return cls(
            base_ms=config.retry_base_ms,
            max_delay_ms=config.retry_max_delay_ms,
            limit=config.batch_retry_limit,
        )

    def delay_cap_ms(self, retry_count: int) -> int:
        return min(self.max_delay_ms, self.base_ms * 2 ** min(retry_count, 62))

    def next_retry_at(self, now_ms: int, retry_count: int, rng: random.Random) -> int:
        return now_ms + rng.randint(0, self.delay_cap_ms(retry_count))
