"""PostgreSQL for tests: one migrated template per session, one fresh database per test."""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import asyncpg

T = TypeVar("T")

PG_HOST = os.environ.get("POSTROOM_TEST_PGHOST", "127.0.0.1")
PG_PORT = int(os.environ.get("POSTROOM_TEST_PGPORT", "5432"))
PG_USER = os.environ.get("POSTROOM_TEST_PGUSER", "postgres")
ADMIN_URL = f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/postgres"

_counter = itertools.count()
_template: str | None = None


def url_for(dbname: str) -> str:
    return f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{dbname}"


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _drop_orphans() -> None:
    """Drop test databases left by sessions that died (their pid is gone)."""
    conn = await asyncpg.connect(ADMIN_URL, timeout=10)
    try:
        for (name,) in await conn.fetch(
            "SELECT datname FROM pg_database WHERE datname ~ '^postroom_(t|tpl)_[0-9]+_'"
        ):
            pid = int(name.split("_")[2])
            if not _alive(pid):
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def _in_thread(fn: Callable[[], T]) -> T:
    """Run blocking set-up (which itself uses asyncio.run) off the test's event loop."""
    with ThreadPoolExecutor(1) as ex:
        return ex.submit(fn).result()


def template() -> str:
    """The name of this session's template database (made and migrated on first use)."""
    global _template
    if _template is None:
        from postroom.store.migrations import upgrade

        name = f"postroom_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"

        def make() -> None:
            asyncio.run(_drop_orphans())
            asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
            upgrade(url_for(name))

        _in_thread(make)
        _template = name
    return _template


async def create_database() -> str:
    """A new database at the head revision, copied from the template; returns its URL."""
    name = f"postroom_t_{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
    await _admin(f'CREATE DATABASE "{name}" TEMPLATE "{template()}"')
    return url_for(name)


async def drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def drop_template() -> None:
    global _template
    if _template is not None:
        name, _template = _template, None
        _in_thread(lambda: asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')))
