"""Shared fixtures: a clean environment, service checks that skip locally and fail under CI=true."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No POSTROOM_* setting from the developer's shell leaks into a test."""
    for k in list(os.environ):
        if k.startswith("POSTROOM_"):
            monkeypatch.delenv(k)
    yield


def service_available(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip when a service is missing on a developer machine; fail under CI, where it must be there."""
    if service_available(host, port):
        return
    msg = f"{name} is not reachable at {host}:{port}"
    if IN_CI:
        pytest.fail(msg + " (CI=true: the service must be running)")
    pytest.skip(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
