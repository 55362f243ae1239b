"""The HTTP API as a client sees it: auth, validation errors, idempotency, batch, queries."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from postroom.api.app import create_app
from postroom.app import build_router, build_worker
from postroom.config import load_settings
from postroom.store.sqlite import SQLiteStore

MSG: dict[str, Any] = {
    "from": "Shop <shop@example.com>",
    "to": ["Ada <ada@example.org>"],
    "subject": "Your order",
    "text": "Thanks!",
}


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, SQLiteStore, str]]:
    settings = load_settings(
        database_url=f"sqlite:///{tmp_path}/p.db",
        limits={"max_recipients": 5, "max_request_bytes": 200_000, "max_batch": 10, "max_attachment_bytes": 50_000},
    )
    store = SQLiteStore(tmp_path / "p.db", synchronous="NORMAL")
    app = create_app(settings, store)
    await store.open()
    _, key = await store.create_key("test")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", headers={"Authorization": f"Bearer {key}"}) as c:
        yield c, store, key
    await store.close()


async def test_healthz_needs_no_key(env: Any) -> None:
    c, _, _ = env
    r = await c.get("/healthz", headers={"Authorization": ""})
    assert r.status_code == 200 and r.json()["status"] == "ok"


@pytest.mark.parametrize("auth", [None, "Bearer nope", "Basic abc", "Bearer "])
async def test_v1_routes_refuse_missing_or_bad_keys(env: Any, auth: str | None) -> None:
    c, _, _ = env
    headers = {"Authorization": auth} if auth is not None else {}
    async with httpx.AsyncClient(transport=c._transport, base_url="http://test", headers=headers) as anon:
        r = await anon.post("/v1/messages", json=MSG)
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"


async def test_post_message_is_accepted_and_stored_before_the_answer(env: Any) -> None:
    c, store, _ = env
    r = await c.post("/v1/messages", json={**MSG, "tags": ["orders"], "metadata": {"order": 42}})
    assert r.status_code == 202
    body = r.json()
    assert body["status"] == "queued"
    rec = await store.get(body["id"])  # on disk already
    assert rec.content["metadata"] == {"order": 42}
    got = (await c.get(f"/v1/messages/{body['id']}")).json()
    assert got["to"] == ["Ada <ada@example.org>"] and got["tags"] == ["orders"]
    assert [e["type"] for e in got["events"]] == ["queued"]
    assert got["message_id"].startswith(f"<{body['id']}@example.com")


@pytest.mark.parametrize(
    ("patch", "status", "field"),
    [
        ({"to": ["not-an-address"]}, 422, "to.0"),
        ({"to": ["ok@example.org", "bad@"]}, 422, "to.1"),
        ({"from": None}, 422, "from"),
        ({"subject": "Hi\r\nBcc: victim@example.org"}, 422, "subject"),
        ({"to": ["Eve\r\n <eve@example.org>"]}, 422, "to.0"),
        ({"headers": {"X-Ok": "fine\r\nInjected: yes"}}, 422, "headers.X-Ok"),
        ({"headers": {"Bcc": "x@example.org"}}, 422, "headers.Bcc"),
        ({"text": None}, 422, "text"),
        ({"priority": "urgent"}, 422, "priority"),
        ({"send_at": "tomorrow"}, 422, "send_at"),
        ({"unknown": 1}, 422, "unknown"),
        ({"to": [f"u{i}@example.org" for i in range(6)]}, 413, "to"),
        ({"attachments": [{"filename": "a.bin", "content": "!!!"}]}, 422, "attachments.0.content"),
        (
            {"attachments": [{"filename": "a.bin", "content": base64.b64encode(b"x" * 60_000).decode()}]},
            413,
            "attachments.0.content",
        ),
    ],
)
async def test_bad_messages_get_a_4xx_naming_the_field_and_store_nothing(
    env: Any, patch: dict[str, Any], status: int, field: str
) -> None:
    c, store, _ = env
    body = {**MSG, **patch}
    body = {k: v for k, v in body.items() if v is not None}
    r = await c.post("/v1/messages", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["field"] == field
    assert err["message"]
    assert (await store.stats())["by_status"]["queued"] == 0


async def test_malformed_json_and_oversized_bodies_are_clear_4xx(env: Any) -> None:
    c, _, _ = env
    r = await c.post("/v1/messages", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "invalid JSON" in r.json()["error"]["message"]
    r = await c.post("/v1/messages", content=b"x" * 300_000, headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    r = await c.post("/v1/messages", content=b"a=b", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "body"


async def test_idempotency_key_replays_the_first_answer_and_conflicts_on_a_new_body(env: Any) -> None:
    c, store, _ = env
    h = {"Idempotency-Key": "order-42"}
    first = await c.post("/v1/messages", json=MSG, headers=h)
    again = await c.post("/v1/messages", json=dict(reversed(list(MSG.items()))), headers=h)
    clash = await c.post("/v1/messages", json={**MSG, "text": "changed"}, headers=h)
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert clash.status_code == 409 and "different request body" in clash.json()["error"]["message"]
    assert (await store.stats())["by_status"]["queued"] == 1


async def test_concurrent_posts_are_group_committed_and_all_stored(env: Any) -> None:
    c, store, _ = env
    rs = await asyncio.gather(*[c.post("/v1/messages", json={**MSG, "to": [f"u{i}@example.org"]}) for i in range(200)])
    assert all(r.status_code == 202 for r in rs)
    assert len({r.json()["id"] for r in rs}) == 200
    assert (await store.stats())["by_status"]["queued"] == 200


async def test_batch_accepts_the_valid_and_reports_the_invalid_by_index(env: Any) -> None:
    c, _, _ = env
    items = [MSG, {**MSG, "to": ["nope"]}, {**MSG, "subject": "two"}]
    r = await c.post("/v1/messages/batch", json={"messages": items})
    assert r.status_code == 202
    body = r.json()
    assert body["accepted"] == 2 and body["rejected"] == 1
    assert body["results"][1]["error"]["field"] == "messages.1.to.0"
    assert body["results"][0]["status"] == "queued" and body["results"][2]["id"]


async def test_atomic_batch_rejects_everything_when_one_is_invalid(env: Any) -> None:
    c, store, _ = env
    r = await c.post("/v1/messages/batch", json={"messages": [MSG, {**MSG, "to": []}], "atomic": True})
    assert r.status_code == 422
    assert r.json()["errors"][0]["index"] == 1
    assert (await store.stats())["by_status"]["queued"] == 0
    r = await c.post("/v1/messages/batch", json={"messages": [MSG] * 11})
    assert r.status_code == 413 and r.json()["error"]["field"] == "messages"


async def test_list_filters_and_pages_with_a_cursor(env: Any) -> None:
    c, _, _ = env
    for i in range(5):
        await c.post("/v1/messages", json={**MSG, "to": [f"u{i}@example.org"], "tags": ["a" if i % 2 else "b"]})
    page = (await c.get("/v1/messages", params={"limit": 2})).json()
    assert len(page["items"]) == 2 and page["next_cursor"]
    rest = (await c.get("/v1/messages", params={"limit": 10, "cursor": page["next_cursor"]})).json()
    assert len(rest["items"]) == 3 and rest["next_cursor"] is None
    tagged = (await c.get("/v1/messages", params={"tag": "a"})).json()
    assert len(tagged["items"]) == 2
    by_to = (await c.get("/v1/messages", params={"to": "u3@example.org"})).json()
    assert [m["to"] for m in by_to["items"]] == [["u3@example.org"]]
    assert (await c.get("/v1/messages", params={"status": "bogus"})).status_code == 422
    assert (await c.get("/v1/messages", params={"limit": 0})).status_code == 422


async def test_cancel_a_scheduled_message_and_refuse_cancelling_a_sent_one(env: Any) -> None:
    c, _, _ = env
    r = await c.post("/v1/messages", json={**MSG, "send_at": "2099-01-01T00:00:00Z"})
    assert r.json()["status"] == "scheduled"
    mid = r.json()["id"]
    got = (await c.post(f"/v1/messages/{mid}/cancel")).json()
    assert got["status"] == "cancelled" and got["events"][-1]["type"] == "cancelled"
    again = await c.post(f"/v1/messages/{mid}/cancel")
    assert again.status_code == 409
    assert (await c.post("/v1/messages/zzz/cancel")).status_code == 404
    assert (await c.get("/v1/messages/zzz")).status_code == 404


async def test_delivered_mail_shows_in_the_inbox_and_stats(env: Any) -> None:
    c, store, _ = env
    settings = load_settings(database_url="sqlite:///unused.db", worker={"idle_poll_s": 0.05})
    router = build_router(settings, store)  # no providers configured: capture
    worker = build_worker(settings, store, router)
    task = asyncio.create_task(worker.run())
    try:
        mid = (await c.post("/v1/messages", json={**MSG, "subject": "Grüße"})).json()["id"]
        for _ in range(100):
            got = (await c.get(f"/v1/messages/{mid}")).json()
            if got["status"] == "sent":
                break
            await asyncio.sleep(0.05)
        assert got["status"] == "sent" and got["provider"] == "capture"
        assert [e["type"] for e in got["events"]] == ["queued", "claimed", "sent"]
        inbox = (await c.get("/v1/inbox")).json()["items"]
        assert inbox[0]["message_id"] == mid and inbox[0]["subject"] == "Grüße"
        item = (await c.get(f"/v1/inbox/{inbox[0]['id']}")).json()
        assert item["text"].strip() == "Thanks!"
        raw = await c.get(f"/v1/inbox/{inbox[0]['id']}/raw")
        assert raw.headers["content-type"] == "message/rfc822" and b"Message-ID:" in raw.content
        st = (await c.get("/v1/stats")).json()
        assert st["by_status"]["sent"] == 1 and st["last_minute"]["sent"] == 1
    finally:
        worker.stop()
        await task
        await router.close()


async def test_openapi_documents_the_message_schema(env: Any) -> None:
    c, _, _ = env
    spec = (await c.get("/openapi.json")).json()
    assert "MessageIn" in spec["components"]["schemas"]
    assert "/v1/messages/batch" in spec["paths"]
