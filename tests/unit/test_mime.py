"""build_mime and dot_stuff, proved by parsing the bytes with the standard library."""

from __future__ import annotations

import email
import email.header
import email.policy
import email.utils
import random
import re
import time
from email.message import EmailMessage
from typing import Any

import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from postroom.domain import mime
from postroom.domain.addresses import parse_address
from postroom.domain.errors import ValidationError
from postroom.domain.mime import build_mime, dot_stuff
from postroom.domain.model import Address, Attachment, Content, Outgoing

# -- helpers --------------------------------------------------------------------------------------


def make(**kw: Any) -> Content:
    defaults: dict[str, Any] = {
        "sender": Address("sender@example.com", "Sender"),
        "to": [Address("rcpt@example.org")],
        "subject": "Hello",
        "message_id": "<m1@example.com>",
        "text": "Hello there.\n",
    }
    defaults.update(kw)
    return Content(**defaults)


def assert_wire_safe(data: bytes) -> None:
    """CRLF only, ASCII only, no line over 998 octets, ends with CRLF."""
    crlf = data.count(b"\r\n")
    assert data.count(b"\n") == crlf, "bare LF"
    assert data.count(b"\r") == crlf, "bare CR"
    assert data.isascii()
    assert data.endswith(b"\r\n")
    assert max(map(len, data.split(b"\r\n"))) <= 998


def header_lines(data: bytes) -> list[bytes]:
    return data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def parse(data: bytes) -> EmailMessage:
    assert_wire_safe(data)
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    for part in msg.walk():
        assert part.defects == [], part.defects
    return msg


def roundtrip(c: Content, **kw: Any) -> EmailMessage:
    return parse(build_mime(c, **kw))


def norm(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def body_text(part: EmailMessage) -> str:
    content = part.get_content()
    assert isinstance(content, str)
    return norm(content)


def expected_single_part(text: str, part: EmailMessage) -> str:
    """A single-part 7bit/QP body always ends with a line break on the wire (RFC 5321 DATA)."""
    t = norm(text)
    if t and not t.endswith("\n") and part["Content-Transfer-Encoding"] != "base64":
        t += "\n"
    return t


def unstuff(data: bytes) -> bytes:
    """What an SMTP server does with a DATA stream: find the end, remove the stuffed dots."""
    assert data.endswith(b"\r\n.\r\n") or data == b".\r\n"
    assert data.count(b"\r\n.\r\n") == (0 if data == b".\r\n" else 1)
    body = data[: -len(b".\r\n")]
    lines = body.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


# -- structure ------------------------------------------------------------------------------------


def test_text_only_is_a_single_text_plain_part() -> None:
    msg = roundtrip(make(text="Hello there.\nSecond line\n"))
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content_charset() == "utf-8"
    assert msg["Content-Transfer-Encoding"] == "7bit"
    assert body_text(msg) == "Hello there.\nSecond line\n"


def test_html_only_is_a_single_text_html_part() -> None:
    msg = roundtrip(make(text=None, html="<p>Hi</p>\n"))
    assert msg.get_content_type() == "text/html"
    assert body_text(msg) == "<p>Hi</p>\n"


def test_text_and_html_make_multipart_alternative_with_text_first() -> None:
    msg = roundtrip(make(text="plain", html="<b>html</b>"))
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert body_text(parts[0]) == "plain"
    assert body_text(parts[1]) == "<b>html</b>"
    plain, html = msg.get_body(("plain",)), msg.get_body(("html",))
    assert plain is not None and body_text(plain) == "plain"
    assert html is not None and body_text(html) == "<b>html</b>"


def test_no_body_at_all_still_makes_a_valid_message() -> None:
    msg = roundtrip(make(text=None, html=None))
    assert msg.get_content_type() == "text/plain"
    assert body_text(msg) == ""


def test_attachments_wrap_the_body_in_multipart_mixed() -> None:
    pdf = bytes(range(256)) * 40
    c = make(
        text="see attached",
        html="<p>see attached</p>",
        attachments=[
            Attachment("report.pdf", "application/pdf", pdf),
            Attachment("notes.txt", "text/plain", b"line 1\nline 2\r\n"),
        ],
    )
    msg = roundtrip(c)
    assert msg.get_content_type() == "multipart/mixed"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "multipart/alternative",
        "application/pdf",
        "text/plain",
    ]
    atts = list(msg.iter_attachments())
    assert [a.get_filename() for a in atts] == ["report.pdf", "notes.txt"]
    assert atts[0].get_content() == pdf
    assert atts[0].get_content_disposition() == "attachment"
    assert atts[0]["Content-Transfer-Encoding"] == "base64"
    # base64 keeps text attachments byte-exact, line endings included
    assert atts[1].get_payload(decode=True) == b"line 1\nline 2\r\n"
    body = msg.get_body(("plain",))
    assert body is not None and body_text(body) == "see attached"


def test_base64_lines_are_76_characters() -> None:
    data = roundtrip_bytes = build_mime(
        make(attachments=[Attachment("x.bin", "application/octet-stream", b"\xff" * 1000)])
    )
    msg = parse(roundtrip_bytes)
    att = next(iter(msg.iter_attachments()))
    assert att.get_content() == b"\xff" * 1000
    b64_lines = [
        line for line in data.split(b"\r\n") if re.fullmatch(rb"[A-Za-z0-9+/=]{20,}", line)
    ]
    assert b64_lines
    assert {len(line) for line in b64_lines[:-1]} == {76}


def test_inline_parts_go_in_multipart_related_with_the_html() -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(200))
    c = make(
        text="logo below",
        html='<p><img src="cid:logo@x"></p>',
        attachments=[
            Attachment("logo.png", "image/png", png, content_id="logo@x"),
            Attachment("terms.pdf", "application/pdf", b"%PDF-1.4"),
        ],
    )
    msg = roundtrip(c)
    assert msg.get_content_type() == "multipart/mixed"
    related, pdf = msg.iter_parts()
    assert related.get_content_type() == "multipart/related"
    assert related.get_param("type") == "multipart/alternative"
    alternative, logo = related.iter_parts()
    assert alternative.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in alternative.iter_parts()] == ["text/plain", "text/html"]
    assert logo["Content-ID"] == "<logo@x>"
    assert logo.get_content_disposition() == "inline"
    assert logo.get_content() == png
    assert logo.get_filename() == "logo.png"
    assert pdf.get_content() == b"%PDF-1.4"
    assert pdf.get_content_disposition() == "attachment"
    html = msg.get_body(("html",))
    assert html is not None and "cid:logo@x" in body_text(html)


def test_inline_parts_with_html_only_and_no_other_attachment() -> None:
    c = make(
        text=None,
        html='<img src="cid:a">',
        attachments=[Attachment("a.gif", "image/gif", b"GIF89a", content_id="<a>")],
    )
    msg = roundtrip(c)
    assert msg.get_content_type() == "multipart/related"
    assert msg.get_param("type") == "text/html"
    html, gif = msg.iter_parts()
    assert html.get_content_type() == "text/html"
    assert gif["Content-ID"] == "<a>"  # the brackets given were not doubled


def test_inline_parts_without_html_are_plain_attachments() -> None:
    c = make(text="t", attachments=[Attachment("a.gif", "image/gif", b"GIF89a", content_id="a")])
    msg = roundtrip(c)
    assert msg.get_content_type() == "multipart/mixed"
    _, gif = msg.iter_parts()
    assert gif["Content-ID"] == "<a>"
    assert gif.get_content_disposition() == "attachment"
    assert gif.get_content() == b"GIF89a"


# -- headers --------------------------------------------------------------------------------------


def test_headers_a_receiver_sees() -> None:
    c = make(
        sender=Address("news@example.com", "Example News"),
        to=[Address("a@example.org", "Ann"), Address("b@example.org")],
        cc=[Address("c@example.org", "Cee")],
        bcc=[Address("secret@example.net", "Hidden Person")],
        reply_to=[Address("support@example.com", "Support")],
        subject="Your order",
        message_id="<abc.123@example.com>",
        headers={"X-Campaign": "spring", "List-Unsubscribe": "<https://example.com/u>"},
    )
    data = build_mime(c, date="Tue, 02 Jan 2024 03:04:05 +0000")
    msg = parse(data)
    assert msg["Date"].datetime == email.utils.parsedate_to_datetime(
        "Tue, 02 Jan 2024 03:04:05 +0000"
    )
    assert [(a.display_name, a.addr_spec) for a in msg["From"].addresses] == [
        ("Example News", "news@example.com")
    ]
    assert [(a.display_name, a.addr_spec) for a in msg["To"].addresses] == [
        ("Ann", "a@example.org"),
        ("", "b@example.org"),
    ]
    assert [a.addr_spec for a in msg["Cc"].addresses] == ["c@example.org"]
    assert [a.addr_spec for a in msg["Reply-To"].addresses] == ["support@example.com"]
    assert msg["Subject"] == "Your order"
    assert msg["Message-ID"] == "<abc.123@example.com>"
    assert msg["MIME-Version"] == "1.0"
    assert msg["X-Campaign"] == "spring"
    assert msg["List-Unsubscribe"] == "<https://example.com/u>"
    # Bcc is the envelope's business only
    assert msg["Bcc"] is None
    assert b"secret" not in data and b"Hidden" not in data
    names = [line.split(b":")[0] for line in header_lines(data) if not line.startswith(b" ")]
    assert names[:8] == [
        b"Date",
        b"From",
        b"To",
        b"Cc",
        b"Reply-To",
        b"Subject",
        b"Message-ID",
        b"MIME-Version",
    ]
    assert names.index(b"X-Campaign") < names.index(b"Content-Type")
    for line in header_lines(data):
        assert len(line) <= 78


def test_default_date_is_now_in_gmt() -> None:
    before = time.time()
    data = build_mime(make())
    after = time.time()
    stamp = parse(data)["Date"].datetime.timestamp()
    assert int(before) <= stamp <= after + 1
    assert re.search(
        rb"^Date: [A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT\r$", data, re.M
    )


def test_to_may_be_empty_when_only_bcc_is_set() -> None:
    data = build_mime(make(to=[], bcc=[Address("b@example.org")]))
    msg = parse(data)
    assert msg["To"] is None
    assert b"b@example.org" not in data


@pytest.mark.parametrize(
    "subject",
    [
        "Grüße 🎉 from Zoë",
        "お問い合わせありがとうございます。担当者より折り返しご連絡いたします。",
        "Привет, мир! Как дела?",
        "مرحبا بالعالم",
        "x" * 300,
        "Grüße 🎉 " * 40,
        "A fairly long ASCII subject line " * 10,
        "👨‍👩‍👧‍👦" * 30,
        "=?utf-8?q?not_an_encoded_word?=",
        "  leading spaces",
        "tabs\tinside\tit",
        "",
        "a" * 2000,
        "word " + "b" * 1500 + " word",
        "Re: [ticket #42] 10% off — today only",
    ],
)
def test_subject_round_trips(subject: str) -> None:
    data = build_mime(make(subject=subject))
    msg = parse(data)
    assert msg["Subject"] == subject
    assert max(map(len, header_lines(data))) <= 78


def test_display_names_are_encoded_or_quoted_as_needed() -> None:
    names = [
        "Grüße 🎉 from Zoë",
        "山田 太郎",
        "Smith, Bob",
        "J. R. R. Tolkien",
        'Say "hi"',
        "back\\slash",
        "=?utf-8?q?fake?=",
        "a (comment) <not@an.address>",
        "Müller, Jörg (Einkauf)",
        "x" * 120,
        "Long Name, With Many Words " * 5,
        " spaced  out ",
        "Renée Ångström-Øvergaard (Einkauf, Köln) und Kollegen",
    ]
    c = make(
        sender=Address("from@example.com", names[0]),
        to=[Address(f"r{i}@example.org", n) for i, n in enumerate(names)],
    )
    data = build_mime(c)
    msg = parse(data)
    assert msg["From"].addresses[0].display_name == names[0]
    got = [(a.display_name, a.addr_spec) for a in msg["To"].addresses]
    assert got == [(n, f"r{i}@example.org") for i, n in enumerate(names)]
    for line in header_lines(data):
        # one word longer than a line is the exception: it stays whole (see mime._display_name)
        assert len(line) <= 78 or line == b" " + b"x" * 120, line
    unfolded = re.sub(rb"\r\n(?=[ \t])", b"", data)
    assert b'"Smith, Bob" <r2@example.org>' in unfolded
    assert b'"Say \\"hi\\"" <r4@example.org>' in unfolded
    assert b'"J. R. R. Tolkien" <r3@example.org>' in unfolded


def rfc2047_display_name(data: bytes, header: str) -> str:
    """The display name of a one-mailbox header, decoded by RFC 2047 6.2: the space between two
    adjacent encoded words is dropped. Python's address parser keeps it (it cannot read back its
    own output for long non-ASCII names), so names longer than one encoded word are checked here.
    """
    raw = email.message_from_bytes(data, policy=email.policy.compat32)[header]
    raw = re.sub(r"\r?\n(?=[ \t])", "", str(raw))
    phrase = raw[: raw.rindex(" <")]
    if phrase.startswith('"'):
        return re.sub(r"\\(.)", r"\1", phrase[1:-1])
    return str(email.header.make_header(email.header.decode_header(phrase)))


@pytest.mark.parametrize(
    "name",
    [
        "ü" * 100,
        "山田太郎" * 20,
        "Александр Сергеевич Пушкин-Гончарова, Наталья Николаевна",
        "Grüße 🎉 from Zoë " * 6,
        "x," * 600,
        "y" * 1000,
    ],
)
def test_long_non_ascii_display_names_fold_into_encoded_words(name: str) -> None:
    data = build_mime(make(to=[Address("a@example.org", name)]))
    parse(data)
    assert rfc2047_display_name(data, "To") == name
    assert max(map(len, header_lines(data))) <= 78


def test_a_long_recipient_list_is_folded() -> None:
    to = [Address(f"person.number.{i}@example.org", f"Person {i}") for i in range(200)]
    data = build_mime(make(to=to))
    msg = parse(data)
    assert [a.addr_spec for a in msg["To"].addresses] == [a.email for a in to]
    assert [a.display_name for a in msg["To"].addresses] == [a.name for a in to]
    assert max(map(len, header_lines(data))) <= 78


def test_custom_header_values_non_ascii_and_long() -> None:
    long_value = " ".join(f"token{i}" for i in range(100))
    c = make(headers={"X-Note": "Grüße aus Köln", "X-Long": long_value, "X-Tab": "a\tb"})
    data = build_mime(c)
    msg = parse(data)
    assert msg["X-Note"] == "Grüße aus Köln"
    assert msg["X-Long"] == long_value
    assert msg["X-Tab"] == "a\tb"
    assert max(map(len, header_lines(data))) <= 78


# -- bodies ---------------------------------------------------------------------------------------


def test_a_2000_character_line_survives_and_no_line_exceeds_998() -> None:
    line = "".join(random.Random(1).choice("abcdef ghij=") for _ in range(2000))
    text = f"start\n{line}\nend\n"
    c = make(text=text, html=f"<p>{line}</p>")
    data = build_mime(c)
    msg = parse(data)
    plain, html = msg.get_body(("plain",)), msg.get_body(("html",))
    assert plain is not None and body_text(plain) == text
    assert html is not None and body_text(html) == f"<p>{line}</p>"
    assert plain["Content-Transfer-Encoding"] == "quoted-printable"
    assert max(map(len, data.split(b"\r\n"))) <= 78


def test_long_line_without_spaces_and_with_trailing_whitespace() -> None:
    text = ("=" * 500) + "\n" + ("y" * 300) + "   \n" + "z\t\n" + "end =\n"
    msg = roundtrip(make(text=text))
    assert body_text(msg) == text


def test_ascii_body_with_short_lines_is_7bit_and_verbatim() -> None:
    text = "Line one\nLine two with = and =?x?=\n"
    data = build_mime(make(text=text))
    assert b"Line two with = and =?x?=\r\n" in data
    msg = parse(data)
    assert msg["Content-Transfer-Encoding"] == "7bit"
    assert body_text(msg) == text


def test_mostly_latin_non_ascii_text_is_quoted_printable() -> None:
    text = "Viele Grüße aus Köln, und bis bald: wir sehen uns nächste Woche!\nZoë 🎉\n" * 3
    msg = roundtrip(make(text=text, html=f"<p>{text}</p>"))
    plain = msg.get_body(("plain",))
    assert plain is not None
    assert plain["Content-Transfer-Encoding"] == "quoted-printable"
    assert body_text(plain) == text


def test_mostly_non_latin_text_is_base64() -> None:
    text = "お問い合わせありがとうございます。\n担当者より折り返しご連絡いたします。\n" * 20
    msg = roundtrip(make(text=text))
    assert msg["Content-Transfer-Encoding"] == "base64"
    assert body_text(msg) == text
    msg = roundtrip(make(text="日本語", html="<p>日本語</p>"))
    plain = msg.get_body(("plain",))
    assert plain is not None and body_text(plain) == "日本語"


def test_control_characters_in_bodies_survive() -> None:
    text = "nul\x00 ff\x0c esc\x1b del\x7f c1\x85 ls\u2028 end"
    msg = roundtrip(make(text=text, html=text))
    for subtype in ("plain", "html"):
        part = msg.get_body((subtype,))
        assert part is not None
        assert part["Content-Transfer-Encoding"] == "quoted-printable"
        assert body_text(part) == text


@pytest.mark.parametrize(
    "text",
    [
        "one\r\ntwo\rthree\nfour\r\n",
        "\r\r\n\n\r",
        "bare\nlf\nonly",
        "trailing cr\r",
    ],
)
def test_line_endings_are_normalised_to_crlf(text: str) -> None:
    for t, h in ((text, None), (text, "<p>x</p>"), (text + "é", None)):
        data = build_mime(make(text=t, html=h))
        msg = parse(data)
        part = msg.get_body(("plain",))
        assert part is not None
        if h is None:
            assert body_text(part) == expected_single_part(t, part)
        else:
            assert body_text(part) == norm(t)


# -- SMTP DATA: dot-stuffing and smuggling ----------------------------------------------------------

_SMUGGLING_BODIES = [
    ".",
    ".\n",
    "a\n.\nb",
    "a\r\n.\r\nMAIL FROM:<evil@example.net>\r\n",
    "a\n.\r\nb",
    "a\r.\rb",
    "a\r\n.\nb",
    "a\n.\rb",
    "..\n...\n. \n.x\n",
    "\r\n.\r\n",
    "a\r\n\r\n.\r\n\r\nb",
    ".leading dot\n",
]


@pytest.mark.parametrize("text", _SMUGGLING_BODIES)
@pytest.mark.parametrize("extra", ["", "é"])
def test_dot_lines_survive_dot_stuffing_and_end_data_exactly_once(text: str, extra: str) -> None:
    for c in (
        make(text=text + extra),
        make(text=text + extra, html=text),
        make(text=None, html=text + extra, attachments=[Attachment("a", "text/plain", b".\r\n")]),
    ):
        raw = build_mime(c)
        stuffed = dot_stuff(raw)
        assert stuffed.endswith(b"\r\n.\r\n")
        assert stuffed.count(b"\r\n.\r\n") == 1
        crlf = stuffed.count(b"\r\n")
        assert stuffed.count(b"\n") == crlf and stuffed.count(b"\r") == crlf  # nothing bare
        assert unstuff(stuffed) == raw
        msg = parse(unstuff(stuffed))
        for part in msg.walk():
            if part.get_content_maintype() == "text" and not part.is_attachment():
                src = c.text if part.get_content_subtype() == "plain" else c.html
                assert src is not None
                got = body_text(part)
                assert got in (norm(src), expected_single_part(src, part))


def test_dot_stuff_doubles_leading_dots_and_terminates() -> None:
    assert dot_stuff(b"a\r\n.b\r\n..\r\n") == b"a\r\n..b\r\n...\r\n.\r\n"
    assert dot_stuff(b".first\r\n") == b"..first\r\n.\r\n"
    assert dot_stuff(b"no final newline") == b"no final newline\r\n.\r\n"
    assert dot_stuff(b"") == b".\r\n"
    assert dot_stuff(b"x\r\n") == b"x\r\n.\r\n"


def test_dot_stuff_repairs_bare_line_endings() -> None:
    assert dot_stuff(b"a\n.\nb\r.\rc") == b"a\r\n..\r\nb\r\n..\r\nc\r\n.\r\n"
    assert dot_stuff(b"\n.\n") == b"\r\n..\r\n.\r\n"
    assert dot_stuff(b".\r") == b"..\r\n.\r\n"
    assert dot_stuff(b"a\r\r\nb") == b"a\r\n\r\nb\r\n.\r\n"
    assert dot_stuff(b"a\r\n\nb\n\r") == b"a\r\n\r\nb\r\n\r\n.\r\n"
    assert dot_stuff(b"a\r\n.\r\n") == b"a\r\n..\r\n.\r\n"
    assert dot_stuff(b"\r\n") == b"\r\n.\r\n"


def _reference_dot_stuff(raw: bytes) -> bytes:
    """dot_stuff the slow, obvious way: normalise every line ending, stuff line by line."""
    lines = re.split(rb"\r\n|\r|\n", raw)
    if lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + x if x.startswith(b".") else x) + b"\r\n" for x in lines) + b".\r\n"


@settings(max_examples=500, deadline=None)
@given(
    raw=st.binary(max_size=200)
    | st.lists(st.sampled_from([b"\r", b"\n", b".", b"x", b"\r\n"]), max_size=40).map(b"".join)
)
def test_property_dot_stuff_matches_the_reference_and_ends_data_exactly_once(raw: bytes) -> None:
    stuffed = dot_stuff(raw)
    assert stuffed == _reference_dot_stuff(raw)
    crlf = stuffed.count(b"\r\n")
    assert stuffed.count(b"\n") == crlf and stuffed.count(b"\r") == crlf  # nothing bare
    # The DATA command's CRLF comes first: the end marker appears once, at the very end.
    assert (b"\r\n" + stuffed).find(b"\r\n.\r\n") == len(stuffed) - 3


# -- filenames and parts --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "filename",
    [
        "report.pdf",
        "quarterly report 2024.pdf",
        "résumé.pdf",
        "日本語のファイル名.txt",
        "🎉.png",
        'quote"and\\backslash.txt',
        "semi;colon=equals.txt",
        "a" * 200 + ".txt",
        "長い名前" * 40 + ".docx",
        "%41 not a percent escape.txt",
        "new\r\nline.txt",
    ],
)
def test_attachment_filenames_round_trip(filename: str) -> None:
    content = random.Random(filename).randbytes(300)
    c = make(attachments=[Attachment(filename, "application/octet-stream", content)])
    data = build_mime(c)
    msg = parse(data)
    (att,) = msg.iter_attachments()
    assert att["Content-Disposition"].params["filename"] == filename
    assert att["Content-Type"].params["name"] == filename
    assert att.get_filename() == filename.strip()  # get_filename strips whitespace
    assert att.get_content_type() == "application/octet-stream"
    assert att.get_content() == content
    assert max(map(len, data.split(b"\r\n"))) <= 78


def test_content_type_parameters_are_kept() -> None:
    c = make(attachments=[Attachment("d.csv", "text/csv; charset=utf-8", "ä;b\n".encode())])
    (att,) = roundtrip(c).iter_attachments()
    assert att.get_content_type() == "text/csv"
    assert att.get_content_charset() == "utf-8"
    assert att.get_payload(decode=True) == "ä;b\n".encode()


def test_empty_attachment() -> None:
    (att,) = roundtrip(make(attachments=[Attachment("e", "text/plain", b"")])).iter_attachments()
    assert att.get_payload(decode=True) == b""


def test_boundaries_are_random_and_never_in_the_content(monkeypatch: pytest.MonkeyPatch) -> None:
    def boundaries(data: bytes) -> set[bytes]:
        return set(re.findall(rb'boundary="([^"]+)"', data))

    c = make(text="t", html="h")
    assert boundaries(build_mime(c)) != boundaries(build_mime(c))

    taken = 0x1234
    values = iter([taken, taken, 0x5678])
    monkeypatch.setattr(mime.random, "getrandbits", lambda _bits: next(values))
    text = f"a line that happens to hold =_{taken:024x}a and more"
    data = build_mime(make(text=text, html="<p>x</p>"))
    (boundary,) = boundaries(data)
    assert boundary == f"=_{0x5678:024x}a".encode()
    plain = parse(data).get_body(("plain",))
    assert plain is not None and body_text(plain) == text


# -- refusing what cannot be written safely -----------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"subject": "hi\r\nBcc: evil@example.net"}, "subject"),
        ({"subject": "hi\nthere"}, "subject"),
        ({"subject": "nul\x00"}, "subject"),
        ({"sender": Address("a@example.com\r\nX-Evil: 1")}, "from"),
        ({"sender": Address("a@example.com", "Bob\nX-Evil: 1")}, "from"),
        ({"to": [Address("a@example.com"), Address("b@example.com>, <c@example.com")]}, "to.1"),
        ({"to": [Address("jörg@example.com")]}, "to.0"),
        ({"cc": [Address("a@example.com", "Eve\r")]}, "cc.0"),
        ({"reply_to": [Address("a b@example.com")]}, "reply_to.0"),
        ({"headers": {"Bcc": "x@example.com"}}, "headers.Bcc"),
        ({"headers": {"content-type": "text/html"}}, "headers.content-type"),
        ({"headers": {"X-Evil": "a\r\nBcc: x@example.com"}}, "headers.X-Evil"),
        ({"headers": {"X Bad": "v"}}, "headers.X Bad"),
        ({"message_id": "<a@b>\r\nX: y"}, "message_id"),
        ({"message_id": "no-brackets@example.com"}, "message_id"),
        (
            {"attachments": [Attachment("a", "text/plain\r\nX-Evil: 1", b"")]},
            "attachments.0.content_type",
        ),
        ({"attachments": [Attachment("a", "nonsense", b"")]}, "attachments.0.content_type"),
        (
            {"attachments": [Attachment("a", "image/png", b"", content_id="a b")]},
            "attachments.0.content_id",
        ),
        (
            {"attachments": [Attachment("a", "image/png", b"", content_id="x>\r\nX: 1")]},
            "attachments.0.content_id",
        ),
    ],
)
def test_unsafe_content_is_refused(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        build_mime(make(**changes))
    assert info.value.field == field


def test_bad_date_override_is_refused() -> None:
    with pytest.raises(ValidationError) as info:
        build_mime(make(), date="Tue, 02 Jan 2024\r\nBcc: x@example.com")
    assert info.value.field == "date"


def test_outgoing_builds_mime_once() -> None:
    out = Outgoing("id1", make())
    assert out.mime is out.mime
    parse(out.mime)


def test_building_is_far_cheaper_than_email_message() -> None:
    # A guard against slipping back to EmailMessage (~1 ms); the real figure is tens of µs.
    c = make(text="Hello there.\n" * 80, html="<p>Hello there.</p>\n" * 80)
    start = time.perf_counter()
    for _ in range(1000):
        build_mime(c)
    assert time.perf_counter() - start < 1.0


# -- properties -----------------------------------------------------------------------------------

_one_line = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
    max_size=200,
).filter(lambda s: not re.search(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]", s))
_names = st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=80)
_bodies = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=3000)
_ascii_bodies = st.text(alphabet=st.characters(max_codepoint=127), max_size=3000)
# Dense in what quoted-printable must get right: "=", whitespace at line ends, long lines, dots.
_tricky_bodies = st.text(alphabet="a =\t\n\r.é", max_size=3000)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(subject=_one_line, name=_names, other=_names)
def test_property_subjects_and_names_round_trip(subject: str, name: str, other: str) -> None:
    c = make(
        subject=subject,
        sender=Address("s@example.com", name),
        to=[Address("a@example.org", other), Address("b@example.org", name)],
    )
    data = build_mime(c)
    msg = parse(data)
    assert msg["Subject"] == subject
    assert [a.addr_spec for a in msg["To"].addresses] == ["a@example.org", "b@example.org"]
    assert rfc2047_display_name(data, "From") == name
    # Python's parser agrees when a name needs one encoded word at most, except that it
    # collapses runs of whitespace (str.split whitespace, NBSP included) inside encoded words.
    if len(name.encode()) <= 45:
        assert msg["From"].addresses[0].display_name.split() == name.split()
        assert msg["To"].addresses[1].display_name.split() == name.split()
    if len(other.encode()) <= 45:
        assert msg["To"].addresses[0].display_name.split() == other.split()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=st.one_of(_bodies, _ascii_bodies, _tricky_bodies),
    html=st.one_of(st.none(), _bodies, _tricky_bodies),
)
def test_property_bodies_round_trip_and_stay_wire_safe(text: str, html: str | None) -> None:
    raw = build_mime(make(text=text, html=html))
    assert max(map(len, raw.split(b"\r\n"))) <= 78  # 7bit <= 78, QP and base64 <= 76
    stuffed = dot_stuff(raw)
    assert stuffed.count(b"\r\n.\r\n") == 1 and stuffed.endswith(b"\r\n.\r\n")
    assert unstuff(stuffed) == raw
    msg = parse(raw)  # checks: CRLF only, ASCII, lines <= 998
    plain = msg.get_body(("plain",))
    assert plain is not None
    if html is None:
        assert body_text(plain) == expected_single_part(text, plain)
    else:
        assert body_text(plain) == norm(text)
        part = msg.get_body(("html",))
        assert part is not None and body_text(part) == norm(html)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    files=st.lists(
        st.tuples(
            st.text(min_size=1, max_size=120).filter(lambda s: s.strip()),
            st.binary(max_size=2000),
            st.sampled_from(["application/pdf", "image/png", "text/plain", "application/zip"]),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_property_attachments_round_trip(files: list[tuple[str, bytes, str]]) -> None:
    c = make(attachments=[Attachment(n, t, b) for n, b, t in files])
    msg = roundtrip(c)
    got = [
        (
            a["Content-Disposition"].params["filename"],
            a.get_payload(decode=True),
            a.get_content_type(),
        )
        for a in msg.iter_attachments()
    ]
    assert got == files


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.text(max_size=120), local=st.from_regex(r"[A-Za-z0-9._%+-]{1,20}", fullmatch=True))
def test_property_every_parsed_address_can_be_written(name: str, local: str) -> None:
    try:
        a = parse_address({"email": f"{local}@Bücher.example.com", "name": name}, "to.0")
    except ValidationError:
        reject()
    data = build_mime(make(to=[a]))
    msg = parse(data)
    assert msg["To"].addresses[0].addr_spec == a.email
    if a.name:
        assert rfc2047_display_name(data, "To") == a.name
