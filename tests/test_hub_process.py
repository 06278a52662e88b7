"""The hub as a real process: kill -9, clean stop on SIGTERM, TLS, and arbitrary frames."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import ssl
import subprocess
import sys

import pytest
from helpers import hub_config, join, make_certificate, next_frame, say, script, speaker_and_listener, with_hub
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect

from partychat.hub.transcript import read_records
from partychat.protocol import ProtocolError, parse_client_frame, parse_hello


def test_a_killed_hub_loses_no_message_it_relayed(tmp_path, start_hub):
    transcript = tmp_path / "t.jsonl"
    hub, url = start_hub("--transcript", str(transcript), "--rate-limit", "0")

    async def talk() -> list[str]:
        speaker, listener = await speaker_and_listener(url)
        relayed = []
        for n in range(50):
            await speaker.send(json.dumps({"type": "message", "content": f"line {n}"}))
        for _ in range(50):
            relayed.append((await next_frame(listener, "message"))["content"])
        hub.popen.send_signal(signal.SIGKILL)
        hub.popen.wait(timeout=10)
        return relayed

    relayed = asyncio.run(talk())
    stored = [r.data["content"] for r in read_records(transcript) if r.kind == "message"]
    assert relayed == [f"line {n}" for n in range(50)]
    assert stored == relayed


def test_sigterm_tells_the_room_flushes_and_exits_zero(tmp_path, start_hub):
    transcript = tmp_path / "t.jsonl"
    hub, url = start_hub("--transcript", str(transcript))

    async def scenario() -> dict:
        ws, _ = await join(url, "Watcher", "human", protocol=1)
        hub.popen.send_signal(signal.SIGTERM)
        return await next_frame(ws, "system", event="shutdown")

    notice = asyncio.run(scenario())
    assert "stopping" in notice["content"]
    assert hub.popen.wait(timeout=15) == 0
    assert read_records(transcript)[-1].data["event"] == "shutdown"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_hub_serves_wss_and_clients_trust_a_given_ca(tmp_path, start_hub):
    cert, key = make_certificate(tmp_path)
    _, url = start_hub("--certfile", str(cert), "--keyfile", str(key))
    assert url.startswith("wss://")

    async def scenario() -> None:
        context = ssl.create_default_context(cafile=str(cert))
        async with connect(url, ssl=context) as ws:
            await ws.send(json.dumps({"name": "Secure", "type": "human"}))
            assert json.loads(await ws.recv())["content"] == "Connected as Secure"
        with pytest.raises(ssl.SSLCertVerificationError):
            async with connect(url):
                pass

    asyncio.run(scenario())
    result = subprocess.run([sys.executable, script("moderator.py"), "--server", url, "--ca-file", str(cert)],
                            input="/quit\n", capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert "Connected to wss://" in result.stdout, result.stdout + result.stderr


frames = st.one_of(
    st.text(max_size=300),
    st.binary(max_size=300),
    st.dictionaries(
        st.sampled_from(["type", "content", "name", "args", "from", "seq", "opening", "protocol", "token"]),
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=50),
                  st.lists(st.text(max_size=5), max_size=3), st.sampled_from(["message", "partial", "command"])),
        max_size=5,
    ).map(json.dumps),
)


@given(frames)
def test_the_parsers_accept_or_refuse_but_never_crash(frame):
    for parse in (parse_client_frame, parse_hello):
        try:
            parse(frame)
        except ProtocolError as error:
            assert error.message and error.code


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(frames, min_size=1, max_size=8))
def test_a_live_hub_survives_arbitrary_frames_and_healthy_peers_keep_receiving(tmp_path, batch):
    async def body(hub):
        attacker, _ = await join(hub.url, "Fuzzer", "model", protocol=1)
        listener, _ = await join(hub.url, "Listener", "human")
        speaker, _ = await join(hub.url, "Moderator", "human")
        for frame in batch:
            try:
                await attacker.send(frame)
            except Exception:
                break
        await say(speaker, "still alive?")
        frame = await next_frame(listener, "message", content="still alive?")
        assert frame["from"] == "Moderator"
        late, reply = await join(hub.url, "Late", "human")
        assert reply["content"] == "Connected as Late"
        for ws in (attacker, listener, speaker, late):
            await ws.close()

    with_hub(hub_config(tmp_path), body, timeout=20)
