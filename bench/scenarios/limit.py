"""The machine's limit: Postfix ``smtp-source`` → ``smtp-sink``, C to C, 20 reused sessions."""

from __future__ import annotations

import time

from bench.registry import Context, scenario
from bench.sink import SMTP_SOURCE

SESSIONS = 20
PAYLOAD_B = 2000


@scenario(
    "limit",
    primary="messages_per_s",
    messages=50_000,
    quick_messages=2_000,
    description=f"smtp-source -s {SESSIONS} -l {PAYLOAD_B} -d → smtp-sink (C to C, sessions reused)",
)
def limit(ctx: Context) -> dict[str, float]:
    """What this machine can push through SMTP on loopback at all: the ceiling for every ratio."""
    sink = ctx.sink()
    argv = [
        SMTP_SOURCE,
        "-s",
        str(SESSIONS),
        "-m",
        str(ctx.messages),
        "-l",
        str(PAYLOAD_B),
        "-d",
        sink.address,
    ]
    ctx.info["command"] = " ".join([*argv[:-1], "127.0.0.1:PORT"])
    t0 = time.monotonic()
    source = ctx.procs.start("smtp-source", argv)
    code = source.wait(timeout_s=ctx.remaining_s())
    t1 = time.monotonic()
    if code != 0:
        raise RuntimeError(f"smtp-source exited with {code}: {source.log_tail()}")
    # The sink counts on the final "."; smtp-source exits after QUIT, so the count is complete.
    sink.wait_for(ctx.messages, timeout_s=10)
    return {"messages_per_s": ctx.messages / (t1 - t0), "elapsed_s": t1 - t0}
