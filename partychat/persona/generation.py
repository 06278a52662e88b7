"""Turning room history into chat messages that fit the model, and raw model text into a clean reply.

This is the part of a persona every engine shares; engines only count tokens and stream text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..engines.anticopy import DEFAULT_N, AntiCopy
from ..engines.base import ChatModel, ChatRequest, PromptTooLong, SystemRoleUnsupported
from ..protocol import Chat, Role
from .lorebook import LORE_ROLE, Lore


@dataclass(frozen=True)
class GenerationSettings:
    temperature: float = 0.7
    max_new_tokens: int = 100
    max_context_tokens: int = 2048
    auto_truncate: bool = True
    history_length: int = 5
    anti_copy: bool = True
    """Never continue a word n-gram of the other messages in the prompt (see engines/anticopy.py)."""
    anti_copy_n: int = DEFAULT_N
    anti_copy_unit: str = "words"
    seed: int | None = None
    """The sampling seed; None leaves it random. Retries set a new one each (see persona/retries.py)."""
    no_label: bool = False
    """The reply may not open with a speaker label (a retry's, see persona/retries.py)."""


ANTI_COPY_MODERATOR = False
"""Whether a moderator's lines are among those a reply must not copy: no, since restating the question
is natural and keeps a reply on topic (bench/README.md has the figures both ways)."""


GROUP_CHAT_RULES = "This is a group chat. You speak only as {name}. Reply in one to three sentences."


def build_messages(persona: str, name: str, history: Sequence[Chat]) -> list[dict[str, str]]:
    """Chat turns from the model's point of view: its own lines are assistant turns."""
    system = f"{persona.strip()}\n\n{GROUP_CHAT_RULES.format(name=name)}".strip()
    turns: list[dict[str, str]] = []
    for chat in history:
        lore = chat.role == LORE_ROLE  # a lorebook entry placed among the messages (see PromptExtras)
        own = chat.sender == name and not lore
        role = "assistant" if own else "user"
        text = chat.content if own or lore else f"{chat.sender}: {chat.content}"
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n" + text
        else:
            turns.append({"role": role, "content": text})
    if not turns or turns[0]["role"] != "user":
        turns.insert(0, {"role": "user", "content": "(The conversation begins.)"})
    if turns[-1]["role"] != "user":
        turns.append({"role": "user", "content": "(Continue the conversation.)"})
    return [{"role": "system", "content": system}, *turns]


async def build_request(
    model: ChatModel, persona: str, name: str, history: Sequence[Chat], settings: GenerationSettings,
    extras: PromptExtras | None = None,
) -> ChatRequest:
    """The longest recent history that fits the token budget; oldest turns go first, the persona never.

    A model whose chat template has no system role gets the persona in its first user turn.
    ``extras`` (a card's example dialogue, lore) give way before any history does.
    """
    budget = settings.max_context_tokens - settings.max_new_tokens
    recent = list(history)[-settings.history_length:] if settings.history_length > 0 else []
    extras = extras or PromptExtras()
    fold_persona = False
    while True:
        messages = extras.with_after_history(build_messages(extras.with_examples(persona), name,
                                                            extras.with_lore(recent)))
        if fold_persona:
            system, first, *rest = messages
            messages = [{"role": "user", "content": f"{system['content']}\n\n{first['content']}"}, *rest]
        request = ChatRequest(tuple(messages), name, settings.temperature, settings.max_new_tokens,
                              anti_copy=anti_copy_for(recent, settings), seed=settings.seed)
        try:
            size = await model.count_tokens(request)
        except SystemRoleUnsupported:
            if fold_persona:
                raise
            fold_persona = True
            continue
        if size <= budget:
            return request
        if (smaller := extras.smaller(recent)) is not None:
            extras = smaller
            continue
        if not settings.auto_truncate:
            raise PromptTooLong(
                f"The prompt needs {size} tokens but only {budget} fit "
                f"(--max-context-tokens {settings.max_context_tokens} minus --max-generation-tokens "
                f"{settings.max_new_tokens}); shorten the persona or history, or drop --no-auto-truncate."
            )
        if len(recent) > 1:
            recent.pop(0)
            continue
        if recent and len(recent[0].content) > 1:
            last = recent[0]
            keep = max(1, len(last.content) * budget // (2 * size))
            recent = [Chat(**{**last.__dict__, "content": last.content[-keep:]})]
            continue
        raise PromptTooLong(
            f"The persona alone needs {size} tokens, more than the {budget} the context allows; "
            "raise --max-context-tokens or shorten the persona."
        )


@dataclass(frozen=True)
class PromptExtras:
    """What a character card and lorebooks add to a persona's prompt (persona/cards.py, persona/lorebook.py).

    ``examples`` (example dialogue) follows the persona in the system turn; ``after_history`` (a
    card's post-history instructions) follows the newest message, as a fixed tail like the
    generation prompt; ``lore`` places lorebook entries among the messages (see ``Lore`` for where,
    and why that keeps the prompt append-only). When the prompt is too long, the examples go first,
    then lore entries one by one, and only then history.
    """

    examples: str = ""
    after_history: str = ""
    lore: Lore | None = None

    def with_examples(self, persona: str) -> str:
        return f"{persona.strip()}\n\n{self.examples}" if self.examples else persona

    def with_lore(self, recent: list[Chat]) -> list[Chat]:
        return self.lore.interleave(recent) if self.lore is not None else recent

    def with_after_history(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        if self.after_history:  # build_messages always ends on a user turn
            messages[-1] = {**messages[-1], "content": f"{messages[-1]['content']}\n\n{self.after_history}"}
        return messages

    def smaller(self, recent: list[Chat]) -> PromptExtras | None:
        """These extras less the part that gives way first; None when nothing is left to give."""
        if self.examples:
            return replace(self, examples="")
        lore = self.lore.smaller(recent) if self.lore is not None else None
        return replace(self, lore=lore) if lore is not None else None


def anti_copy_for(recent: Sequence[Chat], settings: GenerationSettings) -> AntiCopy | None:
    """What the reply must not copy: every message of the prompt's window (its own earlier ones too,
    which the hub's repeat guard would withhold just the same), the moderator's unless
    ANTI_COPY_MODERATOR. Unless it is, the moderator's phrases stay allowed even where another
    speaker repeated them: restating the question keeps a reply on topic."""
    if not settings.anti_copy:
        return None
    moderator = tuple(chat.content for chat in recent if chat.role == Role.HUMAN.value)
    avoid = tuple(chat.content for chat in recent if ANTI_COPY_MODERATOR or chat.role != Role.HUMAN.value)
    return AntiCopy(avoid, settings.anti_copy_n, settings.anti_copy_unit, () if ANTI_COPY_MODERATOR else moderator,
                    settings.no_label)


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
