"""JSON shapes the API answers with (plain dicts: fast to build, easy to read)."""

from __future__ import annotations

from datetime import UTC, datetime
from email import message_from_bytes, policy
from typing import Any

from postroom.domain.model import Priority, Status
from postroom.domain.ports import CapturedMail, MessageRecord

__all__ = ["captured_view", "iso", "message_view"]


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _addresses(xs: list[Any]) -> list[str]:
    return [a if isinstance(a, str) else f"{a[1]} <{a[0]}>" for a in xs]


def message_view(r: MessageRecord, *, full: bool = False) -> dict[str, Any]:
    c = r.content
    d: dict[str, Any] = {
        "id": r.id,
        "status": r.status.value,
        "priority": Priority(r.priority).label,
        "from": c["from"] if isinstance(c["from"], str) else f"{c['from'][1]} <{c['from'][0]}>",
        "to": [a if isinstance(a, str) else f"{a[1]} <{a[0]}>" for a in c["to"]],
        "subject": c["subject"],
        "tags": c.get("tags", []),
        "attempts": r.attempts,
        "created_at": iso(r.created_at),
        "updated_at": iso(r.updated_at),
        "sent_at": iso(r.sent_at),
        "next_attempt_at": iso(r.next_at) if r.status in (Status.RETRYING, Status.SCHEDULED, Status.QUEUED) else None,
        "provider": r.provider,
        "provider_message_id": r.provider_message_id,
        "provider_reply": {"code": r.last_code, "text": r.last_text} if r.last_text or r.last_code else None,
    }
    if full:
        d.update(
            {
                "cc": _addresses(c.get("cc", [])),
                "bcc": _addresses(c.get("bcc", [])),
                "reply_to": _addresses(c.get("reply_to", [])),
                "message_id": c["message_id"],
                "source": r.source,
                "metadata": c.get("metadata", {}),
                "headers": c.get("headers", {}),
                "text": c.get("text"),
                "html": c.get("html"),
                "attachments": [
                    {
                        "filename": a["filename"],
                        "content_type": a["content_type"],
                        "size": len(a["content"]) * 3 // 4 - a["content"][-2:].count("="),
                    }
                    for a in c.get("attachments", [])
                ],
                "events": [
                    {
                        "at": iso(e.at),
                        "type": e.type,
                        "worker": e.worker,
                        "provider": e.provider,
                        "code": e.code,
                        "detail": e.detail,
                    }
                    for e in r.events
                ],
            }
        )
    return d


def captured_view(m: CapturedMail, *, full: bool = False) -> dict[str, Any]:
    d: dict[str, Any] = {
        "id": m.id,
        "message_id": m.message_id,
        "captured_at": iso(m.captured_at),
        "from": m.mail_from,
        "to": m.rcpt_to,
        "subject": m.subject,
        "size": len(m.mime),
    }
    if full:
        parsed = message_from_bytes(m.mime, policy=policy.default)
        text = parsed.get_body(("plain",))
        html = parsed.get_body(("html",))
        d["headers"] = [[k, str(v)] for k, v in parsed.items()]
        d["text"] = text.get_content() if text is not None else None
        d["html"] = html.get_content() if html is not None else None
        d["attachments"] = [
            {
                "filename": part.get_filename(),
                "content_type": part.get_content_type(),
                "size": len(part.get_payload(decode=True) or b""),
            }
            for part in parsed.iter_attachments()
        ]
    return d
