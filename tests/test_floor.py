"""Floor rules on their own: who may speak after what."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from partychat.hub.floor import Floor, Mode, Quiet, TurnEnd, mentions


def room(mode: Mode = Mode.ROUND_ROBIN, max_turns: int | None = None) -> Floor:
    floor = Floor(mode=mode, max_turns=max_turns)
    for name in ("Sage", "Tinker", "Historian"):
        floor.add_model(name)
    return floor


def run_until_idle(floor: Floor, limit: int = 20) -> list[str]:
    spoken = []
    while floor.speakers() and len(spoken) < limit:
        name = floor.speakers()[0]
        spoken.append(name)
        floor.end_turn(name, TurnEnd.SPOKE, "a reply")
    return spoken


def test_round_robin_gives_each_model_one_turn_in_join_order_then_waits():
    floor = room()
    assert floor.speakers() == ()
    floor.on_moderator_message("hello all")
    assert run_until_idle(floor) == ["Sage", "Tinker", "Historian"]
    assert floor.speakers() == ()
    floor.on_moderator_message("again")
    assert run_until_idle(floor) == ["Sage", "Tinker", "Historian"]


def test_the_budget_bounds_the_exchange():
    floor = room(max_turns=5)
    floor.on_moderator_message("go")
    assert run_until_idle(floor) == ["Sage", "Tinker", "Historian", "Sage", "Tinker"]
    floor.set_max_turns(0)
    floor.on_moderator_message("quiet please")
    assert run_until_idle(floor) == []


def test_mention_hands_the_turn_to_the_named_persona():
    floor = room(Mode.MENTION)
    floor.on_moderator_message("What do you think, historian?")
    assert floor.speakers() == ("Historian",)
    floor.end_turn("Historian", TurnEnd.SPOKE, "Tinker, could you build that?")
    assert floor.speakers() == ("Tinker",)
    floor.end_turn("Tinker", TurnEnd.SPOKE, "sure")
    assert floor.speakers() == ("Historian",), "without a mention the rotation goes on after the speaker"


def test_mention_does_not_match_inside_other_words():
    floor = room(Mode.MENTION)
    assert floor.mentioned("A sagebrush fire") is None
    assert floor.mentioned("@Sage, your view?") == "Sage"


def test_moderator_mode_lets_only_the_addressed_model_speak_once():
    floor = room(Mode.MODERATOR)
    floor.on_moderator_message("anyone?")
    assert floor.speakers() == ()
    floor.on_moderator_message("Tinker, describe your latest gadget")
    assert floor.speakers() == ("Tinker",)
    assert not floor.may_speak("Sage")
    floor.end_turn("Tinker", TurnEnd.SPOKE, "a gadget")
    assert floor.speakers() == ()
    floor.on_moderator_message("thanks", addressed="Sage")
    assert floor.speakers() == ("Sage",)


def test_free_mode_lets_anyone_speak_within_the_budget():
    floor = room(Mode.FREE)
    floor.on_moderator_message("open floor")
    assert set(floor.speakers()) == {"Sage", "Tinker", "Historian"}
    for name in ("Tinker", "Tinker", "Sage"):
        assert floor.may_speak(name)
        floor.end_turn(name, TurnEnd.SPOKE, "x")
    assert floor.speakers() == ()
    assert not floor.may_speak("Historian")


def test_pause_silences_everyone_until_resume():
    floor = room()
    floor.on_moderator_message("go")
    turn = floor.turn
    floor.pause()
    assert floor.speakers() == () and not floor.may_speak("Sage")
    assert floor.turn > turn, "a pause must invalidate replies started before it"
    floor.resume()
    assert floor.speakers() == ("Sage",)


def test_a_holder_that_leaves_passes_the_turn_on():
    floor = room()
    floor.on_moderator_message("go")
    floor.remove_model("Sage")
    assert floor.speakers() == ("Tinker",)
    assert floor.budget == 2


def test_an_opening_line_is_allowed_once_outside_the_turn_order():
    floor = room()
    assert floor.may_speak("Tinker", opening=True)
    floor.end_turn("Tinker", TurnEnd.SPOKE, "hello everyone")
    assert not floor.may_speak("Tinker", opening=True)
    floor.pause()
    assert not floor.may_speak("Historian", opening=True)


def test_an_opening_line_does_not_move_the_floor_and_is_not_renewed_by_reconnecting():
    floor = room()
    floor.on_moderator_message("go")
    assert floor.speakers() == ("Sage",)
    assert floor.may_speak("Historian", opening=True)
    floor.end_turn("Historian", TurnEnd.SPOKE, "hello, I just arrived")
    assert floor.speakers() == ("Sage",) and floor.turns_left == 3
    floor.remove_model("Historian")
    floor.add_model("Historian")
    assert not floor.may_speak("Historian", opening=True)


# ---------------------------------------------------------------- natural mode, liveness, stop reasons


def natural(seed: int | None = 7, max_turns: int | None = 12, **talkativeness: float) -> Floor:
    floor = Floor(mode=Mode.NATURAL, max_turns=max_turns, seed=seed)
    for name in ("Sage", "Tinker", "Historian"):
        floor.add_model(name, talkativeness.get(name, 0.5))
    return floor


def test_natural_gives_the_first_turn_to_the_persona_named_whole_word_in_any_case():
    floor = natural()
    floor.on_moderator_message("TINKER, what would you build?")
    assert floor.speakers() == ("Tinker",)
    floor.end_turn("Tinker", TurnEnd.SPOKE, "I would ask historian first. Tinker out.")
    assert floor.speakers() == ("Historian",), "a mention of another persona wins; the author's own name never does"
    assert mentions("tinkerers unite", ["Tinker"]) is None
    assert mentions("Thanks, Tinker!", ["Tinker"], author="tinker") is None


@given(seed=st.integers(0, 2**32), weights=st.lists(st.floats(0, 1), min_size=3, max_size=3))
@settings(max_examples=60, deadline=None)
def test_natural_never_gives_anyone_two_turns_in_a_row_and_a_seed_repeats_the_order(seed, weights):
    names = dict(zip(("Sage", "Tinker", "Historian"), weights, strict=True))
    orders = []
    for _ in range(2):
        floor = natural(seed, max_turns=30, **names)
        floor.on_moderator_message("What do you all think?")
        orders.append(run_until_idle(floor, limit=40))
    assert orders[0] == orders[1]
    assert len(orders[0]) == 30
    assert all(a != b for a, b in itertools.pairwise(orders[0]))


def test_the_seeded_order_does_not_depend_on_the_order_personas_joined():
    orders = []
    for names in (("Sage", "Tinker", "Historian"), ("Historian", "Sage", "Tinker")):
        floor = Floor(mode=Mode.NATURAL, max_turns=10, seed=5)
        for name in names:
            floor.add_model(name)
        floor.on_moderator_message("go")
        orders.append(run_until_idle(floor))
    assert orders[0] == orders[1]


def test_natural_draw_follows_talkativeness():
    floor = natural(seed=1, max_turns=1000, Sage=0.9, Tinker=0.05, Historian=0.9)
    floor.on_moderator_message("talk amongst yourselves")
    spoken = run_until_idle(floor, limit=1000)
    assert spoken.count("Tinker") < spoken.count("Sage") / 3
    silent = natural(seed=1, max_turns=40, Tinker=0.0)
    silent.on_moderator_message("go")
    assert "Tinker" not in run_until_idle(silent), "talkativeness 0 speaks only when named"


def test_a_lone_persona_may_speak_twice_in_a_row():
    floor = Floor(mode=Mode.NATURAL, max_turns=3, seed=0)
    floor.add_model("Sage")
    floor.on_moderator_message("hello")
    assert run_until_idle(floor) == ["Sage", "Sage", "Sage"]


def test_in_natural_mode_an_impersonated_persona_speaks_next():
    floor = natural(seed=3)
    floor.on_moderator_message("Sage, begin")
    floor.end_turn("Sage", TurnEnd.SPOKE, "a thought", next_speaker="Historian")
    assert floor.speakers() == ("Historian",)


def test_a_persona_that_times_out_is_skipped_keeps_its_seat_and_returns_when_it_answers():
    floor = room()
    floor.on_moderator_message("go")
    floor.skip("Sage")
    floor.end_turn("Sage", TurnEnd.TIMED_OUT)
    assert floor.speakers() == ("Tinker",) and "Sage" in floor.models
    assert run_until_idle(floor) == ["Tinker", "Historian"]
    floor.on_moderator_message("again")
    assert run_until_idle(floor) == ["Tinker", "Historian", "Tinker"], "a skipped persona gets no turn"
    assert floor.answered("Sage") and not floor.answered("Sage")
    floor.on_moderator_message("and again")
    assert run_until_idle(floor) == ["Historian", "Sage", "Tinker"], "the rotation goes on, Sage included"


def test_a_model_that_reconnects_gets_its_old_seat_back():
    floor = room()
    floor.remove_model("Sage")
    floor.add_model("Latecomer")
    floor.add_model("Sage")
    assert floor.models == ["Sage", "Tinker", "Historian", "Latecomer"]


def _quiet_after(floor: Floor, *ends: TurnEnd) -> Quiet | None:
    for how in ends:
        if how is TurnEnd.TIMED_OUT:
            floor.skip(floor.speakers()[0])
        floor.end_turn(floor.speakers()[0], how)
    return floor.take_quiet()


def test_each_way_the_models_fall_quiet_is_named_once():
    assert _quiet_after(_started(), TurnEnd.SPOKE, TurnEnd.SPOKE, TurnEnd.SPOKE) is Quiet.BUDGET
    assert _quiet_after(_started(), TurnEnd.SPOKE, TurnEnd.SPOKE, TurnEnd.STOPPED) is Quiet.STOPPED
    assert _quiet_after(_started(), TurnEnd.SPOKE, TurnEnd.SPOKE, TurnEnd.WITHHELD) is Quiet.WITHHELD
    assert _quiet_after(_started(), TurnEnd.SPOKE, TurnEnd.SPOKE, TurnEnd.TIMED_OUT) is Quiet.TIMEOUT
    assert _quiet_after(_started(10), TurnEnd.PASSED, TurnEnd.PASSED, TurnEnd.PASSED) is Quiet.PASSED
    assert _quiet_after(_started(10), *[TurnEnd.TIMED_OUT] * 3) is Quiet.TIMEOUT
    paused = _started()
    paused.pause()
    assert paused.take_quiet() is Quiet.PAUSED and paused.take_quiet() is None
    addressed = room(Mode.MODERATOR)
    addressed.on_moderator_message("anyone there?")
    assert addressed.take_quiet() is Quiet.NOT_ADDRESSED
    still = _started()
    assert still.take_quiet() is None
    still.end_turn("Sage", TurnEnd.SPOKE)
    assert still.take_quiet() is None, "the floor went on: nothing to explain"


def test_no_reason_is_given_when_nobody_could_answer_anyway():
    floor = Floor()
    floor.on_moderator_message("just humans here")
    assert floor.take_quiet() is None


def _started(max_turns: int | None = None) -> Floor:
    floor = room(max_turns=max_turns)
    floor.on_moderator_message("go")
    return floor
