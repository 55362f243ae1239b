"""The `simulate` provider: configurable latency and failure rates, for demos, tests and benches."""

from __future__ import annotations

import asyncio
import random

from postroom.domain.errors import PermanentError, ProviderFault, TransientError
from postroom.domain.model import Outgoing, Receipt

__all__ = ["SimulateProvider"]


class SimulateProvider:
    """Pretends to deliver. Each send waits `latency_ms` (uniformly +-`jitter` of it), then fails
    with probability `fault_rate` (ProviderFault: the router fails over), `transient_rate`
    (TransientError 451: retried) or `permanent_rate` (PermanentError 550: failed), else succeeds.
    `seed` makes the sequence of outcomes reproducible. `concurrency` caps sends in flight, the way
    a real provider's connection pool does, so "one worker vs three" behaves like the real thing.
    """

    kind = "simulate"
    uses_mime = False  # the router need not build MIME for it

    def __init__(
        self,
        name: str = "simulate",
        *,
        latency_ms: float = 0.0,
        jitter: float = 0.5,
        transient_rate: float = 0.0,
        permanent_rate: float = 0.0,
        fault_rate: float = 0.0,
        seed: int | None = None,
        concurrency: int | None = None,
    ) -> None:
        for label, rate in (
            ("transient_rate", transient_rate),
            ("permanent_rate", permanent_rate),
            ("fault_rate", fault_rate),
        ):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{label} must be between 0 and 1, got {rate}")
        if transient_rate + permanent_rate + fault_rate > 1.0:
            raise ValueError("transient_rate + permanent_rate + fault_rate must not exceed 1")
        self.name = name
        self.latency_s = max(0.0, latency_ms) / 1000
        self.jitter = min(max(jitter, 0.0), 1.0)
        self.transient_rate = transient_rate
        self.permanent_rate = permanent_rate
        self.fault_rate = fault_rate
        self._rng = random.Random(seed)
        self._slots = asyncio.Semaphore(concurrency) if concurrency else None
        self.sent = 0
        self.counts = {"sent": 0, "transient": 0, "permanent": 0, "fault": 0}

    async def send(self, message: Outgoing) -> Receipt:
        # draw everything up front so a seed gives the same outcomes whatever the interleaving
        roll = self._rng.random()
        delay = (
            self.latency_s * (1 + self._rng.uniform(-self.jitter, self.jitter))
            if self.latency_s
            else 0.0
        )
        if self._slots is not None:
            async with self._slots:
                await asyncio.sleep(delay)
        elif delay:
            await asyncio.sleep(delay)
        if roll < self.fault_rate:
            self.counts["fault"] += 1
            raise ProviderFault("simulated provider fault", code=421, provider=self.name)
        roll -= self.fault_rate
        if roll < self.transient_rate:
            self.counts["transient"] += 1
            raise TransientError("4.7.0 simulated: try again later", code=451, provider=self.name)
        roll -= self.transient_rate
        if roll < self.permanent_rate:
            self.counts["permanent"] += 1
            raise PermanentError("5.1.1 simulated: no such user", code=550, provider=self.name)
        self.counts["sent"] += 1
        self.sent += 1
        return Receipt(self.name, 250, "simulated delivery", f"sim-{message.id}")

    async def close(self) -> None:
        return None
