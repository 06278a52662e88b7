"""The wire protocol: every frame that crosses a socket is parsed, validated and encoded here.

The baseline (what the original project's clients speak) is kept field for field; everything
else is an extension that only clients announcing ``protocol`` in their first frame receive.
See docs/PROTOCOL.md for the prose version of this module.
"""

from __future__ import annotations

import json
import math
import unicodedata
import zlib
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

PROTOCOL_VERSION = 1
MAX_NAME_LENGTH = 40
MAX_NONCE_LENGTH = 64
MAX_REASON_LENGTH = 40
"""A discard's reason is a short code such as ``repeat``."""
DEFAULT_MAX_MESSAGE_BYTES = 32 * 1024


SPEAKER_COLOURS = 8
"""How many speaker colours there are: the console's terminal palette and the page's style sheet each have this many."""


def speaker_colour_index(name: str) -> int:
    """The colour a speaker is shown in, as an index: the same name gets the same one everywhere, every run.

    The hub sends it with each message, partial and participant, so the page only applies it; the
    console picks it here too, and reaches the same index even on a baseline hub that sends none.
    """
    return zlib.crc32(name.encode("utf-8")) % SPEAKER_COLOURS


class Role(str, Enum):
    MODEL = "model"
    HUMAN = "human"


class ErrorCode(str, Enum):
    """Machine-readable reasons the hub gives when it refuses something."""

    BAD_JSON = "bad_json"
    BINARY_FRAME = "binary_frame"
    BAD_FRAME = "bad_frame"
    UNKNOWN_TYPE = "unknown_type"
    TOO_LARGE = "too_large"
    EMPTY = "empty"
    RATE_LIMITED = "rate_limited"
    BAD_NAME = "bad_name"
    NAME_TAKEN = "name_taken"
    ROOM_FULL = "room_full"
    UNAUTHORIZED = "unauthorized"
    NOT_MODERATOR = "not_moderator"
    NOT_YOUR_TURN = "not_your_turn"
    MUTED = "muted"
    UNKNOWN_COMMAND = "unknown_command"
    BAD_ARGUMENT = "bad_argument"
    KICKED = "kicked"
    WATCH_ONLY = "watch_only"
    SHUTTING_DOWN = "shutting_down"
    WITHHELD = "withheld"
    NOTHING_TO_STOP = "nothing_to_stop"
    OFF_STAGE = "off_stage"


RETRY_LATER = frozenset({ErrorCode.SHUTTING_DOWN, ErrorCode.ROOM_FULL})
"""Refusals of a registration that are worth another try after a pause; every other one is final."""
ENDS_CONVERSATION = frozenset({ErrorCode.KICKED})
"""Refusals during a conversation after which a client must not come back."""


class ProtocolError(Exception):
    """A frame the hub will not accept; ``fatal`` ones end the connection."""

    def __init__(self, code: ErrorCode, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal


# ---------------------------------------------------------------- client -> hub


@dataclass(frozen=True)
class Hello:
    """The registration frame. Only ``name`` and ``type`` are baseline."""

    name: str
    role: Role
    protocol: int | None = None
    token: str | None = None
    moderator_token: str | None = None
    last_seq: int | None = None
    stream: bool = False
    session: str | None = None
    """The secret from an earlier welcome: lets a reconnecting client take over its stale slot."""
    talkativeness: float | None = None
    """A model's eagerness to speak, 0 to 1: its weight in natural mode's draw."""
    offstage: bool = False
    """A model asks to start off stage: it can only narrow what it receives, never widen it."""

    def to_wire(self) -> dict[str, Any]:
        frame = {"name": self.name, "type": self.role.value}
        return _with_set_fields(frame, self, "protocol", "token", "moderator_token", "last_seq", "session", "stream",
                                "talkativeness", "offstage")


@dataclass(frozen=True)
class Speed:
    """How fast a model produced its reply, as our clients measure it; shown by ``/who``."""

    ttft: float | None = None
    """Seconds from being given the turn to the first token."""
    tokens_per_second: float | None = None

    def to_wire(self) -> dict[str, Any]:
        return _with_set_fields({}, self, "ttft", "tokens_per_second")


@dataclass(frozen=True)
class Spectate:
    """The registration frame of a spectator: it watches the room and takes no part in it.

    It has no name, because nobody in the room sees it; it always speaks the extensions and
    streams, because a page that watches wants the replies as they grow.
    """

    protocol: int = PROTOCOL_VERSION
    token: str | None = None
    last_seq: int | None = None

    def to_wire(self) -> dict[str, Any]:
        return _with_set_fields({"type": "spectator", "protocol": self.protocol}, self, "token", "last_seq")


@dataclass(frozen=True)
class Say:
    """A chat message a participant wants the room to hear."""

    content: str
    opening: bool = False
    turn: int | None = None
    """The turn a model's reply was generated for; a reply for an older turn is withheld."""
    nonce: str | None = None
    """Chosen by the client, echoed back: a line re-sent after a reconnect is relayed only once."""
    speed: Speed | None = None
    replaces: str | None = None
    """A model's new version of its message with this id, written because the hub sent it a ``Redo``."""

    def to_wire(self) -> dict[str, Any]:
        frame = _with_set_fields({"type": "message", "content": self.content}, self, "opening", "turn", "nonce",
                                 "replaces")
        return {**frame, **self.speed.to_wire()} if self.speed else frame


@dataclass(frozen=True)
class Partial:
    """A piece of a reply still being generated (streaming extension); the pieces so far are its draft."""

    content: str

    def to_wire(self) -> dict[str, Any]:
        return {"type": "partial", "content": self.content}


@dataclass(frozen=True)
class Pass:
    """A model gives up its turn without speaking (extension), so the room does not wait on it."""

    reason: str = ""
    turn: int | None = None
    speed: Speed | None = None
    replaces: str | None = None
    """Set when the model gives up writing its message with this id again (a ``Redo``), not a turn."""

    def to_wire(self) -> dict[str, Any]:
        frame = _with_set_fields({"type": "pass", "reason": self.reason}, self, "turn", "replaces")
        return {**frame, **self.speed.to_wire()} if self.speed else frame


@dataclass(frozen=True)
class Discard:
    """A model takes back an attempt at its reply that a guard would withhold, and tries again (extension).

    ``content`` is the whole attempt and ``reason`` the guard's code (``repeat``, ``empty``,
    ``impersonation``): the hub keeps both in the transcript and withdraws what was streamed of it.
    """

    content: str
    reason: str
    turn: int | None = None

    def to_wire(self) -> dict[str, Any]:
        return _with_set_fields({"type": "discard", "content": self.content, "reason": self.reason}, self, "turn")


@dataclass(frozen=True)
class Command:
    """A moderator command such as ``pause`` or ``to Sage hello``."""

    name: str
    args: tuple[str, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {"type": "command", "name": self.name, "args": list(self.args)}


ClientFrame = Say | Partial | Pass | Discard | Command


@dataclass(frozen=True)
class CommandHelp:
    """A moderator command as people see it: its help line, and whether /help lists it."""

    help: str
    listed: bool = True


COMMANDS: dict[str, CommandHelp] = {
    "who": CommandHelp("who is here, their roles, who holds the turn, mode and budget"),
    "pause": CommandHelp("stop the models at once (a reply being generated is dropped)"),
    "resume": CommandHelp("let the models speak again"),
    "stop": CommandHelp("end the reply in progress now, keeping what was said, and move on"),
    "retry": CommandHelp("/retry [NAME]: NAME (or the last model to speak) writes its last reply again"),
    "mode": CommandHelp("/mode round-robin|mention|moderator|free|natural: how turns are given"),
    "turns": CommandHelp("/turns N: model messages allowed after each moderator message"),
    "to": CommandHelp("/to NAME message: hand the turn to one persona with a message"),
    "whisper": CommandHelp("/whisper NAME message: like /to, but only NAME and the moderators hear it"),
    "whisper!": CommandHelp("/whisper! NAME message: a whisper whose reply stays private too"),
    "enter": CommandHelp("/enter NAME [line]: bring a persona on stage; it hears what is said from now on"),
    "exit": CommandHelp("/exit NAME [line]: take a persona off stage; it takes no turns and hears nothing"),
    "scene": CommandHelp("/scene NAME...: exactly these personas are on stage"),
    "mute": CommandHelp("/mute NAME: keep a participant's messages out of the room"),
    "unmute": CommandHelp("/unmute NAME"),
    "kick": CommandHelp("/kick NAME: remove a participant"),
    "history": CommandHelp("the messages the hub holds (what /save writes)", listed=False),
}
"""Every command the hub takes, by name. The hub carries them out (``hub/commands.py``); the console
and the page take the same names and show the same help, without importing the hub."""


def listed_commands() -> dict[str, str]:
    """The commands a moderator types, with their help: /help in the console and on the page."""
    return {name: command.help for name, command in COMMANDS.items() if command.listed}


# ---------------------------------------------------------------- hub -> client


@dataclass(frozen=True)
class Chat:
    """A chat message as the hub relays it; ``sender`` is always the registered name."""

    sender: str
    content: str
    seq: int = 0
    id: str = ""
    ts: float = 0.0
    role: str = Role.MODEL.value
    replay: bool = False
    interrupted: bool = False
    """The moderator stopped this reply (``/stop``); the content is what had been streamed."""
    nonce: str | None = None
    """The sender's own mark for this line, echoed so it knows the line arrived."""
    replaces: str | None = None
    """The id of an earlier message of the same sender that this one replaces (``/retry``)."""
    recipients: tuple[str, ...] | None = None
    """The personas this message went to, decided by the hub when it was said; None: every persona."""
    whisper: bool = False
    """Said privately: of the humans only moderators receive it, spectators only learn that it happened."""

    @property
    def whispered_to(self) -> str:
        """Whom a whisper went to, in words: its recipients but the sender, or else the moderators."""
        others = [name for name in self.recipients or () if name.casefold() != self.sender.casefold()]
        return ", ".join(others) or "the moderators"

    def to_wire(self) -> dict[str, Any]:
        frame = {"type": "message", "from": self.sender, "content": self.content, "id": self.id, "seq": self.seq,
                 "ts": self.ts, "role": self.role, "colour": speaker_colour_index(self.sender)}
        frame = _with_set_fields(frame, self, "replay", "interrupted", "nonce", "whisper", "replaces")
        if self.recipients is not None:
            frame["recipients"] = list(self.recipients)
        if self.whisper:
            frame["whispered_to"] = self.whispered_to  # the page shows these words as they are
        return frame


@dataclass(frozen=True)
class Notice:
    """A baseline ``system`` frame; ``event`` and ``code`` are extension fields."""

    content: str
    event: str | None = None
    code: ErrorCode | str | None = None
    """An ErrorCode; a code this version does not know stays a string."""
    protocol: int | None = None
    room: str | None = None
    """Welcome only: the id of this conversation, which stays the same when a hub resumes it."""
    session: str | None = None
    """Welcome only: a secret that lets this client reclaim its name after a dropped connection."""
    reason: str | None = None
    """Why, as a short code: for ``quiet`` (see floor.Quiet) and for the guards' ``withheld`` and ``cut``."""

    def to_wire(self) -> dict[str, Any]:
        return _with_set_fields({"type": "system", "content": self.content}, self,
                                "event", "code", "protocol", "room", "session", "reason")


@dataclass(frozen=True)
class Refusal:
    """Why the hub refused a frame (extension; baseline clients get a Notice instead)."""

    code: ErrorCode | str
    """An ErrorCode; a code this version does not know stays a string."""
    content: str

    def to_wire(self) -> dict[str, Any]:
        return {"type": "error", "code": self.code, "content": self.content}


@dataclass(frozen=True)
class FloorState:
    """Who may speak now (extension): models generate only when they appear in ``speakers``."""

    mode: str
    speakers: tuple[str, ...] = ()
    turns_left: int = 0
    paused: bool = False
    turn: int = 0

    @property
    def holder(self) -> str:
        """Who may speak now, in words: the page's header shows it as sent, the console's turn line too."""
        if self.paused:
            return "nobody (paused)"
        if not self.speakers:
            return "the moderator"
        return "any model" if len(self.speakers) > 1 else self.speakers[0]

    def to_wire(self) -> dict[str, Any]:
        data = asdict(self)
        data["speakers"] = list(self.speakers)
        return {"type": "turn", **data, "holder": self.holder}


@dataclass(frozen=True)
class RelayedPartial:
    """One ``Partial`` as the hub relays it, with its sender, to the participants that asked for streams."""

    sender: str
    content: str
    turn: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {"type": "partial", "from": self.sender, "content": self.content, "turn": self.turn,
                "colour": speaker_colour_index(self.sender)}


@dataclass(frozen=True)
class Withdrawn:
    """What a model streamed of an attempt it took back (a ``Discard``) is void: clients drop that draft."""

    sender: str
    content: str
    """A sentence for people: whose attempt was withdrawn, and why."""
    reason: str = ""
    turn: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {"type": "withdrawn", "from": self.sender, "content": self.content, "reason": self.reason,
                "turn": self.turn}


@dataclass(frozen=True)
class Redo:
    """Asks a model to write its message ``id`` again (``/retry``), from what was said before it."""

    id: str
    seq: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {"type": "redo", "id": self.id, "seq": self.seq}


@dataclass(frozen=True)
class Roster:
    """Answer to ``/who``: the room as the hub sees it (extension)."""

    participants: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    floor: dict[str, Any] = field(default_factory=dict)
    spectators: int = 0
    """How many watch; spectators are counted, never named."""
    content: str = ""
    """All of it in one sentence, as the console and the page show it (rendered by the hub)."""

    def to_wire(self) -> dict[str, Any]:
        return {"type": "roster", "participants": list(self.participants), "floor": self.floor,
                "spectators": self.spectators, "content": self.content}


@dataclass(frozen=True)
class Archive:
    """The messages the hub holds, sent to a moderator who asked for them (``/save``)."""

    messages: tuple[Chat, ...] = ()
    markdown: str = ""
    """The messages as the Markdown file the console and the page save (see export.py), rendered by the hub."""

    def to_wire(self) -> dict[str, Any]:
        return {"type": "history", "messages": [chat.to_wire() for chat in self.messages], "markdown": self.markdown}


@dataclass(frozen=True)
class Presence:
    """Who is in the room and how many watch (extension), for pages that show it.

    Sent to spectators and streaming humans when they join and whenever a participant comes,
    goes or changes role; a change in the spectator count alone is sent at most once a second.
    """

    participants: tuple[dict[str, Any], ...] = ()
    spectators: int = 0

    def to_wire(self) -> dict[str, Any]:
        """Each participant carries ``label``, its row in the page's list in words, so the page only shows it."""
        participants = [{**about, "label": participant_label(about)} for about in self.participants]
        return {"type": "presence", "participants": participants, "spectators": self.spectators}


def participant_label(about: dict[str, Any]) -> str:
    """One participant's role and state in words: ``/who`` shows it in brackets, the page beside the name.

    ``about`` is a participant as ``presence`` or ``roster`` lists it; the fields only /who carries
    (talkativeness, speed) are named when present.
    """
    details = [str(about.get("role"))]
    details += [flag for flag in ("moderator", "muted", "skipped") if about.get(flag)]
    if "on_stage" in about:
        details.append("on stage" if about["on_stage"] else "off stage")
    for key, label, unit in (("talkativeness", "talkativeness ", ""), ("ttft", "first token ", " s"),
                             ("tokens_per_second", "", " tok/s")):
        value = about.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            details.append(f"{label}{value:g}{unit}")
    return ", ".join(details)


ServerFrame = Chat | Notice | Refusal | FloorState | RelayedPartial | Withdrawn | Redo | Roster | Archive | Presence


def _with_set_fields(frame: dict[str, Any], source: object, *names: str) -> dict[str, Any]:
    """Add the optional fields that are set (not None, not False), so frames carry only what they use."""
    for name in names:
        value = getattr(source, name)
        if value is not None and value is not False:
            frame[name] = value
    return frame


def encode(frame: ClientFrame | ServerFrame | Hello | Spectate) -> str:
    """Serialise a frame to the JSON text sent on the socket."""
    return json.dumps(frame.to_wire(), ensure_ascii=False, separators=(",", ":"))


# ---------------------------------------------------------------- validation


def clean_name(raw: Any) -> str:
    """Return the display name a participant asked for, or raise why it is unusable."""
    if not isinstance(raw, str):
        raise ProtocolError(ErrorCode.BAD_NAME, "The name must be a string.", fatal=True)
    name = " ".join(raw.split())
    if not name:
        raise ProtocolError(ErrorCode.BAD_NAME, "The name is empty.", fatal=True)
    if len(name) > MAX_NAME_LENGTH:
        raise ProtocolError(
            ErrorCode.BAD_NAME, f"The name is longer than {MAX_NAME_LENGTH} characters.", fatal=True
        )
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn") for ch in name):
        raise ProtocolError(
            ErrorCode.BAD_NAME, "The name contains control or invisible characters.", fatal=True
        )
    return name


def _load_object(raw: str | bytes, max_bytes: int) -> dict[str, Any]:
    if isinstance(raw, bytes):
        raise ProtocolError(ErrorCode.BINARY_FRAME, "Frames must be JSON text, not binary.")
    if len(raw.encode("utf-8", "surrogatepass")) > max_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"The frame is larger than {max_bytes} bytes.")
    try:
        data = json.loads(raw)
    except ValueError:
        raise ProtocolError(ErrorCode.BAD_JSON, "The frame is not valid JSON.") from None
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.BAD_FRAME, "The frame must be a JSON object.")
    return data


def _optional(data: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = data.get(key)
    if value is not None and (not isinstance(value, kind) or (isinstance(value, bool) and kind is int)):
        raise ProtocolError(ErrorCode.BAD_FRAME, f"The field {key!r} has the wrong type.")
    return value


def parse_hello(raw: str | bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Hello | Spectate:
    """Validate a registration frame (a participant's or a spectator's). Any problem here is fatal."""
    try:
        data = _load_object(raw, max_bytes)
        last_seq = _optional(data, "last_seq", int)
        if last_seq is not None and last_seq < 0:
            raise ProtocolError(ErrorCode.BAD_FRAME, '"last_seq" cannot be negative.')
        if data.get("type") == "spectator":
            return Spectate(protocol=_optional(data, "protocol", int) or PROTOCOL_VERSION,
                            token=_optional(data, "token", str), last_seq=last_seq)
        if "name" not in data or "type" not in data:
            raise ProtocolError(
                ErrorCode.BAD_FRAME, 'The first frame must carry "name" and "type".'
            )
        try:
            role = Role(data["type"])
        except (ValueError, TypeError):
            raise ProtocolError(ErrorCode.BAD_FRAME,
                                'The "type" of the first frame must be "model" or "human" (or "spectator" to watch).'
                                ) from None
        return Hello(
            name=clean_name(data["name"]),
            role=role,
            protocol=_optional(data, "protocol", int),
            token=_optional(data, "token", str),
            moderator_token=_optional(data, "moderator_token", str),
            last_seq=last_seq,
            stream=bool(_optional(data, "stream", bool)),
            session=_optional(data, "session", str),
            talkativeness=_talkativeness(data),
            offstage=role is Role.MODEL and _optional(data, "offstage", bool) is True,
        )
    except ProtocolError as error:
        error.fatal = True
        raise


def _talkativeness(data: dict[str, Any]) -> float | None:
    value = _optional(data, "talkativeness", (int, float))
    if value is not None and (isinstance(value, bool) or not 0 <= value <= 1):
        raise ProtocolError(ErrorCode.BAD_FRAME, '"talkativeness" must be a number from 0 to 1.')
    return None if value is None else float(value)


def _speed(data: dict[str, Any]) -> Speed | None:
    """A model's reported speed; a value that is not a sane number is left out rather than refusing the reply."""
    values = {}
    for key in ("ttft", "tokens_per_second"):
        value = data.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
            values[key] = round(float(value), 3)
    return Speed(**values) if values else None


def _nonce(data: dict[str, Any]) -> str | None:
    nonce = _optional(data, "nonce", str)
    if nonce is not None and not 0 < len(nonce) <= MAX_NONCE_LENGTH:
        raise ProtocolError(ErrorCode.BAD_FRAME, f'"nonce" must be 1 to {MAX_NONCE_LENGTH} characters.')
    return nonce


def _content(data: dict[str, Any], *, allow_empty: bool = False) -> str:
    content = data.get("content")
    if not isinstance(content, str):
        raise ProtocolError(ErrorCode.BAD_FRAME, 'A message needs a text "content" field.')
    try:
        content.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError(ErrorCode.BAD_FRAME, "The text contains characters that are not valid Unicode.") from None
    if not allow_empty and not content.strip():
        raise ProtocolError(ErrorCode.EMPTY, "The message is empty.")
    return content


def parse_client_frame(raw: str | bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> ClientFrame:
    """Validate a frame sent after registration. Unknown fields are ignored, as the baseline says."""
    data = _load_object(raw, max_bytes)
    kind = data.get("type", "message")
    if kind == "message":
        if "recipients" in data or "whisper" in data:
            raise ProtocolError(ErrorCode.BAD_FRAME, "Only a moderator chooses who hears a message, with /whisper "
                                                     "or the stage commands; nothing was sent.")
        return Say(content=_content(data, allow_empty=True), opening=data.get("opening") is True,
                   turn=_optional(data, "turn", int), nonce=_nonce(data), speed=_speed(data),
                   replaces=_optional(data, "replaces", str))
    if kind == "partial":
        return Partial(content=_content(data, allow_empty=True))
    if kind == "pass":
        reason = data.get("reason", "")
        return Pass(reason=reason if isinstance(reason, str) else "", turn=_optional(data, "turn", int),
                    speed=_speed(data), replaces=_optional(data, "replaces", str))
    if kind == "discard":
        reason = data.get("reason")
        if not isinstance(reason, str) or not 0 < len(reason) <= MAX_REASON_LENGTH:
            raise ProtocolError(ErrorCode.BAD_FRAME,
                                f'A discard needs a "reason" of 1 to {MAX_REASON_LENGTH} characters.')
        return Discard(content=_content(data, allow_empty=True), reason=reason, turn=_optional(data, "turn", int))
    if kind == "command":
        name = data.get("name")
        args = data.get("args", [])
        if not isinstance(name, str) or not name:
            raise ProtocolError(ErrorCode.BAD_FRAME, 'A command needs a "name".')
        if not isinstance(args, list) or not all(isinstance(arg, str) for arg in args):
            raise ProtocolError(ErrorCode.BAD_FRAME, 'A command\'s "args" must be a list of strings.')
        return Command(name=name.lower(), args=tuple(args))
    raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"Unknown frame type {kind!r}.")


def parse_server_frame(raw: str | bytes) -> ServerFrame | None:
    """Read a frame from a hub; unknown or malformed frames give None and are ignored."""
    if isinstance(raw, bytes):
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    kind = data.get("type")
    text = data.get("content") if isinstance(data.get("content"), str) else ""
    if kind == "message":
        return chat_from_wire(data)
    if kind == "history":
        messages = data.get("messages")
        items = messages if isinstance(messages, list) else []
        chats = [chat_from_wire(item) for item in items if isinstance(item, dict)]
        return Archive(messages=tuple(chat for chat in chats if chat is not None),
                       markdown=data["markdown"] if isinstance(data.get("markdown"), str) else "")
    if kind == "system":
        return Notice(
            content=text,
            event=_str_or_none(data.get("event")),
            code=_code(data.get("code")),
            protocol=_int_or(data.get("protocol"), None),
            room=_str_or_none(data.get("room")),
            session=_str_or_none(data.get("session")),
            reason=_str_or_none(data.get("reason")),
        )
    if kind == "error":
        return Refusal(code=_code(data.get("code")) or "", content=text)
    if kind == "turn":
        speakers = data.get("speakers") or []
        return FloorState(
            mode=str(data.get("mode") or ""),
            speakers=tuple(str(s) for s in speakers if isinstance(s, str)),
            turns_left=_int_or(data.get("turns_left"), 0),
            paused=data.get("paused") is True,
            turn=_int_or(data.get("turn"), 0),
        )
    if kind == "partial" and isinstance(data.get("from"), str):
        return RelayedPartial(sender=data["from"], content=text, turn=_int_or(data.get("turn"), 0))
    if kind == "withdrawn" and isinstance(data.get("from"), str):
        return Withdrawn(sender=data["from"], content=text, reason=str(data.get("reason") or ""),
                         turn=_int_or(data.get("turn"), 0))
    if kind == "redo" and isinstance(data.get("id"), str) and data["id"]:
        return Redo(id=data["id"], seq=_int_or(data.get("seq"), 0))
    if kind == "roster":
        floor = data.get("floor")
        return Roster(participants=_objects(data.get("participants")), floor=floor if isinstance(floor, dict) else {},
                      spectators=_int_or(data.get("spectators"), 0), content=text)
    if kind == "presence":
        return Presence(participants=_objects(data.get("participants")),
                        spectators=_int_or(data.get("spectators"), 0))
    return None


def _objects(items: Any) -> tuple[dict[str, Any], ...]:
    return tuple(item for item in items if isinstance(item, dict)) if isinstance(items, list) else ()


def chat_from_wire(data: dict[str, Any]) -> Chat | None:
    """A chat message from its wire fields (a frame, or a transcript record); None without a sender."""
    sender = data.get("from")
    if not isinstance(sender, str):
        return None
    return Chat(
        sender=sender,
        content=data["content"] if isinstance(data.get("content"), str) else "",
        seq=_int_or(data.get("seq"), 0),
        id=str(data.get("id") or ""),
        ts=float(data["ts"]) if isinstance(data.get("ts"), (int, float)) else 0.0,
        role=str(data.get("role") or Role.MODEL.value),
        replay=data.get("replay") is True,
        interrupted=data.get("interrupted") is True,
        nonce=_str_or_none(data.get("nonce")),
        replaces=_str_or_none(data.get("replaces")) or None,
        recipients=_names_or_none(data.get("recipients")),
        whisper=data.get("whisper") is True,
    )


def _code(value: Any) -> ErrorCode | str | None:
    if not isinstance(value, str):
        return None
    try:
        return ErrorCode(value)
    except ValueError:
        return value  # a newer hub's reason


def _names_or_none(value: Any) -> tuple[str, ...] | None:
    return tuple(item for item in value if isinstance(item, str)) if isinstance(value, list) else None


def _int_or(value: Any, default: Any) -> Any:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None
