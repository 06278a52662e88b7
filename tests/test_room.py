"""The room without sockets: what it hands to its outlet, and that it never imports websockets.

The hub's own tests drive the room through real connections; these check the seam itself, with an
outlet that keeps what the room asks for instead of writing it to a network.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from helpers import ROOT

from partychat.hub.commands import run_command
from partychat.hub.members import Peer
from partychat.hub.room import Room
from partychat.hub.settings import RoomSettings
from partychat.hub.transcript import Transcript, read_records
from partychat.protocol import Command, Hello, Role, Say


class KeptOutlet:
    """An outlet that keeps every request, in order, as the hub's would receive them."""

    def __init__(self) -> None:
        self.sent: list[tuple[list[str], dict]] = []
        self.dismissed: list[tuple[str, str]] = []

    def send(self, peers: Sequence[Peer], text: str) -> None:
        self.sent.append(([peer.name for peer in peers], json.loads(text)))

    def dismiss(self, peer: Peer, reason: str) -> None:
        self.dismissed.append((peer.name, reason))


def in_a_room(tmp_path: Path, scenario) -> tuple[KeptOutlet, Path]:
    """Run ``scenario(room)`` inside an event loop (the turn timer needs one), with a kept outlet."""
    outlet, path = KeptOutlet(), tmp_path / "transcript.jsonl"

    async def main() -> None:
        room = Room(RoomSettings(rate_per_second=0), Transcript(path), outlet)
        scenario(room)
        room.stop()
        room.close()

    asyncio.run(main())
    return outlet, path


def test_a_message_goes_to_the_outlet_once_with_all_its_recipients(tmp_path):
    def scenario(room: Room) -> None:
        host = room.admit(Hello("Host", Role.HUMAN, protocol=1), link="host-link")
        room.admit(Hello("Old Listener", Role.HUMAN), link="old-link")
        room.admit(Hello("Sage", Role.MODEL, protocol=1), link="sage-link")
        room.receive(host, Say("Hello room"))

    outlet, path = in_a_room(tmp_path, scenario)
    relayed = [(to, frame) for to, frame in outlet.sent if frame["type"] == "message"]
    assert len(relayed) == 1, "one frame for everybody, not one per peer"
    recipients, frame = relayed[0]
    # the sender speaks the extensions, so it gets its own message back with its number
    assert sorted(recipients) == ["Host", "Old Listener", "Sage"]
    assert (frame["from"], frame["content"], frame["seq"]) == ("Host", "Hello room", 1)
    stored = [r.data for r in read_records(path) if r.kind == "message"]
    assert [(m["from"], m["content"]) for m in stored] == [("Host", "Hello room")]
    assert outlet.dismissed == []


def test_a_kicked_peer_is_told_why_then_dismissed_and_hears_nothing_more(tmp_path):
    def scenario(room: Room) -> None:
        host = room.admit(Hello("Host", Role.HUMAN, protocol=1), link="host-link")
        room.admit(Hello("Pest", Role.HUMAN, protocol=1), link="pest-link")
        run_command(room, host, Command("kick", ("Pest",)))
        room.receive(host, Say("Better now"))

    outlet, _ = in_a_room(tmp_path, scenario)
    told = [frame for to, frame in outlet.sent if to == ["Pest"] and frame["type"] == "error"]
    assert told and told[-1]["code"] == "kicked"
    assert outlet.dismissed == [("Pest", "kicked")]
    after_kick = outlet.sent[outlet.sent.index((["Pest"], told[-1])) + 1:]
    relayed = [(to, frame["content"]) for to, frame in after_kick if frame["type"] == "message"]
    assert relayed == [(["Host"], "Better now")], "the message after the kick reaches the room, not Pest"
    assert all("Pest" not in to for to, _ in after_kick)


def test_the_room_and_its_rules_do_not_import_websockets():
    code = ("import sys; import partychat.hub.room, partychat.hub.commands, partychat.hub.floor, "
            "partychat.hub.members, partychat.hub.history, partychat.protocol, partychat.hub.transcript, "
            "partychat.hub.settings; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'websockets'))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"the sans-I/O core pulled in {result.stdout.strip()}"
