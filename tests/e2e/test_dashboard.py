"""The dashboard in a real browser (Debian's chromium, driven by Playwright) against `postroom run`.

Screenshots of every page go to test-artifacts/ for a person to look at."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import IN_CI, free_port

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
POSTROOM = [sys.executable, "-m", "postroom.cli"]
TIMEOUT_MS = 15_000


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as _expect

    return _expect(locator)


def require_chromium() -> Any:
    """Playwright's sync API, or skip (locally) / fail (CI=true) when the browser is missing."""
    problem = None
    if not os.path.exists(CHROMIUM):
        problem = f"{CHROMIUM} is missing (apt-get install chromium)"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        problem = problem or "the playwright package is missing (pip install -e '.[dev]')"
    if problem:
        if IN_CI:
            pytest.fail(problem + " (CI=true: the browser must be there)")
        pytest.skip(problem)
    return sync_playwright


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    tmp = tmp_path_factory.mktemp("dashboard")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
    env.update(
        POSTROOM_DATABASE_URL=f"sqlite:///{tmp}/postroom.db",
        POSTROOM_WORKER__IDLE_POLL_S="0.1",
        POSTROOM_SECRET_KEY="test-secret-key-for-sessions",
    )
    key = subprocess.run(
        [*POSTROOM, "keys", "create", "--name", "e2e-admin"],
        env=env,
        cwd=tmp,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    assert key.startswith("pr_"), key
    log = open(tmp / "server.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [*POSTROOM, "run", "--port", str(port)],
        env=env,
        cwd=tmp,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    "postroom run did not start:\n" + (tmp / "server.log").read_text()
                )
            time.sleep(0.1)
        yield {"base": base, "key": key, "log": str(tmp / "server.log")}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser(server: dict[str, str]) -> Iterator[Any]:
    sync_playwright = require_chromium()
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any, server: dict[str, str]) -> Iterator[Any]:
    """A logged-in page (its own cookies), in a time zone that is not UTC."""
    ctx = browser.new_context(
        base_url=server["base"],
        viewport={"width": 1360, "height": 880},
        timezone_id="Europe/Berlin",
    )
    ctx.set_default_timeout(TIMEOUT_MS)
    p = ctx.new_page()
    errors: list[str] = []
    p.on("pageerror", lambda e: errors.append(str(e)))
    login(p, server["key"])
    yield p
    ctx.close()
    assert not errors, f"JavaScript errors: {errors}"


def login(p: Any, secret: str) -> None:
    p.goto("/")
    p.wait_for_url("**/login")
    p.fill("#secret", secret)
    p.click("#login")
    p.wait_for_url(lambda url: not url.endswith("/login"))


def shot(p: Any, name: str, *, full_page: bool = True) -> None:
    p.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"), full_page=full_page)


def local_time_in(p: Any, seconds: float) -> str:
    """A datetime-local value `seconds` from now, in the browser's time zone."""
    return str(
        p.evaluate(
            """(s) => { const d = new Date(Date.now() + s * 1000), p = (n) => String(n).padStart(2, "0");
            return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`; }""",
            seconds,
        )
    )


def compose(
    p: Any, *, to: str, subject: str, send_at: str | None = None, html: str | None = None
) -> None:
    p.goto("/compose")
    p.fill("#f-to", to)
    p.fill("#f-subject", subject)
    p.fill("#f-text", f"Hello!\n\nThis is {subject!r}, sent from the dashboard.\n\n-- \nPostroom")
    if html is not None:
        p.fill("#f-html", html)
    if send_at is not None:
        p.fill("#f-send_at", send_at)
    p.click("#send")


# -- the tests, in the order a new user meets the pages ---------------------------------------
def test_login_page_is_the_only_way_in(browser: Any, server: dict[str, str]) -> None:
    ctx = browser.new_context(base_url=server["base"], viewport={"width": 1360, "height": 880})
    p = ctx.new_page()
    p.set_default_timeout(TIMEOUT_MS)
    for path in ("/", "/messages", "/compose", "/inbox"):
        p.goto(path)
        assert "/login" in p.url, path
    shot(p, "login")
    p.fill("#secret", "pr_not-a-real-key")
    p.click("#login")
    p.wait_for_selector("#login-error")
    assert "not an admin API key" in p.inner_text("#login-error")
    shot(p, "login-error")
    p.fill("#secret", server["key"])
    p.click("#login")
    p.wait_for_url("**/inbox")  # back to where the visitor was going
    ctx.close()


def test_message_sent_from_the_form_reaches_sent_live_and_lands_in_the_inbox(page: Any) -> None:
    p = page
    html = (
        "<div style='font-family:sans-serif;padding:24px'><h1 style='color:#4f46e5'>Welcome aboard</h1>"
        "<p>Your account is ready. <a href='https://example.org'>Open it</a>.</p>"
        "<script>parent.document.title='pwned'</script></div>"
    )
    compose(
        p,
        to="Ada Lovelace <ada@example.org>",
        subject="Welcome aboard",
        send_at=local_time_in(p, 4),
        html=html,
    )
    p.wait_for_url("**/messages/*")
    assert p.inner_text("#status-badge").strip() == "scheduled"  # the browser's zone was honoured
    p.evaluate("window.__no_reload = 'still here'")
    expect(p.locator("#status-badge")).to_have_text("sent", timeout=20_000)
    assert p.evaluate("window.__no_reload") == "still here", "the page reloaded"
    assert p.title() != "pwned"
    timeline = p.inner_text("#timeline").lower()
    assert "scheduled" in timeline and "sent" in timeline
    frame = p.frame_locator("iframe.mail-frame")
    assert "Your account is ready" in frame.locator("body").inner_text()
    assert p.get_attribute("iframe.mail-frame", "sandbox") == ""
    shot(p, "message-sent")

    p.click("#inbox-link")
    p.wait_for_url("**/inbox/*")
    assert "Welcome aboard" in p.inner_text("h1")
    assert (
        "Your account is ready" in p.frame_locator("iframe.mail-frame").locator("body").inner_text()
    )
    shot(p, "inbox-message")
    p.click("[data-tab=headers]")
    assert "Message-ID" in p.inner_text("[data-pane=headers]")
    p.goto("/inbox")
    assert "Welcome aboard" in p.inner_text("#inbox-list")
    shot(p, "inbox")


def test_a_bad_address_is_shown_beside_its_field(page: Any) -> None:
    p = page
    compose(p, to="ada@example.org, not-an-address", subject="Typo")
    err = p.wait_for_selector("#error-to")
    assert "not-an-address" in err.inner_text()
    # beside the field: inside the same labelled block as the input
    assert p.locator(".field.has-error #f-to").count() == 1
    assert p.input_value("#f-subject") == "Typo"  # what was typed is kept
    shot(p, "compose-error")
    p.fill("#f-to", "")
    p.fill("#f-from", "")
    p.click("#send")
    assert "required" in p.inner_text("#error-from")


def test_a_scheduled_message_can_be_cancelled(page: Any) -> None:
    p = page
    compose(
        p, to="grace@example.org", subject="Reminder for tomorrow", send_at=local_time_in(p, 86_400)
    )
    p.wait_for_url("**/messages/*")
    assert p.inner_text("#status-badge").strip() == "scheduled"
    shot(p, "message-scheduled")
    p.click("#cancel")
    p.wait_for_selector("#flash")
    assert p.inner_text("#status-badge").strip() == "cancelled"
    assert not p.is_visible("#cancel")
    assert "cancelled" in p.inner_text("#timeline").lower()


def test_messages_list_filters_and_pages(page: Any, server: dict[str, str]) -> None:
    h = {"Authorization": f"Bearer {server['key']}"}
    for i in range(60):
        r = httpx.post(
            f"{server['base']}/v1/messages",
            headers=h,
            timeout=10,
            json={
                "from": "Shop <shop@example.com>",
                "to": [f"customer{i}@example.org"],
                "subject": f"Order #{1000 + i} confirmed",
                "text": "Thanks!",
                "tags": ["orders"] if i % 2 else ["receipts"],
            },
        )
        assert r.status_code == 202
    p = page
    p.goto("/messages")
    assert p.locator("tbody tr").count() == 50
    shot(p, "messages")
    p.click("#older")
    assert p.locator("tbody tr").count() >= 10
    p.goto("/messages")
    p.select_option("#filter-status", "cancelled")
    p.click("#filters button[type=submit]")
    p.wait_for_url("**status=cancelled**")
    rows = p.locator("tbody tr")
    assert rows.count() == 1 and "Reminder for tomorrow" in rows.inner_text()
    p.goto("/messages?tag=orders")
    assert p.locator("tbody tr").count() == 30


def test_overview_shows_counts_and_updates_live(page: Any, server: dict[str, str]) -> None:
    p = page
    p.goto("/")
    p.wait_for_selector("#live-dot.on")
    p.wait_for_selector("#chart svg")
    sent_before = int(p.inner_text("[data-count=sent]").replace(",", ""))
    assert sent_before >= 1
    p.evaluate("window.__no_reload = 1")
    h = {"Authorization": f"Bearer {server['key']}"}
    for i in range(5):
        httpx.post(
            f"{server['base']}/v1/messages",
            headers=h,
            timeout=10,
            json={
                "from": "app@example.com",
                "to": [f"late{i}@example.org"],
                "subject": "Live",
                "text": "x",
            },
        )
    deadline = time.monotonic() + 20
    while int(p.inner_text("[data-count=sent]").replace(",", "")) < sent_before + 5:
        assert time.monotonic() < deadline, "the sent count did not grow"
        p.wait_for_timeout(200)
    assert p.evaluate("window.__no_reload") == 1
    assert "capture" in p.inner_text("#providers")
    p.wait_for_timeout(300)
    shot(p, "overview")
    p.click("[data-range='1h']")
    p.wait_for_timeout(500)
    assert "range=1h" in p.url
    p.set_viewport_size({"width": 390, "height": 844})
    p.wait_for_timeout(300)
    shot(p, "overview-mobile")


def test_logout_ends_the_session(page: Any) -> None:
    p = page
    p.goto("/messages")
    p.click("#logout")
    p.wait_for_url("**/login")
    p.goto("/messages")
    assert "/login" in p.url
