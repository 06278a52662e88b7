"""Every bad input gets a clear sentence and a clean exit, never a traceback."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, Process, join, say, script

PYTHON = sys.executable


def run_script(folder: Path, name: str, *args: str, timeout: float = 120,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run one of our scripts in a test's own folder, so nothing it writes lands in the checkout."""
    return subprocess.run([PYTHON, script(name), *args], cwd=folder, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})


def assert_clean_failure(result: subprocess.CompletedProcess[str], *phrases: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr


def test_missing_prompt_file_stops_before_any_model_is_loaded(tmp_path):
    result = run_script(tmp_path, "client.py", "--name", "X", "--prompt-file", "no-such-persona.txt",
                        "--model", "/no/such/model.gguf")
    assert_clean_failure(result, "Prompt file not found: no-such-persona.txt")


def test_unreadable_prompt_file(tmp_path):
    persona = tmp_path / "binary.txt"
    persona.write_bytes(b"\xff\xfe\x00bad")
    assert_clean_failure(run_script(tmp_path, "client.py", "--name", "X", "--prompt-file", str(persona)),
                         "Cannot read prompt file")


def test_prompt_file_is_found_in_prompts_folder_by_bare_name():
    from partychat.persona.cast import find_prompt_file

    assert find_prompt_file("sage.txt") == ROOT / "prompts" / "sage.txt"
    assert find_prompt_file("inventor") == ROOT / "prompts" / "inventor.txt"


def test_missing_model_path(tmp_path):
    result = run_script(tmp_path, "client.py", "--name", "X", "--model", "./models/missing-folder")
    assert_clean_failure(result, "No such model file or folder: ./models/missing-folder")


@pytest.mark.slow  # loads torch to find out whether this machine has a GPU
def test_gpu_without_cuda_is_a_clear_error(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run_script(tmp_path, "client.py", "--name", "X", "--device", "gpu", "--backend", "transformers")
    assert_clean_failure(result, "--device gpu", "no CUDA GPU")


def test_gpu_on_a_cpu_only_llama_cpp_build_is_a_clear_error(tmp_path):
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python build can offload to a GPU")
    result = run_script(tmp_path, "client.py", "--name", "X", "--device", "gpu", "--backend", "llama.cpp")
    assert_clean_failure(result, "--device gpu", "cannot offload to a GPU")


def test_llama_cpp_with_a_model_folder_is_one_sentence(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    result = run_script(tmp_path, "client.py", "--name", "X", "--backend", "llama.cpp", "--model", str(tmp_path))
    assert result.returncode == 2
    assert_clean_failure(result, "runs .gguf files", "--engine transformers")


def test_an_engine_that_is_not_installed_says_how_to_install_it(tmp_path):
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "llama_cpp.py").write_text("raise ImportError('hidden by the test')\n")
    result = run_script(tmp_path, "client.py", "--name", "X", "--backend", "llama.cpp",
                        env={"PYTHONPATH": str(hidden)})
    assert result.returncode == 2
    assert_clean_failure(result, "pip install llama-cpp-python==0.3.36")


def test_auto_picks_the_engine_by_server_model_kind_and_what_is_installed(tmp_path):
    from partychat.engines.registry import EngineOptions, pick_engine

    (tmp_path / "config.json").write_text("{}")
    assert pick_engine(EngineOptions(api_base="http://127.0.0.1:1/v1", model="anything"))[0] == "openai"
    assert pick_engine(EngineOptions(model=str(tmp_path)))[0] == "transformers"
    engine, reason = pick_engine(EngineOptions())
    assert engine == "llama.cpp" and "GGUF" in reason
    assert pick_engine(EngineOptions(engine="transformers"))[0] == "transformers"


def test_engine_is_the_flag_and_backend_still_names_it_and_the_reply_length_flag_sets_max_tokens():
    from partychat.persona.cli import build_cast, build_parser

    for flag in ("--engine", "--backend"):  # --backend: what users wrote before it was called the engine
        args = build_parser().parse_args(["--name", "Sage", flag, "llama.cpp", "--max-generation-tokens", "42"])
        assert args.engine == "llama.cpp"
        [sage] = build_cast(args)
        assert (sage.engine, sage.max_tokens) == ("llama.cpp", 42)


def test_bad_numbers_are_refused_up_front(tmp_path):
    result = run_script(tmp_path, "client.py", "--name", "X", "--max-context-tokens", "50",
                        "--max-generation-tokens", "100")
    assert_clean_failure(result, "--max-context-tokens must be larger")


def test_talkativeness_out_of_range_is_refused_up_front(tmp_path):
    result = run_script(tmp_path, "client.py", "--name", "X", "--talkativeness", "2")
    assert_clean_failure(result, "--talkativeness must be a number from 0 to 1")


def test_retries_out_of_range_are_refused_up_front(tmp_path):
    result = run_script(tmp_path, "client.py", "--name", "X", "--retries", "-1")
    assert_clean_failure(result, "--retries must be a whole number from 0 to 10")


def test_client_retries_an_unreachable_hub_and_leaves_cleanly_on_ctrl_c(start_client):
    client = start_client("--name", "Lonely", "--server", "ws://127.0.0.1:9")
    client.wait_for_output(r"not reachable.*retrying in 1 s", timeout=120)
    client.wait_for_output(r"retrying in 2 s", timeout=30)
    assert client.interrupt() == 0
    assert "Traceback" not in client.output


def test_moderator_retries_an_unreachable_hub_and_leaves_cleanly_on_ctrl_c(tmp_path, processes):

    moderator = Process([script("moderator.py"), "--server", "ws://127.0.0.1:9"], tmp_path / "m.out",
                        stdin=subprocess.PIPE)
    processes.append(moderator)
    moderator.wait_for_output(r"not reachable.*retrying", timeout=30)
    assert moderator.interrupt() == 0
    assert "Traceback" not in moderator.output


def test_a_taken_name_makes_the_client_exit_non_zero(start_hub, start_client):
    _, url = start_hub()

    async def scenario() -> None:
        holder, reply = await join(url, "Zen Sage", "human")
        assert reply["content"] == "Connected as Zen Sage"
        client = start_client("--name", "zen sage", "--server", url)
        code = await asyncio.to_thread(client.popen.wait, 120)
        assert code != 0
        assert "already taken" in client.output
        assert "Traceback" not in client.output
        await holder.close()

    asyncio.run(scenario())


def test_moderator_leaves_cleanly_at_end_of_input(start_hub, tmp_path):
    _, url = start_hub()
    result = subprocess.run([PYTHON, script("moderator.py"), "--server", url], cwd=tmp_path,
                            input="/help\n/toggle\n/nonsense\n", capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "Traceback" not in result.stdout + result.stderr
    assert "/pause" in result.stdout and "Incoming messages hidden" in result.stdout
    assert "Unknown command /nonsense" in result.stdout


def test_moderator_rejects_a_bad_server_url(tmp_path):
    result = run_script(tmp_path, "moderator.py", "--server", "http://example")
    assert_clean_failure(result, "ws:// or wss://")


def test_server_reports_a_port_in_use(start_hub, tmp_path):
    _, url = start_hub()
    port = url.rsplit(":", 1)[1]
    result = run_script(tmp_path, "server.py", "--host", "127.0.0.1", "--port", port, timeout=30)
    assert_clean_failure(result, "cannot listen")


def test_hub_frame_errors_keep_the_connection(start_hub):
    _, url = start_hub()

    async def scenario() -> None:
        ws, _ = await join(url, "Tester", "human", protocol=1)
        await ws.send("{not json")
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] == "error":
                break
        assert frame["code"] == "bad_json"
        await say(ws, "still connected")
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] == "message":
                break
        assert frame["content"] == "still connected"
        await ws.close()

    asyncio.run(scenario())


def test_moderator_leaves_at_once_on_quit_even_while_the_hub_is_unreachable(tmp_path):
    result = subprocess.run([PYTHON, script("moderator.py"), "--server", "ws://127.0.0.1:9"], cwd=tmp_path,
                            input="hello, is anyone there?\n/quit\n", capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert "Not sent (no connection to the hub): hello, is anyone there?" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_a_kicked_moderator_console_stays_out(start_hub, processes, tmp_path):

    _, url = start_hub()

    async def scenario() -> None:
        host, _ = await join(url, "Host", "human", protocol=1)
        guest = Process([script("moderator.py"), "--server", url, "--name", "Guest"], tmp_path / "guest.out",
                        stdin=subprocess.PIPE)
        processes.append(guest)
        await asyncio.to_thread(guest.wait_for_output, "Connected to", 30)
        await host.send(json.dumps({"type": "command", "name": "kick", "args": ["Guest"]}))
        code = await asyncio.to_thread(guest.popen.wait, 30)
        assert code == 3
        assert "You were removed from the room by Host" in guest.output
        assert "Traceback" not in guest.output
        await host.close()

    asyncio.run(scenario())


def test_every_engine_is_one_registry_entry_and_a_missing_one_says_what_to_install(monkeypatch):
    from dataclasses import replace

    from partychat.engines.base import EngineNotInstalled
    from partychat.engines.registry import ENGINE_CHOICES, ENGINES, EngineOptions, open_chat_model

    assert ("auto", *ENGINES) == ENGINE_CHOICES
    for name, engine in ENGINES.items():
        assert engine.name == name and "pip install" in engine.install_hint
        monkeypatch.setitem(ENGINES, name, replace(engine, installed=lambda: False, open=None))
        with pytest.raises(EngineNotInstalled) as refused:
            open_chat_model(name, EngineOptions(engine=name))
        assert str(refused.value) == engine.install_hint


def test_a_template_without_a_system_role_is_recognised_the_same_way_for_every_engine():
    from partychat.engines.base import ModelError, SystemRoleUnsupported, chat_template_error

    system = ({"role": "system", "content": "You are Sage."}, {"role": "user", "content": "hi"})
    assert isinstance(chat_template_error("m", system, "System role not supported"), SystemRoleUnsupported)
    assert type(chat_template_error("m", system, "Conversation roles must alternate")) is ModelError
    assert type(chat_template_error("m", system[1:], "no system here")) is ModelError
