"""A supervised greenswitch connection to FreeSWITCH's event socket.

greenswitch speaks the protocol; this module covers what it leaves out
(``shared/reference/freeswitch-esl.md`` lists its weaknesses):

* a fresh ``InboundESL`` for every attempt, since one never reconnects;
* ``gevent.Timeout`` around connect, auth, subscribe and every command;
* its reader replaced where it breaks: every frame head line, the number of
  head lines and every body are bounded (greenswitch's ``readline()`` has no
  limit: 64 MB without a newline cost 230 MB), and going past a bound is a
  framing error that rebuilds the connection; an event body is parsed by
  :mod:`fs_zammad.wire` (decode after splitting lines), a frame cut short by
  EOF ends the connection instead of spinning, a malformed event is logged
  and skipped, and any reader error ends the connection instead of leaving
  ``connected=True`` on a dead socket;
* events are handled in the reader greenlet as each frame is read, not
  handed through greenswitch's queue to its processing greenlet (two greenlet
  switches and a timer per event). Reading waits while an event is handled,
  so FreeSWITCH buffers a burst, not our memory. So when a command's reply
  has been read, every event sent before it has been handled;
* liveness: any event (HEARTBEAT every 20 s) proves the socket alive; after
  half the liveness window of silence an ``api status`` probe is sent, and
  after the whole window the connection is rebuilt;
* reconnect forever with capped, jittered backoff; a wrong password or an
  ACL refusal is logged plainly and retried at the slowest pace.

The handler given to :class:`EslSupervisor` must be quick and must not wait
for the network: it runs in the connection's reader greenlet.
"""

from __future__ import annotations

import logging
import random
import time

import gevent
from greenswitch.esl import InboundESL, NotConnectedError

from fs_zammad.wire import (
    EventHeaders,
    FrameError,
    OutOfStep,
    content_length,
    parse_event_plain,
    split_frame_head_line,
)

log = logging.getLogger("fs_zammad.esl")

#: The socket's read buffer: what one read takes at most (a burst's frames in one go).
READ_BUFFER = 64 * 1024

#: Bounds on what one frame may hold; beyond them the stream is not ESL (or is
#: corrupt) and the connection is rebuilt. A frame head is a few short lines
#: (Content-Type, Content-Length, Reply-Text, Job-UUID).
MAX_HEAD_LINE = 8 * 1024
MAX_HEAD_LINES = 64
#: A text/event-plain event is 5-25 KB (about 150 headers); 1 MB leaves room
#: for 40 times that (long SIP headers, big channel variables). Only one body
#: is held at a time: a queued event keeps just the headers read, each cut at
#: wire.MAX_VALUE.
MAX_EVENT_BODY = 1024 * 1024
#: An api/response we asked for: ``show channels as json`` is ~2 KB a channel,
#: so 16 MB is about 8,000 channels at once.
MAX_API_BODY = 16 * 1024 * 1024


class EslError(Exception):
    """Connecting failed; ``slow`` errors are configuration, retried slowly."""

    def __init__(self, message: str, slow: bool = False):
        super().__init__(message)
        self.slow = slow


class _Frame:
    """One frame head as greenswitch's handle_event expects it (it sets ``data``)."""

    __slots__ = ("headers", "data")

    def __init__(self, headers: dict[str, str]):
        self.headers = headers
        self.data = None


def _own_body_at(event: bytes) -> int | None:
    """Where the event's own body (BACKGROUND_JOB's result, say) starts, if the event is
    exactly its headers and that body: the headers end at the first blank line (values
    are URL-encoded: none holds a newline), and the last of them gives the body's
    length, as switch_event_serialize() writes them. None for anything else."""
    end = event.find(b"\n\n")
    if end < 0:
        return None
    name, _, value = event[event.rfind(b"\n", 0, end) + 1:end].partition(b": ")
    if name == b"Content-Length" and value.isdigit() and len(value) < 10 \
            and end + 2 + int(value) == len(event):
        return end + 2
    return None


def _in_step(event: bytes) -> bool:
    """Does this event end where its frame's Content-Length says? One ends with a blank
    line, or with a body of its own. (A frame that swallowed whole events after its own
    ends in a blank line too: parse_one_event finds a second Event-Name in it.)"""
    if event.endswith(b"\n\n"):  # unless its last header announces a body it lacks
        return not event.startswith(b"Content-Length: ",
                                    event.rfind(b"\n", 0, len(event) - 2) + 1)
    return _own_body_at(event) is not None


def parse_one_event(body: bytes, keep) -> EventHeaders:
    """The headers of the one event a frame holds. OutOfStep if it holds more (its
    length was wrong); an event whose own body holds an event's text (uuid_dump run by
    bgapi) is not one of those: its headers are read without that body."""
    try:
        return parse_event_plain(body, keep, one_event=True)
    except OutOfStep:
        start = _own_body_at(body)  # (a scan of the event: only on this rare path)
        if start is None:
            raise
    return parse_event_plain(body[:start - 1], keep)


class _Connection(InboundESL):
    """greenswitch's InboundESL with a reader that cannot hang, spin or bloat."""

    def __init__(self, host, port, password, timeout, on_broken, on_event, after_frame,
                 keep=None, on_frame=None):
        super().__init__(host, port, password, timeout=timeout)
        self._keep = keep  # which headers to parse (None: all)
        self._on_frame = on_frame  # (body bytes as received, headers) of each event: capture
        self._on_event = on_event  # handles each event's headers, in this reader greenlet
        self._after_frame = after_frame  # after a frame that is no event handed on
        self.disconnect_reason = ""
        self._on_broken = on_broken

    def more_arrived(self) -> bool:
        """Has more of the stream arrived than has been handled? Never waits: what
        the kernel holds is read into the buffer (a frame only partly here counts).
        Only the reader greenlet may look (the buffer is its own); elsewhere: no."""
        if gevent.getcurrent() is not self._receive_events_greenlet:
            return False
        self.sock.settimeout(0.0)  # gevent's socket is non-blocking underneath
        try:
            return bool(self.sock_file.peek(1))  # b"" when nothing is there (or at EOF)
        except OSError as exc:  # a reset: the read that follows sees EOF, so say it here
            self.disconnect_reason = self.disconnect_reason or \
                f"reader stopped: {type(exc).__name__}: {exc}"[:200]
            return False
        finally:
            self.sock.settimeout(None)  # (greenswitch's: connected, it never times out)

    def process_events(self):
        """greenswitch's processing greenlet: nothing to do, events are handled as read."""

    def receive_events(self):
        # A larger buffer than greenswitch's makefile: a burst is read in one go.
        # (Closing greenswitch's file object only drops its hold on the socket.)
        self.sock_file.close()
        self.sock_file = self.sock.makefile("rb", buffering=READ_BUFFER)
        try:
            while self._run:
                head = self._read_head()
                if head is None:
                    break
                if not self.handle_event(_Frame(head)):
                    # Not an event (a command's reply after a call's last event, say):
                    # the handler, which an event's frame already ran, hears of it here.
                    self._after_frame()
        except FrameError as exc:
            self.disconnect_reason = (f"framing error ({exc}); if it repeats, check that "
                                      "FREESWITCH_PORT is mod_event_socket's port")[:300]
        except Exception as exc:  # greenswitch's reader would die silently
            self.disconnect_reason = f"reader stopped: {type(exc).__name__}: {exc}"[:200]
        finally:
            self.connected = False
            self._run = False
            self._auth_request_event.set()
            for pending in self._commands_sent:
                if not pending.ready():
                    pending.set_exception(NotConnectedError("connection lost"))
            self._on_broken()

    def _read_head(self) -> dict[str, str] | None:
        """The head of the next frame (None at EOF), each line and their number
        bounded: ``readline(limit)`` never holds more than a line's bound."""
        headers: dict[str, str] = {}
        lines = 0
        while True:
            line = self.sock_file.readline(MAX_HEAD_LINE + 1)
            if not line:
                if lines:
                    raise EOFError("connection closed inside a frame head")
                return None
            if not line.endswith(b"\n"):
                if len(line) > MAX_HEAD_LINE:
                    raise FrameError(f"a frame head line longer than {MAX_HEAD_LINE} bytes")
                raise EOFError("connection closed inside a frame head")
            if line in (b"\n", b"\r\n"):
                if lines:
                    return headers
                continue  # blank lines between frames
            lines += 1
            if lines > MAX_HEAD_LINES:
                raise FrameError(f"a frame head of more than {MAX_HEAD_LINES} lines")
            name, value = split_frame_head_line(line)
            headers[name] = value

    @staticmethod
    def _read_bytes(sock, length) -> bytes:
        data = b""  # read() waits for all `length` bytes: one call, no copy, in practice
        while len(data) < length:
            chunk = sock.read(length - len(data))
            if not chunk:
                raise EOFError(f"connection closed inside a frame ({len(data)} of {length} bytes)")
            data += chunk
        return data

    @classmethod
    def _read_socket(cls, sock, length):
        return cls._read_bytes(sock, length).decode("utf-8", errors="replace")

    def handle_event(self, event) -> bool:
        """Read the rest of the frame and act on it; True if it was an event handed on."""
        headers = event.headers
        content_type = headers.get("Content-Type")
        # Every frame FreeSWITCH sends names its type, an event frame its length, and an
        # event ends where that length says (see _in_step). A frame that does not is the
        # sign of a length that was wrong: what follows is read out of step, so the
        # connection is rebuilt (and the resync settles the calls whose events went by)
        # rather than events skipped.
        if content_type is None:
            raise FrameError("a frame without Content-Type: the stream is out of step")
        if content_type in ("text/event-plain", "text/event-json", "log/data"):
            if "Content-Length" not in headers:
                raise FrameError(f"a {content_type} frame without Content-Length")
            body = self._read_bytes(self.sock_file, self._length(headers, MAX_EVENT_BODY))
            if content_type != "text/event-plain":
                log.warning("skipped a frame of type %s from FreeSWITCH", content_type)
                return
            if not _in_step(body):
                raise FrameError("an event that does not end where its Content-Length says")
            try:
                parsed = parse_one_event(body, self._keep)
            except OutOfStep:
                raise
            except FrameError as exc:
                log.warning("skipped a malformed event from FreeSWITCH: %s", exc)
                return
            if self._on_frame is not None:
                self._on_frame(body, parsed)
            self._on_event(parsed)
            return True
        if content_type == "text/disconnect-notice":
            body = self._read_socket(self.sock_file, self._length(headers)) \
                if "Content-Length" in headers else ""
            if headers.get("Content-Disposition") == "linger":
                return
            self.disconnect_reason = "FreeSWITCH said: " + (" ".join(body.split()) or "goodbye")
            self.connected = False
            self._run = False
            return
        if content_type == "text/rude-rejection":
            self.disconnect_reason = "FreeSWITCH refused us by its ACL (Access Denied): allow " \
                                     "this host in event_socket.conf.xml (apply-inbound-acl)"
            self.connected = False
            self._read_socket(self.sock_file, self._length(headers))
            self._auth_request_event.set()
            return
        if content_type in ("auth/request", "command/reply", "api/response"):
            if content_type != "auth/request" and not self._commands_sent:
                log.warning("skipped an unexpected %s from FreeSWITCH", content_type)
                if content_type == "api/response":
                    self._read_socket(self.sock_file, self._length(headers, MAX_API_BODY))
                return
            if content_type == "api/response":
                self._length(headers, MAX_API_BODY)  # greenswitch reads the body unbounded
            super().handle_event(event)
            return
        log.warning("skipped a frame with unknown Content-Type %r", content_type)

    @staticmethod
    def _length(headers, limit: int = MAX_EVENT_BODY) -> int:
        return content_length(headers.get("Content-Length", "0"), limit)

    def close(self) -> None:
        """Tear down without greenswitch's stop(), which can block forever.

        The reader greenlet is killed before the socket file is closed:
        closing a buffered file another greenlet is reading raises.
        """
        self._run = False
        self.connected = False
        current = gevent.getcurrent()
        for greenlet in (self._receive_events_greenlet, self._process_events_greenlet):
            if greenlet is not None and greenlet is not current:
                greenlet.kill(block=True, timeout=1)
        for closable in (getattr(self, "sock", None), getattr(self, "sock_file", None)):
            if closable is not None:
                try:
                    closable.close()
                except (OSError, RuntimeError):
                    pass


def subscription(events) -> str:
    """``event plain`` words for ``events`` plus HEARTBEAT. FreeSWITCH reads every
    word after ``CUSTOM`` as a subclass name, so "CUSTOM <subclass>" entries go last."""
    words = [*(e for e in events if not e.startswith("CUSTOM")), "HEARTBEAT"]
    subclasses = [word for e in events if e.startswith("CUSTOM") for word in e.split()[1:]]
    if subclasses or "CUSTOM" in events:
        words += ["CUSTOM", *subclasses]
    return " ".join(dict.fromkeys(words))


class EslSupervisor:
    """Keeps one live, subscribed connection; hands every event to ``on_event``."""

    def __init__(self, host: str, port: int, password: str, timeout: float = 5.0,
                 liveness: float = 60.0, reconnect_max: float = 30.0, events=("ALL",),
                 keep=None, on_event=None, after_frame=None, on_connected=None, on_state=None,
                 on_frame=None):
        self.host, self.port, self._password = host, port, password
        self.timeout = timeout
        self.liveness = liveness
        self.reconnect_max = reconnect_max
        # Subscribe to what is used, plus HEARTBEAT for liveness: an event not
        # subscribed is one FreeSWITCH need not format nor we parse.
        self.subscription = subscription(events)
        self.keep = keep  # a wire.HeaderFilter: parse only the headers that are read
        self.on_event = on_event or (lambda headers: None)
        self.after_frame = after_frame or (lambda: None)  # after a frame that is no event
        self.on_connected = on_connected or (lambda supervisor: None)
        self.on_state = on_state or (lambda connected: None)
        self.on_frame = on_frame  # sees each event's bytes as received (fs-zammad capture)
        self.connected = False
        self.reconnects = 0
        self._conn: _Connection | None = None
        self._last_seen = 0.0
        self._stopping = False
        self._broken = gevent.event.Event()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # -- one connection ---------------------------------------------------

    def connect(self) -> _Connection:
        """Connect, authenticate and subscribe within ``timeout`` each."""
        self._broken.clear()
        conn = _Connection(self.host, self.port, self._password, self.timeout, self._broken.set,
                           self._dispatch, self._after_frame, self.keep, self.on_frame)
        try:
            with gevent.Timeout(self.timeout, EslError(
                    f"FreeSWITCH at {self.address} accepted TCP but did not ask for a "
                    f"password within {self.timeout:g} s")):
                conn.connect()
            with gevent.Timeout(self.timeout, EslError("FreeSWITCH did not confirm the "
                                                       "event subscription in time")):
                reply = conn.send(f"event plain {self.subscription}")
            if not reply.headers.get("Reply-Text", "").startswith("+OK"):
                raise EslError(f"event subscription refused: {reply.headers.get('Reply-Text')}")
        except ValueError:  # greenswitch's "Invalid password."
            conn.close()
            raise EslError(f"FreeSWITCH at {self.address} rejected the event socket password "
                           "(FREESWITCH_PASSWORD)", slow=True) from None
        except NotConnectedError as exc:
            conn.close()
            reason = conn.disconnect_reason or str(exc) or "connection closed"
            raise EslError(reason, slow="ACL" in reason) from None
        except (OSError, EslError, gevent.Timeout) as exc:
            conn.close()
            if isinstance(exc, ConnectionRefusedError):
                raise EslError(f"FreeSWITCH at {self.address} refused the connection (is it "
                               "running, is mod_event_socket loaded?)") from None
            if isinstance(exc, EslError):
                raise
            raise EslError(f"cannot reach FreeSWITCH at {self.address}: "
                           f"{exc.strerror or exc}" if isinstance(exc, OSError) else str(exc)) \
                from None
        return conn

    def api(self, command: str) -> str:
        """Run ``api <command>`` on the live connection; raises EslError if none."""
        conn = self._conn
        if conn is None or not conn.connected:
            raise EslError("not connected to FreeSWITCH")
        try:
            with gevent.Timeout(self.timeout, EslError(f"api {command.split()[0]} timed out")):
                reply = conn.send(f"api {command}")
        except (NotConnectedError, OSError) as exc:
            raise EslError(f"connection lost during an api command ({exc or 'closed'})") from None
        return getattr(reply, "data", "") or ""

    def more_arrived(self) -> bool:
        """Has more of the event stream arrived than has been handled? Asked by the
        event handler, so that what arrived together shares one commit."""
        conn = self._conn
        return conn is not None and conn.more_arrived()

    def _dispatch(self, headers) -> None:
        self._last_seen = time.monotonic()
        try:
            self.on_event(headers)
        except Exception as exc:  # never let one event stop the stream
            log.error("could not process %s for %s: %s: %s",
                      headers.get("Event-Name"), headers.get("Unique-ID", "-"),
                      type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))

    def _after_frame(self) -> None:
        try:
            self.after_frame()
        except Exception as exc:  # like an event's: logged, the stream goes on
            log.error("could not finish handling a frame: %s: %s", type(exc).__name__, exc,
                      exc_info=log.isEnabledFor(logging.DEBUG))

    # -- supervision ------------------------------------------------------

    def run(self) -> None:
        """Connect, watch, reconnect; returns only after stop()."""
        failures = 0
        while not self._stopping:
            try:
                conn = self.connect()
            except EslError as exc:
                failures += 1
                delay = self.reconnect_max if exc.slow else min(
                    self.reconnect_max, 0.5 * 2 ** min(failures, 10))
                delay *= 0.75 + random.random() / 4
                log.error("%s; retrying in %.1f s", exc, delay)
                self._sleep(delay)
                continue
            failures = 0
            self._conn = conn
            self.connected = True
            self._last_seen = time.monotonic()
            if self.reconnects:
                log.info("connected to FreeSWITCH at %s again (reconnect %d)", self.address,
                         self.reconnects)
            else:
                log.info("connected to FreeSWITCH at %s, subscribed to %s", self.address,
                         self.subscription)
            self.on_state(True)
            try:
                self.on_connected(self)
                reason = self._watch(conn)
            except EslError as exc:
                reason = str(exc)
            except Exception as exc:  # never let the supervisor die: rebuild the connection
                reason = f"unexpected {type(exc).__name__}: {exc}"
            finally:
                self.connected = False
                self._conn = None
                conn.close()
            self.on_state(False)
            if self._stopping:
                break
            self.reconnects += 1
            log.warning("lost FreeSWITCH at %s: %s; reconnecting", self.address, reason)
            self._sleep(0.2 + random.random() * 0.3)

    def _watch(self, conn: _Connection) -> str:
        probe_after = self.liveness / 2
        while not self._stopping:
            self._broken.wait(timeout=min(1.0, probe_after))
            if not conn.connected or self._broken.is_set():
                return conn.disconnect_reason or "connection closed"
            silent = time.monotonic() - self._last_seen
            if silent >= self.liveness:
                return f"no event for {silent:.0f} s (half-dead connection)"
            if silent >= probe_after:
                try:
                    self.api("status")
                    self._last_seen = time.monotonic()
                except EslError as exc:
                    return f"liveness probe failed: {exc}"
        return "stopping"

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < deadline:
            gevent.sleep(min(0.2, deadline - time.monotonic()))

    def stop(self) -> None:
        """Stop reading: close the socket (an event is never handled halfway: the
        reader greenlet is killed where it waits for the socket)."""
        self._stopping = True
        self._broken.set()
        conn = self._conn
        if conn is not None:
            conn.close()
