"""Fetching a model from the Hugging Face Hub into its normal cache, before the persona joins the room.

huggingface_hub does the transfer (its progress bars, its cache under ``HF_HOME``, its retries);
this module decides which files a chat model needs, and turns the library's exceptions into
sentences a user can act on. Downloading first means a long download never holds a turn.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .models import ModelError, ModelSource

log = logging.getLogger("partychat.engines.downloads")

WANTED_SUFFIXES = (".json", ".safetensors", ".model", ".txt", ".tiktoken", ".jinja")
"""Top-level files a transformers causal LM may need: config, weights, tokenizer, chat template."""
PICKLED_WEIGHTS = ".bin"
"""Fetched only for repos that have no .safetensors weights."""


class HubUnreachable(ModelError):
    """The Hub could not be reached and the model is not in the cache."""


class UnknownModel(ModelError):
    """The Hub has no model by that name (or it is private)."""


class GatedModel(ModelError):
    """The model exists but needs an accepted licence and a token."""


class NotALanguageModel(ModelError):
    """The repo exists but holds no causal language model transformers can load."""


class NotCached(ModelError):
    """Offline, and the model is not (wholly) in the local cache."""


def fetch(source: ModelSource, *, offline: bool) -> ModelSource:
    """A hub source becomes a folder in the HF cache, downloading what is missing unless offline.

    Other sources are returned as they are. Raises a ModelError subclass with advice.
    """
    if source.kind != "hub":
        return source
    repo_id = source.location
    folder = cached_folder(repo_id)
    if offline:
        if folder is None:
            raise NotCached(
                f"The model {repo_id!r} is not in the local Hugging Face cache ({cache_dir()}), and offline mode "
                "(--offline or HF_HUB_OFFLINE=1) forbids downloading it; run once without it to download the model, "
                "or pass a local folder or .gguf file with --model."
            )
        return ModelSource("folder", str(folder))
    try:
        folder = download(repo_id)
    except HubUnreachable:
        if folder is None:
            raise
        log.warning("The Hugging Face Hub could not be reached; using the copy of %s already in the cache", repo_id)
    return ModelSource("folder", str(folder))


def hub_offline() -> bool:
    """True when the user asked for no network: --offline, or HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set."""
    from huggingface_hub import constants

    return constants.is_offline_mode()


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_folder(repo_id: str) -> Path | None:
    """The cached snapshot of the repo's default branch, if it holds a config and all its weights."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(config, str):
        return None
    folder = Path(config).parent
    return folder if _weights_complete(folder) else None


def _weights_complete(folder: Path) -> bool:
    """Every weight file present, including every shard a sharded checkpoint's index names."""
    for index in (*folder.glob("*.safetensors.index.json"), *folder.glob("*.bin.index.json")):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            return False
        if all((folder / shard).is_file() for shard in shards):
            return True
    return any(folder.glob("*.safetensors")) or any(folder.glob(f"*{PICKLED_WEIGHTS}"))


def files_to_fetch(repo_id: str, names: list[str]) -> list[str]:
    """The top-level files a chat model needs: safetensors weights when there are any, else pickled ones."""
    top = [name for name in names if "/" not in name]
    if "config.json" not in top:
        raise NotALanguageModel(
            f"The Hub repo {repo_id!r} has no config.json, so it is not a transformers model; "
            "if it holds a .gguf file, download that file and pass its path with --model."
        )
    safetensors = any(name.endswith(".safetensors") for name in top)
    suffixes = WANTED_SUFFIXES if safetensors else (*WANTED_SUFFIXES, PICKLED_WEIGHTS)
    wanted = [name for name in top if name.endswith(suffixes)]
    if not any(name.endswith((".safetensors", PICKLED_WEIGHTS)) for name in wanted):
        raise NotALanguageModel(f"The Hub repo {repo_id!r} has a config.json but no model weights.")
    return wanted


def check_causal_lm(repo_id: str, config: dict[str, Any]) -> None:
    """Refuse repos whose config names no architecture AutoModelForCausalLM can build."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (not architectures or causal.intersection(architectures)):
        return
    what = f"{', '.join(architectures)}" if architectures else f"model type {model_type or 'unknown'}"
    raise NotALanguageModel(
        f"The Hub repo {repo_id!r} holds a {what}, not a causal language model that writes text; "
        "pick a text-generation model."
    )


def download(repo_id: str) -> Path:
    """Download the files a chat model needs into the HF cache (resuming finished files) and return the folder."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    with _explained(repo_id):
        info = HfApi().model_info(repo_id)
        names = [sibling.rfilename for sibling in info.siblings or []]
        wanted = files_to_fetch(repo_id, names)
        config_path = hf_hub_download(repo_id, "config.json")
        check_causal_lm(repo_id, _read_config(Path(config_path)))
        log.info("Downloading %s from the Hugging Face Hub into %s (if not there yet)", repo_id, cache_dir())
        return Path(snapshot_download(repo_id, allow_patterns=wanted))


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise NotALanguageModel(f"The config.json of the model could not be read: {error}") from error
    return config if isinstance(config, dict) else {}


@contextlib.contextmanager
def _explained(repo_id: str) -> Iterator[None]:
    """Turns huggingface_hub's exceptions into ours, each one sentence that names the model."""
    try:
        yield
    except ModelError:
        raise
    except Exception as error:
        raise _translate(repo_id, error) from error


def _translate(repo_id: str, error: Exception) -> ModelError:
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(error, GatedRepoError):
        return GatedModel(
            f"The model {repo_id!r} is gated: accept its licence on its Hugging Face page, then log in with "
            "`hf auth login` or set HF_TOKEN, and start again."
        )
    if isinstance(error, (RepositoryNotFoundError, RevisionNotFoundError)):
        return UnknownModel(
            f"There is no model called {repo_id!r} on the Hugging Face Hub (or it is private: log in with "
            "`hf auth login` or set HF_TOKEN); check the spelling, or pass a local folder or .gguf file."
        )
    if isinstance(error, HFValidationError):
        return UnknownModel(f"{repo_id!r} is not a valid Hugging Face model id ({_reason(error)}).")
    if isinstance(error, (httpx2.TransportError, LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return HubUnreachable(
            f"The Hugging Face Hub could not be reached to download {repo_id!r} ({_reason(error)}); "
            "pass a local folder or .gguf file with --model, or run once online to download it into the cache."
        )
    if isinstance(error, HfHubHTTPError):
        return HubUnreachable(
            f"The Hugging Face Hub could not deliver {repo_id!r} (HTTP {error.response.status_code}); "
            "try again later, or pass a local folder or .gguf file with --model."
        )
    return ModelError(f"Downloading {repo_id!r} failed: {_reason(error)}")


def _reason(error: BaseException) -> str:
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
