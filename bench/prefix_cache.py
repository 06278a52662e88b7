"""Does a per-persona prefix cache pay on the transformers engine? One JSON line per turn, then a summary.

The conversation only grows (history window 20, so each prompt starts with the one before it, as
append-only prompts between cuts will make it). For every turn it times the first token three ways,
in the same run and interleaved, so a loaded machine slows them alike:

    cold     what the engine does today: generate() on the whole prompt (the engine's own settings:
             static KV cache, bfloat16 on CPUs with fast bfloat16)
    dynamic  a DynamicCache kept from the persona's previous prompt, cropped to the common prefix;
             only the new tokens are evaluated
    static   the same with a StaticCache kept per persona (crop only rewinds its length)

and compares each warm greedy reply (``--reply-tokens`` tokens) with the cold one.

    python bench/prefix_cache.py                 # 8 turns, 2 repeats each, one torch thread
    python bench/prefix_cache.py --turns 12 --repeats 3 --dtype float32 --threads 0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

from generation import HISTORY  # bench/generation.py beside this

from partychat.bundled import prompts_folder
from partychat.engines.base import shared_prefix
from partychat.engines.models import load, resolve
from partychat.engines.transformers_engine import TransformersChatModel
from partychat.persona.generation import GenerationSettings, build_request
from partychat.protocol import Chat

LINES = (
    ("Moderator", "Let us hear one concrete step a city could take next year, with its cost."),
    ("Researcher", "Paris closed a riverside road in 2016; traffic moved elsewhere and air improved nearby."),
    ("Assistant", "Shops feared losing customers, but footfall rose once the street had benches and shade."),
    ("Moderator", "Who pays for the buses that replace the cars, and who decides the routes?"),
    ("Researcher", "Congestion charges in London and Stockholm paid for better buses within a few years."),
    ("Assistant", "Routes work best when riders vote on them, as a few Brazilian cities have tried."),
)


def conversation(turns: int) -> list[list[Chat]]:
    """The history each turn sees: the bench's opening lines, then one more line per turn."""
    lines = list(HISTORY) + [LINES[i % len(LINES)] for i in range(turns)]
    chats = [Chat(sender=s, content=c, seq=n) for n, (s, c) in enumerate(lines, start=1)]
    return [chats[: len(HISTORY) + t] for t in range(turns)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--reply-tokens", type=int, default=24)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared, loaded machine more threads spin against "
                             "each other and every figure gets noisier; 0 keeps torch's default)")
    args = parser.parse_args()

    import torch
    from transformers import DynamicCache, StaticCache

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load(resolve(""), dtype=args.dtype)
    engine = TransformersChatModel(loaded)
    model, tokenizer = loaded.model, loaded.tokenizer
    persona = (prompts_folder() / "historian.txt").read_text(encoding="utf-8")
    settings = GenerationSettings(temperature=0, history_length=20, max_context_tokens=4096)
    prompts = [engine.prompt_tokens(asyncio.run(build_request(engine, persona, "Historian", h, settings)))
               for h in conversation(args.turns + 1)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    capacity = len(prompts[-1]) + args.reply_tokens + 8
    engine_cache = model.generation_config.cache_implementation

    def generate(ids: list[int], new: int, cache: Any = None) -> tuple[float, list[int]]:
        tensor = torch.tensor([ids])
        extra: dict[str, Any] = {} if cache is None else {"past_key_values": cache}
        # generate() refuses a cache object beside the engine's own cache kind, and fills unset options
        # from the model's config, so the kind is taken off the model for a warm call
        model.generation_config.cache_implementation = None if cache is not None else engine_cache
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=new,
                                 do_sample=False, pad_token_id=pad, **extra)
        return time.perf_counter() - start, out[0, len(ids):].tolist()

    def prefilled(kind: str, ids: list[int]) -> Any:
        """A cache holding ``ids`` (the previous prompt), untimed, as a persona's cache would after its turn."""
        cache = DynamicCache(config=model.config) if kind == "dynamic" else StaticCache(config=model.config,
                                                                                         max_cache_len=capacity)
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
        return cache

    def warm(kind: str, before: list[int], now: list[int], new: int) -> tuple[float, list[int], int]:
        cache = prefilled(kind, before)
        keep = min(shared_prefix(before, now), len(now) - 1)  # generate() needs one token to evaluate
        cache.crop(-(len(before) - keep)) if len(before) > keep else None
        seconds, reply = generate(now, new, cache)
        return seconds, reply, len(now) - keep

    generate(prompts[0], 2)  # warm-up: first-call costs are not the cache's
    rows = []
    for turn in range(1, args.turns + 1):
        before, now = prompts[turn - 1], prompts[turn]
        times: dict[str, list[float]] = {"cold": [], "dynamic": [], "static": []}
        for _ in range(args.repeats):
            times["cold"].append(generate(now, 1)[0])
            for kind in ("dynamic", "static"):
                seconds, _, evaluated = warm(kind, before, now, 1)
                times[kind].append(seconds)
        _, cold_reply = generate(now, args.reply_tokens)
        same = {kind: warm(kind, before, now, args.reply_tokens)[1] == cold_reply for kind in ("dynamic", "static")}
        row = {"turn": turn, "prompt_tokens": len(now), "new_tokens": evaluated,
               **{f"ttft_{k}_s": round(statistics.median(v), 4) for k, v in times.items()},
               **{f"same_reply_{k}": v for k, v in same.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {"summary": True, "dtype": str(model.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
               "turns": len(rows),
               "median_prompt_tokens": statistics.median(r["prompt_tokens"] for r in rows),
               "median_new_tokens": statistics.median(r["new_tokens"] for r in rows)}
    for kind in ("dynamic", "static"):
        summary[f"ttft_ratio_{kind}_over_cold"] = round(statistics.median(
            r[f"ttft_{kind}_s"] / r["ttft_cold_s"] for r in rows), 3)
        summary[f"same_reply_{kind}"] = f"{sum(r[f'same_reply_{kind}'] for r in rows)}/{len(rows)}"
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
