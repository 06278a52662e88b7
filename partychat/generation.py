"""Turning room history into a prompt, and a prompt into a cleaned reply.

``generate_reply`` blocks: callers run it in a worker thread. It streams text through a callback
and stops between two tokens when its ``threading.Event`` is set.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .models import LoadedModel
from .protocol import Chat


class PromptTooLong(Exception):
    """The prompt does not fit the context window and truncation is off."""


@dataclass(frozen=True)
class GenerationSettings:
    temperature: float = 0.7
    max_new_tokens: int = 100
    max_context_tokens: int = 2048
    auto_truncate: bool = True
    history_length: int = 5


GROUP_CHAT_RULES = "This is a group chat. You speak only as {name}. Reply in one to three sentences."


def build_messages(persona: str, name: str, history: Sequence[Chat]) -> list[dict[str, str]]:
    """Chat turns from the model's point of view: its own lines are assistant turns."""
    system = f"{persona.strip()}\n\n{GROUP_CHAT_RULES.format(name=name)}".strip()
    turns: list[dict[str, str]] = []
    for chat in history:
        own = chat.sender == name
        role = "assistant" if own else "user"
        text = chat.content if own else f"{chat.sender}: {chat.content}"
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n" + text
        else:
            turns.append({"role": role, "content": text})
    if not turns or turns[0]["role"] != "user":
        turns.insert(0, {"role": "user", "content": "(The conversation begins.)"})
    if turns[-1]["role"] != "user":
        turns.append({"role": "user", "content": "(Continue the conversation.)"})
    return [{"role": "system", "content": system}, *turns]


def _render(tokenizer: Any, messages: list[dict[str, str]], name: str) -> list[int]:
    """Token ids for the messages, by the model's own chat template when it has one."""
    template = getattr(tokenizer, "chat_template", None)
    if template:
        try:
            return _apply_template(tokenizer, messages)
        except Exception as error:
            if "system" not in str(error).lower():
                raise
        # Some templates (Gemma's, for one) have no system role: fold the persona into the first turn.
        system, first, *rest = messages
        merged = {"role": "user", "content": f"{system['content']}\n\n{first['content']}"}
        return _apply_template(tokenizer, [merged, *rest])
    lines = [messages[0]["content"], ""]
    for message in messages[1:]:
        lines.append(message["content"] if message["role"] == "user" else f"{name}: {message['content']}")
    lines.append(f"{name}:")
    return list(tokenizer("\n".join(lines))["input_ids"])


def _apply_template(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def build_prompt(
    tokenizer: Any, persona: str, name: str, history: Sequence[Chat], settings: GenerationSettings
) -> list[int]:
    """The longest recent history that fits the token budget; oldest turns go first, the persona never."""
    budget = settings.max_context_tokens - settings.max_new_tokens
    recent = list(history)[-settings.history_length:] if settings.history_length > 0 else []
    while True:
        ids = _render(tokenizer, build_messages(persona, name, recent), name)
        if len(ids) <= budget:
            return ids
        if not settings.auto_truncate:
            raise PromptTooLong(
                f"The prompt needs {len(ids)} tokens but only {budget} fit "
                f"(--max-context-tokens {settings.max_context_tokens} minus --max-generation-tokens "
                f"{settings.max_new_tokens}); shorten the persona or history, or drop --no-auto-truncate."
            )
        if len(recent) > 1:
            recent.pop(0)
            continue
        if recent and len(recent[0].content) > 1:
            last = recent[0]
            keep = max(1, len(last.content) * budget // (2 * len(ids)))
            recent = [Chat(**{**last.__dict__, "content": last.content[-keep:]})]
            continue
        raise PromptTooLong(
            f"The persona alone needs {len(ids)} tokens, more than the {budget} the context allows; "
            "raise --max-context-tokens or shorten the persona."
        )


def speaker_line_pattern(names: Sequence[str]) -> re.Pattern[str]:
    """Where a model starts writing someone else's turn: a line that opens with 'Name:'."""
    generic = ["user", "assistant", "system", "moderator"]
    alternatives = "|".join(re.escape(n) for n in sorted({*names, *generic}, key=len, reverse=True) if n)
    return re.compile(rf"(?:^|\n)\s*(?:{alternatives})\s*:", re.IGNORECASE)


SENTENCE_END = re.compile(r"[.!?…](?:[\"')\]*]*)(?=\s)")


def _own_lines(text: str, name: str, others: Sequence[str]) -> str:
    """The text without our own 'Name:' prefix and without anything from another speaker's line on."""
    text = text.strip()
    own_prefix = re.compile(rf"^\s*\**{re.escape(name)}\**\s*:\s*", re.IGNORECASE)
    while own_prefix.match(text):
        text = own_prefix.sub("", text, count=1)
    cut = speaker_line_pattern([n for n in others if n.casefold() != name.casefold()]).search(text)
    return text[: cut.start()].strip() if cut else text


def clean_reply(text: str, name: str, others: Sequence[str]) -> str:
    """Strip our own name prefix, cut at another speaker's turn, end at a full sentence. May return ''."""
    return drop_unfinished_sentence(_own_lines(text, name, others))


def drop_unfinished_sentence(text: str) -> str:
    """A reply cut off by the token limit ends at its last full sentence, if it has one."""
    if not text or text[-1] in ".!?…\"')]*":
        return text
    ends = [m.end() for m in SENTENCE_END.finditer(text)]
    return text[: ends[-1]].strip() if ends else text


class ReplyStream:
    """Cleans a reply while it is generated: the pieces it lets out add up to the final clean reply.

    Only whole sentences leave, so nothing streamed is later taken back by the cleaning: not our
    own name prefix, not another speaker's line, not an unfinished last sentence.
    """

    def __init__(self, name: str, others: Sequence[str]) -> None:
        self.name = name
        self.others = list(others)
        self.raw = ""
        self.sent = ""

    def feed(self, piece: str) -> str:
        """Add raw generated text; return the clean text that may be streamed now (often '')."""
        self.raw += piece
        text = _own_lines(self.raw, self.name, self.others)
        ends = [m.end() for m in SENTENCE_END.finditer(text)]
        safe = text[: ends[-1]] if ends else ""
        if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
            return ""
        piece, self.sent = safe[len(self.sent):], safe
        return piece

    def rest(self, final: str) -> str | None:
        """What remains to stream so the pieces equal ``final``; None if they cannot."""
        return final[len(self.sent):] if final.startswith(self.sent) else None


class _StopWhenSet:
    """A stopping criterion the event loop can trip between two tokens."""

    def __init__(self, flag: threading.Event) -> None:
        self.flag = flag

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.flag.is_set(), dtype=torch.bool, device=input_ids.device)


def generate_reply(
    loaded: LoadedModel,
    prompt_ids: list[int],
    settings: GenerationSettings,
    *,
    stop: threading.Event,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """Generate (blocking) and return the raw reply text; stops early once ``stop`` is set."""
    import torch
    from transformers import StoppingCriteriaList, TextStreamer

    class _Forward(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text and on_text is not None:
                on_text(text)

    tokenizer = loaded.tokenizer
    input_ids = torch.tensor([prompt_ids], device=loaded.model.device)
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": settings.temperature, "top_p": 0.9, "repetition_penalty": 1.1}
        if settings.temperature > 0
        else {"do_sample": False}
    )
    with torch.inference_mode():
        output = loaded.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=settings.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop)]),
            streamer=_Forward(tokenizer, skip_prompt=True, skip_special_tokens=True),
            **sampling,
        )
    return tokenizer.decode(output[0][len(prompt_ids):], skip_special_tokens=True)
