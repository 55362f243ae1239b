"""Postroom deliver: N messages already queued (untimed), then ``postroom worker`` drains them into smtp-sink.

Timed from the worker's start (start-up included) until the sink has counted
all N: the shape of ``peer-celery-drain`` and ``peer-post-office``.
"""

from __future__ import annotations

import time

from bench.registry import Context, scenario
from bench.scenarios.postroom_common import (
    cpu_ms_per_msg,
    enqueue,
    fresh_database,
    provider_env,
    record_info,
    start_postroom,
)


def _deliver(ctx: Context, kind: str, processes: int = 1) -> dict[str, float]:
    record_info(ctx, kind)
    sink = ctx.sink()
    with fresh_database(kind, ctx.work_dir) as db:
        setup_s = enqueue(db, ctx.message_list())
        ctx.log(f"queued {ctx.messages:,} in {setup_s:.1f} s (untimed)")
        args = ["worker"] + (["--processes", str(processes)] if processes > 1 else [])
        t0 = time.monotonic()
        worker = start_postroom(ctx, "worker", db, *args, env=provider_env(sink))
        try:
            t_first = sink.wait_for(1, timeout_s=min(120, ctx.remaining_s()), stall_s=60)
            t_done = sink.wait_for(ctx.messages, timeout_s=ctx.remaining_s(), stall_s=60)
        except (TimeoutError, RuntimeError) as e:
            raise RuntimeError(f"{e}; worker log: {worker.log_tail(1500)}") from None
        cpu = cpu_ms_per_msg(worker, ctx.messages)
        ctx.procs.stop(worker, grace_s=10)
    return {
        "delivered_per_s": ctx.messages / (t_done - t0),
        "worker_cpu_ms_per_msg": cpu,
        "worker_start_to_first_delivery_s": t_first - t0,
        "elapsed_s": t_done - t0,
        "setup_enqueue_per_s": ctx.messages / setup_s,
    }


@scenario(
    "deliver-sqlite",
    primary="delivered_per_s",
    messages=100_000,
    quick_messages=2_000,
    timeout_s=900,
    description="N queued messages (SQLite, enqueued untimed through the Store) drained by "
    "`postroom worker` into smtp-sink, worker start-up included",
)
def deliver_sqlite(ctx: Context) -> dict[str, float]:
    return _deliver(ctx, "sqlite")


@scenario(
    "deliver-postgres",
    primary="delivered_per_s",
    messages=100_000,
    quick_messages=2_000,
    timeout_s=900,
    services=("postgres",),
    description="N queued messages (PostgreSQL) drained by `postroom worker` (1 process) into "
    "smtp-sink, worker start-up included",
)
def deliver_postgres(ctx: Context) -> dict[str, float]:
    return _deliver(ctx, "postgres")


@scenario(
    "deliver-postgres-2p",
    primary="delivered_per_s",
    messages=100_000,
    quick_messages=2_000,
    timeout_s=900,
    services=("postgres",),
    description="the same with `postroom worker --processes 2`",
)
def deliver_postgres_2p(ctx: Context) -> dict[str, float]:
    return _deliver(ctx, "postgres", processes=2)
