"""A stand-in for Zammad's generic CTI endpoint (``POST /api/v1/cti/<token>``).

It is a real HTTP/1.1 server on 127.0.0.1 so that the service's HTTP client,
connection pool, keep-alive handling and retry logic are exercised for real.
Behind the endpoint it keeps a caller log that follows Zammad's own
``Cti::Log.process`` / ``Cti::Driver::Base#process`` rules (see
/work/shared/reference/zammad-cti-api.md): what a test asserts on is what a
Zammad user would see in the caller log, including its unforgiving parts
(500 for an unknown or duplicate callId, a second hangup flipping a missed
call to done).

The same server answers Zammad's REST API (users, tokens, the caller log over
REST, customers, tickets) with Zammad's rules: ``standin.rest``, see
zammad_rest.py. At newCall the caller log records the users Zammad matches for
the number, and on an inbound answer the agent who gets the screen pop.

Plain ``http.server`` + threads, not gevent: the tests run in an ordinary
pytest process. Each response is written with a single ``sendall`` and
TCP_NODELAY is set, because http.server's usual header-then-body writes meet
the client's delayed ACK and cap a keep-alive connection at ~23 requests/s,
which real Zammad (nginx/puma) does not do.
"""

from __future__ import annotations

import html
import json
import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

from tests.support.zammad_rest import ZammadRest

log = logging.getLogger(__name__)

DISABLED_ERROR = "Feature is disabled, please contact your administrator!"
TOKEN_ERROR = "Invalid token, please contact your admin!"
TOO_LARGE_PAGE = ("<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n"
                  "<body>\r\n<center><h1>413 Request Entity Too Large</h1></center>\r\n"
                  "<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")
DOWN_PAGE = ("<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head>\r\n<body>\r\n"
             "<center><h1>503 Service Temporarily Unavailable</h1></center>\r\n"
             "<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")


class _ZammadError(Exception):
    """An error Zammad would answer with ``status`` (JSON for 4xx, JSON or HTML for 500)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class CtiRequest:
    """One HTTP request as the stand-in saw it.

    ``form`` is the body's ``(key, value)`` pairs in order (JSON bodies: the
    object's items); ``fields`` is what Rails would make of them: keys ending in
    ``[]`` become lists under the bare key (``user[]=a&user[]=b`` →
    ``fields['user'] == ['a', 'b']``), a repeated plain key keeps its last
    value. ``status``/``body`` are what was answered (``status`` None: the
    connection was closed without a response); they are recorded just before
    the response is sent, so a client that has its response finds them set.
    ``outcome`` says why:
    ``processed``, ``rejected`` (4xx/5xx from Zammad's logic), ``injected``
    (fail_next), ``down``, ``closed`` (close_without_response_next).
    ``arrived``/``answered`` are time.monotonic() values. ``client_gone``: the
    client had closed its end before the answer (or the write failed);
    ``processed_after_client_gone``: processed anyway (a timed-out client that
    will retry something Zammad already stored).
    """

    method: str
    path: str
    headers: dict
    content_type: str
    raw_body: bytes
    form: list
    fields: dict
    arrived: float
    conn_id: int
    status: int | None = None
    body: str = ""
    outcome: str = "pending"
    processed: bool = False
    answered: float | None = None
    completed: bool = False
    client_gone: bool = False
    processed_after_client_gone: bool = False

    def header(self, name: str) -> str | None:
        """Case-insensitive request header lookup."""
        lower = name.lower()
        for key, value in self.headers.items():
            if key.lower() == lower:
                return value
        return None

    @property
    def arrival(self) -> float:
        """Alias of ``arrived`` (time.monotonic() when the request was read)."""
        return self.arrived

    @property
    def event(self) -> str | None:
        return self.fields.get("event")

    @property
    def call_id(self) -> str | None:
        return _call_id(self.fields)


def _call_id(fields: dict) -> str | None:
    for key in ("callId", "call_id", "CallId"):
        if fields.get(key) is not None:
            return str(fields[key])
    return None


def _rails_fields(pairs: list) -> dict:
    """Form/JSON pairs to Rails-style params: ``key[]`` collects a list under ``key``."""
    fields: dict = {}
    for key, value in pairs:
        if key.endswith("[]"):
            bucket = fields.get(key[:-2])
            if not isinstance(bucket, list):
                bucket = fields[key[:-2]] = []
            bucket.extend(value if isinstance(value, list) else [value])
        else:
            fields[key] = value
    return fields


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    standin: ZammadStandIn


class _Handler(BaseHTTPRequestHandler):
    """Hands every request to the stand-in and writes its answer in one send."""

    protocol_version = "HTTP/1.1"  # keep-alive
    timeout = 30  # an idle keep-alive connection (or a stalled client) is dropped after this

    def setup(self) -> None:
        super().setup()
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn_id = self.server.standin._conn_opened(self)
        self.busy = False

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.standin._conn_closed(self)

    def handle_one_request(self) -> None:
        self.busy = False
        super().handle_one_request()

    def _dispatch(self) -> None:
        self.busy = True
        self.server.standin._handle(self)

    do_POST = do_GET = do_PUT = do_PATCH = do_DELETE = do_HEAD = _dispatch

    def read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline(65537).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def write_response(self, status: int, body: str, content_type: str) -> bool:
        """Status line, headers and body in one sendall(). False if the client is gone."""
        payload = body.encode("utf-8")
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
        head = [f"HTTP/1.1 {status} {reason}",
                f"Content-Type: {content_type}",
                f"Content-Length: {len(payload)}",
                "Cache-Control: no-cache",
                "Connection: close" if self.close_connection else "Connection: keep-alive"]
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        if self.command != "HEAD":
            data += payload
        try:
            self.wfile.write(data)
            return True
        except OSError:
            self.close_connection = True
            return False

    def client_gone(self) -> bool:
        """Has the client closed its end (FIN/RST) while we held its request?"""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def log_message(self, format: str, *args) -> None:
        log.debug("zammad-standin: " + format, *args)


class ZammadStandIn:
    """Zammad's generic CTI endpoint with a caller log, on 127.0.0.1.

    Configuration (plain attributes, may change while running): ``token``,
    ``disabled`` (422 "Feature is disabled" before the token check),
    ``reject_callers`` (inbound ``from`` numbers on Zammad's block list: their
    newCall is logged and answered ``{"action":"reject","reason":"busy"}``),
    ``max_body`` (nginx's client_max_body_size: a bigger request gets 413),
    ``rest`` (the REST side's users, tokens, groups, tickets: zammad_rest.py).

    Observation: ``requests`` (every :class:`CtiRequest`, in arrival order),
    ``calls`` (callId → internal record, insertion ordered), :meth:`caller_log`.

    Fault injection: :meth:`fail_next`, :meth:`set_down`, :meth:`set_delay`,
    :meth:`set_hang`, :meth:`close_without_response_next`,
    :meth:`drop_idle_connections`.
    """

    def __init__(self, token: str = "secret-token", *, port: int = 0, disabled: bool = False,
                 reject_callers: set | None = None):
        self.token = token
        self.disabled = disabled
        self.reject_callers = set(reject_callers or ())
        self.rest = ZammadRest()  # users, tokens, tickets: Zammad's REST API (zammad_rest.py)
        self.requests: list = []
        self.calls: dict = {}
        self._requested_port = port
        self._cond = threading.Condition()  # guards everything above and the fault settings
        self._stopping = threading.Event()
        self._fail_next: list = []  # [(status, body, content_type)] consumed front first
        self._close_next = 0
        self._down = False
        self._delay = 0.0
        self._hang = 0.0
        #: nginx's client_max_body_size in Zammad's shipped configs: bigger bodies get 413
        self.max_body = 50 * 1024 * 1024
        self._conns: dict = {}  # conn_id -> handler
        self._conn_threads: list = []
        self._conn_seq = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> ZammadStandIn:
        self._server = _Server(("127.0.0.1", self._requested_port), _Handler)
        self._server.standin = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name=f"zammad-standin:{self.port}")
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, cut open keep-alive connections, join every thread."""
        if self._server is None:
            return
        self._stopping.set()  # also ends any set_delay/set_hang sleep
        self._server.shutdown()
        self._server.server_close()
        with self._cond:
            handlers = list(self._conns.values())
            threads = list(self._conn_threads)
        for handler in handlers:
            try:
                handler.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for thread in [self._thread] + threads:
            if thread is not None and thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in [self._thread] + threads if t is not None and t.is_alive()]
        if alive:
            log.warning("zammad-standin: threads still running after stop(): %s", alive)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1/cti/{self.token}"

    # ------------------------------------------------------------ fault injection
    def fail_next(self, n: int = 1, status: int = 503, body: str = "<html>502 Bad Gateway</html>",
                  content_type: str = "text/html") -> None:
        """Answer the next ``n`` requests with ``status``/``body`` without processing them
        (a proxy in front of Zammad failing)."""
        with self._cond:
            self._fail_next.extend([(status, body, content_type)] * n)

    def set_down(self, down: bool = True) -> None:
        """While down every request gets nginx's 503 page and is not processed."""
        with self._cond:
            self._down = down

    def set_delay(self, seconds: float) -> None:
        """Sleep this long before processing and answering each request (slow Zammad)."""
        with self._cond:
            self._delay = float(seconds or 0)

    def set_hang(self, seconds: float | None) -> None:
        """Requests arriving while set are held ``seconds``, then processed and answered
        anyway: a client that timed out meanwhile may still have been processed
        (see ``CtiRequest.processed_after_client_gone``). ``None``/0 clears it."""
        with self._cond:
            self._hang = float(seconds or 0)

    def close_without_response_next(self, n: int = 1) -> None:
        """Read the next ``n`` requests, do not process them, close the connection."""
        with self._cond:
            self._close_next += n

    def drop_idle_connections(self) -> int:
        """Close every keep-alive connection not currently inside a request (an nginx
        keepalive_timeout or restart): the client's next reuse of it fails."""
        with self._cond:
            idle = [h for h in self._conns.values() if not h.busy]
        for handler in idle:
            try:
                handler.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return len(idle)

    # --------------------------------------------------------------- observation
    def requests_for(self, call_id: str) -> list:
        """The requests that carried this callId, in arrival order."""
        with self._cond:
            return [r for r in self.requests if r.call_id == call_id]

    def caller_log(self) -> list:
        """Zammad's caller log as plain dicts, one per callId, in creation order.

        - ``callId``: the call's id as sent in newCall.
        - ``direction``: ``in``/``out`` from newCall.
        - ``from`` / ``to``: numbers from newCall.
        - ``queue``: ``queue`` param, defaulting to ``to`` (in) / ``from`` (out).
        - ``state``: last accepted event: ``newCall``, ``answer`` or ``hangup``.
        - ``done``: Zammad's done flag; ``missed`` is ``not done`` (a call to return).
        - ``answered_by``: ``user`` of the answer event (Zammad's to_comment after an
          answer; ``'voicemail'`` for voicemail), None if never answered.
        - ``answering_number``: ``answeringNumber`` of the answer event, or None.
        - ``screen_pop``: login of the agent Zammad opens the caller for on an inbound
          answer (``rest.screen_pop_agent``: caller id, phone field, login), or None.
        - ``cause``: the comment Zammad shows: the last event's ``cause`` (or None).
        - ``hangups``: hangup events accepted for this call (must be 1 when finished).
        - ``from_comment`` / ``to_comment``: Zammad's columns (for ``out`` calls the
          calling agent given as ``user`` is ``from_comment``).
        - ``events``: accepted event names, in order.
        """
        with self._cond:
            return [{
                "callId": call_id,
                "direction": rec["direction"],
                "from": rec["from"],
                "to": rec["to"],
                "queue": rec["queue"],
                "state": rec["state"],
                "done": rec["done"],
                "missed": not rec["done"],
                "answered_by": rec["to_comment"] if rec["answered"] else None,
                "answering_number": rec["answering_number"],
                "screen_pop": rec["screen_pop"],
                "cause": rec["comment"],
                "hangups": rec["hangup_count"],
                "from_comment": rec["from_comment"],
                "to_comment": rec["to_comment"],
                "events": list(rec["events"]),
            } for call_id, rec in self.calls.items()]

    def wait_for(self, predicate: Callable[[], object], timeout: float = 10.0, *,
                 raise_on_timeout: bool = True, message: str = "condition") -> object:
        """Wait until ``predicate()`` is truthy and return its value. On timeout raise
        TimeoutError listing the requests seen (or return the falsy value)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate()
                if value or time.monotonic() >= deadline:
                    break
                self._cond.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            if value or not raise_on_timeout:
                return value
            seen = [(r.fields.get("event"), r.call_id, r.status) for r in self.requests]
        raise TimeoutError(f"Zammad stand-in: timed out after {timeout}s waiting for {message}; "
                           f"requests (event, callId, status): {seen}")

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> list:
        """Wait until ``n`` requests have been completely handled; return them all."""
        self.wait_for(lambda: sum(r.completed for r in self.requests) >= n, timeout,
                      message=f"{n} completed requests")
        with self._cond:
            return list(self.requests)

    # ------------------------------------------------------------------ internals
    def _conn_opened(self, handler: _Handler) -> int:
        with self._cond:
            self._conn_seq += 1
            self._conns[self._conn_seq] = handler
            self._conn_threads = [t for t in self._conn_threads if t.is_alive()]
            self._conn_threads.append(threading.current_thread())
            return self._conn_seq

    def _conn_closed(self, handler: _Handler) -> None:
        with self._cond:
            self._conns.pop(handler.conn_id, None)

    def _handle(self, handler: _Handler) -> None:
        arrived = time.monotonic()
        try:
            raw = handler.read_body()
        except (OSError, ValueError) as exc:
            log.debug("zammad-standin: could not read request body: %s", exc)
            handler.close_connection = True
            return
        req = self._record(handler, raw, arrived)

        with self._cond:
            if self._close_next:
                self._close_next -= 1
                fault = ("close",)
            elif self._fail_next:
                fault = ("injected",) + self._fail_next.pop(0)
            elif self._down:
                fault = ("down", 503, DOWN_PAGE, "text/html")
            elif len(raw) > self.max_body:
                fault = ("too_large", 413, TOO_LARGE_PAGE, "text/html")
            else:
                fault = None
            hold = max(self._hang, self._delay)

        if fault and fault[0] == "close":
            handler.close_connection = True
            self._finish(req, None, "", "closed", processed=False)
            return
        if fault:
            outcome, status, body, ctype = fault
            self._finish(req, status, body, outcome, processed=False)
            if not handler.write_response(status, body, ctype):
                self._mark_gone(req)
            return

        if hold and self._stopping.wait(hold):
            handler.close_connection = True
            self._finish(req, None, "", "closed", processed=False)
            return
        gone = handler.client_gone()
        status, body, ctype, outcome = self._process(req)
        self._finish(req, status, body, outcome, processed=outcome == "processed", gone=gone)
        if not handler.write_response(status, body, ctype):
            self._mark_gone(req)

    def _record(self, handler: _Handler, raw: bytes, arrived: float) -> CtiRequest:
        ctype = handler.headers.get("Content-Type") or ""
        split = urlsplit(handler.path)
        pairs = parse_qsl(split.query, keep_blank_values=True)
        if ctype.split(";")[0].strip().lower() == "application/x-www-form-urlencoded":
            pairs += parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True)
        elif "json" in ctype.lower():
            try:
                obj = json.loads(raw.decode("utf-8") or "{}")
                if isinstance(obj, dict):
                    pairs += list(obj.items())
            except ValueError:
                pass  # Rails would 400; here the missing fields lead to a 422
        fields = _rails_fields(pairs)
        req = CtiRequest(method=handler.command, path=split.path, headers=dict(handler.headers.items()),
                         content_type=ctype, raw_body=raw, form=pairs, fields=fields, arrived=arrived,
                         conn_id=handler.conn_id)
        with self._cond:
            self.requests.append(req)
            self._cond.notify_all()
        return req

    def _finish(self, req: CtiRequest, status: int | None, body: str, outcome: str, *,
                processed: bool, gone: bool = False) -> None:
        """Record the answer *before* it is sent, so a client holding the response
        always finds its request recorded as answered."""
        with self._cond:
            req.client_gone = gone
            req.processed_after_client_gone = gone and processed
            req.status = status
            req.body = body
            req.outcome = outcome
            req.processed = processed
            req.answered = time.monotonic()
            req.completed = True
            self._cond.notify_all()

    def _mark_gone(self, req: CtiRequest) -> None:
        with self._cond:
            req.client_gone = True
            req.processed_after_client_gone = req.processed
            self._cond.notify_all()

    def _process(self, req: CtiRequest) -> tuple:
        """Zammad's controller + driver + Cti::Log, as (status, body, content type, outcome)."""
        wants_json = "application/json" in (req.header("Accept") or "")
        path = req.path.rstrip("/")
        if path.startswith("/api/v1/") and not (req.method == "POST"
                                                and path.startswith("/api/v1/cti/")):
            with self._cond:
                status, answer = self.rest.process(
                    req.method, path, dict(req.form),
                    {k.lower(): v for k, v in req.headers.items()}, self.calls)
            return (status, json.dumps(answer, separators=(",", ":")),
                    "application/json; charset=utf-8", "processed" if status < 400 else "rejected")
        try:
            with self._cond:
                result = self._process_locked(req)
            return 200, json.dumps(result, separators=(",", ":")), "application/json; charset=utf-8", "processed"
        except _ZammadError as exc:
            if exc.status == 500 and not wants_json:
                page = ("<!DOCTYPE html>\n<html>\n<head>\n<title>Zammad</title>\n</head>\n<body>\n"
                        f"<h1>500</h1>\n<p>{html.escape(exc.message)}</p>\n</body>\n</html>\n")
                return 500, page, "text/html; charset=utf-8", "rejected"
            body = json.dumps({"error": exc.message}, separators=(",", ":"))
            return exc.status, body, "application/json; charset=utf-8", "rejected"

    def _process_locked(self, req: CtiRequest) -> dict:
        if req.method != "POST" or not req.path.rstrip("/").startswith("/api/v1/cti/"):
            raise _ZammadError(404, f"No route matches [{req.method}] {req.path!r}")
        if self.disabled:
            raise _ZammadError(422, DISABLED_ERROR)
        if req.path.rstrip("/")[len("/api/v1/cti/"):] != self.token:
            raise _ZammadError(401, TOKEN_ERROR)
        f = req.fields
        direction = f.get("direction")
        if direction not in ("in", "out"):
            raise _ZammadError(422, "Invalid direction!")
        event = f.get("event")
        call_id = _call_id(f)
        user = f.get("user")
        if isinstance(user, list):
            user = ", ".join(str(u) for u in user)
        user_present = user is not None and str(user).strip() != ""
        cause = f.get("cause")
        result: dict = {}
        if event == "newCall" and direction == "in" and f.get("from") in self.reject_callers:
            result = {"action": "reject", "reason": "busy"}
        if event not in ("newCall", "answer", "hangup"):
            raise _ZammadError(422, f"Unknown event {event!r}")
        if call_id is None:
            raise _ZammadError(422, "callId is missing")
        rec = self.calls.get(call_id)

        if event == "newCall":
            if rec is not None:
                raise _ZammadError(500, f"call_id {call_id} already exists!")
            if f.get("from") is None or f.get("to") is None:
                raise _ZammadError(422, "from and to are required for newCall")
            queue = f.get("queue")
            if queue is None:
                queue = f.get("to") if direction == "in" else f.get("from")
            matches = self.rest.caller_matches(f.get("from") if direction == "in" else f.get("to"))
            self.calls[call_id] = {
                "direction": direction,
                "from": f.get("from"),
                "to": f.get("to"),
                "queue": queue,
                "state": "newCall",
                "done": direction != "in",
                "preferences": {"from" if direction == "in" else "to": matches},
                "screen_pop": None,
                "from_comment": user if direction == "out" and user_present
                else self.rest.matches_comment(matches) if direction == "in" else None,
                "to_comment": user if direction == "in" and user_present else None,
                "comment": cause,
                "answered": False,
                "answering_number": None,
                "hangup_count": 0,
                "initialized_at": req.arrived,
                "start_at": None,
                "end_at": None,
                "events": ["newCall"],
            }
            return result

        if rec is None:
            raise _ZammadError(500, f"No such call_id {call_id}")
        if event == "answer":
            if rec["state"] == "hangup":
                return result  # Zammad ignores an answer after the hangup
            rec["state"] = "answer"
            rec["done"] = True
            rec["answered"] = True
            rec["start_at"] = req.arrived
            if user is not None:
                rec["to_comment"] = user
            rec["answering_number"] = f.get("answeringNumber")
            if direction == "in":
                rec["screen_pop"] = self.rest.screen_pop_agent(f.get("answeringNumber"), user)
            rec["comment"] = cause
            rec["events"].append("answer")
            return result

        # hangup
        rec["done"] = True
        if direction == "in" and ((rec["state"] == "newCall" and cause != "forwarded")
                                  or rec["to_comment"] == "voicemail"):
            rec["done"] = False
        rec["state"] = "hangup"
        rec["end_at"] = req.arrived
        rec["comment"] = cause
        rec["hangup_count"] += 1
        rec["events"].append("hangup")
        return result
