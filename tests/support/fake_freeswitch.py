"""A fake FreeSWITCH event socket (inbound mode) for end-to-end tests.

The service under test talks to FreeSWITCH over TCP with the real ESL wire
protocol, so this stand-in speaks exactly that protocol on 127.0.0.1 rather
than mocking a Python API: whatever parser or client library the service uses
meets the same bytes a FreeSWITCH 1.10 would send (framing, URL-encoding,
repeated headers, disconnect notices).

It is written with plain ``socket``/``threading`` (not gevent) because the
tests run in an ordinary pytest process and start the service as a subprocess.

Threads: one accept thread, one thread per client connection (reads
commands, writes replies) and an optional heartbeat thread. Events are written
synchronously by whichever thread calls :meth:`FakeFreeSwitch.emit` /
:meth:`FakeFreeSwitch.replay`, under a per-client lock, so when those methods
return the bytes are in the kernel's send buffer: a following ``drop()`` can
not overtake them. Only a client's own thread ever calls ``close()`` on its
socket; other threads use ``shutdown()`` (which reliably wakes a blocked reader)
so a file descriptor is never closed under a thread still using it.

Deliberate simplifications (documented so no test relies on them by accident):
only ``event plain`` is supported (``json``/``xml`` get ``-ERR``); no
``myevents``, ``sendmsg``, ``linger``, ``log``; events are never queued for a
slow reader: a write that blocks longer than ``send_timeout`` kills the
connection, much like FreeSWITCH's "killed listener because of lost events".
"""

from __future__ import annotations

import logging
import re
import select
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union
from urllib.parse import unquote

log = logging.getLogger(__name__)

AUTH_REQUEST = b"Content-Type: auth/request\n\n"
RUDE_REJECTION = b"Access Denied, go away.\n"
GOODBYE = b"Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"
SHUTDOWN_NOTICE = b"The system is being shut down.\n"

# FreeSWITCH's SWITCH_URL_UNSAFE (switch_utils.h); besides these it escapes
# every byte below 0x20 or above 0x7E. Note that '/', ',', '(', ')', '!', '~'
# stay raw, unlike urllib.parse.quote(safe=''). Hex digits are upper case.
_URL_UNSAFE = frozenset(b'\r\n #%&+:;<=>?@[\\]^`{|}"')

Headers = Union[Mapping[str, object], Sequence[tuple]]  # noqa: UP007 - evaluated at runtime, 3.9 too


def fs_url_encode(value: str) -> str:
    """Encode a header value byte for byte the way switch_url_encode() does."""
    out = []
    for byte in value.encode("utf-8"):
        if byte < 0x20 or byte > 0x7E or byte in _URL_UNSAFE:
            out.append(f"%{byte:02X}")
        else:
            out.append(chr(byte))
    return "".join(out)


def serialize_event(headers: Headers, body: str | None = None) -> bytes:
    """Build an event-plain body as switch_event_serialize() does.

    Values are URL-encoded, an empty value becomes ``_undef_``, the header
    block ends with a blank line; an event body (e.g. BACKGROUND_JOB) follows
    as ``Content-Length: N`` + blank line + body, without a trailing newline.
    """
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    lines = []
    for name, value in pairs:
        encoded = fs_url_encode("" if value is None else str(value))
        lines.append(f"{name}: {encoded or '_undef_'}\n")
    text = "".join(lines)
    if body:
        raw = body.encode("utf-8")
        return text.encode("utf-8") + b"Content-Length: %d\n\n" % len(raw) + raw
    return text.encode("utf-8") + b"\n"


def frame_event(body: bytes) -> bytes:
    """Wrap an event-plain body in mod_event_socket's outer frame."""
    return b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % len(body) + body


def parse_event_body(body: bytes) -> list:
    """Split an event-plain body into ``(name, decoded value)`` pairs, in order.

    Each line is split at the first ``": "`` and only then URL-decoded, so an
    encoded newline inside a value stays inside that value. Repeated headers
    (``Hangup-Cause`` on CHANNEL_HANGUP_COMPLETE) are all kept. An embedded
    event body is returned as a final ``("_body", text)`` pair.
    """
    text = body.decode("utf-8", "replace")
    head, _, rest = text.partition("\n\n")
    pairs = []
    for line in head.split("\n"):
        name, sep, value = line.partition(": ")
        if sep:
            pairs.append((name, unquote(value)))
    if rest and any(n == "Content-Length" for n, _ in pairs):
        pairs.append(("_body", rest))
    return pairs


def first_values(pairs: Iterable[tuple]) -> dict:
    """Pairs to a dict keeping the first value of a repeated header (like switch_event_get_header)."""
    result: dict = {}
    for name, value in pairs:
        result.setdefault(name, value)
    return result


def iter_frames(path: str | Path) -> list:
    """Read a captured wire file into ``[(headers dict, raw frame bytes), ...]``.

    The raw bytes are the complete frame (outer header + body) exactly as it
    was read from the socket, ready to be forwarded unchanged.
    """
    data = Path(path).read_bytes()
    frames = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\n\n", pos)
        if end < 0:
            raise ValueError(f"{path}: truncated frame header at byte {pos}")
        outer = first_values(
            line.split(": ", 1) for line in data[pos:end].decode().split("\n") if ": " in line
        )
        length = int(outer.get("Content-Length", 0))
        stop = end + 2 + length
        if stop > len(data):
            raise ValueError(f"{path}: frame at byte {pos} wants {length} bytes, file ends early")
        body = data[end + 2:stop]
        frames.append((first_values(parse_event_body(body)), data[pos:stop]))
        pos = stop
    return frames


def _filter_matches(filters: list, headers: dict) -> bool:
    """Apply mod_event_socket's filter rules.

    No filters: everything passes. Otherwise an event passes when at least one
    positive filter matches one of its headers (case-insensitive equality, or
    a regex when the value is written ``/regex/``); a matching ``-value``
    (negative) filter vetoes the event.
    """
    if not filters:
        return True
    send = False
    for name, wanted in filters:
        have = headers.get(name)
        if have is None:
            continue
        positive = True
        stripped = wanted.lstrip()
        if stripped[:1] in ("+", "-"):
            positive = stripped[0] == "+"
            stripped = stripped[1:].lstrip()
        if stripped.startswith("/"):
            hit = re.search(stripped.strip("/"), have) is not None
        else:
            hit = have.lower() == stripped.lower()
        if hit and not positive:
            return False
        if hit:
            send = True
    return send


@dataclass
class ClientInfo:
    """A snapshot of one connection, for assertions."""

    conn_id: int
    addr: tuple
    authed: bool
    events: frozenset
    subclasses: frozenset
    filters: tuple


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    addr: tuple
    conn_id: int
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    authed: bool = False
    subscribed: bool = False
    events: set = field(default_factory=set)
    subclasses: set = field(default_factory=set)
    filters: list = field(default_factory=list)
    closing: bool = False  # someone asked this connection to go away
    reset: bool = False  # close with RST (SO_LINGER 0) instead of FIN
    thread: threading.Thread | None = None

    def wants(self, headers: dict) -> bool:
        """Would FreeSWITCH deliver an event with these headers to this client?"""
        if not (self.authed and self.subscribed) or self.closing:
            return False
        name = headers.get("Event-Name")
        if name is None:
            # Malformed on purpose (emit_body/send tests): every subscriber gets it.
            return True
        if "ALL" in self.events:
            pass
        elif name not in self.events:
            return False
        elif name == "CUSTOM":
            sub = headers.get("Event-Subclass")
            if sub is not None and sub not in self.subclasses:
                return False
        return _filter_matches(self.filters, headers)

    def send_locked(self, data: bytes) -> bool:
        """Write all of ``data``; caller holds ``send_lock``. False if the socket is gone."""
        if self.closing:
            return False
        try:
            self.sock.sendall(data)
            return True
        except OSError as exc:
            log.debug("fake-fs: send to conn %d failed: %s", self.conn_id, exc)
            self.closing = True
            return False

    def send(self, data: bytes) -> bool:
        with self.send_lock:
            return self.send_locked(data)

    def info(self) -> ClientInfo:
        with self.send_lock:
            return ClientInfo(self.conn_id, self.addr, self.authed, frozenset(self.events),
                              frozenset(self.subclasses), tuple(self.filters))


class FakeFreeSwitch:
    """FreeSWITCH's event socket (mod_event_socket, inbound mode) on 127.0.0.1.

    Use as a context manager, or call :meth:`start` / :meth:`stop`. Options:

    - ``password``: what ``auth`` must carry (FreeSWITCH's default ``ClueCon``).
    - ``acl_deny``: answer every connection with ``text/rude-rejection`` and close
      (what FreeSWITCH does when the client's address is not in the ACL).
    - ``silent``: accept TCP but never send ``auth/request`` (a hung FreeSWITCH;
      tests connect timeouts).
    - ``api_responses``: ``{command: body or callable(command) -> body}``; looked up
      by the full command, then by its first word, then the built-in defaults.
    - ``heartbeat_interval``: seconds between HEARTBEAT events (None: off;
      FreeSWITCH's default is 20 s).
    - ``send_timeout``: a client that does not read for this long is disconnected.
    - ``auth_timeout``: FreeSWITCH closes a connection that has not authenticated
      within 25 s.

    ``acl_deny``, ``silent`` and ``password`` are read when a connection is
    accepted, so a test may change them between connection attempts.
    """

    def __init__(self, password: str = "ClueCon", *, port: int = 0, acl_deny: bool = False,
                 silent: bool = False, api_responses: dict | None = None,
                 heartbeat_interval: float | None = None, send_timeout: float = 10.0,
                 auth_timeout: float = 25.0, hostname: str = "vm"):
        self.password = password
        self.acl_deny = acl_deny
        self.silent = silent
        self.api_responses = dict(api_responses or {})
        self.heartbeat_interval = heartbeat_interval
        self.send_timeout = send_timeout
        self.auth_timeout = auth_timeout
        self.hostname = hostname
        self.core_uuid = str(uuid.uuid4())
        self.port = port
        self.commands: list = []
        self.api_calls: list = []
        self.connections_total = 0
        self.events_delivered = 0
        self._cond = threading.Condition()
        self._clients: list = []
        self._frozen = False
        self._sequence = 1000
        self._started_at = time.time()
        self._stopping = threading.Event()
        self._want_listen = True
        self._lsock: socket.socket | None = None
        self._listening = False
        self._accept_thread: threading.Thread | None = None
        self._heartbeat_thread: threading.Thread | None = None
        self._threads: list = []  # every client thread ever started, joined by stop()

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> FakeFreeSwitch:
        """Bind (so ``.port`` is known when this returns) and start serving."""
        self._lsock = self._bind(self.port)
        self.port = self._lsock.getsockname()[1]
        self._listening = True
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True,
                                               name=f"fake-fs-accept:{self.port}")
        self._accept_thread.start()
        if self.heartbeat_interval:
            self._heartbeat_thread = threading.Thread(target=self._heartbeat_loop, daemon=True,
                                                      name=f"fake-fs-heartbeat:{self.port}")
            self._heartbeat_thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close everything and join every thread this instance started."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        # The accept thread first, so no new client appears behind our back.
        for thread in (self._accept_thread, self._heartbeat_thread):
            if thread is not None and thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        for client in self._snapshot():
            self._request_close(client)
        with self._cond:
            threads = list(self._threads)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in threads + [self._accept_thread, self._heartbeat_thread]
                 if t is not None and t.is_alive()]
        if alive:
            log.warning("fake-fs: threads still running after stop(): %s", alive)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # ------------------------------------------------------------- observation
    @property
    def client_count(self) -> int:
        """Connections currently open (authenticated or not)."""
        with self._cond:
            return len(self._clients)

    def clients(self) -> list:
        """Snapshots (:class:`ClientInfo`) of the open connections."""
        return [c.info() for c in self._snapshot()]

    def wait_until(self, predicate: Callable[[], object], timeout: float = 10.0,
                   message: str = "condition") -> object:
        """Wait until ``predicate()`` is truthy and return its value; TimeoutError otherwise.

        Woken on every state change here, and polled every 50 ms in case the
        predicate looks at something else.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"fake FreeSWITCH: timed out after {timeout}s waiting for {message}; "
                                       f"commands so far: {self.commands[-20:]}")
                self._cond.wait(min(left, 0.05))

    def wait_for_subscription(self, timeout: float = 10.0, after: int = 0) -> set:
        """Block until an open connection with ``conn_id > after`` is authenticated
        and has had its ``event plain ...`` acknowledged; return its subscription
        (event names plus CUSTOM subclass names).

        To wait for a *re*connection: ``n = fs.connections_total; fs.drop();
        fs.wait_for_subscription(after=n)``.
        """
        def subscribed():
            for c in self._clients:
                if c.conn_id > after and c.authed and c.subscribed and not c.closing:
                    return set(c.events) | set(c.subclasses)
            return None
        return self.wait_until(subscribed, timeout, "an authenticated, subscribed client")

    # ------------------------------------------------------------------ events
    def emit(self, headers: Headers, body: str | None = None, *, complete: bool = True) -> int:
        """Send one event built from ``headers`` (dict or list of pairs, so repeats are possible).

        With ``complete`` the standard headers FreeSWITCH puts on every event
        (Core-UUID, FreeSWITCH-Hostname, Event-Date-*, Event-Sequence, ...) are
        added after Event-Name unless given. Returns how many clients got it.
        """
        pairs = list(headers.items() if isinstance(headers, Mapping) else headers)
        if complete:
            given = dict(pairs)
            std = [(name, given.get(name, value)) for name, value in self._standard_headers()]
            std_names = {name for name, _ in std}
            pairs = ([p for p in pairs if p[0] == "Event-Name"] + std
                     + [p for p in pairs if p[0] != "Event-Name" and p[0] not in std_names])
        return self.emit_body(serialize_event(pairs, body))

    def emit_body(self, body: bytes) -> int:
        """Send a raw event-plain body (framed here) to every client that would
        receive it; a body without Event-Name goes to every subscribed client."""
        headers = first_values(parse_event_body(body))
        return self._deliver(frame_event(body), headers)

    def replay(self, path: str | Path, delay: float = 0.0) -> int:
        """Forward every frame of a captured wire file, byte for byte, to the
        clients whose subscription and filters match; ``delay`` seconds between
        frames. Returns the number of frames that reached at least one client."""
        sent = 0
        for index, (headers, raw) in enumerate(iter_frames(path)):
            if index and delay and self._stopping.wait(delay):
                break  # stop() interrupted a slow replay
            if self._deliver(raw, headers):
                sent += 1
        return sent

    iter_frames = staticmethod(iter_frames)

    def heartbeat(self, session_count: int = 0) -> int:
        """Emit a HEARTBEAT shaped like FreeSWITCH 1.10's (see the fixtures)."""
        up_ms = int((time.time() - self._started_at) * 1000)
        return self.emit([
            ("Event-Name", "HEARTBEAT"),
            ("Event-Calling-File", "switch_core.c"),
            ("Event-Calling-Function", "send_heartbeat"),
            ("Event-Calling-Line-Number", "95"),
            ("Event-Info", "System Ready"),
            ("Up-Time", self._uptime_text()),
            ("FreeSWITCH-Version", "1.10.12-release~64bit"),
            ("Uptime-msec", str(up_ms)),
            ("Session-Count", str(session_count)),
            ("Max-Sessions", "1000"),
            ("Session-Per-Sec", "30"),
            ("Session-Per-Sec-Last", "0"),
            ("Session-Per-Sec-Max", "2"),
            ("Session-Per-Sec-FiveMin", "0"),
            ("Session-Since-Startup", "0"),
            ("Session-Peak-Max", "0"),
            ("Session-Peak-FiveMin", "0"),
            ("Idle-CPU", "98.800000"),
        ])

    def send_raw(self, data: bytes | Iterable[bytes]) -> int:
        """Write ``data`` unchanged to every open connection (malformed-frame tests).

        ``data`` may be an iterable of chunks (even an endless generator): they
        are written one after the other until the client stops taking them
        (closes the connection), so a test can send 64 MB or an endless frame
        head without holding it in memory. Returns how many clients took it all.
        """
        chunks = [data] if isinstance(data, (bytes, bytearray)) else data
        clients = self._snapshot()
        if not isinstance(data, (bytes, bytearray)) and len(clients) > 1:
            raise ValueError("send_raw: a chunk iterable can feed one connection only")
        count = 0
        for client in clients:
            with client.send_lock:
                ok = all(client.send_locked(chunk) for chunk in chunks)
            if ok:
                count += 1
            else:
                self._request_close(client)
        return count

    # ---------------------------------------------------------- fault injection
    def drop(self, notice: bool = True, *, reset: bool = False, timeout: float = 5.0) -> None:
        """Disconnect every client and wait until they are closed.

        ``notice=True`` is a clean FreeSWITCH shutdown (disconnect notice, then
        close). ``notice=False`` is a crash: the connection just closes;
        ``reset=True`` additionally sends a TCP RST instead of a FIN.
        """
        doomed = self._snapshot()
        for client in doomed:
            if notice:
                client.send(self._disconnect_notice(SHUTDOWN_NOTICE))
            self._request_close(client, reset=reset)
        self.wait_until(lambda: all(c not in self._clients for c in doomed) or None, timeout,
                        "dropped connections to close")

    def pause_accepting(self, timeout: float = 5.0) -> None:
        """Close the listening socket: new connects are refused (FreeSWITCH is
        down). Open connections are left alone; call :meth:`drop` for those."""
        with self._cond:
            self._want_listen = False
            self._cond.notify_all()
        self.wait_until(lambda: not self._listening, timeout, "listener to close")

    def resume_accepting(self, timeout: float = 5.0) -> None:
        """Listen again on the same port."""
        with self._cond:
            self._want_listen = True
            self._cond.notify_all()
        self.wait_until(lambda: self._listening, timeout, f"listener to reopen on port {self.port}")

    def set_frozen(self, frozen: bool) -> None:
        """A hung FreeSWITCH: connections stay open but no event is delivered
        and commands (still recorded) get no reply (tests liveness checks)."""
        with self._cond:
            self._frozen = frozen
            self._cond.notify_all()

    # ------------------------------------------------------------- internals
    def _snapshot(self) -> list:
        with self._cond:
            return list(self._clients)

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _bind(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen(16)
        except OSError:
            sock.close()
            raise
        return sock

    def _accept_loop(self) -> None:
        """Own the listening socket: accept, and close/reopen it on request."""
        try:
            while not self._stopping.is_set():
                with self._cond:
                    want = self._want_listen
                if want and self._lsock is None:
                    try:
                        self._lsock = self._bind(self.port)
                    except OSError as exc:
                        log.debug("fake-fs: re-listen on %d failed: %s", self.port, exc)
                        self._stopping.wait(0.05)
                        continue
                    self._set_listening(True)
                elif not want and self._lsock is not None:
                    self._lsock.close()
                    self._lsock = None
                    self._set_listening(False)
                if self._lsock is None:
                    self._stopping.wait(0.02)
                    continue
                readable, _, _ = select.select([self._lsock], [], [], 0.05)
                if readable:
                    try:
                        sock, addr = self._lsock.accept()
                    except OSError as exc:
                        log.debug("fake-fs: accept failed: %s", exc)
                        continue
                    self._start_client(sock, addr)
        finally:
            if self._lsock is not None:
                self._lsock.close()
                self._lsock = None
            self._set_listening(False)

    def _set_listening(self, value: bool) -> None:
        with self._cond:
            self._listening = value
            self._cond.notify_all()

    def _start_client(self, sock: socket.socket, addr: tuple) -> None:
        sock.settimeout(self.send_timeout)  # bounds sendall(); reads go through select()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._cond:
            self.connections_total += 1
            client = _Client(sock, addr, self.connections_total)
            self._clients.append(client)
            self._cond.notify_all()
        client.thread = threading.Thread(target=self._client_loop, args=(client,), daemon=True,
                                         name=f"fake-fs-conn{client.conn_id}:{self.port}")
        with self._cond:
            self._threads = [t for t in self._threads if t.is_alive()] + [client.thread]
        client.thread.start()

    def _request_close(self, client: _Client, reset: bool = False) -> None:
        """Make the client's own thread close its socket (FIN, or RST with ``reset``)."""
        with self._cond:
            client.closing = True
            client.reset = reset
        if not reset:
            try:
                client.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already gone

    def _client_loop(self, client: _Client) -> None:
        try:
            if self.acl_deny:
                client.send(b"Content-Type: text/rude-rejection\nContent-Length: %d\n\n%s"
                            % (len(RUDE_REJECTION), RUDE_REJECTION))
                return
            if not self.silent:
                client.send(AUTH_REQUEST)
            self._read_commands(client)
        finally:
            self._close_client(client)

    def _read_commands(self, client: _Client) -> None:
        """Read ``\\n\\n``-terminated commands until EOF, exit, stop or auth timeout."""
        buf = b""
        auth_deadline = time.monotonic() + self.auth_timeout
        while not self._stopping.is_set() and not client.closing:
            if not client.authed and time.monotonic() > auth_deadline:
                log.debug("fake-fs: conn %d did not authenticate in time", client.conn_id)
                return
            try:
                readable, _, _ = select.select([client.sock], [], [], 0.1)
                if not readable:
                    continue
                data = client.sock.recv(65536)
            except (OSError, ValueError):
                return
            if not data:
                return
            if self.silent and not client.authed:
                continue  # never asked for auth: ignore whatever arrives
            buf += data.replace(b"\r", b"")
            if len(buf) > 1 << 20:
                log.warning("fake-fs: conn %d sent 1 MiB without a command terminator", client.conn_id)
                return
            while b"\n\n" in buf:
                raw, buf = buf.split(b"\n\n", 1)
                text = raw.decode("utf-8", "replace").strip("\n")
                if text and not self._handle_command(client, text):
                    return

    def _close_client(self, client: _Client) -> None:
        if client.reset:
            try:
                client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        else:
            try:
                client.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with client.send_lock:
            client.closing = True
            client.sock.close()
        with self._cond:
            if client in self._clients:
                self._clients.remove(client)
            self._cond.notify_all()

    def _record(self, text: str) -> None:
        with self._cond:
            self.commands.append(text)
            self._cond.notify_all()

    def _handle_command(self, client: _Client, text: str) -> bool:
        """Answer one command; False means close the connection."""
        self._record(text)
        line = text.split("\n", 1)[0].strip()
        verb, _, arg = line.partition(" ")
        verb = verb.lower()
        arg = arg.strip()
        with self._cond:
            frozen = self._frozen
        if frozen:
            return True
        if not client.authed:
            if verb != "auth":
                self._reply(client, "-ERR command not found")
                return True
            if line[5:] == self.password:
                with client.send_lock:
                    client.authed = True
                    client.send_locked(b"Content-Type: command/reply\nReply-Text: +OK accepted\n\n")
                self._notify()
                return True
            self._reply(client, "-ERR invalid")
            client.send(self._disconnect_notice(GOODBYE))
            return False
        if verb == "event":
            return self._cmd_event(client, arg)
        if verb == "nixevent":
            with client.send_lock:
                for token in arg.split():
                    client.events.discard(token.upper())
                    client.subclasses.discard(token)
                client.send_locked(b"Content-Type: command/reply\nReply-Text: +OK events nixed\n\n")
            return True
        if verb == "noevents":
            with client.send_lock:
                client.events.clear()
                client.subclasses.clear()
                client.subscribed = False
                client.send_locked(b"Content-Type: command/reply\nReply-Text: +OK no longer listening for events\n\n")
            self._notify()
            return True
        if verb == "filter":
            return self._cmd_filter(client, arg)
        if verb == "api":
            with self._cond:
                self.api_calls.append(arg)
            body = self._api_body(arg).encode("utf-8")
            client.send(b"Content-Type: api/response\nContent-Length: %d\n\n%s" % (len(body), body))
            return True
        if verb == "bgapi":
            return self._cmd_bgapi(client, arg)
        if verb == "exit":
            self._reply(client, "+OK bye")
            client.send(self._disconnect_notice(GOODBYE))
            return False
        self._reply(client, "-ERR command not found")
        return True

    def _reply(self, client: _Client, text: str, extra: str = "") -> None:
        client.send(f"Content-Type: command/reply\nReply-Text: {text}\n{extra}\n".encode())

    def _cmd_event(self, client: _Client, arg: str) -> bool:
        tokens = arg.split()
        fmt = "plain"
        if tokens and tokens[0].lower() in ("plain", "json", "xml"):
            fmt = tokens.pop(0).lower()
        if fmt != "plain":
            self._reply(client, f"-ERR this fake FreeSWITCH only speaks 'event plain', not {fmt}")
            return True
        if not tokens:
            self._reply(client, "-ERR no keywords supplied")
            return True
        with client.send_lock:  # subscribe and acknowledge atomically w.r.t. emit()
            custom = False
            for token in tokens:
                if custom:
                    client.subclasses.add(token)
                elif token.upper() == "CUSTOM":
                    custom = True
                    client.events.add("CUSTOM")
                else:
                    client.events.add(token.upper())
            client.send_locked(b"Content-Type: command/reply\nReply-Text: +OK event listener enabled plain\n\n")
            client.subscribed = True
        self._notify()
        return True

    def _cmd_filter(self, client: _Client, arg: str) -> bool:
        header, _, value = arg.partition(" ")
        value = value.strip()
        if header == "delete":
            header, _, value = value.partition(" ")
            value = value.strip()
            with client.send_lock:
                if header.lower() == "all" or not header:
                    client.filters.clear()
                else:
                    client.filters = [(h, v) for h, v in client.filters
                                      if not (h == header and (not value or v == value))]
                client.send_locked(f"Content-Type: command/reply\nReply-Text: +OK filter deleted. "
                                   f"[{header}]=[{value}]\n\n".encode())
            self._notify()
            return True
        if not header or not value:
            self._reply(client, "-ERR invalid syntax")
            return True
        with client.send_lock:
            client.filters.append((header, value))
            client.send_locked(f"Content-Type: command/reply\nReply-Text: +OK filter added. "
                               f"[{header}]=[{value}]\n\n".encode())
        self._notify()
        return True

    def _cmd_bgapi(self, client: _Client, arg: str) -> bool:
        job = str(uuid.uuid4())
        with self._cond:
            self.api_calls.append(arg)
        self._reply(client, f"+OK Job-UUID: {job}", f"Job-UUID: {job}\n")
        command, _, cmd_arg = arg.partition(" ")
        headers = [("Event-Name", "BACKGROUND_JOB"), ("Job-UUID", job), ("Job-Command", command)]
        if cmd_arg:
            headers.append(("Job-Command-Arg", cmd_arg))
        self.emit(headers, self._api_body(arg))
        return True

    def _api_body(self, cmd: str) -> str:
        for key in (cmd, cmd.split(" ", 1)[0]):
            if key in self.api_responses:
                found = self.api_responses[key]
                try:
                    return found(cmd) if callable(found) else str(found)
                except Exception as exc:  # a test's callable failed: say so on the wire
                    log.exception("fake-fs: api_responses[%r] raised", key)
                    return f"-ERR {type(exc).__name__}: {exc}\n"
        if cmd == "status":
            return (f"UP {self._uptime_text()}\n"
                    "FreeSWITCH (Version 1.10.12-release 64bit) is ready\n"
                    "0 session(s) since startup\n"
                    "0 session(s) - peak 0, last 5min 0 \n"
                    "0 session(s) per Sec out of max 30, peak 0, last 5min 0 \n"
                    "1000 session(s) max\n"
                    "min idle cpu 0.00/98.80\n"
                    "Current Stack Size/Max 240K/8192K\n")
        if cmd in ("show channels as json", "show calls as json"):
            return '{"row_count":0}'
        if cmd.startswith("uuid_kill "):
            return "+OK\n"
        return f"-ERR {cmd.split(' ', 1)[0]} Command not found!\n"

    def _deliver(self, frame: bytes, headers: dict) -> int:
        with self._cond:
            if self._frozen:
                return 0
        count = 0
        for client in self._snapshot():
            with client.send_lock:
                if not client.wants(headers):
                    continue
                ok = client.send_locked(frame)
            if ok:
                count += 1
            else:
                self._request_close(client)
        with self._cond:
            self.events_delivered += count
        return count

    def _heartbeat_loop(self) -> None:
        while not self._stopping.wait(self.heartbeat_interval):
            self.heartbeat()

    def _standard_headers(self) -> list:
        now = time.time()
        with self._cond:
            self._sequence += 1
            seq = self._sequence
        return [
            ("Core-UUID", self.core_uuid),
            ("FreeSWITCH-Hostname", self.hostname),
            ("FreeSWITCH-Switchname", self.hostname),
            ("FreeSWITCH-IPv4", "127.0.0.1"),
            ("FreeSWITCH-IPv6", "::1"),
            ("Event-Date-Local", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))),
            ("Event-Date-GMT", time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))),
            ("Event-Date-Timestamp", str(int(now * 1_000_000))),
            ("Event-Calling-File", "fake_freeswitch.py"),
            ("Event-Calling-Function", "emit"),
            ("Event-Calling-Line-Number", "1"),
            ("Event-Sequence", str(seq)),
        ]

    def _uptime_text(self) -> str:
        total_us = int((time.time() - self._started_at) * 1_000_000)
        secs, us = divmod(total_us, 1_000_000)
        mins, secs = divmod(secs, 60)
        hours, mins = divmod(mins, 60)
        days, hours = divmod(hours, 24)
        years, days = divmod(days, 365)
        return (f"{years} years, {days} days, {hours} hours, {mins} minutes, {secs} seconds, "
                f"{us // 1000} milliseconds, {us % 1000} microseconds")

    @staticmethod
    def _disconnect_notice(body: bytes) -> bytes:
        return b"Content-Type: text/disconnect-notice\nContent-Length: %d\n\n%s" % (len(body), body)
