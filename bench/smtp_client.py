"""SMTPProvider alone against Postfix ``smtp-sink``: messages per second, MIME built beforehand.

    .venv/bin/python -m bench.smtp_client                       # 20,000 x ~2 KB, 16 connections
    .venv/bin/python -m bench.smtp_client --loop uvloop --runs 3
    .venv/bin/python -m bench.smtp_client --sink-args=-p        # a sink without PIPELINING
    .venv/bin/python -m bench.smtp_client --reference           # and smtp-source (C), run by run
    .venv/bin/python -m bench.smtp_client --senders 64          # more sends waiting than sessions

Starts ``/usr/sbin/smtp-sink -u nobody 127.0.0.1:<free port> 1024`` (or uses ``--port``), sends
every message through one SMTPProvider with ``--connections`` pooled sessions and ``--senders``
sender tasks (as many as connections unless given; more than that is a worker whose concurrency
exceeds its pool, where sends wait for sessions and the next one's envelope can ride on the
previous message's write), and checks that every send came back with a 250 receipt. The time
covers the sends only (sessions are opened inside the timed part, as in a worker's first batch).
Each run waits (up to ``--quiet-wait`` s) for the shared machine to be quiet and prints how busy
it was, the client's CPU time per message (user + system: steadier than the rate on a busy
machine) and, with ``--reference``, the rate of ``smtp-source`` with as many sessions measured
just before it.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from email.header import Header
from email.utils import formataddr, formatdate, parseaddr
from pathlib import Path

from bench.messages import envelope, iter_messages
from bench.procs import ProcessGroup
from bench.runner import wait_for_quiet
from bench.sink import SINK_BACKLOG, SMTP_SINK, SMTP_SOURCE, ensure_postfix_tools, free_port
from postroom.domain.model import Address, Content, Outgoing
from postroom.providers.smtp import SMTPProvider


def _header(value: str) -> str:
    return value if value.isascii() else Header(value, "utf-8").encode()


def build(n: int) -> list[Outgoing]:
    """The bench messages as ready-made MIME (a string template; not part of the timing)."""
    date = formatdate(localtime=False)
    out = []
    for i, m in enumerate(iter_messages(n)):
        sender, rcpts = envelope(m)
        to_name, to_addr = parseaddr(m["to"][0])
        from_name, _ = parseaddr(m["from"])
        mid = f"<bench-{i}@example.com>"
        mime = (
            f"From: {formataddr((from_name, sender))}\r\n"
            f"To: {formataddr((to_name, to_addr))}\r\n"
            f"Subject: {_header(m['subject'])}\r\n"
            f"Date: {date}\r\nMessage-ID: {mid}\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            + m["text"].replace("\n", "\r\n")
        ).encode()
        content = Content(
            sender=Address(sender),
            to=[Address(a) for a in rcpts],
            subject=m["subject"],
            message_id=mid,
        )
        out.append(Outgoing(str(i), content, mime))
    return out


async def run_once(
    messages: list[Outgoing], port: int, connections: int, senders: int | None = None
) -> tuple[float, int]:
    """The time to send every message, and how many envelopes rode on a previous message's write."""
    provider = SMTPProvider(
        "bench", host="127.0.0.1", port=port, pool_size=connections, helo_name="bench.example"
    )
    it: Iterator[Outgoing] = iter(messages)
    ok = 0

    async def sender() -> None:
        nonlocal ok
        for m in it:
            receipt = await provider.send(m)
            ok += receipt.code == 250

    try:
        started = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for _ in range(senders or connections):
                tg.create_task(sender())
        elapsed = time.perf_counter() - started
    finally:
        await provider.close()
    if ok != len(messages):
        raise RuntimeError(f"only {ok} of {len(messages)} sends got a 250 receipt")
    return elapsed, getattr(provider, "pipelined_transactions", 0)


def wait_accepting(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
                if s.recv(64).startswith(b"220"):
                    return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"smtp-sink not accepting on 127.0.0.1:{port}")


def reference(port: int, n: int, sessions: int) -> float:
    started = time.perf_counter()
    subprocess.run(
        [SMTP_SOURCE, "-s", str(sessions), "-m", str(n), "-l", "2000", "-d", f"127.0.0.1:{port}"],
        check=True,
    )
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-n", "--messages", type=int, default=20_000)
    ap.add_argument("-c", "--connections", type=int, default=16)
    ap.add_argument(
        "-s", "--senders", type=int, default=0, help="sender tasks (default: --connections)"
    )
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    ap.add_argument(
        "--port", type=int, default=0, help="use a running sink instead of starting one"
    )
    ap.add_argument(
        "--sink-args", default="", help="extra smtp-sink flags, e.g. -p (no PIPELINING)"
    )
    ap.add_argument("--reference", action="store_true", help="also time smtp-source into the sink")
    ap.add_argument("--quiet-wait", type=float, default=30.0, metavar="S")
    args = ap.parse_args()

    messages = build(args.messages)
    size = statistics.mean(len(m.mime) for m in messages)
    senders = args.senders or args.connections
    print(
        f"{len(messages)} messages, {size:.0f} bytes on average, {args.connections} connections, "
        f"{senders} senders"
    )

    with tempfile.TemporaryDirectory(prefix="smtp-client-bench-") as tmp:
        procs = ProcessGroup(Path(tmp))
        try:
            port = args.port
            if not port:
                ensure_postfix_tools()
                port = free_port()
                argv = [SMTP_SINK, "-u", "nobody", *args.sink_args.split()]
                procs.start("smtp-sink", [*argv, f"127.0.0.1:{port}", str(SINK_BACKLOG)])
                wait_accepting(port)
            if args.loop == "uvloop":
                import uvloop

                runner = uvloop.run
            else:
                runner = asyncio.run
            rates, ratios = [], []
            for i in range(args.runs):
                busy = wait_for_quiet(args.quiet_wait)
                line = f"run {i + 1} (machine {busy:.0f}% busy before):"
                if args.reference:
                    ref = args.messages / reference(port, args.messages, args.connections)
                    line += f" smtp-source {ref:,.0f} msg/s;"
                before = resource.getrusage(resource.RUSAGE_SELF)
                elapsed, pipelined = runner(run_once(messages, port, args.connections, senders))
                after = resource.getrusage(resource.RUSAGE_SELF)
                cpu_us = (
                    ((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
                    / len(messages)
                    * 1e6
                )
                rates.append(len(messages) / elapsed)
                line += (
                    f" SMTPProvider ({args.loop}) {rates[-1]:,.0f} msg/s, {cpu_us:.0f} us CPU/msg"
                    f" ({pipelined / len(messages):.0%} pipelined behind the previous message)"
                )
                if args.reference:
                    ratios.append(rates[-1] / ref)
                    line += f" = {ratios[-1]:.2f} x smtp-source"
                print(line, flush=True)
            print(f"median: {statistics.median(rates):,.0f} msg/s", end="")
            print(f", {statistics.median(ratios):.2f} x smtp-source" if ratios else "")
            # On a shared machine the best run is the one least disturbed by others' work.
            print(f"best: {max(rates):,.0f} msg/s", end="")
            print(f", {max(ratios):.2f} x smtp-source" if ratios else "")
        finally:
            procs.stop_all()


if __name__ == "__main__":
    sys.exit(main())
