"""Profile Postroom's processes under a benchmark's load with py-spy, and summarise where the time goes.

    .venv/bin/python -m bench.profile_postroom deliver-sqlite --messages 60000 --duration 10
    .venv/bin/python -m bench.profile_postroom end-to-end-sqlite|end-to-end-postgres|batch-ingest-sqlite|deliver-postgres

Sets the scenario up as ``bench/scenarios/postroom_*.py`` does (fresh database,
smtp-sink, real ``postroom`` subprocesses), runs ``py-spy record -f raw --gil``
on each Postroom process for ``--duration`` seconds while the load runs, writes
the raw collapsed stacks to ``--out`` and prints the top functions by self and
by inclusive samples. Every process it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from bench.load import post_all
from bench.procs import Proc, ProcessGroup
from bench.registry import Context
from bench.scenarios.postroom_common import (
    REPO,
    create_key,
    enqueue,
    fresh_database,
    provider_env,
    start_http,
    start_postroom,
)

PY_SPY = str(REPO / ".venv" / "bin" / "py-spy")


def summarise(raw: Path, top: int = 25) -> str:
    self_n: collections.Counter[str] = collections.Counter()
    incl_n: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        self_n[frames[-1]] += n
        for f in set(frames):
            incl_n[f] += n
    if not total:
        return f"{raw.name}: no samples"
    out = [f"{raw.name}: {total} samples (GIL held)", "  self:"]
    out += [f"    {100 * n / total:5.1f}%  {f}" for f, n in self_n.most_common(top)]
    out.append("  inclusive:")
    out += [f"    {100 * n / total:5.1f}%  {f}" for f, n in incl_n.most_common(top + 15)]
    return "\n".join(out)


def spy(
    pid: int, out: Path, duration: float, subprocesses: bool = False
) -> subprocess.Popen[bytes]:
    argv = [
        PY_SPY,
        "record",
        "-p",
        str(pid),
        "-d",
        str(int(duration)),
        "-f",
        "raw",
        "-o",
        str(out),
        "--gil",
        "--nonblocking",
    ]
    if subprocesses:
        argv.append("--subprocesses")
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("scenario")
    p.add_argument("--messages", type=int, default=60_000)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "postroom-profiles")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    kind = "postgres" if args.scenario.endswith("postgres") else "sqlite"
    work = Path(tempfile.mkdtemp(prefix=f"postroom-profile-{args.scenario}-"))
    procs = ProcessGroup(work)
    ctx = Context(
        scenario=args.scenario,
        messages=args.messages,
        runs=1,
        run=0,
        quick=False,
        work_dir=work,
        procs=procs,
        deadline=time.monotonic() + 900,
    )
    spies: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        with fresh_database(kind, work) as db:
            sink = ctx.sink()
            env = provider_env(sink)
            targets: dict[str, Proc] = {}
            load_url = ""
            key = ""
            if args.scenario.startswith("deliver"):
                enqueue(db, ctx.message_list())
                wargs = ["worker"] + (
                    ["--processes", str(args.processes)] if args.processes > 1 else []
                )
                targets["worker"] = start_postroom(ctx, "worker", db, *wargs, env=env)
                sink.wait_for(1, timeout_s=120)
            else:
                key = create_key(db)
                cmd = (
                    "run"
                    if (kind == "sqlite" and args.scenario.startswith("end-to-end"))
                    else "serve"
                )
                targets[cmd], base = start_http(ctx, cmd, db, cmd, env=env)
                if kind == "postgres" and args.scenario.startswith("end-to-end"):
                    targets["worker"] = start_postroom(ctx, "worker", db, "worker", env=env)
                load_url = base + (
                    "/v1/messages/batch" if "batch" in args.scenario else "/v1/messages"
                )
            if load_url:
                msgs = ctx.message_list()
                bodies: list[object] = (
                    [
                        json.dumps({"messages": msgs[i : i + 1000]}).encode()
                        for i in range(0, len(msgs), 1000)
                    ]
                    if "batch" in args.scenario
                    else [json.dumps(m).encode() for m in msgs]
                )
            else:
                bodies = []
            for name, proc in targets.items():
                out = args.out / f"{args.scenario}-{name}.txt"
                spies.append(
                    (spy(proc.pid, out, args.duration, subprocesses=args.processes > 1), out)
                )
            if load_url:
                t = threading.Thread(
                    target=post_all,
                    args=(load_url, bodies),
                    kwargs={
                        "concurrency": 4 if "batch" in args.scenario else args.concurrency,
                        "timeout_s": 600,
                        "headers": {"Authorization": f"Bearer {key}"},
                    },
                    daemon=True,
                )
                t.start()
            t0 = time.monotonic()
            c0 = sink.count()
            for s, _ in spies:
                s.wait(timeout=args.duration + 60)
            rate = (sink.count() - c0) / (time.monotonic() - t0)
            print(f"during the profile: sink {rate:,.0f} delivered/s")
            for name, proc in targets.items():
                print(f"{name}: cpu {proc.cpu_s():.1f} s")
            procs.stop_all()
    finally:
        for s, _ in spies:
            if s.poll() is None:
                s.kill()
                s.wait(5)
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    for s, out in spies:
        if out.exists():
            print(summarise(out))
        else:
            print(f"{out}: missing ({(s.stderr.read() if s.stderr else b'').decode()[-500:]})")


if __name__ == "__main__":
    main()
