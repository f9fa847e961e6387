#!/usr/bin/env python3
"""CPU per CTI POST of the HTTP clients fs-zammad could use, in one process under gevent.

Each client posts the same form-encoded newCall to a keep-alive stand-in that
answers Zammad's ``{}`` at once (another process, on the other core), one
request at a time; the figure is this process's CPU (utime+stime) per POST:

* ``requests.Session().post`` (trust_env off, as fs-zammad used it before cb76c46);
* ``zammad.ZammadClient.post``: fs-zammad's own client, the urllib3 pool plus
  classifying the answer, redacting and timing it;
* ``http.client`` alone, the floor under both.

    .venv/bin/python bench/http_clients.py [--posts 3000] [--rounds 3]
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import http.client  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from urllib.parse import urlencode  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

STANDIN = r"""
import socket, sys, threading
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: 2\r\n\r\n{}"
def serve(conn):
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                return
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length"))
        while len(rest) < length:
            rest += conn.recv(65536)
        buf = rest[length:]
        conn.sendall(ANSWER)
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
while True:
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

FIELDS = (("event", "newCall"), ("from", "4930123456"), ("to", "4930999"), ("direction", "in"),
          ("callId", "a0b1c2d3-1111-2222-3333-444455556666"), ("user", "agent1"))


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--posts", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    pin = hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > 1
    standin = subprocess.Popen([sys.executable, "-c", STANDIN], stdout=subprocess.PIPE, text=True)
    try:
        port = int(standin.stdout.readline())
        if pin:
            os.sched_setaffinity(standin.pid, {0})
            os.sched_setaffinity(0, {1})
        url = f"http://127.0.0.1:{port}/api/v1/cti/bench-token"
        clients = {}
        try:
            import requests
            session = requests.Session()
            session.trust_env = False
            clients["requests.Session"] = lambda: session.post(
                url, data=list(FIELDS), timeout=(5, 10), allow_redirects=False).content
        except ImportError:
            pass
        from fs_zammad.zammad import DELIVERED, ZammadClient
        client = ZammadClient(url, timeout=10)

        def ours():
            assert client.post(FIELDS).kind == DELIVERED

        clients["fs-zammad ZammadClient (urllib3)"] = ours
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        headers = {"Content-Type": "application/x-www-form-urlencoded"}

        def bare():
            conn.request("POST", "/api/v1/cti/bench-token", urlencode(FIELDS), headers)
            conn.getresponse().read()

        clients["http.client alone"] = bare
        results: dict[str, list[float]] = {name: [] for name in clients}
        for _ in range(args.rounds):   # interleaved: the machine's drift hits all alike
            for name, post in clients.items():
                for _ in range(200):
                    post()
                started = cpu()
                for _ in range(args.posts):
                    post()
                results[name].append((cpu() - started) / args.posts * 1e6)
        print(f"| client | CPU µs per POST (median of {args.rounds} × {args.posts}) |")
        print("|---|---|")
        for name, values in results.items():
            print(f"| {name} | {sorted(values)[len(values) // 2]:.0f} |")
    finally:
        standin.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
