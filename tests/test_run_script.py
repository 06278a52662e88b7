"""run.py: one environment for demo and test, installed again only when a requirements file changes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, script


@pytest.mark.skipif(Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(),
                    reason="the suite is not running in the environment run.py set up")
def test_demo_and_test_share_the_environment_that_is_already_installed(tmp_path):
    for command in (["demo", "--help"], ["test", "--version"], ["demo", "--help"]):
        result = subprocess.run([sys.executable, script("run.py"), *command], cwd=tmp_path, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "installing" not in result.stdout + result.stderr, f"run.py {command[0]} installed again"
