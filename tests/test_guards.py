"""The hub's floor-health guards on their own: what each lets through, cuts or withholds."""

from __future__ import annotations

import string

from hypothesis import given, settings
from hypothesis import strategies as st

from partychat.guards import REPEAT_THRESHOLD, Earlier, Guard, check_reply

PEOPLE = ["Zen Sage", "TinkerBot", "Moderator"]
RECENT = [
    Earlier("Moderator", "TinkerBot, what would you build?"),
    Earlier("TinkerBot", "I would build a solar kettle that whistles a tune when the tea is ready."),
]


def check(text: str, author: str = "Zen Sage", recent: list[Earlier] = RECENT):
    return check_reply(text, author, PEOPLE, recent)


def test_a_fresh_reply_passes_untouched():
    verdict = check("A kettle that sings is a kettle that waits patiently. I like it.")
    assert verdict.content == "A kettle that sings is a kettle that waits patiently. I like it."
    assert verdict.guard is None and not verdict.withheld


def test_a_reply_that_mostly_repeats_a_recent_message_is_withheld():
    verdict = check("i would build a SOLAR kettle, that whistles a tune when the tea is ready!!")
    assert verdict.withheld and verdict.guard is Guard.REPEAT
    assert "TinkerBot's" in verdict.reason
    assert verdict.removed.startswith("i would build")
    own = check("I would build a solar kettle. The tune would be Greensleeves, slow and low.", author="TinkerBot")
    assert own.guard is None, "sharing a phrase is not repeating the message"


def test_quoting_part_of_a_message_stays_below_the_threshold():
    text = "You said it whistles a tune when the tea is ready; but who will drink it at dawn and why?"
    assert check(text).guard is None


def test_short_replies_repeat_only_when_they_are_the_same_words():
    recent = [Earlier("TinkerBot", "I agree.")]
    assert check("i agree!", recent=recent).guard is Guard.REPEAT
    assert check("I disagree.", recent=recent).guard is None


@given(st.text(alphabet=string.punctuation + " \n\t\u3002\u00bf", max_size=40))
def test_whitespace_and_punctuation_only_is_withheld_as_empty(text):
    verdict = check(text)
    assert verdict.withheld and verdict.guard is Guard.EMPTY and verdict.removed == text


def test_a_line_written_as_another_participant_is_cut_there():
    verdict = check("Stillness is a tool too.\nTinkerBot: Then I will build a quiet hammer!\nZen Sage: Good.")
    assert verdict.content == "Stillness is a tool too."
    assert verdict.guard is Guard.IMPERSONATION and verdict.impersonated == "TinkerBot"
    assert verdict.removed == "\nTinkerBot: Then I will build a quiet hammer!\nZen Sage: Good."
    inline = check("Breathe first. **tinkerbot**: fine, fine.")
    assert inline.content == "Breathe first." and inline.impersonated == "TinkerBot"


def test_a_reply_that_is_all_someone_else_is_withheld():
    verdict = check("Moderator: please go on, Sage.")
    assert verdict.withheld and verdict.guard is Guard.IMPERSONATION and verdict.impersonated == "Moderator"


def test_names_inside_a_sentence_and_the_authors_own_label_are_not_impersonation():
    assert check("I told TinkerBot: build less.").guard is None
    assert check("Zen Sage: calm is near.").guard is None


@given(st.text(max_size=200))
@settings(max_examples=200)
def test_whatever_comes_in_what_goes_out_is_a_prefix_and_nothing_is_lost(text):
    verdict = check(text)
    if verdict.withheld:
        assert verdict.removed == text
    else:
        assert text.startswith(verdict.content)
        assert verdict.content + verdict.removed == text or verdict.guard is Guard.IMPERSONATION
        assert verdict.content.strip()


def test_the_threshold_is_a_share_between_zero_and_one():
    assert 0 < REPEAT_THRESHOLD < 1
