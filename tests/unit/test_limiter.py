"""Rate parsing and GCRA: spacing, bursts, reservation, several limits at once."""

from __future__ import annotations

import pytest

from postroom.providers.limiter import MARGIN, Limit, gcra, parse_interval, parse_rate


@pytest.mark.parametrize(
    ("text", "interval_s"),
    [
        ("14/s", 1 / 14),
        ("1000/h", 3.6),
        ("20/min", 3.0),
        ("20 per minute", 3.0),
        ("5/10s", 2.0),
        ("2/sec", 0.5),
        ("86400/day", 1.0),
    ],
)
def test_parse_rate_gives_the_interval_between_two_sends(text: str, interval_s: float) -> None:
    assert parse_rate(text) == pytest.approx(interval_s)


@pytest.mark.parametrize("text", ["fast", "10", "0/s", "10/fortnight", "/s"])
def test_parse_rate_refuses_what_is_not_a_rate_and_says_how_to_write_one(text: str) -> None:
    with pytest.raises(ValueError, match=r"14/s|positive"):
        parse_rate(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("200ms", 0.2), ("1.5s", 1.5), ("2m", 120.0), ("1h", 3600.0), (0.25, 0.25)],
)
def test_parse_interval(text: str | float, seconds: float) -> None:
    assert parse_interval(text) == pytest.approx(seconds)


def test_gcra_spaces_sends_one_interval_apart_and_reserves_slots_within_max_wait() -> None:
    lim = Limit("k", 0.1)
    tats: dict[str, float] = {}
    waits = []
    for _ in range(5):
        grant, new = gcra(100.0, tats, [lim], max_wait_s=1.0)
        assert grant.ok
        tats.update(new)
        waits.append(round(grant.wait_s, 6))
    assert waits == [0.0, 0.1, 0.2, 0.3, 0.4]


def test_gcra_refuses_a_slot_beyond_max_wait_and_reserves_nothing() -> None:
    lim = Limit("k", 1.0)
    grant, tats = gcra(100.0, {}, [lim], max_wait_s=0.5)
    assert grant.ok and grant.wait_s == 0
    refused, new = gcra(100.0, tats, [lim], max_wait_s=0.5)
    assert not refused.ok and refused.wait_s == pytest.approx(1.0) and refused.blocking == 0
    assert new == {}
    later, _ = gcra(101.0, tats, [lim], max_wait_s=0.5)
    assert later.ok and later.wait_s == 0


def test_gcra_burst_lets_that_many_go_at_once_then_spaces_the_rest() -> None:
    lim = Limit("k", 0.1, burst=3)
    tats: dict[str, float] = {}
    waits = []
    for _ in range(5):
        grant, new = gcra(50.0, tats, [lim], max_wait_s=10)
        tats.update(new)
        waits.append(round(grant.wait_s, 6))
    assert waits == [0.0, 0.0, 0.0, 0.1, 0.2]


def test_gcra_takes_a_slot_in_every_limit_or_in_none() -> None:
    fast, slow = Limit("fast", 0.01), Limit("slow", 1.0)
    g1, tats = gcra(10.0, {}, [fast, slow], max_wait_s=0.5)
    assert g1.ok
    g2, new = gcra(10.0, tats, [fast, slow], max_wait_s=0.5)
    assert not g2.ok and g2.blocking == 1  # the slow one holds it up
    assert new == {}  # and the fast one kept its slot for others
    g3, _ = gcra(10.0, tats, [fast], max_wait_s=0.5)
    assert g3.ok and g3.wait_s == pytest.approx(0.01)


def test_a_limit_sends_never_more_than_its_rate_in_any_window() -> None:
    lim = Limit.rate("k", "50/s")
    assert lim.interval_s == pytest.approx((1 + MARGIN) / 50)
    tats: dict[str, float] = {}
    times = []
    now = 0.0
    for _ in range(500):
        grant, new = gcra(now, tats, [lim], max_wait_s=1.0)
        if grant.ok:
            tats.update(new)
            times.append(now + grant.wait_s)
        now += 0.001
    times.sort()
    assert all(times[i + 50] - times[i] >= 1.0 for i in range(len(times) - 50))
