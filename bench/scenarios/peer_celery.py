"""Peer: FastAPI + pydantic producer → Celery task on RabbitMQ → EmailMessage + smtplib → smtp-sink."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.load import post_all, wait_http_ready
from bench.peers.venv import ensure_peers_venv, peer_version
from bench.procs import Proc
from bench.registry import Context, scenario
from bench.sink import free_port

BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
QUEUE = "postroom-bench-celery"
CONCURRENCY = 8  # HTTP connections of the load generator
PEERS_DIR = Path(__file__).resolve().parent.parent / "peers"


def _require_port(host: str, port: int, what: str, hint: str) -> None:
    try:
        with socket.create_connection((host, port), timeout=3):
            return
    except OSError as e:
        raise RuntimeError(
            f"{what} is not reachable on {host}:{port} ({e}); start it: {hint}"
        ) from None


@contextlib.contextmanager
def _setup(ctx: Context) -> Iterator[dict[str, Any]]:
    _require_port("127.0.0.1", 5672, "RabbitMQ", "rabbitmq-server -detached")
    python = ensure_peers_venv()
    for dist in ("celery", "kombu", "fastapi", "pydantic", "uvicorn"):
        ctx.info[dist] = peer_version(python, dist)
    ctx.info["worker"] = (
        f"celery worker, prefork pool, default concurrency (= {os.cpu_count()} CPUs)"
    )
    ctx.info["api"] = "uvicorn, 1 process, access log on (its defaults)"
    ctx.info["load"] = f"{CONCURRENCY} keep-alive HTTP connections, closed loop"
    yield {"python": python}


def _celery(python: Path, *args: str) -> list[str]:
    return [str(python), "-m", "celery", "-A", "celery_peer.tasks", *args]


def _purge(python: Path, env: dict[str, str]) -> None:
    subprocess.run(
        _celery(python, "purge", "-f", "-Q", QUEUE),
        cwd=PEERS_DIR,
        env={**os.environ, **env},
        capture_output=True,
        timeout=120,
        check=True,
    )


def _start_api(ctx: Context, python: Path, env: dict[str, str]) -> tuple[Proc, str]:
    api_port = free_port()
    api = ctx.procs.start(
        "api",
        [
            str(python),
            "-m",
            "uvicorn",
            "celery_peer.api:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(api_port),
        ],
        env=env,
        cwd=PEERS_DIR,
    )
    wait_http_ready(f"http://127.0.0.1:{api_port}/health", timeout_s=min(60, ctx.remaining_s()))
    return api, f"http://127.0.0.1:{api_port}/messages"


def _run(ctx: Context, *, drain: bool) -> dict[str, float]:
    python: Path = ctx.state["python"]
    sink = ctx.sink()
    env = {
        "BENCH_BROKER_URL": BROKER_URL,
        "BENCH_CELERY_QUEUE": QUEUE,
        "BENCH_SMTP_HOST": sink.host,
        "BENCH_SMTP_PORT": str(sink.port),
        "PYTHONPATH": str(PEERS_DIR),
    }
    _purge(python, env)
    api, url = _start_api(ctx, python, env)
    bodies = ctx.message_list()
    started: dict[str, float] = {}
    procs: dict[str, Proc] = {"api": api}
    cpu_s: dict[str, float] = {}

    def start_worker() -> None:
        started["t0"] = time.monotonic()
        procs["worker"] = ctx.procs.start(
            "worker",
            _celery(python, "worker", "-n", f"postroom-bench-{os.getpid()}@%h"),
            env=env,
            cwd=PEERS_DIR,
        )

    try:
        if drain:
            # Queue everything first (no worker running), then time the worker alone.
            load = post_all(url, bodies, concurrency=CONCURRENCY, timeout_s=ctx.remaining_s())
            cpu_s["api"] = api.cpu_s()
            ctx.procs.stop(api)
            start_worker()
            backlog = load.accepted
        else:
            # Producer and worker at once: the worker starts with the first POST.
            load = post_all(
                url,
                bodies,
                concurrency=CONCURRENCY,
                timeout_s=ctx.remaining_s(),
                on_start=start_worker,
            )
            backlog = load.accepted - sink.count()
        if load.failed:
            raise RuntimeError(f"{load.failed} POSTs failed: {load.errors[:3]}")
        t_first = sink.wait_for(1, timeout_s=min(120, ctx.remaining_s()))
        t_done = sink.wait_for(ctx.messages, timeout_s=ctx.remaining_s(), stall_s=120)
        cpu_s["worker"] = procs["worker"].cpu_s()
        cpu_s.setdefault("api", api.cpu_s())
    finally:
        for proc in list(ctx.procs.procs):
            if proc.name in ("worker", "api"):
                ctx.procs.stop(proc, grace_s=10)
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            _purge(python, env)
    t0 = started["t0"]
    metrics = {
        "delivered_per_s": ctx.messages / (t_done - t0),
        "accepted_per_s": load.accepted_per_s,
        "accept_p50_ms": load.latency_ms(0.50),
        "accept_p99_ms": load.latency_ms(0.99),
    }
    if drain:
        metrics["worker_start_to_first_delivery_s"] = t_first - t0
    else:
        metrics["backlog_at_last_accept"] = float(backlog)
    metrics["worker_cpu_ms_per_msg"] = 1000 * cpu_s["worker"] / ctx.messages
    metrics["api_cpu_ms_per_msg"] = 1000 * cpu_s["api"] / ctx.messages
    metrics["elapsed_s"] = t_done - t0
    return metrics


@scenario(
    "peer-celery",
    primary="delivered_per_s",
    messages=5_000,
    quick_messages=200,
    setup=_setup,
    services=("rabbitmq",),
    description="end to end: POSTs to FastAPI (pydantic) → Celery on RabbitMQ → EmailMessage + smtplib "
    "→ smtp-sink, while the worker (started with the first POST) delivers",
)
def peer_celery(ctx: Context) -> dict[str, float]:
    """The design most users have today, idiomatic and untuned, measured end to end."""
    return _run(ctx, drain=False)


@scenario(
    "peer-celery-drain",
    primary="delivered_per_s",
    messages=5_000,
    quick_messages=200,
    setup=_setup,
    services=("rabbitmq",),
    description="the same Celery peer, queue filled first, then the worker alone drains it "
    "(start-up included): compares with Postroom's deliver scenario",
)
def peer_celery_drain(ctx: Context) -> dict[str, float]:
    """The Celery worker alone on a full queue, like Postroom's deliver scenario."""
    return _run(ctx, drain=True)
