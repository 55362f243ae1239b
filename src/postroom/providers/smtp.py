"""SMTP provider: a pooled asyncio SMTP client with RFC 2920 pipelining, STARTTLS and AUTH.

Classification (the one place SMTP answers become Postroom errors):

* before a transaction starts (connect, DNS, TLS, greeting not 220, EHLO/HELO refused, STARTTLS
  missing, AUTH refused, a connection lost or a timeout during any of these) -> ProviderFault;
* 421 at any point, and 530/534/535/538 (authentication required/failed) -> ProviderFault;
* once MAIL FROM is written: a timeout or a lost connection -> TransientError (the message may be
  retried; if the final reply was lost the receiver may have the message: at least once);
* 4xx to MAIL / RCPT / DATA / end of data -> TransientError with code, text and the delay hint
  ("try again in 5 minutes") as retry_after_s; 5xx -> PermanentError with code and text;
* some recipients refused with 5xx, at least one accepted -> sent, the refusals noted in the
  Receipt text. Any 4xx recipient aborts the whole transaction (TransientError) so that nobody
  gets the message twice; 452 after an accepted recipient ("too many recipients") sends the rest in
  a further transaction, as RFC 5321 4.5.3.1.10 asks.

Timeouts: opening a session runs under asyncio.timeout, rescheduled at each step; in a transaction
each step only moves the session's deadline, and one watchdog timer per provider aborts the
connection of a session past its deadline (no timer per reply on the hot path).

Pipelining across messages: when sends are waiting for a session and the server offers PIPELINING,
a transaction writes the first waiting send's MAIL/RCPT/DATA right after its own content and end
of data, in the same write (RFC 2920 3.1: message content may be the first "command" of a group,
DATA the last), and hands the session on to that send after its own final reply: that send then
reads the replies to its commands, which come next, in order. The final reply decides:

* 250, or a 4xx/5xx other than 421: the transaction is over on the server (no RSET) and the next
  send reads its replies on the session, classified as on any reused session (421 or a lost
  connection at MAIL FROM: it starts again on a fresh session, nothing was taken);
* anything else (421, a lost connection, a timeout, a garbled or unexpected reply): the session
  is dropped and the next send starts again on a fresh session; its MAIL FROM was never answered,
  so the server discarded the incomplete transaction. (An unexpected final reply drops the
  session without pipelining too, where it used to be followed by RSET: after a reply that makes
  no sense, the next one may not answer the RSET.)

A send whose envelope rides on another's write never gets a reply meant for someone else: each
send reads only after the one before it on the session has read its final reply.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import Sequence

from postroom.domain.errors import PermanentError, ProviderError, ProviderFault, TransientError
from postroom.domain.mime import dot_stuff
from postroom.domain.model import Outgoing, Receipt

__all__ = ["SMTPProvider"]


_now = time.monotonic  # the watchdog's clock
_QUIT_TIMEOUT_S = 5.0
_MIN_UPLOAD_BYTES_PER_S = 100_000  # the payload step gets timeout_s plus its size at this rate
_AUTH_CODES = frozenset({530, 534, 535, 538})  # auth required / too weak / failed / needs TLS

# "250 2.0.0 Ok: queued as 4F1A2B" (Postfix, SendGrid, ...), "250 OK id=1tOxyz-000ABC-12" (Exim)
_QUEUED_AS = re.compile(rb"queued as\s+<?([\w.@:/+=-]+)>?|\bid=<?([\w.@:/+=-]+)>?")
_RETRY_HINT = re.compile(
    r"(?:try(?:\s+again)?|retry)\s+(?:again\s+)?(?:in|after)\s+(\d+(?:\.\d+)?)\s*"
    r"(seconds?|secs?|s|minutes?|mins?|m|hours?|hrs?|h)\b",
    re.IGNORECASE,
)
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0}


def retry_after_hint(text: str) -> float | None:
    """The delay a server asks for, in seconds ("try again in 5 minutes"), if the text has one."""
    m = _RETRY_HINT.search(text)
    if m is None:
        return None
    return float(m.group(1)) * _UNIT_S[m.group(2)[0].lower()]


class _ProtocolError(ValueError):
    """The server said something that is not an SMTP reply."""


# Errors that make a session unusable: OSError covers resets, TimeoutError and ssl.SSLError;
# EOFError is asyncio.IncompleteReadError (the server closed); the rest are garbled replies.
_CONNECTION_ERRORS = (OSError, EOFError, asyncio.LimitOverrunError, _ProtocolError)


class _Stale(Exception):
    """A reused session turned out to be closed by the server while it sat idle."""


def _reply_line(line: bytes) -> tuple[int, bytes]:
    """A one-line reply ("250 2.1.0 Ok\\r\\n"): the hot path, no coroutine."""
    if not line[:3].isdigit():
        raise _ProtocolError(f"not an SMTP reply: {line[:80]!r}")
    return int(line[:3]), line[4:].rstrip()


async def _reply_rest(reader: asyncio.StreamReader, line: bytes) -> tuple[int, bytes]:
    """A reply whose first line is `line`, read to its last line (LF-joined text)."""
    code_b = line[:3]
    if not code_b.isdigit():
        raise _ProtocolError(f"not an SMTP reply: {line[:80]!r}")
    parts = [line[4:].rstrip()]
    while line[3:4] == b"-":
        line = await reader.readuntil(b"\n")
        if line[:3] != code_b:
            raise _ProtocolError(f"inconsistent multi-line reply: {line[:80]!r}")
        parts.append(line[4:].rstrip())
    return int(code_b), b"\n".join(parts)


async def _read_reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One reply: its code and its text (the lines of a multi-line reply joined by LF).

    The transaction inlines this as `_reply_line(line) if line[3:4] == b" " else await
    _reply_rest(reader, line)` to spare a coroutine per reply."""
    line = await reader.readuntil(b"\n")
    return _reply_line(line) if line[3:4] == b" " else await _reply_rest(reader, line)


def _queue_id(text: bytes) -> str | None:
    """The server's id for an accepted message, when its reply names one."""
    lower = text.lower()
    if b"queued as" not in lower and b"id=" not in lower:  # most replies: skip the regex
        return None
    m = _QUEUED_AS.search(lower)
    if m is None:
        return None
    start, end = m.span(1) if m.group(1) else m.span(2)
    return text[start:end].decode("ascii", "replace")  # the id as the server wrote it


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").replace("\n", " ")


class _Session:
    """One SMTP connection and what its server offers."""

    __slots__ = (
        "auth",
        "deadline",
        "eightbit",
        "last_used_s",
        "next",
        "ok",
        "pipelining",
        "reader",
        "size",
        "smtputf8",
        "stage",
        "starttls",
        "timed_out",
        "transactions",
        "writer",
    )

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.pipelining = False
        self.size = 0  # 0: no limit announced
        self.eightbit = False
        self.smtputf8 = False
        self.starttls = False
        self.auth: list[str] = []
        self.transactions = 0
        self.last_used_s = time.monotonic()
        self.ok = False  # True only between transactions, when the session is known to be clean
        self.stage = "connect"
        self.deadline = 0.0  # loop time by which the pending step must be done (the watchdog's)
        self.timed_out = False
        self.next: _Waiter | None = None  # the send whose envelope follows this transaction's data

    def parse_ehlo(self, text: bytes) -> None:
        self.pipelining = self.eightbit = self.smtputf8 = self.starttls = False
        self.size = 0
        self.auth = []
        for line in text.split(b"\n")[1:]:  # the first line is the server's greeting name
            keyword, _, params = line.decode("ascii", "replace").strip().partition(" ")
            keyword = keyword.upper()
            if keyword == "PIPELINING":
                self.pipelining = True
            elif keyword == "SIZE":
                self.size = int(params) if params.strip().isdigit() else 0
            elif keyword == "8BITMIME":
                self.eightbit = True
            elif keyword == "SMTPUTF8":
                self.smtputf8 = True
            elif keyword == "STARTTLS":
                self.starttls = True
            elif keyword == "AUTH":
                self.auth = params.upper().split()
            elif keyword.startswith("AUTH=") and not self.auth:  # old Outlook/Exim style
                self.auth = [keyword[5:], *params.upper().split()]

    def abort(self) -> None:
        self.ok = False
        self.writer.transport.abort()


class _Waiter:
    """A send waiting for a slot. A session may carry its envelope ahead of its turn: `taken` then,
    and that session's current send answers `future` (the session, or None when it failed)."""

    __slots__ = ("future", "mail_from", "payload", "rcpts", "size", "taken")

    def __init__(
        self,
        future: asyncio.Future[_Session | None],
        mail_from: str,
        rcpts: Sequence[str],
        payload: bytes,
        size: int,
    ) -> None:
        self.future = future
        self.mail_from = mail_from
        self.rcpts = rcpts
        self.payload = payload
        self.size = size
        self.taken = False


class SMTPProvider:
    """Delivers through one SMTP server (relay or smarthost) over a pool of persistent sessions.

    Each `send` takes a session from the pool (opening one if fewer than `pool_size` are open),
    runs one transaction -- pipelined when the server offers PIPELINING -- and puts the session
    back, or hands it to a waiting send whose envelope it wrote after its own message (see the
    module docstring). `timeout_s` bounds every network step (connect, TLS handshake, each reply).
    """

    kind = "smtp"

    def __init__(
        self,
        name: str,
        *,
        host: str,
        port: int = 25,
        username: str | None = None,
        password: str | None = None,
        starttls: bool = False,
        tls: bool = False,
        verify_tls: bool = True,
        ssl_context: ssl.SSLContext | None = None,
        helo_name: str | None = None,
        pool_size: int = 8,
        timeout_s: float = 30.0,
        max_messages_per_connection: int = 1000,
        idle_timeout_s: float = 60.0,
    ) -> None:
        if starttls and tls:
            raise ValueError("starttls and tls (implicit TLS) exclude each other")
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if username is not None and password is None:
            raise ValueError("username is set but password is not")
        self.name = name
        self.host = host
        self.port = port
        self.username = username
        self.password = password
        self.starttls = starttls
        self.tls = tls
        self.verify_tls = verify_tls
        self.helo_name = helo_name
        self.pool_size = pool_size
        self.timeout_s = timeout_s
        self.max_messages_per_connection = max(1, max_messages_per_connection)
        self.idle_timeout_s = idle_timeout_s
        if ssl_context is None and (tls or starttls):
            # Built here, not on the event loop: loading the CA store blocks for a while.
            ssl_context = ssl.create_default_context()
            if not verify_tls:
                ssl_context.check_hostname = False
                ssl_context.verify_mode = ssl.CERT_NONE
        self._ssl_context = ssl_context
        self._free = pool_size  # slots nobody holds
        self._waiters: deque[_Waiter] = deque()  # sends waiting for a slot, first come first
        self._idle: deque[_Session] = deque()  # the most recently used on the right
        self._active = 0  # sends holding a slot
        self.pipelined_transactions = 0  # envelopes written behind the previous message's data
        self._drained = asyncio.Event()
        self._closing: set[asyncio.Task[None]] = set()  # sessions being QUIT in the background
        self._closed = False
        self._busy: set[_Session] = set()  # sessions in a transaction, for the watchdog
        self._watchdog: asyncio.TimerHandle | None = None
        self._tick_s = min(1.0, max(0.01, timeout_s / 10))  # how late a step timeout may fire

    def __repr__(self) -> str:
        return f"SMTPProvider({self.name!r}, host={self.host!r}, port={self.port})"

    # -- the Provider protocol ----------------------------------------------------------------

    async def send(self, message: Outgoing) -> Receipt:
        rcpts = message.rcpt_to
        if not rcpts:
            raise PermanentError("the message has no recipients", provider=self.name)
        mime = message.mime
        mail_from = message.mail_from
        payload = dot_stuff(mime)
        size = len(mime) if mime.endswith(b"\r\n") else len(mime) + 2  # RFC 1870: unstuffed
        if self._free and not self._waiters:
            self._free -= 1
            self._active += 1
            session = None
        else:  # a slot, or a session that already carries our envelope
            session = await self._wait(mail_from, rcpts, payload, size)
        handed_on = False  # the slot went on with the session to the send it carries
        try:
            primed = session is not None
            if session is None:
                if self._closed:
                    raise ProviderFault("provider is closed", provider=self.name)
                session = self._checkout()
                if session is None:
                    session = await self._connect()
            try:
                return await self._deliver(session, mail_from, rcpts, payload, size, primed)
            except _Stale:
                # The server closed the session (idle, or before answering the MAIL FROM that
                # rode on the previous message); nothing was taken.
                session.abort()
                session = await self._connect()
                return await self._deliver(session, mail_from, rcpts, payload, size, False)
            finally:
                handed_on = self._pass_on(session)
        finally:
            self._active -= 1
            if not handed_on:
                self._release()
            if self._closed and not self._active:
                self._drained.set()

    async def close(self) -> None:
        """QUIT every session. Sends in flight finish first (bounded by their timeouts)."""
        self._closed = True
        while self._idle:
            self._retire(self._idle.pop())
        if self._active:
            await self._drained.wait()
        while self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    # -- the pool -----------------------------------------------------------------------------

    async def _wait(
        self, mail_from: str, rcpts: Sequence[str], payload: bytes, size: int
    ) -> _Session | None:
        """Wait for a slot: None, or a session on which our envelope was already written."""
        waiter = _Waiter(
            asyncio.get_running_loop().create_future(), mail_from, rcpts, payload, size
        )
        self._waiters.append(waiter)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if not waiter.future.cancelled():  # given a slot just as we were cancelled
                session = waiter.future.result()
                if session is not None:
                    session.abort()  # our commands are on it, unanswered
                self._active -= 1
                self._release()
                if self._closed and not self._active:
                    self._drained.set()
            elif not waiter.taken:  # (a taken one: the session's send sees the cancelled future)
                with contextlib.suppress(ValueError):  # dropped by _release or _next_envelope
                    self._waiters.remove(waiter)
            raise

    def _release(self) -> None:
        """Give a slot back: to the first waiting send, if any."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.future.done():  # done: cancelled
                self._active += 1
                waiter.future.set_result(None)
                return
        self._free += 1

    def _next_envelope(self, session: _Session) -> bytes:
        """The first waiting send's MAIL/RCPT/DATA, to write after this session's message data;
        b"" when there is none or it cannot go on this session."""
        waiters = self._waiters
        while waiters and waiters[0].future.done():
            waiters.popleft()
        if (
            not waiters
            or self._closed
            or session.transactions + 2 > self.max_messages_per_connection
        ):
            return b""
        waiter = waiters[0]
        try:
            _, _, group = self._envelope(
                session, waiter.mail_from, waiter.rcpts, waiter.payload, waiter.size
            )
        except ProviderError:
            return b""  # it fails in its own turn
        waiters.popleft()
        waiter.taken = True
        session.next = waiter
        self.pipelined_transactions += 1
        return group

    def _pass_on(self, session: _Session) -> bool:
        """A send is done with `session`: back to the pool, or on, with the slot, to the send whose
        envelope followed its message (True). That send gets None when the session failed before
        its MAIL FROM was answered: it starts again on a fresh one."""
        waiter = session.next
        if waiter is None:
            self._checkin(session)
            return False
        session.next = None
        if waiter.future.done():  # cancelled, with its commands on the wire: nobody can go on
            session.abort()
            return False
        if not session.ok:
            session.abort()
        self._active += 1
        waiter.future.set_result(session if session.ok else None)
        return True

    def _checkout(self) -> _Session | None:
        idle = self._idle
        if not idle:
            return None
        deadline = time.monotonic() - self.idle_timeout_s
        while idle and idle[0].last_used_s < deadline:  # the least recently used first
            self._retire(idle.popleft())
        while idle:
            session = idle.pop()
            if not session.writer.transport.is_closing():
                return session
            session.abort()
        return None

    def _checkin(self, session: _Session) -> None:
        if not session.ok:
            session.abort()
        elif self._closed or session.transactions >= self.max_messages_per_connection:
            self._retire(session)
        else:
            session.last_used_s = time.monotonic()
            self._idle.append(session)

    def _retire(self, session: _Session) -> None:
        task = asyncio.get_running_loop().create_task(self._quit(session))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _quit(self, session: _Session) -> None:
        writer = session.writer
        try:
            async with asyncio.timeout(min(self.timeout_s, _QUIT_TIMEOUT_S)):
                writer.write(b"QUIT\r\n")
                await writer.drain()
                await _read_reply(session.reader)
                writer.close()
                await writer.wait_closed()
        except (TimeoutError, *_CONNECTION_ERRORS):
            pass  # the session is going away either way
        finally:
            writer.transport.abort()

    # -- opening a session --------------------------------------------------------------------

    def _tls_context(self) -> ssl.SSLContext:
        assert self._ssl_context is not None  # made in __init__ when tls or starttls is set
        return self._ssl_context

    def _fault(self, text: str, code: int | None = None) -> ProviderFault:
        return ProviderFault(f"{self.host}:{self.port}: {text}", code=code, provider=self.name)

    async def _connect(self) -> _Session:
        session: _Session | None = None
        stage = "connect"
        try:
            async with asyncio.timeout(self.timeout_s) as timer:
                ctx = self._tls_context() if self.tls else None
                reader, writer = await asyncio.open_connection(
                    self.host,
                    self.port,
                    ssl=ctx,
                    server_hostname=self.host if ctx else None,
                    ssl_handshake_timeout=self.timeout_s if ctx else None,
                )
                session = _Session(reader, writer)
                self._step(timer)
                stage = "greeting"
                code, text = await _read_reply(reader)
                if code != 220:
                    raise self._fault(f"greeting {code} {_text(text)}", code)
                stage = "EHLO"
                await self._ehlo(session, timer)
                if self.starttls:
                    if not session.starttls:
                        raise self._fault("the server does not offer STARTTLS")
                    stage = "STARTTLS"
                    code, text = await self._command(session, timer, b"STARTTLS\r\n")
                    if code != 220:
                        raise self._fault(f"STARTTLS refused: {code} {_text(text)}", code)
                    stage = "TLS handshake"
                    self._step(timer)
                    await writer.start_tls(
                        self._tls_context(),
                        server_hostname=self.host,
                        ssl_handshake_timeout=self.timeout_s,
                    )
                    stage = "EHLO after STARTTLS"
                    await self._ehlo(session, timer)
                if self.username is not None:
                    stage = "AUTH"
                    await self._auth(session, timer)
        except BaseException as e:  # whatever happened, the half-open session goes
            if session is not None:
                session.abort()
            if isinstance(e, TimeoutError):
                raise self._fault(f"timed out ({self.timeout_s:g} s) at {stage}") from None
            if isinstance(e, _CONNECTION_ERRORS):
                raise self._fault(f"{stage} failed: {type(e).__name__}: {e}") from e
            raise
        session.ok = True
        return session

    def _ehlo_name(self, writer: asyncio.StreamWriter) -> bytes:
        if self.helo_name is None:
            name = socket.gethostname()
            if "." not in name:  # not a domain: use the address literal (RFC 5321 4.1.4)
                addr = writer.get_extra_info("sockname")[0]
                name = f"[IPv6:{addr}]" if ":" in addr else f"[{addr}]"
            self.helo_name = name
        return self.helo_name.encode("idna" if not self.helo_name.isascii() else "ascii")

    async def _ehlo(self, session: _Session, timer: asyncio.Timeout) -> None:
        name = self._ehlo_name(session.writer)
        code, text = await self._command(session, timer, b"EHLO " + name + b"\r\n")
        if code == 250:
            session.parse_ehlo(text)
            return
        if code == 421 or not 500 <= code < 600:
            raise self._fault(f"EHLO refused: {code} {_text(text)}", code)
        code, text = await self._command(session, timer, b"HELO " + name + b"\r\n")
        if code != 250:
            raise self._fault(f"HELO refused: {code} {_text(text)}", code)
        session.parse_ehlo(b"")

    async def _auth(self, session: _Session, timer: asyncio.Timeout) -> None:
        assert self.username is not None and self.password is not None
        user = self.username.encode()
        password = self.password.encode()
        if "PLAIN" in session.auth:
            token = base64.b64encode(b"\0" + user + b"\0" + password)
            code, text = await self._command(session, timer, b"AUTH PLAIN " + token + b"\r\n")
        elif "LOGIN" in session.auth:
            code, text = await self._command(session, timer, b"AUTH LOGIN\r\n")
            if code == 334:
                code, text = await self._command(session, timer, base64.b64encode(user) + b"\r\n")
            if code == 334:
                code, text = await self._command(
                    session, timer, base64.b64encode(password) + b"\r\n"
                )
        elif session.auth:
            raise self._fault(f"no AUTH mechanism we support (PLAIN, LOGIN): {session.auth}")
        else:
            hint = (
                "" if self.tls or self.starttls else " (many servers offer it only after STARTTLS)"
            )
            raise self._fault(f"the server does not offer AUTH{hint}")
        if code != 235:
            raise self._fault(f"authentication failed: {code} {_text(text)}", code)

    def _step(self, timer: asyncio.Timeout) -> None:
        """While opening a session: the next step gets the full timeout_s."""
        timer.reschedule(asyncio.get_running_loop().time() + self.timeout_s)

    async def _command(
        self, session: _Session, timer: asyncio.Timeout, line: bytes
    ) -> tuple[int, bytes]:
        session.writer.write(line)
        self._step(timer)
        return await _read_reply(session.reader)

    # -- transactions -------------------------------------------------------------------------

    async def _deliver(
        self,
        session: _Session,
        mail_from: str,
        rcpts: Sequence[str],
        payload: bytes,
        size: int,
        primed: bool,
    ) -> Receipt:
        """Run transactions until every recipient had its answer (more than one only after 452).
        `primed`: the first transaction's commands are already written."""
        receipt: Receipt | None = None
        notes: list[str] = []
        pending: Sequence[str] = rcpts
        while pending:
            try:
                code, text, refused, pending = await self._transaction(
                    session,
                    mail_from,
                    pending,
                    payload,
                    size,
                    # a stale session may be replaced, but never after a batch went out
                    reused=receipt is None and session.transactions > 0,
                    primed=primed,
                )
            except ProviderError as e:
                if receipt is None:
                    raise
                # A later batch failed; the earlier ones went: report, do not resend to them.
                notes.append(f"not sent to {len(pending)} recipient(s): {e}")
                break
            finally:
                session.transactions += 1
                primed = False
            notes.extend(refused)
            if receipt is None:
                receipt = Receipt(self.name, code, _text(text), _queue_id(text))
        assert receipt is not None
        if notes:
            receipt.text += "; refused: " + "; ".join(notes)
        return receipt

    def _envelope(
        self, session: _Session, mail_from: str, rcpts: Sequence[str], payload: bytes, size: int
    ) -> tuple[bytes, list[bytes], bytes]:
        """MAIL FROM, the RCPT TOs, and all of them with DATA as one pipelined write."""
        params = b""
        if session.size:
            if size > session.size:
                raise PermanentError(
                    f"message size {size} exceeds the server limit {session.size}",
                    code=552,
                    provider=self.name,
                )
            params = b" SIZE=%d" % size
        if session.eightbit and not payload.isascii():
            params += b" BODY=8BITMIME"
        rcpt_cmds = [b"RCPT TO:<%s>\r\n" % r.encode() for r in rcpts]
        mail_cmd = b"MAIL FROM:<%s>%s\r\n" % (mail_from.encode(), params)
        group = b"".join((mail_cmd, *rcpt_cmds, b"DATA\r\n"))
        lines = len(rcpt_cmds) + 2
        if group.count(b"\n") != lines or group.count(b"\r") != lines:  # no command injection
            raise PermanentError("an envelope address contains a line break", provider=self.name)
        if not group.isascii():
            if not session.smtputf8:
                raise PermanentError(
                    "non-ASCII addresses need SMTPUTF8, which the server does not offer",
                    provider=self.name,
                )
            mail_cmd = mail_cmd[:-2] + b" SMTPUTF8\r\n"
            group = b"".join((mail_cmd, *rcpt_cmds, b"DATA\r\n"))

        return mail_cmd, rcpt_cmds, group

    async def _transaction(
        self,
        session: _Session,
        mail_from: str,
        rcpts: Sequence[str],
        payload: bytes,
        size: int,
        *,
        reused: bool,
        primed: bool,
    ) -> tuple[int, bytes, list[str], Sequence[str]]:
        """One MAIL..DATA transaction. Returns the final reply, refusal notes and the recipients
        to send in a next transaction (after 452 too many recipients). `primed`: MAIL, RCPT and
        DATA were written behind the previous message on this session; read their replies."""
        reader = session.reader
        writer = session.writer
        readuntil = reader.readuntil
        step_s = self.timeout_s

        rcpt_cmds: list[bytes] = []
        if primed:
            mail_cmd = group = b""
        else:
            mail_cmd, rcpt_cmds, group = self._envelope(session, mail_from, rcpts, payload, size)
        pipelining = session.pipelining
        accepted = 0
        refused: list[tuple[str, int, bytes]] = []
        deferred: list[tuple[str, int, bytes]] = []  # 4xx: aborts the transaction
        too_many: list[str] = []  # 452 after an accepted recipient: next transaction
        data_code = 0
        data_text = b""
        session.ok = False  # until the transaction ends cleanly
        session.deadline = _now() + step_s  # each step moves it; the watchdog enforces it
        self._watch(session)
        try:
            # MAIL FROM (and with PIPELINING: every RCPT TO and DATA in the same write)
            session.stage = "MAIL FROM"
            if not primed:
                writer.write(group if pipelining else mail_cmd)
            try:
                line = await readuntil(b"\n")
                mail_code, mail_text = (
                    _reply_line(line) if line[3:4] == b" " else await _reply_rest(reader, line)
                )
            except _CONNECTION_ERRORS:
                if reused and not session.timed_out:
                    raise _Stale from None
                raise
            if mail_code == 421:
                if reused:
                    raise _Stale
                raise self._error(421, mail_text, "MAIL FROM")

            if pipelining or mail_code == 250:
                session.stage = "RCPT TO"
                for i, rcpt in enumerate(rcpts):
                    if not pipelining:
                        writer.write(rcpt_cmds[i])
                    session.deadline = _now() + step_s
                    line = await readuntil(b"\n")
                    code, text = (
                        _reply_line(line) if line[3:4] == b" " else await _reply_rest(reader, line)
                    )
                    if code == 250 or code == 251:
                        accepted += 1
                    elif code == 421:
                        raise self._error(421, text, "RCPT TO")
                    elif code == 452 and accepted:
                        too_many.append(rcpt)
                    elif 400 <= code < 500:
                        deferred.append((rcpt, code, text))
                    else:
                        refused.append((rcpt, code, text))

                if pipelining or (accepted and not deferred):
                    session.stage = "DATA"
                    if not pipelining:
                        writer.write(b"DATA\r\n")
                    session.deadline = _now() + step_s
                    line = await readuntil(b"\n")
                    data_code, data_text = (
                        _reply_line(line) if line[3:4] == b" " else await _reply_rest(reader, line)
                    )
                    if data_code == 421:
                        raise self._error(421, data_text, "DATA")

            if mail_code != 250:
                err = self._error(mail_code, mail_text, "MAIL FROM")
            elif deferred or not accepted:
                err = self._rcpt_error(deferred or refused)
            elif data_code != 354:
                err = self._error(data_code, data_text, "DATA")
            else:
                session.stage = "end of data"
                # The next waiting send's envelope in the same write, when there is one.
                after = (
                    self._next_envelope(session)
                    if self._waiters and pipelining and not too_many
                    else b""
                )
                writer.write(payload + after if after else payload)
                session.deadline = _now() + step_s + len(payload) / _MIN_UPLOAD_BYTES_PER_S
                await writer.drain()
                session.deadline = _now() + step_s
                line = await readuntil(b"\n")
                code, text = (
                    _reply_line(line) if line[3:4] == b" " else await _reply_rest(reader, line)
                )
                if code == 250:
                    session.ok = True
                    notes = [f"<{r}> {c} {_text(x)}" for r, c, x in refused] if refused else []
                    return code, text, notes, too_many
                err = self._error(code, text, "end of data")
                if code == 421 or not 400 <= code < 600:
                    # 421, or a reply that makes no sense here: whatever comes next on this
                    # session may not answer what we think; only closing is safe.
                    raise err
                if session.next is not None:
                    # The next send's commands follow on the wire (no RSET): their replies come
                    # next, in order.
                    session.ok = True
                    raise err
                data_code = 0  # the transaction is over on the server; RSET anyway

            # The transaction failed: make the session clean again, or give it up.
            if data_code == 354:
                # The server waits for content we will not send: only closing is safe.
                raise err
        except _CONNECTION_ERRORS as e:
            if session.timed_out:
                raise TransientError(
                    f"{self.host}:{self.port}: timed out ({step_s:g} s) waiting for the reply to "
                    f"{session.stage}",
                    provider=self.name,
                ) from None
            raise TransientError(
                f"{self.host}:{self.port}: connection lost at {session.stage}: "
                f"{type(e).__name__}: {e}",
                provider=self.name,
            ) from e
        finally:
            self._busy.discard(session)
        # RSET, under the watchdog too; if it fails the session is dropped, the error stands.
        session.stage = "RSET"
        session.deadline = _now() + step_s
        self._watch(session)
        try:
            writer.write(b"RSET\r\n")
            code, _ = await _read_reply(reader)
            session.ok = code == 250
        except _CONNECTION_ERRORS:
            pass
        finally:
            self._busy.discard(session)
        raise err

    # -- the watchdog: one timer per provider enforces every session's step deadline ---------

    def _watch(self, session: _Session) -> None:
        self._busy.add(session)
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().call_later(self._tick_s, self._on_tick)

    def _on_tick(self) -> None:
        now = _now()
        for session in [s for s in self._busy if s.deadline <= now]:
            # Aborting wakes the pending read or drain with a connection error; the
            # transaction sees `timed_out` and reports a timeout. No task is cancelled.
            session.timed_out = True
            self._busy.discard(session)
            session.abort()
        if self._busy:
            self._watchdog = asyncio.get_running_loop().call_later(self._tick_s, self._on_tick)
        else:
            self._watchdog = None

    def _error(self, code: int, raw: bytes, stage: str) -> ProviderError:
        text = _text(raw)
        if code == 421 or code in _AUTH_CODES:
            return self._fault(f"{stage}: {code} {text}", code)
        if 400 <= code < 500:
            return TransientError(
                text, code=code, retry_after_s=retry_after_hint(text), provider=self.name
            )
        if 500 <= code < 600:
            return PermanentError(text, code=code, provider=self.name)
        return TransientError(
            f"unexpected reply to {stage}: {code} {text}", code=code, provider=self.name
        )

    def _rcpt_error(self, refusals: list[tuple[str, int, bytes]]) -> ProviderError:
        """Every recipient refused (or one deferred): the first refusal decides the class."""
        _, code, raw = refusals[0]
        err = self._error(code, raw, "RCPT TO")
        if len(refusals) == 1:
            return err
        text = "; ".join(f"<{r}> {c} {_text(x)}" for r, c, x in refusals)
        return type(err)(text, code=code, retry_after_s=err.retry_after_s, provider=self.name)
