"""Address parsing and header checks: the accepted forms, the CVE-style inputs, control characters."""

from __future__ import annotations

import re
import time

import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.domain.addresses import (
    NAME_MAX,
    RESERVED_HEADERS,
    check_content_id,
    check_content_type,
    check_header,
    check_text,
    parse_address,
    parse_address_list,
)
from postroom.domain.errors import ValidationError
from postroom.domain.model import Address


def rejected(value: object, field: str = "to.0") -> ValidationError:
    with pytest.raises(ValidationError) as info:
        parse_address(value, field)  # type: ignore[arg-type]
    assert info.value.field.startswith(field)
    assert str(info.value).startswith(f"{info.value.field}: ")
    return info.value


# -- accepted forms ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a@example.com", Address("a@example.com")),
        ("  a@example.com  ", Address("a@example.com")),
        ("Display Name <a@example.com>", Address("a@example.com", "Display Name")),
        ("Display Name<a@example.com>", Address("a@example.com", "Display Name")),
        ("<a@example.com>", Address("a@example.com")),
        ("  <  a@example.com  >  ", Address("a@example.com")),
        ("John Q. Public <jqp@example.com>", Address("jqp@example.com", "John Q. Public")),
        ('"Quoted, Name" <a@example.com>', Address("a@example.com", "Quoted, Name")),
        ('"Quoted, Name"<a@example.com>', Address("a@example.com", "Quoted, Name")),
        ('"Say \\"hi\\"" <a@example.com>', Address("a@example.com", 'Say "hi"')),
        ('"back\\\\slash" <a@example.com>', Address("a@example.com", "back\\slash")),
        ('"" <a@example.com>', Address("a@example.com")),
        ("Zoë Grüße 🎉 <zoe@example.com>", Address("zoe@example.com", "Zoë Grüße 🎉")),
        ("山田太郎 <taro@example.jp>", Address("taro@example.jp", "山田太郎")),
        ({"email": "a@example.com"}, Address("a@example.com")),
        ({"email": "a@example.com", "name": None}, Address("a@example.com")),
        ({"email": "a@example.com", "name": "  "}, Address("a@example.com")),
        (
            {"email": " a@example.com ", "name": 'Smith, "Bob" <x@y.z>'},
            Address("a@example.com", 'Smith, "Bob" <x@y.z>'),
        ),
    ],
)
def test_parse_address_accepts_the_documented_forms(value: object, expected: Address) -> None:
    assert parse_address(value, "to.0") == expected  # type: ignore[arg-type]


def test_local_part_keeps_its_case_and_domain_is_lowercased() -> None:
    assert parse_address("Bob.Smith@EXAMPLE.Com", "to.0").email == "Bob.Smith@example.com"


def test_idn_domain_becomes_punycode() -> None:
    assert parse_address("Zoë <zoe@Exämple.COM>", "to.0") == Address(
        "zoe@xn--exmple-cua.com", "Zoë"
    )
    assert parse_address("a@bücher.de", "to.0").email == "a@xn--bcher-kva.de"
    assert parse_address("a@xn--bcher-kva.de", "to.0").email == "a@xn--bcher-kva.de"
    assert parse_address("a@例え.jp", "to.0").email == "a@xn--r8jz45g.jp"


def test_all_atext_characters_are_accepted_in_the_local_part() -> None:
    local = "!#$%&'*+-/=?^_`{|}~.abc.XYZ.09"
    assert parse_address(f"{local}@example.com", "to.0").email == f"{local}@example.com"


# -- rejected -------------------------------------------------------------------------------------


def test_error_names_the_field_and_what_is_wrong() -> None:
    e = rejected("bob@", "to.2")
    assert e.field == "to.2"
    assert str(e).startswith("to.2: 'bob@' is not a valid email address: ")
    assert "after the @-sign" in e.message


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        "bob",
        "bob@",
        "@example.com",
        "bob@@example.com",
        "bob..smith@example.com",
        ".bob@example.com",
        "bob.@example.com",
        "bob smith@example.com",
        "bob@exam ple.com",
        "bob@localhost",
        "bob@example",
        "bob@example.com.",
        "bob@-example.com",
        "bob@[127.0.0.1]",
        '"bob smith"@example.com',
        "bob@example.invalid",
        "x" * 65 + "@example.com",
        "a@" + ".".join(["x" * 60] * 5) + ".com",
    ],
)
def test_invalid_addresses_are_rejected_with_a_message(value: str) -> None:
    e = rejected(value)
    assert e.message  # says something
    if value.strip():
        assert repr(value[:100]).strip("'") in e.message or "…" in e.message


def test_non_ascii_local_part_needs_smtputf8() -> None:
    e = rejected("jörg@example.com")
    assert "non-ASCII local part needs SMTPUTF8, which is not supported" in e.message
    e = rejected({"email": "用户@例子.广告"}, "to.0")
    assert e.field == "to.0.email"
    assert "SMTPUTF8" in e.message


# The inputs of CVE-2023-27043 and CVE-2019-16056 and their relatives: each is either refused or
# read as exactly one unambiguous mailbox.
@pytest.mark.parametrize(
    "value",
    [
        "alice@example.org)<bob@example.org>",
        "alice@example.org)  (<bob@example.org>",
        "alice@example.org@evil.com",
        "alice@example.org@evil.com <bob@example.org>",
        "alice@example.org <bob@example.org>",
        "alice@example.org<bob@example.org>",
        "a@x.com, b@y.com",
        "a@x.com,b@y.com",
        "a@x.com; b@y.com",
        "Alice <a@x.com>, Bob <b@y.com>",
        '"Alice" <a@x.com>, "Bob" <b@y.com>',
        "Alice <a@x.com> <b@y.com>",
        '"Alice" <a@x.com> <b@y.com>',
        "<a@x.com> <b@y.com>",
        "<a@x.com>>",
        "<<a@x.com>",
        "<a@x.com",
        "a@x.com>",
        "Alice <a@x.com",
        "Alice a@x.com>",
        "Alice > <a@x.com>",
        '"alice@example.org"@evil.com',
        'alice"@example.org <bob@example.org>',
        '"unterminated <a@x.com>',
        '"Alice" Smith <a@x.com>',
        "Alice (comment) <a@x.com>",
        "a@x.com (Alice)",
        "Alice [x] <a@x.com>",
        "Alice: <a@x.com>",
        "undisclosed-recipients:;",
        "group: a@x.com, b@y.com;",
        "Alice\\ <a@x.com>",
    ],
)
def test_cve_style_inputs_are_refused(value: str) -> None:
    rejected(value)


def test_quoted_address_as_display_name_reads_as_the_real_mailbox() -> None:
    # CVE-2023-27043: parseaddr used to report alice@example.org here.
    assert parse_address('"alice@example.org" <bob@example.org>', "to.0") == Address(
        "bob@example.org", "alice@example.org"
    )
    assert parse_address('"alice@example.org, <x@y.z>" <bob@example.org>', "to.0") == Address(
        "bob@example.org", "alice@example.org, <x@y.z>"
    )


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("a@example.com\r\nBcc: evil@example.net", "CR"),
        ("a@example.com\nBcc: evil@example.net", "LF"),
        ("Bob\r\n <a@example.com>", "CR"),
        ("a@exa\x00mple.com", "NUL"),
        ("Bob\t<a@example.com>", "TAB"),
        ("Bob\x7f <a@example.com>", "U+007F"),
        ("Bob\x85 <a@example.com>", "U+0085"),
        ("Bob\x1b[31m <a@example.com>", "U+001B"),
    ],
)
def test_control_characters_are_refused_naming_the_field(value: str, shown: str) -> None:
    e = rejected(value, "cc.3")
    assert e.field == "cc.3"
    assert shown in e.message
    assert "control character" in e.message


def test_control_characters_in_object_form_name_the_key() -> None:
    e = rejected({"email": "a@example.com", "name": "Bob\r\nBcc: x@y.z"}, "to.1")
    assert e.field == "to.1.name"
    e = rejected({"email": "a@example.com\n"}, "to.1")
    assert e.field == "to.1.email"


def test_object_form_is_strict() -> None:
    assert rejected({"name": "Bob"}).field == "to.0.email"
    assert rejected({"email": 3}).field == "to.0.email"
    assert rejected({"email": "a@example.com", "name": 3}).field == "to.0.name"
    assert "unknown key" in rejected({"email": "a@example.com", "nmae": "Bob"}).message
    assert rejected({"email": "Bob <a@example.com>"}).field == "to.0.email"
    assert rejected({"email": ""}).field == "to.0.email"


@pytest.mark.parametrize("value", [None, 3, ["a@example.com"], b"a@example.com"])
def test_other_types_are_refused(value: object) -> None:
    assert "expected an email address" in rejected(value).message


def test_long_values_are_cut_in_messages() -> None:
    e = rejected("x" * 5000)
    assert len(e.message) < 400
    assert "5000 characters" in e.message
    e = rejected("x" * 1000 + "@example.com")
    assert len(e.message) < 400


def test_huge_inputs_are_refused_before_parsing() -> None:
    # email-validator needs ~0.5 s for a megabyte; the caps keep every call cheap.
    start = time.perf_counter()
    for value in (
        "a" * 1_000_000 + "@example.com",
        '"' + "a" * 1_000_000,
        "x " * 500_000 + "<a@example.com>",
        {"email": "a" * 1_000_000},
        {"email": "a@example.com", "name": "x" * 1_000_000},
    ):
        rejected(value)
    assert time.perf_counter() - start < 0.5
    assert parse_address({"email": "a@example.com", "name": "n" * NAME_MAX}, "to.0").name
    assert rejected({"email": "a@example.com", "name": "n" * (NAME_MAX + 1)}).field == "to.0.name"
    assert parse_address(f"{'n' * NAME_MAX} <a@example.com>", "to.0").name
    rejected(f"{'n' * (NAME_MAX + 1)} <a@example.com>")


# -- lists ----------------------------------------------------------------------------------------


def test_parse_address_list_numbers_the_entries() -> None:
    assert parse_address_list(["a@example.com", {"email": "b@example.com", "name": "B"}], "to") == [
        Address("a@example.com"),
        Address("b@example.com", "B"),
    ]
    assert parse_address_list([], "cc") == []
    with pytest.raises(ValidationError) as info:
        parse_address_list(["a@example.com", "b@example.com", "bob@"], "to")
    assert info.value.field == "to.2"
    assert str(info.value).startswith("to.2: 'bob@' is not a valid email address: ")


def test_parse_address_list_wants_a_list() -> None:
    with pytest.raises(ValidationError, match="wrap it in"):
        parse_address_list("a@example.com", "to")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="expected a list"):
        parse_address_list({"email": "a@example.com"}, "to")  # type: ignore[arg-type]


# -- agreement with email-validator ---------------------------------------------------------------

_ATEXT = "abcXYZ019!#$%&'*+-/=?^_`{|}~"
_local_parts = st.text(alphabet=_ATEXT + ".", min_size=1, max_size=70)
_domains = st.sampled_from(
    ["example.com", "EXAMPLE.org", "bücher.de", "sub.example.co.uk", "xn--bcher-kva.de", "x.y"]
)


@settings(deadline=None)  # the machine may be busy; correctness is what is tested
@given(local=_local_parts, domain=_domains)
def test_fast_path_agrees_with_email_validator(local: str, domain: str) -> None:
    addr = f"{local}@{domain}"
    try:
        expected = validate_email(
            addr, check_deliverability=False, allow_smtputf8=False, strict=True
        ).ascii_email
    except EmailNotValidError:
        expected = None
    try:
        got: str | None = parse_address(addr, "to.0").email
    except ValidationError:
        got = None
    if expected is not None and local.lower() in ("postmaster", "abuse"):
        expected = f"{local}@{expected.split('@')[1]}"  # email-validator lowercases these
    assert got == expected


@settings(deadline=None)  # the machine may be busy; correctness is what is tested
@given(st.text(max_size=40))
def test_any_string_either_parses_cleanly_or_raises_validation_error(value: str) -> None:
    try:
        a = parse_address(value, "to.0")
    except ValidationError as e:
        assert e.field == "to.0"
        return
    assert a.email.isascii()
    assert not re.search(r"[\x00-\x20\x7f<>,;\"()\\]", a.email)
    assert a.email.count("@") == 1
    assert a.name is None or not re.search(r"[\x00-\x1f\x7f-\x9f]", a.name)


@settings(deadline=None)  # the machine may be busy; correctness is what is tested
@given(
    name=st.text(
        alphabet=st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=40
    ).filter(lambda s: s.strip(" ")),
)
def test_any_name_quoted_and_escaped_round_trips(name: str) -> None:
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    assert parse_address(f'"{escaped}" <a@example.com>', "to.0") == Address(
        "a@example.com", name.strip(" ")
    )


# -- headers and text -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-Campaign", "spring-2024"),
        ("List-Unsubscribe", "<https://example.com/u/1>, <mailto:u@example.com>"),
        ("X-Tab", "a\tb"),
        ("X-Empty", ""),
        ("X-Unicode", "Grüße"),
        ("X-!#$%&'*+-.^_`|~", "ok"),
        ("Sender", "a@example.com"),
    ],
)
def test_check_header_accepts_custom_headers(name: str, value: str) -> None:
    check_header(name, value, f"headers.{name}")


@pytest.mark.parametrize(
    "name", ["", "X Foo", "X:Foo", "X-Föö", "X-Foo\r\n", "X-\x00", "X" * 77, ":", " X"]
)
def test_check_header_refuses_bad_names(name: str) -> None:
    with pytest.raises(ValidationError, match="header name") as info:
        check_header(name, "v", "headers.x")
    assert info.value.field == "headers.x"


@pytest.mark.parametrize("name", sorted(RESERVED_HEADERS))
def test_check_header_refuses_headers_postroom_owns(name: str) -> None:
    for spelling in (name, name.upper(), name.title()):
        with pytest.raises(ValidationError, match="cannot be set here") as info:
            check_header(spelling, "x", f"headers.{spelling}")
        assert info.value.field == f"headers.{spelling}"


def test_reserved_headers_say_which_field_to_use() -> None:
    with pytest.raises(ValidationError, match="use the JSON field 'subject' instead"):
        check_header("SUBJECT", "x", "headers.SUBJECT")
    with pytest.raises(ValidationError, match="use the JSON field 'reply_to' instead"):
        check_header("reply-to", "x", "headers.reply-to")
    with pytest.raises(ValidationError, match="use the JSON field 'bcc' instead"):
        check_header("Bcc", "x", "headers.Bcc")
    expected = {
        "from",
        "to",
        "cc",
        "bcc",
        "subject",
        "message-id",
        "date",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "reply-to",
    }
    assert set(RESERVED_HEADERS) == expected


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("a\r\nBcc: evil@example.net", "CR"),
        ("a\nb", "LF"),
        ("a\rb", "CR"),
        ("a\x00b", "NUL"),
        ("a\x0bb", "U+000B"),
        ("a\x7f", "U+007F"),
        ("a\x9b", "U+009B"),
    ],
)
def test_check_header_and_check_text_refuse_control_characters(value: str, shown: str) -> None:
    with pytest.raises(ValidationError) as info:
        check_header("X-Foo", value, "headers.X-Foo")
    assert info.value.field == "headers.X-Foo"
    assert shown in info.value.message
    with pytest.raises(ValidationError) as info:
        check_text(value, "subject")
    assert info.value.field == "subject"
    assert shown in info.value.message
    assert str(info.value).startswith("subject: contains a control character")


def test_check_header_refuses_non_string_values() -> None:
    with pytest.raises(ValidationError, match="must be a string"):
        check_header("X-Foo", 3, "headers.X-Foo")  # type: ignore[arg-type]


def test_check_text_accepts_ordinary_subjects() -> None:
    check_text("Grüße 🎉 from Zoë\tand a tab", "subject")
    check_text("", "subject")
    check_text("x" * 5000, "subject")
    with pytest.raises(ValidationError, match="must be a string"):
        check_text(None, "subject")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value",
    [
        "application/pdf",
        "image/svg+xml",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "text/csv; charset=utf-8",
        'text/plain;charset="us-ascii"; format=flowed',
    ],
)
def test_check_content_type_accepts_mime_types(value: str) -> None:
    check_content_type(value, "attachments.0.content_type")


@pytest.mark.parametrize(
    "value",
    [
        "",
        "pdf",
        "text/",
        "/plain",
        "text/plain\r\nX-Evil: 1",
        "text/plain; charset",
        'text/plain; name="a\r\nb"',
        "téxt/plain",
        'text/plain; name="é"',
        "text/plain extra",
        "a/" + "b" * 300,
    ],
)
def test_check_content_type_refuses_what_cannot_go_in_a_header(value: str) -> None:
    with pytest.raises(ValidationError, match="is not a MIME type") as info:
        check_content_type(value, "attachments.0.content_type")
    assert info.value.field == "attachments.0.content_type"


def test_check_content_id_strips_brackets_and_refuses_unsafe_ids() -> None:
    assert check_content_id("logo@example.com", "c") == "logo@example.com"
    assert check_content_id("<logo>", "c") == "logo"
    for bad in ("", "<>", "a b", "a>b", "<a", "a\r\nX: y", "é", "x" * 251):
        with pytest.raises(ValidationError, match="not a valid Content-ID") as info:
            check_content_id(bad, "attachments.1.content_id")
        assert info.value.field == "attachments.1.content_id"
    with pytest.raises(ValidationError, match="must be a string"):
        check_content_id(3, "c")  # type: ignore[arg-type]
