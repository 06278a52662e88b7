"""Prompt building, streaming and stopping, on a tiny model the tests build and the real tokenizer."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from helpers import build_tiny_model

from partychat.generation import (
    GenerationSettings,
    PromptTooLong,
    build_messages,
    build_prompt,
    clean_reply,
    generate_reply,
)
from partychat.models import ModelError, ModelSource, converted_folder, embedded_gguf, load, resolve
from partychat.protocol import Chat

NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<turn>{{ m['role'] }}\n{{ m['content'] }}</turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<turn>model\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted_folder(embedded_gguf()))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return load(ModelSource("folder", str(build_tiny_model(tmp_path_factory.mktemp("tiny")))))


def chats(*pairs: tuple[str, str]) -> list[Chat]:
    return [Chat(sender=s, content=c, seq=n) for n, (s, c) in enumerate(pairs, start=1)]


def test_own_lines_are_assistant_turns_and_others_are_named_user_turns():
    messages = build_messages("You are Sage.", "Sage", chats(("Moderator", "Hi"), ("Sage", "Hello"),
                                                              ("Tinker", "Yo"), ("Bob", "Hey")))
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("You are Sage.")
    assert messages[1]["content"] == "Moderator: Hi"
    assert messages[3]["content"] == "Tinker: Yo\nBob: Hey"


def test_the_prompt_uses_the_models_chat_template(tokenizer):
    ids = build_prompt(tokenizer, "You are Sage.", "Sage", chats(("Moderator", "Hi")), GenerationSettings())
    text = tokenizer.decode(ids)
    assert "<|im_start|>system\nYou are Sage." in text
    assert text.rstrip().endswith("<|im_start|>assistant")


def test_a_model_without_a_template_gets_a_plain_transcript_prompt(tokenizer):
    plain = tokenizer.__class__.from_pretrained(converted_folder(embedded_gguf()))
    plain.chat_template = None
    ids = build_prompt(plain, "You are Sage.", "Sage", chats(("Moderator", "Hi")), GenerationSettings())
    text = plain.decode(ids)
    assert text.startswith("You are Sage.")
    assert "Moderator: Hi" in text and text.endswith("Sage:")


def test_a_template_without_a_system_role_gets_the_persona_in_the_first_user_turn(tokenizer):
    gemma_like = tokenizer.__class__.from_pretrained(converted_folder(embedded_gguf()))
    gemma_like.chat_template = NO_SYSTEM_TEMPLATE
    ids = build_prompt(gemma_like, "You are Sage.", "Sage", chats(("Moderator", "Hi")), GenerationSettings())
    text = gemma_like.decode(ids)
    assert "system" not in text
    assert "<turn>user\nYou are Sage." in text and "Moderator: Hi" in text


def test_long_histories_drop_the_oldest_turns_first_but_never_the_persona(tokenizer):
    history = chats(*[("Moderator", f"message number {n} " + "words " * 40) for n in range(30)])
    settings = GenerationSettings(max_context_tokens=400, max_new_tokens=100, history_length=30)
    ids = build_prompt(tokenizer, "You are Sage, keeper of the persona.", "Sage", history, settings)
    text = tokenizer.decode(ids)
    assert len(ids) <= 300
    assert "keeper of the persona" in text
    assert "message number 29" in text and "message number 0 " not in text


def test_history_length_limits_the_turns_seen(tokenizer):
    history = chats(*[("Moderator", f"line {n}") for n in range(10)])
    ids = build_prompt(tokenizer, "Persona.", "Sage", history, GenerationSettings(history_length=2))
    text = tokenizer.decode(ids)
    assert "line 9" in text and "line 8" in text and "line 7" not in text


def test_a_single_huge_message_is_cut_to_fit(tokenizer):
    history = chats(("Moderator", "start " + "blah " * 3000 + "the end"))
    ids = build_prompt(tokenizer, "Persona.", "Sage", history, GenerationSettings(max_context_tokens=300))
    assert len(ids) <= 200
    assert "the end" in tokenizer.decode(ids)


def test_without_auto_truncate_a_long_prompt_is_a_clear_error(tokenizer):
    history = chats(*[("Moderator", "words " * 100) for _ in range(5)])
    settings = GenerationSettings(max_context_tokens=300, max_new_tokens=100, auto_truncate=False)
    with pytest.raises(PromptTooLong, match="--no-auto-truncate"):
        build_prompt(tokenizer, "Persona.", "Sage", history, settings)


def test_a_persona_that_cannot_fit_is_an_error_not_a_silent_drop(tokenizer):
    with pytest.raises(PromptTooLong, match="persona alone"):
        build_prompt(tokenizer, "persona " * 500, "Sage", [], GenerationSettings(max_context_tokens=200))


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


def test_streamed_pieces_add_up_to_the_reply(tiny_model):
    pieces: list[str] = []
    prompt = tiny_model.tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    text = generate_reply(tiny_model, prompt, GenerationSettings(max_new_tokens=40, temperature=0),
                          stop=threading.Event(), on_text=pieces.append)
    assert len(pieces) > 1
    assert "".join(pieces) == text


def test_a_set_stop_flag_ends_generation_within_a_few_tokens(tiny_model):
    stop = threading.Event()
    pieces: list[str] = []

    def on_text(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 5:
            stop.set()

    prompt = tiny_model.tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    text = generate_reply(tiny_model, prompt, GenerationSettings(max_new_tokens=500, temperature=0),
                          stop=stop, on_text=on_text)
    generated = len(tiny_model.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert generated < 20, f"generation went on for {generated} tokens after the stop"


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


def test_conversion_is_cached_and_survives_an_interrupted_attempt(tmp_path, monkeypatch):
    """A conversion that dies halfway leaves no cache folder that looks complete."""
    monkeypatch.setenv("PARTYCHAT_CACHE_DIR", str(tmp_path))
    gguf = embedded_gguf()

    import transformers

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", explode)
    with pytest.raises(KeyboardInterrupt):
        converted_folder(gguf)
    assert not any(path.name.startswith("SmolLM2") for path in Path(tmp_path).iterdir())
    assert not any(path.name.startswith(".converting") for path in Path(tmp_path).iterdir())
