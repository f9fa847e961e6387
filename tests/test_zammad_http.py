"""The HTTP client itself (zammad.ZammadHttp under ZammadClient), against real sockets:
each way a connection can fail gives the right verdict ("maybe processed" exactly when
the request may have arrived), keep-alive connections are reused and renewed, and the
environment's proxy settings are followed, also when the proxy is where it fails."""

import os
import socket
import ssl
import threading
import time

import pytest

from fs_zammad import zammad
from fs_zammad.zammad import DELIVERED, ZAMMAD_DOWN, ZammadClient

PROXY_VARIABLES = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")

TOKEN = "tok-51ab77c0"
FIELDS = (("event", "hangup"), ("direction", "in"), ("callId", "c1"), ("cause", "cancel"))
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class RawServer:
    """A TCP listener that runs ``script(conn, server)`` for each connection; it notes
    every complete request it read (``requests``) and each connection (``connections``)."""

    def __init__(self, script):
        self.script = script
        self.requests: list[bytes] = []
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            thread = threading.Thread(target=self._run, args=(conn,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _run(self, conn):
        with conn:
            try:
                self.script(conn, self)
            except OSError:
                pass

    def read_request(self, conn) -> bytes:
        """One whole request (head + Content-Length body), or b"" at EOF."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return b""
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            body += conn.recv(65536)
        self.requests.append(head + b"\r\n\r\n" + body)
        return data

    def url(self, host="127.0.0.1", scheme="http") -> str:
        return f"{scheme}://{host}:{self.port}/api/v1/cti/{TOKEN}"

    def close(self):
        self.listener.close()


def closes_at_once(conn, server):
    pass


def reads_then_closes(conn, server):
    server.read_request(conn)


def reads_then_hangs(conn, server):
    server.read_request(conn)
    time.sleep(2)


def reads_then_sends(data: bytes):
    """Reads the request, sends ``data``, closes."""
    def script(conn, server):
        server.read_request(conn)
        conn.sendall(data)
    return script


def answers_400_to_anything(conn, server):
    conn.recv(65536)   # a web server's answer to bytes it cannot read as HTTP
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


def keep_alive(conn, server):
    while server.read_request(conn):
        conn.sendall(OK)


# name -> (server script, words the detail holds)
FAULTS = {
    "closed before reading": (closes_at_once, "connection lost"),
    "read, then closed": (reads_then_closes, "connection lost"),
    "read, then no answer in time": (reads_then_hangs, "no answer in time"),
    # http.client takes the end of the head for the end of the headers: an empty 200
    "a status line, then closed": (reads_then_sends(b"HTTP/1.1 200 OK\r\n"), "answered HTTP 200"),
    "a body cut short": (reads_then_sends(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                          b"Content-Length: 100\r\n\r\n{\"a\":"),
                         "connection lost"),
    "not HTTP at all": (reads_then_sends(b"SSH-2.0-OpenSSH_9.2\r\n"), "connection lost"),
    # words a proxy says when it refuses a tunnel, here after reading the request itself
    "a status line naming a tunnel": (reads_then_sends(b"HTTP/1.1 5O2 Tunnel connection failed"
                                                       b"\r\n\r\n"), "connection lost"),
    "bad chunked encoding": (reads_then_sends(b"HTTP/1.1 200 OK\r\nContent-Type: application/json"
                                              b"\r\nTransfer-Encoding: chunked\r\n\r\n"
                                              b"zz\r\n{}\r\n0\r\n\r\n"), "connection lost"),
}


@pytest.fixture
def no_proxy_set(monkeypatch):
    """monkeypatch, with none of the machine's proxy variables in the way."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("via", ["direct", "proxy"])
@pytest.mark.parametrize("case", FAULTS)
def test_a_request_that_may_have_arrived_is_never_called_not_sent(case, via, no_proxy_set):
    script, words = FAULTS[case]
    server = RawServer(script)
    url = server.url()
    if via == "proxy":  # the stand-in is the proxy: for a plain-http Zammad it gets the request
        no_proxy_set.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.port}")
        url = f"http://zammad.invalid/api/v1/cti/{TOKEN}"
    client = ZammadClient(url, timeout=0.5)
    try:
        outcome = client.post(FIELDS)
    finally:
        client.close()
        server.close()
    assert outcome.kind != DELIVERED and words in outcome.detail, outcome
    # The rule the outbox's once-hangups rely on: once the request may have been read,
    # the answer is "maybe processed", never "not sent".
    assert outcome.maybe_processed or not server.requests, (outcome, server.requests)
    assert TOKEN not in outcome.detail


@pytest.fixture
def tls_context(self_signed):
    """A server-side TLS context with the self-signed certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*self_signed)
    return context


def over_tls(context, script):
    """``script`` run on the TLS side of each connection, after the handshake."""
    def run(conn, server):
        with context.wrap_socket(conn, server_side=True) as tls:
            script(tls, server)
    return run


def reads_then_breaks_the_tls_stream(tls, server):
    server.read_request(tls)
    os.write(tls.fileno(), b"\x15garbage that is no TLS record")  # beside TLS, not in it


def reads_then_drops_tcp(tls, server):
    server.read_request(tls)
    os.close(tls.detach())  # no TLS close_notify: the TCP connection just ends


def tunnels_then(context, script):
    """An HTTP proxy that opens each CONNECT tunnel itself and plays Zammad in it:
    ``script`` runs on the TLS side, after the handshake."""
    def run(conn, server):
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(4096)
            if not chunk:
                return
            head += chunk
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        over_tls(context, script)(conn, server)
    return run


@pytest.mark.parametrize("via", ["direct", "CONNECT proxy"])
@pytest.mark.parametrize("script", [reads_then_breaks_the_tls_stream, reads_then_drops_tcp])
def test_a_tls_failure_after_the_request_left_is_maybe_processed(script, via, tls_context,
                                                                 no_proxy_set):
    if via == "direct":
        server = RawServer(over_tls(tls_context, script))
        url = server.url(scheme="https")
    else:
        server = RawServer(tunnels_then(tls_context, script))
        no_proxy_set.setenv("HTTPS_PROXY", f"http://127.0.0.1:{server.port}")
        url = f"https://zammad.invalid/api/v1/cti/{TOKEN}"
    client = ZammadClient(url, timeout=1, verify=False)
    try:
        outcome = client.post(FIELDS)
    finally:
        client.close()
        server.close()
    assert server.requests and outcome.kind == ZAMMAD_DOWN, (outcome, server.requests)
    assert outcome.maybe_processed, outcome


def test_an_error_the_caller_was_handling_does_not_change_the_verdict(no_proxy_set):
    # The request's error is chained to the one being handled when it was sent; a
    # connect() in that one's traceback says nothing about this request.
    server = RawServer(reads_then_closes)
    client = ZammadClient(server.url(), timeout=1)

    def connect():
        raise ConnectionRefusedError("an earlier, unrelated failure")
    try:
        try:
            connect()
        except ConnectionRefusedError:
            outcome = client.post(FIELDS)
    finally:
        client.close()
        server.close()
    assert server.requests and outcome.maybe_processed, outcome


def unused_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


class World:
    """What a NOT_SENT case sets up: the environment, stand-in servers (closed after
    the test) and, for the cases that need one, a server-side TLS context."""

    def __init__(self, env, request):
        self.env, self.request, self.servers = env, request, []

    def serve(self, script) -> RawServer:
        self.servers.append(RawServer(script))
        return self.servers[-1]

    def tls(self) -> ssl.SSLContext:
        return self.request.getfixturevalue("tls_context")  # (skips without openssl)

    def proxy(self, variable: str, script, scheme: str = "http", proxy_scheme: str = "http"):
        """-> a Zammad URL for which the environment names a stand-in as the proxy."""
        self.env.setenv(variable, f"{proxy_scheme}://127.0.0.1:{self.serve(script).port}")
        return f"{scheme}://zammad.invalid/api/v1/cti/{TOKEN}"


def refuses_connect(conn, server):
    server.read_request(conn)
    conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")


def refuses_connect_after_reading(conn, server):
    server.read_request(conn)   # a status line only a careless reader takes for a 502
    conn.sendall(b"HTTP/1.1 5O2 Tunnel connection failed\r\n\r\n")


# name -> (setup(World) -> url, words the detail holds): nothing can have left; the
# event simply waits
NOT_SENT = {
    "connection refused": (lambda w: f"http://127.0.0.1:{unused_port()}/api/v1/cti/{TOKEN}",
                           "connection refused or unreachable"),
    "no such host": (lambda w: f"http://no-such-host.invalid/api/v1/cti/{TOKEN}",
                     "DNS lookup failed for no-such-host.invalid"),
    "TLS to a plain HTTP port": (lambda w: w.serve(answers_400_to_anything).url(scheme="https"),
                                 "TLS error: [SSL"),
    "TLS certificate not trusted": (lambda w: w.serve(over_tls(w.tls(), reads_then_closes))
                                    .url(scheme="https"), "CERTIFICATE_VERIFY_FAILED"),
    "TLS handshake unanswered": (lambda w: w.serve(lambda conn, server: time.sleep(3))
                                 .url(scheme="https"), "connection not set up"),
    "proxy refused": (lambda w: w.env.setenv("HTTP_PROXY", f"http://127.0.0.1:{unused_port()}")
                      or f"http://zammad.invalid/api/v1/cti/{TOKEN}",
                      "proxy: connection refused"),
    "proxy's host unknown": (lambda w: w.env.setenv("http_proxy", "no-proxy.invalid:3128")
                             or f"http://zammad.invalid/api/v1/cti/{TOKEN}",
                             "proxy: DNS lookup failed for no-proxy.invalid"),
    "proxy refuses the tunnel": (lambda w: w.proxy("HTTPS_PROXY", refuses_connect, "https"),
                                 "proxy refused the tunnel"),
    "proxy refuses the tunnel oddly": (lambda w: w.proxy("HTTPS_PROXY",
                                                         refuses_connect_after_reading, "https"),
                                       "proxy refused the tunnel"),
    "proxy closes during CONNECT": (lambda w: w.proxy("HTTPS_PROXY", reads_then_closes, "https"),
                                    "connection not set up"),
    "https:// proxy speaking plain HTTP": (lambda w: w.proxy("HTTPS_PROXY", answers_400_to_anything,
                                                             "https", "https"),
                                           "proxy: TLS error: [SSL"),
    "https:// proxy not trusted": (lambda w: w.proxy("HTTP_PROXY",
                                                     over_tls(w.tls(), reads_then_closes),
                                                     "http", "https"),
                                   "CERTIFICATE_VERIFY_FAILED"),
}


@pytest.mark.parametrize("case", NOT_SENT)
def test_a_request_that_never_left_is_not_sent(case, no_proxy_set, request):
    setup, words = NOT_SENT[case]
    world = World(no_proxy_set, request)
    client = None
    try:
        client = ZammadClient(setup(world), timeout=1)
        outcome = client.post(FIELDS)
    finally:
        if client is not None:
            client.close()
        for server in world.servers:
            server.close()
    assert outcome.kind == ZAMMAD_DOWN and not outcome.maybe_processed, outcome
    assert words in outcome.detail and TOKEN not in outcome.detail, outcome
    assert not any(b"event=hangup" in r for server in world.servers for r in server.requests)


def test_one_connection_is_kept_and_renewed_after_idling(monkeypatch):
    server = RawServer(keep_alive)
    client = ZammadClient(server.url(), timeout=2)
    try:
        outcomes = [client.post(FIELDS) for _ in range(5)]
        assert server.connections == 1
        monkeypatch.setattr(zammad, "KEEPALIVE_IDLE", 0.05)
        time.sleep(0.1)   # idle longer than a server keeps the connection: a fresh one
        outcomes.append(client.post(FIELDS))
        assert server.connections == 2
    finally:
        client.close()
        server.close()
    assert [o.kind for o in outcomes] == [DELIVERED] * 6
    first = server.requests[0].decode()
    assert first.startswith(f"POST /api/v1/cti/{TOKEN} HTTP/1.1\r\n"), first
    assert "Content-Type: application/x-www-form-urlencoded" in first
    assert first.endswith("event=hangup&direction=in&callId=c1&cause=cancel")


def test_the_environments_proxy_is_used_unless_no_proxy_says_otherwise(no_proxy_set):
    monkeypatch = no_proxy_set
    zammad_server, proxy = RawServer(keep_alive), RawServer(keep_alive)
    monkeypatch.setenv("HTTP_PROXY", f"http://user:p%40ss@127.0.0.1:{proxy.port}")
    try:
        via_proxy = ZammadClient(zammad_server.url(), timeout=2)
        assert via_proxy.post(FIELDS).kind == DELIVERED
        via_proxy.close()
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        direct = ZammadClient(zammad_server.url(), timeout=2)
        assert direct.post(FIELDS).kind == DELIVERED
        direct.close()
    finally:
        zammad_server.close()
        proxy.close()
    # through the proxy: the absolute URL, and its credentials (user:p@ss)
    assert len(proxy.requests) == 1, proxy.requests
    head = proxy.requests[0].decode()
    assert head.startswith(f"POST {zammad_server.url()} HTTP/1.1"), head
    assert "proxy-authorization: basic dxnlcjpwqhnz" in head.lower(), head
    assert len(zammad_server.requests) == 1  # NO_PROXY: straight to Zammad


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"a":' * 100_000, b"<html>login</html>"])
def test_the_rest_client_turns_a_body_that_is_not_zammads_json_into_one_refusal(body):
    from fs_zammad.zammad_api import REFUSED, ApiError, ZammadApi

    server = RawServer(reads_then_sends(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                        b"Content-Length: %d\r\n\r\n" % len(body) + body))
    api = ZammadApi(f"http://127.0.0.1:{server.port}", TOKEN, timeout=2)
    try:
        with pytest.raises(ApiError) as refused:
            api.me()
    finally:
        api.close()
        server.close()
    assert refused.value.kind == REFUSED and len(str(refused.value)) < 200
    assert server.requests[0].startswith(b"GET /api/v1/users/me HTTP/1.1\r\n")
    assert f"Authorization: Token token={TOKEN}".encode() in server.requests[0]
