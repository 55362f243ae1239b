"""Postroom as a user runs it: real processes, a real SMTP server, SIGTERM and SIGKILL."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from postroom.domain.validate import validate_message
from postroom.store.sqlite import SQLiteStore
from tests.conftest import free_port
from tests.support import RecordingHandler, SMTPServer

POSTROOM = [sys.executable, "-m", "postroom.cli"]


def env_for(tmp_path: Path, smtp_port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
    env.update(
        POSTROOM_DATABASE_URL=f"sqlite:///{tmp_path}/postroom.db",
        POSTROOM_PROVIDERS=f"smtp://127.0.0.1:{smtp_port}?timeout_s=5",
        POSTROOM_WORKER__IDLE_POLL_S="0.1",
        **extra,
    )
    return env


def wait_for(pred, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("extra", [[], ["--worker-processes", "2"]], ids=["one-process", "worker-processes"])
def test_postroom_run_accepts_over_http_and_delivers_over_smtp(tmp_path: Path, extra: list[str]) -> None:
    port = free_port()
    with SMTPServer() as smtp:
        proc = subprocess.Popen(
            [*POSTROOM, "run", "--port", str(port), *extra],
            env=env_for(tmp_path, smtp.port),
            cwd=tmp_path,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            key = None
            assert proc.stderr is not None
            deadline = time.monotonic() + 20
            while key is None and time.monotonic() < deadline:
                line = proc.stderr.readline()
                m = re.search(r"\b(pr_[A-Za-z0-9_-]{20,})", line)
                if m:
                    key = m.group(1)
            assert key, "the first start prints an admin key"
            base = f"http://127.0.0.1:{port}"
            wait_for(lambda: _up(base), 20, "the API")
            h = {"Authorization": f"Bearer {key}"}
            r = httpx.post(f"{base}/v1/messages", headers=h, timeout=5, json={
                "from": "app@example.com", "to": ["Ann <ann@example.org>"], "subject": "Hello", "text": "It works.",
            })
            assert r.status_code == 202
            mid = r.json()["id"]
            wait_for(lambda: httpx.get(f"{base}/v1/messages/{mid}", headers=h, timeout=5).json()["status"] == "sent", 20, "delivery")
            assert [x.rcpt_tos for x in smtp.received] == [["ann@example.org"]]
            assert smtp.received[0].message["Subject"] == "Hello"
            assert httpx.get(f"{base}/docs", timeout=5).status_code == 200
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        # uvicorn re-raises SIGTERM after its graceful shutdown, so the status is -15 or 0
        assert proc.returncode in (0, -signal.SIGTERM)
        assert re.search(r"worker \S+ stopped: sent 1,", err), err


def _up(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _counts(db: Path) -> Counter[str]:
    async def go() -> Counter[str]:
        s = SQLiteStore(db)
        await s.open()
        try:
            st = await s.stats()
        finally:
            await s.close()
        return Counter({k: v for k, v in st["by_status"].items() if v})

    return asyncio.run(go())


def _in_flight(db: Path) -> int:
    import sqlite3

    with sqlite3.connect(db) as c:
        return int(c.execute("SELECT count(*) FROM messages WHERE status = 'sending'").fetchone()[0])


def test_a_worker_killed_with_sigkill_loses_nothing(tmp_path: Path) -> None:
    n = 300
    db = tmp_path / "postroom.db"

    async def enqueue() -> None:
        s = SQLiteStore(db)
        await s.open()
        await s.enqueue([validate_message({"from": "a@example.com", "to": [f"u{i}@example.org"], "subject": str(i), "text": "x"}) for i in range(n)])
        await s.close()

    asyncio.run(enqueue())
    handler = RecordingHandler(data_delay_s=0.02)  # slow enough that the worker always holds claims
    with SMTPServer(handler) as smtp:
        env = env_for(tmp_path, smtp.port, POSTROOM_WORKER__LEASE_S="2", POSTROOM_WORKER__CONCURRENCY="16")
        first = subprocess.Popen([*POSTROOM, "worker"], env=env, cwd=tmp_path)
        wait_for(lambda: len(smtp.received) >= 40, 30, "the first worker to deliver some")
        held = _in_flight(db)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        assert held > 0, "the worker held claims when it was killed"
        delivered_before = len(smtp.received)
        second = subprocess.Popen([*POSTROOM, "worker"], env=env, cwd=tmp_path)
        try:
            wait_for(lambda: _counts(db) == Counter({"sent": n}), 60, "every message sent")
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=30) == 0
        ids = Counter(handler.message_ids())
        assert len(ids) == n, "every accepted message was delivered"
        duplicates = sum(c - 1 for c in ids.values())
        # only what the dead worker held (claimed, maybe mid-send) can arrive twice
        assert duplicates <= held + 16
        assert delivered_before < n
        assert _in_flight(db) == 0


def test_sigterm_drains_a_worker_and_releases_its_claims(tmp_path: Path) -> None:
    db = tmp_path / "postroom.db"

    async def enqueue() -> None:
        s = SQLiteStore(db)
        await s.open()
        await s.enqueue([validate_message({"from": "a@example.com", "to": [f"u{i}@example.org"], "text": "x"}) for i in range(200)])
        await s.close()

    asyncio.run(enqueue())
    handler = RecordingHandler(data_delay_s=0.05)
    with SMTPServer(handler) as smtp:
        env = env_for(tmp_path, smtp.port, POSTROOM_WORKER__DRAIN_TIMEOUT_S="2", POSTROOM_WORKER__CONCURRENCY="32")
        w = subprocess.Popen([*POSTROOM, "worker"], env=env, cwd=tmp_path)
        wait_for(lambda: len(smtp.received) >= 10, 30, "some deliveries")
        w.send_signal(signal.SIGTERM)
        assert w.wait(timeout=30) == 0
        counts = _counts(db)
        assert counts["sending"] == 0
        assert counts["sent"] + counts["queued"] == 200
        assert counts["sent"] == len(set(handler.message_ids()))
