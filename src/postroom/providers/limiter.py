"""Rate limits: parsing ("14/s", "1000/h", "200ms") and GCRA, the one algorithm every backend runs.

Why GCRA and not a library: `limits` (the well-kept choice, moving window / sliding window counter
over memory, Redis, Memcached, MongoDB) was evaluated. It does not fit three needs here: a database
backend (we must share limits through SQLite / PostgreSQL when there is no Redis), sub-second fixed
gaps (`min_interval = "200ms"`), and reserving a slot in several limits at once (provider *and*
recipient domain) in one atomic step that also says *when* the slot is. GCRA (the generic cell rate
algorithm, as in redis-cell and go-redis/redis_rate) keeps one number per limit (the theoretical
arrival time, TAT), so the same few lines run in memory, in one Redis Lua script and in one SQL
transaction.

A `Limit` is an emission interval and a burst. With burst 1 (the default) slots are spaced at
least `interval_s` apart, so no sliding window of the period holds more slots than the rate allows.
Slots are absolute times (`Grant.at`) on one clock, the workers' (hosts sharing a limit should run
NTP, as they do anyway for TLS). Each window keeps a margin free (`MARGIN`, 5 % by default, at least
`MIN_SLACK_S`; `routing.rate_margin`): the slack it leaves (`Limit.slack_s`, 50 ms per second of
window) absorbs what moves a send off its slot between our clock and the receiver's: the event loop
waking late (the router gives up a slot it woke more than a quarter of the slack late for, see
`Router._take_slot`), a new connection, the scheduler of a busy host, the network. The receiver then
does not count more than the limit in any window of its own, which is what providers enforce.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["MARGIN", "Grant", "Limit", "gcra", "parse_interval", "parse_rate", "rate_window"]

MARGIN = 0.05  # the share of each window kept free (routing.rate_margin)
MIN_SLACK_S = 0.004  # timers wake up to ~1 ms late (epoll): below this a margin cannot hold

_UNITS_S = {
    "ms": 0.001,
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/|per)\s*(\d+(?:\.\d+)?)?\s*([a-z]+)\s*$", re.I)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*$", re.I)


def _unit_s(word: str) -> float | None:
    """Seconds in a unit name: "s", "sec", "seconds", "ms", "min", "hours"... (plurals too)."""
    word = word.lower()
    return _UNITS_S.get(word) or (_UNITS_S.get(word[:-1]) if word.endswith("s") else None)


def parse_rate(text: str) -> float:
    """`"14/s"`, `"1000/h"`, `"20 per minute"`, `"5/10s"` -> the interval between two sends, in s."""
    return rate_window(text)[0]


def rate_window(text: str) -> tuple[float, float]:
    """`"14/s"` -> (the interval between two sends, the window the count is over), in seconds."""
    m = _RATE.match(text)
    unit = _unit_s(m.group(3)) if m else None
    if m is None or unit is None:
        raise ValueError(f"{text!r} is not a rate; write it like '14/s', '1000/h' or '20/min'")
    count = float(m.group(1))
    if count <= 0:
        raise ValueError(f"{text!r}: the count must be positive")
    window_s = float(m.group(2) or 1) * unit
    return window_s / count, window_s


def parse_interval(text: str | float) -> float:
    """`"200ms"`, `"1.5s"`, `"2m"` (or a number of seconds) -> seconds."""
    if isinstance(text, int | float):
        return float(text)
    m = _DURATION.match(text)
    unit = _unit_s(m.group(2)) if m else None
    if m is None or unit is None:
        raise ValueError(f"{text!r} is not a duration; write it like '200ms', '2s' or '1m'")
    return float(m.group(1)) * unit


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit: `key` names the shared counter, e.g. ``provider:primary`` or ``domain:gmail.com``.

    `interval_s` is the (margin-adjusted) gap between two sends; `burst` sends may go at once."""

    key: str
    interval_s: float
    burst: int = 1
    label: str = ""  # what the timeline says: "rate 50/s", "min_interval 200ms"
    slack_s: float = 0.0  # how far a send may drift from its slot and still keep the limit

    @classmethod
    def rate(cls, key: str, rate: str, burst: int = 1, *, margin: float = MARGIN) -> Limit:
        interval_s, window_s = rate_window(rate)
        slack_s = max(window_s * margin, MIN_SLACK_S)
        count = window_s / interval_s
        return cls(key, (window_s + slack_s) / count, max(1, burst), f"rate {rate}", slack_s)

    @classmethod
    def gap(cls, key: str, interval: str | float, *, margin: float = MARGIN) -> Limit:
        gap_s = parse_interval(interval)
        slack_s = max(gap_s * margin, MIN_SLACK_S)
        return cls(key, gap_s + slack_s, 1, f"min_interval {interval}", slack_s)


@dataclass(frozen=True, slots=True)
class Grant:
    """The answer of an acquisition. `ok`: a slot is reserved at `at` (epoch s), `wait_s` from
    now (0: go now). Not `ok`: nothing was reserved; the first slot is `wait_s` away, held up by
    `limits[blocking]`."""

    ok: bool
    wait_s: float
    blocking: int = -1
    at: float = 0.0


def gcra(
    now: float,
    tats: Mapping[str, float],
    limits: Sequence[Limit],
    max_wait_s: float,
    cost: int = 1,
) -> tuple[Grant, dict[str, float]]:
    """Reserve one slot in every limit at once, or in none. Returns the grant and the new TATs.

    A slot in limit L conforms at `max(tat, t) - (burst - 1) * interval <= t`; the send time is
    the latest conforming time over all limits; each TAT then moves `cost` intervals past it (a
    send that may take longer to reach the receiver holds a wider slot)."""
    wait_s, blocking = 0.0, -1
    for i, lim in enumerate(limits):
        tat = max(tats.get(lim.key, now), now)
        w = tat - (lim.burst - 1) * lim.interval_s - now
        if w > wait_s:
            wait_s, blocking = w, i
    if wait_s > max_wait_s:
        return Grant(False, wait_s, blocking, now + wait_s), {}
    at = now + wait_s
    new = {lim.key: max(tats.get(lim.key, at), at) + lim.interval_s * cost for lim in limits}
    return Grant(True, wait_s, blocking, at), new
