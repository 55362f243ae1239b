"""Group commit: coalesce concurrent single calls into one batch call, answer each caller after it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["GroupCommit"]

log = logging.getLogger(__name__)

I = TypeVar("I")  # noqa: E741
R = TypeVar("R")


class GroupCommit(Generic[I, R]):
    """Callers `submit` one item and wait; one flusher runs `fn` on everything pending at once.

    While a batch is being written, new items pile up and go in the next batch, so under load
    batches grow by themselves and an idle system adds no delay. `fn` returns one result per item;
    a result that is an exception is raised to that item's caller alone. If `fn` raises, every
    caller in that batch gets the exception.
    """

    def __init__(self, fn: Callable[[Sequence[I]], Awaitable[Sequence[R | BaseException]]], *, max_batch: int = 1000) -> None:
        self._fn = fn
        self._max_batch = max_batch
        self._pending: list[tuple[I, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, item: I) -> R:
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_all(), name="group-commit")
        return await fut

    async def _flush_all(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
            items = [i for i, _ in batch]
            try:
                results = await self._fn(items)
            except BaseException as e:  # handed to every caller of this batch
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                if isinstance(e, asyncio.CancelledError):
                    raise
                continue
            for (_, fut), res in zip(batch, results, strict=True):
                if fut.done():
                    continue
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)

    async def close(self) -> None:
        """Wait for what is pending to be flushed."""
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
