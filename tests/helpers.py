"""Test helpers: real hubs on free ports, real websocket clients, real processes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

from websockets.asyncio.client import ClientConnection, connect

from partychat.hub.server import Hub, HubConfig
from partychat.hub.settings import RoomSettings

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def under_ci() -> bool:
    """True in a CI run (CI set, as CI services and .ci/run's caller do), where nothing may be quietly skipped."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(reason: str) -> NoReturn:
    """Skip a test whose tool or resource is missing here, or fail it under CI, where a skip would go unseen."""
    import pytest

    if under_ci():
        pytest.fail(f"{reason} (under CI this fails instead of skipping)", pytrace=False)
    pytest.skip(reason)


def script(name: str) -> str:
    """The full path of one of our scripts, so a test can start it from its own folder, not the checkout."""
    return str(ROOT / name)


def hub_config(tmp_path: Path, **room: Any) -> HubConfig:
    """A hub on a free loopback port that writes its transcript under tmp_path."""
    return HubConfig(host="127.0.0.1", port=0, room=RoomSettings(**room),
                     transcript=tmp_path / "transcript.jsonl", logs_dir=tmp_path)


def with_hub(config: HubConfig, body: Callable[[Hub], Awaitable[None]], timeout: float = 60) -> None:
    """Run ``body`` against an in-process hub, then shut the hub down."""

    async def main() -> None:
        async with Hub(config) as hub:
            await asyncio.wait_for(body(hub), timeout)

    asyncio.run(main())


async def join(url: str, name: str, kind: str = "model", **extra: Any) -> tuple[ClientConnection, dict]:
    """Connect and register; returns the connection and the hub's registration reply."""
    ws = await connect(url)
    await ws.send(json.dumps({"name": name, "type": kind, **extra}))
    return ws, json.loads(await ws.recv())


async def speaker_and_listener(url: str) -> tuple[ClientConnection, ClientConnection]:
    """A baseline moderator who talks and a baseline human who only listens."""
    speaker, _ = await join(url, "Moderator", "human")
    listener, _ = await join(url, "Listener", "human")
    return speaker, listener


async def say(ws: ClientConnection, text: str) -> None:
    await ws.send(json.dumps({"type": "message", "content": text}))


async def close_all(*connections: ClientConnection) -> None:
    for ws in connections:
        await ws.close()


async def next_frame(ws: ClientConnection, kind: str | None = None, timeout: float = 10, **match: Any) -> dict:
    """The next frame of a type (and with matching fields), skipping others."""
    deadline = time.monotonic() + timeout
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), max(deadline - time.monotonic(), 0.01)))
        if (kind is None or frame.get("type") == kind) and all(frame.get(k) == v for k, v in match.items()):
            return frame


async def drain(ws: ClientConnection, quiet: float = 0.3) -> list[dict]:
    """Every frame that arrives until the connection has been quiet for ``quiet`` seconds."""
    frames = []
    while True:
        try:
            frames.append(json.loads(await asyncio.wait_for(ws.recv(), quiet)))
        except asyncio.TimeoutError:
            return frames


async def command(ws: ClientConnection, name: str, *args: str) -> None:
    await ws.send(json.dumps({"type": "command", "name": name, "args": list(args)}))


async def model_messages(ws: ClientConnection, count: int, timeout: float = 90) -> list[dict]:
    got = []
    while len(got) < count:
        frame = await next_frame(ws, "message", timeout=timeout)
        if frame["role"] == "model" and not frame.get("replay"):
            got.append(frame)
    return got


async def quiet_then_marker(ws: ClientConnection, timeout: float = 180, *, after: str | None = "quiet") -> list[dict]:
    """What models said (messages and partials) until the hub's ``after`` event, then until a marker comes back.

    Positive events instead of a timed window that a late frame on a loaded machine can miss: the hub's
    ``quiet`` event says no model holds the turn any more (``leave``: the model is gone; None: the caller
    has its own proof that the models stopped), and the roster answering a ``/who`` sent after it shows
    that every frame the hub sent before the marker has arrived. ``ws`` must be a moderator.
    """
    said: list[dict] = []

    async def until(kind: str, **match: Any) -> None:
        while True:
            frame = await next_frame(ws, timeout=timeout)
            if frame.get("replay"):
                continue
            if frame["type"] == "partial" or (frame["type"] == "message" and frame.get("role") == "model"):
                said.append(frame)
            if frame["type"] == kind and all(frame.get(k) == v for k, v in match.items()):
                return

    if after is not None:
        await until("system", event=after)
    await command(ws, "who")
    await until("roster")
    return said


def model_lines(transcript: Path) -> list[tuple[str, str]]:
    """(speaker, text) of every model message the transcript holds as said in the room."""
    from partychat.hub.transcript import read_records

    return [(r.data["from"], r.data["content"]) for r in read_records(transcript)
            if r.kind == "message" and r.data.get("role") == "model"]


class Process:
    """A script of ours run as a real process, with its output collected in a file.

    It runs in ``cwd``, by default the folder of its log (the test's tmp_path), so that whatever a
    script writes to a relative path by default (``logs/``, ``/save``) stays out of the checkout.
    """

    def __init__(self, args: list[str], log: Path, *, stdin: Any = subprocess.DEVNULL,
                 env: dict[str, str] | None = None, cwd: Path | None = None, python: str | None = PYTHON) -> None:
        """``python`` None runs ``args`` as a program of its own (an installed console script)."""
        self.log = log
        self._out = log.open("wb")
        self.popen = subprocess.Popen([python, *args] if python else args, cwd=cwd or log.parent, stdout=self._out,
                                      stderr=subprocess.STDOUT, stdin=stdin, env={**os.environ, **(env or {})})

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_output(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.output)
            if found:
                return found
            if self.popen.poll() is not None:
                found = re.search(pattern, self.output)
                if found:
                    return found
                raise AssertionError(f"process exited ({self.popen.returncode}) before {pattern!r}:\n{self.output}")
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.output}")

    def type_line(self, text: str) -> None:
        """Write one line to the process's standard input (started with ``stdin=subprocess.PIPE``)."""
        self.popen.stdin.write(text.encode() + b"\n")
        self.popen.stdin.flush()

    def interrupt(self) -> int:
        self.popen.send_signal(signal.SIGINT)
        return self.popen.wait(timeout=60)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._out.close()


def build_tiny_model(folder: Path) -> Path:
    """A two-layer Llama with random weights and the embedded model's tokenizer, saved as a model folder.

    It is fast, and it never stops on its own (it has no end-of-text token), so a generation lasts
    as long as a test needs it to.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from partychat.engines.models import converted_folder, embedded_gguf

    tokenizer = AutoTokenizer.from_pretrained(converted_folder(embedded_gguf()))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         eos_token_id=None, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, made with the openssl command."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    return cert, key
