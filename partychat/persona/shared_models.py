"""One load per distinct model in a cast: personas that name the same model share one instance.

This is the one place that decides which personas share a model, so the rest of the client never
loads anything twice. It also puts a model's idle time to use (``IdlePrefill``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from ..engines.base import ChatModel, ChatRequest, EngineError, StopFlag
from ..hub.floor import DEFAULT_TALKATIVENESS, Mode, mentions
from ..protocol import Chat, Role
from .cast import Persona

log = logging.getLogger("partychat.client")

Key = TypeVar("Key", bound=Hashable)
Model = TypeVar("Model")


def load_once(cast: Sequence[Persona], locate: Callable[[Persona], Key],
              load: Callable[[Key, list[Persona]], Model]) -> dict[str, Model]:
    """The model for each persona's name, loading each distinct one once.

    ``locate`` turns a persona's model and engine into what identifies a load (downloading first
    where needed); it runs once per distinct (model, engine) as written, and every download
    happens before the first load. ``load`` gets that key and the personas sharing it.
    """
    located: dict[tuple[str, str], Key] = {}
    sharing: dict[Key, list[Persona]] = {}
    for persona in cast:
        written = (persona.model, persona.engine)
        if written not in located:
            located[written] = locate(persona)
        sharing.setdefault(located[written], []).append(persona)
    models: dict[str, Model] = {}
    for key, personas in sharing.items():
        models.update(dict.fromkeys((p.name for p in personas), load(key, personas)))
    return models


class SharedChatModel(ChatModel):
    """A ChatModel several personas share: one persona at a time, and one that has to wait says so.

    The engine underneath may serialise its work already (in-process engines have one worker
    thread); the lock here makes the order explicit for every engine, and gives the log its line.
    """

    def __init__(self, inner: ChatModel) -> None:
        super().__init__(inner.label)
        self.engine = inner.engine
        self.prefills = inner.prefills
        self.inner = inner
        self._lock = asyncio.Lock()
        self._holder: str | None = None

    @contextlib.asynccontextmanager
    async def _turn(self, speaker: str) -> AsyncIterator[None]:
        if self._lock.locked() and self._holder != speaker:
            log.info("%s waits: %s is still writing on %s", speaker, self._holder, self.label)
        async with self._lock:
            self._holder = speaker
            try:
                yield
            finally:
                self._holder = None

    async def count_tokens(self, request: ChatRequest) -> int:
        async with self._turn(request.speaker):
            return await self.inner.count_tokens(request)

    async def stream(self, request: ChatRequest, stop: StopFlag) -> AsyncIterator[str]:
        async with self._turn(request.speaker):
            if stop.is_set():
                return
            log.debug("%s writes on %s", request.speaker, self.label)  # the tests check these never interleave
            try:
                async with contextlib.aclosing(self.inner.stream(request, stop)) as pieces:
                    async for piece in pieces:
                        yield piece
            finally:
                log.debug("%s is done writing on %s", request.speaker, self.label)

    async def prefill(self, request: ChatRequest, stop: StopFlag) -> None:
        await self.inner.prefill(request, stop)

    async def aclose(self) -> None:
        await self.inner.aclose()


RequestFor = Callable[[ChatModel], Awaitable[ChatRequest | None]]
"""A persona's prompt as its next turn would build it, token-counted on the model given; None when it has none."""


@dataclass
class _Seat:
    name: str
    talkativeness: float
    request_for: RequestFor
    heard: int = 0
    """Messages this persona has heard; its cache is warm when ``warmed`` caught up with it."""
    warmed: int = -1


class IdlePrefill:
    """While none of its personas is using a model, evaluate the room's new lines into their caches.

    Each persona seated here builds its next prompt exactly as its turn will (``request_for``), so
    the turn finds it cached; from joining (``arrived``), before anyone speaks, that is its first
    prompt up to where the first line will go, mostly its system prompt. The persona most likely to
    speak next goes first: in round-robin the next in the cast's order after the last speaker,
    otherwise whoever the newest line names, then the most talkative. A persona that needs the
    model (``claim``) stops the prefill at once; the engine returns between two of its small
    batches, so a turn waits for one batch at most.
    """

    def __init__(self, model: ChatModel) -> None:
        self.model = model.inner if isinstance(model, SharedChatModel) else model
        self._seats: dict[str, _Seat] = {}
        self._claims = 0
        self._stop = StopFlag()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._mode = Mode.ROUND_ROBIN.value
        self._last: Chat | None = None
        self._last_model: str | None = None
        """Round-robin goes on after the last model that spoke, whoever spoke since."""

    def seat(self, name: str, talkativeness: float | None, request_for: RequestFor) -> None:
        self._seats[name] = _Seat(name, DEFAULT_TALKATIVENESS if talkativeness is None else talkativeness,
                                  request_for)

    def arrived(self, name: str) -> None:
        """``name`` is in the room: its first prompt can be warmed before anyone speaks (``warmed`` starts
        below ``heard``). Any history the hub replays follows, each line through ``heard``."""
        self._poke()

    def heard(self, name: str, chat: Chat, mode: str | None) -> None:
        """``name`` took ``chat`` into its history: its cache has a line to catch up on."""
        self._seats[name].heard += 1
        if chat.role in (Role.MODEL.value, Role.HUMAN.value):
            self._last = chat
        if chat.role == Role.MODEL.value:
            self._last_model = chat.sender
        if mode:
            self._mode = mode
        self._poke()

    def claim(self, name: str) -> Callable[[], None]:
        """``name`` is about to use the model: stop any prefill now. Call what this returns when done."""
        self._claims += 1
        self._stop.set()
        log.debug("%s needs %s: idle prefill holds off", name, self.model.label)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._claims -= 1
                self._poke()

        return release

    def order(self) -> list[str]:
        """The personas, the most likely next speaker first."""
        names = list(self._seats)
        last = self._last.sender if self._last is not None else None
        if self._mode == Mode.ROUND_ROBIN.value:
            start = names.index(self._last_model) + 1 if self._last_model in names else 0
            return names[start:] + names[:start]
        named = mentions(self._last.content, names, author=last) if self._last is not None else None
        ranked = sorted(names, key=lambda name: (name != named, name == last, -self._seats[name].talkativeness))
        return ranked

    def _poke(self) -> None:
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"prefill on {self.model.label}")

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            warmed_last = None
            while self._claims == 0 and (seat := self._next()) is not None:
                if await self._warm(seat):
                    warmed_last = seat.name
            likeliest = next(iter(self.order()), None)
            if self._claims == 0 and warmed_last is not None and likeliest not in (None, warmed_last):
                # Every cache is warm; the likeliest speaker's goes back into the context, so its turn
                # does not begin by swapping caches (a copy of its whole KV, ~0.1 s for 2048 tokens here).
                await self._warm(self._seats[likeliest])

    async def _warm(self, seat: _Seat) -> bool:
        """Prefill ``seat``'s next prompt; True when that ran to the end."""
        heard, self._stop = seat.heard, StopFlag()
        stop = self._stop
        try:
            request = await seat.request_for(self.model)
            if request is not None and not stop.is_set():
                await self.model.prefill(request, stop)
        except EngineError as error:  # its turn will meet the same and say so; nothing to warm
            log.debug("No prefill for %s: %s", seat.name, error)
        if stop.is_set():
            return False
        seat.warmed = heard
        return True

    def _next(self) -> _Seat | None:
        return next((self._seats[name] for name in self.order() if self._seats[name].warmed < self._seats[name].heard),
                    None)

    async def aclose(self) -> None:
        """Stop prefilling (within a batch) before the model is closed."""
        self._stop.set()
        self._claims += 1  # for good
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
