"""How much of a persona's prompt a prefix cache can reuse, rebuilt from a real room's transcript.

For every message of a hub transcript (JSONL, as ``bench/conversation.py`` leaves them), each
persona's prompt is built with this checkout's ``build_request`` and the embedded model's tokenizer,
as a prefill ahead of the turn would build it. It reports, per prompt, the tokens that are not a
prefix of the previous prompt (what a warm cache still has to evaluate), for two cases:

- ``after_each_message``: the prompt rebuilt after every new message (a persona that prefills while idle);
- ``at_own_turns``: from one of the persona's own turns to its next (no prefill, one cache per persona).

Give another checkout to compare, e.g. main against this one:

    python bench/window_reuse.py ROOM.jsonl --checkout ../main
    python bench/window_reuse.py ROOM.jsonl

The persona text is a one-line stand-in ("You are NAME."); only the history part differs between
checkouts, and a real persona adds the same reusable prefix to both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent


def read_room(path: Path) -> list[Any]:
    from partychat.protocol import Chat

    chats = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "message":
            chats.append(Chat(sender=record["from"], content=record["content"], seq=record.get("seq", 0),
                              id=record.get("id", ""), role=record.get("role", "model")))
    return chats


def shared_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


async def measure(model: Any, room: list[Any], history_length: int) -> dict[str, object]:
    from partychat.persona import generation

    settings = generation.GenerationSettings(history_length=history_length)
    names = sorted({chat.sender for chat in room if chat.role == "model"})
    each: list[tuple[int, int]] = []
    own: list[int] = []
    sizes: list[int] = []
    for name in names:
        previous: list[int] | None = None
        last_turn: list[int] | None = None
        for end in range(1, len(room) + 1):
            if room[end - 1].sender == name:
                continue
            request = await generation.build_request(model, f"You are {name}.", name, room[:end], settings)
            ids = model.prompt_tokens(request)
            sizes.append(len(ids))
            if previous is not None:
                each.append((len(ids) - shared_prefix(previous, ids), len(ids)))
            previous = ids
            if end < len(room) and room[end].sender == name:  # the prompt of one of its turns
                if last_turn is not None:
                    own.append(len(ids) - shared_prefix(last_turn, ids))
                last_turn = ids
    return {"checkout": str(Path(generation.__file__).resolve().parents[2]), "prompts": len(sizes),
            "prompt_tokens_median": statistics.median(sizes),
            "after_each_message": {"new_tokens_mean": round(statistics.mean(new for new, _ in each), 1),
                                   "new_tokens_median": statistics.median(new for new, _ in each),
                                   "share_reused": round(1 - sum(new for new, _ in each) / sum(n for _, n in each), 3)},
            "at_own_turns": {"new_tokens_mean": round(statistics.mean(own), 1),
                             "new_tokens_median": statistics.median(own)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("transcript", type=Path)
    parser.add_argument("--history-length", type=int, default=5)
    parser.add_argument("--checkout", type=Path, default=HERE, help="the checkout whose prompts are built")
    args = parser.parse_args()
    sys.path.insert(0, str(args.checkout.resolve()))
    from partychat.engines.llama_cpp_engine import LlamaCppChatModel
    from partychat.engines.models import embedded_gguf

    model = LlamaCppChatModel(embedded_gguf(), context_tokens=4096, threads=1)
    room = read_room(args.transcript)
    figures = asyncio.run(measure(model, room, args.history_length))
    print(json.dumps({"history_length": args.history_length, "messages": len(room), **figures}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
