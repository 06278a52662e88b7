"""A model persona in the room: listens, waits for its turn, generates off the event loop, replies.

On our hub the participant generates only when a ``turn`` frame names it, and stops at once when
the turn is withdrawn. On a baseline hub (no turn frames) it answers each message from someone
else, one reply at a time.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from .connection import HubGone, Session, keep_trying
from .generation import GenerationSettings, PromptTooLong, build_prompt, clean_reply, generate_reply
from .models import LoadedModel
from .protocol import (
    PROTOCOL_VERSION,
    Chat,
    Draft,
    FloorState,
    Hello,
    Notice,
    Pass,
    Refusal,
    Role,
    Say,
    encode,
    parse_server_frame,
)

log = logging.getLogger("partychat.client")


@dataclass
class ParticipantConfig:
    name: str
    persona: str
    server: str = "ws://localhost:8765"
    delay: float = 0.0
    initial_prompt: str | None = None
    token: str | None = None
    ca_file: Path | None = None
    stream: bool = True


class ModelParticipant:
    def __init__(self, config: ParticipantConfig, loaded: LoadedModel, settings: GenerationSettings) -> None:
        self.config = config
        self.loaded = loaded
        self.settings = settings
        self.history: deque[Chat] = deque(maxlen=max(settings.history_length, 1) * 4 + 50)
        self.last_seq: int | None = None
        self.opening_sent = False
        self.floor: FloorState | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self._reply_task: asyncio.Task[None] | None = None
        self._reply_turn: int | None = None
        self._stop = threading.Event()
        self._session: Session | None = None
        self._names: set[str] = set()

    @property
    def name(self) -> str:
        return self.config.name

    def hello(self) -> Hello:
        return Hello(
            name=self.name,
            role=Role.MODEL,
            protocol=PROTOCOL_VERSION,
            token=self.config.token,
            last_seq=self.last_seq,
        )

    async def run(self) -> None:
        """Stay in the room until cancelled, reconnecting (model kept loaded) when the hub goes away."""
        try:
            await keep_trying(self.config.server, self.hello, self._converse, ca_file=self.config.ca_file)
        finally:
            self._stop.set()
            self._executor.shutdown(wait=True, cancel_futures=True)

    async def _converse(self, session: Session) -> None:
        self._session = session
        log.info("%s joined %s%s", self.name, self.config.server,
                 "" if session.extended else " (a baseline hub: no turn-taking)")
        try:
            if self.config.initial_prompt and not self.opening_sent:
                self.opening_sent = True
                await session.ws.send(encode(Say(self.config.initial_prompt, opening=True)))
            async for raw in session.ws:
                self._on_frame(parse_server_frame(raw))
            raise HubGone
        finally:
            self._cancel_reply()
            self._session = None

    def _on_frame(self, frame: object) -> None:
        if isinstance(frame, Chat):
            self._on_chat(frame)
        elif isinstance(frame, FloorState):
            self.floor = frame
            self._on_floor(frame)
        elif isinstance(frame, Refusal):
            log.warning("The hub refused: %s", frame.content)
        elif isinstance(frame, Notice):
            log.info("%s", frame.content)

    def _on_chat(self, chat: Chat) -> None:
        if chat.seq and self.last_seq is not None and chat.seq <= self.last_seq:
            return
        if chat.seq:
            self.last_seq = chat.seq
        self._names.add(chat.sender)
        self.history.append(chat)
        if chat.sender != self.name and not chat.replay:
            log.info("%s: %s", chat.sender, chat.content, extra={"speaker": chat.sender})
        baseline = self._session is not None and not self._session.extended
        if baseline and chat.sender != self.name and not chat.replay:
            self._start_reply(turn=None)

    def _on_floor(self, floor: FloorState) -> None:
        mine = self.name in floor.speakers and not floor.paused
        if not mine:
            self._cancel_reply()
            return
        if self._reply_turn == floor.turn:
            return
        if self.history and self.history[-1].sender == self.name:
            return
        self._cancel_reply()
        self._start_reply(turn=floor.turn)

    def _start_reply(self, turn: int | None) -> None:
        if turn is None and self._reply_task is not None and not self._reply_task.done():
            return  # baseline hub: finish the reply under way first
        self._reply_turn = turn
        self._stop = threading.Event()
        self._reply_task = asyncio.create_task(self._reply(turn, self._stop))

    def _cancel_reply(self) -> None:
        self._stop.set()
        self._reply_turn = None

    def _still_mine(self, turn: int | None, stop: threading.Event) -> bool:
        if stop.is_set():
            return False
        if turn is None or self.floor is None:
            return True
        return self.floor.turn == turn and self.name in self.floor.speakers and not self.floor.paused

    async def _reply(self, turn: int | None, stop: threading.Event) -> None:
        session = self._session
        if session is None:
            return
        reply = ""
        # A greedy reply that cleans to nothing is retried once with sampling before giving up the turn.
        for settings in (self.settings, replace(self.settings, temperature=max(self.settings.temperature, 0.8))):
            raw = await self._generate(session, stop, settings)
            if raw is None:
                break
            reply = clean_reply(raw, self.name, sorted(self._names))
            if reply or not self._still_mine(turn, stop):
                break
            log.warning("The model produced an empty reply; trying once more")
        if not self._still_mine(turn, stop):
            log.info("Turn withdrawn; dropped a reply of %d characters", len(reply))
            return
        if not reply:
            log.warning("No usable reply; passing the turn")
            if session.extended:
                await session.ws.send(encode(Pass("no usable reply")))
            return
        if self.config.delay > 0:
            await asyncio.sleep(self.config.delay)
            if not self._still_mine(turn, stop):
                log.info("Turn withdrawn during --delay; reply not sent")
                return
        await session.ws.send(encode(Say(reply)))
        if not session.extended:  # our hub echoes our message back with its number; a baseline hub does not
            self.history.append(Chat(sender=self.name, content=reply))
        log.info("%s: %s", self.name, reply, extra={"speaker": self.name})

    async def _generate(self, session: Session, stop: threading.Event, settings: GenerationSettings) -> str | None:
        """Build the prompt and generate in the worker thread, streaming drafts; None if the prompt cannot fit."""
        loop = asyncio.get_running_loop()
        drafts: asyncio.Queue[str | None] = asyncio.Queue()
        streaming = session.extended and self.config.stream

        def on_text(text: str) -> None:
            loop.call_soon_threadsafe(drafts.put_nowait, text)

        forward = asyncio.create_task(self._forward_drafts(session, drafts)) if streaming else None
        try:
            prompt = await loop.run_in_executor(
                self._executor,
                build_prompt, self.loaded.tokenizer, self.config.persona, self.name, list(self.history), settings,
            )
            raw = await loop.run_in_executor(
                self._executor,
                lambda: generate_reply(self.loaded, prompt, settings, stop=stop,
                                       on_text=on_text if streaming else None),
            )
        except PromptTooLong as error:
            log.error("Skipping this turn: %s", error)
            return None
        except BaseException:
            if forward is not None:
                forward.cancel()
            raise
        if forward is not None:
            drafts.put_nowait(None)  # every piece generated is sent before the final message
            await forward
        return raw

    async def _forward_drafts(self, session: Session, drafts: asyncio.Queue[str | None]) -> None:
        while (text := await drafts.get()) is not None:
            await session.ws.send(encode(Draft(text)))
