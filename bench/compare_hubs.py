#!/usr/bin/env python3
"""Run the same load benchmarks on our hub and on the original project's hub, one at a time.

    python bench/compare_hubs.py --original-dir /tmp/orig-bench

Every benchmark gets a freshly started hub. The hub is pinned to CPU 0 and the load tools to CPU 1
(on a machine with at least two CPUs), so the hub's CPU and latency are not muddled by the load's.
Prints one JSON line per run, then a summary line with our CPU per delivered message over the
original's, both on equal terms (no compression) and with compression offered; see bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
HUB_LOAD = Path(__file__).resolve().parent / "hub_load.py"
ORIGINAL_PORT = 8765
RUN_TIMEOUT = 180.0

# (label, subcommand, arguments); each stays well under two minutes.
PLAN: list[tuple[str, str, list[str]]] = [
    ("fanout-10", "fanout", ["--listeners", "10", "--messages", "500", "--interval", "0.01"]),
    ("fanout-100", "fanout", ["--listeners", "100", "--messages", "500", "--interval", "0.01"]),
    ("fanout-500", "fanout", ["--listeners", "500", "--messages", "200", "--interval", "0.02"]),
    ("fanout-100-nodeflate", "fanout",
     ["--listeners", "100", "--messages", "500", "--interval", "0.01", "--compression", "none"]),
    ("fanout-500-nodeflate", "fanout",
     ["--listeners", "500", "--messages", "200", "--interval", "0.02", "--compression", "none"]),
    ("stall-1", "stall", ["--healthy", "20", "--stalled", "1", "--messages", "2000", "--interval", "0.004"]),
    ("stall-10", "stall", ["--healthy", "20", "--stalled", "10", "--messages", "2000", "--interval", "0.004"]),
]


COMPRESSION_NOTE = (
    "When clients offer permessage-deflate, the original hub accepts it and compresses every copy of every "
    "message once per peer; ours serves with compression off and writes one serialised frame to all. The "
    "compression_offered ratio therefore counts deflate work only the original does; equal_terms (no client "
    "offers compression) compares the same work on both sides and is the figure to quote."
)


@dataclass
class RunningHub:
    """A hub process this script started, and where its output goes."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str
    stdout: Path
    stderr: Path

    def tail(self, lines: int = 15) -> str:
        out = []
        for path in (self.stdout, self.stderr):
            text = path.read_text(errors="replace").splitlines() if path.exists() else []
            out += [f"{path.name}: {line}" for line in text[-lines:]]
        return "\n".join(out)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start_hub(name: str, scratch: Path, original_dir: Path, tag: str, hub_cpu: int | None) -> RunningHub:
    """Start ``ours`` or ``original`` and wait until it accepts connections."""
    stdout, stderr = scratch / f"{name}-{tag}.out", scratch / f"{name}-{tag}.err"
    if name == "ours":
        argv = [sys.executable, "server.py", "--host", "127.0.0.1", "--port", "0", "--rate-limit", "0",
                "--max-clients", "2000", "--transcript", str(scratch / f"transcript-{tag}.jsonl"),
                "--log-level", "WARNING"]
        cwd = REPO
    else:
        if _port_open(ORIGINAL_PORT):
            raise SystemExit(f"port {ORIGINAL_PORT} is already in use; the original hub cannot start")
        # The file itself, not ``-m llm_party_chat.server``: the package __init__ imports torch and
        # transformers for the model client, which the hub does not use.
        argv = [sys.executable, str(original_dir / "llm_party_chat" / "server.py")]
        cwd = original_dir
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    url = None
    while time.monotonic() < deadline and proc.poll() is None:
        if name == "ours":
            match = re.search(r"listening on (ws://\S+)", stdout.read_text(errors="replace"))
            url = match.group(1) if match else None
        elif _port_open(ORIGINAL_PORT):
            url = f"ws://127.0.0.1:{ORIGINAL_PORT}"
        if url:
            break
        time.sleep(0.1)
    hub = RunningHub(name, proc, url or "", stdout, stderr)
    if not url:
        stop_hub(hub)
        raise SystemExit(f"the {name} hub did not start:\n{hub.tail()}")
    if hub_cpu is not None:
        os.sched_setaffinity(proc.pid, {hub_cpu})
    return hub


def stop_hub(hub: RunningHub) -> int | None:
    """SIGINT, then SIGKILL after 10 s; returns the exit code (None if it had to be killed)."""
    if hub.proc.poll() is None:
        hub.proc.send_signal(signal.SIGINT)
        try:
            return hub.proc.wait(10)
        except subprocess.TimeoutExpired:
            hub.proc.kill()
            hub.proc.wait(5)
            return None
    return hub.proc.returncode


def run_bench(hub: RunningHub, label: str, command: str, extra: list[str], load_cpus: str | None) -> dict[str, Any]:
    """Run one hub_load.py subcommand against the hub and return its JSON line (plus hub health)."""
    argv = [sys.executable, str(HUB_LOAD), command, "--url", hub.url, "--hub-pid", str(hub.proc.pid), *extra]
    if load_cpus:
        argv += ["--load-cpus", load_cpus]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        result = json.loads(lines[-1]) if lines else {"error": f"no JSON output; stderr: {done.stderr[-500:]}"}
    except subprocess.TimeoutExpired:
        result = {"error": f"timed out after {RUN_TIMEOUT:.0f}s"}
    result = {"hub": hub.name, "run": label, **result}
    if hub.proc.poll() is not None:
        result["hub_crashed"] = True
        result["hub_exit_code"] = hub.proc.returncode
    return result


def _git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": git("status", "--porcelain").splitlines()}


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The key figures side by side, and our CPU per delivered message over the original's."""
    by = {(r["hub"], r["run"]): r for r in results}
    summary: dict[str, Any] = {}
    for label in ("fanout-10", "fanout-100", "fanout-500", "fanout-100-nodeflate", "fanout-500-nodeflate"):
        for hub in ("ours", "original"):
            r = by.get((hub, label), {})
            summary[f"{label}/{hub}"] = {
                key: r.get(key) for key in ("delivery_ratio", "hub_cpu_ms_per_delivered", "hub_cpu_connect_s")
            } | {"p50_ms": (r.get("latency_ms") or {}).get("p50"), "p99_ms": (r.get("latency_ms") or {}).get("p99")}

    def cpu_ratio(label: str) -> float | None:
        ours = summary[f"{label}/ours"]["hub_cpu_ms_per_delivered"]
        theirs = summary[f"{label}/original"]["hub_cpu_ms_per_delivered"]
        return round(ours / theirs, 3) if ours and theirs else None

    summary["cpu_ratio_ours_over_original"] = {
        "equal_terms": {label: cpu_ratio(f"{label}-nodeflate") for label in ("fanout-100", "fanout-500")},
        "compression_offered": {label: cpu_ratio(label) for label in ("fanout-100", "fanout-500")},
        "why_they_differ": COMPRESSION_NOTE,
    }
    for label in ("stall-1", "stall-10"):
        for hub in ("ours", "original"):
            r = by.get((hub, label), {})
            rss = r.get("hub_rss_mb") or {}
            summary[f"{label}/{hub}"] = {
                "healthy_delivery_ratio": r.get("healthy_delivery_ratio"),
                "complete_s": r.get("complete_s"),
                "stalled_closed_by_hub": r.get("stalled_closed_by_hub"),
                "rss_mb_min_max_last": [rss.get("min"), rss.get("max"), rss.get("last")],
            }
    return summary


def main(argv: list[str] | None = None) -> int:
    """Benchmark both hubs and print every JSON line, then the summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--original-dir", type=Path, default=Path("/tmp/orig-bench"),
                        help="folder holding the unpacked llm-party-chat 0.0.1 wheel (default: /tmp/orig-bench)")
    parser.add_argument("--hubs", default="ours,original", help="which hubs to run, in order (default: both)")
    parser.add_argument("--runs", help="comma-separated run labels to keep (default: all)")
    parser.add_argument("--out", type=Path, help="also append every JSON line to this file")
    args = parser.parse_args(argv)
    hubs = args.hubs.split(",")
    if "original" in hubs and not (args.original_dir / "llm_party_chat" / "server.py").is_file():
        raise SystemExit(f"no llm_party_chat/server.py under {args.original_dir}; see bench/README.md")
    plan = [step for step in PLAN if not args.runs or step[0] in args.runs.split(",")]
    cpus = sorted(os.sched_getaffinity(0))
    hub_cpu, load_cpus = (cpus[0], ",".join(map(str, cpus[1:]))) if len(cpus) >= 2 else (None, None)

    def emit(line: dict[str, Any]) -> None:
        text = json.dumps(line)
        print(text, flush=True)
        if args.out:
            with args.out.open("a") as out:
                out.write(text + "\n")

    emit({"meta": {"git": _git_state(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
                   "hub_cpu": hub_cpu, "load_cpus": load_cpus}})
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="compare-hubs-") as scratch:
        for hub_name in hubs:
            for tag, (label, command, extra) in enumerate(plan):
                hub = start_hub(hub_name, Path(scratch), args.original_dir, f"{label}-{tag}", hub_cpu)
                load_before = Path("/proc/loadavg").read_text().split()[0]
                try:
                    result = run_bench(hub, label, command, extra, load_cpus)
                finally:
                    exit_code = stop_hub(hub)
                result["loadavg_1m_before"] = float(load_before)
                errors = hub.stderr.read_text(errors="replace").splitlines()
                result["hub_stderr_lines"] = len(errors)
                result["hub_stderr_tail"] = errors[-3:]
                if result.get("hub_crashed") or "error" in result or exit_code not in (0, -signal.SIGINT, 130):
                    result["hub_stop_exit_code"] = exit_code
                    result["hub_output_tail"] = hub.tail()
                results.append(result)
                emit(result)
    emit({"summary": summarise(results)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
