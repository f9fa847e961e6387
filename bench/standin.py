"""A minimal, fast Zammad CTI stand-in: asyncio, raw HTTP/1.1 keep-alive.

Runs in its own process (so its CPU never counts against the measured
process), controlled over a multiprocessing Pipe. Every request is answered
``200 {}`` (or the configured status) with headers and body in one write on a
TCP_NODELAY socket, so the client's delayed ACK never stalls a keep-alive
connection. With ``delay_ms`` the answer is written that much later (other
connections are served meanwhile).

Per request it counts (event, status) and, when recording, keeps
``(arrival monotonic_ns, callId, event, status)``; arrival is the moment the
whole request (headers + body) has been read.
"""

from __future__ import annotations

import asyncio
import socket
import time
from urllib.parse import unquote_plus

OK_BODY = b"{}"
DOWN_BODY = (b"<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head>\r\n"
             b"<body>\r\n<center><h1>503 Service Temporarily Unavailable</h1></center>\r\n"
             b"<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")
REASONS = {200: b"OK", 503: b"Service Temporarily Unavailable", 500: b"Internal Server Error"}


def _response(status: int) -> bytes:
    body = OK_BODY if status == 200 else DOWN_BODY
    ctype = b"application/json" if status == 200 else b"text/html"
    return (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
            b"Connection: keep-alive\r\n\r\n%s" % (status, REASONS.get(status, b"X"), ctype,
                                                    len(body), body))


def _field(body: bytes, key: bytes) -> str:
    """One form field's value (first occurrence), cheaply."""
    start = 0
    while True:
        at = body.find(key + b"=", start)
        if at < 0:
            return ""
        if at == 0 or body[at - 1:at] == b"&":
            end = body.find(b"&", at)
            raw = body[at + len(key) + 1:] if end < 0 else body[at + len(key) + 1:end]
            return unquote_plus(raw.decode("ascii", "replace"))
        start = at + 1


class State:
    def __init__(self, delivered=None):
        self.delivered = delivered  # shared counter for the firehose's closed loop
        self.status = 200
        self.delay = 0.0
        self.recording = False
        self.connections = 0
        self.open_connections = 0
        self.reset()

    def reset(self):
        self.records: list = []
        self.counts: dict = {}
        self.first_ok_ns = 0
        self.last_ok_ns = 0
        self.last_hangup_ok_ns = 0
        self.hangups_ok = 0
        self.ok = 0
        self.total = 0

    def stats(self) -> dict:
        return {"counts": {f"{e}/{s}": n for (e, s), n in self.counts.items()},
                "first_ok_ns": self.first_ok_ns, "last_ok_ns": self.last_ok_ns,
                "last_hangup_ok_ns": self.last_hangup_ok_ns, "hangups_ok": self.hangups_ok,
                "ok": self.ok, "total": self.total, "connections": self.connections,
                "open_connections": self.open_connections}


class Http(asyncio.Protocol):
    state: State

    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.state.connections += 1
        self.state.open_connections += 1

    def connection_lost(self, exc):
        self.state.open_connections -= 1

    def data_received(self, data):
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            length = 0
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = lower.find(b"\r\n", at + 2)
                length = int(head[at + 17:stop if stop > 0 else None].strip())
            total = end + 4 + length
            if len(self.buf) < total:
                return
            body = self.buf[end + 4:total]
            self.buf = self.buf[total:]
            self._request(head, body)

    def _request(self, head: bytes, body: bytes):
        now = time.monotonic_ns()
        st = self.state
        status = st.status
        if head.startswith(b"POST ") and b"/api/v1/cti/" in head[:200]:
            event = _field(body, b"event")
        else:
            event, status = "-", 404
        st.total += 1
        key = (event, status)
        st.counts[key] = st.counts.get(key, 0) + 1
        if status == 200:
            st.ok += 1
            st.first_ok_ns = st.first_ok_ns or now
            st.last_ok_ns = now
            if event == "hangup":
                st.hangups_ok += 1
                st.last_hangup_ok_ns = now
                if st.delivered is not None:
                    st.delivered.value += 1
        if st.recording:
            st.records.append((now, _field(body, b"callId"), event, status))
        response = _response(status) if status in (200, 503) else \
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
        if st.delay > 0:
            asyncio.get_running_loop().call_later(st.delay, self._write, response)
        else:
            self.transport.write(response)

    def _write(self, response: bytes):
        if not self.transport.is_closing():
            self.transport.write(response)


def main(conn, delivered=None) -> None:
    """Process entry: serve HTTP and answer the orchestrator's commands."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    state = State(delivered)
    Http.state = state
    server = loop.run_until_complete(loop.create_server(Http, "127.0.0.1", 0, backlog=128))
    port = server.sockets[0].getsockname()[1]

    def on_command():
        cmd, arg = conn.recv()
        if cmd == "quit":
            loop.stop()
            conn.send(True)
            return
        if cmd == "set":        # {"status": 200|503, "delay_ms": n, "reset": bool, "record": bool}
            if arg.get("reset"):
                state.reset()
            state.status = arg.get("status", state.status)
            state.delay = arg.get("delay_ms", state.delay * 1000) / 1000
            state.recording = arg.get("record", state.recording)
            conn.send(state.stats())
        elif cmd == "stats":
            conn.send(state.stats())
        elif cmd == "records":
            records, state.records = state.records, []
            conn.send(records)
        else:
            conn.send({"error": f"unknown command {cmd}"})

    loop.add_reader(conn.fileno(), on_command)
    conn.send({"port": port})
    loop.run_forever()
