"""A stand-in for llama.cpp's llama-server on loopback: the endpoints the openai engine calls, no model.

It lists one model (``/v1/models``), counts prompts as llama-server does (``/apply-template`` then
``/tokenize``, one token a word), says how many slots it has (``/props``) and streams a fixed reply
from ``/v1/chat/completions``. With ``refuse_slots`` it answers any chat request naming a slot
(``id_slot``) with the 400 llama-server gives a slot id it will not take (``Invalid slot ID``, as
its ``/slots`` endpoints word it, in its error body's shape): the case the engine's fallback to
unpinned requests is for, which the real server no longer produces (recent ones wrap a large id
round, older ones queued the request). It records the body of every chat request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from loopback import LoopbackServer

MODEL = "standin"
REPLY = ("Cities", " should", " start", " with", " buses.")
"""The pieces every reply streams, in order."""
SLOT_REFUSAL = {"error": {"code": 400, "message": "Invalid slot ID", "type": "invalid_request_error"}}
"""llama-server's error body for a slot id it refuses (format_error_response, ERROR_TYPE_INVALID_REQUEST)."""
NOT_FOUND = {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}}


@dataclass
class StandInLlamaServer(LoopbackServer):
    slots: int = 2
    refuse_slots: bool = False
    chats: list[dict[str, Any]] = field(default_factory=list)
    """The body of every /v1/chat/completions request, in order, refused ones included."""

    def __post_init__(self) -> None:
        self._serve(_Handler, "standin")

    def record(self, body: dict[str, Any]) -> None:
        with self._lock:
            self.chats.append(body)


class _Handler(BaseHTTPRequestHandler):
    standin: StandInLlamaServer

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "standin"}]})
        elif self.path == "/props":
            self._json(200, {"total_slots": self.standin.slots, "default_generation_settings": {"n_ctx": 2048}})
        else:
            self._json(404, NOT_FOUND)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path == "/apply-template":
            self._json(200, {"prompt": "\n".join(message["content"] for message in body["messages"])})
        elif self.path == "/tokenize":  # a vLLM-style body (messages, no content) gets no count, as from llama-server
            self._json(200, {"tokens": list(range(len(str(body.get("content", "")).split())))})
        elif self.path == "/v1/chat/completions":
            self.standin.record(body)
            if self.standin.refuse_slots and "id_slot" in body:
                self._json(400, SLOT_REFUSAL)
            else:
                self._stream()
        else:
            self._json(404, NOT_FOUND)

    def _json(self, status: int, payload: object) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self) -> None:
        """The reply as server-sent events, then ``[DONE]``; the connection closes after it (HTTP/1.0)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for piece in (*REPLY, None):
            delta = {"content": piece} if piece is not None else {}
            chunk = {"id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": None if piece else "stop"}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")
