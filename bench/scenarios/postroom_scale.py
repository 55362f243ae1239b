"""Postroom at scale: does a claim and an enqueue cost the same with 1,000,000 messages queued as with 10,000?

Setup (once per scenario, untimed): two fresh databases, ``small`` with 10,000
queued messages and ``large`` with 1,000,000 (or as many as fit in
``FILL_BUDGET_S``; the count reached is reported as ``large_queued``). They
are filled through the Store in batches of 1,000, reusing 1,000 validated
benchmark messages (each insert gets new ids; only the build is shared).

Each run, on both databases, through the same Store code the worker and API use:

* ``claim100_record``: ``claim(limit=100)`` then ``record`` 100 SENT outcomes
  (with their ``sent`` events), median of ``CLAIM_ROUNDS`` rounds;
* ``enqueue1000``: ``enqueue`` of a batch of 1,000 validated messages (a
  durable commit, as the API does), median of ``ENQUEUE_ROUNDS`` batches;

and the ratios large / small (the issue's target: ≤ 1.5). Then an end-to-end
pass on the large database: the API and the worker (``postroom run`` on
SQLite, ``serve`` + ``worker`` on PostgreSQL) with 1M queued, while the load
generator POSTs ``RSS_POSTS`` single messages and the worker drains the backlog
for ``RSS_SECONDS``; peak RSS (VmHWM) of each process is read before stopping.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Iterator
from typing import Any

from bench.load import post_all
from bench.registry import Context, scenario
from bench.scenarios.postroom_common import (
    Database,
    create_key,
    fresh_database,
    open_store,
    peak_rss_mb,
    provider_env,
    record_info,
    start_http,
    start_postroom,
    validated,
)

SMALL = 10_000
LARGE = 1_000_000
FILL_BUDGET_S = 300.0
CLAIM_ROUNDS = 20
ENQUEUE_ROUNDS = 5
RSS_POSTS = 5_000
RSS_SECONDS = 15.0


async def _fill(db: Database, n: int, template: list[Any], budget_s: float) -> int:
    """Enqueue ``n`` messages in batches of len(template); stop early at ``budget_s``."""
    store = open_store(db)
    if db.kind == "sqlite":
        store.synchronous = "OFF"  # setup only; the measurements use a store with the defaults
    await store.open()
    deadline = time.monotonic() + budget_s
    done = 0
    try:
        while done < n and time.monotonic() < deadline:
            await store.enqueue(template[: min(len(template), n - done)])
            done += min(len(template), n - done)
    finally:
        await store.close()
    return done


def _setup_for(kind: str) -> Any:
    @contextlib.contextmanager
    def setup(ctx: Context) -> Iterator[dict[str, Any]]:
        record_info(ctx, kind)
        large_n = min(LARGE, ctx.messages)
        template = validated(ctx.message_list(1000))
        with (
            fresh_database(kind, ctx.work_dir, tag="-small") as small,
            fresh_database(kind, ctx.work_dir, tag="-large") as large,
        ):
            t = time.monotonic()
            got_small = asyncio.run(_fill(small, SMALL, template, FILL_BUDGET_S))
            got_large = asyncio.run(_fill(large, large_n, template, FILL_BUDGET_S))
            took = time.monotonic() - t
            ctx.log(
                f"filled: small {got_small:,}, large {got_large:,} queued in {took:.0f} s (untimed)"
            )
            ctx.info["fill"] = (
                f"small {got_small:,} / large {got_large:,} queued through the Store in {took:.0f} s"
                + (
                    ""
                    if got_large >= large_n
                    else f" (stopped at the {FILL_BUDGET_S:.0f} s fill budget)"
                )
            )
            yield {"small": small, "large": large, "template": template, "large_n": got_large}

    return setup


async def _measure(db: Database, template: list[Any]) -> tuple[float, float, int]:
    """(median ms of claim 100 + record, median ms of enqueue 1,000, queued count before)."""
    from postroom.domain.model import Event, Outcome, Status

    store = open_store(db)
    await store.open()
    try:
        queued = await _queued(store)
        claim_ms = []
        for _ in range(CLAIM_ROUNDS):
            t = time.perf_counter()
            claimed = await store.claim("bench-scale", 100, 60.0)
            outcomes = [
                Outcome(
                    m.id,
                    m.lease_token,
                    Status.SENT,
                    provider="bench",
                    code=250,
                    text="2.0.0 Ok",
                    events=[
                        Event(
                            m.id,
                            "sent",
                            worker="bench-scale",
                            provider="bench",
                            code=250,
                            detail="2.0.0 Ok",
                        )
                    ],
                )
                for m in claimed
            ]
            await store.record(outcomes, worker="bench-scale")
            claim_ms.append(1000 * (time.perf_counter() - t))
            if len(claimed) != 100:
                raise RuntimeError(f"claimed {len(claimed)}, expected 100")
        enqueue_ms = []
        for _ in range(ENQUEUE_ROUNDS):
            t = time.perf_counter()
            await store.enqueue(template)
            enqueue_ms.append(1000 * (time.perf_counter() - t))
    finally:
        await store.close()
    return statistics.median(claim_ms), statistics.median(enqueue_ms), queued


async def _queued(store: Any) -> int:
    stats = await store.stats()
    for key in ("by_status", "counts", "status"):
        d = stats.get(key) if isinstance(stats, dict) else None
        if isinstance(d, dict) and "queued" in d:
            return int(d["queued"])
    return -1


def _rss(ctx: Context, db: Database) -> dict[str, float]:
    """Peak RSS of the API and the worker during an end-to-end pass on ``db``."""
    sink = ctx.sink()
    key = create_key(db)
    env = provider_env(sink)
    procs = {}
    if db.kind == "sqlite":
        procs["run"], base = start_http(ctx, "run", db, "run", env=env)
    else:
        procs["api"], base = start_http(ctx, "serve", db, "serve", env=env)
        procs["worker"] = start_postroom(ctx, "worker", db, "worker", env=env)
    t0 = time.monotonic()
    load = post_all(
        f"{base}/v1/messages",
        ctx.message_list(RSS_POSTS),
        concurrency=32,
        timeout_s=min(120, ctx.remaining_s()),
        headers={"Authorization": f"Bearer {key}"},
    )
    if load.failed:
        raise RuntimeError(f"{load.failed} POSTs failed: {load.errors[:3]}")
    time.sleep(max(0.0, RSS_SECONDS - (time.monotonic() - t0)))
    elapsed = time.monotonic() - t0
    delivered = sink.count()
    out = {f"{name}_peak_rss_mb": peak_rss_mb(p.pid) for name, p in procs.items()}
    for p in procs.values():
        ctx.procs.stop(p, grace_s=10)
    out["rss_pass_accepted_per_s"] = load.accepted_per_s
    out["rss_pass_delivered_per_s"] = delivered / elapsed
    return out


def _scale(ctx: Context) -> dict[str, float]:
    st = ctx.state
    claim_s, enq_s, q_s = asyncio.run(_measure(st["small"], st["template"]))
    claim_l, enq_l, q_l = asyncio.run(_measure(st["large"], st["template"]))
    ctx.log(
        f"claim100+record {claim_s:.1f} ms @ {q_s:,} vs {claim_l:.1f} ms @ {q_l:,}; "
        f"enqueue1000 {enq_s:.1f} ms vs {enq_l:.1f} ms"
    )
    out = {
        "claim_ratio_large_over_small": claim_l / claim_s,
        "enqueue_ratio_large_over_small": enq_l / enq_s,
        "claim100_record_small_ms": claim_s,
        "claim100_record_large_ms": claim_l,
        "enqueue1000_small_ms": enq_s,
        "enqueue1000_large_ms": enq_l,
        "small_queued": float(q_s),
        "large_queued": float(q_l),
    }
    out.update(_rss(ctx, st["large"]))
    return out


@scenario(
    "scale-1m-sqlite",
    primary="claim_ratio_large_over_small",
    messages=LARGE,
    quick_messages=50_000,
    timeout_s=900,
    setup=_setup_for("sqlite"),
    description="SQLite: claim 100 + record, and enqueue 1,000, at 10k vs 1M queued (ratio); "
    "peak RSS of `postroom run` during an end-to-end pass with 1M queued",
)
def scale_sqlite(ctx: Context) -> dict[str, float]:
    return _scale(ctx)


@scenario(
    "scale-1m-postgres",
    primary="claim_ratio_large_over_small",
    messages=LARGE,
    quick_messages=50_000,
    timeout_s=900,
    setup=_setup_for("postgres"),
    services=("postgres",),
    description="PostgreSQL: claim 100 + record, and enqueue 1,000, at 10k vs 1M queued (ratio); "
    "peak RSS of `serve` and `worker` during an end-to-end pass with 1M queued",
)
def scale_postgres(ctx: Context) -> dict[str, float]:
    return _scale(ctx)
