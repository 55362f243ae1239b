"""SMTPProvider against real SMTP servers: aiosmtpd per test, and scripted asyncio servers for faults."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

from postroom.domain.errors import PermanentError, ProviderFault, TransientError
from postroom.domain.model import Address, Content, Outgoing
from postroom.domain.ports import Provider
from postroom.providers.smtp import SMTPProvider, retry_after_hint

TIMEOUT_S = 0.5

MIME = (
    b"From: Sender <sender@example.test>\r\n"
    b"To: rcpt@example.test\r\n"
    b"Subject: dots and lines\r\n"
    b"Message-ID: <m1@example.test>\r\n"
    b"\r\n"
    b".\r\n"
    b"..\r\n"
    b".leading dot\r\n"
    b"a line\r\n"
    b". \r\n"
    b"last line\r\n"
)


def outgoing(
    *rcpts: str, mime: bytes = MIME, sender: str = "sender@example.test", id: str = "m1"
) -> Outgoing:
    content = Content(
        sender=Address(sender),
        to=[Address(r) for r in rcpts or ("rcpt@example.test",)],
        subject="dots and lines",
        message_id=f"<{id}@example.test>",
    )
    return Outgoing(id, content, mime)


# -- the servers ---------------------------------------------------------------------------------


@dataclass
class Received:
    peer: Any
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    mail_options: list[str]
    authenticated: bool | None


@dataclass
class Recorder:
    """An aiosmtpd handler that keeps what it receives and refuses chosen recipients."""

    pipelining: bool = False
    rcpt_replies: dict[str, str] = field(default_factory=dict)  # address -> reply
    max_rcpts: int = 0  # 452 beyond this many recipients per transaction
    messages: list[Received] = field(default_factory=list)

    async def handle_EHLO(
        self, server: Any, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if self.pipelining:
            responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_RCPT(
        self,
        server: Any,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        if self.max_rcpts and len(envelope.rcpt_tos) >= self.max_rcpts:
            return "452 4.5.3 Error: too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        assert envelope.mail_from is not None
        assert isinstance(envelope.original_content, bytes)
        self.messages.append(
            Received(
                session.peer,
                envelope.mail_from,
                list(envelope.rcpt_tos),
                envelope.original_content,
                list(envelope.mail_options),
                session.authenticated,
            )
        )
        return f"250 2.0.0 Ok: queued as Q{len(self.messages)}"

    @property
    def connections(self) -> int:
        return len({m.peer for m in self.messages})


class _Controller(Controller):
    """aiosmtpd on 127.0.0.1 with an ephemeral port."""

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, hostname="127.0.0.1", port=0, server_hostname="mx.test", **kwargs)

    async def _bind(self) -> asyncio.AbstractServer:
        server = await self.loop.create_server(
            self._factory_invoker, host=self.hostname, port=0, ssl=self.ssl_context
        )
        self.port = server.sockets[0].getsockname()[1]
        return server

    def _create_server(self) -> Awaitable[asyncio.AbstractServer]:
        return self._bind()


@pytest.fixture
def smtpd() -> Iterator[Callable[..., _Controller]]:
    started: list[_Controller] = []

    def start(handler: Any, **kwargs: Any) -> _Controller:
        controller = _Controller(handler, **kwargs)
        controller.start()
        started.append(controller)
        return controller

    yield start
    for controller in started:
        controller.stop()


@pytest.fixture
async def make_provider() -> AsyncIterator[Callable[..., SMTPProvider]]:
    made: list[SMTPProvider] = []

    def make(port: int, **kwargs: Any) -> SMTPProvider:
        kwargs.setdefault("timeout_s", TIMEOUT_S * 4)
        provider = SMTPProvider("relay", host="127.0.0.1", port=port, **kwargs)
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.close()


@pytest.fixture(autouse=True)
async def no_leftover_tasks() -> AsyncIterator[None]:
    yield
    await asyncio.sleep(0)
    me = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    assert not left, f"tasks left running: {left}"


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key),
            "-out", str(cert), "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def server_tls(tls_files: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*tls_files)
    return ctx


@pytest.fixture
def client_tls(tls_files: tuple[Path, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tls_files[0]))


HANG = object()  # read until the client goes away, never answer
DROP = object()  # reset the connection instead of answering


@dataclass
class Slow:
    text: str
    delay_s: float


@dataclass
class Close:
    text: str  # answer, then hang up (as a server does after 421)


@dataclass
class Script:
    """What a scripted server answers: text (CRLF-separated lines), HANG, DROP, Slow(text, delay_s),
    Close(text) or a function returning one of these (for END, script.messages[-1] is the message
    being answered)."""

    greeting: Any = "220 fake.test ESMTP"
    replies: dict[str, Any] = field(default_factory=dict)
    close_after: set[str] = field(default_factory=set)  # verbs after which the server hangs up
    connections: int = 0
    commands: list[str] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)

    def reply(self, verb: str) -> Any:
        defaults = {
            "EHLO": "250-fake.test\r\n250-PIPELINING\r\n250 8BITMIME",
            "HELO": "250 fake.test",
            "MAIL": "250 2.1.0 Ok",
            "RCPT": "250 2.1.5 Ok",
            "DATA": "354 End data with <CR><LF>.<CR><LF>",
            "END": "250 2.0.0 Ok: queued as ABC123",
            "RSET": "250 2.0.0 Ok",
            "QUIT": "221 2.0.0 Bye",
        }
        r = self.replies.get(verb, defaults.get(verb, "502 5.5.2 Error: command not recognized"))
        return r() if callable(r) else r


@contextlib.asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[int]:
    """A tiny SMTP server on the test's own loop, for faults aiosmtpd will not produce."""
    tasks: set[asyncio.Task[Any]] = set()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, r: Any) -> bool:
        if r is HANG:
            await reader.read()
            return False
        if r is DROP:
            writer.transport.abort()
            return False
        if isinstance(r, Slow):
            await asyncio.sleep(r.delay_s)
            r = r.text
        if isinstance(r, Close):
            writer.write(r.text.encode() + b"\r\n")
            await writer.drain()
            return False
        writer.write(r.encode() + b"\r\n")
        await writer.drain()
        return True

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        script.connections += 1
        try:
            if not await answer(reader, writer, script.greeting) or script.greeting[0] != "2":
                return
            while line := await reader.readline():
                verb = line.split(b":")[0].split(b" ")[0].strip().upper().decode()
                script.commands.append(verb)
                r = script.reply(verb)
                if not await answer(reader, writer, r) or verb == "QUIT":
                    return
                if verb in script.close_after:
                    return
                if verb == "DATA" and r.startswith("354"):
                    data = []
                    while (line := await reader.readline()) != b".\r\n":
                        if not line:  # the client went away in the middle: no message
                            return
                        data.append(line)
                    script.messages.append(b"".join(data))
                    script.commands.append("END")
                    if not await answer(reader, writer, script.reply("END")):
                        return
                    if "END" in script.close_after:
                        return
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(session, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()
        if tasks:
            await asyncio.wait(tasks, timeout=5)


# -- delivery ------------------------------------------------------------------------------------


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "no-pipelining"])
async def test_delivers_the_exact_mime_with_lone_dot_lines(
    smtpd: Any, make_provider: Any, pipelining: bool
) -> None:
    handler = Recorder(pipelining=pipelining)
    provider = make_provider(smtpd(handler).port)

    receipt = await provider.send(outgoing("a@example.test", "b@example.test"))

    assert receipt.provider == "relay"
    assert receipt.code == 250
    assert receipt.provider_message_id == "Q1"
    assert "queued as Q1" in receipt.text
    [got] = handler.messages
    assert got.content == MIME
    assert got.mail_from == "sender@example.test"
    assert got.rcpt_tos == ["a@example.test", "b@example.test"]
    assert got.mail_options == [f"SIZE={len(MIME)}"]


async def test_a_message_without_final_crlf_or_starting_with_a_dot_arrives_intact(
    smtpd: Any, make_provider: Any
) -> None:
    handler = Recorder(pipelining=True)
    provider = make_provider(smtpd(handler).port)

    await provider.send(outgoing(mime=b".odd start\r\nno final newline"))
    await provider.send(outgoing(mime="Subject: ü\r\n\r\nnaïve\r\n".encode()))

    assert [m.content for m in handler.messages] == [
        b".odd start\r\nno final newline\r\n",
        "Subject: ü\r\n\r\nnaïve\r\n".encode(),
    ]
    assert "BODY=8BITMIME" in handler.messages[1].mail_options


async def test_concurrent_sends_share_a_small_pool_of_connections(
    smtpd: Any, make_provider: Any
) -> None:
    handler = Recorder(pipelining=True)
    provider = make_provider(smtpd(handler).port, pool_size=3)

    receipts = await asyncio.gather(
        *(provider.send(outgoing(f"r{i}@example.test", id=f"m{i}")) for i in range(60))
    )

    assert len(receipts) == 60 and all(r.code == 250 for r in receipts)
    assert sorted(m.rcpt_tos[0] for m in handler.messages) == sorted(
        f"r{i}@example.test" for i in range(60)
    )
    assert 1 <= handler.connections <= 3


async def test_a_session_is_replaced_after_max_messages_and_after_idling(
    smtpd: Any, make_provider: Any
) -> None:
    handler = Recorder(pipelining=True)
    port = smtpd(handler).port
    provider = make_provider(port, pool_size=1, max_messages_per_connection=4)
    for _ in range(10):
        await provider.send(outgoing())
    assert handler.connections == 3  # 4 + 4 + 2

    idler = make_provider(port, idle_timeout_s=0.05)
    await idler.send(outgoing())
    await asyncio.sleep(0.1)
    await idler.send(outgoing())
    assert len({m.peer for m in handler.messages[10:]}) == 2


async def test_a_session_the_server_closed_while_idle_is_replaced_transparently(
    make_provider: Any,
) -> None:
    script = Script(
        replies={"END": "250 2.0.0 Ok: queued as ABC123\r\n421 4.4.2 fake.test timeout exceeded"},
        close_after={"END"},
    )
    async with scripted(script) as port:
        provider = make_provider(port)
        await provider.send(outgoing())
        await asyncio.sleep(0.05)
        receipt = await provider.send(outgoing())
        await provider.close()

    assert receipt.provider_message_id == "ABC123"
    assert script.connections == 2
    assert len(script.messages) == 2


async def test_multi_line_replies_are_joined_and_helo_is_used_when_ehlo_is_refused(
    make_provider: Any,
) -> None:
    script = Script(
        replies={
            "EHLO": "502 5.5.2 Error: command not recognized",
            "END": "250-2.0.0 accepted\r\n250 2.0.0 Ok: queued as 4F1A2B",
        }
    )
    async with scripted(script) as port:
        provider = make_provider(port)
        receipt = await provider.send(outgoing())
        await provider.close()

    assert receipt.text == "2.0.0 accepted 2.0.0 Ok: queued as 4F1A2B"
    assert receipt.provider_message_id == "4F1A2B"
    assert script.commands[:5] == ["EHLO", "HELO", "MAIL", "RCPT", "DATA"]


# -- recipients ----------------------------------------------------------------------------------


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "no-pipelining"])
async def test_partial_refusal_sends_to_the_accepted_and_notes_the_refused(
    smtpd: Any, make_provider: Any, pipelining: bool
) -> None:
    handler = Recorder(
        pipelining=pipelining,
        rcpt_replies={"bad@example.test": "550 5.1.1 <bad@example.test>: user unknown"},
    )
    provider = make_provider(smtpd(handler).port)

    receipt = await provider.send(outgoing("good@example.test", "bad@example.test"))

    assert receipt.code == 250
    assert "refused: <bad@example.test> 550 5.1.1 <bad@example.test>: user unknown" in receipt.text
    assert [m.rcpt_tos for m in handler.messages] == [["good@example.test"]]


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "no-pipelining"])
async def test_all_recipients_refused_with_550_is_permanent_and_the_session_is_kept(
    smtpd: Any, make_provider: Any, pipelining: bool
) -> None:
    handler = Recorder(
        pipelining=pipelining,
        rcpt_replies={"bad@example.test": "550 5.1.1 <bad@example.test>: user unknown"},
    )
    provider = make_provider(smtpd(handler).port)

    with pytest.raises(PermanentError) as info:
        await provider.send(outgoing("bad@example.test"))
    assert info.value.code == 550
    assert info.value.text == "5.1.1 <bad@example.test>: user unknown"
    assert info.value.provider == "relay"

    await provider.send(outgoing("good@example.test"))  # after RSET, on the same session
    assert handler.connections == 1
    assert handler.messages[0].rcpt_tos == ["good@example.test"]


async def test_every_recipient_refused_names_each_refusal(smtpd: Any, make_provider: Any) -> None:
    handler = Recorder(
        pipelining=True,
        rcpt_replies={
            "a@example.test": "550 5.1.1 no such user a",
            "b@example.test": "553 5.1.3 bad address b",
        },
    )
    provider = make_provider(smtpd(handler).port)

    with pytest.raises(PermanentError) as info:
        await provider.send(outgoing("a@example.test", "b@example.test"))

    assert info.value.code == 550
    assert info.value.text == (
        "<a@example.test> 550 5.1.1 no such user a; <b@example.test> 553 5.1.3 bad address b"
    )


@pytest.mark.parametrize("code", [450, 451])
async def test_a_4xx_recipient_is_transient_with_its_code_and_delay_hint(
    smtpd: Any, make_provider: Any, code: int
) -> None:
    handler = Recorder(
        pipelining=True,
        rcpt_replies={
            "grey@example.test": f"{code} 4.7.1 Greylisted, please try again in 5 minutes"
        },
    )
    provider = make_provider(smtpd(handler).port)

    with pytest.raises(TransientError) as info:
        await provider.send(outgoing("ok@example.test", "grey@example.test"))

    assert type(info.value) is TransientError
    assert info.value.code == code
    assert "Greylisted" in info.value.text
    assert info.value.retry_after_s == 300
    assert handler.messages == []  # nobody got it: the retry will not duplicate


async def test_452_too_many_recipients_sends_the_rest_in_another_transaction(
    smtpd: Any, make_provider: Any
) -> None:
    handler = Recorder(pipelining=True, max_rcpts=2)
    provider = make_provider(smtpd(handler).port)
    rcpts = [f"r{i}@example.test" for i in range(5)]

    receipt = await provider.send(outgoing(*rcpts))

    assert receipt.provider_message_id == "Q1"
    assert [m.rcpt_tos for m in handler.messages] == [rcpts[:2], rcpts[2:4], rcpts[4:]]
    assert all(m.content == MIME for m in handler.messages)


async def test_5xx_on_mail_from_is_permanent_and_5xx_on_data_end_too(make_provider: Any) -> None:
    async with scripted(Script(replies={"MAIL": "553 5.7.1 sender not allowed"})) as port:
        provider = make_provider(port)
        with pytest.raises(PermanentError) as info:
            await provider.send(outgoing())
        await provider.close()
    assert (info.value.code, info.value.text) == (553, "5.7.1 sender not allowed")

    script = Script(replies={"END": "554 5.7.1 spam"})
    async with scripted(script) as port:
        provider = make_provider(port)
        with pytest.raises(PermanentError) as info:
            await provider.send(outgoing())
        await provider.close()
    assert (info.value.code, info.value.text) == (554, "5.7.1 spam")
    assert script.commands[-2:] == ["RSET", "QUIT"]


async def test_non_ascii_addresses_use_smtputf8_or_fail_permanently(
    smtpd: Any, make_provider: Any
) -> None:
    handler = Recorder(pipelining=True)
    provider = make_provider(smtpd(handler).port)
    await provider.send(outgoing("jürgen@exämple.test"))
    assert handler.messages[0].rcpt_tos == ["jürgen@exämple.test"]
    assert "SMTPUTF8" in handler.messages[0].mail_options

    async with scripted(Script()) as port:  # no SMTPUTF8 offered
        provider = make_provider(port)
        with pytest.raises(PermanentError, match="SMTPUTF8"):
            await provider.send(outgoing("jürgen@exämple.test"))
        await provider.close()


async def test_a_message_over_the_announced_size_or_with_a_broken_address_is_permanent(
    smtpd: Any, make_provider: Any
) -> None:
    handler = Recorder(pipelining=True)
    provider = make_provider(smtpd(handler, data_size_limit=100).port)

    with pytest.raises(PermanentError, match="exceeds the server limit 100") as info:
        await provider.send(outgoing())
    assert info.value.code == 552
    short = b"Subject: short\r\n\r\nhi\r\n"
    with pytest.raises(PermanentError, match="line break"):
        await provider.send(outgoing("a@example.test>\r\nRCPT TO:<b@example.test", mime=short))
    await provider.send(outgoing(mime=short))

    assert handler.connections == 1
    assert [m.rcpt_tos for m in handler.messages] == [["rcpt@example.test"]]


# -- faults --------------------------------------------------------------------------------------


async def test_connection_refused_is_a_provider_fault(make_provider: Any) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    provider = make_provider(port)

    with pytest.raises(ProviderFault, match="connect failed"):
        await provider.send(outgoing())


async def test_a_server_that_never_answers_fails_within_the_timeout(make_provider: Any) -> None:
    with socket.socket() as s:  # the kernel accepts the connection; nobody ever answers
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        provider = make_provider(s.getsockname()[1], timeout_s=TIMEOUT_S)
        started = time.monotonic()
        with pytest.raises(ProviderFault, match=r"timed out .* at greeting"):
            await provider.send(outgoing())
        assert time.monotonic() - started < TIMEOUT_S + 0.4


async def test_a_server_that_hangs_mid_transaction_gives_a_transient_error(
    make_provider: Any,
) -> None:
    async with scripted(Script(replies={"RCPT": HANG})) as port:
        provider = make_provider(port, timeout_s=TIMEOUT_S)
        started = time.monotonic()
        with pytest.raises(TransientError, match="timed out") as info:
            await provider.send(outgoing())
        assert time.monotonic() - started < TIMEOUT_S + 0.4
        assert type(info.value) is TransientError
        await provider.close()


async def test_a_connection_lost_after_the_content_is_a_transient_error(
    make_provider: Any,
) -> None:
    async with scripted(Script(replies={"END": DROP})) as port:
        provider = make_provider(port)
        with pytest.raises(TransientError, match="connection lost at end of data") as info:
            await provider.send(outgoing())
        assert type(info.value) is TransientError
        await provider.close()


@pytest.mark.parametrize(
    "script",
    [
        Script(greeting="421 4.3.2 fake.test too busy"),
        Script(greeting="554 5.7.1 go away"),
        Script(replies={"MAIL": "421 4.3.0 fake.test shutting down"}),
        Script(replies={"RCPT": "421 4.3.0 fake.test shutting down"}),
        Script(replies={"MAIL": "530 5.7.0 Authentication required"}),
        Script(greeting=DROP),
        Script(greeting="hello, this is not SMTP"),
    ],
    ids=[
        "421-greeting",
        "554-greeting",
        "421-mail",
        "421-rcpt",
        "530-mail",
        "drop-greeting",
        "garbled-greeting",
    ],
)
async def test_provider_level_answers_are_provider_faults(
    make_provider: Any, script: Script
) -> None:
    async with scripted(script) as port:
        provider = make_provider(port)
        with pytest.raises(ProviderFault):
            await provider.send(outgoing())
        await provider.close()


async def test_a_missing_starttls_or_auth_is_a_provider_fault(make_provider: Any) -> None:
    async with scripted(Script()) as port:
        with pytest.raises(ProviderFault, match="does not offer STARTTLS"):
            await make_provider(port, starttls=True).send(outgoing())
        with pytest.raises(ProviderFault, match="does not offer AUTH"):
            await make_provider(port, username="u", password="p").send(outgoing())


async def test_a_cancelled_send_drops_its_session_and_close_leaves_nothing_behind(
    make_provider: Any,
) -> None:
    answers = iter([HANG])
    hang_once = Script(replies={"RCPT": lambda: next(answers, "250 2.1.5 Ok")})
    async with scripted(hang_once) as port:
        provider = make_provider(port, timeout_s=30)
        task = asyncio.create_task(provider.send(outgoing()))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        receipt = await provider.send(outgoing())
        await provider.close()

    assert receipt.code == 250
    assert hang_once.connections == 2


async def test_close_waits_for_sends_in_flight(make_provider: Any) -> None:
    slow = Script(replies={"END": Slow("250 2.0.0 Ok", 0.2)})
    async with scripted(slow) as port:
        provider = make_provider(port)
        sends = [asyncio.create_task(provider.send(outgoing())) for _ in range(4)]
        await asyncio.sleep(0.1)
        await provider.close()
        assert all(s.done() for s in sends)
        receipts = await asyncio.gather(*sends)

    assert [r.code for r in receipts] == [250] * 4
    assert slow.commands.count("QUIT") == slow.connections


# -- pipelining across messages: the next envelope rides on the previous message's write --------


def numbered(i: int) -> Outgoing:
    mime = MIME.replace(b"<m1@", f"<m{i}@".encode()) + f".line {i}\r\n".encode()
    return outgoing(f"r{i}@example.test", mime=mime, id=f"m{i}")


def sent_by(script: Script, i: int) -> int:
    """How many times the scripted server received message i (its content, dot-stuffed)."""
    return sum(f"..line {i}\r\n".encode() in m for m in script.messages)


@pytest.mark.parametrize("pool_size", [1, 2])
async def test_many_sends_over_one_or_two_connections_arrive_intact_once_with_their_own_replies(
    smtpd: Any, make_provider: Any, pool_size: int
) -> None:
    handler = Recorder(pipelining=True)
    provider = make_provider(
        smtpd(handler).port, pool_size=pool_size, max_messages_per_connection=50
    )
    sends = [numbered(i) for i in range(200)]

    receipts = await asyncio.gather(*(provider.send(m) for m in sends))

    assert len(handler.messages) == 200
    for m, r in zip(sends, receipts, strict=True):
        assert r.code == 250
        assert r.provider_message_id is not None
        got = handler.messages[int(r.provider_message_id[1:]) - 1]  # the reply names its message
        assert got.rcpt_tos == list(m.rcpt_to)
        assert got.content == m.mime
    assert sorted(m.rcpt_tos[0] for m in handler.messages) == sorted(s.rcpt_to[0] for s in sends)
    assert provider.pipelined_transactions >= 150  # not every one: a new session starts clean
    per_connection = [
        sum(m.peer == peer for m in handler.messages) for peer in {m.peer for m in handler.messages}
    ]
    assert max(per_connection) <= 50 and len(per_connection) >= 4


async def test_no_pipelining_across_messages_without_pipelining(
    smtpd: Any, make_provider: Any
) -> None:
    handler = Recorder(pipelining=False)
    provider = make_provider(smtpd(handler).port, pool_size=1)

    receipts = await asyncio.gather(*(provider.send(numbered(i)) for i in range(10)))

    assert [r.code for r in receipts] == [250] * 10
    assert provider.pipelined_transactions == 0
    assert sorted(m.rcpt_tos[0] for m in handler.messages) == sorted(
        f"r{i}@example.test" for i in range(10)
    )


async def test_a_waiting_send_that_cannot_go_on_the_session_is_not_pipelined(
    smtpd: Any, make_provider: Any
) -> None:
    handler = Recorder(pipelining=True)
    provider = make_provider(smtpd(handler, data_size_limit=len(MIME) + 100).port, pool_size=1)
    big = outgoing("big@example.test", mime=MIME + b"x" * 200 + b"\r\n", id="big")

    first, second, third = await asyncio.gather(
        provider.send(numbered(1)), provider.send(big), provider.send(numbered(3)),
        return_exceptions=True,
    )  # fmt: skip

    assert first.code == 250 and third.code == 250
    assert type(second) is PermanentError and second.code == 552  # in its own turn, as before
    assert provider.pipelined_transactions == 0  # the big one waited at the head: nobody rode
    assert [m.rcpt_tos for m in handler.messages] == [["r1@example.test"], ["r3@example.test"]]


async def test_452_too_many_recipients_then_the_next_send_rides_on_the_last_batch(
    smtpd: Any, make_provider: Any
) -> None:
    handler = Recorder(pipelining=True, max_rcpts=2)
    provider = make_provider(smtpd(handler).port, pool_size=1)
    rcpts = [f"r{i}@example.test" for i in range(5)]

    many, after = await asyncio.gather(
        provider.send(outgoing(*rcpts, id="many")), provider.send(numbered(9))
    )

    assert many.provider_message_id == "Q1" and after.provider_message_id == "Q4"
    assert [m.rcpt_tos for m in handler.messages] == [
        rcpts[:2],
        rcpts[2:4],
        rcpts[4:],
        ["r9@example.test"],
    ]
    assert provider.pipelined_transactions == 1  # only behind the last batch
    assert handler.connections == 1


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll: the provider has no event for "an envelope went out behind a message"."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)


async def run_pair(provider: SMTPProvider) -> list[Any]:
    """Two sends over a pool of one: the second's envelope goes out behind the first's data."""
    return await asyncio.gather(
        provider.send(numbered(1)), provider.send(numbered(2)), return_exceptions=True
    )


@pytest.mark.parametrize(
    ("reply", "error", "code"),
    [
        ("554 5.7.1 spam", PermanentError, 554),
        ("451 4.3.0 local error, try again in 2 minutes", TransientError, 451),
    ],
)
async def test_a_message_refused_at_end_of_data_leaves_the_next_ones_replies_to_it(
    make_provider: Any, reply: str, error: type[Exception], code: int
) -> None:
    ends = iter([Slow(reply, 0.05), "250 2.0.0 Ok: queued as SECOND"])
    script = Script(replies={"END": lambda: next(ends)})
    async with scripted(script) as port:
        provider = make_provider(port, pool_size=1)
        first, second = await run_pair(provider)
        await provider.close()

    assert type(first) is error and first.code == code
    assert second.code == 250 and second.provider_message_id == "SECOND"
    assert provider.pipelined_transactions == 1
    assert script.connections == 1  # the replies stayed in step: the session went on
    assert script.commands == ["EHLO", *["MAIL", "RCPT", "DATA", "END"] * 2, "QUIT"]  # no RSET
    assert (sent_by(script, 1), sent_by(script, 2)) == (1, 1)


async def test_a_421_at_end_of_data_sends_the_pipelined_message_again_on_a_new_connection(
    make_provider: Any,
) -> None:
    ends = iter(["421 4.3.0 fake.test shutting down"])
    script = Script(replies={"END": lambda: next(ends, "250 2.0.0 Ok: queued as AGAIN")})
    async with scripted(script) as port:
        provider = make_provider(port, pool_size=1)
        first, second = await run_pair(provider)
        await provider.close()

    assert isinstance(first, ProviderFault) and first.code == 421
    assert second.code == 250 and second.provider_message_id == "AGAIN"
    assert script.connections == 2
    assert (sent_by(script, 1), sent_by(script, 2)) == (1, 1)


@pytest.mark.parametrize(
    ("replies", "first_error", "second_error", "connections"),
    [
        # the first message's final reply never comes: it may have arrived (at least once);
        # the second's MAIL FROM was never answered: it goes again on a fresh connection
        ({"END": iter([DROP])}, "connection lost at end of data", None, 2),
        # the first is accepted, the connection goes before the second's MAIL FROM is answered
        ({"MAIL": iter(["250 2.1.0 Ok", DROP])}, None, None, 2),
        # the second's MAIL FROM was answered: as on any session, a loss after that is transient
        ({"RCPT": iter(["250 2.1.5 Ok", DROP])}, None, "connection lost at RCPT TO", 1),
    ],
    ids=["drop-at-first-end", "drop-at-second-mail", "drop-at-second-rcpt"],
)
async def test_a_connection_lost_in_the_middle_of_a_pipelined_pair(
    make_provider: Any,
    replies: dict[str, Iterator[Any]],
    first_error: str | None,
    second_error: str | None,
    connections: int,
) -> None:
    defaults = Script()
    script = Script(
        replies={v: (lambda v=v, it=it: next(it, defaults.reply(v))) for v, it in replies.items()}
    )
    async with scripted(script) as port:
        provider = make_provider(port, pool_size=1)
        results = await run_pair(provider)
        await provider.close()

    assert provider.pipelined_transactions >= 1
    for i, (result, expected) in enumerate(
        zip(results, (first_error, second_error), strict=True), 1
    ):
        if expected is None:
            assert result.code == 250, result
            assert sent_by(script, i) == 1
        else:
            assert type(result) is TransientError
            assert expected in str(result)
    assert script.connections == connections


async def test_a_pipelined_send_keeps_its_step_timeout(make_provider: Any) -> None:
    rcpts = iter(["250 2.1.5 Ok", HANG])
    script = Script(replies={"RCPT": lambda: next(rcpts, "250 2.1.5 Ok")})
    async with scripted(script) as port:
        provider = make_provider(port, pool_size=1, timeout_s=TIMEOUT_S)
        started = time.monotonic()
        first, second = await run_pair(provider)
        assert time.monotonic() - started < TIMEOUT_S + 0.5
        await provider.close()

    assert first.code == 250
    assert type(second) is TransientError
    assert "timed out (0.5 s) waiting for the reply to RCPT TO" in str(second)


async def test_a_send_cancelled_while_its_envelope_is_on_the_wire_drops_the_session(
    make_provider: Any,
) -> None:
    script = Script(replies={"END": Slow("250 2.0.0 Ok: queued as X", 0.5)})
    async with scripted(script) as port:
        provider = make_provider(port, pool_size=1)
        first = asyncio.create_task(provider.send(numbered(1)))
        second = asyncio.create_task(provider.send(numbered(2)))
        await until(lambda: provider.pipelined_transactions == 1)  # the first waits for its reply
        second.cancel()
        assert (await first).code == 250
        with pytest.raises(asyncio.CancelledError):
            await second
        third = await provider.send(numbered(3))
        await provider.close()

    assert third.code == 250
    assert script.connections == 2  # nobody answered the second's commands: not reused
    assert [sent_by(script, i) for i in (1, 2, 3)] == [1, 0, 1]


async def test_close_lets_a_pipelined_send_finish_and_refuses_the_ones_still_waiting(
    make_provider: Any,
) -> None:
    script = Script(replies={"END": Slow("250 2.0.0 Ok", 0.3)})
    async with scripted(script) as port:
        provider = make_provider(port, pool_size=1)
        sends = [asyncio.create_task(provider.send(numbered(i))) for i in range(4)]
        await until(lambda: provider.pipelined_transactions == 1)
        await provider.close()
        assert all(s.done() for s in sends)
        results = await asyncio.gather(*sends, return_exceptions=True)

    assert [getattr(r, "code", None) for r in results[:2]] == [250, 250]
    assert all(isinstance(r, ProviderFault) and "closed" in str(r) for r in results[2:])
    assert script.commands.count("QUIT") == script.connections == 1


async def test_random_faults_never_give_a_send_another_messages_outcome(
    make_provider: Any,
) -> None:
    """300 sends over 2 connections; the server refuses, defers, drops, closes or answers twice
    at random at the end of data (decided per message) and drops some connections at MAIL FROM.
    Every send must get the outcome of its own message, and no message may reach the server
    twice."""
    import random
    import re

    rng = random.Random(2920)
    answers: dict[int, list[str]] = {}

    def end() -> Any:
        i = int(re.findall(rb"\.\.line (\d+)\r\n", script.messages[-1])[-1])
        kind = random.Random(i).choices(
            ["250", "554", "451", "DROP", "421", "ODD"], weights=[65, 7, 7, 7, 7, 7]
        )[0]
        answers.setdefault(i, []).append(kind)
        return {
            "250": f"250 2.0.0 Ok: queued as Q{i}",
            "554": f"554 5.7.1 no {i}",
            "451": f"451 4.3.0 later {i}",
            "DROP": DROP,
            "421": Close(f"421 4.3.0 bye {i}"),
            "ODD": f"252 2.0.0 odd {i}\r\n250 2.0.0 a stray reply",  # two replies to one command
        }[kind]

    script = Script(
        replies={"END": end, "MAIL": lambda: DROP if rng.random() < 0.03 else "250 2.1.0 Ok"}
    )
    async with scripted(script) as port:
        provider = make_provider(port, pool_size=2)
        results = await asyncio.gather(
            *(provider.send(numbered(i)) for i in range(300)), return_exceptions=True
        )
        await provider.close()

    assert provider.pipelined_transactions > 100
    assert all(len(a) == 1 for a in answers.values())  # no message content went twice
    for i, r in enumerate(results):
        got = answers.get(i, [None])[0]
        if isinstance(r, BaseException):
            assert got != "250", (i, r)
        if got == "250":
            assert r.provider_message_id == f"Q{i}", (i, r)
        elif got == "554":
            assert type(r) is PermanentError and r.text == f"5.7.1 no {i}", (i, r)
        elif got == "451":
            assert type(r) is TransientError and r.text == f"4.3.0 later {i}", (i, r)
        elif got == "421":
            assert type(r) is ProviderFault and f"421 4.3.0 bye {i}" in str(r), (i, r)
        elif got == "ODD":
            assert type(r) is TransientError and f"end of data: 252 2.0.0 odd {i}" in str(r)
        elif got == "DROP":
            assert type(r) is TransientError and "connection lost at end of data" in str(r)
        else:  # its content never reached the server: a connection lost before
            assert type(r) is TransientError and "connection lost at" in str(r), (i, r)
    assert {"250", "554", "451", "DROP", "421", "ODD"} <= {a[0] for a in answers.values()}


# -- TLS and AUTH --------------------------------------------------------------------------------


def authenticator(
    server: Any, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and auth_data == (b"user", "sécret".encode())
    return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd answers 535


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_auth_succeeds_with_plain_or_login(
    smtpd: Any, make_provider: Any, mechanism: str
) -> None:
    handler = Recorder(pipelining=True)
    exclude = ["PLAIN"] if mechanism == "LOGIN" else []
    port = smtpd(
        handler,
        authenticator=authenticator,
        auth_require_tls=False,
        auth_exclude_mechanism=exclude,
    ).port
    provider = make_provider(port, username="user", password="sécret")

    await provider.send(outgoing())

    assert handler.messages[0].authenticated is True


async def test_auth_failure_is_a_provider_fault(smtpd: Any, make_provider: Any) -> None:
    port = smtpd(Recorder(), authenticator=authenticator, auth_require_tls=False).port
    provider = make_provider(port, username="user", password="wrong")

    with pytest.raises(ProviderFault, match="authentication failed: 535") as info:
        await provider.send(outgoing())
    assert info.value.code == 535


async def test_starttls_then_auth_with_a_self_signed_certificate(
    smtpd: Any, make_provider: Any, server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    handler = Recorder(pipelining=True)
    port = smtpd(
        handler,
        tls_context=server_tls,
        require_starttls=True,
        authenticator=authenticator,
        auth_required=True,
    ).port

    trusting = make_provider(
        port, starttls=True, ssl_context=client_tls, username="user", password="sécret"
    )
    await trusting.send(outgoing())
    lax = make_provider(port, starttls=True, verify_tls=False, username="user", password="sécret")
    await lax.send(outgoing())
    strict = make_provider(port, starttls=True, username="user", password="sécret")
    with pytest.raises(ProviderFault, match="TLS handshake failed"):
        await strict.send(outgoing())

    assert len(handler.messages) == 2
    assert all(m.content == MIME and m.authenticated for m in handler.messages)


async def test_implicit_tls(
    smtpd: Any, make_provider: Any, server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    handler = Recorder(pipelining=True)
    port = smtpd(handler, ssl_context=server_tls).port

    await make_provider(port, tls=True, ssl_context=client_tls).send(outgoing())
    await make_provider(port, tls=True, verify_tls=False).send(outgoing())
    with pytest.raises(ProviderFault, match="connect failed: SSLCertVerificationError"):
        await make_provider(port, tls=True).send(outgoing())

    assert [m.content for m in handler.messages] == [MIME, MIME]


# -- small pieces --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("4.7.1 Greylisted, try again in 5 minutes", 300),
        ("4.7.0 retry after 300 seconds", 300),
        ("Please retry in 90s", 90),
        ("try again in 1 hour", 3600),
        ("4.2.2 mailbox full", None),
        ("try again later", None),
    ],
)
def test_retry_after_hint(text: str, seconds: float | None) -> None:
    assert retry_after_hint(text) == seconds


async def test_a_closed_provider_refuses_to_send(smtpd: Any, make_provider: Any) -> None:
    provider = make_provider(smtpd(Recorder()).port)
    assert isinstance(provider, Provider) and provider.kind == "smtp"
    await provider.send(outgoing())
    await provider.close()
    with pytest.raises(ProviderFault, match="closed"):
        await provider.send(outgoing())
