"""PostgreSQL databases for the end-to-end tests (one per test, from the session template)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests import pg
from tests.conftest import require_service


@pytest.fixture(scope="session", autouse=True)
def _pg_template_cleanup() -> Iterator[None]:
    yield
    pg.drop_template()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database (at the head revision) for one (synchronous) test."""
    require_service("PostgreSQL", pg.PG_HOST, pg.PG_PORT)
    url = pg._in_thread(lambda: asyncio.run(pg.create_database()))
    try:
        yield url
    finally:
        pg._in_thread(lambda: asyncio.run(pg.drop_database(url)))
