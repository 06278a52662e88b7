"""client.py as a real process: streaming to the moderator, Ctrl+C mid-generation, hub restarts."""

from __future__ import annotations

import asyncio
import json
import socket
import time

from helpers import Process, build_tiny_model, drain, join, model_lines, next_frame, quiet_then_marker, say, script

from partychat.hub.transcript import read_records


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_replies_stream_only_to_those_who_asked_and_add_up_to_the_final_text(start_hub, start_client):
    _, url = start_hub()
    client = start_client("--name", "Zen Sage", "--prompt-file", "sage.txt", "--server", url,
                          "--max-generation-tokens", "40")
    client.wait_for_output("joined ws://", 180)

    async def scenario() -> None:
        watcher, _ = await join(url, "Watcher", "human", protocol=1, stream=True)
        baseline, _ = await join(url, "Old Moderator", "human", stream=True)
        other_model, _ = await join(url, "Quiet Model", "model", protocol=1)
        await other_model.send(json.dumps({"type": "pass"}))
        await say(watcher, "Describe a garden in three or four sentences.")
        pieces = []
        while True:
            frame = await next_frame(watcher, timeout=120)
            if frame["type"] == "partial":
                assert frame["from"] == "Zen Sage"
                pieces.append(frame["content"])
            elif frame["type"] == "message" and frame["from"] == "Zen Sage":
                final = frame["content"]
                break
        assert "".join(pieces) == final, "the streamed pieces add up to the final message"
        for ws in (baseline, other_model):
            kinds = {f["type"] for f in await drain(ws, 1.0)}
            assert "partial" not in kinds
        for ws in (watcher, baseline, other_model):
            await ws.close()

    asyncio.run(scenario())


def test_ctrl_c_stops_a_client_in_the_middle_of_a_long_generation(tmp_path, start_hub, start_client):
    transcript = tmp_path / "room.jsonl"
    _, url = start_hub("--transcript", str(transcript))
    model = build_tiny_model(tmp_path / "tiny")  # it never stops by itself: the generation is still going
    client = start_client("--name", "Rambler", "--server", url, "--model", str(model), "--no-stream",
                          "--max-generation-tokens", "50000", "--max-context-tokens", "60000")
    client.wait_for_output("joined ws://", 180)

    async def scenario() -> float:
        watcher, _ = await join(url, "Watcher", "human", protocol=1)
        await say(watcher, "Write a very long essay about the sea.")
        await next_frame(watcher, "turn", speakers=["Rambler"])
        await asyncio.sleep(2)  # well into a generation that would run for minutes
        assert [f for f in await drain(watcher, 0.1) if f["type"] == "message"] == []
        started = time.monotonic()
        code = await asyncio.to_thread(client.interrupt)
        elapsed = time.monotonic() - started
        assert code == 0
        # until the hub has seen it leave, and then a marker: nothing from it in between
        assert await quiet_then_marker(watcher, after="leave") == [], "nothing may be sent after the stop"
        await watcher.close()
        return elapsed

    elapsed = asyncio.run(scenario())
    assert model_lines(transcript) == [], "nothing the stopped client wrote reached the room"
    # Left alone, the generation would go on for minutes; the bound is loose for a loaded machine, and
    # the time itself is a benchmark's business.
    assert elapsed < 45, f"Ctrl+C took {elapsed:.1f} s"
    print(f"Ctrl+C ended the generating client in {elapsed:.2f} s")
    assert "Traceback" not in client.output


def test_a_client_reconnects_after_a_hub_restart_with_its_model_still_loaded(tmp_path, processes, start_client):
    """Its opening line (--initial-prompt) is said once, not again on reconnecting."""
    port = free_port()
    transcript = tmp_path / "t.jsonl"

    def hub(*extra: str) -> Process:
        process = Process([script("server.py"), "--host", "127.0.0.1", "--port", str(port),
                           "--transcript", str(transcript), *extra], tmp_path / f"hub-{len(processes)}.out")
        processes.append(process)
        process.wait_for_output("listening on", 30)
        return process

    first = hub()
    url = f"ws://127.0.0.1:{port}"
    client = start_client("--name", "Zen Sage", "--prompt-file", "sage.txt", "--server", url,
                          "--max-generation-tokens", "24", "--initial-prompt", "Greetings, friends.")
    client.wait_for_output("joined ws://", 180)
    first.wait_for_output("Zen Sage: Greetings, friends.", 30)
    first.popen.terminate()
    first.popen.wait(timeout=10)
    client.wait_for_output("not reachable", 30)
    hub("--resume", str(transcript))
    client.wait_for_output(r"joined ws://[\s\S]*joined ws://", 60)
    assert client.output.count("Loading ") == 1, "the model must not be reloaded on reconnect"

    async def scenario() -> None:
        watcher, _ = await join(url, "Watcher", "human", protocol=1)
        await say(watcher, "Are you back?")
        reply = await next_frame(watcher, "message", timeout=120, **{"from": "Zen Sage", "replay": None})
        assert reply["content"].strip()
        await watcher.close()

    asyncio.run(scenario())
    said = [r.data["content"] for r in read_records(transcript) if r.kind == "message" and r.data["from"] == "Zen Sage"]
    assert said.count("Greetings, friends.") == 1


def test_a_persona_whose_prompt_cannot_fit_passes_its_turn_and_says_why(start_hub, start_client):
    _, url = start_hub()
    client = start_client("--name", "Verbose", "--prompt-file", "sage.txt", "--server", url, "--no-auto-truncate",
                          "--max-context-tokens", "120", "--max-generation-tokens", "100")
    client.wait_for_output("joined ws://", 180)

    async def scenario() -> None:
        watcher, _ = await join(url, "Watcher", "human", protocol=1)
        await say(watcher, "Hello there, what do you think?")
        passed = await next_frame(watcher, "system", event="pass", timeout=120)
        assert "Verbose passed its turn" in passed["content"]
        assert "The prompt needs" in passed["content"] and "--no-auto-truncate" in passed["content"]
        await watcher.close()

    asyncio.run(scenario())
    assert "Traceback" not in client.output
