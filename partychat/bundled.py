"""Where the shipped persona prompts and casts are, in a checkout and in an installed wheel alike.

The repository keeps ``prompts/`` and ``casts/`` at its top level, where the original project and the
README put them. A wheel carries the same folders inside the package (``partychat/prompts``,
``partychat/casts``: hatchling's ``force-include`` in ``pyproject.toml``), and ``importlib.resources``
finds them there. A checkout, or an editable install (which imports the checkout and so never sees a
force-include), has no such folder inside the package, so the top-level one is used. There is one copy
of each file in the repository either way.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def bundled_folder(name: str) -> Path:
    """The shipped folder ``name`` ("prompts" or "casts")."""
    packaged = resources.files("partychat") / name
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / name


def prompts_folder() -> Path:
    return bundled_folder("prompts")


def casts_folder() -> Path:
    return bundled_folder("casts")
