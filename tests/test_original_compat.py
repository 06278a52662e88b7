"""The original project's own client and moderator against our hub.

They come from the early PyPI release (llm-party-chat 0.0.1, same wire protocol), downloaded into
a scratch folder for the test only. Without PyPI, or with port 8765 taken, the tests are skipped;
under CI (CI set) they fail instead, so a green CI run always includes them.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import Process, close_all, drain, join, next_frame, say, script, unavailable

from partychat.engines.models import converted_folder, embedded_gguf
from partychat.hub.transcript import read_records


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("original")
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(folder),
                             "llm-party-chat==0.0.1"], capture_output=True, text=True, timeout=120)
    wheels = list(folder.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        unavailable(f"could not download llm-party-chat 0.0.1: {result.stderr.strip()[-200:]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extractall(folder)
    return folder


def test_the_original_client_takes_its_turn_in_our_room(original, start_hub, processes, tmp_path):
    _, url = start_hub()
    model = converted_folder(embedded_gguf())
    old = Process(["-m", "llm_party_chat.client", "--name", "Old Timer", "--model", str(model), "--server", url,
                   "--max-tokens", "20"], tmp_path / "old-client.out", cwd=original)
    processes.append(old)

    async def scenario() -> dict:
        watcher, _ = await join(url, "Moderator", "human", protocol=1)
        while True:
            notice = await next_frame(watcher, "system", timeout=180)
            if "Old Timer joined" in notice["content"]:
                break
        await say(watcher, "Hello, who are you?")
        reply = await next_frame(watcher, "message", timeout=180, **{"from": "Old Timer"})
        await watcher.close()
        return reply

    reply = asyncio.run(scenario())
    assert reply["content"].strip()
    assert reply["role"] == "model" and reply["seq"] == 2


def test_the_original_moderator_reaches_our_hub_on_its_fixed_address(original, start_hub, processes, tmp_path):
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 8765)) == 0:
            unavailable("port 8765, which the original moderator is hard-wired to, is in use")
    hub = Process([script("server.py"), "--port", "8765"], tmp_path / "hub.out")
    processes.append(hub)
    hub.wait_for_output("listening on", 30)

    async def scenario() -> dict:
        listener, _ = await join("ws://localhost:8765", "Listener", "human")
        old = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "llm_party_chat.moderator", cwd=original,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        old.stdin.write(b"Greetings from the old console\n")
        await old.stdin.drain()
        frame = await next_frame(listener, "message", timeout=30)
        old.stdin.close()
        await asyncio.wait_for(old.wait(), 30)
        await listener.close()
        return frame

    frame = asyncio.run(scenario())
    assert (frame["from"], frame["content"]) == ("Moderator", "Greetings from the old console")


def test_our_client_and_moderator_work_on_the_original_hub(original, processes, start_client, tmp_path):
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 8765)) == 0:
            unavailable("port 8765, where the original hub always listens, is in use")
    hub = Process([str(original / "llm_party_chat" / "server.py")], tmp_path / "original-hub.out", cwd=original)
    processes.append(hub)
    hub.wait_for_output("Waiting for connections", 30)
    url = "ws://localhost:8765"
    client = start_client("--name", "Zen Sage", "--prompt-file", "sage.txt", "--server", url,
                          "--max-generation-tokens", "30")
    client.wait_for_output("baseline hub", 180)

    async def scenario() -> dict:
        listener, _ = await join(url, "Listener", "human")
        result = await asyncio.to_thread(
            subprocess.run, [sys.executable, script("moderator.py"), "--server", url], input="Hello there, sage.\n",
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
        )
        assert result.returncode == 0 and "Traceback" not in result.stdout + result.stderr
        first = await next_frame(listener, "message", timeout=30)
        reply = await next_frame(listener, "message", timeout=120)
        await listener.close()
        return {"question": first, "reply": reply}

    frames = asyncio.run(scenario())
    assert frames["question"]["content"] == "Hello there, sage."
    assert frames["reply"]["from"] == "Zen Sage" and frames["reply"]["content"].strip()


def test_the_hub_holds_back_the_original_clients_parroting(original, start_hub, processes, tmp_path):
    transcript = tmp_path / "room.jsonl"
    _, url = start_hub("--transcript", str(transcript))
    model = converted_folder(embedded_gguf())
    old = Process(["-m", "llm_party_chat.client", "--name", "Old Timer", "--model", str(model), "--server", url,
                   "--max-tokens", "30", "--temperature", "0.01"], tmp_path / "old-client.out", cwd=original)
    processes.append(old)
    line = "Say only this sentence and nothing else: I like green apples very much."

    async def scenario() -> tuple[dict, list[dict]]:
        watcher, _ = await join(url, "Moderator", "human", protocol=1)
        listener, _ = await join(url, "Listener", "human")
        while "Old Timer joined" not in (await next_frame(watcher, "system", timeout=180))["content"]:
            pass
        await say(watcher, line)
        withheld = await next_frame(watcher, "system", event="withheld", timeout=180)
        quiet = await next_frame(watcher, "system", event="quiet", timeout=30)
        seen = [frame for frame in await drain(listener, 1.0) if frame["type"] == "message"]
        await close_all(watcher, listener)
        return {**withheld, "quiet": quiet["reason"]}, seen

    withheld, seen = asyncio.run(scenario())
    assert withheld["reason"] == "repeat" and withheld["content"].startswith("Old Timer's reply was withheld")
    assert withheld["quiet"] == "withheld"
    assert [frame["from"] for frame in seen] == ["Moderator"], "the others hear the question, not the parroting"
    kept = [r.data for r in read_records(transcript) if r.kind == "withheld"]
    assert [(k["from"], k["reason"]) for k in kept] == [("Old Timer", "repeat")]
    assert "I like green apples" in kept[0]["content"]
