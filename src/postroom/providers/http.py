"""HTTP API providers: SendGrid v3, Mailgun, Postmark, Resend (one pooled httpx client each).

Classification (each API's documented answers -> Postroom errors):

* 2xx -> sent, keeping the provider's message id (SendGrid: the X-Message-Id header; Mailgun
  `id`; Postmark `MessageID`; Resend `id`);
* 429 -> ProviderFault with `retry_after_s` from Retry-After (or SendGrid's X-RateLimit-Reset):
  the router pauses the provider for that long and fails over meanwhile;
* 401 / 403 (bad key, blocked account), 404 (wrong base URL or Mailgun domain), 5xx, connection
  errors and timeouts -> ProviderFault: the provider is unusable, another one may take the message;
* 413 and other 4xx (the request itself is refused: bad address, bad field) -> PermanentError,
  except where the API says the *account* cannot send (Postmark ErrorCode 10, 100, 400, 401, 405,
  412, 413) -> ProviderFault, and Postmark 406 (inactive recipient) -> PermanentError;
* 408 / 409 (Resend: a concurrent request with the same idempotency key) -> TransientError.

`base_url` is configurable (EU regions, and tests pointing at a local server).
"""

from __future__ import annotations

import base64
import email.utils
import re
import time
from typing import Any

import httpx
import orjson

from postroom import __version__
from postroom.domain.errors import PermanentError, ProviderError, ProviderFault, TransientError
from postroom.domain.model import Address, Attachment, Outgoing, Receipt

__all__ = [
    "HTTPProvider",
    "MailgunProvider",
    "PostmarkProvider",
    "ResendProvider",
    "SendGridProvider",
    "retry_after_s",
]


def retry_after_s(headers: httpx.Headers, now: float | None = None) -> float | None:
    """Seconds to wait from Retry-After (seconds or an HTTP date) or X-RateLimit-Reset (epoch)."""
    now = time.time() if now is None else now
    raw = headers.get("retry-after")
    if raw:
        raw = raw.strip()
        try:
            return max(0.0, float(raw))
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(raw)
            except (TypeError, ValueError):
                return None
            return max(0.0, when.timestamp() - now)
    reset = headers.get("x-ratelimit-reset")
    if reset:
        try:
            value = float(reset)
        except ValueError:
            return None
        return max(0.0, value - now) if value > 1e9 else value  # epoch, or seconds
    return None


_TAG_CHARS = re.compile(r"[^A-Za-z0-9_-]")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class HTTPProvider:
    """The shared part: one `httpx.AsyncClient` (connection reuse, HTTP keep-alive, timeouts on
    every step), request building and answer classification per API in the subclasses."""

    kind = "http"
    uses_mime = False  # the router need not build MIME for it
    default_base_url = ""

    def __init__(
        self,
        name: str,
        *,
        api_key: str,
        base_url: str | None = None,
        timeout_s: float = 30.0,
        pool_size: int = 16,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not api_key:
            raise ValueError(f"{self.kind} provider {name!r} needs an api_key")
        self.name = name
        self.api_key = api_key
        self.base_url = (base_url or self.default_base_url).rstrip("/")
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=pool_size, max_keepalive_connections=pool_size),
            headers={"User-Agent": f"postroom/{__version__}", **self.auth_headers()},
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, base_url={self.base_url!r})"

    # -- per API ------------------------------------------------------------------------------
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def request(self, message: Outgoing) -> tuple[str, dict[str, Any]]:
        """The path and the keyword arguments of `httpx.AsyncClient.post`."""
        raise NotImplementedError

    def message_id(self, response: httpx.Response) -> str | None:
        return None

    def error_text(self, response: httpx.Response) -> str:
        try:
            data = response.json()
        except ValueError:
            return response.text[:300] or response.reason_phrase
        if isinstance(data, dict):
            for k in ("message", "Message", "error"):
                if isinstance(data.get(k), str):
                    return str(data[k])
        return str(data)[:300]

    def classify(self, response: httpx.Response) -> ProviderError:
        status = response.status_code
        text = self.error_text(response)
        where = f"{self.kind} answered {status}: {text}"
        if status == 429:
            return ProviderFault(
                where,
                code=status,
                retry_after_s=retry_after_s(response.headers),
                provider=self.name,
            )
        if status in (401, 403, 404) or status >= 500:
            return ProviderFault(where, code=status, provider=self.name)
        if status in (408, 409):
            return TransientError(where, code=status, provider=self.name)
        if 400 <= status < 500:
            return PermanentError(where, code=status, provider=self.name)
        return TransientError(
            f"{self.kind}: unexpected answer {status}: {text}", code=status, provider=self.name
        )

    # -- the Provider protocol ----------------------------------------------------------------
    async def send(self, message: Outgoing) -> Receipt:
        path, kwargs = self.request(message)
        try:
            response = await self._client.post(path, **kwargs)
        except httpx.TimeoutException as e:
            raise ProviderFault(
                f"{self.base_url}: timed out ({type(e).__name__})", provider=self.name
            ) from e
        except httpx.HTTPError as e:
            raise ProviderFault(
                f"{self.base_url}: {type(e).__name__}: {e}", provider=self.name
            ) from e
        if 200 <= response.status_code < 300:
            return Receipt(
                self.name,
                response.status_code,
                response.reason_phrase or "accepted",
                self.message_id(response),
            )
        raise self.classify(response)

    async def close(self) -> None:
        await self._client.aclose()


def _json(body: dict[str, Any]) -> dict[str, Any]:
    return {"content": orjson.dumps(body), "headers": {"Content-Type": "application/json"}}


class SendGridProvider(HTTPProvider):
    """SendGrid v3: POST /v3/mail/send (202, X-Message-Id)."""

    kind = "sendgrid"
    default_base_url = "https://api.sendgrid.com"

    @staticmethod
    def _addr(a: Address) -> dict[str, str]:
        return {"email": a.email, "name": a.name} if a.name else {"email": a.email}

    def request(self, message: Outgoing) -> tuple[str, dict[str, Any]]:
        c = message.content
        person: dict[str, Any] = {"to": [self._addr(a) for a in c.to]}
        if c.cc:
            person["cc"] = [self._addr(a) for a in c.cc]
        if c.bcc:
            person["bcc"] = [self._addr(a) for a in c.bcc]
        body: dict[str, Any] = {
            "personalizations": [person],
            "from": self._addr(c.sender),
            "subject": c.subject,
            "content": [
                {"type": t, "value": v}
                for t, v in (("text/plain", c.text), ("text/html", c.html))
                if v is not None
            ],
            "custom_args": {"postroom_id": message.id},
        }
        if c.reply_to:
            body["reply_to_list"] = [self._addr(a) for a in c.reply_to]
        if c.headers:
            body["headers"] = dict(c.headers)
        if c.tags:
            body["categories"] = list(c.tags)
        if c.attachments:
            body["attachments"] = [self._attachment(a) for a in c.attachments]
        return "/v3/mail/send", _json(body)

    @staticmethod
    def _attachment(a: Attachment) -> dict[str, str]:
        d = {"content": _b64(a.content), "type": a.content_type, "filename": a.filename}
        if a.content_id:
            d["disposition"] = "inline"
            d["content_id"] = a.content_id
        else:
            d["disposition"] = "attachment"
        return d

    def message_id(self, response: httpx.Response) -> str | None:
        mid: str | None = response.headers.get("x-message-id")
        return mid

    def error_text(self, response: httpx.Response) -> str:
        try:
            errors = response.json().get("errors")
            return "; ".join(
                f"{e.get('field')}: {e.get('message')}" if e.get("field") else str(e.get("message"))
                for e in errors
            )
        except (ValueError, AttributeError, TypeError):
            return super().error_text(response)


class MailgunProvider(HTTPProvider):
    """Mailgun: POST /v3/{domain}/messages as multipart/form-data, HTTP Basic auth api:KEY."""

    kind = "mailgun"
    default_base_url = "https://api.mailgun.net"

    def __init__(self, name: str, *, domain: str, **kwargs: Any) -> None:
        if not domain:
            raise ValueError(f"mailgun provider {name!r} needs the sending domain")
        self.domain = domain
        super().__init__(name, **kwargs)

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": "Basic " + _b64(f"api:{self.api_key}".encode())}

    def request(self, message: Outgoing) -> tuple[str, dict[str, Any]]:
        c = message.content
        data: dict[str, Any] = {
            "from": str(c.sender),
            "to": [str(a) for a in c.to],
            "subject": c.subject,
            "h:Message-Id": c.message_id,
            "v:postroom_id": message.id,
        }
        if c.cc:
            data["cc"] = [str(a) for a in c.cc]
        if c.bcc:
            data["bcc"] = [str(a) for a in c.bcc]
        if c.text is not None:
            data["text"] = c.text
        if c.html is not None:
            data["html"] = c.html
        if c.reply_to:
            data["h:Reply-To"] = ", ".join(str(a) for a in c.reply_to)
        for k, v in c.headers.items():
            data[f"h:{k}"] = v
        if c.tags:
            data["o:tag"] = list(c.tags)
        files = [
            (
                "inline" if a.content_id else "attachment",
                (a.content_id or a.filename, a.content, a.content_type),
            )
            for a in c.attachments
        ]
        path = f"/v3/{self.domain}/messages"
        # with attachments httpx sends multipart/form-data, without them urlencoded: Mailgun takes both
        return path, {"data": data, "files": files} if files else {"data": data}

    def message_id(self, response: httpx.Response) -> str | None:
        try:
            mid = response.json().get("id")
        except (ValueError, AttributeError):
            return None
        return str(mid) if mid else None


class PostmarkProvider(HTTPProvider):
    """Postmark: POST /email with X-Postmark-Server-Token (200, MessageID; 422 with ErrorCode)."""

    kind = "postmark"
    default_base_url = "https://api.postmarkapp.com"
    # ErrorCodes that mean the account or server cannot send at all: another provider may.
    ACCOUNT_CODES = frozenset({10, 100, 400, 401, 405, 412, 413})

    def __init__(self, name: str, *, message_stream: str | None = None, **kwargs: Any) -> None:
        self.message_stream = message_stream
        super().__init__(name, **kwargs)

    def auth_headers(self) -> dict[str, str]:
        return {"X-Postmark-Server-Token": self.api_key, "Accept": "application/json"}

    def request(self, message: Outgoing) -> tuple[str, dict[str, Any]]:
        c = message.content
        body: dict[str, Any] = {
            "From": str(c.sender),
            "To": ", ".join(str(a) for a in c.to),
            "Subject": c.subject,
            "Headers": [{"Name": "Message-ID", "Value": c.message_id}]
            + [{"Name": k, "Value": v} for k, v in c.headers.items()],
            "Metadata": {"postroom_id": message.id},
        }
        if c.cc:
            body["Cc"] = ", ".join(str(a) for a in c.cc)
        if c.bcc:
            body["Bcc"] = ", ".join(str(a) for a in c.bcc)
        if c.reply_to:
            body["ReplyTo"] = ", ".join(str(a) for a in c.reply_to)
        if c.text is not None:
            body["TextBody"] = c.text
        if c.html is not None:
            body["HtmlBody"] = c.html
        if c.tags:
            body["Tag"] = c.tags[0]  # Postmark takes one tag per message
        if self.message_stream:
            body["MessageStream"] = self.message_stream
        if c.attachments:
            body["Attachments"] = [
                {
                    "Name": a.filename,
                    "Content": _b64(a.content),
                    "ContentType": a.content_type,
                    **({"ContentID": f"cid:{a.content_id}"} if a.content_id else {}),
                }
                for a in c.attachments
            ]
        return "/email", _json(body)

    def message_id(self, response: httpx.Response) -> str | None:
        try:
            mid = response.json().get("MessageID")
        except (ValueError, AttributeError):
            return None
        return str(mid) if mid else None

    def classify(self, response: httpx.Response) -> ProviderError:
        if response.status_code == 422:
            try:
                data = response.json()
                code = int(data.get("ErrorCode", 0))
                text = f"postmark ErrorCode {code}: {data.get('Message', '')}"
            except (ValueError, AttributeError, TypeError):
                return super().classify(response)
            if code in self.ACCOUNT_CODES:
                return ProviderFault(text, code=422, provider=self.name)
            if code == 429:
                return ProviderFault(
                    text,
                    code=429,
                    retry_after_s=retry_after_s(response.headers),
                    provider=self.name,
                )
            return PermanentError(text, code=422, provider=self.name)
        return super().classify(response)


class ResendProvider(HTTPProvider):
    """Resend: POST /emails, Bearer key (200, id). Our message id is the Idempotency-Key, so a
    retry after a lost answer does not send twice (Resend keeps keys for 24 hours)."""

    kind = "resend"
    default_base_url = "https://api.resend.com"

    def request(self, message: Outgoing) -> tuple[str, dict[str, Any]]:
        c = message.content
        body: dict[str, Any] = {
            "from": str(c.sender),
            "to": [str(a) for a in c.to],
            "subject": c.subject,
            "headers": {"Message-ID": c.message_id, **c.headers},
        }
        if c.cc:
            body["cc"] = [str(a) for a in c.cc]
        if c.bcc:
            body["bcc"] = [str(a) for a in c.bcc]
        if c.reply_to:
            body["reply_to"] = [str(a) for a in c.reply_to]
        if c.text is not None:
            body["text"] = c.text
        if c.html is not None:
            body["html"] = c.html
        if c.tags:
            # Resend tags are name/value pairs of ASCII letters, digits, _ and -
            body["tags"] = [{"name": _TAG_CHARS.sub("_", t)[:256], "value": "true"} for t in c.tags]
        if c.attachments:
            body["attachments"] = [
                {
                    "filename": a.filename,
                    "content": _b64(a.content),
                    "content_type": a.content_type,
                    **({"content_id": a.content_id} if a.content_id else {}),
                }
                for a in c.attachments
            ]
        kwargs = _json(body)
        kwargs["headers"]["Idempotency-Key"] = f"postroom-{message.id}"
        return "/emails", kwargs

    def message_id(self, response: httpx.Response) -> str | None:
        try:
            mid = response.json().get("id")
        except (ValueError, AttributeError):
            return None
        return str(mid) if mid else None
