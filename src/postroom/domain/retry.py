"""Retry policy: exponential backoff with jitter, bounded by a message lifetime (Postfix-like defaults)."""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["RetryPolicy"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    first_delay_s: float = 300.0  # Postfix minimal_backoff_time
    max_delay_s: float = 3600.0  # about an hour between late attempts
    factor: float = 2.0
    jitter: float = 0.2  # +-20 %
    lifetime_s: float = 2 * 86400.0  # give up after two days in the queue

    def delay_s(self, attempts: int, rng: random.Random | None = None) -> float:
        """Delay before the next attempt, after `attempts` attempts have failed (1 = the first)."""
        base = min(self.max_delay_s, self.first_delay_s * self.factor ** max(0, attempts - 1))
        r = (rng or random).uniform(-self.jitter, self.jitter)
        return max(0.0, base * (1.0 + r))

    def next_attempt_at(
        self, *, now: float, created_at: float, attempts: int, retry_after_s: float | None = None
    ) -> float | None:
        """When to try again, or None when the lifetime is spent (the message fails)."""
        delay = self.delay_s(attempts)
        if retry_after_s is not None:
            delay = max(delay, retry_after_s)
        at = now + delay
        if at > created_at + self.lifetime_s:
            return None
        return at
