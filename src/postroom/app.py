"""The composition root: Settings -> store, providers, router, worker. The only module that picks
concrete implementations."""

from __future__ import annotations

import logging
from typing import Any

from postroom.config import ProviderSettings, Settings
from postroom.domain.errors import ConfigError
from postroom.domain.ports import Provider, Router, Store
from postroom.domain.validate import Limits
from postroom.providers.local import CaptureProvider, ConsoleProvider, FileProvider
from postroom.providers.router import FailoverRouter
from postroom.worker import Worker

__all__ = ["build_providers", "build_router", "build_store", "build_worker", "limits_from"]

log = logging.getLogger(__name__)


def build_store(settings: Settings) -> Store:
    url = settings.database_url
    if url.startswith("sqlite"):
        from postroom.store.sqlite import SQLiteStore

        path = settings.sqlite_path
        assert path is not None
        return SQLiteStore(path, synchronous=settings.sqlite_synchronous)
    try:
        from postroom.store.postgres import PostgresStore  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise ConfigError("database_url", "PostgreSQL support is not available in this build") from None
    return PostgresStore(url)  # type: ignore[no-any-return,unused-ignore]


def build_provider(p: ProviderSettings, store: Store) -> Provider:
    extra: dict[str, Any] = dict(p.model_extra or {})
    if p.kind == "capture":
        return CaptureProvider(p.name, store)
    if p.kind == "console":
        return ConsoleProvider(p.name)
    if p.kind == "file":
        return FileProvider(p.name, p.path or "outbox")
    if p.kind in ("smtp", "ses"):
        from postroom.providers.smtp import SMTPProvider

        if not p.host:
            raise ConfigError(f"providers.{p.name}.host", "an smtp provider needs a host")
        port = p.port or (465 if p.tls else 587 if p.starttls else 25)
        kwargs: dict[str, Any] = {
            k: v for k, v in extra.items() if k in ("helo_name", "max_messages_per_connection", "idle_timeout_s")
        }
        return SMTPProvider(  # type: ignore[no-any-return,unused-ignore]
            p.name,
            host=p.host,
            port=port,
            username=p.username,
            password=p.password,
            starttls=p.starttls,
            tls=p.tls,
            verify_tls=p.verify_tls,
            pool_size=p.pool_size,
            timeout_s=p.timeout_s,
            **kwargs,
        )
    raise ConfigError(f"providers.{p.name}.kind", f"provider kind {p.kind!r} is not available yet")


def build_providers(settings: Settings, store: Store) -> list[Provider]:
    configured = settings.named_providers()
    if not configured:
        return [CaptureProvider("capture", store)]
    return [build_provider(p, store) for p in configured]


def build_router(settings: Settings, store: Store) -> Router:
    return FailoverRouter(build_providers(settings, store))


def build_worker(settings: Settings, store: Store, router: Router, *, name: str | None = None) -> Worker:
    w = settings.worker
    return Worker(
        store=store,
        router=router,
        retry=settings.retry.policy(),
        name=name,
        concurrency=w.concurrency,
        batch_size=w.batch_size,
        lease_s=w.lease_s,
        idle_poll_s=w.idle_poll_s,
        drain_timeout_s=w.drain_timeout_s,
    )


def limits_from(settings: Settings) -> Limits:
    lim = settings.limits
    return Limits(
        max_message_bytes=lim.max_message_bytes,
        max_recipients=lim.max_recipients,
        max_attachment_bytes=lim.max_attachment_bytes,
    )
