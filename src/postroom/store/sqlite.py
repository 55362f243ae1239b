"""SQLiteStore: the embedded default. One writer connection on its own thread, one reader."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import orjson

from postroom.domain.errors import ConflictError, NotFound, StoreUnavailable
from postroom.domain.ids import new_id
from postroom.domain.model import (
    CANCELLABLE,
    ClaimedMessage,
    Content,
    Event,
    NewMessage,
    Outcome,
    Priority,
    Status,
)
from postroom.domain.ports import (
    ApiKey,
    CapturedMail,
    EnqueueResult,
    MessageFilter,
    MessagePage,
    MessageRecord,
    WorkerInfo,
)
from postroom.store import schema
from postroom.store.query import (
    MSG_COLS,
    MSG_FROM,
    list_sql,
    message_page,
    message_record,
)

__all__ = ["SQLiteStore", "hash_secret"]

T = TypeVar("T")

_EVENT_SQL = (
    "INSERT INTO events (message_id, at, type, worker, provider, code, detail) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)


_COUNT_SQL = (
    "INSERT INTO throughput (bucket, kind, n) VALUES (?, ?, ?)"
    " ON CONFLICT (bucket, kind) DO UPDATE SET n = n + excluded.n"
)

# outcome status -> the throughput counter it adds to
_COUNTED = {
    Status.SENT: "sent",
    Status.FAILED: "failed",
    Status.RETRYING: "retried",
    Status.SUPPRESSED: "failed",
}


def bucket_of(t: float) -> int:
    return int(t // schema.THROUGHPUT_BUCKET_S) * schema.THROUGHPUT_BUCKET_S


def count_rows(now: float, kinds: Sequence[str]) -> list[tuple[int, str, int]]:
    """Throughput upsert rows for a batch: one per kind present."""
    counts: dict[str, int] = {}
    for k in kinds:
        counts[k] = counts.get(k, 0) + 1
    b = bucket_of(now)
    return [(b, k, n) for k, n in counts.items()]


def fold_throughput(
    rows: Sequence[tuple[int, str, int]], start: int, step_s: int, now: float
) -> list[dict[str, Any]]:
    """(bucket, kind, n) rows -> one dict per interval from `start` to `now`."""
    n = int((now - start) // step_s) + 1
    series = [
        {"t": start + i * step_s, "accepted": 0, "sent": 0, "failed": 0, "retried": 0}
        for i in range(n)
    ]
    for bucket, kind, count in rows:
        i = (int(bucket) - start) // step_s
        if 0 <= i < n and kind in series[i]:
            series[i][kind] += int(count)
    return series


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _event_row(e: Event) -> tuple[Any, ...]:
    return (e.message_id, e.at, e.type, e.worker, e.provider, e.code, e.detail)


def message_id_header(msg_id: str, content: Content) -> str:
    domain = content.sender.email.rpartition("@")[2] or "postroom.local"
    return f"<{msg_id}@{domain}>"


def insert_rows(
    messages: Sequence[NewMessage], now: float, key_id: str | None
) -> list[tuple[Any, ...]]:
    """The row tuples for a batch of new messages (ids and Message-IDs assigned here)."""
    rows = []
    for m in messages:
        msg_id = new_id()
        c = m.content
        if not c.message_id:
            c.message_id = message_id_header(msg_id, c)
        scheduled = m.send_at is not None and m.send_at > now
        status = Status.SCHEDULED if scheduled else Status.QUEUED
        rows.append(
            (
                msg_id,
                status.value,
                int(m.priority),
                m.send_at if scheduled else now,
                now,
                now,
                m.source,
                orjson.dumps(c.to_json()).decode(),
                "," + ",".join(r.lower() for r in c.recipients()) + ",",
                ("," + ",".join(c.tags) + ",") if c.tags else None,
                (m.key_id or key_id or "") if m.idempotency_key else None,
                m.idempotency_key,
                m.request_hash,
                status.value,
            )
        )
    return rows


_INSERT_SQL = (
    "INSERT INTO messages (id, status, priority, next_at, created_at, updated_at, source,"
    " rcpt, tags, key_id, idempotency_key, request_hash, accepted_status)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_CONTENT_SQL = "INSERT INTO message_content (id, content) VALUES (?, ?)"
_INSERT_KEY_SQL = "INSERT OR IGNORE INTO message_keys (key, message_id) VALUES (?, ?)"


def key_rows(row: tuple[Any, ...]) -> list[tuple[str, str]]:
    """The lookup keys of an insert_rows() tuple: one per recipient and per tag."""
    keys = [("to:" + r, row[0]) for r in row[8].split(",") if r]
    if row[9]:
        keys.extend(("tag:" + t, row[0]) for t in row[9].split(",") if t)
    return keys


def _split(row: tuple[Any, ...]) -> tuple[tuple[Any, ...], tuple[str, str]]:
    """An insert_rows() tuple -> (the messages row, the message_content row)."""
    return row[:7] + row[8:], (row[0], row[7])


class SQLiteStore:
    """The Store on one SQLite file in WAL mode.

    Every write goes through one connection owned by one thread, so writes from this process never
    contend with each other; other processes (a separate `postroom worker`) share the file through
    SQLite's own locking (busy_timeout). Reads use a second connection so a long listing never waits
    behind the hot path.
    """

    POLL_S = 0.05  # how often an idle worker checks whether another process committed

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "FULL") -> None:
        self.path = str(path)
        self.synchronous = synchronous
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="sqlite-reader")
        self._wconn: sqlite3.Connection | None = None
        self._sync_level = synchronous
        self._rconn: sqlite3.Connection | None = None
        self._work = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- plumbing ---------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA foreign_keys=OFF")
        conn.execute("PRAGMA cache_size=-65536")
        return conn

    async def _w(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = False) -> T:
        """Run `fn` in one write transaction on the writer thread.

        `durable` transactions (accepting messages: a 2xx means on disk) are fsynced with the
        configured `synchronous` level; status updates use NORMAL in WAL mode, which survives a
        process crash and at worst replays a send after a power loss (delivery is at least once)."""
        assert self._wconn is not None, "store is not open"
        conn = self._wconn
        level = self.synchronous if durable or self.synchronous == "OFF" else "NORMAL"

        def run() -> T:
            try:
                if self._sync_level != level:
                    conn.execute(f"PRAGMA synchronous={level}")
                    self._sync_level = level
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(conn)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
                return result
            except sqlite3.OperationalError as e:
                raise StoreUnavailable(f"database error: {e}") from e

        return await asyncio.get_running_loop().run_in_executor(self._writer, run)

    async def _r(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        assert self._rconn is not None, "store is not open"
        conn = self._rconn

        def run() -> T:
            try:
                return fn(conn)
            except sqlite3.OperationalError as e:
                raise StoreUnavailable(f"database error: {e}") from e

        return await asyncio.get_running_loop().run_in_executor(self._reader, run)

    async def open(self) -> None:
        if self._wconn is not None:
            return
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._loop = asyncio.get_running_loop()
        loop = self._loop
        self._wconn = await loop.run_in_executor(self._writer, self._connect)
        await loop.run_in_executor(self._writer, self._migrate)
        self._rconn = await loop.run_in_executor(self._reader, self._connect)

    def _migrate(self) -> None:
        """A new file gets the schema at the head revision; an older file must be migrated first
        (`postroom migrate`): SchemaOutOfDate otherwise."""
        from postroom.store.migrations import ensure_sqlite

        ensure_sqlite(self.path)

    def _connect_plain(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30)
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        if self._wconn is not None:
            conn, self._wconn = self._wconn, None
            await loop.run_in_executor(self._writer, conn.close)
        if self._rconn is not None:
            conn, self._rconn = self._rconn, None
            await loop.run_in_executor(self._reader, conn.close)
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)

    def _notify(self) -> None:
        self._work.set()

    async def wait_for_work(self, timeout_s: float) -> None:
        """Wake on an enqueue in this process, or when another process commits (data_version)."""
        if self._work.is_set():
            self._work.clear()
            return
        deadline = time.monotonic() + timeout_s
        start_version = await self._r(lambda c: c.execute("PRAGMA data_version").fetchone()[0])
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self._work.wait(), min(self.POLL_S, left))
                self._work.clear()
                return
            except TimeoutError:
                pass
            version = await self._r(lambda c: c.execute("PRAGMA data_version").fetchone()[0])
            if version != start_version:
                return

    # -- enqueue ----------------------------------------------------------------------------
    async def enqueue(
        self,
        messages: Sequence[NewMessage],
        *,
        key_id: str | None = None,
        atomic: bool = False,
    ) -> list[EnqueueResult | ConflictError]:
        if not messages:
            return []
        now = time.time()
        rows = insert_rows(messages, now, key_id)

        def tx(conn: sqlite3.Connection) -> list[EnqueueResult | ConflictError]:
            results: list[EnqueueResult | ConflictError] = []
            plain = [r for r in rows if r[11] is None]
            if len(plain) == len(rows):
                heads, bodies = zip(*(_split(r) for r in rows), strict=True)
                conn.executemany(_INSERT_SQL, heads)
                conn.executemany(_INSERT_CONTENT_SQL, bodies)
                conn.executemany(_INSERT_KEY_SQL, [k for r in rows for k in key_rows(r)])
                results = [EnqueueResult(r[0], Status(r[1])) for r in rows]
                events = [(r[0], now, r[1], None, None, None, None) for r in rows]
            else:
                events = []
                for r in rows:
                    if r[11] is not None:
                        existing = conn.execute(
                            "SELECT id, request_hash, accepted_status FROM messages "
                            "WHERE key_id IS ? AND idempotency_key = ?",
                            (r[10], r[11]),
                        ).fetchone()
                        if existing is not None:
                            if existing[1] != r[12]:
                                err = ConflictError(
                                    f"Idempotency-Key {r[11]!r} was already used with a different "
                                    "request body"
                                )
                                if atomic:
                                    raise err
                                results.append(err)
                            else:
                                results.append(
                                    EnqueueResult(existing[0], Status(existing[2]), created=False)
                                )
                            continue
                    head, body = _split(r)
                    conn.execute(_INSERT_SQL, head)
                    conn.execute(_INSERT_CONTENT_SQL, body)
                    conn.executemany(_INSERT_KEY_SQL, key_rows(r))
                    results.append(EnqueueResult(r[0], Status(r[1])))
                    events.append((r[0], now, r[1], None, None, None, None))
            conn.executemany(_EVENT_SQL, events)
            if events:
                conn.execute(_COUNT_SQL, (bucket_of(now), "accepted", len(events)))
            return results

        results = await self._w(tx, durable=True)
        self._notify()
        return results

    # -- claim / record ---------------------------------------------------------------------
    async def claim(self, worker: str, limit: int, lease_s: float) -> list[ClaimedMessage]:
        def tx(conn: sqlite3.Connection) -> list[Any]:
            now = time.time()
            sub = " UNION ALL ".join(
                f"SELECT * FROM (SELECT id FROM messages WHERE priority = {p} AND next_at IS NOT NULL"
                f" AND next_at <= :now ORDER BY next_at LIMIT :n)"
                for p in (0, 1, 2)
            )
            rows = conn.execute(
                "SELECT m.id, m.status, m.lease_owner, c.content, m.attempts, m.lease_token,"
                f" m.created_at, m.priority FROM {MSG_FROM}"
                f" WHERE m.id IN (SELECT id FROM ({sub}) LIMIT :n) ORDER BY m.priority, m.next_at",
                {"now": now, "n": limit},
            ).fetchall()
            if not rows:
                return []
            until = now + lease_s
            conn.executemany(
                "UPDATE messages SET status = 'sending', lease_owner = ?, lease_token = ?,"
                " attempts = ?, next_at = ?, updated_at = ? WHERE id = ?",
                [(worker, r[5] + 1, r[4] + 1, until, now, r[0]) for r in rows],
            )
            events = []
            for r in rows:
                if r[1] == "sending":
                    events.append(
                        (r[0], now, "lease_expired", r[2], None, None, f"lease of {r[2]} expired")
                    )
                events.append((r[0], now, "claimed", worker, None, None, f"attempt {r[4] + 1}"))
            conn.executemany(_EVENT_SQL, events)
            return rows

        # decoded after the transaction: the writer is not held while Python builds objects
        return [
            ClaimedMessage(
                id=r[0],
                content=Content.from_json(orjson.loads(r[3])),
                attempts=r[4] + 1,
                lease_token=r[5] + 1,
                created_at=r[6],
                priority=Priority(r[7]),
            )
            for r in await self._w(tx)
        ]

    async def record(self, outcomes: Sequence[Outcome], *, worker: str) -> list[bool]:
        if not outcomes:
            return []

        def tx(conn: sqlite3.Connection) -> list[bool]:
            now = time.time()
            accepted: list[bool] = []
            events: list[tuple[Any, ...]] = []
            for o in outcomes:
                final = o.status not in (Status.RETRYING, Status.QUEUED)
                cur = conn.execute(
                    "UPDATE messages SET status = ?, next_at = ?, lease_owner = NULL,"
                    " updated_at = ?, provider = COALESCE(?, provider),"
                    " provider_message_id = COALESCE(?, provider_message_id),"
                    " last_code = COALESCE(?, last_code), last_text = COALESCE(?, last_text),"
                    " sent_at = CASE WHEN ? THEN ? ELSE sent_at END,"
                    " attempts = attempts - ?"
                    " WHERE id = ? AND lease_token = ? AND status = 'sending'",
                    (
                        o.status.value,
                        None if final else (o.next_at or now),
                        now,
                        o.provider,
                        o.provider_message_id,
                        o.code,
                        o.text,
                        o.status is Status.SENT,
                        now,
                        1 if o.status is Status.QUEUED else 0,
                        o.message_id,
                        o.lease_token,
                    ),
                )
                ok = cur.rowcount == 1
                accepted.append(ok)
                if ok:
                    events.extend(_event_row(e) for e in o.events)
                else:
                    events.append(
                        (
                            o.message_id,
                            now,
                            "stale_outcome",
                            worker,
                            o.provider,
                            o.code,
                            f"late outcome '{o.status.value}' rejected: the lease was lost",
                        )
                    )
            conn.executemany(_EVENT_SQL, events)
            conn.executemany(
                _COUNT_SQL,
                count_rows(
                    now,
                    [
                        _COUNTED[o.status]
                        for o, ok in zip(outcomes, accepted, strict=True)
                        if ok and o.status in _COUNTED
                    ],
                ),
            )
            return accepted

        result = await self._w(tx)
        if any(o.status in (Status.QUEUED, Status.RETRYING) for o in outcomes):
            self._notify()
        return result

    async def extend_leases(
        self, worker: str, claims: Sequence[tuple[str, int]], lease_s: float
    ) -> int:
        if not claims:
            return 0

        def tx(conn: sqlite3.Connection) -> int:
            until = time.time() + lease_s
            n = 0
            for msg_id, token in claims:
                n += conn.execute(
                    "UPDATE messages SET next_at = ? WHERE id = ? AND lease_token = ?"
                    " AND status = 'sending'",
                    (until, msg_id, token),
                ).rowcount
            return n

        return await self._w(tx)

    # -- queries ----------------------------------------------------------------------------
    async def get(self, message_id: str, *, with_events: bool = True) -> MessageRecord:
        def q(conn: sqlite3.Connection) -> MessageRecord:
            row = conn.execute(
                f"SELECT {MSG_COLS} FROM {MSG_FROM} WHERE m.id = ?", (message_id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"message {message_id!r}")
            rec = message_record(row)
            if with_events:
                rec.events = [
                    Event(
                        message_id,
                        type=r[0],
                        at=r[1],
                        worker=r[2],
                        provider=r[3],
                        code=r[4],
                        detail=r[5],
                    )
                    for r in conn.execute(
                        "SELECT type, at, worker, provider, code, detail FROM events"
                        " WHERE message_id = ? ORDER BY id",
                        (message_id,),
                    )
                ]
            return rec

        return await self._r(q)

    async def list_messages(self, flt: MessageFilter) -> MessagePage:
        params: list[Any] = []

        def param(v: Any) -> str:
            params.append(v)
            return "?"

        sql = list_sql(flt, param)
        return await self._r(lambda c: message_page(c.execute(sql, params).fetchall(), flt.limit))

    async def cancel(self, message_id: str) -> MessageRecord:
        def tx(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT status FROM messages WHERE id = ?", (message_id,)).fetchone()
            if row is None:
                raise NotFound(f"message {message_id!r}")
            if Status(row[0]) not in CANCELLABLE:
                raise ConflictError(
                    f"message {message_id} is {row[0]}: only queued, scheduled or retrying "
                    "messages can be cancelled"
                )
            now = time.time()
            conn.execute(
                "UPDATE messages SET status = 'cancelled', next_at = NULL, updated_at = ?"
                " WHERE id = ?",
                (now, message_id),
            )
            conn.execute(_EVENT_SQL, (message_id, now, "cancelled", None, None, None, None))

        await self._w(tx)
        return await self.get(message_id)

    async def retry_now(self, message_id: str) -> MessageRecord:
        def tx(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT status FROM messages WHERE id = ?", (message_id,)).fetchone()
            if row is None:
                raise NotFound(f"message {message_id!r}")
            if row[0] not in ("failed", "retrying"):
                raise ConflictError(
                    f"message {message_id} is {row[0]}: only failed or retrying messages can be "
                    "retried"
                )
            now = time.time()
            conn.execute(
                "UPDATE messages SET status = 'queued', next_at = ?, updated_at = ? WHERE id = ?",
                (now, now, message_id),
            )
            conn.execute(
                _EVENT_SQL, (message_id, now, "queued", None, None, None, "retry requested")
            )

        await self._w(tx)
        self._notify()
        return await self.get(message_id)

    async def stats(self, now: float | None = None) -> dict[str, Any]:
        now = now or time.time()

        def q(conn: sqlite3.Connection) -> dict[str, Any]:
            by_status = {s.value: 0 for s in Status}
            for status, n in conn.execute("SELECT status, count(*) FROM messages GROUP BY status"):
                by_status[status] = n
            due = conn.execute(
                "SELECT count(*) FROM messages WHERE next_at <= ? AND status != 'sending'",
                (now,),
            ).fetchone()[0]
            recent = {}
            for label, span in (("last_minute", 60), ("last_hour", 3600)):
                counts = dict(
                    conn.execute(
                        "SELECT kind, sum(n) FROM throughput WHERE bucket > ? GROUP BY kind",
                        (bucket_of(now) - span,),
                    ).fetchall()
                )
                recent[label] = {
                    k: counts.get(k, 0) for k in ("accepted", "sent", "failed", "retried")
                }
            return {
                "by_status": by_status,
                "queue_depth": by_status["queued"]
                + by_status["retrying"]
                + by_status["scheduled"]
                + by_status["sending"],
                "due_now": due,
                **recent,
            }

        return await self._r(q)

    async def throughput(self, since: float, step_s: int = 60) -> list[dict[str, Any]]:
        """Counts per `step_s` interval from `since` to now (oldest first, empty intervals included)."""
        step_s = max(
            schema.THROUGHPUT_BUCKET_S,
            step_s // schema.THROUGHPUT_BUCKET_S * schema.THROUGHPUT_BUCKET_S,
        )
        start = int(since // step_s) * step_s

        def q(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                "SELECT bucket, kind, n FROM throughput WHERE bucket >= ?", (start,)
            ).fetchall()
            return fold_throughput(rows, start, step_s, time.time())

        return await self._r(q)

    # -- routing state ----------------------------------------------------------------------
    async def state_update(
        self,
        keys: Sequence[str],
        fn: Callable[[dict[str, str]], tuple[dict[str, tuple[str, float | None]], T]],
    ) -> T:
        def tx(conn: sqlite3.Connection) -> T:
            now = time.time()
            rows: dict[str, str] = {}
            if keys:
                marks = ",".join("?" * len(keys))
                rows = {
                    k: v
                    for k, v, exp in conn.execute(
                        f"SELECT key, value, expires_at FROM routing_state WHERE key IN ({marks})",
                        list(keys),
                    )
                    if exp is None or exp > now
                }
            writes, result = fn(rows)
            if writes:
                conn.executemany(
                    "INSERT INTO routing_state (key, value, expires_at) VALUES (?, ?, ?)"
                    " ON CONFLICT(key) DO UPDATE SET value = excluded.value,"
                    " expires_at = excluded.expires_at",
                    [(k, v, exp) for k, (v, exp) in writes.items()],
                )
                if any(exp is not None for _, exp in writes.values()):
                    conn.execute("DELETE FROM routing_state WHERE expires_at < ?", (now,))
            return result

        return await self._w(tx)

    async def state_scan(self, prefix: str) -> dict[str, str]:
        def q(conn: sqlite3.Connection) -> dict[str, str]:
            now = time.time()
            return {
                k: v
                for k, v, exp in conn.execute(
                    "SELECT key, value, expires_at FROM routing_state WHERE key >= ? AND key < ?",
                    (prefix, prefix + "\uffff"),
                )
                if exp is None or exp > now
            }

        return await self._r(q)

    # -- API keys ---------------------------------------------------------------------------
    async def create_key(self, name: str, role: str = "admin") -> tuple[ApiKey, str]:
        secret = "pr_" + secrets.token_urlsafe(30)
        key = ApiKey(id=new_id(), name=name, prefix=secret[:10], created_at=time.time(), role=role)

        def tx(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO api_keys (id, name, prefix, hash, role, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (key.id, key.name, key.prefix, hash_secret(secret), key.role, key.created_at),
            )

        await self._w(tx)
        return key, secret

    async def verify_key(self, secret: str) -> ApiKey | None:
        h = hash_secret(secret)

        def q(conn: sqlite3.Connection) -> ApiKey | None:
            row = conn.execute(
                "SELECT id, name, prefix, created_at, role FROM api_keys"
                " WHERE hash = ? AND revoked_at IS NULL",
                (h,),
            ).fetchone()
            return ApiKey(row[0], row[1], row[2], row[3], row[4]) if row else None

        return await self._r(q)

    async def list_keys(self) -> list[ApiKey]:
        def q(conn: sqlite3.Connection) -> list[ApiKey]:
            return [
                ApiKey(r[0], r[1], r[2], r[3], r[4], r[5] is not None)
                for r in conn.execute(
                    "SELECT id, name, prefix, created_at, role, revoked_at FROM api_keys"
                    " ORDER BY created_at"
                )
            ]

        return await self._r(q)

    async def revoke_key(self, key_id: str) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            n = conn.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (time.time(), key_id),
            ).rowcount
            if n == 0:
                raise NotFound(f"API key {key_id!r}")

        await self._w(tx)

    async def count_keys(self) -> int:
        return await self._r(
            lambda c: c.execute(
                "SELECT count(*) FROM api_keys WHERE revoked_at IS NULL"
            ).fetchone()[0]
        )

    # -- capture inbox ----------------------------------------------------------------------
    async def capture(self, mails: Sequence[CapturedMail]) -> None:
        rows = [
            (
                m.id,
                m.message_id,
                m.captured_at,
                m.mail_from,
                orjson.dumps(m.rcpt_to).decode(),
                m.subject,
                m.mime,
            )
            for m in mails
        ]

        def tx(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO captured (id, message_id, captured_at, mail_from, rcpt_to, subject, mime)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

        await self._w(tx)

    async def inbox(self, limit: int = 50, before: str | None = None) -> list[CapturedMail]:
        def q(conn: sqlite3.Connection) -> list[CapturedMail]:
            sql = "SELECT id, message_id, captured_at, mail_from, rcpt_to, subject, mime FROM captured"
            params: list[Any] = []
            if before:
                sql += " WHERE id < ?"
                params.append(before)
            sql += " ORDER BY id DESC LIMIT ?"
            params.append(limit)
            return [
                CapturedMail(r[0], r[1], r[2], r[3], orjson.loads(r[4]), r[5], bytes(r[6]))
                for r in conn.execute(sql, params)
            ]

        return await self._r(q)

    async def inbox_get(self, capture_id: str) -> CapturedMail:
        def q(conn: sqlite3.Connection) -> CapturedMail:
            r = conn.execute(
                "SELECT id, message_id, captured_at, mail_from, rcpt_to, subject, mime"
                " FROM captured WHERE id = ?",
                (capture_id,),
            ).fetchone()
            if r is None:
                raise NotFound(f"captured message {capture_id!r}")
            return CapturedMail(r[0], r[1], r[2], r[3], orjson.loads(r[4]), r[5], bytes(r[6]))

        return await self._r(q)

    # -- the worker registry ----------------------------------------------------------------
    async def heartbeat(self, info: WorkerInfo) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO workers (name, host, pid, started_at, heartbeat_at, concurrency,"
                " in_flight, sent, failed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET host = excluded.host, pid = excluded.pid,"
                " started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at,"
                " concurrency = excluded.concurrency, in_flight = excluded.in_flight,"
                " sent = excluded.sent, failed = excluded.failed",
                (
                    info.name,
                    info.host,
                    info.pid,
                    info.started_at,
                    time.time(),
                    info.concurrency,
                    info.in_flight,
                    info.sent,
                    info.failed,
                ),
            )

        await self._w(tx)

    async def remove_worker(self, name: str) -> None:
        await self._w(lambda c: c.execute("DELETE FROM workers WHERE name = ?", (name,)))

    async def list_workers(self) -> list[WorkerInfo]:
        def q(conn: sqlite3.Connection) -> list[WorkerInfo]:
            return [
                WorkerInfo(*r)
                for r in conn.execute(
                    "SELECT name, host, pid, started_at, heartbeat_at, concurrency, in_flight,"
                    " sent, failed FROM workers ORDER BY started_at, name"
                )
            ]

        return await self._r(q)

    async def release_stale(self, stale_after_s: float) -> int:
        def tx(conn: sqlite3.Connection) -> int:
            now = time.time()
            gone = [
                r[0]
                for r in conn.execute(
                    "SELECT name FROM workers WHERE heartbeat_at < ?", (now - stale_after_s,)
                )
            ]
            if not gone:
                return 0
            marks = ", ".join("?" * len(gone))
            conn.execute(f"DELETE FROM workers WHERE name IN ({marks})", gone)
            return conn.execute(
                "UPDATE messages SET next_at = ? WHERE status = 'sending' AND next_at > ?"
                f" AND lease_owner IN ({marks})",
                (now, now, *gone),
            ).rowcount

        n = await self._w(tx)
        if n:
            self._notify()
        return n
