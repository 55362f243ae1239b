"""Postroom over HTTP: end to end (single POSTs while workers deliver) and batch ingest.

end-to-end-*: ``postroom run`` (SQLite: API and worker in one process) or
``postroom serve`` + ``postroom worker`` (PostgreSQL). The load generator POSTs
N single messages to ``/v1/messages`` over C keep-alive connections (closed
loop); every run tries each C in ``CONCURRENCIES`` on a fresh database and
keeps the one with the better delivered/s (recorded as ``best_concurrency``;
each figure is kept as ``c<C>_delivered_per_s``). A thread samples the
sink's count every second; with the accept times of the load generator this
gives the backlog (accepted - delivered) over time.

batch-ingest-*: ``postroom serve`` alone, ``POST /v1/messages/batch`` with
1,000 messages per request over a few connections: messages accepted/s.
"""

from __future__ import annotations

import bisect
import json
import time
from typing import Any

from bench.load import post_all
from bench.procs import Proc
from bench.registry import Context, scenario
from bench.scenarios.postroom_common import (
    Sampler,
    create_key,
    fresh_database,
    get_json,
    peak_rss_mb,
    provider_env,
    record_info,
    start_http,
    start_postroom,
)

CONCURRENCIES = (32, 64)
BATCH = 1000
BATCH_CONCURRENCY = 4


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (0 with fewer than 3 points)."""
    if len(points) < 3:
        return 0.0
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if sxx == 0:
        return 0.0
    return sum((p[0] - mx) * (p[1] - my) for p in points) / sxx


def end_to_end_once(
    ctx: Context, kind: str, concurrency: int, *, tag: str = ""
) -> dict[str, float]:
    """One end-to-end pass on a fresh database at one concurrency."""
    sink = ctx.sink()
    bodies = ctx.message_list()
    with fresh_database(kind, ctx.work_dir, tag=f"-c{concurrency}{tag}") as db:
        key = create_key(db)
        env = provider_env(sink)
        procs: dict[str, Proc] = {}
        if kind == "sqlite":
            procs["api"], base = start_http(ctx, f"run-c{concurrency}", db, "run", env=env)
        else:
            procs["api"], base = start_http(ctx, f"serve-c{concurrency}", db, "serve", env=env)
            procs["worker"] = start_postroom(ctx, f"worker-c{concurrency}", db, "worker", env=env)
            time.sleep(1.0)  # let the worker finish importing; it then waits on LISTEN
        sampler = Sampler(sink, interval_s=1.0)
        sampler.start()
        try:
            load = post_all(
                f"{base}/v1/messages",
                bodies,
                concurrency=concurrency,
                timeout_s=ctx.remaining_s(),
                headers={"Authorization": f"Bearer {key}"},
            )
            t_last_post = time.monotonic()
            backlog_at_last = load.accepted - sink.count()
            if load.failed:
                raise RuntimeError(f"{load.failed} POSTs failed: {load.errors[:3]}")
            try:
                t_done = sink.wait_for(ctx.messages, timeout_s=ctx.remaining_s(), stall_s=60)
            except (TimeoutError, RuntimeError) as e:
                tails = {n: p.log_tail(800) for n, p in procs.items()}
                raise RuntimeError(f"{e}; logs: {tails}") from None
        finally:
            sampler.stop()
        cpu = {n: p.cpu_s() for n, p in procs.items()}
        rss = {n: peak_rss_mb(p.pid) for n, p in procs.items()}
        for p in procs.values():
            ctx.procs.stop(p, grace_s=10)
    # backlog over time while POSTs were being answered: accepted(t) - delivered(t)
    accept_times = sorted(load.accept_times)
    series = [
        (t - load.started, float(bisect.bisect_right(accept_times, t) - c))
        for t, c in sampler.samples
        if load.started <= t <= t_last_post
    ]
    backlog_max = max((b for _, b in series), default=float(backlog_at_last))
    out = {
        "delivered_per_s": ctx.messages / (t_done - load.started),
        "accepted_per_s": load.accepted_per_s,
        "accept_p50_ms": load.latency_ms(0.50),
        "accept_p99_ms": load.latency_ms(0.99),
        "backlog_at_last_accept": float(backlog_at_last),
        "backlog_max_while_posting": backlog_max,
        # > 0: the backlog grew while POSTs were answered (messages per second of growth)
        "backlog_growth_per_s": _slope(series),
        "drain_after_last_accept_s": t_done - t_last_post,
        "best_concurrency": float(concurrency),
    }
    if kind == "sqlite":
        out["run_cpu_ms_per_msg"] = 1000 * cpu["api"] / ctx.messages
        out["run_peak_rss_mb"] = rss["api"]
    else:
        out["api_cpu_ms_per_msg"] = 1000 * cpu["api"] / ctx.messages
        out["worker_cpu_ms_per_msg"] = 1000 * cpu["worker"] / ctx.messages
        out["api_peak_rss_mb"] = rss["api"]
        out["worker_peak_rss_mb"] = rss["worker"]
    return out


def _end_to_end(ctx: Context, kind: str) -> dict[str, float]:
    record_info(ctx, kind)
    ctx.info["load"] = (
        f"single POSTs over {' and '.join(map(str, CONCURRENCIES))} keep-alive connections "
        "(closed loop, each on a fresh database per run); the better delivered/s is reported"
    )
    ctx.info["processes"] = (
        "postroom run" if kind == "sqlite" else "postroom serve + postroom worker"
    )
    results = {}
    for c in CONCURRENCIES:
        r = end_to_end_once(ctx, kind, c)
        ctx.log(
            f"concurrency {c}: delivered {r['delivered_per_s']:,.0f}/s, accepted "
            f"{r['accepted_per_s']:,.0f}/s, backlog growth {r['backlog_growth_per_s']:,.0f}/s"
        )
        results[c] = r
    best = max(results, key=lambda c: results[c]["delivered_per_s"])
    out = dict(results[best])
    for c, r in results.items():
        out[f"c{c}_delivered_per_s"] = r["delivered_per_s"]
        out[f"c{c}_accepted_per_s"] = r["accepted_per_s"]
    return out


@scenario(
    "end-to-end-sqlite",
    primary="delivered_per_s",
    messages=30_000,
    quick_messages=1_000,
    timeout_s=900,
    description="`postroom run` (SQLite): single POSTs as fast as the API takes them while the "
    "worker delivers; first POST until the sink has all N",
)
def end_to_end_sqlite(ctx: Context) -> dict[str, float]:
    return _end_to_end(ctx, "sqlite")


@scenario(
    "end-to-end-postgres",
    primary="delivered_per_s",
    messages=30_000,
    quick_messages=1_000,
    timeout_s=900,
    services=("postgres",),
    description="`postroom serve` + `postroom worker` (PostgreSQL): single POSTs while the "
    "worker delivers; first POST until the sink has all N",
)
def end_to_end_postgres(ctx: Context) -> dict[str, float]:
    return _end_to_end(ctx, "postgres")


def _batch_ingest(ctx: Context, kind: str) -> dict[str, float]:
    record_info(ctx, kind)
    ctx.info["load"] = (
        f"{BATCH:,} messages per request over {BATCH_CONCURRENCY} connections, no worker"
    )
    msgs = ctx.message_list()
    bodies: list[Any] = [
        json.dumps({"messages": msgs[i : i + BATCH]}).encode() for i in range(0, len(msgs), BATCH)
    ]
    with fresh_database(kind, ctx.work_dir) as db:
        key = create_key(db)
        api, base = start_http(ctx, "serve", db, "serve")
        load = post_all(
            f"{base}/v1/messages/batch",
            bodies,
            concurrency=BATCH_CONCURRENCY,
            timeout_s=ctx.remaining_s(),
            headers={"Authorization": f"Bearer {key}"},
        )
        if load.failed:
            raise RuntimeError(f"{load.failed} batch POSTs failed: {load.errors[:3]}")
        cpu = api.cpu_s()
        rss = peak_rss_mb(api.pid)
        stats = get_json(f"{base}/v1/stats", key)
        ctx.procs.stop(api, grace_s=10)
    stored = _queued(stats)
    if stored is not None and stored != len(msgs):
        raise RuntimeError(f"{len(msgs)} POSTed, the store has {stored} queued: {stats}")
    return {
        "accepted_per_s": len(msgs) / (load.finished - load.started),
        "request_p50_ms": load.latency_ms(0.50),
        "request_p99_ms": load.latency_ms(0.99),
        "api_cpu_ms_per_msg": 1000 * cpu / len(msgs),
        "api_peak_rss_mb": rss,
    }


def _queued(stats: Any) -> int | None:
    """Messages in status ``queued`` from ``GET /v1/stats`` (None if the shape is unexpected)."""
    if not isinstance(stats, dict):
        return None
    for key in ("by_status", "counts", "status"):
        d = stats.get(key)
        if isinstance(d, dict) and "queued" in d:
            return int(d["queued"])
    return None


@scenario(
    "batch-ingest-sqlite",
    primary="accepted_per_s",
    messages=100_000,
    quick_messages=5_000,
    description="`postroom serve` (SQLite, no worker): POST /v1/messages/batch, 1,000 messages "
    "per request, 4 connections",
)
def batch_ingest_sqlite(ctx: Context) -> dict[str, float]:
    return _batch_ingest(ctx, "sqlite")


@scenario(
    "batch-ingest-postgres",
    primary="accepted_per_s",
    messages=100_000,
    quick_messages=5_000,
    services=("postgres",),
    description="`postroom serve` (PostgreSQL, no worker): POST /v1/messages/batch, 1,000 "
    "messages per request, 4 connections",
)
def batch_ingest_postgres(ctx: Context) -> dict[str, float]:
    return _batch_ingest(ctx, "postgres")
