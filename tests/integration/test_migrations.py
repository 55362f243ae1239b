"""Migrations: they produce exactly schema.py on both engines; stores refuse an old schema."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import asyncpg
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from postroom.store import schema
from postroom.store.migrations import SchemaOutOfDate, head, sqlite_engine, upgrade
from postroom.store.sqlite import SQLiteStore


def _diff(conn: sa.Connection) -> list[object]:
    return list(
        compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), schema.metadata
        )
    )


def test_sqlite_migrations_build_exactly_the_schema_in_schema_py(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/m.db"
    assert upgrade(url) == (None, head())
    engine = sqlite_engine(f"{tmp_path}/m.db")
    with engine.connect() as conn:
        assert _diff(conn) == []
    engine.dispose()
    assert upgrade(url) == (head(), head())  # idempotent


async def test_a_new_sqlite_file_is_created_at_the_head_without_a_step(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "new.db")
    await store.open()
    await store.close()
    conn = sqlite3.connect(tmp_path / "new.db")
    assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == (head(),)
    conn.close()
    engine = sqlite_engine(f"{tmp_path}/new.db")
    with engine.connect() as c:
        assert _diff(c) == []  # create_all + stamp == the migrations
    engine.dispose()


async def test_an_out_of_date_sqlite_file_is_refused_until_migrated(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    store = SQLiteStore(db)
    await store.open()
    await store.close()
    conn = sqlite3.connect(db)
    conn.execute("UPDATE alembic_version SET version_num = 'ffff'")  # an unknown (older) revision
    conn.commit()
    conn.close()
    with pytest.raises(SchemaOutOfDate, match="postroom migrate"):
        await SQLiteStore(db).open()


async def test_a_sqlite_file_from_before_migrations_is_stamped_and_upgraded(tmp_path: Path) -> None:
    db = tmp_path / "legacy.db"
    engine = sqlite_engine(str(db))
    with engine.begin() as conn:
        schema.metadata.create_all(conn)  # what Postroom did before migrations existed
    engine.dispose()
    with pytest.raises(SchemaOutOfDate, match="unversioned"):
        await SQLiteStore(db).open()
    assert upgrade(f"sqlite:///{db}") == ("0001", head())
    store = SQLiteStore(db)
    await store.open()
    await store.close()


@pytest.mark.postgres
async def test_postgres_migrations_build_exactly_the_schema_in_schema_py(pg_url: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    from postroom.store.migrations import sqlalchemy_url

    engine = create_async_engine(sqlalchemy_url(pg_url), poolclass=sa.NullPool)
    async with engine.connect() as conn:
        assert await conn.run_sync(_diff) == []
    await engine.dispose()


@pytest.mark.postgres
async def test_postgres_store_refuses_a_database_that_is_not_migrated(pg_url: str) -> None:
    from postroom.store.postgres import PostgresStore

    conn = await asyncpg.connect(pg_url)
    await conn.execute("DROP TABLE alembic_version")
    await conn.close()
    with pytest.raises(SchemaOutOfDate, match="run `postroom migrate`"):
        await PostgresStore(pg_url).open()
