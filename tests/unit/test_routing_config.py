"""Routing settings and the composition root: providers, presets, limits, the documented example."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from postroom.app import build_provider, build_router, build_routing_state
from postroom.config import ProviderSettings, Settings, load_settings
from postroom.domain.errors import ConfigError
from postroom.providers.http import (
    MailgunProvider,
    PostmarkProvider,
    ResendProvider,
    SendGridProvider,
)
from postroom.providers.simulate import SimulateProvider
from postroom.providers.smtp import SMTPProvider
from postroom.providers.state import MemoryState, RedisState, StoreState

DOCS = Path(__file__).resolve().parents[2] / "docs" / "providers.md"


def test_ses_is_the_smtp_provider_on_the_regions_host_with_starttls() -> None:
    p = build_provider(
        ProviderSettings(
            name="ses", kind="ses", region="eu-west-1", username="AKIA", password="pw"
        ),
        None,  # type: ignore[arg-type]
    )
    assert isinstance(p, SMTPProvider)
    assert (p.host, p.port, p.starttls, p.tls) == (
        "email-smtp.eu-west-1.amazonaws.com",
        587,
        True,
        False,
    )
    assert p.username == "AKIA"


@pytest.mark.parametrize(
    ("settings", "names"),
    [
        ({"kind": "ses", "username": "u", "password": "p"}, "region"),
        ({"kind": "ses", "region": "us-east-1"}, "username"),
        ({"kind": "sendgrid"}, "api_key"),
        ({"kind": "mailgun", "api_key": "k"}, "domain"),
        ({"kind": "simulate", "fault_rate": 2}, "fault_rate"),
    ],
)
def test_provider_settings_that_cannot_work_name_the_setting(
    settings: dict[str, object], names: str
) -> None:
    with pytest.raises(ConfigError) as info:
        build_provider(ProviderSettings(name="p", **settings), None)  # type: ignore[arg-type]
    assert names in info.value.setting


def test_http_and_simulate_kinds_are_built_with_their_settings() -> None:
    def make(**kw: object) -> object:
        return build_provider(ProviderSettings(name="x", **kw), None)  # type: ignore[arg-type]

    sg = make(kind="sendgrid", api_key="k", base_url="http://127.0.0.1:1")
    assert isinstance(sg, SendGridProvider) and sg.base_url == "http://127.0.0.1:1"
    mg = make(kind="mailgun", api_key="k", domain="mg.example.com")
    assert isinstance(mg, MailgunProvider) and mg.base_url == "https://api.mailgun.net"
    pm = make(kind="postmark", api_key="k", message_stream="broadcast")
    assert isinstance(pm, PostmarkProvider) and pm.message_stream == "broadcast"
    assert isinstance(make(kind="resend", api_key="k"), ResendProvider)
    sim = make(kind="simulate", latency_ms=5, fault_rate=0.5, seed=1)
    assert isinstance(sim, SimulateProvider) and sim.fault_rate == 0.5


@pytest.mark.parametrize(
    ("override", "setting"),
    [
        ({"domains": {"gmail.com": {"rate": "20 per fortnight"}}}, "domains.gmail.com.rate"),
        (
            {"providers": [{"kind": "smtp", "host": "h", "min_interval": "soon"}]},
            "providers.0.min_interval",
        ),
        ({"routing": {"breaker_faults": 0}}, "routing.breaker_faults"),
    ],
)
def test_bad_routing_settings_fail_fast_naming_the_setting(
    override: dict[str, object], setting: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(**override)
    assert info.value.setting == setting


def test_the_state_is_redis_when_redis_url_is_set_else_the_database() -> None:
    assert isinstance(build_routing_state(Settings(), None), StoreState)  # type: ignore[arg-type]
    assert isinstance(build_routing_state(Settings(routing={"state": "memory"}), None), MemoryState)  # type: ignore[arg-type]
    s = Settings(redis_url="redis://127.0.0.1:6379/0")
    assert isinstance(build_routing_state(s, None), RedisState)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="redis_url"):
        build_routing_state(Settings(routing={"state": "redis"}), None)  # type: ignore[arg-type]


def test_the_router_gets_the_limits_breakers_and_domains_from_settings() -> None:
    s = Settings(
        providers=[
            {"name": "a", "kind": "console", "rate": "10/s", "min_interval": "200ms"},
            {"name": "b", "kind": "console"},
        ],
        domains={"*": {"rate": "5/s"}, "Gmail.com": {"rate": "20/s"}},
        routing={"state": "memory", "breaker_faults": 2, "breaker_cooldown_s": 7, "rate_margin": 0},
    )
    router = build_router(s, None)  # type: ignore[arg-type]
    a, b = router.routes
    assert [lim.label for lim in a.limits] == ["rate 10/s", "min_interval 200ms"]
    assert a.limits[0].interval_s == pytest.approx(0.1 + 0.004 / 10)  # the floor of the margin
    assert b.limits == []
    assert (a.breaker.faults, a.breaker.cooldown_s) == (2, 7)
    assert [x.label for x in router.domain_limits.for_domain("gmail.com")] == ["rate 20/s"]
    assert [x.label for x in router.domain_limits.for_domain("yahoo.com")] == ["rate 5/s"]
    assert router.throttler is not None


def test_the_documented_example_loads_and_builds(tmp_path: Path) -> None:
    text = DOCS.read_text()
    example = re.search(r"```toml\n(.*?)```", text, re.S)
    assert example is not None
    path = tmp_path / "postroom.toml"
    path.write_text(example.group(1))
    s = load_settings(path)
    assert [p.name for p in s.named_providers()] == [
        "primary",
        "ses",
        "sendgrid",
        "mailgun",
        "postmark",
        "resend",
    ]
    assert s.domains["gmail.com"].rate == "20/s"
    router = build_router(
        s.model_copy(update={"routing": s.routing.model_copy(update={"state": "memory"})}), None
    )  # type: ignore[arg-type]
    assert [r.provider.kind for r in router.routes] == [
        "smtp",
        "smtp",
        "sendgrid",
        "mailgun",
        "postmark",
        "resend",
    ]
    assert router.routes[1].provider.host == "email-smtp.eu-west-1.amazonaws.com"  # type: ignore[attr-defined]
