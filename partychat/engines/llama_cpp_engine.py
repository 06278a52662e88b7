"""The llama.cpp engine: a GGUF file run in this process by llama-cpp-python, with no conversion.

The chat template comes from the GGUF's own metadata. Between turns llama.cpp keeps the last
prompt's KV cache, and ``Llama.generate`` evaluates only the tokens after the longest prefix the
new prompt shares with it, so a growing conversation pays for its new lines only. Several
personas sharing one instance share that one cache: each turn reuses what its prompt has in common
with the previous speaker's.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .anticopy import Vocabulary, ban_for
from .base import ChatRequest, ModelError, PromptTooLong, ThreadedChatModel, chat_template_error, plain_transcript


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


class LlamaCppChatModel(ThreadedChatModel):
    engine = "llama.cpp"

    def __init__(self, path: Path, *, context_tokens: int, threads: int | None = None, device: str = "cpu",
                 gpu_id: int = 0) -> None:
        from llama_cpp import Llama  # registry.ENGINES["llama.cpp"] checked that it is installed
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if path.suffix.lower() != ".gguf" or not path.is_file():
            raise ModelError(
                f"The llama.cpp engine runs .gguf files, and {path} is not one; "
                "pass a .gguf file with --model, or choose --backend transformers for a model folder."
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

    def _token_text(self, token: int) -> str:
        return self.llama.detokenize([token], special=True).decode("utf-8", "replace") if token >= 0 else ""

    def prompt_tokens(self, request: ChatRequest) -> list[int]:
        """By the GGUF's chat template when it has one (it writes its own BOS), else a plain transcript."""
        if self.chat_formatter is None:
            return self.llama.tokenize(plain_transcript(request).encode(), add_bos=True, special=False)
        messages = list(request.messages)
        try:
            text = self.chat_formatter(messages=messages).prompt
        except Exception as error:
            raise chat_template_error(self.label, messages, str(error)) from error
        return self.llama.tokenize(text.encode(), add_bos=False, special=True)

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
        for produced, token in enumerate(self.llama.generate(tokens, reset=True, **sampling), start=1):
            if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                break
            text = decoder.decode(self.llama.detokenize([token]))
            if text:
                emit(text)
            if produced >= limit or should_stop():
                break
        tail = decoder.decode(b"", final=True)
        if tail:
            emit(tail)

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
