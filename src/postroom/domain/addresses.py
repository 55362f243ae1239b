"""Address and header checks: a strict `Name <addr>` parser, email syntax, header and text safety.

Never `email.utils.parseaddr`/`getaddresses`: they have turned `alice@example.org)<bob@example.org>`
into the wrong mailbox (CVE-2023-27043, CVE-2019-16056). The grammar accepted here is small on
purpose: a bare address, `Name <address>`, `"Quoted, Name" <address>`, or a JSON object
`{"email": ..., "name": ...}`. Anything that could be read as two mailboxes is refused.

Email syntax is email-validator's (no DNS). The common case, a dot-atom local part, is checked
with one regular expression and the domain check (IDNA included) is cached per domain, so the
per-recipient cost stays around a microsecond or two.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from email_validator import EmailNotValidError, validate_email

from postroom.domain.errors import ValidationError
from postroom.domain.model import Address

__all__ = [
    "RESERVED_HEADERS",
    "check_content_id",
    "check_content_type",
    "check_header",
    "check_text",
    "parse_address",
    "parse_address_list",
]

# C0 controls, DEL and C1 controls. TAB is allowed in header values and subjects, never in addresses.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_NOT_TAB = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")

# RFC 5322 dot-atom local part (the same character set email-validator accepts without quoting).
_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_LOCAL_MAX = 64  # RFC 5321 4.5.3.1.1
_EMAIL_MAX = 254  # RFC 5321 4.5.3.1.3 path limit minus the angle brackets
# Display names and whole "Name <addr>" strings are capped before any parsing: email-validator
# takes about half a second on a megabyte, and no real name comes near this.
NAME_MAX = 1000
_INPUT_MAX = NAME_MAX + 300

# Characters an unquoted display name must not contain: RFC 5322 specials except "." (obs-phrase
# allows it and "John Q. Public" is everywhere). "@" and "," are what make a string two mailboxes.
_NAME_SPECIALS = re.compile(r'[()<>\[\]:;@\\,"]')
_QUOTED_NAME = re.compile(r'"((?:[^"\\]|\\.)*)"')
_UNESCAPE = re.compile(r"\\(.)")

# RFC 5322 ftext: printable ASCII except ":" (and no space). 76 so that "Name: " fits a line.
_HEADER_NAME = re.compile(r"[!-9;-~]{1,76}")

# RFC 2045 type/subtype with optional parameters (ASCII tokens only), and an RFC 2392 content ID
# (printable ASCII without space and angle brackets). mime.py checks with the same patterns, so
# what is accepted at the door is what can be sent.
_TOKEN = r"[A-Za-z0-9!#$%&'*+.^_`{|}~-]+"
CONTENT_TYPE = re.compile(
    rf'{_TOKEN}/{_TOKEN}(?:[ \t]*;[ \t]*{_TOKEN}=(?:{_TOKEN}|"[ !#-\[\]-~]*"))*'
)
_CONTENT_TYPE_MAX = 255
CONTENT_ID = re.compile(r"[!-;=?-~]{1,250}")

# Header name (lowercase) -> the JSON field to use instead, or a note on who sets it.
RESERVED_HEADERS: dict[str, str] = {
    "from": "use the JSON field 'from' instead",
    "to": "use the JSON field 'to' instead",
    "cc": "use the JSON field 'cc' instead",
    "bcc": "use the JSON field 'bcc' instead",
    "reply-to": "use the JSON field 'reply_to' instead",
    "subject": "use the JSON field 'subject' instead",
    "message-id": "Postroom sets it (one Message-ID per message, kept across attempts)",
    "date": "Postroom sets it when the message is sent",
    "mime-version": "Postroom sets it",
    "content-type": "use the JSON fields 'text', 'html' and 'attachments' instead",
    "content-transfer-encoding": "Postroom chooses the encoding of each part",
}

_CONTROL_NAMES = {"\x00": "NUL", "\t": "TAB", "\n": "LF", "\r": "CR"}


def _show(value: str) -> str:
    """The value as it goes into an error message: repr (escapes controls), cut when long."""
    return repr(value if len(value) <= 100 else value[:100] + "…")


def _control_message(ch: str, where: str) -> str:
    what = _CONTROL_NAMES.get(ch, f"U+{ord(ch):04X}")
    return f"contains a control character ({what}); line breaks and control characters are not allowed in {where}"


def _reject_controls(value: str, field: str, where: str) -> None:
    m = _CONTROL.search(value)
    if m:
        raise ValidationError(field, _control_message(m.group(), where))


@functools.lru_cache(maxsize=4096)
def _check_domain(domain: str) -> tuple[str, str | None]:
    """(ASCII domain, None) or ("", error text). Cached: recipients' domains repeat a lot."""
    try:
        v = validate_email("a@" + domain, check_deliverability=False)
    except EmailNotValidError as e:
        return "", str(e)
    return v.ascii_domain, None


def _check_email(addr: str, field: str, original: str) -> str:
    """A bare addr-spec -> its ASCII form (domain lowercased, IDN in punycode; local part as given)."""
    if "," in addr or ";" in addr:
        raise ValidationError(
            field,
            f"{_show(original)} is not a valid email address: it contains ',' or ';' "
            "(more than one address, or a group); give one address per list entry",
        )
    at = addr.find("@")
    if at > 0:
        local = addr[:at]
        if len(local) <= _LOCAL_MAX and _LOCAL.fullmatch(local):
            ascii_domain, error = _check_domain(addr[at + 1 :])
            if error is not None:
                raise ValidationError(
                    field, f"{_show(original)} is not a valid email address: {error}"
                )
            email = f"{local}@{ascii_domain}"
            if len(email) <= _EMAIL_MAX and len(addr.encode("utf-8")) <= _EMAIL_MAX:
                return email
            # too long: email-validator words the message
        elif not local.isascii():
            raise ValidationError(
                field,
                f"{_show(original)} is not a valid email address: "
                "non-ASCII local part needs SMTPUTF8, which is not supported",
            )
    try:
        v = validate_email(addr, check_deliverability=False, allow_smtputf8=False, strict=True)
    except EmailNotValidError as e:
        raise ValidationError(
            field, f"{_show(original)} is not a valid email address: {e}"
        ) from None
    assert v.ascii_email is not None  # allow_smtputf8=False guarantees it
    return v.ascii_email


def _too_long(value: str, limit: int, what: str) -> str:
    return f"{_show(value)} is {len(value)} characters long; {what} can be at most {limit}"


def _parse_string(value: str, field: str) -> Address:
    if len(value) > _INPUT_MAX:
        raise ValidationError(field, _too_long(value, _INPUT_MAX, "an address with its name"))
    _reject_controls(value, field, "an email address")
    s = value.strip(" ")
    if not s:
        raise ValidationError(field, "is empty; expected an email address")
    if s[-1] != ">":
        if "<" in s or ">" in s:
            raise ValidationError(
                field,
                f"{_show(value)} has unbalanced '<' '>'; write 'Name <a@example.com>' "
                "or a bare address",
            )
        return Address(_check_email(s, field, value))

    if s[0] == '"':
        m = _QUOTED_NAME.match(s)
        if m is None:
            raise ValidationError(field, f"{_show(value)} has an unterminated quoted display name")
        name = _UNESCAPE.sub(r"\1", m.group(1))
        rest = s[m.end() :].lstrip(" ")
        if not rest.startswith("<"):
            raise ValidationError(
                field,
                f"{_show(value)}: expected '<address>' right after the quoted display name",
            )
        angle = rest[1:-1]
    else:
        lt = s.find("<")
        if lt < 0:
            raise ValidationError(
                field,
                f"{_show(value)} has unbalanced '<' '>'; write 'Name <a@example.com>' "
                "or a bare address",
            )
        name = s[:lt]
        bad = _NAME_SPECIALS.search(name)
        if bad:
            raise ValidationError(
                field,
                f"{_show(value)} is ambiguous: the display name contains {bad.group()!r}; put the "
                'name in double quotes or send {"email": ..., "name": ...}',
            )
        angle = s[lt + 1 : -1]
    if "<" in angle or ">" in angle:
        raise ValidationError(
            field,
            f"{_show(value)} has unbalanced or repeated '<' '>'; give exactly one address "
            "per entry",
        )
    email = _check_email(angle.strip(" "), field, value)
    name = name.strip(" ")
    if len(name) > NAME_MAX:
        raise ValidationError(field, _too_long(name, NAME_MAX, "a display name"))
    return Address(email, name or None)


def _parse_object(value: dict[Any, Any], field: str) -> Address:
    extra = [k for k in value if k not in ("email", "name")]
    if extra:
        raise ValidationError(
            field,
            f"unknown key(s) {', '.join(map(repr, extra))}; expected 'email' and optional 'name'",
        )
    email = value.get("email")
    name = value.get("name")
    if not isinstance(email, str):
        raise ValidationError(f"{field}.email", "is required and must be a string")
    if name is not None and not isinstance(name, str):
        raise ValidationError(f"{field}.name", "must be a string")
    if len(email) > _INPUT_MAX:
        raise ValidationError(f"{field}.email", _too_long(email, _INPUT_MAX, "an address"))
    _reject_controls(email, f"{field}.email", "an email address")
    s = email.strip(" ")
    if not s:
        raise ValidationError(f"{field}.email", "is empty; expected an email address")
    if "<" in s or ">" in s:
        raise ValidationError(
            f"{field}.email",
            f"{_show(email)}: give a bare address such as 'a@example.com' (no '<' '>'); "
            "the display name goes in 'name'",
        )
    ascii_email = _check_email(s, f"{field}.email", email)
    if name is not None:
        _reject_controls(name, f"{field}.name", "a display name")
        name = name.strip(" ")
        if len(name) > NAME_MAX:
            raise ValidationError(f"{field}.name", _too_long(name, NAME_MAX, "a display name"))
    return Address(ascii_email, name or None)


def parse_address(value: str | dict[str, Any], field: str) -> Address:
    """Parse one mailbox; raise `ValidationError(field, ...)` saying what is wrong.

    Accepts ``a@example.com``, ``Name <a@example.com>``, ``"Quoted, Name" <a@example.com>``
    or ``{"email": "a@example.com", "name": "Name"}``. The result's `email` is ASCII: the domain
    is lowercased and IDN domains are converted to punycode; the local part is kept as given.
    """
    if isinstance(value, str):
        return _parse_string(value, field)
    if isinstance(value, dict):
        return _parse_object(value, field)
    raise ValidationError(
        field,
        f"expected an email address string or an object with 'email' and 'name', "
        f"got {type(value).__name__}",
    )


def parse_address_list(values: list[Any], field: str) -> list[Address]:
    """Parse a list of mailboxes; errors name the entry (``to.0``, ``to.1``, ...)."""
    if isinstance(values, str):
        raise ValidationError(field, "expected a list of addresses, got a string; wrap it in [...]")
    if not isinstance(values, list | tuple):
        raise ValidationError(field, f"expected a list of addresses, got {type(values).__name__}")
    return [parse_address(v, f"{field}.{i}") for i, v in enumerate(values)]


def check_header(name: str, value: str, field: str) -> None:
    """Refuse a custom header that is malformed, could inject lines, or is one Postroom owns."""
    if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
        shown = _show(name) if isinstance(name, str) else type(name).__name__
        raise ValidationError(
            field,
            f"header name {shown} is not valid: use 1 to 76 printable ASCII characters, "
            "no spaces and no ':'",
        )
    reserved = RESERVED_HEADERS.get(name.lower())
    if reserved is not None:
        raise ValidationError(field, f"the {name} header cannot be set here: {reserved}")
    if not isinstance(value, str):
        raise ValidationError(
            field, f"the value of header {name} must be a string, not {type(value).__name__}"
        )
    m = _CONTROL_NOT_TAB.search(value)
    if m:
        raise ValidationError(field, _control_message(m.group(), "header values"))


def check_text(value: str, field: str) -> None:
    """Refuse one-line text (a subject) that holds CR, LF or other control characters (TAB is fine)."""
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a string, not {type(value).__name__}")
    m = _CONTROL_NOT_TAB.search(value)
    if m:
        raise ValidationError(field, _control_message(m.group(), "a one-line text"))


def check_content_type(value: str, field: str) -> None:
    """Refuse a MIME type that cannot go in a Content-Type header as is (``type/subtype; a=b``)."""
    if (
        not isinstance(value, str)
        or len(value) > _CONTENT_TYPE_MAX
        or not CONTENT_TYPE.fullmatch(value)
    ):
        shown = _show(value) if isinstance(value, str) else type(value).__name__
        raise ValidationError(
            field,
            f"{shown} is not a MIME type such as 'application/pdf' or 'text/csv; charset=utf-8'",
        )


def check_content_id(value: str, field: str) -> str:
    """Check a Content-ID (the `cid:` the HTML refers to); return it without angle brackets."""
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a string, not {type(value).__name__}")
    cid = value[1:-1] if value[:1] == "<" and value[-1:] == ">" else value
    if not CONTENT_ID.fullmatch(cid):
        raise ValidationError(
            field,
            f"{_show(value)} is not a valid Content-ID: use 1 to 250 printable ASCII characters "
            "without spaces or '<' '>', such as 'logo@example.com'",
        )
    return cid
