"""The rules a hub's room runs by, as the command line sets them."""

from __future__ import annotations

from dataclasses import dataclass

from .floor import Mode


@dataclass
class RoomSettings:
    mode: Mode = Mode.ROUND_ROBIN
    max_turns: int | None = None
    replay: int = 20
    max_clients: int = 64
    max_buffered_bytes: int = 1024 * 1024
    """Unread bytes a peer may fall behind by before the hub disconnects it."""
    rate_per_second: float = 2.0
    rate_burst: int = 20
    token: str | None = None
    moderator_token: str | None = None
    turn_timeout: float = 180.0
    """Seconds a model may hold the turn without answering before the hub passes it on."""
    first_token_timeout: float = 30.0
    """Seconds a model holding the turn may send nothing at all before it is skipped until it answers."""
    seed: int | None = None
    """Seeds natural mode's draws."""
    guards: bool = True
    """Check every model reply for repeats, emptiness and lines written as someone else."""
    max_spectators: int = 1000
    """Connections watching without taking part (the web page); apart from ``max_clients``."""
    show_whispers: bool = False
    """Spectators see what is whispered; without it they learn only that a whisper went to someone."""
