"""Postfix's ``smtp-sink`` as the one SMTP server every scenario delivers to, and ``smtp-source``.

The sink is started with ``-c``, which makes it print running counters
(``sess=A quit=B mesg=C`` followed by a carriage return) each time a
message's final ``.`` arrives or a session ends. Its stdout goes to a file;
:meth:`SMTPSink.count` reads the last record from the file's tail, which is
cheap (one small read) and exact, and costs the sink one small write per
message. ``dump=True`` adds ``-D`` so every message is appended to a file, for
checking *which* recipients arrived (slow: for verification, not for timing).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from bench.procs import Proc, ProcessGroup

__all__ = [
    "SMTP_SINK",
    "SMTP_SOURCE",
    "SMTPSink",
    "ensure_postfix_tools",
    "free_port",
]

SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"
SINK_BACKLOG = 1024
_COUNTER = re.compile(rb"mesg=(\d+)\r")
_RCPT = re.compile(rb"^X-Rcpt-Args: <?([^>\s]+)>?", re.MULTILINE)


def ensure_postfix_tools() -> None:
    """Install Debian's postfix (for smtp-sink / smtp-source) if they are missing.

    Preseeds "No configuration" so the package does not set up or start a mail
    server of its own; runs ``apt-get update`` only if the first install fails.
    """
    if os.access(SMTP_SINK, os.X_OK) and os.access(SMTP_SOURCE, os.X_OK):
        return
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"{SMTP_SINK} is missing and apt-get is not available: install Postfix")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(
        ["debconf-set-selections"],
        input=b"postfix postfix/main_mailer_type select No configuration\n",
        env=env,
        check=False,
        timeout=60,
    )
    install = ["apt-get", "install", "-y", "--no-install-recommends", "postfix"]
    if subprocess.run(install, env=env, check=False, timeout=600).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=True, timeout=600)
        subprocess.run(install, env=env, check=True, timeout=600)
    if not os.access(SMTP_SINK, os.X_OK):
        raise RuntimeError(f"installed postfix but {SMTP_SINK} is still missing")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SMTPSink:
    """One ``smtp-sink`` on 127.0.0.1, counting what it receives.

    Use it as a context manager (or call :meth:`start` / :meth:`stop`); the
    process is also owned by ``procs``, so it is stopped with the run even if
    the scenario forgets.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        procs: ProcessGroup,
        work_dir: Path,
        *,
        dump: bool = False,
        extra_args: tuple[str, ...] = (),
        start_timeout_s: float = 10.0,
    ) -> None:
        self.procs = procs
        self.work_dir = work_dir
        self.dump = dump
        self.extra_args = extra_args
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self.proc: Proc | None = None
        self.counter_path = work_dir / "smtp-sink.counters"
        self.dump_path = work_dir / "smtp-sink.dump"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __enter__(self) -> SMTPSink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        ensure_postfix_tools()
        last_error = ""
        for _ in range(5):  # a "free" port can be taken between our probe and the sink's bind
            self.port = free_port()
            argv = [SMTP_SINK, "-c", "-u", "nobody"]
            if self.dump:
                self.dump_path.parent.mkdir(parents=True, exist_ok=True)
                # The sink opens the dump after dropping to "nobody": the directory must let it.
                os.chmod(self.dump_path.parent, 0o777)
                argv += ["-D", str(self.dump_path)]
            argv += [*self.extra_args, f"{self.host}:{self.port}", str(SINK_BACKLOG)]
            with self.counter_path.open("wb") as out:
                self.proc = self.procs.start("smtp-sink", argv, stdout=out)
            try:
                self._wait_accepting()
                return
            except RuntimeError as e:
                last_error = str(e)
                self.stop()
        raise RuntimeError(f"smtp-sink did not start: {last_error}")

    def _wait_accepting(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if not self.proc.alive():
                raise RuntimeError(f"smtp-sink exited with {self.proc.popen.returncode}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1.0) as s:
                    if s.recv(64).startswith(b"220"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(
            f"smtp-sink not accepting on {self.address} after {self.start_timeout_s} s"
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc)
            self.proc = None

    def count(self) -> int:
        """Messages received so far (final ``.`` accepted), from the sink's own counter."""
        try:
            with self.counter_path.open("rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 256))
                tail = fh.read()
        except FileNotFoundError:
            return 0
        matches = _COUNTER.findall(tail)
        return int(matches[-1]) if matches else 0

    def wait_for(
        self, n: int, *, timeout_s: float, interval_s: float = 0.02, stall_s: float | None = None
    ) -> float:
        """Block until the sink has seen ``n`` messages; return the monotonic time it did.

        Raises TimeoutError after ``timeout_s``, or earlier if the count has not
        moved for ``stall_s`` seconds (a stuck peer fails fast instead of hanging).
        """
        deadline = time.monotonic() + timeout_s
        last, last_change = -1, time.monotonic()
        while True:
            c = self.count()
            now = time.monotonic()
            if c >= n:
                return now
            if c != last:
                last, last_change = c, now
            if now >= deadline:
                raise TimeoutError(f"sink saw {c} of {n} messages within {timeout_s:.0f} s")
            if stall_s is not None and now - last_change >= stall_s:
                raise TimeoutError(f"sink stuck at {c} of {n} messages for {stall_s:.0f} s")
            if self.proc is not None and not self.proc.alive():
                raise RuntimeError(f"smtp-sink died at {c} of {n} messages")
            time.sleep(interval_s)

    def recipients(self) -> list[str]:
        """Envelope recipients of every dumped message (needs ``dump=True``)."""
        if not self.dump:
            raise RuntimeError("recipients() needs SMTPSink(dump=True)")
        if not self.dump_path.exists():
            return []
        return [m.decode() for m in _RCPT.findall(self.dump_path.read_bytes())]
