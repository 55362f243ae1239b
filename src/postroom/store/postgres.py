"""PostgresStore: the scale-out engine. Any number of API and worker processes share one database.

The same semantics as SQLiteStore (the reference), with every hot-path call one round trip:

* enqueue: one INSERT ... SELECT FROM unnest(arrays) that also writes the `queued` events and
  sends one NOTIFY (PostgreSQL folds identical notifications of a transaction into one);
* claim: one statement: pick due rows `FOR UPDATE SKIP LOCKED`, take the lease, log the
  `lease_expired` / `claimed` events;
* record: one statement: apply every outcome whose lease token still holds (fencing), write the
  accepted outcomes' events and a `stale_outcome` event for each rejected one.

Lease times come from the database clock, so workers on hosts whose clocks drift still agree on
when a lease ends. Workers sleep on LISTEN/NOTIFY (a dedicated connection, reconnected on demand)
and fall back to polling when it is away. Losing the database raises StoreUnavailable (the API
answers 503); the pool reconnects by itself once the server is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg
import orjson

from postroom.domain.errors import ConfigError, ConflictError, NotFound, StoreUnavailable
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
from postroom.store.query import MSG_COLS, MSG_FROM, list_sql, message_page, message_record
from postroom.store.sqlite import hash_secret, insert_rows

__all__ = ["PostgresStore", "asyncpg_dsn"]

log = logging.getLogger(__name__)

T = TypeVar("T")

CHANNEL = "postroom_work"

# Errors that mean "the database is away or the call took too long", not "your request is wrong".
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, crash shutdown, starting up
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # a standby after a failover
    asyncpg.InterfaceError,  # connection closed underneath a call
    OSError,  # connection refused / reset
    TimeoutError,
)
_RETRYABLE = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)

_NOW = "(SELECT extract(epoch FROM clock_timestamp())::float8)"
BUCKET_S = 10  # schema.THROUGHPUT_BUCKET_S: the throughput counters' resolution
_BUCKET = f"(floor({_NOW} / {BUCKET_S}) * {BUCKET_S})::int8"
# Claims, outcomes and lease renewals commit without waiting for the WAL flush (as SQLiteStore
# fsyncs only what accepts messages): a database crash may forget the last few hundred ms of them,
# which at worst sends a message again (at least once); accepting a message is always durable.
# Set inside the statement, so each of these stays one round trip in its own implicit transaction.
_NOT_DURABLE = "set_config('synchronous_commit', 'off', true) AS not_durable"

_ENQUEUE_SQL = f"""
WITH src AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::int2[], $4::float8[], $5::float8[],
                         $6::float8[], $7::text[], $8::text[], $9::text[], $10::text[],
                         $11::text[], $12::text[], $13::text[], $14::text[])
        AS s(id, status, priority, next_at, created_at, updated_at, source, content, rcpt, tags,
             key_id, idempotency_key, request_hash, accepted_status)
), ins AS (
    INSERT INTO messages (id, status, priority, next_at, created_at, updated_at, source, rcpt,
                          tags, key_id, idempotency_key, request_hash, accepted_status)
    SELECT id, status, priority, next_at, created_at, updated_at, source, rcpt, tags, key_id,
           idempotency_key, request_hash, accepted_status FROM src
    ON CONFLICT (key_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id, status, created_at
), body AS (
    INSERT INTO message_content (id, content) SELECT src.id, src.content FROM src JOIN ins USING (id)
), ev AS (
    INSERT INTO events (message_id, at, type) SELECT id, created_at, status FROM ins
), keyed AS (
    INSERT INTO message_keys (key, message_id)
    SELECT DISTINCT k.key, src.id FROM src JOIN ins USING (id)
    CROSS JOIN LATERAL (
        SELECT 'to:' || r FROM unnest(string_to_array(src.rcpt, ',')) AS r WHERE r <> ''
        UNION ALL
        SELECT 'tag:' || t FROM unnest(string_to_array(coalesce(src.tags, ''), ',')) AS t WHERE t <> ''
    ) AS k(key)
    ON CONFLICT DO NOTHING
), counted AS (
    INSERT INTO throughput (bucket, kind, n)
    SELECT {_BUCKET}, 'accepted', count(*) FROM ins HAVING count(*) > 0
    ON CONFLICT (bucket, kind) DO UPDATE SET n = throughput.n + excluded.n
)
SELECT array(SELECT id FROM ins) AS ids, pg_notify('{CHANNEL}', '') AS notified
"""

_EXISTING_SQL = """
SELECT k.key_id, k.idempotency_key, m.id, m.request_hash, m.accepted_status
FROM unnest($1::text[], $2::text[]) AS k(key_id, idempotency_key)
CROSS JOIN LATERAL (
    SELECT id, request_hash, accepted_status FROM messages
    WHERE key_id = k.key_id AND idempotency_key = k.idempotency_key
) m
"""

_CLAIM_SQL = f"""
WITH now AS MATERIALIZED (SELECT {_NOW} AS t, {_NOT_DURABLE}),
picked AS (
    -- one index range scan per priority, highest first, locking rows as they are taken: the plan
    -- stays an index scan whatever the planner believes about `now` or the table's size
    SELECT q.* FROM (VALUES (0), (1), (2)) AS p(priority)
    CROSS JOIN LATERAL (
        SELECT ctid AS row_id, id, status AS old_status, lease_owner AS old_owner,
               next_at AS due, priority
        FROM messages
        WHERE priority = p.priority AND next_at IS NOT NULL AND next_at <= (SELECT t FROM now)
        ORDER BY next_at
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    ) q
    LIMIT $2
), upd AS (
    UPDATE messages m
    SET status = 'sending', lease_owner = $1, lease_token = m.lease_token + 1,
        attempts = m.attempts + 1, next_at = now.t + $3, updated_at = now.t
    FROM picked p, now
    WHERE m.ctid = p.row_id  -- the locked row itself (a TID scan, no index lookup)
    RETURNING m.id, m.attempts, m.lease_token, m.created_at, m.priority, m.updated_at,
              p.old_status, p.old_owner, p.due
), ev AS (
    INSERT INTO events (message_id, at, type, worker, detail)
    SELECT message_id, at, type, worker, detail FROM (
        SELECT id AS message_id, updated_at AS at, 'lease_expired' AS type, old_owner AS worker,
               'lease of ' || coalesce(old_owner, '?') || ' expired' AS detail, 0 AS k
        FROM upd WHERE old_status = 'sending'
        UNION ALL
        SELECT id, updated_at, 'claimed', $1, 'attempt ' || attempts, 1 FROM upd
    ) x ORDER BY message_id, k
)
SELECT u.id, c.content, u.attempts, u.lease_token, u.created_at, u.priority
FROM upd u JOIN message_content c ON c.id = u.id
ORDER BY u.priority, u.due
"""

_RECORD_SQL = f"""
WITH now AS MATERIALIZED (SELECT {_NOW} AS t, {_NOT_DURABLE}),
o AS (
    SELECT * FROM unnest($1::text[], $2::int4[], $3::text[], $4::float8[], $5::text[],
                         $6::text[], $7::int4[], $8::text[], $9::int4[])
        WITH ORDINALITY AS o(id, token, status, next_at, provider, pmid, code, text, requeue, idx)
), target AS (
    -- each outcome's row by primary key, locked: the status and token are checked on the locked
    -- row, so no index on status can tempt the planner into comparing every sending row with
    -- every outcome when its statistics are stale (that plan took seconds per batch)
    SELECT o.*, m.row_id FROM o
    CROSS JOIN LATERAL (
        SELECT ctid AS row_id, status AS cur_status, lease_token AS cur_token
        FROM messages WHERE id = o.id FOR UPDATE
    ) m
    WHERE m.cur_status = 'sending' AND m.cur_token = o.token
), upd AS (
    UPDATE messages m
    SET status = o.status,
        next_at = CASE WHEN o.status IN ('retrying', 'queued') THEN coalesce(o.next_at, now.t) END,
        lease_owner = NULL, updated_at = now.t,
        provider = coalesce(o.provider, m.provider),
        provider_message_id = coalesce(o.pmid, m.provider_message_id),
        last_code = coalesce(o.code, m.last_code), last_text = coalesce(o.text, m.last_text),
        sent_at = CASE WHEN o.status = 'sent' THEN now.t ELSE m.sent_at END,
        attempts = m.attempts - o.requeue
    FROM target o, now
    WHERE m.ctid = o.row_id  -- the row locked above
    RETURNING o.idx, o.status
), counted AS (
    INSERT INTO throughput (bucket, kind, n)
    SELECT {_BUCKET}, kind, count(*) FROM (
        SELECT CASE status WHEN 'sent' THEN 'sent' WHEN 'retrying' THEN 'retried' ELSE 'failed' END
            AS kind
        FROM upd WHERE status IN ('sent', 'failed', 'retrying', 'suppressed')
    ) k GROUP BY kind ORDER BY kind  -- one lock order for the shared counter rows
    ON CONFLICT (bucket, kind) DO UPDATE SET n = throughput.n + excluded.n
), e AS (
    SELECT * FROM unnest($10::int8[], $11::text[], $12::float8[], $13::text[], $14::text[],
                         $15::text[], $16::int4[], $17::text[])
        WITH ORDINALITY AS e(idx, message_id, at, type, worker, provider, code, detail, seq)
), ev AS (
    INSERT INTO events (message_id, at, type, worker, provider, code, detail)
    SELECT message_id, at, type, worker, provider, code, detail FROM (
        SELECT e.idx, e.seq, e.message_id, e.at, e.type, e.worker, e.provider, e.code, e.detail
        FROM e JOIN upd ON upd.idx = e.idx
        UNION ALL
        SELECT o.idx, 0, o.id, now.t, 'stale_outcome', $18, o.provider, o.code,
               'late outcome ''' || o.status || ''' rejected: the lease was lost'
        FROM o, now WHERE o.idx NOT IN (SELECT idx FROM upd)
    ) x ORDER BY idx, seq
)
SELECT array(SELECT idx FROM upd) AS accepted,
       CASE WHEN $19 THEN pg_notify('{CHANNEL}', '') END AS notified
"""

# Rows being recorded or reclaimed right now are skipped (SKIP LOCKED): a lease renewal never
# waits, and never deadlocks with the same worker's record of the same rows.
_EXTEND_SQL = f"""
WITH c AS (SELECT * FROM unnest($1::text[], $2::int4[]) AS c(id, token)),
locked AS (
    SELECT m.row_id FROM c
    CROSS JOIN LATERAL (
        SELECT ctid AS row_id, status, lease_token FROM messages WHERE id = c.id
        FOR UPDATE SKIP LOCKED
    ) m
    WHERE m.status = 'sending' AND m.lease_token = c.token  -- by primary key, as in _RECORD_SQL
)
UPDATE messages m SET next_at = {_NOW} + $3 FROM locked WHERE m.ctid = locked.row_id
"""

_STATE_LOCK_SQL = """
SELECT count(pg_advisory_xact_lock(hashtext('postroom:' || k)))
FROM (SELECT k FROM unnest($1::text[]) AS k ORDER BY k) s
"""

_NEXT_DUE_SQL = """
SELECT least(
    (SELECT min(next_at) FROM messages WHERE priority = 0 AND next_at IS NOT NULL),
    (SELECT min(next_at) FROM messages WHERE priority = 1 AND next_at IS NOT NULL),
    (SELECT min(next_at) FROM messages WHERE priority = 2 AND next_at IS NOT NULL)
) - extract(epoch FROM clock_timestamp())::float8
"""

_HEARTBEAT_SQL = f"""
INSERT INTO workers (name, host, pid, started_at, heartbeat_at, concurrency, in_flight, sent, failed)
VALUES ($1, $2, $3, $4, {_NOW}, $5, $6, $7, $8)
ON CONFLICT (name) DO UPDATE SET host = excluded.host, pid = excluded.pid,
    started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at,
    concurrency = excluded.concurrency, in_flight = excluded.in_flight, sent = excluded.sent,
    failed = excluded.failed
"""

# A worker whose heartbeat is stale is gone (killed, or paused): its leases end now rather than at
# lease expiry, so its messages are claimed again at once (and its late outcomes are fenced off).
_RELEASE_STALE_SQL = f"""
WITH now AS MATERIALIZED (SELECT {_NOW} AS t),
gone AS (
    DELETE FROM workers WHERE heartbeat_at < (SELECT t FROM now) - $1 RETURNING name
), released AS (
    UPDATE messages m SET next_at = now.t
    FROM now
    WHERE m.status = 'sending' AND m.lease_owner IN (SELECT name FROM gone) AND m.next_at > now.t
    RETURNING m.id
)
SELECT count(*) FROM released
"""


def asyncpg_dsn(url: str) -> str:
    """postgresql+asyncpg://… or postgres://… as asyncpg wants it (postgresql://…)."""
    scheme, _, rest = url.partition("://")
    if scheme.split("+", 1)[0] not in ("postgres", "postgresql"):
        raise ValueError(f"not a PostgreSQL URL: {url!r}")
    return f"postgresql://{rest}"


def _columns(rows: Sequence[tuple[Any, ...]], n: int) -> list[list[Any]]:
    cols: list[list[Any]] = [[] for _ in range(n)]
    for r in rows:
        for i in range(n):
            cols[i].append(r[i])
    return cols


class PostgresStore:
    """The Store on PostgreSQL through an asyncpg pool.

    `timeout_s` bounds every call (acquiring a connection included); past it, or when the server
    is unreachable, the call raises StoreUnavailable. The pool replaces broken connections on the
    next acquire, so nothing needs restarting after the database comes back.
    """

    POLL_S = 0.5  # idle polling period while the LISTEN connection is down
    MIN_WAIT_S = 0.01

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        timeout_s: float = 10.0,
        connect_timeout_s: float = 5.0,
        open_timeout_s: float = 0.0,
        check_schema: bool = True,
    ) -> None:
        self.url = url
        self.dsn = asyncpg_dsn(url)
        self.min_size = min_size
        self.max_size = max_size
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.open_timeout_s = open_timeout_s
        self.check_schema = check_schema
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._listener_retry_at = 0.0
        self._work = asyncio.Event()

    # -- plumbing ---------------------------------------------------------------------------
    async def open(self) -> None:
        """Connect (retrying for up to `open_timeout_s` while the server is starting) and check
        that the schema is at the head revision."""
        if self._pool is not None:
            return
        deadline = time.monotonic() + self.open_timeout_s
        while True:
            try:
                pool = await asyncpg.create_pool(
                    self.dsn,
                    min_size=self.min_size,
                    max_size=self.max_size,
                    timeout=self.connect_timeout_s,
                    command_timeout=self.timeout_s,
                    max_inactive_connection_lifetime=300.0,
                    server_settings={"application_name": "postroom"},
                )
                break
            except _UNAVAILABLE as e:
                if time.monotonic() >= deadline:
                    raise StoreUnavailable(f"cannot connect to PostgreSQL: {e}") from e
                log.warning("PostgreSQL is not reachable yet (%s); retrying", e)
                await asyncio.sleep(1.0)
            except asyncpg.PostgresError as e:  # wrong password, no such database, ...
                raise ConfigError(
                    "database_url", f"PostgreSQL refused the connection: {type(e).__name__}: {e}"
                ) from e
        assert pool is not None
        if self.check_schema:
            from postroom.store.migrations import SchemaOutOfDate, head

            try:
                async with pool.acquire(timeout=self.timeout_s) as conn:
                    current = await conn.fetchval("SELECT version_num FROM alembic_version")
            except asyncpg.exceptions.UndefinedTableError:
                current = None
            if current != head():
                await pool.close()
                raise SchemaOutOfDate(current, head(), "the PostgreSQL database")
        self._pool = pool

    async def close(self) -> None:
        if self._listener is not None:
            conn, self._listener = self._listener, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 5)
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 10)
            except _UNAVAILABLE:  # TimeoutError included
                pool.terminate()

    async def _run(self, fn: Callable[[asyncpg.Connection], Awaitable[T]], *, tx: bool = True) -> T:
        """Run `fn` on a pooled connection (in a transaction unless tx=False), with the timeout;
        a deadlock or serialization failure is retried, a lost database is StoreUnavailable."""
        if self._pool is None:
            raise StoreUnavailable("the store is not open")
        pool = self._pool
        for attempt in range(3):
            try:
                # the acquire timeout also bounds the reset when the connection goes back
                async with (
                    asyncio.timeout(self.timeout_s),
                    pool.acquire(timeout=self.timeout_s) as conn,
                ):
                    if not tx:
                        return await fn(conn)
                    async with conn.transaction():
                        return await fn(conn)
            except _RETRYABLE as e:
                if attempt == 2:
                    raise StoreUnavailable(f"database busy: {e}") from e
                await asyncio.sleep(0.01 * (attempt + 1))
            except _UNAVAILABLE as e:
                raise StoreUnavailable(f"database error: {type(e).__name__}: {e}") from e
        raise AssertionError("unreachable")

    # -- waiting for work -------------------------------------------------------------------
    def _on_notify(self, *_: Any) -> None:
        self._work.set()

    def _on_listener_lost(self, *_: Any) -> None:
        self._listener = None

    async def _ensure_listener(self) -> bool:
        if self._listener is not None and not self._listener.is_closed():
            return True
        if time.monotonic() < self._listener_retry_at:
            return False
        conn: asyncpg.Connection | None = None
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                conn = await asyncpg.connect(self.dsn, timeout=self.connect_timeout_s)
                await conn.add_listener(CHANNEL, self._on_notify)
            conn.add_termination_listener(self._on_listener_lost)
        except (*_UNAVAILABLE, asyncpg.PostgresError) as e:
            if conn is not None:
                conn.terminate()
            log.debug("LISTEN connection unavailable (%s); polling", e)
            self._listener_retry_at = time.monotonic() + 1.0
            return False
        self._listener = conn
        self._work.set()  # notifications sent while nobody listened are lost: look once more
        return True

    async def wait_for_work(self, timeout_s: float) -> None:
        """Return on a NOTIFY from an enqueue (any process), when the earliest scheduled, retrying
        or leased message falls due, or after `timeout_s`. Polls when LISTEN is unavailable."""
        listening = await self._ensure_listener()
        if self._work.is_set():
            self._work.clear()
            return
        wait_s = timeout_s if listening else min(timeout_s, self.POLL_S)
        try:
            due_in = await self._run(lambda c: c.fetchval(_NEXT_DUE_SQL), tx=False)
        except StoreUnavailable:
            due_in = None
        if due_in is not None:
            wait_s = min(wait_s, max(self.MIN_WAIT_S, due_in + 0.001))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._work.wait(), wait_s)
        self._work.clear()

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
        rows = insert_rows(messages, time.time(), key_id)
        cols = _columns(rows, 14)
        keyed = [r for r in rows if r[11] is not None]

        async def tx(conn: asyncpg.Connection) -> list[EnqueueResult | ConflictError]:
            inserted = set(await conn.fetchval(_ENQUEUE_SQL, *cols))
            if len(inserted) == len(rows):
                return [EnqueueResult(r[0], Status(r[1])) for r in rows]
            existing = {
                (e[0], e[1]): e
                for e in await conn.fetch(
                    _EXISTING_SQL, [r[10] for r in keyed], [r[11] for r in keyed]
                )
            }
            results: list[EnqueueResult | ConflictError] = []
            for r in rows:
                if r[0] in inserted:
                    results.append(EnqueueResult(r[0], Status(r[1])))
                    continue
                e = existing[(r[10], r[11])]
                if e[3] != r[12]:
                    err = ConflictError(
                        f"Idempotency-Key {r[11]!r} was already used with a different request body"
                    )
                    if atomic:
                        raise err
                    results.append(err)
                else:
                    results.append(EnqueueResult(e[2], Status(e[4]), created=False))
            return results

        return await self._run(tx, tx=bool(keyed))

    # -- claim / record ---------------------------------------------------------------------
    async def claim(self, worker: str, limit: int, lease_s: float) -> list[ClaimedMessage]:
        rows = await self._run(
            lambda c: c.fetch(_CLAIM_SQL, worker, limit, float(lease_s)), tx=False
        )
        return [
            ClaimedMessage(
                id=r[0],
                content=Content.from_json(orjson.loads(r[1])),
                attempts=r[2],
                lease_token=r[3],
                created_at=r[4],
                priority=Priority(r[5]),
            )
            for r in rows
        ]

    async def record(self, outcomes: Sequence[Outcome], *, worker: str) -> list[bool]:
        if not outcomes:
            return []
        o_cols: list[list[Any]] = [[] for _ in range(9)]
        e_cols: list[list[Any]] = [[] for _ in range(8)]
        requeued = False
        for i, o in enumerate(outcomes, 1):
            requeue = o.status in (Status.RETRYING, Status.QUEUED)
            requeued = requeued or requeue
            for col, v in zip(
                o_cols,
                (
                    o.message_id,
                    o.lease_token,
                    o.status.value,
                    o.next_at if requeue else None,
                    o.provider,
                    o.provider_message_id,
                    o.code,
                    o.text,
                    1 if o.status is Status.QUEUED else 0,
                ),
                strict=True,
            ):
                col.append(v)
            for e in o.events:
                for col, v in zip(
                    e_cols,
                    (i, e.message_id, e.at, e.type, e.worker, e.provider, e.code, e.detail),
                    strict=True,
                ):
                    col.append(v)
        accepted = set(
            await self._run(
                lambda c: c.fetchval(_RECORD_SQL, *o_cols, *e_cols, worker, requeued), tx=False
            )
        )
        return [i in accepted for i in range(1, len(outcomes) + 1)]

    async def extend_leases(
        self, worker: str, claims: Sequence[tuple[str, int]], lease_s: float
    ) -> int:
        if not claims:
            return 0
        ids = [c[0] for c in claims]
        tokens = [c[1] for c in claims]
        status = await self._run(
            lambda c: c.execute(_EXTEND_SQL, ids, tokens, float(lease_s)), tx=False
        )
        return int(status.rsplit(" ", 1)[-1])

    # -- the worker registry ----------------------------------------------------------------
    async def heartbeat(self, info: WorkerInfo) -> None:
        await self._run(
            lambda c: c.execute(
                _HEARTBEAT_SQL,
                info.name,
                info.host,
                info.pid,
                info.started_at,
                info.concurrency,
                info.in_flight,
                info.sent,
                info.failed,
            ),
            tx=False,
        )

    async def remove_worker(self, name: str) -> None:
        await self._run(lambda c: c.execute("DELETE FROM workers WHERE name = $1", name), tx=False)

    async def list_workers(self) -> list[WorkerInfo]:
        rows = await self._run(
            lambda c: c.fetch(
                "SELECT name, host, pid, started_at, heartbeat_at, concurrency, in_flight, sent,"
                " failed FROM workers ORDER BY started_at, name"
            ),
            tx=False,
        )
        return [WorkerInfo(*r) for r in rows]

    async def release_stale(self, stale_after_s: float) -> int:
        n: int = await self._run(
            lambda c: c.fetchval(_RELEASE_STALE_SQL, float(stale_after_s)), tx=False
        )
        if n:
            await self._run(lambda c: c.execute(f"NOTIFY {CHANNEL}"), tx=False)
        return n

    # -- queries ----------------------------------------------------------------------------
    async def get(self, message_id: str, *, with_events: bool = True) -> MessageRecord:
        async def q(conn: asyncpg.Connection) -> MessageRecord:
            row = await conn.fetchrow(
                f"SELECT {MSG_COLS} FROM {MSG_FROM} WHERE m.id = $1", message_id
            )
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
                    for r in await conn.fetch(
                        "SELECT type, at, worker, provider, code, detail FROM events"
                        " WHERE message_id = $1 ORDER BY id",
                        message_id,
                    )
                ]
            return rec

        return await self._run(q, tx=with_events)  # one snapshot for the row and its events

    async def list_messages(self, flt: MessageFilter) -> MessagePage:
        params: list[Any] = []

        def param(v: Any) -> str:
            params.append(v)
            return f"${len(params)}"

        sql = list_sql(flt, param)
        rows = await self._run(lambda c: c.fetch(sql, *params), tx=False)
        return message_page(rows, flt.limit)

    async def cancel(self, message_id: str) -> MessageRecord:
        async def tx(conn: asyncpg.Connection) -> None:
            status = await conn.fetchval(
                "SELECT status FROM messages WHERE id = $1 FOR UPDATE", message_id
            )
            if status is None:
                raise NotFound(f"message {message_id!r}")
            if Status(status) not in CANCELLABLE:
                raise ConflictError(
                    f"message {message_id} is {status}: only queued, scheduled or retrying "
                    "messages can be cancelled"
                )
            now = time.time()
            await conn.execute(
                "UPDATE messages SET status = 'cancelled', next_at = NULL, updated_at = $1"
                " WHERE id = $2",
                now,
                message_id,
            )
            await conn.execute(
                "INSERT INTO events (message_id, at, type) VALUES ($1, $2, 'cancelled')",
                message_id,
                now,
            )

        await self._run(tx)
        return await self.get(message_id)

    async def retry_now(self, message_id: str) -> MessageRecord:
        async def tx(conn: asyncpg.Connection) -> None:
            status = await conn.fetchval(
                "SELECT status FROM messages WHERE id = $1 FOR UPDATE", message_id
            )
            if status is None:
                raise NotFound(f"message {message_id!r}")
            if status not in ("failed", "retrying"):
                raise ConflictError(
                    f"message {message_id} is {status}: only failed or retrying messages can be "
                    "retried"
                )
            now = time.time()
            await conn.execute(
                "UPDATE messages SET status = 'queued', next_at = $1, updated_at = $1 WHERE id = $2",
                now,
                message_id,
            )
            await conn.execute(
                "INSERT INTO events (message_id, at, type, detail)"
                " VALUES ($1, $2, 'queued', 'retry requested')",
                message_id,
                now,
            )
            await conn.execute(f"NOTIFY {CHANNEL}")

        await self._run(tx)
        return await self.get(message_id)

    async def stats(self, now: float | None = None) -> dict[str, Any]:
        now = now or time.time()

        async def q(conn: asyncpg.Connection) -> dict[str, Any]:
            by_status = {s.value: 0 for s in Status}
            for status, n in await conn.fetch(
                "SELECT status, count(*) FROM messages GROUP BY status"
            ):
                by_status[status] = n
            due = await conn.fetchval(
                "SELECT count(*) FROM messages WHERE next_at <= $1 AND status != 'sending'", now
            )
            recent = {}
            bucket = int(now // BUCKET_S) * BUCKET_S
            for label, span in (("last_minute", 60), ("last_hour", 3600)):
                counts = dict(
                    await conn.fetch(
                        "SELECT kind, sum(n)::int8 FROM throughput WHERE bucket > $1 GROUP BY kind",
                        bucket - span,
                    )
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

        return await self._run(q)

    async def throughput(self, since: float, step_s: int = 60) -> list[dict[str, Any]]:
        """Counts per `step_s` interval from `since` to now (oldest first, empty ones included)."""
        step_s = max(BUCKET_S, step_s // BUCKET_S * BUCKET_S)
        start = int(since // step_s) * step_s
        rows = await self._run(
            lambda c: c.fetch("SELECT bucket, kind, n FROM throughput WHERE bucket >= $1", start),
            tx=False,
        )
        n = int((time.time() - start) // step_s) + 1
        series: list[dict[str, Any]] = [
            {"t": start + i * step_s, "accepted": 0, "sent": 0, "failed": 0, "retried": 0}
            for i in range(n)
        ]
        for bucket, kind, count in rows:
            i = (int(bucket) - start) // step_s
            if 0 <= i < n and kind in series[i]:
                series[i][kind] += int(count)
        return series

    # -- routing state (rate limits, throttles, snapshots shared by every process) ----------
    async def state_update(
        self,
        keys: Sequence[str],
        fn: Callable[[dict[str, str]], tuple[dict[str, tuple[str, float | None]], T]],
    ) -> T:
        """Read `keys`, let `fn` decide the writes, write them: atomically. Concurrent updates of
        the same keys take turns (transaction-scoped advisory locks, taken in key order)."""

        async def tx(conn: asyncpg.Connection) -> T:
            rows: dict[str, str] = {}
            if keys:
                await conn.execute(_STATE_LOCK_SQL, sorted(set(keys)))
                rows = {
                    r[0]: r[1]
                    for r in await conn.fetch(
                        "SELECT key, value FROM routing_state WHERE key = ANY($1::text[])"
                        f" AND (expires_at IS NULL OR expires_at > {_NOW})",
                        list(keys),
                    )
                }
            writes, result = fn(rows)
            if writes:
                items = sorted(writes.items())
                await conn.execute(
                    "INSERT INTO routing_state (key, value, expires_at)"
                    " SELECT * FROM unnest($1::text[], $2::text[], $3::float8[])"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value,"
                    " expires_at = excluded.expires_at",
                    [k for k, _ in items],
                    [v for _, (v, _) in items],
                    [exp for _, (_, exp) in items],
                )
                if any(exp is not None for _, exp in writes.values()):
                    await conn.execute(f"DELETE FROM routing_state WHERE expires_at < {_NOW}")
            return result

        return await self._run(tx)

    async def state_scan(self, prefix: str) -> dict[str, str]:
        rows = await self._run(
            lambda c: c.fetch(
                "SELECT key, value FROM routing_state WHERE left(key, length($1)) = $1"
                f" AND (expires_at IS NULL OR expires_at > {_NOW})",
                prefix,
            ),
            tx=False,
        )
        return {r[0]: r[1] for r in rows}

    # -- API keys ---------------------------------------------------------------------------
    async def create_key(self, name: str, role: str = "admin") -> tuple[ApiKey, str]:
        secret = "pr_" + secrets.token_urlsafe(30)
        key = ApiKey(id=new_id(), name=name, prefix=secret[:10], created_at=time.time(), role=role)
        await self._run(
            lambda c: c.execute(
                "INSERT INTO api_keys (id, name, prefix, hash, role, created_at)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                key.id,
                key.name,
                key.prefix,
                hash_secret(secret),
                key.role,
                key.created_at,
            ),
            tx=False,
        )
        return key, secret

    async def verify_key(self, secret: str) -> ApiKey | None:
        row = await self._run(
            lambda c: c.fetchrow(
                "SELECT id, name, prefix, created_at, role FROM api_keys"
                " WHERE hash = $1 AND revoked_at IS NULL",
                hash_secret(secret),
            ),
            tx=False,
        )
        return ApiKey(row[0], row[1], row[2], row[3], row[4]) if row else None

    async def list_keys(self) -> list[ApiKey]:
        rows = await self._run(
            lambda c: c.fetch(
                "SELECT id, name, prefix, created_at, role, revoked_at FROM api_keys"
                " ORDER BY created_at"
            ),
            tx=False,
        )
        return [ApiKey(r[0], r[1], r[2], r[3], r[4], r[5] is not None) for r in rows]

    async def revoke_key(self, key_id: str) -> None:
        status = await self._run(
            lambda c: c.execute(
                "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
                time.time(),
                key_id,
            ),
            tx=False,
        )
        if status == "UPDATE 0":
            raise NotFound(f"API key {key_id!r}")

    async def count_keys(self) -> int:
        n: int = await self._run(
            lambda c: c.fetchval("SELECT count(*) FROM api_keys WHERE revoked_at IS NULL"),
            tx=False,
        )
        return n

    # -- capture inbox ----------------------------------------------------------------------
    async def capture(self, mails: Sequence[CapturedMail]) -> None:
        if not mails:
            return
        cols = _columns(
            [
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
            ],
            7,
        )
        await self._run(
            lambda c: c.execute(
                "INSERT INTO captured (id, message_id, captured_at, mail_from, rcpt_to, subject, mime)"
                " SELECT * FROM unnest($1::text[], $2::text[], $3::float8[], $4::text[], $5::text[],"
                " $6::text[], $7::bytea[])",
                *cols,
            ),
            tx=False,
        )

    async def inbox(self, limit: int = 50, before: str | None = None) -> list[CapturedMail]:
        sql = "SELECT id, message_id, captured_at, mail_from, rcpt_to, subject, mime FROM captured"
        params: list[Any] = []
        if before:
            sql += " WHERE id < $1"
            params.append(before)
        sql += f" ORDER BY id DESC LIMIT ${len(params) + 1}"
        params.append(limit)
        rows = await self._run(lambda c: c.fetch(sql, *params), tx=False)
        return [
            CapturedMail(r[0], r[1], r[2], r[3], orjson.loads(r[4]), r[5], bytes(r[6]))
            for r in rows
        ]

    async def inbox_get(self, capture_id: str) -> CapturedMail:
        r = await self._run(
            lambda c: c.fetchrow(
                "SELECT id, message_id, captured_at, mail_from, rcpt_to, subject, mime"
                " FROM captured WHERE id = $1",
                capture_id,
            ),
            tx=False,
        )
        if r is None:
            raise NotFound(f"captured message {capture_id!r}")
        return CapturedMail(r[0], r[1], r[2], r[3], orjson.loads(r[4]), r[5], bytes(r[6]))
