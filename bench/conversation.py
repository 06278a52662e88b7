"""Conversation quality of a real room: a hub, the seven-persona panel and a moderator asking questions.

Each configuration runs a real hub (server.py) and the panel of casts/panel.toml in one client.py
process on the embedded model and the llama.cpp engine, in round-robin and in natural mode; this
script is the moderator. It asks each question, waits until the room is quiet, then reads the
hub's transcript and scores every model turn. One run can compare several checkouts and client
flags, so "before" and "after" are measured on the same machine at the same load:

    python bench/conversation.py                                   # main against this checkout
    python bench/conversation.py --questions 3 --modes round-robin # tune on a few
    python bench/conversation.py --config here --config "no-ac::--no-anti-copy"

A configuration is ``LABEL[@REF][::CLIENT FLAGS]``: REF is a git ref (exported with ``git
archive`` into a temporary folder) or a folder holding a checkout; without it, this checkout. The
client flags are added to client.py's (split like a shell line).

Figures, per configuration and mode and for both modes together:

- relay_rate: model turns that ended in a relayed reply, over all model turns (relayed, withheld by
  a guard, passed, skipped);
- withheld_by_reason: turn-ending guard verdicts by guard, plus passes and skips;
- copies_over_half: share of relayed replies whose copy score is above 0.5. Copy score = the share of
  the reply's distinct word trigrams found in one earlier message of the room (the best match);
- assistant_speak: share of relayed replies with a help-desk phrase (ASSISTANT_SPEAK);
- on_topic: share of relayed replies holding a content word (4+ letters, not a stop word) of the
  moderator's latest question;
- distinct_bigrams: distinct word bigrams over all word bigrams of the relayed replies;
- retries_per_turn: attempts a persona discarded within its turn, over model turns: withheld
  transcript records of a model that no turn-ending verdict or cut accounts for (0 on a client
  that never retries);
- fluency_nll: the median, over relayed replies, of each reply's median per-token negative
  log-likelihood under the embedded model, the reply scored on its own (lower is more fluent);
- ttft_s and tokens_per_second: medians of what each persona reported with its replies (``/who``).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))  # this checkout's partychat, for the fluency scorer
PANEL_SIZE = 7

QUESTIONS = (
    "What makes a city pleasant to walk through?",
    "Should schools teach children how to cook?",
    "Why do some old bridges last for centuries while new ones crack?",
    "What would change if everyone worked four days a week?",
    "How should a small coastal town prepare for floods?",
    "Is it better to learn music by ear or from written notation?",
    "What can honeybees teach engineers about building?",
    "Why do people keep diaries, and is the habit worth it?",
    "How would you explain ocean tides to a ten-year-old?",
    "What is the hardest part of translating poetry?",
    "Should museums return objects to the countries they came from?",
    "What makes someone a good neighbour?",
    "How might public libraries change over the next fifty years?",
    "Is boredom useful for anything?",
)

ASSISTANT_SPEAK = re.compile(
    r"\b(?:i'?m sorry|i apologi[sz]e|sorry for the confusion|as an ai|as a language model|"
    r"i can (?:help|assist)|i'?d be (?:happy|glad) to (?:help|assist)|how can i (?:help|assist)|"
    r"provide more (?:context|details|information)|feel free to|let me know if|"
    r"if you have any (?:other |more |further )?questions|i hope this helps|is there anything else|"
    r"your essay|i'?m here to help|happy to help)\b",
    re.IGNORECASE,
)
"""Phrases of a help desk answering a customer, not of a panellist talking with others."""

_STOP_WORDS_TEXT = """
about above after again against also among another anyone anything around away back because been before
being below between both came come could does doing done down during each either else even ever every
from further gets give given goes going gone have having here hers herself himself into itself just keep
kind know like made make makes many maybe might more most much must myself need never next none once
only other others ought ours over own part perhaps quite rather really same says seem seems shall should
since some something still such take than that their theirs them themselves then there these they thing
things think this those though through thus together told took toward under until upon used very want
well were what whatever when where whether which while whom whose will with within without would your
yours yourself anybody everyone everything someone tell said show better best good great
"""
STOP_WORDS = frozenset(_STOP_WORDS_TEXT.split())


# ------------------------------------------------------------------------------------------------ detectors


def words(text: str) -> list[str]:
    """Words as the guards compare them: case-folded runs of letters and digits."""
    return re.findall(r"\w+", text.casefold())


def ngrams(items: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(items[i:i + n]) for i in range(len(items) - n + 1)}


def copy_score(reply: str, earlier: Iterable[str]) -> float:
    """The largest share of the reply's distinct word trigrams found in one earlier message."""
    mine = ngrams(words(reply), 3)
    if not mine:
        return 0.0
    return max((len(mine & ngrams(words(text), 3)) / len(mine) for text in earlier), default=0.0)


def assistant_speak(reply: str) -> bool:
    return ASSISTANT_SPEAK.search(reply) is not None


def content_words(text: str) -> set[str]:
    return {word for word in words(text) if len(word) >= 4 and word.isalpha() and word not in STOP_WORDS}


def on_topic(reply: str, question: str) -> bool:
    """The reply holds a content word of the question (a plural 's' aside)."""
    wanted = {word.removesuffix("s") for word in content_words(question)}
    return any(word.removesuffix("s") in wanted for word in words(reply))


def distinct_bigrams(replies: Iterable[str]) -> float:
    seen: set[tuple[str, ...]] = set()
    total = 0
    for reply in replies:
        found = words(reply)
        total += max(len(found) - 1, 0)
        seen |= ngrams(found, 2)
    return len(seen) / total if total else 0.0


# ------------------------------------------------------------------------------------------------ a room


@dataclass(frozen=True)
class Config:
    label: str
    ref: str | None = None
    flags: tuple[str, ...] = ()

    @classmethod
    def parse(cls, value: str) -> Config:
        head, _, flags = value.partition("::")
        label, _, ref = head.partition("@")
        if not label:
            raise ValueError(f"--config {value!r}: give it as LABEL[@REF][::CLIENT FLAGS]")
        return cls(label, ref or None, tuple(shlex.split(flags)))


def checkout(ref: str | None, scratch: Path) -> Path:
    """The folder to run a configuration from: this checkout, a given folder, or a git ref exported."""
    if ref is None:
        return HERE
    if Path(ref).is_dir():
        return Path(ref).resolve()
    folder = scratch / re.sub(r"\W+", "-", ref)
    if not folder.exists():
        archive = subprocess.run(["git", "-C", str(HERE), "archive", "--format=tar", ref], check=True,
                                 capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(folder, filter="data")
    return folder


@dataclass
class RoomRun:
    """What one room produced: its transcript, and the speed each reply reported, in order."""

    transcript: Path
    speeds: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


class Child:
    """A script of a checkout run as a process, its output in a file."""

    def __init__(self, folder: Path, args: list[str], log: Path) -> None:
        self.log = log
        self._out = log.open("wb")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}
        self.popen = subprocess.Popen([sys.executable, *args], cwd=folder, stdout=self._out,
                                      stderr=subprocess.STDOUT, env=env)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log.read_text(errors="replace"))
            if found:
                return found
            if self.popen.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"{self.log.name}: no {pattern!r}:\n{self.log.read_text(errors='replace')[-3000:]}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._out.close()


async def moderate(url: str, questions: Sequence[str], speeds: list[dict[str, Any]], timeout: float,
                   models: int = PANEL_SIZE, pause: float = 0.0) -> None:
    """Join as the moderator, wait for ``models`` personas, ask each question and wait for the room to go quiet.

    After each model reply it asks ``/who`` for the speed that persona reported, and notes how many
    messages the room held before that reply (what its history window could hold). A question waits
    for the answers to its last ``/who`` too, which may come after the quiet event. ``pause``: seconds
    between quiet and the next question (a person typing). Plain JSON frames, so any checkout's hub
    can be driven by this script.
    """
    from websockets.asyncio.client import connect

    async with connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"name": "Bench", "type": "human", "protocol": 1}))
        await ws.recv()
        await wait_for_models(ws, models)
        said = 0
        for number, question in enumerate(questions):
            if number and pause:
                await asyncio.sleep(pause)
            await ws.send(json.dumps({"type": "message", "content": question}))
            asked = quiet = False
            waiting: list[tuple[str, int]] = []
            deadline = time.monotonic() + timeout
            while not (quiet and not waiting):
                frame = json.loads(await asyncio.wait_for(ws.recv(), max(deadline - time.monotonic(), 0.1)))
                kind = frame.get("type")
                if kind == "message" and frame.get("from") == "Bench":
                    asked = True
                elif kind == "message" and frame.get("role") == "model" and asked:
                    waiting.append((frame["from"], said))
                    await ws.send(json.dumps({"type": "command", "name": "who", "args": []}))
                elif kind == "roster" and waiting:
                    name, before = waiting.pop(0)
                    about = next((p for p in frame["participants"] if p.get("name") == name), {})
                    speeds.append({"name": name, "ttft": about.get("ttft"), "room_messages": before,
                                   "tokens_per_second": about.get("tokens_per_second")})
                elif kind == "system" and frame.get("event") == "quiet" and asked:
                    quiet = True
                said += kind == "message"


async def frame_of(ws: Any, kind: str, deadline: float, **match: Any) -> dict[str, Any]:
    """The next frame of ``kind`` whose fields equal ``match``, skipping the others, by ``deadline``."""
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), max(deadline - time.monotonic(), 0.1)))
        if frame.get("type") == kind and all(frame.get(key) == value for key, value in match.items()):
            return frame


async def wait_for_models(ws: Any, models: int, within: float = 600) -> None:
    """Ask /who until ``models`` model personas are in the room (the moderator speaks only then)."""
    deadline = time.monotonic() + within
    while True:
        await ws.send(json.dumps({"type": "command", "name": "who", "args": []}))
        roster = await frame_of(ws, "roster", deadline)
        if sum(p.get("role") == "model" for p in roster["participants"]) >= models:
            return
        await asyncio.sleep(0.5)


def run_room(folder: Path, config: Config, mode: str, questions: Sequence[str], out: Path,
             timeout: float) -> RoomRun:
    tag = f"{config.label}-{mode}"
    transcript = out / f"{tag}.jsonl"
    transcript.unlink(missing_ok=True)
    hub = Child(folder, ["server.py", "--host", "127.0.0.1", "--port", "0", "--mode", mode, "--seed", "1",
                         "--transcript", str(transcript), "--no-web", "--log-level", "WARNING",
                         # a loaded machine may take minutes over a reply: slowness must not change the talk
                         "--first-token-timeout", "0", "--turn-timeout", "0"],
                out / f"{tag}-hub.log")
    client = None
    try:
        url = hub.wait_for(r"listening on (ws://\S+)", 60).group(1)
        client = Child(folder, ["client.py", "--cast", str(folder / "casts" / "panel.toml"), "--backend", "llama.cpp",
                                "--server", url, "--log-level", "WARNING", *config.flags],
                       out / f"{tag}-client.log")
        run = RoomRun(transcript)
        start = time.monotonic()
        asyncio.run(moderate(url, questions, run.speeds, timeout))
        run.seconds = time.monotonic() - start
        return run
    finally:
        if client is not None:
            client.stop()
        hub.stop()


# ------------------------------------------------------------------------------------------------ scoring


GUARD_REASONS = ("repeat", "empty", "impersonation")
MODES = ("round-robin", "mention", "moderator", "free", "natural")


@dataclass
class Scored:
    """The model turns of one room, ready to be added up."""

    relayed: list[dict[str, Any]] = field(default_factory=list)
    """Each relayed reply: text, copy score, assistant-speak, on-topic."""
    outcomes: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    speeds: list[dict[str, Any]] = field(default_factory=list)


def score_transcript(path: Path, speeds: list[dict[str, Any]]) -> Scored:
    scored = Scored(speeds=speeds)
    earlier: list[str] = []
    question = ""
    guard_rows = verdicts = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        kind = record.get("kind")
        if kind == "message":
            text = record.get("content", "")
            if record.get("role") == "model":
                scored.outcomes["relayed"] += 1
                scored.relayed.append({"text": text, "copy": copy_score(text, earlier),
                                       "assistant": assistant_speak(text), "on_topic": on_topic(text, question)})
            else:
                question = text
            earlier.append(text)
        elif kind == "withheld" and record.get("role") == "model" and record.get("reason") in GUARD_REASONS:
            guard_rows += 1
        elif kind == "event":
            event = record.get("event")
            if event == "withheld":
                scored.outcomes[f"withheld:{record.get('reason')}"] += 1
                verdicts += 1
            elif event == "cut":
                verdicts += 1
            elif event in ("pass", "skip"):
                scored.outcomes[event] += 1
    scored.retries = max(guard_rows - verdicts, 0)
    return scored


class Fluency:
    """Per-token negative log-likelihood of a text scored on its own, by the embedded model on llama.cpp."""

    def __init__(self) -> None:
        from llama_cpp import Llama

        from partychat.engines.llama_cpp_engine import without_weight_repacking
        from partychat.engines.models import embedded_gguf

        with without_weight_repacking():
            self.llama = Llama(model_path=str(embedded_gguf()), n_ctx=512, logits_all=True, verbose=False)

    def median_nll(self, text: str) -> float | None:
        import numpy as np

        tokens = self.llama.tokenize(text.encode(), add_bos=True, special=False)[:512]
        if len(tokens) < 2:
            return None
        self.llama.reset()
        self.llama.eval(tokens)
        logits = np.asarray(self.llama.scores[: len(tokens) - 1], dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        nll = log_norm - logits[np.arange(len(tokens) - 1), tokens[1:]]
        return float(np.median(nll))


def figures(rooms: Sequence[Scored], fluency: Fluency | None) -> dict[str, Any]:
    relayed = [reply for room in rooms for reply in room.relayed]
    outcomes: Counter[str] = sum((room.outcomes for room in rooms), Counter())
    turns = sum(outcomes.values())
    speeds = [speed for room in rooms for speed in room.speeds]

    def share(key: str) -> float | None:
        return round(sum(1 for r in relayed if r[key]) / len(relayed), 3) if relayed else None

    def median(values: Iterable[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return round(statistics.median(present), 3) if present else None

    result: dict[str, Any] = {
        "turns": turns,
        "relay_rate": round(outcomes["relayed"] / turns, 3) if turns else None,
        "withheld_by_reason": {k: v for k, v in sorted(outcomes.items()) if k != "relayed"},
        "copies_over_half": round(sum(r["copy"] > 0.5 for r in relayed) / len(relayed), 3) if relayed else None,
        "mean_copy_score": round(statistics.fmean(r["copy"] for r in relayed), 3) if relayed else None,
        "assistant_speak": share("assistant"),
        "on_topic": share("on_topic"),
        "distinct_bigrams": round(distinct_bigrams(r["text"] for r in relayed), 3),
        "retries_per_turn": round(sum(room.retries for room in rooms) / turns, 3) if turns else None,
        "fluency_nll": median(fluency.median_nll(r["text"]) for r in relayed) if fluency else None,
        "ttft_s": median(s["ttft"] for s in speeds),
        "tokens_per_second": median(s["tokens_per_second"] for s in speeds),
    }
    return result


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[],
                        help="LABEL[@REF][::CLIENT FLAGS], repeatable (default: main@main and here)")
    parser.add_argument("--questions", type=int, default=len(QUESTIONS),
                        help=f"ask the first N questions (default: all {len(QUESTIONS)})")
    parser.add_argument("--modes", default="round-robin,natural", help="comma-separated floor modes")
    parser.add_argument("--timeout", type=float, default=900, help="longest wait for one question's round, s")
    parser.add_argument("--out", type=Path, help="folder for the transcripts and logs (default: a temporary one)")
    parser.add_argument("--no-fluency", action="store_true", help="skip the fluency scoring")
    parser.add_argument("--rescore", type=Path, metavar="FOLDER",
                        help="only score the transcripts (LABEL-MODE.jsonl) an earlier run left in FOLDER; "
                             "the speeds are not in them")
    args = parser.parse_args(argv)
    if args.rescore:
        return rescore(args.rescore, None if args.no_fluency else Fluency())
    if not 1 <= args.questions <= len(QUESTIONS):
        parser.error(f"--questions must be from 1 to {len(QUESTIONS)}")
    try:
        configs = [Config.parse(value) for value in args.config or ["main@main", "here"]]
    except ValueError as error:
        parser.error(str(error))
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    questions = QUESTIONS[:args.questions]
    with tempfile.TemporaryDirectory(prefix="conversation-") as scratch:
        out = args.out or Path(scratch) / "out"
        out.mkdir(parents=True, exist_ok=True)
        print(json.dumps({"meta": {"commit": _commit(), "questions": len(questions), "modes": modes,
                                   "configs": [c.__dict__ for c in configs], "load_avg_1m": os.getloadavg()[0],
                                   "out": str(out)}}), flush=True)
        rooms: dict[tuple[str, str], Scored] = {}
        for config in configs:
            folder = checkout(config.ref, Path(scratch))
            for mode in modes:
                run = run_room(folder, config, mode, questions, out, args.timeout)
                rooms[config.label, mode] = score_transcript(run.transcript, run.speeds)
                print(json.dumps({"ran": config.label, "mode": mode, "seconds": round(run.seconds),
                                  "transcript": str(run.transcript)}), flush=True)
        fluency = None if args.no_fluency else Fluency()
        for config in configs:
            for mode in [*modes, "both"]:
                picked = [rooms[config.label, m] for m in modes if mode in (m, "both")]
                print(json.dumps({"config": config.label, "mode": mode, **figures(picked, fluency)}), flush=True)
    return 0


def rescore(folder: Path, fluency: Fluency | None) -> int:
    rooms: dict[str, dict[str, Scored]] = {}
    for path in sorted(folder.glob("*.jsonl")):
        mode = next((m for m in MODES if path.stem.endswith(f"-{m}")), None)
        if mode is None:
            continue
        label = path.stem.removesuffix(f"-{mode}")
        rooms.setdefault(label, {})[mode] = score_transcript(path, [])
    for label, modes in rooms.items():
        for mode in [*modes, "both"]:
            picked = list(modes.values()) if mode == "both" else [modes[mode]]
            print(json.dumps({"config": label, "mode": mode, **figures(picked, fluency)}), flush=True)
    return 0


def _commit() -> str:
    found = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return found.stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
