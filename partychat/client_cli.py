"""Command line of client.py: check every input, load the model, then join the room."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import queue
import sys
import threading
from pathlib import Path

from .connection import HubRefused
from .downloads import fetch, hub_offline
from .generation import GenerationSettings
from .logs import LEVELS, honour_ctrl_c, setup_logging
from .models import DTYPES, ModelError, ModelSource, load, resolve
from .participant import ModelParticipant, ParticipantConfig

log = logging.getLogger("partychat.client")

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="client.py", description="Join a Party Chat room as a model persona.")
    parser.add_argument("--name", required=True, help="the persona's name in the room (must be unique)")
    parser.add_argument("--model", default="",
                        help="a .gguf file, a local model folder or a Hugging Face id, downloaded on first use "
                             "(default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--offline", action="store_true",
                        help="never touch the network: a Hugging Face id must already be in the cache "
                             "(as with HF_HUB_OFFLINE=1)")
    parser.add_argument("--device", choices=("cpu", "gpu", "auto"), default="cpu")
    parser.add_argument("--gpu-id", type=int, default=0, help="which GPU with --device gpu (default: 0)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="weight precision (default: bfloat16 on CPUs with fast bfloat16, else float32; "
                             "bfloat16/float16 on GPU)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 is greedy")
    parser.add_argument("--max-generation-tokens", type=int, default=100, help="longest reply, in tokens")
    parser.add_argument("--max-context-tokens", type=int, default=2048, help="prompt plus reply, in tokens")
    parser.add_argument("--no-auto-truncate", action="store_true",
                        help="refuse a turn whose prompt is too long instead of dropping old history")
    parser.add_argument("--history-length", type=int, default=5, help="recent room messages in the prompt")
    parser.add_argument("--prompt-file", help="persona file; a bare name is also looked up in prompts/")
    parser.add_argument("--initial-prompt", help="a message the persona says once on joining")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to wait before sending each reply")
    parser.add_argument("--server", default="ws://localhost:8765", help="hub URL, ws:// or wss://")
    parser.add_argument("--token", default=os.environ.get("PARTYCHAT_TOKEN"),
                        help="the hub's access token (or set PARTYCHAT_TOKEN)")
    parser.add_argument("--ca-file", type=Path, help="CA certificate to trust for a wss:// hub")
    parser.add_argument("--no-stream", action="store_true", help="send replies whole, without live partials")
    parser.add_argument("--no-speedups", action="store_true",
                        help="run the model as plain transformers would: no bfloat16 on CPU, no static cache")
    parser.add_argument("--log-level", default="INFO", choices=LEVELS, type=str.upper)
    parser.add_argument("--log-file", type=Path, help="also write the log, without colours, to this file")
    return parser


def find_prompt_file(value: str) -> Path:
    """The path as given, else the same name inside prompts/ (with or without .txt)."""
    given = Path(value).expanduser()
    for candidate in (given, PROMPTS_DIR / value, PROMPTS_DIR / f"{value}.txt"):
        if candidate.is_file():
            return candidate
    raise ModelError(f"Prompt file not found: {value} (looked here and in {PROMPTS_DIR})")


def read_persona(value: str | None, name: str) -> str:
    if not value:
        return f"You are {name}, a friendly and thoughtful conversationalist."
    path = find_prompt_file(value)
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ModelError(f"Cannot read prompt file {path}: {error}") from error
    if not text:
        raise ModelError(f"Prompt file {path} is empty.")
    return text


def _check_numbers(args: argparse.Namespace) -> None:
    problems = []
    if args.temperature < 0:
        problems.append("--temperature cannot be negative")
    if args.max_generation_tokens < 1:
        problems.append("--max-generation-tokens must be at least 1")
    if args.max_context_tokens <= args.max_generation_tokens:
        problems.append("--max-context-tokens must be larger than --max-generation-tokens")
    if args.history_length < 0:
        problems.append("--history-length cannot be negative")
    if args.delay < 0:
        problems.append("--delay cannot be negative")
    if not args.server.startswith(("ws://", "wss://")):
        problems.append("--server must start with ws:// or wss://")
    if problems:
        raise ModelError("; ".join(problems))


def fetch_or_exit(source: ModelSource) -> ModelSource:
    """Download a Hugging Face model if needed; Ctrl+C ends the process at once, keeping finished files.

    huggingface_hub downloads in worker threads that cannot be interrupted and waits for them before
    it lets a KeyboardInterrupt through, so the download runs in a daemon thread of its own: after a
    Ctrl+C nobody wants to wait for the rest of a multi-gigabyte file.
    """
    outcome: queue.Queue[tuple[ModelSource | None, BaseException | None]] = queue.Queue(maxsize=1)

    def download() -> None:
        try:
            outcome.put((fetch(source, offline=hub_offline()), None))
        except BaseException as error:
            outcome.put((None, error))

    threading.Thread(target=download, name="download", daemon=True).start()
    try:
        fetched, error = outcome.get()
    except KeyboardInterrupt:
        print("client.py: download interrupted; the files already finished stay in the cache for next time",
              file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(130)
    if error is not None:
        raise error
    assert fetched is not None
    return fetched


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    honour_ctrl_c()
    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported: it reads this once
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    setup_logging(args.log_level, args.log_file)
    try:
        _check_numbers(args)
        persona = read_persona(args.prompt_file, args.name)
        source = fetch_or_exit(resolve(args.model))
        log.info("Loading %s on %s", source.label, args.device)
        loaded = load(source, device=args.device, gpu_id=args.gpu_id, dtype=args.dtype,
                      speedups=not args.no_speedups)
    except ModelError as error:
        print(f"client.py: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("client.py: interrupted while fetching or loading the model", file=sys.stderr)
        return 130
    settings = GenerationSettings(
        temperature=args.temperature,
        max_new_tokens=args.max_generation_tokens,
        max_context_tokens=args.max_context_tokens,
        auto_truncate=not args.no_auto_truncate,
        history_length=args.history_length,
    )
    config = ParticipantConfig(
        name=args.name,
        persona=persona,
        server=args.server,
        delay=args.delay,
        initial_prompt=args.initial_prompt,
        token=args.token,
        ca_file=args.ca_file,
        stream=not args.no_stream,
    )
    participant = ModelParticipant(config, loaded, settings)
    try:
        asyncio.run(participant.run())
    except HubRefused as error:
        print(f"client.py: the hub refused {args.name!r}: {error}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        log.info("%s is leaving", args.name)
    return 0
