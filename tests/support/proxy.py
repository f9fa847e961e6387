"""A reverse proxy (or SSO gateway, or web site) in front of the Zammad stand-in.

A real HTTP/1.1 server on 127.0.0.1. For every request it asks ``behaviour``
(a function of the :class:`ProxyRequest`) what to do:

* ``FORWARD``: pass it to the upstream and give back its answer;
* ``answer(status, body, content_type, headers)``: answer without passing it on
  (a login page, a holding page, a redirect, a 503 or 429);
* ``forward_then(status, body, ...)``: pass it on (the upstream stores it), then
  answer this instead (a proxy timing out with 504 after Zammad did its work);
* ``FORWARD_THEN_CLOSE``: pass it on, then close the connection without a word;
* ``forward_then_hang(seconds)``: pass it on, then say nothing for ``seconds``
  (longer than the client waits), then close.

``requests`` lists what arrived, with the action taken and when.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl


@dataclass(frozen=True)
class Action:
    forward: bool
    status: int | None = None      # None: the upstream's answer (or none at all)
    body: str = ""
    content_type: str = "text/html"
    headers: tuple = ()
    close: bool = False            # close without an answer
    hang: float = 0.0              # wait this long first


FORWARD = Action(forward=True)
FORWARD_THEN_CLOSE = Action(forward=True, close=True)


def answer(status: int, body: str = "", content_type: str = "text/html", **headers) -> Action:
    return Action(False, status, body, content_type, tuple(
        (name.replace("_", "-"), str(value)) for name, value in headers.items()))


def forward_then(status: int, body: str = "", content_type: str = "text/html") -> Action:
    return Action(True, status, body, content_type)


def forward_then_hang(seconds: float) -> Action:
    return Action(True, close=True, hang=seconds)


@dataclass
class ProxyRequest:
    method: str
    path: str
    fields: dict
    arrived: float                 # time.monotonic()
    action: Action | None = None
    answered: float | None = None  # time.monotonic() when the answer (or close) went out
    upstream_status: int | None = None

    @property
    def event(self) -> str | None:
        return self.fields.get("event")

    @property
    def call_id(self) -> str:
        return self.fields.get("callId", "")

    @property
    def is_probe(self) -> bool:
        return self.call_id.startswith("fs-zammad-")


class Proxy:
    def __init__(self, upstream_port: int | None = None, behaviour=None):
        self.upstream_port = upstream_port
        self.behaviour = behaviour or (lambda request: FORWARD)
        self.requests: list[ProxyRequest] = []
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 30

            def setup(self):
                super().setup()
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def _any(self):
                proxy._handle(self)

            do_POST = do_GET = do_PUT = do_HEAD = _any

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> Proxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def url(self, token: str) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1/cti/{token}"

    def wait_for(self, predicate, timeout: float = 15.0):
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (value := predicate()):
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(r.event, r.call_id[:12], r.action) for r in self.requests]
                    raise TimeoutError(f"proxy: timed out; requests seen: {seen}")
                self._cond.wait(min(left, 0.05))
            return value

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        request = ProxyRequest(handler.command, handler.path,
                               dict(parse_qsl(raw.decode("utf-8", "replace"))), time.monotonic())
        with self._cond:
            self.requests.append(request)
            request.action = action = self.behaviour(request)
        if action.forward:
            request.upstream_status, upstream = self._forward(handler, raw)
            if action.status is None and not action.close:
                status, content_type, body, headers = upstream
                self._reply(handler, request, status, body, content_type, headers)
                return
        if action.hang and self._stopping.wait(action.hang):
            pass
        if action.close:
            handler.close_connection = True
            try:
                handler.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._done(request)
            return
        self._reply(handler, request, action.status, action.body.encode(), action.content_type,
                    action.headers)

    def _forward(self, handler, raw: bytes):
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=30)
        try:
            conn.request(handler.command, handler.path, body=raw, headers={
                name: value for name, value in handler.headers.items()
                if name.lower() in ("content-type", "accept", "user-agent", "authorization")})
            response = conn.getresponse()
            body = response.read()
            return response.status, (response.status, response.getheader("Content-Type", ""),
                                     body, ())
        finally:
            conn.close()

    def _reply(self, handler, request, status, body: bytes, content_type, headers) -> None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
        head = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {len(body)}"]
        if content_type:
            head.append(f"Content-Type: {content_type}")
        head += [f"{name}: {value}" for name, value in headers]
        self._done(request)
        try:
            handler.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        except OSError:
            handler.close_connection = True

    def _done(self, request: ProxyRequest) -> None:
        with self._cond:
            request.answered = time.monotonic()
            self._cond.notify_all()
