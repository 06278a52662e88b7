"""The transformers engine: a model loaded in this process by ``partychat.models.load``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..models import LoadedModel
from .base import ChatRequest, ModelError, SystemRoleUnsupported, ThreadedChatModel, plain_transcript


class TransformersChatModel(ThreadedChatModel):
    engine = "transformers"

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__(loaded.source.label)
        self.loaded = loaded

    def prompt_tokens(self, request: ChatRequest) -> list[int]:
        """By the model's own chat template when it has one, else a plain transcript."""
        tokenizer = self.loaded.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            return list(tokenizer(plain_transcript(request))["input_ids"])
        messages = list(request.messages)
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as error:
            if messages[0]["role"] == "system" and "system" in str(error).lower():
                raise SystemRoleUnsupported(f"The chat template of {self.label} has no system role.") from error
            raise ModelError(f"The chat template of {self.label} cannot render this chat: {error}") from error
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def generate(self, request: ChatRequest, should_stop: Callable[[], bool], emit: Callable[[str], None]) -> None:
        import torch
        from transformers import StoppingCriteriaList, TextStreamer

        class Forward(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text:
                    emit(text)

        def stop_when_told(input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), should_stop(), dtype=torch.bool, device=input_ids.device)

        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        input_ids = torch.tensor([self.prompt_tokens(request)], device=model.device)
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": request.temperature, "top_p": 0.9, "repetition_penalty": 1.1}
            if request.temperature > 0
            else {"do_sample": False}
        )
        with torch.inference_mode():
            model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=request.max_tokens,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                stopping_criteria=StoppingCriteriaList([stop_when_told]),
                streamer=Forward(tokenizer, skip_prompt=True, skip_special_tokens=True),
                **sampling,
            )
