"""One load per distinct model in a cast: personas that name the same model share one instance.

This is the one place that decides which personas share a model, so the rest of the client never
loads anything twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from typing import TypeVar

from ..engines.base import ChatModel, ChatRequest, StopFlag
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

    async def aclose(self) -> None:
        await self.inner.aclose()
