"""Logging setup shared by the three scripts: timestamped lines, colour on a terminal, plain in files."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

from colorama import Fore

from .display import DIM, colour_wanted, neutralise, paint, speaker_colour

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_LEVEL_COLOURS = {logging.WARNING: Fore.YELLOW, logging.ERROR: Fore.RED, logging.CRITICAL: Fore.RED}


class RoomFormatter(logging.Formatter):
    """``[12:34:56] text``; a record with a ``speaker`` attribute is coloured by speaker when colour is on."""

    def __init__(self, colour: bool) -> None:
        super().__init__(datefmt="%H:%M:%S")
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        stamp = self.formatTime(record, self.datefmt)
        text = neutralise(record.getMessage())
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname}: {text}"
        colour = ""
        speaker = getattr(record, "speaker", None)
        if speaker:
            colour = speaker_colour(speaker)
        elif record.levelno >= logging.WARNING:
            colour = _LEVEL_COLOURS[record.levelno]
        elif record.levelno < logging.INFO:
            colour = DIM
        return paint(f"[{stamp}] ", DIM, self.colour) + paint(text, colour, self.colour)


def honour_ctrl_c() -> None:
    """Make Ctrl+C raise KeyboardInterrupt even if our parent started us with SIGINT ignored.

    Shells start background jobs that way, and Python then leaves SIGINT ignored.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)


def setup_logging(level: str = "INFO", log_file: str | Path | None = None) -> None:
    """Send logs to stderr (coloured if it is a terminal) and, if asked, to a plain file."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(RoomFormatter(colour_wanted(sys.stderr)))
    root.addHandler(console)
    if log_file:
        path = Path(log_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(path, encoding="utf-8")
        to_file.setFormatter(RoomFormatter(colour=False))
        root.addHandler(to_file)
    for noisy in ("websockets", "transformers", "accelerate", "urllib3", "filelock", "httpx", "httpx2", "openai",
                  "huggingface_hub"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
