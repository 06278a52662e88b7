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
    max_tokens: int = 100
    max_context_tokens: int = 2048
    auto_truncate: bool = True
    history_length: int = 5
    anti_copy: bool = True
    """Never continue a word n-gram of the other messages in the prompt (see engines/anticopy.py)."""
    anti_copy_n: int = DEFAULT_N
    anti_copy_unit: str = "words"
    seed: int | None = None
    """The sampling seed; None leaves it random. Retries set a new one each (see persona/retries.py)."""
    no_label: bool = True
    """The reply may not open with a speaker label ("Name: ..."). On from the first attempt: chat turns
    written as "Name: text" lead models to open their own reply that way, and the hub withholds a line
    written as someone else, so every such attempt cost a whole retry (bench/README.md)."""


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
        text = chat.content if own or lore else f"{chat.sender}{_privately(chat, name)}: {chat.content}"
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n" + text
        else:
            turns.append({"role": role, "content": text})
    if not turns or turns[0]["role"] != "user":
        turns.insert(0, {"role": "user", "content": "(The conversation begins.)"})
    if turns[-1]["role"] != "user":
        turns.append({"role": "user", "content": "(Continue the conversation.)"})
    if (topic := _topic_note(history, name)) is not None:
        turns[-1] = {**turns[-1], "content": f"{turns[-1]['content']}\n\n{topic}"}
    return [{"role": "system", "content": system}, *turns]


def _topic_note(history: Sequence[Chat], name: str) -> str | None:
    """The moderator's latest line again, after the newest message, once others have spoken since.

    Models answer what is nearest the end of their prompt: without this, each reply answers the one
    before it and a few turns on the room has left the question behind. It is a tail, like the
    generation prompt, so the prompt before it stays append-only (issue 18's caches).
    """
    latest = latest_human_line(history)
    if latest is None or latest is history[-1] or latest.sender == name:
        return None
    return topic_note(latest)


def topic_note(line: Chat) -> str:
    """How a human's line reads as the topic note: written once here, also for what a test allows for it."""
    return f'{TOPIC_NOTE_OPENING}{line.sender} put it: "{line.content}")'


TOPIC_NOTE_OPENING = "(The topic, as "
TOPIC_NOTE_ECHO = re.compile(rf"(?:^|\n)\s*{re.escape(TOPIC_NOTE_OPENING)}")
"""A model that writes the note out again has left its own reply: it is cut there, like another speaker's line."""


def _privately(chat: Chat, name: str) -> str:
    """A whisper is marked as one, so the persona can tell what the others did not hear and keep it."""
    if not chat.whisper:
        return ""
    others = [who for who in chat.recipients or () if who.casefold() not in (name.casefold(), chat.sender.casefold())]
    return f" (privately, to you and {', '.join(others)})" if others else " (privately, to you only)"


def chunk_size(history_length: int) -> int:
    """How many messages leave the window at once: about half of ``--history-length``.

    The window then grows from ``history_length - chunk + 1`` to ``history_length`` messages and is
    cut back in one go, so consecutive prompts share everything but their new tail (issue 18).
    """
    return max(1, (history_length + 1) // 2)


def message_keys(history: Sequence[Chat]) -> list[int]:
    """Where each message stands in the room, the same for every persona: the hub's sequence numbers.

    A ``/retry`` replacement keeps its place but carries a newer number, so each key is the smallest
    number from that message on (the keys never go down). A hub that numbers nothing (the original
    project's) leaves positions in this history, which stay put only until the persona's memory is full.
    """
    if not history or any(chat.seq <= 0 for chat in history):
        return list(range(1, len(history) + 1))
    keys, low = [0] * len(history), history[-1].seq
    for index in range(len(history) - 1, -1, -1):
        low = min(low, history[index].seq)
        keys[index] = low
    return keys


def window_start(newest: int, history_length: int, chunk: int) -> int:
    """The smallest key of the window: on the chunk grid, and no more than ``history_length`` back."""
    return -(-(newest - history_length + 1) // chunk) * chunk


def latest_human_line(earlier: Sequence[Chat]) -> Chat | None:
    """The latest line a human (the moderator) said in ``earlier``, if any: the question a prompt keeps in view."""
    return next((chat for chat in reversed(earlier) if chat.role == Role.HUMAN.value), None)


@dataclass(frozen=True)
class Window:
    """The messages a prompt shows: a human's latest line kept in view, then the recent history."""

    pinned: Chat | None
    recent: list[Chat]

    @property
    def messages(self) -> list[Chat]:
        return [self.pinned, *self.recent] if self.pinned is not None else list(self.recent)


def prompt_window(history: Sequence[Chat], history_length: int, start: int | None = None) -> Window:
    """The window of ``history`` a prompt shows: a pure function of the history, so every persona and
    every later prompt (and a prefill ahead of the turn) agree on where it starts.

    The start moves only in chunks (``chunk_size``), never one message per turn, and at most
    ``history_length`` messages are in it; ``start`` (a key, see ``message_keys``) moves it further on,
    as the token budget does. The moderator's latest line, once the window has moved past it, is placed
    first: it stays unchanged until a newer human line or the next cut, so the prompt stays append-only.
    """
    if history_length <= 0 or not history:
        return Window(None, [])
    keys = message_keys(history)
    start = max(window_start(keys[-1], history_length, chunk_size(history_length)), start or 0)
    first = next((i for i, key in enumerate(keys) if key >= start), len(history))
    first = max(first, len(history) - history_length)  # tied keys after a /retry: N stays the maximum
    recent = list(history[first:])
    newer_question = any(chat.role == Role.HUMAN.value for chat in recent)
    return Window(None if newer_question else latest_human_line(history[:first]), recent)


async def build_request(
    model: ChatModel, persona: str, name: str, history: Sequence[Chat], settings: GenerationSettings,
    extras: PromptExtras | None = None,
) -> ChatRequest:
    """The recent history (``prompt_window``) that fits the token budget; the persona never goes.

    Over the budget, ``extras`` (a card's example dialogue, lore) give way first, then the history,
    cut in chunks like the window itself (halved when a whole chunk is more than is left), so that
    later prompts stay append-only after a budget cut too; then the moderator's pinned line; last,
    the one message left is shortened from its start.
    A model whose chat template has no system role gets the persona in its first user turn.
    """
    budget = settings.max_context_tokens - settings.max_tokens
    window = prompt_window(history, settings.history_length)
    shown = window.messages
    keys = message_keys(history)
    step = chunk_size(settings.history_length)
    start = window_start(keys[-1], settings.history_length, step) if keys else 0
    extras = extras or PromptExtras()
    fold_persona = False
    while True:
        messages = extras.with_after_history(build_messages(extras.with_examples(persona), name,
                                                            extras.with_lore(shown)))
        if fold_persona:
            system, first, *rest = messages
            messages = [{"role": "user", "content": f"{system['content']}\n\n{first['content']}"}, *rest]
        request = ChatRequest(tuple(messages), name, settings.temperature, settings.max_tokens,
                              anti_copy=anti_copy_for(shown, settings), seed=settings.seed)
        try:
            size = await model.count_tokens(request)
        except SystemRoleUnsupported:
            if fold_persona:
                raise
            fold_persona = True
            continue
        if size <= budget:
            return request
        if (smaller := extras.smaller(shown)) is not None:
            extras = smaller
            continue
        if not settings.auto_truncate:
            raise PromptTooLong(
                f"The prompt needs {size} tokens but only {budget} fit "
                f"(--max-context-tokens {settings.max_context_tokens} minus --max-generation-tokens "
                f"{settings.max_tokens}); shorten the persona or history, or drop --no-auto-truncate."
            )
        if len(window.recent) > 1:
            while start + step > keys[-1] and step > 1:
                step = (step + 1) // 2
            if start + step <= keys[-1]:
                start += step
                window = prompt_window(history, settings.history_length, start)
                shown = window.messages
                continue
        if len(shown) > 1:
            shown.pop(0)  # the pinned line, or a message in a gap of the keys
            continue
        if shown and len(shown[0].content) > 1:
            last = shown[0]
            keep = max(1, len(last.content) * budget // (2 * size))
            shown = [Chat(**{**last.__dict__, "content": last.content[-keep:]})]
            continue
        raise PromptTooLong(
            f"The persona alone needs {size} tokens, more than the {budget} the context allows; "
            "raise --max-context-tokens or shorten the persona."
        )


UNSAID = "Xunsaidx"
"""Stands in for the first line of a room nobody has spoken in yet; it starts with a letter, like a name."""


async def opening_request(model: ChatModel, persona: str, name: str, settings: GenerationSettings,
                          extras: PromptExtras | None = None) -> ChatRequest:
    """A persona's first prompt as far as it is known before anyone has spoken: ``build_request`` with a
    stand-in first line, marked (``ChatRequest.unsaid``) so that a prefill stops where that line begins.

    Built with no history instead, the prompt would hold "(The conversation begins.)" and the generation
    prompt where the first turn will hold the line that was said, and a prefill would evaluate tokens
    the turn throws away. Whoever says the first line, and whatever it says, the part before it is the same.
    """
    stand_in = Chat(sender=UNSAID, content=UNSAID, role=Role.HUMAN.value)
    request = await build_request(model, persona, name, [stand_in], settings, extras)
    return replace(request, unsaid=UNSAID)


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
    other_speaker = speaker_line_pattern([n for n in others if n.casefold() != name.casefold()])
    cuts = [found.start() for found in (other_speaker.search(text), TOPIC_NOTE_ECHO.search(text)) if found]
    return text[: min(cuts)].strip() if cuts else text


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
