"""The worker registry end to end: a running Worker registers and beats, the API lists it, and a
worker that stops beating has its leases released early (on SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from postroom.api.app import create_app
from postroom.config import load_settings
from postroom.domain.model import Status
from postroom.domain.ports import Store, WorkerInfo
from postroom.domain.retry import RetryPolicy
from postroom.domain.validate import validate_message
from postroom.providers.router import FailoverRouter
from postroom.testing import RecordingProvider
from postroom.worker import Worker


def _msg(i: int):  # type: ignore[no-untyped-def]
    return validate_message(
        {"from": "a@example.com", "to": [f"u{i}@example.org"], "subject": "s", "text": "t"}
    )


async def _until(pred, timeout_s: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not await pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_a_running_worker_is_listed_by_the_api_and_leaves_when_stopped(
    store: Store, tmp_path: Path
) -> None:
    provider = RecordingProvider(delay_s=0.05)
    worker = Worker(
        store=store,
        router=FailoverRouter([provider]),
        retry=RetryPolicy(),
        name="host-a:123",
        concurrency=4,
        heartbeat_s=0.05,
        idle_poll_s=0.05,
    )
    task = asyncio.create_task(worker.run())
    await store.enqueue([_msg(i) for i in range(5)])
    await _until(lambda: _sent(store, 5))
    await asyncio.sleep(0.15)  # a heartbeat after the sends
    settings = load_settings(database_url=f"sqlite:///{tmp_path}/unused.db")
    app = create_app(settings, store)
    _, key = await store.create_key("t")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://test",
        headers={"Authorization": f"Bearer {key}"},
    ) as c:
        r = await c.get("/v1/workers")
    assert r.status_code == 200
    (w,) = r.json()["items"]
    assert w["name"] == "host-a:123" and w["alive"] is True and w["concurrency"] == 4
    assert w["sent"] == 5 and w["failed"] == 0 and w["in_flight"] == 0
    assert w["last_heartbeat_at"].endswith("Z") and w["pid"] > 0
    worker.stop()
    await task
    assert await store.list_workers() == []


async def _sent(store: Store, n: int) -> bool:
    st = await store.stats()
    return bool(st["by_status"]["sent"] == n)


async def test_a_live_worker_takes_over_the_messages_of_one_that_stopped_beating(
    store: Store,
) -> None:
    await store.enqueue([_msg(i) for i in range(3)])
    await store.heartbeat(WorkerInfo("dead:1", "dead", 1, started_at=time.time()))
    held = await store.claim("dead:1", 3, 600)  # a 10-minute lease, and then the worker dies
    assert len(held) == 3
    provider = RecordingProvider()
    worker = Worker(
        store=store,
        router=FailoverRouter([provider]),
        retry=RetryPolicy(),
        name="alive:2",
        heartbeat_s=0.05,
        stale_after_s=0.3,
        idle_poll_s=0.05,
    )
    started = time.monotonic()
    task = asyncio.create_task(worker.run())
    await _until(lambda: _sent(store, 3))
    assert time.monotonic() - started < 5  # not the 600 s lease
    worker.stop()
    await task
    rec = await store.get(held[0].id)
    assert rec.status is Status.SENT and rec.attempts == 2
    assert [e.type for e in rec.events][-3:] == ["lease_expired", "claimed", "sent"]


@pytest.mark.postgres
async def test_an_idle_postgres_worker_wakes_on_notify_and_when_a_scheduled_message_is_due(
    pg_url: str,
) -> None:
    from postroom.store.postgres import PostgresStore

    worker_store, api_store = PostgresStore(pg_url, max_size=2), PostgresStore(pg_url, max_size=2)
    await worker_store.open()
    await api_store.open()
    provider = RecordingProvider()
    worker = Worker(
        store=worker_store,
        router=FailoverRouter([provider]),
        retry=RetryPolicy(),
        idle_poll_s=30,  # a wake-up must come from NOTIFY or the due time, not from polling
    )
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.sleep(0.5)  # idle, listening
        t0 = time.monotonic()
        await api_store.enqueue([_msg(1)])  # another process's enqueue: NOTIFY
        await _until(lambda: _sent(worker_store, 1), 5)
        assert time.monotonic() - t0 < 1.0
        due = time.time() + 1.0
        await api_store.enqueue([validate_message({**_body(2), "send_at": due})])
        await _until(lambda: _sent(worker_store, 2), 5)
        assert time.time() - due < 0.5  # woken at the due time
    finally:
        worker.stop()
        await task
        await worker_store.close()
        await api_store.close()


def _body(i: int) -> dict[str, object]:
    return {"from": "a@example.com", "to": [f"u{i}@example.org"], "subject": "s", "text": "t"}
