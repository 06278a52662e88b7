#!/usr/bin/env python3
"""How fast the next speaker starts: TTFT and the tokens llama.cpp evaluates at a turn's start (issue 18).

    python bench/turn_start.py                       # 7 personas, --history-length 20, both pacings: ~5 min
    python bench/turn_start.py --full --baseline 243d07e --threads 1   # every case, and "today" beside it
    python bench/turn_start.py --rooms 1 --histories 5 --pacings human --lines 4
    python bench/turn_start.py --layouts             # the two ways to keep a KV cache per persona
    python bench/turn_start.py --floor --threads 1   # a 20-token line against one decode step

Each case runs a real hub (server.py) and one client.py process on the embedded model and the
llama.cpp engine, greedy (``--temperature 0 --retries 0``, so every configuration holds the same
conversation); this script is the moderator. Cases: personas in the room (1, or the 7 of
casts/panel.toml sharing the model), ``--history-length``, pacing, and the configurations, all in
the same run, interleaved: the warm cache on (``--cache-mb`` default), off (``--cache-mb 0``), and
with ``--baseline REF`` a checkout of REF (``git archive``, as bench/conversation.py's configs) run
with its own hub and client and its default flags: 243d07e, before issue 18, is "today".

- back-to-back: each line gets a round of every persona (the hub's default budget), and the next
  line goes in as soon as the room is quiet;
- human: each line gets one reply (``--max-turns 1``), the next line comes ``--pause`` seconds
  after the room fell quiet, the moderator's typing time, in which the model is idle.

Two sources per turn:

- ``/who``, for every configuration (a client of any age reports its speed with each reply; the
  moderator asks after each reply, as bench/conversation.py does): ``who_ttft_s``, from the turn
  frame's arrival to the first generated token, and the decode rate of that reply. ``decode_steps``
  = TTFT x that rate: the TTFT in units of one generated token. The goals compare these figures.
- the client's DEBUG log, for this checkout (REF's client may not log them): the same TTFT
  (``ttft_s``), the tokens llama.cpp decoded before the first token by its own count
  (``llama_perf_context``), the prompt and what of it was cached, and the newest message's tokens
  (``line_tokens``: the prompt's tokens from where it parts from the same prompt without the room's
  newest message; that is the moderator's line, human-paced, which nothing can evaluate before it is sent).

Turns are classified by one rule for every configuration: ``first``, a persona's first turn
(nothing of its own cached); ``filling``, the room held no more messages than ``--history-length``
when the turn began, so no cut can have happened yet; ``after_cut``, the oldest message in the
prompt is not the one of the speaker's previous turn (known from the log only); ``steady``, the
rest. Before issue 18 the window slides by one message on every turn once full, so every one of
REF's turns after the window filled is a steady turn: that is "today" in the goal "TTFT <= 0.3x
today's". ``prefilled`` (any class) are the log's turns whose whole prompt but the newest message
was cached when the turn began: the idle time sufficed to prefill. ``later`` is every turn but the
first ones (REF's withheld turns give no /who figure, so "steady" may hold few of its turns).

One JSON line per case, then a summary: the ratios to the cache-on configuration, case by case.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from functools import cache
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))  # this checkout's partychat, not an installed one

from cast_memory import PERSONAS  # noqa: E402
from conversation import QUESTIONS, Child, checkout, moderate  # noqa: E402

FIRST = re.compile(r"^\[[^\]]*\] (?P<name>.+?)'s first token came (?P<ttft>[\d.]+) s into its turn; "
                   r"its prompt starts at message (?P<oldest>\S+)")
EVALUATED = re.compile(r"llama\.cpp evaluated (?P<evaluated>\d+) tokens for (?P<name>.+?)'s turn before its first "
                       r"token \((?P<cached>\d+) of the prompt's (?P<prompt>\d+) were cached\)")
PROMPT = re.compile(r"^\[[^\]]*\] (?P<name>.+?)'s prompt: (?P<messages>\(.*\)|\[.*\])$")
ON, OFF = "cache-on", "cache-off"
PARTS = ("first", "filling", "after_cut", "steady")


@cache
def _tokenizer() -> Any:
    """The engine the client runs, for its prompt tokens (the weights load too: small for the embedded model)."""
    from partychat.engines.llama_cpp_engine import LlamaCppChatModel
    from partychat.engines.models import embedded_gguf

    return LlamaCppChatModel(embedded_gguf(), context_tokens=8192, threads=1)


def line_tokens(name: str, messages: tuple[dict[str, str], ...]) -> int:
    """The prompt's tokens from where it parts from the same prompt without the room's newest message.

    Others' messages in a row share one chat message, a line each (``Speaker: text``), so the
    newest is cut off at the last line that starts with a speaker of the room.
    """
    from partychat.engines.base import ChatRequest, shared_prefix

    last = messages[-1]
    labels = "|".join(re.escape(speaker) for speaker in ("Bench", *(persona for persona, _ in PERSONAS)))
    earlier = [match.start() for match in re.finditer(rf"\n(?:{labels}): ", last["content"])]
    shorter = (*messages[:-1], {**last, "content": last["content"][:earlier[-1]]}) if earlier else messages[:-1]
    model = _tokenizer()
    whole = model.prompt_tokens(ChatRequest(messages, name))
    return len(whole) - shared_prefix(whole, model.prompt_tokens(ChatRequest(shorter, name)))


def turns(log: str) -> list[dict[str, Any]]:
    """Each turn's figures in order, from the log: its prompt, the engine's count, its first token."""
    found: list[dict[str, Any]] = []
    pending: dict[str, dict[str, Any]] = {}
    previous_oldest: dict[str, str] = {}
    previous_prompt: dict[str, int] = {}
    for line in log.splitlines():
        if (prompt := PROMPT.search(line)) is not None:
            messages = tuple(ast.literal_eval(prompt["messages"]))
            pending[prompt["name"]] = {"line_tokens": line_tokens(prompt["name"], messages)}
        elif (evaluated := EVALUATED.search(line)) is not None:
            pending.setdefault(evaluated["name"], {}).update(
                {key: int(evaluated[key]) for key in ("evaluated", "cached", "prompt")})
        elif (first := FIRST.search(line)) is not None:
            name = first["name"]
            turn = {"name": name, "ttft": float(first["ttft"]), **pending.pop(name, {})}
            turn["after_cut"] = name in previous_oldest and previous_oldest[name] != first["oldest"]
            if name in previous_prompt and "prompt" in turn:
                # what was said since its last turn (its own reply included), as its prompt grew by it
                turn["new_tokens"] = turn["prompt"] - previous_prompt[name]
            if {"prompt", "cached", "line_tokens"} <= turn.keys():
                turn["prefilled"] = turn["cached"] >= turn["prompt"] - turn["line_tokens"]
            previous_oldest[name] = first["oldest"]
            previous_prompt[name] = turn.get("prompt", 0)
            found.append(turn)
    return found


def joined(logged: list[dict[str, Any]], speeds: list[dict[str, Any]], history: int) -> list[dict[str, Any]]:
    """Every turn, classified: the log's turns with their /who speed where the reply was relayed, else /who's.

    A log turn and a /who answer are the same turn when the persona and the TTFT (both to the
    millisecond) agree. A turn with no reply (withheld) has no /who answer; its room size is taken
    from the turn before it (a lower bound).
    """
    unmatched = list(speeds)
    room = 0
    every: list[dict[str, Any]] = []
    for turn in logged or speeds:
        if logged:
            who = next((s for s in unmatched if s["name"] == turn["name"] and s["ttft"] is not None
                        and abs(s["ttft"] - turn["ttft"]) < 0.0015), None)
            turn = dict(turn)
            if who is not None:
                unmatched.remove(who)
                turn.update(who_ttft=who["ttft"], tokens_per_second=who["tokens_per_second"],
                            room_messages=who["room_messages"])
            turn.setdefault("room_messages", room)
        else:
            turn = {"name": turn["name"], "who_ttft": turn["ttft"], "tokens_per_second": turn["tokens_per_second"],
                    "room_messages": turn["room_messages"]}
        room = turn["room_messages"] + 1
        if turn.get("who_ttft") is not None and turn.get("tokens_per_second"):
            turn["decode_steps"] = turn["who_ttft"] * turn["tokens_per_second"]
        every.append(turn)
    spoken: set[str] = set()
    for turn in every:
        turn["part"] = ("first" if turn["name"] not in spoken else "filling" if turn["room_messages"] <= history
                        else "after_cut" if turn.get("after_cut") else "steady")
        spoken.add(turn["name"])
    return every


def run_case(case: dict[str, Any], args: argparse.Namespace, work: Path, folder: Path) -> dict[str, Any]:
    tag = "-".join(str(value) for value in case.values())
    names = PERSONAS[:case["rooms"]]
    lines = args.lines or default_lines(case["rooms"], case["history"])
    hub_args = ["server.py", "--host", "127.0.0.1", "--port", "0", "--no-web", "--log-level", "WARNING",
                "--transcript", str(work / f"{tag}.jsonl"), "--first-token-timeout", "0", "--turn-timeout", "0"]
    if case["pacing"] == "human":
        hub_args += ["--max-turns", "1"]
    hub = Child(folder, hub_args, work / f"{tag}-hub.out")
    client = None
    speeds: list[dict[str, Any]] = []
    try:
        url = hub.wait_for(r"listening on (ws://\S+)", 60).group(1)
        personas = [flag for name, prompt in names for flag in ("--persona", f"{name}={prompt}")]
        client_log = work / f"{tag}-client.log"
        client = Child(folder, ["client.py", *personas, "--server", url, "--backend", "llama.cpp",
                                "--temperature", "0", "--retries", "0", "--history-length", str(case["history"]),
                                "--max-generation-tokens", str(args.max_tokens), "--log-level", "DEBUG",
                                "--log-file", str(client_log), "--threads", str(args.threads),
                                *(["--cache-mb", "0"] if case["config"] == OFF else [])],
                       work / f"{tag}-client.out")
        began = time.monotonic()
        asyncio.run(moderate(url, QUESTIONS[:lines], speeds, args.timeout, models=len(names),
                             pause=args.pause if case["pacing"] == "human" else 0.0))
        seconds = time.monotonic() - began
    finally:
        if client is not None:
            client.stop()
        hub.stop()
    logged = turns(client_log.read_text(errors="replace")) if client_log.exists() else []
    every = joined(logged, speeds, case["history"])
    return {**case, "lines": lines, "seconds": round(seconds, 1), "turns": len(every),
            **{part: figures([t for t in every if t["part"] == part]) for part in PARTS},
            "later": figures([t for t in every if t["part"] != "first"]),
            "prefilled": figures([t for t in every if t.get("prefilled")]),
            "per_turn": every if args.per_turn else None}


def default_lines(rooms: int, history: int) -> int:
    """Enough lines that the window fills and then slides for a while: a lone persona adds 2 messages a line."""
    return 3 if rooms > 1 else min(len(QUESTIONS), history // 2 + 6)


def figures(chosen: list[dict[str, Any]]) -> dict[str, Any]:
    def median(key: str) -> float | None:
        values = [t[key] for t in chosen if t.get(key) is not None]
        return round(statistics.median(values), 3) if values else None

    later = [t for t in chosen if "new_tokens" in t and "evaluated" in t]
    within = sum(t["evaluated"] <= t["new_tokens"] + 16 for t in later)
    return {"count": len(chosen), "who_ttft_s": median("who_ttft"), "tokens_per_second": median("tokens_per_second"),
            "decode_steps": median("decode_steps"), "ttft_s": median("ttft"), "evaluated_tokens": median("evaluated"),
            "prompt_tokens": median("prompt"), "new_tokens": median("new_tokens"), "line_tokens": median("line_tokens"),
            "evaluated_within_new_plus_16": f"{within}/{len(later)}" if later else None}


def summary(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each configuration against the warm cache, case by case: the ratios the goals are about."""
    ratios = []
    for on in (r for r in results if r["config"] == ON):
        for other in results:
            if other["config"] == ON or any(other[k] != on[k] for k in ("rooms", "history", "pacing")):
                continue
            row: dict[str, Any] = {**{k: on[k] for k in ("rooms", "history", "pacing")}, "against": other["config"]}
            for part in (*PARTS, "later", "prefilled"):
                for key in ("who_ttft_s", "decode_steps", "evaluated_tokens"):
                    a, b = on[part][key], other[part][key]
                    if a is not None and b:
                        row[f"{part}_{key}_on_over_{'off' if other['config'] == OFF else 'baseline'}"] = round(a / b, 3)
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


def floor(args: argparse.Namespace) -> dict[str, Any]:
    """The physical floor of a prefilled turn: evaluating the moderator's line in one batch, in decode steps.

    Everything but the line is cached (``--floor-prompt`` tokens); the line's ``--floor-line`` tokens
    go in as one batch, whose last logits give the first token; one decode step is one more token.
    Interleaved in one process, so the ratio holds on a loaded machine. No hub, no client: what the
    room adds on top of this is the pipeline's own cost.
    """
    from partychat.engines.llama_cpp_engine import LlamaCppChatModel
    from partychat.engines.models import embedded_gguf

    llama = LlamaCppChatModel(embedded_gguf(), context_tokens=2048, threads=args.threads).llama
    filler = llama.tokenize(b" The harbour town keeps its boats dry when the tide comes in." * 100, add_bos=False)
    prompt, line = filler[:args.floor_prompt], filler[args.floor_prompt:args.floor_prompt + args.floor_line]
    line_seconds, step_seconds = [], []
    for _ in range(args.floor_repeats):
        llama.reset()
        llama.eval(prompt)
        began = time.perf_counter()
        llama.eval(line)
        line_seconds.append(time.perf_counter() - began)
        began = time.perf_counter()
        llama.eval(filler[-1:])
        step_seconds.append(time.perf_counter() - began)
    line_s, step_s = statistics.median(line_seconds), statistics.median(step_seconds)
    return {"floor": {"cached_tokens": len(prompt), "line_tokens": len(line), "repeats": args.floor_repeats,
                      "line_eval_s": round(line_s, 4), "decode_step_s": round(step_s, 4),
                      "line_in_decode_steps": round(line_s / step_s, 2), "threads": args.threads,
                      "load_avg_1m": os.getloadavg()[0]}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="every case: rooms 1,7, histories 5,20, both pacings")
    parser.add_argument("--rooms", default="7", help="personas in the room, comma-separated: 1 and/or 7")
    parser.add_argument("--histories", default="20", help="--history-length values, comma-separated")
    parser.add_argument("--pacings", default="back-to-back,human", help="back-to-back and/or human")
    parser.add_argument("--lines", type=int, help="moderator lines per case (default: 3 for a room of several, "
                                                  "history/2 + 6 for a lone persona, at most the bench's 14)")
    parser.add_argument("--pause", type=float, default=6.0, help="human pacing: seconds between quiet and next line")
    parser.add_argument("--max-tokens", type=int, default=60, help="--max-generation-tokens of the personas")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a line may take to go quiet")
    parser.add_argument("--baseline", metavar="REF", help="also run each case on this git ref with its default "
                                                          "flags (243d07e: before issue 18)")
    parser.add_argument("--per-turn", action="store_true", help="list every turn's figures too")
    parser.add_argument("--layouts", action="store_true", help="only compare the two KV layouts (no room)")
    parser.add_argument("--floor", action="store_true", help="only time the moderator's line against one decode "
                                                           "step (no room)")
    parser.add_argument("--floor-line", type=int, default=20, help="--floor: tokens of the line (default: 20)")
    parser.add_argument("--floor-prompt", type=int, default=200, help="--floor: cached tokens before it")
    parser.add_argument("--floor-repeats", type=int, default=15, help="--floor: repeats (medians)")
    parser.add_argument("--context", type=int, default=2048, help="--layouts: context tokens per persona")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default: 2)")
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    parser.add_argument("--keep", type=Path, help="keep the hubs' and clients' logs in this folder")
    args = parser.parse_args(argv)
    if args.layouts:
        return report([layouts(args)], args.out)
    if args.floor:
        return report([floor(args)], args.out)
    if args.full:
        args.rooms, args.histories, args.pacings = "1,7", "5,20", "back-to-back,human"
    if args.lines is not None and not 1 <= args.lines <= len(QUESTIONS):
        parser.error(f"--lines must be from 1 to {len(QUESTIONS)}")
    results = []
    with tempfile.TemporaryDirectory(prefix="turn-start-") as scratch:
        work = args.keep or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        folders = {ON: HERE, OFF: HERE}
        if args.baseline:
            try:
                folders[args.baseline] = checkout(args.baseline, Path(scratch))
            except subprocess.CalledProcessError as error:  # git's own message says what is wrong with the ref
                parser.error(f"--baseline {args.baseline}: {error.stderr.decode().strip()}")
        print(json.dumps({"meta": {"load_avg_1m": os.getloadavg()[0], "configs": list(folders)}}), flush=True)
        for rooms in (int(value) for value in args.rooms.split(",")):
            for history in (int(value) for value in args.histories.split(",")):
                for pacing in args.pacings.split(","):
                    for config, folder in folders.items():
                        case = {"rooms": rooms, "history": history, "pacing": pacing, "config": config}
                        results.append(run_case(case, args, work, folder))
                        print(json.dumps(results[-1]), flush=True)
    return report([{"summary": summary(results), "load_avg_1m_at_end": os.getloadavg()[0]}], args.out, results)


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
