"""SQLAlchemy Core tables: the one description of the schema, for every engine and for migrations."""

from __future__ import annotations

import sqlalchemy as sa

__all__ = ["SCHEMA_VERSION", "metadata"]

SCHEMA_VERSION = "1"

metadata = sa.MetaData()

messages = sa.Table(
    "messages",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("priority", sa.SmallInteger, nullable=False, server_default="1"),
    # When the row next needs a worker: due time for queued/scheduled/retrying, lease expiry for
    # sending, NULL once final. The claim query reads only this column (and priority).
    sa.Column("next_at", sa.Float, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("lease_owner", sa.String(128), nullable=True),
    sa.Column("lease_token", sa.Integer, nullable=False, server_default="0"),
    sa.Column("source", sa.String(32), nullable=False, server_default="api"),
    sa.Column("rcpt", sa.Text, nullable=False),  # ",a@x,b@y," lowercased, for the `to` filter
    sa.Column("tags", sa.Text, nullable=True),  # ",t1,t2," for the `tag` filter
    sa.Column("key_id", sa.String(32), nullable=True),
    sa.Column("idempotency_key", sa.String(256), nullable=True),
    sa.Column("request_hash", sa.String(64), nullable=True),
    sa.Column("accepted_status", sa.String(16), nullable=True),
    sa.Column("provider", sa.String(64), nullable=True),
    sa.Column("provider_message_id", sa.String(256), nullable=True),
    sa.Column("last_code", sa.Integer, nullable=True),
    sa.Column("last_text", sa.Text, nullable=True),
    sa.Column("sent_at", sa.Float, nullable=True),
)
sa.Index(
    "ix_messages_claim",
    messages.c.priority,
    messages.c.next_at,
    sqlite_where=messages.c.next_at.isnot(None),
    postgresql_where=messages.c.next_at.isnot(None),
)
sa.Index("ix_messages_status_id", messages.c.status, messages.c.id)
sa.Index(
    "ux_messages_idempotency",
    messages.c.key_id,
    messages.c.idempotency_key,
    unique=True,
    sqlite_where=messages.c.idempotency_key.isnot(None),
    postgresql_where=messages.c.idempotency_key.isnot(None),
)

# The message itself (Content.to_json() as JSON text) lives apart from its status row: a status
# change then rewrites a ~200-byte row, not the whole message (9x faster updates on SQLite, which
# rewrites every overflow page of a record on any update; narrower tuples on PostgreSQL too).
message_content = sa.Table(
    "message_content",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),  # = messages.id
    sa.Column("content", sa.Text, nullable=False),
)

# Exact-match lookups for the message list: "to:<address>" and "tag:<name>" -> message ids, so
# filtering a million messages by recipient or tag walks an index in id order instead of scanning.
message_keys = sa.Table(
    "message_keys",
    metadata,
    sa.Column("key", sa.String(400), primary_key=True),
    sa.Column("message_id", sa.String(32), primary_key=True),
    sqlite_with_rowid=False,
)

events = sa.Table(
    "events",
    metadata,
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("message_id", sa.String(32), nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("type", sa.String(32), nullable=False),
    sa.Column("worker", sa.String(128), nullable=True),
    sa.Column("provider", sa.String(64), nullable=True),
    sa.Column("code", sa.Integer, nullable=True),
    sa.Column("detail", sa.Text, nullable=True),
)
sa.Index("ix_events_message", events.c.message_id, events.c.id)

# Counts per 10-second bucket (accepted, sent, failed, retried): the stats and the dashboard's
# throughput chart read these few rows instead of scanning messages or events, and the hot path
# pays one upsert per kind per batch instead of an index on every status change.
throughput = sa.Table(
    "throughput",
    metadata,
    sa.Column("bucket", sa.BigInteger, primary_key=True),  # epoch seconds, a multiple of 10
    sa.Column("kind", sa.String(16), primary_key=True),
    sa.Column("n", sa.BigInteger, nullable=False),
)
THROUGHPUT_BUCKET_S = 10

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("prefix", sa.String(16), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False, unique=True),
    sa.Column("role", sa.String(16), nullable=False, server_default="admin"),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float, nullable=True),
)

captured = sa.Table(
    "captured",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("message_id", sa.String(32), nullable=False),
    sa.Column("captured_at", sa.Float, nullable=False),
    sa.Column("mail_from", sa.Text, nullable=False),
    sa.Column("rcpt_to", sa.Text, nullable=False),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("mime", sa.LargeBinary, nullable=False),
)

# Routing state shared by worker processes when there is no Redis: rate-limit slots (`rl:<key>` ->
# the GCRA theoretical arrival time), domain throttles and router snapshots (JSON). A few hundred
# rows at most; rows past `expires_at` are dead and purged on writes. See Store.state_update.
routing_state = sa.Table(
    "routing_state",
    metadata,
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=True),
)

meta = sa.Table(
    "postroom_meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

# The worker registry: one row per running worker process, refreshed by its heartbeat. A row whose
# heartbeat is stale belongs to a dead (or paused) worker: its leases are released early.
workers = sa.Table(
    "workers",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("heartbeat_at", sa.Float, nullable=False),
    sa.Column("concurrency", sa.Integer, nullable=False, server_default="0"),
    sa.Column("in_flight", sa.Integer, nullable=False, server_default="0"),
    sa.Column("sent", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("failed", sa.BigInteger, nullable=False, server_default="0"),
)
