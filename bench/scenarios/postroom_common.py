"""Shared pieces of Postroom's own scenarios: a fresh database per run, untimed enqueue, processes.

Every Postroom process runs as a real subprocess (``python -m postroom.cli …``)
under ``ctx.procs``; only the untimed setup (filling the queue) and the
scale scenario's store micro-measurements run the Store in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.load import wait_http_ready
from bench.procs import Proc
from bench.registry import Context
from bench.sink import SMTPSink, free_port

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable  # the harness runs with Postroom's .venv/bin/python
PG_ADMIN = ["psql", "-h", "127.0.0.1", "-p", "5432", "-U", "postgres", "-d", "postgres"]
PG_URL = "postgresql://postgres@127.0.0.1:5432/{name}"
SMTP_POOL = 16


def postroom_version() -> str:
    try:
        from postroom import __version__

        return str(__version__)
    except Exception as e:
        return f"unknown ({e})"


def git_head() -> str:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=10,
    )
    return out.stdout.strip()


def record_info(ctx: Context, store: str) -> None:
    ctx.info.setdefault("postroom", f"{postroom_version()} (git {git_head()}, working tree as run)")
    ctx.info.setdefault("store", store)
    ctx.info.setdefault(
        "provider",
        f"smtp://127.0.0.1:PORT?pool_size={SMTP_POOL} (smtp-sink), worker defaults otherwise",
    )
    if store == "sqlite":
        ctx.info.setdefault(
            "sqlite_synchronous", "default (FULL for accepts, NORMAL for status updates)"
        )


# -- databases -----------------------------------------------------------------------------


def _psql(sql: str, retry_s: float = 60.0) -> None:
    """One statement on the ``postgres`` database; retried while the server is unreachable.

    Other test runs (the PostgreSQL fault tests) restart the local cluster now and then (psql exits 2).
    """
    deadline = time.monotonic() + retry_s
    while True:
        out = subprocess.run(
            [*PG_ADMIN, "-v", "ON_ERROR_STOP=1", "-qAtc", sql],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if out.returncode == 0:
            return
        if out.returncode != 2 or time.monotonic() >= deadline:
            raise RuntimeError(
                f"psql {sql!r} failed ({out.returncode}): {out.stderr.strip()[-500:]}"
            )
        time.sleep(1.0)


@dataclass
class Database:
    """One fresh Postroom database: a SQLite file in the work dir, or a new PostgreSQL database."""

    kind: str  # "sqlite" or "postgres"
    url: str
    name: str = ""
    path: Path | None = None

    def env(self, **extra: str) -> dict[str, str]:
        return {"POSTROOM_DATABASE_URL": self.url, "POSTROOM_LOG_LEVEL": "warning", **extra}


@contextlib.contextmanager
def fresh_database(kind: str, work_dir: Path, tag: str = "") -> Iterator[Database]:
    """A new, migrated database; a PostgreSQL one is dropped afterwards whatever happened."""
    if kind == "sqlite":
        path = work_dir / f"postroom{tag}.db"
        db = Database("sqlite", f"sqlite:///{path}", path=path)
        migrate(db)
        yield db
        return
    name = f"postroom_bench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    _require_postgres()
    _psql(f"CREATE DATABASE {name}")
    try:
        db = Database("postgres", PG_URL.format(name=name), name=name)
        migrate(db)
        yield db
    finally:
        with contextlib.suppress(subprocess.SubprocessError, OSError, RuntimeError):
            _psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _require_postgres() -> None:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=3):
            return
    except OSError as e:
        raise RuntimeError(
            f"PostgreSQL is not reachable on 127.0.0.1:5432 ({e}); start it: pg_ctlcluster 15 main start"
        ) from None


def cli(db: Database, *args: str, timeout_s: float = 120) -> str:
    """Run one short ``postroom`` command to completion (untimed setup); its stdout."""
    out = subprocess.run(
        [PYTHON, "-m", "postroom.cli", *args],
        env={**os.environ, **db.env()},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if out.returncode != 0:
        raise RuntimeError(
            f"postroom {' '.join(args)} failed ({out.returncode}): {out.stderr[-1500:]}"
        )
    return out.stdout


def migrate(db: Database) -> None:
    cli(db, "migrate")


def create_key(db: Database) -> str:
    key = cli(db, "keys", "create", "--name", "bench").strip().split()[-1]
    if not key.startswith("pr_"):
        raise RuntimeError(f"`postroom keys create` printed no key: {key!r}")
    return key


def open_store(db: Database) -> Any:
    """A Store on ``db`` for in-process setup or measurement (call ``await store.open()``)."""
    if db.kind == "sqlite":
        from postroom.store.sqlite import SQLiteStore

        return SQLiteStore(str(db.path))
    from postroom.store.postgres import PostgresStore

    return PostgresStore(db.url, max_size=4)


def validated(bodies: Sequence[dict[str, Any]]) -> list[Any]:
    from postroom.domain.validate import validate_message

    return [validate_message(b) for b in bodies]


def enqueue(db: Database, bodies: Sequence[dict[str, Any]], batch: int = 1000) -> float:
    """Validate and enqueue ``bodies`` through the Store in batches (setup); returns seconds taken."""

    async def go() -> None:
        store = open_store(db)
        await store.open()
        try:
            for i in range(0, len(bodies), batch):
                await store.enqueue(validated(bodies[i : i + batch]))
        finally:
            await store.close()

    t = time.monotonic()
    asyncio.run(go())
    return time.monotonic() - t


# -- processes -----------------------------------------------------------------------------


def provider_env(sink: SMTPSink) -> dict[str, str]:
    return {"POSTROOM_PROVIDERS": f"smtp://{sink.host}:{sink.port}?pool_size={SMTP_POOL}"}


def start_postroom(
    ctx: Context, name: str, db: Database, *args: str, env: dict[str, str] | None = None
) -> Proc:
    return ctx.procs.start(
        name, [PYTHON, "-m", "postroom.cli", *args], env=db.env(**(env or {})), cwd=ctx.work_dir
    )


def start_http(
    ctx: Context, name: str, db: Database, command: str, env: dict[str, str] | None = None
) -> tuple[Proc, str]:
    """``postroom run`` or ``serve`` on a free loopback port, ready; (proc, base URL)."""
    port = free_port()
    proc = start_postroom(
        ctx, name, db, command, "--host", "127.0.0.1", "--port", str(port), env=env
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http_ready(f"{base}/healthz", timeout_s=min(60, ctx.remaining_s()))
    except TimeoutError:
        raise RuntimeError(f"postroom {command} did not become ready: {proc.log_tail()}") from None
    return proc, base


def get_json(url: str, key: str) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of ``pid`` plus its live children, in MB."""
    total = 0
    pids = [pid]
    with contextlib.suppress(OSError):
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    for p in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
    return total / 1024


def cpu_ms_per_msg(proc: Proc, n: int) -> float:
    return 1000 * proc.cpu_s() / n


@dataclass
class Sampler:
    """Samples ``(t, sink count)`` every ``interval_s`` in a thread, until stopped."""

    sink: SMTPSink
    interval_s: float = 1.0
    samples: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Sampler:
        def loop() -> None:
            while not self._stop.is_set():
                self.samples.append((time.monotonic(), self.sink.count()))
                self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=loop, daemon=True, name="bench-sampler")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
