"""The local providers a developer uses: capture (the default inbox), console and file."""

from __future__ import annotations

import io
from email import message_from_bytes, policy
from pathlib import Path

from postroom.domain.model import Outgoing
from postroom.domain.validate import validate_message
from postroom.providers.local import CaptureProvider, ConsoleProvider, FileProvider
from postroom.store.sqlite import SQLiteStore


def outgoing(i: int = 1) -> Outgoing:
    m = validate_message(
        {"from": "Shop <shop@example.com>", "to": [f"Zoë <zoe{i}@example.org>"], "bcc": ["audit@example.com"],
         "subject": "Grüße", "text": "Hallo!\n", "html": "<p>Hallo!</p>"}
    )
    m.content.message_id = f"<m{i}@example.com>"
    return Outgoing(f"msg{i}", m.content)


async def test_file_provider_writes_one_parseable_eml_per_message(tmp_path: Path) -> None:
    p = FileProvider("files", tmp_path / "outbox")
    receipt = await p.send(outgoing(1))
    await p.send(outgoing(2))
    files = sorted((tmp_path / "outbox").glob("*.eml"))
    assert [f.name for f in files] == ["msg1.eml", "msg2.eml"]
    assert receipt.provider_message_id == str(files[0])
    parsed = message_from_bytes(files[0].read_bytes(), policy=policy.default)
    assert parsed["Subject"] == "Grüße" and parsed["To"].addresses[0].display_name == "Zoë"
    assert "Bcc" not in parsed  # bcc is envelope only
    assert not list((tmp_path / "outbox").glob("*.tmp"))


async def test_console_provider_prints_envelope_and_message() -> None:
    out = io.StringIO()
    p = ConsoleProvider("console", stream=out)
    await p.send(outgoing())
    text = out.getvalue()
    assert "MAIL FROM: shop@example.com" in text
    assert "RCPT TO: zoe1@example.org, audit@example.com" in text
    assert "Message-ID: <m1@example.com>" in text and "\r" not in text


async def test_capture_provider_batches_into_the_inbox(tmp_path: Path) -> None:
    import asyncio

    store = SQLiteStore(tmp_path / "p.db")
    await store.open()
    try:
        p = CaptureProvider("capture", store)
        receipts = await asyncio.gather(*[p.send(outgoing(i)) for i in range(20)])
        await p.close()
        inbox = await store.inbox(limit=50)
        assert len(inbox) == 20 and {m.message_id for m in inbox} == {f"msg{i}" for i in range(20)}
        one = await store.inbox_get(receipts[3].provider_message_id or "")
        assert one.message_id == "msg3" and one.rcpt_to == ["zoe3@example.org", "audit@example.com"]
        assert message_from_bytes(one.mime, policy=policy.default)["Subject"] == "Grüße"
    finally:
        await store.close()
