"""MIME messages built from string pieces (no `email.message` on the hot path), and dot-stuffing.

`EmailMessage` costs about a millisecond per message (PERFORMANCE.md); this module builds the
same bytes in microseconds and the tests prove them by parsing with the standard library.

What comes out of `build_mime`:

* CRLF line endings only: no bare CR or LF anywhere, whatever the input held.
* Header lines of at most 78 characters where that is possible, never more than 998: long
  values are folded at whitespace; non-ASCII (or `=?`-looking) text becomes RFC 2047 encoded
  words (UTF-8, base64), split on character boundaries.
* Body parts in 7bit when they are ASCII with short lines, else quoted-printable; attachments
  in base64 (76-character lines); non-ASCII or awkward filenames as RFC 2231 parameters.
* Structure: text / html / multipart/alternative, inside multipart/related when parts carry a
  Content-ID (the HTML refers to them as `cid:`), inside multipart/mixed when there are
  attachments.

Input is checked again here (controls in headers, malformed addresses, content types) so that a
row that skipped validation can never smuggle a header or an SMTP command: such content raises
`ValidationError` naming the field.
"""

from __future__ import annotations

import binascii
import random
import re
import time
from email.utils import formatdate
from urllib.parse import quote

from postroom.domain.addresses import check_content_id, check_content_type, check_header
from postroom.domain.errors import ValidationError
from postroom.domain.model import Address, Attachment, Content

__all__ = ["build_mime", "dot_stuff"]

_LINE = 78  # RFC 5322 2.1.1: SHOULD; 998 is the MUST
_HARD_LINE = 998

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_NOT_TAB = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
# Bytes a 7bit part may carry as they are: printable ASCII, TAB and LF (CR was normalised away).
# bytes.translate deletes them in C; whatever is left needs quoted-printable.
_SEVEN_BIT_OK = bytes([9, 10, *range(32, 127)])
_HIGH_BYTES = bytes(range(128, 256))

_ATOM_PHRASE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?: [A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_PLAIN_EMAIL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+")
_MESSAGE_ID = re.compile(r"<[!-;=?-~]{1,900}>")
# Percent-encoded characters per RFC 2231 segment: ' filename*0*=utf-8\'\'' + 56 + ';' = 77.
_PARAM_CHUNK = 56
_SIMPLE_FILENAME = re.compile(r"[ !#-\[\]-~]{1,60}")  # printable ASCII without '"' and '\'
# Fold points of ASCII unstructured text: the start of each inner run of whitespace.
_FOLD_POINT = re.compile(r"(?<=\S)(?=[ \t]+\S)")

_EW_PREFIX = "=?utf-8?b?"
_EW_OVERHEAD = len(_EW_PREFIX) + 2  # "?=" at the end
_EW_MAX_BYTES = 45  # 60 base64 chars: a 72-char encoded word (RFC 2047 allows 75)


# -- headers ---------------------------------------------------------------------------------


class _Folder:
    """Lays out one header field: tokens joined by a space, or by CRLF SP when a line is full."""

    __slots__ = ("col", "fresh", "parts")

    def __init__(self, name: str) -> None:
        self.parts = [name, ":"]
        self.col = len(name) + 1
        self.fresh = True  # nothing after "Name:" yet; never fold there

    def token(self, tok: str) -> None:
        n = len(tok)
        if self.fresh or self.col + 1 + n <= _LINE:
            self.parts.append(" ")
            self.col += 1 + n
        else:
            self.parts.append("\r\n ")
            self.col = 1 + n
        self.parts.append(tok)
        self.fresh = False

    def encoded(self, text: str) -> None:
        """`text` as RFC 2047 encoded words filling the lines; each word holds whole characters."""
        data = text.encode("utf-8")
        pos = 0
        end_all = len(data)
        while pos < end_all:
            room = _LINE - self.col - 1 - _EW_OVERHEAD  # base64 chars that fit on this line
            if room < 16:
                room = 16 if self.fresh else _LINE - 1 - _EW_OVERHEAD
            nbytes = min(room // 4 * 3, _EW_MAX_BYTES)
            end = pos + nbytes
            if end >= end_all:
                end = end_all
            else:
                while data[end] & 0xC0 == 0x80:  # do not split a UTF-8 sequence
                    end -= 1
            word = binascii.b2a_base64(data[pos:end], newline=False).decode("ascii")
            self.token(f"{_EW_PREFIX}{word}?=")
            pos = end

    def pieces(self, text: str) -> None:
        """`text` folded only before its own inner whitespace (unfolding restores it exactly)."""
        first, *rest = _FOLD_POINT.split(text)
        self.token(first)
        for p in rest:  # each starts with whitespace
            if self.col + len(p) > _LINE:
                self.parts.append("\r\n")
                self.col = len(p)
            else:
                self.col += len(p)
            self.parts.append(p)

    def done(self) -> str:
        return "".join(self.parts)


def _unstructured(name: str, value: str, field: str, limit: int = _HARD_LINE) -> str:
    """An unstructured header (Subject, custom headers), folded or encoded as needed.

    ASCII stays readable, folded at whitespace, as long as no line exceeds `limit`; otherwise the
    value becomes encoded words, which can be split anywhere. Subjects pass 78 (any word may be
    encoded); custom headers pass 998, since encoding would change a structured value.
    """
    m = _CONTROL_NOT_TAB.search(value)
    if m:
        raise ValidationError(
            field, f"contains control character U+{ord(m.group()):04X}; it cannot go in a header"
        )
    # ASCII goes as is unless a receiver would read it differently: "=?" looks like an encoded
    # word, and leading whitespace is dropped by parsers.
    if value.isascii() and "=?" not in value and value[:1] not in (" ", "\t"):
        line = f"{name}: {value}"
        if len(line) <= _LINE:
            return line
        pieces = _FOLD_POINT.split(value)
        lines = []
        cur = f"{name}: {pieces[0]}"
        for p in pieces[1:]:
            if len(cur) + len(p) > _LINE:
                lines.append(cur)
                cur = p  # starts with whitespace: the folded line is a continuation
            else:
                cur += p
        lines.append(cur)
        if max(map(len, lines)) <= limit:
            return "\r\n".join(lines)
    f = _Folder(name)
    f.encoded(value)
    return f.done()


def _quote_phrase(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _address_header(header: str, addresses: list[Address], field: str) -> str:
    # First pass: check each mailbox and render it in the plain ways; most headers end here.
    plain: list[str] = []
    needs_folder = False
    for i, a in enumerate(addresses):
        email = a.email
        if len(email) > 254 or not _PLAIN_EMAIL.fullmatch(email):
            where = field if header == "From" else f"{field}.{i}"
            raise ValidationError(where, f"{email!r} is not a plain ASCII email address")
        name = a.name
        if not name:
            plain.append(email)
            continue
        m = _CONTROL.search(name)
        if m:
            where = field if header == "From" else f"{field}.{i}"
            raise ValidationError(
                where, f"the display name contains control character U+{ord(m.group()):04X}"
            )
        if not name.isascii() or "=?" in name:
            needs_folder = True
        elif _ATOM_PHRASE.fullmatch(name):
            plain.append(f"{name} <{email}>")
        else:
            plain.append(f"{_quote_phrase(name)} <{email}>")
    if not needs_folder:
        line = f"{header}: {', '.join(plain)}"
        if len(line) <= _LINE:
            return line

    f = _Folder(header)
    last = len(addresses) - 1
    for i, a in enumerate(addresses):
        comma = "," if i < last else ""
        email, name = a.email, a.name
        if name:
            _display_name(f, name)
        f.token(f"<{email}>{comma}" if name else email + comma)
    return f.done()


def _display_name(f: _Folder, name: str) -> None:
    if name.isascii() and "=?" not in name:
        if len(name) <= 900 and _ATOM_PHRASE.fullmatch(name):
            # A word longer than a line stays whole (lines stay under 998): split into encoded
            # words it would read differently in different decoders (see below).
            for word in name.split(" "):
                f.token(word)
            return
        quoted = _quote_phrase(name)
        if max(map(len, _FOLD_POINT.split(quoted))) <= 900:
            f.pieces(quoted)  # FWS inside a quoted string is allowed; folding keeps the spaces
            return
    # Words that are plain atoms stay readable; each run of other words becomes encoded text.
    # A run is kept in one encoded word when it fits: decoders disagree on adjacent encoded
    # words in a phrase (RFC 2047 drops the space between them; Python's parser keeps it).
    if "  " in name or name[:1] == " " or name[-1:] == " ":
        runs = [(False, name)]  # odd spacing survives only inside encoded text
    else:
        runs = []
        for word in name.split(" "):
            if len(word) <= 900 and "=?" not in word and _ATOM_PHRASE.fullmatch(word):
                runs.append((True, word))
            elif runs and not runs[-1][0]:
                runs[-1] = (False, f"{runs[-1][1]} {word}")
            else:
                runs.append((False, word))
    for is_atom, text in runs:
        if is_atom:
            f.token(text)
        else:
            data = text.encode("utf-8")
            if len(data) <= _EW_MAX_BYTES:
                word = binascii.b2a_base64(data, newline=False).decode("ascii")
                f.token(f"{_EW_PREFIX}{word}?=")
            else:
                f.encoded(text)


def _with_params(header: str, value: str, params: list[str]) -> str:
    """`Header: value; p1; p2` with each parameter moved to its own line when the line is full."""
    lines = [f"{header}: {value}"]
    for p in params:
        lines[-1] += ";"
        if len(lines[-1]) + 1 + len(p) <= _LINE:
            lines[-1] += " " + p
        else:
            lines.append(" " + p)
    return "\r\n".join(lines)


def _filename_params(key: str, filename: str) -> list[str]:
    """`key="name"` when plain, else RFC 2231 `key*=utf-8''...` (with continuations when long)."""
    if _SIMPLE_FILENAME.fullmatch(filename):
        return [f'{key}="{filename}"']
    enc = quote(filename, safe="", encoding="utf-8")
    if len(enc) <= _PARAM_CHUNK:
        return [f"{key}*=utf-8''{enc}"]
    # Continuations split on whole characters: some decoders (Python's among them) decode each
    # segment on its own.
    segments: list[str] = []
    cur = ""
    for ch in filename:
        q = quote(ch, safe="", encoding="utf-8")
        if len(cur) + len(q) > _PARAM_CHUNK:
            segments.append(cur)
            cur = ""
        cur += q
    segments.append(cur)
    out = [f"{key}*0*=utf-8''{segments[0]}"]
    out.extend(f"{key}*{n}*={seg}" for n, seg in enumerate(segments[1:], 1))
    return out


_date_cache: tuple[int, str] = (0, "")


def _now_date() -> str:
    """The Date header value, formatted once per second."""
    global _date_cache
    now = int(time.time())
    cached = _date_cache
    if cached[0] == now:
        return cached[1]
    value = formatdate(now, usegmt=True)
    _date_cache = (now, value)
    return value


# -- body ------------------------------------------------------------------------------------

_Entity = tuple[str, bytes]  # (header lines without the final CRLF, body bytes)


def _normalise_newlines(text: str) -> str:
    if "\r" in text:
        return text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def _qp_line(line: bytes) -> bytes:
    """One over-long or whitespace-ended line of `_qp_ascii`, every "=" already starting an escape."""
    last = line[-1:]
    if last == b" ":
        line = line[:-1] + b"=20"
    elif last == b"\t":
        line = line[:-1] + b"=09"
    out = []
    while len(line) > 76:
        cut = 75  # 75 characters and the "=" of the soft line break
        if line[74] == 0x3D:  # do not cut "=XX" in two
            cut = 74
        elif line[73] == 0x3D:
            cut = 73
        out.append(line[:cut] + b"=")
        line = line[cut:]
    out.append(line)
    return b"\n".join(out)


def _qp_ascii(data: bytes) -> bytes:
    """Quoted-printable for printable ASCII (plus TAB) with LF line ends: the common HTML case.

    binascii.b2a_qp looks at every byte (~10 ns each); here only "=" and the lines that are too
    long or end in whitespace need work.
    """
    lines = data.replace(b"=", b"=3D").split(b"\n")
    for i, line in enumerate(lines):
        if len(line) > 76 or line[-1:] in (b" ", b"\t"):
            lines[i] = _qp_line(line)
    return b"\n".join(lines)


def _text_entity(text: str, subtype: str) -> _Entity:
    # Regular expressions cost a few ns a character here; these str/bytes methods are C loops.
    text = _normalise_newlines(text)
    if text.isascii():
        data = text.encode("ascii")
        if data.translate(None, _SEVEN_BIT_OK):  # other control characters
            body = binascii.b2a_qp(data, istext=True)
            cte = "quoted-printable"
        elif max(map(len, data.split(b"\n"))) <= _LINE:
            body = data
            cte = "7bit"
        else:
            body = _qp_ascii(data)
            cte = "quoted-printable"
        body = body.replace(b"\n", b"\r\n")
    else:
        data = text.encode("utf-8")
        high = len(data) - len(data.translate(None, _HIGH_BYTES))
        if high * 3 > len(data):
            # Mostly non-Latin text (CJK, Cyrillic, ...): quoted-printable would nearly triple
            # it, base64 adds a third. Below a third of high bytes quoted-printable stays (it is
            # readable and what filters expect). Text goes in canonical (CRLF) form first.
            body = _base64_lines(data.replace(b"\n", b"\r\n"))
            cte = "base64"
        else:
            # b2a_qp keeps "\n" as the line break when the input has no CR; lines stay <= 76.
            body = binascii.b2a_qp(data, istext=True).replace(b"\n", b"\r\n")
            cte = "quoted-printable"
    return (
        f"Content-Type: text/{subtype}; charset=utf-8\r\nContent-Transfer-Encoding: {cte}",
        body,
    )


def _base64_lines(data: bytes) -> bytes:
    enc = binascii.b2a_base64(data, newline=False)
    return b"\r\n".join([enc[j : j + 76] for j in range(0, len(enc), 76)])


def _attachment_entity(att: Attachment, i: int, inline: bool) -> _Entity:
    field = f"attachments.{i}"
    ctype = att.content_type
    check_content_type(ctype, f"{field}.content_type")
    filename = att.filename
    head = [
        _with_params("Content-Type", ctype, _filename_params("name", filename)),
        _with_params(
            "Content-Disposition",
            "inline" if inline else "attachment",
            _filename_params("filename", filename),
        ),
        "Content-Transfer-Encoding: base64",
    ]
    if att.content_id:
        cid = check_content_id(att.content_id, f"{field}.content_id")
        head.append(f"Content-ID: <{cid}>")
    return "\r\n".join(head), _base64_lines(att.content)


def _multipart(subtype: str, children: list[_Entity], boundary: str, extra: str = "") -> _Entity:
    b = boundary.encode("ascii")
    sep = b"\r\n--" + b + b"\r\n"
    body = (
        b"--"
        + b
        + b"\r\n"
        + sep.join([h.encode("ascii") + b"\r\n\r\n" + content for h, content in children])
        + b"\r\n--"
        + b
        + b"--"
    )
    return f'Content-Type: multipart/{subtype};{extra}\r\n boundary="{boundary}"', body


def _boundary_base(content: Content) -> str:
    # "=_" cannot occur in base64 or quoted-printable output, so only 7bit text could hold it.
    # Being absent is what makes a boundary safe, and that is checked here, so the fast
    # non-cryptographic generator is enough.
    while True:
        base = f"=_{random.getrandbits(96):024x}"
        if (content.text is None or base not in content.text) and (
            content.html is None or base not in content.html
        ):
            return base


def _body(content: Content) -> _Entity:
    base = _boundary_base(content)
    # Boundaries of equal length that differ in the last character: none is a prefix of another.
    text = _text_entity(content.text, "plain") if content.text is not None else None
    html = _text_entity(content.html, "html") if content.html is not None else None
    if text and html:
        body = _multipart("alternative", [text, html], base + "a")
        body_type = "multipart/alternative"
    elif html:
        body, body_type = html, "text/html"
    else:
        body, body_type = text or _text_entity("", "plain"), "text/plain"
    if not content.attachments:
        return body

    inline: list[_Entity] = []
    attached: list[_Entity] = []
    for i, att in enumerate(content.attachments):
        # Inline parts belong with the HTML that refers to them; without HTML they are attachments.
        is_inline = bool(att.content_id and html)
        (inline if is_inline else attached).append(_attachment_entity(att, i, is_inline))
    if inline:
        body = _multipart("related", [body, *inline], base + "r", f'\r\n type="{body_type}";')
    if attached:
        body = _multipart("mixed", [body, *attached], base + "m")
    return body


# -- the message -----------------------------------------------------------------------------


def build_mime(content: Content, *, date: str | None = None) -> bytes:
    """The full RFC 5322 message (CRLF line endings), ready for SMTP DATA before dot-stuffing.

    Bcc is not written. `date` overrides the Date header (an RFC 5322 date-time).
    Raises `ValidationError` for content that could not be written safely.
    """
    if date is None:
        date = _now_date()
    elif _CONTROL.search(date) or len(date) > 200:
        raise ValidationError("date", f"{date[:200]!r} is not a usable Date header value")
    message_id = content.message_id
    if not _MESSAGE_ID.fullmatch(message_id):
        raise ValidationError(
            "message_id", f"{message_id[:200]!r} is not a Message-ID such as '<id@example.com>'"
        )
    head = [f"Date: {date}", _address_header("From", [content.sender], "from")]
    if content.to:
        head.append(_address_header("To", content.to, "to"))
    if content.cc:
        head.append(_address_header("Cc", content.cc, "cc"))
    if content.reply_to:
        head.append(_address_header("Reply-To", content.reply_to, "reply_to"))
    head.append(_unstructured("Subject", content.subject, "subject", _LINE))
    head.append(f"Message-ID: {message_id}")
    head.append("MIME-Version: 1.0")
    for name, value in content.headers.items():
        field = f"headers.{name}"
        check_header(name, value, field)
        head.append(_unstructured(name, value, field))
    entity_head, body = _body(content)
    head.append(entity_head)
    out = "\r\n".join(head).encode("ascii") + b"\r\n\r\n" + body
    if not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out


_BARE_NEWLINE = re.compile(rb"\r\n|\r|\n")


def dot_stuff(mime: bytes) -> bytes:
    """The SMTP DATA payload for `mime`: RFC 5321 4.5.2 dot-stuffing plus the final ``.\\r\\n``.

    Bare CR or LF (which `build_mime` never produces) are turned into CRLF first, so that no
    receiver can read a different end of data than the one sent (SMTP smuggling).

    Two passes in C over a clean message: splitting at CRLF and joining the pieces leaves a CR or
    LF only where one was bare (memchr finds none), then the dot replacement.
    """
    rest = b"".join(mime.split(b"\r\n"))
    if b"\r" in rest or b"\n" in rest:
        mime = _BARE_NEWLINE.sub(b"\r\n", mime)
    if not mime:
        return b".\r\n"
    data = mime.replace(b"\r\n.", b"\r\n..")
    if data[:1] == b".":
        data = b"." + data
    if data[-2:] != b"\r\n":
        data += b"\r\n"
    return data + b".\r\n"
