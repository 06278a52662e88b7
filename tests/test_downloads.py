"""client.py --model owner/name downloads from a stand-in Hugging Face Hub on loopback, into HF_HOME under tmp_path."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import build_tiny_model, script
from hf_standin import Repo, StandInHub

MODEL = "tiny-org/tiny-chat"
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def standin(tiny_files: Path):
    masked = {"config.json": json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}).encode(),
              WEIGHTS: b"not really weights"}
    repos = {
        MODEL: Repo.from_folder(tiny_files),
        "tiny-org/gated-401": Repo.from_folder(tiny_files, gated_status=401),
        "tiny-org/gated-403": Repo.from_folder(tiny_files, gated_status=403),
        "tiny-org/masked-lm": Repo(masked),
        "tiny-org/gguf-only": Repo({"tiny.Q4_0.gguf": b"GGUF", "README.md": b"# tiny"}),
    }
    with StandInHub(repos) as hub:
        yield hub


def hub_env(tmp_path: Path, endpoint: str, **extra: str) -> dict[str, str]:
    return {"HF_HOME": str(tmp_path / "hf-home"), "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1", **extra}


def failing_client(tmp_path: Path, endpoint: str, model: str, *extra: str, **env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, script("client.py"), "--name", "X", "--server", "ws://127.0.0.1:9", "--model", model, *extra],
        cwd=tmp_path, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL,
        env={**os.environ, **hub_env(tmp_path, endpoint, **env)},
    )


def assert_one_sentence(result: subprocess.CompletedProcess, *phrases: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("client.py:")]
    assert len(errors) == 1, result.stderr
    for phrase in phrases:
        assert phrase in errors[0], errors[0]


def test_first_download_then_cache_hits_that_stay_offline(tmp_path, standin, start_hub, start_client):
    _, url = start_hub()
    env = hub_env(tmp_path, standin.url)
    first = start_client("--name", "Fresh", "--model", MODEL, "--server", url, env=env)
    first.wait_for_output("Fresh joined ws://", 180)
    assert first.output.index("Downloading tiny-org/tiny-chat") < first.output.index("Fresh joined"), \
        "the model is downloaded before the persona joins"
    assert len(standin.gets(WEIGHTS)) == 1 and len(standin.gets("config.json")) == 1
    snapshots = list((tmp_path / "hf-home" / "hub" / "models--tiny-org--tiny-chat" / "snapshots").iterdir())
    assert [p.name for p in snapshots] and (snapshots[0] / WEIGHTS).is_file()
    first.stop()

    seen = len(standin.requests)
    offline = start_client("--name", "Offline", "--model", MODEL, "--server", url, "--offline", env=env)
    offline.wait_for_output("Offline joined ws://", 180)
    by_env = start_client("--name", "ByEnv", "--model", MODEL, "--server", url, env={**env, "HF_HUB_OFFLINE": "1"})
    by_env.wait_for_output("ByEnv joined ws://", 180)
    assert len(standin.requests) == seen, "offline starts never touch the network"

    nowhere = hub_env(tmp_path, f"http://127.0.0.1:{free_port()}")
    unreachable = start_client("--name", "Stranded", "--model", MODEL, "--server", url, env=nowhere)
    unreachable.wait_for_output("Stranded joined ws://", 180)
    assert "could not be reached; using the copy" in unreachable.output


def test_a_transfer_cut_off_midway_resumes_from_where_it_stopped(tmp_path, standin, tiny_files, start_hub,
                                                                 start_client):
    size = (tiny_files / WEIGHTS).stat().st_size
    cut = 10 * 1024 * 1024 + 4096  # past huggingface_hub's first 10 MB write, so those bytes are on disk
    assert size > cut + 1024, "the tiny model must be larger than the cut"
    standin.cut_once[WEIGHTS] = cut
    _, url = start_hub()
    client = start_client("--name", "Patient", "--model", MODEL, "--server", url, env=hub_env(tmp_path, standin.url))
    client.wait_for_output("Patient joined ws://", 180)
    ranges = [r.range for r in standin.gets(WEIGHTS)]
    assert ranges[0] is None and ranges[-1] == f"bytes={10 * 1024 * 1024}-", ranges
    assert standin.sent[WEIGHTS] < size + cut - 10 * 1024 * 1024 + 1, "only the missing part is fetched again"


def test_ctrl_c_midway_stops_at_once_and_the_next_start_keeps_finished_files(tmp_path, standin, start_hub,
                                                                             start_client):
    standin.hold_at[WEIGHTS] = 1024 * 1024
    _, url = start_hub()
    env = hub_env(tmp_path, standin.url)
    first = start_client("--name", "Cut", "--model", MODEL, "--server", url, env=env)
    deadline = time.monotonic() + 180
    while standin.sent.get(WEIGHTS, 0) < 1024 * 1024 or len(standin.gets("tokenizer.json")) < 1:
        assert time.monotonic() < deadline and first.popen.poll() is None, first.output
        time.sleep(0.1)
    time.sleep(1)  # the small files finish while the weights are held
    assert first.interrupt() == 130, "Ctrl+C ends a download at once, without waiting for the file"
    assert "download interrupted" in first.output and "Traceback" not in first.output
    standin.hold_at.clear()
    standin.release.set()
    again = start_client("--name", "Again", "--model", MODEL, "--server", url, env=env)
    again.wait_for_output("Again joined ws://", 180)
    assert len(standin.gets("tokenizer.json")) == 1, "a file finished before the stop is not fetched again"
    assert len(standin.gets(WEIGHTS)) == 2


def test_unknown_repo_is_one_sentence_and_exit_2(tmp_path, standin):
    result = failing_client(tmp_path, standin.url, "nobody/no-such-model")
    assert_one_sentence(result, "no model called 'nobody/no-such-model'", "hf auth login")


@pytest.mark.parametrize("status", [401, 403])
def test_gated_repo_says_how_to_log_in(tmp_path, standin, status):
    result = failing_client(tmp_path, standin.url, f"tiny-org/gated-{status}")
    assert_one_sentence(result, f"'tiny-org/gated-{status}' is gated", "hf auth login", "HF_TOKEN")


def test_repos_without_a_causal_language_model_are_refused(tmp_path, standin):
    assert_one_sentence(failing_client(tmp_path, standin.url, "tiny-org/masked-lm"),
                        "BertForMaskedLM", "not a causal language model")
    assert_one_sentence(failing_client(tmp_path, standin.url, "tiny-org/gguf-only"),
                        "no config.json", ".gguf")
    assert not standin.gets(WEIGHTS), "nothing big is downloaded before the check"


def test_no_network_names_the_model_and_both_ways_out(tmp_path):
    result = failing_client(tmp_path, f"http://127.0.0.1:{free_port()}", MODEL)
    assert_one_sentence(result, "could not be reached", repr(MODEL), "local folder", "online")


def test_offline_without_the_model_in_the_cache(tmp_path, standin):
    result = failing_client(tmp_path, standin.url, MODEL, "--offline")
    assert_one_sentence(result, "not in the local Hugging Face cache", "--offline", "--model")
    assert standin.requests == []


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
