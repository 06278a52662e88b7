"""Moderator commands, carried out by the hub. Only moderators may use them."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from websockets.frames import CloseCode

from .floor import Mode
from .protocol import Command, ErrorCode, ProtocolError, Role, Roster

if TYPE_CHECKING:
    from .room import Peer, Room

Handler = Callable[["Room", "Peer", tuple[str, ...]], None]


def _bad(sentence: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_ARGUMENT, sentence)


def _one_name(room: Room, args: tuple[str, ...], usage: str) -> Peer:
    if not args:
        raise _bad(f"Usage: /{usage} NAME")
    name = " ".join(args)
    target = room.find(name)
    if target is None:
        raise _bad(f"Nobody called {name!r} is in the room.")
    return target


def _who(room: Room, peer: Peer, args: tuple[str, ...]) -> None:
    floor = room.floor
    participants = tuple(
        {
            "name": p.name,
            "role": p.role.value,
            "moderator": p.is_moderator,
            "muted": p.muted,
            "protocol": p.protocol,
        }
        for p in room.peers.values()
    )
    room.deliver(
        peer,
        Roster(
            participants=participants,
            floor={
                "mode": floor.mode.value,
                "speakers": list(floor.speakers()),
                "turns_left": max(floor.turns_left, 0),
                "max_turns": floor.budget,
                "paused": floor.paused,
            },
        ),
    )


def _pause(room: Room, peer: Peer, args: tuple[str, ...]) -> None:
    room.floor.pause()
    room.announce("pause", f"{peer.name} paused the room.")


def _resume(room: Room, peer: Peer, args: tuple[str, ...]) -> None:
    room.floor.resume()
    room.announce("resume", f"{peer.name} resumed the room.")


def _mode(room: Room, peer: Peer, args: tuple[str, ...]) -> None:
    names = ", ".join(mode.value for mode in Mode)
    if len(args) != 1:
        raise _bad(f"Usage: /mode NAME, where NAME is one of {names}.")
    try:
        mode = Mode(args[0].lower())
    except ValueError:
        raise _bad(f"Unknown mode {args[0]!r}; choose one of {names}.") from None
    room.floor.set_mode(mode)
    room.announce("mode", f"{peer.name} set the floor mode to {mode.value}.")


def _turns(room: Room, peer: Peer, args: tuple[str, ...]) -> None:
    if len(args) != 1 or not args[0].isdigit():
        raise _bad("Usage: /turns N, where N is a whole number (0 stops the models).")
    room.floor.set_max_turns(int(args[0]))
    room.announce("turns", f"{peer.name} set the turn budget to {int(args[0])} per moderator message.")


def _to(room: Room, peer: Peer, args: tuple[str, ...]) -> None:
    if len(args) < 2:
        raise _bad("Usage: /to NAME message")
    models = sorted(room.floor.models, key=len, reverse=True)
    joined = " ".join(args)
    for name in models:
        if joined.casefold().startswith(name.casefold() + " "):
            message = joined[len(name):].strip()
            room.post(peer, message, addressed=name)
            return
    raise _bad(f"No model called {args[0]!r} is in the room.")


def _set_muted(muted: bool) -> Handler:
    def handler(room: Room, peer: Peer, args: tuple[str, ...]) -> None:
        target = _one_name(room, args, "mute" if muted else "unmute")
        target.muted = muted
        verb = "muted" if muted else "unmuted"
        room.announce(verb, f"{peer.name} {verb} {target.name}.")

    return handler


def _kick(room: Room, peer: Peer, args: tuple[str, ...]) -> None:
    target = _one_name(room, args, "kick")
    if target is peer:
        raise _bad("You cannot kick yourself; use /quit to leave.")
    room.refuse(target, ErrorCode.KICKED, f"You were removed from the room by {peer.name}.")
    room.remove(target, f"was removed by {peer.name}")
    room.close_later(target, CloseCode.POLICY_VIOLATION, "kicked")


COMMANDS: dict[str, Handler] = {
    "who": _who,
    "pause": _pause,
    "resume": _resume,
    "mode": _mode,
    "turns": _turns,
    "to": _to,
    "mute": _set_muted(True),
    "unmute": _set_muted(False),
    "kick": _kick,
}


def run_command(room: Room, peer: Peer, command: Command) -> None:
    """Carry out a command or raise a ProtocolError that says why not."""
    if peer.role is not Role.HUMAN or not peer.is_moderator:
        raise ProtocolError(ErrorCode.NOT_MODERATOR, "Only a moderator may use commands.")
    handler = COMMANDS.get(command.name)
    if handler is None:
        raise ProtocolError(
            ErrorCode.UNKNOWN_COMMAND,
            f"Unknown command /{command.name}; the hub knows " + ", ".join(f"/{c}" for c in COMMANDS) + ".",
        )
    handler(room, peer, command.args)
    room.publish_floor()
