"""Dashboard access: login with an admin API key or the dashboard password, signed session
cookies, CSRF tokens.

A session is a cookie holding ``base64(json).base64(hmac-sha256)``; nothing is stored on the
server, so any number of API processes that share `secret_key` accept each other's sessions.
Each session carries its own CSRF token, which every form posts back (the synchronizer-token
pattern); the login form, which comes before any session, uses a double-submit cookie instead.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import orjson
from starlette.requests import Request
from starlette.responses import Response

from postroom.domain.ports import ApiKey, Store

__all__ = ["LOGIN_CSRF_COOKIE", "SESSION_COOKIE", "Auth", "Session", "Signer"]

log = logging.getLogger(__name__)

SESSION_COOKIE = "postroom_session"
LOGIN_CSRF_COOKIE = "postroom_login_csrf"


class Signer:
    """HMAC-SHA256 signed, timestamped JSON tokens (what itsdangerous does, in thirty lines)."""

    def __init__(self, secret: bytes, *, purpose: str) -> None:
        # One derived key per purpose, so a token made for one use is never valid for another.
        self._key = hmac.new(secret, purpose.encode(), hashlib.sha256).digest()

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()

    def sign(self, payload: dict[str, Any]) -> str:
        body = base64.urlsafe_b64encode(orjson.dumps({**payload, "iat": time.time()})).rstrip(b"=")
        mac = base64.urlsafe_b64encode(self._mac(body)).rstrip(b"=")
        return f"{body.decode()}.{mac.decode()}"

    def unsign(self, token: str, *, max_age_s: float) -> dict[str, Any] | None:
        body, _, mac = token.encode("ascii", "replace").partition(b".")
        try:
            given = base64.urlsafe_b64decode(mac + b"=" * (-len(mac) % 4))
            if not hmac.compare_digest(given, self._mac(body)):
                return None
            payload = orjson.loads(base64.urlsafe_b64decode(body + b"=" * (-len(body) % 4)))
        except (binascii.Error, ValueError):
            return None
        if not isinstance(payload, dict):
            return None
        iat = payload.get("iat")
        if not isinstance(iat, (int, float)) or not (0 <= time.time() - iat <= max_age_s):
            return None
        return payload


@dataclass(frozen=True, slots=True)
class Session:
    who: str  # "password", or "key:<api key id>"
    name: str  # shown in the page header
    csrf: str


class Auth:
    """Checks logins, issues and reads session cookies, and checks CSRF tokens."""

    SESSION_TTL_S = 12 * 3600.0
    KEYS_TTL_S = 5.0  # how long the list of active admin keys is trusted (revocation delay)

    def __init__(self, store: Store, *, password: str | None, secret_key: str | None) -> None:
        self.store = store
        self.password = password
        if secret_key:
            secret = secret_key.encode()
        else:
            # In memory only: sessions end when the process restarts and are not shared between
            # API processes. Set `secret_key` (POSTROOM_SECRET_KEY) to keep them.
            secret = secrets.token_bytes(32)
            log.info(
                "dashboard: no secret_key set; sessions last until this process stops "
                "(set POSTROOM_SECRET_KEY to keep them across restarts and processes)"
            )
        self.sessions = Signer(secret, purpose="postroom.web.session")
        self._active_keys: tuple[float, frozenset[str]] = (0.0, frozenset())

    # -- login ----------------------------------------------------------------------------
    async def login(self, secret: str) -> Session | None:
        """A session for an admin API key or the dashboard password; None if neither matches."""
        secret = secret.strip()
        if not secret:
            return None
        if self.password and hmac.compare_digest(secret.encode(), self.password.encode()):
            return Session("password", "admin", secrets.token_urlsafe(24))
        key = await self.store.verify_key(secret)
        if key is None or key.revoked or key.role != "admin":
            return None
        return Session(f"key:{key.id}", key.name, secrets.token_urlsafe(24))

    def set_cookie(self, response: Response, request: Request, session: Session) -> None:
        token = self.sessions.sign({"who": session.who, "name": session.name, "csrf": session.csrf})
        response.set_cookie(
            SESSION_COOKIE,
            token,
            max_age=int(self.SESSION_TTL_S),
            httponly=True,
            samesite="lax",
            secure=request.url.scheme == "https",
            path="/",
        )

    @staticmethod
    def clear_cookie(response: Response) -> None:
        response.delete_cookie(SESSION_COOKIE, path="/")

    # -- every request --------------------------------------------------------------------
    async def session(self, request: Request) -> Session | None:
        """The request's session, if its cookie is genuine, fresh, and its key still active."""
        token = request.cookies.get(SESSION_COOKIE)
        if not token:
            return None
        p = self.sessions.unsign(token, max_age_s=self.SESSION_TTL_S)
        if p is None or not all(isinstance(p.get(k), str) for k in ("who", "name", "csrf")):
            return None
        who: str = p["who"]
        if who == "password":
            if not self.password:  # the password was removed from the config since
                return None
        elif who.startswith("key:"):
            if who[4:] not in await self._admin_key_ids():
                return None
        else:
            return None
        return Session(who, p["name"], p["csrf"])

    async def _admin_key_ids(self) -> frozenset[str]:
        at, ids = self._active_keys
        if time.monotonic() - at > self.KEYS_TTL_S:
            # (a Store method named `list` shadows the builtin in the Protocol's annotations)
            keys: Iterable[ApiKey] = cast("Iterable[ApiKey]", await self.store.list_keys())
            ids = frozenset(k.id for k in keys if not k.revoked and k.role == "admin")
            self._active_keys = (time.monotonic(), ids)
        return ids

    @staticmethod
    def csrf_ok(expected: str, given: Any) -> bool:
        return isinstance(given, str) and bool(given) and hmac.compare_digest(expected, given)
