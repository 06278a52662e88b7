"""Retries with a real model in a real room: a persona that would echo tries again, and /retry everywhere.

The persona runs client.py on the embedded model with greedy decoding, so its first attempt is the
same on every run; retries sample with a fresh seed, so the tests accept any reply the guards pass.
The turn timeouts are long: a loaded machine may take minutes for a few attempts.
"""

from __future__ import annotations

import asyncio
import subprocess

from helpers import Process, join, next_frame, say, script
from test_web_page import FINALS, LONG, join_as_moderator, page_url, shown

from partychat.guards import Earlier, check_reply
from partychat.hub.transcript import read_records

PATIENT_HUB = ("--turn-timeout", "900", "--first-token-timeout", "600")
ENGINE = ("--backend", "transformers")
"""One engine for every run (the seed reaches each engine alike; see test_generation for the engines)."""
ECHO_PERSONA = ("You are Echo. You repeat the moderator's last message word for word, exactly as it was "
                "written, and say nothing else.")
STATEMENT = "The river carries old stories down to the sea every spring."


def test_a_persona_told_to_echo_takes_its_copy_back_and_the_room_hears_a_reply_or_why_not(
        tmp_path, start_hub, start_client):
    transcript = tmp_path / "t.jsonl"
    _, url = start_hub("--transcript", str(transcript), *PATIENT_HUB)
    prompt = tmp_path / "echo.txt"
    prompt.write_text(ECHO_PERSONA, encoding="utf-8")
    client = start_client("--name", "Echo", "--prompt-file", str(prompt), "--server", url, "--temperature", "0",
                          "--max-generation-tokens", "30", "--retries", "1", *ENGINE)
    client.wait_for_output("joined ws://", 300)

    async def scenario() -> tuple[list[dict], dict]:
        host, _ = await join(url, "Moderator", "human", protocol=1, stream=True)
        await say(host, STATEMENT)
        frames = []
        while True:
            frame = await next_frame(host, timeout=900)
            frames.append(frame)
            if frame["type"] == "system" and frame.get("event") == "quiet":
                await host.close()
                return frames, frame

    frames, quiet = asyncio.run(scenario())
    assert "Traceback" not in client.output, client.output
    assert quiet["reason"] != "withheld", "a guard must not silence the room while a retry remains"
    withdrawn = [f for f in frames if f["type"] == "withdrawn"]
    assert withdrawn and withdrawn[0]["from"] == "Echo" and withdrawn[0]["reason"] == "repeat", frames
    replies = [f for f in frames if f["type"] == "message" and f["from"] == "Echo"]
    passes = [f for f in frames if f["type"] == "system" and f.get("event") == "pass"]
    if replies:
        verdict = check_reply(replies[0]["content"], "Echo", ["Moderator"], [Earlier("Moderator", STATEMENT)])
        assert not verdict.withheld, replies[0]
    else:
        assert "Echo passed its turn" in passes[0]["content"] and "would have been withheld" in passes[0]["content"]
    withheld = [r.data for r in read_records(transcript) if r.kind == "withheld"]
    assert withheld[0]["from"] == "Echo" and withheld[0]["reason"] == "repeat"
    assert withheld[0]["content"] == STATEMENT, "the greedy first attempt is the echo, kept as withheld"
    assert len(withheld) == len(withdrawn), "every attempt taken back is in the transcript"


def test_retry_from_the_console_and_the_page_replaces_the_reply_everywhere_and_survives_resume(
        tmp_path, start_hub, start_client, processes, browser):
    transcript = tmp_path / "t.jsonl"
    hub, url = start_hub("--transcript", str(transcript), *PATIENT_HUB)
    client = start_client("--name", "Zen Sage", "--prompt-file", "sage.txt", "--server", url, "--temperature", "0",
                          "--max-generation-tokens", "30", *ENGINE)
    client.wait_for_output("joined ws://", 300)
    watcher = browser.open(page_url(hub))
    console = Process([script("moderator.py"), "--server", url, "--name", "Host"], tmp_path / "moderator.out",
                      stdin=subprocess.PIPE)
    processes.append(console)
    console.wait_for_output("Connected to", 60)

    def sage_says() -> list[str]:
        return [r.data["content"] for r in read_records(transcript)
                if r.kind == "message" and r.data["from"] == "Zen Sage"]

    console.type_line("Describe a quiet harbour at dawn.")
    watcher.locator(FINALS).nth(1).wait_for(timeout=LONG)
    first = shown(watcher)[1]
    assert first["sender"] == "Zen Sage"

    # From the console: the new version comes under a new number and takes the old one's place.
    console.type_line("/retry")
    console.wait_for_output(r"Zen Sage \(written again, in place of its last message\)", LONG / 1000)
    watcher.locator("#log .msg.retried").wait_for(timeout=LONG)
    again = shown(watcher)
    assert [m["sender"] for m in again] == ["Host", "Zen Sage"], "replaced in place, not added"
    assert again[1]["seq"] > first["seq"] and again[1]["text"].split() == sage_says()[1].split()
    assert watcher.locator("#log .msg.retried .note").inner_text() == "written again at the moderator's request"
    assert sage_says()[0] not in watcher.locator("#log").inner_text(), "the old version is no longer shown"

    # From the page: the persona's Retry button.
    moderator = browser.open(page_url(hub) + "moderate")
    join_as_moderator(moderator, "Pager")
    moderator.locator("#participants li", has_text="Zen Sage").get_by_role("button", name="Retry").click()
    watcher.wait_for_function("seq => Number(document.querySelector('#log .msg.retried').dataset.seq) > seq",
                              arg=again[1]["seq"], timeout=LONG)
    third = shown(watcher)
    assert [m["sender"] for m in third] == ["Host", "Zen Sage"] and third[1]["text"] != again[1]["text"]
    assert [m["text"] for m in shown(moderator)] == [m["text"] for m in third]
    console.wait_for_output(r"(?s)written again.*written again", 60)

    records = [r.data for r in read_records(transcript) if r.kind == "message" and r.data["from"] == "Zen Sage"]
    assert len(records) == 3, "the transcript keeps every version"
    assert records[1]["replaces"] == records[0]["id"] and records[2]["replaces"] == records[1]["id"]

    # A hub resumed from the transcript shows only the latest version.
    hub.popen.terminate()
    hub.popen.wait(timeout=30)
    resumed, _ = start_hub("--resume", str(transcript))
    fresh = browser.open(page_url(resumed))
    fresh.locator(FINALS).nth(1).wait_for(timeout=60_000)
    assert [m["text"] for m in shown(fresh)] == [m["text"] for m in third]
    assert "Traceback" not in client.output + console.output
