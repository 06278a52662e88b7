"""Floor rules on their own: who may speak after what."""

from __future__ import annotations

from partychat.floor import Floor, Mode


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
        floor.on_model_message(name, "a reply")
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
    floor.on_model_message("Historian", "Tinker, could you build that?")
    assert floor.speakers() == ("Tinker",)
    floor.on_model_message("Tinker", "sure")
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
    floor.on_model_message("Tinker", "a gadget")
    assert floor.speakers() == ()
    floor.on_moderator_message("thanks", addressed="Sage")
    assert floor.speakers() == ("Sage",)


def test_free_mode_lets_anyone_speak_within_the_budget():
    floor = room(Mode.FREE)
    floor.on_moderator_message("open floor")
    assert set(floor.speakers()) == {"Sage", "Tinker", "Historian"}
    for name in ("Tinker", "Tinker", "Sage"):
        assert floor.may_speak(name)
        floor.on_model_message(name, "x")
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
    floor.on_model_message("Tinker", "hello everyone")
    assert not floor.may_speak("Tinker", opening=True)
    floor.pause()
    assert not floor.may_speak("Historian", opening=True)


def test_an_opening_line_does_not_move_the_floor_and_is_not_renewed_by_reconnecting():
    floor = room()
    floor.on_moderator_message("go")
    assert floor.speakers() == ("Sage",)
    assert floor.may_speak("Historian", opening=True)
    floor.on_model_message("Historian", "hello, I just arrived")
    assert floor.speakers() == ("Sage",) and floor.turns_left == 3
    floor.remove_model("Historian")
    floor.add_model("Historian")
    assert not floor.may_speak("Historian", opening=True)
