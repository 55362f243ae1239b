"""Real SMTP servers for tests: aiosmtpd with scripted answers, and a server that never answers."""

from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes

    @property
    def message(self) -> EmailMessage:
        return message_from_bytes(self.data, policy=policy.default)  # type: ignore[return-value]


@dataclass
class RecordingHandler:
    """Keeps every message; `rcpt_reply` / `data_reply` (e.g. '450 4.2.0 busy') refuse instead."""

    received: list[Received] = field(default_factory=list)
    rcpt_reply: str | None = None
    data_reply: str | None = None
    data_delay_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]) -> str:
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_reply:
            return self.data_reply
        if self.data_delay_s:
            await asyncio.sleep(self.data_delay_s)
        with self.lock:
            self.received.append(Received(envelope.mail_from or "", list(envelope.rcpt_tos), envelope.original_content or b""))
        return "250 2.0.0 Ok: queued as TEST"

    def message_ids(self) -> list[str]:
        with self.lock:
            return [str(r.message["Message-ID"]) for r in self.received]


class SMTPServer:
    """An aiosmtpd server on 127.0.0.1 with an ephemeral port, in its own thread."""

    def __init__(self, handler: RecordingHandler | None = None, **kwargs: Any) -> None:
        self.handler = handler or RecordingHandler()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=port, **kwargs)
        self.host, self.port = "127.0.0.1", port

    def __enter__(self) -> SMTPServer:
        self.controller.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.controller.stop()

    @property
    def received(self) -> list[Received]:
        return self.handler.received

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"


class SilentServer:
    """Accepts TCP connections and never says a word (a hung SMTP server)."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> SilentServer:
        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.writers.append(writer)

        self.server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        for w in self.writers:
            w.close()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
