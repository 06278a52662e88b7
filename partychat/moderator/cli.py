"""Command line of moderator.py, and the loop that joins the console to the hub."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..connection import Continuity, HubGone, HubRefused, Session, check_refusal, keep_trying
from ..export import transcript_markdown
from ..logs import LEVELS, honour_ctrl_c, setup_logging
from ..protocol import (
    PROTOCOL_VERSION,
    Archive,
    Chat,
    Command,
    FloorState,
    Hello,
    Refusal,
    Role,
    Say,
    encode,
    parse_server_frame,
)
from .console import InputError, Local, RoomView, Terminal, help_text, parse_line

log = logging.getLogger("partychat.moderator")

QUIET_SECONDS_ON_BASELINE_HUB = 5.0
LEAVE_GRACE_SECONDS = 3.0
"""On leaving, how long queued lines may still take to reach a connected hub."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moderator.py", description="Watch and steer a Party Chat room.")
    parser.add_argument("--server", default="ws://localhost:8765", help="hub URL, ws:// or wss://")
    parser.add_argument("--name", default="Moderator", help="your name in the room (default: Moderator)")
    parser.add_argument("--hide-messages", action="store_true", help="start with incoming messages hidden (/toggle)")
    parser.add_argument("--token", default=os.environ.get("PARTYCHAT_TOKEN"),
                        help="the hub's access token (or set PARTYCHAT_TOKEN)")
    parser.add_argument("--moderator-token", default=os.environ.get("PARTYCHAT_MODERATOR_TOKEN"),
                        help="the hub's moderator token, if it has one (or set PARTYCHAT_MODERATOR_TOKEN)")
    parser.add_argument("--ca-file", type=Path, help="CA certificate to trust for a wss:// hub")
    parser.add_argument("--idle-timeout", type=float, default=300.0,
                        help="with piped input: longest wait for the models to finish before the next line")
    parser.add_argument("--log-level", default="WARNING", choices=LEVELS, type=str.upper)
    return parser


class Moderator:
    """Typed lines queue up independently of the connection, so nothing typed is lost in a reconnect."""

    def __init__(self, args: argparse.Namespace, terminal: Terminal) -> None:
        self.args = args
        self.terminal = terminal
        self.view = RoomView(args.name, colour=terminal.colour, show_messages=not args.hide_messages)
        terminal.attach_toolbar(self.view.toolbar)
        self.outgoing: deque[Say | Command] = deque()
        self.unconfirmed: dict[str, Say] = {}
        """Lines sent but not yet echoed back by the hub, by nonce: re-sent after a reconnect."""
        self.saves: deque[Path] = deque()
        self.wake = asyncio.Event()
        self.done = False
        self.continuity = Continuity()
        self.session: Session | None = None
        self.unreachable = False
        self.idle = asyncio.Event()
        self.idle.set()
        self.last_frame_at = time.monotonic()
        self._quiet_watcher: asyncio.Task[None] | None = None

    def hello(self) -> Hello:
        return Hello(
            name=self.args.name,
            role=Role.HUMAN,
            protocol=PROTOCOL_VERSION,
            token=self.args.token,
            moderator_token=self.args.moderator_token,
            stream=True,
        )

    async def run(self) -> None:
        """Talk to the hub until the user leaves; leaving works even while the hub is unreachable."""
        reader = asyncio.create_task(self._read_input())
        talker = asyncio.create_task(keep_trying(self.args.server, self.hello, self._converse,
                                                 continuity=self.continuity, ca_file=self.args.ca_file,
                                                 on_retry=self._on_retry))
        try:
            await asyncio.wait({reader, talker}, return_when=asyncio.FIRST_COMPLETED)
            if talker.done():
                talker.result()
                return
            reader.result()
            await asyncio.wait({talker}, timeout=LEAVE_GRACE_SECONDS)
            for line in self.unconfirmed.values():
                self.terminal.show(self.view.status(f"Sent, but the hub never confirmed it: {line.content}"))
            for item in self.outgoing:
                self.terminal.show(self.view.status(f"Not sent (no connection to the hub): {_as_typed(item)}"))
        finally:
            reader.cancel()
            talker.cancel()

    @property
    def _own_name(self) -> str:
        return " ".join(self.args.name.split()).casefold()

    def _on_retry(self, reason: str, delay: float) -> None:
        self.unreachable = True
        self.terminal.show(self.view.status(f"Hub at {self.args.server} not reachable ({reason}); "
                                            f"retrying in {delay:.0f} s. Ctrl+C to give up."))

    async def _read_input(self) -> None:
        if not self.terminal.interactive:
            self.terminal.show(self.view.status("Reading the session from standard input."))
        else:
            self.terminal.show(self.view.status("Type a message, or /help for commands. Ctrl+C leaves."))
        while True:
            line = await self.terminal.read_line()
            if line is None:
                break
            try:
                item = parse_line(line)
            except InputError as error:
                self.terminal.show(self.view.status(str(error)))
                continue
            if isinstance(item, Local):
                if not self.terminal.interactive:
                    await self._settle()  # a scripted /save sees what the lines before it caused
                if self._run_local(item):
                    break
            elif item is not None:
                if isinstance(item, Say) and not self.terminal.interactive:
                    await self._wait_until_idle()
                    self.idle.clear()
                self._queue(item)
        if not self.terminal.interactive:
            await self._settle()
        self.done = True
        self.wake.set()

    def _queue(self, item: Say | Command) -> None:
        if isinstance(item, Say):
            item = replace(item, nonce=uuid.uuid4().hex[:16])
        self.outgoing.append(item)
        self.wake.set()

    async def _settle(self) -> None:
        """Wait until everything queued is sent and the room has gone quiet (see _wait_for)."""
        await self._wait_for(lambda: not self.outgoing and not self.unconfirmed and not self.saves
                             and self.idle.is_set())

    async def _wait_until_idle(self) -> None:
        """With piped input, let the models answer before the next scripted line."""
        await self._wait_for(self.idle.is_set)

    async def _wait_for(self, condition: Callable[[], bool]) -> None:
        """Wait for a condition, but not past --idle-timeout, nor while the hub cannot be reached."""
        deadline = time.monotonic() + self.args.idle_timeout
        while not condition():
            if self.session is None and self.unreachable:
                return
            if time.monotonic() > deadline:
                self.terminal.show(self.view.status("Still busy after --idle-timeout; going on."))
                return
            await asyncio.sleep(0.05)

    def _run_local(self, command: Local) -> bool:
        """Handle a console-only command; True means leave."""
        if command.name == "quit":
            return True
        if command.name == "help":
            self.terminal.show(help_text())
        elif command.name == "toggle":
            self.view.show_messages = not self.view.show_messages
            state = "shown." if self.view.show_messages else "hidden."
            self.terminal.show(self.view.status(f"Incoming messages {state}"))
        elif command.name == "save":
            path = Path(command.args[0] if command.args else time.strftime("logs/chat-%Y%m%d-%H%M%S.md"))
            if self.session is not None and self.session.extended:
                self.saves.append(path)  # written when the hub's history arrives
                self._queue(Command("history"))
            else:  # a baseline hub holds no history to give: what this console saw, rendered alike
                self._save(path, Archive(tuple(self.view.seen), transcript_markdown(self.view.seen)))
        return False

    def _save(self, path: Path, archive: Archive) -> None:
        """Write the conversation as the hub rendered it (see export.py)."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(archive.markdown, encoding="utf-8")
            self.terminal.show(self.view.status(f"Saved {len(archive.messages)} messages to {path}."))
        except OSError as error:
            self.terminal.show(self.view.status(f"Could not save to {path}: {error.strerror or error}"))

    async def _converse(self, session: Session) -> None:
        self.session = session
        self.unreachable = False
        # Lines the last hub never confirmed go first; one it did get is recognised by its nonce and not repeated.
        self.outgoing.extendleft(reversed(list(self.unconfirmed.values())))
        self.unconfirmed.clear()
        self.terminal.show(self.view.status(f"Connected to {self.args.server} as {self.args.name}."))
        receiver = asyncio.create_task(self._receive(session))
        try:
            while not (self.done and not self.outgoing and not self.unconfirmed):
                if not self.outgoing:
                    self.wake.clear()
                    waiter = asyncio.create_task(self.wake.wait())
                    finished, _ = await asyncio.wait({waiter, receiver}, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    if receiver in finished:
                        receiver.result()
                        raise HubGone
                    continue
                item = self.outgoing[0]
                if isinstance(item, Say) and item.nonce and session.extended:
                    # Before the send: the echo may arrive while it is under way. A send that fails
                    # leaves the line here, and the next connection sends it again.
                    self.unconfirmed[item.nonce] = self.outgoing.popleft()
                    await session.ws.send(encode(item))
                else:
                    await session.ws.send(encode(item))
                    self.outgoing.popleft()
                if isinstance(item, Say) and not session.extended:
                    self.last_frame_at = time.monotonic()
                    if self._quiet_watcher is None or self._quiet_watcher.done():
                        self._quiet_watcher = asyncio.create_task(self._quiet_watch())
        finally:
            receiver.cancel()
            self.session = None

    async def _quiet_watch(self) -> None:
        """On a hub without turn frames, call the room idle after a few quiet seconds."""
        while time.monotonic() - self.last_frame_at < QUIET_SECONDS_ON_BASELINE_HUB:
            await asyncio.sleep(0.5)
        self.idle.set()

    def _confirm(self, chat: Chat) -> bool:
        """Note that the hub has one of our lines; True if it was waiting for that."""
        if chat.nonce:
            return self.unconfirmed.pop(chat.nonce, None) is not None
        oldest = next(iter(self.unconfirmed.values()), None)
        mine = chat.sender.casefold() == self._own_name
        if oldest is not None and mine and not chat.replay and chat.content == oldest.content:
            # A hub that does not echo nonces still echoes our lines in the order they were sent.
            return self.unconfirmed.pop(oldest.nonce or "", None) is not None
        return False

    async def _receive(self, session: Session) -> None:
        async for raw in session.ws:
            frame = parse_server_frame(raw)
            if frame is None:
                continue
            check_refusal(frame)
            self.last_frame_at = time.monotonic()
            if isinstance(frame, Chat) and self._confirm(frame):
                self.wake.set()  # leaving may have been waiting for this confirmation
            if isinstance(frame, Chat) and not self.continuity.is_new(frame):
                continue
            if isinstance(frame, Archive) and self.saves:
                self._save(self.saves.popleft(), frame)
                continue
            if isinstance(frame, Refusal) and self.unconfirmed:
                # The hub answers frames in order, so a refusal is for the oldest line it has not echoed
                # (or for a command); the refusal itself is shown below, so the line is not lost silently.
                del self.unconfirmed[next(iter(self.unconfirmed))]
            # Nobody is going to answer: a refusal, or an empty floor once our lines are in the room
            # (the floor a hub shows a newcomer can arrive after a scripted line was already sent).
            if isinstance(frame, Refusal) or (
                    isinstance(frame, FloorState) and not frame.speakers and not self.unconfirmed):
                self.idle.set()
            line = self.view.render(frame)
            if line is not None:
                self.terminal.show(line)
        self.terminal.show(self.view.status("The hub closed the connection."))


def _as_typed(item: Say | Command) -> str:
    return item.content if isinstance(item, Say) else " ".join(["/" + item.name, *item.args])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.server.startswith(("ws://", "wss://")):
        print("moderator.py: --server must start with ws:// or wss://", file=sys.stderr)
        return 2
    setup_logging(args.log_level)
    honour_ctrl_c()
    terminal = Terminal()
    try:
        asyncio.run(Moderator(args, terminal).run())
    except HubRefused as error:
        print(f"moderator.py: {error}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        pass
    terminal.show("Goodbye.")
    return 0
