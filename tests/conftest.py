"""Fixtures that start our scripts as real processes and stop them whatever happens.

The session also keeps the checkout clean: models converted for the tests and Hypothesis' files go to a
scratch folder removed at the end, and a run that leaves new files in the checkout fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from browser import Browser, chromium
from helpers import ROOT, Process, script
from hypothesis.configuration import set_hypothesis_home_dir

TOOL_LEFTOVERS = (".venv/", ".pytest_cache/", ".ruff_cache/", "__pycache__/")
"""What running the tools themselves leaves in the checkout; ignored by .gitignore and by the check below."""
_BEFORE = pytest.StashKey[set[str] | None]()
_SCRATCH = pytest.StashKey[Path]()


SLOW_MODULES = frozenset({
    "test_generation", "test_openai_engine", "test_original_compat", "test_cast", "test_natural", "test_end_to_end",
    "test_turn_taking", "test_downloads", "test_web_page", "test_run_script", "test_client_process", "test_packaging",
})
"""Modules whose every test loads a model, starts a model server or a browser, or builds an environment."""
SLOW_FIXTURES = frozenset({"start_client", "browser", "model"})
"""Fixtures that start a persona process (which loads torch and a model), load a model, or start a browser."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark what starts models, servers or a browser as ``slow``, so ``-m "not slow"`` runs the rest in seconds.

    A test outside these modules that starts such a thing on its own says so with ``@pytest.mark.slow``.
    """
    for item in items:
        if item.module.__name__ in SLOW_MODULES or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def checkout_state() -> set[str] | None:
    """``git status`` of the checkout, ignored files included; None when it is not a git checkout."""
    try:
        result = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=ROOT, capture_output=True,
                                text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return {line for line in result.stdout.splitlines() if not _is_tool_leftover(line[3:])}


def _is_tool_leftover(path: str) -> bool:
    return any(path == name or path.endswith("/" + name) for name in TOOL_LEFTOVERS)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Give the run its own scratch folder, before collection (where Hypothesis already writes)."""
    scratch = Path(tempfile.mkdtemp(prefix="partychat-tests-"))
    session.config.stash[_SCRATCH] = scratch
    # Models converted from GGUF go here, not to ~/.cache; the scripts the tests start inherit this.
    os.environ["PARTYCHAT_CACHE_DIR"] = str(scratch / "model-cache")
    set_hypothesis_home_dir(scratch / "hypothesis")  # its examples and caches, not ./.hypothesis
    session.config.stash[_BEFORE] = checkout_state()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove the scratch folder; fail the run if it left files in the checkout (tests write only under tmp_path)."""
    scratch = session.config.stash.get(_SCRATCH, None)
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    before = session.config.stash.get(_BEFORE, None)
    after = checkout_state()
    if before is None or after is None:
        return
    left = sorted(after - before)
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_sep("=", "the run left files in the checkout; tests must write only under tmp_path",
                               red=True)
            for line in left:
                reporter.write_line(f"  {line}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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
        hub = Process([script("server.py"), "--port", "0", "--host", "127.0.0.1", *args],
                      tmp_path / f"hub-{len(processes)}.out", env=env)
        processes.append(hub)
        url = hub.wait_for_output(r"listening on (wss?://\S+)", timeout=30).group(1)
        return hub, url

    return start


@pytest.fixture
def start_client(tmp_path: Path, processes: list[Process]) -> Callable[..., Process]:
    def start(*args: str, env: dict[str, str] | None = None) -> Process:
        client = Process([script("client.py"), *args], tmp_path / f"client-{len(processes)}.out", env=env)
        processes.append(client)
        return client

    return start


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    """Headless Chromium with a fresh profile under tmp_path; skips the test when there is none."""
    with chromium(tmp_path / "chromium-profile") as opened:
        yield opened
