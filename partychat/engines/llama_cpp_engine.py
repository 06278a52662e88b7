"""The llama.cpp engine: a GGUF file run in this process by llama-cpp-python, with no conversion.

The chat template comes from the GGUF's own metadata. Between turns llama.cpp keeps the last
prompt's KV cache, and ``Llama.generate`` evaluates only the tokens after the longest prefix the
new prompt shares with it, so a growing conversation pays for its new lines only.

Several personas sharing one instance would share that one cache, each turn starting from the
previous speaker's prompt. With a warm cache (``cache_bytes`` > 0) each speaker keeps its own: the
context holds one speaker's tokens at a time, and the others' KV cells are saved aside with
``llama_state_seq_get_data`` and put back when they speak or are prefilled (see ``PersonaStates``).
"""

from __future__ import annotations

import codecs
import ctypes
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .anticopy import Vocabulary, ban_for
from .base import (
    ChatRequest,
    ModelError,
    PromptTooLong,
    ThreadedChatModel,
    chat_template_error,
    plain_transcript,
    shared_prefix,
)

log = logging.getLogger("partychat.client")

PREFILL_BATCH = 16
"""Tokens per decode when prefilling: a turn that arrives meanwhile waits for at most one such batch."""


def gpu_layers(device: str) -> int:
    """n_gpu_layers for --device: every layer on the GPU for gpu/auto where the build can offload, else none."""
    if device == "cpu":
        return 0
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        return -1
    if device == "auto":
        return 0
    raise ModelError(
        "--device gpu was asked for, but this llama-cpp-python build cannot offload to a GPU. Use --device cpu, "
        "or reinstall it with GPU support (for CUDA: CMAKE_ARGS=\"-DGGML_CUDA=on\" pip install llama-cpp-python)."
    )


@contextmanager
def without_weight_repacking() -> Iterator[None]:
    """Load models with llama.cpp's extra CPU buffer types off (weight repacking, AMX tiles).

    A llama-cpp-python built on a CPU that reports AMX (as this project's 2-core Xeons do) segfaults
    on the first prompt of more than one token when the process may not actually use those
    kernels, as in a sandbox. ``Llama()`` has no option for it, so its default model parameters are
    wrapped while it loads; decoding one token at a time is unaffected either way.
    """
    import llama_cpp.llama_cpp as api

    original = api.llama_model_default_params

    def params() -> Any:
        found = original()
        found.use_extra_bufts = False
        return found

    api.llama_model_default_params = params
    try:
        yield
    finally:
        api.llama_model_default_params = original


class PersonaStates:
    """The KV cache of each speaker a shared context serves, one speaker live in the context at a time.

    Why saved states and not one context with a sequence per speaker: a sequence each needs a
    context of n_ctx per speaker allocated up front (7 x 2048 tokens of KV, held or not), and
    ``Llama`` only drives sequence 0, so sampling would have to be rewritten around llama_decode.
    A saved sequence (``llama_state_seq_get_data``) holds only the KV cells of the tokens it has,
    plus a few bytes a cell, and switching speakers copies it in and out of the context, a few
    milliseconds for thousands of tokens (bench/turn_start.py --layouts has both measured). Not
    ``Llama.save_state``: its copy includes the logits array, n_batch x n_vocab floats.

    The saved states (not the live context, allocated anyway) count against ``cap_bytes``; the
    least recently used go first, and their speaker's next turn evaluates its prompt afresh.
    """

    def __init__(self, llama: Any, cap_bytes: int) -> None:
        self.llama = llama
        self.cap_bytes = cap_bytes
        self.occupant: str | None = None
        """Whose tokens the context holds now."""
        self.saved: OrderedDict[str, tuple[Any, Any]] = OrderedDict()
        """Speaker: (its tokens, its KV cells as llama_state_seq_get_data wrote them), least recently used first."""

    def held_bytes(self) -> int:
        return sum(len(cells) for _, cells in self.saved.values())

    def enter(self, speaker: str) -> None:
        """Make ``speaker``'s cache the live one, setting aside the one the context holds."""
        if speaker == self.occupant:
            return
        self._set_aside()
        self._bring_back(speaker)
        self.occupant = speaker

    def _set_aside(self) -> None:
        import llama_cpp

        llama, speaker = self.llama, self.occupant
        if speaker is None or llama.n_tokens == 0 or self.cap_bytes <= 0:
            return
        size = llama_cpp.llama_state_seq_get_size(llama.ctx, 0)
        cells = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(llama.ctx, cells, size, 0)
        if written != size:
            log.warning("llama.cpp could not save %s's cache (%d of %d bytes); its next turn starts afresh",
                        speaker, written, size)
            return
        self.saved[speaker] = (llama.input_ids[:llama.n_tokens].copy(), cells)
        self.saved.move_to_end(speaker)
        while self.saved and self.held_bytes() > self.cap_bytes:
            dropped, (tokens, _) = self.saved.popitem(last=False)
            log.debug("Dropped %s's saved cache of %d tokens: --cache-mb is full", dropped, len(tokens))

    def _bring_back(self, speaker: str) -> None:
        import llama_cpp

        llama = self.llama
        llama._ctx.kv_cache_seq_rm(0, -1, -1)
        llama.reset()
        if speaker not in self.saved:
            return
        tokens, cells = self.saved.pop(speaker)
        if llama_cpp.llama_state_seq_set_data(llama.ctx, cells, len(cells), 0) == 0:
            log.warning("llama.cpp could not restore %s's cache; its turn evaluates the whole prompt", speaker)
            llama._ctx.kv_cache_seq_rm(0, -1, -1)
            return
        llama.input_ids[:len(tokens)] = tokens
        llama.n_tokens = len(tokens)  # the logits are not restored: generate replays the last token for them


class LlamaCppChatModel(ThreadedChatModel):
    engine = "llama.cpp"

    def __init__(self, path: Path, *, context_tokens: int, threads: int | None = None, device: str = "cpu",
                 gpu_id: int = 0, cache_bytes: int = 0) -> None:
        """``cache_bytes`` > 0 keeps a cache per speaker (``PersonaStates``) and enables ``prefill``."""
        from llama_cpp import Llama  # registry.ENGINES["llama.cpp"] checked that it is installed
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if path.suffix.lower() != ".gguf" or not path.is_file():
            raise ModelError(
                f"The llama.cpp engine runs .gguf files, and {path} is not one; "
                "pass a .gguf file with --model, or choose --engine transformers for a model folder."
            )
        super().__init__(path.name)
        try:
            with without_weight_repacking():
                self.llama = Llama(model_path=str(path), n_ctx=context_tokens, n_threads=threads,
                                   n_threads_batch=threads, n_gpu_layers=gpu_layers(device), main_gpu=gpu_id,
                                   verbose=False)
        except (ValueError, RuntimeError) as error:
            raise ModelError(f"llama.cpp could not load {path.name}: {error}") from error
        template = self.llama.metadata.get("tokenizer.chat_template")
        # None: the model has no chat template and gets a plain transcript.
        self.chat_formatter: Any = None
        if template:
            self.chat_formatter = Jinja2ChatFormatter(template=template,
                                                      eos_token=self._token_text(self.llama.token_eos()),
                                                      bos_token=self._token_text(self.llama.token_bos()))
        self._vocab = self.llama._model.vocab  # for llama_vocab_is_eog: the public API has no wrapper for it
        self._words: Vocabulary | None = None
        """Each token's text for anti-copy, read from the model on the first request that needs it."""
        self.states = PersonaStates(self.llama, cache_bytes) if cache_bytes > 0 else None
        self.prefills = self.states is not None

    def _token_text(self, token: int) -> str:
        return self.llama.detokenize([token], special=True).decode("utf-8", "replace") if token >= 0 else ""

    def prompt_tokens(self, request: ChatRequest) -> list[int]:
        """By the GGUF's chat template when it has one (it writes its own BOS), else a plain transcript."""
        return self._tokenize(self._prompt_text(request))

    def _prompt_text(self, request: ChatRequest) -> str:
        if self.chat_formatter is None:
            return plain_transcript(request)
        messages = list(request.messages)
        try:
            return self.chat_formatter(messages=messages).prompt
        except Exception as error:
            raise chat_template_error(self.label, messages, str(error)) from error

    def _tokenize(self, text: str) -> list[int]:
        if self.chat_formatter is None:
            return self.llama.tokenize(text.encode(), add_bos=True, special=False)
        return self.llama.tokenize(text.encode(), add_bos=False, special=True)

    def known_tokens(self, request: ChatRequest) -> list[int]:
        """The prompt's tokens before ``request.unsaid`` (all of them when it has none): what a prefill may evaluate.

        Cut in the text, then kept only as far as the text before the cut tokenizes the same as the
        whole prompt, so no token that spans the stand-in is kept, nor the generation prompt after it:
        the first turn's real prompt, with a real line in that place, starts with every token kept.
        """
        text = self._prompt_text(request)
        tokens = self._tokenize(text)
        cut = text.find(request.unsaid) if request.unsaid else -1
        if cut < 0:
            return tokens
        return tokens[:shared_prefix(tokens, self._tokenize(text[:cut]))]

    def generate(self, request: ChatRequest, should_stop: Callable[[], bool], emit: Callable[[str], None]) -> None:
        import llama_cpp

        tokens = self.prompt_tokens(request)
        room = self.llama.n_ctx() - len(tokens)
        if room < 1:
            raise PromptTooLong(f"The prompt needs {len(tokens)} tokens, more than the {self.llama.n_ctx()} "
                                "this llama.cpp context holds.")
        sampling: dict[str, Any] = (
            {"temp": request.temperature, "top_k": 50, "top_p": 0.9, "min_p": 0.0, "repeat_penalty": 1.1}
            if request.temperature > 0
            else {"temp": 0.0, "repeat_penalty": 1.0}
        )
        # The seed is sticky on the Llama object: an unseeded request goes back to a random one.
        self.llama.set_seed(llama_cpp.LLAMA_DEFAULT_SEED if request.seed is None else request.seed)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")  # a character may span two tokens
        limit = min(request.max_tokens, room)
        if request.anti_copy is not None:
            sampling["logits_processor"] = [self._anti_copy(request, len(tokens))]
        if self.states is not None:
            self.states.enter(request.speaker)
        cached, evaluated = shared_prefix(self.llama._input_ids, tokens), self.evaluated_tokens()
        self._never_one_token(tokens, cached)
        for produced, token in enumerate(self.llama.generate(tokens, reset=True, **sampling), start=1):
            if produced == 1:
                log.debug("llama.cpp evaluated %d tokens for %s's turn before its first token "
                          "(%d of the prompt's %d were cached)", self.evaluated_tokens() - evaluated,
                          request.speaker, cached, len(tokens))
            if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                break
            text = decoder.decode(self.llama.detokenize([token]))
            if text:
                emit(text)
            if produced >= limit or should_stop():
                break
        if self.states is not None:
            self._forget_reply(len(tokens))
        tail = decoder.decode(b"", final=True)
        if tail:
            emit(tail)

    def _forget_reply(self, prompt_length: int) -> None:
        """Keep the speaker's cache to its prompt: the reply's cells were decoded one token at a time.

        Its next prompt holds the reply as written, and a cold context evaluates that in one batch;
        reusing cells from the single-token path (see ``_never_one_token``) would make a greedy reply
        differ warm and cold. Idle prefill evaluates the reply again anyway, before the next turn.
        """
        llama = self.llama
        if llama.n_tokens > prompt_length:
            llama._ctx.kv_cache_seq_rm(0, prompt_length, -1)
            llama.n_tokens = prompt_length
            llama._requires_eval = True

    def _never_one_token(self, tokens: list[int], cached: int) -> None:
        """Leave the prompt's last two tokens to evaluate where ``generate`` would evaluate only the last one.

        llama.cpp's CPU path for a batch of one token rounds differently from its path for two or
        more (the logits differ by up to 0.6 on the embedded model), and a greedy reply can flip on
        that. A prompt found whole in a restored cache, or all but its last token, would otherwise
        take that path where a cold prompt never does. Live logits of a prefill that ended on the
        prompt's last token are used as they are: that batch had two tokens or more.
        """
        llama = self.llama
        live = cached == len(tokens) == llama.n_tokens and not llama._requires_eval
        if len(tokens) - cached < 2 and not live and len(tokens) >= 2:
            llama.n_tokens = min(llama.n_tokens, len(tokens) - 2)
            llama._requires_eval = True

    def evaluated_tokens(self) -> int:
        """Tokens llama.cpp has decoded in this context so far, by its own count (prompt and generated)."""
        import llama_cpp

        llama_cpp.llama_synchronize(self.llama.ctx)  # llama.cpp counts a decode once it has waited for it
        counts = llama_cpp.llama_perf_context(self.llama.ctx)
        return int(counts.n_p_eval) + int(counts.n_eval)

    def prefill_prompt(self, request: ChatRequest, should_stop: Callable[[], bool]) -> None:
        """Evaluate the prompt's uncached tail into the speaker's cache, PREFILL_BATCH tokens at a time.

        The speaker's turn then finds its whole prompt cached if nothing was said meanwhile, or all
        but the newest lines if something was. Of a prompt with a stand-in line (``ChatRequest.unsaid``),
        only the part before it (``known_tokens``).
        """
        import llama_cpp

        assert self.states is not None
        tokens = self.known_tokens(request)
        if len(tokens) >= self.llama.n_ctx():
            return
        self.states.enter(request.speaker)
        shared = shared_prefix(self.llama._input_ids, tokens)
        if shared == len(tokens) or len(tokens) < 2:
            log.debug("Prefill for %s done: %d tokens cached", request.speaker, shared)
            return
        start = min(shared, len(tokens) - 2)  # no batch of one token (see _never_one_token)
        self.llama.n_tokens = start  # eval drops the cells after it
        begins = list(range(start, len(tokens), PREFILL_BATCH))
        if len(begins) > 1 and len(tokens) - begins[-1] == 1:
            begins.pop()  # the last batch takes that token instead
        # Lowest priority: one thread. Batches on several threads meet at a barrier per operation, and on
        # a busy machine (other personas' processes generating) one batch of 16 took seconds where one
        # thread took tens of milliseconds; a turn that arrives waits for that batch.
        llama_cpp.llama_set_n_threads(self.llama.ctx, self.llama.n_threads, 1)
        try:
            for begin, end in zip(begins, [*begins[1:], len(tokens)], strict=True):
                if should_stop():
                    log.debug("Prefill for %s stopped after %d of %d tokens", request.speaker, begin - start,
                              len(tokens) - start)
                    return
                batch = tokens[begin:end]
                self.llama.eval(batch)
                llama_cpp.llama_synchronize(self.llama.ctx)  # done, not queued, before the next look at should_stop
                log.debug("Prefill for %s: a batch of %d tokens", request.speaker, len(batch))
        finally:
            llama_cpp.llama_set_n_threads(self.llama.ctx, self.llama.n_threads, self.llama.n_threads_batch)
        log.debug("Prefill for %s done: %d tokens cached", request.speaker, len(tokens))

    def _anti_copy(self, request: ChatRequest, prompt_length: int) -> Callable[[Any, Any], Any]:
        """A logits processor that rules out the tokens anti-copy bans, given the reply generated so far.

        llama-cpp-python 0.3.36 builds its sampler chain itself, and its DRY sampler is not among the
        options ``generate`` takes (only the private ``_internals`` can add it); DRY would also
        penalise the whole context alike (the persona's own prompt, the moderator's question), where
        anti-copy aims at the other speakers' words. So the engine uses the shared word bans.
        """
        assert request.anti_copy is not None
        ban = ban_for(request.anti_copy, self._vocabulary,
                      lambda text: self.llama.tokenize(text.encode(), add_bos=False, special=False))

        def processor(input_ids: Any, scores: Any) -> Any:
            reply_ids = [int(token) for token in input_ids[prompt_length:]]
            reply = self.llama.detokenize(reply_ids).decode("utf-8", "ignore")
            banned = ban.banned_tokens(reply_ids, reply)
            if banned:
                scores[banned] = -float("inf")
            return scores

        return processor

    def _vocabulary(self) -> Vocabulary:
        if self._words is None:
            self._words = Vocabulary(self.llama.detokenize([token]).decode("utf-8", "ignore")
                                     for token in range(self.llama.n_vocab()))
        return self._words

    async def aclose(self) -> None:
        await super().aclose()
        self.llama.close()
