"""Schema migrations (Alembic) for SQLite and PostgreSQL: upgrade to head, check, stamp old files.

The revisions in versions/ are generated from `postroom.store.schema` (the one description of the
tables) and a test checks that applying them gives exactly that schema on both engines.

* `postroom migrate` calls `upgrade(url)`.
* A store refuses to open a database whose revision is not the head (`SchemaOutOfDate`), except
  that a new, empty SQLite file is created at the head on the spot, so the embedded mode needs no
  step at all.
* Databases made before migrations existed (tables from `create_all`, no `alembic_version`) are
  at revision 0001; `upgrade` stamps them so and goes on from there.

New revision (after editing schema.py), from the repository root::

    python -m postroom.store.migrations revision "what changed"
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from postroom.domain.errors import ConfigError
from postroom.store import schema

logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)

__all__ = [
    "SchemaOutOfDate",
    "alembic_config",
    "ensure_sqlite",
    "head",
    "sqlalchemy_url",
    "upgrade",
    "upgrade_connection",
]

HERE = Path(__file__).parent
LEGACY_REVISION = "0001"  # what a database made by create_all before migrations existed matches
ADVISORY_LOCK = 0x706F7374726F6F6D  # "postroom": one migration at a time per PostgreSQL database


class SchemaOutOfDate(ConfigError):
    """The database schema is older (or newer) than this version of Postroom expects."""

    def __init__(self, current: str | None, expected: str, where: str) -> None:
        super().__init__(
            "database_url",
            f"the database schema of {where} is at revision {current or 'none'}, this version of "
            f"Postroom needs {expected}: run `postroom migrate` first",
        )
        self.current = current
        self.expected = expected


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    return cfg


@functools.cache
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head() -> str:
    rev = _script().get_current_head()
    assert rev is not None
    return rev


def sqlalchemy_url(url: str) -> str:
    """A Postroom database URL as SQLAlchemy wants it (PostgreSQL through asyncpg)."""
    scheme, sep, rest = url.partition("://")
    base = scheme.split("+", 1)[0]
    if base in ("postgres", "postgresql"):
        return f"postgresql+asyncpg://{rest}"
    return f"{base}{sep}{rest}"


def _has_tables(conn: sa.Connection) -> bool:
    return sa.inspect(conn).has_table("messages")


def upgrade_connection(conn: sa.Connection, target: str = "head") -> tuple[str | None, str]:
    """Upgrade the database behind `conn` (inside its transaction); returns (before, after)."""
    before = MigrationContext.configure(conn).get_current_revision()
    cfg = alembic_config()
    cfg.attributes["connection"] = conn
    if before is None and _has_tables(conn):
        command.stamp(cfg, LEGACY_REVISION)
        before = LEGACY_REVISION
    command.upgrade(cfg, target)
    return before, MigrationContext.configure(conn).get_current_revision() or ""


def current_revision(conn: sa.Connection) -> str | None:
    rev = MigrationContext.configure(conn).get_current_revision()
    if rev is None and _has_tables(conn):
        return "unversioned"
    return rev


async def _upgrade_postgres(url: str, target: str) -> tuple[str | None, str]:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(sqlalchemy_url(url), poolclass=sa.NullPool)
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text(f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK})"))
            return await conn.run_sync(upgrade_connection, target)
    finally:
        await engine.dispose()


def sqlite_engine(path: str) -> sa.Engine:
    """An engine whose transactions really cover DDL: pysqlite would otherwise commit before each
    CREATE/ALTER. BEGIN IMMEDIATE also makes two processes opening a new file take turns."""
    engine = sa.create_engine(
        f"sqlite:///{path}", poolclass=sa.NullPool, connect_args={"timeout": 30}
    )

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _: Any) -> None:
        dbapi_conn.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def ensure_sqlite(path: str) -> None:
    """Open-time check for an SQLite file: a new, empty file is created at the head revision (the
    embedded mode needs no step); an existing file must already be at the head."""
    engine = sqlite_engine(path)
    try:
        with engine.begin() as conn:
            current = current_revision(conn)
            if current == head():
                return
            if current is None:
                # the tables straight from schema.py (a test proves this equals the migrations)
                # and the head stamped: ~10x faster than replaying every revision
                schema.metadata.create_all(conn)
                conn.execute(
                    schema.meta.insert().values(key="schema_version", value=schema.SCHEMA_VERSION)
                )
                MigrationContext.configure(conn).stamp(_script(), "head")
                return
        raise SchemaOutOfDate(current, head(), path)
    finally:
        engine.dispose()


def upgrade(url: str, target: str = "head") -> tuple[str | None, str]:
    """Bring the database at `url` (a Postroom database URL) to `target`; returns (before, after)."""
    if url.startswith("sqlite"):
        from postroom.config import Settings

        path = Settings(database_url=url).sqlite_path
        assert path is not None
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sqlite_engine(path)
        try:
            with engine.begin() as conn:
                return upgrade_connection(conn, target)
        finally:
            engine.dispose()
    return asyncio.run(_upgrade_postgres(url, target))


def _main(argv: list[str]) -> None:  # pragma: no cover - a developer tool
    """`python -m postroom.store.migrations revision MESSAGE`: autogenerate from schema.py."""
    if len(argv) != 2 or argv[0] != "revision":
        sys.exit("usage: python -m postroom.store.migrations revision MESSAGE")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        engine = sqlite_engine(f"{tmp}/gen.db")
        with engine.begin() as conn:
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            scripts = ScriptDirectory.from_config(cfg)
            n = len(list(scripts.walk_revisions()))
            opts: dict[str, Any] = {"rev_id": f"{n + 1:04d}"}
            command.revision(cfg, message=argv[1], autogenerate=True, **opts)
