"""The message model: statuses, addresses, content, claims, outcomes and timeline events."""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any

__all__ = [
    "CANCELLABLE",
    "TERMINAL",
    "Address",
    "Attachment",
    "ClaimedMessage",
    "Content",
    "Event",
    "NewMessage",
    "Outcome",
    "Outgoing",
    "Priority",
    "Receipt",
    "Status",
]


class Status(StrEnum):
    SCHEDULED = "scheduled"
    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    RETRYING = "retrying"
    FAILED = "failed"
    SUPPRESSED = "suppressed"
    CANCELLED = "cancelled"


CANCELLABLE = frozenset({Status.SCHEDULED, Status.QUEUED, Status.RETRYING})
TERMINAL = frozenset({Status.SENT, Status.FAILED, Status.SUPPRESSED, Status.CANCELLED})


class Priority(IntEnum):
    """Lower value is claimed first."""

    HIGH = 0
    NORMAL = 1
    LOW = 2

    @classmethod
    def parse(cls, name: str) -> Priority:
        return cls[name.upper()]

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(slots=True, frozen=True)
class Address:
    """A mailbox. `email` is ASCII (IDN domains in punycode); `name` is the display name, if any."""

    email: str
    name: str | None = None

    def to_json(self) -> Any:
        return [self.email, self.name] if self.name else self.email

    @classmethod
    def from_json(cls, data: Any) -> Address:
        if isinstance(data, str):
            return cls(data)
        return cls(data[0], data[1])

    def __str__(self) -> str:
        return f"{self.name} <{self.email}>" if self.name else self.email


@dataclass(slots=True, frozen=True)
class Attachment:
    filename: str
    content_type: str
    content: bytes
    content_id: str | None = None  # set for inline parts referenced as cid: in the HTML

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "filename": self.filename,
            "content_type": self.content_type,
            "content": base64.b64encode(self.content).decode("ascii"),
        }
        if self.content_id:
            d["content_id"] = self.content_id
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Attachment:
        return cls(
            d["filename"], d["content_type"], base64.b64decode(d["content"]), d.get("content_id")
        )


@dataclass(slots=True)
class Content:
    """What goes out: everything needed to build the MIME message or call an HTTP API."""

    sender: Address
    to: list[Address]
    subject: str
    message_id: str  # the Message-ID header value, with angle brackets; kept across attempts
    cc: list[Address] = field(default_factory=list)
    bcc: list[Address] = field(default_factory=list)
    reply_to: list[Address] = field(default_factory=list)
    text: str | None = None
    html: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    attachments: list[Attachment] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def recipients(self) -> list[str]:
        """Envelope recipients (to, cc, bcc), each once, in order."""
        seen: dict[str, None] = {}
        for a in (*self.to, *self.cc, *self.bcc):
            seen.setdefault(a.email, None)
        return list(seen)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "from": self.sender.to_json(),
            "to": [a.to_json() for a in self.to],
            "subject": self.subject,
            "message_id": self.message_id,
        }
        if self.cc:
            d["cc"] = [a.to_json() for a in self.cc]
        if self.bcc:
            d["bcc"] = [a.to_json() for a in self.bcc]
        if self.reply_to:
            d["reply_to"] = [a.to_json() for a in self.reply_to]
        if self.text is not None:
            d["text"] = self.text
        if self.html is not None:
            d["html"] = self.html
        if self.headers:
            d["headers"] = self.headers
        if self.attachments:
            d["attachments"] = [a.to_json() for a in self.attachments]
        if self.tags:
            d["tags"] = self.tags
        if self.metadata:
            d["metadata"] = self.metadata
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Content:
        return cls(
            sender=Address.from_json(d["from"]),
            to=[Address.from_json(a) for a in d["to"]],
            subject=d["subject"],
            message_id=d["message_id"],
            cc=[Address.from_json(a) for a in d.get("cc", ())],
            bcc=[Address.from_json(a) for a in d.get("bcc", ())],
            reply_to=[Address.from_json(a) for a in d.get("reply_to", ())],
            text=d.get("text"),
            html=d.get("html"),
            headers=d.get("headers", {}),
            attachments=[Attachment.from_json(a) for a in d.get("attachments", ())],
            tags=d.get("tags", []),
            metadata=d.get("metadata", {}),
        )


@dataclass(slots=True)
class NewMessage:
    """A validated message on its way into the store (the input of `Store.enqueue`)."""

    content: Content
    priority: Priority = Priority.NORMAL
    send_at: float | None = None  # epoch seconds; None = now
    idempotency_key: str | None = None
    request_hash: str | None = None
    source: str = "api"
    key_id: str | None = None  # the API key that submitted it (scopes the idempotency key)


@dataclass(slots=True)
class ClaimedMessage:
    """A message a worker holds a lease on. `lease_token` fences its outcome."""

    id: str
    content: Content
    attempts: int  # including this one
    lease_token: int
    created_at: float
    priority: Priority = Priority.NORMAL


class Outgoing:
    """One delivery attempt handed to a provider. MIME is built at most once per attempt."""

    __slots__ = ("_mime", "content", "id", "mail_from", "rcpt_to")

    def __init__(self, id: str, content: Content, mime: bytes | None = None) -> None:
        self.id = id
        self.content = content
        self.mail_from = content.sender.email
        self.rcpt_to = content.recipients()
        self._mime = mime

    @property
    def mime(self) -> bytes:
        if self._mime is None:
            from postroom.domain.mime import build_mime

            self._mime = build_mime(self.content)
        return self._mime


@dataclass(slots=True)
class Receipt:
    """What a provider says when it accepted a message."""

    provider: str
    code: int | None = None
    text: str = ""
    provider_message_id: str | None = None


@dataclass(slots=True)
class Event:
    """One line of a message's timeline."""

    message_id: str
    type: str  # queued, scheduled, claimed, lease_expired, attempt_failed, retry_scheduled, sent, failed, cancelled, ...
    at: float = field(default_factory=time.time)
    worker: str | None = None
    provider: str | None = None
    code: int | None = None
    detail: str | None = None


@dataclass(slots=True)
class Outcome:
    """The result of one attempt, as the worker records it. Accepted only while the lease holds."""

    message_id: str
    lease_token: int
    status: Status  # SENT, RETRYING, FAILED, SUPPRESSED, or QUEUED (released without an attempt)
    next_at: float | None = None  # for RETRYING / QUEUED
    provider: str | None = None
    code: int | None = None
    text: str | None = None
    provider_message_id: str | None = None
    events: list[Event] = field(default_factory=list)
