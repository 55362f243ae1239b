"""Worker: claims batches under a lease, sends through the router, records outcomes in batches."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from postroom.domain.batching import GroupCommit
from postroom.domain.errors import (
    Deferred,
    PermanentError,
    ProviderError,
    TransientError,
    ValidationError,
)
from postroom.domain.model import ClaimedMessage, Event, Outcome, Outgoing, Status
from postroom.domain.ports import Router, Store, WorkerInfo
from postroom.domain.retry import RetryPolicy

__all__ = ["Worker", "WorkerCounters"]

log = logging.getLogger(__name__)


def default_worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class WorkerCounters:
    started_at: float = field(default_factory=time.time)
    claimed: int = 0
    sent: int = 0
    failed: int = 0
    retried: int = 0
    deferred: int = 0
    stale: int = 0


class Worker:
    """One dispatch loop. `run()` until `stop()`; then it drains.

    At most `concurrency` messages are claimed at a time, so everything a worker holds is being
    sent right now: nothing sits claimed in a local buffer where a crash would strand it for a
    whole lease. Outcomes are recorded through a group commit (one transaction for all the
    outcomes that finished while the previous one was written).
    """

    def __init__(
        self,
        *,
        store: Store,
        router: Router,
        retry: RetryPolicy,
        name: str | None = None,
        concurrency: int = 64,
        batch_size: int = 200,
        lease_s: float = 60.0,
        idle_poll_s: float = 1.0,
        drain_timeout_s: float = 30.0,
        heartbeat_s: float = 5.0,
        stale_after_s: float = 30.0,
    ) -> None:
        self.store = store
        self.router = router
        self.retry = retry
        self.name = name or default_worker_name()
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.lease_s = lease_s
        self.idle_poll_s = idle_poll_s
        self.drain_timeout_s = drain_timeout_s
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.counters = WorkerCounters()
        self._inflight: dict[str, tuple[ClaimedMessage, asyncio.Task[None]]] = {}
        self._room = asyncio.Event()
        self._stopping = asyncio.Event()
        self._recorder: GroupCommit[Outcome, bool] = GroupCommit(self._record, max_batch=2000)

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def stop(self) -> None:
        """Stop claiming; `run()` then drains and returns."""
        self._stopping.set()
        self._room.set()

    async def _record(self, outcomes: Sequence[Outcome]) -> list[bool | BaseException]:
        return list(await self.store.record(outcomes, worker=self.name))

    def info(self) -> WorkerInfo:
        """This worker as the registry shows it (GET /v1/workers)."""
        return WorkerInfo(
            name=self.name,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=self.counters.started_at,
            concurrency=self.concurrency,
            in_flight=len(self._inflight),
            sent=self.counters.sent,
            failed=self.counters.failed,
        )

    async def run(self) -> None:
        renew = asyncio.create_task(self._renew_leases(), name=f"{self.name}-leases")
        beat = asyncio.create_task(self._heartbeat(), name=f"{self.name}-heartbeat")
        try:
            await self._claim_loop()
        finally:
            await self._drain()
            for task in (renew, beat):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self._recorder.close()
            try:
                await self.store.remove_worker(self.name)
            except Exception as e:  # the row goes stale and another worker removes it
                log.warning("could not leave the worker registry: %s", e)

    async def _heartbeat(self) -> None:
        """Register, then refresh the registry row every `heartbeat_s`; on each beat also end the
        leases of workers whose heartbeat is older than `stale_after_s` (killed, or paused), so
        their messages go out again well before their leases would expire."""
        while True:
            try:
                await self.store.heartbeat(self.info())
                released = await self.store.release_stale(self.stale_after_s)
                if released:
                    log.warning("released %d messages held by workers that stopped beating", released)
            except Exception as e:
                log.warning("heartbeat failed: %s", e)
            await asyncio.sleep(self.heartbeat_s)

    async def _claim_loop(self) -> None:
        backoff_s = 0.1
        while not self._stopping.is_set():
            room = self.concurrency - len(self._inflight)
            # claim in worthwhile batches: wait until a quarter of the slots are free (or all idle)
            if room < max(1, min(self.batch_size, self.concurrency) // 4) and self._inflight:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                claimed = await self.store.claim(self.name, min(room, self.batch_size), self.lease_s)
            except Exception as e:
                log.warning("claim failed (%s); retrying in %.1fs", e, backoff_s)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
                continue
            backoff_s = 0.1
            self.counters.claimed += len(claimed)
            for m in claimed:
                task = asyncio.create_task(self._deliver(m), name=f"deliver-{m.id}")
                self._inflight[m.id] = (m, task)
            if not claimed:
                stop = asyncio.create_task(self._stopping.wait())
                work = asyncio.create_task(self.store.wait_for_work(self.idle_poll_s))
                await asyncio.wait({stop, work}, return_when=asyncio.FIRST_COMPLETED)
                for t in (stop, work):
                    t.cancel()
                await asyncio.gather(stop, work, return_exceptions=True)

    async def _deliver(self, m: ClaimedMessage) -> None:
        outcome: Outcome | None = None
        try:
            outcome = await self._attempt(m)
        except asyncio.CancelledError:
            # drained before finishing: give the message back (it may be sent again: at least once)
            outcome = Outcome(
                m.id,
                m.lease_token,
                Status.QUEUED,
                next_at=time.time(),
                events=[Event(m.id, "released", worker=self.name, detail="worker shut down")],
            )
        finally:
            self._inflight.pop(m.id, None)
            self._room.set()
        try:
            ok = await self._recorder.submit(outcome)
        except Exception:
            # the store is away; the lease will expire and another claim will redo this message
            log.exception("could not record the outcome of %s", m.id)
            return
        if not ok:
            self.counters.stale += 1
            log.warning("outcome of %s rejected: lease lost to another worker", m.id)

    async def _attempt(self, m: ClaimedMessage) -> Outcome:
        trail: list[Event] = []
        out = Outgoing(m.id, m.content)
        try:
            receipt = await self.router.send(out, trail)
        except Deferred as e:
            if e.until > m.created_at + self.retry.lifetime_s:
                # a message held back past its lifetime fails like one whose retries ran out
                self.counters.failed += 1
                why = f"expired: still held back after {self.retry.lifetime_s:g} s ({e.reason})"
                trail.append(Event(m.id, "failed", worker=self.name, provider=e.provider, detail=why))
                return Outcome(m.id, m.lease_token, Status.FAILED, provider=e.provider, text=why, events=trail)
            # over a rate limit: back to the queue until `until`, and this claim is not an attempt
            self.counters.deferred += 1
            trail.append(Event(m.id, "deferred", worker=self.name, provider=e.provider, detail=e.reason))
            return Outcome(m.id, m.lease_token, Status.QUEUED, next_at=e.until, events=trail)
        except PermanentError as e:
            return self._permanent(m, e, trail)
        except TransientError as e:
            return self._transient(m, e, trail)
        except ValidationError as e:
            # the message cannot be built (e.g. stored before a stricter rule): no retry will help
            return self._permanent(m, PermanentError(f"cannot build the message: {e}"), trail)
        except Exception as e:  # a bug in a provider must not lose the message: retry it
            log.exception("unexpected error sending %s", m.id)
            return self._transient(m, TransientError(f"internal error: {e!r}"), trail)
        self.counters.sent += 1
        trail.append(
            Event(m.id, "sent", worker=self.name, provider=receipt.provider, code=receipt.code, detail=receipt.text)
        )
        return Outcome(
            m.id,
            m.lease_token,
            Status.SENT,
            provider=receipt.provider,
            code=receipt.code,
            text=receipt.text,
            provider_message_id=receipt.provider_message_id,
            events=trail,
        )

    def _permanent(self, m: ClaimedMessage, e: PermanentError, trail: list[Event]) -> Outcome:
        self.counters.failed += 1
        trail.append(self._attempt_failed(m, e))
        trail.append(Event(m.id, "failed", worker=self.name, provider=e.provider, code=e.code, detail=e.text))
        return Outcome(m.id, m.lease_token, Status.FAILED, provider=e.provider, code=e.code, text=e.text, events=trail)

    def _attempt_failed(self, m: ClaimedMessage, e: ProviderError) -> Event:
        return Event(m.id, "attempt_failed", worker=self.name, provider=e.provider, code=e.code, detail=e.text)

    def _transient(self, m: ClaimedMessage, e: TransientError, trail: list[Event]) -> Outcome:
        now = time.time()
        trail.append(self._attempt_failed(m, e))
        at = self.retry.next_attempt_at(
            now=now, created_at=m.created_at, attempts=m.attempts, retry_after_s=e.retry_after_s
        )
        if at is None:
            self.counters.failed += 1
            why = f"gave up after {m.attempts} attempts: {e.text}"
            trail.append(Event(m.id, "failed", worker=self.name, provider=e.provider, code=e.code, detail=why))
            return Outcome(m.id, m.lease_token, Status.FAILED, provider=e.provider, code=e.code, text=why, events=trail)
        self.counters.retried += 1
        when = datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds")
        trail.append(Event(m.id, "retry_scheduled", worker=self.name, detail=f"next attempt at {when}"))
        return Outcome(
            m.id, m.lease_token, Status.RETRYING, next_at=at, provider=e.provider, code=e.code, text=e.text, events=trail
        )

    async def _renew_leases(self) -> None:
        interval = max(0.05, self.lease_s / 3)
        while True:
            await asyncio.sleep(interval)
            claims = [(m.id, m.lease_token) for m, _ in list(self._inflight.values())]
            if not claims:
                continue
            try:
                await self.store.extend_leases(self.name, claims, self.lease_s)
            except Exception as e:
                log.warning("lease renewal failed: %s", e)

    async def _drain(self) -> None:
        if not self._inflight:
            return
        tasks = [t for _, t in self._inflight.values()]
        log.info("draining %d in-flight sends (up to %.0fs)", len(tasks), self.drain_timeout_s)
        _, pending = await asyncio.wait(tasks, timeout=self.drain_timeout_s)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
