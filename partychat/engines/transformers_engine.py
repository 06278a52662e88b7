"""The transformers engine: a model loaded in this process by ``partychat.engines.models.load``.

Each persona keeps its KV cache from its last turn. Its next prompt starts with the last one (the
history is cut in chunks, not slid a message at a time), so only the tokens after the part they
share are evaluated: on the embedded model the first token comes in about a third of the time
(bench/README.md, "transformers: a prefix cache per persona"), and greedy replies are the same.
The caches kept count against ``cache_bytes`` (``--cache-mb``), the least recently used dropped
first, as the llama.cpp engine's saved states do.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .anticopy import Vocabulary, ban_for
from .base import ChatRequest, ThreadedChatModel, chat_template_error, plain_transcript, shared_prefix
from .models import LoadedModel

log = logging.getLogger("partychat.client")

_WORD_START_MARKS = ("\u0120", "\u2581")
"""How byte-level BPE (Ġ) and SentencePiece (▁) spell a token's leading space."""
STATIC_CACHE_STEP = 256
"""A persona's static cache is sized to its prompt plus reply, rounded up to this many tokens, so it
lasts several turns of a growing chat before it must be made again (cold)."""


@dataclass
class _Held:
    """A persona's KV cache and the tokens it holds, kept between its turns."""

    tokens: list[int]
    cache: Any
    nbytes: int
    """What its tensors take (``kv_bytes``), counted once when it is put aside."""


def kv_bytes(cache: Any) -> int:
    """The memory a KV cache's tensors hold: each layer's keys, values and any other tensor it keeps.

    A tensor's storage is counted, not its view: a cache cut back by ``crop`` (a slice) still holds
    what it had, and a static cache holds its whole length however few tokens are in it.
    """
    import torch

    storages: dict[int, int] = {}
    for layer in getattr(cache, "layers", ()):
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


class TransformersChatModel(ThreadedChatModel):
    engine = "transformers"

    def __init__(self, loaded: LoadedModel, *, cache_bytes: int = 0) -> None:
        """``cache_bytes`` caps the caches kept between turns (``--cache-mb``); 0 keeps none, every turn cold."""
        super().__init__(loaded.source.label)
        self.loaded = loaded
        self.cache_bytes = cache_bytes
        self._words: Vocabulary | None = None
        """Each token's text for anti-copy, read from the tokenizer on the first request that needs it."""
        self._held: OrderedDict[str, _Held] = OrderedDict()
        """Each persona's cache from its last turn, least recently used first; touched only in the worker thread."""

    def held_caches(self) -> dict[str, int]:
        """Whose caches are kept between turns and the bytes each takes, least recently used first."""
        return {speaker: held.nbytes for speaker, held in self._held.items()}

    def held_bytes(self) -> int:
        """What the caches kept between turns take now, the total ``cache_bytes`` caps."""
        return sum(self.held_caches().values())

    def prompt_tokens(self, request: ChatRequest) -> list[int]:
        """By the model's own chat template when it has one, else a plain transcript."""
        tokenizer = self.loaded.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            return list(tokenizer(plain_transcript(request))["input_ids"])
        messages = list(request.messages)
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as error:
            raise chat_template_error(self.label, messages, str(error)) from error
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def generate(self, request: ChatRequest, should_stop: Callable[[], bool], emit: Callable[[str], None]) -> None:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        def stop_when_told(input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), should_stop(), dtype=torch.bool, device=input_ids.device)

        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        input_ids = torch.tensor([self.prompt_tokens(request)], device=model.device)
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": request.temperature, "top_p": 0.9, "repetition_penalty": 1.1}
            if request.temperature > 0
            else {"do_sample": False}
        )
        if request.anti_copy is not None:
            sampling["logits_processor"] = LogitsProcessorList([self._anti_copy(request, input_ids.shape[1])])
        prompt = input_ids[0].tolist()
        cache = self._cache_for(request.speaker, prompt, request.max_tokens)
        with torch.inference_mode(), _seeded(request.seed, model.device):
            output = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=request.max_tokens,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                stopping_criteria=StoppingCriteriaList([stop_when_told]),
                streamer=_TokenByToken(tokenizer, emit),
                cache_implementation=None,  # the cache is ours; the model's own setting would make another
                **{_cache_argument(): cache},
                **sampling,
            )
        self._keep(request.speaker, _Held(output[0, :cache.get_seq_length()].tolist(), cache, kv_bytes(cache)))

    def _keep(self, speaker: str, held: _Held) -> None:
        """Keep ``speaker``'s cache for its next turn, dropping the least recently used ones beyond the cap."""
        self._held[speaker] = held
        self._held.move_to_end(speaker)
        while self._held and self.held_bytes() > self.cache_bytes:
            dropped, gone = self._held.popitem(last=False)
            log.debug("Dropped %s's cache of %d tokens (%d bytes): --cache-mb is full",
                      dropped, len(gone.tokens), gone.nbytes)

    def forget_prompts(self) -> None:
        """Drop every persona's cache, so the next turns start cold (benchmarks compare the two)."""
        self._held.clear()

    def _cache_for(self, speaker: str, prompt: list[int], reply_tokens: int) -> Any:
        """The persona's cache cut back to what ``prompt`` shares with it, or a new one.

        A cache that cannot be cut back (sliding-window layers) or is too small is made anew, of
        the kind the model decodes fastest with (models.py sets static on a CPU). A failed turn
        leaves no cache behind (it is taken out here and put back only after a reply), so nothing
        half-written is ever reused.
        """
        from transformers import DynamicCache, StaticCache

        model = self.loaded.model
        static = model.generation_config.cache_implementation == "static"
        needed = len(prompt) + reply_tokens
        held = self._held.pop(speaker, None)
        if held is not None and held.cache.is_croppable and (not static or held.cache.get_max_length() >= needed):
            keep = min(shared_prefix(held.tokens, prompt), len(prompt) - 1)  # generate() evaluates at least one
            if held.cache.get_seq_length() > keep:
                held.cache.crop(keep - held.cache.get_seq_length())
            return held.cache
        if not static:
            return DynamicCache(config=model.config)
        size = -(-needed // STATIC_CACHE_STEP) * STATIC_CACHE_STEP
        return StaticCache(config=model.config, max_cache_len=size)

    def _anti_copy(self, request: ChatRequest, prompt_length: int) -> Callable[[Any, Any], Any]:
        """A logits processor (a plain callable, as generate() accepts) ruling out what anti-copy bans."""
        assert request.anti_copy is not None
        tokenizer = self.loaded.tokenizer
        ban = ban_for(request.anti_copy, self._vocabulary,
                      lambda text: tokenizer(text, add_special_tokens=False)["input_ids"])

        def processor(input_ids: Any, scores: Any) -> Any:
            reply_ids = input_ids[0, prompt_length:].tolist()
            reply = tokenizer.decode(reply_ids, skip_special_tokens=True)
            banned = ban.banned_tokens(reply_ids, reply)
            if banned:
                scores[:, banned] = -float("inf")
            return scores

        return processor

    def _vocabulary(self) -> Vocabulary:
        if self._words is None:
            self._words = Vocabulary(_token_texts(self.loaded.tokenizer))
        return self._words


def _cache_argument() -> str:
    """generate()'s name for a cache passed in: ``cache`` in newer transformers 5 releases (which
    warn about the old name and drop it in 5.40), ``past_key_values`` before."""
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


def _token_texts(tokenizer: Any) -> list[str]:
    """The text of every token id with its leading space, which decoding one token alone may drop."""
    ids = list(range(len(tokenizer)))
    pieces = tokenizer.convert_ids_to_tokens(ids)
    texts = tokenizer.batch_decode([[token] for token in ids], skip_special_tokens=True)
    return [f" {text}" if isinstance(piece, str) and piece.startswith(_WORD_START_MARKS) and not text.startswith(" ")
            else text for piece, text in zip(pieces, texts, strict=True)]


@contextmanager
def _seeded(seed: int | None, device: Any) -> Iterator[None]:
    """Sample from ``seed`` without moving the process's own random state on; None leaves that state in use."""
    if seed is None:
        yield
        return
    import torch

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


class _TokenByToken:
    """A generate() streamer that emits the text of each new token as it comes, as the other engines do.

    (transformers' TextStreamer holds text back to whole words.) A token that ends inside a multi-byte
    character waits for the next one, so no piece carries half a character. Each step decodes only
    the last few tokens (from ``prefix`` on), so a long reply costs no more per token than a short one;
    decoding from a token before the new ones keeps the spacing a tokenizer gives a word's start.
    """

    def __init__(self, tokenizer: Any, emit: Callable[[str], None]) -> None:
        self.tokenizer, self.emit = tokenizer, emit
        self.ids: list[int] = []
        self.prefix = 0
        """Where the decoded window starts."""
        self.read = 0
        """Where the tokens not yet emitted start."""
        self.prompt_seen = False

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=True)

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() hands over the prompt first
            self.prompt_seen = True
            return
        self.ids.extend(int(token) for token in value.reshape(-1).tolist())
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)

    def _flush(self, *, final: bool) -> None:
        before = self._decode(self.prefix, self.read)
        text = self._decode(self.prefix)
        if len(text) > len(before) and (final or not text.endswith("\ufffd")):
            self.emit(text[len(before):])
            self.prefix, self.read = self.read, len(self.ids)
