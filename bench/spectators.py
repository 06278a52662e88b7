#!/usr/bin/env python3
"""A thousand spectators watching one hub while a moderator and two speakers talk.

    python bench/spectators.py                       # 1000 spectators, 50 rounds, prints one JSON line
    python bench/spectators.py --spectators 200 --rounds 20

It starts its own hub (``server.py --port 0``), pinned to the first CPU when there are two or more,
and measures from outside:

- the join storm: every spectator connects at once (spread over ``--workers`` processes); the
  hub's CPU seconds from the first connection until the last welcome;
- the talk: in each round the moderator asks, then each speaker (registered as a model, so the
  hub's turn-taking applies) streams ``--partials`` pieces and its final message. Every frame
  carries its send time, so each spectator measures delivery and latency (send to receive, on
  the machine's monotonic clock, including the spectator's own reading);
- the hub's CPU per delivery (one frame reaching one spectator) and its resident memory.

Goals (issue 11): every frame delivered, p99 latency at most 100 ms, join storm at most 0.3 s
of hub CPU. See bench/README.md for how to read the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hub_load import HubSampler, hub_cpu_seconds, hub_rss_mb, percentiles
from websockets.asyncio.client import ClientConnection, connect

ROOT = Path(__file__).resolve().parent.parent
SPEAKERS = ("Speaker One", "Speaker Two")
GOALS = {"delivery_ratio": 1.0, "latency_p99_ms": 100.0, "join_storm_hub_cpu_s": 0.3}


def stamp(kind: str, run_id: str, index: int) -> str:
    """Frame content that says which frame it is and when it was sent."""
    return f"{kind} {run_id} {index} {time.monotonic_ns()} " + "x" * 120


# ---------------------------------------------------------------- spectator worker (a separate process)


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (RFC 6455 §5.2); payloads here are short."""
    mask = os.urandom(4)
    head = bytes([0x80 | opcode])
    size = len(payload)
    head += bytes([0x80 | size]) if size < 126 else bytes([0x80 | 126]) + size.to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class RawSpectator:
    """A spectator reading the socket directly: a handful of lines instead of a websocket library.

    A thousand library connections in two processes cost more CPU than the hub itself on a small
    machine, and their queueing would be measured as the hub's latency. Server frames are unmasked
    and (the hub negotiates no compression) plain text, so reading them is cheap; pings are
    answered, so the hub keeps the connection.
    """

    def __init__(self, run_id: str, seen: dict[str, list[int]], latencies: list[int]) -> None:
        self.marker = re.compile(rb'"content":"(s[bp]) ' + run_id.encode() + rb" (\d+) (\d+) ")
        self.seen = seen
        self.latencies = latencies
        self.buffer = bytearray()
        self.writer: asyncio.StreamWriter | None = None

    async def join(self, url: str) -> str | None:
        """Open the websocket and register; None when welcomed, else why not."""
        parts = urlsplit(url)
        reader, self.writer = await asyncio.open_connection(parts.hostname, parts.port)
        key = base64.b64encode(os.urandom(16)).decode()
        self.writer.write(
            f"GET / HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
        if not head.startswith(b"HTTP/1.1 101"):
            return head.split(b"\r\n", 1)[0].decode()
        self.writer.write(client_frame(0x1, json.dumps({"type": "spectator", "protocol": 1}).encode()))
        self.reader = reader
        welcome = await asyncio.wait_for(self.next_text(), 60)
        return None if b'"event":"welcome"' in welcome else welcome.decode(errors="replace")

    async def next_text(self) -> bytes:
        while True:
            frame = self._frame()
            if frame is not None:
                opcode, payload = frame
                if opcode == 0x1:
                    return payload
                continue
            chunk = await self.reader.read(65536)
            if not chunk:
                raise ConnectionResetError("the hub closed the connection")
            self.buffer += chunk

    def _frame(self) -> tuple[int, bytes] | None:
        """Take one whole frame off the buffer, answering pings; None until one is complete."""
        buffer = self.buffer
        if len(buffer) < 2:
            return None
        opcode, length, start = buffer[0] & 0x0F, buffer[1] & 0x7F, 2
        if length == 126:
            if len(buffer) < 4:
                return None
            length, start = int.from_bytes(buffer[2:4], "big"), 4
        elif length == 127:
            if len(buffer) < 10:
                return None
            length, start = int.from_bytes(buffer[2:10], "big"), 10
        if len(buffer) < start + length:
            return None
        payload = bytes(buffer[start:start + length])
        del buffer[:start + length]
        if opcode == 0x9 and self.writer is not None:
            self.writer.write(client_frame(0xA, payload))
        return opcode, payload

    async def read(self) -> None:
        """Time every stamped frame until the connection ends."""
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                payload = await self.next_text()
                now = time.monotonic_ns()
                found = self.marker.search(payload)
                if found:
                    self.seen[found.group(1).decode()].append(int(found.group(2)))
                    self.latencies.append((now - int(found.group(3))) // 1000)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.write(client_frame(0x8, (1000).to_bytes(2, "big")))
            self.writer.close()


async def worker_main(args: argparse.Namespace) -> int:
    """Open ``--count`` spectators, say READY, then report what each saw when told to stop."""
    gate = asyncio.Semaphore(args.connect_concurrency)
    failures: list[str] = []
    per_spectator: list[dict[str, list[int]]] = []
    latencies: list[int] = []

    readers: list[asyncio.Task[None]] = []

    async def one() -> RawSpectator | None:
        seen: dict[str, list[int]] = {"sb": [], "sp": []}
        per_spectator.append(seen)
        spectator = RawSpectator(args.run_id, seen, latencies)
        async with gate:
            try:
                refused = await spectator.join(args.url)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as error:
                refused = f"{type(error).__name__}: {error}"
        if refused:
            failures.append(refused)
            spectator.close()
            return None
        readers.append(asyncio.create_task(spectator.read()))
        return spectator

    connections = [spectator for spectator in await asyncio.gather(*(one() for _ in range(args.count)))
                   if spectator is not None]
    print(f"READY {len(connections)} {len(failures)}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    result = {
        "connected": len(connections),
        "failed": len(failures),
        "errors": failures[:5],
        "messages": [len(set(seen["sb"])) for seen in per_spectator],
        "duplicates": sum(len(seen["sb"]) - len(set(seen["sb"])) for seen in per_spectator),
        "partials": [len(seen["sp"]) for seen in per_spectator],
        "latencies_us": latencies,
    }
    Path(args.result_file).write_text(json.dumps(result))
    for spectator in connections:
        spectator.close()
    for task in readers:
        task.cancel()
    return 0


# ---------------------------------------------------------------- the talkers (this process)


async def register(url: str, name: str, kind: str) -> ClientConnection:
    ws = await connect(url, compression=None, ping_interval=None, max_size=None)
    await ws.send(json.dumps({"name": name, "type": kind, "protocol": 1}))
    welcome = json.loads(await ws.recv())
    if welcome.get("event") != "welcome":
        raise RuntimeError(f"{name} was refused: {welcome.get('content')}")
    return ws


async def speak(ws: ClientConnection, name: str, run_id: str, partials: int, pause: float,
                counter: list[int], sent: dict[str, int]) -> None:
    """A model that, whenever it gets the turn, streams some pieces and then its message."""
    answered = None
    async for raw in ws:
        frame = json.loads(raw)
        if frame.get("type") != "turn" or frame.get("paused") or name not in frame.get("speakers", []):
            continue
        if frame["turn"] == answered:
            continue
        answered = frame["turn"]
        for _ in range(partials):
            counter[0] += 1
            await ws.send(json.dumps({"type": "partial", "content": stamp("sp", run_id, counter[0])}))
            sent["sp"] += 1
            await asyncio.sleep(pause)
        counter[0] += 1
        await ws.send(json.dumps({"type": "message", "turn": answered, "content": stamp("sb", run_id, counter[0])}))
        sent["sb"] += 1


async def moderate(ws: ClientConnection, run_id: str, rounds: int, pause: float, counter: list[int],
                   sent: dict[str, int]) -> None:
    """Ask, wait until both speakers have answered (the hub says so: the floor comes back), repeat."""
    for _ in range(rounds):
        counter[0] += 1
        await ws.send(json.dumps({"type": "message", "content": stamp("sb", run_id, counter[0])}))
        sent["sb"] += 1
        answers = 0
        while answers < len(SPEAKERS):
            frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
            if frame.get("type") == "message" and frame.get("from") in SPEAKERS:
                answers += 1
        await asyncio.sleep(pause)


# ---------------------------------------------------------------- coordinator


async def bare_main() -> int:
    """A websockets server that welcomes each connection with one frame and nothing else.

    Served with the hub's own settings, it shows what a join storm costs in the websockets library
    alone (handshakes, connections, one write each): the floor under the hub's figure.
    """
    from websockets.asyncio.server import serve

    async def welcome(ws: Any) -> None:
        await ws.recv()
        await ws.send(json.dumps({"type": "system", "event": "welcome", "content": "Watching the room"}))
        async for _ in ws:
            pass

    async with serve(welcome, "127.0.0.1", 0, compression=None, max_queue=16, write_limit=64 * 1024,
                     ping_interval=20, ping_timeout=20, close_timeout=2) as server:
        print(f"listening on ws://127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
        await asyncio.Future()
    return 0


async def start_hub(args: argparse.Namespace, tmp: Path, *,
                    bare: bool = False) -> tuple[asyncio.subprocess.Process, str]:
    """Our hub (or, with ``bare``, the bare websockets server) on a free port; returns it and its URL."""
    command = [__file__, "_bare"] if bare else [
        str(ROOT / "server.py"), "--host", "127.0.0.1", "--port", "0", "--rate-limit", "0",
        "--log-level", "WARNING", "--turn-timeout", "0", "--transcript", str(tmp / "transcript.jsonl"),
        "--max-spectators", str(args.spectators + args.probes)]
    hub = await asyncio.create_subprocess_exec(sys.executable, *command, stdout=asyncio.subprocess.PIPE)
    assert hub.stdout is not None
    while line := await asyncio.wait_for(hub.stdout.readline(), 60):
        found = re.search(rb"listening on (ws://\S+)", line)
        if found:
            return hub, found.group(1).decode()
    raise RuntimeError("the hub exited before it listened")


@dataclass
class Worker:
    """A process holding many spectators; it writes what they saw to ``result`` when stopped."""

    process: asyncio.subprocess.Process
    result: Path


async def spawn(args: argparse.Namespace, url: str, run_id: str, result: Path, count: int) -> Worker:
    process = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "_watch", "--url", url, "--count", str(count), "--run-id", run_id,
        "--result-file", str(result), "--connect-concurrency", str(args.connect_concurrency),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )
    return Worker(process, result)


async def storm(args: argparse.Namespace, url: str, run_id: str, tmp: Path) -> list[Worker]:
    """All ``--spectators`` connecting at once, spread over ``--workers`` processes."""
    share = [args.spectators // args.workers + (i < args.spectators % args.workers) for i in range(args.workers)]
    return [await spawn(args, url, run_id, tmp / f"worker-{index}.json", count) for index, count in enumerate(share)]


async def ready(args: argparse.Namespace, group: list[Worker]) -> tuple[int, int]:
    """Wait until every spectator of these processes is welcomed or refused: (joined, failed)."""
    joined = failed = 0
    for worker in group:
        assert worker.process.stdout is not None
        words = (await asyncio.wait_for(worker.process.stdout.readline(), args.deadline)).split()
        joined, failed = joined + int(words[1]), failed + int(words[2])
    return joined, failed


async def stop(worker: Worker) -> dict[str, Any]:
    assert worker.process.stdin is not None
    worker.process.stdin.write(b"stop\n")
    await worker.process.stdin.drain()
    await asyncio.wait_for(worker.process.wait(), 60)
    return json.loads(worker.result.read_text())


async def bare_storm(args: argparse.Namespace, tmp: Path, cpus: list[int]) -> float:
    """The hub CPU of the same join storm against a bare websockets server."""
    server, url = await start_hub(args, tmp, bare=True)
    try:
        if len(cpus) >= 2:
            pin(server.pid, {cpus[0]})
        await asyncio.sleep(0.5)
        before = hub_cpu_seconds(server.pid)
        workers = await storm(args, url, "bare", tmp)
        await ready(args, workers)
        cpu = hub_cpu_seconds(server.pid) - before
        for worker in workers:
            await stop(worker)
        return round(cpu, 2)
    finally:
        server.terminate()
        await server.wait()


def pin(pid: int, cpus: set[int]) -> None:
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setaffinity(pid, cpus)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:8]
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        if args.url:
            hub, url, hub_pid = None, args.url, args.hub_pid
        else:
            hub, url = await start_hub(args, tmp)
            hub_pid = hub.pid
        if len(cpus) >= 2 and hub_pid:
            pin(hub_pid, {cpus[0]})
            pin(os.getpid(), set(cpus[1:]))
        sampler = HubSampler(hub_pid)
        sampler.start()
        try:
            talkers = [await register(url, "Moderator", "human")]
            talkers += [await register(url, name, "model") for name in SPEAKERS]
            await asyncio.sleep(0.5)
            rss_before = hub_rss_mb(hub_pid)

            cpu_before_storm = hub_cpu_seconds(hub_pid)
            storm_started = time.monotonic()
            workers = await storm(args, url, run_id, tmp)
            joined, failed = await ready(args, workers)
            storm_wall = time.monotonic() - storm_started
            storm_cpu = hub_cpu_seconds(hub_pid) - cpu_before_storm
            rss_after_storm = hub_rss_mb(hub_pid)
            # The probes join last, so the hub writes to them last: their latency is the worst a
            # spectator sees, and their own process is idle enough not to add its queueing to it.
            probes = await spawn(args, url, run_id, tmp / "probes.json", args.probes)
            probes_joined, probes_failed = await ready(args, [probes])
            await asyncio.sleep(1.5)  # the coalesced spectator count goes out once; not part of the talk

            counter, sent = [0], {"sb": 0, "sp": 0}
            speakers = [asyncio.create_task(speak(ws, name, run_id, args.partials, args.pause, counter, sent))
                        for ws, name in zip(talkers[1:], SPEAKERS, strict=True)]
            cpu_before_talk = hub_cpu_seconds(hub_pid)
            talk_started = time.monotonic()
            await asyncio.wait_for(moderate(talkers[0], run_id, args.rounds, args.pause, counter, sent),
                                   args.deadline)
            await asyncio.sleep(args.grace)
            talk_wall = time.monotonic() - talk_started
            talk_cpu = hub_cpu_seconds(hub_pid) - cpu_before_talk
            results = [await stop(worker) for worker in [*workers, probes]]
            for task in speakers:
                task.cancel()
            for ws in talkers:
                await ws.close()
        finally:
            await sampler.stop()
            if hub is not None and hub.returncode is None:
                hub.terminate()
                await hub.wait()
        bare_cpu = await bare_storm(args, tmp, cpus) if args.compare_bare else None

    messages = [n for r in results for n in r["messages"]]
    partials = [n for r in results for n in r["partials"]]
    delivered = sum(messages) + sum(partials)
    watching = args.spectators + args.probes
    expected_messages = sent["sb"] * watching
    expected_partials = sent["sp"] * watching
    latency = percentiles(results[-1]["latencies_us"])
    report = {
        "spectators": args.spectators,
        "joined": joined,
        "join_failed": failed,
        "join_storm": {"wall_s": round(storm_wall, 2), "hub_cpu_s": round(storm_cpu, 2),
                       "bare_websockets_cpu_s": bare_cpu},
        "rounds": args.rounds,
        "messages_sent": sent["sb"],
        "partials_sent": sent["sp"],
        "delivery_ratio": round(sum(messages) / expected_messages, 5) if expected_messages else None,
        "partial_delivery_ratio": round(sum(partials) / expected_partials, 5) if expected_partials else None,
        "duplicates": sum(r["duplicates"] for r in results),
        "probes": probes_joined,
        "probes_failed": probes_failed,
        "latency_ms": latency,
        "latency_ms_in_load_workers": percentiles([v for r in results[:-1] for v in r["latencies_us"]]),
        "talk_wall_s": round(talk_wall, 2),
        "hub_cpu_talk_s": round(talk_cpu, 2),
        "hub_cpu_ms_per_delivery": round(talk_cpu * 1000 / delivered, 4) if delivered else None,
        "hub_rss_mb": {"before_storm": rss_before, "after_storm": rss_after_storm,
                       **(sampler.summary(series=False) or {})},
        "hub_pinned_cpu": cpus[0] if len(cpus) >= 2 and hub_pid else None,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "errors": [e for r in results for e in r["errors"]][:5],
    }
    report["goals_met"] = {
        "delivery": report["delivery_ratio"] == GOALS["delivery_ratio"]
        and report["partial_delivery_ratio"] == GOALS["delivery_ratio"],
        "latency_p99": latency["p99"] is not None and latency["p99"] <= GOALS["latency_p99_ms"],
        "join_storm_cpu": storm_cpu <= GOALS["join_storm_hub_cpu_s"],
    }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    worker = sub.add_parser("_watch", help="(internal) a process holding many spectators")
    worker.add_argument("--url", required=True)
    worker.add_argument("--count", type=int, required=True)
    worker.add_argument("--run-id", required=True)
    worker.add_argument("--result-file", required=True)
    worker.add_argument("--connect-concurrency", type=int, default=200)
    sub.add_parser("_bare", help="(internal) a bare websockets server, for --compare-bare")
    parser.add_argument("--compare-bare", action="store_true",
                        help="also time the same join storm against a bare websockets server (the library's floor)")
    parser.add_argument("--url", help="measure a hub already running here instead of starting one")
    parser.add_argument("--hub-pid", type=int, help="with --url: the hub's process id, for its CPU and memory")
    parser.add_argument("--spectators", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=30, help="moderator questions, each answered by both speakers")
    parser.add_argument("--partials", type=int, default=3, help="streamed pieces before each speaker's message")
    parser.add_argument("--pause", type=float, default=0.2,
                        help="seconds between a speaker's pieces, and between rounds (default 0.2: a sentence "
                             "every 0.2 s is faster than the embedded model writes them)")
    parser.add_argument("--workers", type=int, default=2, help="processes the spectators are spread over")
    parser.add_argument("--probes", type=int, default=20,
                        help="extra spectators in a process of their own, joined last, that time the latency")
    parser.add_argument("--connect-concurrency", type=int, default=200, help="connections a worker opens at once")
    parser.add_argument("--grace", type=float, default=2.0, help="seconds to let the last frames arrive")
    parser.add_argument("--deadline", type=float, default=180.0)
    args = parser.parse_args(argv)
    if args.command != "_watch" and args.url and not args.hub_pid:
        parser.error("--url needs --hub-pid, to read the hub's CPU and memory")
    if args.command == "_watch":
        return asyncio.run(worker_main(args))
    if args.command == "_bare":
        return asyncio.run(bare_main())
    print(json.dumps(asyncio.run(run(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
