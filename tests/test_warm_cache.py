"""A warm cache per persona on a shared llama.cpp model (issue 18): same replies, fewer tokens, prefill yields.

Real rooms: a hub, three personas in one client.py process on the embedded model, greedy, and this
test as the moderator. The counts come from the client's debug log, where the engine writes what
llama.cpp itself counted (``llama_perf_context``) and idle prefill writes each batch.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import Process, join, model_lines, next_frame, say, script
from websockets.asyncio.client import ClientConnection

from partychat.engines.base import ChatModel, ChatRequest
from partychat.engines.llama_cpp_engine import LlamaCppChatModel
from partychat.engines.models import embedded_gguf
from partychat.persona.generation import (
    GenerationSettings,
    build_messages,
    build_request,
    opening_request,
    topic_note,
)
from partychat.persona.shared_models import IdlePrefill
from partychat.protocol import Chat, Role

PERSONAS = {
    "Ada": "You are Ada, a practical engineer. You answer in one short sentence.",
    "Bruno": "You are Bruno, a cheerful baker. You answer in one short sentence.",
    "Cleo": "You are Cleo, a careful historian. You answer in one short sentence.",
}
LINES = ("What makes a bridge last?", "And what makes a good loaf of bread?")
EVALUATED = re.compile(r"llama\.cpp evaluated (\d+) tokens for (\w+)'s turn before its first token "
                       r"\((\d+) of the prompt's (\d+) were cached\)")


@dataclass
class Room:
    lines: list[tuple[str, str]]
    """(speaker, text) of every model message, from the hub's transcript."""
    log: str
    """The client's debug log."""


def run_room(folder: Path, *flags: str, names: tuple[str, ...] = tuple(PERSONAS), lines: tuple[str, ...] = LINES,
             hub_flags: tuple[str, ...] = (), moderate: Callable[..., object] | None = None) -> Room:
    """A hub, the personas in one client.py with ``flags``, and a moderator saying ``lines``, each until quiet."""
    folder.mkdir(parents=True)
    transcript = folder / "room.jsonl"
    started: list[Process] = []
    try:
        hub = Process([script("server.py"), "--port", "0", "--host", "127.0.0.1", "--no-web", "--transcript",
                       str(transcript), "--first-token-timeout", "0", "--turn-timeout", "0", *hub_flags],
                      folder / "hub.out")
        started.append(hub)
        url = hub.wait_for_output(r"listening on (ws://\S+)", timeout=60).group(1)
        personas = []
        for name in names:
            (folder / f"{name}.txt").write_text(PERSONAS[name], encoding="utf-8")
            personas += ["--persona", f"{name}={folder / f'{name}.txt'}"]
        client = Process([script("client.py"), *personas, "--server", url, "--temperature", "0", "--retries", "0",
                          "--history-length", "50", "--max-generation-tokens", "24", "--threads", "1",
                          "--log-level", "DEBUG", "--log-file", str(folder / "client.log"), *flags],
                         folder / "client.out")
        started.append(client)
        asyncio.run((moderate or until_quiet)(url, len(names), lines))
        return Room(model_lines(transcript), (folder / "client.log").read_text(errors="replace"))
    finally:
        for process in reversed(started):
            process.stop()


async def moderator(url: str, models: int) -> ClientConnection:
    """A moderator who has seen every persona join."""
    ws, _ = await join(url, "Moderator", "human", protocol=1)
    for _ in range(models):
        await next_frame(ws, "system", timeout=300, event="join")
    return ws


async def until_quiet(url: str, models: int, lines: tuple[str, ...]) -> None:
    ws = await moderator(url, models)
    for line in lines:
        await say(ws, line)
        await next_frame(ws, "system", timeout=600, event="quiet")
    await ws.close()


@pytest.fixture(scope="module")
def rooms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Room]:
    """The same greedy conversation with the warm cache on, off, and capped so tight that it evicts."""
    folder = tmp_path_factory.mktemp("warm-cache")
    return {"on": run_room(folder / "on"), "off": run_room(folder / "off", "--cache-mb", "0"),
            "capped": run_room(folder / "capped", "--cache-mb", "4")}


@pytest.mark.slow
def test_greedy_replies_are_the_same_with_the_warm_cache_on_and_off(rooms):
    on, off = rooms["on"].lines, rooms["off"].lines
    assert len(on) == len(PERSONAS) * len(LINES), rooms["on"].log
    assert on == off


@pytest.mark.slow
def test_a_turn_evaluates_only_what_was_said_since_the_speakers_last_turn(rooms):
    """By llama.cpp's count: at most the growth of the speaker's prompt since its last turn, plus 16, plus
    the topic note: a tail (the moderator's line again) that moves past the new messages, so a turn that
    follows other speakers evaluates it again, as it does the generation prompt."""
    note = max(prompt_size(topic_note(Chat("Moderator", line, role=Role.HUMAN.value))) for line in LINES)
    previous: dict[str, int] = {}
    later_turns = 0
    for evaluated, name, _, prompt in ((int(e), n, c, int(p)) for e, n, c, p in EVALUATED.findall(rooms["on"].log)):
        if name in previous:
            later_turns += 1
            assert evaluated <= prompt - previous[name] + 16 + note, (name, evaluated, prompt, previous[name], note)
        previous[name] = prompt
    assert later_turns == len(PERSONAS) * (len(LINES) - 1)


@pytest.mark.slow
def test_the_cap_evicts_and_the_next_turn_still_answers_the_same(rooms):
    capped = rooms["capped"]
    assert re.search(r"Dropped \w+'s saved cache of \d+ tokens: --cache-mb is full", capped.log), capped.log
    assert capped.lines == rooms["off"].lines


@pytest.mark.slow
def test_a_turn_that_starts_during_a_prefill_waits_for_one_batch_at_most(tmp_path):
    """Each answer is one turn (``--max-turns 1``); the next line goes in while the model prefills that
    long answer and line into the other persona's cache. A turn may also end in a pass (a greedy reply
    the repeat guard withholds), so the moderator waits for the turn's end, not for a model's message."""
    long_line = "Tell us, in one sentence, which of these matters most: " + ", ".join(
        f"the {word} of the old stone bridge" for word in ("age", "width", "colour", "height", "shape", "weight",
                                                          "name", "owner", "builder", "river", "town", "road") * 3)

    client_log = tmp_path / "room" / "client.log"

    def prefilling_since_the_last_reply() -> bool:
        lines = client_log.read_text(errors="replace").splitlines() if client_log.exists() else []
        done = max((i for i, line in enumerate(lines) if "is done writing" in line), default=len(lines))
        return any("Prefill for" in line and "a batch of" in line for line in lines[done:])

    async def quickly(url: str, models: int, lines: tuple[str, ...]) -> None:
        """Each next line goes in once the idle prefill after the last reply has begun a batch, so the
        turn meets a running prefill however fast or loaded the machine is (the client's DEBUG log)."""
        ws = await moderator(url, models)
        for number, line in enumerate(lines):
            for _ in range(6000 if number else 0):
                if prefilling_since_the_last_reply():
                    break
                await asyncio.sleep(0.01)
            await say(ws, line)
            await next_frame(ws, "system", timeout=600, event="quiet")
        await ws.close()

    room = run_room(tmp_path / "room", names=("Ada", "Bruno"), lines=(long_line, "Why?", "Really?"),
                    hub_flags=("--max-turns", "1"), moderate=quickly)
    log = room.log.splitlines()
    claims = [i for i, line in enumerate(log) if "idle prefill holds off" in line]
    stopped = 0
    for claim in claims:
        after = log[claim + 1:]
        end = next((i for i, line in enumerate(after) if "stopped after" in line or "llama.cpp evaluated" in line),
                   len(after))
        batches = sum("Prefill for" in line and "a batch of" in line for line in after[:end])
        assert batches <= 1, "\n".join(log[claim:claim + end + 2])
        stopped += end < len(after) and "stopped after" in after[end]
    assert stopped >= 1, "a turn came while a prefill was running:\n" + room.log


def prompt_size(text: str) -> int:
    """Tokens ``text`` takes on the embedded model, by its own tokenizer (special tokens as such)."""
    from llama_cpp import Llama

    vocabulary = Llama(model_path=str(embedded_gguf()), vocab_only=True, verbose=False)
    try:
        return len(vocabulary.tokenize(text.encode(), add_bos=False, special=True))
    finally:
        vocabulary.close()


@pytest.mark.slow
def test_a_first_turn_finds_the_system_prompt_prefilled_while_the_room_was_silent(tmp_path):
    """Before anyone speaks, idle prefill warms each persona's first prompt up to where the first line
    goes; the moderator speaks once every persona's is done (or after two minutes, so a broken prefill
    fails the counts below, not the wait)."""
    client_log = tmp_path / "room" / "client.log"
    line = LINES[0]

    async def after_the_prefill(url: str, models: int, lines: tuple[str, ...]) -> None:
        ws = await moderator(url, models)
        for _ in range(1200):
            text = client_log.read_text(errors="replace") if client_log.exists() else ""
            if all(f"Prefill for {name} done" in text for name in PERSONAS):
                break
            await asyncio.sleep(0.1)
        for said in lines:
            await say(ws, said)
            await next_frame(ws, "system", timeout=600, event="quiet")
        await ws.close()

    room = run_room(tmp_path / "room", lines=(line,), moderate=after_the_prefill)
    firsts: dict[str, tuple[int, int]] = {}
    for evaluated, name, _, prompt in EVALUATED.findall(room.log):
        firsts.setdefault(name, (int(evaluated), int(prompt)))
    assert list(firsts) == list(PERSONAS), room.log
    opener, (evaluated, _) = next(iter(firsts.items()))
    assert evaluated <= prompt_size(f"Moderator: {line}") + 16, (opener, evaluated)
    for name, (evaluated, prompt) in firsts.items():  # the later ones evaluate the replies before them too
        system = build_messages(PERSONAS[name], name, [])[0]["content"]
        assert evaluated <= prompt - prompt_size(f"<|im_start|>system\n{system}<|im_end|>\n") + 16, (name, evaluated)


@pytest.mark.slow
def test_the_opening_prefill_is_a_true_prefix_of_the_first_turns_prompt(monkeypatch):
    """What idle prefill evaluates before anyone spoke ends where the first line begins, with the
    model's chat template and with a plain transcript: no stand-in and no generation prompt in it."""

    async def scenario() -> None:
        model = LlamaCppChatModel(embedded_gguf(), context_tokens=1024, threads=1, cache_bytes=1 << 20)
        settings = GenerationSettings(history_length=5)
        first = [Chat(sender="Moderator", content=LINES[0], seq=1, role=Role.HUMAN.value)]
        try:
            for formatter in (model.chat_formatter, None):
                monkeypatch.setattr(model, "chat_formatter", formatter)
                known = model.known_tokens(await opening_request(model, PERSONAS["Ada"], "Ada", settings))
                real = model.prompt_tokens(await build_request(model, PERSONAS["Ada"], "Ada", first, settings))
                assert real[:len(known)] == known
                rest = model.llama.detokenize(real[len(known):], special=True).decode()
                assert rest.lstrip().startswith(f"Moderator: {LINES[0]}"), rest  # a newline may tokenize apart
        finally:
            await model.aclose()

    asyncio.run(scenario())


class Unused(ChatModel):
    """A model the order of idle prefill never touches."""

    async def count_tokens(self, request: ChatRequest) -> int:
        raise AssertionError

    def stream(self, request, stop):  # type: ignore[no-untyped-def]
        raise AssertionError

    async def aclose(self) -> None:
        pass


def test_prefill_goes_first_to_the_likeliest_next_speaker():
    async def nothing(model: ChatModel) -> None:
        return None

    async def scenario() -> None:
        idle = IdlePrefill(Unused("none"))
        for name, talkativeness in (("Ada", 0.2), ("Bruno", None), ("Cleo", 0.9)):
            idle.seat(name, talkativeness, nothing)
        assert idle.order() == ["Ada", "Bruno", "Cleo"], "round-robin from the start of the cast"
        idle.heard("Ada", Chat(sender="Bruno", content="Fine.", role=Role.MODEL.value), "round-robin")
        idle.heard("Ada", Chat(sender="Moderator", content="Next?", role=Role.HUMAN.value), None)
        assert idle.order() == ["Cleo", "Ada", "Bruno"], "round-robin: next after the last model that spoke"
        idle.heard("Ada", Chat(sender="Moderator", content="Ada, and you?", role=Role.HUMAN.value), "natural")
        assert idle.order() == ["Ada", "Cleo", "Bruno"], "natural: whoever is named, then the most talkative"
        idle.heard("Ada", Chat(sender="Cleo", content="Well.", role=Role.MODEL.value), "natural")
        assert idle.order() == ["Bruno", "Ada", "Cleo"], "natural: the last speaker goes last"
        await idle.aclose()

    asyncio.run(scenario())
