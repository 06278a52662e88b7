"""A floor that stays healthy, against a live hub: /stop, liveness, guards, stop reasons, no lost lines.

The personas here are stand-ins: real websocket clients speaking the extension protocol that do
exactly what a test needs on each turn (stream and hang, never answer, repeat, impersonate).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from helpers import Process, close_all, hub_config, join, next_frame, say, script, with_hub
from websockets.asyncio.client import ClientConnection

from partychat.hub.floor import Mode
from partychat.hub.transcript import read_records

Act = Callable[["StandIn", dict], Awaitable[None]]


@dataclass
class StandIn:
    """A scripted model persona: whenever the hub gives it the turn, it runs ``act``."""

    ws: ClientConnection
    name: str
    act: Act
    heard: list[dict] = field(default_factory=list)
    frames: list[dict] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    async def received(self, kind: str, timeout: float = 10) -> dict:
        """The first frame of a kind this persona got (its own reader task owns the socket)."""
        for _ in range(int(timeout / 0.02)):
            found = next((frame for frame in self.frames if frame["type"] == kind), None)
            if found is not None:
                return found
            await asyncio.sleep(0.02)
        raise AssertionError(f"{self.name} got no {kind} frame")

    async def send(self, **frame: object) -> None:
        await self.ws.send(json.dumps(frame))

    async def run(self) -> None:
        handled = -1
        async for raw in self.ws:
            frame = json.loads(raw)
            self.frames.append(frame)
            if frame["type"] == "message":
                self.heard.append(frame)
            elif frame["type"] == "turn" and self.name in frame["speakers"] and frame["turn"] != handled:
                handled = frame["turn"]
                await self.act(self, frame)


async def stand_in(url: str, name: str, act: Act, **hello: object) -> StandIn:
    ws, welcome = await join(url, name, "model", protocol=1, **hello)
    assert welcome["event"] == "welcome", welcome
    persona = StandIn(ws, name, act)
    persona.task = asyncio.create_task(persona.run())
    return persona


def replies(*texts: str) -> Act:
    """Answer each turn with the next of ``texts``, round and round (distinct, so no guard stops them)."""
    count = 0

    async def act(persona: StandIn, turn: dict) -> None:
        nonlocal count
        await persona.send(type="message", content=texts[count % len(texts)], turn=turn["turn"])
        count += 1
    return act


def streams_then_hangs(*pieces: str) -> Act:
    async def act(persona: StandIn, turn: dict) -> None:
        for piece in pieces:
            await persona.send(type="partial", content=piece)
    return act


async def never(persona: StandIn, turn: dict) -> None:
    """A persona that holds the turn and sends nothing at all."""


async def passes(persona: StandIn, turn: dict) -> None:
    await persona.send(type="pass", reason="nothing to add", turn=turn["turn"])


async def repeats_the_last_message(persona: StandIn, turn: dict) -> None:
    await persona.send(type="message", content=persona.heard[-1]["content"].upper(), turn=turn["turn"])


async def moderator(url: str) -> ClientConnection:
    ws, _ = await join(url, "Moderator", "human", protocol=1, stream=True)
    return ws


async def command(ws: ClientConnection, name: str, *args: str) -> None:
    await ws.send(json.dumps({"type": "command", "name": name, "args": list(args)}))


async def quiet_reason(ws: ClientConnection) -> str:
    return (await next_frame(ws, "system", event="quiet"))["reason"]


def transcript_of(config) -> list:
    return read_records(config.transcript)


# ---------------------------------------------------------------- /stop


def test_stop_relays_exactly_what_was_streamed_marked_interrupted_and_the_next_speaker_starts(tmp_path):
    config = hub_config(tmp_path)

    async def body(hub):
        teller = await stand_in(hub.url, "Teller", streams_then_hangs("Once upon a time. ", "There was a kettle."))
        other = await stand_in(hub.url, "Other", replies("My turn now."))
        host = await moderator(hub.url)
        listener, _ = await join(hub.url, "Listener", "human")
        await say(host, "Tell a story.")
        assert (await next_frame(host, "partial", content="There was a kettle."))["from"] == "Teller"
        await command(host, "stop")
        stopped = await next_frame(listener, "message", **{"from": "Teller"})
        assert stopped["content"] == "Once upon a time. There was a kettle."
        assert stopped["interrupted"] is True
        assert (await next_frame(host, "message", **{"from": "Teller"}))["interrupted"] is True
        assert (await next_frame(host, "turn"))["speakers"] == ["Other"]
        assert (await next_frame(listener, "message", **{"from": "Other"}))["content"] == "My turn now."
        assert await quiet_reason(host) == "budget"
        await command(host, "stop")
        assert (await next_frame(host, "error"))["code"] == "nothing_to_stop"
        await close_all(host, listener, teller.ws, other.ws)

    with_hub(config, body)
    messages = [r.data for r in transcript_of(config) if r.kind == "message"]
    assert [(m["from"], m["content"], m.get("interrupted")) for m in messages] == [
        ("Moderator", "Tell a story.", None),
        ("Teller", "Once upon a time. There was a kettle.", True),
        ("Other", "My turn now.", None),
    ]


def test_stop_before_anything_was_streamed_moves_on_and_says_so(tmp_path):
    config = hub_config(tmp_path, max_turns=1)

    async def body(hub):
        mute = await stand_in(hub.url, "Mute", never)
        host = await moderator(hub.url)
        await say(host, "Anyone?")
        await next_frame(host, "turn", speakers=["Mute"])
        await command(host, "stop")
        assert "before it said anything" in (await next_frame(host, "system", event="stop"))["content"]
        assert await quiet_reason(host) == "stopped"
        await close_all(host, mute.ws)

    with_hub(config, body)


# ---------------------------------------------------------------- liveness


def test_a_persona_that_never_streams_is_skipped_keeps_its_seat_and_is_back_after_it_answers(tmp_path):
    config = hub_config(tmp_path, first_token_timeout=1.0)

    async def body(hub):
        mute = await stand_in(hub.url, "Mute", never)
        talker = await stand_in(hub.url, "Talker", replies("I am here.", "Still with you, all ears.",
                                                            "Good to see you."))
        host = await moderator(hub.url)
        await say(host, "Hello both.")
        skip = await next_frame(host, "system", event="skip")
        assert skip["content"].startswith("Mute sent nothing for 1 s")
        assert (await next_frame(host, "message", **{"from": "Talker"}))["content"] == "I am here."
        await quiet_reason(host)
        await command(host, "who")
        roster = {p["name"]: p for p in (await next_frame(host, "roster"))["participants"]}
        assert roster["Mute"]["skipped"] is True, "skipped, but still seated"
        await say(host, "Again, please.")
        assert (await next_frame(host, "message", **{"from": "Talker"}))["content"] == "Still with you, all ears."
        await quiet_reason(host)
        mute.act = replies("Sorry, I was away.")
        await mute.send(type="pass", reason="back from a long think")
        assert "back in the rotation" in (await next_frame(host, "system", event="back"))["content"]
        await say(host, "And once more.")
        back = await next_frame(host, "message", **{"from": "Mute"}, timeout=20)
        assert back["content"] == "Sorry, I was away."
        await close_all(host, mute.ws, talker.ws)

    with_hub(config, body)
    events = [r.data["event"] for r in transcript_of(config) if r.kind == "event"]
    assert events.count("skip") == 1 and events.count("back") == 1


def test_a_persona_whose_connection_dies_holding_the_turn_is_skipped_and_the_room_goes_on(tmp_path):
    config = hub_config(tmp_path)

    async def vanishes(persona: StandIn, turn: dict) -> None:
        persona.ws.transport.abort()  # no close handshake: the connection just dies

    async def body(hub):
        ghost = await stand_in(hub.url, "Ghost", vanishes)
        talker = await stand_in(hub.url, "Talker", replies("Still here."))
        host = await moderator(hub.url)
        await say(host, "Hello both.")
        skip = await next_frame(host, "system", event="skip")
        assert skip["content"] == "Ghost left while holding the turn; the turn moves on."
        assert (await next_frame(host, "message", **{"from": "Talker"}))["content"] == "Still here."
        await close_all(host, talker.ws)
        ghost.task.cancel()

    with_hub(config, body)


def test_who_shows_talkativeness_and_the_speed_each_client_reported(tmp_path):
    config = hub_config(tmp_path)

    async def fast(persona: StandIn, turn: dict) -> None:
        await persona.send(type="message", content="Quick answer.", turn=turn["turn"], ttft=0.25,
                           tokens_per_second=40.5)

    async def body(hub):
        persona = await stand_in(hub.url, "Quick", fast, talkativeness=0.9)
        host = await moderator(hub.url)
        await say(host, "Go.")
        await next_frame(host, "message", **{"from": "Quick"})
        await command(host, "who")
        quick = next(p for p in (await next_frame(host, "roster"))["participants"] if p["name"] == "Quick")
        assert (quick["talkativeness"], quick["ttft"], quick["tokens_per_second"]) == (0.9, 0.25, 40.5)
        loud, refusal = await join(hub.url, "Loud", "model", protocol=1, talkativeness=3)
        assert refusal["code"] == "bad_frame" and "from 0 to 1" in refusal["content"]
        await close_all(host, persona.ws, loud)

    with_hub(config, body)


# ---------------------------------------------------------------- guards


def test_each_guard_acts_on_stand_in_replies_and_the_transcript_keeps_what_was_held_back(tmp_path):
    config = hub_config(tmp_path, mode=Mode.NATURAL, seed=3, max_turns=1)

    async def body(hub):
        parrot = await stand_in(hub.url, "Parrot", repeats_the_last_message)
        blank = await stand_in(hub.url, "Blank", replies(" ... !? "))
        mimic = await stand_in(hub.url, "Mimic", replies("I would build a bridge.\nParrot: What a fine idea, Mimic!"))
        host = await moderator(hub.url)
        listener, _ = await join(hub.url, "Listener", "human")
        await say(host, "Parrot, what would you build for the village fair this year?")
        withheld = await next_frame(host, "system", event="withheld")
        assert withheld["reason"] == "repeat" and withheld["content"].startswith("Parrot's reply was withheld")
        assert (await parrot.received("error"))["code"] == "withheld"
        assert await quiet_reason(host) == "withheld"
        await say(host, "Blank, your turn.")
        assert (await next_frame(host, "system", event="withheld"))["reason"] == "empty"
        await command(host, "turns", "2")
        await say(host, "Mimic, what would you build?")
        cut = await next_frame(listener, "message", **{"from": "Mimic"})
        assert cut["content"] == "I would build a bridge."
        assert (await next_frame(host, "system", event="cut"))["reason"] == "impersonation"
        assert (await next_frame(host, "turn"))["speakers"] == ["Parrot"], "natural mode: Parrot speaks for itself"
        await close_all(host, listener, parrot.ws, blank.ws, mimic.ws)

    with_hub(config, body)
    records = transcript_of(config)
    held = [(r.data["from"], r.data["reason"], r.data["content"]) for r in records if r.kind == "withheld"]
    assert held[:3] == [
        ("Parrot", "repeat", "PARROT, WHAT WOULD YOU BUILD FOR THE VILLAGE FAIR THIS YEAR?"),
        ("Blank", "empty", " ... !? "),
        ("Mimic", "impersonation", "\nParrot: What a fine idea, Mimic!"),
    ]
    relayed = [r.data["content"] for r in records if r.kind == "message" and r.data["from"] != "Moderator"]
    assert "I would build a bridge." in relayed and not any("PARROT" in text for text in relayed)


def test_no_guards_relays_replies_as_they_come(tmp_path):
    config = hub_config(tmp_path, guards=False)

    async def body(hub):
        parrot = await stand_in(hub.url, "Parrot", repeats_the_last_message)
        host = await moderator(hub.url)
        await say(host, "Say this back to me.")
        assert (await next_frame(host, "message", **{"from": "Parrot"}))["content"] == "SAY THIS BACK TO ME."
        await close_all(host, parrot.ws)

    with_hub(config, body)


# ---------------------------------------------------------------- stop reasons


def test_each_way_the_room_goes_quiet_is_stated_once(tmp_path):
    config = hub_config(tmp_path, first_token_timeout=1.0)

    async def body(hub):
        first = await stand_in(hub.url, "First", replies("One."))
        second = await stand_in(hub.url, "Second", replies("Two."))
        host = await moderator(hub.url)
        reasons = []

        async def exchange(line: str) -> None:
            await say(host, line)
            reasons.append(await quiet_reason(host))

        await exchange("Budget: one each.")
        first.act = second.act = passes
        await command(host, "turns", "6")
        await exchange("Everyone passes.")
        first.act = never
        await command(host, "turns", "1")
        await exchange("First times out.")
        second.act = repeats_the_last_message
        await exchange("Second, repeat after me please, word for word.")
        second.act = streams_then_hangs("Half a thought.")
        await say(host, "Second, think aloud.")
        await next_frame(host, "partial")
        await command(host, "stop")
        reasons.append(await quiet_reason(host))
        second.act = never
        await say(host, "Second, hold the turn.")
        await next_frame(host, "turn", speakers=["Second"])
        await command(host, "pause")
        reasons.append(await quiet_reason(host))
        await command(host, "resume")
        await command(host, "mode", "moderator")
        await exchange("Nobody is named here.")
        assert reasons == ["budget", "passed", "timeout", "withheld", "stopped", "paused", "not_addressed"]
        await close_all(host, first.ws, second.ws)

    with_hub(config, body, timeout=120)
    quiet = [r.data for r in transcript_of(config) if r.kind == "event" and r.data["event"] == "quiet"]
    assert [q["reason"] for q in quiet][:7] == ["budget", "passed", "timeout", "withheld", "stopped", "paused",
                                                "not_addressed"]
    assert all(q["content"].startswith("The models are quiet: ") for q in quiet)


# ---------------------------------------------------------------- no moderator line lost


def test_a_line_resent_with_its_nonce_is_relayed_once_even_across_a_resumed_hub(tmp_path):
    config = hub_config(tmp_path)

    async def first_run(hub):
        host = await moderator(hub.url)
        await host.send(json.dumps({"type": "message", "content": "Keep me.", "nonce": "line-1"}))
        echo = await next_frame(host, "message")
        assert (echo["nonce"], echo["seq"]) == ("line-1", 1)
        await host.close()

    with_hub(config, first_run)
    config.resume = config.transcript

    async def second_run(hub):
        listener, _ = await join(hub.url, "Listener", "human", protocol=1, last_seq=1)
        host, _ = await join(hub.url, "Moderator", "human", protocol=1, last_seq=1)
        await host.send(json.dumps({"type": "message", "content": "Keep me.", "nonce": "line-1"}))
        again = await next_frame(host, "message")
        assert (again["seq"], again["nonce"]) == (1, "line-1"), "confirmed with its first number, not relayed anew"
        await say(host, "Next line.")
        assert (await next_frame(listener, "message"))["content"] == "Next line."
        await close_all(host, listener)

    with_hub(config, second_run)
    contents = [r.data["content"] for r in transcript_of(config) if r.kind == "message"]
    assert contents == ["Keep me.", "Next line."]


def _unread_bytes_on_port(port: int) -> int:
    """Bytes waiting in the receive queues of the sockets on a local port (from /proc/net/tcp)."""
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    total += int(fields[4].split(":")[1], 16)
    return total


def test_a_moderator_line_sent_as_the_hub_dies_is_resent_to_the_resumed_hub_and_shown_once(tmp_path, processes):
    transcript = tmp_path / "room.jsonl"
    hub = Process([script("server.py"), "--host", "127.0.0.1", "--port", "0", "--transcript", str(transcript)],
                  tmp_path / "hub-1.out")
    processes.append(hub)
    url = hub.wait_for_output(r"listening on (ws://\S+)", 30).group(1)
    port = int(url.rsplit(":", 1)[1])
    console = Process([script("moderator.py"), "--server", url, "--name", "Host"], tmp_path / "moderator.out",
                      stdin=subprocess.PIPE)
    processes.append(console)
    console.wait_for_output("Connected to", 30)

    def type_line(text: str) -> None:
        console.popen.stdin.write(text.encode() + b"\n")
        console.popen.stdin.flush()

    type_line("First line.")
    console.wait_for_output("Host: First line.", 30)
    hub.popen.send_signal(signal.SIGSTOP)  # frozen: it can take bytes in, but will never read them
    type_line("Sent as the hub dies.")
    deadline = time.monotonic() + 30
    while _unread_bytes_on_port(port) == 0:
        assert time.monotonic() < deadline, "the console never wrote the line to the hub's socket"
        time.sleep(0.05)
    hub.popen.kill()  # the line dies unread in the hub's socket
    hub.popen.wait()
    restarted = Process([script("server.py"), "--host", "127.0.0.1", "--port", str(port), "--resume", str(transcript)],
                        tmp_path / "hub-2.out")
    processes.append(restarted)
    restarted.wait_for_output("listening on", 30)
    console.wait_for_output("Host: Sent as the hub dies.", 60)
    console.popen.stdin.close()
    assert console.popen.wait(timeout=60) == 0
    contents = [r.data["content"] for r in read_records(transcript) if r.kind == "message"]
    assert contents == ["First line.", "Sent as the hub dies."]
    assert console.output.count("Sent as the hub dies.") == 1, console.output
    assert "never confirmed" not in console.output and "Traceback" not in console.output
