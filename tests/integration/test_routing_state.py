"""Routing state through every store (the `routing_state` table) and through Redis: one contract."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from postroom.domain.ports import Store
from postroom.providers.limiter import Limit
from postroom.providers.state import MemoryState, RedisState, RoutingState, StoreState
from tests.conftest import require_service


def second_store(store: Store) -> Store:
    """Another connection to the same database: what a second worker process has."""
    from postroom.store.sqlite import SQLiteStore

    if isinstance(store, SQLiteStore):
        return SQLiteStore(store.path, synchronous="NORMAL")
    from postroom.store.postgres import PostgresStore

    return PostgresStore(store.url, min_size=1, max_size=4, timeout_s=10)  # type: ignore[attr-defined]


async def test_state_update_reads_locks_and_writes_values_with_expiry(store: Store) -> None:
    def put(rows: dict[str, str]) -> tuple[dict[str, tuple[str, float | None]], dict[str, str]]:
        now = time.time()
        return {"t:a": ("1", None), "t:b": ("2", now + 60), "t:old": ("x", now - 1)}, rows

    assert await store.state_update(["t:a", "t:b"], put) == {}
    seen = await store.state_update(["t:a", "t:b", "t:old", "t:none"], lambda rows: ({}, rows))
    assert seen == {"t:a": "1", "t:b": "2"}  # the expired one is not live
    assert await store.state_scan("t:") == {"t:a": "1", "t:b": "2"}
    assert await store.state_scan("nothing:") == {}


async def test_concurrent_updates_of_one_key_from_two_connections_never_lose_one(
    store: Store,
) -> None:
    other = second_store(store)
    await other.open()
    try:

        def incr(rows: dict[str, str]) -> tuple[dict[str, tuple[str, float | None]], int]:
            n = int(rows.get("counter", "0")) + 1
            return {"counter": (str(n), None)}, n

        results = await asyncio.gather(
            *(s.state_update(["counter"], incr) for s in (store, other) for _ in range(40))
        )
        assert sorted(results) == list(range(1, 81))
    finally:
        await other.close()


async def test_rate_slots_are_shared_between_two_connections(store: Store) -> None:
    other = second_store(store)
    await other.open()
    states = [StoreState(store), StoreState(other)]
    try:
        lim = [Limit(f"k-{uuid.uuid4().hex}", 0.01)]
        grants = await asyncio.gather(*(st.acquire(lim, 10.0) for st in states for _ in range(30)))
        slots = sorted(g.at for g in grants)
        assert all(g.ok for g in grants)
        assert all(b - a >= 0.01 - 1e-6 for a, b in itertools.pairwise(slots))
        backlog = await states[0].backlog(lim)
        assert 0.3 < backlog[lim[0].key] <= 0.61
    finally:
        for st in states:
            await st.close()
        await other.close()


@pytest.fixture(params=["memory", "database", "redis"])
async def state(request: pytest.FixtureRequest, store: Store) -> AsyncIterator[RoutingState]:
    if request.param == "memory":
        st: RoutingState = MemoryState()
    elif request.param == "database":
        st = StoreState(store)
    else:
        require_service("Redis", "127.0.0.1", 6379)
        st = RedisState("redis://127.0.0.1:6379/0", prefix=f"postroom-test-{uuid.uuid4().hex}:")
    yield st
    await st.close()


async def test_every_backend_reserves_in_all_limits_or_none_and_keeps_values(
    state: RoutingState,
) -> None:
    fast, slow = Limit(f"f-{uuid.uuid4().hex}", 0.001), Limit(f"s-{uuid.uuid4().hex}", 10.0)
    first = await state.acquire([fast, slow], 1.0)
    assert first.ok and first.wait_s == 0 and abs(first.at - time.time()) < 1
    refused = await state.acquire([fast, slow], 1.0)
    assert not refused.ok and refused.blocking == 1 and 9 < refused.wait_s <= 10
    again = await state.acquire([fast], 1.0)
    assert again.ok and again.wait_s < 0.01  # the refused request took no slot of `fast`
    wide = await state.acquire([fast], 1.0, cost=5)
    after = await state.acquire([fast], 1.0)
    assert after.at - wide.at >= 5 * 0.001 - 1e-6

    value: dict[str, Any] = {"domain": "x.example", "n": 1}
    await state.put("throttle:x.example", value, 30)
    await state.put("throttle:gone.example", {"n": 2}, 0.001)
    await asyncio.sleep(0.01)
    assert await state.scan("throttle:") == {"throttle:x.example": value}
