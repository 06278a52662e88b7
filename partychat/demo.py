"""A party in one command: a hub, a cast of personas in one client process, and the console in front.

The cast is casts/demo.toml (Zen Sage and TinkerBot on the embedded model) unless --cast names
another. The three programs start as ``python -m partychat.…`` so the demo runs the same from a
checkout and from an installed wheel. Background processes log to logs/demo-*.log under the current
folder and run in their own session, so Ctrl+C at the console reaches only the console; when it
exits, every process started here is stopped.
"""

from __future__ import annotations

import argparse
import importlib.util
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DEMO_CAST = "demo.toml"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, *args], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )


def wait_until_joined(log: Path, names: list[str], process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if all(f"{name} joined ws://" in text for name in names):
            return
        if process.poll() is not None:
            raise SystemExit(f"demo: the personas stopped while starting; see {log}")
        time.sleep(0.3)
    raise SystemExit(f"demo: the personas did not join within {timeout:.0f} s; see {log}")


def read_cast(value: str) -> tuple[Path, list[str]]:
    """The cast file and its names, read now so a bad file is reported before anything starts."""
    from .persona.cast import CastError, Persona, find_cast_file, read_cast_file

    try:
        path = find_cast_file(value).resolve()
        return path, [persona.name for persona in read_cast_file(path, Persona(name="", system_prompt=""))]
    except CastError as error:
        raise SystemExit(f"demo: {error}") from None


def start_line(count: int) -> str:
    """What the demo says while it starts; the one-time conversion only happens on the transformers engine."""
    line = f"Starting the hub and {count} personas in one process"
    if importlib.util.find_spec("llama_cpp") is None:
        line += " (on transformers, the very first start converts the model once: ~20 s)"
    return line + " ..."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run.py demo", description=__doc__)
    parser.add_argument("--cast", default=DEMO_CAST,
                        help="the personas to start: a cast file, or a shipped cast's name (default: demo)")
    parser.add_argument("--model", default="",
                        help="model for personas that name none (default: the embedded SmolLM2)")
    parser.add_argument("--port", type=int, default=0, help="hub port (default: a free one)")
    args = parser.parse_args(argv)
    cast, names = read_cast(args.cast)
    logs_dir = Path("logs").resolve()
    logs_dir.mkdir(exist_ok=True)
    url = f"ws://localhost:{args.port or free_port()}"
    processes: list[subprocess.Popen[bytes]] = []
    started = time.monotonic()
    try:
        print(start_line(len(names)), flush=True)
        processes.append(start(["-m", "partychat.hub", "--port", url.rsplit(":", 1)[1],
                                "--log-file", str(logs_dir / "demo-hub.log")], logs_dir / "demo-hub.out"))
        cast_log = logs_dir / "demo-cast.log"
        processes.append(start(["-m", "partychat.persona", "--cast", str(cast), "--server", url,
                                *(["--model", args.model] if args.model else [])], cast_log))
        wait_until_joined(cast_log, names, processes[1], timeout=600)
        page = url.replace("ws://", "http://", 1)
        print(f"Ready in {time.monotonic() - started:.0f} s: {', '.join(names)} in the room at {url}. "
              f"Watch it in a browser at {page}/ (moderate at {page}/moderate). Logs are in {logs_dir}.",
              flush=True)
        return subprocess.run([sys.executable, "-m", "partychat.moderator", "--server", url]).returncode
    except KeyboardInterrupt:
        return 130
    finally:
        stop_all(processes)


def stop_all(processes: list[subprocess.Popen[bytes]], timeout: float = 10) -> None:
    """Ask every process to stop, then kill those still running after ``timeout`` seconds."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


if __name__ == "__main__":
    sys.exit(main())
