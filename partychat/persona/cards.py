"""Character cards (V1, V2 and V3) as personas: read from a PNG, a JSON file or a CHARX zip.

The specs read for this: malfoyslastname/character-card-spec-v2 (spec_v1.md, spec_v2.md) and
kwaroran/character-card-spec-v3 (SPEC_V3.md). A PNG card keeps its JSON, UTF-8 then base64, in a
text chunk: ``chara`` for V2, ``ccv3`` for V3 (preferred when a file has both, as V3 asks). A CHARX
file is a zip with ``card.json`` at its root.

How the fields map (as SillyTavern users expect): ``system_prompt``, ``description``,
``personality`` and ``scenario`` make the persona text, in that order; ``first_mes`` is the
opening line; ``mes_example`` is example dialogue, the first thing left out when the prompt is
tight; ``post_history_instructions`` goes after the newest message; ``character_book`` is the
persona's own lorebook. ``{{char}}`` (and ``<BOT>``) is the card's nickname, else its name, unless
the cast renames the persona; ``{{user}}`` (and ``<USER>``) is filled in at each turn (see
``fill_macros``). V3 says its cards carry ``system_prompt``, ``first_mes`` etc. in its interface
but also that they are "removed"; every tool that writes V3 cards fills them, so they are used.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .lorebook import MAX_FILE_BYTES, Lorebook, PersonaFileError, book_from_json, read_limited

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CARD_SUFFIXES = (".png", ".json", ".charx")
"""What a folder given as ``--cast DIR`` is searched for."""

TEXT_FIELDS = ("description", "personality", "scenario", "first_mes", "mes_example", "system_prompt",
               "post_history_instructions", "nickname")


@dataclass(frozen=True)
class Card:
    path: Path
    spec: str
    """``v1``, ``chara_card_v2`` or ``chara_card_v3``."""
    name: str
    description: str = ""
    personality: str = ""
    scenario: str = ""
    first_mes: str = ""
    mes_example: str = ""
    system_prompt: str = ""
    post_history_instructions: str = ""
    nickname: str = ""
    book: Lorebook | None = None


def read_card(path: Path) -> Card:
    """The card in a PNG, CHARX or JSON file; raises PersonaFileError with one sentence naming the file."""
    data = read_limited(path, "card")
    if data.startswith(PNG_SIGNATURE):
        text = card_text_from_png(data, path)
    elif data.startswith(b"PK\x03\x04"):
        text = _card_text_from_charx(data, path)
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise PersonaFileError(f"{path}: not a character card (neither a PNG, a CHARX zip nor JSON text).") \
                from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as error:
        raise PersonaFileError(f"{path}: the card's JSON is broken ({error.msg}, line {error.lineno} "
                               f"column {error.colno}).") from None
    return card_from_json(obj, path)


def card_from_json(obj: Any, path: Path) -> Card:
    """A card from its JSON object: V1 (fields at the top), V2 or V3 (fields under ``data``)."""
    if not isinstance(obj, dict):
        raise PersonaFileError(f"{path}: not a character card (its JSON is not an object).")
    spec = obj.get("spec")
    if spec is None and "data" not in obj:
        spec, data = "v1", obj
    elif spec in ("chara_card_v2", "chara_card_v3"):
        _check_version(path, spec, obj.get("spec_version"))
        data = obj.get("data")
        if not isinstance(data, dict):
            raise PersonaFileError(f"{path}: the card has no 'data' object, which {spec} cards keep their fields in.")
    else:
        what = "the card has 'data' but no 'spec'" if spec is None else f"unknown card spec {spec!r}"
        raise PersonaFileError(f"{path}: {what}; this reads chara_card_v2, chara_card_v3 and V1 cards.")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise PersonaFileError(f"{path}: the card has no name.")
    fields = {}
    for key in TEXT_FIELDS:
        value = data.get(key)
        if value is not None and not isinstance(value, str):
            raise PersonaFileError(f"{path}: the card's field {key!r} must be text, not {type(value).__name__}.")
        fields[key] = (value or "").strip()
    book = data.get("character_book")
    return Card(path=path, spec=spec, name=name.strip(), **fields,
                book=None if book is None else book_from_json(book, f"{path}: character_book", name, own=True))


def _check_version(path: Path, spec: str, version: Any) -> None:
    """Refuse a spec version of another major number; a later minor one reads (V3 asks for that)."""
    major = "2" if spec == "chara_card_v2" else "3"
    if version is None and major == "2":  # the first V2 cards had no spec_version
        return
    try:
        number = float(str(version))
    except ValueError:
        number = -1.0
    if number < 0 or int(number) != int(major):
        raise PersonaFileError(f"{path}: unknown spec_version {version!r} for {spec}; this reads {major}.x.")


def card_text_from_png(data: bytes, path: Path) -> str:
    """The card's JSON text from a PNG's ``ccv3`` or ``chara`` chunk (base64 of UTF-8)."""
    chunks = png_text_chunks(data, path)
    keyword = next((k for k in ("ccv3", "chara") if k in chunks), None)
    if keyword is None:
        raise PersonaFileError(f"{path}: this PNG holds no character card (no 'chara' or 'ccv3' text chunk).")
    value = chunks[keyword].strip()
    try:
        return base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        if value.startswith("{"):  # a few writers store the JSON itself
            return value
        raise PersonaFileError(f"{path}: the PNG's '{keyword}' chunk is not base64 of UTF-8 text.") from None


def png_text_chunks(data: bytes, path: Path) -> dict[str, str]:
    """Every tEXt, zTXt and iTXt chunk of a PNG, by keyword (the first of each keyword wins).

    A small standard-library reader rather than a library: Pillow is not a dependency (a large
    compiled package for what is a walk over length-prefixed chunks), and pypng, the pure-Python
    one, has had no release since 2022 and hands back raw chunk bytes, so the text-chunk parsing
    below would be needed with it too. Chunk CRCs are not checked: a damaged text chunk shows up
    as broken base64 or JSON anyway.
    """
    chunks: dict[str, str] = {}
    offset = len(PNG_SIGNATURE)
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        body = data[offset + 8:offset + 8 + length]
        if len(body) < length:
            raise PersonaFileError(f"{path}: the PNG is cut short (a {kind.decode('latin-1')} chunk runs past "
                                   "its end).")
        offset += 12 + length
        if kind == b"IEND":
            break
        text = _text_chunk(kind, body)
        if text is not None:
            chunks.setdefault(*text)
    return chunks


def _text_chunk(kind: bytes, body: bytes) -> tuple[str, str] | None:
    keyword, _, rest = body.partition(b"\0")
    name = keyword.decode("latin-1")
    try:
        if kind == b"tEXt":
            return name, rest.decode("latin-1")
        if kind == b"zTXt":
            return name, _inflate(rest[1:]).decode("latin-1")
        if kind == b"iTXt":
            compressed, rest = rest[0], rest[2:]
            _, _, rest = rest.partition(b"\0")  # language tag
            _, _, rest = rest.partition(b"\0")  # translated keyword
            return name, (_inflate(rest) if compressed else rest).decode("utf-8")
    except (zlib.error, UnicodeDecodeError, IndexError):
        return None
    return None


def _inflate(data: bytes) -> bytes:
    """zlib-decompress, refusing to grow past the file limit (a small chunk cannot become gigabytes)."""
    inflater = zlib.decompressobj()
    out = inflater.decompress(data, MAX_FILE_BYTES)
    if inflater.unconsumed_tail:
        raise zlib.error("text chunk too large")
    return out


def _card_text_from_charx(data: bytes, path: Path) -> str:
    """``card.json`` from a CHARX zip (its assets are not used)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            try:
                info = archive.getinfo("card.json")
            except KeyError:
                raise PersonaFileError(f"{path}: this CHARX file has no card.json at its root.") from None
            if info.flag_bits & 0x1:
                raise PersonaFileError(f"{path}: this CHARX file is encrypted, which is not supported.")
            if info.file_size > MAX_FILE_BYTES:
                raise PersonaFileError(f"{path}: its card.json is over {MAX_FILE_BYTES // 2**20} MB.")
            return archive.read(info).decode("utf-8-sig")
    except (zipfile.BadZipFile, NotImplementedError, UnicodeDecodeError, OSError) as error:
        raise PersonaFileError(f"{path}: cannot read this CHARX zip ({error}).") from None


_MACRO = re.compile(r"\{\{\s*(char|user|original)\s*\}\}|<(bot|char|user)>|\{\{//.*?\}\}", re.IGNORECASE | re.DOTALL)


def fill_macros(text: str, char: str | None = None, user: str | None = None) -> str:
    """Replace ``{{char}}``/``<BOT>``/``<char>`` and ``{{user}}``/``<USER>`` (any case); a None value leaves it.

    ``{{original}}`` (the user's own system prompt, which a card's may include) becomes nothing:
    this room has none apart from its group-chat rules, which always follow. ``{{// note}}`` is a
    comment and goes too.
    """

    def one(match: re.Match[str]) -> str:
        word = (match.group(1) or match.group(2) or "").lower()
        if word in ("char", "bot"):
            return char if char is not None else match.group(0)
        if word == "user":
            return user if user is not None else match.group(0)
        return ""

    return _MACRO.sub(one, text)


def persona_text(card: Card, char: str) -> str:
    """The persona block of a card: system prompt, description, personality, scenario."""
    parts = [card.system_prompt, card.description,
             f"{char}'s personality: {card.personality}" if card.personality else "",
             f"Scenario: {card.scenario}" if card.scenario else ""]
    text = "\n\n".join(part for part in parts if part)
    return fill_macros(text, char=char) or f"You are {char}."


def example_dialogue(card: Card, char: str) -> str:
    """``mes_example`` as a block for the system turn, its ``<START>`` separators as blank lines."""
    blocks = [block.strip() for block in re.split(r"<start>", card.mes_example, flags=re.IGNORECASE)]
    blocks = [block for block in blocks if block]
    if not blocks:
        return ""
    return fill_macros(f"Examples of how {char} speaks:\n" + "\n\n".join(blocks), char=char)


def card_files(folder: Path) -> list[Path]:
    """The cards in a folder, by name (so a cast folder joins in a predictable order)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in CARD_SUFFIXES)
