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
from ..guards import Earlier, Verdict, check_reply
from .generation import GenerationSettings

DEFAULT_RETRIES = 2
"""Attempts after the first that a persona may make in one turn (``--retries``)."""
MAX_RETRIES = 10
RETRY_TEMPERATURE = 0.8
"""The lowest temperature a retry samples at: a greedy first attempt would only say the same again."""
RETRY_TEMPERATURE_STEP = 0.2
MAX_RETRY_TEMPERATURE = 1.2
"""Retries get hotter up to here; a persona set hotter than this keeps its own temperature."""


def settings_for_attempt(base: GenerationSettings, attempt: int, seeds: random.Random) -> GenerationSettings:
    """How attempt number ``attempt`` samples: 0 is the persona's own settings, each retry differs more.

    A retry draws with a new seed and a higher temperature. ``attempt`` is the one number every
    other knob that should grow with the retries (such as how hard copying is discouraged) is to
    be derived from, here, so that all of a retry's sampling is decided in one place.
    """
    if attempt <= 0:
        return base
    hotter = min(RETRY_TEMPERATURE + RETRY_TEMPERATURE_STEP * (attempt - 1), MAX_RETRY_TEMPERATURE)
    # Stronger anti-copy: banned word n-grams one word shorter on each retry, never under MIN_N.
    shorter = max(MIN_N, base.anti_copy_n - attempt)
    return replace(base, temperature=max(base.temperature, hotter), seed=seeds.randrange(2**31), anti_copy_n=shorter)


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
