"""Settings: TOML plus environment, the one-line provider form, errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from postroom.config import load_settings, parse_provider_urls
from postroom.domain.errors import ConfigError


def test_defaults_work_for_the_embedded_mode() -> None:
    s = load_settings()
    assert s.database_url == "sqlite:///postroom.db" and s.sqlite_path == "postroom.db"
    assert (s.host, s.port) == ("127.0.0.1", 8080)
    assert s.providers == []  # the capture inbox is used
    assert s.retry.policy().lifetime_s == 2 * 86400


def test_one_line_providers_keep_their_order_and_decode_credentials() -> None:
    got = parse_provider_urls("smtp://user:p%40ss@mail.example.com:587?starttls=true, smtps://backup.example.net console:// file:///tmp/out")
    assert got == [
        {"kind": "smtp", "host": "mail.example.com", "port": 587, "username": "user", "password": "p@ss", "starttls": "true"},
        {"kind": "smtp", "tls": True, "host": "backup.example.net"},
        {"kind": "console"},
        {"kind": "file", "path": "/tmp/out"},
    ]


def test_environment_overrides_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "postroom.toml"
    cfg.write_text(
        'port = 9000\n[worker]\nconcurrency = 8\n[[providers]]\nname = "main"\nkind = "smtp"\nhost = "a.example"\n'
    )
    monkeypatch.setenv("POSTROOM_PORT", "9100")
    monkeypatch.setenv("POSTROOM_WORKER__BATCH_SIZE", "50")
    s = load_settings(cfg)
    assert s.port == 9100 and s.worker.concurrency == 8 and s.worker.batch_size == 50
    (p,) = s.named_providers()
    assert (p.name, p.kind, p.host, p.starttls) == ("main", "smtp", "a.example", False)


def test_env_providers_replace_the_file_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTROOM_PROVIDERS", "smtp://relay.example:2525, smtp://relay2.example:2525")
    s = load_settings()
    assert [(p.name, p.host, p.port) for p in s.named_providers()] == [("smtp", "relay.example", 2525), ("smtp-2", "relay2.example", 2525)]


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"POSTROOM_PORT": "eighty"}, "port"),
        ({"POSTROOM_DATABASE_URL": "mysql://x"}, "database_url"),
        ({"POSTROOM_PROVIDERS": "pigeon://coop"}, "providers.0.kind"),
        ({"POSTROOM_WORKER__CONCURRENCY": "0"}, "worker.concurrency"),
    ],
)
def test_bad_settings_fail_fast_naming_the_setting(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], setting: str) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as e:
        load_settings()
    assert e.value.setting == setting


def test_a_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_sqlite_paths_relative_and_absolute() -> None:
    assert load_settings(database_url="sqlite:///data/p.db").sqlite_path == "data/p.db"
    assert load_settings(database_url="sqlite:////var/lib/p.db").sqlite_path == "/var/lib/p.db"
