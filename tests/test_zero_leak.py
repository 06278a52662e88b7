"""The zero-leak goal: a seeded script of whispers, scenes, reconnects and a --resume restart.

Five stand-in personas (four speaking the extensions, one baseline), a moderator, a human who does
not moderate and a spectator record every frame they receive. After every step each listener
proves, by a round trip on its own connection, that it has been sent everything the step caused,
so every frame is attributed to the step that caused it. The test keeps its own account of who is
on stage and who each message was for, and checks every frame of every kind against it:

- no frame carries a message (by its unique tag) its receiver was not a recipient of: messages,
  partials, replays after reconnects and after the restart, and events that quote them;
- a persona off stage for a whole step receives nothing at all in it;
- while a whispered exchange goes on, no other persona hears any news of it (withheld, cut, pass,
  stop), nor does a human who does not moderate or the spectator;
- and nothing is lost: each persona that speaks the extensions ends up with every message it was
  a recipient of, live or replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers import hub_config
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from partychat.hub.server import Hub, HubConfig

PERSONAS = ["P0", "P1", "P2", "P3", "P4"]
BASELINE = "P4"
"""Speaks the original protocol: it must simply never receive what it is not entitled to."""
LATE_OFFSTAGE = "P3"
"""Joins a few steps in, asking to start off stage."""
TAG = re.compile(r"T\d{4}Z")
NEWS = {"withheld", "cut", "pass", "stop", "skip"}
"""Events about one persona's reply."""
PROBE_ANSWERS = {"not_moderator", "watch_only"}
"""The refusals that answer a listener's round trip: they are about nothing said in the room."""


@dataclass
class Listener:
    name: str
    kind: str  # persona, moderator, observer, spectator
    ws: ClientConnection | None = None
    frames: list[dict] = field(default_factory=list)
    cursor: int = 0
    last_seq: int | None = None
    session: str | None = None
    reader: asyncio.Task | None = None
    probes: int = 0
    received_tags: set[str] = field(default_factory=set)

    async def open(self, url: str, **hello: Any) -> None:
        self.ws = await connect(url)
        if self.kind == "spectator":
            first = {"type": "spectator", "protocol": 1}
        else:
            first = {"name": self.name, "type": "human" if self.kind in ("moderator", "observer") else "model"}
            if self.name != BASELINE:
                first["protocol"] = 1
            if self.kind != "persona":
                first["stream"] = True
            if self.kind == "moderator":
                first["moderator_token"] = "chair"
            if self.session:
                first["session"] = self.session
        if self.last_seq is not None and self.name != BASELINE:
            first["last_seq"] = self.last_seq
        await self.ws.send(json.dumps({**first, **hello}))
        self.reader = asyncio.create_task(self._read(self.ws))

    async def _read(self, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self._read_frames(ws)

    async def _read_frames(self, ws: ClientConnection) -> None:
        async for raw in ws:
            frame = json.loads(raw)
            self.frames.append(frame)
            if frame.get("type") == "message":
                if frame.get("seq"):
                    self.last_seq = max(self.last_seq or 0, frame["seq"])
                self.received_tags.update(TAG.findall(frame.get("content", "")))
            if frame.get("event") == "welcome" and frame.get("session"):
                self.session = frame["session"]

    async def close(self) -> None:
        assert self.ws is not None and self.reader is not None
        await self.ws.close()
        await self.reader
        self.ws = None

    async def probe(self) -> list[dict]:
        """A round trip on this connection; returns the frames received since the last probe, and its answer."""
        assert self.ws is not None
        self.probes += 1
        if self.kind == "moderator":
            await self.ws.send(json.dumps({"type": "command", "name": "who", "args": []}))
            answered = lambda f: f.get("type") == "roster"  # noqa: E731
        elif self.kind == "spectator":
            await self.ws.send("{}")
            answered = lambda f: f.get("code") == "watch_only"  # noqa: E731
        else:  # a persona or a human who does not moderate trying to whisper: refused
            await self.ws.send(json.dumps({"type": "command", "name": "whisper", "args": ["P0", "psst"]}))
            answered = lambda f: f.get("code") == "not_moderator"  # noqa: E731
        for _ in range(5000):
            for index in range(self.cursor, len(self.frames)):
                if answered(self.frames[index]):
                    step, self.cursor = self.frames[self.cursor:index + 1], index + 1
                    return step
            await asyncio.sleep(0.002)
        raise AssertionError(f"{self.name} got no answer to its probe")


@dataclass
class Step:
    """What the test expects of one step."""

    what: str
    private_about: str | None = None
    """A persona whose whispered exchange this step belongs to."""
    exempt: set[str] = field(default_factory=set)
    """Personas whose stage or connection changed in this step: the off-stage rule does not apply."""


class Script:
    """The test's own account of the room: the stage, and each tag's recipients."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.known: list[str] = []
        self.running = False
        self.on: set[str] = set()
        self.recipients: dict[str, set[str] | None] = {}
        """Each relayed tag's personas; None: every persona (an ordinary room)."""
        self.whispered: set[str] = set()
        self.from_moderator: set[str] = set()
        self.newcomers: set[str] = set()
        self.owed: dict[str, set[str]] = {name: set() for name in PERSONAS}
        self.count = 0
        self.checked = 0
        self.kinds_seen: set[str] = set()

    def tag(self) -> str:
        self.count += 1
        return f"T{self.count:04d}Z"

    def is_on(self, name: str) -> bool:
        return not self.running or name in self.on

    def begin(self) -> None:
        if not self.running:
            self.running, self.on = True, set(self.known)

    def arrive(self, name: str, offstage: bool) -> None:
        if name in self.known:
            return
        if offstage or self.running:
            self.newcomers.add(name)  # new to a room that runs scenes: no earlier history
        if offstage:
            self.begin()
        elif self.running:
            self.on.add(name)
        self.known.append(name)

    def public(self) -> set[str] | None:
        return set(self.on) if self.running else None

    def relayed(self, tag: str, personas: set[str] | None, whisper: bool = False) -> None:
        self.recipients[tag] = personas
        if whisper:
            self.whispered.add(tag)
        for name in (personas if personas is not None else self.known):
            if name != BASELINE:
                self.owed[name].add(tag)

    def check(self, listener: Listener, frames: list[dict], step: Step) -> None:
        for frame in frames:
            self.checked += 1
            self.kinds_seen.add(frame.get("event") or frame["type"])
            text = json.dumps(frame)
            for tag in TAG.findall(text):
                assert tag in self.recipients, f"{listener.name} received {tag}, which was never relayed: {frame}"
                if listener.kind == "persona":
                    allowed = self.recipients[tag]
                    if allowed is None:  # said in the open before the room ran scenes
                        assert listener.name not in self.newcomers, \
                            f"{listener.name}, new to a room that runs scenes, was replayed {tag}: {frame}"
                    else:
                        assert listener.name in allowed, \
                            f"{listener.name} received {tag} (for {allowed}) in step {step.what}: {frame}"
                elif listener.kind in ("observer", "spectator"):
                    assert tag not in self.whispered, f"the {listener.kind} read whisper {tag} in {step.what}: {frame}"
            about = step.private_about
            if listener.kind == "persona" and frame.get("event") in ("join", "leave"):
                named = frame["content"].split()[0]
                assert self.is_on(named) or named == listener.name, \
                    f"{listener.name} heard news of {named}, who is off stage: {frame}"
            if frame.get("code") in PROBE_ANSWERS:
                continue
            if listener.kind == "persona" and listener.name not in step.exempt and not self.is_on(listener.name):
                raise AssertionError(f"{listener.name} is off stage but received {frame} in step {step.what}")
            if about is not None and listener.name != about and listener.kind != "moderator":
                assert not (frame.get("event") in NEWS and about in frame.get("content", "")), \
                    f"{listener.name} heard of {about}'s private exchange in {step.what}: {frame}"
                if listener.kind == "persona":
                    assert frame["type"] == "turn" or frame.get("event") == "quiet", \
                        f"{listener.name} received {frame} during {about}'s private exchange ({step.what})"


class Room:
    """Drives the hub: the moderator's commands, the personas' replies, the probes after each step."""

    def __init__(self, script: Script, config: HubConfig) -> None:
        self.script = script
        self.config = config
        self.hub: Hub | None = None
        self.moderator = Listener("Chair", "moderator")
        self.observer = Listener("Guest", "observer")
        self.spectator = Listener("spectator", "spectator")
        self.personas = {name: Listener(name, "persona") for name in PERSONAS}
        self.floor: dict = {}

    @property
    def listeners(self) -> list[Listener]:
        return [self.moderator, self.observer, self.spectator, *self.personas.values()]

    def connected(self) -> list[Listener]:
        return [listener for listener in self.listeners if listener.ws is not None]

    async def settle(self, step: Step, first: Listener | None = None) -> None:
        """Every connected listener proves it has been sent all the step caused; check what it got."""
        order = [first] if first is not None else [self.moderator]
        order += [listener for listener in self.connected() if listener not in order]
        for listener in order:
            if listener.kind == "spectator" and listener.probes >= 40:  # fifty refusals in a row close it
                frames = await listener.probe()
                self.script.check(listener, frames, step)
                await listener.close()
                await listener.open(self.hub.url)
                listener.probes = 0
            frames = await listener.probe()
            self.script.check(listener, frames, step)
            if listener is self.moderator:
                turns = [f for f in listener.frames if f["type"] == "turn"]
                self.floor = turns[-1] if turns else {}

    async def command(self, name: str, *args: str, step: Step) -> None:
        await self.moderator.ws.send(json.dumps({"type": "command", "name": name, "args": list(args)}))
        await self.settle(step)

    def holder(self) -> str | None:
        speakers = self.floor.get("speakers") or []
        return speakers[0] if speakers and not self.floor.get("paused") else None

    async def reply(self, private: bool) -> None:
        """The persona holding the turn answers: a reply, one a guard cuts or withholds, a pass, or a /stop."""
        name = self.holder()
        persona = self.personas.get(name) if name else None
        if persona is None or persona.ws is None:
            return
        script = self.script
        recipients = {name} if private else script.public()
        about = name if private else None
        turn = self.floor["turn"]
        kind = script.rng.choice(["reply", "reply", "cut", "repeat", "pass", "stop"])
        tag = script.tag()
        extra = {} if name == BASELINE else {"turn": turn}
        send = persona.ws.send
        if kind == "pass":
            await send(json.dumps({"type": "pass", "reason": "nothing to add", **extra}))
        elif kind == "repeat":  # the message that gave it the turn, word for word: withheld
            said = [f for f in persona.frames if f["type"] == "message" and f["from"] == "Chair"]
            await send(json.dumps({"type": "message", "content": said[-1]["content"], **extra}))
        else:
            script.relayed(tag, recipients, private)
            await send(json.dumps({"type": "partial", "content": f"{tag} begins. "}))
            if kind == "stop":
                await self.settle(Step(f"{name} streams {tag}", private_about=about), first=persona)
                await self.command("stop", step=Step(f"stop {name}", private_about=about))
                return
            tail = f"\n{PERSONAS[0] if name != PERSONAS[0] else PERSONAS[1]}: {tag} more" if kind == "cut" else ""
            await send(json.dumps({"type": "message", "content": f"{tag} begins. Then ends.{tail}", **extra}))
        await self.settle(Step(f"{name} {kind} {tag}", private_about=about), first=persona)

    async def whisper(self) -> bool:
        script = self.script
        targets = [n for n, p in self.personas.items() if p.ws is not None and script.is_on(n)]
        if not targets:
            return False
        name = script.rng.choice(targets)
        private = script.rng.random() < 0.5
        tag = script.tag()
        script.relayed(tag, {name}, whisper=True)
        script.from_moderator.add(tag)
        await self.command("whisper!" if private else "whisper", name, f"{tag} the key is under the mat",
                           step=Step(f"whisper to {name} {tag}", private_about=name))
        await self.reply(private)
        return True

    async def speak(self) -> None:
        tag = self.script.tag()
        self.script.relayed(tag, self.script.public())
        await self.moderator.ws.send(json.dumps({"type": "message", "content": f"{tag} what now, everyone?"}))
        await self.settle(Step(f"public {tag}"))
        await self.reply(False)

    async def change_stage(self) -> None:
        script = self.script
        on = [n for n in script.known if script.is_on(n)]
        off = [n for n in script.known if not script.is_on(n)]
        choice = script.rng.choice(["enter", "exit", "scene"] if off and on else ["exit", "scene"] if on else ["enter"])
        line = script.tag() if script.rng.random() < 0.6 else None
        words = [f"{line} the door creaks"] if line else []
        if choice == "enter":
            name = script.rng.choice(off)
            script.begin()
            script.on.add(name)
            if line:
                script.relayed(line, script.public())
            await self.command("enter", name, *words, step=Step(f"enter {name}", exempt={name}))
        elif choice == "exit":
            name = script.rng.choice(on)
            script.begin()
            script.on.discard(name)
            if line:
                script.relayed(line, script.public() | {name})
            await self.command("exit", name, *words, step=Step(f"exit {name}", exempt={name}))
        else:
            chosen = script.rng.sample(script.known, script.rng.randint(1, len(script.known)))
            if set(chosen) == set(on) and script.running:
                chosen = [n for n in script.known if n not in chosen] or chosen[:1]
            if set(chosen) == set(on) and script.running:
                return
            script.begin()
            changed = set(chosen) ^ script.on
            script.on = set(chosen)
            await self.command("scene", *chosen, step=Step(f"scene {chosen}", exempt=changed))
        if line:
            await self.reply(False)

    async def reconnect(self, listener: Listener) -> None:
        await listener.close()
        await self.settle(Step(f"{listener.name} drops", exempt={listener.name}))
        await listener.open(self.hub.url)
        await self.settle(Step(f"reconnect {listener.name}", exempt={listener.name}))


async def run_script(tmp_path: Path, seed: int) -> Script:
    script = Script(seed)
    config = hub_config(tmp_path, moderator_token="chair", rate_per_second=0, max_turns=1,
                        turn_timeout=0, first_token_timeout=0)
    room = Room(script, config)

    async def start(resume: bool) -> None:
        cfg = HubConfig(**{**config.__dict__, "resume": config.transcript if resume else None})
        room.hub = await Hub(cfg).__aenter__()
        await room.moderator.open(room.hub.url)
        await room.moderator.probe()
        for listener in room.listeners[1:]:
            if listener.name == LATE_OFFSTAGE and LATE_OFFSTAGE not in script.known:
                continue
            await listener.open(room.hub.url)
            if listener.kind == "persona":
                script.arrive(listener.name, offstage=False)
            await room.settle(Step(f"join {listener.name}", exempt={listener.name}), first=listener)

    await start(resume=False)
    whispers = stage_changes = 0
    restarted = False
    step = 0
    while whispers < 50 or stage_changes < 20:
        step += 1
        if step == 6:
            late = room.personas[LATE_OFFSTAGE]
            await late.open(room.hub.url, offstage=True)
            script.arrive(LATE_OFFSTAGE, offstage=True)
            # Its opening line, said off stage, is kept but reaches nobody.
            await late.ws.send(json.dumps({"type": "message", "content": f"{script.tag()} hello all", "opening": True}))
            await room.settle(Step(f"{LATE_OFFSTAGE} joins off stage", exempt={LATE_OFFSTAGE}), first=late)
            continue
        if not restarted and whispers >= 25:
            restarted = True
            await room.settle(Step("before the restart"))
            for listener in room.connected():
                await listener.close()
            await room.hub.__aexit__(None, None, None)
            await start(resume=True)
            continue
        roll = script.rng.random()
        if roll < 0.08:
            await room.reconnect(script.rng.choice([*room.personas.values(), room.observer]))
        elif roll < 0.25 and stage_changes < 20:
            stage_changes += 1
            await room.change_stage()
        elif roll < 0.35:
            await room.speak()
        elif whispers < 50 and await room.whisper():
            whispers += 1
        else:
            await room.speak()
    await room.settle(Step("the end"))
    for listener in room.connected():
        await listener.close()
    await room.hub.__aexit__(None, None, None)
    assert restarted
    for name, persona in room.personas.items():
        missing = script.owed[name] - persona.received_tags
        assert not missing, f"{name} never received {sorted(missing)}, though it was a recipient"
    return script


def test_no_persona_receives_a_frame_outside_its_recipients(tmp_path):
    script = asyncio.run(asyncio.wait_for(run_script(tmp_path, seed=19), 120))
    assert sum(1 for tag in script.whispered if script.recipients[tag] and tag in script.from_moderator) == 50
    # The script reached every kind of frame a leak could hide in.
    for kind in ("message", "partial", "turn", "presence", "roster", "whisper", "withheld", "cut", "pass", "stop",
                 "enter", "exit", "join", "welcome"):
        assert kind in script.kinds_seen, kind
