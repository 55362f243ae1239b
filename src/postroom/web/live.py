"""What the overview shows live: queue counts, throughput history, workers and providers.

One `Monitor` per app samples `Store.stats()` on its own schedule (every SAMPLE_S while someone
watches, every IDLE_SAMPLE_S otherwise) and every open page reads the latest sample: ten open
dashboards cost the database what one costs.

Throughput comes from `Store.throughput(since, step_s)` when the store has it (exact, from the
timeline, across restarts); otherwise from the differences between samples of the status counts
kept in memory since this process started (sent and failed exactly; retried as the rise of the
`retrying` count, a lower bound).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from postroom.config import Settings
from postroom.domain.ports import Store

__all__ = ["RANGES", "Monitor", "Panel"]

log = logging.getLogger(__name__)

# range name -> (window seconds, bucket seconds); buckets are multiples of 10 s, the resolution
# of the store's throughput counters
RANGES: dict[str, tuple[int, int]] = {
    "15m": (15 * 60, 20),
    "1h": (3600, 60),
    "6h": (6 * 3600, 300),
    "24h": (24 * 3600, 1200),
}


@dataclass(slots=True)
class Sample:
    at: float
    sent: int
    failed: int
    retrying: int


@dataclass(slots=True)
class Panel:
    """Workers or providers, as rows of plain fields, or why they cannot be shown."""

    available: bool
    rows: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""


def _first(d: dict[str, Any], *names: str) -> Any:
    for n in names:
        if d.get(n) is not None:
            return d[n]
    return None


def _worker_row(w: Any) -> dict[str, Any]:
    """One worker, whatever the registry calls its fields."""
    d = _plain(w)
    beat = _first(d, "heartbeat_at", "last_heartbeat", "last_seen", "seen_at", "heartbeat")
    if isinstance(beat, str):
        with contextlib.suppress(ValueError):
            beat = datetime.fromisoformat(beat.replace("Z", "+00:00")).timestamp()
    state = str(_first(d, "state", "status") or "up").lower()
    return {
        "name": str(_first(d, "name", "id", "worker") or "?"),
        "heartbeat": beat if isinstance(beat, (int, float)) else None,
        "in_flight": _first(d, "in_flight", "inflight", "in_flight_count"),
        "concurrency": _first(d, "concurrency", "capacity"),
        "sent": _first(d, "sent", "sent_count"),
        "failed": _first(d, "failed", "failed_count"),
        "state": state,
        "up": state in ("up", "running", "alive", "ok", "active", "idle", "busy"),
    }


def _provider_row(p: Any) -> dict[str, Any]:
    d = _plain(p)
    state = _first(d, "breaker", "breaker_state", "state", "circuit")
    if isinstance(state, dict):
        state = _first(state, "state", "status")
    return {
        "name": str(_first(d, "name", "id") or "?"),
        "kind": _first(d, "kind", "type") or "",
        "host": _first(d, "host", "endpoint", "url", "path") or "",
        "state": str(state).lower().replace("_", "-") if state is not None else None,
        "rate": _rate(d),
        "recent": d.get("recent") if isinstance(d.get("recent"), dict) else None,
        "detail": _first(d, "last_error", "error", "detail"),
    }


def _rate(d: dict[str, Any]) -> str | None:
    limits = d.get("rate_limits")
    if isinstance(limits, list) and limits:
        return ", ".join(str(x.get("limit", x) if isinstance(x, dict) else x) for x in limits)
    v = _first(d, "rate", "rate_limit")
    return str(v) if v is not None else None


async def _maybe_await(v: Any) -> Any:
    return await v if inspect.isawaitable(v) else v


def _plain(obj: Any) -> dict[str, Any]:
    """A registry entry (dict, dataclass, pydantic model or plain object) as a dict."""
    if isinstance(obj, dict):
        return dict(obj)
    for attr in ("model_dump", "_asdict", "to_json"):
        fn = getattr(obj, attr, None)
        if callable(fn):
            out = fn()
            if isinstance(out, dict):
                return out
    if hasattr(obj, "__dataclass_fields__"):
        return {k: getattr(obj, k) for k in obj.__dataclass_fields__}
    if hasattr(obj, "__slots__"):
        return {k: getattr(obj, k) for k in obj.__slots__ if hasattr(obj, k)}
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")}


class Monitor:
    SAMPLE_S = 2.0
    IDLE_SAMPLE_S = 10.0
    KEEP_S = 24 * 3600 + 600
    MAX_SHARE_INV = 10  # wait at least 10x as long as the last stats query took

    def __init__(self, store: Store, settings: Settings, app_state: Any) -> None:
        self.store = store
        self.settings = settings
        self.app_state = app_state
        self.latest: dict[str, Any] | None = None
        self.latest_at = 0.0
        self._samples: deque[Sample] = deque(maxlen=int(self.KEEP_S / self.SAMPLE_S) + 10)
        self._watchers = 0
        self._wake = asyncio.Event()
        self._fresh = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self.closing = asyncio.Event()
        self._charts: dict[str, tuple[float, dict[str, Any]]] = {}
        self._cost_s = 0.0

    # -- lifecycle (owned by the app's lifespan) ---------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="dashboard-monitor")

    async def stop(self) -> None:
        self.closing.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.sample()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the database may be away for a moment; keep sampling
                log.warning("dashboard: sampling stats failed: %s", e)
            # A slow stats query (a count over millions of rows) is asked less often: the
            # dashboard should never take more than a tenth of the store's reading time.
            base = self.SAMPLE_S if self._watchers else self.IDLE_SAMPLE_S
            delay = max(base, self._cost_s * self.MAX_SHARE_INV)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def sample(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        stats = await self.store.stats()
        self._cost_s = time.perf_counter() - t0
        by = stats.get("by_status", {})
        now = time.time()
        self._samples.append(
            Sample(
                now, int(by.get("sent", 0)), int(by.get("failed", 0)), int(by.get("retrying", 0))
            )
        )
        self.latest, self.latest_at = stats, now
        async with self._fresh:
            self._fresh.notify_all()
        return stats

    # -- for the pages ----------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def watching(self) -> Any:
        """While a live page is open: sample often, and now."""
        self._watchers += 1
        self._wake.set()
        try:
            yield
        finally:
            self._watchers -= 1

    async def next_sample(self, timeout_s: float) -> None:
        async with self._fresh:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._fresh.wait(), timeout_s)

    async def stats(self) -> dict[str, Any]:
        if self.latest is None or time.time() - self.latest_at > self.IDLE_SAMPLE_S * 2:
            return await self.sample()
        return self.latest

    async def throughput(self, range_name: str) -> dict[str, Any]:
        """The chart's data; every open page shares one answer per range and sample interval."""
        hit = self._charts.get(range_name)
        if hit is not None and time.monotonic() - hit[0] < self.SAMPLE_S * 0.9:
            return hit[1]
        chart = await self._throughput(range_name)
        self._charts[range_name] = (time.monotonic(), chart)
        return chart

    async def _throughput(self, range_name: str) -> dict[str, Any]:
        window_s, bucket_s = RANGES.get(range_name, RANGES["15m"])
        now = time.time()
        end = (int(now // bucket_s) + 1) * bucket_s
        start = end - window_s
        n = window_s // bucket_s
        source = getattr(self.store, "throughput", None)
        if callable(source):
            try:
                rows = await _maybe_await(source(start, bucket_s))
                return self._from_store(rows, start, bucket_s, n, range_name)
            except Exception as e:
                log.warning("dashboard: Store.throughput failed, using samples: %s", e)
        sent, failed, retried = [0] * n, [0] * n, [0] * n
        prev: Sample | None = None
        for s in self._samples:
            if prev is not None and s.at >= start:
                i = min(int((s.at - start) // bucket_s), n - 1)
                sent[i] += max(0, s.sent - prev.sent)
                failed[i] += max(0, s.failed - prev.failed)
                retried[i] += max(0, s.retrying - prev.retrying)
            prev = s
        first = self._samples[0].at if self._samples else now
        return {
            "range": range_name,
            "start": start,
            "bucket_s": bucket_s,
            "now": now,
            "since": max(first, start),  # no data before this process started sampling
            "exact": False,
            "series": {"sent": sent, "failed": failed, "retried": retried},
        }

    @staticmethod
    def _from_store(
        rows: Any, start: float, bucket_s: int, n: int, range_name: str
    ) -> dict[str, Any]:
        series: dict[str, list[int]] = {"sent": [0] * n, "failed": [0] * n, "retried": [0] * n}
        for row in rows or ():
            r = _plain(row)
            at = _first(r, "t", "at", "start", "bucket")
            if not isinstance(at, (int, float)):
                continue
            i = int((at - start) // bucket_s)
            if 0 <= i < n:
                for k in series:
                    series[k][i] += int(r.get(k, 0) or 0)
        return {
            "range": range_name,
            "start": start,
            "bucket_s": bucket_s,
            "now": time.time(),
            "since": start,
            "exact": True,
            "series": series,
        }

    async def workers(self) -> Panel:
        """The worker registry, wherever it is offered: a store method or app state."""
        for fn in self._sources(
            ("list_workers", "workers"), ("workers", "worker_registry"), "list_workers"
        ):
            try:
                rows = [_worker_row(w) for w in (await _maybe_await(fn()) or [])]
            except Exception as e:
                return Panel(False, note=f"the worker registry did not answer: {e}")
            return Panel(True, rows, "" if rows else "no worker has reported in")
        return Panel(False, note="not available: this build has no worker registry yet")

    async def providers(self) -> Panel:
        """Provider state (breakers, rate limits) if offered; otherwise the configured list."""
        for fn in self._sources(
            ("provider_state", "list_providers"),
            ("routing", "routing_view", "providers", "provider_state"),
            "providers",
        ):
            try:
                rows = [_provider_row(p) for p in (await _maybe_await(fn()) or [])]
            except Exception as e:
                return Panel(False, note=f"provider state did not answer: {e}")
            return Panel(True, rows)
        router = getattr(self.app_state, "router", None)
        state = getattr(router, "state", None) or getattr(router, "snapshot", None)
        if callable(state):
            with contextlib.suppress(Exception):
                return Panel(True, [_provider_row(p) for p in await _maybe_await(state())])
        configured = self.settings.named_providers()
        rows = [
            _provider_row(
                {"name": p.name, "kind": p.kind, "host": p.host or p.path, "rate": p.rate}
            )
            for p in configured
        ] or [_provider_row({"name": "capture", "kind": "capture", "host": "the local inbox"})]
        return Panel(False, rows, "live state not available: showing the configuration")

    def _sources(
        self, store_names: tuple[str, ...], state_names: tuple[str, ...], method: str
    ) -> list[Callable[[], Awaitable[Any] | Any]]:
        """Callables that answer the panel, best first: store methods, then app state (a
        function, a list, or an object with `method`, such as the API's routing view)."""
        out: list[Callable[[], Any]] = []
        for name in store_names:
            fn = getattr(self.store, name, None)
            if callable(fn):
                out.append(fn)
        for name in state_names:
            v = getattr(self.app_state, name, None)
            if v is None:
                continue
            if callable(getattr(v, method, None)):
                out.append(getattr(v, method))
            elif callable(v):
                out.append(v)
            elif isinstance(v, (list, tuple)):
                out.append(functools.partial(list, v))
        return out
