"""A stand-in HTTP server on a free loopback port, for tests of what we fetch from or send to a server."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self


class LoopbackServer:
    """Serves from a thread while in a ``with`` block; the request handler reaches its stand-in as ``owner``.

    Each stand-in (a Hugging Face Hub, a llama-server) only says what it answers; starting, the URL,
    and stopping are the same for all of them.
    """

    def _serve(self, handler: type[BaseHTTPRequestHandler], owner: str) -> None:
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (handler,), {owner: self}))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping()
        self.server.shutdown()
        self.server.server_close()

    def _stopping(self) -> None:
        """Anything to let go before the server stops (a transfer held on purpose)."""
