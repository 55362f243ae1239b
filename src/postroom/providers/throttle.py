"""Adaptive throttling per recipient domain: slow down on 421/450/451, honour named delays, recover.

A domain that answers "try again later" gets a throttle: a minimum gap between two messages to it
(`interval_s`, doubled on every new signal, from `initial_interval_s` up to `max_interval_s`) and,
when the reply names a delay ("try again in 5 minutes") or carries a Retry-After, a pause until
then during which its queued messages are deferred (no attempt counted). Without new signals the
gap halves every `recover_s` after the pause, and once it is below `floor_s` the throttle is gone.
The state is shared through the routing state, so every worker slows the same domain down; each
worker reads it at most every `refresh_s`, so the hot path only looks at a local dict.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from postroom.domain.errors import ProviderFault, TransientError
from postroom.providers.limiter import Limit
from postroom.providers.state import RoutingState

__all__ = ["DomainThrottle", "Throttler", "signals_throttle"]

log = logging.getLogger(__name__)

_KEY = "throttle:"
THROTTLE_CODES = frozenset({421, 450, 451})


def signals_throttle(e: TransientError) -> bool:
    """A recipient-level "slow down / try later": 421, 450, 451, or any 4xx naming a delay."""
    if isinstance(e, ProviderFault):
        return False  # the provider's own trouble: its breaker deals with it
    text = e.text.lower()
    if "greylist" in text or "graylist" in text:
        return False  # greylisting holds one sender/recipient pair, not the whole domain
    return e.code in THROTTLE_CODES or (e.retry_after_s is not None and (e.code or 0) < 500)


@dataclass(slots=True)
class DomainThrottle:
    domain: str
    interval_s: float  # the gap set at the last signal
    since: float  # epoch of the last signal
    paused_until: float = 0.0  # epoch; 0 = no pause
    signals: int = 1
    last_code: int | None = None
    last_text: str = ""

    def gap_s(self, now: float, recover_s: float, floor_s: float) -> float:
        """The gap in force now (0 once recovered): halved for every `recover_s` past the pause."""
        start = max(self.since, self.paused_until)
        if now <= start:
            return self.interval_s
        gap = self.interval_s / 2 ** math.floor((now - start) / recover_s)
        return gap if gap >= floor_s else 0.0

    def ends_at(self, recover_s: float, floor_s: float) -> float:
        """When the throttle is fully recovered (no pause, gap below the floor)."""
        halvings = max(0, math.ceil(math.log2(max(self.interval_s, floor_s) / floor_s)) + 1)
        return max(self.since, self.paused_until) + halvings * recover_s

    def view(self, now: float, recover_s: float, floor_s: float) -> dict[str, Any]:
        gap = self.gap_s(now, recover_s, floor_s)
        paused = self.paused_until > now
        return {
            "domain": self.domain,
            "state": "paused" if paused else "slowed" if gap else "recovered",
            "paused_until": self.paused_until if paused else None,
            "min_interval_s": round(gap, 4),
            "rate_per_s": round(1 / gap, 3) if gap else None,
            "signals": self.signals,
            "last_signal_at": self.since,
            "last_code": self.last_code,
            "last_text": self.last_text,
            "recovers_at": self.ends_at(recover_s, floor_s),
        }


class Throttler:
    def __init__(
        self,
        state: RoutingState,
        *,
        initial_interval_s: float = 1.0,
        max_interval_s: float = 60.0,
        recover_s: float = 60.0,
        floor_s: float = 0.01,
        max_pause_s: float = 3600.0,
        refresh_s: float = 1.0,
    ) -> None:
        self.state = state
        self.initial_interval_s = initial_interval_s
        self.max_interval_s = max_interval_s
        self.recover_s = recover_s
        self.floor_s = floor_s
        self.max_pause_s = max_pause_s
        self.refresh_s = refresh_s
        self._local: dict[str, DomainThrottle] = {}
        self._refreshed_at = 0.0
        self._refreshing: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        return bool(self._local)

    def stale(self) -> bool:
        return time.monotonic() - self._refreshed_at >= self.refresh_s

    async def refresh(self, *, force: bool = False) -> None:
        """Read the shared throttles, at most every `refresh_s` (one round trip for all domains)."""
        now = time.monotonic()
        if not force and now - self._refreshed_at < self.refresh_s:
            return
        if self._refreshing is not None and not self._refreshing.done():
            if not force:
                return  # someone else is refreshing; use what we have
            await self._refreshing
            return
        self._refreshed_at = now
        self._refreshing = asyncio.create_task(self._load())
        await self._refreshing

    async def _load(self) -> None:
        try:
            rows = await self.state.scan(_KEY)
        except Exception as e:  # the shared state is away: keep the local view
            log.warning("could not read domain throttles: %s", e)
            return
        wall = time.time()
        fresh = {}
        for row in rows.values():
            with contextlib.suppress(TypeError, KeyError):
                t = DomainThrottle(**row)
                if t.ends_at(self.recover_s, self.floor_s) > wall:
                    fresh[t.domain] = t
        self._local = fresh

    def check(self, domains: Iterable[str], now: float) -> tuple[float, str, list[Limit]]:
        """(latest pause end or 0, the domain that causes it, gap limits for slowed domains)."""
        pause, who, limits = 0.0, "", []
        for d in domains:
            t = self._local.get(d)
            if t is None:
                continue
            if t.paused_until > now and t.paused_until > pause:
                pause, who = t.paused_until, d
            gap = t.gap_s(now, self.recover_s, self.floor_s)
            if gap:
                limits.append(Limit(f"throttle:{d}", gap, 1, f"throttled to one per {gap:g}s"))
            elif t.paused_until <= now and t.ends_at(self.recover_s, self.floor_s) <= now:
                del self._local[d]
        return pause, who, limits

    async def signal(self, domains: Iterable[str], e: TransientError) -> list[DomainThrottle]:
        """A domain said "slow down": tighten its throttle here and in the shared state."""
        now = time.time()
        out = []
        for d in domains:
            t = self._local.get(d)
            gap = t.gap_s(now, self.recover_s, self.floor_s) if t else 0.0
            if t is not None and now - t.since < t.interval_s:
                # refusals of sends already in flight: one tightening per interval, not one each
                interval = t.interval_s
            else:
                interval = min(self.max_interval_s, max(self.initial_interval_s, gap * 2))
            pause = now + min(e.retry_after_s, self.max_pause_s) if e.retry_after_s else 0.0
            t = DomainThrottle(
                d,
                interval,
                now,
                max(pause, t.paused_until if t else 0.0),
                (t.signals + 1) if t else 1,
                e.code,
                e.text[:200],
            )
            self._local[d] = t
            out.append(t)
            ttl = t.ends_at(self.recover_s, self.floor_s) - now + 5
            try:
                await self.state.put(_KEY + d, asdict(t), ttl)
            except Exception as err:  # still throttled locally
                log.warning("could not share the throttle of %s: %s", d, err)
        return out

    def view(self) -> list[dict[str, Any]]:
        now = time.time()
        return [t.view(now, self.recover_s, self.floor_s) for t in self._local.values()]


async def read_throttles(
    state: RoutingState, *, recover_s: float, floor_s: float
) -> list[dict[str, Any]]:
    """Every live domain throttle, for the API (from any process)."""
    now = time.time()
    out = []
    for row in (await state.scan(_KEY)).values():
        with contextlib.suppress(TypeError, KeyError):
            out.append(DomainThrottle(**row).view(now, recover_s, floor_s))
    return sorted(out, key=lambda v: v["domain"])
