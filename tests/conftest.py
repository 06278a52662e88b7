"""Fixtures that start our scripts as real processes and stop them whatever happens."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import Process


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    """Processes started by a test; all stopped when it ends, whatever happened."""
    started: list[Process] = []
    yield started
    for process in reversed(started):
        process.stop()


@pytest.fixture
def start_hub(tmp_path: Path, processes: list[Process]) -> Callable[..., tuple[Process, str]]:
    """Start server.py on a free port; returns the process and its URL."""

    def start(*args: str, env: dict[str, str] | None = None) -> tuple[Process, str]:
        if "--transcript" not in args and "--resume" not in args:  # never into the checkout's logs/
            args = (*args, "--transcript", str(tmp_path / f"transcript-{len(processes)}.jsonl"))
        hub = Process(["server.py", "--port", "0", "--host", "127.0.0.1", *args],
                      tmp_path / f"hub-{len(processes)}.out", env=env)
        processes.append(hub)
        url = hub.wait_for_output(r"listening on (wss?://\S+)", timeout=30).group(1)
        return hub, url

    return start


@pytest.fixture
def start_client(tmp_path: Path, processes: list[Process]) -> Callable[..., Process]:
    def start(*args: str, env: dict[str, str] | None = None) -> Process:
        client = Process(["client.py", *args], tmp_path / f"client-{len(processes)}.out", env=env)
        processes.append(client)
        return client

    return start
