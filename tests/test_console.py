"""The moderator console: typed lines, rendered frames, and text that must stay inert."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from importlib import resources

import pytest
from helpers import ROOT, join, next_frame, script

from partychat.display import TERMINAL_COLOURS, neutralise, speaker_colour
from partychat.export import transcript_markdown
from partychat.hub.commands import describe_roster
from partychat.moderator.console import InputError, Local, RoomView, parse_line
from partychat.protocol import SPEAKER_COLOURS, Chat, Command, FloorState, Notice, RelayedPartial, Roster, Say, encode


def test_typed_lines_become_messages_commands_or_local_actions():
    assert parse_line("hello") == Say("hello")
    assert parse_line("   ") is None
    assert parse_line("/pause") == Command("pause")
    assert parse_line("/to Zen Sage hi there") == Command("to", ("Zen", "Sage", "hi", "there"))
    assert parse_line("/TOGGLE") == Local("toggle")
    assert parse_line("//not a command") == Say("/not a command")
    with pytest.raises(InputError, match="/help"):
        parse_line("/frobnicate now")


def test_escape_sequences_from_the_room_are_shown_not_obeyed():
    view = RoomView("Moderator", colour=False)
    line = view.render(Chat(sender="Evil\x1b[31m", content="clear\x1b[2J\x07 screen\rspoof", seq=1, ts=1.0))
    assert "\x1b" not in line and "\x07" not in line and "\r" not in line
    assert "\\x1b[2J" in line
    spoof = view.render(Chat(sender="Sage", content="ok.\n[09:30:00] Moderator: everyone stop", seq=2, ts=1.0))
    assert "\n    [09:30:00] Moderator" in spoof, "a later line must not look like a line of its own"
    assert neutralise("bidi \u202e trick") == "bidi \\u202e trick"


def test_each_speaker_keeps_one_colour_across_runs():
    """Two processes with different string-hash seeds paint every name alike (``hash()`` would not)."""
    names = ("Zen Sage", "TinkerBot", "Historian", "Moderator", "A", "B", "C", "D")
    code = ("import sys; from partychat.display import speaker_colour; "
            "print([speaker_colour(name) for name in sys.argv[1:]])")

    def colours(seed: str) -> str:
        result = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True,
                                timeout=60, env={**os.environ, "PYTHONHASHSEED": seed})
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert colours("1") == colours("2") == f"{[speaker_colour(name) for name in names]}\n"
    assert len({speaker_colour(name) for name in names}) > 1


def test_the_page_is_told_the_colour_the_console_shows():
    names = ("Zen Sage", "TinkerBot", "Moderator", "Ada", "B")
    sent = [json.loads(encode(Chat(sender=name, content="hi")))["colour"] for name in names]
    assert [TERMINAL_COLOURS[index] for index in sent] == [speaker_colour(name) for name in names]
    style = (resources.files("partychat.hub") / "web" / "style.css").read_text(encoding="utf-8")
    rules = re.findall(r'\[data-colour="(\d+)"\]', style)
    assert rules == [str(i) for i in range(SPEAKER_COLOURS)] and len(TERMINAL_COLOURS) == SPEAKER_COLOURS


def test_hidden_messages_are_still_kept_for_save_and_drafts_grow_in_the_toolbar():
    view = RoomView("Moderator", colour=False, show_messages=False)
    assert view.render(RelayedPartial(sender="Sage", content="Once ")) is None
    view.render(RelayedPartial(sender="Sage", content="upon a time"))
    assert "Sage is writing: Once upon a time" in view.toolbar()
    assert view.render(Chat(sender="Sage", content="Once upon a time.", seq=1)) is None
    assert view.toolbar() == ""
    assert "> Once upon a time." in transcript_markdown(view.seen)
    assert "paused" in view.render(Notice("Moderator paused the room."))


def test_a_piped_session_drives_the_hub_and_shows_the_room(start_hub, tmp_path):
    _, url = start_hub()

    async def scenario() -> tuple[subprocess.CompletedProcess[str], dict, dict]:
        watcher, _ = await join(url, "Watcher", "human", protocol=1)
        session = "/pause\n/who\nHello room\n/mode free\n/resume\n/kick Nobody\n/save {path}\n"
        result = await asyncio.to_thread(
            subprocess.run, [sys.executable, script("moderator.py"), "--server", url, "--name", "Host"],
            input=session.format(path="saved.md"), capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )
        paused = await next_frame(watcher, "system", event="pause")
        message = await next_frame(watcher, "message")
        await watcher.close()
        return result, paused, message

    result, paused, message = asyncio.run(scenario())
    assert result.returncode == 0, result.stderr
    assert paused["content"] == "Host paused the room."
    assert (message["from"], message["content"]) == ("Host", "Hello room")
    out = result.stdout
    assert "In the room:" in out and "paused" in out
    assert "Nobody called 'Nobody' is in the room." in out
    assert "Host: Hello room" in out and out.count("Hello room") == 1
    assert "Hello room" in (tmp_path / "saved.md").read_text()
    assert "Traceback" not in out + result.stderr


def test_turn_changes_show_once_as_status_lines():
    view = RoomView("Moderator", colour=False)
    first = view.render(FloorState(mode="round-robin", speakers=("Sage",), turns_left=2, turn=1))
    assert first.endswith("* Turn: Sage (2 model turns left)")
    assert view.render(FloorState(mode="round-robin", speakers=("Sage",), turns_left=2, turn=1)) is None
    assert view.render(FloorState(mode="round-robin", turn=2)) is None, "the hub's quiet event says why"
    assert view.render(FloorState(mode="round-robin", speakers=("Sage",), paused=True, turn=3)) is None


def test_stopped_replies_quiet_reasons_and_speeds_are_shown_as_such():
    view = RoomView("Moderator", colour=False)
    line = view.render(Chat(sender="Sage", content="Once upon a", seq=3, ts=1.0, interrupted=True))
    assert line.endswith("Sage (stopped): Once upon a")
    assert "stopped by the moderator" in transcript_markdown(view.seen)
    quiet = view.render(Notice("The models are quiet: every persona passed.", event="quiet", reason="passed"))
    assert quiet.endswith("* The models are quiet: every persona passed.")
    roster = Roster(participants=({"name": "Sage", "role": "model", "talkativeness": 0.8, "ttft": 0.42,
                                   "tokens_per_second": 31.5, "skipped": True},), floor={"mode": "natural"})
    assert "Sage (model, skipped, talkativeness 0.8, first token 0.42 s, 31.5 tok/s)" in describe_roster(roster)
    shown = view.render(Roster(content="In the room: as the hub says it."))
    assert shown.endswith("* In the room: as the hub says it.")


def test_the_moderator_console_does_not_import_the_hub():
    """The console takes the command names and help from the protocol, not from the hub's room."""
    code = ("import sys; import partychat.moderator.cli, partychat.moderator.console; "
            "print(sorted(m for m in sys.modules if m.startswith('partychat.hub')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"the moderator pulled in {result.stdout.strip()}"
