"""The baseline wire contract (shared/PROTOCOL.md), frame by frame, against a live hub."""

from __future__ import annotations

import asyncio
import json

import pytest
from helpers import close_all, drain, hub_config, join, next_frame, say, speaker_and_listener, with_hub
from websockets.exceptions import ConnectionClosed


def test_registration_reply_is_the_baseline_system_frame(tmp_path):
    async def body(hub):
        ws, reply = await join(hub.url, "Sage")
        assert reply["type"] == "system"
        assert reply["content"] == "Connected as Sage"
        await ws.close()

    with_hub(hub_config(tmp_path), body)


@pytest.mark.parametrize(
    ("first_frame", "reason"),
    [
        ("not json at all", "not valid JSON"),
        (json.dumps({"type": "model"}), '"name"'),
        (json.dumps({"name": "Sage"}), '"type"'),
        (json.dumps({"name": "Sage", "type": "robot"}), '"model" or "human"'),
        (json.dumps({"name": "   ", "type": "model"}), "empty"),
        (json.dumps({"name": "x" * 200, "type": "model"}), "longer than"),
        (json.dumps({"name": "Evil\x1b[2J", "type": "model"}), "control"),
        (json.dumps(["Sage", "model"]), "JSON object"),
    ],
)
def test_a_bad_registration_gets_a_system_frame_saying_why_then_is_closed(tmp_path, first_frame, reason):
    async def body(hub):
        from websockets.asyncio.client import connect

        async with connect(hub.url) as ws:
            await ws.send(first_frame)
            reply = json.loads(await ws.recv())
            assert reply["type"] == "system"
            assert reason in reply["content"]
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1008

    with_hub(hub_config(tmp_path), body)


def test_a_name_already_in_the_room_is_refused_whatever_its_case(tmp_path):
    async def body(hub):
        first, _ = await join(hub.url, "Zen Sage", "human")
        second, reply = await join(hub.url, "  zen   SAGE ", "model")
        assert reply["type"] == "system"
        assert "already taken" in reply["content"]
        with pytest.raises(ConnectionClosed):
            await second.recv()
        # the first holder of the name is unaffected
        third, _ = await join(hub.url, "Observer", "human")
        await say(first, "still here")
        frame = await next_frame(third, "message")
        assert frame["from"] == "Zen Sage"
        await first.close()
        await third.close()

    with_hub(hub_config(tmp_path), body)


def test_the_hub_sets_from_and_ignores_a_forged_one(tmp_path):
    async def body(hub):
        speaker, listener = await speaker_and_listener(hub.url)
        await speaker.send(json.dumps({"type": "message", "content": "hello", "from": "Somebody Else"}))
        frame = await next_frame(listener, "message")
        assert frame["from"] == "Moderator"
        assert frame["content"] == "hello"
        assert isinstance(frame["seq"], int) and frame["id"] and frame["ts"] > 0
        await speaker.close()
        await listener.close()

    with_hub(hub_config(tmp_path), body)


def test_a_baseline_sender_does_not_get_its_own_message_back(tmp_path):
    async def body(hub):
        speaker, listener = await speaker_and_listener(hub.url)
        await say(speaker, "one")
        await next_frame(listener, "message")
        assert [f for f in await drain(speaker) if f["type"] == "message"] == []
        await speaker.close()
        await listener.close()

    with_hub(hub_config(tmp_path), body)


def test_joins_and_leaves_are_announced_as_system_frames(tmp_path):
    async def body(hub):
        watcher, _ = await join(hub.url, "Watcher", "human")
        sage, _ = await join(hub.url, "Sage")
        joined = await next_frame(watcher, "system")
        assert "Sage" in joined["content"] and "joined" in joined["content"]
        await sage.close()
        left = await next_frame(watcher, "system")
        assert "Sage" in left["content"] and "left" in left["content"]
        await watcher.close()

    with_hub(hub_config(tmp_path), body)


def test_baseline_clients_get_no_extension_frames(tmp_path):
    """A client that did not announce a protocol version never sees turn, partial or error frames."""

    async def body(hub):
        baseline, _ = await join(hub.url, "Old Moderator", "human")
        model, _ = await join(hub.url, "Sage", "model", protocol=1)
        await say(baseline, "go")
        await model.send(json.dumps({"type": "partial", "content": "thinking"}))
        await say(model, "done")

        async def received(count: int) -> list[tuple]:
            """The next ``count`` frames exactly as they arrive: type, sender and text (extra fields are allowed)."""
            frames = [json.loads(await asyncio.wait_for(baseline.recv(), 10)) for _ in range(count)]
            return [(f["type"], f.get("from"), f.get("content")) for f in frames]

        assert await received(3) == [
            ("system", None, "Sage joined the chat"),
            ("message", "Sage", "done"),
            ("system", None, "The models are quiet: the turn budget is spent."),
        ]
        await baseline.send(json.dumps({"type": "bogus"}))
        assert await received(1) == [("system", None, "Unknown frame type 'bogus'.")]
        # A marker: the next frame is a join, so nothing else was on its way before it.
        latecomer, _ = await join(hub.url, "Latecomer", "human")
        assert await received(1) == [("system", None, "Latecomer joined the chat")]
        await close_all(baseline, model, latecomer)

    with_hub(hub_config(tmp_path), body)
