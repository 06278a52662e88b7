"""The room's web page, answered over plain HTTP on the hub's own port.

Websockets hands every opening request to ``process_request`` first: a websocket upgrade goes on to
the room (after the Origin check), any other GET is answered here from the files in
``partychat/hub/web/``. The files ship inside the package and are read once at start, so the page
works on a LAN with no internet and there is no build step: the script is ES modules (``app.js``
imports the others), which the browser fetches from the hub one by one. Every response carries a
Content-Security-Policy that allows only the hub's own script and style: whatever a participant
manages to get into the page, no inline script and no remote source will run.
"""

from __future__ import annotations

import email.utils
import hashlib
import http
import json
import logging
from dataclasses import dataclass
from importlib import resources
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from ..protocol import ENDS_CONVERSATION, RETRY_LATER

log = logging.getLogger("partychat.hub")

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""No inline script or style, nothing from another origin; the page talks only to its own hub."""

_ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/moderate": ("index.html", "text/html; charset=utf-8"),  # the script adds the moderator's tools
    "/style.css": ("style.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
JAVASCRIPT = "text/javascript; charset=utf-8"
"""The type browsers require of a module script (``<script type="module">`` and its imports)."""


@dataclass(frozen=True)
class PageSettings:
    """What the page is told about the hub, so it asks only for the secrets the hub needs."""

    needs_token: bool
    needs_moderator_token: bool
    commands: dict[str, str]
    """Hub command names and their help, so the page's input line takes the same /commands as the console."""
    max_message_bytes: int


class WebPages:
    """Answers HTTP requests for the page and checks the Origin of websocket upgrades."""

    def __init__(self, settings: PageSettings | None, *, check_origin: bool) -> None:
        """``settings`` None serves no page (``--no-web``); ``check_origin`` refuses cross-site upgrades."""
        self.check_origin = check_origin
        self._files: dict[str, tuple[bytes, str, str]] = {}
        if settings is not None:
            folder = resources.files("partychat.hub") / "web"
            for path, (name, kind) in _ASSETS.items():
                self._add(path, (folder / name).read_bytes(), kind)
            for module in folder.iterdir():  # app.js and the modules it imports, each at its own name
                if module.name.endswith(".js"):
                    self._add(f"/{module.name}", module.read_bytes(), JAVASCRIPT)
            self._add("/config.json", json.dumps(_config(settings)).encode(), "application/json")

    @property
    def serving(self) -> bool:
        return bool(self._files)

    def _add(self, path: str, body: bytes, kind: str) -> None:
        self._files[path] = (body, kind, '"' + hashlib.sha256(body).hexdigest()[:16] + '"')

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """None lets a websocket upgrade go on; anything else gets its HTTP answer here."""
        if request.headers.get("Upgrade", "").lower() == "websocket":
            if self.check_origin and not _same_origin(request.headers):
                log.info("Refused a websocket from the page at %s", request.headers.get("Origin"))
                return _response(http.HTTPStatus.FORBIDDEN, b"This hub accepts websockets only from its own page.\n",
                                 "text/plain; charset=utf-8")
            return None
        if not self._files:
            return _response(http.HTTPStatus.NOT_FOUND,
                             b"This hub serves no web page (it was started with --no-web).\n",
                             "text/plain; charset=utf-8")
        found = self._files.get(request.path.split("?", 1)[0])
        if found is None:
            return _response(http.HTTPStatus.NOT_FOUND, b"Not found. The room is at /.\n", "text/plain; charset=utf-8")
        body, kind, etag = found
        if request.headers.get("If-None-Match") == etag:
            return _response(http.HTTPStatus.NOT_MODIFIED, b"", kind, etag)
        return _response(http.HTTPStatus.OK, body, kind, etag)


def _config(settings: PageSettings) -> dict[str, Any]:
    return {
        "needs_token": settings.needs_token,
        "needs_moderator_token": settings.needs_moderator_token,
        "commands": settings.commands,
        "max_message_bytes": settings.max_message_bytes,
        "retry_later": sorted(code.value for code in RETRY_LATER),
        "ends_conversation": sorted(code.value for code in ENDS_CONVERSATION),
    }


def _same_origin(headers: Headers) -> bool:
    """A browser names the page that opened a websocket in Origin; other clients send none.

    The page's own origin is the hub's address as the browser reached it (its Host header), over
    http or https.
    """
    origin = headers.get("Origin")
    if origin is None:
        return True
    host = headers.get("Host", "").lower()
    return bool(host) and origin.lower() in (f"http://{host}", f"https://{host}")


def _response(status: http.HTTPStatus, body: bytes, kind: str, etag: str | None = None) -> Response:
    headers = Headers([
        ("Date", email.utils.formatdate(usegmt=True)),
        ("Connection", "close"),
        ("Content-Type", kind),
        ("Content-Length", str(len(body))),
        ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),
        ("Cache-Control", "no-cache"),
    ])
    if etag is not None:
        headers["ETag"] = etag
    return Response(status.value, status.phrase, headers, body)
