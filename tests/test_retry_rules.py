"""The hub's side of retries, against a live hub with scripted personas (no model): fast and exact.

- A persona takes back an attempt a guard would withhold (``discard``): the transcript keeps it as
  withheld with its reason, and every listener that saw its partials is told to drop them.
- ``/retry [NAME]``: the author is asked for a new version (``redo``), which replaces the old one
  under a new sequence number, everywhere, and in a resumed hub.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading

from helpers import close_all, drain, hub_config, join, next_frame, say, with_hub
from test_floor_health import StandIn, command, moderator, quiet_reason, replies, stand_in, transcript_of
from test_web_page import join_as_moderator, shown, type_line
from websockets.sync.client import connect

from partychat.export import transcript_markdown
from partychat.guards import Earlier, Guard, Verdict
from partychat.hub.server import Hub
from partychat.hub.transcript import load_saved_room
from partychat.moderator.console import RoomView
from partychat.persona.generation import GenerationSettings
from partychat.persona.participant import ModelParticipant, ParticipantConfig
from partychat.persona.retries import gave_up, judge, settings_for_attempt
from partychat.protocol import Chat, RelayedPartial, Withdrawn


def takes_back_then(final: str):
    """Stream a copy of the question, take it back as a repeat, then stream and send ``final``."""

    async def act(persona: StandIn, turn: dict) -> None:
        copy = persona.heard[-1]["content"]
        await persona.send(type="partial", content=copy)
        await persona.send(type="discard", content=copy, reason="repeat", turn=turn["turn"])
        await persona.send(type="partial", content=final)
        await persona.send(type="message", content=final, turn=turn["turn"])
    return act


def test_an_attempt_taken_back_is_withdrawn_from_listeners_and_kept_as_withheld(tmp_path):
    config = hub_config(tmp_path)

    async def body(hub: Hub) -> None:
        echo = await stand_in(hub.url, "Echo", takes_back_then("Something of my own to say."))
        host = await moderator(hub.url)
        plain, _ = await join(hub.url, "Plain", "human")  # the original protocol: it never saw a partial
        await say(host, "Tell me about rivers.")
        assert (await next_frame(host, "partial"))["content"] == "Tell me about rivers."
        withdrawn = await next_frame(host, "withdrawn")
        assert withdrawn["from"] == "Echo" and withdrawn["reason"] == "repeat"
        assert withdrawn["content"] == "Echo took back a reply: it repeated a recent message."
        assert (await next_frame(host, "partial"))["content"] == "Something of my own to say."
        assert (await next_frame(host, "message", **{"from": "Echo"}))["content"] == "Something of my own to say."
        assert await quiet_reason(host) == "budget", "the turn ended with the reply, not with a guard"
        frames = await drain(plain, 0.5)
        assert [f["type"] for f in frames if f["type"] in ("withdrawn", "partial")] == []
        assert [f["content"] for f in frames if f["type"] == "message"][-1] == "Something of my own to say."
        await close_all(host, plain, echo.ws)

    with_hub(config, body)
    records = [(r.kind, r.data.get("from"), r.data.get("content"), r.data.get("reason"))
               for r in transcript_of(config) if r.kind in ("message", "withheld")]
    assert records == [
        ("message", "Moderator", "Tell me about rivers.", None),
        ("withheld", "Echo", "Tell me about rivers.", "repeat"),
        ("message", "Echo", "Something of my own to say.", None),
    ]


def test_stop_after_an_attempt_was_taken_back_keeps_only_the_new_attempt(tmp_path):
    config = hub_config(tmp_path)

    async def streams_a_copy_takes_it_back_and_starts_again(persona: StandIn, turn: dict) -> None:
        await persona.send(type="partial", content="A copy. ")
        await persona.send(type="discard", content="A copy.", reason="repeat", turn=turn["turn"])
        await persona.send(type="partial", content="Fresh words. ")

    async def body(hub: Hub) -> None:
        echo = await stand_in(hub.url, "Echo", streams_a_copy_takes_it_back_and_starts_again)
        host = await moderator(hub.url)
        await say(host, "A copy.")
        await next_frame(host, "partial", content="Fresh words. ")
        await command(host, "stop")
        stopped = await next_frame(host, "message", **{"from": "Echo"})
        assert stopped["content"] == "Fresh words. " and stopped["interrupted"] is True
        await close_all(host, echo.ws)

    with_hub(config, body)


def answers_redo_with(*versions: str):
    """A persona's reader that answers each ``redo`` with the next of ``versions``."""
    left = list(versions)

    async def on_redo(persona: StandIn) -> None:
        answered = 0
        while True:
            redos = [f for f in persona.frames if f["type"] == "redo"]
            for redo in redos[answered:]:
                await persona.send(type="message", content=left.pop(0), replaces=redo["id"])
            answered = len(redos)
            if not left:
                return
            await asyncio.sleep(0.02)
    return on_redo


def test_retry_replaces_a_reply_under_a_new_number_everywhere_and_after_resume(tmp_path):
    config = hub_config(tmp_path)
    seen: dict[str, list[dict]] = {}

    async def body(hub: Hub) -> None:
        sage = await stand_in(hub.url, "Sage", replies("Rivers remember the rain."))
        bot = await stand_in(hub.url, "Bot", replies("I agree with Sage about rain."))
        host = await moderator(hub.url)
        plain, _ = await join(hub.url, "Plain", "human")
        answering = asyncio.create_task(answers_redo_with("Rivers carry the mountains to the sea.")(sage))
        await say(host, "Talk about rivers.")
        first = await next_frame(host, "message", **{"from": "Sage"})
        later = await next_frame(host, "message", **{"from": "Bot"})
        await quiet_reason(host)
        await command(host, "retry", "Sage")  # the latest model reply is Bot's: NAME picks Sage's
        assert "asked Sage to write its last message again" in (await next_frame(host, "system",
                                                                               event="retry"))["content"]
        redo = await sage.received("redo")
        assert redo == {"type": "redo", "id": first["id"], "seq": first["seq"]}
        new = await next_frame(host, "message", **{"from": "Sage"})
        assert new["content"] == "Rivers carry the mountains to the sea."
        assert new["replaces"] == first["id"] and new["seq"] == later["seq"] + 1 and new["id"] != first["id"]
        await answering
        old_style = await next_frame(plain, "message", content="Rivers carry the mountains to the sea.")
        assert old_style["from"] == "Sage", "a client that cannot replace text gets the new version as a message"
        # The hub holds the new version instead of the old; the reply that answered the old one stays.
        await command(host, "history")
        held = (await next_frame(host, "history"))["messages"]
        seen["held"] = held
        assert [m["content"] for m in held] == ["Talk about rivers.", "I agree with Sage about rain.",
                                               "Rivers carry the mountains to the sea."]
        # Nobody asked Bot for a new version: one it sends anyway is kept out of the room.
        await bot.send(type="message", content="Unasked.", replaces=later["id"])
        assert "Nobody asked for that message again" in (await bot.received("error"))["content"]
        await command(host, "retry", "Nobody")
        assert "No model called 'Nobody'" in (await next_frame(host, "error"))["content"]
        await close_all(host, plain, sage.ws, bot.ws)

    with_hub(config, body)
    messages = [r.data for r in transcript_of(config) if r.kind == "message"]
    assert [m["content"] for m in messages] == ["Talk about rivers.", "Rivers remember the rain.",
                                               "I agree with Sage about rain.",
                                               "Rivers carry the mountains to the sea."]
    assert messages[3]["replaces"] == messages[1]["id"], "the transcript keeps both; the old one is marked replaced"
    withheld = [r.data for r in transcript_of(config) if r.kind == "withheld"]
    assert [(w["from"], w["content"]) for w in withheld] == [("Bot", "Unasked.")]
    resumed = load_saved_room(config.transcript)
    assert [c.content for c in resumed.messages] == [m["content"] for m in seen["held"]]

    async def after_resume(hub: Hub) -> None:
        late, _ = await join(hub.url, "Late", "human", protocol=1)
        replayed = [f for f in await drain(late, 0.5) if f["type"] == "message"]
        assert [f["content"] for f in replayed] == [m["content"] for m in seen["held"]]
        assert replayed[-1]["replaces"] == messages[1]["id"]
        await late.close()

    resumed_config = hub_config(tmp_path)
    resumed_config.resume = config.transcript
    with_hub(resumed_config, after_resume)


def test_retry_with_no_reply_or_an_author_that_cannot_redo_says_why(tmp_path):
    config = hub_config(tmp_path)

    async def body(hub: Hub) -> None:
        host = await moderator(hub.url)
        await command(host, "retry")
        assert "holds no reply of a model's" in (await next_frame(host, "error"))["content"]
        old, _ = await join(hub.url, "Old Timer", "model")  # the original project's client: no redo
        await say(host, "Hello.")
        await old.send(json.dumps({"type": "message", "content": "Hello to you."}))
        await next_frame(host, "message", **{"from": "Old Timer"})
        await command(host, "retry")
        assert "only the original protocol" in (await next_frame(host, "error"))["content"]
        await close_all(host, old)

    with_hub(config, body)


# ---------------------------------------------------------------- the persona's side, without a model


def test_each_retry_samples_anew_and_hotter_and_the_first_attempt_is_the_personas_own():
    seeds = random.Random(1)
    base = GenerationSettings(temperature=0.0)
    assert settings_for_attempt(base, 0, seeds) == base
    first, second = (settings_for_attempt(base, attempt, seeds) for attempt in (1, 2))
    assert first.temperature == 0.8 and second.temperature == 0.9 and first.seed != second.seed
    assert settings_for_attempt(base, 5, seeds).temperature == 1.0
    assert settings_for_attempt(GenerationSettings(temperature=1.5), 3, seeds).temperature == 1.5


def test_a_retry_answers_what_went_wrong_and_nothing_else():
    seeds = random.Random(1)
    base = GenerationSettings(temperature=0.0)
    repeat = Verdict(None, Guard.REPEAT, "Trees.")
    written_as = Verdict(None, Guard.IMPERSONATION, "Moderator: Trees?", "Moderator")
    empty = Verdict(None, Guard.EMPTY, "...")
    # A copy calls for stronger anti-copy (shorter n-grams, never under two words) ...
    assert settings_for_attempt(base, 1, seeds, [repeat]).anti_copy_n == 2
    assert settings_for_attempt(base, 2, seeds, [repeat, repeat]).anti_copy_n == 2
    # ... other failures keep the persona's n-grams, which shorter ones would only push off topic.
    assert settings_for_attempt(base, 2, seeds, [empty, written_as]).anti_copy_n == 3
    # Every attempt is kept from opening with a speaker label; a persona that allows labels
    # (no_label=False) still gets the ban after a reply written as another speaker, and only then.
    assert base.no_label
    labels_allowed = GenerationSettings(temperature=0.0, no_label=False)
    assert settings_for_attempt(labels_allowed, 1, seeds, [written_as]).no_label
    assert not settings_for_attempt(labels_allowed, 1, seeds, [repeat]).no_label


def test_a_persona_judges_its_reply_as_the_hub_would_and_names_a_cleaned_away_reply():
    recent = [Earlier("Moderator", "The river carries old stories down to the sea.")]
    copy = judge("The river carries old stories down to the sea.", "The river carries old stories down to the sea.",
                 "Echo", ["Moderator"], recent)
    assert copy.withheld and copy.guard is Guard.REPEAT
    spoken_for = judge("Moderator: I say this myself.", "", "Echo", ["Moderator"], recent)
    assert spoken_for.guard is Guard.IMPERSONATION and spoken_for.removed == "Moderator: I say this myself."
    nothing = judge("   ", "", "Echo", ["Moderator"], recent)
    assert nothing.guard is Guard.EMPTY
    assert not judge("Stories float.", "Stories float.", "Echo", ["Moderator"], recent).withheld
    assert gave_up([copy, nothing]) == "all 2 attempts would have been withheld: repeat, empty"


def test_a_personas_history_takes_a_new_version_where_the_old_one_was():
    persona = ModelParticipant(ParticipantConfig(name="Sage", system_prompt="A sage."), model=None,  # type: ignore[arg-type]
                               settings=GenerationSettings())
    for chat in (Chat("Moderator", "Rivers?", seq=1, id="a"), Chat("Sage", "Old words.", seq=2, id="b"),
                 Chat("Bot", "I agree.", seq=3, id="c"), Chat("Sage", "New words.", seq=4, id="d", replaces="b")):
        persona._on_chat(chat)
    assert [chat.content for chat in persona.history] == ["Rivers?", "New words.", "I agree."]


def test_the_console_drops_a_withdrawn_draft_and_saves_a_new_version_in_place_of_the_old():
    view = RoomView("Moderator", colour=False)
    view.render(RelayedPartial(sender="Echo", content="A copy of what you said."))
    line = view.render(Withdrawn(sender="Echo", content="Echo took back a reply: it repeated a recent message."))
    assert view.toolbar() == "" and "Echo took back a reply" in line
    view.render(Chat("Echo", "Old words.", seq=1, id="a"))
    view.render(Chat("Bot", "I agree.", seq=2, id="b"))
    line = view.render(Chat("Echo", "New words.", seq=3, id="c", replaces="a"))
    assert "written again" in line and "New words." in line
    saved = transcript_markdown(view.seen)
    assert "Old words" not in saved and saved.index("New words") < saved.index("I agree")


def test_the_page_drops_a_withdrawn_draft_and_shows_why_then_the_new_attempt(start_hub, browser):
    _, url = start_hub()
    copy, own = "Say hello to the river.", "Rivers greet every stone they pass."
    taken_back = threading.Event()

    def persona() -> None:
        with connect(url) as ws:
            ws.send(json.dumps({"name": "Echo", "type": "model", "protocol": 1}))
            for raw in ws:
                frame = json.loads(raw)
                if frame["type"] == "turn" and frame["speakers"] == ["Echo"]:
                    ws.send(json.dumps({"type": "partial", "content": copy}))
                    taken_back.wait(60)  # until the page has shown the draft
                    ws.send(json.dumps({"type": "discard", "content": copy, "reason": "repeat",
                                        "turn": frame["turn"]}))
                    ws.send(json.dumps({"type": "partial", "content": own}))
                    ws.send(json.dumps({"type": "message", "content": own, "turn": frame["turn"]}))
                    return

    speaker = threading.Thread(target=persona, daemon=True)
    speaker.start()
    page = browser.open(url.replace("ws://", "http://") + "/moderate")
    join_as_moderator(page)
    page.locator("#participants li", has_text="Echo").wait_for()
    type_line(page, copy)
    draft = page.locator("#log .msg.draft")
    draft.wait_for()
    assert draft.locator(".body").inner_text() == copy
    taken_back.set()
    page.locator("#log .msg.final").nth(1).wait_for()
    assert [m["text"] for m in shown(page)] == [copy, own]
    assert page.locator("#log .msg.draft, #log .msg.stopped").count() == 0, "nothing of the attempt is left"
    assert page.locator("#log .event", has_text="Echo took back a reply: it repeated a recent message.").is_visible()
    speaker.join(10)
