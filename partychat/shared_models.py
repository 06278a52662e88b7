"""One load per distinct model in a cast: personas that name the same model share one instance.

This is the one place that decides which personas share a model, so the rest of the client never
loads anything twice.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

from .cast import Persona

Key = TypeVar("Key", bound=Hashable)
Model = TypeVar("Model")


def load_once(cast: Sequence[Persona], locate: Callable[[Persona], Key],
              load: Callable[[Key, list[str]], Model]) -> dict[str, Model]:
    """The model for each persona's name, loading each distinct one once.

    ``locate`` turns a persona's model and engine into what identifies a load (downloading first
    where needed); it runs once per distinct (model, engine) as written, and every download
    happens before the first load. ``load`` gets that key and the names of the personas sharing it.
    """
    located: dict[tuple[str, str], Key] = {}
    sharing: dict[Key, list[str]] = {}
    for persona in cast:
        written = (persona.model, persona.engine)
        if written not in located:
            located[written] = locate(persona)
        sharing.setdefault(located[written], []).append(persona.name)
    models: dict[str, Model] = {}
    for key, names in sharing.items():
        models.update(dict.fromkeys(names, load(key, names)))
    return models
