"""The hub's floor-health guards on their own: what each lets through, cuts or withholds."""

from __future__ import annotations

import string

from hypothesis import given, settings
from hypothesis import strategies as st

from partychat.guards import REPEAT_NGRAM, REPEAT_THRESHOLD, REPEAT_WINDOW, Earlier, Guard, check_reply

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


SPEAKER_LABELS = st.builds(
    "{}{}{}{}:{}".format,
    st.sampled_from(["\n", ". ", "! ", "", " "]),
    st.sampled_from(["", "**", "_", "@"]),
    st.sampled_from([name for person in PEOPLE for name in (person, person.upper(), person.lower())]),
    st.sampled_from(["", "**"]),
    st.sampled_from(["", " "]),
)
"""A speaker label such as "\nTinkerBot: " or ". **zen sage**:", the text the impersonation guard cuts at."""


@given(st.lists(st.one_of(st.text(max_size=40), SPEAKER_LABELS), max_size=8).map("".join))
@settings(max_examples=200)
def test_whatever_comes_in_what_goes_out_is_a_prefix_and_nothing_is_lost(text):
    verdict = check(text)
    if verdict.withheld:
        assert verdict.removed == text
    else:
        assert text.startswith(verdict.content)
        assert verdict.content + verdict.removed == text
        assert verdict.content.strip()


def _sharing(shared: int, total: int) -> tuple[str, str]:
    """A reply with ``total`` distinct word trigrams, and an earlier message holding exactly ``shared`` of them."""
    words = [f"w{n}" for n in range(total + REPEAT_NGRAM - 1)]
    return " ".join(words), " ".join(words[:shared + REPEAT_NGRAM - 1]) + " unrelated ending here"


def test_a_reply_sharing_exactly_the_threshold_passes_and_one_trigram_more_is_a_repeat():
    total = 100
    shared = round(REPEAT_THRESHOLD * total)
    assert shared / total == REPEAT_THRESHOLD, "the threshold must be a whole number of hundredths for this check"
    reply, earlier = _sharing(shared, total)
    assert check(reply, recent=[Earlier("TinkerBot", earlier)]).guard is None
    reply, earlier = _sharing(shared + 1, total)
    assert check(reply, recent=[Earlier("TinkerBot", earlier)]).guard is Guard.REPEAT


def test_only_the_last_messages_of_the_window_are_compared():
    copied = Earlier("TinkerBot", "I would build a solar kettle that whistles a tune when the tea is ready.")
    others = [Earlier("Moderator", f"Question number {n} about something else entirely?") for n in range(REPEAT_WINDOW)]
    inside = [copied, *others[:REPEAT_WINDOW - 1]]  # the copied message is the window's oldest
    outside = [copied, *others]  # one newer message pushes it out
    assert check(copied.content, recent=inside).guard is Guard.REPEAT
    assert check(copied.content, recent=outside).guard is None
