"""The room's web page in a real Chromium: watching, moderating, safety and reconnecting.

Every test starts a real hub process on a free port and opens its page in headless Chromium
(see tests/browser.py; skipped with a how-to when there is none). The page runs under the hub's
own Content-Security-Policy, so anything the page needed inline or from elsewhere would fail here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from browser import expect
from websockets.sync.client import ClientConnection, connect

from partychat.hub.pages import CONTENT_SECURITY_POLICY
from partychat.hub.transcript import read_records
from partychat.protocol import speaker_colour_index

LONG = 300_000
"""Milliseconds to wait for the embedded model on a loaded machine."""

QUESTION = "How would you design a city for people and robots? Explain in a few sentences."
SECOND_QUESTION = "What would the robots do at night? Describe it in a few sentences."

RECORD_CHANGES = """() => {
  window.seen = [];
  const note = () => {
    for (const el of document.querySelectorAll('#log .msg')) {
      const kind = ['final', 'draft', 'stopped'].find((k) => el.classList.contains(k));
      const entry = [kind, el.dataset.sender, el.querySelector('.body').textContent.length].join('|');
      if (window.seen[window.seen.length - 1] !== entry && !window.seen.includes(entry)) window.seen.push(entry);
    }
  };
  new MutationObserver(note).observe(document.getElementById('log'),
    {subtree: true, childList: true, characterData: true, attributes: true});
}"""
"""Notes every state each message element goes through: a draft growing, then the final message."""

FINALS = "#log .msg.final"


def page_url(hub) -> str:
    return hub.wait_for_output(r"in a browser: (https?://\S+)", timeout=30).group(1)


@contextmanager
def joined(url: str, name: str, kind: str = "human", **extra: object) -> Iterator[ClientConnection]:
    """A participant written in Python, in the room for the length of a ``with`` block."""
    with connect(url) as ws:
        ws.send(json.dumps({"name": name, "type": kind, "protocol": 1, **extra}))
        assert json.loads(ws.recv(timeout=30))["event"] == "welcome"
        yield ws


def say(ws: ClientConnection, text: str) -> None:
    ws.send(json.dumps({"type": "message", "content": text}))


def frames_until(ws: ClientConnection, kind: str, **match: object) -> dict:
    while True:
        frame = json.loads(ws.recv(timeout=60))
        if frame.get("type") == kind and all(frame.get(k) == v for k, v in match.items()):
            return frame


def shown(page) -> list[dict]:
    """The final messages the page shows: sender, text and sequence number, in order."""
    return page.locator(FINALS).evaluate_all(
        "els => els.map(el => ({sender: el.dataset.sender, text: el.querySelector('.body').innerText,"
        " seq: Number(el.dataset.seq)}))"
    )


def join_as_moderator(page, name: str = "Moderator") -> None:
    page.fill("#name", name)
    page.click("#join-form button[type=submit]")
    page.locator("#say-form").wait_for(state="visible")
    page.locator("#controls").wait_for(state="visible")  # the hub told the page it moderates


def type_line(page, text: str) -> None:
    page.fill("#say", text)
    page.press("#say", "Enter")


def test_two_personas_in_the_page_stream_then_answer_in_order_and_pause_stops_a_reply(
        tmp_path, start_hub, start_client, browser):
    transcript = tmp_path / "t.jsonl"
    # Without guards: a greedy persona may echo the other, and this test waits for both replies.
    hub, url = start_hub("--transcript", str(transcript), "--no-guards")
    personas = {"Zen Sage": "sage.txt", "TinkerBot": "inventor.txt"}
    # Greedy decoding makes the replies the same on every run; --delay holds each finished reply
    # back a moment, so a pause can catch one that has streamed but not yet been sent.
    clients = {name: start_client("--name", name, "--prompt-file", prompt, "--server", url, "--temperature", "0",
                                  "--max-generation-tokens", "80", "--delay", "3")
               for name, prompt in personas.items()}
    for client in clients.values():
        client.wait_for_output("joined ws://", 300)
    order = re.findall(r"(Zen Sage|TinkerBot) joined the chat", hub.output)
    assert sorted(order) == sorted(personas)

    watcher = browser.open(page_url(hub))
    watcher.locator("#participants li").nth(1).wait_for()
    watcher.evaluate(RECORD_CHANGES)
    moderator = browser.open(page_url(hub) + "moderate")
    join_as_moderator(moderator)
    type_line(moderator, QUESTION)

    watcher.locator(FINALS).nth(2).wait_for(timeout=LONG)
    messages = shown(watcher)
    assert [m["sender"] for m in messages] == ["Moderator", *order], "both personas answer, in turn order"
    assert messages[0]["text"] == QUESTION
    seen = watcher.evaluate("() => window.seen")
    for name in order:
        states = [entry.split("|") for entry in seen if entry.split("|")[1] == name]
        kinds = [kind for kind, _, _ in states]
        assert "draft" in kinds and kinds.index("draft") < kinds.index("final"), seen
        drafts = [int(length) for kind, _, length in states if kind == "draft"]
        assert drafts == sorted(drafts) and drafts[-1] > 0, "the reply grows on screen before it is final"
    # The page shows the room: both personas with their roles, the moderator, and a spectator count.
    participants = watcher.locator("#participants").inner_text()
    assert "Zen Sage" in participants and "model" in participants and "moderator" in participants
    assert "1 watching" in watcher.locator("#spectators").inner_text()

    type_line(moderator, SECOND_QUESTION)
    draft = moderator.locator("#log .msg.draft").first
    draft.wait_for(timeout=LONG)
    speaker = draft.get_attribute("data-sender")
    moderator.click("#pause")
    moderator.locator(f'#log .msg.stopped[data-sender="{speaker}"]').wait_for()
    moderator.locator("#floor .paused").wait_for()
    assert moderator.locator("#pause").inner_text() == "Resume"
    clients[speaker].wait_for_output("Turn withdrawn", 120)
    after = [m["sender"] for m in shown(moderator)][-1]
    assert after == "Moderator", "the paused reply never reached the room"
    records = [r for r in read_records(transcript) if r.kind == "message"]
    assert records[-1].data["content"] == SECOND_QUESTION
    assert not browser.dialogs and not browser.errors


def test_the_page_runs_as_es_modules_under_the_csp_and_shows_a_message_as_it_arrives(start_hub, browser):
    hub, url = start_hub()
    scripts: dict[str, dict[str, str]] = {}  # every script the browser fetched, with its response headers
    refused: list[str] = []  # what the browser blocked, as its console says it

    def fetched(response) -> None:
        if response.request.resource_type == "script":
            scripts[response.url.rsplit("/", 1)[-1]] = response.headers

    browser.context.on("response", fetched)
    browser.context.on("console", lambda message: refused.append(message.text)
                       if "Content Security Policy" in message.text or "MIME" in message.text else None)
    page = browser.open(page_url(hub))
    page.locator("#connection", has_text="watching").wait_for()
    with joined(url, "Ada") as ada:
        say(ada, "Modules, all of them.")
        expect(page.locator(FINALS, has_text="Modules, all of them.")).to_be_visible()

    tags = page.evaluate("() => [...document.scripts].map((s) => [s.type, new URL(s.src).pathname])")
    assert tags == [["module", "/app.js"]], "one module starts the page; nothing inline"
    modules = {f.name for f in (resources.files("partychat.hub") / "web").iterdir() if f.name.endswith(".js")}
    assert set(scripts) == modules, "app.js imports every module shipped, and each came from the hub"
    for name, headers in scripts.items():
        assert headers["content-type"].startswith("text/javascript"), name
        assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY, name
    assert not refused and not browser.errors, (refused, browser.errors)


def test_a_spectator_page_has_no_input_and_the_hub_refuses_what_a_script_sends_from_it(
        tmp_path, start_hub, browser):
    transcript = tmp_path / "t.jsonl"
    hub, url = start_hub("--transcript", str(transcript))
    with joined(url, "Ada") as ada:
        say(ada, "Welcome, everyone.")
        watch_and_try_to_speak(browser, hub, ada, transcript)


def watch_and_try_to_speak(browser, hub, ada: ClientConnection, transcript: Path) -> None:
    page = browser.open(page_url(hub))
    page.locator(FINALS).first.wait_for()
    assert page.locator("#say").count() == 0
    assert page.locator("input:visible, textarea:visible, select:visible, [contenteditable]").count() == 0
    before = transcript.read_text()

    answers = page.evaluate("""async () => {
      const ws = new WebSocket(`ws://${location.host}/`);
      const frames = [];
      await new Promise((resolve) => ws.addEventListener('open', resolve));
      ws.send(JSON.stringify({type: 'spectator', protocol: 1}));
      const errors = new Promise((resolve) => ws.addEventListener('message', (event) => {
        frames.push(JSON.parse(event.data));
        if (frames.filter((f) => f.type === 'error').length === 2) resolve();
      }));
      ws.send(JSON.stringify({type: 'message', content: 'I am not really here'}));
      ws.send(JSON.stringify({type: 'command', name: 'pause', args: []}));
      await errors;
      ws.close();
      return frames;
    }""")
    assert [f["code"] for f in answers if f["type"] == "error"] == ["watch_only", "watch_only"]
    ada.send(json.dumps({"type": "command", "name": "who", "args": []}))
    roster = frames_until(ada, "roster")
    assert [p["name"] for p in roster["participants"]] == ["Ada"]
    assert roster["floor"]["paused"] is False
    assert transcript.read_text() == before, "nothing a spectator sent reached the room or its transcript"
    assert [m["text"] for m in shown(page)] == ["Welcome, everyone."]


def test_names_and_messages_full_of_html_show_literally_and_run_nothing(tmp_path, start_hub, browser):
    hub, url = start_hub()
    name = "<img src=x onerror=alert(1)>"
    message = '<script>alert(2)</script><img src=x onerror="alert(3)"><b>bold</b> & <a href="javascript:alert(4)">x</a>'
    with joined(url, name) as mallory:
        say(mallory, message)
        watcher = browser.open(page_url(hub))
        moderator = browser.open(page_url(hub) + "moderate")
        join_as_moderator(moderator)
        for page in (watcher, moderator):
            page.locator(FINALS).first.wait_for()
            page.locator("#participants li", has_text=name).wait_for()
            assert shown(page)[0] == {"sender": name, "text": message, "seq": 1}
            assert page.locator("#log .msg .who").first.inner_text() == name
            assert page.locator("#log img, #log script, #log b, #log a, #participants img").count() == 0
        say(mallory, "<img src=x onerror=alert(5)>")
        moderator.locator(FINALS).nth(1).wait_for()
    assert not browser.dialogs, browser.dialogs
    assert not browser.errors


def test_the_moderator_page_steers_the_room_like_the_console(tmp_path, start_hub, browser):
    transcript = tmp_path / "t.jsonl"
    hub, url = start_hub("--transcript", str(transcript), "--moderator-token", "chair")
    with joined(url, "Echo", "model") as echo:
        steer(browser, hub, echo, transcript)


def steer(browser, hub, echo: ClientConnection, transcript: Path) -> None:
    page = browser.open(page_url(hub) + "moderate")
    page.fill("#name", "Chair")
    page.fill("#moderator-token", "chair")
    page.click("#join-form button[type=submit]")
    page.locator("#controls").wait_for(state="visible")
    assert page.evaluate("() => sessionStorage.getItem('partychat.moderator-token')") == "chair"
    assert "chair" not in page.url and page.context.cookies() == []

    page.select_option("#mode", "moderator")
    frames_until(echo, "turn", mode="moderator")
    page.fill("#turns", "3")
    page.click("#set-turns")
    page.locator("#log .event", has_text="turn budget to 3").wait_for()
    echo_row = page.locator("#participants li", has_text="Echo")
    echo_row.locator("button", has_text="To").click()
    assert page.input_value("#say") == "/to Echo "
    page.press("#say", "End")
    page.type("#say", "over to you")
    page.press("#say", "Enter")
    frames_until(echo, "turn", speakers=["Echo"])
    say(echo, "Thank you, chair.")
    page.locator(FINALS, has_text="Thank you, chair.").wait_for()
    colour = str(speaker_colour_index("Echo"))  # the console's colour for Echo, sent by the hub
    assert page.locator(FINALS, has_text="Thank you, chair.").get_attribute("data-colour") == colour
    assert echo_row.get_attribute("data-colour") == colour
    echo_row.locator("button", has_text="Mute").click()
    page.locator("#participants li", has_text="muted").wait_for()
    type_line(page, "/who")
    page.locator("#log .event", has_text="Chair (human, moderator)").wait_for()
    type_line(page, "/nonsense")
    page.locator("#log .error", has_text="Unknown command /nonsense").wait_for()

    with page.expect_download() as download:
        page.click("#download")
    markdown = Path(download.value.path()).read_text(encoding="utf-8")
    assert "**Chair**" in markdown and "> over to you" in markdown and "> Thank you, chair." in markdown
    assert markdown.startswith("# Party Chat transcript") and " UTC" in markdown, "the hub's rendering (export.py)"

    kick = page.locator("#participants li", has_text="Echo").locator("button", has_text="Kick")
    kick.click()
    kick.click()  # the first click only arms it
    page.locator("#log .event", has_text="Echo was removed by Chair").wait_for()
    page.locator("#participants li", has_text="Echo").wait_for(state="detached")
    events = [r.data.get("event") for r in read_records(transcript) if r.kind == "event"]
    assert {"mode", "turns", "muted"} <= set(events)
    page.click("#pause")
    page.locator("#floor .paused").wait_for()
    assert not browser.errors


def test_a_moderator_token_is_asked_for_and_a_wrong_one_moderates_nothing(tmp_path, start_hub, browser):
    hub, _ = start_hub("--moderator-token", "chair")
    page = browser.open(page_url(hub) + "moderate")
    expect(page.locator("#moderator-token")).to_be_visible()
    expect(page.locator("#token-label")).to_be_hidden()
    page.fill("#name", "Guest")
    page.fill("#moderator-token", "wrong")
    page.click("#join-form button[type=submit]")
    page.locator("#connection", has_text="not a moderator").wait_for()
    assert page.locator("#controls").is_hidden()
    type_line(page, "/pause")
    page.locator("#log .error", has_text="Only a moderator").wait_for()


def test_on_a_hub_without_tokens_the_moderator_page_asks_for_a_name_only(tmp_path, start_hub, browser):
    hub, _ = start_hub()
    page = browser.open(page_url(hub) + "moderate")
    expect(page.locator("#name")).to_be_visible()
    expect(page.locator("#moderator-token")).to_be_hidden()
    expect(page.locator("#join-form #token")).to_be_hidden()
    join_as_moderator(page, "Host")
    expect(page.locator("#join-form")).to_be_hidden()


def test_with_a_room_token_the_page_asks_for_it_before_it_shows_anything(tmp_path, start_hub, browser):
    hub, url = start_hub("--token", "s3cret")
    with joined(url, "Ada", token="s3cret") as ada:
        say(ada, "members only")
        frames_until(ada, "message", content="members only")
    page = browser.open(page_url(hub))
    page.locator("#token-form").wait_for(state="visible")
    assert page.locator(FINALS).count() == 0
    page.fill("#token", "wrong")
    page.click("#token-form button")
    page.locator("#log .error", has_text="access token").wait_for()
    page.locator("#token-form").wait_for(state="visible")
    page.fill("#token", "s3cret")
    page.click("#token-form button")
    page.locator(FINALS, has_text="members only").wait_for()


def test_the_page_reconnects_to_a_resumed_hub_and_nothing_is_missed_or_doubled(tmp_path, start_hub, browser):
    transcript = tmp_path / "t.jsonl"
    hub, url = start_hub("--transcript", str(transcript))
    port = url.rsplit(":", 1)[1]
    with joined(url, "Ada") as ada:
        for n in (1, 2, 3):
            say(ada, f"before the restart, {n}")
        page = browser.open(page_url(hub))
        page.locator(FINALS).nth(2).wait_for()

    assert hub.interrupt() == 0
    page.locator('#connection[data-state="offline"]').wait_for()
    hub, url = start_hub("--resume", str(transcript), "--port", port)
    with joined(url, "Ada") as ada:
        say(ada, "after the restart, 4")  # most likely before the page is back: it must come as missed
        page.locator('#connection[data-state="online"]').wait_for(timeout=60_000)
        say(ada, "after the restart, 5")
        page.locator(FINALS).nth(4).wait_for()
    messages = shown(page)
    assert [m["text"] for m in messages] == [f"before the restart, {n}" for n in (1, 2, 3)] + [
        f"after the restart, {n}" for n in (4, 5)]
    assert [m["seq"] for m in messages] == [1, 2, 3, 4, 5]
    assert page.locator("#log .event", has_text="new conversation").count() == 0
