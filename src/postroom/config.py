"""Settings: postroom.toml plus POSTROOM_* environment overrides, validated once at start."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from postroom.domain.errors import ConfigError
from postroom.domain.retry import RetryPolicy
from postroom.domain.validate import Limits

__all__ = ["ProviderSettings", "Settings", "load_settings", "parse_provider_urls"]

PROVIDER_KINDS = ("smtp", "ses", "file", "console", "capture", "simulate", "sendgrid", "mailgun", "postmark", "resend")


class ProviderSettings(BaseModel):
    """One way out. Fields beyond the common ones are read by the provider kind that needs them."""

    model_config = ConfigDict(extra="allow")

    name: str = ""
    kind: str
    host: str | None = None
    port: int | None = None
    username: str | None = None
    password: str | None = None
    starttls: bool = False
    tls: bool = False
    verify_tls: bool = True
    timeout_s: float = 30.0
    pool_size: int = 8
    path: str | None = None  # file provider: the folder for .eml files
    rate: str | None = None  # e.g. "20/s", "1000/h" (routing)
    min_interval: str | None = None  # e.g. "200ms" (routing)
    burst: int = Field(1, ge=1, description="sends that may go at once within `rate`")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        if v not in PROVIDER_KINDS:
            raise ValueError(f"unknown provider kind {v!r}; use one of {', '.join(PROVIDER_KINDS)}")
        return v

    @field_validator("rate")
    @classmethod
    def _rate(cls, v: str | None) -> str | None:
        return _check_rate(v)

    @field_validator("min_interval")
    @classmethod
    def _interval(cls, v: str | None) -> str | None:
        return _check_interval(v)


def _check_rate(v: str | None) -> str | None:
    if v is not None:
        from postroom.providers.limiter import parse_rate

        parse_rate(v)  # raises ValueError naming the fix
    return v


def _check_interval(v: str | None) -> str | None:
    if v is not None:
        from postroom.providers.limiter import parse_interval

        parse_interval(v)
    return v


class DomainSettings(BaseModel):
    """Limits for one recipient domain (`[domains."gmail.com"]`), or for each other domain
    (`[domains."*"]`: every domain gets its own counter at that rate)."""

    model_config = ConfigDict(extra="forbid")

    rate: str | None = None
    min_interval: str | None = None
    burst: int = Field(1, ge=1)

    @field_validator("rate")
    @classmethod
    def _rate(cls, v: str | None) -> str | None:
        return _check_rate(v)

    @field_validator("min_interval")
    @classmethod
    def _interval(cls, v: str | None) -> str | None:
        return _check_interval(v)


class RoutingSettings(BaseModel):
    """Breakers, waiting for rate-limit slots, adaptive domain throttling, shared state."""

    model_config = ConfigDict(extra="forbid")

    breaker_faults: int = Field(5, ge=1, description="consecutive provider faults that open a breaker")
    breaker_cooldown_s: float = Field(30.0, gt=0, description="open breaker: wait before one probe")
    max_wait_s: float = Field(
        1.0, ge=0, description="a rate-limit slot this close is waited for; later ones defer the message"
    )
    rate_margin: float = Field(
        0.05,
        ge=0,
        le=0.5,
        description="share of each rate-limit window kept free for jitter (0.05: '50/s' sends 47.6/s)",
    )
    adaptive: bool = Field(True, description="slow a domain down when it answers 421/450/451")
    throttle_initial_interval_s: float = Field(1.0, gt=0)
    throttle_max_interval_s: float = Field(60.0, gt=0)
    throttle_recover_s: float = Field(60.0, gt=0, description="the gap halves every this many seconds")
    throttle_max_pause_s: float = Field(3600.0, ge=0)
    state: Literal["auto", "memory", "redis", "database"] = Field(
        "auto", description="where limits are shared: redis if redis_url is set, else the database"
    )


class WorkerSettings(BaseModel):
    concurrency: int = Field(64, ge=1, le=10_000, description="sends in flight per worker process")
    batch_size: int = Field(200, ge=1, le=10_000, description="messages claimed per round trip")
    lease_s: float = Field(60.0, gt=0, description="how long a claim holds before another worker may take it")
    idle_poll_s: float = Field(1.0, gt=0, description="longest sleep between claims when idle")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, how long in-flight sends may finish")
    processes: int = Field(1, ge=1, le=64, description="worker processes `postroom worker` starts")
    heartbeat_s: float = Field(5.0, gt=0, description="how often a worker refreshes its registry row")
    stale_after_s: float = Field(
        30.0, gt=0, description="a worker silent this long is gone: its leases are released early"
    )


class RetrySettings(BaseModel):
    first_delay_s: float = Field(300.0, ge=0)
    max_delay_s: float = Field(3600.0, ge=0)
    factor: float = Field(2.0, ge=1)
    jitter: float = Field(0.2, ge=0, le=1)
    lifetime_s: float = Field(2 * 86400.0, ge=0)

    def policy(self) -> RetryPolicy:
        return RetryPolicy(**self.model_dump())


class LimitSettings(BaseModel):
    max_request_bytes: int = Field(25 * 1024 * 1024, ge=1024)
    max_message_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="text + html + attachments")
    max_recipients: int = Field(100, ge=1, description="to + cc + bcc per message")
    max_attachment_bytes: int = Field(10 * 1024 * 1024, ge=1)
    max_batch: int = Field(1000, ge=1, le=100_000)

    def message_limits(self) -> Limits:
        """The limits every door checks a message against."""
        return Limits(
            max_message_bytes=self.max_message_bytes,
            max_recipients=self.max_recipients,
            max_attachment_bytes=self.max_attachment_bytes,
        )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="POSTROOM_", env_nested_delimiter="__", extra="forbid"
    )
    config_file: ClassVar[Path | None] = None

    database_url: str = "sqlite:///postroom.db"
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    providers: Annotated[list[ProviderSettings], NoDecode] = Field(default_factory=list)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    domains: dict[str, DomainSettings] = Field(default_factory=dict)
    sqlite_synchronous: Literal["FULL", "NORMAL", "OFF"] = "FULL"
    database_pool_size: int = Field(10, ge=1, le=1000, description="PostgreSQL connections per process")
    database_timeout_s: float = Field(10.0, gt=0, description="longest wait for one database call")
    redis_url: str | None = None
    log_level: str = "info"
    default_from: str = "Postroom <postroom@example.com>"  # `postroom send` without --from
    dashboard_password: str | None = None
    secret_key: str | None = None

    @field_validator("providers", mode="before")
    @classmethod
    def _providers(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("["):
                import json

                return json.loads(v)
            return parse_provider_urls(v)
        return v

    @field_validator("database_url")
    @classmethod
    def _db_url(cls, v: str) -> str:
        if not re.match(r"^(sqlite|postgres(ql)?)(\+\w+)?://", v):
            raise ValueError(
                "must start with sqlite:/// (a file) or postgresql:// (a server), "
                f"got {v!r}"
            )
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls.config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls.config_file))
        return tuple(sources)

    def named_providers(self) -> list[ProviderSettings]:
        """The providers in order of preference, each with a unique name."""
        out, seen = [], set()
        for i, p in enumerate(self.providers):
            name = p.name or (p.kind if p.kind not in seen else f"{p.kind}-{i + 1}")
            seen.add(name)
            out.append(p.model_copy(update={"name": name}))
        return out

    @property
    def sqlite_path(self) -> str | None:
        if not self.database_url.startswith("sqlite"):
            return None
        path = self.database_url.split("://", 1)[1]
        # sqlite:///relative.db -> "/relative.db" after the split; sqlite:////abs.db -> "//abs.db"
        path = path[1:] if path.startswith("/") else path
        return path or "postroom.db"


def parse_provider_urls(text: str) -> list[dict[str, Any]]:
    """`smtp://user:pass@host:587?starttls=true, console://` -> provider dicts, in order."""
    out: list[dict[str, Any]] = []
    for part in re.split(r"[\s,;]+", text.strip()):
        if not part:
            continue
        u = urlsplit(part)
        kind = u.scheme.lower()
        d: dict[str, Any] = {}
        if kind == "smtps":
            kind, d["tls"] = "smtp", True
        d["kind"] = kind
        if u.hostname and kind != "file":
            d["host"] = u.hostname
        if u.port:
            d["port"] = u.port
        if u.username:
            d["username"] = unquote(u.username)
        if u.password:
            d["password"] = unquote(u.password)
        if kind == "file":
            d["path"] = unquote((u.netloc or "") + u.path) or "outbox"
        for k, v in parse_qsl(u.query):
            d[k] = v
        out.append(d)
    return out


def load_settings(config_path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Read postroom.toml (or POSTROOM_CONFIG, or `config_path`) and the environment, once.

    Raises ConfigError naming the setting and the fix."""
    path = config_path or os.environ.get("POSTROOM_CONFIG")
    if path is None and Path("postroom.toml").exists():
        path = "postroom.toml"
    if path is not None and not Path(path).exists():
        raise ConfigError("config", f"config file {path} does not exist")
    Settings.config_file = Path(path) if path else None
    try:
        return Settings(**overrides)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise ConfigError(loc or "settings", f"{err['msg']} (from {path or 'environment'})") from None
    finally:
        Settings.config_file = None
