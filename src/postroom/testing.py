"""Fakes shipped with the package, for tests of code that uses Postroom's ports."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from postroom.domain.errors import ProviderError
from postroom.domain.model import Outgoing, Receipt

__all__ = ["RecordingProvider"]


class RecordingProvider:
    """A provider that keeps what it is given. `outcome(message)` may return a ProviderError to
    raise (or None to accept); `delay_s` makes each send take that long."""

    kind = "recording"

    def __init__(
        self,
        name: str = "recording",
        *,
        outcome: Callable[[Outgoing], ProviderError | None] | None = None,
        delay_s: float = 0.0,
    ) -> None:
        self.name = name
        self.sent: list[Outgoing] = []
        self.attempts: list[Outgoing] = []
        self._outcome = outcome
        self._delay_s = delay_s
        self.closed = False

    async def send(self, message: Outgoing) -> Receipt:
        self.attempts.append(message)
        if self._delay_s:
            await asyncio.sleep(self._delay_s)
        err = self._outcome(message) if self._outcome else None
        if err is not None:
            raise err
        message.mime  # noqa: B018  (build it, as a real provider would)
        self.sent.append(message)
        return Receipt(self.name, 250, "ok", f"rec-{len(self.sent)}")

    async def close(self) -> None:
        self.closed = True
