"""The scenario registry: ``@scenario("name", ...)`` registers one function per scenario.

A scenario is a function ``(ctx: Context) -> Mapping[str, float]`` called once
per run; it returns that run's metrics. The runner repeats it, takes the
median and spread of every metric, and stops every process the run started.

Metric names carry their unit: ``*_per_s`` (a rate: compared against the
reference scenarios in the table), ``*_s`` (seconds), ``*_ms``
(milliseconds), ``*_mb`` (megabytes); anything else is a plain number.

Example, a Postroom scenario (the shape the Postroom ones will take)::

    from bench.registry import Context, scenario

    @scenario("deliver-sqlite", primary="delivered_per_s", messages=100_000,
              quick_messages=2_000, description="queued messages drained into smtp-sink")
    def deliver_sqlite(ctx: Context) -> dict[str, float]:
        sink = ctx.sink()                              # started, stopped after the run
        store = ...; store.enqueue(ctx.message_list())  # setup, untimed
        t0 = time.monotonic()
        worker = ctx.procs.start("worker", [...])      # stopped after the run
        t1 = sink.wait_for(ctx.messages, timeout_s=ctx.remaining_s(), stall_s=60)
        return {"delivered_per_s": ctx.messages / (t1 - t0)}

Put it in a module under ``bench/scenarios/`` and import that module in
``bench/scenarios/__init__.py``.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import messages as _messages
from bench.procs import ProcessGroup
from bench.sink import SMTPSink

__all__ = ["SCENARIOS", "Context", "Scenario", "ScenarioFn", "SetupFn", "scenario"]

ScenarioFn = Callable[["Context"], Mapping[str, float]]
SetupFn = Callable[["Context"], AbstractContextManager[Any]]


@dataclass(frozen=True)
class Scenario:
    """A registered scenario and its defaults."""

    name: str
    fn: ScenarioFn
    primary: str
    messages: int
    quick_messages: int
    description: str
    timeout_s: float = 600.0
    setup: SetupFn | None = None
    services: tuple[str, ...] = ()


SCENARIOS: dict[str, Scenario] = {}
"""Every registered scenario, in registration order (the order ``all`` runs them in)."""


def scenario(
    name: str,
    *,
    primary: str,
    messages: int,
    quick_messages: int,
    description: str = "",
    timeout_s: float = 600.0,
    setup: SetupFn | None = None,
    services: tuple[str, ...] = (),
) -> Callable[[ScenarioFn], ScenarioFn]:
    """Register ``fn`` as scenario ``name``.

    ``primary`` names the metric shown first and used for ratios; ``messages``
    and ``quick_messages`` are the default counts for a normal and a ``--quick``
    run; ``timeout_s`` bounds one run (the runner interrupts it after that);
    ``setup`` is an optional context-manager function run once before all runs
    (its ``yield`` value is ``ctx.state`` in every run, its exit is the teardown);
    ``services`` names the machine's shared services the scenario uses
    (``"rabbitmq"``, ``"postgres"``): their CPU is reported apart, not as other load.
    """

    def register(fn: ScenarioFn) -> ScenarioFn:
        if name in SCENARIOS:
            raise ValueError(f"scenario {name!r} registered twice")
        SCENARIOS[name] = Scenario(
            name=name,
            fn=fn,
            primary=primary,
            messages=messages,
            quick_messages=quick_messages,
            description=description or _first_line(fn.__doc__),
            timeout_s=timeout_s,
            setup=setup,
            services=services,
        )
        return fn

    return register


def _first_line(doc: str | None) -> str:
    lines = (doc or "").strip().splitlines()
    return lines[0] if lines else ""


@dataclass
class Context:
    """What a scenario run gets from the harness.

    ``messages`` is the message count for this scenario (its default, the
    ``--quick`` count or ``--messages``); ``run`` is the 0-based run index of
    ``runs``; ``work_dir`` is a fresh directory for this run (kept if the run
    fails); ``procs`` owns every child process and stops them after the run;
    ``state`` is what the scenario's ``setup`` yielded (``None`` without one);
    ``info`` takes strings worth recording with the results (versions, settings);
    ``verify`` is set by ``--verify`` (sinks dump messages, recipients are checked:
    slower, so figures from such a run are not for the table).
    """

    scenario: str
    messages: int
    runs: int
    run: int
    quick: bool
    work_dir: Path
    procs: ProcessGroup
    deadline: float
    state: Any = None
    info: dict[str, str] = field(default_factory=dict)
    verify: bool = False
    _sinks: list[SMTPSink] = field(default_factory=list, repr=False)
    _sent_bench_messages: bool = field(default=False, repr=False)

    def sink(self, *, dump: bool = False, extra_args: tuple[str, ...] = ()) -> SMTPSink:
        """Start an ``smtp-sink`` on a free loopback port; it is stopped when the run ends.

        With ``--verify`` the sink also dumps every message, and after the run the
        harness checks that each expected recipient arrived exactly once.
        """
        sink = SMTPSink(self.procs, self.work_dir, dump=dump or self.verify, extra_args=extra_args)
        sink.start()
        self._sinks.append(sink)
        return sink

    def verify_delivery(self) -> None:
        """Check the dumped recipients against ``user0…user{n-1}@example.com`` (``--verify`` only)."""
        if not self.verify or not self._sent_bench_messages or not self._sinks:
            return  # e.g. the limit scenario: smtp-source sends its own messages
        expected = {_messages.envelope(m)[1][0] for m in self.message_list()}
        for sink in self._sinks:
            got = sink.recipients()
            if len(got) == len(expected) and set(got) == expected:
                self.log(f"verified: {len(got):,} recipients, each exactly once")
                return
        counts = [len(s.recipients()) for s in self._sinks]
        raise AssertionError(f"delivery check failed: {len(expected)} expected, sinks got {counts}")

    def message_list(self, n: int | None = None, start: int = 0) -> list[dict[str, Any]]:
        """The benchmark messages (``bench.messages``), ``self.messages`` of them by default."""
        self._sent_bench_messages = True
        return _messages.generate(self.messages if n is None else n, start)

    def messages_file(self, n: int | None = None) -> Path:
        """The same messages as JSON lines in ``work_dir``, for processes in another venv."""
        path = self.work_dir / "messages.jsonl"
        self._sent_bench_messages = True
        return _messages.write_jsonl(path, self.messages if n is None else n)

    def remaining_s(self) -> float:
        """Seconds left of this run's time budget (use it as the bound of every wait)."""
        return max(0.0, self.deadline - time.monotonic())

    def log(self, text: str) -> None:
        print(f"  [{self.scenario} {self.run + 1}/{self.runs}] {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def no_setup(ctx: Context) -> Iterator[None]:
    yield None
