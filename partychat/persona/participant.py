"""A model persona in the room: listens, waits for its turn, streams a reply from its ChatModel, replies.

The participant never knows which engine speaks; several participants may share one ChatModel.

On our hub the participant generates only when a ``turn`` frame names it, and stops at once when
the turn is withdrawn. On a baseline hub (no turn frames) it answers each message from someone
else, one reply at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from pathlib import Path

from websockets.exceptions import ConnectionClosed

from ..connection import HubGone, Session, check_refusal, keep_trying
from ..engines.base import ChatModel, ChatRequest, EngineError, StopFlag
from ..protocol import (
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
    Speed,
    encode,
    parse_server_frame,
)
from .cards import fill_macros
from .generation import GenerationSettings, PromptExtras, ReplyStream, build_request, clean_reply
from .lorebook import Lore, Lorebook

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
    talkativeness: float | None = None
    """Weight in the hub's natural-mode draw, 0 to 1; None leaves the hub's default."""
    echo_room: bool = True
    """Log what others say; in a cast only the first persona does, so each line is logged once."""
    castmates: frozenset[str] = frozenset()
    """Other personas of this process: they log their own lines."""
    examples: str = ""
    """Example dialogue (a card's ``mes_example``); left out first when the prompt is tight."""
    after_history: str = ""
    """Instructions after the newest message (a card's ``post_history_instructions``)."""
    books: tuple[Lorebook, ...] = ()
    """This persona's lorebooks: its card's own, then the shared ``--lorebook`` ones."""
    offstage: bool = False
    """Ask the hub, on first joining, to start off stage (a cast entry's ``offstage``)."""


@dataclass
class ReplyTiming:
    """When a reply's turn began and its first token came, for the speed figures ``/who`` shows."""

    started: float
    first_token: float | None = None
    finished: float | None = None
    pieces: int = 0
    """Pieces the engine streamed: every engine streams about one token per piece."""

    def speed(self) -> Speed | None:
        if self.first_token is None:
            return None
        span = (self.finished or time.monotonic()) - self.first_token
        # The first piece came at first_token: the rate counts the ones after it.
        rate = (self.pieces - 1) / span if span > 0 and self.pieces > 1 else None
        return Speed(ttft=round(self.first_token - self.started, 3),
                     tokens_per_second=round(rate, 1) if rate is not None else None)


class ModelParticipant:
    def __init__(self, config: ParticipantConfig, model: ChatModel, settings: GenerationSettings) -> None:
        self.config = config
        self.model = model
        self.settings = settings
        self.history: deque[Chat] = deque(maxlen=max(settings.history_length, 1) * 4 + 50)
        self.last_seq: int | None = None
        self.room_id: str | None = None
        self.secret: str | None = None
        self.opening_sent = False
        self.floor: FloorState | None = None
        self._reply_task: asyncio.Task[None] | None = None
        self._reply_turn: int | None = None
        self._stop = StopFlag()
        self._session: Session | None = None
        self._names: set[str] = set()
        self._humans: list[str] = []
        self.joined = asyncio.Event()
        """Set once the hub has first let this participant in."""

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
            session=self.secret,
            talkativeness=self.config.talkativeness,
            offstage=self.config.offstage and not self.joined.is_set(),  # a reconnect must not undo an /enter
        )

    async def run(self) -> None:
        """Stay in the room until cancelled, reconnecting (model kept loaded) when the hub goes away.

        The model belongs to whoever opened it, and stays open when the participant leaves.
        """
        try:
            await keep_trying(self.config.server, self.hello, self._converse, ca_file=self.config.ca_file)
        finally:
            self._stop.set()
            if self._reply_task is not None and not self._reply_task.done():
                await asyncio.wait({self._reply_task})  # the generation ends within a token of the stop

    async def _converse(self, session: Session) -> None:
        if session.room != self.room_id:
            self.last_seq = None  # another conversation: its numbers start afresh
        self.room_id, self.secret = session.room, session.secret
        self._session = session
        self.joined.set()
        log.info("%s joined %s%s", self.name, self.config.server,
                 "" if session.extended else " (a baseline hub: no turn-taking)")
        try:
            if self.config.initial_prompt and not self.opening_sent:
                self.opening_sent = True
                opening = fill_macros(self.config.initial_prompt, char=self.name, user=self._user())
                await session.ws.send(encode(Say(opening, opening=True)))
            async for raw in session.ws:
                self._on_frame(parse_server_frame(raw))
            raise HubGone
        finally:
            self._cancel_reply()
            self._session = None

    def _on_frame(self, frame: object) -> None:
        check_refusal(frame)
        if isinstance(frame, Chat):
            self._on_chat(frame)
        elif isinstance(frame, FloorState):
            self.floor = frame
            self._on_floor(frame)
        elif isinstance(frame, Refusal):
            log.warning("The hub refused %s: %s", self.name, frame.content)
        elif isinstance(frame, Notice) and frame.code:  # about this persona alone
            log.info("%s%s", f"To {self.name}: " if self.config.castmates else "", frame.content)
        elif isinstance(frame, Notice) and self.config.echo_room:
            log.info("%s", frame.content)

    def _on_chat(self, chat: Chat) -> None:
        if chat.seq and self.last_seq is not None and chat.seq <= self.last_seq:
            return
        if chat.seq:
            self.last_seq = chat.seq
        self._names.add(chat.sender)
        if chat.role == Role.HUMAN.value and chat.sender not in self._humans:
            self._humans.append(chat.sender)
        self.history.append(chat)
        if (self.config.echo_room and not chat.replay and chat.sender != self.name
                and chat.sender not in self.config.castmates):
            log.info("%s: %s", chat.sender, chat.content, extra={"speaker": chat.sender})
        baseline = self._session is not None and not self._session.extended
        busy = self._reply_task is not None and not self._reply_task.done()
        if baseline and chat.sender != self.name and not chat.replay and not busy:
            self._start(self._reply(None, self._fresh_stop()))  # one reply at a time, then the next

    def _on_floor(self, floor: FloorState) -> None:
        if self.name not in floor.speakers or floor.paused:
            self._cancel_reply()
            return
        if self._reply_turn == floor.turn:
            return
        self._cancel_reply()
        self._reply_turn = floor.turn
        if self.history and self.history[-1].sender == self.name:
            # The turn came back before anyone else spoke: answering ourselves would be a monologue.
            self._start(self._send(Pass("nothing new to answer", turn=floor.turn)))
        else:
            self._start(self._reply(floor.turn, self._fresh_stop()))

    def _fresh_stop(self) -> StopFlag:
        self._stop = StopFlag()
        return self._stop

    def _start(self, work: Coroutine[None, None, None]) -> None:
        self._reply_task = asyncio.create_task(work)
        self._reply_task.add_done_callback(_log_failure)

    def _cancel_reply(self) -> None:
        self._stop.set()
        self._reply_turn = None

    def _still_mine(self, turn: int | None, stop: StopFlag) -> bool:
        if stop.is_set():
            return False
        if turn is None or self.floor is None:
            return True
        return self.floor.turn == turn and self.name in self.floor.speakers and not self.floor.paused

    async def _send(self, frame: Say | Draft | Pass) -> bool:
        """Send if still connected; a connection lost meanwhile is the reconnect loop's business."""
        session = self._session
        if session is None:
            return False
        try:
            await session.ws.send(encode(frame))
        except ConnectionClosed:
            return False
        return True

    async def _reply(self, turn: int | None, stop: StopFlag) -> None:
        session = self._session
        if session is None:
            return
        streaming = session.extended and self.config.stream
        reply, stream, raw = "", None, None
        timing = ReplyTiming(started=time.monotonic())
        # A greedy reply that cleans to nothing is retried once with sampling before giving up the turn.
        try:
            for settings in (self.settings, replace(self.settings, temperature=max(self.settings.temperature, 0.8))):
                stream = ReplyStream(self.name, sorted(self._names))
                raw = await self._generate(stop, settings, stream if streaming else None, timing)
                reply = clean_reply(raw, self.name, sorted(self._names))
                if reply or not self._still_mine(turn, stop):
                    break
                log.warning("The model gave %s an empty reply; trying once more", self.name)
        except EngineError as error:
            log.error("%s passes this turn: %s", self.name, error)
            if session.extended and self._still_mine(turn, stop):
                await self._send(Pass(str(error), turn=turn))
            return
        if not self._still_mine(turn, stop):
            log.info("Turn withdrawn from %s; dropped a reply of %d characters", self.name, len(reply))
            return
        speed = timing.speed()
        if not reply:
            log.warning("No usable reply for %s; passing the turn", self.name)
            if session.extended:
                await self._send(Pass("no usable reply", turn=turn, speed=speed))
            return
        if self.config.delay > 0:
            await asyncio.sleep(self.config.delay)
            if not self._still_mine(turn, stop):
                log.info("Turn withdrawn from %s during --delay; reply not sent", self.name)
                return
        rest = stream.rest(reply) if streaming and stream is not None else None
        if rest:
            await self._send(Draft(rest))
        if not await self._send(Say(reply, turn=turn, speed=speed)):
            return
        if not session.extended:  # our hub echoes our message back with its number; a baseline hub does not
            self.history.append(Chat(sender=self.name, content=reply))
        log.info("%s: %s", self.name, reply, extra={"speaker": self.name})

    async def _generate(self, stop: StopFlag, settings: GenerationSettings, stream: ReplyStream | None,
                        timing: ReplyTiming) -> str:
        """Build the request and stream the raw reply; with a stream, whole clean sentences go out as partials.

        On our hub an empty partial goes out at the first token in any case: it tells the hub this
        persona is alive before its first sentence is done (see --first-token-timeout).
        """
        persona, extras = prompt_parts(self.config, self._user())
        history = list(self.history)
        request = await build_request(self.model, persona, self.name, history, settings, extras)
        log.debug("%s's prompt: %s", self.name, request.messages)
        if extras.lore is not None and settings.history_length > 0:
            self._log_lore(extras.lore, request, history[-settings.history_length:])
        extended = self._session is not None and self._session.extended
        raw: list[str] = []
        try:
            async for piece in self.model.stream(request, stop):
                if timing.first_token is None:
                    timing.first_token = time.monotonic()
                    if extended:
                        await self._send(Draft(""))
                raw.append(piece)
                clean = stream.feed(piece) if stream is not None else ""
                if clean and not stop.is_set():
                    await self._send(Draft(clean))
        finally:
            timing.finished = time.monotonic()
            timing.pieces += len(raw)  # over every attempt, like the span from the first token
        return "".join(raw)

    def _user(self) -> str:
        """``{{user}}`` in a card: the one human who has spoken here, else everyone."""
        return self._humans[0] if len(self._humans) == 1 else "everyone"

    def _log_lore(self, lore: Lore, request: ChatRequest, window: list[Chat]) -> None:
        """Which entries this turn's newest messages fired, and which the budget left out of the prompt."""
        prompt = "\n".join(message["content"] for message in request.messages)
        placed = [ref for refs in lore.placements(window) for ref in refs]
        left_out = [lore.entry(ref).label for ref in placed if lore.text(ref) not in prompt]
        log.debug("Lore for %s's turn: fired %s; in the prompt %d entries%s", self.name,
                  ", ".join(entry.label for entry in lore.fired(window)) or "none", len(placed) - len(left_out),
                  f"; left out for room: {', '.join(left_out)}" if left_out else "")


def prompt_parts(config: ParticipantConfig, user: str) -> tuple[str, PromptExtras]:
    """The persona text and what a card and lorebooks add, for one request, with the macros filled in."""

    def fill(text: str) -> str:
        return fill_macros(text, char=config.name, user=user)

    lore = Lore(config.books, fill) if config.books else None
    return fill(config.persona), PromptExtras(fill(config.examples), fill(config.after_history), lore)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("A reply failed: %s", task.exception(), exc_info=task.exception())
