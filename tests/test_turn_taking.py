"""Hub-enforced turn-taking with real model clients on the embedded model."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import (
    Process,
    command,
    hub_config,
    join,
    model_lines,
    model_messages,
    next_frame,
    quiet_then_marker,
    say,
    script,
    with_hub,
)
from websockets.asyncio.client import ClientConnection

from partychat.hub.transcript import read_records

PERSONAS = (("Zen Sage", "sage.txt"), ("TinkerBot", "inventor.txt"), ("Historian", "historian.txt"))
MODELS = [name for name, _ in PERSONAS]


@dataclass
class Party:
    url: str
    transcript: Path
    clients: dict[str, Process]


@pytest.fixture(scope="module")
def party(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Party]:
    """One hub and three personas, started in a fixed order, shared by this module's tests."""
    folder = tmp_path_factory.mktemp("party")
    transcript = folder / "transcript.jsonl"
    started: list[Process] = []
    try:
        # The 135M model often parrots the persona before it; these tests are about turn order, so the
        # guards (which would hold those replies back; see test_floor_health.py) are off here.
        hub = Process([script("server.py"), "--host", "127.0.0.1", "--port", "0", "--transcript", str(transcript),
                       "--no-guards"], folder / "hub.out")
        started.append(hub)
        url = hub.wait_for_output(r"listening on (ws://\S+)", 30).group(1)
        clients = {}
        for name, prompt in PERSONAS:
            client = Process([script("client.py"), "--name", name, "--prompt-file", prompt, "--server", url,
                              "--max-generation-tokens", "24", "--temperature", "0"], folder / f"{prompt}.out")
            started.append(client)
            client.wait_for_output("joined ws://", 180)
            clients[name] = client
        yield Party(url, transcript, clients)
    finally:
        for process in reversed(started):
            process.stop()


async def moderator(url: str) -> ClientConnection:
    ws, reply = await join(url, "Moderator", "human", protocol=1, stream=True)
    assert reply["content"] == "Connected as Moderator"
    return ws


async def idle(ws: ClientConnection) -> None:
    """Wait until the floor has no speakers."""
    while (await next_frame(ws, "turn", timeout=90))["speakers"]:
        pass


def said_in(replies: list[dict]) -> list[tuple[str, str]]:
    return [(reply["from"], reply["content"]) for reply in replies]


def test_round_robin_one_message_gets_one_reply_per_persona_in_order_then_silence(party):
    before = len(model_lines(party.transcript))

    async def scenario() -> list[dict]:
        ws = await moderator(party.url)
        await command(ws, "mode", "round-robin")
        await say(ws, "Say hello to the others in one short sentence.")
        replies = await model_messages(ws, 3)
        assert [r["from"] for r in replies] == MODELS
        assert all(r["content"].strip() for r in replies)
        assert await quiet_then_marker(ws) == [], "models kept talking after the budget was spent"
        await ws.close()
        return replies

    replies = asyncio.run(scenario())
    assert model_lines(party.transcript)[before:] == said_in(replies)


def withdrawals(party: Party) -> int:
    return sum(client.output.count("Turn withdrawn") for client in party.clients.values())


def test_pause_during_a_generation_lets_nothing_through_until_resume(party):
    before, withdrawn = len(model_lines(party.transcript)), withdrawals(party)

    async def scenario() -> list[dict]:
        ws = await moderator(party.url)
        await command(ws, "mode", "round-robin")
        await say(ws, "Tell a long story about a lighthouse keeper.")
        await next_frame(ws, "partial", timeout=60)
        await command(ws, "pause")
        await next_frame(ws, "turn", paused=True)
        deadline = asyncio.get_running_loop().time() + 120
        while withdrawals(party) == withdrawn:  # the generating client has dropped its reply: proof it stopped
            assert asyncio.get_running_loop().time() < deadline, "the generating client should have dropped its reply"
            await asyncio.sleep(0.1)
        assert [f for f in await quiet_then_marker(ws, after=None) if f["type"] == "message"] == []
        assert model_lines(party.transcript)[before:] == [], "nothing a model said while paused was relayed"
        await command(ws, "resume")
        resumed = await model_messages(ws, 1)
        assert resumed[0]["from"] in MODELS
        await idle(ws)
        await ws.close()
        return resumed

    resumed = asyncio.run(scenario())
    assert model_lines(party.transcript)[before:][:1] == said_in(resumed)


def test_mention_mode_hands_the_turn_to_the_named_persona(party):
    before = len(model_lines(party.transcript))

    async def scenario() -> list[dict]:
        ws = await moderator(party.url)
        await command(ws, "mode", "mention")
        await command(ws, "turns", "1")
        await say(ws, "Historian, when did the first public railway open?")
        replies = await model_messages(ws, 1)
        assert replies[0]["from"] == "Historian"
        assert await quiet_then_marker(ws) == []
        await command(ws, "turns", "3")
        await ws.close()
        return replies

    replies = asyncio.run(scenario())
    assert model_lines(party.transcript)[before:] == said_in(replies)


def test_moderator_mode_speaks_only_when_addressed(party):
    before = len(model_lines(party.transcript))

    async def scenario() -> list[dict]:
        ws = await moderator(party.url)
        await command(ws, "mode", "moderator")
        await say(ws, "Hello everyone, just listen for now.")
        assert await quiet_then_marker(ws) == []
        assert model_lines(party.transcript)[before:] == []
        await command(ws, "to", "TinkerBot", "Describe", "one", "gadget.")
        replies = await model_messages(ws, 1)
        assert replies[0]["from"] == "TinkerBot"
        assert await quiet_then_marker(ws) == []
        await command(ws, "mode", "round-robin")
        await ws.close()
        return replies

    replies = asyncio.run(scenario())
    assert model_lines(party.transcript)[before:] == said_in(replies)


def test_who_reports_the_room(party):
    async def scenario() -> None:
        ws = await moderator(party.url)
        await command(ws, "who")
        roster = await next_frame(ws, "roster")
        names = [p["name"] for p in roster["participants"]]
        assert set(MODELS) <= set(names) and "Moderator" in names
        assert roster["floor"]["mode"] in {"round-robin", "mention", "moderator", "free"}
        await command(ws, "mode", "chaos")
        assert (await next_frame(ws, "error"))["code"] == "bad_argument"
        await ws.close()

    asyncio.run(scenario())


def test_a_baseline_model_speaking_out_of_turn_is_withheld_not_relayed(tmp_path):
    config = hub_config(tmp_path)

    async def body(hub):
        listener, _ = await join(hub.url, "Listener", "human")
        rogue, _ = await join(hub.url, "Old Client", "model")
        await say(rogue, "I answer whenever I like")
        refusal = await next_frame(rogue, "system", event="error")
        assert refusal["code"] == "not_your_turn"
        speaker, _ = await join(hub.url, "Moderator", "human")
        await say(speaker, "Now it is your turn")
        await say(rogue, "my turn now")
        relayed = [await next_frame(listener, "message") for _ in range(2)]
        assert [m["content"] for m in relayed] == ["Now it is your turn", "my turn now"]
        for ws in (listener, rogue, speaker):
            await ws.close()

    with_hub(config, body)
    withheld = [r for r in read_records(config.transcript) if r.kind == "withheld"]
    assert [r.data["content"] for r in withheld] == ["I answer whenever I like"]
    assert withheld[0].data["reason"] == "not_your_turn"
