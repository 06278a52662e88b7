"""The hub's rules against a live hub: bad frames, limits, tokens, replay, resume, slow readers."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket

import pytest
from helpers import close_all, drain, hub_config, join, next_frame, say, speaker_and_listener, with_hub
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from partychat.hub.transcript import read_records

BAD_FRAMES = [
    ("{not json", "bad_json"),
    (b"\x00\x01binary", "binary_frame"),
    (json.dumps({"type": "message", "content": 42}), "bad_frame"),
    (json.dumps({"type": "message"}), "bad_frame"),
    (json.dumps({"type": "dance", "content": "x"}), "unknown_type"),
    (json.dumps({"type": "message", "content": "   \n "}), "empty"),
    (json.dumps({"type": "message", "content": "x" * 1500}), "too_large"),
    (json.dumps([1, 2, 3]), "bad_frame"),
    (json.dumps({"type": "command", "name": "pause", "args": "not a list"}), "bad_frame"),
]


@pytest.mark.parametrize(("frame", "code"), BAD_FRAMES)
def test_each_bad_frame_gets_a_coded_error_and_keeps_the_connection(tmp_path, frame, code):
    config = hub_config(tmp_path)
    config.max_message_bytes = 1000

    async def body(hub):
        ws, _ = await join(hub.url, "Tester", "human", protocol=1)
        listener, _ = await join(hub.url, "Listener", "human")
        await ws.send(frame)
        error = await next_frame(ws, "error")
        assert error["code"] == code
        assert error["content"].endswith(".") and len(error["content"]) > 10
        await say(ws, "after the bad frame")
        relayed = await next_frame(listener, "message")
        assert relayed["content"] == "after the bad frame"
        await ws.close()
        await listener.close()

    with_hub(config, body)
    messages = [r for r in read_records(config.transcript) if r.kind == "message"]
    assert [r.data["content"] for r in messages] == ["after the bad frame"]


def test_baseline_clients_get_errors_as_system_frames(tmp_path):
    async def body(hub):
        ws, _ = await join(hub.url, "Old Client", "human")
        await ws.send("{not json")
        frame = await next_frame(ws, "system", event="error")
        assert frame["code"] == "bad_json" and "not valid JSON" in frame["content"]
        await ws.close()

    with_hub(hub_config(tmp_path), body)


def test_a_grossly_oversized_frame_closes_with_1009(tmp_path):
    config = hub_config(tmp_path)
    config.max_message_bytes = 1000

    async def body(hub):
        ws, _ = await join(hub.url, "Tester", "human", protocol=1)
        await say(ws, "x" * 10_000)
        with pytest.raises(ConnectionClosed):
            while True:
                await ws.recv()
        assert ws.close_code == 1009

    with_hub(config, body)


def test_bursts_beyond_the_rate_are_refused_and_floods_are_cut_off(tmp_path):
    async def body(hub):
        ws, _ = await join(hub.url, "Chatty", "human", protocol=1)
        for n in range(5):
            await ws.send(json.dumps({"type": "message", "content": f"m{n}"}))
        await say(ws, "one too many")
        error = await next_frame(ws, "error")
        assert error["code"] == "rate_limited"
        with pytest.raises(ConnectionClosed):
            for n in range(100):
                await ws.send(json.dumps({"type": "message", "content": f"flood {n}"}))
                await asyncio.sleep(0)
            while True:
                await ws.recv()
        assert ws.close_code == 1008

    with_hub(hub_config(tmp_path, rate_per_second=0.01, rate_burst=5), body)


def test_too_many_participants_are_refused_with_try_again_later(tmp_path):
    async def body(hub):
        first, _ = await join(hub.url, "One", "human")
        second, _ = await join(hub.url, "Two", "human")
        third, reply = await join(hub.url, "Three", "human")
        assert reply["code"] == "room_full"
        with pytest.raises(ConnectionClosed):
            await third.recv()
        assert third.close_code == 1013
        await first.close()
        await second.close()

    with_hub(hub_config(tmp_path, max_clients=2), body)


@pytest.mark.parametrize("offered", [None, "wrong", "s3cret "])
def test_a_hub_with_a_token_refuses_clients_without_the_right_one(tmp_path, offered):
    async def body(hub):
        extra = {"token": offered} if offered is not None else {}
        ws, reply = await join(hub.url, "Guest", "human", **extra)
        assert reply["type"] == "system" and reply["code"] == "unauthorized"
        assert "--token" in reply["content"]
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        ok, welcome = await join(hub.url, "Member", "human", token="s3cret")
        assert welcome["content"] == "Connected as Member"
        await ok.close()

    with_hub(hub_config(tmp_path, token="s3cret"), body)


def test_only_holders_of_the_moderator_token_may_command(tmp_path):
    async def body(hub):
        guest, _ = await join(hub.url, "Guest", "human", protocol=1)
        await guest.send(json.dumps({"type": "command", "name": "pause", "args": []}))
        assert (await next_frame(guest, "error"))["code"] == "not_moderator"
        host, _ = await join(hub.url, "Host", "human", protocol=1, moderator_token="mod")
        await host.send(json.dumps({"type": "command", "name": "pause", "args": []}))
        assert (await next_frame(guest, "turn"))["paused"] is True
        await guest.close()
        await host.close()

    with_hub(hub_config(tmp_path, moderator_token="mod"), body)


def test_names_are_trimmed_and_the_hub_decides_roles(tmp_path):
    async def body(hub):
        ws, reply = await join(hub.url, "  Zen \t Sage  ", "model", protocol=1, role="human", seq=99)
        assert reply["content"] == "Connected as Zen Sage"
        watcher, _ = await join(hub.url, "Watcher", "human", protocol=1)
        await watcher.send(json.dumps({"type": "message", "content": "hi", "seq": 1234, "role": "model",
                                       "id": "forged", "from": "Zen Sage"}))
        frame = await next_frame(ws, "message")
        assert (frame["from"], frame["role"], frame["seq"]) == ("Watcher", "human", 1)
        assert frame["id"] != "forged"
        await ws.close()
        await watcher.close()

    with_hub(hub_config(tmp_path), body)


def test_late_joiners_get_recent_history_and_reconnects_get_exactly_what_they_missed(tmp_path):
    async def body(hub):
        speaker, _ = await join(hub.url, "Moderator", "human")
        for n in range(1, 8):
            await speaker.send(json.dumps({"type": "message", "content": f"message {n}"}))
        watcher, _ = await join(hub.url, "Watcher", "human", protocol=1)
        replayed = [f for f in await drain(watcher) if f["type"] == "message"]
        assert [f["content"] for f in replayed] == [f"message {n}" for n in range(5, 8)]
        assert all(f["replay"] for f in replayed)
        await watcher.close()
        for n in range(8, 11):
            await speaker.send(json.dumps({"type": "message", "content": f"message {n}"}))
        back, _ = await join(hub.url, "Watcher", "human", protocol=1, last_seq=7)
        missed = [f for f in await drain(back) if f["type"] == "message"]
        assert [f["seq"] for f in missed] == [8, 9, 10]
        await back.close()
        await speaker.close()

    with_hub(hub_config(tmp_path, replay=3), body)


def test_baseline_model_clients_get_no_replay(tmp_path):
    """The original client answers every message it receives, so replaying history to it would flood the room."""

    async def body(hub):
        speaker, _ = await join(hub.url, "Moderator", "human")
        await say(speaker, "before")
        model, _ = await join(hub.url, "Old Model", "model")
        assert [f for f in await drain(model) if f["type"] == "message"] == []
        await model.close()
        await speaker.close()

    with_hub(hub_config(tmp_path), body)


def test_a_restarted_hub_resumes_the_conversation_and_its_numbering(tmp_path):
    config = hub_config(tmp_path)

    async def first(hub):
        speaker, listener = await speaker_and_listener(hub.url)
        for n in range(1, 4):
            await speaker.send(json.dumps({"type": "message", "content": f"before restart {n}"}))
            await next_frame(listener, "message")
        await speaker.close()
        await listener.close()

    with_hub(config, first)
    config.resume = config.transcript
    config.transcript = None

    async def second(hub):
        watcher, _ = await join(hub.url, "Watcher", "human", protocol=1, last_seq=1)
        replayed = [f for f in await drain(watcher) if f["type"] == "message"]
        assert [f["seq"] for f in replayed] == [2, 3]
        speaker, _ = await join(hub.url, "Moderator", "human")
        await say(speaker, "after restart")
        frame = await next_frame(watcher, "message", content="after restart")
        assert frame["seq"] == 4
        await speaker.close()
        await watcher.close()

    with_hub(config, second)
    seqs = [r.seq for r in read_records(config.resume) if r.kind == "message"]
    assert seqs == [1, 2, 3, 4]


def test_a_torn_last_line_in_a_transcript_is_skipped_on_resume(tmp_path):
    path = tmp_path / "torn.jsonl"
    path.write_text('{"kind":"message","from":"A","content":"whole","seq":1}\n{"kind":"message","from":"B","con')
    config = hub_config(tmp_path)
    config.transcript = None
    config.resume = path

    async def body(hub):
        speaker, listener = await speaker_and_listener(hub.url)
        await say(speaker, "next")
        assert (await next_frame(listener, "message", content="next"))["seq"] == 2
        await speaker.close()
        await listener.close()

    with_hub(config, body)
    assert [r.data["content"] for r in read_records(path) if r.kind == "message"] == ["whole", "next"]


def _stalled_socket(url: str) -> socket.socket:
    """A TCP connection with a tiny receive buffer, so a reader that never reads stalls quickly."""
    host, port = url.removeprefix("ws://").rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.setblocking(False)
    return sock


def test_a_reader_that_stalls_is_cut_off_and_the_others_get_everything(tmp_path):
    config = hub_config(tmp_path, max_buffered_bytes=256 * 1024, rate_per_second=0)

    async def body(hub):
        stalled = await connect(hub.url, sock=_stalled_socket(hub.url), max_queue=1)
        await stalled.send(json.dumps({"name": "Stalled", "type": "human"}))
        healthy = [(await join(hub.url, f"Healthy {n}", "human"))[0] for n in range(3)]
        speaker, _ = await join(hub.url, "Moderator", "human")
        text = base64.b64encode(os.urandom(15_000)).decode()  # incompressible, so it fills buffers

        async def read_all(ws) -> int:
            for n in range(400):
                frame = await next_frame(ws, "message", timeout=20)
                assert frame["content"].startswith(f"{n} ")
            return 400

        readers = [asyncio.create_task(read_all(ws)) for ws in healthy]
        for n in range(400):
            await speaker.send(json.dumps({"type": "message", "content": f"{n} {text}"}))
            await asyncio.sleep(0.001)
        assert await asyncio.gather(*readers) == [400, 400, 400]
        assert hub.room.find("Stalled") is None, "the stalled reader should have been disconnected"
        for ws in [*healthy, speaker]:
            await ws.close()
        stalled.transport.abort()

    with_hub(config, body)


def test_a_peer_that_stops_answering_pings_is_noticed_and_removed(tmp_path):
    config = hub_config(tmp_path)
    config.ping_interval = 0.3
    config.ping_timeout = 0.3

    async def body(hub):
        watcher, _ = await join(hub.url, "Watcher", "human")
        silent, _ = await join(hub.url, "Silent", "human")
        silent.transport.pause_reading()  # it no longer reads, so it never answers a ping
        left = await next_frame(watcher, "system", timeout=10, event="leave")
        assert left["content"] == "Silent left the chat"
        assert hub.room.find("Silent") is None
        # a healthy peer kept answering pings all along
        assert hub.room.find("Watcher") is not None
        silent.transport.abort()
        await watcher.close()

    with_hub(config, body)


def test_a_kicked_peer_cannot_speak_on_before_its_connection_closes(tmp_path):
    async def body(hub):
        speaker, listener = await speaker_and_listener(hub.url)
        victim, _ = await join(hub.url, "Victim", "human")
        victim.transport.pause_reading()  # it ignores the closing handshake and keeps sending
        await speaker.send(json.dumps({"type": "command", "name": "kick", "args": ["Victim"]}))
        await next_frame(listener, "system", event="leave")
        for n in range(5):
            await say(victim, f"still talking {n}")
        await say(speaker, "after the kick")
        frame = await next_frame(listener, "message")
        assert frame["content"] == "after the kick"
        victim.transport.abort()
        await close_all(speaker, listener)

    config = hub_config(tmp_path)
    with_hub(config, body)
    spoken = [(r.data["from"], r.data["content"]) for r in read_records(config.transcript) if r.kind == "message"]
    assert spoken == [("Moderator", "after the kick")], "nothing the kicked peer sent may enter the conversation"


def test_a_client_with_its_session_secret_takes_over_its_stale_connection(tmp_path):
    async def body(hub):
        watcher, _ = await join(hub.url, "Watcher", "human")
        old, welcome = await join(hub.url, "Sage", "model", protocol=1)
        assert welcome["session"] and welcome["room"]
        old.transport.pause_reading()  # the hub has not noticed this connection is dead
        await drain(watcher)
        _, refused = await join(hub.url, "Sage", "model", protocol=1, session="guess")
        assert refused["code"] == "name_taken"
        new, again = await join(hub.url, "sage", "model", protocol=1, session=welcome["session"])
        assert again["content"] == "Connected as sage" and again["room"] == welcome["room"]
        assert again["session"] != welcome["session"]
        assert [f for f in await drain(watcher) if f.get("event") in ("join", "leave")] == []
        old.transport.abort()
        await close_all(watcher, new)

    with_hub(hub_config(tmp_path), body)


def test_a_model_that_holds_the_turn_and_never_answers_loses_it(tmp_path):
    async def body(hub):
        moderator, _ = await join(hub.url, "Moderator", "human", protocol=1)
        sleepy, _ = await join(hub.url, "Sleepy", "model", protocol=1)
        lively, _ = await join(hub.url, "Lively", "model", protocol=1)
        await say(moderator, "anyone?")
        await next_frame(moderator, "turn", speakers=["Sleepy"])
        passed = await next_frame(moderator, "system", event="pass", timeout=5)
        assert "Sleepy did not answer" in passed["content"]
        await next_frame(lively, "turn", speakers=["Lively"])
        await close_all(moderator, sleepy, lively)

    with_hub(hub_config(tmp_path, turn_timeout=0.5), body)


def test_text_that_is_not_valid_unicode_is_refused_without_harm(tmp_path):
    config = hub_config(tmp_path)

    async def body(hub):
        speaker, listener = await speaker_and_listener(hub.url)
        await speaker.send('{"type": "message", "content": "\\ud800"}')
        frame = await next_frame(speaker, "system", event="error")
        assert frame["code"] == "bad_frame"
        await say(speaker, "fine now")
        assert (await next_frame(listener, "message"))["seq"] == 1
        await close_all(speaker, listener)

    with_hub(config, body)
    assert [r.seq for r in read_records(config.transcript) if r.kind == "message"] == [1]


def test_numbers_from_another_conversation_get_the_recent_history_instead(tmp_path):
    async def body(hub):
        speaker, _ = await join(hub.url, "Moderator", "human")
        for text in ("one", "two"):
            await say(speaker, text)
        back, _ = await join(hub.url, "Watcher", "human", protocol=1, last_seq=57)
        replayed = [f["content"] for f in await drain(back) if f["type"] == "message"]
        assert replayed == ["one", "two"]
        await close_all(speaker, back)

    with_hub(hub_config(tmp_path), body)


def test_a_peer_that_keeps_sending_bad_frames_is_closed(tmp_path):
    async def body(hub):
        ws, _ = await join(hub.url, "Noisy", "human", protocol=1)
        with pytest.raises(ConnectionClosed):
            for _ in range(200):
                await ws.send("{broken")
                await asyncio.sleep(0)
            while True:
                await ws.recv()
        assert ws.close_code == 1008

    with_hub(hub_config(tmp_path, rate_per_second=0), body)


@pytest.mark.parametrize(("args", "needle"), [(["²"], "whole number"), (["5000"], "whole number"),
                                              (["Sage", " "], "message is missing")])
def test_bad_command_arguments_get_a_sentence_not_a_crash(tmp_path, args, needle):
    async def body(hub):
        moderator, _ = await join(hub.url, "Moderator", "human", protocol=1)
        model, _ = await join(hub.url, "Sage", "model", protocol=1)
        name = "to" if args[0] == "Sage" else "turns"
        await moderator.send(json.dumps({"type": "command", "name": name, "args": args}))
        error = await next_frame(moderator, "error")
        assert error["code"] == "bad_argument" and needle in error["content"]
        await say(moderator, "still here")
        assert (await next_frame(model, "message"))["content"] == "still here"
        await close_all(moderator, model)

    with_hub(hub_config(tmp_path), body)
