"""The composition root: Settings -> store, providers, router, worker. The only module that picks
concrete implementations."""

from __future__ import annotations

import logging
from typing import Any

from postroom.config import ProviderSettings, Settings
from postroom.domain.errors import ConfigError
from postroom.domain.ports import Provider, Router, RoutingView, Store
from postroom.providers.breaker import Breaker
from postroom.providers.limiter import Limit
from postroom.providers.local import CaptureProvider, ConsoleProvider, FileProvider
from postroom.providers.router import DomainLimits, Route, RoutingStatus
from postroom.providers.router import Router as RoutingRouter
from postroom.providers.state import MemoryState, RedisState, RoutingState, StoreState
from postroom.providers.throttle import Throttler
from postroom.worker import Worker

__all__ = [
    "build_providers",
    "build_router",
    "build_routing_state",
    "build_routing_view",
    "build_store",
    "build_worker",
]

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
    return PostgresStore(  # type: ignore[no-any-return,unused-ignore]
        url,
        min_size=1,
        max_size=settings.database_pool_size,
        timeout_s=settings.database_timeout_s,
        open_timeout_s=settings.database_timeout_s,
    )


def build_provider(p: ProviderSettings, store: Store) -> Provider:
    extra: dict[str, Any] = dict(p.model_extra or {})
    if p.kind == "capture":
        return CaptureProvider(p.name, store)
    if p.kind == "console":
        return ConsoleProvider(p.name)
    if p.kind == "file":
        return FileProvider(p.name, p.path or "outbox")
    if p.kind == "simulate":
        from postroom.providers.simulate import SimulateProvider

        sim = {
            k: extra[k]
            for k in ("latency_ms", "jitter", "transient_rate", "permanent_rate", "fault_rate", "seed", "concurrency")
            if k in extra
        }
        try:
            return SimulateProvider(p.name, **sim)
        except (TypeError, ValueError) as e:
            field = str(e).split(" ", 1)[0]  # SimulateProvider's messages start with the field
            where = f"providers.{p.name}" + (f".{field}" if field in sim else "")
            raise ConfigError(where, str(e)) from None
    if p.kind in HTTP_KINDS:
        return _http_provider(p, extra)
    if p.kind == "ses":
        # Amazon SES through its SMTP interface: the host of the region, port 587, STARTTLS, and the
        # SMTP credentials made in the SES console (not the AWS access keys).
        region = extra.get("region")
        if not p.host and not region:
            raise ConfigError(f"providers.{p.name}.region", "an ses provider needs region (e.g. 'eu-west-1') or host")
        if not p.username or not p.password:
            raise ConfigError(f"providers.{p.name}.username", "an ses provider needs its SMTP username and password")
        p = p.model_copy(
            update={
                "host": p.host or f"email-smtp.{region}.amazonaws.com",
                "port": p.port or 587,
                "starttls": not p.tls,
            }
        )
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


HTTP_KINDS = ("sendgrid", "mailgun", "postmark", "resend")


def _http_provider(p: ProviderSettings, extra: dict[str, Any]) -> Provider:
    from postroom.providers import http

    api_key = extra.get("api_key") or p.password
    if not api_key:
        raise ConfigError(f"providers.{p.name}.api_key", f"a {p.kind} provider needs api_key")
    common: dict[str, Any] = {
        "api_key": api_key,
        "base_url": extra.get("base_url"),
        "timeout_s": p.timeout_s,
        "pool_size": p.pool_size,
    }
    if p.kind == "sendgrid":
        return http.SendGridProvider(p.name, **common)
    if p.kind == "mailgun":
        if not extra.get("domain"):
            raise ConfigError(f"providers.{p.name}.domain", "a mailgun provider needs its sending domain")
        return http.MailgunProvider(p.name, domain=extra["domain"], **common)
    if p.kind == "postmark":
        return http.PostmarkProvider(p.name, message_stream=extra.get("message_stream"), **common)
    return http.ResendProvider(p.name, **common)


def build_providers(settings: Settings, store: Store) -> list[Provider]:
    configured = settings.named_providers()
    if not configured:
        return [CaptureProvider("capture", store)]
    return [build_provider(p, store) for p in configured]


def provider_limits(p: ProviderSettings, margin: float) -> list[Limit]:
    out = []
    if p.rate:
        out.append(Limit.rate(f"provider:{p.name}:rate", p.rate, p.burst, margin=margin))
    if p.min_interval:
        out.append(Limit.gap(f"provider:{p.name}:gap", p.min_interval, margin=margin))
    return out


def domain_limits(settings: Settings) -> DomainLimits:
    margin = settings.routing.rate_margin

    def limits(d: str, s: Any) -> list[Limit]:
        out = []
        if s.rate:
            out.append(Limit.rate(f"domain:{d}", s.rate, s.burst, margin=margin))
        if s.min_interval:
            out.append(Limit.gap(f"domain:{d}", s.min_interval, margin=margin))
        return out

    overrides = {d.lower(): limits(d, s) for d, s in settings.domains.items() if d != "*"}
    default = limits("*", settings.domains["*"]) if "*" in settings.domains else []
    return DomainLimits(overrides, default)


def build_routing_state(settings: Settings, store: Store) -> RoutingState:
    """Where limits, throttles and router snapshots are shared: Redis if `redis_url` is set, else
    the database (so several worker processes or hosts agree with nothing else to run)."""
    kind = settings.routing.state
    if kind == "auto":
        kind = "redis" if settings.redis_url else "database"
    if kind == "redis":
        if not settings.redis_url:
            raise ConfigError("routing.state", "'redis' needs redis_url (POSTROOM_REDIS_URL)")
        return RedisState(settings.redis_url)
    if kind == "database":
        return StoreState(store)
    return MemoryState()


def build_router(
    settings: Settings, store: Store, *, providers: list[Provider] | None = None, name: str | None = None
) -> Router:
    r = settings.routing
    configured = settings.named_providers()
    providers = providers if providers is not None else build_providers(settings, store)
    limits = {p.name: provider_limits(p, r.rate_margin) for p in configured}
    routes = [
        Route(
            p,
            limits.get(p.name, []),
            Breaker(faults=r.breaker_faults, cooldown_s=r.breaker_cooldown_s),
        )
        for p in providers
    ]
    state = build_routing_state(settings, store)
    throttler = (
        Throttler(
            state,
            initial_interval_s=r.throttle_initial_interval_s,
            max_interval_s=r.throttle_max_interval_s,
            recover_s=r.throttle_recover_s,
            max_pause_s=r.throttle_max_pause_s,
        )
        if r.adaptive
        else None
    )
    return RoutingRouter(
        routes,
        state=state,
        domains=domain_limits(settings),
        throttler=throttler,
        max_wait_s=r.max_wait_s,
        name=name,
    )


def build_routing_view(settings: Settings, store: Store, *, router: Router | None = None) -> RoutingView:
    """What GET /v1/providers and /v1/domains show; reads the state every worker shares."""
    configured = settings.named_providers() or [ProviderSettings(name="capture", kind="capture")]
    local = router if isinstance(router, RoutingRouter) else None
    return RoutingStatus(
        local.state if local is not None else build_routing_state(settings, store),
        providers=[(p.name, p.kind, provider_limits(p, settings.routing.rate_margin)) for p in configured],
        domains=domain_limits(settings),
        recover_s=settings.routing.throttle_recover_s,
        router=local,
    )


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
        heartbeat_s=w.heartbeat_s,
        stale_after_s=w.stale_after_s,
    )
