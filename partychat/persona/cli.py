"""Command line of client.py: check every input, fetch and load each model once, then join the room.

One process plays one persona (``--name``), or a cast (``--persona`` flags, a ``--cast`` file, or
both): each persona is its own participant, and personas naming the same model share one load.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import queue
import sys
import threading
from dataclasses import replace
from pathlib import Path

from ..connection import HubRefused
from ..engines.base import ChatModel, EngineError, ModelError
from ..engines.downloads import fetch, hub_offline
from ..engines.models import DTYPES, ModelSource, resolve
from ..engines.registry import ENGINE_CHOICES, EngineOptions, open_chat_model, pick_engine
from ..logs import LEVELS, honour_ctrl_c, setup_logging
from .cast import CastError, Persona, from_card, from_flag, load_card, read_cast_file, read_persona
from .cast_runner import run_cast
from .generation import GenerationSettings
from .lorebook import Lorebook, PersonaFileError, read_lorebook
from .participant import ModelParticipant, ParticipantConfig
from .retries import DEFAULT_RETRIES, MAX_RETRIES
from .shared_models import IdlePrefill, SharedChatModel, load_once

log = logging.getLogger("partychat.client")

DEFAULT_CACHE_MB = 1024
"""Seven personas' full 2048-token caches at up to 70 KB of KV a token (the embedded model takes 23 KB)."""

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="client.py", description="Join a Party Chat room as one model persona "
                                     "(--name) or several (--persona, --cast) in one process.")
    parser.add_argument("--name", help="the persona's name in the room (must be unique)")
    parser.add_argument("--persona", action="append", default=[], metavar="NAME=PROMPT_FILE",
                        help="another persona in this process, sharing its model; repeatable")
    parser.add_argument("--cast", type=Path, help="a TOML cast file of personas (see casts/), or a folder of "
                        "character cards")
    parser.add_argument("--card", type=Path, help="a character card (PNG, JSON or CHARX, V1-V3) for the persona; "
                        "--name, --prompt-file and --initial-prompt override its fields")
    parser.add_argument("--lorebook", type=Path, action="append", default=[], metavar="FILE",
                        help="a shared lorebook (SillyTavern world info JSON) every persona here reads; repeatable")
    parser.add_argument("--model", default="",
                        help="a .gguf file, a local model folder or a Hugging Face id, downloaded on first use "
                             "(default: the embedded SmolLM2-135M-Instruct); with --api-base, the server's "
                             "model name")
    parser.add_argument("--offline", action="store_true",
                        help="never touch the network: a Hugging Face id must already be in the cache "
                             "(as with HF_HUB_OFFLINE=1)")
    parser.add_argument("--engine", "--backend", choices=ENGINE_CHOICES, default="auto",
                        help="the engine that runs the model (--backend is its older name; default: auto: openai with "
                             "--api-base, llama.cpp "
                             "for a .gguf when llama-cpp-python is installed, else transformers)")
    parser.add_argument("--api-base", help="an OpenAI-compatible server's URL, e.g. http://localhost:11434/v1")
    parser.add_argument("--api-key", default=os.environ.get("PARTYCHAT_API_KEY") or os.environ.get("OPENAI_API_KEY"),
                        help="the server's API key (or set PARTYCHAT_API_KEY or OPENAI_API_KEY)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for an in-process engine (default: llama.cpp one per core, "
                             "transformers torch's own choice)")
    parser.add_argument("--device", choices=("cpu", "gpu", "auto"), default="cpu")
    parser.add_argument("--gpu-id", type=int, default=0, help="which GPU with --device gpu (default: 0)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="weight precision (default: bfloat16 on CPUs with fast bfloat16, else float32; "
                             "bfloat16/float16 on GPU)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 is greedy")
    parser.add_argument("--max-generation-tokens", dest="max_tokens", type=int, default=100,
                        help="longest reply, in tokens")
    parser.add_argument("--max-context-tokens", type=int, default=2048, help="prompt plus reply, in tokens")
    parser.add_argument("--no-auto-truncate", action="store_true",
                        help="refuse a turn whose prompt is too long instead of dropping old history")
    parser.add_argument("--history-length", type=int, default=5,
                        help="most recent room messages in the prompt, the oldest dropped about half at a time; 0 none")
    parser.add_argument("--cache-mb", type=int, default=DEFAULT_CACHE_MB,
                        help="memory for each persona's own prompt cache on the llama.cpp and transformers engines, "
                             "kept between its turns (on llama.cpp also warmed while the model is idle); the least "
                             f"recently used goes first when full (default: {DEFAULT_CACHE_MB}; 0: none kept, "
                             "personas sharing a llama.cpp model share one cache and nothing is computed ahead)")
    parser.add_argument("--prompt-file", help="--name's persona file; a bare name is also looked up in prompts/")
    parser.add_argument("--initial-prompt", help="a message the --name persona says once on joining")
    parser.add_argument("--talkativeness", type=float, default=None,
                        help="how eager the persona is to speak in the hub's natural mode, 0 to 1 "
                             "(default: the hub's 0.5); 0 speaks only when named")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to wait before sending each reply")
    parser.add_argument("--retries", type=int, default=DEFAULT_RETRIES,
                        help="when the hub's guards would withhold a reply (a repeat, no words, a line written as "
                             f"someone else), generate again this many times in the same turn, each time sampling "
                             f"differently, before passing (default: {DEFAULT_RETRIES}; 0 never retries)")
    parser.add_argument("--server", default="ws://localhost:8765", help="hub URL, ws:// or wss://")
    parser.add_argument("--token", default=os.environ.get("PARTYCHAT_TOKEN"),
                        help="the hub's access token (or set PARTYCHAT_TOKEN)")
    parser.add_argument("--ca-file", type=Path, help="CA certificate to trust for a wss:// hub")
    parser.add_argument("--no-stream", action="store_true", help="send replies whole, without live partials")
    parser.add_argument("--no-anti-copy", action="store_true",
                        help="let replies copy word trigrams of the other recent messages (see README: anti-copy)")
    parser.add_argument("--no-speedups", action="store_true",
                        help="run the model as plain transformers would: no bfloat16 on CPU, no static cache")
    parser.add_argument("--log-level", default="INFO", choices=LEVELS, type=str.upper)
    parser.add_argument("--log-file", type=Path, help="also write the log, without colours, to this file")
    return parser


def _check_numbers(args: argparse.Namespace) -> None:
    problems = []
    if args.temperature < 0:
        problems.append("--temperature cannot be negative")
    if args.max_tokens < 1:
        problems.append("--max-generation-tokens must be at least 1")
    if args.max_context_tokens <= args.max_tokens:
        problems.append("--max-context-tokens must be larger than --max-generation-tokens")
    if args.history_length < 0:
        problems.append("--history-length cannot be negative")
    if args.cache_mb < 0:
        problems.append("--cache-mb cannot be negative")
    if args.talkativeness is not None and not 0 <= args.talkativeness <= 1:
        problems.append("--talkativeness must be a number from 0 to 1")
    if args.delay < 0:
        problems.append("--delay cannot be negative")
    if not 0 <= args.retries <= MAX_RETRIES:
        problems.append(f"--retries must be a whole number from 0 to {MAX_RETRIES}")
    if args.threads is not None and args.threads < 1:
        problems.append("--threads must be at least 1")
    if args.engine == "openai" and not args.api_base:
        problems.append("--engine openai needs --api-base, the server's URL")
    if args.api_base and not args.api_base.startswith(("http://", "https://")):
        problems.append("--api-base must start with http:// or https://")
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


def build_cast(args: argparse.Namespace) -> list[Persona]:
    """Every persona this process plays, in the order they join: --name or --card, then --persona flags, then --cast."""
    if not (args.name or args.persona or args.cast or args.card):
        raise CastError("Say who to play: --name NAME (one persona), --card FILE, --persona \"NAME=PROMPT_FILE\" "
                        "(repeatable) or --cast FILE.")
    if not (args.name or args.card) and (args.prompt_file or args.initial_prompt):
        raise CastError("--prompt-file and --initial-prompt describe the --name persona; with --persona, "
                        "give NAME=PROMPT_FILE, and use a --cast file for an opening line.")
    base = Persona(name="", system_prompt="", temperature=args.temperature, delay=args.delay,
                   max_tokens=args.max_tokens, model=args.model, engine=args.engine,
                   talkativeness=args.talkativeness, retries=args.retries, anti_copy=not args.no_anti_copy)
    cast = []
    if args.card:
        persona = from_card(load_card(args.card), base, args.name)
        cast.append(replace(persona, system_prompt=read_persona(args.prompt_file, persona.name) if args.prompt_file
                            else persona.system_prompt, initial_prompt=args.initial_prompt or persona.initial_prompt))
    elif args.name:
        cast.append(replace(base, name=args.name, system_prompt=read_persona(args.prompt_file, args.name),
                            initial_prompt=args.initial_prompt))
    cast += [from_flag(value, base) for value in args.persona]
    if args.cast:
        cast += read_cast_file(args.cast, base)
    seen: dict[str, str] = {}
    for persona in cast:
        if persona.name.casefold() in seen:
            raise CastError(f"The name {persona.name!r} is given twice (as {seen[persona.name.casefold()]!r} too); "
                            "each persona needs its own name.")
        seen[persona.name.casefold()] = persona.name
    shared = tuple(_lorebook(path) for path in args.lorebook)
    return [replace(persona, books=persona.books + shared) for persona in cast]


def _lorebook(path: Path) -> Lorebook:
    try:
        return read_lorebook(path)
    except PersonaFileError as error:
        raise CastError(str(error)) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    honour_ctrl_c()
    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported: it reads this once
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    setup_logging(args.log_level, args.log_file)
    try:
        _check_numbers(args)
        cast = build_cast(args)
        models = load_once(cast, lambda persona: _locate(persona, args), _open)
    except (EngineError, CastError) as error:
        print(f"client.py: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("client.py: interrupted while fetching or loading the model", file=sys.stderr)
        return 130
    idle = {id(model): IdlePrefill(model) for model in models.values() if model.prefills}
    participants = [
        ModelParticipant(
            ParticipantConfig(name=persona.name, system_prompt=persona.system_prompt, server=args.server,
                              delay=persona.delay,
                              initial_prompt=persona.initial_prompt, token=args.token, ca_file=args.ca_file,
                              stream=not args.no_stream, talkativeness=persona.talkativeness,
                              echo_room=index == 0, offstage=persona.offstage,
                              castmates=frozenset(p.name for p in cast) - {persona.name},
                              examples=persona.examples, after_history=persona.after_history, books=persona.books,
                              retries=persona.retries),
            models[persona.name],
            GenerationSettings(temperature=persona.temperature, max_tokens=persona.max_tokens,
                               max_context_tokens=args.max_context_tokens, auto_truncate=not args.no_auto_truncate,
                               history_length=args.history_length, anti_copy=persona.anti_copy),
            idle.get(id(models[persona.name])),
        )
        for index, persona in enumerate(cast)
    ]
    try:
        ended = asyncio.run(_take_part(participants, set(models.values()), list(idle.values())))
    except KeyboardInterrupt:
        log.info("%s %s leaving", " and ".join(p.name for p in participants), "are" if len(cast) > 1 else "is")
        return 0
    for name, error in ended:
        if isinstance(error, HubRefused):
            print(f"client.py: the hub refused {name!r}: {error}", file=sys.stderr)
    return 0 if not ended else 3 if all(isinstance(e, HubRefused) for _, e in ended) else 1


def _locate(persona: Persona, args: argparse.Namespace) -> EngineOptions:
    """What one load is: the engine and everything it is given, with a Hugging Face id downloaded first."""
    options = EngineOptions(engine=persona.engine, model=persona.model, device=args.device, gpu_id=args.gpu_id,
                            dtype=args.dtype, speedups=not args.no_speedups, threads=args.threads,
                            context_tokens=args.max_context_tokens, api_base=args.api_base, api_key=args.api_key,
                            cache_mb=args.cache_mb)
    if options.engine == "openai" and not options.api_base:
        raise CastError(f"{persona.name!r} asks for the openai engine, which needs --api-base, the server's URL.")
    if options.engine != "openai" and not options.api_base:
        options = replace(options, model=fetch_or_exit(resolve(options.model)).location)
    engine, reason = pick_engine(options)
    log.info("The %s engine runs %s, because %s", engine, _model_label(persona.model, engine), reason)
    return replace(options, engine=engine)


def _model_label(model: str, engine: str) -> str:
    """How the log names a model that --model left out."""
    if model:
        return model
    return "the model the server offers" if engine == "openai" else "the embedded model"


def _open(options: EngineOptions, personas: list[Persona]) -> ChatModel:
    names = ", ".join(persona.name for persona in personas)
    log.info("Loading %s for %s on the %s engine", _model_label(personas[0].model, options.engine), names,
             options.engine)
    model = open_chat_model(options.engine, options)
    return SharedChatModel(model) if len(personas) > 1 else model


async def _take_part(participants: list[ModelParticipant], models: set[ChatModel],
                     idle: list[IdlePrefill]) -> list[tuple[str, BaseException]]:
    try:
        return await run_cast(participants)
    finally:
        for prefill in idle:
            await prefill.aclose()
        for model in models:
            await model.aclose()
