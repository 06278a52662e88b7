"""A real party: hub, two personas on the embedded model, a scripted moderator, all as processes."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys

from helpers import ROOT, Process, next_frame, script
from websockets.asyncio.client import connect

QUESTION = "Name one thing you would change about cities."


def test_two_personas_answer_a_scripted_moderator(tmp_path, start_hub, start_client, processes):
    hub_log = tmp_path / "hub.log"
    # Without guards: the 135M model may echo the other persona, and this test is about the processes.
    hub, url = start_hub("--log-file", str(hub_log), "--transcript", str(tmp_path / "t.jsonl"), "--no-guards",
                         env={"FORCE_COLOR": "1"})
    personas = {"Zen Sage": "sage.txt", "TinkerBot": "inventor.txt"}
    clients = {name: start_client("--name", name, "--prompt-file", prompt, "--server", url,
                                  "--max-generation-tokens", "40")
               for name, prompt in personas.items()}

    async def observe() -> list[dict]:
        async with connect(url) as observer:
            await observer.send(json.dumps({"name": "Observer", "type": "human"}))
            await next_frame(observer, "system")
            for client in clients.values():
                await asyncio.to_thread(client.wait_for_output, "joined ws://", 180)
            typed = tmp_path / "session.txt"
            typed.write_text(QUESTION + "\n")
            with typed.open() as stdin:
                moderator = Process([script("moderator.py"), "--server", url], tmp_path / "moderator.out",
                                    stdin=stdin)
                processes.append(moderator)
                code = await asyncio.to_thread(moderator.popen.wait, 240)
            assert code == 0, moderator.output
            messages = []
            while len(messages) < 3:
                messages.append(await next_frame(observer, "message", timeout=30))
            return messages

    messages = asyncio.run(observe())
    assert messages[0]["from"] == "Moderator"
    assert sorted(m["from"] for m in messages[1:]) == ["TinkerBot", "Zen Sage"], "each persona answers once"
    assert messages[0]["content"] == QUESTION
    for message in messages[1:]:
        assert message["content"].strip(), message
        # the text relayed under a persona's name is the text that persona's own process sent (and logs
        # just after sending, so it may reach the log a moment after the room has it; the log indents
        # a reply's later lines, so its first line is what is looked for)
        clients[message["from"]].wait_for_output(re.escape(message["content"].splitlines()[0]), 30)
    moderator_output = processes[-1].output
    assert "Zen Sage:" in moderator_output and "TinkerBot:" in moderator_output
    assert "Traceback" not in moderator_output

    hub.popen.terminate()
    hub.popen.wait(timeout=10)
    log_text = hub_log.read_text()
    assert "Zen Sage joined" in log_text and QUESTION in log_text
    assert "\x1b" not in log_text, "colour codes leaked into the log file"
    assert "\x1b[" in hub.output, "the console log should be coloured when colour is forced"
    for client in clients.values():
        assert "Traceback" not in client.output


def test_demo_script_is_importable_and_documents_itself():
    result = subprocess.run([sys.executable, "-m", "partychat.demo", "--help"], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0
    assert "--model" in result.stdout and "--cast" in result.stdout
