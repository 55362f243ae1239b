"""GET /v1/providers and /v1/domains: what the workers report through the shared (database) state."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from postroom.api.app import create_app
from postroom.app import build_router, build_worker
from postroom.config import Settings, load_settings
from postroom.domain.errors import TransientError
from postroom.domain.model import Status
from postroom.domain.ports import MessageFilter
from postroom.store.sqlite import SQLiteStore
from tests.integration.test_routing import poll

MSG: dict[str, Any] = {"from": "shop@example.com", "subject": "hi", "text": "hello"}


def routing_settings(tmp_path: Path) -> Settings:
    return load_settings(
        database_url=f"sqlite:///{tmp_path}/p.db",
        providers=[
            {"name": "broken", "kind": "simulate", "fault_rate": 1.0},
            {"name": "backup", "kind": "simulate", "latency_ms": 1, "rate": "200/s"},
        ],
        domains={"gmail.com": {"rate": "20/s"}, "*": {"min_interval": "10ms"}},
        routing={"breaker_faults": 2, "breaker_cooldown_s": 60},
        worker={"idle_poll_s": 0.05},
    )


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, SQLiteStore, Settings]]:
    settings = routing_settings(tmp_path)
    store = SQLiteStore(tmp_path / "p.db", synchronous="NORMAL")
    app = create_app(settings, store)
    await store.open()
    _, key = await store.create_key("test")
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=headers) as c:
        yield c, store, settings
    await store.close()


async def test_providers_and_domains_show_what_the_worker_reported(env: Any) -> None:
    client, store, settings = env
    r = await client.post(
        "/v1/messages/batch",
        json={"messages": [{**MSG, "to": [f"u{i}@example.org"]} for i in range(10)]},
    )
    assert r.status_code == 202
    ids = [x["id"] for x in r.json()["results"]]

    # a worker in another process would do the same: its router reports through the database
    router = build_router(settings, store, name="worker-1")
    worker = build_worker(settings, store, router)
    task = asyncio.create_task(worker.run())

    async def all_sent() -> bool:
        page = await store.list_messages(MessageFilter(status=Status.SENT, limit=50))
        return len(page.items) == len(ids)

    await poll(all_sent)
    assert router.throttler is not None
    await router.throttler.signal(
        ["slow.example.net"],
        TransientError("4.7.0 try again in 5 minutes", code=451, retry_after_s=300),
    )
    worker.stop()
    await task
    await router.close()  # publishes its last snapshot

    r = await client.get("/v1/providers")
    assert r.status_code == 200
    broken, backup = r.json()["items"]
    assert (broken["name"], broken["kind"], broken["state"]) == ("broken", "simulate", "open")
    assert broken["recent"]["faults"] == 2  # then the breaker opened; the rest skipped it
    assert broken["workers"][0]["worker"] == "worker-1"
    assert "simulated provider fault" in broken["workers"][0]["last_error"]
    assert (backup["state"], backup["recent"]["sent"]) == ("closed", 10)
    (limit,) = backup["rate_limits"]
    assert limit["limit"] == "rate 200/s" and 0 < limit["recent_use"] <= 1

    r = await client.get("/v1/domains")
    assert r.status_code == 200
    domains = {d["domain"]: d for d in r.json()["items"]}
    slow = domains["slow.example.net"]
    assert (
        slow["state"] == "paused"
        and slow["last_code"] == 451
        and slow["limits"] == ["min_interval 10ms"]
    )
    assert domains["gmail.com"] == {
        "domain": "gmail.com",
        "state": "normal",
        "limits": ["rate 20/s"],
    }


async def test_routing_routes_need_a_key(env: Any) -> None:
    client, _, _ = env
    for path in ("/v1/providers", "/v1/domains"):
        r = await client.get(path, headers={"Authorization": ""})
        assert r.status_code == 401
