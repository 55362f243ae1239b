"""The simulate provider: seeded outcomes at the configured rates, latency, a concurrency cap."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from postroom.domain.errors import PermanentError, ProviderFault, TransientError
from postroom.domain.model import Address, Content, Outgoing
from postroom.providers.simulate import SimulateProvider


def msg(i: int) -> Outgoing:
    return Outgoing(
        f"m{i}",
        Content(Address("a@example.com"), [Address("b@example.org")], "s", f"<m{i}@x>"),
        b"",
    )


async def outcomes(p: SimulateProvider, n: int) -> list[str]:
    out = []
    for i in range(n):
        try:
            await p.send(msg(i))
            out.append("sent")
        except ProviderFault:
            out.append("fault")
        except TransientError:
            out.append("transient")
        except PermanentError:
            out.append("permanent")
    return out


async def test_a_seed_gives_the_same_outcomes_and_the_rates_hold() -> None:
    kw = {"transient_rate": 0.2, "permanent_rate": 0.1, "fault_rate": 0.1, "seed": 7}
    first = await outcomes(SimulateProvider(**kw), 2000)  # type: ignore[arg-type]
    again = await outcomes(SimulateProvider(**kw), 2000)  # type: ignore[arg-type]
    assert first == again
    counts = Counter(first)
    assert counts["transient"] == pytest.approx(400, abs=60)
    assert counts["permanent"] == pytest.approx(200, abs=45)
    assert counts["fault"] == pytest.approx(200, abs=45)
    assert counts["sent"] == pytest.approx(1200, abs=80)


async def test_answers_look_like_real_ones() -> None:
    p = SimulateProvider("sim", permanent_rate=1.0)
    with pytest.raises(PermanentError) as info:
        await p.send(msg(1))
    assert info.value.code == 550 and info.value.provider == "sim"
    receipt = await SimulateProvider("ok").send(msg(2))
    assert receipt.code == 250 and receipt.provider_message_id == "sim-m2"


async def test_latency_and_the_concurrency_cap() -> None:
    p = SimulateProvider(latency_ms=50, jitter=0, concurrency=2)
    t0 = time.monotonic()
    await asyncio.gather(*(p.send(msg(i)) for i in range(4)))
    assert time.monotonic() - t0 >= 0.1  # two at a time, 50 ms each


@pytest.mark.parametrize(
    "kw", [{"fault_rate": 1.5}, {"transient_rate": 0.6, "permanent_rate": 0.6}]
)
def test_rates_that_cannot_be_are_refused(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="rate"):
        SimulateProvider(**kw)  # type: ignore[arg-type]
