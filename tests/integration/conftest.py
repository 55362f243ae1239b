"""Stores for the conformance tests: every Store implementation passes the same tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from postroom.domain.ports import Store
from postroom.store.sqlite import SQLiteStore
from tests import pg
from tests.conftest import require_service

STORE_KINDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


async def make_store(kind: str, tmp_path: Path) -> Store:
    """A new, empty store of `kind`. PostgreSQL: a database of its own (drop it with
    `pg.drop_database(store.url)` or use the `store` / `pg_url` fixtures, which do)."""
    if kind == "sqlite":
        return SQLiteStore(tmp_path / "postroom.db", synchronous="NORMAL")
    if kind == "postgres":
        from postroom.store.postgres import PostgresStore

        require_service("PostgreSQL", pg.PG_HOST, pg.PG_PORT)
        return PostgresStore(await pg.create_database(), min_size=1, max_size=4, timeout_s=10)
    raise ValueError(kind)


@pytest.fixture(scope="session", autouse=True)
def _pg_template_cleanup() -> Iterator[None]:
    yield
    pg.drop_template()


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A fresh PostgreSQL database (at the head revision) for one test."""
    require_service("PostgreSQL", pg.PG_HOST, pg.PG_PORT)
    url = await pg.create_database()
    try:
        yield url
    finally:
        await pg.drop_database(url)


@pytest.fixture(params=STORE_KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s = await make_store(request.param, tmp_path)
    await s.open()
    try:
        yield s
    finally:
        await s.close()
        if request.param == "postgres":
            await pg.drop_database(s.url)  # type: ignore[attr-defined]
