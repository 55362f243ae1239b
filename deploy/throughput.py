"""Measure end-to-end throughput on PostgreSQL: HTTP API -> database -> N worker processes -> SMTP.

    python deploy/throughput.py --workers 4 --messages 20000

Starts Postfix's smtp-sink (the receiver: fast, keeps nothing), `postroom serve` (the API) and
`postroom worker --processes N` on a fresh database, posts the messages to the batch endpoint
(100 per request, 4 connections) while the workers deliver, and prints how fast messages were
accepted and how fast they went out (first POST to last message sent). Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.load import post_all

POSTROOM = [sys.executable, "-m", "postroom.cli"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def fetchval(url: str, q: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(q) or 0)
    finally:
        await conn.close()


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by `pid` and its children's live processes."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(d) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def postgres_cpu_s() -> float:
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        name, rest = raw.split("(", 1)[1].rsplit(")", 1)
        if name.startswith("postgres"):
            fields = rest.split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=1, help="worker processes")
    ap.add_argument(
        "--concurrency", type=int, default=64, help="sends in flight per worker process"
    )
    ap.add_argument("--apis", type=int, default=1, help="API processes")
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument(
        "--per-request", type=int, default=100, help="messages per POST (1 = single POSTs)"
    )
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432")
    args = ap.parse_args()

    db = f"postroom_throughput_{os.getpid()}"
    admin = f"{args.pg}/postgres"
    url = f"{args.pg}/{db}"
    asyncio.run(fetchval(admin, f'CREATE DATABASE "{db}"'))
    smtp_port = free_port()
    ports = [free_port() for _ in range(args.apis)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
    env.update(
        POSTROOM_DATABASE_URL=url,
        POSTROOM_PROVIDERS=f"smtp://127.0.0.1:{smtp_port}?pool_size=16",
        POSTROOM_LOG_LEVEL="warning",
    )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(
            subprocess.Popen(
                ["/usr/sbin/smtp-sink", "-u", "nobody", f"127.0.0.1:{smtp_port}", "1024"]
            )
        )
        subprocess.run([*POSTROOM, "migrate"], env=env, check=True, capture_output=True)
        key = subprocess.run(
            [*POSTROOM, "keys", "create", "--name", "bench"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        for p in ports:
            procs.append(subprocess.Popen([*POSTROOM, "serve", "--port", str(p)], env=env))
        for p in ports:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{p}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("the API did not start")
                time.sleep(0.2)
        procs.append(
            subprocess.Popen(
                [
                    *POSTROOM,
                    "worker",
                    "--processes",
                    str(args.workers),
                    "--concurrency",
                    str(args.concurrency),
                ],
                env=env,
            )
        )
        time.sleep(2.0)  # workers connected and idle
        roles = {
            "api": [p.pid for p in procs[1 : 1 + len(ports)]],
            "workers": [procs[-1].pid],
            "smtp-sink": [procs[0].pid],
        }
        cpu0 = {r: sum(cpu_s(p) for p in pids) for r, pids in roles.items()}
        pg0 = postgres_cpu_s()
        wall0 = time.monotonic()

        def body(i: int) -> dict[str, object]:
            return {
                "from": "Shop <shop@example.com>",
                "to": [f"Customer {i} <customer{i}@example.org>"],
                "subject": f"Your order #{i} has shipped",
                "text": f"Hello customer {i},\n\n" + "Your parcel is on its way. " * 60,
                "tags": ["bench"],
            }

        n, k = args.messages, args.per_request
        if k == 1:
            bodies: list[object] = [body(i) for i in range(n)]
            path = "/v1/messages"
        else:
            bodies = [
                {"messages": [body(i) for i in range(s, min(n, s + k))]} for s in range(0, n, k)
            ]
            path = "/v1/messages/batch"
        started = [0.0]
        results = []
        per_api = [bodies[i :: len(ports)] for i in range(len(ports))]

        def load(port: int, part: list[object]):  # type: ignore[no-untyped-def]
            return post_all(
                f"http://127.0.0.1:{port}{path}",
                part,
                concurrency=4 if k > 1 else 32,
                headers={"Authorization": f"Bearer {key}"},
                on_start=lambda: started.__setitem__(0, started[0] or time.monotonic()),
            )

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(ports)) as ex:
            results = list(ex.map(load, ports, per_api))
        accepted_at = time.monotonic()
        accepted = sum(r.accepted * (k if k > 1 else 1) for r in results)
        while True:
            sent = asyncio.run(
                fetchval(url, "SELECT coalesce(sum(n), 0) FROM throughput WHERE kind = 'sent'")
            )
            if sent >= n:
                break
            time.sleep(0.05)
        done = time.monotonic()
        cpu = {r: sum(cpu_s(p) for p in pids) - cpu0[r] for r, pids in roles.items()}
        cpu["postgres"] = postgres_cpu_s() - pg0
        t0 = started[0]
        print(
            f"workers={args.workers}x{args.concurrency} apis={args.apis} messages={n} per_request={k}: "
            f"accepted {accepted} in {accepted_at - t0:.2f}s ({accepted / (accepted_at - t0):.0f}/s), "
            f"all sent after {done - t0:.2f}s ({n / (done - t0):.0f}/s end to end)"
        )
        print(
            f"CPU seconds over {done - wall0:.1f}s: "
            + ", ".join(f"{r} {c:.1f} ({c / n * 1e6:.0f} us/msg)" for r, c in cpu.items())
        )
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        asyncio.run(fetchval(admin, f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))


if __name__ == "__main__":
    main()
