"""The dashboard over HTTP (no browser): access control, sessions, CSRF, the compose form."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from postroom.api.app import create_app
from postroom.config import load_settings
from postroom.domain.model import Status
from postroom.store.sqlite import SQLiteStore
from postroom.web.auth import SESSION_COOKIE, Signer
from postroom.web.routes import form_to_message, split_addresses

PAGES = [
    "/",
    "/compose",
    "/messages",
    "/messages/01abc",
    "/inbox",
    "/inbox/01abc",
    "/inbox/01abc/raw",
]
FORMS = ["/compose", "/logout", "/messages/01abc/cancel", "/messages/01abc/retry"]


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    settings = load_settings(
        database_url=f"sqlite:///{tmp_path}/p.db",
        dashboard_password="correct horse",
        secret_key="s3cret",
    )
    store = SQLiteStore(tmp_path / "p.db", synchronous="NORMAL")
    app = create_app(settings, store)
    await store.open()
    _, key = await store.create_key("ops")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield {"client": c, "store": store, "key": key, "transport": transport}
    await store.close()


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, "the page has a form with a CSRF token"
    return m.group(1)


async def login(c: httpx.AsyncClient, secret: str) -> httpx.Response:
    token = csrf_of((await c.get("/login")).text)
    return await c.post("/login", data={"csrf": token, "secret": secret, "next": "/"})


@pytest.mark.parametrize("path", PAGES)
async def test_pages_redirect_to_login_without_a_session(env: dict[str, Any], path: str) -> None:
    r = await env["client"].get(path)
    assert r.status_code == 303
    assert r.headers["location"].startswith("/login")


@pytest.mark.parametrize("path", FORMS)
async def test_form_posts_do_nothing_without_a_session(env: dict[str, Any], path: str) -> None:
    r = await env["client"].post(path, data={"csrf": "x"})
    assert r.status_code == 303 and r.headers["location"].startswith("/login")


async def test_login_page_and_static_files_need_no_session(env: dict[str, Any]) -> None:
    c = env["client"]
    assert (await c.get("/login")).status_code == 200
    css = await c.get("/static/app.css")
    assert css.status_code == 200 and "text/css" in css.headers["content-type"]
    assert (await c.get("/static/app.js")).status_code == 200


async def test_live_feeds_answer_204_without_a_session(env: dict[str, Any]) -> None:
    """204 tells EventSource to stop reconnecting; the page then reloads into the login form."""
    assert (await env["client"].get("/live/overview")).status_code == 204


async def test_login_with_an_admin_key_opens_the_dashboard(env: dict[str, Any]) -> None:
    c = env["client"]
    r = await login(c, env["key"])
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    assert "httponly" in cookie.lower() and "samesite=lax" in cookie.lower()
    page = await c.get("/")
    assert page.status_code == 200 and "Overview" in page.text
    assert "ops" in page.text  # the key's name is shown as who is signed in
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


async def test_login_with_the_dashboard_password(env: dict[str, Any]) -> None:
    r = await login(env["client"], "correct horse")
    assert r.status_code == 303
    assert (await env["client"].get("/messages")).status_code == 200


@pytest.mark.parametrize("secret", ["", "wrong", "pr_unknownkey", "correct horse "[:-2]])
async def test_wrong_secrets_are_refused(env: dict[str, Any], secret: str) -> None:
    r = await login(env["client"], secret)
    assert r.status_code == 401
    assert SESSION_COOKIE not in r.headers.get("set-cookie", "")
    assert (await env["client"].get("/")).status_code == 303


async def test_login_without_its_csrf_token_is_refused(env: dict[str, Any]) -> None:
    c = env["client"]
    await c.get("/login")
    r = await c.post("/login", data={"secret": env["key"]})
    assert r.status_code == 400
    assert (await c.get("/")).status_code == 303


async def test_login_redirects_only_to_local_paths(env: dict[str, Any]) -> None:
    c = env["client"]
    token = csrf_of((await c.get("/login")).text)
    r = await c.post(
        "/login", data={"csrf": token, "secret": env["key"], "next": "//evil.example/x"}
    )
    assert r.headers["location"] == "/"


async def test_a_post_without_the_csrf_token_is_refused(env: dict[str, Any]) -> None:
    c, store = env["client"], env["store"]
    await login(c, env["key"])
    form = {"from": "a@example.com", "to": "b@example.org", "subject": "x", "text": "hi"}
    for data in (form, {**form, "csrf": "forged"}):
        r = await c.post("/compose", data=data)
        assert r.status_code == 403
    assert (await store.stats())["by_status"]["queued"] == 0


async def test_a_csrf_token_of_another_session_is_refused(env: dict[str, Any]) -> None:
    async with httpx.AsyncClient(transport=env["transport"], base_url="http://test") as other:
        await login(other, env["key"])
        foreign = csrf_of((await other.get("/compose")).text)
    c = env["client"]
    await login(c, env["key"])
    r = await c.post(
        "/compose",
        data={"csrf": foreign, "from": "a@example.com", "to": "b@example.org", "text": "x"},
    )
    assert r.status_code == 403


async def test_compose_enqueues_through_validate_message(env: dict[str, Any]) -> None:
    c, store = env["client"], env["store"]
    await login(c, env["key"])
    csrf = csrf_of((await c.get("/compose")).text)
    r = await c.post(
        "/compose",
        data={
            "csrf": csrf,
            "from": "Shop <shop@example.com>",
            "to": '"Lovelace, Ada" <ada@example.org>, bob@example.org',
            "subject": "Hi",
            "text": "Hello",
            "priority": "high",
            "tags": "welcome, signup",
        },
    )
    assert r.status_code == 303
    mid = r.headers["location"].split("/")[2].split("?")[0]
    rec = await store.get(mid)
    assert rec.status is Status.QUEUED and rec.source == "dashboard" and rec.priority == 0
    assert rec.content["to"] == [["ada@example.org", "Lovelace, Ada"], "bob@example.org"]
    assert rec.content["tags"] == ["welcome", "signup"]
    page = await c.get(f"/messages/{mid}")
    assert page.status_code == 200 and "Hello" in page.text


async def test_compose_shows_the_validation_error_beside_its_field(env: dict[str, Any]) -> None:
    c = env["client"]
    await login(c, env["key"])
    csrf = csrf_of((await c.get("/compose")).text)
    r = await c.post(
        "/compose", data={"csrf": csrf, "from": "shop@example.com", "to": "nope", "text": "x"}
    )
    assert r.status_code == 422
    assert re.search(r'id="error-to"[^>]*>[^<]*nope', r.text)
    r = await c.post(
        "/compose",
        data={
            "csrf": csrf,
            "from": "shop@example.com",
            "to": "a@example.org",
            "send_at": "tomorrow",
        },
    )
    assert 'id="error-text"' in r.text  # no body: named on the text field
    r = await c.post(
        "/compose",
        data={
            "csrf": csrf,
            "from": "shop@example.com",
            "to": "a@example.org",
            "text": "x",
            "send_at": "tomorrow",
        },
    )
    assert 'id="error-send_at"' in r.text


async def test_cancel_and_retry_from_the_message_page(env: dict[str, Any]) -> None:
    c, store = env["client"], env["store"]
    await login(c, env["key"])
    csrf = csrf_of((await c.get("/compose")).text)
    r = await c.post(
        "/compose",
        data={
            "csrf": csrf,
            "from": "a@example.com",
            "to": "b@example.org",
            "text": "x",
            "send_at": "2099-01-01T09:00",
        },
    )
    mid = r.headers["location"].split("/")[2].split("?")[0]
    assert (await store.get(mid)).status is Status.SCHEDULED
    r = await c.post(f"/messages/{mid}/cancel", data={"csrf": csrf})
    assert r.status_code == 303 and (await store.get(mid)).status is Status.CANCELLED
    r = await c.post(f"/messages/{mid}/retry", data={"csrf": csrf})
    assert (
        r.status_code == 303 and "error=" in r.headers["location"]
    )  # a cancelled message stays so
    page = await c.get(r.headers["location"])
    assert "only failed or retrying" in page.text


async def test_logout_ends_the_session(env: dict[str, Any]) -> None:
    c = env["client"]
    await login(c, env["key"])
    csrf = csrf_of((await c.get("/")).text)
    r = await c.post("/logout", data={"csrf": csrf})
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert (await c.get("/")).status_code == 303


async def test_a_revoked_key_ends_its_sessions(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from postroom.web.auth import Auth

    monkeypatch.setattr(Auth, "KEYS_TTL_S", 0.0)  # no grace period for the test
    c, store = env["client"], env["store"]
    await login(c, env["key"])
    assert (await c.get("/")).status_code == 200
    (key,) = await store.list_keys()
    await store.revoke_key(key.id)
    assert (await c.get("/")).status_code == 303


def test_a_tampered_or_old_session_token_is_refused() -> None:
    s = Signer(b"k", purpose="test")
    token = s.sign({"who": "password"})
    assert s.unsign(token, max_age_s=60) is not None
    body, mac = token.split(".")
    assert s.unsign(body + "x." + mac, max_age_s=60) is None
    assert s.unsign(token, max_age_s=-1) is None
    assert Signer(b"other", purpose="test").unsign(token, max_age_s=60) is None
    assert Signer(b"k", purpose="other").unsign(token, max_age_s=60) is None


def test_address_fields_split_outside_quotes() -> None:
    assert split_addresses('"Doe, Jane" <j@x.org>, b@x.org;\nc@x.org') == [
        '"Doe, Jane" <j@x.org>',
        "b@x.org",
        "c@x.org",
    ]
    body = form_to_message(
        {"from": "a@x.org", "to": "b@x.org", "send_at": "2030-01-31T10:00", "tz_offset": "-60"}
    )
    assert body["send_at"] == "2030-01-31T09:00:00Z"  # the browser was at UTC+1


async def test_a_failed_message_shows_its_reply_and_can_be_retried(env: dict[str, Any]) -> None:
    from postroom.domain.model import Outcome
    from postroom.domain.validate import validate_message

    c, store = env["client"], env["store"]
    body = {"from": "a@example.com", "to": "b@example.org", "subject": "Bounce", "text": "x"}
    (res,) = await store.enqueue([validate_message(body)])
    (claimed,) = await store.claim("w1", 1, 30)
    await store.record(
        [
            Outcome(
                res.id,
                claimed.lease_token,
                Status.FAILED,
                provider="smtp",
                code=550,
                text="5.1.1 no such user",
            )
        ],
        worker="w1",
    )
    await login(c, env["key"])
    page = await c.get(f"/messages/{res.id}")
    assert "5.1.1 no such user" in page.text and "550" in page.text
    assert re.search(r'data-action="retry"\s*>', page.text)  # shown
    assert re.search(r'data-action="cancel"\s*hidden', page.text)  # not for a failed message
    r = await c.post(f"/messages/{res.id}/retry", data={"csrf": csrf_of(page.text)})
    assert r.status_code == 303 and r.headers["location"].endswith("?retried=1")
    assert (await store.get(res.id)).status is Status.QUEUED


async def test_messages_page_filters_by_status_and_pages_by_cursor(env: dict[str, Any]) -> None:
    from postroom.domain.validate import validate_message

    c, store = env["client"], env["store"]
    msgs = [
        {"from": "a@example.com", "to": f"u{i}@example.org", "subject": f"m{i}", "text": "x"}
        for i in range(55)
    ]
    await store.enqueue([validate_message(m) for m in msgs])
    await login(c, env["key"])
    first = await c.get("/messages")
    assert first.text.count('class="row-link"') == 50
    older = re.search(r'href="(/messages\?cursor=[^"]+)" id="older"', first.text)
    assert older
    second = await c.get(older.group(1).replace("&amp;", "&"))
    assert second.text.count('class="row-link"') == 5 and "m0<" in second.text
    none = await c.get("/messages?status=failed")
    assert 'class="row-link"' not in none.text and "No messages match" in none.text
    bad = await c.get("/messages?status=nonsense")
    assert bad.status_code == 200 and "not valid" in bad.text
