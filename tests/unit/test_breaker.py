"""The circuit breaker: opens on consecutive faults, one half-open probe after the cool-down."""

from __future__ import annotations

from postroom.providers.breaker import Breaker, BreakerState


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_n_consecutive_faults_only() -> None:
    b = Breaker(faults=3, cooldown_s=10, clock=Clock())
    b.fault("x")
    b.fault("x")
    b.success()  # the run is broken
    assert not b.fault("x") and not b.fault("x")
    assert b.state is BreakerState.CLOSED and b.allow() is None
    assert b.fault("x")
    assert b.state is BreakerState.OPEN
    assert "breaker open" in (b.allow() or "")


def test_open_breaker_lets_one_probe_through_after_the_cooldown_and_closes_on_success() -> None:
    clock = Clock()
    b = Breaker(faults=1, cooldown_s=10, clock=clock)
    b.fault("refused")
    clock.now += 9.9
    assert b.allow() is not None
    assert b.retry_in_s() > 0
    clock.now += 0.2
    assert b.allow() is None  # the probe
    assert b.state is BreakerState.HALF_OPEN
    assert "probe is in flight" in (b.allow() or "")  # everyone else still skips
    assert b.success()
    assert b.state is BreakerState.CLOSED and b.allow() is None


def test_a_failed_probe_opens_the_breaker_for_another_cooldown() -> None:
    clock = Clock()
    b = Breaker(faults=1, cooldown_s=10, clock=clock)
    b.fault("refused")
    clock.now += 11
    assert b.allow() is None
    assert b.fault("refused again")
    assert b.state is BreakerState.OPEN
    clock.now += 5
    assert b.allow() is not None


def test_an_abandoned_probe_frees_the_probe_slot() -> None:
    clock = Clock()
    b = Breaker(faults=1, cooldown_s=10, clock=clock)
    b.fault("x")
    clock.now += 11
    assert b.allow() is None
    b.abandon()
    assert b.allow() is None


def test_a_recipient_level_answer_to_the_probe_closes_the_breaker() -> None:
    clock = Clock()
    b = Breaker(faults=1, cooldown_s=10, clock=clock)
    b.fault("x")
    clock.now += 11
    assert b.allow() is None
    b.release()
    assert b.state is BreakerState.CLOSED
    assert b.total_sent == 0


def test_a_pause_skips_the_provider_without_counting_it_broken() -> None:
    clock = Clock()
    b = Breaker(faults=1, cooldown_s=10, clock=clock)
    assert not b.fault("429", pause_s=5)
    assert b.state is BreakerState.CLOSED
    assert "paused" in (b.allow() or "")
    assert b.snapshot()["state"] == "paused"
    clock.now += 5.1
    assert b.allow() is None


def test_snapshot_counts_recent_sends_and_faults() -> None:
    clock = Clock()
    b = Breaker(faults=5, cooldown_s=10, window_s=60, clock=clock)
    for _ in range(3):
        b.success()
    b.fault("x")
    snap = b.snapshot()
    assert snap["recent"] == {"window_s": 60, "sent": 3, "faults": 1}
    clock.now += 120
    b.success()
    snap = b.snapshot()
    assert snap["recent"]["sent"] == 1 and snap["recent"]["faults"] == 0
    assert snap["total"] == {"sent": 4, "faults": 1}
    assert snap["last_error"] == "x"
