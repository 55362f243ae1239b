"""Store conformance: enqueue, claim under lease, fencing, idempotency, queries."""

from __future__ import annotations

import asyncio
import time

import pytest

from postroom.domain.errors import ConflictError, NotFound
from postroom.domain.model import Event, Outcome, Priority, Status
from postroom.domain.ports import MessageFilter, Store
from postroom.domain.validate import validate_message


def msg(i: int = 0, **extra: object):
    body = {"from": "shop@example.com", "to": [f"user{i}@example.org"], "subject": f"s{i}", "text": "hi"}
    body.update(extra)
    return validate_message(body)


async def test_enqueue_then_claim_returns_each_message_once(store: Store) -> None:
    ids = [r.id for r in await store.enqueue([msg(i) for i in range(10)])]
    assert len(set(ids)) == 10
    first = await store.claim("w1", 6, 30)
    second = await store.claim("w2", 6, 30)
    assert len(first) == 6 and len(second) == 4
    assert {m.id for m in first} | {m.id for m in second} == set(ids)
    assert not ({m.id for m in first} & {m.id for m in second})
    rec = await store.get(first[0].id)
    assert rec.status is Status.SENDING
    assert [e.type for e in rec.events] == ["queued", "claimed"]


async def test_message_id_header_is_assigned_once_and_kept(store: Store) -> None:
    (r,) = await store.enqueue([msg()])
    (c,) = await store.claim("w", 1, 0.05)
    await asyncio.sleep(0.1)
    (again,) = await store.claim("w2", 1, 30)
    assert c.content.message_id == again.content.message_id
    assert c.content.message_id.startswith(f"<{r.id}@")


async def test_claim_skips_leased_messages_until_the_lease_expires(store: Store) -> None:
    await store.enqueue([msg()])
    (m,) = await store.claim("w1", 10, 0.2)
    assert await store.claim("w2", 10, 30) == []
    await asyncio.sleep(0.25)
    (again,) = await store.claim("w2", 10, 30)
    assert again.id == m.id and again.lease_token > m.lease_token and again.attempts == 2
    events = [e.type for e in (await store.get(m.id)).events]
    assert events == ["queued", "claimed", "lease_expired", "claimed"]


async def test_outcome_from_a_worker_that_lost_its_lease_is_rejected(store: Store) -> None:
    await store.enqueue([msg()])
    (old,) = await store.claim("w1", 1, 0.05)
    await asyncio.sleep(0.1)
    (new,) = await store.claim("w2", 1, 30)
    ok = await store.record([Outcome(new.id, new.lease_token, Status.SENT, provider="p")], worker="w2")
    late = await store.record([Outcome(old.id, old.lease_token, Status.FAILED, text="late")], worker="w1")
    assert ok == [True] and late == [False]
    rec = await store.get(new.id)
    assert rec.status is Status.SENT
    assert rec.events[-1].type == "stale_outcome"


async def test_extend_leases_keeps_a_slow_send_claimed(store: Store) -> None:
    await store.enqueue([msg()])
    (m,) = await store.claim("w1", 1, 0.2)
    await asyncio.sleep(0.1)
    assert await store.extend_leases("w1", [(m.id, m.lease_token)], 1.0) == 1
    await asyncio.sleep(0.15)
    assert await store.claim("w2", 1, 30) == []


async def test_retrying_message_is_claimed_again_only_when_due(store: Store) -> None:
    await store.enqueue([msg()])
    (m,) = await store.claim("w", 1, 30)
    await store.record(
        [Outcome(m.id, m.lease_token, Status.RETRYING, next_at=time.time() + 0.2, code=451, text="later",
                 events=[Event(m.id, "attempt_failed", code=451, detail="later")])],
        worker="w",
    )
    assert await store.claim("w", 1, 30) == []
    rec = await store.get(m.id)
    assert rec.status is Status.RETRYING and rec.last_code == 451
    await asyncio.sleep(0.25)
    (again,) = await store.claim("w", 1, 30)
    assert again.attempts == 2


async def test_scheduled_message_waits_for_send_at(store: Store) -> None:
    (r,) = await store.enqueue([msg(send_at=time.time() + 0.3)])
    assert r.status is Status.SCHEDULED
    assert await store.claim("w", 5, 30) == []
    await asyncio.sleep(0.35)
    assert [m.id for m in await store.claim("w", 5, 30)] == [r.id]


async def test_high_priority_is_claimed_first(store: Store) -> None:
    low = msg(1, priority="low")
    normal = msg(2)
    high = msg(3, priority="high")
    ids = [r.id for r in await store.enqueue([low, normal, high])]
    claimed = await store.claim("w", 3, 30)
    assert [c.id for c in claimed] == [ids[2], ids[1], ids[0]]
    assert claimed[0].priority is Priority.HIGH


async def test_idempotency_key_returns_the_first_message_or_conflicts(store: Store) -> None:
    a = validate_message({"from": "a@example.com", "to": ["b@example.org"], "text": "one"}, idempotency_key="k1")
    same = validate_message({"from": "a@example.com", "to": ["b@example.org"], "text": "one"}, idempotency_key="k1")
    other = validate_message({"from": "a@example.com", "to": ["b@example.org"], "text": "two"}, idempotency_key="k1")
    (first,) = await store.enqueue([a])
    (again,) = await store.enqueue([same])
    (clash,) = await store.enqueue([other])
    assert first.created and again.id == first.id and not again.created
    assert isinstance(clash, ConflictError)
    page = await store.list_messages(MessageFilter())
    assert len(page.items) == 1


async def test_cancel_only_what_has_not_started(store: Store) -> None:
    a, b = await store.enqueue([msg(1), msg(2, send_at=time.time() + 60)])
    rec = await store.cancel(b.id)
    assert rec.status is Status.CANCELLED and rec.events[-1].type == "cancelled"
    (m,) = await store.claim("w", 5, 30)
    assert m.id == a.id  # the cancelled one is never claimed
    with pytest.raises(ConflictError):
        await store.cancel(a.id)
    with pytest.raises(NotFound):
        await store.cancel("nope")


async def test_list_pages_newest_first_with_filters(store: Store) -> None:
    await store.enqueue([msg(i, tags=["news"] if i % 2 else ["receipt"]) for i in range(7)])
    page1 = await store.list_messages(MessageFilter(limit=3))
    page2 = await store.list_messages(MessageFilter(limit=3, cursor=page1.next_cursor))
    page3 = await store.list_messages(MessageFilter(limit=3, cursor=page2.next_cursor))
    got = [r.id for r in page1.items + page2.items + page3.items]
    assert len(got) == 7 and got == sorted(got, reverse=True) and page3.next_cursor is None
    news = await store.list_messages(MessageFilter(tag="news"))
    assert len(news.items) == 3
    to = await store.list_messages(MessageFilter(to="user4@example.org"))
    assert [r.content["to"] for r in to.items] == [["user4@example.org"]]
    assert len((await store.list_messages(MessageFilter(to="USER4@example.org"))).items) == 1
    assert len((await store.list_messages(MessageFilter(to="user4"))).items) == 1  # a part matches too


async def test_recipient_and_tag_filters_page_and_combine(store: Store) -> None:
    bodies = [
        msg(i, to=["ann@example.org"] if i % 3 else ["bob@example.org"], cc=["cc@example.org"],
            tags=["news", "weekly"] if i % 2 else ["receipt"])
        for i in range(12)
    ]
    ids = [r.id for r in await store.enqueue(bodies)]
    ann = [i for n, i in enumerate(ids) if n % 3]
    pages, cursor = [], None
    while True:
        page = await store.list_messages(MessageFilter(to="ann@example.org", limit=3, cursor=cursor))
        pages.extend(r.id for r in page.items)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert pages == sorted(ann, reverse=True)
    assert len((await store.list_messages(MessageFilter(to="cc@example.org", limit=50))).items) == 12
    both = await store.list_messages(MessageFilter(to="bob@example.org", tag="receipt", limit=50))
    assert sorted(r.id for r in both.items) == sorted(i for n, i in enumerate(ids) if n % 3 == 0 and n % 2 == 0)
    (first,) = await store.claim("w", 1, 30)
    sending = await store.list_messages(MessageFilter(tag="weekly", status=Status.SENDING, limit=50))
    assert [r.id for r in sending.items] == ([first.id] if ids.index(first.id) % 2 else [])


async def test_stats_count_by_status_and_recent_outcomes(store: Store) -> None:
    await store.enqueue([msg(i) for i in range(3)])
    (m,) = await store.claim("w", 1, 30)
    await store.record([Outcome(m.id, m.lease_token, Status.SENT)], worker="w")
    st = await store.stats()
    assert st["by_status"]["queued"] == 2 and st["by_status"]["sent"] == 1
    assert st["last_minute"]["sent"] == 1 and st["queue_depth"] == 2


async def test_api_keys_are_stored_as_hashes_and_can_be_revoked(store: Store) -> None:
    key, secret = await store.create_key("ci")
    assert (await store.verify_key(secret)).id == key.id  # type: ignore[union-attr]
    assert await store.verify_key(secret + "x") is None
    await store.revoke_key(key.id)  # type: ignore[attr-defined]
    assert await store.verify_key(secret) is None


async def test_workers_register_heartbeat_and_leave(store: Store) -> None:
    from postroom.domain.ports import WorkerInfo

    await store.heartbeat(WorkerInfo("h:1", "h", 1, started_at=time.time(), concurrency=8))
    await store.heartbeat(WorkerInfo("h:2", "h", 2, started_at=time.time(), in_flight=3, sent=10, failed=1))
    await store.heartbeat(WorkerInfo("h:1", "h", 1, started_at=time.time(), concurrency=8, sent=5))
    workers = {w.name: w for w in await store.list_workers()}
    assert set(workers) == {"h:1", "h:2"}
    assert workers["h:1"].sent == 5 and workers["h:2"].in_flight == 3 and workers["h:2"].failed == 1
    assert abs(workers["h:1"].heartbeat_at - time.time()) < 5
    await store.remove_worker("h:1")
    assert [w.name for w in await store.list_workers()] == ["h:2"]


async def test_leases_of_a_worker_with_a_stale_heartbeat_are_released_early(store: Store) -> None:
    from postroom.domain.ports import WorkerInfo

    await store.enqueue([msg(1), msg(2)])
    await store.heartbeat(WorkerInfo("dead", "h", 1, started_at=time.time()))
    (held,) = await store.claim("dead", 1, 600)
    await store.heartbeat(WorkerInfo("alive", "h", 2, started_at=time.time()))
    (other,) = await store.claim("alive", 1, 600)
    assert await store.release_stale(60) == 0  # both fresh
    await asyncio.sleep(0.3)
    await store.heartbeat(WorkerInfo("alive", "h", 2, started_at=time.time()))
    assert await store.release_stale(0.2) == 1  # only the dead worker's lease
    assert [w.name for w in await store.list_workers()] == ["alive"]
    (again,) = await store.claim("alive", 5, 600)  # claimable now, not in 600 s
    assert again.id == held.id and again.lease_token > held.lease_token
    late = await store.record([Outcome(held.id, held.lease_token, Status.SENT)], worker="dead")
    assert late == [False]
    assert (await store.get(other.id)).status is Status.SENDING


async def test_throughput_counts_outcomes_per_interval(store: Store) -> None:
    await store.enqueue([msg(i) for i in range(4)])
    claimed = await store.claim("w", 4, 30)
    statuses = [Status.SENT, Status.SENT, Status.FAILED, Status.RETRYING]
    await store.record(
        [Outcome(m.id, m.lease_token, s, next_at=time.time() + 60) for m, s in zip(claimed, statuses, strict=True)],
        worker="w",
    )
    series = await store.throughput(time.time() - 120, step_s=60)  # type: ignore[attr-defined]
    assert len(series) >= 2 and series == sorted(series, key=lambda p: p["t"])
    total = {k: sum(p[k] for p in series) for k in ("accepted", "sent", "failed", "retried")}
    assert total == {"accepted": 4, "sent": 2, "failed": 1, "retried": 1}
    st = await store.stats()
    assert st["last_minute"]["retried"] == 1 and st["last_hour"]["accepted"] == 4
