"""Several personas in one client.py process: --persona, --cast files, one load per model."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    ROOT,
    build_tiny_model,
    command,
    join,
    model_lines,
    model_messages,
    next_frame,
    quiet_then_marker,
    say,
    script,
)

from partychat.persona.cast import CastError, Persona, read_cast_file

BASE = Persona(name="", system_prompt="")
TRIO = (("Zen Sage", "sage.txt"), ("TinkerBot", "inventor.txt"), ("Historian", "historian.txt"))


def cast_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cast.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_three_personas_in_one_process_take_turns_in_join_order_and_survive_a_kick(tmp_path, start_hub,
                                                                                    start_client):
    # Without guards: greedy personas greeting alike would be held back as repeats (tests/test_guards.py
    # covers that); this test counts replies per persona.
    transcript = tmp_path / "room.jsonl"
    _, url = start_hub("--no-guards", "--transcript", str(transcript))

    async def scenario() -> list[dict]:
        ws, _ = await join(url, "Moderator", "human", protocol=1)
        client = start_client(*[arg for name, prompt in TRIO for arg in ("--persona", f"{name}={prompt}")],
                              "--server", url, "--max-generation-tokens", "24", "--temperature", "0")
        joins = [await next_frame(ws, "system", timeout=240, event="join") for _ in TRIO]
        joined = [join["content"].removesuffix(" joined the chat") for join in joins]
        assert joined == [name for name, _ in TRIO], "a cast joins in the order it is given"
        assert client.output.count("Loading ") == 1, "three personas, one model, one load"

        await say(ws, "Say hello to the others in one short sentence.")
        replies = await model_messages(ws, 3, timeout=180)
        assert [r["from"] for r in replies] == joined
        assert all(r["content"].strip() for r in replies)
        assert await quiet_then_marker(ws) == [], "one reply each, then the room waits for the moderator"
        heard = list(replies)

        await command(ws, "kick", "TinkerBot")
        left = await next_frame(ws, "system", timeout=30, event="leave")
        assert left["content"].startswith("TinkerBot ")
        await say(ws, "Who is still here? Answer in one sentence.")
        replies = await model_messages(ws, 2, timeout=180)
        assert [r["from"] for r in replies] == ["Zen Sage", "Historian"]
        assert await quiet_then_marker(ws) == []
        heard += replies
        assert client.popen.poll() is None, "the other personas stay when one is kicked"
        await command(ws, "who")
        roster = await next_frame(ws, "roster")
        assert {p["name"] for p in roster["participants"]} == {"Moderator", "Zen Sage", "Historian"}
        await ws.close()
        assert "Traceback" not in client.output
        assert re.search(r"TinkerBot has left the room: You were removed", client.output), client.output
        return heard

    heard = asyncio.run(scenario())
    assert model_lines(transcript) == [(r["from"], r["content"]) for r in heard]


def test_a_cast_file_with_two_models_loads_each_once(tmp_path, start_hub, start_client):
    tiny = build_tiny_model(tmp_path / "tiny")
    path = cast_file(tmp_path, f"""
[[persona]]
name = "Zen Sage"
prompt_file = "sage.txt"

[[persona]]
name = "Tiny"
model = "{tiny}"
max_tokens = 8

[[persona]]
name = "TinkerBot"
prompt_file = "inventor.txt"
""")
    _, url = start_hub()
    client = start_client("--cast", str(path), "--server", url)
    for name in ("Zen Sage", "Tiny", "TinkerBot"):
        client.wait_for_output(f"{name} joined ws://", 240)
    loads = re.findall(r"Loading (.+?) for (.+)", client.output)
    assert len(loads) == 2, client.output
    assert sorted(len(names.split(",")) for _, names in loads) == [1, 2], loads


def test_the_shipped_casts_are_valid():
    demo = read_cast_file(ROOT / "casts" / "demo.toml", BASE)
    assert [p.name for p in demo] == ["Zen Sage", "TinkerBot"]
    panel = read_cast_file(ROOT / "casts" / "panel.toml", BASE)
    assert len(panel) == 7 and len({p.name for p in panel}) == 7
    assert all(p.system_prompt.startswith(f"You are {p.name}") for p in panel)


@pytest.mark.parametrize(("text", "phrases"), [
    ("[[persona]]\nname = 'A'\ntemperature = 'hot'\n", ["persona 1 ('A')", "field 'temperature'", "a number"]),
    ("[[persona]]\nname = 'A'\n[[persona]]\nname = 'B'\nmax_tokens = 0\n", ["persona 2 ('B')", "'max_tokens'"]),
    ("[[persona]]\nname = 'A'\ntemprature = 0.5\n", ["persona 1 ('A')", "unknown field 'temprature'"]),
    ("[[persona]]\nprompt_file = 'sage.txt'\n", ["persona 1", "field 'name'"]),
    ("[[persona]]\nname = 'A'\n[[persona]]\nname = 'a'\n", ["persona 2 ('a')", "persona 1 already has that name"]),
    ("[[persona]]\nname = 'A'\nprompt_file = 'nobody.txt'\n", ["field 'prompt_file'", "nobody.txt"]),
    ("[[persona]]\nname = 'A'\nengine = 'warp'\n", ["field 'engine'", "transformers"]),
    ("[[persona]]\nname = 'A'\nretries = 11\n", ["field 'retries'", "from 0 to 10"]),
    ("[[persona]\nname = 'A'\n", ["not valid TOML"]),
    ("title = 'x'\n", ["unknown key 'title'"]),
    ("", ["no [[persona]] tables"]),
])
def test_bad_cast_entries_name_the_file_the_entry_and_the_field(tmp_path, text, phrases):
    path = cast_file(tmp_path, text)
    with pytest.raises(CastError) as caught:
        read_cast_file(path, BASE)
    message = str(caught.value)
    assert str(path) in message
    for phrase in phrases:
        assert phrase in message, message


def test_prompt_files_are_found_next_to_the_cast_file_first(tmp_path):
    (tmp_path / "sage.txt").write_text("You are a local sage.", encoding="utf-8")
    path = cast_file(tmp_path, "[[persona]]\nname = 'A'\nprompt_file = 'sage.txt'\ntemperature = 0\n")
    [persona] = read_cast_file(path, BASE)
    assert persona.system_prompt == "You are a local sage." and persona.temperature == 0.0


def test_client_refuses_a_bad_cast_in_one_sentence_before_loading_anything(tmp_path):
    path = cast_file(tmp_path, "[[persona]]\nname = 'A'\ndelay = -1\n")
    result = subprocess.run([sys.executable, script("client.py"), "--cast", str(path), "--model", "/no/such.gguf"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "field 'delay'" in result.stderr, result.stderr


def test_a_cast_persona_on_the_openai_engine_without_a_server_is_one_sentence(tmp_path):
    path = cast_file(tmp_path, "[[persona]]\nname = 'Remote'\nengine = 'openai'\n")
    result = subprocess.run([sys.executable, script("client.py"), "--cast", str(path)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stderr
    assert "'Remote'" in result.stderr and "--api-base" in result.stderr and "Traceback" not in result.stderr


def test_persona_flags_need_a_name_and_no_duplicates(tmp_path):
    for args, phrase in ((["--persona", "=sage.txt"], "NAME=PROMPT_FILE"),
                         (["--persona", "A=sage.txt", "--persona", "a=inventor.txt"], "twice"),
                         ([], "--name")):
        result = subprocess.run([sys.executable, script("client.py"), *args], cwd=tmp_path, capture_output=True,
                                text=True,
                                timeout=120, stdin=subprocess.DEVNULL)
        assert result.returncode == 2, result.stderr
        assert phrase in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_personas_on_one_model_generate_one_at_a_time_and_say_when_they_wait(tmp_path, start_hub, start_client):
    """In free mode both personas get the turn at once: the second waits for the first, and logs it.

    The client's debug log marks where each persona starts and stops using the model; one process writes
    them in order, so two generations that overlapped would show as a start between another's start and end.
    """
    tiny = build_tiny_model(tmp_path / "tiny")  # never stops on its own: each reply runs to max tokens
    _, url = start_hub("--mode", "free")
    client = start_client("--persona", "Alpha", "--persona", "Beta", "--model", str(tiny), "--server", url,
                          "--max-generation-tokens", "300", "--no-stream", "--log-level", "DEBUG")
    client.wait_for_output("Beta joined ws://", 240)

    async def scenario() -> None:
        ws, _ = await join(url, "Moderator", "human", protocol=1)
        await say(ws, "Both of you, talk.")
        await next_frame(ws, "turn", timeout=60, speakers=["Alpha", "Beta"])
        await asyncio.to_thread(client.wait_for_output, r"(Alpha waits: Beta|Beta waits: Alpha) is still writing", 120)
        for name in ("Alpha", "Beta"):
            await asyncio.to_thread(client.wait_for_output, rf"{name} is done writing on", 300)
        await ws.close()

    asyncio.run(scenario())
    assert client.output.count("Loading ") == 1
    uses = re.findall(r"(Alpha|Beta) (writes|is done writing) on", client.output)
    assert {name for name, _ in uses} == {"Alpha", "Beta"}
    for n, (name, event) in enumerate(uses):  # start, end, start, end, ...: each use ends before the next starts
        expected = ("writes", name) if n % 2 == 0 else ("is done writing", uses[n - 1][0])
        assert (event, name) == expected, f"generations overlapped: {uses}"
