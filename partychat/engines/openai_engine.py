"""The OpenAI-compatible engine: a model that runs on a server (Ollama, llama.cpp, vLLM, LM Studio, ...).

Every such server speaks the chat-completions API with streaming, so one engine reaches them all
through the official ``openai`` package. Stopping a turn closes the HTTP stream, which is how these
servers learn to stop generating.

The history budget needs the prompt's size in tokens, and the chat API does not say it before
generating. Servers that can count are asked (the first way that works is remembered):

- vLLM: ``POST /tokenize`` with the messages, counted by the model's own chat template;
- llama.cpp's ``llama-server``: ``POST /apply-template`` then ``POST /tokenize``, also exact;
- llama-cpp-python's server: ``POST /extras/tokenize/count`` on the text, plus the template's
  tokens per message estimated as below.

Others (Ollama, LM Studio, transformers serve) get an estimate that errs high, so that a prompt
never overflows the server's context: one token per 3 characters of text (English runs at about
4) plus 6 tokens per message for the chat template's markers and 4 for the reply's opening.

On llama-server each persona keeps a slot of its own (``id_slot`` with ``cache_prompt``), so its
next prompt, which starts with its last one, is evaluated only from where they differ; see
``SlotMap``. vLLM (automatic prefix caching) and Ollama find shared prefixes by themselves.
"""

from __future__ import annotations

import asyncio
import logging
import math
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import openai

from .anticopy import DEFAULT_N
from .base import (
    ChatModel,
    ChatRequest,
    EngineError,
    EngineUnavailable,
    ModelError,
    StopFlag,
    SystemRoleUnsupported,
    chat_template_error,
)

log = logging.getLogger("partychat.client")

CHARS_PER_TOKEN = 3
TEMPLATE_TOKENS_PER_MESSAGE = 6
REPLY_OPENING_TOKENS = 4
NO_KEY = "none"
"""Sent when no key is given: local servers ignore it, and the openai client refuses to send none."""
RETRIES = 3
"""Retries, with the openai client's exponential back-off (about 0.5, 1 and 2 s), before a turn passes."""
START_TIMEOUT = 10.0
"""Seconds the start-up check waits for the server to list its models."""
DRY_MULTIPLIER = 0.8
DRY_BASE = 1.75
"""llama-server's DRY settings against copying: the values its authors suggest for enabling it."""
DRY_WINDOW = 4096
"""Tokens DRY looks back over when the server does not say its context size."""
FREQUENCY_PENALTY = 0.5
PRESENCE_PENALTY = 0.3
"""The OpenAI penalties against copying at the default n: mild, since they act on every repeated token."""

Counter = Callable[[ChatRequest], Awaitable[int]]


class SlotMap:
    """Which llama-server slot each persona of this process uses, per server, for the whole process.

    A slot keeps the KV cache of the last prompt it evaluated, so a persona that always comes back
    to its own slot re-evaluates only what is new since its last turn; personas taking turns on one
    slot would each start from another's prompt. The map is shared by every model instance (the
    personas of a cast may hold separate ones). A persona's first choice is a hash of its name, so
    personas run as separate processes usually differ too; within the process the next free slot
    is taken when that one is held. With more personas than slots some must share, and the log
    says once to start the server with a larger --parallel.
    """

    def __init__(self) -> None:
        self._by_server: dict[str, dict[str, int]] = {}
        self._crowded: set[str] = set()

    def slot(self, server: str, speaker: str, total: int) -> int:
        held = self._by_server.setdefault(server, {})
        if speaker not in held:
            first = zlib.crc32(speaker.encode()) % total
            taken = set(held.values())
            free = [slot for slot in ((first + step) % total for step in range(total)) if slot not in taken]
            held[speaker] = free[0] if free else first
            if not free and server not in self._crowded:
                self._crowded.add(server)
                log.warning("llama-server at %s has %d slots for more personas than that, so some share a slot and "
                            "re-evaluate their prompts; start it with --parallel %d or more", server, total,
                            len(held))
        return held[speaker]


SLOTS = SlotMap()


def estimate_tokens(request: ChatRequest) -> int:
    """A prompt's size for a server that cannot count it: on the high side, as the module doc explains."""
    text = sum(math.ceil(len(message["content"]) / CHARS_PER_TOKEN) for message in request.messages)
    return text + TEMPLATE_TOKENS_PER_MESSAGE * len(request.messages) + REPLY_OPENING_TOKENS


def server_root(base_url: str) -> str:
    """The server's own address: tokenizer endpoints live beside /v1, not under it."""
    base = base_url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def _cause(error: BaseException) -> str:
    """The lowest-level reason in a chain of exceptions, in a few words."""
    while error.__cause__ is not None:
        error = error.__cause__
    return str(error) or type(error).__name__


def _server_detail(error: openai.APIStatusError) -> str:
    """The server's own explanation of a refused request, whatever shape its error body has."""
    body = error.body
    if isinstance(body, dict):
        for key in ("message", "detail", "error"):
            value = body.get(key)
            if isinstance(value, str) and value:
                return value
            if isinstance(value, dict) and isinstance(value.get("message"), str):
                return value["message"]
    return error.message


def match_model(name: str, offered: list[str]) -> str | None:
    """The offered model ``name`` means: the same id, or Ollama's ``name:latest``."""
    for candidate in (name, f"{name}:latest"):
        if candidate in offered:
            return candidate
    return None


class OpenAIChatModel(ChatModel):
    """A model on an OpenAI-compatible server, reached at ``base_url`` (which usually ends in /v1).

    Creating one checks, before the persona joins, that the key is accepted and the model is one
    the server offers; a server that does not answer yet is no reason to stay out of the room.
    """

    engine = "openai"

    def __init__(self, base_url: str, model: str = "", api_key: str | None = None) -> None:
        if not base_url:
            raise ModelError("The openai engine needs the server's address: pass --api-base, "
                             "e.g. http://localhost:11434/v1 for Ollama.")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key or NO_KEY
        super().__init__(model or self.base_url)
        self._client: openai.AsyncOpenAI | None = None
        self._counter: Counter | None = None
        self._props: dict[str, Any] | None = None
        """llama-server's /props once asked (see _llama_server_props)."""
        self._pinning = True
        """False once llama-server turned out not to take slot ids (see _open_stream)."""
        self._check_at_start()

    # -- start-up ------------------------------------------------------------------------------

    def _check_at_start(self) -> None:
        """Refuse a wrong key or an unknown model now, with the server's list; a silent server only warns."""
        try:
            with openai.OpenAI(base_url=self.base_url, api_key=self.api_key, max_retries=1,
                               timeout=START_TIMEOUT) as client:
                offered: list[str] | None = [model.id for model in client.models.list()]
        except openai.NotFoundError:
            offered = None  # a server without /v1/models: the first reply will tell
        except openai.OpenAIError as error:
            problem = self._explain(error, "listing its models", retries=1)
            if not isinstance(problem, EngineUnavailable):
                raise problem from error
            log.warning("%s Joining anyway: the persona passes its turns until the server answers.", problem)
            return
        if offered is not None:
            self.model = self._choose(offered)
            self.label = self.model
            log.info("The server at %s offers %s; this persona uses %s", self.base_url, ", ".join(offered),
                     self.model)

    def _choose(self, offered: list[str]) -> str:
        """The model to ask for, given what the server offers. Raises ModelError naming the choices."""
        if not self.model:
            if len(offered) == 1:
                return offered[0]
            choices = ", ".join(offered) if offered else "none"
            raise ModelError(f"The server at {self.base_url} offers several models or none ({choices}); "
                             "choose one with --model.")
        chosen = match_model(self.model, offered)
        if chosen is None:
            raise ModelError(self._unknown_model(offered))
        return chosen

    def _unknown_model(self, offered: list[str] | None) -> str:
        if offered is None:
            return (f"The server at {self.base_url} has no model {self.model!r}, and does not list the ones it "
                    "has (is --api-base right? it usually ends in /v1).")
        return (f"The server at {self.base_url} has no model {self.model!r}; it offers: "
                f"{', '.join(offered) or 'none'}. Pass one of them with --model.")

    # -- errors --------------------------------------------------------------------------------

    def _explain(self, error: openai.OpenAIError, doing: str, retries: int = RETRIES) -> EngineError:
        """One sentence for the user about what went wrong talking to the server."""
        where = f"the model server at {self.base_url}"
        if isinstance(error, openai.APIConnectionError):
            tries = f", even after {retries} retries" if retries else ""
            return EngineUnavailable(f"Cannot reach {where} while {doing} ({_cause(error)}){tries}; is it running?")
        if isinstance(error, openai.AuthenticationError | openai.PermissionDeniedError):
            return ModelError(f"{where[0].upper()}{where[1:]} refused the API key ({_server_detail(error)}); "
                              "pass the right one with --api-key or PARTYCHAT_API_KEY.")
        if isinstance(error, openai.RateLimitError | openai.InternalServerError):
            return EngineUnavailable(f"{where[0].upper()}{where[1:]} failed while {doing} "
                                     f"({error.status_code}: {_server_detail(error)}).")
        if isinstance(error, openai.APIStatusError):
            return EngineError(f"{where[0].upper()}{where[1:]} refused the request while {doing} "
                               f"({error.status_code}: {_server_detail(error)}).")
        return EngineUnavailable(f"Lost {where} while {doing} ({_cause(error)}).")

    # -- the async client ------------------------------------------------------------------------

    def _connection(self) -> openai.AsyncOpenAI:
        """The client, made in the event loop that uses it (its connections belong to that loop)."""
        if self._client is None:
            self._client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, max_retries=RETRIES)
        return self._client

    async def _offered_models(self) -> list[str] | None:
        """What /v1/models lists, or None for a server that does not list."""
        try:
            return [model.id async for model in self._connection().models.list()]
        except openai.NotFoundError:
            return None

    async def _model_name(self) -> str:
        """The model to ask for; found on first use when the server was silent at start-up."""
        if not self.model:
            try:
                offered = await self._offered_models()
            except openai.OpenAIError as error:
                raise self._explain(error, "listing its models") from error
            self.model = self._choose(offered or [])
            self.label = self.model
        return self.model

    # -- counting ------------------------------------------------------------------------------

    async def count_tokens(self, request: ChatRequest) -> int:
        if self._counter is not None:
            return await self._counter(request)
        for counter in (self._count_by_vllm, self._count_by_llama_server, self._count_by_llama_cpp_python):
            try:
                size = await counter(request)
            except SystemRoleUnsupported:
                raise
            except (openai.APIStatusError, KeyError, TypeError, ValueError):
                continue  # not this kind of server
            except openai.OpenAIError:
                return estimate_tokens(request)  # the server is away: ask again next time
            self._counter = counter
            log.info("Counting prompt tokens with the server's tokenizer (%s)", counter.__name__)
            return size
        log.info("The server at %s cannot count tokens; prompt sizes are estimated (see README)", self.base_url)
        self._counter = self._estimate
        return estimate_tokens(request)

    async def _estimate(self, request: ChatRequest) -> int:
        return estimate_tokens(request)

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A JSON request beside the chat API, through the same client (key, pool, timeouts); no retries."""
        return await self._post_or_get(path, body)

    async def _post_or_get(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """POST ``body`` to ``path`` beside the chat API, or GET it when there is no body."""
        url = f"{server_root(self.base_url)}{path}"
        options: Any = {"max_retries": 0}
        client = self._connection()
        answer = (await client.get(url, cast_to=object, options=options) if body is None
                  else await client.post(url, body=body, cast_to=object, options=options))
        if not isinstance(answer, dict):
            raise TypeError(f"{path} answered {type(answer).__name__}, not an object")
        return answer

    async def _count_by_vllm(self, request: ChatRequest) -> int:
        body = {"model": await self._model_name(), "messages": list(request.messages), "add_generation_prompt": True}
        try:
            answer = await self._post("/tokenize", body)
        except openai.BadRequestError as error:
            refusal = chat_template_error(self.model, request.messages, _server_detail(error))
            if isinstance(refusal, SystemRoleUnsupported):
                raise refusal from error
            raise  # not this kind of server, or a chat it cannot take: the next way of counting decides
        return int(answer["count"])  # llama-server's /tokenize answers too, but with no count

    async def _count_by_llama_server(self, request: ChatRequest) -> int:
        prompt = (await self._post("/apply-template", {"messages": list(request.messages)}))["prompt"]
        return len((await self._post("/tokenize", {"content": prompt, "add_special": True}))["tokens"])

    async def _count_by_llama_cpp_python(self, request: ChatRequest) -> int:
        text = "\n".join(message["content"] for message in request.messages)
        answer = await self._post("/extras/tokenize/count", {"input": text, "model": self.model or None})
        return int(answer["count"]) + TEMPLATE_TOKENS_PER_MESSAGE * len(request.messages) + REPLY_OPENING_TOKENS

    # -- streaming -----------------------------------------------------------------------------

    async def stream(self, request: ChatRequest, stop: StopFlag) -> AsyncIterator[str]:
        model = await self._model_name()
        try:
            chunks = await self._open_stream(model, request, stop)
        except openai.NotFoundError as error:
            raise ModelError(self._unknown_model(await self._offered_models_or_none())) from error
        except openai.OpenAIError as error:
            raise self._explain(error, "starting a reply") from error
        if chunks is None:
            return
        pieces: asyncio.Queue[str | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for chunk in chunks:
                    if chunk.choices and chunk.choices[0].delta.content:
                        pieces.put_nowait(chunk.choices[0].delta.content)
            finally:
                pieces.put_nowait(None)

        reader = asyncio.ensure_future(read())
        watcher = asyncio.ensure_future(stop.wait())
        watcher.add_done_callback(lambda _: reader.cancel())  # a pause ends the read at once, mid-wait
        try:
            while (piece := await pieces.get()) is not None:
                yield piece
            (outcome,) = await asyncio.gather(reader, return_exceptions=True)
            if isinstance(outcome, Exception):
                raise self._explain_midway(outcome) from outcome
        finally:
            watcher.cancel()
            reader.cancel()
            await asyncio.gather(reader, watcher, return_exceptions=True)
            await chunks.close()  # closing the HTTP stream is what stops the server generating

    async def _open_stream(self, model: str, request: ChatRequest, stop: StopFlag) -> Any:
        """The reply's stream, or None if the turn ends first.

        A request with a slot that is refused goes again without one; if that one is taken, the
        slot was the trouble, and the personas on this server go unpinned from then on.
        """
        props = await self._llama_server_props()
        fields = self._anti_copy_fields(request, props)
        slot = self._slot_fields(request.speaker, props)
        try:
            return await _unless_stopped(self._opening(model, request, fields, slot), stop)
        except openai.BadRequestError as error:
            if not slot:
                raise
            refusal = _server_detail(error)
        chunks = await _unless_stopped(self._opening(model, request, fields, {}), stop)
        self._pinning = False
        log.warning("llama-server at %s refused the slot id %s (%s); its personas go unpinned from now on, so each "
                    "turn may re-evaluate the whole prompt", server_root(self.base_url), slot["id_slot"], refusal)
        return chunks

    def _opening(self, model: str, request: ChatRequest, fields: dict[str, Any],
                 slot: dict[str, Any]) -> asyncio.Future[Any]:
        if slot:
            fields = {**fields, "extra_body": {**fields.get("extra_body", {}), **slot}}
        return asyncio.ensure_future(self._connection().chat.completions.create(
            model=model, messages=list(request.messages), stream=True,  # type: ignore[arg-type]
            temperature=request.temperature, max_tokens=request.max_tokens, **fields,
            **({} if request.seed is None else {"seed": request.seed})))

    async def _llama_server_props(self) -> dict[str, Any]:
        """llama-server's /props, asked once (an empty dict for other servers, or when it does not answer)."""
        if self._counter != self._count_by_llama_server:
            return {}
        if self._props is None:
            try:
                self._props = await self._post_or_get("/props")
            except (openai.OpenAIError, TypeError):
                self._props = {}
        return self._props

    def _slot_fields(self, speaker: str, props: dict[str, Any]) -> dict[str, Any]:
        """On llama-server, the persona's own slot (see SlotMap); nothing for other servers.

        Ids are kept below the slot count /props gives: recent servers wrap a larger id round,
        older ones refused it. A server that does not give the count is used unpinned.
        """
        total = props.get("total_slots")
        if not props or not self._pinning:
            return {}
        if not isinstance(total, int) or total < 1:
            self._pinning = False
            log.info("llama-server at %s does not say how many slots it has; personas go unpinned",
                     server_root(self.base_url))
            return {}
        return {"id_slot": SLOTS.slot(server_root(self.base_url), speaker, total), "cache_prompt": True}

    def _explain_midway(self, error: BaseException) -> EngineError:
        if isinstance(error, openai.OpenAIError) and not isinstance(error, openai.APIConnectionError):
            return self._explain(error, "streaming a reply")
        return EngineUnavailable(f"The model server at {self.base_url} broke off in the middle of the reply "
                                 f"({_cause(error)}).")

    def _anti_copy_fields(self, request: ChatRequest, props: dict[str, Any]) -> dict[str, Any]:
        """What the server is asked for against copying: a server decodes by itself, so no word bans here.

        llama-server (recognised by its /apply-template endpoint while counting the prompt) has DRY,
        which penalises extending any sequence already in the context; its allowed length follows the
        request's n, and it looks back over a slot's whole context (from /props: recent servers refuse
        the -1 that older ones took for it). Every other server gets the standard OpenAI frequency and
        presence penalties, stronger for a smaller n.
        """
        if request.anti_copy is None:
            return {}
        n = request.anti_copy.n
        if self._counter == self._count_by_llama_server:
            settings = props.get("default_generation_settings")
            context = settings.get("n_ctx") if isinstance(settings, dict) else None
            return {"extra_body": {"dry_multiplier": DRY_MULTIPLIER, "dry_base": DRY_BASE, "dry_allowed_length": n - 1,
                                   "dry_penalty_last_n": context if isinstance(context, int) and context > 0
                                   else DRY_WINDOW}}
        scale = DEFAULT_N / n
        return {"frequency_penalty": round(FREQUENCY_PENALTY * scale, 2),
                "presence_penalty": round(PRESENCE_PENALTY * scale, 2)}

    async def _offered_models_or_none(self) -> list[str] | None:
        try:
            return await self._offered_models()
        except openai.OpenAIError:
            return None

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


async def _unless_stopped(opening: asyncio.Future[Any], stop: StopFlag) -> Any:
    """The opening request's result, or None (request cancelled) if the turn ends before the server answers."""
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({opening, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not opening.done():
            opening.cancel()  # closes the half-open request, so the server drops it too
            await asyncio.gather(opening, return_exceptions=True)
    return None if opening.cancelled() else opening.result()
