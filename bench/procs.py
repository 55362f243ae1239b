"""Child processes that are always stopped: own process group, bounded waits, cleanup at exit.

Every server or worker a scenario starts goes through :class:`ProcessGroup`,
which starts each child in a new session (so its own children share its
process group) and on :meth:`ProcessGroup.stop_all` sends SIGTERM to each
group, waits a bounded time, then SIGKILLs whatever is left. An ``atexit``
hook stops anything still registered if the harness itself dies of an
exception or Ctrl-C.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "Proc",
    "ProcessGroup",
    "group_cpu_s",
    "orphaned_cpu_s",
    "stop_process_group",
    "wait_until",
]

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")

_LIVE: weakref.WeakSet[ProcessGroup] = weakref.WeakSet()


_orphaned_cpu_s = 0.0


def orphaned_cpu_s() -> float:
    """CPU seconds of stopped children's descendants that no ``wait`` of ours accounted for.

    ``getrusage(RUSAGE_CHILDREN)`` only counts what was reaped along the chain
    back to us; a worker's pool process killed with its group and reaped by
    init is missing from it. :func:`stop_process_group` adds that part here so
    CPU accounting (the runner's "others" share) stays whole.
    """
    return _orphaned_cpu_s


def _reap(popen: subprocess.Popen[Any], timeout_s: float) -> float | None:
    """Wait for the child with ``wait4``; return its CPU seconds (with what it reaped), None on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            pid, status, usage = os.wait4(popen.pid, os.WNOHANG)
        except ChildProcessError:  # already reaped (by Popen.poll)
            popen.wait()
            return 0.0
        if pid == popen.pid:
            popen.returncode = os.waitstatus_to_exitcode(status)
            return float(usage.ru_utime + usage.ru_stime)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)


def stop_process_group(popen: subprocess.Popen[Any], grace_s: float = 5.0) -> int | None:
    """SIGTERM the child's process group, wait up to ``grace_s``, then SIGKILL it. Returns the exit code."""
    global _orphaned_cpu_s
    group_s = group_cpu_s(popen.pid) if popen.poll() is None else 0.0
    leader_s: float | None = 0.0
    if popen.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, signal.SIGTERM)
        leader_s = _reap(popen, grace_s)
    # Grandchildren (a Celery worker's pool, say) may outlive the leader: kill the group regardless.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, signal.SIGKILL)
    if popen.returncode is None:
        leader_s = _reap(popen, grace_s)
        if popen.returncode is None:
            return None
    if group_s and leader_s is not None:
        _orphaned_cpu_s += max(0.0, group_s - leader_s)
    return popen.returncode


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of a process group.

    Includes what their already-exited, reaped children used (``cutime``/``cstime``),
    so a Celery worker's pool or a forking sender is counted whole while it runs.
    """
    total_ticks = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2 :].split()
        # fields[0] is state (field 3 of stat); pgrp is field 5, utime..cstime are fields 14-17.
        if int(fields[2]) == pgid:
            total_ticks += sum(int(x) for x in fields[11:15])
    return total_ticks / _TICKS_PER_S


class Proc:
    """A started child: its Popen, its name and the file its output goes to."""

    def __init__(self, name: str, popen: subprocess.Popen[Any], log_path: Path | None) -> None:
        self.name = name
        self.popen = popen
        self.log_path = log_path
        self.exit_cpu_s: float | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n_chars: int = 2000) -> str:
        """The end of the child's output, for error messages."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - n_chars))
            return fh.read().decode("utf-8", "replace")

    def cpu_s(self) -> float:
        """CPU seconds used so far by this child's process group (call before stopping it)."""
        return group_cpu_s(self.pid)

    def wait(self, timeout_s: float, poll_s: float = 0.002) -> int:
        """Wait for a normal exit; raise TimeoutError (after killing the group) if it takes longer.

        Reaps with ``wait4`` so :attr:`exit_cpu_s` holds the CPU the child and
        its reaped descendants used in all.
        """
        deadline = time.monotonic() + timeout_s
        while self.popen.returncode is None:
            try:
                pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere (Popen.poll)
                self.popen.wait()
                break
            if pid == self.pid:
                self.popen.returncode = os.waitstatus_to_exitcode(status)
                self.exit_cpu_s = usage.ru_utime + usage.ru_stime
                break
            if time.monotonic() >= deadline:
                stop_process_group(self.popen)
                raise TimeoutError(f"{self.name} did not finish within {timeout_s:.0f} s")
            time.sleep(poll_s)
        code = self.popen.returncode
        if code is None:  # unreachable: the loop only ends once the child is reaped
            raise RuntimeError(f"{self.name}: no exit status")
        return int(code)


class ProcessGroup:
    """Owns the children started for one scenario run and stops them all, in reverse order."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[Proc] = []
        _LIVE.add(self)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        stdout: IO[Any] | None = None,
    ) -> Proc:
        """Start ``argv`` in its own session; output goes to ``<log_dir>/<name>.log`` unless ``stdout`` is given."""
        log_path: Path | None = None
        if stdout is None:
            log_path = self.log_dir / f"{name}.log"
            out: IO[Any] = log_path.open("ab")
        else:
            out = stdout
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        try:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=cwd,
                start_new_session=True,
            )
        finally:
            if stdout is None:
                out.close()  # the child has its own descriptor
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, grace_s: float = 5.0) -> int | None:
        code = stop_process_group(proc.popen, grace_s)
        with contextlib.suppress(ValueError):
            self.procs.remove(proc)
        return code

    def stop_all(self, grace_s: float = 5.0) -> None:
        while self.procs:
            self.stop(self.procs[-1], grace_s)


def _stop_everything() -> None:
    for group in list(_LIVE):
        group.stop_all(grace_s=2.0)


atexit.register(_stop_everything)


def wait_until(
    predicate: Any, *, timeout_s: float, interval_s: float = 0.05, what: str = "condition"
) -> float:
    """Poll ``predicate()`` until true; return the monotonic time it became true, or raise TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not reached within {timeout_s:.0f} s")
        time.sleep(interval_s)
