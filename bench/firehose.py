"""A fake FreeSWITCH event socket built for load: the "firehose".

Runs in its own process (plain sockets + threads, no gevent), controlled by
the orchestrator over a multiprocessing Pipe. It speaks enough ESL for
greenswitch and fs-zammad: ``auth/request`` -> ``auth`` -> ``+OK accepted``,
``event plain ...`` (the subscription is honoured like FreeSWITCH does: only
subscribed event names are sent; ``ALL`` sends all), ``api status``,
``api show channels as json`` (no channels), ``exit``; everything else gets
``-ERR command not found``.

Calls are stamped from the S1 capture (common.CallTemplate). Two modes:

* max rate: calls back to back, a few calls per ``sendall``; TCP back
  pressure paces the sender to the reader. With ``window`` W (closed loop)
  call k is only sent once the stand-in has accepted the hangups of all but
  W of the calls before it (a shared counter the stand-in increments), so
  the service's own queues stay bounded: "as fast as the service keeps up".
  Without a window (open loop) everything is pushed at once and queues
  wherever the service lets it queue.
* paced: call i starts at ``i / rate`` seconds; its frames go out at S1's own
  relative times (Event-Date-Timestamp offsets, 0 .. 2.54 s), interleaved with
  the other calls in progress. The send time of chosen trigger frames is
  recorded (time.monotonic_ns, taken just before the ``sendall`` carrying it).
* one by one (``mix`` given): the operating point of a real PBX. Call i starts
  at ``i / rate`` s and is a clone of one of the ``mix`` captures in turn (S1
  inbound, S8 outbound: 12.5 frames per call with fs-zammad's subscription).
  Its frames are time-warped: what the capture shows before the first
  CHANNEL_ANSWER takes ``ring`` seconds, the rest up to the hangup ``talk``
  seconds (both drawn per call, reproducibly, from the given ranges), and
  frames the capture stamps at the same microsecond go out ``gap_ms`` apart.
  Every frame is its own ``sendall``, so the reader wakes up for it alone
  unless it is already behind.
"""

from __future__ import annotations

import heapq
import random
import socket
import threading
import time

from common import S1_CAPTURE, CallTemplate, capture

AUTH_REQUEST = b"Content-Type: auth/request\n\n"
CHANNELS_JSON = b'{"row_count":0}'
STATUS = (b"UP 0 years, 0 days, 0 hours, 1 minutes, 0 seconds, 0 milliseconds, 0 microseconds\n"
          b"FreeSWITCH (Version 1.10.12-release 64bit) is ready\n")


class Client:
    def __init__(self, sock: socket.socket, password: str, on_change):
        self.sock = sock
        self.password = password
        self.lock = threading.Lock()
        self.authed = False
        self.events: set[str] | None = None
        self.alive = True
        self.on_change = on_change
        self.commands: list[str] = []

    def send(self, data: bytes) -> bool:
        with self.lock:
            if not self.alive:
                return False
            try:
                self.sock.sendall(data)
                return True
            except OSError:
                self.alive = False
                return False

    def _reply(self, text: str) -> None:
        self.send(f"Content-Type: command/reply\nReply-Text: {text}\n\n".encode())

    def _api(self, body: bytes) -> None:
        self.send(b"Content-Type: api/response\nContent-Length: %d\n\n%s" % (len(body), body))

    def serve(self) -> None:
        buf = b""
        try:
            self.send(AUTH_REQUEST)
            while self.alive:
                data = self.sock.recv(65536)
                if not data:
                    break
                buf += data.replace(b"\r", b"")
                while b"\n\n" in buf:
                    raw, buf = buf.split(b"\n\n", 1)
                    line = raw.decode("utf-8", "replace").strip("\n").split("\n", 1)[0].strip()
                    if line and not self._command(line):
                        return
        except OSError:
            pass
        finally:
            self.alive = False
            try:
                self.sock.close()
            except OSError:
                pass
            self.on_change()

    def _command(self, line: str) -> bool:
        self.commands.append(line)
        verb, _, arg = line.partition(" ")
        verb = verb.lower()
        if not self.authed:
            if verb == "auth" and arg == self.password:
                self.authed = True
                self._reply("+OK accepted")
                return True
            self._reply("-ERR invalid")
            return False
        if verb == "event":
            tokens = arg.split()
            if tokens and tokens[0].lower() == "plain":
                tokens = tokens[1:]
            self._reply("+OK event listener enabled plain")
            self.events = {t.upper() for t in tokens}
            self.on_change()
            return True
        if verb == "api":
            if arg.startswith("show channels") or arg.startswith("show calls"):
                self._api(CHANNELS_JSON)
            elif arg == "status":
                self._api(STATUS)
            else:
                self._api(b"-ERR " + arg.split(" ")[0].encode() + b" Command not found!\n")
            return True
        if verb == "exit":
            self._reply("+OK bye")
            return False
        if verb == "filter":
            self._reply("+OK filter added.")
            return True
        self._reply("-ERR command not found")
        return True


class Firehose:
    def __init__(self, password: str, delivered=None):
        self.password = password
        self.delivered = delivered   # shared counter of hangups accepted by the stand-in
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.cond = threading.Condition()
        self.clients: list[Client] = []
        self.generation = 0
        self._stop_run = threading.Event()
        self._run_thread: threading.Thread | None = None
        self._result = None
        self.templates: dict[frozenset, CallTemplate] = {}
        threading.Thread(target=self._accept, daemon=True).start()

    def _changed(self) -> None:
        with self.cond:
            self.generation += 1
            self.cond.notify_all()

    def _accept(self) -> None:
        while True:
            sock, _ = self.lsock.accept()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client = Client(sock, self.password, self._changed)
            with self.cond:
                self.clients = [c for c in self.clients if c.alive] + [client]
                self.cond.notify_all()
            threading.Thread(target=client.serve, daemon=True).start()

    def subscribed_client(self, timeout: float) -> Client | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for c in reversed(self.clients):   # the newest connection first
                    if c.alive and c.events is not None:
                        return c
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(min(left, 0.1))

    def template(self, events: set[str], path=S1_CAPTURE) -> CallTemplate:
        key = (frozenset(events), str(path))
        if key not in self.templates:
            self.templates[key] = CallTemplate(set(events), path)
        return self.templates[key]

    # -- runs ------------------------------------------------------------------

    def start_run(self, params: dict) -> dict:
        client = self.subscribed_client(params.get("wait", 10.0))
        if client is None:
            return {"error": "no subscribed client"}
        self._stop_run.clear()
        self._result = None
        if params.get("mix"):
            tmpl = [self.template(client.events, capture(name)) for name in params["mix"]]
            target = self._run_one_by_one
            frames = sum(t.frames_per_call for t in tmpl) / len(tmpl)
            size = sum(t.bytes_per_call for t in tmpl) / len(tmpl)
            names = [t.names for t in tmpl]
        else:
            tmpl = self.template(client.events)
            target = self._run_paced if params.get("rate") else self._run_max
            frames, size, names = tmpl.frames_per_call, tmpl.bytes_per_call, tmpl.names
        self._run_thread = threading.Thread(target=self._guard, args=(target, client, tmpl, params),
                                            daemon=True)
        self._run_thread.start()
        return {"frames_per_call": frames, "bytes_per_call": size,
                "events": sorted(client.events), "names": names}

    def _guard(self, target, client, tmpl, params) -> None:
        try:
            self._result = target(client, tmpl, params)
        except Exception as exc:  # reported to the orchestrator, never silent
            self._result = {"error": f"{type(exc).__name__}: {exc}"}

    def _run_max(self, client: Client, tmpl: CallTemplate, params: dict) -> dict:
        calls, first, tag = params["calls"], params.get("first", 0), params.get("tag", 0)
        batch = max(1, params.get("batch", 4))
        window = params.get("window") or 0
        base = self.delivered.value if self.delivered is not None else 0
        t_first = None
        sent = 0
        call = first
        end = first + calls
        while call < end and not self._stop_run.is_set():
            n = min(batch, end - call)
            if window and self.delivered is not None:
                # closed loop: at most `window` calls between first frame and hangup POST
                while sent + n - (self.delivered.value - base) > window:
                    if self._stop_run.is_set():
                        break
                    time.sleep(0.0005)
            data = b"".join(tmpl.call_blob(c, tag) for c in range(call, call + n))
            if t_first is None:
                t_first = time.monotonic_ns()
            if not client.send(data):
                return {"error": "client gone", "calls_sent": sent, "t_first_ns": t_first}
            sent += n
            call += n
        return {"calls_sent": sent, "t_first_ns": t_first, "t_last_ns": time.monotonic_ns(),
                "frames_sent": sent * tmpl.frames_per_call}

    def _run_paced(self, client: Client, tmpl: CallTemplate, params: dict) -> dict:
        """Calls start at ``rate``/s; frames at S1's relative times, interleaved."""
        rate, calls = params["rate"], params["calls"]
        first, tag = params.get("first", 0), params.get("tag", 0)
        triggers = params.get("triggers") or {}   # template frame index -> label
        offsets = tmpl.offsets_s
        t0 = time.monotonic_ns() + 50_000_000
        heap: list = []
        pending: dict[int, list[bytes]] = {}
        next_call = 0
        stamps: list = []
        t_first = None
        frames = 0
        started = 0
        while not self._stop_run.is_set():
            now = time.monotonic_ns()
            # start every call that is due
            while next_call < calls and t0 + int(next_call * 1e9 / rate) <= now:
                c = first + next_call
                start = t0 + int(next_call * 1e9 / rate)
                pending[c] = tmpl.call_frames(c, tag)
                for j, off in enumerate(offsets):
                    heapq.heappush(heap, (start + int(off * 1e9), c, j))
                next_call += 1
                started += 1
            if not heap and next_call >= calls:
                break
            chunks, marks = [], []
            while heap and heap[0][0] <= now:
                _, c, j = heapq.heappop(heap)
                frames_of_call = pending[c]
                chunks.append(frames_of_call[j])
                if j in triggers:
                    marks.append((c, triggers[j]))
                if j == len(offsets) - 1:
                    del pending[c]
            if chunks:
                t_send = time.monotonic_ns()
                if t_first is None:
                    t_first = t_send
                if not client.send(b"".join(chunks)):
                    return {"error": "client gone", "calls_started": started}
                frames += len(chunks)
                for c, label in marks:
                    stamps.append((c, label, t_send))
                continue
            due = [heap[0][0]] if heap else []
            if next_call < calls:
                due.append(t0 + int(next_call * 1e9 / rate))
            wait = (min(due) - time.monotonic_ns()) / 1e9 if due else 0.001
            if wait > 0:
                time.sleep(min(wait, 0.05))
        # a stopped run still finishes the calls already started (no half calls)
        while heap:
            t_due, c, j = heapq.heappop(heap)
            delay = (t_due - time.monotonic_ns()) / 1e9
            if delay > 0:
                time.sleep(delay)
            t_send = time.monotonic_ns()
            if not client.send(pending[c][j]):
                break
            frames += 1
            if j in triggers:
                stamps.append((c, triggers[j], t_send))
        return {"calls_sent": started, "t_first_ns": t_first, "t_last_ns": time.monotonic_ns(),
                "frames_sent": frames, "stamps": stamps}

    def _run_one_by_one(self, client: Client, templates: list, params: dict) -> dict:
        """Calls start at ``rate``/s, frames spread over ring and talk time, one per send."""
        rate, calls = params["rate"], params["calls"]
        first, tag = params.get("first", 0), params.get("tag", 0)
        ring_lo, ring_hi = params.get("ring", (1.0, 3.0))
        talk_lo, talk_hi = params.get("talk", (2.0, 5.0))
        gap = params.get("gap_ms", 5.0) / 1000
        triggers = params.get("triggers") or [{} for _ in templates]  # per template
        t0 = time.monotonic_ns() + 50_000_000
        schedule = []   # (due ns, call, frame index)
        for n in range(calls):
            c = first + n
            tmpl = templates[c % len(templates)]
            rng = random.Random(c)
            ring, talk = rng.uniform(ring_lo, ring_hi), rng.uniform(talk_lo, talk_hi)
            offsets = tmpl.offsets_s
            answered = next(o for o, name in zip(offsets, tmpl.names) if name == "CHANNEL_ANSWER")
            end = offsets[-1]
            start = t0 + int(n * 1e9 / rate)
            previous, same = None, 0
            for j, off in enumerate(offsets):
                same = same + 1 if off == previous else 0
                previous = off
                warped = (off / answered * ring if off < answered
                          else ring + (off - answered) / max(end - answered, 1e-9) * talk)
                schedule.append((start + int((warped + same * gap) * 1e9), c, j))
        heapq.heapify(schedule)
        frames_of: dict[int, list[bytes]] = {}
        left_of: dict[int, int] = {}
        stamps, frames, t_first, started = [], 0, None, 0
        while schedule:
            t_due, c, j = heapq.heappop(schedule)
            if c not in frames_of:
                if self._stop_run.is_set():   # no new calls; started ones finish
                    continue
                tmpl = templates[c % len(templates)]
                frames_of[c] = tmpl.call_frames(c, tag)
                left_of[c] = tmpl.frames_per_call
                started += 1
            delay = (t_due - time.monotonic_ns()) / 1e9
            if delay > 0:
                time.sleep(delay)
            t_send = time.monotonic_ns()
            if t_first is None:
                t_first = t_send
            if not client.send(frames_of[c][j]):
                return {"error": "client gone", "calls_started": started}
            frames += 1
            label = triggers[c % len(templates)].get(j)
            if label:
                stamps.append((c, label, t_send))
            left_of[c] -= 1
            if not left_of[c]:
                del frames_of[c], left_of[c]
        return {"calls_sent": started, "t_first_ns": t_first, "t_last_ns": time.monotonic_ns(),
                "frames_sent": frames, "stamps": stamps}

    def result(self, timeout: float) -> dict | None:
        if self._run_thread is None:
            return {"error": "no run"}
        self._run_thread.join(timeout)
        if self._run_thread.is_alive():
            return None
        return self._result


def main(conn, password: str, delivered=None) -> None:
    """Process entry: answer the orchestrator's commands until 'quit'."""
    hose = Firehose(password, delivered)
    conn.send({"port": hose.port})
    while True:
        cmd, arg = conn.recv()
        if cmd == "quit":
            return
        if cmd == "wait_client":
            client = hose.subscribed_client(arg)
            conn.send(None if client is None else sorted(client.events))
        elif cmd == "run":
            conn.send(hose.start_run(arg))
        elif cmd == "stop":
            hose._stop_run.set()
            conn.send(True)
        elif cmd == "result":
            conn.send(hose.result(arg))
        elif cmd == "commands":
            conn.send([line for c in hose.clients for line in c.commands])
        else:
            conn.send({"error": f"unknown command {cmd}"})
