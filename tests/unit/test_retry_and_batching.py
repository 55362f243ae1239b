"""Retry policy and group commit: pure logic."""

from __future__ import annotations

import asyncio
import random

from postroom.domain.batching import GroupCommit
from postroom.domain.ids import new_id
from postroom.domain.retry import RetryPolicy


def test_backoff_grows_exponentially_to_the_cap_with_bounded_jitter() -> None:
    p = RetryPolicy(first_delay_s=300, max_delay_s=3600, factor=2, jitter=0.2)
    rng = random.Random(1)
    for attempts, base in [(1, 300), (2, 600), (3, 1200), (4, 2400), (5, 3600), (9, 3600)]:
        d = p.delay_s(attempts, rng)
        assert base * 0.8 <= d <= base * 1.2


def test_no_retry_past_the_lifetime_and_retry_after_is_honoured() -> None:
    p = RetryPolicy(first_delay_s=10, max_delay_s=10, jitter=0, lifetime_s=100)
    assert p.next_attempt_at(now=1000, created_at=950, attempts=1) == 1010
    assert p.next_attempt_at(now=1045, created_at=950, attempts=3) is None
    assert p.next_attempt_at(now=1000, created_at=990, attempts=1, retry_after_s=60) == 1060


async def test_group_commit_batches_concurrent_callers_and_answers_each() -> None:
    calls: list[list[int]] = []

    async def write(items: list[int]) -> list[int | BaseException]:
        calls.append(list(items))
        await asyncio.sleep(0.01)
        return [ValueError(f"bad {i}") if i == 13 else i * 2 for i in items]

    gc: GroupCommit[int, int] = GroupCommit(write)
    results = await asyncio.gather(*[gc.submit(i) for i in range(50)], return_exceptions=True)
    assert results[7] == 14
    assert isinstance(results[13], ValueError) and str(results[13]) == "bad 13"
    assert len(calls) < 50 and sum(len(c) for c in calls) == 50  # coalesced
    await gc.close()


async def test_group_commit_hands_a_failed_write_to_every_caller_of_that_batch() -> None:
    async def write(items: list[int]) -> list[int]:
        raise ConnectionError("db away")

    gc: GroupCommit[int, int] = GroupCommit(write)
    results = await asyncio.gather(*[gc.submit(i) for i in range(3)], return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)


def test_ids_sort_by_creation_and_are_unique() -> None:
    ids = [new_id() for _ in range(5000)]
    assert ids == sorted(ids) and len(set(ids)) == 5000 and all(len(i) == 26 for i in ids)


def test_delay_is_never_negative_even_with_full_jitter() -> None:
    p = RetryPolicy(first_delay_s=10, jitter=1.0)
    assert all(p.delay_s(1, random.Random(i)) >= 0 for i in range(200))
