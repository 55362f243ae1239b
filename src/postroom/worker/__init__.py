"""The dispatch loop: claim, send with bounded concurrency, record, renew leases, drain."""

from postroom.worker.worker import Worker

__all__ = ["Worker"]
