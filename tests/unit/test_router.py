"""The router: failover, breakers, rate limits, domain limits and throttles, and its cost."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from postroom.domain.errors import Deferred, PermanentError, ProviderFault, TransientError
from postroom.domain.model import Address, Content, Event, Outgoing, Receipt
from postroom.providers.breaker import Breaker
from postroom.providers.limiter import Limit
from postroom.providers.router import DomainLimits, FailoverRouter, Route, Router, RoutingStatus
from postroom.providers.state import MemoryState
from postroom.providers.throttle import Throttler
from postroom.testing import RecordingProvider


def msg(i: int = 1, to: str = "user@example.com") -> Outgoing:
    c = Content(
        Address("app@sender.test"), [Address(to)], "hi", f"<m{i}@sender.test>", text="hello"
    )
    return Outgoing(f"m{i}", c, b"Subject: hi\r\n\r\nhello\r\n")


def fault(_: Outgoing) -> ProviderFault:
    return ProviderFault("connection refused")


async def test_a_provider_fault_fails_over_to_the_next_provider_in_the_same_attempt() -> None:
    a, b = RecordingProvider("a", outcome=fault), RecordingProvider("b")
    router = FailoverRouter([a, b])
    trail: list[Event] = []
    receipt = await router.send(msg(), trail)
    assert receipt.provider == "b"
    assert len(a.attempts) == 1 and len(b.sent) == 1
    assert [(e.type, e.provider, e.detail) for e in trail] == [
        ("provider_fault", "a", "connection refused")
    ]


@pytest.mark.parametrize(
    "error",
    [
        PermanentError("5.1.1 no such user", code=550),
        TransientError("4.2.2 mailbox full", code=452),
    ],
)
async def test_a_recipient_level_answer_never_touches_the_next_provider(error: Exception) -> None:
    a, b = RecordingProvider("a", outcome=lambda _: error), RecordingProvider("b")  # type: ignore[arg-type,return-value]
    router = FailoverRouter([a, b])
    with pytest.raises(type(error)) as info:
        await router.send(msg(), [])
    assert info.value.provider == "a"  # type: ignore[attr-defined]
    assert b.attempts == []


async def test_when_every_provider_faults_the_message_gets_a_transient_error() -> None:
    router = FailoverRouter(
        [RecordingProvider("a", outcome=fault), RecordingProvider("b", outcome=fault)]
    )
    trail: list[Event] = []
    with pytest.raises(TransientError, match="no provider could take the message") as info:
        await router.send(msg(), trail)
    assert not isinstance(info.value, ProviderFault)
    assert [e.provider for e in trail] == ["a", "b"]


async def test_the_breaker_opens_skips_the_provider_and_closes_after_a_successful_probe() -> None:
    broken = {"on": True}
    a = RecordingProvider("a", outcome=lambda m: ProviderFault("refused") if broken["on"] else None)
    b = RecordingProvider("b")
    router = Router([Route(a, breaker=Breaker(faults=2, cooldown_s=0.2)), Route(b)])
    trails = []
    for i in range(5):
        trail: list[Event] = []
        assert (await router.send(msg(i), trail)).provider == "b"
        trails.append(trail)
    assert len(a.attempts) == 2  # then the breaker opened
    assert "breaker opened" in (trails[1][0].detail or "")
    assert trails[4][0].type == "provider_skipped" and "breaker open" in (trails[4][0].detail or "")
    broken["on"] = False
    await asyncio.sleep(0.25)
    trail = []
    assert (await router.send(msg(9), trail)).provider == "a"  # the probe
    assert [e.type for e in trail] == ["breaker_closed"]
    assert (await router.send(msg(10), [])).provider == "a"
    assert router.routes[0].breaker.state == "closed"


async def test_all_breakers_open_is_a_transient_error_for_the_message() -> None:
    a = RecordingProvider("a", outcome=fault)
    router = Router([Route(a, breaker=Breaker(faults=1, cooldown_s=60))])
    with pytest.raises(TransientError):
        await router.send(msg(1), [])
    with pytest.raises(TransientError, match="no provider available: a: breaker open"):
        await router.send(msg(2), [])
    assert len(a.attempts) == 1


async def test_a_provider_over_its_rate_is_skipped_for_the_next_one() -> None:
    a, b = RecordingProvider("a"), RecordingProvider("b")
    router = Router([Route(a, [Limit.rate("a", "1/s")]), Route(b)], max_wait_s=0)
    assert (await router.send(msg(1), [])).provider == "a"
    trail: list[Event] = []
    assert (await router.send(msg(2), trail)).provider == "b"
    assert trail[0].type == "provider_skipped" and "rate 1/s" in (trail[0].detail or "")


async def test_when_every_provider_is_only_rate_limited_the_message_is_deferred_to_the_next_slot() -> (
    None
):
    a = RecordingProvider("a")
    router = Router([Route(a, [Limit.rate("a", "2/s")])], max_wait_s=0)
    await router.send(msg(1), [])
    t0 = time.time()
    with pytest.raises(Deferred) as info:
        await router.send(msg(2), [])
    assert t0 + 0.4 < info.value.until < t0 + 0.7
    assert "rate 2/s" in info.value.reason
    # deferred messages are spread over the coming slots, not all sent back at once
    untils = []
    for i in range(3, 7):
        with pytest.raises(Deferred) as more:
            await router.send(msg(i), [])
        untils.append(more.value.until)
    assert all(later - earlier > 0.4 for earlier, later in itertools.pairwise(untils))


async def test_a_slot_within_max_wait_is_waited_for_not_deferred() -> None:
    a = RecordingProvider("a")
    router = Router([Route(a, [Limit.gap("a", "50ms")])], max_wait_s=1.0)
    t0 = time.monotonic()
    await asyncio.gather(*(router.send(msg(i), []) for i in range(5)))
    assert time.monotonic() - t0 >= 4 * 0.05
    assert len(a.sent) == 5


async def test_a_domain_over_its_limit_is_deferred_without_trying_another_provider() -> None:
    a, b = RecordingProvider("a"), RecordingProvider("b")
    domains = DomainLimits({"gmail.com": [Limit.rate("x", "1/s")]})
    router = Router([Route(a), Route(b)], domains=domains, max_wait_s=0)
    await router.send(msg(1, "x@gmail.com"), [])
    with pytest.raises(Deferred, match=r"domain gmail\.com"):
        await router.send(msg(2, "y@GMAIL.com"), [])
    assert (await router.send(msg(3, "z@outlook.com"), [])).provider == "a"  # others go on
    assert len(a.sent) == 2 and b.attempts == []


async def test_the_default_domain_limit_gives_each_domain_its_own_counter() -> None:
    a = RecordingProvider("a")
    router = Router([Route(a)], domains=DomainLimits({}, [Limit.rate("x", "1/min")]), max_wait_s=0)
    await router.send(msg(1, "a@one.test"), [])
    await router.send(msg(2, "a@two.test"), [])
    with pytest.raises(Deferred):
        await router.send(msg(3, "b@one.test"), [])


async def test_a_failover_does_not_take_the_domain_slot_twice() -> None:
    a, b = RecordingProvider("a", outcome=fault), RecordingProvider("b")
    router = Router(
        [Route(a), Route(b)], domains=DomainLimits({"x.test": [Limit.rate("x", "1/min")]})
    )
    assert (await router.send(msg(1, "u@x.test"), [])).provider == "b"


async def test_a_429_pauses_the_provider_for_its_retry_after() -> None:
    a = RecordingProvider(
        "a", outcome=lambda _: ProviderFault("slow down", code=429, retry_after_s=30)
    )
    b = RecordingProvider("b")
    router = Router([Route(a), Route(b)])
    assert (await router.send(msg(1), [])).provider == "b"
    trail: list[Event] = []
    assert (await router.send(msg(2), trail)).provider == "b"
    assert len(a.attempts) == 1
    assert "paused" in (trail[0].detail or "")
    assert router.routes[0].breaker.state == "closed"


async def test_only_a_paused_provider_defers_the_message_until_the_pause_ends() -> None:
    a = RecordingProvider(
        "a", outcome=lambda _: ProviderFault("slow down", code=429, retry_after_s=30)
    )
    router = Router([Route(a)])
    with pytest.raises(TransientError):
        await router.send(msg(1), [])
    with pytest.raises(Deferred) as info:
        await router.send(msg(2), [])
    assert info.value.until == pytest.approx(time.time() + 30, abs=1)


async def test_a_451_slows_the_domain_down_and_a_named_delay_pauses_it() -> None:
    state = MemoryState()
    replies: dict[str, Exception | None] = {
        "x@slow.test": TransientError("4.7.0 try again later", code=451)
    }
    a = RecordingProvider("a", outcome=lambda m: replies.get(m.rcpt_to[0]))  # type: ignore[arg-type,return-value]
    throttler = Throttler(state, initial_interval_s=0.5, recover_s=60)
    router = Router([Route(a)], state=state, throttler=throttler, max_wait_s=0)
    trail: list[Event] = []
    with pytest.raises(TransientError):
        await router.send(msg(1, "x@slow.test"), trail)
    assert trail[-1].type == "domain_throttled" and "slow.test: one message per 0.5s" in (
        trail[-1].detail or ""
    )
    replies.clear()
    await router.send(msg(2, "y@slow.test"), [])
    with pytest.raises(Deferred, match=r"throttled to one per 0\.5s"):
        await router.send(msg(3, "z@slow.test"), [])
    await router.send(msg(4, "z@fast.test"), [])  # other domains are not touched

    replies["p@slow.test"] = TransientError("try again in 5 minutes", code=451, retry_after_s=300)
    await asyncio.sleep(0.5)
    with pytest.raises(TransientError):
        await router.send(msg(5, "p@slow.test"), [])
    with pytest.raises(Deferred, match=r"domain slow\.test is throttled") as info:
        await router.send(msg(6, "q@slow.test"), [])
    assert info.value.until == pytest.approx(time.time() + 300, abs=2)
    view = {d["domain"]: d for d in throttler.view()}
    assert view["slow.test"]["state"] == "paused" and view["slow.test"]["signals"] == 2
    assert view["slow.test"]["min_interval_s"] == 1.0  # doubled


def test_a_throttle_recovers_by_halving_its_gap() -> None:
    from postroom.providers.throttle import DomainThrottle

    t = DomainThrottle("d", interval_s=4.0, since=100.0)
    assert t.gap_s(100.0, recover_s=10, floor_s=0.5) == 4.0
    assert t.gap_s(111.0, recover_s=10, floor_s=0.5) == 2.0
    assert t.gap_s(121.0, recover_s=10, floor_s=0.5) == 1.0
    assert t.gap_s(131.0, recover_s=10, floor_s=0.5) == 0.5
    assert t.gap_s(141.0, recover_s=10, floor_s=0.5) == 0.0
    assert t.ends_at(recover_s=10, floor_s=0.5) <= 141.0


async def test_throttles_are_shared_through_the_routing_state() -> None:
    state = MemoryState()
    one, two = Throttler(state, refresh_s=0), Throttler(state, refresh_s=0)
    await one.signal(["shared.test"], TransientError("later", code=421, retry_after_s=60))
    await two.refresh(force=True)
    pause, who, _ = two.check(["shared.test"], time.time())
    assert who == "shared.test" and pause > time.time() + 50


async def test_routing_status_shows_breakers_counts_and_limits() -> None:
    state = MemoryState()
    a = RecordingProvider("a", outcome=fault)
    b = RecordingProvider("b")
    lim = Limit.rate("provider:b:rate", "100/s")
    router = Router([Route(a, breaker=Breaker(faults=1)), Route(b, [lim])], state=state, name="w1")
    for i in range(3):
        await router.send(msg(i), [])
    await router.publish()
    status = RoutingStatus(state, providers=[("a", "recording", []), ("b", "recording", [lim])])
    items = {p["name"]: p for p in await status.providers()}
    assert items["a"]["state"] == "open" and items["a"]["recent"]["faults"] == 1
    assert items["b"]["state"] == "closed" and items["b"]["recent"]["sent"] == 3
    assert items["b"]["rate_limits"][0]["limit"] == "rate 100/s"
    assert items["b"]["workers"][0]["worker"] == "w1"
    await router.close()


class Instant:
    name = "instant"
    kind = "test"

    async def send(self, message: Outgoing) -> Receipt:
        return Receipt("instant", 250, "ok")

    async def close(self) -> None:
        return None


async def test_router_overhead_without_limits_is_a_few_microseconds() -> None:
    """The router is on every message's path: with no limits configured it must add ~nothing."""
    provider = Instant()
    router = Router([Route(provider)], throttler=Throttler(MemoryState()))
    m = msg()
    n = 20_000

    async def bare() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            await provider.send(m)
        return time.perf_counter() - t0

    async def routed() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            await router.send(m, [])
        return time.perf_counter() - t0

    bare_s = min([await bare() for _ in range(3)])
    routed_s = min([await routed() for _ in range(3)])
    overhead_us = (routed_s - bare_s) / n * 1e6
    print(f"router overhead without limits: {overhead_us:.2f} us/message")
    assert overhead_us < 20  # measured ~1-2 us on the 2-core box; generous for noisy CI
    await router.close()


@pytest.mark.parametrize(
    ("error", "throttles"),
    [
        (TransientError("4.7.0 too many messages, slow down", code=421), True),
        (TransientError("4.7.1 try again later", code=451), True),
        (TransientError("mailbox busy", code=450), True),
        (
            TransientError(
                "4.2.2 mailbox full, try again in 10 minutes", code=452, retry_after_s=600
            ),
            True,
        ),
        (TransientError("4.7.1 Greylisted, please try again later", code=451), False),
        (TransientError("4.2.2 mailbox full", code=452), False),
        (ProviderFault("421 service closing", code=421), False),
    ],
)
def test_which_answers_slow_a_domain_down(error: TransientError, throttles: bool) -> None:
    from postroom.providers.throttle import signals_throttle

    assert signals_throttle(error) is throttles
