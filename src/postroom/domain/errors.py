"""The one error tree of Postroom.

    PostroomError
     ├── ValidationError          bad input; carries the field (path) and a message
     │    └── LimitExceeded       size or count limits (body, recipients, attachments)
     ├── ConflictError            idempotency key reused with a different body, bad state change
     ├── NotFound                 no such message / key / resource
     ├── ConfigError              settings that cannot work; names the setting and the fix
     ├── StoreUnavailable         the database is away (API answers 503)
     ├── Deferred                 not now, and not a failure: a rate limit or a throttled domain says
     │                            wait until `until`; the message goes back to the queue, no attempt counted
     └── ProviderError            raised by providers; `code` / `text` as the remote side said
          ├── TransientError      try again later (SMTP 4xx, timeouts, connection lost, HTTP 429/5xx)
          ├── PermanentError      this message will never go (SMTP 5xx for a recipient, HTTP 4xx)
          └── ProviderFault       the provider itself is broken (connection refused, TLS, auth,
                                  421 closing, breaker open): the router fails over to the next one.
                                  Also transient for the message if no other provider takes it.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ConflictError",
    "Deferred",
    "LimitExceeded",
    "NotFound",
    "PermanentError",
    "PostroomError",
    "ProviderError",
    "ProviderFault",
    "StoreUnavailable",
    "TransientError",
    "ValidationError",
]


class PostroomError(Exception):
    """Root of every error Postroom raises on purpose."""


class ValidationError(PostroomError):
    """Input that cannot be accepted. `field` is a dotted path such as ``to.2`` or ``headers.X-Foo``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


class LimitExceeded(ValidationError):
    """A configured size or count limit was exceeded."""


class ConflictError(PostroomError):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(PostroomError):
    def __init__(self, what: str) -> None:
        super().__init__(f"{what} not found")
        self.what = what


class ConfigError(PostroomError):
    """A setting that cannot work. The message names the setting and how to fix it."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.message = message


class StoreUnavailable(PostroomError):
    """The database cannot be reached right now."""


class Deferred(PostroomError):
    """Raised by the router when every usable provider is over a limit: try again at `until`."""

    def __init__(self, until: float, reason: str, *, provider: str | None = None) -> None:
        super().__init__(reason)
        self.until = until
        self.reason = reason
        self.provider = provider


class ProviderError(PostroomError):
    """A delivery attempt did not succeed. `code` is the SMTP or HTTP status when there is one."""

    kind = "error"

    def __init__(
        self,
        text: str,
        *,
        code: int | None = None,
        retry_after_s: float | None = None,
        provider: str | None = None,
    ) -> None:
        super().__init__(f"{code} {text}" if code else text)
        self.text = text
        self.code = code
        self.retry_after_s = retry_after_s
        self.provider = provider


class TransientError(ProviderError):
    """Try the message again later (with backoff)."""

    kind = "transient"


class PermanentError(ProviderError):
    """The message will never be accepted as it is: fail it without retry."""

    kind = "permanent"


class ProviderFault(TransientError):
    """The provider is unusable right now; the router tries the next provider in the same attempt."""

    kind = "fault"
