"""Prompt building, streaming and stopping, on every in-process engine.

The transformers engine runs a tiny model the tests build (it never stops by itself); the
llama.cpp engine runs the embedded GGUF. Both use the embedded model's tokenizer and chat template.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from helpers import build_tiny_model

from partychat.engines.base import ChatRequest, PromptTooLong, StopFlag
from partychat.engines.llama_cpp_engine import LlamaCppChatModel
from partychat.engines.models import ModelError, ModelSource, converted_folder, embedded_gguf, load, resolve
from partychat.engines.registry import EngineOptions, open_chat_model
from partychat.engines.transformers_engine import TransformersChatModel
from partychat.persona.generation import GenerationSettings, build_messages, build_request, clean_reply
from partychat.protocol import Chat, Role

NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<turn>{{ m['role'] }}\n{{ m['content'] }}</turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<turn>model\n{% endif %}"
)
ENGINES = ("transformers", "llama.cpp")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module", params=ENGINES)
def engine(request, tiny_folder):
    if request.param == "transformers":
        model = TransformersChatModel(load(ModelSource("folder", str(tiny_folder))))
    else:
        model = LlamaCppChatModel(embedded_gguf(), context_tokens=4096, threads=2)
    yield model
    asyncio.run(model.aclose())


def decode(model, ids: list[int]) -> str:
    if isinstance(model, TransformersChatModel):
        return model.loaded.tokenizer.decode(ids)
    return model.llama.detokenize(ids, special=True).decode()


def text_tokens(model, text: str) -> int:
    if isinstance(model, TransformersChatModel):
        return len(model.loaded.tokenizer(text, add_special_tokens=False)["input_ids"])
    return len(model.llama.tokenize(text.encode(), add_bos=False))


def set_template(model, template: str | None, monkeypatch) -> None:
    """Give the model another chat template (None: none at all) for one test."""
    if isinstance(model, TransformersChatModel):
        monkeypatch.setattr(model.loaded.tokenizer, "chat_template", template)
        return
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(template=template, eos_token="", bos_token="") if template else None
    monkeypatch.setattr(model, "chat_formatter", formatter)


def prompt_text(model, persona: str, name: str, history: list[Chat],
                settings: GenerationSettings | None = None) -> tuple[list[int], str]:
    request = asyncio.run(build_request(model, persona, name, history, settings or GenerationSettings()))
    ids = model.prompt_tokens(request)
    return ids, decode(model, ids)


def stream_pieces(model, request: ChatRequest, stop_after: int = 0) -> list[str]:
    """Every piece the model streams; with ``stop_after``, the stop flag is set once that many arrived."""

    async def main() -> list[str]:
        stop, pieces = StopFlag(), []
        async for piece in model.stream(request, stop):
            pieces.append(piece)
            if len(pieces) == stop_after:
                stop.set()
        return pieces

    return asyncio.run(main())


def chats(*pairs: tuple[str, str]) -> list[Chat]:
    return [Chat(sender=s, content=c, seq=n) for n, (s, c) in enumerate(pairs, start=1)]


def test_own_lines_are_assistant_turns_and_others_are_named_user_turns():
    messages = build_messages("You are Sage.", "Sage", chats(("Moderator", "Hi"), ("Sage", "Hello"),
                                                              ("Tinker", "Yo"), ("Bob", "Hey")))
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("You are Sage.")
    assert messages[1]["content"] == "Moderator: Hi"
    assert messages[3]["content"] == "Tinker: Yo\nBob: Hey"


def test_the_moderators_latest_line_closes_the_prompt_once_others_have_spoken_since():
    human = Role.HUMAN.value
    asked = [Chat("Moderator", "Old question?", seq=1, role=human), Chat("Tinker", "Yo", seq=2),
             Chat("Moderator", "Why do bridges last?", seq=3, role=human)]
    assert build_messages("You are Sage.", "Sage", asked)[-1]["content"].endswith("Moderator: Why do bridges last?")
    assert "topic" not in build_messages("You are Sage.", "Sage", asked)[-1]["content"]  # the line is last
    answered = build_messages("You are Sage.", "Sage", [*asked, Chat("Tinker", "Stone.", seq=4),
                                                         Chat("Sage", "Arches.", seq=5)])
    assert answered[-1] == {"role": "user",
                            "content": '(Continue the conversation.)\n\n(The topic, as Moderator put it: '
                                       '"Why do bridges last?")'}
    assert build_messages("You are Sage.", "Sage", chats(("Tinker", "Yo")))[-1]["content"] == "Tinker: Yo"


def test_a_reply_that_writes_the_topic_note_out_again_is_cut_there():
    reply = 'Happy to help. Music is learnt by ear first.\n\n(The topic, as Bench put it: "Ear or notation?")'
    assert clean_reply(reply, "Researcher", ["Bench"]) == "Happy to help. Music is learnt by ear first."
    plain = "The topic, as you said, is hard."
    assert clean_reply(plain, "Researcher", ["Bench"]) == plain


def test_a_whisper_is_marked_private_in_the_prompt_so_the_persona_can_keep_it():
    whispered = [Chat(sender="Moderator", content="The code word is PELICAN.", seq=1, whisper=True,
                      recipients=("Sage",)),
                 Chat(sender="Moderator", content="Meet at noon.", seq=2, whisper=True, recipients=("Sage", "Tinker")),
                 Chat(sender="Moderator", content="Hello all.", seq=3)]
    messages = build_messages("You are Sage.", "Sage", whispered)
    assert messages[1]["content"] == ("Moderator (privately, to you only): The code word is PELICAN.\n"
                                      "Moderator (privately, to you and Tinker): Meet at noon.\n"
                                      "Moderator: Hello all.")


def test_the_prompt_uses_the_models_chat_template(engine):
    _, text = prompt_text(engine, "You are Sage.", "Sage", chats(("Moderator", "Hi")))
    assert "<|im_start|>system\nYou are Sage." in text
    assert text.rstrip().endswith("<|im_start|>assistant")


def test_a_model_without_a_template_gets_a_plain_transcript_prompt(engine, monkeypatch):
    set_template(engine, None, monkeypatch)
    _, text = prompt_text(engine, "You are Sage.", "Sage", chats(("Moderator", "Hi")))
    assert text.lstrip().startswith("You are Sage.")
    assert "Moderator: Hi" in text and text.endswith("Sage:")


def test_a_template_without_a_system_role_gets_the_persona_in_the_first_user_turn(engine, monkeypatch):
    set_template(engine, NO_SYSTEM_TEMPLATE, monkeypatch)
    _, text = prompt_text(engine, "You are Sage.", "Sage", chats(("Moderator", "Hi")))
    assert "system" not in text
    assert "<turn>user\nYou are Sage." in text and "Moderator: Hi" in text


def test_long_histories_drop_the_oldest_turns_first_but_never_the_persona(engine):
    history = chats(*[("Moderator", f"message number {n} " + "words " * 40) for n in range(30)])
    settings = GenerationSettings(max_context_tokens=400, max_tokens=100, history_length=30)
    ids, text = prompt_text(engine, "You are Sage, keeper of the persona.", "Sage", history, settings)
    assert len(ids) <= 300
    assert "keeper of the persona" in text
    assert "message number 29" in text and "message number 0 " not in text


def test_history_length_limits_the_turns_seen(engine):
    history = chats(*[("Moderator", f"line {n}") for n in range(10)])
    _, text = prompt_text(engine, "Persona.", "Sage", history, GenerationSettings(history_length=2))
    assert "line 9" in text and "line 8" in text and "line 7" not in text


def test_a_single_huge_message_is_cut_to_fit(engine):
    history = chats(("Moderator", "start " + "blah " * 3000 + "the end"))
    ids, text = prompt_text(engine, "Persona.", "Sage", history, GenerationSettings(max_context_tokens=300))
    assert len(ids) <= 200
    assert "the end" in text


def test_without_auto_truncate_a_long_prompt_is_a_clear_error(engine):
    history = chats(*[("Moderator", "words " * 100) for _ in range(5)])
    settings = GenerationSettings(max_context_tokens=300, max_tokens=100, auto_truncate=False)
    with pytest.raises(PromptTooLong, match="--no-auto-truncate"):
        prompt_text(engine, "Persona.", "Sage", history, settings)


def test_a_persona_that_cannot_fit_is_an_error_not_a_silent_drop(engine):
    with pytest.raises(PromptTooLong, match="persona alone"):
        prompt_text(engine, "persona " * 500, "Sage", [], GenerationSettings(max_context_tokens=200))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Sage: Hello there.", "Hello there."),
        ("**Sage**: Hello there.", "Hello there."),
        ("Hello.\nTinker: I disagree.", "Hello."),
        ("Hello.\nmoderator: what?", "Hello."),
        ("First thought. Second thought that trails", "First thought."),
        ("   \n  ", ""),
        ("Tinker: only someone else's line", ""),
    ],
)
def test_replies_are_cleaned(raw, expected):
    assert clean_reply(raw, "Sage", ["Tinker", "Sage"]) == expected


STORY = ChatRequest(
    ({"role": "system", "content": "You are a storyteller."},
     {"role": "user", "content": "Count from 1 to 300, separated by commas."}),
    speaker="Teller", temperature=0, max_tokens=40,
)


def greedy_reference(model, request: ChatRequest) -> str:
    """The same reply computed by the engine's library directly, without streaming."""
    ids = model.prompt_tokens(request)
    if isinstance(model, TransformersChatModel):
        import torch

        output = model.loaded.model.generate(torch.tensor([ids]), max_new_tokens=request.max_tokens, do_sample=False)
        return model.loaded.tokenizer.decode(output[0][len(ids):], skip_special_tokens=True)
    completion = model.llama.create_completion(ids, max_tokens=request.max_tokens, temperature=0,
                                               repeat_penalty=1.0)
    return completion["choices"][0]["text"]


def test_streamed_pieces_add_up_to_the_libraries_own_reply(engine):
    pieces = stream_pieces(engine, STORY)
    assert len(pieces) > 1
    assert "".join(pieces) == greedy_reference(engine, STORY)


def test_a_seed_makes_sampling_repeatable_and_another_seed_draws_differently(engine):
    """What a persona's retry relies on: a new seed is a new draw; no seed leaves the engine's own state."""
    def sampled(seed: int | None) -> str:
        request = ChatRequest(STORY.messages, STORY.speaker, temperature=1.5, max_tokens=24, seed=seed)
        return "".join(stream_pieces(engine, request))

    assert sampled(7) == sampled(7)
    assert len({sampled(7), sampled(8), sampled(9)}) > 1


def test_a_set_stop_flag_ends_generation_within_a_few_tokens(engine):
    long_story = ChatRequest(STORY.messages, STORY.speaker, temperature=0, max_tokens=200)
    assert text_tokens(engine, "".join(stream_pieces(engine, long_story))) > 60, "the check needs a reply that goes on"
    generated = text_tokens(engine, "".join(stream_pieces(engine, long_story, stop_after=5)))
    assert generated < 20, f"generation went on for {generated} tokens after the stop"


def test_leaving_the_stream_early_frees_the_model_for_the_next_reply(engine, monkeypatch):
    """The abandoned generation stops within a few tokens (not after its 500), and the next reply is whole."""
    produced: list[list[str]] = []
    generate = engine.generate

    def counted(request, should_stop, emit):
        pieces: list[str] = []
        produced.append(pieces)

        def keep(piece: str) -> None:
            pieces.append(piece)
            emit(piece)

        generate(request, should_stop, keep)

    monkeypatch.setattr(engine, "generate", counted)

    async def main() -> list[str]:
        async for _ in engine.stream(ChatRequest(STORY.messages, STORY.speaker, 0, 500), StopFlag()):
            break
        return [piece async for piece in engine.stream(STORY, StopFlag())]

    after = "".join(asyncio.run(main()))
    abandoned = text_tokens(engine, "".join(produced[0]))
    assert abandoned < 20, f"the abandoned generation went on for {abandoned} tokens after its reader left"
    assert after == "".join(stream_pieces(engine, STORY))


def test_llama_cpp_reuses_the_prompt_cache_for_a_growing_conversation():
    """The second turn evaluates only what its prompt adds to the first, not the whole prompt again."""
    import llama_cpp

    model = LlamaCppChatModel(embedded_gguf(), context_tokens=2048, threads=2)
    try:
        history = chats(("Moderator", "Tell me about gardens. " * 20))
        first = asyncio.run(build_request(model, "You are Sage.", "Sage", history, GenerationSettings()))
        first = ChatRequest(first.messages, first.speaker, temperature=0, max_tokens=40)  # greedy: one reply every run
        reply = "".join(stream_pieces(model, first))
        history += chats(("Sage", reply), ("Moderator", "And what about deserts?"))
        second = asyncio.run(build_request(model, "You are Sage.", "Sage", history, GenerationSettings()))
        context = model.llama._ctx.ctx
        llama_cpp.llama_perf_context_reset(context)
        stream_pieces(model, ChatRequest(second.messages, second.speaker, 0, 1))
        evaluated = llama_cpp.llama_perf_context(context).n_p_eval
        prompt = len(model.prompt_tokens(second))
        # Without reuse the whole prompt is evaluated again; with it, about what the second turn adds.
        assert evaluated < prompt / 4, f"{evaluated} of {prompt} prompt tokens evaluated again"
    finally:
        asyncio.run(model.aclose())


def test_llama_cpp_refuses_a_model_folder_in_one_sentence(tiny_folder):
    with pytest.raises(ModelError, match=r"runs \.gguf files.*--engine transformers"):
        open_chat_model("llama.cpp", EngineOptions(engine="llama.cpp", model=str(tiny_folder)))


def test_model_sources_are_resolved_without_loading(tmp_path):
    assert resolve(None).kind == "gguf"
    assert resolve("embedded").location == str(embedded_gguf())
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelError, match=r"not a \.gguf"):
        resolve(str(tmp_path / "notes.txt"))
    with pytest.raises(ModelError, match=r"no config\.json"):
        resolve(str(tmp_path))
    with pytest.raises(ModelError, match="No such model file"):
        resolve(str(tmp_path / "missing.gguf"))


def test_conversion_is_cached_and_survives_an_interrupted_attempt(tmp_path, monkeypatch, tiny_folder):
    """A conversion that dies halfway through writing leaves nothing that looks converted; the next start
    converts, and the one after that uses the cache."""
    monkeypatch.setenv("PARTYCHAT_CACHE_DIR", str(tmp_path))
    gguf = embedded_gguf()

    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    conversions = []

    def small_model(*args, **kwargs):
        # Reading and saving the real weights takes ~20 s; what is tested here is the cache folder around them.
        conversions.append(args)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=1, num_key_value_heads=1))
        if len(conversions) == 1:
            save = model.save_pretrained

            def save_then_die(folder, *more, **options):
                save(folder, *more, **options)  # config.json and the weights are written, the tokenizer is not
                raise KeyboardInterrupt

            model.save_pretrained = save_then_die
        return model

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_folder)  # reading the GGUF's takes ~15 s

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", small_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *args, **kwargs: tokenizer)
    with pytest.raises(KeyboardInterrupt):
        converted_folder(gguf)
    assert sorted(path.name for path in tmp_path.iterdir()) == [".lock"], "a half-written folder was left behind"

    folder = converted_folder(gguf)
    assert len(conversions) == 2, "the start after the interrupted one converts again"
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == [".lock", folder.name]

    assert converted_folder(gguf) == folder
    assert len(conversions) == 2, "a third start uses the cache instead of converting"
