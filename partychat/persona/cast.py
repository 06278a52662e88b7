"""Who a client.py process plays: one persona or a whole cast, from flags, a TOML cast file or character cards.

A cast file is a list of ``[[persona]]`` tables (see ``casts/``); a folder of character cards is a
cast too. Anything a persona leaves out comes from client.py's flags; a field or flag given
overrides the persona's card. Errors name the file, the entry and the field, so a typo in entry
six of a seven-persona panel is found without guessing.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from ..bundled import casts_folder, prompts_folder
from ..engines.registry import ENGINE_CHOICES
from .cards import Card, card_files, example_dialogue, fill_macros, persona_text, read_card
from .lorebook import Lorebook, PersonaFileError
from .retries import DEFAULT_RETRIES, MAX_RETRIES


class CastError(Exception):
    """A persona that cannot be played as described, in a sentence naming where the problem is."""


@dataclass(frozen=True)
class Persona:
    """One participant to run: its name and system prompt, how it writes, and which model speaks for it."""

    name: str
    system_prompt: str
    temperature: float = 0.7
    delay: float = 0.0
    max_tokens: int = 100
    initial_prompt: str | None = None
    model: str = ""
    engine: str = "auto"
    talkativeness: float | None = None
    """Weight in the hub's natural-mode draw, 0 to 1; None leaves the hub's default."""
    anti_copy: bool = True
    """Decode so the reply never copies a word n-gram of the other recent messages."""
    retries: int = DEFAULT_RETRIES
    """Attempts after the first when a guard would withhold the reply (see persona/retries.py)."""
    examples: str = ""
    """Example dialogue, from a card."""
    after_history: str = ""
    """Instructions after the newest message, from a card."""
    books: tuple[Lorebook, ...] = ()
    """Lorebooks only this persona reads: its card's own."""
    offstage: bool = False
    """Join off stage: take no turns and hear nothing until the moderator brings it on (``/enter``)."""


CAST_FIELDS = ("name", "prompt_file", "temperature", "delay", "max_tokens", "initial_prompt", "model", "engine",
               "talkativeness", "card", "secret", "offstage", "retries", "anti_copy")
SECRET_LINE = "A secret only you know, which the others have not been told: {secret}"
"""How a cast entry's ``secret`` joins its persona text: the one prompt it goes into."""


def shipped_candidates(value: str, shipped: Path, suffix: str) -> list[Path]:
    """Where a name may stand in a shipped folder: ``sage``, ``sage.txt`` and ``prompts/sage.txt`` alike.

    The last form is how the original project's README writes it, relative to a checkout; an
    installed copy has no checkout around it, so the folder's own name is taken off and looked up.
    """
    given = Path(value)
    names = [given]
    if len(given.parts) == 2 and given.parts[0] == shipped.name:
        names.append(Path(given.parts[1]))
    found = []
    for name in names:
        found += [shipped / name, shipped / f"{name}{suffix}"]
    return found


def find_prompt_file(value: str, folder: Path | None = None) -> Path:
    """The path as given (relative to ``folder`` when one is given), else the same name in the shipped prompts."""
    given = Path(value).expanduser()
    candidates = [folder / given] if folder is not None and not given.is_absolute() else [given]
    shipped = prompts_folder()
    candidates += shipped_candidates(value, shipped, ".txt")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    where = f"{folder} and {shipped}" if folder is not None else f"here and in {shipped}"
    raise CastError(f"Prompt file not found: {value} (looked {where})")


def find_cast_file(value: str) -> Path:
    """The cast file (or folder of cards) as given, else the same name among the shipped casts (``panel``)."""
    given = Path(value).expanduser()
    shipped = casts_folder()
    for candidate in [given, *shipped_candidates(value, shipped, ".toml")]:
        if candidate.is_file() or candidate.is_dir():
            return candidate
    raise CastError(f"Cast file not found: {value} (looked here and in {shipped})")


def read_persona(value: str | None, name: str, folder: Path | None = None) -> str:
    """The persona text from a prompt file; a friendly default when there is none."""
    if not value:
        return f"You are {name}, a friendly and thoughtful conversationalist."
    path = find_prompt_file(value, folder)
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise CastError(f"Cannot read prompt file {path}: {error}") from error
    if not text:
        raise CastError(f"Prompt file {path} is empty.")
    return text


def from_flag(value: str, base: Persona) -> Persona:
    """A ``--persona "NAME=PROMPT_FILE"`` value; the prompt file may be left out."""
    name, _, prompt_file = value.partition("=")
    name = name.strip()
    if not name:
        raise CastError(f"--persona {value!r}: give it as NAME=PROMPT_FILE, for example \"Zen Sage=sage.txt\".")
    try:
        return replace(base, name=name, system_prompt=read_persona(prompt_file.strip(), name))
    except CastError as error:
        raise CastError(f"--persona {value!r}: {error}") from None


def load_card(path: Path) -> Card:
    """A character card, its problems as CastError."""
    try:
        return read_card(path)
    except PersonaFileError as error:
        raise CastError(str(error)) from None


def from_card(card: Card, base: Persona, name: str | None = None) -> Persona:
    """The persona a card describes; ``name`` renames it (``{{char}}`` follows), ``base`` gives the rest."""
    char = name or card.nickname or card.name
    return replace(base, name=name or card.name, system_prompt=persona_text(card, char),
                   initial_prompt=fill_macros(card.first_mes, char=char) or None,
                   examples=example_dialogue(card, char),
                   after_history=fill_macros(card.post_history_instructions, char=char),
                   books=(card.book,) if card.book is not None and card.book.entries else ())


def read_card_folder(folder: Path, base: Persona) -> list[Persona]:
    """A folder as a cast: each card in it (PNG, JSON, CHARX) is a persona, in file-name order."""
    paths = card_files(folder)
    if not paths:
        raise CastError(f"{folder}: no character cards here (.png, .json or .charx files).")
    return [from_card(load_card(path), base) for path in paths]


def read_cast_file(path: Path, base: Persona) -> list[Persona]:
    """Every persona of a cast file, or of a folder of cards; fields left out take ``base``'s values.

    Raises CastError.
    """
    path = find_cast_file(str(path))
    if path.is_dir():
        return read_card_folder(path, base)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CastError(f"Cast file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CastError(f"Cannot read cast file {path}: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise CastError(f"{path} is not valid TOML: {error}") from None
    extra = sorted(set(data) - {"persona"})
    if extra:
        raise CastError(f"{path}: unknown key {extra[0]!r}; a cast file holds [[persona]] tables only.")
    entries = data.get("persona")
    if not isinstance(entries, list) or not entries:
        raise CastError(f"{path} has no [[persona]] tables.")
    cast: list[Persona] = []
    for number, entry in enumerate(entries, start=1):
        persona = _entry(path, number, entry, base)
        clash = next((i for i, other in enumerate(cast, 1) if other.name.casefold() == persona.name.casefold()), None)
        if clash is not None:
            raise CastError(f"{path}: persona {number} ({persona.name!r}), field 'name': "
                            f"persona {clash} already has that name (names are unique, case aside).")
        cast.append(persona)
    return cast


def _entry(path: Path, number: int, entry: Any, base: Persona) -> Persona:
    where = f"{path}: persona {number}"
    if not isinstance(entry, dict):
        raise CastError(f"{where} is not a table; write it as [[persona]] with name = \"...\" below.")
    given = entry.get("name")
    card = _entry_card(f"{where} ({given!r})" if isinstance(given, str) and given.strip() else where, entry,
                       path.parent)
    name = entry.get("name", card.name if card is not None else None)
    if not isinstance(name, str) or not name.strip():
        raise CastError(f"{where}, field 'name': every persona needs a name (a non-empty string).")
    where = f"{where} ({name!r})"
    if card is not None:
        base = from_card(card, base, name.strip() if "name" in entry else None)
    unknown = sorted(set(entry) - set(CAST_FIELDS))
    if unknown:
        raise CastError(f"{where}: unknown field {unknown[0]!r}; the fields are {', '.join(CAST_FIELDS)}.")

    def field(key: str, kind: type | tuple[type, ...], check: Any = None, problem: str = "") -> Any:
        if key not in entry:
            return getattr(base, key)
        value = entry[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            wanted = {int: "a whole number", str: "a string"}.get(kind, "a number")  # type: ignore[call-overload]
            raise CastError(f"{where}, field {key!r}: must be {wanted}, not {value!r}.")
        if check is not None and not check(value):
            raise CastError(f"{where}, field {key!r}: {problem}, not {value!r}.")
        return value

    try:
        prompt_file = entry.get("prompt_file")
        if prompt_file is not None and not isinstance(prompt_file, str):
            raise CastError(f"must be a string, not {prompt_file!r}")
        if prompt_file is not None or card is None:
            text = read_persona(prompt_file, name.strip(), path.parent)
        else:
            text = base.system_prompt
    except CastError as error:
        raise CastError(f"{where}, field 'prompt_file': {error}") from None
    secret = field("secret", str) if "secret" in entry else ""
    if secret.strip():
        text = f"{text}\n\n{SECRET_LINE.format(secret=secret.strip())}"
    offstage = entry.get("offstage", False)
    if not isinstance(offstage, bool):
        raise CastError(f"{where}, field 'offstage': must be true or false, not {offstage!r}.")
    anti_copy = entry.get("anti_copy", base.anti_copy)
    if not isinstance(anti_copy, bool):
        raise CastError(f"{where}, field 'anti_copy': must be true or false, not {anti_copy!r}.")
    model = field("model", str)
    if model.startswith(("./", "../")):
        model = str((path.parent / model).resolve())  # relative to the cast file, like its prompt files
    return Persona(
        name=name.strip(),
        system_prompt=text,
        temperature=float(field("temperature", (int, float), lambda v: v >= 0, "must be 0 or more")),
        delay=float(field("delay", (int, float), lambda v: v >= 0, "must be 0 or more")),
        max_tokens=field("max_tokens", int, lambda v: v >= 1, "must be a whole number, at least 1"),
        initial_prompt=field("initial_prompt", str) or None,
        model=model,
        engine=field("engine", str, lambda v: v in ENGINE_CHOICES, f"must be one of {', '.join(ENGINE_CHOICES)}"),
        talkativeness=_number_or_none(field("talkativeness", (int, float), lambda v: 0 <= v <= 1,
                                            "must be a number from 0 to 1")),
        retries=field("retries", int, lambda v: 0 <= v <= MAX_RETRIES,
                      f"must be a whole number from 0 to {MAX_RETRIES}"),
        examples=base.examples,
        after_history=base.after_history,
        books=base.books,
        offstage=offstage,
        anti_copy=anti_copy,
    )


def _entry_card(where: str, entry: dict[str, Any], folder: Path) -> Card | None:
    """The entry's ``card``, relative to the cast file, or None."""
    value = entry.get("card")
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise CastError(f"{where}, field 'card': must be a card file's path, not {value!r}.")
    try:
        return load_card(folder / Path(value).expanduser())
    except CastError as error:
        raise CastError(f"{where}, field 'card': {error}") from None


def _number_or_none(value: float | None) -> float | None:
    return None if value is None else float(value)
