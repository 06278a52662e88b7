#!/usr/bin/env python3
"""Memory and start-up time of a cast in one client.py process against one process per persona.

    python bench/cast_memory.py                       # every in-process engine installed, 1, 3 and 7 personas
    python bench/cast_memory.py --engines transformers --counts 1,7 --out /tmp/cast.jsonl

For each engine and persona count it starts a fresh hub, then the personas either as one
``client.py --persona ... --persona ...`` process or as that many ``client.py --name ...``
processes, all on the embedded model. It times the start until every persona has joined (as the
hub announces them to a watcher), has the watcher say one line so each persona generates one
reply, waits a moment, and reads the client processes' memory from /proc (Linux only):

- ``steady_rss_mb``: VmRSS after the replies, summed over the client processes.
- ``peak_rss_mb``: VmHWM (the high-water mark of VmRSS), summed over the client processes.
- ``steady_pss_mb``: Pss from smaps_rollup: shared pages (libraries, a model file mapped by several
  processes) divided among their users, so separate processes are not charged twice for them.

One JSON line per run, then a ``summary`` line with the ratios the goal is about
(``one_process_7 / one_process_1`` steady RSS: goal at most 1.2).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect

from partychat.demo import start, stop_all

PERSONAS = (("Assistant", "assistant.txt"), ("Zen Sage", "sage.txt"), ("TinkerBot", "inventor.txt"),
            ("Researcher", "researcher.txt"), ("Philosopher", "philosopher.txt"), ("Scientist", "scientist.txt"),
            ("Historian", "historian.txt"))
ENGINE_PACKAGES = {"transformers": "transformers", "llama.cpp": "llama_cpp"}
SETTLE_SECONDS = 3.0


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM and Pss of one process, in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    values = {key: int(re.search(rf"^{key}:\s+(\d+) kB", status, re.M)[1]) / 1024  # type: ignore[index]
              for key in ("VmRSS", "VmHWM")}
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    values["Pss"] = int(re.search(r"^Pss:\s+(\d+) kB", rollup, re.M)[1]) / 1024  # type: ignore[index]
    return values


async def watch(url: str, names: list[str], launch: Callable[[], list[subprocess.Popen[bytes]]],
                timeout: float) -> dict[str, float]:
    """Start the clients; seconds until every persona joined, then until each took its turn (reply or pass)."""
    async with connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"name": "Bench", "type": "human", "protocol": 1}))
        await ws.recv()  # the welcome: from here on every join is seen
        started = time.monotonic()
        deadline = started + timeout
        clients = launch()
        joined: set[str] = set()
        replied: set[str] = set()
        timings: dict[str, float] = {}
        while True:
            if any(c.poll() is not None for c in clients):
                raise RuntimeError("a client process ended early; see its log")
            try:
                frame = json.loads(await asyncio.wait_for(ws.recv(), max(deadline - time.monotonic(), 0.1)))
            except asyncio.TimeoutError:
                raise RuntimeError(f"timed out: joined {sorted(joined)}, replied {sorted(replied)}") from None
            text = frame.get("content", "")
            event = frame.get("event") if frame.get("type") == "system" else None
            if event == "join" and (who := text.removesuffix(" joined the chat")) in names:
                joined.add(who)
                if joined == set(names):
                    timings["join_s"] = time.monotonic() - started
                    await ws.send(json.dumps({"type": "message", "content": "Say hello in one short sentence."}))
                    asked = time.monotonic()
            elif event == "pass" or (frame.get("type") == "message" and not frame.get("replay")):
                # a persona that found nothing to say passes: its turn is over all the same
                who = frame.get("from") or text.split(" passed its turn", 1)[0]
                if who in names:
                    replied.add(who)
                if replied == set(names):
                    timings["replies_s"] = time.monotonic() - asked
                    return timings


def run(engine: str, count: int, layout: str, work: Path, max_tokens: int, timeout: float) -> dict[str, Any]:
    hub = start(["-m", "partychat.hub", "--host", "127.0.0.1", "--port", "0", "--log-level", "WARNING",
                 "--transcript", str(work / "transcript.jsonl")], work / "hub.log")
    processes = [hub]
    try:
        deadline = time.monotonic() + 30
        while not (found := re.search(r"listening on (ws://\S+)", (work / "hub.log").read_text())):
            if time.monotonic() > deadline or hub.poll() is not None:
                raise RuntimeError("the hub did not start")
            time.sleep(0.1)
        url = found[1]
        cast = PERSONAS[:count]
        common = ["--server", url, "--backend", engine, "--max-generation-tokens", str(max_tokens),
                  "--temperature", "0", "--log-level", "WARNING"]
        clients: list[subprocess.Popen[bytes]] = []

        def launch() -> list[subprocess.Popen[bytes]]:
            if layout == "one process":
                personas = [arg for name, prompt in cast for arg in ("--persona", f"{name}={prompt}")]
                clients.append(start(["-m", "partychat.persona", *personas, *common], work / "cast.log"))
            else:
                clients.extend(start(["-m", "partychat.persona", "--name", name, "--prompt-file", prompt, *common],
                                     work / f"{prompt}.log") for name, prompt in cast)
            processes.extend(clients)
            return clients

        timings = asyncio.run(watch(url, [name for name, _ in cast], launch, timeout))
        time.sleep(SETTLE_SECONDS)
        memory = [memory_mb(client.pid) for client in clients]
        return {"engine": engine, "personas": count, "layout": layout, "processes": len(clients),
                "steady_rss_mb": round(sum(m["VmRSS"] for m in memory)),
                "peak_rss_mb": round(sum(m["VmHWM"] for m in memory)),
                "steady_pss_mb": round(sum(m["Pss"] for m in memory)),
                **{key: round(value, 1) for key, value in timings.items()}}
    finally:
        stop_all(processes[::-1], timeout=20)


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    by = {(r["engine"], r["layout"], r["personas"]): r for r in results if "error" not in r}
    ratios: dict[str, Any] = {}
    for engine in sorted({r["engine"] for r in results}):
        one = by.get((engine, "one process", 1))
        for count in (3, 7):
            cast = by.get((engine, "one process", count))
            separate = by.get((engine, "separate processes", count))
            if one and cast:
                ratios[f"{engine}: one process {count} / 1, steady RSS"] = round(cast["steady_rss_mb"]
                                                                                  / one["steady_rss_mb"], 2)
            if cast and separate:
                ratios[f"{engine}: separate / one process, {count} personas, steady RSS"] = round(
                    separate["steady_rss_mb"] / cast["steady_rss_mb"], 2)
                ratios[f"{engine}: separate / one process, {count} personas, peak RSS"] = round(
                    separate["peak_rss_mb"] / cast["peak_rss_mb"], 2)
        for count in (1, 7):
            cast, separate = by.get((engine, "one process", count)), by.get((engine, "separate processes", count))
            if cast and separate:
                ratios[f"{engine}: separate / one process, {count} personas, time to join"] = round(
                    separate["join_s"] / cast["join_s"], 2)
    return {"summary": ratios, "goal": "one process 7 / 1 steady RSS <= 1.2"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    installed = [e for e, package in ENGINE_PACKAGES.items() if importlib.util.find_spec(package) is not None]
    parser.add_argument("--engines", default=",".join(installed), help=f"default: {','.join(installed)}")
    parser.add_argument("--counts", default="1,3,7")
    parser.add_argument("--layouts", default="one process,separate processes")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed for one run")
    parser.add_argument("--out", type=Path, help="also append the JSON lines here")
    args = parser.parse_args()
    results = []
    meta = {"meta": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()[0], "engines": args.engines}}
    lines = [meta]
    print(json.dumps(meta), flush=True)
    for engine in args.engines.split(","):
        for count in (int(c) for c in args.counts.split(",")):
            for layout in args.layouts.split(","):
                with tempfile.TemporaryDirectory(prefix="cast-bench-") as work:
                    try:
                        result = run(engine, count, layout, Path(work), args.max_tokens, args.timeout)
                    except RuntimeError as error:
                        logs = {p.name: p.read_text(errors="replace")[-400:] for p in Path(work).glob("*.log")}
                        result = {"engine": engine, "personas": count, "layout": layout, "error": str(error),
                                  "logs": logs}
                results.append(result)
                lines.append(result)
                print(json.dumps(result), flush=True)
    lines.append(summary(results))
    lines[-1]["loadavg_end"] = os.getloadavg()[0]
    print(json.dumps(lines[-1]), flush=True)
    if args.out:
        with args.out.open("a") as out:
            out.writelines(json.dumps(line) + "\n" for line in lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
