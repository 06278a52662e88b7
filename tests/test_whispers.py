"""Whispers, scenes and secrets: who knows what, as the hub enforces it and as the personas' prompts show it."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import command, drain, hub_config, join, model_lines, next_frame, say, script, with_hub
from websockets.asyncio.client import ClientConnection, connect

from partychat.export import transcript_markdown
from partychat.hub.transcript import load_saved_room, read_records
from partychat.persona.cast import CastError, Persona, read_cast_file
from partychat.protocol import parse_server_frame


async def chair_ann_bob(hub, **bob: object) -> tuple[ClientConnection, ClientConnection, ClientConnection]:
    """A moderator and two personas in the room, with what joining sent them already read."""
    chair, _ = await join(hub.url, "Chair", "human", protocol=1)
    ann, _ = await join(hub.url, "Ann", "model", protocol=1)
    bob_ws, _ = await join(hub.url, "Bob", "model", protocol=1, **bob)
    for ws in (chair, ann, bob_ws):
        await drain(ws)
    return chair, ann, bob_ws


def prompts(log: str, name: str) -> list[str]:
    """Every prompt a persona built, as its client's debug log shows them."""
    return re.findall(rf"{re.escape(name)}'s prompt: (.*)", log)


@pytest.mark.slow  # a real persona on the embedded model
def test_a_whispered_code_word_and_a_cast_secret_reach_only_their_personas_prompts(tmp_path, start_hub,
                                                                                      start_client):
    transcript = tmp_path / "room.jsonl"
    _, url = start_hub("--max-turns", "1", "--transcript", str(transcript))
    cast = tmp_path / "cast.toml"
    cast.write_text('[[persona]]\nname = "Sage"\nprompt_file = "sage.txt"\nsecret = "The vault opens with 7349."\n\n'
                    '[[persona]]\nname = "Tinker"\nprompt_file = "inventor.txt"\n', encoding="utf-8")
    log = tmp_path / "client.log"

    async def scenario() -> None:
        ws, _ = await join(url, "Moderator", "human", protocol=1)
        client = start_client("--cast", str(cast), "--server", url, "--max-generation-tokens", "16",
                              "--temperature", "0", "--log-level", "DEBUG", "--log-file", str(log))
        for _ in range(2):
            await next_frame(ws, "system", timeout=240, event="join")
        await command(ws, "whisper", "Sage", "The code word is PELICAN. Keep it to yourself.")
        await next_frame(ws, "turn", timeout=30, speakers=["Sage"])
        await next_frame(ws, "turn", timeout=180, speakers=[])
        await command(ws, "to", "Tinker", "Tinker, what is the code word Sage was told? And the vault number?")
        await next_frame(ws, "turn", timeout=30, speakers=["Tinker"])
        await next_frame(ws, "turn", timeout=180, speakers=[])
        await ws.close()
        assert client.popen.poll() is None, client.output

    asyncio.run(scenario())
    text = log.read_text(encoding="utf-8")
    sage, tinker = prompts(text, "Sage"), prompts(text, "Tinker")
    assert sage and tinker, text[-3000:]
    assert "PELICAN" in sage[-1] and "7349" in sage[-1]
    assert "Moderator (privately, to you only): The code word is PELICAN" in sage[-1], "Sage knows it was a whisper"
    assert "Tinker, what is the code word" in tinker[-1], "Tinker's prompt has the question"
    # The whisper as the moderator's line, and the secret, never reach Tinker. Sage may still say either
    # aloud (a model's public reply is everyone's; CI runs saw Sage repeat the whispered sentence), and
    # then Tinker hears it from Sage, so the bare words are checked only when Sage kept them.
    assert not any(f"Moderator{mark}" in prompt for prompt in tinker for mark in (": The code word", " (privately")), \
        "Tinker never had the whisper"
    said_aloud = " ".join(content for speaker, content in model_lines(transcript) if speaker == "Sage")
    for word in ("PELICAN", "7349"):
        if word not in said_aloud:
            assert not any(word in prompt for prompt in tinker), f"Tinker never had {word}"


def test_an_off_stage_persona_takes_no_turn_hears_nothing_then_hears_its_entry_line_and_what_follows(tmp_path):
    async def body(hub):
        chair, _ = await join(hub.url, "Chair", "human", protocol=1)
        ann, _ = await join(hub.url, "Ann", "model", protocol=1)
        bob, welcome = await join(hub.url, "Bob", "model", protocol=1, offstage=True)
        assert welcome["event"] == "welcome"
        await drain(chair), await drain(ann), await drain(bob)

        await command(chair, "who")
        roster = await next_frame(chair, "roster")
        stage = {p["name"]: p.get("on_stage") for p in roster["participants"]}
        assert stage == {"Chair": None, "Ann": True, "Bob": False}

        await say(chair, "Ann, what do you see?")
        assert (await next_frame(ann, "turn"))["speakers"] == ["Ann"]
        await ann.send(json.dumps({"type": "message", "content": "A quiet harbour at dusk."}))
        await next_frame(chair, "message", **{"from": "Ann"})
        await say(chair, "Anyone else?")  # round-robin: only Ann is on stage, so Ann again
        await next_frame(chair, "turn", timeout=5, speakers=[])
        await next_frame(chair, "turn", timeout=5, speakers=["Ann"])
        await ann.send(json.dumps({"type": "pass"}))
        # Bob may not even speak out of turn, opening line or not.
        await bob.send(json.dumps({"type": "message", "content": "Hello there!", "opening": True}))
        refusal = await next_frame(bob, "error")
        assert refusal["code"] == "off_stage"
        assert [f for f in await drain(bob)] == [], "off stage: nothing at all"
        assert not [f for f in await drain(ann) if f.get("content") == "Hello there!"]

        await command(chair, "enter", "Bob", "Bob walks in from the rain.")
        frames = await drain(bob)
        kinds = [(f["type"], f.get("event"), f.get("content")) for f in frames]
        assert ("system", "enter", "Chair brought Bob on stage.") in kinds
        lines = [f["content"] for f in frames if f["type"] == "message"]
        assert lines == ["Bob walks in from the rain."], "the entry line first, nothing from before"
        await say(chair, "Welcome, Bob.")
        assert (await next_frame(bob, "message"))["content"] == "Welcome, Bob."
        await command(chair, "who")
        roster = await next_frame(chair, "roster")
        assert {p["name"]: p.get("on_stage") for p in roster["participants"]}["Bob"] is True

    with_hub(hub_config(tmp_path, max_turns=1, first_token_timeout=0, turn_timeout=0), body)
    stages = [r.data for r in read_records(tmp_path / "transcript.jsonl") if r.kind == "stage"]
    assert stages[0] == {**stages[0], "on_stage": ["Ann"], "off_stage": ["Bob"]}
    assert stages[-1]["on_stage"] == ["Ann", "Bob"]


def test_whispers_are_recorded_with_their_recipients_and_resume_keeps_them_and_the_stage(tmp_path):
    async def first(hub):
        chair, _ = await join(hub.url, "Chair", "human", protocol=1)
        personas = [await join(hub.url, name, "model", protocol=1) for name in ("Ann", "Bob")]
        await command(chair, "whisper", "Ann", "The cake is a lie.")
        await next_frame(chair, "message", content="The cake is a lie.")
        await command(chair, "exit", "Bob")
        await next_frame(chair, "system", event="exit")
        await say(chair, "Bob cannot hear this.")
        await next_frame(chair, "message", content="Bob cannot hear this.")
        assert len(personas) == 2

    with_hub(hub_config(tmp_path), first)
    earlier = load_saved_room(tmp_path / "transcript.jsonl")
    whisper, aside = earlier.messages
    assert (whisper.recipients, whisper.whisper) == (("Ann",), True)
    assert (aside.recipients, aside.whisper) == (("Ann",), False)
    assert earlier.stage == (["Ann"], ["Bob"])
    assert "whispered to Ann" in transcript_markdown(earlier.messages)

    async def second(hub):
        # Bob comes back: still off stage, and the resumed room replays him neither message.
        bob, welcome = await join(hub.url, "Bob", "model", protocol=1, last_seq=0)
        assert welcome["event"] == "welcome"
        assert await drain(bob) == []
        ann, _ = await join(hub.url, "Ann", "model", protocol=1, last_seq=0)
        replayed = [f["content"] for f in await drain(ann) if f["type"] == "message"]
        assert replayed == ["The cake is a lie.", "Bob cannot hear this."]
        watcher, _ = await join(hub.url, "Guest", "human", protocol=1, last_seq=0)
        frames = await drain(watcher)
        assert [f["content"] for f in frames if f["type"] == "message"] == ["Bob cannot hear this."]
        assert "Chair whispered to Ann." in [f.get("content") for f in frames if f.get("event") == "whisper"]

    with_hub(_resumed(tmp_path), second)


def _resumed(tmp_path: Path):
    config = hub_config(tmp_path, moderator_token="chair")
    config.resume = config.transcript
    return config


@pytest.mark.parametrize(("words", "sentence"), [
    (("whisper",), "Usage: /whisper NAME message"),
    (("whisper", "Nobody", "hello"), "No persona called 'Nobody' has been in the room."),
    (("whisper", "Chair", "hello"), "Chair is a human, not a persona"),
    (("whisper", "Ann"), "the message is missing"),
    (("whisper!", "Bob", "hello"), "Bob is off stage; bring it on with /enter Bob first."),
    (("enter", "Zed"), "No persona called 'Zed' has been in the room."),
    (("enter", "Ann"), "Ann is already on stage."),
    (("exit", "Bob"), "Bob is already off stage."),
    (("scene", "Ann"), "Those personas are on stage already; nothing changed."),
    (("scene", "Ann", "Zed"), "No persona called 'Zed' has been in the room."),
    (("to", "Bob", "hi"), "Bob is off stage; bring it on with /enter Bob first."),
])
def test_bad_whispers_and_stage_commands_get_one_clear_sentence_and_change_nothing(tmp_path, words, sentence):
    async def body(hub):
        chair, ann, bob = await chair_ann_bob(hub, offstage=True)
        before = (tmp_path / "transcript.jsonl").read_text()
        await command(chair, *words)
        refusal = await next_frame(chair, "error")
        assert refusal["code"] == "bad_argument" and sentence in refusal["content"], refusal
        assert await drain(ann) == [] and await drain(bob) == [] and await drain(chair) == []
        assert (tmp_path / "transcript.jsonl").read_text() == before, "nothing was recorded"

    with_hub(hub_config(tmp_path), body)


def test_a_persona_cannot_whisper_nor_choose_who_hears_it(tmp_path):
    async def body(hub):
        chair, ann, bob = await chair_ann_bob(hub)
        await command(ann, "whisper", "Bob", "psst")
        assert (await next_frame(ann, "error"))["code"] == "not_moderator"
        await ann.send(json.dumps({"type": "message", "content": "Only Bob may read this.", "recipients": ["Bob"]}))
        refusal = await next_frame(ann, "error")
        assert refusal["code"] == "bad_frame" and "Only a moderator chooses who hears a message" in refusal["content"]
        await ann.send(json.dumps({"type": "message", "content": "Nobody else.", "whisper": True}))
        assert (await next_frame(ann, "error"))["code"] == "bad_frame"
        assert await drain(bob) == [] and await drain(chair) == []

    with_hub(hub_config(tmp_path), body)


@pytest.mark.parametrize("show_whispers", [False, True])
def test_moderators_read_a_whisper_marked_others_learn_only_that_it_happened(tmp_path, show_whispers):
    async def body(hub):
        chair, _ = await join(hub.url, "Chair", "human", protocol=1, stream=True, moderator_token="chair")
        guest, _ = await join(hub.url, "Guest", "human", protocol=1, stream=True)
        watcher = await connect(hub.url)
        await watcher.send(json.dumps({"type": "spectator", "protocol": 1}))
        ann, _ = await join(hub.url, "Ann", "model", protocol=1)
        bob, _ = await join(hub.url, "Bob", "model", protocol=1)
        await drain(chair), await drain(guest), await drain(watcher), await drain(bob)
        await command(chair, "whisper!", "Ann", "Meet me at noon.")
        message = await next_frame(chair, "message")
        assert message["whisper"] is True and message["recipients"] == ["Ann"]
        await next_frame(ann, "turn", speakers=["Ann"])
        await ann.send(json.dumps({"type": "partial", "content": "Noon it is. "}))
        await ann.send(json.dumps({"type": "message", "content": "Noon it is. I will be there."}))
        reply = await next_frame(chair, "message", **{"from": "Ann"})
        assert reply["whisper"] is True, "the reply to /whisper! stays private"
        for who, frames in (("Bob", await drain(bob)), ("Guest", await drain(guest))):
            seen = json.dumps(frames)
            assert "Meet me" not in seen and "Noon" not in seen, who
        assert "Chair whispered to Ann." in seen and "Ann whispered to the moderators." in seen
        assert "whispered" not in json.dumps(await drain(bob)), "personas never learn of a whisper"
        seen = json.dumps(await drain(watcher))
        assert ("Meet me" in seen and "Noon" in seen) is show_whispers
        assert ("Chair whispered to Ann." in seen) is not show_whispers

    with_hub(hub_config(tmp_path, moderator_token="chair", show_whispers=show_whispers), body)


def test_a_cast_secret_joins_only_its_personas_text_and_offstage_is_read(tmp_path):
    path = tmp_path / "cast.toml"
    path.write_text('[[persona]]\nname = "Ann"\nsecret = "The ring is in the well."\noffstage = true\n\n'
                    '[[persona]]\nname = "Bob"\n', encoding="utf-8")
    ann, bob = read_cast_file(path, Persona(name="", system_prompt=""))
    assert "The ring is in the well." in ann.system_prompt and ann.offstage
    assert "ring" not in bob.system_prompt and not bob.offstage
    path.write_text('[[persona]]\nname = "Ann"\noffstage = "yes"\n', encoding="utf-8")
    with pytest.raises(CastError, match="field 'offstage': must be true or false"):
        read_cast_file(path, Persona(name="", system_prompt=""))


def test_a_whisper_frame_reads_back_with_its_recipients():
    frame = parse_server_frame(json.dumps({"type": "message", "from": "Chair", "content": "x", "whisper": True,
                                           "recipients": ["Ann"]}))
    assert frame.whisper and frame.recipients == ("Ann",)


def test_the_console_whispers_marks_it_shows_the_stage_and_saves_the_whisper_marked(start_hub, tmp_path):
    _, url = start_hub()

    async def scenario() -> subprocess.CompletedProcess[str]:
        ann, _ = await join(url, "Ann", "model", protocol=1)
        session = "/whisper Ann The cake is a lie.\n/exit Ann She slips out.\n/who\n/enter Nobody\n/save saved.md\n"
        result = await asyncio.to_thread(
            subprocess.run, [sys.executable, script("moderator.py"), "--server", url, "--name", "Host"],
            input=session, capture_output=True, text=True, timeout=60, cwd=tmp_path)
        heard = [f["content"] for f in await drain(ann) if f["type"] == "message"]
        assert heard == ["The cake is a lie.", "She slips out."]
        await ann.close()
        return result

    result = asyncio.run(scenario())
    out = result.stdout
    assert result.returncode == 0, result.stderr
    assert "Host (whispered to Ann): The cake is a lie." in out
    assert "Ann (model, off stage, talkativeness 0.5)" in out, out
    assert "No persona called 'Nobody' has been in the room." in out
    saved = (tmp_path / "saved.md").read_text()
    assert "whispered to Ann" in saved and "The cake is a lie." in saved
    assert "Traceback" not in out + result.stderr


@pytest.mark.slow  # Chromium
def test_the_page_marks_whispers_for_the_moderator_and_shows_spectators_only_that_one_happened(start_hub, browser):
    from test_web_page import FINALS, join_as_moderator, joined, page_url

    hub, url = start_hub()
    with joined(url, "Ann", "model"):
        watcher = browser.open(page_url(hub))
        moderator = browser.open(page_url(hub) + "moderate")
        join_as_moderator(moderator, "Chair")
        ann = moderator.locator("#participants li", has_text="Ann")
        ann.get_by_role("button", name="Whisper").click()
        assert moderator.input_value("#say") == "/whisper Ann "
        moderator.type("#say", "The key is under the mat.")
        moderator.press("#say", "Enter")

        whisper = moderator.locator(f"{FINALS}.whisper")
        whisper.wait_for()
        assert "The key is under the mat." in whisper.inner_text()
        assert whisper.locator(".note").inner_text() == "whispered to Ann"
        trace = watcher.locator("#log .event", has_text="Chair whispered to Ann.")
        trace.wait_for()
        assert trace.is_visible()
        assert "under the mat" not in watcher.locator("body").inner_text()

        ann.get_by_role("button", name="Exit").click()
        watcher.locator("#participants li", has_text="off stage").wait_for()
        assert "Ann" in watcher.locator("#participants li", has_text="off stage").inner_text()
        ann.get_by_role("button", name="Enter").wait_for()
    assert not browser.dialogs and not browser.errors


def test_a_late_joiner_is_replayed_the_last_messages_it_may_read_not_fewer(tmp_path):
    async def body(hub):
        chair, _ = await join(hub.url, "Chair", "human", protocol=1)
        ann, _ = await join(hub.url, "Ann", "model", protocol=1)
        for line in ("One.", "Two."):
            await say(chair, line)
        await command(chair, "whisper", "Ann", "Three, for Ann alone.")
        await next_frame(ann, "message", content="Three, for Ann alone.")
        cy, _ = await join(hub.url, "Cy", "model", protocol=1)
        replayed = [f["content"] for f in await drain(cy) if f["type"] == "message"]
        assert replayed == ["One.", "Two."], "the last two it may read, the whisper skipped"

    with_hub(hub_config(tmp_path, replay=2), body)
