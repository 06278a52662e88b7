"""Reaching a hub from a client: connect, register, retry with back-off while it is away."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from .protocol import (
    ENDS_CONVERSATION,
    RETRY_LATER,
    Chat,
    ErrorCode,
    Hello,
    Notice,
    Refusal,
    encode,
    parse_server_frame,
)

log = logging.getLogger("partychat.connection")

MAX_BACKOFF = 30.0
WELCOME_TIMEOUT = 15.0


class HubRefused(Exception):
    """The hub answered but will not let us in; retrying would not help."""

    def __init__(self, code: str, sentence: str) -> None:
        super().__init__(sentence)
        self.code = code


class HubGone(Exception):
    """The hub ended the connection (it stopped or restarted); try to reconnect."""




@dataclass
class Session:
    """A registered connection; ``extended`` is False on a hub that speaks only the baseline."""

    ws: ClientConnection
    extended: bool
    room: str | None = None
    """The conversation's id; when it changes, sequence numbers from before mean nothing."""
    secret: str | None = None
    """Presented on reconnecting, so the hub hands back our name even before it notices we left."""


@dataclass
class Continuity:
    """What a client carries from one connection to the next, so a reconnect misses and repeats nothing.

    The hub replays what came after ``last_seq``, and hands our name back to whoever presents
    ``secret``; both hold only within one conversation (``room``).
    """

    last_seq: int | None = None
    room: str | None = None
    secret: str | None = None

    def hello(self, hello: Hello) -> Hello:
        """The registration frame, with what lets the hub resume us where we left off."""
        return replace(hello, last_seq=self.last_seq, session=self.secret)

    def joined(self, session: Session) -> None:
        if session.room != self.room:
            self.last_seq = None  # another conversation: its numbers start afresh
        self.room, self.secret = session.room, session.secret

    def is_new(self, chat: Chat) -> bool:
        """False for a message already seen (a replay after a reconnect overlaps); notes the newest number."""
        if not chat.seq:
            return True
        if self.last_seq is not None and chat.seq <= self.last_seq:
            return False
        self.last_seq = chat.seq
        return True


def check_refusal(frame: object) -> None:
    """Raise HubRefused for a refusal that ends the client (being kicked)."""
    if isinstance(frame, (Refusal, Notice)) and frame.code in ENDS_CONVERSATION:
        raise HubRefused(frame.code, frame.content)


def client_ssl(url: str, ca_file: Path | None) -> ssl.SSLContext | None:
    if not url.startswith("wss://"):
        return None
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


async def register(ws: ClientConnection, hello: Hello) -> Session:
    await ws.send(encode(hello))
    raw = await asyncio.wait_for(ws.recv(), WELCOME_TIMEOUT)
    frame = parse_server_frame(raw)
    if not isinstance(frame, Notice):
        raise HubRefused(ErrorCode.BAD_FRAME, "The hub did not answer the registration with a system frame.")
    if frame.event == "error" or frame.code:
        if frame.code in RETRY_LATER:
            raise HubGone(frame.content)
        raise HubRefused(frame.code or "refused", frame.content)
    return Session(ws=ws, extended=frame.protocol is not None, room=frame.room, secret=frame.session)


@asynccontextmanager
async def open_session(url: str, hello: Hello, *, ca_file: Path | None = None) -> AsyncIterator[Session]:
    """Connect and register once; raises OSError-like errors when the hub cannot be reached."""
    async with connect(
        url, ssl=client_ssl(url, ca_file), max_size=4 * 1024 * 1024, open_timeout=10, close_timeout=2
    ) as ws:
        yield await register(ws, hello)


async def keep_trying(
    url: str,
    make_hello: Callable[[], Hello],
    run: Callable[[Session], object],
    *,
    continuity: Continuity,
    ca_file: Path | None = None,
    on_retry: Callable[[str, float], None] | None = None,
) -> None:
    """Run ``run(session)`` while connected; reconnect with back-off when the hub goes away.

    Every registration carries what ``continuity`` remembers, and every welcome updates it.
    Returns when ``run`` returns; raises HubRefused when the hub refuses us.
    """
    delay = 1.0
    while True:
        try:
            async with open_session(url, continuity.hello(make_hello()), ca_file=ca_file) as session:
                continuity.joined(session)
                delay = 1.0
                await run(session)  # type: ignore[misc]
                return
        except ssl.SSLCertVerificationError as error:
            raise HubRefused("tls", f"The hub's certificate is not trusted ({error.verify_message}); "
                                    "pass its CA with --ca-file.") from None
        except (OSError, asyncio.TimeoutError, InvalidHandshake, ConnectionClosed, HubGone) as error:
            reason = _describe(error)
        except InvalidURI as error:
            raise HubRefused("bad_url", f"{url!r} is not a websocket URL ({error}).") from None
        if on_retry is not None:
            on_retry(reason, delay)
        else:
            log.warning("Hub at %s not reachable (%s); retrying in %.0f s", url, reason, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, MAX_BACKOFF)


def _describe(error: BaseException) -> str:
    if isinstance(error, HubGone) and str(error):
        return str(error)
    if isinstance(error, (ConnectionClosed, HubGone)):
        return "the hub closed the connection"
    if isinstance(error, asyncio.TimeoutError):
        return "timed out"
    if isinstance(error, ssl.SSLError):
        return f"TLS error: {error.reason or error}"
    if isinstance(error, OSError):
        return error.strerror or str(error) or type(error).__name__
    return str(error) or type(error).__name__
