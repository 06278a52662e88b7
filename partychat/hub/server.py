"""The websocket side of the hub: one handler per connection, the writes, the server, a clean shutdown.

This is the only server-side module that touches sockets. The room decides what is said and to
whom; ``SocketOutlet`` writes it, and the handler turns received frames into calls on the room.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from websockets.asyncio.server import Server, ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import State

from ..protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Command,
    ErrorCode,
    Notice,
    ProtocolError,
    Spectate,
    encode,
    listed_commands,
    parse_client_frame,
    parse_hello,
)
from .commands import run_command
from .pages import PageSettings, WebPages
from .room import Room, Timer
from .settings import RoomSettings
from .spectators import Listener, Spectator
from .transcript import Transcript, default_path, load_saved_room

log = logging.getLogger("partychat.hub")

HELLO_TIMEOUT = 10.0
PENDING_ALLOWANCE = 16
"""Connections allowed beyond --max-clients, for handshakes still in progress and quick reconnects."""
_CLOSE_CODES = {
    ErrorCode.BINARY_FRAME: CloseCode.UNSUPPORTED_DATA,
    ErrorCode.TOO_LARGE: CloseCode.MESSAGE_TOO_BIG,
    ErrorCode.ROOM_FULL: CloseCode.TRY_AGAIN_LATER,
}


@dataclass
class HubConfig:
    host: str = "localhost"
    port: int = 8765
    room: RoomSettings = field(default_factory=RoomSettings)
    transcript: Path | None = None
    resume: Path | None = None
    logs_dir: Path = Path("logs")
    fsync: bool = False
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    certfile: Path | None = None
    keyfile: Path | None = None
    ping_interval: float | None = 20.0
    ping_timeout: float | None = 20.0
    web: bool = True
    """Serve the room's web page on the same port (``--no-web`` turns it off)."""


class SocketOutlet:
    """Writes the room's frames to websockets, never waiting on a peer; cuts off peers far behind.

    This is websockets' ``broadcast()`` with one step hoisted out of the loop: server frames are
    unmasked and the hub negotiates no extensions (it serves with compression off), so every
    recipient gets the same bytes and the frame is serialised once instead of once per peer.
    Every write happens on the event loop between whole frames, so a connection's own frames
    (pings, close) never interleave with these. What a peer has not read stays in its own write
    buffer; once that passes ``max_buffered_bytes`` the peer is handed to ``cut_off``, so one
    reader that stops cannot slow the room or grow the hub's memory without bound.
    """

    def __init__(self, max_buffered_bytes: int, cut_off: Callable[[Listener, int], None]) -> None:
        self.max_buffered_bytes = max_buffered_bytes
        self.cut_off = cut_off
        self._closing: set[asyncio.Task[None]] = set()

    def send(self, peers: Sequence[Listener], text: str) -> None:
        wire = Frame(Opcode.TEXT, text.encode()).serialize(mask=False)
        too_slow = []
        for peer in peers:
            ws = _connection(peer)
            transport, protocol = ws.transport, ws.protocol
            if transport is None or protocol.state is not State.OPEN:
                continue
            backlog = transport.get_write_buffer_size()
            if backlog > self.max_buffered_bytes:
                too_slow.append((peer, backlog))
            elif protocol.extensions:
                broadcast([ws], text)  # a peer with an extension needs its own encoding
            else:
                transport.write(wire)
        # Cutting off announces a leave, which sends frames itself: only once this frame has gone to all.
        for peer, backlog in too_slow:
            self.cut_off(peer, backlog)

    def dismiss(self, peer: Listener, reason: str) -> None:
        self.close_later(peer, CloseCode.POLICY_VIOLATION, reason)

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_later(delay, callback)

    def close_later(self, peer: Listener, code: int, reason: str) -> None:
        """Close a peer's connection from synchronous code; what it is owed is sent first."""
        task = asyncio.create_task(close_peer(_connection(peer), code, reason))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def flush(peer: Listener, timeout: float = 2.0) -> None:
        """Wait (briefly) until a peer has been sent what is buffered for it, e.g. before closing it."""
        transport = _connection(peer).transport
        deadline = time.monotonic() + timeout
        while transport is not None and transport.get_write_buffer_size() > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)


class Hub:
    """Owns the room and serves it; ``async with Hub(config) as hub`` runs it until exit."""

    def __init__(self, config: HubConfig) -> None:
        self.config = config
        path = config.transcript or config.resume or default_path(config.logs_dir)
        self.outlet = SocketOutlet(config.room.max_buffered_bytes, self._cut_off)
        earlier = load_saved_room(config.resume) if config.resume is not None else None
        if earlier is not None:
            log.info("Resuming the conversation in %s", config.resume)
        self.transcript = Transcript(path, fsync=config.fsync)
        self.room = Room(config.room, self.transcript, self.outlet, earlier=earlier)
        self.server: Server | None = None
        self._connections = 0
        settings = config.room
        self.pages = WebPages(
            PageSettings(
                needs_token=settings.token is not None,
                needs_moderator_token=settings.moderator_token is not None,
                commands=listed_commands(),
                max_message_bytes=config.max_message_bytes,
            ) if config.web else None,
            check_origin=settings.token is not None,
        )

    @property
    def url(self) -> str:
        return f"{'wss' if self.config.certfile else 'ws'}://{self._address(named=False)}"

    @property
    def page_url(self) -> str:
        """Where a browser finds the room; a hub on every interface is named by this machine's name."""
        return f"{'https' if self.config.certfile else 'http'}://{self._address(named=True)}/"

    def _address(self, *, named: bool) -> str:
        """host:port the server listens on; ``named`` puts the machine's name for 'every interface'."""
        assert self.server is not None
        host, port = self.server.sockets[0].getsockname()[:2]
        if named and host in ("0.0.0.0", "::"):
            host = socket.gethostname()
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{port}"

    async def __aenter__(self) -> Hub:
        config = self.config
        self.server = await serve(
            self.handle,
            config.host,
            config.port,
            ssl=self._ssl_context(),
            # The transport limit sits above the room's own limit, so that a frame a bit too long
            # gets a readable refusal and only a grossly oversized one closes the connection.
            max_size=config.max_message_bytes * 4,
            max_queue=16,
            # Chat frames are small; per-connection deflate would cost CPU on every copy of a broadcast.
            compression=None,
            write_limit=64 * 1024,
            ping_interval=config.ping_interval,
            ping_timeout=config.ping_timeout,
            close_timeout=2,
            process_request=self.pages.process_request,
        )
        log.info("Transcript: %s", self.transcript.path)
        print(f"Party Chat hub listening on {self.url}", flush=True)
        if self.pages.serving:
            print(f"Watch and moderate in a browser: {self.page_url}", flush=True)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.server is not None
        self.server.close(close_connections=False)  # no new connections while the room says goodbye
        await self._shutdown()
        await self.server.wait_closed()

    async def _shutdown(self) -> None:
        """Tell everyone the hub is stopping, close every connection, then close the transcript."""
        peers = self.room.shut_down()
        await asyncio.gather(*(self.outlet.flush(peer, 1.0) for peer in peers))
        await asyncio.gather(
            *(close_peer(_connection(peer), CloseCode.GOING_AWAY, "hub stopping") for peer in peers)
        )
        self.room.close()

    def _cut_off(self, peer: Listener, backlog: int) -> None:
        log.warning("%s has %d KiB unread; disconnecting it", peer.name, backlog // 1024)
        if isinstance(peer, Spectator):
            self.room.unwatch(peer)
        else:
            self.room.remove(peer, "was disconnected for reading too slowly")
        self.outlet.close_later(peer, CloseCode.TRY_AGAIN_LATER, "too slow: fell too far behind the room")

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.config.certfile:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.config.certfile, self.config.keyfile)
        return context

    async def handle(self, ws: ServerConnection) -> None:
        self._connections += 1
        try:
            settings = self.config.room
            if self._connections > settings.max_clients + settings.max_spectators + PENDING_ALLOWANCE:
                await self._reject(ws, ProtocolError(
                    ErrorCode.ROOM_FULL, "Too many connections are open; try again later.", fatal=True))
                return
            await self._serve_peer(ws)
        finally:
            self._connections -= 1

    async def _serve_peer(self, ws: ServerConnection) -> None:
        limit = self.config.max_message_bytes
        try:
            raw = await asyncio.wait_for(ws.recv(), HELLO_TIMEOUT)
            hello = parse_hello(raw, limit)
            if isinstance(hello, Spectate):
                spectator = self.room.watch(hello, ws)
            else:
                peer = self.room.admit(hello, ws)
        except asyncio.TimeoutError:
            await self._reject(ws, ProtocolError(
                ErrorCode.BAD_FRAME, f"No registration frame within {HELLO_TIMEOUT:.0f} seconds.", fatal=True
            ))
            return
        except ProtocolError as error:
            log.info("Refused a connection from %s: %s", _address(ws), error.message)
            await self._reject(ws, error)
            return
        except ConnectionClosed:
            return
        if isinstance(hello, Spectate):
            await self._serve_spectator(ws, spectator)
            return
        try:
            async for raw in ws:
                try:
                    frame = parse_client_frame(raw, limit)
                    if isinstance(frame, Command):
                        run_command(self.room, peer, frame)
                    else:
                        self.room.receive(peer, frame)
                except ProtocolError as error:
                    log.debug("%s sent a bad frame: %s", peer.name, error.message)
                    self.room.refuse(peer, error.code, error.message)
                    if error.fatal or self.room.count_refusal(peer):
                        await self.outlet.flush(peer)
                        self.room.remove(peer, "was disconnected for abuse")
                        await close_peer(ws, _CLOSE_CODES.get(error.code, CloseCode.POLICY_VIOLATION),
                                         error.code.value)
                        return
        except ConnectionClosed:
            pass
        finally:
            self.room.remove(peer)

    async def _serve_spectator(self, ws: ServerConnection, spectator: Spectator) -> None:
        """A spectator only reads: whatever it sends is refused, and a stream of it closes the connection."""
        try:
            async for _ in ws:
                self.room.refuse(spectator, ErrorCode.WATCH_ONLY,
                                 "Spectators only watch; join with a name to take part. Nothing was sent.")
                if self.room.count_refusal(spectator):
                    await self.outlet.flush(spectator)
                    self.room.unwatch(spectator)
                    await close_peer(ws, CloseCode.POLICY_VIOLATION, ErrorCode.WATCH_ONLY.value)
                    return
        except ConnectionClosed:
            pass
        finally:
            self.room.unwatch(spectator)

    async def _reject(self, ws: ServerConnection, error: ProtocolError) -> None:
        """Say why in a ``system`` frame (every client reads those), then close."""
        with contextlib.suppress(ConnectionClosed):
            await ws.send(encode(Notice(error.message, event="error", code=error.code)))
        await close_peer(ws, _CLOSE_CODES.get(error.code, CloseCode.POLICY_VIOLATION), error.code.value)


def _connection(peer: Listener) -> ServerConnection:
    return cast(ServerConnection, peer.link)


async def close_peer(ws: ServerConnection, code: int, reason: str, timeout: float = 2.0) -> None:
    """Close a connection, dropping it outright if the peer does not answer in time."""
    try:
        await asyncio.wait_for(ws.close(code, reason), timeout)
    except (asyncio.TimeoutError, ConnectionClosed, OSError):
        if ws.transport is not None:
            ws.transport.abort()


def _address(ws: ServerConnection) -> str:
    address = ws.remote_address
    return f"{address[0]}:{address[1]}" if address else "unknown"


async def run_hub(config: HubConfig) -> None:
    """Serve until SIGINT or SIGTERM, then tell the room, flush the transcript and return."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    async with Hub(config):
        await stop.wait()
        log.info("Stopping the hub")
