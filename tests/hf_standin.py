"""A stand-in for the Hugging Face Hub on loopback: the few endpoints huggingface_hub calls to download.

It serves model info (``/api/models/ID[/revision/REV]``), the file tree (``/api/models/ID/tree/REV``)
and files (``HEAD``/``GET /ID/resolve/REV/FILE`` with ETag, X-Repo-Commit, Content-Length and
Range). It sends no Xet headers, so huggingface_hub downloads over plain HTTP. It records every
request, and can cut a file's first transfer short or hold it midway, to test interruptions.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import unquote, urlsplit

from loopback import LoopbackServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Repo:
    files: dict[str, bytes]
    gated_status: int | None = None
    """401 or 403: the repo's info is public but its files need an accepted licence."""

    @classmethod
    def from_folder(cls, folder: Path, **kwargs: object) -> Repo:
        return cls({p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}, **kwargs)  # type: ignore[arg-type]


@dataclass
class Request:
    method: str
    path: str
    range: str | None


@dataclass
class StandInHub(LoopbackServer):
    repos: dict[str, Repo]
    requests: list[Request] = field(default_factory=list)
    cut_once: dict[str, int] = field(default_factory=dict)
    """file name -> bytes sent before the connection is dropped, on that file's first GET only."""
    hold_at: dict[str, int] = field(default_factory=dict)
    """file name -> bytes sent before the transfer stalls until ``release`` is set."""
    sent: dict[str, int] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._serve(_Handler, "hub")

    def _stopping(self) -> None:
        self.release.set()

    def record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def gets(self, name: str) -> list[Request]:
        return [r for r in self.requests if r.method == "GET" and r.path.endswith(f"/{name}") and "/resolve/" in r.path]

    def add_sent(self, name: str, count: int) -> None:
        with self._lock:
            self.sent[name] = self.sent.get(name, 0) + count


RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)$")


class _Handler(BaseHTTPRequestHandler):
    hub: StandInHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.hub.record(Request(self.command, path, self.headers.get("Range")))
        if match := TREE.match(path):
            repo = self._repo(match["repo"])
            if repo is not None:
                tree = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                        for name, data in repo.files.items()]
                self._json(200, tree, body)
        elif match := INFO.match(path):
            repo = self._repo(match["repo"])
            if repo is not None:
                info = {"id": match["repo"], "modelId": match["repo"], "sha": COMMIT, "private": False,
                        "gated": "manual" if repo.gated_status else False,
                        "siblings": [{"rfilename": name} for name in repo.files]}
                self._json(200, info, body)
        elif match := RESOLVE.match(path):
            repo = self._repo(match["repo"])
            if repo is None:
                return
            if repo.gated_status:
                self._error(repo.gated_status, "GatedRepo", "Access to this model is restricted.", body)
                return
            data = repo.files.get(match["file"])
            if data is None:
                self._error(404, "EntryNotFound", "Entry not found", body)
                return
            self._file(match["file"], data, body)
        else:
            self._error(404, None, "Not found", body)

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:  # the real Hub answers 401 to anonymous requests for missing (or private) repos
            self._error(401, "RepoNotFound", "Repository not found", self.command != "HEAD")
        return repo

    def _json(self, status: int, payload: object, body: bool) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, status: int, code: str | None, message: str, body: bool) -> None:
        data = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _file(self, name: str, data: bytes, body: bool) -> None:
        start = 0
        wanted = self.headers.get("Range")
        if wanted and (match := re.fullmatch(r"bytes=(\d+)-", wanted.strip())):
            start = int(match[1])
        self.send_response(206 if start else 200)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return
        rest = data[start:]
        cut = self.hub.cut_once.pop(name, None)
        hold = self.hub.hold_at.get(name)
        limit = cut if cut is not None else hold
        if limit is not None and limit < len(rest):
            self.wfile.write(rest[:limit])
            self.wfile.flush()
            self.hub.add_sent(name, limit)
            if cut is None:
                self.hub.release.wait()
            self.close_connection = True
            self.connection.shutdown(2)  # the peer sees a body shorter than Content-Length
            return
        self.wfile.write(rest)
        self.hub.add_sent(name, len(rest))
