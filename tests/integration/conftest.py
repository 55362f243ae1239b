"""Stores for the conformance tests: every Store implementation passes the same tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from postroom.domain.ports import Store
from postroom.store.sqlite import SQLiteStore

STORE_KINDS = ["sqlite"]


async def make_store(kind: str, tmp_path: Path) -> Store:
    if kind == "sqlite":
        return SQLiteStore(tmp_path / "postroom.db", synchronous="NORMAL")
    raise ValueError(kind)


@pytest.fixture(params=STORE_KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s = await make_store(request.param, tmp_path)
    await s.open()
    try:
        yield s
    finally:
        await s.close()
