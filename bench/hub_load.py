#!/usr/bin/env python3
"""Load tools for a Party Chat hub (ours or any hub speaking the baseline protocol).

Each subcommand prints ONE JSON line of results on stdout:

    python bench/hub_load.py fanout --url ws://127.0.0.1:PORT --hub-pid PID --listeners 100 --messages 500
    python bench/hub_load.py stall --url ws://127.0.0.1:PORT --hub-pid PID --healthy 20 --stalled 10

Listeners run in separate worker processes (``_listen``, started by this script), the sender runs in
this process; none of them share the hub's process. With ``--hub-pid`` the hub's own CPU time
(utime+stime from /proc/PID/stat) and resident memory (VmRSS from /proc/PID/status) are read.
See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

CLK_TCK = os.sysconf("SC_CLK_TCK")
WELCOME_TIMEOUT = 20.0
CLOSE_TIMEOUT = 2.0
MAX_FRAME = 4 * 1024 * 1024


# ---------------------------------------------------------------- hub process probes


def hub_cpu_seconds(pid: int | None) -> float | None:
    """CPU seconds (user + system) the process has used, or None if it is gone."""
    if pid is None:
        return None
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def hub_rss_mb(pid: int | None) -> float | None:
    """Resident memory of the process in MiB (VmRSS), or None if it is gone."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


@dataclass
class HubSampler:
    """Samples the hub's RSS and CPU every ``period`` seconds in the background."""

    pid: int | None
    period: float = 0.5
    samples: list[tuple[float, float, float]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.pid is not None:
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        t0 = time.monotonic()
        while True:
            rss, cpu = hub_rss_mb(self.pid), hub_cpu_seconds(self.pid)
            if rss is None or cpu is None:
                return
            self.samples.append((round(time.monotonic() - t0, 2), rss, round(cpu, 2)))
            await asyncio.sleep(self.period)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def summary(self, *, series: bool) -> dict[str, Any] | None:
        if not self.samples:
            return None
        rss = [s[1] for s in self.samples]
        out: dict[str, Any] = {"start": rss[0], "min": min(rss), "max": max(rss), "last": rss[-1]}
        if series:
            out["series"] = [[t, r] for t, r, _ in self.samples]
        return out


# ---------------------------------------------------------------- protocol helpers


def payload(run_id: str, index: int, size: int) -> str:
    """Message content: run id, index and send time (monotonic ns), padded with fresh random text."""
    head = f"hb {run_id} {index} {time.monotonic_ns()} "
    pad = max(0, size - len(head))
    # Fresh random text per message, so that deflate cannot shrink it by pointing at the previous one.
    return head + base64.b64encode(os.urandom(pad * 3 // 4 + 3)).decode()[:pad]


async def open_client(url: str, name: str, *, compression: str | None, rcvbuf: int | None = None) -> ClientConnection:
    """Connect and register as a ``human``; raise RuntimeError if the hub does not welcome us."""
    sock = None
    if rcvbuf:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        loop = asyncio.get_running_loop()
        family, kind, proto, _, address = (await loop.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM))[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: fixes the TCP window
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except OSError:
            sock.close()
            raise
    ws = await connect(
        url,
        sock=sock,
        compression=compression,
        ping_interval=None,
        open_timeout=30,
        close_timeout=CLOSE_TIMEOUT,
        max_size=MAX_FRAME,
    )
    try:
        await ws.send(json.dumps({"name": name, "type": "human"}))
        deadline = time.monotonic() + WELCOME_TIMEOUT
        while True:
            raw = await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic()))
            data = json.loads(raw)
            if data.get("type") == "system" and str(data.get("content", "")).startswith("Connected as"):
                return ws
            if data.get("type") == "system" and (data.get("event") == "error" or data.get("code")):
                raise RuntimeError(f"refused: {data.get('content')}")
    except BaseException:
        await ws.close()
        raise


def percentiles(values_us: list[int]) -> dict[str, float | None]:
    """p50/p90/p99/max/mean in milliseconds (nearest rank)."""
    if not values_us:
        return {"p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    data = sorted(values_us)

    def rank(q: float) -> float:
        return round(data[min(len(data) - 1, max(0, int(q * len(data) + 0.5) - 1))] / 1000, 2)

    return {
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p99": rank(0.99),
        "max": round(data[-1] / 1000, 2),
        "mean": round(sum(data) / len(data) / 1000, 2),
    }


# ---------------------------------------------------------------- listener worker (a separate process)


@dataclass
class Listener:
    """One listening connection and what it saw."""

    ws: ClientConnection
    received: int = 0
    last_ns: int = 0
    latencies_us: list[int] = field(default_factory=list)
    closed_code: int | None = None
    closed_during_run: bool = False


async def _listen_loop(listener: Listener, prefix: str, expected: int, stopping: asyncio.Event,
                       on_done: asyncio.Event, counter: list[int]) -> None:
    ws = listener.ws
    try:
        async for raw in ws:
            now = time.monotonic_ns()
            if isinstance(raw, bytes) or prefix not in raw:
                continue
            data = json.loads(raw)
            content = data.get("content")
            if data.get("type") != "message" or not isinstance(content, str) or not content.startswith(prefix):
                continue
            sent_ns = int(content.split(" ", 4)[3])
            listener.latencies_us.append((now - sent_ns) // 1000)
            listener.received += 1
            listener.last_ns = now
            if listener.received == expected:
                counter[0] -= 1
                if counter[0] == 0:
                    on_done.set()
    except ConnectionClosed:
        pass
    if not stopping.is_set():
        listener.closed_during_run = True
        listener.closed_code = ws.close_code


async def _drain_stalled(listener: Listener, prefix: str, timeout: float) -> None:
    """At the end, resume reading a stalled peer and see whether the hub had closed it."""
    ws = listener.ws
    if ws.transport is not None:
        with contextlib.suppress(RuntimeError):
            ws.transport.resume_reading()

    async def drain() -> None:
        async for raw in ws:
            if isinstance(raw, str) and prefix in raw:
                listener.received += 1

    try:
        await asyncio.wait_for(drain(), timeout)
    except asyncio.TimeoutError:
        return  # still open: the hub never closed it
    except ConnectionClosed:
        pass
    listener.closed_during_run = True
    listener.closed_code = ws.close_code


async def worker_main(args: argparse.Namespace) -> int:
    """Open ``--count`` listeners, report READY / DONE on stdout, stop on ``stop`` from stdin."""
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    compression = None if args.compression == "none" else "deflate"
    prefix = f"hb {args.run_id} "
    gate = asyncio.Semaphore(args.connect_concurrency)
    errors: list[str] = []
    listeners: list[Listener] = []
    stopping, all_done = asyncio.Event(), asyncio.Event()
    counter = [0]
    tasks: list[asyncio.Task[None]] = []

    async def open_one(index: int) -> None:
        async with gate:
            try:
                ws = await open_client(args.url, f"{args.name_prefix}-{index}", compression=compression,
                                       rcvbuf=args.rcvbuf if args.stall else None)
            except Exception as error:
                errors.append(f"{type(error).__name__}: {error}")
                return
        listener = Listener(ws)
        listeners.append(listener)
        if args.stall:
            if ws.transport is not None:
                ws.transport.pause_reading()  # never read again until the end
        else:
            counter[0] += 1
            tasks.append(asyncio.create_task(
                _listen_loop(listener, prefix, args.messages, stopping, all_done, counter)))

    await asyncio.wait_for(asyncio.gather(*(open_one(i) for i in range(args.count))), args.deadline)
    print(f"READY {len(listeners)} {len(errors)}", flush=True)

    async def wait_stop() -> None:
        while True:
            line = await stdin.readline()
            if not line or line.strip() == b"stop":
                return

    stop_task = asyncio.create_task(wait_stop())
    if not args.stall and counter[0] > 0:
        done_task = asyncio.create_task(all_done.wait())
        finished, _ = await asyncio.wait({stop_task, done_task}, timeout=args.deadline,
                                         return_when=asyncio.FIRST_COMPLETED)
        if done_task in finished:
            print("DONE", flush=True)
        else:
            done_task.cancel()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop_task, args.deadline)
    stopping.set()
    if args.stall:
        await asyncio.gather(*(_drain_stalled(listener, prefix, 3.0) for listener in listeners))
    codes: dict[str, int] = {}
    for listener in listeners:
        if listener.closed_during_run:
            key = str(listener.closed_code)
            codes[key] = codes.get(key, 0) + 1
    result = {
        "connected": len(listeners),
        "failed": len(errors),
        "errors": errors[:5],
        "received": [listener.received for listener in listeners],
        "last_ns": max((listener.last_ns for listener in listeners), default=0),
        "closed_by_hub": sum(listener.closed_during_run for listener in listeners),
        "close_codes": codes,
        "latencies_us": [v for listener in listeners for v in listener.latencies_us],
    }
    Path(args.result_file).write_text(json.dumps(result))
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(
            asyncio.gather(*(listener.ws.close() for listener in listeners), return_exceptions=True),
            CLOSE_TIMEOUT * 3,
        )
    for task in tasks:
        task.cancel()
    print("RESULT", flush=True)
    return 0


# ---------------------------------------------------------------- coordinator side


class Worker:
    """A listener worker process and its READY / DONE / RESULT handshake."""

    def __init__(self, proc: asyncio.subprocess.Process, result_file: Path) -> None:
        self.proc = proc
        self.result_file = result_file
        self.ready: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        self.done = asyncio.Event()
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def spawn(cls, args: argparse.Namespace, *, count: int, name_prefix: str, run_id: str,
                    messages: int, stall: bool, tmp: Path) -> Worker:
        result_file = tmp / f"{name_prefix}.json"
        argv = [sys.executable, str(Path(__file__).resolve()), "_listen", "--url", args.url,
                "--count", str(count), "--name-prefix", name_prefix, "--run-id", run_id,
                "--messages", str(messages), "--result-file", str(result_file),
                "--compression", args.compression, "--deadline", str(args.deadline),
                "--connect-concurrency", str(args.connect_concurrency)]
        if stall:
            argv += ["--stall", "--rcvbuf", str(args.rcvbuf)]
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE)
        return cls(proc, result_file)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            words = line.decode().split()
            if words[:1] == ["READY"] and not self.ready.done():
                self.ready.set_result((int(words[1]), int(words[2])))
            elif words[:1] == ["DONE"]:
                self.done.set()
        if not self.ready.done():
            self.ready.set_exception(RuntimeError(f"listener worker exited early ({await self.proc.wait()})"))

    async def kill(self) -> None:
        """Make sure the process is gone (used when a run is cut short)."""
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self.reader.cancel()

    async def finish(self, timeout: float) -> dict[str, Any]:
        """Tell the worker to stop and collect what it measured."""
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.proc.stdin.write(b"stop\n")
            await self.proc.stdin.drain()
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        self.reader.cancel()
        try:
            return json.loads(self.result_file.read_text())
        except (OSError, ValueError):
            return {"connected": 0, "failed": 0, "errors": ["worker gave no result"], "received": [],
                    "last_ns": 0, "closed_by_hub": 0, "close_codes": {}, "latencies_us": []}


@dataclass
class Sender:
    """The one participant that talks; paces its messages on a fixed schedule."""

    ws: ClientConnection
    sent: int = 0
    first_ns: int = 0
    last_ns: int = 0
    error: str | None = None
    _drain: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, url: str, run_id: str, compression: str | None) -> Sender:
        sender = cls(await open_client(url, f"bench-sender-{run_id}", compression=compression))
        sender._drain = asyncio.create_task(sender._discard())
        return sender

    async def _discard(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for _ in self.ws:
                pass

    async def send(self, run_id: str, count: int, interval: float, size: int, timeout: float) -> None:
        """Send ``count`` messages every ``interval`` seconds; give up after ``timeout`` seconds."""

        async def run() -> None:
            start = time.monotonic()
            for index in range(count):
                delay = start + index * interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                frame = json.dumps({"type": "message", "content": payload(run_id, index, size)})
                if index == 0:
                    self.first_ns = time.monotonic_ns()
                await self.ws.send(frame)
                self.sent += 1
                self.last_ns = time.monotonic_ns()

        try:
            await asyncio.wait_for(run(), timeout)
        except asyncio.TimeoutError:
            self.error = f"send timed out after {timeout:.0f}s ({self.sent}/{count} sent)"
        except ConnectionClosed as error:
            self.error = f"sender disconnected: {error}"

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), CLOSE_TIMEOUT * 2)
        if self._drain is not None:
            self._drain.cancel()


def _split(total: int, parts: int) -> list[int]:
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    codes: dict[str, int] = {}
    for result in results:
        for key, value in result["close_codes"].items():
            codes[key] = codes.get(key, 0) + value
    return {
        "connected": sum(r["connected"] for r in results),
        "failed": sum(r["failed"] for r in results),
        "errors": [e for r in results for e in r["errors"]][:5],
        "received": [n for r in results for n in r["received"]],
        "last_ns": max((r["last_ns"] for r in results), default=0),
        "closed_by_hub": sum(r["closed_by_hub"] for r in results),
        "close_codes": codes,
        "latencies_us": [v for r in results for v in r["latencies_us"]],
    }


async def _start_workers(args: argparse.Namespace, workers: list[Worker]) -> tuple[int, int]:
    ready = await asyncio.wait_for(asyncio.gather(*(w.ready for w in workers)), args.deadline)
    return sum(r[0] for r in ready), sum(r[1] for r in ready)


async def _wait_done(workers: list[Worker], timeout: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(w.done.wait() for w in workers)), max(0.0, timeout))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _delta(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else round(after - before, 3)


async def run_fanout(args: argparse.Namespace) -> dict[str, Any]:
    """N listeners, one sender, M paced messages: latency, delivery and hub CPU per delivery."""
    run_id = uuid.uuid4().hex[:8]
    compression = None if args.compression == "none" else "deflate"
    sampler = HubSampler(args.hub_pid)
    sampler.start()
    cpu0 = hub_cpu_seconds(args.hub_pid)
    workers: list[Worker] = []
    sender: Sender | None = None
    with tempfile.TemporaryDirectory(prefix="hub-load-") as tmp:
        try:
            for i, count in enumerate(_split(args.listeners, args.workers)):
                workers.append(await Worker.spawn(args, count=count, name_prefix=f"l{run_id}-{i}", run_id=run_id,
                                                  messages=args.messages, stall=False, tmp=Path(tmp)))
            connected, failed = await _start_workers(args, workers)
            sender = await Sender.open(args.url, run_id, compression)
            await asyncio.sleep(args.settle)  # let join notices finish before measuring
            cpu1 = hub_cpu_seconds(args.hub_pid)
            wall1 = time.monotonic()
            send_timeout = args.messages * args.interval + args.grace
            await sender.send(run_id, args.messages, args.interval, args.size, send_timeout)
            await _wait_done(workers, args.grace)
            cpu2 = hub_cpu_seconds(args.hub_pid)
            wall2 = time.monotonic()
            results = _merge(list(await asyncio.gather(*(w.finish(args.grace) for w in workers))))
        finally:
            await asyncio.gather(*(w.kill() for w in workers))
            if sender is not None:
                await sender.close()
            await sampler.stop()
    assert sender is not None
    delivered = sum(results["received"])
    expected = args.listeners * args.messages
    cpu = _delta(cpu2, cpu1)
    return {
        "bench": "fanout",
        "url": args.url,
        "listeners": args.listeners,
        "connected": connected,
        "connect_failed": failed,
        "connect_errors": results["errors"],
        "messages": args.messages,
        "sent": sender.sent,
        "sender_error": sender.error,
        "interval_ms": _ms(args.interval),
        "size": args.size,
        "compression": args.compression,
        "expected": expected,
        "delivered": delivered,
        "delivery_ratio": round(delivered / expected, 4) if expected else None,
        "latency_ms": percentiles(results["latencies_us"]),
        "send_s": round((sender.last_ns - sender.first_ns) / 1e9, 3) if sender.sent else None,
        "last_delivery_s": round((results["last_ns"] - sender.first_ns) / 1e9, 3) if delivered else None,
        "measured_s": round(wall2 - wall1, 3),
        "hub_cpu_connect_s": _delta(cpu1, cpu0),
        "hub_cpu_s": cpu,
        "hub_cpu_ms_per_delivered": round(cpu * 1000 / delivered, 4) if cpu is not None and delivered else None,
        "hub_cpu_ms_per_sent": round(cpu * 1000 / sender.sent, 3) if cpu is not None and sender.sent else None,
        "hub_rss_mb": sampler.summary(series=False),
        "listeners_closed_by_hub": results["closed_by_hub"],
        "close_codes": results["close_codes"],
        "hub_alive": hub_cpu_seconds(args.hub_pid) is not None if args.hub_pid else None,
        **_placement(args),
    }


def _placement(args: argparse.Namespace) -> dict[str, Any]:
    """Which CPUs the hub and the load ran on (they compete when they share one)."""
    hub_cpus = None
    if args.hub_pid:
        with contextlib.suppress(OSError):
            hub_cpus = sorted(os.sched_getaffinity(args.hub_pid))
    return {"hub_cpus": hub_cpus, "load_cpus": sorted(os.sched_getaffinity(0)), "workers": args.workers}


async def run_stall(args: argparse.Namespace) -> dict[str, Any]:
    """K peers that never read plus H healthy listeners; does the room keep flowing?"""
    run_id = uuid.uuid4().hex[:8]
    compression = None if args.compression == "none" else "deflate"
    sampler = HubSampler(args.hub_pid)
    sampler.start()
    started = time.monotonic()
    stalled: list[Worker] = []
    healthy: list[Worker] = []
    sender: Sender | None = None
    with tempfile.TemporaryDirectory(prefix="hub-load-") as tmp:
        try:
            stalled_ok = stalled_failed = 0
            if args.stalled:
                stalled.append(await Worker.spawn(args, count=args.stalled, name_prefix=f"s{run_id}", run_id=run_id,
                                                  messages=args.messages, stall=True, tmp=Path(tmp)))
                stalled_ok, stalled_failed = await _start_workers(args, stalled)
            for i, count in enumerate(_split(args.healthy, args.workers)):
                healthy.append(await Worker.spawn(args, count=count, name_prefix=f"h{run_id}-{i}", run_id=run_id,
                                                  messages=args.messages, stall=False, tmp=Path(tmp)))
            healthy_ok, healthy_failed = await _start_workers(args, healthy)
            sender = await Sender.open(args.url, run_id, compression)
            await asyncio.sleep(args.settle)
            cpu1 = hub_cpu_seconds(args.hub_pid)
            send_timeout = args.messages * args.interval + args.grace
            send_started = time.monotonic()
            await sender.send(run_id, args.messages, args.interval, args.size, send_timeout)
            await _wait_done(healthy, send_started + send_timeout - time.monotonic())
            cpu2 = hub_cpu_seconds(args.hub_pid)
            healthy_result = _merge(list(await asyncio.gather(*(w.finish(args.grace) for w in healthy))))
            stalled_result = _merge(list(await asyncio.gather(*(w.finish(args.grace) for w in stalled))))
        finally:
            await asyncio.gather(*(w.kill() for w in healthy + stalled))
            if sender is not None:
                await sender.close()
            await sampler.stop()
    assert sender is not None
    delivered = sum(healthy_result["received"])
    expected = args.healthy * args.messages
    complete = delivered == expected and healthy_result["connected"] == args.healthy
    return {
        "bench": "stall",
        "url": args.url,
        "healthy": args.healthy,
        "stalled": args.stalled,
        "healthy_connected": healthy_ok,
        "stalled_connected": stalled_ok,
        "connect_failed": healthy_failed + stalled_failed,
        "connect_errors": healthy_result["errors"] + stalled_result["errors"],
        "messages": args.messages,
        "size": args.size,
        "interval_ms": _ms(args.interval),
        "rcvbuf": args.rcvbuf,
        "compression": args.compression,
        "sent": sender.sent,
        "sender_error": sender.error,
        "healthy_expected": expected,
        "healthy_delivered": delivered,
        "healthy_delivery_ratio": round(delivered / expected, 4) if expected else None,
        "healthy_min_received": min(healthy_result["received"], default=0),
        "complete_s": round((healthy_result["last_ns"] - sender.first_ns) / 1e9, 3) if complete else None,
        "elapsed_s": round(time.monotonic() - started, 3),
        "healthy_latency_ms": percentiles(healthy_result["latencies_us"]),
        "healthy_closed_by_hub": healthy_result["closed_by_hub"],
        "stalled_closed_by_hub": stalled_result["closed_by_hub"],
        "stalled_close_codes": stalled_result["close_codes"],
        "stalled_received_total": sum(stalled_result["received"]),
        "hub_cpu_s": _delta(cpu2, cpu1),
        "hub_rss_mb": sampler.summary(series=True),
        "hub_alive": hub_cpu_seconds(args.hub_pid) is not None if args.hub_pid else None,
        **_placement(args),
    }


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``fanout``, ``stall`` and the internal ``_listen`` worker."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--url", required=True, help="hub address, e.g. ws://127.0.0.1:8765")
        sub.add_argument("--hub-pid", type=int, help="the hub's process id, to read its CPU time and RSS")
        sub.add_argument("--workers", type=int, default=2, help="listener worker processes (default: 2)")
        sub.add_argument("--size", type=int, default=200, help="characters of message content")
        sub.add_argument("--interval", type=float, default=0.01, help="seconds between messages (default: 0.01)")
        sub.add_argument("--grace", type=float, default=15.0,
                         help="seconds to wait for deliveries after the last send (default: 15)")
        sub.add_argument("--settle", type=float, default=1.0, help="seconds to wait after connecting (default: 1)")
        sub.add_argument("--deadline", type=float, default=90.0, help="hard limit for each phase, in seconds")
        sub.add_argument("--compression", choices=["deflate", "none"], default="deflate",
                         help="what clients offer; deflate is the websockets default (default: deflate)")
        sub.add_argument("--connect-concurrency", type=int, default=50, help="handshakes in flight per worker")
        sub.add_argument("--rcvbuf", type=int, default=4096, help="SO_RCVBUF of stalled peers, in bytes")
        sub.add_argument("--load-cpus", help="pin this tool and its workers to these CPUs, e.g. 1 or 1,2")

    fanout = commands.add_parser("fanout", help="N listeners, one sender: latency, delivery, hub CPU")
    common(fanout)
    fanout.add_argument("--listeners", type=int, default=100)
    fanout.add_argument("--messages", type=int, default=500)

    stall = commands.add_parser("stall", help="K peers that never read beside H healthy listeners")
    common(stall)
    stall.add_argument("--healthy", type=int, default=20)
    stall.add_argument("--stalled", type=int, default=1)
    stall.add_argument("--messages", type=int, default=1000)
    stall.set_defaults(size=4096, interval=0.005, grace=20.0)

    worker = commands.add_parser("_listen", help=argparse.SUPPRESS)
    worker.add_argument("--url", required=True)
    worker.add_argument("--count", type=int, required=True)
    worker.add_argument("--name-prefix", required=True)
    worker.add_argument("--run-id", required=True)
    worker.add_argument("--messages", type=int, required=True)
    worker.add_argument("--result-file", required=True)
    worker.add_argument("--compression", default="deflate")
    worker.add_argument("--deadline", type=float, default=90.0)
    worker.add_argument("--connect-concurrency", type=int, default=50)
    worker.add_argument("--stall", action="store_true")
    worker.add_argument("--rcvbuf", type=int, default=4096)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand and print its JSON line."""
    args = build_parser().parse_args(argv)
    if args.command == "_listen":
        return asyncio.run(worker_main(args))
    runner = run_fanout if args.command == "fanout" else run_stall
    if args.load_cpus:
        os.sched_setaffinity(0, {int(cpu) for cpu in args.load_cpus.split(",")})  # workers inherit it
    try:
        result = asyncio.run(runner(args))
    except Exception as error:  # one JSON line even when the run fails
        print(json.dumps({"bench": args.command, "url": args.url, "error": f"{type(error).__name__}: {error}",
                          "hub_alive": hub_cpu_seconds(args.hub_pid) is not None if args.hub_pid else None}),
              flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
