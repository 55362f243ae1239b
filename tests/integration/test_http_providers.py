"""HTTP API providers against a local server that speaks each API's documented shapes.

The server records every request exactly as it arrived (headers, JSON or multipart form) and
answers with what the test scripts: the documented success body, error answers, 429 with
Retry-After, or a hang."""

from __future__ import annotations

import asyncio
import base64
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from postroom.domain.errors import PermanentError, ProviderFault, TransientError
from postroom.domain.model import Address, Attachment, Content, Outgoing
from postroom.providers.http import (
    HTTPProvider,
    MailgunProvider,
    PostmarkProvider,
    ResendProvider,
    SendGridProvider,
)

PDF = b"%PDF-1.4 fake pdf \x00\xff bytes"
PNG = b"\x89PNG\r\n\x1a\n fake png"


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    json: Any = None
    form: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, list[tuple[str, str, bytes]]] = field(default_factory=dict)
    client_port: int = 0


@dataclass
class Reply:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


class FakeAPIs:
    """SendGrid, Mailgun, Postmark and Resend on one local server (their paths do not clash)."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.replies: list[Reply] = []  # scripted answers, first in first out; then the default
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        routes = [
            Route("/v3/mail/send", self._handle, methods=["POST"]),
            Route("/v3/{domain}/messages", self._handle, methods=["POST"]),
            Route("/email", self._handle, methods=["POST"]),
            Route("/emails", self._handle, methods=["POST"]),
        ]
        self.app = Starlette(routes=routes)
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="off",
            ws="none",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the fake API server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    async def _handle(self, request: Request) -> Response:
        seen = Seen(
            request.method,
            request.url.path,
            {k.lower(): v for k, v in request.headers.items()},
            client_port=request.client.port if request.client else 0,
        )
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("application/json"):
            seen.json = await request.json()
        else:
            async with request.form() as form:
                for key, value in form.multi_items():
                    if isinstance(value, str):
                        seen.form.setdefault(key, []).append(value)
                    else:
                        data = await value.read()
                        seen.files.setdefault(key, []).append(
                            (value.filename or "", value.content_type or "", data)
                        )
        self.seen.append(seen)
        reply = self.replies.pop(0) if self.replies else self.default(request.url.path)
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.body is None:
            return Response(status_code=reply.status, headers=reply.headers)
        return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)

    @staticmethod
    def default(path: str) -> Reply:
        """Each API's documented success answer."""
        if path == "/v3/mail/send":
            return Reply(202, None, {"X-Message-Id": "sg-abc123"})
        if path.endswith("/messages"):
            return Reply(
                200, {"id": "<20240101.1@mg.example.com>", "message": "Queued. Thank you."}
            )
        if path == "/email":
            return Reply(
                200,
                {
                    "To": "a@example.com",
                    "SubmittedAt": "2024-01-01T00:00:00Z",
                    "MessageID": "0a129aee-e1cd-480d-b08d-4f48548ff48d",
                    "ErrorCode": 0,
                    "Message": "OK",
                },
            )
        return Reply(200, {"id": "49a3999c-0ce1-4ea6-ab68-afcd6dc2e794"})


@pytest.fixture(scope="module")
def apis() -> Iterator[FakeAPIs]:
    server = FakeAPIs()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def api(apis: FakeAPIs) -> FakeAPIs:
    apis.seen.clear()
    apis.replies.clear()
    return apis


def message() -> Outgoing:
    content = Content(
        sender=Address("app@example.com", "The App"),
        to=[Address("ann@example.org", "Ann"), Address("bob@example.org")],
        cc=[Address("cc@example.org")],
        bcc=[Address("bcc@example.org")],
        reply_to=[Address("help@example.com")],
        subject="Your invoice",
        message_id="<m1@example.com>",
        text="See attached.",
        html='<p>See attached. <img src="cid:logo1"></p>',
        headers={"X-Campaign": "c1"},
        attachments=[
            Attachment("invoice.pdf", "application/pdf", PDF),
            Attachment("logo.png", "image/png", PNG, content_id="logo1"),
        ],
        tags=["invoice"],
    )
    return Outgoing("01HMSG", content, b"")


@pytest.fixture
async def providers(api: FakeAPIs) -> AsyncIterator[dict[str, HTTPProvider]]:
    made: dict[str, HTTPProvider] = {
        "sendgrid": SendGridProvider("sg", api_key="SG.key", base_url=api.url, timeout_s=2),
        "mailgun": MailgunProvider(
            "mg", api_key="mg-key", domain="mg.example.com", base_url=api.url, timeout_s=2
        ),
        "postmark": PostmarkProvider(
            "pm", api_key="pm-token", base_url=api.url, timeout_s=2, message_stream="outbound"
        ),
        "resend": ResendProvider("rs", api_key="re_key", base_url=api.url, timeout_s=2),
    }
    try:
        yield made
    finally:
        for p in made.values():
            await p.close()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- the exact requests -----------------------------------------------------------------------


async def test_sendgrid_request_and_message_id(
    api: FakeAPIs, providers: dict[str, HTTPProvider]
) -> None:
    receipt = await providers["sendgrid"].send(message())
    assert (receipt.provider, receipt.code, receipt.provider_message_id) == ("sg", 202, "sg-abc123")
    seen = api.seen[0]
    assert seen.path == "/v3/mail/send"
    assert seen.headers["authorization"] == "Bearer SG.key"
    assert seen.headers["content-type"] == "application/json"
    assert seen.json == {
        "personalizations": [
            {
                "to": [{"email": "ann@example.org", "name": "Ann"}, {"email": "bob@example.org"}],
                "cc": [{"email": "cc@example.org"}],
                "bcc": [{"email": "bcc@example.org"}],
            }
        ],
        "from": {"email": "app@example.com", "name": "The App"},
        "reply_to_list": [{"email": "help@example.com"}],
        "subject": "Your invoice",
        "content": [
            {"type": "text/plain", "value": "See attached."},
            {"type": "text/html", "value": '<p>See attached. <img src="cid:logo1"></p>'},
        ],
        "headers": {"X-Campaign": "c1"},
        "categories": ["invoice"],
        "custom_args": {"postroom_id": "01HMSG"},
        "attachments": [
            {
                "content": b64(PDF),
                "type": "application/pdf",
                "filename": "invoice.pdf",
                "disposition": "attachment",
            },
            {
                "content": b64(PNG),
                "type": "image/png",
                "filename": "logo.png",
                "disposition": "inline",
                "content_id": "logo1",
            },
        ],
    }


async def test_mailgun_request_and_message_id(
    api: FakeAPIs, providers: dict[str, HTTPProvider]
) -> None:
    receipt = await providers["mailgun"].send(message())
    assert receipt.provider_message_id == "<20240101.1@mg.example.com>"
    seen = api.seen[0]
    assert seen.path == "/v3/mg.example.com/messages"
    assert seen.headers["authorization"] == "Basic " + b64(b"api:mg-key")
    assert seen.headers["content-type"].startswith("multipart/form-data")
    assert seen.form == {
        "from": ["The App <app@example.com>"],
        "to": ["Ann <ann@example.org>", "bob@example.org"],
        "cc": ["cc@example.org"],
        "bcc": ["bcc@example.org"],
        "subject": ["Your invoice"],
        "text": ["See attached."],
        "html": ['<p>See attached. <img src="cid:logo1"></p>'],
        "h:Message-Id": ["<m1@example.com>"],
        "h:Reply-To": ["help@example.com"],
        "h:X-Campaign": ["c1"],
        "o:tag": ["invoice"],
        "v:postroom_id": ["01HMSG"],
    }
    assert seen.files == {
        "attachment": [("invoice.pdf", "application/pdf", PDF)],
        "inline": [("logo1", "image/png", PNG)],
    }


async def test_postmark_request_and_message_id(
    api: FakeAPIs, providers: dict[str, HTTPProvider]
) -> None:
    receipt = await providers["postmark"].send(message())
    assert receipt.provider_message_id == "0a129aee-e1cd-480d-b08d-4f48548ff48d"
    seen = api.seen[0]
    assert seen.path == "/email"
    assert seen.headers["x-postmark-server-token"] == "pm-token"
    assert seen.headers["accept"] == "application/json"
    assert "authorization" not in seen.headers
    assert seen.json == {
        "From": "The App <app@example.com>",
        "To": "Ann <ann@example.org>, bob@example.org",
        "Cc": "cc@example.org",
        "Bcc": "bcc@example.org",
        "ReplyTo": "help@example.com",
        "Subject": "Your invoice",
        "TextBody": "See attached.",
        "HtmlBody": '<p>See attached. <img src="cid:logo1"></p>',
        "Tag": "invoice",
        "MessageStream": "outbound",
        "Headers": [
            {"Name": "Message-ID", "Value": "<m1@example.com>"},
            {"Name": "X-Campaign", "Value": "c1"},
        ],
        "Metadata": {"postroom_id": "01HMSG"},
        "Attachments": [
            {"Name": "invoice.pdf", "Content": b64(PDF), "ContentType": "application/pdf"},
            {
                "Name": "logo.png",
                "Content": b64(PNG),
                "ContentType": "image/png",
                "ContentID": "cid:logo1",
            },
        ],
    }


async def test_resend_request_message_id_and_idempotency_key(
    api: FakeAPIs, providers: dict[str, HTTPProvider]
) -> None:
    receipt = await providers["resend"].send(message())
    assert receipt.provider_message_id == "49a3999c-0ce1-4ea6-ab68-afcd6dc2e794"
    seen = api.seen[0]
    assert seen.path == "/emails"
    assert seen.headers["authorization"] == "Bearer re_key"
    assert seen.headers["idempotency-key"] == "postroom-01HMSG"
    assert seen.json == {
        "from": "The App <app@example.com>",
        "to": ["Ann <ann@example.org>", "bob@example.org"],
        "cc": ["cc@example.org"],
        "bcc": ["bcc@example.org"],
        "reply_to": ["help@example.com"],
        "subject": "Your invoice",
        "text": "See attached.",
        "html": '<p>See attached. <img src="cid:logo1"></p>',
        "headers": {"Message-ID": "<m1@example.com>", "X-Campaign": "c1"},
        "tags": [{"name": "invoice", "value": "true"}],
        "attachments": [
            {"filename": "invoice.pdf", "content": b64(PDF), "content_type": "application/pdf"},
            {
                "filename": "logo.png",
                "content": b64(PNG),
                "content_type": "image/png",
                "content_id": "logo1",
            },
        ],
    }


@pytest.mark.parametrize("kind", ["sendgrid", "mailgun", "postmark", "resend"])
async def test_connections_are_reused_between_sends(
    kind: str, api: FakeAPIs, providers: dict[str, HTTPProvider]
) -> None:
    for _ in range(3):
        await providers[kind].send(message())
    assert len({s.client_port for s in api.seen}) == 1


# -- the documented error answers ------------------------------------------------------------

ERRORS: dict[str, dict[str, Any]] = {
    "sendgrid": {
        "bad": Reply(
            400,
            {"errors": [{"field": "from.email", "message": "does not contain a valid address"}]},
        ),
        "auth": Reply(
            401,
            {"errors": [{"field": None, "message": "The provided authorization grant is invalid"}]},
        ),
        "big": Reply(413, {"errors": [{"message": "payload too large"}]}),
    },
    "mailgun": {
        "bad": Reply(400, {"message": "to parameter is not a valid address"}),
        "auth": Reply(401, None),
        "big": Reply(413, {"message": "request entity too large"}),
    },
    "postmark": {
        "bad": Reply(422, {"ErrorCode": 300, "Message": "Invalid 'To' address: 'nope'."}),
        "auth": Reply(
            401, {"ErrorCode": 10, "Message": "No Account or Server API tokens were supplied"}
        ),
        "big": Reply(413, None),
    },
    "resend": {
        "bad": Reply(
            422, {"statusCode": 422, "name": "validation_error", "message": "Invalid `to` field."}
        ),
        "auth": Reply(
            403, {"statusCode": 403, "name": "invalid_api_key", "message": "API key is invalid"}
        ),
        "big": Reply(413, None),
    },
}


@pytest.mark.parametrize("kind", ["sendgrid", "mailgun", "postmark", "resend"])
async def test_a_refused_request_is_permanent_with_the_apis_own_words(
    kind: str, api: FakeAPIs, providers: dict[str, HTTPProvider]
) -> None:
    api.replies.append(ERRORS[kind]["bad"])
    with pytest.raises(PermanentError) as info:
        await providers[kind].send(message())
    assert info.value.code in (400, 422)
    assert any(w in info.value.text for w in ("valid", "Invalid"))
    api.replies.append(ERRORS[kind]["big"])
    with pytest.raises(PermanentError) as big:
        await providers[kind].send(message())
    assert big.value.code == 413


@pytest.mark.parametrize("kind", ["sendgrid", "mailgun", "postmark", "resend"])
async def test_bad_credentials_are_a_provider_fault(
    kind: str, api: FakeAPIs, providers: dict[str, HTTPProvider]
) -> None:
    api.replies.append(ERRORS[kind]["auth"])
    with pytest.raises(ProviderFault) as info:
        await providers[kind].send(message())
    assert info.value.code in (401, 403)
    assert info.value.provider == providers[kind].name


@pytest.mark.parametrize("kind", ["sendgrid", "mailgun", "postmark", "resend"])
@pytest.mark.parametrize("status", [500, 502, 503])
async def test_server_errors_are_provider_faults(
    kind: str, status: int, api: FakeAPIs, providers: dict[str, HTTPProvider]
) -> None:
    api.replies.append(Reply(status, {"message": "internal error"}))
    with pytest.raises(ProviderFault) as info:
        await providers[kind].send(message())
    assert info.value.code == status


@pytest.mark.parametrize("kind", ["sendgrid", "mailgun", "postmark", "resend"])
async def test_429_is_a_fault_that_carries_retry_after(
    kind: str, api: FakeAPIs, providers: dict[str, HTTPProvider]
) -> None:
    api.replies.append(Reply(429, {"message": "Too many requests"}, {"Retry-After": "17"}))
    with pytest.raises(ProviderFault) as info:
        await providers[kind].send(message())
    assert info.value.code == 429 and info.value.retry_after_s == 17


async def test_sendgrid_429_without_retry_after_uses_its_ratelimit_reset(
    api: FakeAPIs, providers: dict[str, HTTPProvider]
) -> None:
    reset = int(time.time()) + 30
    api.replies.append(
        Reply(429, {"errors": [{"message": "too many"}]}, {"X-RateLimit-Reset": str(reset)})
    )
    with pytest.raises(ProviderFault) as info:
        await providers["sendgrid"].send(message())
    assert 25 <= (info.value.retry_after_s or 0) <= 31


async def test_retry_after_as_an_http_date(
    api: FakeAPIs, providers: dict[str, HTTPProvider]
) -> None:
    from email.utils import formatdate

    api.replies.append(
        Reply(429, {"message": "slow"}, {"Retry-After": formatdate(time.time() + 60, usegmt=True)})
    )
    with pytest.raises(ProviderFault) as info:
        await providers["resend"].send(message())
    assert 55 <= (info.value.retry_after_s or 0) <= 61


@pytest.mark.parametrize(
    ("error_code", "expected"),
    [
        (406, PermanentError),
        (300, PermanentError),
        (405, ProviderFault),
        (412, ProviderFault),
        (10, ProviderFault),
    ],
)
async def test_postmark_error_codes_say_whether_the_account_or_the_message_is_at_fault(
    error_code: int, expected: type[Exception], api: FakeAPIs, providers: dict[str, HTTPProvider]
) -> None:
    api.replies.append(Reply(422, {"ErrorCode": error_code, "Message": "documented error"}))
    with pytest.raises(expected) as info:
        await providers["postmark"].send(message())
    assert f"ErrorCode {error_code}" in str(info.value)


async def test_resend_concurrent_idempotent_request_is_transient(
    api: FakeAPIs, providers: dict[str, HTTPProvider]
) -> None:
    api.replies.append(
        Reply(409, {"statusCode": 409, "name": "concurrent_idempotent_requests", "message": "busy"})
    )
    with pytest.raises(TransientError) as info:
        await providers["resend"].send(message())
    assert not isinstance(info.value, ProviderFault)


async def test_a_hung_api_times_out_as_a_provider_fault(api: FakeAPIs) -> None:
    provider = ResendProvider("rs", api_key="k", base_url=api.url, timeout_s=0.3)
    api.replies.append(Reply(200, {"id": "late"}, delay_s=2))
    t0 = time.monotonic()
    with pytest.raises(ProviderFault, match="timed out"):
        await provider.send(message())
    assert time.monotonic() - t0 < 1.5
    await provider.close()


async def test_connection_refused_is_a_provider_fault() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    provider = SendGridProvider("sg", api_key="k", base_url=f"http://127.0.0.1:{port}", timeout_s=1)
    with pytest.raises(ProviderFault, match="ConnectError"):
        await provider.send(message())
    await provider.close()
