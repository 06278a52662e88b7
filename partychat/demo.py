"""A party in one command: a hub, two personas on the embedded model, and the console in front.

Background processes log to logs/demo-*.log and run in their own session, so Ctrl+C at the console
reaches only the console; when it exits, every process started here is stopped.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PERSONAS = (("Zen Sage", "sage.txt"), ("TinkerBot", "inventor.txt"))
READY_MARK = "joined ws://"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )


def wait_until_joined(logs: list[Path], processes: list[subprocess.Popen[bytes]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(READY_MARK in path.read_text(errors="replace") for path in logs):
            return
        for process, path in zip(processes, logs, strict=True):
            if process.poll() is not None:
                raise SystemExit(f"demo: a persona stopped while starting; see {path}")
        time.sleep(0.3)
    raise SystemExit(f"demo: the personas did not join within {timeout:.0f} s; see {', '.join(map(str, logs))}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run.py demo", description=__doc__)
    parser.add_argument("--model", default="", help="model for both personas (default: the embedded SmolLM2)")
    parser.add_argument("--port", type=int, default=0, help="hub port (default: a free one)")
    args = parser.parse_args(argv)
    logs_dir = ROOT / "logs"
    logs_dir.mkdir(exist_ok=True)
    url = f"ws://localhost:{args.port or free_port()}"
    processes: list[subprocess.Popen[bytes]] = []
    started = time.monotonic()
    try:
        print("Starting the hub and two personas (the very first start converts the model: ~20 s) ...", flush=True)
        processes.append(start(["server.py", "--port", url.rsplit(":", 1)[1],
                                "--log-file", str(logs_dir / "demo-hub.log")], logs_dir / "demo-hub.out"))
        persona_logs = []
        for name, prompt in PERSONAS:
            log_path = logs_dir / f"demo-{prompt.removesuffix('.txt')}.log"
            persona_logs.append(log_path)
            processes.append(start(["client.py", "--name", name, "--prompt-file", prompt, "--server", url,
                                    *(["--model", args.model] if args.model else [])], log_path))
        wait_until_joined(persona_logs, processes[1:], timeout=300)
        print(f"Ready in {time.monotonic() - started:.0f} s: {' and '.join(n for n, _ in PERSONAS)} are in the "
              f"room at {url}. Logs are in {logs_dir}.", flush=True)
        return subprocess.run([sys.executable, "moderator.py", "--server", url], cwd=ROOT).returncode
    except KeyboardInterrupt:
        return 130
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    sys.exit(main())
