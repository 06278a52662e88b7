"""Command line of server.py."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from ..logs import LEVELS, setup_logging
from ..protocol import DEFAULT_MAX_MESSAGE_BYTES
from .floor import Mode
from .server import HubConfig, run_hub
from .settings import RoomSettings

log = logging.getLogger("partychat.hub")
FILES_BESIDES_CONNECTIONS = 64
"""Descriptors the hub needs apart from its connections: the listening sockets, the transcript, logs."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="server.py", description="Run the Party Chat hub that models and moderators connect to."
    )
    parser.add_argument("--host", default="localhost",
                        help="address to listen on; 0.0.0.0 lets other machines connect (default: localhost)")
    parser.add_argument("--port", type=int, default=8765, help="port to listen on; 0 picks a free one (default: 8765)")
    parser.add_argument("--log-level", default="INFO", choices=LEVELS, type=str.upper)
    parser.add_argument("--log-file", type=Path, help="also write the log, without colours, to this file")
    floor = parser.add_argument_group("turn-taking")
    floor.add_argument("--mode", default=Mode.ROUND_ROBIN.value, choices=[m.value for m in Mode],
                       help="who may speak after a moderator message (default: round-robin)")
    floor.add_argument("--max-turns", type=int, default=None,
                       help="model messages allowed after each moderator message (default: one per model)")
    floor.add_argument("--turn-timeout", type=float, default=180.0,
                       help="seconds a model may hold the turn without answering before it passes on; "
                            "0 waits forever (default: 180)")
    floor.add_argument("--first-token-timeout", type=float, default=30.0,
                       help="seconds a model holding the turn may send nothing at all before it is skipped "
                            "until it answers again; 0 turns this off (default: 30)")
    floor.add_argument("--seed", type=int, default=None,
                       help="seed for natural mode's draws, so a conversation picks the same speakers again")
    floor.add_argument("--no-guards", action="store_true",
                       help="relay model replies unchecked (no repeat, empty or impersonation guards)")
    floor.add_argument("--show-whispers", action="store_true",
                       help="let spectators read whispers (otherwise they see only that one went to someone)")
    room = parser.add_argument_group("transcript and history")
    room.add_argument("--transcript", type=Path,
                      help="JSONL transcript to append to (default: logs/transcript-TIME.jsonl)")
    room.add_argument("--resume", type=Path, help="reload this transcript and carry on its conversation")
    room.add_argument("--replay", type=int, default=20, help="recent messages sent to a late joiner (default: 20)")
    room.add_argument("--fsync", action="store_true", help="sync the transcript to disk after every message")
    limits = parser.add_argument_group("limits and security")
    limits.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                        help=f"largest frame accepted (default: {DEFAULT_MAX_MESSAGE_BYTES})")
    limits.add_argument("--max-clients", type=int, default=64, help="participants allowed at once (default: 64)")
    limits.add_argument("--max-spectators", type=int, default=1000,
                        help="people watching (the web page or any spectator client) at once (default: 1000)")
    limits.add_argument("--rate-limit", type=float, default=2.0,
                        help="messages per second one participant may keep up; 0 turns the limit off (default: 2)")
    limits.add_argument("--rate-burst", type=int, default=20,
                        help="messages one participant may send in a quick burst (default: 20)")
    limits.add_argument("--token", default=os.environ.get("PARTYCHAT_TOKEN"),
                        help="secret every participant must present (or set PARTYCHAT_TOKEN)")
    limits.add_argument("--moderator-token", default=os.environ.get("PARTYCHAT_MODERATOR_TOKEN"),
                        help="secret a human must present to be a moderator (or set PARTYCHAT_MODERATOR_TOKEN)")
    limits.add_argument("--certfile", type=Path, help="TLS certificate: serve wss:// instead of ws://")
    limits.add_argument("--keyfile", type=Path, help="TLS private key (if not inside --certfile)")
    parser.add_argument("--no-web", action="store_true",
                        help="serve no web page; only websocket clients can join")
    return parser


def config_from_args(args: argparse.Namespace) -> HubConfig:
    if args.rate_limit < 0 or args.rate_burst < 1:
        raise SystemExit("server.py: --rate-limit cannot be negative and --rate-burst must be at least 1")
    for name in ("replay", "max_message_bytes", "max_clients"):
        if getattr(args, name) < (0 if name == "replay" else 1):
            raise SystemExit(f"server.py: --{name.replace('_', '-')} must be a positive number")
    if args.turn_timeout < 0 or args.first_token_timeout < 0:
        raise SystemExit("server.py: --turn-timeout and --first-token-timeout cannot be negative")
    if args.max_spectators < 0:
        raise SystemExit("server.py: --max-spectators cannot be negative")
    if args.max_turns is not None and args.max_turns < 0:
        raise SystemExit("server.py: --max-turns cannot be negative")
    for path in (args.resume, args.certfile, args.keyfile):
        if path is not None and not path.is_file():
            raise SystemExit(f"server.py: no such file: {path}")
    return HubConfig(
        host=args.host,
        port=args.port,
        room=RoomSettings(
            mode=Mode(args.mode),
            max_turns=args.max_turns,
            replay=args.replay,
            max_clients=args.max_clients,
            max_spectators=args.max_spectators,
            rate_per_second=args.rate_limit,
            rate_burst=args.rate_burst,
            turn_timeout=args.turn_timeout,
            first_token_timeout=args.first_token_timeout,
            seed=args.seed,
            guards=not args.no_guards,
            show_whispers=args.show_whispers,
            token=args.token or None,
            moderator_token=args.moderator_token or None,
        ),
        transcript=args.transcript,
        resume=args.resume,
        fsync=args.fsync,
        max_message_bytes=args.max_message_bytes,
        certfile=args.certfile,
        keyfile=args.keyfile,
        web=not args.no_web,
    )


def allow_enough_open_files(connections: int) -> None:
    """Raise the open-file limit to what the room may hold, as far as the system lets us.

    Every connection is a file descriptor, and many systems start a process with a soft limit of
    1024: below the default --max-spectators. The hard limit is usually far higher.
    """
    try:
        import resource
    except ImportError:  # Windows has no such limit to raise
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + FILES_BESIDES_CONNECTIONS
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        target = soft
    if target < wanted:
        log.warning("This system lets the hub open only %d files at once, fewer than --max-clients plus "
                    "--max-spectators (%d) need; raise it with `ulimit -n` to take them all.", target, connections)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    setup_logging(args.log_level, args.log_file)
    allow_enough_open_files(config.room.max_clients + config.room.max_spectators)
    try:
        asyncio.run(run_hub(config))
    except OSError as error:
        print(f"server.py: cannot listen on {args.host}:{args.port}: {error.strerror or error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
