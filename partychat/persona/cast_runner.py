"""Several personas in one event loop: they join one after another, and each leaves on its own.

Joining in the cast's order makes the hub's round-robin follow the cast. A persona that is kicked
or refused leaves alone; the others stay until they leave too, or the process is stopped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from ..connection import HubRefused
from .participant import ModelParticipant

log = logging.getLogger("partychat.client")


async def run_cast(participants: Sequence[ModelParticipant]) -> list[tuple[str, BaseException]]:
    """Run every participant until each has left; returns who ended with an error, and the error.

    The next participant starts once the one before has joined the room (or given up), so they
    join in order even though they reconnect independently afterwards.
    """
    running: dict[asyncio.Task[None], str] = {}
    try:
        for participant in participants:
            task = asyncio.create_task(participant.run(), name=f"persona {participant.name}")
            running[task] = participant.name
            joined = asyncio.create_task(participant.joined.wait())
            await asyncio.wait({task, joined}, return_when=asyncio.FIRST_COMPLETED)
            joined.cancel()
        return await _until_all_left(running)
    finally:
        # Stopped (Ctrl+C): every participant ends its generation before the models are closed.
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


async def _until_all_left(running: dict[asyncio.Task[None], str]) -> list[tuple[str, BaseException]]:
    ended: list[tuple[str, BaseException]] = []
    pending = set(running)
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            error = None if task.cancelled() else task.exception()
            if error is None:
                continue
            ended.append((running[task], error))
            if not isinstance(error, HubRefused):
                log.error("%s stopped: %s", running[task], error, exc_info=error)
            elif pending:
                log.warning("%s has left the room: %s", running[task], error)
    return ended
