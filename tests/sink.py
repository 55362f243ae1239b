"""A fast SMTP sink for load and fault tests: accepts everything, records each Message-ID.

aiosmtpd is 8-11x slower than Postfix's smtp-sink, too slow for tens of thousands of messages;
this one reads a whole DATA payload with one `readuntil` and keeps only the Message-ID, so it
keeps up with several worker processes. It speaks ESMTP with PIPELINING (replies are written in
order as pipelined commands are read) and runs in its own thread with its own event loop.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections import Counter
from typing import Any

__all__ = ["SMTPSink"]

_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(.*(?:\r\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)


class SMTPSink:
    """`with SMTPSink() as sink:` … `sink.port`, `sink.message_ids` (in arrival order).

    `data_delay_s` holds each end-of-data reply that long (a slow receiver: keeps a sender
    mid-transaction, as the SIGSTOP test needs)."""

    def __init__(self, *, data_delay_s: float = 0.0) -> None:
        self.data_delay_s = data_delay_s
        self.message_ids: list[str] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="smtp-sink", daemon=True
        )
        self._server: asyncio.Server | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> SMTPSink:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        fut.result(10)
        return self

    def __exit__(self, *exc: Any) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0, limit=2**24)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()

    def ids(self) -> list[str]:
        with self._lock:
            return list(self.message_ids)

    def counts(self) -> Counter[str]:
        return Counter(self.ids())

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        write = writer.write
        try:
            write(b"220 sink ESMTP\r\n")
            while True:
                line = await reader.readline()
                if not line:
                    return
                verb = line[:4].upper()
                if verb == b"EHLO":
                    write(b"250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 100000000\r\n")
                elif verb == b"DATA":
                    write(b"354 go ahead\r\n")
                    payload = await reader.readuntil(b"\r\n.\r\n")
                    head = payload.split(b"\r\n\r\n", 1)[0]
                    m = _MESSAGE_ID.search(head)
                    mid = re.sub(rb"\s+", b"", m.group(1)).decode() if m else ""
                    if self.data_delay_s:
                        await writer.drain()
                        await asyncio.sleep(self.data_delay_s)
                    with self._lock:
                        self.message_ids.append(mid)
                    write(b"250 2.0.0 Ok: queued\r\n")
                elif verb == b"QUIT":
                    write(b"221 bye\r\n")
                    await writer.drain()
                    return
                elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP", b"HELO"):
                    write(b"250 ok\r\n")
                else:
                    write(b"502 not implemented\r\n")
                if not reader._buffer:  # type: ignore[attr-defined]  # flush once per pipelined group
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            return
        finally:
            writer.close()
