"""Spectators against a live hub: they watch everything and change nothing."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from helpers import ROOT, close_all, drain, hub_config, join, next_frame, say, with_hub
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from partychat.hub.transcript import read_records


async def spectate(url: str, **extra: object) -> tuple[ClientConnection, dict]:
    ws = await connect(url)
    await ws.send(json.dumps({"type": "spectator", "protocol": 1, **extra}))
    return ws, json.loads(await ws.recv())


def test_a_spectator_is_not_announced_not_named_and_gets_what_a_streaming_human_gets(tmp_path):
    async def body(hub):
        chair, _ = await join(hub.url, "Chair", "human", protocol=1, stream=True)
        model, _ = await join(hub.url, "Sage", "model", protocol=1)
        await drain(chair)
        watcher, welcome = await spectate(hub.url)
        assert welcome["event"] == "welcome" and welcome["room"] and "session" not in welcome
        first = await drain(watcher)
        assert [f["type"] for f in first] == ["turn", "presence"]
        assert [p["name"] for p in first[1]["participants"]] == ["Chair", "Sage"]
        assert first[1]["spectators"] == 1
        # Nobody hears of the spectator but through the count, which comes once and a moment later.
        later = await drain(chair, quiet=1.5)
        assert [(f["type"], f.get("spectators")) for f in later] == [("presence", 1)]
        assert not [f for f in await drain(model) if f["type"] == "system"]

        await chair.send(json.dumps({"type": "command", "name": "who", "args": []}))
        roster = await next_frame(chair, "roster")
        assert [p["name"] for p in roster["participants"]] == ["Chair", "Sage"]
        assert roster["spectators"] == 1

        await say(chair, "Sage, your view?")
        await next_frame(model, "turn", speakers=["Sage"])
        await model.send(json.dumps({"type": "partial", "content": "Slowly. "}))
        await model.send(json.dumps({"type": "message", "content": "Slowly. Then all at once."}))
        kinds = ["message", "partial", "message"]
        for ws in (chair, watcher):
            frames = [f for f in await drain(ws) if f["type"] in ("message", "partial")]
            assert [f["type"] for f in frames] == kinds
            assert frames[1]["from"] == "Sage" and frames[2]["content"] == "Slowly. Then all at once."
        await close_all(chair, model, watcher)

    with_hub(hub_config(tmp_path), body)
    events = [r.data.get("event") for r in read_records(tmp_path / "transcript.jsonl") if r.kind == "event"]
    assert events.count("join") == 2, "only the two participants were announced"


def test_whatever_a_spectator_sends_is_refused_and_the_room_is_unchanged(tmp_path):
    async def body(hub):
        chair, _ = await join(hub.url, "Chair", "human", protocol=1)
        watcher, _ = await spectate(hub.url)
        await drain(chair, quiet=1.5)
        for frame in ({"type": "message", "content": "hello"}, {"type": "command", "name": "pause", "args": []},
                      {"name": "Sneaky", "type": "human"}, "not even json"):
            await watcher.send(frame if isinstance(frame, str) else json.dumps(frame))
            refusal = await next_frame(watcher, "error")
            assert refusal["code"] == "watch_only" and "watch" in refusal["content"]
        assert await drain(chair) == []
        await chair.send(json.dumps({"type": "command", "name": "who", "args": []}))
        roster = await next_frame(chair, "roster")
        assert [p["name"] for p in roster["participants"]] == ["Chair"] and roster["floor"]["paused"] is False
        # A spectator that keeps at it is shown the door.
        for _ in range(60):
            await watcher.send(json.dumps({"type": "message", "content": "spam"}))
        try:
            while True:
                await asyncio.wait_for(watcher.recv(), 10)
        except ConnectionClosed:
            pass
        assert watcher.close_code == 1008
        await close_all(chair)

    with_hub(hub_config(tmp_path), body)
    records = read_records(tmp_path / "transcript.jsonl")
    assert not [r for r in records if r.kind in ("message", "withheld")]


def test_spectators_have_their_own_limit_and_need_the_room_token(tmp_path):
    async def body(hub):
        watchers = []
        for _ in range(2):
            ws, welcome = await spectate(hub.url, token="s3cret")
            assert welcome["event"] == "welcome"
            watchers.append(ws)
        third, refusal = await spectate(hub.url, token="s3cret")
        assert refusal["code"] == "room_full" and "watching" in refusal["content"]
        await asyncio.wait_for(third.wait_closed(), 10)
        assert third.close_code == 1013
        stranger, refusal = await spectate(hub.url)
        assert refusal["code"] == "unauthorized"
        await asyncio.wait_for(stranger.wait_closed(), 10)
        # Participants are counted apart: the room still takes them.
        chair, welcome = await join(hub.url, "Chair", "human", token="s3cret")
        assert welcome["content"] == "Connected as Chair"
        await close_all(chair, *watchers)

    with_hub(hub_config(tmp_path, max_spectators=2, token="s3cret"), body)


def test_a_returning_spectator_gets_exactly_what_it_missed(tmp_path):
    async def body(hub):
        chair, _ = await join(hub.url, "Chair", "human", protocol=1)
        await say(chair, "one")
        watcher, _ = await spectate(hub.url)
        seen = [f["seq"] for f in await drain(watcher) if f["type"] == "message"]
        assert seen == [1]
        await watcher.close()
        await say(chair, "two")
        await say(chair, "three")
        await next_frame(chair, "message", content="three")
        back, _ = await spectate(hub.url, last_seq=1)
        missed = [f for f in await drain(back) if f["type"] == "message"]
        assert [(f["seq"], f["content"], f.get("replay")) for f in missed] == [(2, "two", True), (3, "three", True)]
        await close_all(chair, back)

    with_hub(hub_config(tmp_path), body)


def test_a_crowd_of_spectators_costs_a_few_count_updates_not_one_per_join(tmp_path):
    async def body(hub):
        chair, _ = await join(hub.url, "Chair", "human", protocol=1, stream=True)
        await drain(chair)
        crowd = await asyncio.gather(*(spectate(hub.url) for _ in range(60)))
        frames = await drain(chair, quiet=1.5)
        assert all(f["type"] == "presence" for f in frames)
        assert 1 <= len(frames) <= 3 and frames[-1]["spectators"] == 60
        await close_all(chair, *(ws for ws, _ in crowd))

    with_hub(hub_config(tmp_path), body)


def test_the_hub_raises_its_open_file_limit_to_hold_every_spectator():
    """Many systems start processes with room for 1024 files: fewer than the default --max-spectators."""
    resource = pytest.importorskip("resource")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"this system allows only {hard} open files")
    check = ("import resource; from partychat.hub.cli import allow_enough_open_files; "
             "allow_enough_open_files(1064); print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60, cwd=ROOT,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)))
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 1064
