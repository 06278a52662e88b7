"""The project as a package: what pip installs agrees with requirements.txt, and a built wheel runs a room.

The wheel test is the one that proves the packaging: it builds the wheel, installs it with ``--no-deps``
into a fresh virtual environment that sees this environment's dependencies (but not the checkout), and
runs every console script from a folder outside the checkout, ending with a real one-persona room.
"""

from __future__ import annotations

import json
import os
import subprocess
import sysconfig
import venv
from pathlib import Path

import pytest
from helpers import PYTHON, ROOT, Process
from packaging.requirements import Requirement

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib



def _requirements(lines: list[str]) -> set[str]:
    return {str(Requirement(line)) for line in lines}


def test_requirements_txt_lists_exactly_the_packages_pyproject_depends_on():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    listed = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.lstrip().startswith("#")]
    assert _requirements(listed) == _requirements(declared)


def _where(python: str, cwd: Path, code: str) -> str:
    result = subprocess.run([python, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


FIND = ("import partychat; from partychat.persona.cast import find_prompt_file, find_cast_file; "
        "print(partychat.__file__); print(find_prompt_file('sage.txt').read_text() == "
        "find_prompt_file('prompts/sage.txt').read_text() == find_prompt_file('sage').read_text()); "
        "print(find_cast_file('casts/panel.toml').read_text() == find_cast_file('panel').read_text())")


def test_a_checkout_finds_the_shipped_prompts_and_casts_by_any_of_their_names():
    lines = _where(PYTHON, ROOT, FIND).splitlines()
    assert Path(lines[0]).resolve().is_relative_to(ROOT)
    assert lines[1:] == ["True", "True"]


def test_the_editable_install_imports_the_checkout_from_anywhere(tmp_path):
    lines = _where(PYTHON, tmp_path, FIND).splitlines()
    if not Path(lines[0]).resolve().is_relative_to(ROOT):
        pytest.fail(f"partychat comes from {lines[0]}, not this checkout: install it with `pip install -e .[dev]`")
    assert lines[1:] == ["True", "True"]


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> Path:
    """A fresh venv holding only the built wheel, which sees this environment's packages through a path file.

    A plain path line in a ``.pth`` file adds the folder without running the ``.pth`` files inside it,
    so the checkout's editable install stays invisible and ``partychat`` can only come from the wheel.
    """
    work = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([PYTHON, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "--wheel-dir", str(work / "dist"), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    wheel = next((work / "dist").glob("party_chat-*.whl"))
    target = work / "venv"
    venv.create(target, with_pip=False)
    python = target / "bin" / "python"
    purelib = Path(_where(str(python), work, "import sysconfig; print(sysconfig.get_paths()['purelib'])"))
    (purelib / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run([PYTHON, "-m", "pip", "--python", str(python), "install", "--no-deps", "--quiet",
                                str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return target


def test_the_wheel_carries_the_prompts_and_casts_inside_the_package(installed_wheel, tmp_path):
    lines = _where(str(installed_wheel / "bin" / "python"), tmp_path, FIND).splitlines()
    assert Path(lines[0]).resolve().is_relative_to(installed_wheel)
    assert lines[1:] == ["True", "True"]


@pytest.mark.parametrize("command", ["partychat-server", "partychat-client", "partychat-moderator",
                                     "partychat-demo"])
def test_each_console_script_of_the_wheel_runs(installed_wheel, tmp_path, command):
    result = subprocess.run([str(installed_wheel / "bin" / command), "--help"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")


def test_a_room_runs_from_the_wheel_outside_the_checkout(installed_wheel, tmp_path):
    bin_dir = installed_wheel / "bin"
    env = {**os.environ, "PYTHONPATH": ""}
    hub = Process([str(bin_dir / "partychat-server"), "--port", "0", "--host", "127.0.0.1", "--transcript",
                   str(tmp_path / "t.jsonl")], tmp_path / "hub.out", env=env, cwd=tmp_path, python=None)
    persona = None
    try:
        url = hub.wait_for_output(r"listening on (ws://\S+)", timeout=60).group(1)
        persona = Process([str(bin_dir / "partychat-client"), "--name", "Sage", "--prompt-file", "prompts/sage.txt",
                           "--server", url, "--temperature", "0", "--max-generation-tokens", "12",
                           "--backend", "llama.cpp" if _has_llama_cpp() else "transformers"],
                          tmp_path / "persona.out", env=env, cwd=tmp_path, python=None)
        persona.wait_for_output(r"joined ws://", timeout=300)
        moderator = subprocess.run([str(bin_dir / "partychat-moderator"), "--server", url, "--idle-timeout", "240"],
                                   input="What is the first thing you notice in a garden?\n", cwd=tmp_path,
                                   capture_output=True, text=True, timeout=300, env=env)
        assert moderator.returncode == 0, moderator.stderr
        assert "Sage:" in moderator.stdout, moderator.stdout
        said = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
        assert any(entry.get("kind") == "message" and entry.get("from") == "Sage" for entry in said), said
    finally:
        if persona is not None:
            persona.stop()
        hub.stop()


def _has_llama_cpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None
