"""Worker + SMTP provider against real SMTP servers: sent, retried on 4xx and hangs, failed on 5xx."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from postroom.domain.model import Status
from postroom.domain.retry import RetryPolicy
from postroom.domain.validate import validate_message
from postroom.providers.router import FailoverRouter
from postroom.providers.smtp import SMTPProvider
from postroom.store.sqlite import SQLiteStore
from postroom.worker import Worker
from tests.support import RecordingHandler, SilentServer, SMTPServer

FAST_RETRY = RetryPolicy(first_delay_s=0.2, max_delay_s=0.5, jitter=0.0, lifetime_s=30)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "p.db", synchronous="NORMAL")
    await s.open()
    yield s
    await s.close()


def body(i: int = 0, **extra: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "from": "Shop <shop@example.com>",
        "to": [f"Zoë Müller <user{i}@example.org>"],
        "subject": f"Grüße #{i}",
        "text": f"Hello {i}\n.\nA lone dot above, and a bare\rCR.\n",
        "html": f"<p>Hello <b>{i}</b></p>",
    }
    d.update(extra)
    return d


async def run_until(
    store: SQLiteStore, worker: Worker, done: Callable[[], Any], timeout_s: float = 10
) -> None:
    task = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(timeout_s):
            while not await done():
                await asyncio.sleep(0.05)
    finally:
        worker.stop()
        await task


def make_worker(store: SQLiteStore, provider: SMTPProvider, **kw: Any) -> Worker:
    return Worker(store=store, router=FailoverRouter([provider]), retry=FAST_RETRY, idle_poll_s=0.05, **kw)


async def statuses(store: SQLiteStore, ids: list[str]) -> list[Status]:
    return [(await store.get(i, with_events=False)).status for i in ids]


async def test_messages_arrive_intact_with_one_message_id_each(store: SQLiteStore) -> None:
    with SMTPServer() as server:
        provider = SMTPProvider("relay", host=server.host, port=server.port, pool_size=4, timeout_s=5)
        ids = [r.id for r in await store.enqueue([validate_message(body(i)) for i in range(30)])]
        worker = make_worker(store, provider)

        async def all_sent() -> bool:
            return set(await statuses(store, ids)) == {Status.SENT}

        await run_until(store, worker, all_sent)
        await provider.close()
        assert len(server.received) == 30
        by_rcpt = {r.rcpt_tos[0]: r for r in server.received}
        got = by_rcpt["user7@example.org"].message
        assert got["Subject"] == "Grüße #7"
        assert got["To"].addresses[0].display_name == "Zoë Müller"
        assert got.get_body(("plain",)).get_content().replace("\r\n", "\n") == "Hello 7\n.\nA lone dot above, and a bare\nCR.\n"
        assert got.get_body(("html",)).get_content().strip() == "<p>Hello <b>7</b></p>"
        assert len(set(server.handler.message_ids())) == 30
        rec = await store.get(ids[0])
        assert rec.provider == "relay" and rec.last_code == 250
        assert [e.type for e in rec.events] == ["queued", "claimed", "sent"]


async def test_4xx_is_retried_with_backoff_then_sent(store: SQLiteStore) -> None:
    handler = RecordingHandler(rcpt_reply="451 4.7.1 Greylisted, try again later")
    with SMTPServer(handler) as server:
        provider = SMTPProvider("relay", host=server.host, port=server.port, timeout_s=5)
        (r,) = await store.enqueue([validate_message(body())])
        worker = make_worker(store, provider)

        async def retried_then_sent() -> bool:
            rec = await store.get(r.id, with_events=False)
            if rec.status is Status.RETRYING and handler.rcpt_reply:
                handler.rcpt_reply = None  # the greylist lets us in next time
            return rec.status is Status.SENT

        await run_until(store, worker, retried_then_sent)
        await provider.close()
        rec = await store.get(r.id)
        types = [e.type for e in rec.events]
        assert types == ["queued", "claimed", "attempt_failed", "retry_scheduled", "claimed", "sent"]
        failed = rec.events[2]
        assert failed.code == 451 and "Greylisted" in (failed.detail or "")
        assert rec.attempts == 2 and len(server.received) == 1


async def test_5xx_for_the_recipient_fails_at_once_without_retry(store: SQLiteStore) -> None:
    handler = RecordingHandler(rcpt_reply="550 5.1.1 No such user here")
    with SMTPServer(handler) as server:
        provider = SMTPProvider("relay", host=server.host, port=server.port, timeout_s=5)
        (r,) = await store.enqueue([validate_message(body())])
        worker = make_worker(store, provider)

        async def failed() -> bool:
            return (await statuses(store, [r.id])) == [Status.FAILED]

        await run_until(store, worker, failed)
        await provider.close()
        await asyncio.sleep(0.3)  # longer than a retry delay: nothing more happens
        rec = await store.get(r.id)
        assert rec.status is Status.FAILED and rec.attempts == 1
        assert rec.last_code == 550 and "No such user" in (rec.last_text or "")
        assert [e.type for e in rec.events] == ["queued", "claimed", "attempt_failed", "failed"]


async def test_a_server_that_hangs_times_out_and_the_message_is_retried(store: SQLiteStore) -> None:
    async with SilentServer() as silent:
        provider = SMTPProvider("relay", host="127.0.0.1", port=silent.port, timeout_s=0.3)
        (r,) = await store.enqueue([validate_message(body())])
        worker = make_worker(store, provider)

        async def retrying() -> bool:
            return (await statuses(store, [r.id])) == [Status.RETRYING]

        await run_until(store, worker, retrying, timeout_s=5)
        await provider.close()
        rec = await store.get(r.id)
        types = [e.type for e in rec.events]
        # no greeting: the provider itself is unusable (a fault the router may fail over from)
        assert types == ["queued", "claimed", "provider_fault", "attempt_failed", "retry_scheduled"]
        assert "timed out" in (rec.events[2].detail or "")


async def test_retries_stop_when_the_lifetime_is_spent(store: SQLiteStore) -> None:
    handler = RecordingHandler(rcpt_reply="450 4.2.1 Mailbox busy")
    with SMTPServer(handler) as server:
        provider = SMTPProvider("relay", host=server.host, port=server.port, timeout_s=5)
        (r,) = await store.enqueue([validate_message(body())])
        worker = Worker(
            store=store,
            router=FailoverRouter([provider]),
            retry=RetryPolicy(first_delay_s=0.1, max_delay_s=0.1, jitter=0, lifetime_s=0.5),
            idle_poll_s=0.05,
        )

        async def failed() -> bool:
            return (await statuses(store, [r.id])) == [Status.FAILED]

        await run_until(store, worker, failed)
        await provider.close()
        rec = await store.get(r.id)
        assert rec.attempts >= 2
        assert "gave up after" in (rec.last_text or "")


async def test_stop_drains_in_flight_sends_and_releases_the_rest(store: SQLiteStore) -> None:
    from postroom.testing import RecordingProvider

    slow = RecordingProvider(delay_s=0.5)
    ids = [r.id for r in await store.enqueue([validate_message(body(i)) for i in range(6)])]
    worker = Worker(store=store, router=FailoverRouter([slow]), retry=FAST_RETRY, concurrency=6, drain_timeout_s=0.1, idle_poll_s=0.05)
    task = asyncio.create_task(worker.run())
    while worker.in_flight < 6:
        await asyncio.sleep(0.01)
    worker.stop()
    await task
    recs = [await store.get(i) for i in ids]
    assert {r.status for r in recs} == {Status.QUEUED}  # none lost, none left "sending"
    assert all(r.events[-1].type == "released" and r.attempts == 0 for r in recs)
    assert await store.claim("next", 10, 30)  # claimable at once by the next worker


async def test_a_message_that_cannot_be_built_fails_without_retrying(store: SQLiteStore) -> None:
    from postroom.testing import RecordingProvider

    bad = validate_message(body())
    bad.content.headers["X-Bad"] = "smuggled\r\nBcc: victim@example.org"  # bypassing the door
    (r,) = await store.enqueue([bad])
    provider = RecordingProvider()
    worker = Worker(store=store, router=FailoverRouter([provider]), retry=FAST_RETRY, idle_poll_s=0.05)

    async def failed() -> bool:
        return (await statuses(store, [r.id])) == [Status.FAILED]

    await run_until(store, worker, failed)
    rec = await store.get(r.id)
    assert rec.attempts == 1 and "cannot build the message" in (rec.last_text or "")
    assert provider.sent == []


async def test_a_message_held_back_past_its_lifetime_fails_instead_of_waiting_forever(store: SQLiteStore) -> None:
    import time

    from postroom.domain.errors import Deferred

    class AlwaysLimited:
        async def send(self, message: Any, trail: list[Any]) -> Any:
            raise Deferred(time.time() + 0.1, "over the rate of provider 'relay'", provider="relay")

        async def close(self) -> None:
            return None

    (r,) = await store.enqueue([validate_message(body())])
    worker = Worker(
        store=store,
        router=AlwaysLimited(),
        retry=RetryPolicy(first_delay_s=0.1, jitter=0, lifetime_s=0.5),
        idle_poll_s=0.05,
    )

    async def failed() -> bool:
        return (await statuses(store, [r.id])) == [Status.FAILED]

    await run_until(store, worker, failed)
    rec = await store.get(r.id)
    types = [e.type for e in rec.events]
    assert "deferred" in types and types[-1] == "failed"
    assert "still held back after 0.5 s" in (rec.last_text or "")
