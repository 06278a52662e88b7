"""The hub answers plain HTTP for its web page, safely, on the websocket port."""

from __future__ import annotations

import json
import re
import shutil
import ssl
import urllib.error
import urllib.request
from html.parser import HTMLParser
from importlib import resources

import pytest
from helpers import make_certificate
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect


def get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30, context=context) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def page_url(hub) -> str:
    return hub.wait_for_output(r"in a browser: (https?://\S+)", timeout=30).group(1)


class InlineCode(HTMLParser):
    """Finds what a strict CSP would block: inline scripts, event-handler attributes, inline styles."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        if tag == "script" and "src" not in names:
            self.found.append("inline <script>")
        self.found += [f"{tag} {name}=" for name in names if name.startswith("on") or name == "style"]
        for name in ("src", "href"):
            if (names.get(name) or "").startswith(("http:", "https:", "//")):
                self.found.append(f"remote {name} {names[name]}")


def test_the_page_and_its_files_are_served_with_a_csp_that_allows_no_inline_or_remote_code(start_hub):
    hub, ws_url = start_hub()
    base = page_url(hub)
    assert base == ws_url.replace("ws://", "http://") + "/"
    for path, kind in [("", "text/html"), ("moderate", "text/html"), ("app.js", "text/javascript"),
                       ("render.js", "text/javascript"), ("style.css", "text/css"),
                       ("config.json", "application/json")]:
        status, headers, body = get(base + path)
        assert status == 200, path
        assert headers["Content-Type"].startswith(kind)
        policy = headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy and "script-src 'self';" in policy
        assert "unsafe" not in policy and "http" not in policy and "*" not in policy
        assert headers["X-Content-Type-Options"] == "nosniff"
        if kind == "text/html":
            parser = InlineCode()
            parser.feed(body.decode())
            assert parser.found == [], path
    _, _, body = get(base + "config.json")
    config = json.loads(body)
    assert config["needs_token"] is False and "pause" in config["commands"] and "history" not in config["commands"]
    status, headers, _ = get(base + "no-such-file")
    assert status == 404 and "Content-Security-Policy" in headers


def test_the_page_script_never_inserts_text_as_html():
    modules = [f for f in (resources.files("partychat.hub") / "web").iterdir() if f.name.endswith(".js")]
    assert len(modules) > 1, "app.js and the modules it imports"
    for module in modules:
        source = module.read_text(encoding="utf-8")
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in source, (module.name, sink)


def test_the_page_script_has_none_of_the_words_the_hub_sends():
    """Roles, the turn and whisper recipients are worded by the hub (protocol.py); a copy here would drift."""
    for module in (resources.files("partychat.hub") / "web").iterdir():
        if module.name.endswith(".js"):
            source = module.read_text(encoding="utf-8")
            for words in ("on stage", "off stage", "any model", "nobody (paused)", "the moderators"):
                assert words not in source, (module.name, words)


def test_no_web_serves_no_page_and_websockets_still_work(start_hub):
    hub, ws_url = start_hub("--no-web")
    assert "in a browser" not in hub.output
    status, _, body = get(ws_url.replace("ws://", "http://") + "/")
    assert status == 404 and b"--no-web" in body
    with connect(ws_url) as ws:
        ws.send(json.dumps({"name": "Ada", "type": "human"}))
        assert json.loads(ws.recv(timeout=10))["content"] == "Connected as Ada"


def test_with_a_token_a_websocket_opened_by_another_site_is_refused(start_hub):
    hub, ws_url = start_hub("--token", "s3cret")
    own_origin = page_url(hub).rstrip("/")
    _, _, body = get(own_origin + "/config.json")
    assert json.loads(body)["needs_token"] is True
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url, origin="http://evil.example")
    assert refused.value.response.status_code == 403
    for origin in (own_origin, None):  # the hub's own page, and a client that is not a browser
        with connect(ws_url, origin=origin) as ws:
            ws.send(json.dumps({"name": f"Ada{origin is None}", "type": "human", "token": "s3cret"}))
            assert json.loads(ws.recv(timeout=10))["content"].startswith("Connected as")


def test_without_a_token_any_page_may_connect(start_hub):
    _, ws_url = start_hub()
    with connect(ws_url, origin="http://elsewhere.example") as ws:
        ws.send(json.dumps({"name": "Ada", "type": "human"}))
        assert json.loads(ws.recv(timeout=10))["content"] == "Connected as Ada"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_with_a_certificate_the_page_is_served_over_https(tmp_path, start_hub):
    cert, key = make_certificate(tmp_path)
    hub, _ = start_hub("--certfile", str(cert), "--keyfile", str(key))
    url = page_url(hub)
    assert re.match(r"https://127\.0\.0\.1:\d+/$", url)
    status, headers, body = get(url, ssl.create_default_context(cafile=str(cert)))
    assert status == 200 and b"/app.js" in body and "Content-Security-Policy" in headers
