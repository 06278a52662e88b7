"""Engines side by side: each library called directly against our persona on it, one JSON line per run.

Every configuration runs in its own child process (so its peak RSS is its own), on the same persona
prompts (bench/generation.py's), greedily, up to ``--max-new-tokens`` tokens each:

    llama-raw       llama_cpp.Llama.generate in a plain loop, the lowest-overhead way to call it
    llama-persona   our persona on the llama.cpp engine: build_request, stream, reply cleaning, under asyncio
    hf-raw          plain transformers model.generate (float32, no speedups), as a user would call it
    hf-persona      our persona on the transformers engine, loaded as client.py loads it
    server-raw      a bare openai client streaming from ``python -m llama_cpp.server`` (the server's own rate)
    server-persona  our persona on the openai engine, against the same server

For the server configurations the parent starts one llama_cpp.server on the embedded GGUF (with
--threads threads) and both talk to it; their RSS is the client's, not the server's.

Reported per configuration: decode tok/s (tokens after the first, over the time after the first),
time to first token (a persona's includes building its prompt), peak and steady (after the runs)
RSS. Persona configurations also time the second turn of a growing conversation (its prompt
starts with the first turn's) warm, right after the first turn, and cold, with the prompt cache
emptied first. The closing lines give the ratios the engines are held to.

    python bench/engines.py                       # every configuration, 2 rounds
    python bench/engines.py --only llama-raw --only llama-persona --rounds 3

Another engine is one more entry in RUNNERS: a function taking the parsed arguments and returning
{"turns": [...], "warm_ttft": [...], "cold_ttft": [...]} (the last two may be empty).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from generation import HISTORY, PERSONAS, current_rss_mb, peak_rss_mb, run_child  # bench/generation.py beside this

from partychat.bundled import prompts_folder
from partychat.engines.base import ChatModel, StopFlag
from partychat.engines.models import embedded_gguf, load, resolve
from partychat.persona.cli import DEFAULT_CACHE_MB
from partychat.persona.generation import GenerationSettings, ReplyStream, build_request
from partychat.protocol import Chat

FOLLOW_UP = "Say more about that, with one example."


def history() -> list[Chat]:
    return [Chat(sender=s, content=c, seq=n) for n, (s, c) in enumerate(HISTORY, start=1)]


def personas(args: argparse.Namespace) -> list[tuple[str, str]]:
    return [((prompts_folder() / file).read_text(encoding="utf-8"), name) for file, name in PERSONAS[:args.prompts]]


def settings_for(args: argparse.Namespace) -> GenerationSettings:
    """Greedy; a history window wide enough that the second turn's prompt starts with the first's.

    (With the default --history-length 5 the window slides once the room has more messages, and
    a prompt then shares only the persona with the last one.)
    """
    return GenerationSettings(temperature=0, max_tokens=args.max_new_tokens, history_length=20)


# ------------------------------------------------------------------------------------------------ persona


async def persona_turn(model: ChatModel, persona: str, name: str, chats: list[Chat],
                       settings: GenerationSettings) -> dict[str, Any]:
    """One turn as participant.py takes it, minus the websocket: build the request, stream, clean."""
    start = time.perf_counter()
    request = await build_request(model, persona, name, chats, settings)
    cleaner = ReplyStream(name, sorted({c.sender for c in chats}))
    first, pieces = None, []
    async for piece in model.stream(request, StopFlag()):
        first = first or time.perf_counter()
        pieces.append(piece)
        cleaner.feed(piece)
    end = time.perf_counter()
    return {"start": start, "first": first or end, "end": end, "text": "".join(pieces)}


def persona_runs(model: ChatModel, count_tokens: Callable[[str], int], args: argparse.Namespace,
                 forget: Callable[[], None]) -> dict[str, Any]:
    """Each persona's first turn, cold; then its second turn (the first turn's prompt, the reply and a
    new message) warm, right after the first, and cold, after ``forget`` empties the prompt cache.

    The second turn needs only its first token, so it generates one.
    """
    settings = settings_for(args)
    one_token = replace(settings, max_tokens=1)

    async def main() -> dict[str, Any]:
        await persona_turn(model, *personas(args)[0], history(), settings)  # warm-up
        turns, warm, cold = [], [], []
        for persona, name in personas(args):
            forget()
            first = await persona_turn(model, persona, name, history(), settings)
            turns.append(summary(first, count_tokens(first["text"])))
            grown = [*history(), Chat(sender=name, content=first["text"].strip() or "I agree."),
                     Chat(sender="Moderator", content=FOLLOW_UP)]
            second = await persona_turn(model, persona, name, grown, one_token)
            warm.append(second["first"] - second["start"])
            forget()
            again = await persona_turn(model, persona, name, grown, one_token)
            cold.append(again["first"] - again["start"])
        return {"turns": turns, "warm_ttft": warm, "cold_ttft": cold}

    return asyncio.run(main())


def summary(turn: dict[str, Any], tokens: int) -> dict[str, Any]:
    decode = turn["end"] - turn["first"]
    return {"tokens": tokens, "ttft": turn["first"] - turn["start"],
            "decode_tps": (tokens - 1) / decode if tokens > 1 and decode > 0 else None}


# ------------------------------------------------------------------------------------------------ llama.cpp


def open_llama(args: argparse.Namespace) -> Any:
    from partychat.engines.llama_cpp_engine import LlamaCppChatModel

    return LlamaCppChatModel(embedded_gguf(), context_tokens=2048, threads=args.threads)


def llama_raw(args: argparse.Namespace) -> dict[str, Any]:
    """Llama.generate on the very token ids our persona would send, with the same stopping rule."""
    import llama_cpp

    model = open_llama(args)
    llama = model.llama
    prompts = [model.prompt_tokens(asyncio.run(build_request(model, persona, name, history(), settings_for(args))))
               for persona, name in personas(args)]

    def run(ids: list[int]) -> dict[str, Any]:
        llama.reset()  # a cold prompt, as the persona's first turns are
        start, first, produced = time.perf_counter(), None, 0
        for token in llama.generate(ids, temp=0.0, repeat_penalty=1.0):
            if llama_cpp.llama_vocab_is_eog(llama._model.vocab, token):
                break
            llama.detokenize([token])
            first = first or time.perf_counter()
            produced += 1
            if produced >= args.max_new_tokens:
                break
        end = time.perf_counter()
        return summary({"start": start, "first": first or end, "end": end}, produced)

    run(prompts[0])  # warm-up
    return {"turns": [run(ids) for ids in prompts], "warm_ttft": [], "cold_ttft": []}


def llama_persona(args: argparse.Namespace) -> dict[str, Any]:
    model = open_llama(args)
    return persona_runs(model, lambda text: len(model.llama.tokenize(text.encode(), add_bos=False)), args,
                        forget=model.llama.reset)


# ------------------------------------------------------------------------------------------------ transformers


def hf_raw(args: argparse.Namespace) -> dict[str, Any]:
    """Plain model.generate on float32 weights, with the prompts our persona would build."""
    import torch
    from generation import run_raw

    from partychat.engines.transformers_engine import TransformersChatModel

    torch.set_num_threads(args.threads)
    model = TransformersChatModel(load(resolve(""), dtype="float32", speedups=False))
    settings = settings_for(args)
    requests = [asyncio.run(build_request(model, persona, name, history(), settings))
                for persona, name in personas(args)]
    run_raw(model, requests[0], settings)  # warm-up
    turns = []
    for request in requests:
        result = run_raw(model, request, settings)  # times from 0 at the call
        turns.append(summary({"start": 0.0, "first": result["ttft"], "end": result["seconds"]}, result["tokens"]))
    return {"turns": turns, "warm_ttft": [], "cold_ttft": []}


def hf_persona(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from partychat.engines.transformers_engine import TransformersChatModel

    torch.set_num_threads(args.threads)
    model = TransformersChatModel(load(resolve("")), cache_bytes=DEFAULT_CACHE_MB << 20)  # as client.py's default
    tokenizer = model.loaded.tokenizer
    return persona_runs(model, lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]), args,
                        forget=model.forget_prompts)


# ------------------------------------------------------------------------------------------------ openai


SERVER_MODEL = "smollm2"


def start_server(threads: int) -> tuple[subprocess.Popen[bytes], str]:
    """python -m llama_cpp.server on the embedded GGUF and a free loopback port; returns it and its /v1 URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_gguf()),
                               "--model_alias", SERVER_MODEL, "--host", "127.0.0.1", "--port", str(port),
                               "--n_ctx", "2048", "--n_threads", str(threads), "--n_threads_batch", str(threads)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/models", timeout=5).close()
            return server, url
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("llama_cpp.server did not start within 120 s")


def open_server_model(args: argparse.Namespace) -> tuple[Any, Callable[[str], int]]:
    """Our openai engine on the server, and a token counter (the GGUF's vocabulary, loaded alone)."""
    from llama_cpp import Llama

    from partychat.engines.openai_engine import OpenAIChatModel

    vocab = Llama(model_path=str(embedded_gguf()), vocab_only=True, verbose=False)
    return (OpenAIChatModel(args.api_base, SERVER_MODEL),
            lambda text: len(vocab.tokenize(text.encode(), add_bos=False)))


def server_turns(args: argparse.Namespace, turn: Callable[..., Any]) -> dict[str, Any]:
    """A warm-up, then every persona's first turn through ``turn(model, persona, name, chats, settings)``."""
    model, count_tokens = open_server_model(args)
    settings = settings_for(args)

    async def main() -> list[dict[str, Any]]:
        try:
            await turn(model, *personas(args)[0], history(), settings)
            timed = [await turn(model, persona, name, history(), settings) for persona, name in personas(args)]
        finally:
            await model.aclose()
        return [summary(result, count_tokens(result["text"])) for result in timed]

    return {"turns": asyncio.run(main()), "warm_ttft": [], "cold_ttft": []}


async def bare_client_turn(model: Any, persona: str, name: str, chats: list[Chat],
                           settings: GenerationSettings) -> dict[str, Any]:
    """The messages our persona would send, streamed by a plain AsyncOpenAI client: the server's own rate."""
    import openai

    global bare_client
    request = await build_request(model, persona, name, chats, settings)
    bare_client = bare_client or openai.AsyncOpenAI(base_url=model.base_url, api_key="none")  # one per run, as ours
    start, first, pieces = time.perf_counter(), None, []
    stream = await bare_client.chat.completions.create(model=SERVER_MODEL, messages=list(request.messages),
                                                       stream=True, temperature=0, max_tokens=settings.max_tokens)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            pieces.append(chunk.choices[0].delta.content)
    end = time.perf_counter()
    return {"start": start, "first": first or end, "end": end, "text": "".join(pieces)}


bare_client: Any = None


def server_raw(args: argparse.Namespace) -> dict[str, Any]:
    return server_turns(args, bare_client_turn)


def server_persona(args: argparse.Namespace) -> dict[str, Any]:
    return server_turns(args, persona_turn)


RUNNERS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "llama-raw": llama_raw,
    "llama-persona": llama_persona,
    "hf-raw": hf_raw,
    "hf-persona": hf_persona,
    "server-raw": server_raw,
    "server-persona": server_persona,
}


# ------------------------------------------------------------------------------------------------ parent


def spawn(name: str, args: argparse.Namespace) -> dict[str, Any]:
    return run_child(str(Path(__file__).resolve()), name, ["--child", name, "--threads", str(args.threads),
                     "--max-new-tokens", str(args.max_new_tokens), "--prompts", str(args.prompts),
                     *(["--api-base", args.api_base] if args.api_base else [])])


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 4) if present else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=RUNNERS, help="run only these configurations")
    parser.add_argument("--rounds", type=int, default=2, help="runs of every configuration, interleaved")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="CPU threads")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--prompts", type=int, default=len(PERSONAS), choices=range(1, len(PERSONAS) + 1),
                        help="personas, each one prompt (default: all)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--api-base", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = RUNNERS[args.child](args)
        result.update(rss_peak_mb=peak_rss_mb(), rss_steady_mb=current_rss_mb())
        print(json.dumps(result))
        return 0
    names = args.only or list(RUNNERS)
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    server = None
    if any(name.startswith("server-") for name in names):
        server, args.api_base = start_server(args.threads)
    try:
        for _ in range(args.rounds):
            for name in names:
                rounds[name].append(spawn(name, args))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    table: dict[str, dict[str, Any]] = {}
    for name, results in rounds.items():
        turns = [turn for result in results for turn in result["turns"]]
        table[name] = {
            "config": name,
            "decode_tps": median([t["decode_tps"] for t in turns]),
            "ttft_s": median([t["ttft"] for t in turns]),
            "tokens": median([t["tokens"] for t in turns]),
            "warm_ttft_s": median([v for r in results for v in r["warm_ttft"]]),
            "cold_ttft_s": median([v for r in results for v in r["cold_ttft"]]),
            "rss_peak_mb": median([r["rss_peak_mb"] for r in results]),
            "rss_steady_mb": median([r["rss_steady_mb"] for r in results]),
        }
        print(json.dumps(table[name]), flush=True)
    ratios: dict[str, Any] = {"threads": args.threads, "rounds": args.rounds, "prompts": args.prompts,
                              "loadavg_end": round(os.getloadavg()[0], 2)}
    for engine in ("llama", "hf", "server"):
        raw, ours = table.get(f"{engine}-raw"), table.get(f"{engine}-persona")
        if raw and ours and raw["decode_tps"] and ours["decode_tps"]:
            ratios[f"{engine}_persona_over_raw_decode"] = round(ours["decode_tps"] / raw["decode_tps"], 3)
        if ours and ours["warm_ttft_s"] and ours["cold_ttft_s"]:
            ratios[f"{engine}_warm_over_cold_ttft"] = round(ours["warm_ttft_s"] / ours["cold_ttft_s"], 3)
    print(json.dumps(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
