"""Decode speed with anti-copy on against off, on each in-process engine, paired in one process.

Each persona of bench/generation.py answers the same short room history greedily, once with
anti-copy and once without, the order alternating between rounds, so both sides of a pair see the
same machine load. Decode rate = tokens after the first over the time after the first; the ratio
is the median of the pairs' on/off ratios (goal, issue 17: at least 0.9). The one-time reading of
the vocabulary that anti-copy needs is timed apart (``vocabulary_s``), as it happens once per model.

    python bench/anticopy_speed.py                                  # both engines, 3 prompts, 2 rounds
    python bench/anticopy_speed.py --engines llama.cpp --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/generation.py beside this
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from generation import HISTORY, PERSONAS

from partychat.bundled import prompts_folder
from partychat.engines.base import ChatModel, StopFlag
from partychat.engines.registry import EngineOptions, open_chat_model
from partychat.persona.generation import GenerationSettings, build_request
from partychat.protocol import Chat


async def decode_rate(model: ChatModel, persona: str, name: str, settings: GenerationSettings) -> float | None:
    history = [Chat(sender=s, content=c, seq=n, role="human" if s == "Moderator" else "model")
               for n, (s, c) in enumerate(HISTORY, start=1)]
    request = await build_request(model, persona, name, history, settings)
    first, pieces = None, 0
    async for _ in model.stream(request, StopFlag()):
        first = first or time.perf_counter()
        pieces += 1
    end = time.perf_counter()
    return (pieces - 1) / (end - first) if first is not None and pieces > 1 and end > first else None


async def measure(engine: str, args: argparse.Namespace) -> dict[str, Any]:
    model = open_chat_model(engine, EngineOptions(engine=engine, threads=args.threads))
    personas = [((prompts_folder() / file).read_text(encoding="utf-8"), name) for file, name in PERSONAS[:args.prompts]]
    on = GenerationSettings(temperature=0, max_tokens=args.max_new_tokens)
    off = GenerationSettings(temperature=0, max_tokens=args.max_new_tokens, anti_copy=False)
    try:
        start = time.perf_counter()
        await decode_rate(model, *personas[0], on)  # warm-up, and the vocabulary read once
        vocabulary_s = time.perf_counter() - start
        await decode_rate(model, *personas[0], off)
        pairs, rates = [], {"on": [], "off": []}
        for round_number in range(args.rounds):
            for persona, name in personas:
                order = (("on", on), ("off", off)) if round_number % 2 == 0 else (("off", off), ("on", on))
                got = {label: await decode_rate(model, persona, name, settings) for label, settings in order}
                for label, rate in got.items():
                    if rate is not None:
                        rates[label].append(rate)
                if got["on"] and got["off"]:
                    pairs.append(got["on"] / got["off"])
    finally:
        await model.aclose()
    return {"engine": engine, "decode_tps_on": round(statistics.median(rates["on"]), 1),
            "decode_tps_off": round(statistics.median(rates["off"]), 1),
            "on_over_off": round(statistics.median(pairs), 3), "pairs": len(pairs),
            "warm_up_with_vocabulary_s": round(vocabulary_s, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="llama.cpp,transformers")
    parser.add_argument("--prompts", type=int, default=3, choices=range(1, len(PERSONAS) + 1))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    print(json.dumps({"load_avg_1m": os.getloadavg()[0], "threads": args.threads}), flush=True)
    for engine in args.engines.split(","):
        print(json.dumps(asyncio.run(measure(engine.strip(), args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
