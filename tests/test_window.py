"""The history window of a persona's prompt: cut in chunks, append-only between cuts, the question in view.

Prompts are built with the real ``build_request`` and counted by the embedded model on llama.cpp, at
every state of a simulated seven-persona room, as a prefill ahead of each turn would build them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import re

import pytest

from partychat.engines.base import ChatRequest, shared_prefix
from partychat.engines.llama_cpp_engine import LlamaCppChatModel
from partychat.engines.models import embedded_gguf
from partychat.persona.generation import (
    TOPIC_NOTE_OPENING,
    GenerationSettings,
    PromptExtras,
    build_request,
    prompt_window,
)
from partychat.persona.lorebook import Lore, Lorebook, LoreEntry
from partychat.protocol import Chat, Role

PANEL = ("Sage", "Tinker", "Bard", "Critic", "Scout", "Judge", "Pilot")
QUESTION = "What makes a city pleasant to walk through?"


@pytest.fixture(scope="module")
def model():
    model = LlamaCppChatModel(embedded_gguf(), context_tokens=4096, threads=min(2, os.cpu_count() or 1))
    yield model
    asyncio.run(model.aclose())


def room(turns: int, questions: int = 1, words: int = 8) -> list[Chat]:
    """A moderator's question, then the panel answering in round-robin; ``questions`` spread over it."""
    history: list[Chat] = []
    every = max(1, turns // questions)
    for n in range(turns):
        if n % every == 0:
            history.append(Chat("Moderator", f"{QUESTION} (asked {n})", seq=len(history) + 1, role=Role.HUMAN.value))
        sender = PANEL[n % len(PANEL)]
        history.append(Chat(sender, f"reply {n} from {sender}: " + "word " * words, seq=len(history) + 1))
    return history


def request(model, name: str, history: list[Chat], settings: GenerationSettings,
            extras: PromptExtras | None = None) -> ChatRequest:
    return asyncio.run(build_request(model, f"You are {name}.", name, history, settings, extras))


def append_only(before: ChatRequest, after: ChatRequest) -> bool:
    """The later prompt repeats the earlier one and only adds at its end (the last user turn may grow)."""
    old, new = before.messages, after.messages
    if len(new) < len(old) or old[:-1] != new[: len(old) - 1]:
        return False
    last, grown = old[-1], new[len(old) - 1]
    return last["role"] == grown["role"] and grown["content"].startswith(last["content"])


TOPIC_NOTE = re.compile(rf"\n\n{re.escape(TOPIC_NOTE_OPENING)}[^\n]*\)\Z")


def without_topic_note(built: ChatRequest) -> ChatRequest:
    """The prompt less its topic note: a tail, like the generation prompt, that the next prompt moves past
    the new lines; what a cache keeps is everything before it."""
    *head, last = built.messages
    return dataclasses.replace(built, messages=(*head, {**last, "content": TOPIC_NOTE.sub("", last["content"])}))


def prompts_along(model, name: str, history: list[Chat], settings: GenerationSettings,
                  extras: PromptExtras | None = None):
    """(state, request) for every state of the room where ``name`` would be asked to reply."""
    for end in range(1, len(history) + 1):
        if history[end - 1].sender != name:
            yield end, request(model, name, history[:end], settings, extras)


def window_starts(history: list[Chat], length: int) -> list[int]:
    """The sequence number the window starts at, after each message of the room."""
    return [prompt_window(history[:end], length).recent[0].seq for end in range(1, len(history) + 1)]


def test_prompts_stay_append_only_between_cuts_and_cuts_come_in_chunks(model):
    settings = GenerationSettings(history_length=5)
    history = room(40)
    starts = window_starts(history, 5)
    cuts = [end for end in range(2, len(history) + 1) if starts[end - 1] != starts[end - 2]]
    assert len(cuts) >= 10
    assert all(b - a >= 3 for a, b in itertools.pairwise(cuts)), f"cuts after messages {cuts}"
    previous = None
    for end, built in prompts_along(model, "Sage", history, settings):
        if previous is not None and starts[end - 1] == starts[previous[0] - 1]:
            before = without_topic_note(previous[1])
            assert append_only(before, built), f"the prompt changed before its end at message {end}"
            ids_before, ids_now = model.prompt_tokens(before), model.prompt_tokens(built)
            # Only the last turn's closing and the generation prompt may differ: a cache keeps the rest.
            assert shared_prefix(ids_before, ids_now) >= len(ids_before) - 8
        previous = end, built


def test_history_length_stays_the_maximum_and_the_window_grows_from_about_half(model):
    for length in (2, 5, 8, 20):
        sizes = [len(prompt_window(room(60)[:end], length).recent) for end in range(length, 61)]
        assert max(sizes) == length
        assert min(sizes) == length // 2 + 1  # then cut back by about half at once


def test_personas_with_different_memories_agree_on_where_the_window_starts(model):
    """One joined late (or its memory is full), one missed a whisper: the hub's numbers still agree."""
    history = room(30)
    settings = GenerationSettings(history_length=5)
    views = {"Sage": history, "Tinker": history[11:], "Bard": [c for c in history if c.seq != len(history) - 1]}
    firsts = set()
    for name, view in views.items():
        built = request(model, name, view, settings)
        body = "\n".join(m["content"] for m in built.messages[1:])
        firsts.add(next(chat.seq for chat in history if chat.content in body and chat.role != Role.HUMAN.value))
    assert len(firsts) == 1, firsts
    assert request(model, "Sage", history, settings) == request(model, "Sage", list(history), settings)


def test_the_moderators_latest_line_stays_in_view_after_the_window_moved_past_it(model):
    settings = GenerationSettings(history_length=5)
    history = room(35, questions=2)
    asked = [chat for chat in history if chat.role == Role.HUMAN.value]
    for end, built in prompts_along(model, "Sage", history, settings):
        latest = [chat for chat in asked if chat.seq <= end][-1]
        assert any(f"Moderator: {latest.content}" in m["content"] for m in built.messages), f"at message {end}"
        if latest not in history[end - 5:end]:  # out of the window: placed first
            assert built.messages[1]["content"].startswith(f"Moderator: {latest.content}")
        assert sum(m["content"].count("Moderator:") for m in built.messages) == 1  # the older one is gone


def test_a_budget_cut_drops_a_chunk_and_the_prompt_stays_append_only_after_it(model):
    settings = GenerationSettings(history_length=20, max_context_tokens=600, max_tokens=100)
    history = room(60, words=30)
    changes = 0
    previous = None
    for _, built in prompts_along(model, "Sage", history, settings):
        assert asyncio.run(model.count_tokens(built)) <= 500
        if previous is not None and not append_only(without_topic_note(previous), built):
            changes += 1
        previous = built
    # One persona sees 52 of the 60 replies: sliding by one would change the prompt at nearly every one.
    # Here a budget cut can come one message before the window's own cut (the topic note takes room).
    assert 3 <= changes <= 60 // 5, changes


def test_no_history_length_means_no_history_and_no_pinned_line(model):
    built = request(model, "Sage", room(10), GenerationSettings(history_length=0))
    assert not any("Moderator:" in m["content"] or "reply" in m["content"] for m in built.messages)


def test_lore_and_the_pinned_question_keep_the_prompt_append_only_between_cuts(model):
    book = Lorebook("city", (LoreEntry(keys=("city",), content="The city has wide pavements.", label="City"),
                             LoreEntry(keys=("reply 9 ",), content="Nine is a lucky number.", label="Nine")))
    extras = PromptExtras(lore=Lore((book,)))
    history = room(30, questions=2)
    starts = window_starts(history, 5)
    previous, compared = None, 0
    for end, built in prompts_along(model, "Sage", history, GenerationSettings(history_length=5), extras):
        if previous is not None and starts[end - 1] == starts[previous[0] - 1]:
            before = without_topic_note(previous[1])
            assert append_only(before, built), f"the prompt changed before its end at message {end}"
            compared += 1
        previous = end, built
    assert compared >= 10
    assert any("[Lore] The city has wide pavements." in m["content"] for m in built.messages)
