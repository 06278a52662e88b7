"""The engines a persona's model can run on (``--engine``): one entry each, and picking one for ``auto``.

Each ``Engine`` knows its name, whether it is installed, what to install when it is not, and how
to open a model; the engine's own module (and the packages it needs) is imported only when a
model is opened on it. ``auto`` picks the OpenAI-compatible engine when a server address is given,
llama.cpp for a GGUF file when llama-cpp-python is installed (it runs GGUF as is, and faster on a
CPU), and transformers otherwise.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import models
from .base import ChatModel, EngineNotInstalled


@dataclass(frozen=True)
class EngineOptions:
    """What client.py's flags say about the model and how to run it."""

    engine: str = "auto"
    model: str = ""
    device: str = "cpu"
    gpu_id: int = 0
    dtype: str = "auto"
    speedups: bool = True
    threads: int | None = None
    context_tokens: int = 2048
    api_base: str | None = None
    api_key: str | None = None
    cache_mb: int = 0
    """Memory for the speakers' own caches on the in-process engines; 0 keeps none (llama.cpp: one cache all
    speakers share; transformers: every turn cold)."""


def default_threads() -> int:
    """One thread per core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class Engine:
    """One way to run a model: what ``--engine`` calls it, and everything needed before a model opens on it."""

    name: str
    installed: Callable[[], bool]
    """Whether its packages import here (cheap enough to ask before every open)."""
    install_hint: str
    """One sentence for the user: what to pip install, when ``installed`` says no."""
    open: Callable[[EngineOptions], ChatModel]
    """Load a model (blocking); called only once ``installed`` said yes."""


def _imports(*modules: str) -> Callable[[], bool]:
    def installed() -> bool:
        try:
            for module in modules:
                importlib.import_module(module)
        except (ImportError, OSError):  # a broken install (say, its shared library missing) counts as none
            return False
        return True

    return installed


def _found(*modules: str) -> Callable[[], bool]:
    """Installed, judged without importing: torch takes seconds to import, and the open imports it anyway."""
    return lambda: all(importlib.util.find_spec(module) is not None for module in modules)


def _open_transformers(options: EngineOptions) -> ChatModel:
    import torch

    from .transformers_engine import TransformersChatModel

    if options.threads:
        torch.set_num_threads(options.threads)
    return TransformersChatModel(models.load(models.resolve(options.model), device=options.device,
                                             gpu_id=options.gpu_id, dtype=options.dtype, speedups=options.speedups),
                                 cache_bytes=options.cache_mb << 20)


def _open_llama_cpp(options: EngineOptions) -> ChatModel:
    from .llama_cpp_engine import LlamaCppChatModel

    return LlamaCppChatModel(Path(models.resolve(options.model).location), context_tokens=options.context_tokens,
                             threads=options.threads or default_threads(), device=options.device,
                             gpu_id=options.gpu_id, cache_bytes=options.cache_mb << 20)


def _open_openai(options: EngineOptions) -> ChatModel:
    from .openai_engine import OpenAIChatModel

    return OpenAIChatModel(base_url=options.api_base or "", model=options.model, api_key=options.api_key)


ENGINES: dict[str, Engine] = {engine.name: engine for engine in (
    Engine("transformers", _found("torch", "transformers"),
           "The transformers engine needs torch and transformers: install them with "
           "'pip install -r requirements.txt'.",
           _open_transformers),
    Engine("llama.cpp", _imports("llama_cpp"),
           "The llama.cpp engine needs llama-cpp-python: install it with "
           "'pip install llama-cpp-python==0.3.36' (it builds from source in a few minutes and needs cmake and a "
           "C++ compiler), or choose --engine transformers.",
           _open_llama_cpp),
    Engine("openai", _imports("openai"),
           "The openai engine needs the openai package: install it with 'pip install \"openai>=3.50,<4\"'.",
           _open_openai),
)}
ENGINE_CHOICES = ("auto", *ENGINES)
"""What --engine and a cast's ``engine`` accept."""


def pick_engine(options: EngineOptions) -> tuple[str, str]:
    """The engine to use and why, in words for the log. Raises ModelError for a model that cannot be found."""
    if options.engine != "auto":
        return options.engine, "--engine asked for it"
    if options.api_base:
        return "openai", "--api-base was given"
    source = models.resolve(options.model)
    if source.kind != "gguf":
        return "transformers", f"{source.label} is a transformers model folder"
    if ENGINES["llama.cpp"].installed():
        return "llama.cpp", f"{source.label} is a GGUF file and llama-cpp-python is installed"
    return "transformers", (f"{source.label} is a GGUF file but llama-cpp-python is not installed "
                            "(pip install llama-cpp-python==0.3.36 runs it faster, without conversion)")


def open_chat_model(engine: str, options: EngineOptions) -> ChatModel:
    """Load the model on the engine picked. Blocking; raises ModelError (EngineNotInstalled) with advice."""
    chosen = ENGINES[engine]
    if not chosen.installed():
        raise EngineNotInstalled(chosen.install_hint)
    return chosen.open(options)
