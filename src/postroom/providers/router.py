"""The router: providers in order of preference, failover on provider-level faults."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from postroom.domain.errors import ProviderFault, TransientError
from postroom.domain.model import Event, Outgoing, Receipt
from postroom.domain.ports import Provider

__all__ = ["FailoverRouter"]

log = logging.getLogger(__name__)


class FailoverRouter:
    """Try each provider in order; a ProviderFault moves on to the next one in the same attempt.

    A recipient-level answer (PermanentError, or a TransientError that is not a fault) is final
    for this attempt: another provider would get the same answer from the same receiving server.
    """

    def __init__(self, providers: Sequence[Provider]) -> None:
        if not providers:
            raise ValueError("a router needs at least one provider")
        self.providers = list(providers)

    async def send(self, message: Outgoing, trail: list[Event]) -> Receipt:
        last: ProviderFault | None = None
        for provider in self.providers:
            try:
                return await provider.send(message)
            except ProviderFault as e:
                e.provider = e.provider or provider.name
                last = e
                trail.append(
                    Event(
                        message.id,
                        "provider_fault",
                        provider=provider.name,
                        code=e.code,
                        detail=e.text,
                    )
                )
        assert last is not None
        raise TransientError(
            f"no provider could take the message (last: {last.provider}: {last.text})",
            code=last.code,
            retry_after_s=last.retry_after_s,
            provider=last.provider,
        )

    async def close(self) -> None:
        for p in self.providers:
            try:
                await p.close()
            except Exception:  # closing one provider must not stop the others closing
                log.exception("closing provider %s failed", p.name)
