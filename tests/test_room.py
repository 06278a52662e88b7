"""The room without sockets, files or an event loop: what it hands to its outlet, and what it imports.

The hub's own tests drive the room through real connections; these check the seam itself, with an
outlet that keeps what the room asks for instead of writing it to a network, a clock the test
moves by hand, and a transcript kept in memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace

from helpers import ROOT

from partychat.hub.commands import HANDLERS, run_command
from partychat.hub.floor import Mode
from partychat.hub.members import Peer
from partychat.hub.record import MemoryRecorder, SavedRoom
from partychat.hub.room import SPECTATOR_COUNT_PERIOD, Room
from partychat.hub.settings import RoomSettings
from partychat.hub.transcript import Transcript, load_saved_room, read_records
from partychat.protocol import COMMANDS, Chat, Command, Hello, Partial, Role, Say, Spectate


class Timer:
    def __init__(self, due: float, callback: Callable[[], None]) -> None:
        self.due, self.callback, self.cancelled = due, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class KeptOutlet:
    """An outlet that keeps every request, in order, as the hub's would receive them; its clock moves by hand."""

    def __init__(self) -> None:
        self.sent: list[tuple[list[str], dict]] = []
        self.dismissed: list[tuple[str, str]] = []
        self.now = 0.0
        self.timers: list[Timer] = []

    def send(self, peers: Sequence[Peer], text: str) -> None:
        self.sent.append(([peer.name for peer in peers], json.loads(text)))

    def dismiss(self, peer: Peer, reason: str) -> None:
        self.dismissed.append((peer.name, reason))

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(self.now + delay, callback)
        self.timers.append(timer)
        return timer

    def advance(self, seconds: float) -> None:
        """Let time pass: the timers that fall due meanwhile fire, in order."""
        self.now += seconds
        while due := sorted((t for t in self.timers if not t.cancelled and t.due <= self.now), key=lambda t: t.due):
            due[0].cancelled = True
            due[0].callback()


def in_a_room(scenario, **settings) -> tuple[KeptOutlet, MemoryRecorder]:
    """Run ``scenario(room, outlet)`` with a kept outlet and a transcript in memory; no event loop."""
    outlet, recorder = KeptOutlet(), MemoryRecorder()
    room = Room(RoomSettings(rate_per_second=0, **settings), recorder, outlet)
    scenario(room, outlet)
    room.shut_down()
    room.close()
    return outlet, recorder


def test_a_message_goes_to_the_outlet_once_with_all_its_recipients():
    def scenario(room: Room, outlet: KeptOutlet) -> None:
        host = room.admit(Hello("Host", Role.HUMAN, protocol=1), link="host-link")
        room.admit(Hello("Old Listener", Role.HUMAN), link="old-link")
        room.admit(Hello("Sage", Role.MODEL, protocol=1), link="sage-link")
        room.receive(host, Say("Hello room"))

    outlet, recorder = in_a_room(scenario)
    relayed = [(to, frame) for to, frame in outlet.sent if frame["type"] == "message"]
    assert len(relayed) == 1, "one frame for everybody, not one per peer"
    recipients, frame = relayed[0]
    # the sender speaks the extensions, so it gets its own message back with its number
    assert sorted(recipients) == ["Host", "Old Listener", "Sage"]
    assert (frame["from"], frame["content"], frame["seq"]) == ("Host", "Hello room", 1)
    stored = [r.data for r in recorder.records if r.kind == "message"]
    assert [(m["from"], m["content"]) for m in stored] == [("Host", "Hello room")]
    assert outlet.dismissed == []


def test_a_kicked_peer_is_told_why_then_dismissed_and_hears_nothing_more():
    def scenario(room: Room, outlet: KeptOutlet) -> None:
        host = room.admit(Hello("Host", Role.HUMAN, protocol=1), link="host-link")
        room.admit(Hello("Pest", Role.HUMAN, protocol=1), link="pest-link")
        run_command(room, host, Command("kick", ("Pest",)))
        room.receive(host, Say("Better now"))

    outlet, _ = in_a_room(scenario)
    told = [frame for to, frame in outlet.sent if to == ["Pest"] and frame["type"] == "error"]
    assert told and told[-1]["code"] == "kicked"
    assert outlet.dismissed == [("Pest", "kicked")]
    after_kick = outlet.sent[outlet.sent.index((["Pest"], told[-1])) + 1:]
    relayed = [(to, frame["content"]) for to, frame in after_kick if frame["type"] == "message"]
    assert relayed == [(["Host"], "Better now")], "the message after the kick reaches the room, not Pest"
    assert all("Pest" not in to for to, _ in after_kick)


def test_a_silent_turn_holder_is_skipped_on_the_room_clock_without_an_event_loop():
    def scenario(room: Room, outlet: KeptOutlet) -> None:
        host = room.admit(Hello("Host", Role.HUMAN, protocol=1), link="host-link")
        room.admit(Hello("Sage", Role.MODEL, protocol=1), link="sage-link")
        room.admit(Hello("Quill", Role.MODEL, protocol=1), link="quill-link")
        room.receive(host, Say("Who starts?"))
        outlet.advance(4.9)
        assert not any(frame.get("event") == "skip" for _, frame in outlet.sent), "not before the timeout"
        outlet.advance(0.2)

    outlet, recorder = in_a_room(scenario, mode=Mode.ROUND_ROBIN, first_token_timeout=5.0)
    skipped = [frame for _, frame in outlet.sent if frame.get("event") == "skip"]
    assert len(skipped) == 1 and skipped[0]["content"].startswith("Sage sent nothing for 5 s")
    turns = [frame["speakers"] for _, frame in outlet.sent if frame["type"] == "turn"]
    assert turns[-1] == ["Quill"], "the turn moved on to the next model"
    assert "skip" in [r.data.get("event") for r in recorder.records if r.kind == "event"]


def test_a_model_that_has_started_streaming_is_not_skipped():
    def scenario(room: Room, outlet: KeptOutlet) -> None:
        host = room.admit(Hello("Host", Role.HUMAN, protocol=1), link="host-link")
        sage = room.admit(Hello("Sage", Role.MODEL, protocol=1), link="sage-link")
        room.receive(host, Say("Go on"))
        room.receive(sage, Partial(""))
        outlet.advance(60)

    outlet, _ = in_a_room(scenario, mode=Mode.ROUND_ROBIN, first_token_timeout=5.0, turn_timeout=0)
    assert not any(frame.get("event") in ("skip", "pass") for _, frame in outlet.sent)


def test_spectators_coming_and_going_are_counted_once_a_period_later():
    def scenario(room: Room, outlet: KeptOutlet) -> None:
        room.admit(Hello("Host", Role.HUMAN, protocol=1, stream=True), link="host-link")
        for n in range(3):
            room.watch(Spectate(), link=f"page-{n}")
        counts = [frame["spectators"] for to, frame in outlet.sent if "Host" in to and frame["type"] == "presence"]
        assert counts == [0], "a join storm is not told frame by frame"
        outlet.advance(SPECTATOR_COUNT_PERIOD)

    outlet, _ = in_a_room(scenario)
    counts = [frame["spectators"] for to, frame in outlet.sent if "Host" in to and frame["type"] == "presence"]
    assert counts == [0, 3]


def test_the_hub_renders_who_and_the_saved_markdown_once_for_the_page_and_the_console():
    def scenario(room: Room, outlet: KeptOutlet) -> None:
        host = room.admit(Hello("Host", Role.HUMAN, protocol=1), link="host-link")
        sage = room.admit(Hello("Sage", Role.MODEL, protocol=1, talkativeness=0.8), link="sage-link")
        room.receive(host, Say("Tell a story"))
        room.receive(sage, Partial("Once upon a"))
        run_command(room, host, Command("stop"))
        run_command(room, host, Command("who"))
        run_command(room, host, Command("history"))

    outlet, _ = in_a_room(scenario)
    roster = next(frame for to, frame in outlet.sent if frame["type"] == "roster")
    assert "Sage (model, talkativeness 0.8)" in roster["content"]
    markdown = next(frame for to, frame in outlet.sent if frame["type"] == "history")["markdown"]
    assert "**Sage** (model, " in markdown and "stopped by the moderator):" in markdown
    assert "> Once upon a" in markdown and " UTC" in markdown


def test_the_hub_words_each_participant_the_turn_and_a_whisper_so_the_page_only_shows_them():
    def scenario(room: Room, outlet: KeptOutlet) -> None:
        host = room.admit(Hello("Host", Role.HUMAN, protocol=1, stream=True), link="host-link")
        room.admit(Hello("Sage", Role.MODEL, protocol=1), link="sage-link")
        room.admit(Hello("Quill", Role.MODEL, protocol=1), link="quill-link")
        run_command(room, host, Command("mute", ("Quill",)))
        run_command(room, host, Command("whisper", ("Sage", "just", "you")))
        run_command(room, host, Command("who"))
        run_command(room, host, Command("pause"))

    outlet, _ = in_a_room(scenario)
    to_host = [frame for to, frame in outlet.sent if "Host" in to]
    rows = [frame["participants"] for frame in to_host if frame["type"] == "presence"][-1]
    assert [(row["name"], row["label"]) for row in rows] == [
        ("Host", "human, moderator"), ("Sage", "model"), ("Quill", "model, muted")]
    roster = next(frame["content"] for frame in to_host if frame["type"] == "roster")
    assert "Host (human, moderator), Sage (model" in roster and "Quill (model, muted" in roster, "the same words"
    holders = [frame["holder"] for frame in to_host if frame["type"] == "turn"]
    assert "Sage" in holders and holders[-1] == "nobody (paused)"
    whisper = next(frame for frame in to_host if frame["type"] == "message" and frame.get("whisper"))
    assert whisper["whispered_to"] == "Sage"


def test_a_message_comes_back_from_the_transcript_file_as_it_was_relayed(tmp_path):
    chat = Chat(sender="Sage", content="Once\nupon a", seq=3, id="abc", ts=12.5, role="model", interrupted=True,
                nonce="n1")
    transcript = Transcript(tmp_path / "t.jsonl")
    transcript.start("room-1")
    transcript.message(replace(chat, replay=True))
    transcript.close()
    assert load_saved_room(tmp_path / "t.jsonl") == SavedRoom(room_id="room-1", messages=[chat])
    stored = read_records(tmp_path / "t.jsonl")[1].data
    assert stored == {"from": "Sage", "content": "Once\nupon a", "id": "abc", "seq": 3, "ts": 12.5, "role": "model",
                      "interrupted": True, "nonce": "n1"}, "the record has the message frame's own fields"


IO_MODULES = {"partychat.hub.server", "partychat.hub.pages", "partychat.hub.cli", "partychat.hub.transcript",
              "partychat.hub.__main__"}
"""The hub's modules that do I/O; every other module of partychat.hub is the room's core."""


def test_the_room_and_its_rules_do_not_import_websockets_or_asyncio():
    code = ("import importlib, pkgutil, sys, partychat.hub; "
            f"io = {sorted(IO_MODULES)!r}; "
            "core = [m.name for m in pkgutil.iter_modules(partychat.hub.__path__, 'partychat.hub.')] + "
            "['partychat.protocol', 'partychat.guards']; "
            "[importlib.import_module(name) for name in core if name not in io]; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('websockets', 'asyncio')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"the sans-I/O core pulled in {result.stdout.strip()}"


def test_every_command_the_protocol_names_is_one_the_hub_carries_out():
    assert set(HANDLERS) == set(COMMANDS)
