"""A retry instead of silence: a persona checks its own reply with the hub's guards and draws again.

The hub withholds a reply that repeats a recent message, has no words, or is nothing but a line
written as someone else, and a withheld reply ends that persona's turn with nothing said. A
persona runs the same checks (``partychat.guards``) on its reply before sending it, and when one
would hold it back, it takes the attempt back and generates again within the same turn, up to
``retries`` times, each time sampling differently. The hub's guard still checks whatever is sent.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

from ..engines.anticopy import MIN_N
from ..guards import Earlier, Guard, Verdict, check_reply
from .generation import GenerationSettings

DEFAULT_RETRIES = 2
"""Attempts after the first that a persona may make in one turn (``--retries``)."""
MAX_RETRIES = 10
RETRY_TEMPERATURE = 0.8
"""The lowest temperature a retry samples at: a greedy first attempt would only say the same again."""
RETRY_TEMPERATURE_STEP = 0.1
MAX_RETRY_TEMPERATURE = 1.0
"""Retries get hotter up to here; a persona set hotter than this keeps its own temperature. Kept low:
at up to 1.2 the retried replies of issue 17's run wandered off the question (bench/README.md)."""


def settings_for_attempt(base: GenerationSettings, attempt: int, seeds: random.Random,
                         taken_back: Sequence[Verdict] = ()) -> GenerationSettings:
    """How attempt number ``attempt`` samples: 0 is the persona's own settings, each retry differs more.

    A retry draws with a new seed and a slightly higher temperature, and answers what the attempts
    ``taken_back`` before it did wrong, and nothing else: after a repeat, anti-copy bans n-grams one
    word shorter per repeat (never under MIN_N); after an attempt written as another speaker, the
    reply may not open with a speaker label ("Name:"). Shorter bans for a failure that was not a copy
    only pushed replies off topic. All of a retry's sampling is decided here, in one place.
    """
    if attempt <= 0:
        return base
    hotter = min(RETRY_TEMPERATURE + RETRY_TEMPERATURE_STEP * (attempt - 1), MAX_RETRY_TEMPERATURE)
    repeats = sum(verdict.guard == Guard.REPEAT for verdict in taken_back)
    shorter = max(MIN_N, base.anti_copy_n - repeats)
    written_as_another = any(verdict.guard == Guard.IMPERSONATION for verdict in taken_back)
    return replace(base, temperature=max(base.temperature, hotter), seed=seeds.randrange(2**31), anti_copy_n=shorter,
                   no_label=base.no_label or written_as_another)


def judge(raw: str, reply: str, author: str, participants: Sequence[str], recent: Sequence[Earlier]) -> Verdict:
    """What the hub's guards would do with ``reply`` (``raw`` cleaned); a reply cleaned to nothing is withheld.

    When cleaning left nothing, the raw text says why: it was all another speaker's line, or it
    had no words at all.
    """
    if reply:
        return check_reply(reply, author, participants, recent)
    verdict = check_reply(raw, author, participants, recent)
    if verdict.withheld:
        return verdict
    return replace(check_reply("", author, participants, recent), removed=raw)


def gave_up(verdicts: Sequence[Verdict]) -> str:
    """Why a persona passes after every attempt was taken back: the reason the room is told."""
    reasons = ", ".join(verdict.guard.value for verdict in verdicts if verdict.guard is not None)
    attempts = "its only attempt" if len(verdicts) == 1 else f"all {len(verdicts)} attempts"
    return f"{attempts} would have been withheld: {reasons}"
