"""Personas on OpenAI-compatible servers: llama-cpp-python's server and transformers serve, run for real.

Each server starts once per module on a loopback port, serving the embedded model (the GGUF for
llama.cpp, its converted folder for transformers); transformers serve also serves the tiny test
model, which never stops by itself, so a reply lasts until something stops it. Nothing touches
the Hugging Face Hub (HF_HUB_OFFLINE=1, HF_HOME under the test's temporary folder).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from helpers import Process, build_tiny_model, hub_config, join, next_frame

from partychat.engines.base import ChatRequest
from partychat.engines.llama_cpp_engine import LlamaCppChatModel
from partychat.engines.models import converted_folder, embedded_gguf
from partychat.engines.openai_engine import OpenAIChatModel, SlotMap, estimate_tokens, match_model, server_root
from partychat.engines.registry import EngineOptions, open_chat_model
from partychat.hub.server import Hub
from partychat.persona.cli import read_persona
from partychat.persona.generation import GenerationSettings
from partychat.persona.participant import ModelParticipant, ParticipantConfig

API_KEY = "test-key"
LLAMA_MODEL = "smollm2"
STORY = "Tell me a very long story about a dragon. Make it at least twenty sentences long."
FACTS = "Give three short facts about the moon."
PERSONAS = {"Zen Sage": "sage", "TinkerBot": "inventor", "Historian": "historian"}


@dataclass
class ModelServer:
    process: Process
    base_url: str
    models: list[str]

    @property
    def log(self) -> str:
        return self.process.output


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http(url: str, body: dict | None = None, key: str | None = None, timeout: float = 10) -> bytes:
    """A plain request, for the tests' own checks (the engine under test uses the openai package)."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=timeout) as answer:
        return answer.read()


def wait_until_up(process: Process, url: str, key: str | None = None, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise AssertionError(f"the server exited ({process.popen.returncode}):\n{process.output}")
        try:
            http(url, key=key, timeout=5)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    raise AssertionError(f"the server did not answer {url} within {timeout} s:\n{process.output}")


def start_llama_server(log: Path, port: int, key: str | None = API_KEY) -> ModelServer:
    args = ["-m", "llama_cpp.server", "--model", str(embedded_gguf()), "--model_alias", LLAMA_MODEL,
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--n_threads", "2"]
    process = Process([*args, *(["--api_key", key] if key else [])], log)
    wait_until_up(process, f"http://127.0.0.1:{port}/v1/models", key=key)
    return ModelServer(process, f"http://127.0.0.1:{port}/v1", [LLAMA_MODEL])


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    server = start_llama_server(tmp_path_factory.mktemp("llama") / "server.log", free_port())
    yield server
    server.process.stop()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def transformers_server(tmp_path_factory, tiny_folder):
    """transformers serve with the embedded model's converted folder and the tiny model loaded."""
    folder = tmp_path_factory.mktemp("transformers")
    port = free_port()
    process = Process(["-m", "transformers.cli.transformers", "serve", "--host", "127.0.0.1", "--port", str(port),
                       "--device", "cpu", "--model-timeout", "-1", "--default-seed", "0"], folder / "server.log",
                      env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(folder / "hf-home")})
    try:
        wait_until_up(process, f"http://127.0.0.1:{port}/health")
        models = [str(converted_folder(embedded_gguf())), str(tiny_folder)]
        for model in models:  # loaded now, so /v1/models lists them (it lists only loaded local folders)
            answer = http(f"http://127.0.0.1:{port}/load_model", {"model": model}, timeout=300).decode()
            assert '"ready"' in answer, answer
        yield ModelServer(process, f"http://127.0.0.1:{port}/v1", models)
    finally:
        process.stop()


SERVERS = ("llama_server", "transformers_server")


def in_room(tmp_path: Path, body, timeout: float):
    """Run ``body(hub)`` against an in-process hub on a free port and return what it returns.

    The hub runs without guards: greedy personas on one small model often echo each other, which the
    guards rightly hold back (tests/test_guards.py); these tests count what the engines say.
    """

    async def main():
        async with Hub(hub_config(tmp_path, guards=False)) as hub:
            return await asyncio.wait_for(body(hub), timeout)

    return asyncio.run(main())


def persona_args(server: ModelServer, hub_url: str, *extra: str) -> list[str]:
    return ["--name", "Sage", "--server", hub_url, "--api-base", server.base_url, "--model", server.models[0],
            "--temperature", "0", *extra]


async def moderator(url: str):
    ws, _ = await join(url, "Moderator", "human", protocol=1, stream=True)
    return ws


async def wait_joined(client: Process) -> None:
    await asyncio.to_thread(client.wait_for_output, r"joined ws://", 120)


async def collect_reply(ws, name: str, timeout: float = 180) -> tuple[list[dict], dict]:
    """The partial frames of ``name``'s reply, then its message (or a pass, as a system frame)."""
    partials = []
    deadline = time.monotonic() + timeout
    while True:
        frame = await next_frame(ws, timeout=deadline - time.monotonic())
        if frame.get("type") == "partial" and frame.get("from") == name:
            partials.append(frame)
        elif is_reply(frame, [name]):
            return partials, frame


def is_pass(frame: dict, name: str) -> bool:
    return frame.get("type") == "system" and frame.get("event") == "pass" and frame["content"].startswith(name)


def reply_tokens(text: str) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted_folder(embedded_gguf()))
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("server_name", SERVERS)
def test_a_persona_streams_its_reply_through_the_server_within_a_40_token_budget(
        server_name, request, tmp_path, start_client):
    server: ModelServer = request.getfixturevalue(server_name)

    async def body(hub):
        # Without the anti-copy penalties: with them the greedy reply to FACTS becomes one sentence too long
        # to end within 40 tokens, and this test is about sentences streaming through the server.
        client = start_client(*persona_args(server, hub.url, "--max-generation-tokens", "40", "--no-anti-copy"),
                              env={"PARTYCHAT_API_KEY": API_KEY})
        await wait_joined(client)
        ws = await moderator(hub.url)
        await ws.send(json.dumps({"type": "message", "content": FACTS}))
        partials, reply = await collect_reply(ws, "Sage")
        await ws.close()
        return client, partials, reply

    client, partials, reply = in_room(tmp_path, body, 300)
    assert reply["type"] == "message", reply
    assert len(partials) >= 2, "a sentence should stream before the reply is complete"
    assert "".join(p["content"] for p in partials) == reply["content"]
    assert 0 < reply_tokens(reply["content"]) <= 40
    assert "on the openai engine" in client.output and "Traceback" not in client.output


def test_a_pause_mid_reply_makes_llama_cpp_server_stop_generating(llama_server, tmp_path, start_client):
    async def body(hub):
        client = start_client(*persona_args(llama_server, hub.url, "--max-generation-tokens", "400"),
                              env={"PARTYCHAT_API_KEY": API_KEY})
        await wait_joined(client)
        ws = await moderator(hub.url)
        disconnects = llama_server.log.count("Disconnected from client")
        await ws.send(json.dumps({"type": "message", "content": STORY}))
        await next_frame(ws, "partial", timeout=180)
        await ws.send(json.dumps({"type": "command", "name": "pause", "args": []}))
        deadline = time.monotonic() + 60
        while llama_server.log.count("Disconnected from client") == disconnects:
            assert time.monotonic() < deadline, f"the server went on generating:\n{llama_server.log[-2000:]}"
            await asyncio.sleep(0.1)
        frames = [frame async for frame in frames_until_quiet(ws)]
        await ws.close()
        return client, frames

    client, frames = in_room(tmp_path, body, 300)
    assert not [f for f in frames if f.get("type") == "message" and f.get("from") == "Sage"]
    assert "Traceback" not in client.output


def test_a_pause_mid_reply_makes_transformers_serve_stop_generating(
        transformers_server, tiny_folder, tmp_path, start_client):
    """The tiny model would generate a million tokens; the server runs one generation per model at a time,
    so a one-token request answered after the pause proves the persona's generation was stopped."""

    async def body(hub):
        client = start_client("--name", "Sage", "--server", hub.url, "--api-base", transformers_server.base_url,
                              "--model", str(tiny_folder), "--temperature", "1", "--max-generation-tokens",
                              "1000000", "--max-context-tokens", "1100000")
        await wait_joined(client)
        ws = await moderator(hub.url)
        requests = transformers_server.log.count("POST /v1/chat/completions")
        await ws.send(json.dumps({"type": "message", "content": STORY}))
        deadline = time.monotonic() + 120
        while transformers_server.log.count("POST /v1/chat/completions") == requests:  # the stream has begun
            assert time.monotonic() < deadline, transformers_server.log[-2000:]
            await asyncio.sleep(0.1)
        await ws.send(json.dumps({"type": "command", "name": "pause", "args": []}))
        await next_frame(ws, "turn", paused=True)
        probe = openai.AsyncOpenAI(base_url=transformers_server.base_url, api_key="none", max_retries=0)
        answer = await asyncio.wait_for(probe.chat.completions.create(
            model=str(tiny_folder), messages=[{"role": "user", "content": "Hi"}], max_tokens=1), 120)
        await probe.close()
        frames = [frame async for frame in frames_until_quiet(ws)]
        await ws.close()
        return client, answer, frames

    client, answer, frames = in_room(tmp_path, body, 400)
    assert answer.choices[0].finish_reason == "length"
    assert not [f for f in frames if f.get("type") == "message" and f.get("from") == "Sage"]
    assert "Traceback" not in client.output


async def frames_until_quiet(ws, quiet: float = 1.0):
    """Frames still arriving; ends after ``quiet`` seconds with none."""
    while True:
        try:
            yield json.loads(await asyncio.wait_for(ws.recv(), quiet))
        except asyncio.TimeoutError:
            return


def test_a_persona_whose_server_is_not_there_passes_saying_why_and_stays(tmp_path, start_client):
    nobody = f"http://127.0.0.1:{free_port()}/v1"

    async def body(hub):
        client = start_client("--name", "Sage", "--server", hub.url, "--api-base", nobody, "--model", "m")
        await wait_joined(client)
        ws = await moderator(hub.url)
        await ws.send(json.dumps({"type": "message", "content": FACTS}))
        _, passed = await collect_reply(ws, "Sage", timeout=60)
        await ws.close()
        return client, passed

    client, passed = in_room(tmp_path, body, 120)
    assert passed["type"] == "system" and "Cannot reach the model server" in passed["content"], passed
    assert nobody in passed["content"]
    assert client.popen.poll() is None, "the persona keeps its seat"
    assert "Joining anyway" in client.output and "Traceback" not in client.output


def test_a_persona_whose_server_dies_mid_reply_passes_then_answers_once_it_is_back(tmp_path, start_client):
    port = free_port()
    server = start_llama_server(tmp_path / "server-1.log", port, key=None)
    servers = [server.process]
    try:
        async def body(hub):
            client = start_client(*persona_args(server, hub.url, "--max-generation-tokens", "400"))
            await wait_joined(client)
            ws = await moderator(hub.url)
            await ws.send(json.dumps({"type": "message", "content": STORY}))
            await next_frame(ws, "partial", timeout=180)
            server.process.popen.kill()  # mid-reply: a sentence is out, the rest never comes
            _, passed = await collect_reply(ws, "Sage", timeout=60)
            back = await asyncio.to_thread(start_llama_server, tmp_path / "server-2.log", port, None)
            servers.append(back.process)
            await ws.send(json.dumps({"type": "message", "content": FACTS}))
            _, answer = await collect_reply(ws, "Sage")
            await ws.close()
            return client, passed, answer

        client, passed, answer = in_room(tmp_path, body, 400)
    finally:
        for process in servers:
            process.stop()
    assert passed["type"] == "system" and "broke off in the middle of the reply" in passed["content"], passed
    assert answer["type"] == "message" and answer["content"], answer
    assert "Traceback" not in client.output


def test_a_wrong_key_stops_the_client_with_one_sentence(llama_server, tmp_path, start_client):
    client = start_client("--name", "Sage", "--api-base", llama_server.base_url, "--api-key", "wrong")
    assert client.popen.wait(timeout=120) == 2
    lines = client.output.strip().splitlines()
    assert lines[-1].startswith("client.py: The model server at") and "refused the API key" in lines[-1]
    assert "Traceback" not in client.output


@pytest.mark.parametrize("server_name", SERVERS)
def test_an_unknown_model_stops_the_client_listing_the_offered_ones(server_name, request, start_client):
    server: ModelServer = request.getfixturevalue(server_name)
    client = start_client("--name", "Sage", "--api-base", server.base_url, "--model", "no-such-model",
                          env={"PARTYCHAT_API_KEY": API_KEY})
    assert client.popen.wait(timeout=120) == 2
    last = client.output.strip().splitlines()[-1]
    assert "has no model 'no-such-model'" in last
    assert all(model in last for model in server.models), last
    assert "Traceback" not in client.output


def test_the_openai_backend_without_an_address_is_one_sentence(start_client):
    client = start_client("--name", "Sage", "--backend", "openai")
    assert client.popen.wait(timeout=60) == 2
    assert "needs --api-base" in client.output and "Traceback" not in client.output


def test_prompt_sizes_come_from_llama_cpp_servers_tokenizer_and_err_high(llama_server):
    local = LlamaCppChatModel(embedded_gguf(), context_tokens=2048, threads=1)
    messages = ({"role": "system", "content": "You are Sage, who speaks in riddles."},
                {"role": "user", "content": "Moderator: " + FACTS}, {"role": "assistant", "content": "Gladly."},
                {"role": "user", "content": "Moderator: and one about the sun?"})
    request = ChatRequest(messages, "Sage")

    async def sizes() -> tuple[int, int]:
        remote = OpenAIChatModel(llama_server.base_url, LLAMA_MODEL, API_KEY)
        try:
            return await remote.count_tokens(request), await remote.count_tokens(request)
        finally:
            await remote.aclose()

    counted, again = asyncio.run(sizes())
    exact = len(local.prompt_tokens(request))
    asyncio.run(local.aclose())
    assert counted == again
    assert exact <= counted <= exact * 1.3, (exact, counted)
    assert exact <= estimate_tokens(request), "the estimate for servers that cannot count errs high"


def test_three_personas_on_three_engines_give_exactly_three_replies(llama_server, tmp_path):
    models = {
        "Zen Sage": open_chat_model("transformers", EngineOptions(engine="transformers")),
        "TinkerBot": open_chat_model("llama.cpp", EngineOptions(engine="llama.cpp", threads=1)),
        "Historian": OpenAIChatModel(llama_server.base_url, LLAMA_MODEL, API_KEY),
    }
    settings = GenerationSettings(temperature=0, max_tokens=60)

    async def body(hub):
        ws = await moderator(hub.url)
        personas = [ModelParticipant(ParticipantConfig(name=name, system_prompt=read_persona(prompt, name),
                                                       server=hub.url),
                                     models[name], settings) for name, prompt in PERSONAS.items()]
        tasks = [asyncio.create_task(persona.run()) for persona in personas]
        for _ in models:
            await next_frame(ws, "system", timeout=60, event="join")
        await ws.send(json.dumps({"type": "message", "content": FACTS}))
        replies, deadline = [], time.monotonic() + 300
        while len(replies) < len(models):
            frame = await next_frame(ws, timeout=deadline - time.monotonic())
            if is_reply(frame, models):
                replies.append(frame)
        replies += [frame async for frame in frames_until_quiet(ws, quiet=3) if is_reply(frame, models)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await ws.close()
        return replies

    async def body_then_close(hub):
        try:
            return await body(hub)
        finally:
            for model in models.values():  # in the loop that used them
                await model.aclose()

    replies = in_room(tmp_path, body_then_close, 400)
    assert [r["type"] for r in replies] == ["message"] * 3, replies
    assert sorted(r["from"] for r in replies) == sorted(models), "each persona speaks once"
    assert all(r["content"].strip() for r in replies)


def is_reply(frame: dict, names) -> bool:
    """A model's message, or a model passing its turn."""
    return (frame.get("type") == "message" and frame.get("from") in names) or any(is_pass(frame, n) for n in names)


def test_the_log_says_which_server_model_a_persona_uses(llama_server, tmp_path, start_client):
    client = start_client("--name", "Sage", "--server", "ws://127.0.0.1:9/", "--api-base", llama_server.base_url,
                          env={"PARTYCHAT_API_KEY": "", "OPENAI_API_KEY": API_KEY})
    client.wait_for_output(r"offers smollm2; this persona uses smollm2", 120)
    assert re.search(r"The openai engine runs the model the server offers, because --api-base was given",
                     client.output), client.output
    assert "Traceback" not in client.output


def test_model_names_match_as_servers_list_them():
    assert match_model("llama3.2", ["llama3.2:latest", "qwen2.5:7b"]) == "llama3.2:latest"  # Ollama's tags
    assert match_model("qwen2.5:7b", ["llama3.2:latest", "qwen2.5:7b"]) == "qwen2.5:7b"
    assert match_model("qwen2.5", ["qwen2.5:7b"]) is None, "a tag other than latest is not guessed"
    assert server_root("http://gpu:8000/v1/") == "http://gpu:8000"
    assert server_root("http://gpu:8000") == "http://gpu:8000"


def test_each_persona_keeps_one_llama_server_slot_and_shares_only_when_there_are_too_few(caplog):
    """A cast's personas get distinct slots, always the same ones; a crowded server is said once."""
    names = ["Zen Sage", "TinkerBot", "Critic", "Poet"]  # two pairs whose names hash to one slot
    slots = SlotMap()
    first = [slots.slot("http://a:8080", name, 4) for name in names]
    assert sorted(first) == [0, 1, 2, 3]
    assert [slots.slot("http://a:8080", name, 4) for name in reversed(names)] == first[::-1]
    assert SlotMap().slot("http://a:8080", "Historian", 4) == SlotMap().slot("http://b:8080", "Historian", 4), \
        "a persona alone in its process starts from the same slot every time"
    with caplog.at_level("WARNING", logger="partychat.client"):
        crowded = [slots.slot("http://c:8080", name, 2) for name in names]
        crowded += [slots.slot("http://c:8080", name, 2) for name in names]
    assert set(crowded) <= {0, 1} and len(set(crowded[:2])) == 2
    assert crowded[:4] == crowded[4:]
    assert [r.getMessage() for r in caplog.records].count(
        "llama-server at http://c:8080 has 2 slots for more personas than that, so some share a slot and "
        "re-evaluate their prompts; start it with --parallel 3 or more") == 1
