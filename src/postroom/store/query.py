"""SQL and row shapes both stores share: the message columns, the message list query, rows -> records."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import orjson

from postroom.domain.model import Status
from postroom.domain.ports import MessageFilter, MessagePage, MessageRecord

__all__ = ["MSG_COLS", "MSG_FROM", "key_filter", "list_sql", "message_page", "message_record"]

MSG_COLS = (
    "m.id, m.status, m.priority, m.next_at, m.created_at, m.updated_at, m.attempts, m.source,"
    " c.content, m.provider, m.provider_message_id, m.last_code, m.last_text, m.sent_at"
)
MSG_FROM = "messages m JOIN message_content c ON c.id = m.id"
_KEYED_FROM = (
    "message_keys k JOIN messages m ON m.id = k.message_id JOIN message_content c ON c.id = m.id"
)


def message_record(row: Sequence[Any]) -> MessageRecord:
    """A row of MSG_COLS -> the record the API reports."""
    return MessageRecord(
        id=row[0],
        status=Status(row[1]),
        priority=row[2],
        next_at=row[3],
        created_at=row[4],
        updated_at=row[5],
        attempts=row[6],
        source=row[7],
        content=orjson.loads(row[8]),
        provider=row[9],
        provider_message_id=row[10],
        last_code=row[11],
        last_text=row[12],
        sent_at=row[13],
    )


def key_filter(flt: MessageFilter) -> tuple[str, str] | None:
    """The exact lookup key a filter can use (a full address, or a tag), if any."""
    if flt.to and "@" in flt.to:
        return "to", "to:" + flt.to.lower()
    if flt.tag:
        return "tag", "tag:" + flt.tag
    return None


def list_sql(flt: MessageFilter, param: Callable[[Any], str]) -> str:
    """The message list query, newest first, one more row than a page (to know if one follows).

    `param(value)` records a parameter and returns its placeholder (`?` or `$n`). An exact
    recipient or a tag walks the (key, message_id) index in id order: no scan, no sort."""
    where: list[str] = []
    lookup = key_filter(flt)
    order = "m.id"
    if lookup is not None:
        where.append(f"k.key = {param(lookup[1])}")
        order = "k.message_id"
    if flt.status is not None:
        where.append(f"m.status = {param(flt.status.value)}")
    if flt.tag and (lookup is None or lookup[0] != "tag"):
        where.append(f"m.tags LIKE {param(f'%,{flt.tag},%')}")
    if flt.to and (lookup is None or lookup[0] != "to"):
        where.append(f"m.rcpt LIKE {param(f'%{flt.to.lower()}%')}")
    if flt.since is not None:
        where.append(f"m.created_at >= {param(flt.since)}")
    if flt.until is not None:
        where.append(f"m.created_at < {param(flt.until)}")
    if flt.cursor:
        where.append(f"{order} < {param(flt.cursor)}")
    sql = f"SELECT {MSG_COLS} FROM {_KEYED_FROM if lookup is not None else MSG_FROM}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    return sql + f" ORDER BY {order} DESC LIMIT {param(flt.limit + 1)}"


def message_page(rows: Sequence[Sequence[Any]], limit: int) -> MessagePage:
    items = [message_record(r) for r in rows[:limit]]
    return MessagePage(items, items[-1].id if len(rows) > limit else None)
