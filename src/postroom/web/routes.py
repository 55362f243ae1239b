"""Dashboard routes: overview, compose, messages, message, inbox, login; live updates over SSE."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from html import unescape as html_unescape
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markupsafe import Markup

from postroom import __version__
from postroom.config import Settings
from postroom.domain.errors import ConflictError, NotFound, StoreUnavailable, ValidationError
from postroom.domain.model import CANCELLABLE, TERMINAL, Priority, Status
from postroom.domain.ports import CapturedMail, MessageFilter, MessageRecord, Store
from postroom.domain.validate import validate_message
from postroom.web.auth import LOGIN_CSRF_COOKIE, Auth, Session
from postroom.web.live import RANGES, Monitor

__all__ = ["mount"]

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
PAGE_SIZE = 50
STREAM_MAX_S = (
    300.0  # an SSE stream ends after this; the browser reconnects (and re-checks the session)
)
MESSAGE_POLL_S = 0.5
SECURITY_HEADERS = {
    # srcdoc iframes inherit this policy: html bodies get no scripts (sandbox="" too), but may
    # show their images, like a mail client would.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src * data: blob:; font-src 'self' data:; frame-ancestors 'none'; "
        "form-action 'self'; base-uri 'none'; object-src 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
NAV = [
    ("overview", "/", "Overview"),
    ("compose", "/compose", "Compose"),
    ("messages", "/messages", "Messages"),
    ("inbox", "/inbox", "Inbox"),
]
FORM_FIELDS = ("from", "to", "cc", "subject", "text", "html", "priority", "send_at", "tags")


# -- small helpers for templates -------------------------------------------------------------
def _addr(a: Any) -> str:
    return a if isinstance(a, str) else f"{a[1]} <{a[0]}>"


def _utc(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _time(ts: float | None, style: str = "datetime") -> Markup:
    """A <time> element the page script turns into local time ('datetime') or '3 s ago' ('ago')."""
    if ts is None:
        return Markup('<span class="muted">—</span>')
    iso = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return Markup('<time datetime="{}" data-style="{}" title="{}">{}</time>').format(
        iso, style, _utc(ts), _utc(ts)
    )


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB"):
        if n < 1024 or unit == "MB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def split_addresses(text: str) -> list[str]:
    """Split a form field into addresses at commas, semicolons and newlines outside quotes."""
    out: list[str] = []
    cur: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch in ",;\n" and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [a.strip() for a in out if a.strip()]


def form_to_message(form: dict[str, str]) -> dict[str, Any]:
    """The compose form as the JSON body the API takes, so both go through validate_message."""
    body: dict[str, Any] = {
        "from": form.get("from", "").strip() or None,
        "to": split_addresses(form.get("to", "")),
        "subject": form.get("subject", ""),
        "priority": form.get("priority") or "normal",
    }
    if cc := split_addresses(form.get("cc", "")):
        body["cc"] = cc
    for k in ("text", "html"):
        if form.get(k, "").strip():
            body[k] = form[k].replace("\r\n", "\n")
    if tags := [t.strip() for t in re.split(r"[,\s]+", form.get("tags", "")) if t.strip()]:
        body["tags"] = tags
    if send_at := form.get("send_at", "").strip():
        body["send_at"] = _local_to_iso(send_at, form.get("tz_offset", ""))
    return body


def _local_to_iso(value: str, tz_offset: str) -> str:
    """A datetime-local value ('2030-01-31T09:00') in the browser's zone -> ISO 8601 UTC.

    The page script sends the browser's offset (minutes, as JS getTimezoneOffset); without it
    the time is taken as UTC. Anything unparseable is passed on for validate_message to name."""
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        return value
    if dt.tzinfo is None:
        offset = int(tz_offset) if re.fullmatch(r"-?\d{1,4}", tz_offset.strip() or "x") else 0
        dt = (dt + timedelta(minutes=offset)).replace(tzinfo=UTC)
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _field_of(error_field: str) -> str:
    """'to.2' -> 'to'; fields the form does not have fall back to the top of the form."""
    head = error_field.split(".", 1)[0]
    if head == "bcc":
        return "to"
    return head if head in FORM_FIELDS else "_form"


def _body_parts(mime: bytes) -> dict[str, Any]:
    parsed = message_from_bytes(mime, policy=policy.default)
    out: dict[str, Any] = {"headers": [(k, str(v)) for k, v in parsed.items()]}
    for kind in ("html", "plain"):
        part = parsed.get_body((kind,))
        try:
            out[kind] = part.get_content() if part is not None else None
        except (LookupError, ValueError):
            out[kind] = None
    out["attachments"] = [
        {
            "filename": p.get_filename() or "(unnamed)",
            "content_type": p.get_content_type(),
            "size": len(p.get_payload(decode=True) or b""),
        }
        for p in parsed.iter_attachments()
    ]
    return out


def _preview(mime: bytes, length: int = 160) -> str:
    """The first words of a message, for the inbox list."""
    parsed = message_from_bytes(mime, policy=policy.default)
    part = parsed.get_body(("plain", "html"))
    try:
        text = part.get_content() if part is not None else ""
    except (LookupError, ValueError):
        return ""
    if part is not None and part.get_content_type() == "text/html":
        text = re.sub(r"(?is)<(script|style)\b.*?</\1>|<[^>]+>", " ", text)
        text = html_unescape(text)
    text = " ".join(text.split())
    return text[:length] + ("…" if len(text) > length else "")


# -- mount -----------------------------------------------------------------------------------
def mount(app: FastAPI, settings: Settings, store: Store) -> None:
    """Add the dashboard to `app`: pages at /, static files at /static, live feeds under /live."""
    auth = Auth(store, password=settings.dashboard_password, secret_key=settings.secret_key)
    monitor = Monitor(store, settings, app.state)
    limits = settings.limits.message_limits()
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    env = templates.env
    env.globals.update(
        version=__version__,
        nav=NAV,
        ranges=list(RANGES),
        Status=Status,
        CANCELLABLE=CANCELLABLE,
        TERMINAL=TERMINAL,
    )
    env.filters.update(
        addr=_addr, time=_time, utc=_utc, size=_size, priority=lambda p: Priority(p).label
    )
    app.state.dashboard_monitor = monitor
    _own_lifespan(app, monitor)

    r = APIRouter(include_in_schema=False)

    def page(
        request: Request, name: str, session: Session | None, status: int = 200, **ctx: Any
    ) -> HTMLResponse:
        resp = templates.TemplateResponse(
            request,
            name,
            {"session": session, "csrf": session.csrf if session else "", **ctx},
            status_code=status,
        )
        resp.headers.update(SECURITY_HEADERS)
        return resp

    def to_login(request: Request) -> RedirectResponse:
        nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        target = "/login" if nxt == "/" else "/login?" + urlencode({"next": nxt})
        return RedirectResponse(target, status_code=303)

    def fragment(name: str, **ctx: Any) -> str:
        return env.get_template(name).render(**ctx)

    Handler = Callable[..., Awaitable[Response]]

    def view(fn: Handler) -> Handler:
        """Pages: the session or a redirect to /login; store errors as an HTML page."""

        async def wrapped(request: Request, **kw: Any) -> Response:
            session = await auth.session(request)
            if session is None:
                return to_login(request)
            try:
                return await fn(request, session, **kw)
            except NotFound as e:
                return page(request, "error.html", session, 404, title="Not found", detail=str(e))
            except StoreUnavailable as e:
                return page(
                    request,
                    "error.html",
                    session,
                    503,
                    title="Database unavailable",
                    detail=f"The database is not reachable right now: {e}",
                )

        wrapped.__name__ = fn.__name__
        wrapped.__signature__ = _signature_without_session(fn)  # type: ignore[attr-defined]
        return wrapped

    # -- login / logout ---------------------------------------------------------------------
    @r.get("/login")
    async def login_form(request: Request, next: str = "/") -> Response:
        if await auth.session(request) is not None:
            return RedirectResponse(_safe_next(next), status_code=303)
        return _login_page(request, next, None, 200)

    def _login_page(request: Request, nxt: str, error: str | None, status: int) -> Response:
        token = auth.sessions.sign({"login": True})
        resp = page(
            request,
            "login.html",
            None,
            status,
            login_csrf=token,
            next=_safe_next(nxt),
            error=error,
            password_enabled=bool(settings.dashboard_password),
        )
        resp.set_cookie(
            LOGIN_CSRF_COOKIE,
            token,
            max_age=3600,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/login",
        )
        return resp

    @r.post("/login")
    async def login(request: Request) -> Response:
        form = await request.form()
        nxt = str(form.get("next") or "/")
        cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        given = form.get("csrf")
        if (
            not cookie
            or not auth.csrf_ok(cookie, given)
            or auth.sessions.unsign(cookie, max_age_s=3600) is None
        ):
            return _login_page(request, nxt, "The login form expired. Please try again.", 400)
        session = await auth.login(str(form.get("secret") or ""))
        if session is None:
            await asyncio.sleep(0.3)  # slows guessing a little
            return _login_page(
                request, nxt, "That is not an admin API key or the dashboard password.", 401
            )
        resp = RedirectResponse(_safe_next(nxt), status_code=303)
        auth.set_cookie(resp, request, session)
        resp.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
        return resp

    async def logout(request: Request, session: Session, form: dict[str, str]) -> Response:
        resp = RedirectResponse("/login", status_code=303)
        auth.clear_cookie(resp)
        return resp

    r.add_api_route("/logout", view(_csrf(auth, page, logout)), methods=["POST"])

    # -- overview ---------------------------------------------------------------------------
    async def overview_parts(range_name: str) -> dict[str, Any]:
        stats = await monitor.stats()
        workers, providers = await monitor.workers(), await monitor.providers()
        recent = await store.list_messages(MessageFilter(limit=8))
        return {
            "fragments": {
                "counts": fragment("_counts.html", stats=stats),
                "workers": fragment("_workers.html", panel=workers),
                "providers": fragment("_providers.html", panel=providers),
                "recent": fragment("_recent.html", items=recent.items),
            },
            "chart": await monitor.throughput(range_name),
        }

    async def overview(request: Request, session: Session) -> Response:
        rng = request.query_params.get("range", "15m")
        rng = rng if rng in RANGES else "15m"
        parts = await overview_parts(rng)
        return page(
            request,
            "overview.html",
            session,
            active="overview",
            range=rng,
            parts=parts,
            chart_json=orjson.dumps(parts["chart"]).decode(),
        )

    r.add_api_route("/", view(overview), methods=["GET"])

    async def live_overview(request: Request, session: Session) -> Response:
        rng = request.query_params.get("range", "15m")
        rng = rng if rng in RANGES else "15m"

        async def events() -> AsyncIterator[bytes]:
            async with monitor.watching():
                while True:
                    await monitor.next_sample(monitor.SAMPLE_S * 2)
                    yield _sse(await overview_parts(rng))

        return _stream(request, monitor, events())

    r.add_api_route("/live/overview", live(auth, live_overview), methods=["GET"])

    # -- compose ----------------------------------------------------------------------------
    async def compose_form(request: Request, session: Session) -> Response:
        values = {"from": "Postroom <noreply@example.com>", "priority": "normal"}
        return page(request, "compose.html", session, active="compose", values=values, errors={})

    async def compose(request: Request, session: Session, form: dict[str, str]) -> Response:
        try:
            body = form_to_message(form)
            msg = validate_message(body, limits=limits, source="dashboard")
        except ValidationError as e:
            return page(
                request,
                "compose.html",
                session,
                422,
                active="compose",
                values=form,
                errors={_field_of(e.field): e.message},
            )
        if session.who.startswith("key:"):
            msg.key_id = session.who[4:]
        (res,) = await store.enqueue([msg])
        if isinstance(res, BaseException):
            raise res
        return RedirectResponse(f"/messages/{res.id}?sent=1", status_code=303)

    r.add_api_route("/compose", view(compose_form), methods=["GET"])
    r.add_api_route("/compose", view(_csrf(auth, page, compose)), methods=["POST"])

    # -- messages ---------------------------------------------------------------------------
    async def messages(request: Request, session: Session) -> Response:
        q = request.query_params
        f = {k: q.get(k, "").strip() for k in ("status", "tag", "to", "since", "until", "cursor")}
        error = None
        flt = MessageFilter(
            limit=PAGE_SIZE,
            cursor=f["cursor"] or None,
            tag=f["tag"][:64] or None,
            to=f["to"][:320] or None,
        )
        try:
            if f["status"]:
                flt.status = Status(f["status"])
            tz = q.get("tz_offset", "")
            for k in ("since", "until"):
                if f[k]:
                    iso = _local_to_iso(f[k], tz)
                    setattr(flt, k, datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
        except ValueError:
            error = "Check the filters: the status or a time is not valid."
            flt = MessageFilter(limit=PAGE_SIZE)
        page_ = await store.list_messages(flt)
        keep = {k: v for k, v in f.items() if v and k != "cursor"}
        if q.get("tz_offset"):
            keep["tz_offset"] = q["tz_offset"]
        next_url = (
            "/messages?" + urlencode({**keep, "cursor": page_.next_cursor})
            if page_.next_cursor
            else None
        )
        first_url = "/messages?" + urlencode(keep) if f["cursor"] else None
        return page(
            request,
            "messages.html",
            session,
            active="messages",
            items=page_.items,
            filters=f,
            next_url=next_url,
            first_url=first_url,
            error=error,
            statuses=[s.value for s in Status],
        )

    r.add_api_route("/messages", view(messages), methods=["GET"])

    def message_parts(rec: MessageRecord) -> dict[str, Any]:
        ctx = {"m": rec, "csrf_token": None}
        return {
            "status": rec.status.value,
            "fragments": {
                "status-badge": fragment("_badge.html", status=rec.status.value),
                "facts": fragment("_facts.html", **ctx),
                "timeline": fragment("_timeline.html", **ctx),
            },
            "actions": {
                "cancel": rec.status in CANCELLABLE,
                "retry": rec.status in (Status.FAILED, Status.RETRYING),
            },
        }

    async def message(request: Request, session: Session, message_id: str) -> Response:
        rec = await store.get(message_id)
        notice = {
            "sent": "Message accepted.",
            "cancelled": "Message cancelled.",
            "retried": "Message queued for another try.",
        }
        flash = next((v for k, v in notice.items() if request.query_params.get(k)), None)
        error = request.query_params.get("error")
        return page(
            request,
            "message.html",
            session,
            active="messages",
            m=rec,
            parts=message_parts(rec),
            flash=flash,
            error=error,
        )

    r.add_api_route("/messages/{message_id}", view(message), methods=["GET"])

    async def live_message(request: Request, session: Session, message_id: str) -> Response:
        rec = await store.get(message_id)  # 404 before the stream starts

        async def events() -> AsyncIterator[bytes]:
            seen: tuple[Any, ...] | None = None
            current = rec
            while True:
                key = (current.status, current.updated_at, current.attempts, len(current.events))
                if key != seen:
                    seen = key
                    yield _sse(message_parts(current))
                else:
                    yield b": ping\n\n"
                done = current.status in TERMINAL
                await _sleep_or_close(monitor, 2.0 if done else MESSAGE_POLL_S)
                current = await store.get(message_id)

        return _stream(request, monitor, events())

    r.add_api_route("/live/messages/{message_id}", live(auth, live_message), methods=["GET"])

    def message_action(kind: str) -> Handler:
        async def act(
            request: Request, session: Session, form: dict[str, str], message_id: str
        ) -> Response:
            try:
                if kind == "cancel":
                    await store.cancel(message_id)
                else:
                    await store.retry_now(message_id)
            except ConflictError as e:
                return RedirectResponse(
                    f"/messages/{message_id}?" + urlencode({"error": e.message}), 303
                )
            done = "cancelled" if kind == "cancel" else "retried"
            return RedirectResponse(f"/messages/{message_id}?{done}=1", status_code=303)

        act.__name__ = f"message_{kind}"
        return act

    for kind in ("cancel", "retry"):
        r.add_api_route(
            f"/messages/{{message_id}}/{kind}",
            view(_csrf(auth, page, message_action(kind))),
            methods=["POST"],
        )

    # -- inbox ------------------------------------------------------------------------------
    async def inbox(request: Request, session: Session) -> Response:
        before = request.query_params.get("before") or None
        items = await store.inbox(limit=PAGE_SIZE + 1, before=before)
        more = len(items) > PAGE_SIZE
        items = items[:PAGE_SIZE]
        next_url = "/inbox?" + urlencode({"before": items[-1].id}) if more else None
        previews = await asyncio.to_thread(lambda: {m.id: _preview(m.mime) for m in items})
        return page(
            request,
            "inbox.html",
            session,
            active="inbox",
            items=items,
            previews=previews,
            next_url=next_url,
            first_url="/inbox" if before else None,
        )

    async def inbox_item(request: Request, session: Session, capture_id: str) -> Response:
        mail: CapturedMail = await store.inbox_get(capture_id)
        parts = await asyncio.to_thread(_body_parts, mail.mime)
        return page(request, "inbox_item.html", session, active="inbox", mail=mail, parts=parts)

    async def inbox_raw(request: Request, session: Session, capture_id: str) -> Response:
        mail = await store.inbox_get(capture_id)
        return Response(
            mail.mime,
            media_type="message/rfc822",
            headers={
                "Content-Disposition": f'attachment; filename="{mail.id}.eml"',
                **SECURITY_HEADERS,
            },
        )

    r.add_api_route("/inbox", view(inbox), methods=["GET"])
    r.add_api_route("/inbox/{capture_id}", view(inbox_item), methods=["GET"])
    r.add_api_route("/inbox/{capture_id}/raw", view(inbox_raw), methods=["GET"])

    app.include_router(r)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="dashboard-static")


# -- plumbing --------------------------------------------------------------------------------
def _safe_next(nxt: str) -> str:
    """Only local paths: never //evil.example or https://evil.example."""
    if not nxt.startswith("/") or nxt.startswith("//") or "\\" in nxt:
        return "/"
    return nxt


def _signature_without_session(fn: Callable[..., Any]) -> Any:
    import inspect

    sig = inspect.signature(fn)
    params = [p for name, p in sig.parameters.items() if name not in ("session", "form")]
    return sig.replace(parameters=params)


def _csrf(
    auth: Auth, page: Callable[..., HTMLResponse], fn: Callable[..., Awaitable[Response]]
) -> Any:
    """Wrap a form handler: the posted `csrf` must be the session's token, else nothing happens."""

    async def wrapped(request: Request, session: Session, **kw: Any) -> Response:
        form = await request.form()
        if not auth.csrf_ok(session.csrf, form.get("csrf")):
            return page(
                request,
                "error.html",
                session,
                403,
                title="Form expired",
                detail="This form is missing its security token or it is out of date. "
                "Go back, reload the page and try again.",
            )
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        return await fn(request, session, form=fields, **kw)

    wrapped.__name__ = fn.__name__
    wrapped.__signature__ = _signature_without_session(fn)  # type: ignore[attr-defined]
    return wrapped


def live(auth: Auth, fn: Callable[..., Awaitable[Response]]) -> Any:
    """SSE endpoints: without a session, 204 (which tells EventSource to stop reconnecting)."""

    async def wrapped(request: Request, **kw: Any) -> Response:
        session = await auth.session(request)
        if session is None:
            return Response(status_code=204)
        try:
            return await fn(request, session, **kw)
        except NotFound:
            return Response(status_code=204)

    wrapped.__name__ = fn.__name__
    wrapped.__signature__ = _signature_without_session(fn)  # type: ignore[attr-defined]
    return wrapped


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


async def _sleep_or_close(monitor: Monitor, delay_s: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(monitor.closing.wait(), delay_s)


def _stream(request: Request, monitor: Monitor, events: AsyncIterator[bytes]) -> StreamingResponse:
    """An SSE response that ends on client disconnect, on shutdown, or after STREAM_MAX_S."""

    async def body() -> AsyncIterator[bytes]:
        deadline = time.monotonic() + STREAM_MAX_S
        yield b"retry: 1000\n\n"
        try:
            async for chunk in events:
                if monitor.closing.is_set() or time.monotonic() > deadline:
                    break
                if await request.is_disconnected():
                    break
                yield chunk
        except StoreUnavailable:
            return  # the browser reconnects in a second
        finally:
            with contextlib.suppress(Exception):
                await events.aclose()  # type: ignore[attr-defined]

    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


def _own_lifespan(app: FastAPI, monitor: Monitor) -> None:
    """Run the monitor inside the app's lifespan, and end live streams when the server stops.

    uvicorn waits for open responses before it runs the lifespan shutdown, so a browser tab with
    a live page would hold a stopping server for the whole graceful timeout. The stop signal
    therefore also sets `monitor.closing` (the server's own handler still runs)."""
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        async with inner(a) as state:
            monitor.start()
            restore = _chain_stop_signals(monitor.closing.set)
            try:
                yield state
            finally:
                restore()
                await monitor.stop()

    app.router.lifespan_context = lifespan


def _chain_stop_signals(on_stop: Callable[[], None]) -> Callable[[], None]:
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    saved: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        prev = signal.getsignal(sig)
        if not callable(prev):
            continue  # default or ignored: nobody is handling a graceful stop, leave it alone

        def handler(signum: int, frame: Any, prev: Any = prev) -> None:
            loop.call_soon_threadsafe(on_stop)
            prev(signum, frame)

        saved[sig] = prev
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, prev in saved.items():
            if signal.getsignal(sig) is not prev:
                with contextlib.suppress(ValueError):
                    signal.signal(sig, prev)

    return restore
