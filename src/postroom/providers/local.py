"""Providers that deliver locally: capture (the default inbox), console, file (.eml files)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from postroom.domain.batching import GroupCommit
from postroom.domain.ids import new_id
from postroom.domain.model import Outgoing, Receipt
from postroom.domain.ports import CapturedMail, Mailbox

__all__ = ["CaptureProvider", "ConsoleProvider", "FileProvider"]


class CaptureProvider:
    """'Delivers' into the local inbox (GET /v1/inbox, the dashboard), like Mailpit.

    The default when no provider is configured, so a new user sees real delivered mail at once.
    Captures from concurrent sends are written in one batch."""

    kind = "capture"

    def __init__(self, name: str, mailbox: Mailbox) -> None:
        self.name = name
        self._mailbox = mailbox
        self._commit: GroupCommit[CapturedMail, None] = GroupCommit(self._write)

    async def _write(self, mails: Sequence[CapturedMail]) -> list[None]:
        await self._mailbox.capture(mails)
        return [None] * len(mails)

    async def send(self, message: Outgoing) -> Receipt:
        capture_id = new_id()
        await self._commit.submit(
            CapturedMail(
                id=capture_id,
                message_id=message.id,
                captured_at=time.time(),
                mail_from=message.mail_from,
                rcpt_to=message.rcpt_to,
                subject=message.content.subject,
                mime=message.mime,
            )
        )
        return Receipt(self.name, 250, "captured in the local inbox", capture_id)

    async def close(self) -> None:
        await self._commit.close()


class ConsoleProvider:
    """Prints each message to a stream (stdout by default), like Django's console backend."""

    kind = "console"

    def __init__(self, name: str, stream: TextIO | None = None) -> None:
        self.name = name
        self._stream = stream or sys.stdout

    async def send(self, message: Outgoing) -> Receipt:
        text = message.mime.decode("utf-8", "replace").replace("\r\n", "\n")
        self._stream.write(
            f"---------- message {message.id} ----------\n"
            f"MAIL FROM: {message.mail_from}\nRCPT TO: {', '.join(message.rcpt_to)}\n{text}\n"
        )
        self._stream.flush()
        return Receipt(self.name, 250, "printed to the console")

    async def close(self) -> None:
        return None


class FileProvider:
    """Writes one .eml file per message into a folder (named after the message id)."""

    kind = "file"

    def __init__(self, name: str, path: str | os.PathLike[str]) -> None:
        self.name = name
        self.path = Path(path)

    def _write(self, message_id: str, data: bytes) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        target = self.path / f"{message_id}.eml"
        tmp = target.with_suffix(".eml.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)  # readers never see half a file
        return target

    async def send(self, message: Outgoing) -> Receipt:
        target = await asyncio.to_thread(self._write, message.id, message.mime)
        return Receipt(self.name, 250, f"written to {target}", str(target))

    async def close(self) -> None:
        return None
