"""HTTP load generator: POST JSON bodies over a few keep-alive connections, as fast as the server answers.

It speaks just enough HTTP/1.1 (pre-encoded requests, Content-Length or
chunked responses) to stay cheap: on a 2-core machine the client shares the
CPU with the server it measures, and a general-purpose client such as httpx
costs several times more per request. Only loopback targets are accepted.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

__all__ = ["LoadResult", "post_all", "wait_http_ready"]

_LOOPBACK = ("127.", "localhost", "[::1]", "::1")


@dataclass
class LoadResult:
    """Outcome of one load: counts, timing (monotonic clock) and per-request latencies."""

    sent: int = 0
    accepted: int = 0
    failed: int = 0
    started: float = 0.0
    finished: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    accept_times: list[float] = field(default_factory=list)

    @property
    def accepted_per_s(self) -> float:
        span = self.finished - self.started
        return self.accepted / span if span > 0 else 0.0

    def latency_ms(self, q: float) -> float:
        """Latency quantile ``q`` (0 < q < 1) in milliseconds."""
        if not self.latencies_s:
            return 0.0
        if len(self.latencies_s) == 1:
            return self.latencies_s[0] * 1000
        cuts = statistics.quantiles(self.latencies_s, n=1000, method="inclusive")
        return cuts[min(len(cuts) - 1, max(0, round(q * 1000) - 1))] * 1000


def _check_loopback(host: str) -> None:
    if not host.startswith(_LOOPBACK):
        raise ValueError(f"load generator only targets loopback addresses, not {host!r}")


def _encode(host: str, port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    head += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, chunked = None, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
        return status, body
    return status, await reader.readexactly(length or 0)


async def _worker(
    host: str,
    port: int,
    requests: list[bytes],
    next_index: list[int],
    result: LoadResult,
    ok_status: Sequence[int],
    deadline: float,
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while True:
            i = next_index[0]
            if i >= len(requests):
                return
            next_index[0] = i + 1
            if time.monotonic() > deadline:
                raise TimeoutError("load generator ran out of time")
            t = time.monotonic()
            writer.write(requests[i])
            result.sent += 1
            try:
                status, body = await _read_response(reader)
            except (asyncio.IncompleteReadError, ConnectionError) as e:
                result.failed += 1
                result.errors.append(f"request {i}: {type(e).__name__}")
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
                continue
            done = time.monotonic()
            if status in ok_status:
                result.accepted += 1
                result.latencies_s.append(done - t)
                result.accept_times.append(done)
            else:
                result.failed += 1
                if len(result.errors) < 10:
                    result.errors.append(f"request {i}: HTTP {status}: {body[:200]!r}")
    finally:
        writer.close()


async def _run(
    url: str,
    bodies: Iterable[Any],
    concurrency: int,
    timeout_s: float,
    ok_status: Sequence[int],
    headers: dict[str, str],
    on_start: Callable[[], None] | None,
) -> LoadResult:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    _check_loopback(host)
    path = parts.path or "/"
    requests = [
        _encode(host, port, path, b if isinstance(b, bytes) else json.dumps(b).encode(), headers)
        for b in bodies
    ]
    result = LoadResult()
    next_index = [0]
    if on_start is not None:
        on_start()  # e.g. start the worker: its start-up is then inside the measured span
    deadline = time.monotonic() + timeout_s
    result.started = time.monotonic()
    tasks = [
        asyncio.create_task(_worker(host, port, requests, next_index, result, ok_status, deadline))
        for _ in range(min(concurrency, max(1, len(requests))))
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=timeout_s + 5)
    finally:
        for t in tasks:
            t.cancel()
    result.finished = max(result.accept_times, default=time.monotonic())
    return result


def post_all(
    url: str,
    bodies: Iterable[Any],
    *,
    concurrency: int = 8,
    timeout_s: float = 600.0,
    ok_status: Sequence[int] = (200, 201, 202),
    headers: dict[str, str] | None = None,
    on_start: Callable[[], None] | None = None,
) -> LoadResult:
    """POST every body (a JSON-able object or pre-encoded bytes) to ``url``, ``concurrency`` at a time.

    Each connection sends its next request as soon as the previous answer is
    read (closed loop). Bodies are encoded before the clock starts; ``on_start``
    runs after that, immediately before the first request (``result.started``).
    """
    return asyncio.run(
        _run(url, bodies, concurrency, timeout_s, ok_status, headers or {}, on_start)
    )


def wait_http_ready(url: str, *, timeout_s: float = 30.0) -> None:
    """Poll ``GET url`` until it answers 200 (a server's start-up), or raise TimeoutError."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    _check_loopback(host)
    request = f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()

    async def probe() -> int:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
        try:
            writer.write(request)
            status, _ = await asyncio.wait_for(_read_response(reader), 5)
            return status
        finally:
            writer.close()

    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            if asyncio.run(probe()) == 200:
                return
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s ({last})")
