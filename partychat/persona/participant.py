"""A model persona in the room: listens, waits for its turn, streams a reply from its ChatModel, replies.

The participant never knows which engine speaks; several participants may share one ChatModel.

On our hub the participant generates only when a ``turn`` frame names it, and stops at once when
the turn is withdrawn. On a baseline hub (no turn frames) it answers each message from someone
else, one reply at a time.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path

from websockets.exceptions import ConnectionClosed

from ..connection import Continuity, HubGone, Session, check_refusal, keep_trying
from ..engines.base import ChatModel, ChatRequest, EngineError, StopFlag
from ..guards import REPEAT_WINDOW, Earlier, Verdict
from ..protocol import (
    PROTOCOL_VERSION,
    Chat,
    Discard,
    FloorState,
    Hello,
    Notice,
    Partial,
    Pass,
    Redo,
    Refusal,
    Role,
    Say,
    Speed,
    encode,
    parse_server_frame,
)
from .cards import fill_macros
from .generation import (
    GenerationSettings,
    PromptExtras,
    ReplyStream,
    build_request,
    clean_reply,
    opening_request,
    prompt_window,
)
from .lorebook import Lore, Lorebook
from .retries import DEFAULT_RETRIES, gave_up, judge, settings_for_attempt
from .shared_models import IdlePrefill

log = logging.getLogger("partychat.client")


@dataclass
class ParticipantConfig:
    name: str
    system_prompt: str
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
    retries: int = DEFAULT_RETRIES
    """Attempts after the first, in one turn, when a guard would withhold the reply (see retries.py)."""
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
    def __init__(self, config: ParticipantConfig, model: ChatModel, settings: GenerationSettings,
                 idle: IdlePrefill | None = None) -> None:
        """``idle``, when given, warms this persona's cache on ``model`` between its turns."""
        self.config = config
        self.model = model
        self.settings = settings
        self.idle = idle
        self.history: deque[Chat] = deque(maxlen=max(settings.history_length, 1) * 4 + 50)
        self.continuity = Continuity()
        self.opening_sent = False
        self.floor: FloorState | None = None
        self._reply_task: asyncio.Task[None] | None = None
        self._reply_turn: int | None = None
        self._stop = StopFlag()
        self._redo_task: asyncio.Task[None] | None = None
        self._redo_stop = StopFlag()
        self._seeds = random.Random()
        """Draws each retry's new seed."""
        self._session: Session | None = None
        self._names: set[str] = set()
        self._humans: list[str] = []
        self.joined = asyncio.Event()
        """Set once the hub has first let this participant in."""
        if idle is not None:
            idle.seat(config.name, config.talkativeness, self._next_request)

    @property
    def name(self) -> str:
        return self.config.name

    def hello(self) -> Hello:
        return Hello(
            name=self.name,
            role=Role.MODEL,
            protocol=PROTOCOL_VERSION,
            token=self.config.token,
            talkativeness=self.config.talkativeness,
            offstage=self.config.offstage and not self.joined.is_set(),  # a reconnect must not undo an /enter
        )

    async def run(self) -> None:
        """Stay in the room until cancelled, reconnecting (model kept loaded) when the hub goes away.

        The model belongs to whoever opened it, and stays open when the participant leaves.
        """
        try:
            await keep_trying(self.config.server, self.hello, self._converse, continuity=self.continuity,
                              ca_file=self.config.ca_file)
        finally:
            self._stop.set()
            self._redo_stop.set()
            running = {task for task in (self._reply_task, self._redo_task) if task is not None and not task.done()}
            if running:
                await asyncio.wait(running)  # the generation ends within a token of the stop

    async def _converse(self, session: Session) -> None:
        self._session = session
        self.joined.set()
        log.info("%s joined %s%s", self.name, self.config.server,
                 "" if session.extended else " (a baseline hub: no turn-taking)")
        if self.idle is not None and session.extended:
            self.idle.arrived(self.name)  # the model may warm our first prompt while the room is silent
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
            self._redo_stop.set()  # a /retry asked of the old connection cannot be answered on a new one
            self._session = None

    def _on_frame(self, frame: object) -> None:
        check_refusal(frame)
        if isinstance(frame, Chat):
            self._on_chat(frame)
        elif isinstance(frame, FloorState):
            self.floor = frame
            self._on_floor(frame)
        elif isinstance(frame, Redo):
            self._on_redo(frame)
        elif isinstance(frame, Refusal):
            log.warning("The hub refused %s: %s", self.name, frame.content)
        elif isinstance(frame, Notice) and frame.code:  # about this persona alone
            log.info("%s%s", f"To {self.name}: " if self.config.castmates else "", frame.content)
        elif isinstance(frame, Notice) and self.config.echo_room:
            log.info("%s", frame.content)

    def _on_chat(self, chat: Chat) -> None:
        if not self.continuity.is_new(chat):
            return
        self._names.add(chat.sender)
        if chat.role == Role.HUMAN.value and chat.sender not in self._humans:
            self._humans.append(chat.sender)
        replaced = next((i for i, old in enumerate(self.history) if chat.replaces and old.id == chat.replaces), None)
        if replaced is not None:
            self.history[replaced] = chat  # a new version (/retry) stands where the old one was said
        else:
            self.history.append(chat)
        if self.idle is not None and self._session is not None and self._session.extended:
            self.idle.heard(self.name, chat, self.floor.mode if self.floor is not None else None)
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
            self._start(self._reply(floor.turn, self._fresh_stop()), using_model=True)

    def _on_redo(self, redo: Redo) -> None:
        """``/retry``: write our message ``redo.id`` again from what was said before it, beside any turn."""
        self._redo_stop.set()  # a newer request replaces one still being written
        self._redo_stop = stop = StopFlag()
        history = list(self.history)
        index = next((i for i, chat in enumerate(history) if chat.id == redo.id and chat.sender == self.name), None)
        if index is None:
            work = self._send(Pass("that message is no longer in its memory", replaces=redo.id))
        else:
            work = self._redo(history[index], history[:index], stop)
        self._redo_task = asyncio.create_task(work)
        self._redo_task.add_done_callback(_log_failure)
        if index is not None:
            self._hold_prefill(self._redo_task)

    async def _redo(self, original: Chat, before: list[Chat], stop: StopFlag) -> None:
        """A new version of ``original``: every attempt samples anew (a retry's settings), none is streamed."""
        timing = ReplyTiming(started=time.monotonic())
        try:
            reply, _, taken_back = await self._attempts(before, stop, None, timing, first=1, replacing=original)
        except EngineError as error:
            log.error("%s cannot write its message again: %s", self.name, error)
            if not stop.is_set():
                await self._send(Pass(str(error), replaces=original.id))
            return
        if stop.is_set():
            return
        if not reply:
            await self._send(Pass(gave_up(taken_back), replaces=original.id, speed=timing.speed()))
            return
        if await self._send(Say(reply, replaces=original.id, speed=timing.speed())):
            log.info("%s (again): %s", self.name, reply, extra={"speaker": self.name})

    def _fresh_stop(self) -> StopFlag:
        self._stop = StopFlag()
        return self._stop

    def _start(self, work: Coroutine[None, None, None], *, using_model: bool = False) -> None:
        self._reply_task = asyncio.create_task(work)
        self._reply_task.add_done_callback(_log_failure)
        if using_model:
            self._hold_prefill(self._reply_task)

    def _hold_prefill(self, task: asyncio.Task[None]) -> None:
        """No idle prefill on our model from now (the turn frame's arrival) until ``task`` is done."""
        if self.idle is not None:
            release = self.idle.claim(self.name)
            task.add_done_callback(lambda _: release())

    async def _next_request(self, model: ChatModel) -> ChatRequest | None:
        """The request our next turn would build now, counted on ``model``; None off our hub.

        It goes through the very same ``build_request`` with the same history and settings as
        ``_generate``, so what idle prefill evaluates is the turn's prompt, byte for byte. When our
        own line is the newest, a turn now would pass, but the prompt up to our line is the start of
        the next turn's all the same. Before anything was said, it is the first turn's prompt up to
        where the first line will go (``opening_request``): the system prompt is most of it.
        """
        if self._session is None or not self._session.extended:
            return None
        history = list(self.history)
        persona, extras = prompt_parts(self.config, self._user())
        if not history:
            return await opening_request(model, persona, self.name, self.settings, extras)
        return await build_request(model, persona, self.name, history, self.settings, extras)

    def _cancel_reply(self) -> None:
        self._stop.set()
        self._reply_turn = None

    def _still_mine(self, turn: int | None, stop: StopFlag) -> bool:
        if stop.is_set():
            return False
        if turn is None or self.floor is None:
            return True
        return self.floor.turn == turn and self.name in self.floor.speakers and not self.floor.paused

    async def _send(self, frame: Say | Partial | Pass) -> bool:
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
        timing = ReplyTiming(started=time.monotonic())
        try:
            reply, stream, taken_back = await self._attempts(list(self.history), stop, turn, timing,
                                                             streaming=streaming)
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
            why = gave_up(taken_back)
            log.warning("%s passes the turn: %s", self.name, why)
            if session.extended:
                await self._send(Pass(why, turn=turn, speed=speed))
            return
        if self.config.delay > 0:
            await asyncio.sleep(self.config.delay)
            if not self._still_mine(turn, stop):
                log.info("Turn withdrawn from %s during --delay; reply not sent", self.name)
                return
        rest = stream.rest(reply) if stream is not None else None
        if rest:
            await self._send(Partial(rest))
        if not await self._send(Say(reply, turn=turn, speed=speed)):
            return
        if not session.extended:  # our hub echoes our message back with its number; a baseline hub does not
            self.history.append(Chat(sender=self.name, content=reply))
        log.info("%s: %s", self.name, reply, extra={"speaker": self.name})

    async def _attempts(self, context: list[Chat], stop: StopFlag, turn: int | None, timing: ReplyTiming, *,
                        streaming: bool = False, first: int = 0,
                        replacing: Chat | None = None) -> tuple[str, ReplyStream | None, list[Verdict]]:
        """Generate until the guards would let a reply through: at most ``retries`` more attempts.

        Each attempt a guard would withhold is taken back first (a ``Discard``: the hub keeps it in
        the transcript and withdraws what was streamed of it), so the room never sees it as said.
        Returns the clean reply ('' when every attempt failed or the turn was withdrawn), the
        stream that carried it, and the verdicts of the attempts taken back.
        """
        names = sorted(self._names | self.config.castmates)
        recent = [Earlier(chat.sender, chat.content) for chat in list(self.history)[-REPEAT_WINDOW:]]
        if replacing is not None and replacing not in list(self.history)[-REPEAT_WINDOW:]:
            recent = [*recent[1 - REPEAT_WINDOW:], Earlier(replacing.sender, replacing.content)]  # not the same again
        taken_back: list[Verdict] = []
        for attempt in range(first, first + max(self.config.retries, 0) + 1):
            stream = ReplyStream(self.name, names) if streaming else None
            settings = settings_for_attempt(self.settings, attempt, self._seeds, taken_back)
            raw = await self._generate(context, stop, settings, stream, timing)
            if not self._still_mine(turn, stop):
                break
            reply = clean_reply(raw, self.name, names)
            verdict = judge(raw, reply, self.name, names, recent)
            if not verdict.withheld:
                return reply, stream, taken_back
            taken_back.append(verdict)
            log.warning("%s took back an attempt: %s", self.name, verdict.reason)
            extended = self._session is not None and self._session.extended
            if extended and verdict.guard is not None:
                await self._send(Discard(verdict.removed, verdict.guard.value, turn=turn))
        return "", None, taken_back

    async def _generate(self, context: list[Chat], stop: StopFlag, settings: GenerationSettings,
                        stream: ReplyStream | None, timing: ReplyTiming) -> str:
        """Build the request and stream the raw reply; with a stream, whole clean sentences go out as partials.

        On our hub an empty partial goes out at the first token in any case: it tells the hub this
        persona is alive before its first sentence is done (see --first-token-timeout).
        """
        persona, extras = prompt_parts(self.config, self._user())
        request = await build_request(self.model, persona, self.name, context, settings, extras)
        log.debug("%s's prompt: %s", self.name, request.messages)
        if extras.lore is not None and settings.history_length > 0:
            self._log_lore(extras.lore, request, prompt_window(context, settings.history_length).messages)
        extended = self._session is not None and self._session.extended
        raw: list[str] = []
        try:
            async for piece in self.model.stream(request, stop):
                if timing.first_token is None:
                    timing.first_token = time.monotonic()
                    log.debug("%s's first token came %.3f s into its turn; its prompt starts at message %s",
                              self.name, timing.first_token - timing.started, _oldest_in(request, context))
                    if extended:
                        await self._send(Partial(""))
                raw.append(piece)
                clean = stream.feed(piece) if stream is not None else ""
                if clean and not stop.is_set():
                    await self._send(Partial(clean))
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
    return fill(config.system_prompt), PromptExtras(fill(config.examples), fill(config.after_history), lore)


def _oldest_in(request: ChatRequest, context: list[Chat]) -> str:
    """The id of the oldest message of ``context`` the prompt still holds: when it changes, the window was cut."""
    prompt = "\n".join(message["content"] for message in request.messages)
    oldest = "none"
    for chat in reversed(context):
        if chat.content not in prompt:
            break
        oldest = chat.id or "none"
    return oldest


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("A reply failed: %s", task.exception(), exc_info=task.exception())
