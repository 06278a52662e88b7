"""Natural mode with three real personas on the embedded model."""

from __future__ import annotations

import asyncio
import itertools
import json

from helpers import Process, join, next_frame, say, script

PERSONAS = (
    ("Zen Sage", "sage.txt", "0.3"),
    ("TinkerBot", "inventor.txt", "0.9"),
    ("Historian", "historian.txt", "0.6"),
)
QUESTION = "TinkerBot, what would you build?"
TURNS = 4


async def one_exchange(url: str) -> tuple[list[str], dict[str, dict]]:
    """Ask the question; return who held the turn, in order, until the room went quiet, and /who's roster."""
    ws, _ = await join(url, "Moderator", "human", protocol=1)
    await say(ws, QUESTION)
    holders: list[str] = []
    while True:
        frame = await next_frame(ws, timeout=300)
        if frame["type"] == "turn" and frame["speakers"] and frame["speakers"] != holders[-1:]:
            holders.extend(frame["speakers"])
        if frame["type"] == "system" and frame.get("event") == "quiet":
            break
    await ws.send(json.dumps({"type": "command", "name": "who", "args": []}))
    roster = {p["name"]: p for p in (await next_frame(ws, "roster"))["participants"]}
    await ws.close()
    return holders, roster


def test_natural_mode_follows_the_mention_then_a_seeded_draw_and_never_repeats_a_speaker(tmp_path, processes):
    def start_hub(port: str, run: int) -> str:
        hub = Process([script("server.py"), "--host", "127.0.0.1", "--port", port, "--mode", "natural", "--seed", "11",
                       "--max-turns", str(TURNS), "--first-token-timeout", "120",
                       "--transcript", str(tmp_path / f"run-{run}.jsonl")], tmp_path / f"hub-{run}.out")
        processes.append(hub)
        return hub.wait_for_output(r"listening on (ws://\S+)", 30).group(1)

    def start_personas(url: str, run: int) -> list[Process]:
        clients = []
        for name, prompt, talkativeness in PERSONAS:
            # One message of history and greedy decoding: the second run hears exactly what the first did. No
            # retries: a retry samples with a fresh seed, and a different reply may name a different persona.
            client = Process([script("client.py"), "--name", name, "--prompt-file", prompt, "--server", url,
                              "--talkativeness", talkativeness, "--temperature", "0", "--history-length", "1",
                              "--max-generation-tokens", "24", "--retries", "0"], tmp_path / f"{prompt}-{run}.out")
            processes.append(client)
            clients.append(client)
        for client in clients:
            client.wait_for_output("joined ws://", 240)
        return clients

    url = start_hub("0", 1)
    clients = start_personas(url, 1)
    first, roster = asyncio.run(one_exchange(url))

    # The same hub again, fresh, and fresh personas: same seed, same question. (Personas that stayed would
    # remember the first run, and their own guard would hold back the same first reply as a repeat.)
    for process in (*clients, processes[0]):
        process.stop()
    url = start_hub("0", 2)
    start_personas(url, 2)
    second, _ = asyncio.run(one_exchange(url))

    assert first[0] == "TinkerBot", first
    assert len(first) == TURNS, first
    assert all(a != b for a, b in itertools.pairwise(first)), f"someone spoke twice in a row: {first}"
    assert second == first
    for name, _, talkativeness in PERSONAS:
        assert roster[name]["talkativeness"] == float(talkativeness)
    tinker = roster["TinkerBot"]
    assert tinker["ttft"] > 0 and tinker["tokens_per_second"] > 0, "our client reports its speed with each reply"
