"""FastAPI app factory: the /v1 API, /healthz, error answers, lifespan (store, worker)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import orjson
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from postroom import __version__
from postroom.api.schemas import BatchIn, MessageIn, request_body
from postroom.api.views import captured_view, message_view
from postroom.config import Settings
from postroom.domain.batching import GroupCommit
from postroom.domain.errors import (
    ConflictError,
    LimitExceeded,
    NotFound,
    PostroomError,
    StoreUnavailable,
    ValidationError,
)
from postroom.domain.model import NewMessage, Status
from postroom.domain.ports import ApiKey, EnqueueResult, MessageFilter, RoutingView, Store
from postroom.domain.validate import validate_message

__all__ = ["create_app"]

log = logging.getLogger(__name__)


class ORJSONResponse(JSONResponse):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class Unauthorized(PostroomError):
    pass


def error(status: int, type_: str, message: str, field: str | None = None) -> ORJSONResponse:
    body: dict[str, Any] = {"type": type_, "message": message}
    if field is not None:
        body["field"] = field
    return ORJSONResponse({"error": body}, status_code=status)


def error_for(e: PostroomError) -> ORJSONResponse:
    """The one mapping from Postroom's errors to HTTP answers."""
    if isinstance(e, LimitExceeded):
        return error(413, "limit_exceeded", e.message, e.field)
    if isinstance(e, ValidationError):
        return error(422, "validation_error", e.message, e.field)
    if isinstance(e, NotFound):
        return error(404, "not_found", str(e))
    if isinstance(e, ConflictError):
        return error(409, "conflict", e.message)
    if isinstance(e, StoreUnavailable):
        resp = error(503, "unavailable", f"the database is not reachable right now, try again: {e}")
        resp.headers["Retry-After"] = "1"
        return resp
    if isinstance(e, Unauthorized):
        resp = error(401, "unauthorized", str(e))
        resp.headers["WWW-Authenticate"] = "Bearer"
        return resp
    log.error("unmapped error %r", e)
    return error(500, "internal_error", "internal error; the server log has the details")


class FastPath:
    """ASGI middleware: one exact method and path go to `handler`, everything else to the app."""

    def __init__(self, app: ASGIApp, *, path: str, method: str, handler: ASGIApp) -> None:
        self.app = app
        self.path = path
        self.method = method
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == self.path and scope["method"] == self.method:
            await self.handler(scope, receive, send)
        else:
            await self.app(scope, receive, send)


class KeyCache:
    """Verified API keys for a few seconds, so a request costs no database read for auth."""

    TTL_S = 5.0

    def __init__(self, store: Store) -> None:
        self.store = store
        self._cache: dict[str, tuple[ApiKey | None, float]] = {}

    async def verify(self, secret: str) -> ApiKey | None:
        now = time.monotonic()
        hit = self._cache.get(secret)
        if hit is not None and hit[1] > now:
            return hit[0]
        key = await self.store.verify_key(secret)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[secret] = (key, now + self.TTL_S)
        return key




def create_app(
    settings: Settings,
    store: Store,
    *,
    on_startup: Callable[[], Any] | None = None,
    on_shutdown: Callable[[], Any] | None = None,
    routing: RoutingView | None = None,
) -> FastAPI:
    """The HTTP API over `store`. `on_startup`/`on_shutdown` let `postroom run` start a worker in
    the same process. The caller owns opening the store before serving (the lifespan opens it too:
    opening twice is harmless)."""

    limits = settings.limits.message_limits()
    max_request = settings.limits.max_request_bytes
    max_batch = settings.limits.max_batch
    keys = KeyCache(store)
    if routing is None:
        from postroom.app import build_routing_view

        routing = build_routing_view(settings, store)
    routing_view = routing

    async def enqueue_many(msgs: Sequence[NewMessage]) -> list[EnqueueResult | BaseException]:
        return list(await store.enqueue(msgs))

    committer: GroupCommit[NewMessage, EnqueueResult] = GroupCommit(enqueue_many, max_batch=2000)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await store.open()
        if on_startup is not None:
            await on_startup()
        try:
            yield
        finally:
            if on_shutdown is not None:
                await on_shutdown()
            await committer.close()
            await routing_view.close()
            await store.close()

    app = FastAPI(
        title="Postroom",
        version=__version__,
        description="Self-hosted email delivery: accept, store, deliver, track.",
        lifespan=lifespan,
        default_response_class=ORJSONResponse,
    )
    app.state.store = store
    app.state.routing = routing_view
    app.state.settings = settings

    # -- errors: always JSON, always naming what is wrong ----------------------------------
    @app.exception_handler(PostroomError)
    async def _postroom_error(_: Request, e: PostroomError) -> Response:
        return error_for(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid_params(_: Request, e: RequestValidationError) -> Response:
        err = e.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if x not in ("query", "path", "header", "body")]
        return error(422, "validation_error", str(err.get("msg")), ".".join(loc) or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> Response:
        return error(e.status_code, "http_error", str(e.detail))

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> Response:
        log.exception("internal error")
        return error(500, "internal_error", "internal error; the server log has the details")

    # -- auth ---------------------------------------------------------------------------------
    async def api_key(authorization: str | None = Header(None)) -> ApiKey:
        return await authenticate(authorization)

    async def authenticate(authorization: str | None) -> ApiKey:
        if not authorization:
            raise Unauthorized("missing Authorization header; send 'Authorization: Bearer <API key>'")
        scheme, _, secret = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise Unauthorized("Authorization must be 'Bearer <API key>'")
        key = await keys.verify(secret.strip())
        if key is None:
            raise Unauthorized("unknown or revoked API key")
        return key

    def check_body_headers(length: str | None, ctype: str | None) -> None:
        if length is not None and length.isdigit() and int(length) > max_request:
            raise LimitExceeded("body", f"request body is {length} bytes; the limit is {max_request}")
        if ctype is not None and "json" not in ctype:
            raise ValidationError("body", f"send JSON (Content-Type: application/json), not {ctype}")

    def parse_json(raw: bytes) -> Any:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise ValidationError("body", f"invalid JSON: {e}") from None

    async def json_body(request: Request) -> Any:
        check_body_headers(request.headers.get("content-length"), request.headers.get("content-type"))
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_request:
                raise LimitExceeded("body", f"request body is larger than {max_request} bytes")
            chunks.append(chunk)
        return parse_json(b"".join(chunks))

    async def ingest_one(authorization: str | None, idempotency_key: str | None, data: Any) -> Response:
        """POST /v1/messages: the hot path, shared by the route and the ASGI fast path below."""
        key = await authenticate(authorization)
        if idempotency_key is not None and not 0 < len(idempotency_key) <= 256:
            raise ValidationError("Idempotency-Key", "must be 1 to 256 characters")
        msg = validate_message(data, limits=limits, idempotency_key=idempotency_key)
        msg.key_id = key.id
        res = await committer.submit(msg)
        resp = ORJSONResponse({"id": res.id, "status": res.status.value}, status_code=202)
        if not res.created:
            resp.headers["Idempotent-Replayed"] = "true"
        return resp

    async def fast_ingest(scope: Scope, receive: Receive, send: Send) -> None:
        """POST /v1/messages straight from ASGI, past routing and FastAPI's request machinery
        (they cost more than everything this route does). Same answers as the route."""
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            # auth before reading the body, as the route does through its dependency order
            if not headers.get("authorization"):
                await authenticate(None)
            check_body_headers(headers.get("content-length"), headers.get("content-type"))
            chunks, size, more = [], 0, True
            while more:
                event = await receive()
                if event["type"] == "http.disconnect":
                    return
                chunk = event.get("body", b"")
                size += len(chunk)
                if size > max_request:
                    raise LimitExceeded("body", f"request body is larger than {max_request} bytes")
                chunks.append(chunk)
                more = event.get("more_body", False)
            resp = await ingest_one(
                headers.get("authorization"), headers.get("idempotency-key"), parse_json(b"".join(chunks))
            )
        except PostroomError as e:
            resp = error_for(e)
        except Exception:
            log.exception("internal error")
            resp = error(500, "internal_error", "internal error; the server log has the details")
        await resp(scope, receive, send)

    # -- routes ---------------------------------------------------------------------------------
    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": __version__}

    # The hot path takes the bare request: FastAPI's per-request dependency solving costs more than
    # everything else this route does, so auth and the header are read here (and documented below).
    @app.post(
        "/v1/messages",
        status_code=202,
        tags=["messages"],
        openapi_extra={
            **request_body(MessageIn),
            "parameters": [
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "maxLength": 256},
                    "description": "the same key with the same body returns the first answer; "
                    "with a different body, 409",
                }
            ],
        },
        summary="Accept one message (answered after it is committed)",
    )
    async def post_message(request: Request) -> Response:
        # normally answered by fast_ingest; this route documents it (and serves it if unmounted)
        headers = request.headers
        if not headers.get("authorization"):
            await authenticate(None)
        return await ingest_one(headers.get("authorization"), headers.get("idempotency-key"), await json_body(request))

    @app.post(
        "/v1/messages/batch",
        status_code=202,
        tags=["messages"],
        openapi_extra=request_body(BatchIn),
        summary=f"Accept up to {max_batch} messages in one transaction",
    )
    async def post_batch(request: Request) -> Response:
        key = await authenticate(request.headers.get("authorization"))
        data = await json_body(request)
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise ValidationError("messages", "send {\"messages\": [...]} with a list of messages")
        items = data["messages"]
        atomic = bool(data.get("atomic", False))
        if not items:
            raise ValidationError("messages", "the list is empty")
        if len(items) > max_batch:
            raise LimitExceeded("messages", f"{len(items)} messages; the limit is {max_batch} per batch")
        valid: list[tuple[int, NewMessage]] = []
        errors: dict[int, dict[str, Any]] = {}
        loop = asyncio.get_running_loop()

        def check_all() -> None:
            for i, item in enumerate(items):
                try:
                    m = validate_message(item, limits=limits, field_prefix=f"messages.{i}.")
                    m.key_id = key.id
                    valid.append((i, m))
                except ValidationError as e:
                    errors[i] = {
                        "type": "limit_exceeded" if isinstance(e, LimitExceeded) else "validation_error",
                        "field": e.field,
                        "message": e.message,
                    }

        if len(items) > 50:  # keep the event loop free while a large batch is checked
            await loop.run_in_executor(None, check_all)
        else:
            check_all()
        if errors and atomic:
            first = min(errors)
            return ORJSONResponse(
                {
                    "error": {
                        "type": "validation_error",
                        "message": f"{len(errors)} of {len(items)} messages are invalid; nothing was accepted (atomic)",
                        "field": errors[first]["field"],
                    },
                    "errors": [{"index": i, **errors[i]} for i in sorted(errors)],
                },
                status_code=422,
            )
        results: list[dict[str, Any]] = [{} for _ in items]
        if valid:
            stored = await store.enqueue([m for _, m in valid], atomic=atomic)
            for (i, _), r in zip(valid, stored, strict=True):
                if isinstance(r, ConflictError):  # only with idempotency keys, which batches do not take
                    raise r
                results[i] = {"index": i, "id": r.id, "status": r.status.value}
        for i, e in errors.items():
            results[i] = {"index": i, "error": e}
        return ORJSONResponse(
            {"accepted": len(valid), "rejected": len(errors), "results": results},
            status_code=202 if valid else 422,
        )

    @app.get("/v1/messages/{message_id}", tags=["messages"])
    async def get_message(message_id: str, _: ApiKey = Depends(api_key)) -> Response:
        return ORJSONResponse(message_view(await store.get(message_id), full=True))

    @app.get("/v1/messages", tags=["messages"])
    async def list_messages(
        _: ApiKey = Depends(api_key),
        status: Status | None = Query(None),
        tag: str | None = Query(None, max_length=64),
        to: str | None = Query(None, max_length=320),
        since: str | None = Query(None, description="ISO 8601 time"),
        until: str | None = Query(None, description="ISO 8601 time"),
        limit: int = Query(50, ge=1, le=1000),
        cursor: str | None = Query(None, max_length=64),
    ) -> Response:
        from postroom.domain.validate import _send_at as parse_time

        page = await store.list_messages(
            MessageFilter(
                status=status,
                tag=tag,
                to=to,
                since=parse_time(since, "since"),
                until=parse_time(until, "until"),
                limit=limit,
                cursor=cursor,
            )
        )
        return ORJSONResponse(
            {"items": [message_view(r) for r in page.items], "next_cursor": page.next_cursor}
        )

    @app.post("/v1/messages/{message_id}/cancel", tags=["messages"])
    async def cancel(message_id: str, _: ApiKey = Depends(api_key)) -> Response:
        return ORJSONResponse(message_view(await store.cancel(message_id), full=True))

    @app.post("/v1/messages/{message_id}/retry", tags=["messages"], summary="Retry a failed or retrying message now")
    async def retry(message_id: str, _: ApiKey = Depends(api_key)) -> Response:
        return ORJSONResponse(message_view(await store.retry_now(message_id), full=True))

    @app.get(
        "/v1/providers",
        tags=["routing"],
        summary="Providers in order of preference: breaker state, recent counts, rate-limit use",
    )
    async def providers(_: ApiKey = Depends(api_key)) -> Response:
        return ORJSONResponse({"items": await routing_view.providers()})

    @app.get(
        "/v1/domains",
        tags=["routing"],
        summary="Recipient domains: configured limits and adaptive throttles (slowed, paused)",
    )
    async def domains(_: ApiKey = Depends(api_key)) -> Response:
        return ORJSONResponse({"items": await routing_view.domains()})

    @app.get("/v1/stats", tags=["stats"])
    async def stats(_: ApiKey = Depends(api_key)) -> Response:
        return ORJSONResponse(await store.stats())

    @app.get("/v1/workers", tags=["workers"], summary="Running worker processes (the registry)")
    async def workers(_: ApiKey = Depends(api_key)) -> Response:
        from postroom.api.views import iso

        now = time.time()
        stale_s = settings.worker.stale_after_s
        return ORJSONResponse(
            {
                "items": [
                    {
                        "name": w.name,
                        "host": w.host,
                        "pid": w.pid,
                        "started_at": iso(w.started_at),
                        "last_heartbeat_at": iso(w.heartbeat_at),
                        "alive": now - w.heartbeat_at < stale_s,
                        "concurrency": w.concurrency,
                        "in_flight": w.in_flight,
                        "sent": w.sent,
                        "failed": w.failed,
                    }
                    for w in await store.list_workers()
                ]
            }
        )

    @app.get("/v1/inbox", tags=["inbox"], summary="Messages delivered by the capture provider")
    async def inbox(
        _: ApiKey = Depends(api_key),
        limit: int = Query(50, ge=1, le=500),
        before: str | None = Query(None, max_length=64),
    ) -> Response:
        items = await store.inbox(limit=limit, before=before)
        return ORJSONResponse({"items": [captured_view(m) for m in items]})

    @app.get("/v1/inbox/{capture_id}", tags=["inbox"])
    async def inbox_item(capture_id: str, _: ApiKey = Depends(api_key)) -> Response:
        return ORJSONResponse(captured_view(await store.inbox_get(capture_id), full=True))

    @app.get("/v1/inbox/{capture_id}/raw", tags=["inbox"], response_class=Response)
    async def inbox_raw(capture_id: str, _: ApiKey = Depends(api_key)) -> Response:
        m = await store.inbox_get(capture_id)
        return Response(m.mime, media_type="message/rfc822")

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (MessageIn, BatchIn):
            s = model.model_json_schema(ref_template="#/components/schemas/{model}", by_alias=True)
            comps.update(s.pop("$defs", {}))
            comps[model.__name__] = s
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearer": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(FastPath, path="/v1/messages", method="POST", handler=fast_ingest)

    from postroom.web import mount  # the dashboard, beside the API

    mount(app, settings, store)
    return app
