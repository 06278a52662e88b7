#!/usr/bin/env python3
"""How fast the next speaker starts: TTFT and the tokens llama.cpp evaluates at a turn's start (issue 18).

    python bench/turn_start.py                       # 7 personas, --history-length 20, both pacings: ~5 min
    python bench/turn_start.py --full                # 1 and 7 personas, --history-length 5 and 20
    python bench/turn_start.py --rooms 1 --histories 5 --pacings human --lines 4
    python bench/turn_start.py --layouts             # the two ways to keep a KV cache per persona

Each case runs a real hub (server.py) and one client.py process on the embedded model and the
llama.cpp engine, greedy (``--temperature 0 --retries 0``, so cache on and off hold the same
conversation); this script is the moderator. Cases: personas in the room (1, or the 7 of
casts/panel.toml sharing the model), ``--history-length``, pacing, and the warm cache on
(``--cache-mb`` default) or off (``--cache-mb 0``), both in the same run, interleaved.

- back-to-back: each line gets a round of every persona (the hub's default budget), and the next
  line goes in as soon as the room is quiet;
- human: each line gets one reply (``--max-turns 1``), the next line comes ``--pause`` seconds
  after the room fell quiet, the moderator's typing time, in which the model is idle.

Per turn, from the client's DEBUG log: TTFT, from the turn frame's arrival to the first generated
token, and the tokens llama.cpp decoded before that first token, by its own count
(``llama_perf_context``). A turn right after a cut (the oldest message in the speaker's prompt is
not the one of its previous turn) is reported apart, and so is each persona's first turn (nothing
of its own cached yet). One JSON line per case, then a summary with the ratios cache on / cache off
for each case.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))  # this checkout's partychat, not an installed one

from cast_memory import PERSONAS  # noqa: E402
from conversation import QUESTIONS, frame_of, wait_for_models  # noqa: E402

from partychat.demo import start, stop_all  # noqa: E402

FIRST = re.compile(r"^\[[^\]]*\] (?P<name>.+?)'s first token came (?P<ttft>[\d.]+) s into its turn; "
                   r"its prompt starts at message (?P<oldest>\S+)")
EVALUATED = re.compile(r"llama\.cpp evaluated (?P<evaluated>\d+) tokens for (?P<name>.+?)'s turn before its first "
                       r"token \((?P<cached>\d+) of the prompt's (?P<prompt>\d+) were cached\)")


async def moderate(url: str, models: int, lines: int, pacing: str, pause: float, timeout: float) -> None:
    """Wait for the personas, then say each line and wait for quiet (and ``pause`` more when human-paced)."""
    async with connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"name": "Bench", "type": "human", "protocol": 1}))
        await wait_for_models(ws, models)
        for line in QUESTIONS[:lines]:
            await ws.send(json.dumps({"type": "message", "content": line}))
            await frame_of(ws, "system", time.monotonic() + timeout, event="quiet")
            if pacing == "human":
                await asyncio.sleep(pause)


def turns(log: str) -> list[dict[str, Any]]:
    """Each turn's figures in order: the engine's line and the participant's line of one first token."""
    found: list[dict[str, Any]] = []
    pending: dict[str, dict[str, Any]] = {}
    previous_oldest: dict[str, str] = {}
    previous_prompt: dict[str, int] = {}
    for line in log.splitlines():
        if (evaluated := EVALUATED.search(line)) is not None:
            pending[evaluated["name"]] = {key: int(evaluated[key]) for key in ("evaluated", "cached", "prompt")}
        elif (first := FIRST.search(line)) is not None:
            name = first["name"]
            turn = {"name": name, "ttft": float(first["ttft"]), **pending.pop(name, {})}
            turn["after_cut"] = name in previous_oldest and previous_oldest[name] != first["oldest"]
            if name in previous_prompt and "prompt" in turn:
                # what was said since its last turn (its own reply included), as its prompt grew by it
                turn["new_tokens"] = turn["prompt"] - previous_prompt[name]
            previous_oldest[name] = first["oldest"]
            previous_prompt[name] = turn.get("prompt", 0)
            found.append(turn)
    return found


def run_case(case: dict[str, Any], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    tag = "-".join(str(value) for value in case.values())
    names = PERSONAS[:case["rooms"]]
    hub_args = ["server.py", "--host", "127.0.0.1", "--port", "0", "--no-web", "--log-level", "WARNING",
                "--transcript", str(work / f"{tag}.jsonl"), "--first-token-timeout", "0", "--turn-timeout", "0"]
    if case["pacing"] == "human":
        hub_args += ["--max-turns", "1"]
    hub_log = work / f"{tag}-hub.out"
    processes = [start([str(HERE / hub_args[0]), *hub_args[1:]], hub_log)]
    try:
        url = wait_for(hub_log, r"listening on (ws://\S+)", 60)
        personas = [flag for name, prompt in names for flag in ("--persona", f"{name}={prompt}")]
        client_log = work / f"{tag}-client.log"
        processes.append(start([str(HERE / "client.py"), *personas, "--server", url, "--backend", "llama.cpp",
                                "--temperature", "0", "--retries", "0", "--history-length", str(case["history"]),
                                "--max-generation-tokens", str(args.max_tokens), "--log-level", "DEBUG",
                                "--log-file", str(client_log), "--threads", str(args.threads),
                                *(["--cache-mb", "0"] if not case["cache"] else [])],
                               work / f"{tag}-client.out"))
        began = time.monotonic()
        asyncio.run(moderate(url, len(names), args.lines, case["pacing"], args.pause, args.timeout))
        seconds = time.monotonic() - began
    finally:
        stop_all(processes)
    every = turns(client_log.read_text(errors="replace"))
    return {**case, "seconds": round(seconds, 1), "turns": len(every),
            "first": figures([t for t in every if "new_tokens" not in t]),
            "steady": figures([t for t in every if "new_tokens" in t and not t["after_cut"]]),
            "after_cut": figures([t for t in every if t["after_cut"]]), "per_turn": every if args.per_turn else None}


def wait_for(log: Path, pattern: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and (found := re.search(pattern, log.read_text(errors="replace"))):
            return found.group(1)
        time.sleep(0.2)
    raise SystemExit(f"turn_start: no {pattern!r} in {log} within {timeout:.0f} s")


def figures(chosen: list[dict[str, Any]]) -> dict[str, Any]:
    def median(key: str) -> float | None:
        values = [t[key] for t in chosen if key in t]
        return round(statistics.median(values), 3) if values else None

    later = [t for t in chosen if "new_tokens" in t and "evaluated" in t]
    within = sum(t["evaluated"] <= t["new_tokens"] + 16 for t in later)
    prefilled = [t["ttft"] for t in chosen if "prompt" in t and t["cached"] == t["prompt"]]
    return {"count": len(chosen), "ttft_s": median("ttft"), "evaluated_tokens": median("evaluated"),
            "prompt_tokens": median("prompt"), "new_tokens": median("new_tokens"),
            "evaluated_within_new_plus_16": f"{within}/{len(later)}",
            # turns whose whole prompt idle prefill had evaluated: the idle time sufficed
            "whole_prompt_cached": len(prefilled),
            "whole_prompt_cached_ttft_s": round(statistics.median(prefilled), 3) if prefilled else None}


def summary(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Cache on against cache off, case by case: the ratios the goals are about."""
    ratios = []
    for on in (r for r in results if r["cache"]):
        off = next((r for r in results if not r["cache"] and all(r[k] == on[k] for k in ("rooms", "history",
                                                                                           "pacing"))), None)
        if off is None:
            continue
        row: dict[str, Any] = {k: on[k] for k in ("rooms", "history", "pacing")}
        for part in ("first", "steady", "after_cut"):
            for key in ("ttft_s", "evaluated_tokens"):
                a, b = on[part][key], off[part][key]
                row[f"{part}_{key}_on_over_off"] = round(a / b, 3) if a is not None and b else None
        ratios.append(row)
    return ratios


def layouts(args: argparse.Namespace) -> dict[str, Any]:
    """Saved per-persona states against one context with a sequence per persona: memory and switch cost."""
    import resource

    import llama_cpp

    from partychat.engines.llama_cpp_engine import LlamaCppChatModel, PersonaStates
    from partychat.engines.models import embedded_gguf

    personas, context = len(PERSONAS), args.context
    model = LlamaCppChatModel(embedded_gguf(), context_tokens=context, threads=args.threads, cache_bytes=1 << 40)
    llama = model.llama
    layers, kv_heads = llama_cpp.llama_model_n_layer(llama.model), llama_cpp.llama_model_n_head_kv(llama.model)
    head = llama_cpp.llama_model_n_embd(llama.model) // llama_cpp.llama_model_n_head(llama.model)
    kv_per_token = layers * kv_heads * head * 2 * 2  # K and V, f16
    states = model.states
    assert isinstance(states, PersonaStates)
    filler = llama.tokenize(b" The harbour town keeps its boats dry." * 400, add_bos=False)[:context - 8]
    switch_seconds = []
    for index in range(personas):
        states.enter(f"persona {index}")
        llama.eval(filler[: context - 8 - index])  # each a different length, as real ones are
    for index in range(personas * 3):
        began = time.perf_counter()
        states.enter(f"persona {index % personas}")
        switch_seconds.append(time.perf_counter() - began)
    held = states.held_bytes()
    tokens = sum(len(saved[0]) for saved in states.saved.values())
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sequences = llama_cpp.Llama(model_path=str(embedded_gguf()), n_ctx=context * personas, n_seq_max=personas,
                                n_threads=args.threads, verbose=False)
    kv_bytes = int(llama_cpp.llama_state_get_size(sequences.ctx))
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sequences.close()
    return {"layouts": {
        "saved_states": {"personas_saved": len(states.saved), "tokens_held": tokens, "bytes": held,
                         "over_kv_of_tokens": round(held / (tokens * kv_per_token) - 1, 4),
                         "mb_for_7_at_full_context": round(held / tokens * context * personas / 2**20, 1),
                         "switch_ms_median": round(statistics.median(switch_seconds) * 1000, 2)},
        "one_context_sequences": {"state_size_bytes_empty": kv_bytes,
                                  "kv_allocated_mb": round(kv_per_token * context * personas / 2**20, 1),
                                  "peak_rss_growth_mb": round((rss_after - rss_before) / 1024, 1),
                                  "switch_ms": 0.0},
        "kv_bytes_per_token": kv_per_token, "context": context}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="every case: rooms 1,7, histories 5,20, both pacings")
    parser.add_argument("--rooms", default="7", help="personas in the room, comma-separated: 1 and/or 7")
    parser.add_argument("--histories", default="20", help="--history-length values, comma-separated")
    parser.add_argument("--pacings", default="back-to-back,human", help="back-to-back and/or human")
    parser.add_argument("--lines", type=int, default=3, help="moderator lines per case (default: 3)")
    parser.add_argument("--pause", type=float, default=6.0, help="human pacing: seconds between quiet and next line")
    parser.add_argument("--max-tokens", type=int, default=60, help="--max-generation-tokens of the personas")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a line may take to go quiet")
    parser.add_argument("--per-turn", action="store_true", help="list every turn's figures too")
    parser.add_argument("--layouts", action="store_true", help="only compare the two KV layouts (no room)")
    parser.add_argument("--context", type=int, default=2048, help="--layouts: context tokens per persona")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default: 2)")
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    parser.add_argument("--keep", type=Path, help="keep the hubs' and clients' logs in this folder")
    args = parser.parse_args(argv)
    if args.layouts:
        return report([layouts(args)], args.out)
    if args.full:
        args.rooms, args.histories, args.pacings = "1,7", "5,20", "back-to-back,human"
        args.lines = max(args.lines, 6)
    results = []
    with tempfile.TemporaryDirectory(prefix="turn-start-") as scratch:
        work = args.keep or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        for rooms in (int(value) for value in args.rooms.split(",")):
            for history in (int(value) for value in args.histories.split(",")):
                for pacing in args.pacings.split(","):
                    for cache in (True, False):
                        case = {"rooms": rooms, "history": history, "pacing": pacing, "cache": cache}
                        results.append(run_case(case, args, work))
                        print(json.dumps(results[-1]), flush=True)
    return report([{"summary": summary(results)}], args.out, results)


def report(lines: list[dict[str, Any]], out: Path | None, results: list[dict[str, Any]] | None = None) -> int:
    for line in lines:
        print(json.dumps(line), flush=True)
    if out is not None:
        with out.open("a") as file:
            for line in [*(results or []), *lines]:
                file.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
