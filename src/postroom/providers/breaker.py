"""Circuit breaker per provider: closed -> open after N consecutive faults -> half-open probe."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from enum import StrEnum
from typing import Any

__all__ = ["Breaker", "BreakerState"]


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Breaker:
    """Per process, in memory: deciding costs a few attribute reads on the hot path.

    * closed: every send goes; `faults` consecutive provider faults open it.
    * open: nothing goes until `cooldown_s` has passed; then the first caller becomes the single
      probe (half-open) and everyone else still skips the provider.
    * half-open: the probe's success closes the breaker; its fault opens it for another cool-down.
      A probe that never reports (cancelled) frees the slot after `cooldown_s`.

    A provider may also be *paused* (it answered 429 with Retry-After): skipped until then without
    counting as broken. Recent successes and faults are counted over `window_s` for the API.
    """

    __slots__ = (
        "_clock",
        "_probe_at",
        "_samples",
        "consecutive",
        "cooldown_s",
        "faults",
        "last_error",
        "opened_at",
        "paused_until",
        "state",
        "total_faults",
        "total_sent",
        "window_s",
    )

    def __init__(
        self,
        *,
        faults: int = 5,
        cooldown_s: float = 30.0,
        window_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.faults = max(1, faults)
        self.cooldown_s = cooldown_s
        self.window_s = window_s
        self._clock = clock
        self.state = BreakerState.CLOSED
        self.consecutive = 0
        self.opened_at = 0.0
        self._probe_at: float | None = None
        self.paused_until = 0.0
        self.last_error: str | None = None
        self.total_sent = 0
        self.total_faults = 0
        # (when, total_sent, total_faults) samples, to count what happened within window_s
        self._samples: deque[tuple[float, int, int]] = deque([(self._clock(), 0, 0)])

    def allow(self) -> str | None:
        """None when a send may go now (and, when half-open, this caller is the probe); else why not."""
        if self.state is BreakerState.CLOSED and not self.paused_until:
            return None
        now = self._clock()
        if self.paused_until:
            if now < self.paused_until:
                return (
                    f"paused for {self.paused_until - now:.1f}s more (the provider asked to wait)"
                )
            self.paused_until = 0.0
        if self.state is BreakerState.CLOSED:
            return None
        if self.state is BreakerState.OPEN:
            if now - self.opened_at < self.cooldown_s:
                left = self.cooldown_s - (now - self.opened_at)
                return f"breaker open ({self.consecutive} consecutive faults), probe in {left:.1f}s"
            self.state = BreakerState.HALF_OPEN
            self._probe_at = now
            return None
        # half-open: one probe at a time
        if self._probe_at is not None and now - self._probe_at < self.cooldown_s:
            return "breaker half-open, a probe is in flight"
        self._probe_at = now
        return None

    def retry_in_s(self) -> float:
        """How long until this provider may be tried again (0 if it may be now)."""
        now = self._clock()
        waits = [self.paused_until - now]
        if self.state is BreakerState.OPEN:
            waits.append(self.opened_at + self.cooldown_s - now)
        elif self.state is BreakerState.HALF_OPEN and self._probe_at is not None:
            waits.append(self._probe_at + self.cooldown_s - now)
        return max(0.0, *waits)

    def success(self) -> bool:
        """Record a send the provider took. True if this closed the breaker."""
        self.total_sent += 1
        self.consecutive = 0
        if self.state is BreakerState.CLOSED:
            return False
        self.state = BreakerState.CLOSED
        self._probe_at = None
        return True

    def fault(self, error: str, *, pause_s: float | None = None) -> bool:
        """Record a provider fault. True if this opened the breaker. `pause_s` (a Retry-After)
        pauses the provider instead: it is busy, not broken."""
        self.total_faults += 1
        self.last_error = error
        if pause_s:
            self.paused_until = max(self.paused_until, self._clock() + pause_s)
            if self.state is BreakerState.HALF_OPEN:
                self._probe_at = None
            return False
        self.consecutive += 1
        if self.state is BreakerState.HALF_OPEN or (
            self.state is BreakerState.CLOSED and self.consecutive >= self.faults
        ):
            self.state = BreakerState.OPEN
            self.opened_at = self._clock()
            self._probe_at = None
            return True
        return False

    def release(self) -> None:
        """The probe ended without a verdict (e.g. a recipient-level refusal): the provider worked."""
        if self.state is BreakerState.HALF_OPEN:
            self.success()
            self.total_sent -= 1

    def _recent(self, now: float) -> tuple[int, int]:
        """Sends and faults over the last `window_s`, from samples of the totals (taken at each
        snapshot, so that the hot path only increments two counters)."""
        samples = self._samples
        samples.append((now, self.total_sent, self.total_faults))
        edge = now - self.window_s
        while len(samples) > 1 and samples[1][0] <= edge:
            samples.popleft()
        if len(samples) > 10_000:
            samples.popleft()
        _, sent, faults = samples[0]
        return self.total_sent - sent, self.total_faults - faults

    def snapshot(self) -> dict[str, Any]:
        now = self._clock()
        ok, bad = self._recent(now)
        return {
            "state": "paused"
            if self.paused_until > now and self.state is BreakerState.CLOSED
            else self.state.value,
            "consecutive_faults": self.consecutive,
            "recent": {"window_s": self.window_s, "sent": ok, "faults": bad},
            "total": {"sent": self.total_sent, "faults": self.total_faults},
            "retry_in_s": round(self.retry_in_s(), 3),
            "last_error": self.last_error,
        }

    def abandon(self) -> None:
        """The caller passed `allow` but will not send (its rate was spent): free the probe."""
        if self.state is BreakerState.HALF_OPEN:
            self._probe_at = None
