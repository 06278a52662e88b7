"""Personas on llama.cpp's own ``llama-server``, run for real: its tokenizer paths, slots and DRY fields.

The binary is built from the llama.cpp sources vendored in the pinned llama-cpp-python (``python3
run.py build-llama-server``, which ``run.py test`` runs when it is missing) and found through
PARTYCHAT_LLAMA_SERVER. Without it these tests skip, saying how to build it; under CI they fail.

The server starts with three slots, no prompt cache in RAM (``--cache-ram 0``) and no choosing of
slots by prompt similarity (``--slot-prompt-similarity 0``), so that a prompt finds its cached
prefix only in the slot the request names: what the tests see is our pinning, not the server's
own guesses.

A server that refuses slot ids, which the real one no longer does, is a stand-in
(tests/llama_server_standin.py) and needs no binary.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
from pathlib import Path

import pytest
from helpers import Process
from llama_server_standin import REPLY, StandInLlamaServer
from test_openai_engine import free_port, wait_until_up

from partychat.bundled import prompts_folder
from partychat.engines.base import StopFlag
from partychat.engines.llama_cpp_engine import LlamaCppChatModel
from partychat.engines.models import embedded_gguf
from partychat.engines.openai_engine import OpenAIChatModel
from partychat.persona.generation import GenerationSettings, build_request
from partychat.protocol import Chat

SLOTS = 3
SLOT_CONTEXT = 2048
PERSONAS = (("historian.txt", "Historian"), ("philosopher.txt", "Philosopher"))
LINES = (
    ("Moderator", "Today's topic: should cities ban cars from their centres?"),
    ("Researcher", "Studies of car-free zones in Europe show fewer injuries and more foot traffic for shops."),
    ("Moderator", "What would you change first, and why?"),
    ("Researcher", "Deliveries and people with disabilities still need access, so exceptions matter."),
)


def llama_server_binary() -> Path:
    """The built llama-server, or a skip (a failure under CI) that says how to get one."""
    path = Path(os.environ.get("PARTYCHAT_LLAMA_SERVER", "llama-server-not-built"))
    if path.is_file() and os.access(path, os.X_OK):
        return path
    problem = (f"no llama-server binary at PARTYCHAT_LLAMA_SERVER ({path}); 'python3 run.py build-llama-server' "
               "builds one (about 10 min on 2 cores) and 'python3 run.py test' sets the variable")
    if os.environ.get("CI"):
        pytest.fail(f"{problem}; under CI that fails the run")
    pytest.skip(problem)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    binary = llama_server_binary()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    port = free_port()
    process = Process([str(binary), "--model", str(embedded_gguf()), "--host", "127.0.0.1", "--port", str(port),
                       "--parallel", str(SLOTS), "--ctx-size", str(SLOTS * SLOT_CONTEXT), "--threads", "2",
                       "--cache-ram", "0", "--slot-prompt-similarity", "0", "--no-webui"], log, python=None,
                      env={"LLAMA_SERVER_SLOTS_DEBUG": "1"})  # /slots then shows each slot's prompt
    try:
        wait_until_up(process, f"http://127.0.0.1:{port}/health")
        yield process, f"http://127.0.0.1:{port}"
    finally:
        process.popen.terminate()
        process.popen.wait(timeout=30)


def slots(root: str) -> list[dict]:
    with urllib.request.urlopen(f"{root}/slots", timeout=10) as answer:
        return json.loads(answer.read())


def test_personas_keep_their_own_slot_and_reuse_their_prompts_with_dry_accepted(server):
    """Two personas take turns on one model instance: each comes back to its slot and finds its prompt there."""
    process, root = server
    settings = GenerationSettings(temperature=0, max_tokens=24, history_length=20)
    personas = [((prompts_folder() / file).read_text(encoding="utf-8"), name) for file, name in PERSONAS]

    async def conversation() -> list[tuple[str, str, list[dict]]]:
        model = OpenAIChatModel(f"{root}/v1")
        history = [Chat(sender=s, content=c, seq=n) for n, (s, c) in enumerate(LINES[:2], start=1)]
        turns = []
        try:
            for round_ in range(2):
                for persona, name in personas:
                    request = await build_request(model, persona, name, history, settings)
                    assert request.anti_copy is not None
                    reply = "".join([piece async for piece in model.stream(request, StopFlag())])
                    turns.append((name, reply, await asyncio.to_thread(slots, root)))
                    history.append(Chat(sender=name, content=reply, seq=len(history) + 1))
                history.append(Chat(sender=LINES[2 + round_][0], content=LINES[2 + round_][1], seq=len(history) + 1))
        finally:
            await model.aclose()
        return turns

    turns = asyncio.run(conversation())
    assert all(reply.strip() for _, reply, _ in turns), turns
    used: dict[str, int] = {}
    for number, (name, _, state) in enumerate(turns):
        (slot,) = [s for s in state if s.get("id_task") == max(t.get("id_task", -1) for t in state)]
        assert used.setdefault(name, slot["id"]) == slot["id"], f"{name} moved from slot {used[name]} to {slot['id']}"
        assert f"You are {name}," in slot["prompt"], "the slot holds this persona's prompt"
        assert slot["params"]["dry_multiplier"] == pytest.approx(0.8), "the DRY fields were taken"
        if number >= len(PERSONAS):  # the second round: the persona's earlier prompt is in its slot, not evaluated
            assert slot["n_prompt_tokens_processed"] < slot["n_prompt_tokens"] / 2, slot
    assert len(set(used.values())) == len(PERSONAS)
    assert "refused the slot id" not in process.output


def test_prompt_sizes_come_from_llama_servers_own_template_and_tokenizer(server):
    """/apply-template + /tokenize count exactly what the in-process llama.cpp engine counts."""
    _, root = server
    persona = (prompts_folder() / PERSONAS[0][0]).read_text(encoding="utf-8")
    history = [Chat(sender=s, content=c, seq=n) for n, (s, c) in enumerate(LINES, start=1)]
    local = LlamaCppChatModel(embedded_gguf(), context_tokens=SLOT_CONTEXT, threads=1)

    async def counts() -> tuple[int, int, str]:
        remote = OpenAIChatModel(f"{root}/v1")
        try:
            request = await build_request(remote, persona, PERSONAS[0][1], history, GenerationSettings())
            return await remote.count_tokens(request), await local.count_tokens(request), remote._counter.__name__
        finally:
            await remote.aclose()
            await local.aclose()

    counted, exact, counter = asyncio.run(counts())
    assert counter == "_count_by_llama_server"
    assert counted == exact


def test_a_server_refusing_slot_ids_still_answers_and_its_personas_go_unpinned(caplog):
    """The refused request goes again without a slot; the warning comes once; no later request names a slot."""
    settings = GenerationSettings(temperature=0, max_tokens=24, history_length=20)
    personas = [((prompts_folder() / file).read_text(encoding="utf-8"), name) for file, name in PERSONAS]

    async def conversation(root: str) -> list[str]:
        model = OpenAIChatModel(f"{root}/v1")
        history = [Chat(sender=s, content=c, seq=n) for n, (s, c) in enumerate(LINES[:2], start=1)]
        replies = []
        try:
            for persona, name in (*personas, *personas):
                request = await build_request(model, persona, name, history, settings)
                replies.append("".join([piece async for piece in model.stream(request, StopFlag())]))
                history.append(Chat(sender=name, content=replies[-1], seq=len(history) + 1))
        finally:
            await model.aclose()
        return replies

    with StandInLlamaServer(slots=SLOTS, refuse_slots=True) as standin, \
            caplog.at_level("WARNING", logger="partychat.client"):
        replies = asyncio.run(conversation(standin.url))
    assert replies == ["".join(REPLY)] * 2 * len(PERSONAS), "every turn's reply arrives, the first one's too"
    first, *later = standin.chats
    assert isinstance(first.get("id_slot"), int) and first.get("cache_prompt") is True, "the first asks for its slot"
    assert len(later) == 2 * len(PERSONAS), "the refused request went again once, and no other did"
    assert [chat for chat in later if "id_slot" in chat] == [], "after the refusal no request names a slot"
    warnings = [r.getMessage() for r in caplog.records if "refused the slot id" in r.getMessage()]
    assert len(warnings) == 1 and "Invalid slot ID" in warnings[0], warnings
