"""The two ceilings, each run as its own process (pinned like the service).

``bare.py esl PORT PASSWORD EXPECT SUBSCRIPTION...``
    a plain ``greenswitch.InboundESL`` with a no-op ``'*'`` handler: the least a
    gevent/greenswitch program can do with the firehose. Prints ``READY`` once
    subscribed, then one JSON line when EXPECT events were handled.

``bare.py forward PORT PASSWORD URL CALLS SUBSCRIPTION...``
    greenswitch in, requests out, no state, no storage: the latency floor
    (see ``forward``).

``bare.py floor PORT PASSWORD URL CALLS SUBSCRIPTION...``
    the same as ``forward`` on raw sockets: frames split by their
    Content-Length without parsing, the three POSTs written as prebuilt bytes
    on keep-alive connections. No library work at all: what is left is what
    any gevent program pays to be woken for each frame and each answer (see
    ``floor``).

``bare.py post URL SECONDS MODE``
    a plain ``requests.Session`` posting the form fields of a typical newCall
    to the stand-in, sequentially (MODE ``plain``: no gevent, one keep-alive
    connection) or from 8 greenlets under gevent's monkey patching (MODE
    ``gevent8``, like fs-zammad's ZAMMAD_CONCURRENCY=8, for information).

CPU is the process's own user+system time (os.times) over the measured span;
times are time.monotonic_ns so they compare with the other processes.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time


def cpu() -> float:
    t = os.times()
    return t.user + t.system


def hangup_posted(state: dict, expect_calls: int, done) -> None:
    """Count a hangup POST; at the last one, stop the clock (CPU, wake-ups)."""
    state["hangups"] += 1
    if state["hangups"] >= expect_calls:
        state["t_last"] = time.monotonic_ns()
        state["cpu_end"] = cpu()
        state["wakeups_end"] = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
        done.set()


def report_when_done(state: dict, done, linger: bool) -> None:
    """READY, then once every hangup is posted one JSON line: CPU and wake-ups from
    READY to the last hangup, peak RSS. ``linger``: a call's last frame may come after
    the hangup that is posted (S8: the B-leg hangs up first), so stay connected until
    the orchestrator closes stdin."""
    cpu_start = cpu()
    wakeups_start = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
    print("READY", flush=True)
    done.wait(timeout=600)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"hangups": state["hangups"], "t_last_ns": state["t_last"],
                      "cpu_s": state["cpu_end"] - cpu_start,
                      "wakeups": state["wakeups_end"] - wakeups_start,
                      "peak_rss_kb": usage.ru_maxrss}), flush=True)
    if linger:
        sys.stdin.read()
    os._exit(0)


def esl(port: int, password: str, expect: int, subscription: list[str]) -> None:
    from gevent import monkey

    monkey.patch_all()
    import gevent
    import greenswitch

    state = {"n": 0, "t_first": 0, "t_last": 0, "cpu_end": 0.0}
    done = gevent.event.Event()

    def noop(event):
        state["n"] += 1
        if state["n"] == 1:
            state["t_first"] = time.monotonic_ns()
        if state["n"] >= expect:
            state["t_last"] = time.monotonic_ns()
            state["cpu_end"] = cpu()
            done.set()

    conn = greenswitch.InboundESL("127.0.0.1", port, password)
    conn.register_handle("*", noop)
    conn.connect()
    conn.send("event plain " + " ".join(subscription))
    cpu_start = cpu()
    print("READY", flush=True)
    done.wait(timeout=600)
    print(json.dumps({"events": state["n"], "t_first_event_ns": state["t_first"],
                      "t_last_ns": state["t_last"], "cpu_s": state["cpu_end"] - cpu_start}),
          flush=True)
    os._exit(0)  # greenswitch's stop() can block; the numbers are out


def forward(port: int, password: str, url: str, expect_calls: int, subscription: list[str],
            linger: bool = False) -> None:
    """The least a forwarder can do: greenswitch in, requests out, no state.

    On the three frames that make fs-zammad post (the A-leg's ``bridge``
    CHANNEL_EXECUTE, the B-leg's CHANNEL_ANSWER and CHANNEL_HANGUP_COMPLETE)
    it posts newCall / answer / hangup from a pool of 8 greenlets. The A-leg
    uuid (callId) is rebuilt from the synthetic uuid layout (slot 0 = A-leg).
    """
    from gevent import monkey

    monkey.patch_all()
    import gevent
    import greenswitch
    import requests
    from gevent.pool import Pool
    from requests.adapters import HTTPAdapter

    session = requests.Session()
    session.headers.update({"Accept": "application/json", "User-Agent": "bench"})
    session.mount("http://", HTTPAdapter(pool_connections=1, pool_maxsize=8, max_retries=0))
    pool = Pool(8)
    state = {"hangups": 0, "cpu_end": 0.0, "t_last": 0, "wakeups_end": 0}
    done = gevent.event.Event()

    def post(event, uuid):
        call_id = uuid[:9] + "0000" + uuid[13:]
        _ = session.post(url, data=[("event", event), ("direction", "in"), ("callId", call_id),
                                    ("from", "493023125741"), ("to", "492214710334")],
                         timeout=(5, 10)).text  # read the body, as fs-zammad does
        if event == "hangup":
            hangup_posted(state, expect_calls, done)

    def handler(event):
        h = event.headers
        name = h.get("Event-Name")
        if name == "CHANNEL_EXECUTE" and h.get("Application") == "bridge":
            pool.spawn(post, "newCall", h["Unique-ID"])
        elif name == "CHANNEL_ANSWER" and h.get("Call-Direction") == "outbound":
            pool.spawn(post, "answer", h["Unique-ID"])
        elif name == "CHANNEL_HANGUP_COMPLETE" and h.get("Call-Direction") == "outbound":
            pool.spawn(post, "hangup", h["Unique-ID"])

    conn = greenswitch.InboundESL("127.0.0.1", port, password)
    conn.register_handle("*", handler)
    conn.connect()
    conn.send("event plain " + " ".join(subscription))
    report_when_done(state, done, linger)


def floor(port: int, password: str, url: str, expect_calls: int, subscription: list[str],
          linger: bool = False) -> None:
    """The wake-up floor of the paced stream: as ``forward``, with nothing in between.

    What this spends per call is the least a gevent process can spend to be
    woken for each frame and each POST's answer: the hub, epoll, recv/send and
    the greenlet switches, with no parsing, state, storage or HTTP library.
    """
    from gevent import monkey

    monkey.patch_all()
    import socket
    from urllib.parse import urlsplit

    import gevent
    from gevent.pool import Pool
    from gevent.queue import Queue

    target = urlsplit(url)
    connections: Queue = Queue()  # idle keep-alive connections to the stand-in
    pool = Pool(8)
    state = {"hangups": 0, "cpu_end": 0.0, "t_last": 0, "wakeups_end": 0}
    done = gevent.event.Event()

    def read_frame(sock, buf: bytearray) -> bytes:
        """The next frame (head, blank line and body) whose head says its length."""
        while True:
            end = buf.find(b"\n\n")
            if end < 0:
                end = buf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(buf[:end])
                at = head.find(b"Content-Length: ")
                length = int(head[at + 16:].split(b"\r")[0].split(b"\n")[0]) if at >= 0 else 0
                start = end + (2 if buf[end:end + 2] == b"\n\n" else 4)
                if len(buf) >= start + length:
                    frame = bytes(buf[:start + length])
                    del buf[:start + length]
                    return frame
            chunk = sock.recv(65536)
            if not chunk:
                raise EOFError("closed")
            buf += chunk

    def post(event: str, uuid: bytes) -> None:
        call_id = uuid[:9] + b"0000" + uuid[13:]
        body = (b"event=" + event.encode() + b"&direction=in&callId=" + call_id
                + b"&from=493023125741&to=492214710334")
        request = (b"POST " + target.path.encode() + b" HTTP/1.1\r\nHost: "
                   + target.netloc.encode() + b"\r\nContent-Type: application/x-www-form-"
                   b"urlencoded\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
                   + body)
        try:
            conn, buf = connections.get_nowait()
        except gevent.queue.Empty:
            conn, buf = socket.create_connection((target.hostname, target.port)), bytearray()
        conn.sendall(request)
        read_frame(conn, buf)  # the answer: its head says its length
        connections.put((conn, buf))
        if event == "hangup":
            hangup_posted(state, expect_calls, done)

    def unique_id(frame: bytes) -> bytes:
        at = frame.find(b"\nUnique-ID: ") + 12
        return frame[at:frame.find(b"\n", at)]

    def read_events(sock, buf: bytearray) -> None:
        while True:
            frame = read_frame(sock, buf)
            if b"Event-Name: CHANNEL_EXECUTE\n" in frame and b"\nApplication: bridge\n" in frame:
                pool.spawn(post, "newCall", unique_id(frame))
            elif b"Call-Direction: outbound\n" in frame:
                if b"Event-Name: CHANNEL_ANSWER\n" in frame:
                    pool.spawn(post, "answer", unique_id(frame))
                elif b"Event-Name: CHANNEL_HANGUP_COMPLETE\n" in frame:
                    pool.spawn(post, "hangup", unique_id(frame))

    sock = socket.create_connection(("127.0.0.1", port))
    buf = bytearray()
    read_frame(sock, buf)  # auth/request
    sock.sendall(f"auth {password}\n\n".encode())
    read_frame(sock, buf)
    sock.sendall(("event plain " + " ".join(subscription) + "\n\n").encode())
    read_frame(sock, buf)
    gevent.spawn(read_events, sock, buf)
    report_when_done(state, done, linger)


FIELDS = [("event", "newCall"), ("direction", "in"),
          ("callId", "0e0470c2-489b-46af-9ea6-35866f3fd175"), ("from", "493023125741"),
          ("to", "492214710334"), ("user", "1001")]


def post(url: str, seconds: float, mode: str) -> None:
    if mode == "gevent8":
        from gevent import monkey

        monkey.patch_all()
        import gevent
    import requests
    from requests.adapters import HTTPAdapter

    session = requests.Session()
    session.headers.update({"Accept": "application/json", "User-Agent": "bench"})
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=8, max_retries=0)
    session.mount("http://", adapter)
    # warm up: open the connection(s)
    _ = session.post(url, data=FIELDS, timeout=(5, 10)).text
    count = [0]
    deadline = time.monotonic() + seconds

    def loop():
        while time.monotonic() < deadline:
            _ = session.post(url, data=FIELDS, timeout=(5, 10)).text
            count[0] += 1

    cpu_start, t0 = cpu(), time.monotonic_ns()
    if mode == "gevent8":
        gevent.joinall([gevent.spawn(loop) for _ in range(8)])
    else:
        loop()
    t1, cpu_end = time.monotonic_ns(), cpu()
    print(json.dumps({"posts": count[0], "elapsed_s": (t1 - t0) / 1e9,
                      "cpu_s": cpu_end - cpu_start}), flush=True)


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "esl":
        esl(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5:])
    elif role in ("forward", "floor"):
        (forward if role == "forward" else floor)(
            int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6:],
            linger=os.environ.get("BARE_LINGER") == "1")
    elif role == "post":
        post(sys.argv[2], float(sys.argv[3]), sys.argv[4])
    else:
        sys.exit(f"unknown role {role}")
