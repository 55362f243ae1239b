"""The router: providers in order of preference, breakers, rate limits, domain throttles, failover.

For one message the router

1. defers it (`Deferred`: back to the queue, no attempt counted) when a recipient domain is paused
   by its throttle or over its rate limit;
2. walks the providers in order, skipping one whose breaker is open (or that asked to be paused)
   or whose rate is spent right now, and reserving a slot in the provider's and the domains' limits
   in one atomic step (a slot up to `max_wait_s` ahead is waited for here; a later one skips);
3. sends; a `ProviderFault` (connection refused, TLS, auth, timeout, 421, HTTP 5xx / 429) counts
   against that provider's breaker and moves on to the next one within the same attempt; any
   other answer (sent, a recipient-level refusal) is final: another provider would get the same
   answer from the same receiving server;
4. when nothing took the message: `Deferred` if some provider is only rate-limited or paused
   (until its next slot), else `TransientError` (the worker's retry policy decides when again).

Every provider tried or skipped and why is appended to the timeline (`trail`).
With no limit configured and all breakers closed, the cost over a bare `provider.send` is a few
attribute reads (see tests/unit/test_router.py::test_router_overhead_without_limits).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from postroom.domain.errors import Deferred, ProviderError, ProviderFault, TransientError
from postroom.domain.model import Event, Outgoing, Receipt
from postroom.domain.ports import Provider
from postroom.providers.breaker import Breaker, BreakerState
from postroom.providers.limiter import Grant, Limit
from postroom.providers.state import MemoryState, RoutingState
from postroom.providers.throttle import Throttler, read_throttles, signals_throttle

__all__ = ["DomainLimits", "FailoverRouter", "Route", "Router", "RoutingStatus"]

log = logging.getLogger(__name__)

_SNAPSHOT_KEY = "router:"
_SNAPSHOT_EVERY_S = 2.0
_SNAPSHOT_TTL_S = 30.0
_LATE_RETRIES = 5
COLD_AFTER_S = 30.0  # a provider unused this long may need a new connection for its next send
COLD_SEND_S = 0.1  # the share of a limit a cold send holds (a connection + TLS on a LAN)


@dataclass(slots=True)
class Route:
    """One provider as the router uses it: its limits (rate, min_interval) and its breaker."""

    provider: Provider
    limits: list[Limit] = field(default_factory=list)
    breaker: Breaker = field(default_factory=Breaker)
    last_slot_at: float = float("-inf")  # monotonic; when this process last took a slot for it

    @property
    def name(self) -> str:
        return self.provider.name


class DomainLimits:
    """Rate limits per recipient domain: `overrides` by domain, `default` for every other domain
    (each domain gets its own counter). A domain's subdomains are not included."""

    def __init__(
        self,
        overrides: Mapping[str, Sequence[Limit]] | None = None,
        default: Sequence[Limit] = (),
    ) -> None:
        self._overrides = {d.lower(): list(v) for d, v in (overrides or {}).items()}
        self._default = list(default)
        self._cache: dict[str, list[Limit]] = {}

    def __bool__(self) -> bool:
        return bool(self._overrides or self._default)

    def for_domain(self, domain: str) -> list[Limit]:
        hit = self._cache.get(domain)
        if hit is None:
            src = self._overrides.get(domain, self._default)
            hit = [
                Limit(f"domain:{domain}:{i}", x.interval_s, x.burst, x.label)
                for i, x in enumerate(src)
            ]
            if len(self._cache) > 50_000:
                self._cache.clear()
            self._cache[domain] = hit
        return hit

    def describe(self) -> dict[str, list[str]]:
        out = {d: [x.label for x in v] for d, v in self._overrides.items()}
        if self._default:
            out["*"] = [x.label for x in self._default]
        return out


def _domains(message: Outgoing) -> list[str]:
    seen: dict[str, None] = {}
    for r in message.rcpt_to:
        seen.setdefault(r.rpartition("@")[2].lower(), None)
    return list(seen)


def _event(
    message: Outgoing, type_: str, provider: str | None, detail: str, code: int | None = None
) -> Event:
    return Event(message.id, type_, provider=provider, code=code, detail=detail)


class Router:
    """See the module docstring. `state` shares limits, throttles and snapshots between processes."""

    def __init__(
        self,
        routes: Sequence[Route],
        *,
        state: RoutingState | None = None,
        domains: DomainLimits | None = None,
        throttler: Throttler | None = None,
        max_wait_s: float = 1.0,
        name: str | None = None,
    ) -> None:
        if not routes:
            raise ValueError("a router needs at least one provider")
        names = [r.name for r in routes]
        if len(set(names)) != len(names):
            raise ValueError(f"provider names must be unique: {names}")
        self.routes = list(routes)
        self.state = state or MemoryState()
        self.domain_limits = domains or DomainLimits()
        self.throttler = throttler
        self.max_wait_s = max_wait_s
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self._defer_tat: dict[str, float] = {}  # spreads deferred messages over future slots
        self.late_slots = 0  # slots given up because the loop woke too late for them
        self._publisher: asyncio.Task[None] | None = None  # started by the first send
        self._breaker_moved = asyncio.Event()  # publish at once when a breaker opens or closes
        self._has_domain_limits = bool(self.domain_limits)

    @property
    def providers(self) -> list[Provider]:
        return [r.provider for r in self.routes]

    # -- the hot path -------------------------------------------------------------------------

    async def send(self, message: Outgoing, trail: list[Event]) -> Receipt:
        if self._publisher is None:
            self._publisher = asyncio.get_running_loop().create_task(
                self._publish_loop(), name=f"router-{self.name}-snapshots"
            )
        throttler = self.throttler
        domain_limits: list[Limit] = []
        domains: list[str] | None = None
        if throttler is not None:
            if throttler.stale():
                await throttler.refresh()
            if throttler.active:
                domains = _domains(message)
                pause, who, domain_limits = throttler.check(domains, time.time())
                if pause:
                    until = self._spread(f"throttle:{who}", pause, 0.05)
                    raise Deferred(until, f"domain {who} is throttled (it asked to wait)")
        if self._has_domain_limits:
            domains = domains if domains is not None else _domains(message)
            for d in domains:
                domain_limits.extend(self.domain_limits.for_domain(d))

        last_fault: ProviderFault | None = None
        soonest_s: float | None = None  # the nearest slot of a provider skipped for its rate
        spread_key, spread_s = "providers", 0.01  # the limit whose slots deferred messages take
        skipped: list[str] = []
        for route in self.routes:
            breaker = route.breaker
            why = breaker.allow()
            if why is not None:
                skipped.append(f"{route.name}: {why}")
                trail.append(_event(message, "provider_skipped", route.name, why))
                if breaker.paused_until:
                    wait = breaker.retry_in_s()
                    soonest_s = wait if soonest_s is None else min(soonest_s, wait)
                continue
            limits = route.limits + domain_limits if domain_limits else route.limits
            if limits:
                opened_at = breaker.opened_at
                if getattr(route.provider, "uses_mime", True):
                    # build the MIME before the slot, so the time from slot to wire stays short
                    message.mime  # noqa: B018
                try:
                    grant = await self._take_slot(route, limits)
                except Exception as e:
                    # the shared state is away: do not send blind past a limit; try again soon
                    breaker.abandon()
                    log.warning("rate-limit state unavailable: %s", e)
                    raise Deferred(time.time() + 1.0, f"rate-limit state unavailable: {e}") from e
                if not grant.ok:
                    breaker.abandon()
                    if grant.blocking < 0:
                        raise Deferred(
                            time.time() + grant.wait_s,
                            "the worker is too busy to send on its rate-limit slots",
                        )
                    lim = limits[grant.blocking]
                    if lim.key.startswith(("domain:", "throttle:")):
                        until = self._spread(lim.key, time.time() + grant.wait_s, lim.interval_s)
                        domain = lim.key.split(":")[1]
                        raise Deferred(
                            until, f"domain {domain}: {lim.label}, next slot in {grant.wait_s:.2f}s"
                        )
                    why = f"{lim.label}: next slot in {grant.wait_s:.2f}s"
                    skipped.append(f"{route.name}: {why}")
                    trail.append(_event(message, "provider_skipped", route.name, why))
                    if soonest_s is None or grant.wait_s < soonest_s:
                        soonest_s, spread_key, spread_s = grant.wait_s, lim.key, lim.interval_s
                    continue
                domain_limits = []  # the domain slots are taken; a failover does not retake them
                if breaker.state is BreakerState.OPEN and breaker.opened_at != opened_at:
                    # it broke while this send waited for its slot
                    why = "breaker opened while waiting for a rate-limit slot"
                    skipped.append(f"{route.name}: {why}")
                    trail.append(_event(message, "provider_skipped", route.name, why))
                    continue
            try:
                receipt = await route.provider.send(message)
            except ProviderFault as e:
                e.provider = e.provider or route.name
                last_fault = e
                opened = breaker.fault(e.text, pause_s=e.retry_after_s)
                if opened:
                    self._breaker_moved.set()  # show it soon
                detail = e.text + ("; breaker opened" if opened else "")
                trail.append(_event(message, "provider_fault", route.name, detail, e.code))
                continue
            except ProviderError as e:
                breaker.release()  # it answered for the recipient: the provider itself works
                e.provider = e.provider or route.name
                if throttler is not None and isinstance(e, TransientError) and signals_throttle(e):
                    for t in await throttler.signal(domains or _domains(message), e):
                        trail.append(
                            _event(
                                message,
                                "domain_throttled",
                                route.name,
                                f"{t.domain}: one message per {t.interval_s:g}s"
                                + (f", paused for {e.retry_after_s:g}s" if e.retry_after_s else ""),
                                e.code,
                            )
                        )
                raise
            except BaseException:
                breaker.abandon()
                raise
            if breaker.success():
                self._breaker_moved.set()
                trail.append(_event(message, "breaker_closed", route.name, "probe succeeded"))
            return receipt

        if last_fault is not None:
            raise TransientError(
                f"no provider could take the message (last: {last_fault.provider}: {last_fault.text})",
                code=last_fault.code,
                retry_after_s=last_fault.retry_after_s,
                provider=last_fault.provider,
            )
        if soonest_s is not None:
            until = self._spread(spread_key, time.time() + soonest_s, spread_s)
            raise Deferred(
                until, "every provider is over its rate limit or paused: " + "; ".join(skipped)
            )
        raise TransientError("no provider available: " + "; ".join(skipped))

    async def _take_slot(self, route: Route, limits: list[Limit]) -> Grant:
        """Reserve a slot and sleep until it.

        * A send that wakes later than a quarter of the slack past its slot gives the slot up and
          takes a new one: sent that late, it could share one window of the receiver with a send
          made on time one period later.
        * The first send through a provider in a while (a cold one: the provider opens a
          connection, a TLS session) takes a wide slot, `COLD_SEND_S` of the limit to itself,
          so that it may reach the receiver that much later without crowding the next ones."""
        slack = [lim.slack_s for lim in limits if lim.slack_s > 0]
        tolerance_s = min(slack) / 4 if slack else None
        cost = 1
        now = time.monotonic()
        if now - route.last_slot_at > COLD_AFTER_S:
            cost = max(1, math.ceil(COLD_SEND_S / min(lim.interval_s for lim in limits)))
        route.last_slot_at = now
        for _ in range(_LATE_RETRIES):
            grant = await self.state.acquire(limits, self.max_wait_s, cost)
            if not grant.ok:
                return grant
            for _ in range(3):  # a timer may fire a hair early: never send before the slot
                delay = grant.at - time.time()
                if delay <= 0:
                    break
                await asyncio.sleep(delay)
            if tolerance_s is None or time.time() - grant.at <= tolerance_s:
                return grant
            self.late_slots += 1
        return Grant(False, 0.1)

    def _spread(self, key: str, at: float, interval_s: float) -> float:
        """Deferred messages held up by one limit come back one slot apart, not all at once."""
        now = time.time()
        tat = self._defer_tat.get(key, 0.0)
        until = max(at, tat if tat > now else 0.0)
        self._defer_tat[key] = until + interval_s
        if len(self._defer_tat) > 10_000:
            self._defer_tat = {k: v for k, v in self._defer_tat.items() if v > now}
        return until + random.uniform(0, interval_s / 4)

    # -- what the API shows -------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "worker": self.name,
            "at": time.time(),
            "late_slots": self.late_slots,
            "providers": {
                r.name: {"kind": r.provider.kind, **r.breaker.snapshot()} for r in self.routes
            },
        }

    async def _publish_loop(self) -> None:
        """Every `_SNAPSHOT_EVERY_S` when something changed (at once when a breaker moved), and
        now and then anyway so that the snapshot outlives its time to live while we run."""
        last: tuple[Any, ...] | None = None
        published_at = 0.0
        while True:
            with contextlib.suppress(TimeoutError):  # (asyncio.timeout never eats a cancel)
                async with asyncio.timeout(_SNAPSHOT_EVERY_S):
                    await self._breaker_moved.wait()
            self._breaker_moved.clear()
            now = time.monotonic()
            sig = tuple(
                (r.breaker.state, r.breaker.total_sent, r.breaker.total_faults) for r in self.routes
            )
            if sig != last or now - published_at > _SNAPSHOT_TTL_S / 3:
                await self.publish()
                last, published_at = sig, now

    async def publish(self) -> None:
        try:
            await self.state.put(_SNAPSHOT_KEY + self.name, self.snapshot(), _SNAPSHOT_TTL_S)
        except Exception as e:
            log.warning("could not publish the router state: %s", e)

    async def close(self) -> None:
        if self._publisher is not None:
            self._publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._publisher
        await self.publish()
        for r in self.routes:
            try:
                await r.provider.close()
            except Exception:  # closing one provider must not stop the others closing
                log.exception("closing provider %s failed", r.name)
        await self.state.close()


class FailoverRouter(Router):
    """A router over plain providers: failover and default breakers, no limits."""

    def __init__(self, providers: Sequence[Provider]) -> None:
        super().__init__([Route(p) for p in providers])


class RoutingStatus:
    """The API's view: configured providers merged with what every worker process published."""

    def __init__(
        self,
        state: RoutingState,
        *,
        providers: Sequence[tuple[str, str, list[Limit]]],
        domains: DomainLimits | None = None,
        recover_s: float = 60.0,
        floor_s: float = 0.01,
        router: Router | None = None,
    ) -> None:
        self.state = state
        self.configured = list(providers)
        self.domain_limits = domains or DomainLimits()
        self.recover_s = recover_s
        self.floor_s = floor_s
        self.router = router  # in `postroom run` the API and the worker share one process

    async def providers(self) -> list[dict[str, Any]]:
        snaps = list((await self.state.scan(_SNAPSHOT_KEY)).values())
        if self.router is not None and not self.state.shared:
            snaps = [self.router.snapshot()]
        all_limits = [lim for _, _, limits in self.configured for lim in limits]
        backlog = await self.state.backlog(all_limits) if all_limits else {}
        order = {"open": 0, "half_open": 1, "paused": 2, "closed": 3}
        out = []
        for name, kind, limits in self.configured:
            per = [
                {"worker": s["worker"], "reported_at": s["at"], **s["providers"][name]}
                for s in snaps
                if name in s.get("providers", {})
            ]
            states = [p["state"] for p in per]
            recent_sent = sum(p["recent"]["sent"] for p in per)
            window_s = per[0]["recent"]["window_s"] if per else 300.0
            out.append(
                {
                    "name": name,
                    "kind": kind,
                    "state": min(states, key=lambda s: order.get(s, 9)) if states else "closed",
                    "recent": {
                        "window_s": window_s,
                        "sent": recent_sent,
                        "faults": sum(p["recent"]["faults"] for p in per),
                    },
                    "rate_limits": [
                        {
                            "limit": lim.label,
                            "interval_s": round(lim.interval_s, 6),
                            "reserved_ahead_s": round(backlog.get(lim.key, 0.0), 3),
                            "recent_use": round(
                                min(1.0, recent_sent * lim.interval_s / (window_s * lim.burst)), 6
                            ),
                        }
                        for lim in limits
                    ],
                    "workers": per,
                }
            )
        return out

    async def domains(self) -> list[dict[str, Any]]:
        throttles = await read_throttles(self.state, recover_s=self.recover_s, floor_s=self.floor_s)
        limits = self.domain_limits.describe()
        seen = {t["domain"] for t in throttles}
        for t in throttles:
            t["limits"] = limits.get(t["domain"], limits.get("*", []))
        configured = [
            {"domain": d, "state": "normal", "limits": v}
            for d, v in limits.items()
            if d not in seen
        ]
        return throttles + configured

    async def close(self) -> None:
        if self.router is None or self.router.state is not self.state:
            await self.state.close()
