"""Runs registered scenarios: repeats, time bounds, cleanup, and median/min/max of every metric."""

from __future__ import annotations

import contextlib
import os
import pwd
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from bench.envinfo import environment
from bench.procs import ProcessGroup, orphaned_cpu_s
from bench.registry import Context, Scenario

__all__ = ["RunTimeout", "ScenarioResult", "run_scenario", "summarize"]


class RunTimeout(TimeoutError):
    """A run went past its scenario's time budget and was interrupted."""


@dataclass
class ScenarioResult:
    """What the runner learnt about one scenario in this invocation."""

    name: str
    description: str
    primary: str
    messages: int
    runs: int
    status: str = "ok"  # "ok" or "failed"
    error: str | None = None
    values: dict[str, list[float]] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    kept_dirs: list[str] = field(default_factory=list)
    busy_before_pct: list[float] = field(default_factory=list)
    other_during_pct: list[float] = field(default_factory=list)
    services_during_pct: list[float] = field(default_factory=list)
    discarded: int = 0

    def metrics(self) -> dict[str, dict[str, Any]]:
        return {name: summarize(vals) for name, vals in self.values.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "error": self.error,
            "description": self.description,
            "primary": self.primary,
            "messages": self.messages,
            "runs": self.runs,
            "runs_completed": max((len(v) for v in self.values.values()), default=0),
            "metrics": self.metrics(),
            "info": self.info,
            "environment": {
                **self.environment,
                "cpu_busy_before_each_run_pct": self.busy_before_pct,
                "cpu_used_by_others_during_each_run_pct": self.other_during_pct,
                "cpu_used_by_services_during_each_run_pct": self.services_during_pct,
                "disturbed_attempts_discarded": self.discarded,
            },
        }


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Median, min and max of one metric over the runs (the raw values kept too)."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "values": list(values),
    }


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Interrupt the block with RunTimeout after ``seconds`` (main thread only; SIGALRM)."""

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise RunTimeout(f"run exceeded its {seconds:.0f} s budget")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def cpu_busy_pct(sample_s: float = 1.0) -> float:
    """Share of all CPUs busy over ``sample_s`` (from /proc/stat), 0-100: how loaded the machine is."""

    def snap() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    total0, idle0 = snap()
    time.sleep(sample_s)
    total1, idle1 = snap()
    total = total1 - total0
    return 100.0 * (total - (idle1 - idle0)) / total if total > 0 else 0.0


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return total - idle, total


def _own_cpu_s() -> float:
    """CPU seconds of the harness and every child it has reaped (and what they reaped)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime + orphaned_cpu_s()


SERVICES = ("rabbitmq", "postgres")
"""The machine's shared services a scenario may declare it uses, by the user they run as."""


def _uid(user: str) -> int | None:
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


def _cpu_by_uid(uids: set[int]) -> dict[int, float]:
    """CPU seconds per owner uid, including children the processes reaped (short DB backends)."""
    ticks: dict[int, int] = dict.fromkeys(uids, 0)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            uid = entry.stat().st_uid
            if uid not in ticks:
                continue
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2 :].split()
        ticks[uid] += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    hz = os.sysconf("SC_CLK_TCK")
    return {uid: t / hz for uid, t in ticks.items()}


class OtherLoad:
    """How much of the machine others used while a run ran, in % of all CPUs.

    Machine-wide busy time from /proc/stat minus the CPU of the harness and its
    children is what others used. The shared services the scenario declares
    (RabbitMQ, PostgreSQL) are reported apart as "services": the scenario makes
    them busy itself, and other workloads may too (no way to tell those
    apart). Services the scenario does not use count as others.
    """

    def __init__(self, used_services: Sequence[str] = ()) -> None:
        users = {name: _uid(name) for name in SERVICES}
        self.used = {
            uid for name, uid in users.items() if uid is not None and name in used_services
        }
        self.uids = {uid for uid in users.values() if uid is not None}
        self.busy0, self.total0 = _cpu_jiffies()
        self.own0 = _own_cpu_s()
        self.by_uid0 = _cpu_by_uid(self.uids)

    def pcts(self) -> tuple[float, float]:
        """(others, used services) in % of all CPUs since construction."""
        busy1, total1 = _cpu_jiffies()
        hz = os.sysconf("SC_CLK_TCK")
        total_s = (total1 - self.total0) / hz
        if total_s <= 0:
            return 0.0, 0.0
        by_uid1 = _cpu_by_uid(self.uids)
        used_s = sum(by_uid1[u] - self.by_uid0.get(u, 0.0) for u in self.used)
        other_s = (busy1 - self.busy0) / hz - (_own_cpu_s() - self.own0) - used_s
        return max(0.0, 100.0 * other_s / total_s), max(0.0, 100.0 * used_s / total_s)


def wait_for_quiet(max_wait_s: float, busy_below_pct: float = 25.0) -> float:
    """Wait (at most ``max_wait_s``) until other work leaves the CPUs mostly idle; return the last busy %.

    Other workloads may share this machine; starting a run in a quiet moment
    removes much of the noise. The busy % is recorded with each run either way.
    """
    deadline = time.monotonic() + max_wait_s
    busy = cpu_busy_pct()
    while busy >= busy_below_pct and time.monotonic() < deadline:
        busy = cpu_busy_pct()
    return busy


def _log(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def run_scenario(
    sc: Scenario,
    *,
    runs: int,
    messages: int | None,
    quick: bool,
    timeout_s: float | None = None,
    quiet_wait_s: float = 0.0,
    verify: bool = False,
    max_others_pct: float = 100.0,
    retries: int = 0,
) -> ScenarioResult:
    """Run ``sc`` ``runs`` times and summarise; a failure is recorded, not raised.

    Each run gets a fresh work directory and process group; every process is
    stopped after the run whatever happened. The first failing run ends the
    scenario (its work directory is kept for the logs).

    The machine is shared: a run during which other processes used more than
    ``max_others_pct`` of the CPUs is repeated, up to ``retries`` times, and the
    least disturbed attempt is kept (the number discarded is recorded). A run
    that fails is also tried again while retries are left (not one that timed out).
    """
    n = messages if messages is not None else (sc.quick_messages if quick else sc.messages)
    budget_s = timeout_s if timeout_s is not None else sc.timeout_s
    result = ScenarioResult(
        name=sc.name,
        description=sc.description,
        primary=sc.primary,
        messages=n,
        runs=runs,
        environment=environment(),
    )
    _log(f"{sc.name}: {runs} run(s) of {n:,} messages")
    setup_dir = Path(tempfile.mkdtemp(prefix=f"postroom-bench-{sc.name}-setup-"))
    setup_procs = ProcessGroup(setup_dir)
    keep_setup = False
    try:
        with contextlib.ExitStack() as stack:
            state: Any = None
            if sc.setup is not None:
                setup_ctx = Context(
                    scenario=sc.name,
                    messages=n,
                    runs=runs,
                    run=-1,
                    quick=quick,
                    work_dir=setup_dir,
                    procs=setup_procs,
                    deadline=time.monotonic() + budget_s,
                    info=result.info,
                )
                with _time_limit(budget_s):
                    state = stack.enter_context(sc.setup(setup_ctx))
            for i in range(runs):
                best: tuple[float, float, float, dict[str, float]] | None = None
                for attempt in range(1 + max(0, retries)):
                    busy = wait_for_quiet(quiet_wait_s) if quiet_wait_s > 0 else cpu_busy_pct(0.5)
                    try:
                        metrics, others, services = _one_run(
                            sc, result, i, n, runs, quick, budget_s, state, verify
                        )
                    except Exception as e:
                        # Shared services get restarted by other people's tests now and then:
                        # a failed attempt is retried while retries are left (an earlier good
                        # attempt is kept if the last one fails); a timeout is final.
                        if isinstance(e, RunTimeout) or (attempt >= retries and best is None):
                            raise
                        result.discarded += 1
                        _log(
                            f"{sc.name} run {i + 1}/{runs} failed ({type(e).__name__}: {e}); run again"
                        )
                        continue
                    _log(
                        f"{sc.name} run {i + 1}/{runs} (machine {busy:.0f}% busy before; during: "
                        f"others {others:.0f}%, services {services:.0f}%): "
                        + _brief(metrics, sc.primary)
                    )
                    if best is None or others < best[1]:
                        if best is not None:
                            result.discarded += 1
                        best = (busy, others, services, metrics)
                    else:
                        result.discarded += 1
                    if others <= max_others_pct:
                        break
                    if attempt < retries:
                        _log(
                            f"{sc.name}: others used {others:.0f}% > {max_others_pct:.0f}%: run again"
                        )
                assert best is not None
                busy, others, services, metrics = best
                result.busy_before_pct.append(round(busy, 1))
                result.other_during_pct.append(round(others, 1))
                result.services_during_pct.append(round(services, 1))
                _record(result, metrics)
    except Exception as e:  # Ctrl-C and SIGTERM (SystemExit) pass through, after the cleanup below
        keep_setup = True
        result.status = "failed"
        result.error = f"{type(e).__name__}: {e}"
        _log(f"{sc.name} FAILED: {result.error}")
        traceback.print_exc(file=sys.stderr)
        if result.kept_dirs:
            _log(f"{sc.name}: logs kept in {', '.join(result.kept_dirs)}")
    finally:
        setup_procs.stop_all()
        if keep_setup:
            result.kept_dirs.append(str(setup_dir))
        else:
            shutil.rmtree(setup_dir, ignore_errors=True)
    return result


def _one_run(
    sc: Scenario,
    result: ScenarioResult,
    i: int,
    n: int,
    runs: int,
    quick: bool,
    budget_s: float,
    state: Any,
    verify: bool,
) -> tuple[dict[str, float], float, float]:
    """One run in a fresh work dir and process group: (metrics, others %, services %)."""
    work_dir = Path(tempfile.mkdtemp(prefix=f"postroom-bench-{sc.name}-{i + 1}-"))
    procs = ProcessGroup(work_dir)
    ctx = Context(
        scenario=sc.name,
        messages=n,
        runs=runs,
        run=i,
        quick=quick,
        work_dir=work_dir,
        procs=procs,
        deadline=time.monotonic() + budget_s,
        state=state,
        info=result.info,
        verify=verify,
    )
    ok = False
    load = OtherLoad(sc.services)
    try:
        with _time_limit(budget_s + 30):  # the scenario's own waits use the budget
            metrics = dict(sc.fn(ctx))
            ctx.verify_delivery()
        ok = True
    finally:
        procs.stop_all()
        others, services = load.pcts()
        if ok:
            shutil.rmtree(work_dir, ignore_errors=True)
        else:
            result.kept_dirs.append(str(work_dir))
    return metrics, others, services


def _record(result: ScenarioResult, metrics: Mapping[str, float]) -> None:
    for name, value in metrics.items():
        result.values.setdefault(name, []).append(float(value))


def _brief(metrics: Mapping[str, float], primary: str) -> str:
    ordered = [primary, *(k for k in metrics if k != primary)]
    return ", ".join(f"{k}={metrics[k]:,.1f}" for k in ordered if k in metrics)
