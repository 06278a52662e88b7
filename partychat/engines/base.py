"""The persona's view of a model: a ``ChatModel`` streams a reply to chat messages and stops when told.

Engines differ in how they run a model (in this process, or on a server); everything a persona does
with the text (prompt budget, persona merging, cleaning, partials, passing) lives in shared code
and sees only this interface.
"""

from __future__ import annotations

import asyncio
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .anticopy import AntiCopy

Message = dict[str, str]


class EngineError(Exception):
    """Anything an engine cannot do, in a sentence written for the person running the persona."""


class ModelError(EngineError):
    """A model that cannot be used (missing, unreadable, wrong format for the engine), with what to do instead."""


class EngineNotInstalled(ModelError):
    """The engine asked for needs a package that is not installed; the message says how to install it."""


class PromptTooLong(EngineError):
    """The prompt does not fit the context window and truncation is off."""


class SystemRoleUnsupported(EngineError):
    """The model's chat template has no system role; prompt building then folds the persona into a user turn."""


def chat_template_error(label: str, messages: Sequence[Message], complaint: str) -> ModelError | SystemRoleUnsupported:
    """What a chat template's refusal to render ``messages`` means, for every engine.

    A complaint about "system" when the chat opens with a system message means the template has
    no system role (prompt building then folds the persona into the first user turn); anything
    else is a chat this model's template cannot render.
    """
    if messages and messages[0]["role"] == "system" and "system" in complaint.lower():
        return SystemRoleUnsupported(f"The chat template of {label} has no system role.")
    return ModelError(f"The chat template of {label} cannot render this chat: {complaint}")


def shared_prefix(held: Sequence[int], wanted: Sequence[int]) -> int:
    """How many leading tokens two sequences share: what a kept cache can reuse of a new prompt."""
    for index, (x, y) in enumerate(zip(held, wanted, strict=False)):
        if x != y:
            return index
    return min(len(held), len(wanted))


class EngineUnavailable(EngineError):
    """The engine cannot answer right now (a server down or overloaded); the persona passes and tries next turn."""


@dataclass(frozen=True)
class ChatRequest:
    """One reply to generate: the chat so far, who is to speak, and how.

    ``speaker`` is the persona's name; models with no chat template get a plain transcript that
    ends with it, so they know whose line to write. ``anti_copy``, when set, says what the reply
    must not copy; each engine enforces it its own way (see anticopy.py and the README).
    """

    messages: tuple[Message, ...]
    speaker: str
    temperature: float = 0.7
    max_tokens: int = 100
    anti_copy: AntiCopy | None = None
    seed: int | None = None
    """Seeds the sampling, so a retry draws differently from the attempt before it; None leaves it random."""
    unsaid: str | None = None
    """Text standing in for a line nobody has said yet (a persona that has heard nothing): the prompt is
    known only up to where this first appears, so ``prefill`` evaluates no further. Never set to generate."""


class StopFlag:
    """Set on the event loop when a turn ends; read between tokens by worker threads, awaited by async engines."""

    def __init__(self) -> None:
        self._flag = threading.Event()
        self._awaitable = asyncio.Event()

    def set(self) -> None:
        """Call from the event loop's thread."""
        self._flag.set()
        self._awaitable.set()

    def is_set(self) -> bool:
        return self._flag.is_set()

    async def wait(self) -> None:
        await self._awaitable.wait()


class ChatModel(ABC):
    """A loaded model a persona talks through. One instance may serve several personas in one process.

    An instance keeps no per-persona state, only caches (such as a prompt cache, which may be one
    per ``ChatRequest.speaker``), and runs one generation at a time: requests from several personas
    queue up.
    """

    engine: str = ""
    prefills: bool = False
    """Whether ``prefill`` does anything: the engine keeps a cache per speaker that it can warm ahead."""

    def __init__(self, label: str) -> None:
        self.label = label

    @abstractmethod
    async def count_tokens(self, request: ChatRequest) -> int:
        """Tokens the prompt for ``request`` takes, generation prompt included.

        Raises SystemRoleUnsupported when the chat template refuses a system message.
        """

    @abstractmethod
    def stream(self, request: ChatRequest, stop: StopFlag) -> AsyncIterator[str]:
        """Yield the reply's text piece by piece; ends early, between two tokens, once ``stop`` is set.

        The pieces joined are the raw reply. Breaking out of the iteration also stops generation.
        Raises EngineError subclasses with a user-facing message.
        """

    @abstractmethod
    async def aclose(self) -> None:
        """Free the model (threads, memory, connections)."""

    async def prefill(self, request: ChatRequest, stop: StopFlag) -> None:
        """Evaluate ``request``'s prompt ahead, while the model is idle, into the cache kept for its speaker.

        The speaker's turn, if its prompt is still the same, then starts at once. Prefill works in
        small batches and returns between two of them once ``stop`` is set. Engines with no cache of
        their own to warm (``prefills`` False) do nothing.
        """
        return None


def plain_transcript(request: ChatRequest) -> str:
    """A prompt for models with no chat template: the chat as lines, ending where the speaker writes."""
    system, *turns = request.messages
    lines = [system["content"], ""]
    for message in turns:
        own = message["role"] == "assistant"
        lines.append(f"{request.speaker}: {message['content']}" if own else message["content"])
    lines.append(f"{request.speaker}:")
    return "\n".join(lines)


_END = object()


class ThreadedChatModel(ChatModel):
    """Base for engines that compute in this process: blocking work runs in the model's own worker thread.

    The single worker thread keeps the event loop free while tokens are computed, and serialises
    generations when several personas share the model.
    """

    def __init__(self, label: str) -> None:
        super().__init__(label)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.engine or 'model'}")

    @abstractmethod
    def prompt_tokens(self, request: ChatRequest) -> list[int]:
        """Blocking: the prompt as token ids."""

    @abstractmethod
    def generate(self, request: ChatRequest, should_stop: Callable[[], bool], emit: Callable[[str], None]) -> None:
        """Blocking: generate, calling ``emit`` with each new piece of text; check ``should_stop`` every token."""

    def prefill_prompt(self, request: ChatRequest, should_stop: Callable[[], bool]) -> None:
        """Blocking: ``prefill``'s work; check ``should_stop`` between batches. Nothing unless ``prefills``."""

    async def prefill(self, request: ChatRequest, stop: StopFlag) -> None:
        if self.prefills and not stop.is_set():
            await asyncio.get_running_loop().run_in_executor(self._worker, self.prefill_prompt, request, stop.is_set)

    async def count_tokens(self, request: ChatRequest) -> int:
        loop = asyncio.get_running_loop()
        return len(await loop.run_in_executor(self._worker, self.prompt_tokens, request))

    async def stream(self, request: ChatRequest, stop: StopFlag) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[object] = asyncio.Queue()
        abandoned = threading.Event()

        def emit(piece: str) -> None:
            try:
                loop.call_soon_threadsafe(pieces.put_nowait, piece)
            except RuntimeError:  # the event loop is gone: nobody is listening any more
                abandoned.set()

        def work() -> None:
            try:
                self.generate(request, lambda: stop.is_set() or abandoned.is_set(), emit)
            finally:
                emit(_END)  # type: ignore[arg-type]

        job = loop.run_in_executor(self._worker, work)
        try:
            while (piece := await pieces.get()) is not _END:
                yield piece  # type: ignore[misc]
            await job  # raises what the generation raised
        finally:
            abandoned.set()
            if not job.done():
                await asyncio.wait({job})  # the worker stops within a token; never leave it running unseen

    async def aclose(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)

