"""The ports: what the worker and the doors need from a store and from a provider."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

from postroom.domain.errors import ConflictError
from postroom.domain.model import (
    ClaimedMessage,
    Event,
    NewMessage,
    Outcome,
    Outgoing,
    Receipt,
    Status,
)

__all__ = [
    "ApiKey",
    "CapturedMail",
    "EnqueueResult",
    "Mailbox",
    "MessageFilter",
    "MessagePage",
    "MessageRecord",
    "Provider",
    "RoutingView",
    "Store",
    "WorkerInfo",
]

T = TypeVar("T")


@dataclass(slots=True)
class EnqueueResult:
    id: str
    status: Status
    created: bool = True  # False when an idempotency key returned an earlier message


@dataclass(slots=True)
class MessageRecord:
    """A message as the API reports it."""

    id: str
    status: Status
    priority: int
    created_at: float
    updated_at: float
    next_at: float | None
    attempts: int
    content: dict[str, Any]  # Content.to_json()
    source: str
    provider: str | None = None
    provider_message_id: str | None = None
    last_code: int | None = None
    last_text: str | None = None
    sent_at: float | None = None
    events: list[Event] = field(default_factory=list)


@dataclass(slots=True)
class MessageFilter:
    status: Status | None = None
    tag: str | None = None
    to: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 50
    cursor: str | None = None  # id of the last message of the previous page (pages go newest first)


@dataclass(slots=True)
class MessagePage:
    items: list[MessageRecord]
    next_cursor: str | None


@dataclass(slots=True)
class ApiKey:
    id: str
    name: str
    prefix: str
    created_at: float
    role: str = "admin"
    revoked: bool = False


@dataclass(slots=True)
class WorkerInfo:
    """A running worker process as the registry knows it (GET /v1/workers)."""

    name: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float = 0.0  # set by the store (its clock) on every heartbeat
    concurrency: int = 0
    in_flight: int = 0
    sent: int = 0
    failed: int = 0


@dataclass(slots=True)
class CapturedMail:
    """A message the capture provider 'delivered' into the local inbox."""

    id: str
    message_id: str  # the Postroom message id
    captured_at: float
    mail_from: str
    rcpt_to: list[str]
    subject: str
    mime: bytes


@runtime_checkable
class Provider(Protocol):
    """One way out. Raises TransientError / PermanentError / ProviderFault; knows nothing of the store."""

    name: str
    kind: str

    async def send(self, message: Outgoing) -> Receipt: ...

    async def close(self) -> None: ...


class Mailbox(Protocol):
    """Where the capture provider puts what it 'delivers'."""

    async def capture(self, mails: Sequence[CapturedMail]) -> None: ...


class Store(Protocol):
    """The outbox: the database that is the queue. Batch in, batch out."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    # -- the hot path -------------------------------------------------------------------------
    async def enqueue(
        self, messages: Sequence[NewMessage], *, key_id: str | None = None, atomic: bool = False
    ) -> list[EnqueueResult | ConflictError]:
        """Store messages in one transaction. A reused idempotency key returns the earlier message
        (created=False); with a different request hash it raises ConflictError for that item, which
        the caller sees as the item's result (an exception instance in the list)."""
        ...

    async def claim(self, worker: str, limit: int, lease_s: float) -> list[ClaimedMessage]: ...

    async def record(self, outcomes: Sequence[Outcome], *, worker: str) -> list[bool]:
        """Record outcomes; each is applied only if its lease token still holds (fencing)."""
        ...

    async def extend_leases(
        self, worker: str, claims: Sequence[tuple[str, int]], lease_s: float
    ) -> int: ...

    async def wait_for_work(self, timeout_s: float) -> None:
        """Return when new work may be ready (notification) or after `timeout_s`."""
        ...

    # -- the worker registry ----------------------------------------------------------------
    async def heartbeat(self, info: WorkerInfo) -> None:
        """Register a worker or refresh its row (heartbeat_at = now, counters as given)."""
        ...

    async def remove_worker(self, name: str) -> None: ...

    async def list_workers(self) -> list[WorkerInfo]: ...

    async def release_stale(self, stale_after_s: float) -> int:
        """Forget workers whose last heartbeat is older than `stale_after_s` and make the messages
        they hold claimable now (their leases end early). Returns how many were released."""
        ...

    # -- queries and actions for the doors --------------------------------------------------
    async def get(self, message_id: str, *, with_events: bool = True) -> MessageRecord: ...

    async def list_messages(self, flt: MessageFilter) -> MessagePage: ...

    async def cancel(self, message_id: str) -> MessageRecord: ...

    async def retry_now(self, message_id: str) -> MessageRecord: ...

    async def stats(self, now: float | None = None) -> dict[str, Any]:
        """Counts by status, queue depth, and accepted/sent/failed/retried in the last minute and
        hour (from the throughput counters)."""
        ...

    async def throughput(self, since: float, step_s: int = 60) -> list[dict[str, Any]]:
        """{t, accepted, sent, failed, retried} per `step_s` interval since `since`, oldest first."""
        ...

    # -- API keys ---------------------------------------------------------------------------
    async def create_key(self, name: str, role: str = "admin") -> tuple[ApiKey, str]: ...

    async def verify_key(self, secret: str) -> ApiKey | None: ...

    async def list_keys(self) -> list[ApiKey]: ...

    async def count_keys(self) -> int: ...

    async def revoke_key(self, key_id: str) -> None: ...

    # -- the capture inbox ------------------------------------------------------------------
    async def capture(self, mails: Sequence[CapturedMail]) -> None: ...

    async def inbox(self, limit: int = 50, before: str | None = None) -> list[CapturedMail]: ...

    async def inbox_get(self, capture_id: str) -> CapturedMail: ...

    # -- routing state (rate-limit slots, domain throttles), shared by workers without Redis ----
    async def state_update(
        self,
        keys: Sequence[str],
        fn: Callable[[dict[str, str]], tuple[dict[str, tuple[str, float | None]], T]],
    ) -> T:
        """In one transaction: read the live values of `keys` (absent or expired ones left out),
        call `fn` with them while they are locked against other processes, write what it returns
        (key -> (value, expires_at epoch or None)), purge expired rows if anything written
        expires, commit, return `fn`'s result. `fn` is pure and quick; it may run in a thread."""
        ...

    async def state_scan(self, prefix: str) -> dict[str, str]:
        """The live values of every key starting with `prefix`."""
        ...


class Router(Protocol):
    """Picks providers for a message and is the only place failover happens.

    `send` returns the receipt of the provider that took the message, or raises the error that
    decides the message's fate (TransientError / PermanentError). Every provider tried and why it
    was left is appended to `trail` as timeline events."""

    async def send(self, message: Outgoing, trail: list[Event]) -> Receipt: ...

    async def close(self) -> None: ...


class RoutingView(Protocol):
    """What the API shows of routing: providers (breaker, counts, rate-limit use) and the
    per-domain throttles, as every worker process sharing the routing state last reported."""

    async def providers(self) -> list[dict[str, Any]]: ...

    async def domains(self) -> list[dict[str, Any]]: ...

    async def close(self) -> None: ...
