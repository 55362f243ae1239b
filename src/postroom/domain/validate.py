"""The one validation every door uses: a JSON-shaped dict in, a NewMessage out, or ValidationError."""

from __future__ import annotations

import base64
import binascii
import hashlib
import mimetypes
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from postroom.domain.addresses import (
    check_content_id,
    check_content_type,
    check_header,
    check_text,
    parse_address,
    parse_address_list,
)
from postroom.domain.errors import LimitExceeded, ValidationError
from postroom.domain.model import Address, Attachment, Content, NewMessage, Priority

__all__ = ["Limits", "request_hash", "validate_message"]

FIELDS = frozenset(
    {
        "from", "to", "cc", "bcc", "reply_to", "subject", "text", "html", "headers",
        "attachments", "tags", "metadata", "send_at", "priority",
    }
)
_TAG = re.compile(r"^[A-Za-z0-9_.:/@+-]{1,64}$")


@dataclass(frozen=True, slots=True)
class Limits:
    max_message_bytes: int = 10 * 1024 * 1024
    max_recipients: int = 100
    max_attachment_bytes: int = 10 * 1024 * 1024
    max_tags: int = 20
    max_metadata_bytes: int = 16 * 1024


DEFAULT_LIMITS = Limits()


def request_hash(data: Any) -> str:
    """A stable hash of a request body, for idempotency (key order does not matter)."""
    return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _str(d: Mapping[str, Any], key: str, field: str, *, required: bool = False) -> str | None:
    v = d.get(key)
    if v is None:
        if required:
            raise ValidationError(field, "is required")
        return None
    if not isinstance(v, str):
        raise ValidationError(field, f"must be a string, got {type(v).__name__}")
    return v


def _addresses(d: Mapping[str, Any], key: str, p: str) -> list[Address]:
    v = d.get(key)
    if v is None:
        return []
    if isinstance(v, (str, dict)):
        v = [v]
    if not isinstance(v, list):
        raise ValidationError(p + key, "must be a list of addresses")
    return parse_address_list(v, p + key)


def _send_at(v: Any, field: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool):
        raise ValidationError(field, "must be an ISO 8601 time such as 2030-01-31T09:00:00Z")
    if isinstance(v, (int, float)):
        return float(v)
    if not isinstance(v, str):
        raise ValidationError(field, "must be an ISO 8601 time such as 2030-01-31T09:00:00Z")
    try:
        dt = datetime.fromisoformat(v.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValidationError(
            field, f"{v!r} is not an ISO 8601 time (example: 2030-01-31T09:00:00Z)"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def validate_message(
    d: Any,
    *,
    limits: Limits = DEFAULT_LIMITS,
    field_prefix: str = "",
    idempotency_key: str | None = None,
    source: str = "api",
) -> NewMessage:
    """Check and normalise one message. Field paths in errors start with `field_prefix`
    (e.g. ``messages.3.``) so a batch caller can tell which item is wrong."""
    p = field_prefix
    if not isinstance(d, Mapping):
        raise ValidationError(p.rstrip(".") or "body", "must be a JSON object")
    unknown = set(d) - FIELDS
    if unknown:
        name = sorted(unknown)[0]
        raise ValidationError(p + name, f"unknown field (known fields: {', '.join(sorted(FIELDS))})")

    sender_raw = d.get("from")
    if sender_raw is None:
        raise ValidationError(p + "from", "is required")
    sender = parse_address(sender_raw, p + "from")
    to = _addresses(d, "to", p)
    cc = _addresses(d, "cc", p)
    bcc = _addresses(d, "bcc", p)
    reply_to = _addresses(d, "reply_to", p)
    n_rcpt = len(to) + len(cc) + len(bcc)
    if n_rcpt == 0:
        raise ValidationError(p + "to", "at least one recipient is required (to, cc or bcc)")
    if n_rcpt > limits.max_recipients:
        raise LimitExceeded(
            p + "to",
            f"{n_rcpt} recipients; the limit is {limits.max_recipients} per message (to + cc + bcc)",
        )

    subject = _str(d, "subject", p + "subject") or ""
    check_text(subject, p + "subject")
    text = _str(d, "text", p + "text")
    html = _str(d, "html", p + "html")
    if text is None and html is None:
        raise ValidationError(p + "text", "a message needs a text or an html body (or both)")
    size = len(subject) + len(text or "") + len(html or "")

    headers_raw = d.get("headers") or {}
    if not isinstance(headers_raw, Mapping):
        raise ValidationError(p + "headers", "must be an object of header name to value")
    headers: dict[str, str] = {}
    for name, value in headers_raw.items():
        if not isinstance(value, str):
            raise ValidationError(f"{p}headers.{name}", "value must be a string")
        check_header(name, value, f"{p}headers.{name}")
        headers[name] = value
        size += len(name) + len(value)

    attachments: list[Attachment] = []
    atts = d.get("attachments") or []
    if not isinstance(atts, list):
        raise ValidationError(p + "attachments", "must be a list")
    for i, a in enumerate(atts):
        f = f"{p}attachments.{i}"
        if not isinstance(a, Mapping):
            raise ValidationError(f, "must be an object with filename, content_type and content")
        extra = set(a) - {"filename", "content_type", "content", "content_id"}
        if extra:
            raise ValidationError(f"{f}.{sorted(extra)[0]}", "unknown field")
        filename = _str(a, "filename", f + ".filename", required=True)
        assert filename is not None
        check_text(filename, f + ".filename")
        ctype = _str(a, "content_type", f + ".content_type") or (
            mimetypes.guess_type(filename)[0] or "application/octet-stream"
        )
        check_content_type(ctype, f + ".content_type")
        b64 = _str(a, "content", f + ".content", required=True)
        assert b64 is not None
        if len(b64) * 3 // 4 > limits.max_attachment_bytes + 3:
            raise LimitExceeded(
                f + ".content", f"attachment is larger than {limits.max_attachment_bytes} bytes"
            )
        try:
            raw = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise ValidationError(f + ".content", "is not valid base64") from None
        cid = _str(a, "content_id", f + ".content_id")
        if cid is not None:
            cid = check_content_id(cid, f + ".content_id")
        attachments.append(Attachment(filename, ctype, raw, cid))
        size += len(raw)
    if size > limits.max_message_bytes:
        raise LimitExceeded(
            p.rstrip(".") or "body",
            f"message is {size} bytes; the limit is {limits.max_message_bytes}",
        )

    tags = d.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ValidationError(p + "tags", "must be a list of strings")
    if len(tags) > limits.max_tags:
        raise LimitExceeded(p + "tags", f"at most {limits.max_tags} tags")
    for i, t in enumerate(tags):
        if not _TAG.match(t):
            raise ValidationError(
                f"{p}tags.{i}", f"{t!r}: tags are 1-64 characters of letters, digits and _.:/@+-"
            )

    metadata = d.get("metadata") or {}
    if not isinstance(metadata, Mapping):
        raise ValidationError(p + "metadata", "must be an object")
    if len(orjson.dumps(metadata)) > limits.max_metadata_bytes:
        raise LimitExceeded(p + "metadata", f"larger than {limits.max_metadata_bytes} bytes")

    prio = d.get("priority", "normal")
    try:
        priority = Priority.parse(prio) if isinstance(prio, str) else None
    except KeyError:
        priority = None
    if priority is None:
        raise ValidationError(p + "priority", f"{prio!r}: use high, normal or low")

    return NewMessage(
        content=Content(
            sender=sender,
            to=to,
            cc=cc,
            bcc=bcc,
            reply_to=reply_to,
            subject=subject,
            message_id="",
            text=text,
            html=html,
            headers=headers,
            attachments=attachments,
            tags=list(dict.fromkeys(tags)),
            metadata=dict(metadata),
        ),
        priority=priority,
        send_at=_send_at(d.get("send_at"), p + "send_at"),
        idempotency_key=idempotency_key,
        request_hash=request_hash(d) if idempotency_key else None,
        source=source,
    )
