"""Anti-copy decoding: on each in-process engine, with the embedded model, a reply never copies a word n-gram.

The echo prompt makes the model repeat a message word for word when nothing stops it (the tests
check that it does, so they can fail); with anti-copy, greedy decoding must find other words.
"""

from __future__ import annotations

import asyncio

import pytest

from partychat.engines.anticopy import AntiCopy, Vocabulary, WordBan, words
from partychat.engines.base import ChatRequest, StopFlag
from partychat.engines.models import embedded_gguf
from partychat.engines.registry import EngineOptions, open_chat_model
from partychat.persona.cast import Persona, read_cast_file
from partychat.persona.cli import build_cast, build_parser
from partychat.persona.generation import GenerationSettings, build_request
from partychat.protocol import Chat

ECHO = "The quiet river carries old leaves past the mill every autumn morning."
ENGINES = ("llama.cpp", "transformers")


def echo_request(anti_copy: AntiCopy | None) -> ChatRequest:
    """A chat in which the persona has echoed the Poet once already: greedy decoding echoes again."""
    messages = ({"role": "system", "content": "You are Parrot. You repeat the last message word for word."},
                {"role": "user", "content": f"Poet: {ECHO}"},
                {"role": "assistant", "content": ECHO},
                {"role": "user", "content": f"Poet: {ECHO}"})
    return ChatRequest(messages, "Parrot", temperature=0.0, max_tokens=24, anti_copy=anti_copy)


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    found = words(text)
    return {tuple(found[i:i + n]) for i in range(len(found) - n + 1)}


@pytest.fixture(scope="module", params=ENGINES)
def engine(request):
    if request.param == "llama.cpp":
        from partychat.engines.llama_cpp_engine import LlamaCppChatModel

        model = LlamaCppChatModel(embedded_gguf(), context_tokens=1024, threads=2)
    else:
        model = open_chat_model("transformers", EngineOptions(engine="transformers", threads=2))
    yield model
    asyncio.run(model.aclose())


def reply(model, request: ChatRequest) -> str:
    async def collect() -> str:
        return "".join([piece async for piece in model.stream(request, StopFlag())])

    return asyncio.run(collect())


@pytest.mark.slow
def test_without_anti_copy_the_echo_prompt_copies(engine):
    said = reply(engine, echo_request(None))
    assert ngrams(said, 3) & ngrams(ECHO, 3), said


@pytest.mark.slow
@pytest.mark.parametrize("n", [3, 2])
def test_with_anti_copy_no_word_ngram_of_the_message_is_written(engine, n):
    said = reply(engine, echo_request(AntiCopy((ECHO,), n)))
    assert words(said), said
    assert not ngrams(said, n) & ngrams(ECHO, n), said


# ------------------------------------------------------------------------------------------------ the bans


VOCAB = [" they", " are", " supposed", " to", "to", " help", " suppos", "ed", " meant", ".", "ly", " The"]


def banned_words(ban: WordBan, reply: str) -> set[str]:
    return {VOCAB[token] for token in ban.banned_tokens((), reply)}


def test_a_banned_word_can_be_neither_glued_on_nor_spelt_in_pieces():
    ban = WordBan(AntiCopy(("They are supposed to help.",), 3), Vocabulary(VOCAB))
    assert banned_words(ban, "Well, they are") == {" supposed"}
    assert banned_words(ban, "Well, they are suppos") == {"ed"}  # "suppos" + "ed" spells the banned word
    # After "are supposed" the next word may not be "to", with a space or glued on ("supposedto").
    assert banned_words(ban, "We are supposed") == {" to", "to"}
    assert banned_words(ban, "We are supposed ") == {" to", "to"}
    assert banned_words(ban, "I") == set()


def test_a_reply_may_not_loop_on_its_own_words():
    ban = WordBan(AntiCopy((), 3), Vocabulary(VOCAB))
    assert banned_words(ban, "The help they are meant to help they") == {" are"}


def test_case_and_punctuation_do_not_hide_a_copy():
    ban = WordBan(AntiCopy(("THEY ARE... supposed!",), 3), Vocabulary(VOCAB))
    assert banned_words(ban, "they, are") == {" supposed"}


def test_the_questions_ngrams_stay_allowed_though_another_speaker_used_them():
    question = "Are they supposed to help?"
    ban = WordBan(AntiCopy(("Yes, they are supposed to help.",), 3, allow=(question,)), Vocabulary(VOCAB))
    assert banned_words(ban, "Well, they are") == {" supposed"}  # "they are supposed" is not the question's
    assert banned_words(ban, "We are supposed to") == set()  # "supposed to help" is
    assert banned_words(ban, "Are they supposed to help? They are supposed to") == {" help"}  # but no loop
    assert AntiCopy(("x",), 3, allow=(question,)).stronger().allow == (question,)


def test_a_retry_may_not_open_with_a_speaker_label():
    vocab = [*VOCAB, " Mod", "Mod", "erator", "**", ":", ": ", "**:", " said"]
    colons = {":", ": ", "**:"}

    def banned(reply: str, no_label: bool = True) -> set[str]:
        ban = WordBan(AntiCopy((), 3, no_label=no_label), Vocabulary(vocab))
        return {vocab[token] for token in ban.banned_tokens((), reply)}

    for opening in (" Mod", "Moderator", "**Mod", "Zen Sage", "Ben ", "**Mod**"):
        assert banned(opening) == colons, opening  # "Mod:" is as much a label as "Moderator:"
    assert banned("") == set() and banned("**") == set()
    assert banned("Well, Mod") == set() and banned("One two three four") == set()  # not a label: free
    assert banned(" Mod", no_label=False) == set()


def test_n_below_two_is_refused_and_stronger_shortens_the_ngrams():
    with pytest.raises(ValueError):
        AntiCopy((), 1)
    assert AntiCopy(("x",), 3).stronger() == AntiCopy(("x",), 2)
    assert AntiCopy(("x",), 2).stronger().n == 2


# ------------------------------------------------------------------------------------------------ the persona


class _Counter:
    """Stands in for a model where only the prompt's size matters."""

    async def count_tokens(self, request: ChatRequest) -> int:
        return 10


def test_the_request_avoids_the_models_lines_but_not_the_moderators():
    history = [Chat(sender="Moderator", content="What makes a city pleasant?", role="human"),
               Chat(sender="Sage", content="Trees and quiet streets make it pleasant."),
               Chat(sender="Bot", content="Benches every hundred metres.")]
    request = asyncio.run(build_request(_Counter(), "A persona.", "Bot", history, GenerationSettings()))
    assert request.anti_copy == AntiCopy(("Trees and quiet streets make it pleasant.", "Benches every hundred metres."),
                                         allow=("What makes a city pleasant?",), no_label=True)
    off = asyncio.run(build_request(_Counter(), "A persona.", "Bot", history, GenerationSettings(anti_copy=False)))
    assert off.anti_copy is None


def test_no_anti_copy_flag_and_cast_field(tmp_path):
    assert all(p.anti_copy for p in build_cast(build_parser().parse_args(["--name", "A"])))
    assert not any(p.anti_copy for p in build_cast(build_parser().parse_args(["--name", "A", "--no-anti-copy"])))
    cast = tmp_path / "cast.toml"
    cast.write_text('[[persona]]\nname = "A"\nanti_copy = false\n[[persona]]\nname = "B"\n')
    assert [p.anti_copy for p in read_cast_file(cast, Persona(name="", system_prompt=""))] == [False, True]
    cast.write_text('[[persona]]\nname = "A"\nanti_copy = "no"\n')
    with pytest.raises(Exception, match="anti_copy"):
        read_cast_file(cast, Persona(name="", system_prompt=""))
