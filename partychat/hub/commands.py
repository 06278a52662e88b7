"""Moderator commands. Only moderators may use them.

The hub dispatches a command frame here with the room; a command changes the room only through
what ``Room`` exposes, so the import arrow runs one way: commands -> room.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from ..export import transcript_markdown
from ..protocol import Archive, Command, ErrorCode, ProtocolError, Role, Roster, listed_commands, participant_label
from .floor import Mode
from .members import Peer
from .recipients import Recipients
from .room import Room

Handler = Callable[[Room, Peer, tuple[str, ...]], None]
MAX_TURNS = 1000


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
    participants = tuple(_describe(room, p) for p in room.members)
    floor = room.floor_state().to_wire()
    del floor["type"]
    roster = Roster(participants=participants, floor={**floor, "max_turns": room.floor.budget},
                    spectators=len(room.spectators))
    room.deliver(peer, replace(roster, content=describe_roster(roster)))


def _describe(room: Room, peer: Peer) -> dict[str, object]:
    """One participant as /who shows it; for a model also its talkativeness and last reported speed."""
    about: dict[str, object] = {"name": peer.name, "role": peer.role.value, "moderator": peer.is_moderator,
                                "muted": peer.muted, "protocol": peer.protocol}
    if peer.role is Role.MODEL:
        about["talkativeness"] = room.floor.talkativeness.get(peer.name)
        about["skipped"] = peer.name in room.floor.skipped
        if peer.speed is not None:
            about.update(peer.speed.to_wire())
        about.update(room.stage_mark(peer))
    return about


def describe_roster(roster: Roster) -> str:
    """The roster in one sentence: what the console and the page show for /who."""
    floor = roster.floor
    people = ", ".join(f"{p.get('name')} ({participant_label(p)})" for p in roster.participants)
    speakers = ", ".join(floor.get("speakers") or []) or "nobody"
    watching = f" {roster.spectators} watching." if roster.spectators else ""
    return (
        f"In the room: {people or 'nobody'}.{watching} Mode {floor.get('mode')}, "
        f"{'paused, ' if floor.get('paused') else ''}turn: {speakers}, "
        f"{floor.get('turns_left')} of {floor.get('max_turns')} model turns left."
    )


def _history(room: Room, peer: Peer, args: tuple[str, ...]) -> None:
    messages = tuple(room.visible_to(peer, room.messages))
    room.deliver(peer, Archive(messages=messages, markdown=transcript_markdown(messages)))


def _pause(room: Room, peer: Peer, args: tuple[str, ...]) -> None:
    room.floor.pause()
    room.announce("pause", f"{peer.name} paused the room.")


def _resume(room: Room, peer: Peer, args: tuple[str, ...]) -> None:
    room.floor.resume()
    room.announce("resume", f"{peer.name} resumed the room.")


def _stop(room: Room, peer: Peer, args: tuple[str, ...]) -> None:
    room.stop_replies(peer)


def _retry(room: Room, peer: Peer, args: tuple[str, ...]) -> None:
    room.ask_again(peer, " ".join(args) or None)


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
    if len(args) != 1 or not (args[0].isascii() and args[0].isdigit()) or int(args[0]) > MAX_TURNS:
        raise _bad(f"Usage: /turns N, where N is a whole number from 0 (the models stay quiet) to {MAX_TURNS}.")
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
            if not message:
                raise _bad("Usage: /to NAME message (the message is missing).")
            room.post(peer, message, addressed=name)
            return
    name, _ = _persona_and_text(room, args, "to NAME message")  # a clearer sentence for an unknown name
    if room.stage.is_on(name):
        raise _bad(f"{name} is not connected now.")
    raise _bad(f"{name} is off stage; bring it on with /enter {name} first.")


def _persona_and_text(room: Room, args: tuple[str, ...], usage: str) -> tuple[str, str]:
    """The persona named at the start of ``args`` (a name may hold spaces) and the text after it."""
    if not args:
        raise _bad(f"Usage: /{usage}")
    joined = " ".join(args)
    folded = joined.casefold()
    for name in sorted(room.stage.known(), key=len, reverse=True):
        if folded == name.casefold() or folded.startswith(name.casefold() + " "):
            return name, joined[len(name):].strip()
    for human in room.members:
        if human.role is Role.HUMAN and (folded == human.key or folded.startswith(human.key + " ")):
            raise _bad(f"{human.name} is a human, not a persona; whispers and the stage are for personas.")
    raise _bad(f"No persona called {args[0]!r} has been in the room.")


def _whisper(private: bool) -> Handler:
    """``/whisper NAME text``: like ``/to``, but only NAME and the moderators hear it; ``!`` keeps the reply private."""
    usage = f"whisper{'!' if private else ''} NAME message"

    def handler(room: Room, peer: Peer, args: tuple[str, ...]) -> None:
        name, message = _persona_and_text(room, args, usage)
        if not message:
            raise _bad(f"Usage: /{usage} (the message is missing).")
        target = room.find(name)
        if target is None:
            raise _bad(f"{name} is not connected; nobody would hear the whisper.")
        if not room.stage.is_on(name):
            raise _bad(f"{name} is off stage; bring it on with /enter {name} first.")
        room.post(peer, message, addressed=target.name, recipients=Recipients((target.name,), whisper=True))
        if private:
            room.keep_reply_private(target.name)

    return handler


def _enter(room: Room, peer: Peer, args: tuple[str, ...]) -> None:
    name, line = _persona_and_text(room, args, "enter NAME [entry line]")
    if room.stage.is_on(name):
        raise _bad(f"{name} is already on stage.")
    room.enter([name], peer)
    if line:
        room.post(peer, line)


def _exit(room: Room, peer: Peer, args: tuple[str, ...]) -> None:
    name, line = _persona_and_text(room, args, "exit NAME [exit line]")
    if not room.stage.is_on(name):
        raise _bad(f"{name} is already off stage.")
    room.exit([name], peer)
    if line:  # said as it goes: the one leaving hears it too
        room.post(peer, line, recipients=Recipients((*room.stage.on_stage(), name)))


def _scene(room: Room, peer: Peer, args: tuple[str, ...]) -> None:
    names: list[str] = []
    rest = " ".join(args)
    while rest:
        name, rest = _persona_and_text(room, tuple(rest.split()), "scene NAME...")
        names.append(name)
    if not names:
        raise _bad("Usage: /scene NAME... (the personas on stage from now on; /exit takes the last one off).")
    wanted = {name.casefold() for name in names}
    leaving = [name for name in room.stage.known() if room.stage.is_on(name) and name.casefold() not in wanted]
    entering = [name for name in names if not room.stage.is_on(name)]
    if not leaving and not entering:
        raise _bad("Those personas are on stage already; nothing changed.")
    room.exit(leaving, peer)
    room.enter(entering, peer)


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
    room.dismiss(target, ErrorCode.KICKED.value)


HANDLERS: dict[str, Handler] = {
    "who": _who,
    "pause": _pause,
    "resume": _resume,
    "stop": _stop,
    "retry": _retry,
    "mode": _mode,
    "turns": _turns,
    "to": _to,
    "whisper": _whisper(False),
    "whisper!": _whisper(True),
    "enter": _enter,
    "exit": _exit,
    "scene": _scene,
    "mute": _set_muted(True),
    "unmute": _set_muted(False),
    "kick": _kick,
    "history": _history,
}
"""What each command in ``protocol.COMMANDS`` does; the names and help live there."""


def run_command(room: Room, peer: Peer, command: Command) -> None:
    """Carry out a command or raise a ProtocolError that says why not."""
    if not room.hears(peer):
        return  # removed (kicked, cut off) or the hub is stopping: nothing it sends counts any more
    room.meter(peer)
    if peer.role is not Role.HUMAN or not peer.is_moderator:
        raise ProtocolError(ErrorCode.NOT_MODERATOR, "Only a moderator may use commands.")
    handler = HANDLERS.get(command.name)
    if handler is None:
        listed = ", ".join(f"/{name}" for name in listed_commands())
        raise ProtocolError(ErrorCode.UNKNOWN_COMMAND, f"Unknown command /{command.name}; the hub knows {listed}.")
    handler(room, peer, command.args)
    room.publish_floor()
    room.publish_presence()
