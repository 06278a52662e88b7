"""Character cards and lorebooks: what lands in the prompt a persona builds, bad cards, and a card in a room.

The cards are built here (V2 and V3 PNGs with their text chunks, JSON, CHARX); prompts are read
straight from build_request, with the embedded model's tokenizer counting the tokens.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
from helpers import build_tiny_model, join, model_messages, next_frame, say, script

from partychat.engines.models import ModelSource, load
from partychat.engines.transformers_engine import TransformersChatModel
from partychat.persona.cast import CastError, Persona, from_card, load_card, read_cast_file
from partychat.persona.generation import GenerationSettings, build_request
from partychat.persona.lorebook import Lore, read_lorebook
from partychat.persona.participant import ParticipantConfig, prompt_parts
from partychat.protocol import Chat

BASE = Persona(name="", system_prompt="")


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_card(path: Path, chunks: dict[str, dict], itxt: bool = False) -> Path:
    """A 1x1 grey PNG carrying each card as base64 JSON in a tEXt (or iTXt) chunk named by its key."""
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
    data += chunk(b"IDAT", zlib.compress(b"\x00\x80"))
    for keyword, card in chunks.items():
        value = base64.b64encode(json.dumps(card).encode())
        if itxt:
            data += chunk(b"iTXt", keyword.encode() + b"\x00\x00\x00\x00\x00" + value)
        else:
            data += chunk(b"tEXt", keyword.encode() + b"\x00" + value)
    path.write_bytes(data + chunk(b"IEND", b""))
    return path


def card_data(**fields) -> dict:
    return {"name": "Mira", "description": "", "personality": "", "scenario": "", "first_mes": "",
            "mes_example": "", "creator_notes": "", "system_prompt": "", "post_history_instructions": "",
            "alternate_greetings": [], "tags": [], "creator": "", "character_version": "", "extensions": {}, **fields}


def v2(**fields) -> dict:
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": card_data(**fields)}


def v3(**fields) -> dict:
    return {"spec": "chara_card_v3", "spec_version": "3.0", "data": card_data(group_only_greetings=[], **fields)}


def book(*entries: dict, **fields) -> dict:
    return {"extensions": {}, "entries": [{"extensions": {}, "enabled": True, "insertion_order": 10, **entry}
                                          for entry in entries], **fields}


def json_file(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Counts tokens with the embedded model's tokenizer and chat template (the weights are a tiny stand-in)."""
    opened = TransformersChatModel(load(ModelSource("folder", str(build_tiny_model(tmp_path_factory.mktemp("tiny"))))))
    yield opened
    asyncio.run(opened.aclose())


def config(persona: Persona) -> ParticipantConfig:
    """As client.py makes it from a persona."""
    return ParticipantConfig(name=persona.name, system_prompt=persona.system_prompt, examples=persona.examples,
                             after_history=persona.after_history, books=persona.books)


def chats(*pairs: tuple[str, str]) -> list[Chat]:
    return [Chat(sender=sender, content=text, seq=n, role="human" if sender == "Ann" else "model")
            for n, (sender, text) in enumerate(pairs, start=1)]


def prompt(model, persona: Persona | ParticipantConfig, history: list[Chat], user: str = "Ann",
           settings: GenerationSettings | None = None) -> list[dict[str, str]]:
    persona_config = persona if isinstance(persona, ParticipantConfig) else config(persona)
    text, extras = prompt_parts(persona_config, user)
    request = asyncio.run(build_request(model, text, persona_config.name, history, settings or GenerationSettings(),
                                        extras))
    return list(request.messages)


def joined(messages: list[dict[str, str]]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


# Cards as personas

def test_a_v2_png_cards_fields_land_in_the_prompt_with_macros_replaced(tmp_path, model):
    path = png_card(tmp_path / "mira.png", {"chara": v2(
        system_prompt="Write {{char}}'s next line.", description="{{char}} keeps the lamp for {{user}}.",
        personality="calm, dry", scenario="A storm over <BOT>'s island.", first_mes="Welcome, {{user}}.",
        mes_example="<START>\n{{user}}: Is it safe?\n{{char}}: Safe as <USER> wants it.",
        post_history_instructions="Stay as {{Char}}.")})
    persona = from_card(load_card(path), BASE)
    assert persona.name == "Mira" and persona.initial_prompt == "Welcome, {{user}}."
    messages = prompt(model, persona, chats(("Ann", "Hello?")))
    system = messages[0]["content"]
    assert system.startswith("Write Mira's next line.\n\nMira keeps the lamp for Ann.\n\n"
                             "Mira's personality: calm, dry\n\nScenario: A storm over Mira's island.")
    assert "Examples of how Mira speaks:\nAnn: Is it safe?\nMira: Safe as Ann wants it." in system
    assert messages[-1] == {"role": "user", "content": "Ann: Hello?\n\nStay as Mira."}
    assert "{{" not in joined(messages) and "<USER>" not in joined(messages)
    everyone = prompt(model, persona, chats(("Ann", "Hello?")), user="everyone")
    assert "Mira keeps the lamp for everyone." in everyone[0]["content"]


def test_a_v3_png_is_read_from_its_ccv3_chunk_and_char_is_its_nickname(tmp_path, model):
    for itxt in (False, True):
        path = png_card(tmp_path / f"nova-{itxt}.png", {
            "chara": v2(name="Old V2 copy", description="stale"),
            "ccv3": v3(name="Nova Starling", nickname="Nova", description="{{char}} charts the stars.",
                       first_mes="{{char}} here.")}, itxt=itxt)
        card = load_card(path)
        assert card.spec == "chara_card_v3" and card.name == "Nova Starling"
        persona = from_card(card, BASE)
        assert persona.name == "Nova Starling" and persona.initial_prompt == "Nova here."
        assert prompt(model, persona, chats(("Ann", "Hi")))[0]["content"].startswith("Nova charts the stars.")


def test_json_cards_of_every_version_and_a_charx_zip(tmp_path):
    v1 = json_file(tmp_path / "v1.json", {"name": "Pip", "description": "A V1 card.", "personality": "",
                                          "scenario": "", "first_mes": "Hi", "mes_example": ""})
    assert (load_card(v1).spec, load_card(v1).description) == ("v1", "A V1 card.")
    assert load_card(json_file(tmp_path / "v2.json", v2(description="Two."))).description == "Two."
    assert load_card(json_file(tmp_path / "v3.json", v3(description="Three."))).description == "Three."
    charx = tmp_path / "card.charx"
    with zipfile.ZipFile(charx, "w") as archive:
        archive.writestr("card.json", json.dumps(v3(name="Zip", description="From a zip.")))
        archive.writestr("assets/icon/images/main.png", b"not really")
    assert (load_card(charx).name, load_card(charx).description) == ("Zip", "From a zip.")


def test_cast_fields_override_the_card_and_a_folder_of_cards_is_a_cast(tmp_path):
    cards = tmp_path / "cards"
    cards.mkdir()
    png_card(cards / "b-mira.png", {"chara": v2(description="{{char}} keeps the lamp.", first_mes="Hello.")})
    json_file(cards / "a-quill.json", v3(name="Quill", description="A scribe."))
    folder = read_cast_file(cards, BASE)
    assert [p.name for p in folder] == ["Quill", "Mira"], "a folder joins in file-name order"

    (tmp_path / "plain.txt").write_text("You are a plain persona.", encoding="utf-8")
    cast = tmp_path / "cast.toml"
    cast.write_text('[[persona]]\ncard = "cards/b-mira.png"\n\n'
                    '[[persona]]\ncard = "cards/b-mira.png"\nname = "Mara"\ninitial_prompt = "Hi all."\n'
                    'temperature = 0.1\n\n'
                    '[[persona]]\ncard = "cards/a-quill.json"\nprompt_file = "plain.txt"\n', encoding="utf-8")
    mira, mara, quill = read_cast_file(cast, BASE)
    assert (mira.name, mira.initial_prompt, mira.system_prompt) == ("Mira", "Hello.", "Mira keeps the lamp.")
    assert (mara.name, mara.initial_prompt, mara.temperature) == ("Mara", "Hi all.", 0.1)
    assert mara.system_prompt == "Mara keeps the lamp.", "a renamed card persona is {{char}} under its new name"
    assert quill.system_prompt == "You are a plain persona."


# Lorebooks

def lore_persona(*entries: dict, **book_fields) -> Persona:
    card = {"spec": "chara_card_v2", "data": card_data(description="Keeper.", character_book=book(*entries,
                                                                                                   **book_fields))}
    from partychat.persona.cards import card_from_json

    return from_card(card_from_json(card, Path("inline.json")), BASE)


def test_an_entry_fires_on_its_key_and_not_otherwise(model):
    persona = lore_persona({"keys": ["glass tower"], "content": "The Glass Tower hums at night."})
    quiet = prompt(model, persona, chats(("Ann", "How is the weather?")))
    assert "Glass Tower hums" not in joined(quiet)
    fired = prompt(model, persona, chats(("Ann", "How is the weather?"), ("Ann", "Tell me of the GLASS TOWER.")))
    assert fired[-1]["content"] == ("Ann: How is the weather?\n[Lore] The Glass Tower hums at night.\n"
                                    "Ann: Tell me of the GLASS TOWER."), "just before the message that holds the key"


@pytest.mark.parametrize(("logic", "text", "fires"), [
    (0, "the tower and the sea", True), (0, "the tower alone", False),          # and any
    (1, "tower, sea and storm", False), (1, "the tower and the sea", True),    # not all
    (2, "the tower alone", True), (2, "the tower in a storm", False),          # not any
    (3, "tower, sea and storm", True), (3, "the tower and the sea", False),    # and all
])
def test_secondary_keys_follow_sillytaverns_logic_in_a_world_info_file(tmp_path, model, logic, text, fires):
    world = json_file(tmp_path / "world.json", {"entries": {"0": {
        "uid": 0, "key": ["tower"], "keysecondary": ["sea", "storm"], "selectiveLogic": logic,
        "content": "Lore of the tower.", "comment": "Tower", "constant": False, "selective": True, "order": 100,
        "position": 0, "disable": False, "caseSensitive": None}}})
    persona = Persona(name="Sage", system_prompt="You are Sage.", books=(read_lorebook(world),))
    assert ("Lore of the tower." in joined(prompt(model, persona, chats(("Ann", text))))) == fires


def test_case_sensitivity_is_per_entry_and_constant_and_disabled_entries_do_what_they_say(model):
    persona = lore_persona(
        {"keys": ["Bell"], "content": "The Bell is bronze.", "case_sensitive": True},
        {"keys": ["rope"], "content": "The rope is old.", "case_sensitive": False},
        {"keys": [], "content": "It is always winter here.", "constant": True},
        {"keys": ["bell"], "content": "Never shown.", "enabled": False})
    lower = joined(prompt(model, persona, chats(("Ann", "ring the bell, pull the ROPE"))))
    assert "The rope is old." in lower and "It is always winter here." in lower
    assert "bronze" not in lower and "Never shown." not in lower
    assert "The Bell is bronze." in joined(prompt(model, persona, chats(("Ann", "Ring the Bell"))))


def test_entries_go_in_insertion_order_and_a_cards_selective_flag_gates_its_secondary_keys(model):
    persona = lore_persona(
        {"keys": ["harbour"], "content": "Second.", "insertion_order": 20},
        {"keys": ["harbour"], "content": "First.", "insertion_order": 5},
        {"keys": ["harbour"], "secondary_keys": ["ship"], "selective": True, "content": "Needs a ship."},
        {"keys": ["harbour"], "secondary_keys": ["ship"], "content": "Not selective: secondary ignored."})
    last = prompt(model, persona, chats(("Ann", "The harbour is calm.")))[-1]["content"]
    assert last.index("First.") < last.index("Second.")
    assert "Needs a ship." not in last and "Not selective: secondary ignored." in last


def test_the_prompt_only_grows_at_its_end_between_cuts(model):
    """Lore placed for an earlier message stays where it was; new lore comes just before the new message."""
    persona = lore_persona({"keys": ["tower"], "content": "Tower lore."}, {"keys": ["lamp"], "content": "Lamp lore."})
    history = chats(("Ann", "Hello."), ("Ann", "The tower?"), ("Mira", "It stands."), ("Ann", "And the lamp?"))
    settings = GenerationSettings(history_length=10)
    before = joined(prompt(model, persona, history[:3], settings=settings))
    after = joined(prompt(model, persona, history, settings=settings))
    # the closing "(Continue ...)" turn and the topic note after it are a tail that the next prompt moves
    assert after.startswith(before[: before.index("\nuser: (Continue the conversation.)")])
    assert after.endswith("[Lore] Lamp lore.\nAnn: And the lamp?") and after.count("Tower lore.") == 1


def test_the_budget_drops_examples_then_lore_by_priority_before_any_history(model):
    filler = " ".join(["words"] * 40)
    persona = lore_persona(
        {"keys": ["tower"], "content": "Vital tower lore. " + filler, "priority": 9},
        {"keys": ["tower"], "content": "Minor tower lore. " + filler, "priority": 1},
        {"keys": ["tower"], "content": "Middling tower lore. " + filler, "priority": 5})
    persona = Persona(**{**persona.__dict__, "examples": "Examples of how Mira speaks:\n" + filler})
    history = chats(("Ann", f"First message {filler}"), ("Ann", f"Second message {filler}"), ("Ann", "The tower?"))
    bare = Persona(name=persona.name, system_prompt=persona.system_prompt)

    async def tokens(messages: list[dict[str, str]]) -> int:
        from partychat.engines.base import ChatRequest

        return await model.count_tokens(ChatRequest(tuple(messages), "Mira"))

    history_only = asyncio.run(tokens(prompt(model, bare, history)))
    roomy = prompt(model, persona, history)
    assert all(text in joined(roomy) for text in ("Vital", "Minor", "Middling", "Examples of how"))
    full = asyncio.run(tokens(roomy))
    entry = (full - history_only) // 5  # four blocks of about the same size, and more
    settings = GenerationSettings(max_context_tokens=100 + history_only + entry + entry // 2, max_tokens=100)
    tight = joined(prompt(model, persona, history, settings=settings))
    assert "First message" in tight and "Second message" in tight, "history is kept while lore can give way"
    assert "Vital tower lore" in tight
    assert "Minor tower lore" not in tight and "Middling tower lore" not in tight and "Examples of how" not in tight
    tighter = GenerationSettings(max_context_tokens=100 + history_only - 5, max_tokens=100)
    cut = joined(prompt(model, persona, history, settings=tighter))
    assert "[Lore]" not in cut and "First message" not in cut and "The tower?" in cut


def test_a_cards_book_reaches_only_its_persona_and_a_shared_book_reaches_all(tmp_path, model):
    png_card(tmp_path / "mira.png", {"chara": v2(character_book=book(
        {"keys": ["tower"], "content": "Mira's own secret of the tower."}))})
    world = json_file(tmp_path / "world.json", {"entries": {"0": {"key": ["tower"], "content": "Everyone knows "
                                                                  "the tower is old."}}})
    (tmp_path / "sage.txt").write_text("You are Sage.", encoding="utf-8")
    cast = tmp_path / "cast.toml"
    cast.write_text('[[persona]]\ncard = "mira.png"\n\n[[persona]]\nname = "Sage"\nprompt_file = "sage.txt"\n',
                    encoding="utf-8")
    shared = (read_lorebook(world),)
    mira, sage = (Persona(**{**p.__dict__, "books": p.books + shared}) for p in read_cast_file(cast, BASE))
    history = chats(("Ann", "What about the tower?"))
    assert "Mira's own secret" in joined(prompt(model, mira, history))
    sages = joined(prompt(model, sage, history))
    assert "Mira's own secret" not in sages and "Everyone knows the tower is old." in sages


def test_lore_reports_what_fired_for_the_newest_messages():
    persona = lore_persona({"keys": ["tower"], "content": "T.", "name": "Tower"}, {"keys": ["lamp"], "content": "L."})
    lore = Lore(persona.books)
    window = chats(("Ann", "the lamp"), ("Ann", "a"), ("Ann", "b"), ("Ann", "the tower"))
    assert [entry.label for entry in lore.fired(window)] == ["Tower"]


# Bad cards: one sentence, exit code 2, before any model loads

def _bad_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    no_chunk = tmp_path / "plain.png"
    no_chunk.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
                         + chunk(b"IEND", b""))
    broken = tmp_path / "broken.json"
    broken.write_text('{"spec": "chara_card_v2", "data": {"name": "X",', encoding="utf-8")
    nameless = png_card(tmp_path / "nameless.png", {"chara": v2(name="")})
    future = json_file(tmp_path / "future.json", {**v3(), "spec_version": "4.0"})
    unknown = json_file(tmp_path / "unknown.json", {**v2(), "spec": "chara_card_v9"})
    huge = tmp_path / "huge.png"
    with huge.open("wb") as sparse:
        sparse.truncate(21 * 2**20)
    charx = tmp_path / "empty.charx"
    with zipfile.ZipFile(charx, "w") as archive:
        archive.writestr("readme.txt", "no card")
    cast = tmp_path / "cast.toml"
    cast.write_text('[[persona]]\nname = "A"\ncard = "nameless.png"\n', encoding="utf-8")
    bad_book = tmp_path / "book.json"
    bad_book.write_text('{"entries": {"0": {"key": "tower", "content": 5}}}', encoding="utf-8")
    good = json_file(tmp_path / "good.json", v2())
    return [
        (["--card", str(no_chunk)], "no 'chara' or 'ccv3' text chunk"),
        (["--card", str(broken)], "JSON is broken"),
        (["--card", str(nameless)], "has no name"),
        (["--card", str(future)], "unknown spec_version '4.0'"),
        (["--card", str(unknown)], "unknown card spec 'chara_card_v9'"),
        (["--card", str(huge)], "the limit is 20 MB"),
        (["--card", str(charx)], "no card.json"),
        (["--card", str(tmp_path / "missing.png")], "no such card file"),
        (["--cast", str(cast)], "persona 1 ('A'), field 'card'"),
        (["--card", str(good), "--lorebook", str(bad_book)], "'content' must be text"),
    ]


def test_every_bad_card_is_one_sentence_naming_the_file_and_exit_code_2(tmp_path):
    cases = _bad_cases(tmp_path)
    runs = [subprocess.Popen([sys.executable, script("client.py"), *args, "--model", "/no/such/model.gguf"],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             stdin=subprocess.DEVNULL) for args, _ in cases]
    for (args, phrase), run in zip(cases, runs, strict=True):
        _, stderr = run.communicate(timeout=120)
        assert run.returncode == 2, (args, stderr)
        assert "Traceback" not in stderr and stderr.strip().count("\n") == 0, stderr
        assert phrase in stderr, (phrase, stderr)
        named = next(arg for arg in reversed(args) if arg.endswith((".png", ".json", ".charx", ".toml")))
        assert Path(named).name in stderr, stderr
        assert "no/such/model" not in stderr, "the card is refused before the model is looked at"


def test_the_cast_reader_turns_a_bad_card_into_a_cast_error(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{", encoding="utf-8")
    with pytest.raises(CastError, match=r"broken\.json: the card's JSON is broken"):
        load_card(broken)


# A real persona from a card, in a room

def test_a_persona_from_a_card_greets_and_answers_in_a_room_with_its_lore(tmp_path, start_hub, start_client):
    card = png_card(tmp_path / "mira.png", {"chara": v2(
        description="{{char}} is a lighthouse keeper on a windy island.", first_mes="Welcome, {{user}}.",
        character_book=book({"keys": ["lamp"], "content": "The lamp burns whale oil.", "name": "Lamp"}))})
    _, url = start_hub()

    async def scenario() -> None:
        ws, _ = await join(url, "Ann", "human", protocol=1)
        client = start_client("--card", str(card), "--server", url, "--max-generation-tokens", "24",
                              "--temperature", "0", "--log-level", "DEBUG")
        greeting = await next_frame(ws, "message", timeout=240, **{"from": "Mira"})
        assert greeting["content"] == "Welcome, everyone.", "nobody had spoken: {{user}} is everyone"
        await say(ws, "What does your lamp burn?")
        [reply] = await model_messages(ws, 1, timeout=180)
        assert reply["from"] == "Mira" and reply["content"].strip()
        await ws.close()
        assert "Lore for Mira's turn: fired Lamp; in the prompt 1 entries" in client.output, client.output

    asyncio.run(scenario())


def test_the_shipped_card_examples_are_valid():
    from helpers import ROOT

    mira, bramble = read_cast_file(ROOT / "casts" / "harbour.toml", BASE)
    assert (mira.name, bramble.name) == ("Mira Hale", "Bramble")
    assert mira.initial_prompt and mira.examples and mira.books and bramble.books
    assert "Bramble" in bramble.system_prompt and "{{char}}" not in bramble.system_prompt
    assert [p.name for p in read_cast_file(ROOT / "casts" / "cards", BASE)] == ["Captain Tobias Bramble", "Mira Hale"]
    assert len(read_lorebook(ROOT / "casts" / "harbour-lore.json").entries) == 2
