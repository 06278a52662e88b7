"""Generation speed: raw ``model.generate`` versus the Party Chat pipeline, one JSON line per configuration.

Every configuration runs in its own child process (so its peak RSS is its own), once per round, and the
rounds interleave the configurations (so a noisy neighbour slows them all alike). All configurations
decode the same chat prompts (greedily, unless ``temp`` says otherwise) to exactly ``--max-new-tokens``
tokens; their texts are compared with the first configuration's, the reference, whose ratio line closes
the output. See bench/GENERATION.md for results.

    python bench/generation.py                      # raw float32, our pipeline, our pipeline made fast
    python bench/generation.py --rounds 5 --agreement --config mode=raw --config mode=pipeline,dtype=bfloat16

A configuration is ``key=value`` pairs joined by commas:

    mode     raw (plain model.generate in the main thread) or pipeline (the transformers engine's stream
             under a running asyncio loop, as participant.py runs it)
    dtype    float32, bfloat16, float16, or auto (what partychat.engines.models.pick_dtype chooses)
    threads  torch.set_num_threads value; 0 keeps torch's default (one per core)
    cache    dynamic or static KV cache
    attn     sdpa or eager attention
    lookup   prompt-lookup decoding: candidate tokens per step, 0 is off
    mkldnn   on (torch's default), off, or prefill: oneDNN matmuls only for forwards of more than one
             token (the prompt); one-token decoding steps use torch's own kernels (see GENERATION.md)
    temp     sampling temperature; 0 (the default) is greedy. Above 0 both modes sample as the engine
             does (top_p 0.9, repetition_penalty 1.1) from a fixed seed per prompt
    compile  1 to torch.compile the decoding step (static cache only; the compile time is in warmup_s)
    client   1 to load the model exactly as client.py does (partychat.engines.models.load with its speedups);
             dtype, cache and mkldnn are then ignored
    name     a label for the output (default: built from the other keys)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from partychat.bundled import prompts_folder
from partychat.engines.base import ChatRequest, StopFlag
from partychat.engines.models import LoadedModel, converted_folder, load, resolve
from partychat.engines.transformers_engine import TransformersChatModel
from partychat.persona.generation import GenerationSettings, build_request
from partychat.protocol import Chat

# (persona file, persona name): each gets the same short room history.
PERSONAS = (
    ("historian.txt", "Historian"),
    ("philosopher.txt", "Philosopher"),
    ("inventor.txt", "TinkerBot"),
    ("sage.txt", "Zen Sage"),
    ("scientist.txt", "Scientist"),
)
HISTORY = (
    ("Moderator", "Today's topic: should cities ban cars from their centres?"),
    ("Researcher", "Studies of car-free zones in Europe show fewer injuries and more foot traffic for shops."),
    ("Assistant", "Deliveries and people with disabilities still need access, so exceptions matter."),
    ("Moderator", "What would you change first, and why?"),
)
DEFAULT_CONFIGS = (
    "mode=raw",
    "mode=pipeline",
    "mode=pipeline,client=1",
)
TICK = 0.005


@dataclass(frozen=True)
class Config:
    """One way of generating; see the module docstring for the keys."""

    mode: str = "raw"
    dtype: str = "float32"
    threads: int = 0
    cache: str = "dynamic"
    attn: str = "sdpa"
    lookup: int = 0
    mkldnn: str = "on"
    temp: float = 0.0
    compile: int = 0
    client: int = 0
    name: str = ""

    @classmethod
    def parse(cls, text: str) -> Config:
        """Build a Config from ``key=value,key=value``; unknown keys or values raise ValueError."""
        known = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for pair in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = pair.partition("=")
            if key not in known:
                raise ValueError(f"unknown key {key!r} in {text!r}; known: {', '.join(known)}")
            values[key] = {"int": int, "float": float}.get(known[key], str)(value)
        config = cls(**values)
        choices = {"mode": ("raw", "pipeline"), "dtype": ("float32", "bfloat16", "float16", "auto"),
                   "cache": ("dynamic", "static"), "attn": ("sdpa", "eager"), "mkldnn": ("on", "off", "prefill")}
        for key, allowed in choices.items():
            if getattr(config, key) not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, not {getattr(config, key)!r}")
        if config.compile and config.cache != "static":
            raise ValueError("compile=1 needs cache=static")
        return config

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.client:
            return f"{self.mode}-as-client" + (f"-temp{self.temp:g}" if self.temp else "")
        parts = [self.mode, self.dtype, f"t{self.threads or 'default'}", self.cache]
        parts += [self.attn] if self.attn != "sdpa" else []
        parts += [f"lookup{self.lookup}"] if self.lookup else []
        parts += [f"mkldnn-{self.mkldnn}"] if self.mkldnn != "on" else []
        parts += [f"temp{self.temp:g}"] if self.temp else []
        parts += ["compiled"] if self.compile else []
        return "-".join(parts)


# ----------------------------------------------------------------------------------------------- child side


def build_prompts(model: TransformersChatModel, count: int, settings: GenerationSettings) -> list[ChatRequest]:
    """``count`` persona requests, built exactly as a participant builds them."""
    history = [Chat(sender=s, content=c, seq=n) for n, (s, c) in enumerate(HISTORY, start=1)]
    prompts = []
    for file, name in PERSONAS[:count]:
        persona = (prompts_folder() / file).read_text(encoding="utf-8")
        prompts.append(asyncio.run(build_request(model, persona, name, history, settings)))
    return prompts


def mkldnn_for_prompts_only(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Forward pre-hook: oneDNN matmuls for the prompt's forward, torch's own kernels for one-token steps."""
    import torch

    ids = kwargs.get("input_ids", args[0] if args else None)
    torch.backends.mkldnn.enabled = ids is None or ids.shape[-1] > 1


def configure(loaded: LoadedModel, config: Config, new_tokens: int) -> None:
    """Apply the configuration: decoding options go on generation_config, which both modes use."""
    import torch

    gen = loaded.model.generation_config
    gen.min_new_tokens = new_tokens  # every run decodes exactly new_tokens tokens
    if config.client:
        return  # exactly as client.py loads it: partychat.engines.models.load with its speedups
    torch.backends.mkldnn.enabled = config.mkldnn != "off"
    if config.mkldnn == "prefill":
        loaded.model.register_forward_pre_hook(mkldnn_for_prompts_only, with_kwargs=True)
    gen.cache_implementation = "static" if config.cache == "static" else None
    gen.prompt_lookup_num_tokens = config.lookup or None
    gen.disable_compile = not config.compile
    if config.compile:
        from transformers.generation.configuration_utils import CompileConfig

        compile_config = CompileConfig(fullgraph=False, dynamic=None)
        compile_config._compile_all_devices = True  # transformers only auto-compiles on accelerators otherwise
        gen.compile_config = compile_config


def sampling(settings: GenerationSettings) -> dict[str, Any]:
    """The sampling arguments the transformers engine passes to model.generate (kept in step by hand)."""
    if settings.temperature <= 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": settings.temperature, "top_p": 0.9, "repetition_penalty": 1.1}


def run_raw(model: TransformersChatModel, request: ChatRequest, settings: GenerationSettings) -> dict[str, Any]:
    """Plain blocking ``model.generate``; a streamer that only notes the time of the first new token."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class _FirstToken(BaseStreamer):
        def __init__(self) -> None:
            self.calls = 0
            self.first: float | None = None

        def put(self, value: Any) -> None:
            self.calls += 1
            if self.calls == 2:  # the first call carries the prompt
                self.first = time.perf_counter()

        def end(self) -> None:
            pass

    loaded = model.loaded
    tokenizer = loaded.tokenizer
    prompt = model.prompt_tokens(request)
    input_ids = torch.tensor([prompt])
    streamer = _FirstToken()
    start, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        output = loaded.model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=settings.max_tokens,
            pad_token_id=tokenizer.eos_token_id, streamer=streamer, **sampling(settings),
        )
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    ids = output[0][len(prompt):].tolist()
    return {"tokens": len(ids), "seconds": seconds, "cpu": cpu, "ttft": (streamer.first or start) - start,
            "lag_ms": None, "text": tokenizer.decode(ids, skip_special_tokens=True)}


async def _pipeline(model: TransformersChatModel, request: ChatRequest,
                    settings: GenerationSettings) -> dict[str, Any]:
    arrivals: list[float] = []
    lags: list[float] = []
    pieces: list[str] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(TICK)
            lags.append(time.perf_counter() - before - TICK)

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)  # let the ticker settle before generation starts
    start, cpu = time.perf_counter(), time.process_time()
    request = replace(request, temperature=settings.temperature, max_tokens=settings.max_tokens)
    async for piece in model.stream(request, StopFlag()):
        arrivals.append(time.perf_counter())
        pieces.append(piece)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    text = "".join(pieces)
    done.set()
    await ticking
    return {"tokens": settings.max_tokens, "seconds": seconds, "cpu": cpu,
            "ttft": (arrivals[0] if arrivals else start + seconds) - start,
            "lag_ms": 1000 * max(lags, default=0.0), "text": text}


def run_pipeline(model: TransformersChatModel, request: ChatRequest, settings: GenerationSettings) -> dict[str, Any]:
    """The transformers engine's stream under a fresh asyncio loop, as a participant reads it."""
    return asyncio.run(_pipeline(model, request, settings))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def current_rss_mb() -> float | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:")), None)


@contextlib.contextmanager
def min_tokens(loaded: LoadedModel, count: int) -> Iterator[None]:
    """Temporarily lower generation_config.min_new_tokens (the warm-up run is shorter than the timed ones)."""
    gen = loaded.model.generation_config
    saved, gen.min_new_tokens = gen.min_new_tokens, count
    try:
        yield
    finally:
        gen.min_new_tokens = saved


def child(config: Config, args: argparse.Namespace) -> dict[str, Any]:
    """Load, warm up, then time every prompt once; returns what the parent aggregates."""
    import torch

    if config.threads:
        torch.set_num_threads(config.threads)
    start = time.perf_counter()
    loaded = load(resolve(args.model), dtype="auto" if config.client else config.dtype, speedups=bool(config.client))
    if config.attn != "sdpa":
        loaded.model.set_attn_implementation(config.attn)
    load_s = time.perf_counter() - start
    configure(loaded, config, args.max_new_tokens)
    model = TransformersChatModel(loaded)
    prompts = build_prompts(model, args.prompts, GenerationSettings(max_tokens=args.max_new_tokens))
    run = run_raw if config.mode == "raw" else run_pipeline
    settings = GenerationSettings(temperature=config.temp, max_tokens=args.max_new_tokens)
    warmup = GenerationSettings(temperature=config.temp, max_tokens=args.warmup_tokens)
    start = time.perf_counter()
    with min_tokens(loaded, args.warmup_tokens):
        run(model, prompts[0], settings if config.compile else warmup)
    warmup_s = time.perf_counter() - start
    results = []
    for index, prompt in enumerate(prompts):
        torch.manual_seed(args.seed + index)
        results.append(run(model, prompt, settings))
    return {"results": results, "load_s": load_s, "warmup_s": warmup_s, "rss_mb": peak_rss_mb(),
            "rss_end_mb": current_rss_mb(), "threads": torch.get_num_threads(),
            "prompt_tokens": [len(model.prompt_tokens(p)) for p in prompts]}


# ---------------------------------------------------------------------------------------------- parent side


def run_child(script: str, label: str, arguments: list[str]) -> dict[str, Any]:
    """Run a benchmark script's child side in a fresh interpreter and return the JSON on its last line."""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, script, *arguments], capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def spawn(config: Config, args: argparse.Namespace) -> dict[str, Any]:
    """Run one round of ``config`` in a fresh interpreter and return its JSON answer."""
    return run_child(str(Path(__file__).resolve()), config.label, [
        "--child", json.dumps(asdict(config)), "--model", args.model, "--prompts", str(args.prompts),
        "--max-new-tokens", str(args.max_new_tokens), "--warmup-tokens", str(args.warmup_tokens),
        "--seed", str(args.seed)])


def token_match(tokenizer: Any, reference: str, text: str) -> tuple[int, int]:
    """(matching leading tokens, reference tokens), comparing the two texts re-tokenised."""
    ref_ids, ids = tokenizer(reference)["input_ids"], tokenizer(text)["input_ids"]
    same = 0
    for a, b in zip(ref_ids, ids, strict=False):
        if a != b:
            break
        same += 1
    return same, len(ref_ids)


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def summarise(config: Config, rounds: list[dict[str, Any]], reference: list[dict[str, Any]],
              tokenizer: Any) -> dict[str, Any]:
    """One JSON-ready line: medians over every (round, prompt) generation, quality against the reference."""
    results = [r for one in rounds for r in one["results"]]
    ref_results = [r for one in reference for r in one["results"]]
    rate = [r["tokens"] / r["seconds"] for r in results]
    ref_rate = [q["tokens"] / q["seconds"] for q in ref_results]
    paired = [mine / theirs for mine, theirs in zip(rate, ref_rate, strict=True)]
    decode = [(r["tokens"] - 1) / (r["seconds"] - r["ttft"]) for r in results if r["seconds"] > r["ttft"]]
    lags = [r["lag_ms"] for r in results if r["lag_ms"] is not None]
    first_round, ref_first = rounds[0]["results"], reference[0]["results"]
    pairs = list(zip(first_round, ref_first, strict=True))
    matches = [token_match(tokenizer, q["text"], r["text"]) for r, q in pairs]
    return {
        "config": config.label,
        "tok_s": median(rate),
        "decode_tok_s": median(decode),
        "ttft_ms": median([1000 * r["ttft"] for r in results]),
        "cpu_ms_per_tok": median([1000 * r["cpu"] / r["tokens"] for r in results]),
        "peak_rss_mb": round(max(one["rss_mb"] for one in rounds)),
        "end_rss_mb": round(max(one["rss_end_mb"] or 0 for one in rounds)),
        "loop_lag_max_ms": round(max(lags), 1) if lags else None,
        "loop_lag_median_of_max_ms": median(lags),
        "vs_reference": median(paired),
        "identical_texts": f"{sum(r['text'] == q['text'] for r, q in pairs)}/{len(pairs)}",
        "token_match": round(sum(s for s, _ in matches) / max(1, sum(n for _, n in matches)), 3),
        "load_s": median([one["load_s"] for one in rounds]),
        "warmup_s": median([one["warmup_s"] for one in rounds]),
        "threads": rounds[0]["threads"],
        "samples": len(results),
    }


def agreement(args: argparse.Namespace, reference: str, dtypes: list[str]) -> Iterator[dict[str, Any]]:
    """Teacher-forced quality: how each dtype scores the reference dtype's own greedy replies.

    No cascade of early divergences here: at every reply position both models see the same text, so
    ``top1_match`` is the share of positions where they would pick the same next token.
    """
    import torch

    source = resolve(args.model)
    base = load(source, dtype=reference)
    prompts = build_prompts(base.tokenizer, args.prompts, GenerationSettings(max_tokens=args.max_new_tokens))
    with torch.inference_mode():
        new = args.max_new_tokens
        sequences = [base.model.generate(input_ids=torch.tensor([p]), max_new_tokens=new, min_new_tokens=new,
                                         do_sample=False, pad_token_id=base.tokenizer.eos_token_id)
                     for p in prompts]

        def log_probs(model: Any, sequence: Any, prompt_length: int) -> Any:
            logits = model(input_ids=sequence).logits[0, prompt_length - 1:-1].float()
            return torch.log_softmax(logits, dim=-1)

        expected = [log_probs(base.model, s, len(p)) for s, p in zip(sequences, prompts, strict=True)]
        for dtype in [reference, *dtypes]:
            other = base if dtype == reference else load(source, dtype=dtype)
            same = kl = nll = total = 0.0
            for sequence, prompt, ref in zip(sequences, prompts, expected, strict=True):
                got = log_probs(other.model, sequence, len(prompt))
                targets = sequence[0, len(prompt):]
                same += (got.argmax(-1) == ref.argmax(-1)).sum().item()
                kl += (ref.exp() * (ref - got)).sum(-1).sum().item()
                nll -= got.gather(-1, targets[:, None]).sum().item()
                total += len(targets)
            yield {"agreement": dtype, "vs": reference, "top1_match": round(same / total, 4),
                   "mean_kl": round(kl / total, 5), "ppl_of_reference_replies": round(math.exp(nll / total), 4)}


def interleaved(configs: list[Config], rounds: int) -> Iterator[tuple[int, Config]]:
    """Every config once per round, each round starting one config later, so none is always first."""
    for number in range(rounds):
        for index in range(len(configs)):
            yield number, configs[(index + number) % len(configs)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", help="a configuration (repeat); the first is the reference")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every configuration (default: 3)")
    parser.add_argument("--prompts", type=int, default=len(PERSONAS), choices=range(1, len(PERSONAS) + 1),
                        help=f"how many persona prompts (default: {len(PERSONAS)})")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="tokens decoded per prompt (default: 100)")
    parser.add_argument("--warmup-tokens", type=int, default=8, help="tokens of the untimed warm-up run")
    parser.add_argument("--seed", type=int, default=1234, help="torch seed of the first prompt (then +1 each)")
    parser.add_argument("--model", default="", help="as client.py --model (default: the embedded SmolLM2)")
    parser.add_argument("--show", action="store_true", help="print every configuration's first-round texts")
    parser.add_argument("--agreement", action="store_true",
                        help="also score each configuration's dtype on the reference dtype's replies (teacher-forced)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(Config(**json.loads(args.child)), args)))
        return 0
    try:
        configs = [Config.parse(text) for text in (args.config or DEFAULT_CONFIGS)]
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    from transformers import AutoTokenizer

    source = resolve(args.model)
    tokenizer = AutoTokenizer.from_pretrained(
        converted_folder(Path(source.location)) if source.kind == "gguf" else source.location)
    collected: dict[Config, list[dict[str, Any]]] = {config: [] for config in configs}
    meta = {"meta": {"cpus": os.cpu_count(), "rounds": args.rounds, "prompts": args.prompts,
                     "max_new_tokens": args.max_new_tokens, "loadavg_start": os.getloadavg()[0]}}
    print(json.dumps(meta), flush=True)
    for number, config in interleaved(configs, args.rounds):
        collected[config].append(spawn(config, args))
        print(f"# round {number + 1}/{args.rounds} {config.label} done", file=sys.stderr, flush=True)
    reference = collected[configs[0]]
    lines = [summarise(config, collected[config], reference, tokenizer) for config in configs]
    for line in lines:
        print(json.dumps(line), flush=True)
    ratio = {line["config"]: line["vs_reference"] for line in lines[1:]}
    print(json.dumps({"ratio_vs": configs[0].label, "paired_median": ratio,
                      "loadavg_end": os.getloadavg()[0]}), flush=True)
    if args.agreement:
        dtypes = sorted({config.dtype for config in configs} - {configs[0].dtype})
        for line in agreement(args, configs[0].dtype, dtypes):
            print(json.dumps(line), flush=True)
    if args.show:
        for config in configs:
            for result in collected[config][0]["results"]:
                print(f"--- {config.label}\n{result['text']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
