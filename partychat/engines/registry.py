"""Which engine runs a persona's model (``--backend``), and opening it.

``auto`` picks the OpenAI-compatible engine when a server address is given, llama.cpp for a GGUF
file when llama-cpp-python is installed (it runs GGUF as is, and faster on a CPU), and
transformers otherwise.

The OpenAI-compatible engine lives in ``openai_engine.py`` as ``OpenAIChatModel(base_url=...,
model=..., api_key=...)``; importing that module imports the openai package.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from . import models
from .base import ChatModel, EngineNotInstalled
from .llama_cpp_engine import INSTALL_HINT as LLAMA_CPP_HINT
from .llama_cpp_engine import llama_cpp_installed

BACKENDS = ("auto", "transformers", "llama.cpp", "openai")
OPENAI_HINT = "The openai engine needs the openai package: install it with 'pip install \"openai>=3.50,<4\"'."
TRANSFORMERS_HINT = ("The transformers engine needs torch and transformers: install them with "
                     "'pip install -r requirements.txt'.")


@dataclass(frozen=True)
class EngineOptions:
    """What client.py's flags say about the model and how to run it."""

    backend: str = "auto"
    model: str = ""
    device: str = "cpu"
    gpu_id: int = 0
    dtype: str = "auto"
    speedups: bool = True
    threads: int | None = None
    context_tokens: int = 2048
    api_base: str | None = None
    api_key: str | None = None


def default_threads() -> int:
    """One thread per core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pick_backend(options: EngineOptions) -> tuple[str, str]:
    """The engine to use and why, in words for the log. Raises ModelError for a model that cannot be found."""
    if options.backend != "auto":
        return options.backend, "--backend asked for it"
    if options.api_base:
        return "openai", "--api-base was given"
    source = models.resolve(options.model)
    if source.kind != "gguf":
        return "transformers", f"{source.label} is a transformers model folder"
    if llama_cpp_installed():
        return "llama.cpp", f"{source.label} is a GGUF file and llama-cpp-python is installed"
    return "transformers", (f"{source.label} is a GGUF file but llama-cpp-python is not installed "
                            "(pip install llama-cpp-python==0.3.36 runs it faster, without conversion)")


def open_chat_model(engine: str, options: EngineOptions) -> ChatModel:
    """Load the model on the engine picked. Blocking; raises ModelError (EngineNotInstalled) with advice."""
    threads = options.threads or default_threads()
    if engine == "openai":
        try:  # the module imports the openai package
            from .openai_engine import OpenAIChatModel
        except ImportError as error:
            raise EngineNotInstalled(OPENAI_HINT) from error
        return OpenAIChatModel(base_url=options.api_base or "", model=options.model, api_key=options.api_key)
    source = models.resolve(options.model)
    if engine == "llama.cpp":
        if not llama_cpp_installed():
            raise EngineNotInstalled(LLAMA_CPP_HINT)
        from .llama_cpp_engine import LlamaCppChatModel

        return LlamaCppChatModel(Path(source.location), context_tokens=options.context_tokens, threads=threads,
                                 device=options.device, gpu_id=options.gpu_id)
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        raise EngineNotInstalled(TRANSFORMERS_HINT)
    import torch

    from .transformers_engine import TransformersChatModel

    if options.threads:
        torch.set_num_threads(threads)
    return TransformersChatModel(models.load(source, device=options.device, gpu_id=options.gpu_id,
                                             dtype=options.dtype, speedups=options.speedups))
