"""Reaching a hub from a client: connect, register, retry with back-off while it is away."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from .protocol import Hello, Notice, encode, parse_server_frame

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


def client_ssl(url: str, ca_file: Path | None) -> ssl.SSLContext | None:
    if not url.startswith("wss://"):
        return None
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


async def register(ws: ClientConnection, hello: Hello) -> Session:
    await ws.send(encode(hello))
    raw = await asyncio.wait_for(ws.recv(), WELCOME_TIMEOUT)
    frame = parse_server_frame(raw)
    if not isinstance(frame, Notice):
        raise HubRefused("bad_frame", "The hub did not answer the registration with a system frame.")
    if frame.event == "error" or frame.code:
        raise HubRefused(frame.code or "refused", frame.content)
    return Session(ws=ws, extended=frame.protocol is not None)


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
    ca_file: Path | None = None,
    on_retry: Callable[[str, float], None] | None = None,
) -> None:
    """Run ``run(session)`` while connected; reconnect with back-off when the hub goes away.

    Returns when ``run`` returns; raises HubRefused when the hub refuses us.
    """
    delay = 1.0
    while True:
        try:
            async with open_session(url, make_hello(), ca_file=ca_file) as session:
                delay = 1.0
                await run(session)  # type: ignore[misc]
                return
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
    if isinstance(error, (ConnectionClosed, HubGone)):
        return "the hub closed the connection"
    if isinstance(error, asyncio.TimeoutError):
        return "timed out"
    if isinstance(error, ssl.SSLError):
        return f"TLS error: {error.reason or error}"
    if isinstance(error, OSError):
        return error.strerror or str(error) or type(error).__name__
    return str(error) or type(error).__name__
