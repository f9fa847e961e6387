"""Tests of the test stand-ins themselves (fake FreeSWITCH, Zammad stand-in).

The end-to-end tests trust these two servers to behave like the real thing;
these fast checks pin the behaviour they rely on, over real sockets.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.support.fake_freeswitch import FakeFreeSwitch, iter_frames
from tests.support.zammad_standin import ZammadStandIn

FIXTURES = Path(__file__).parent / "fixtures"
S1 = FIXTURES / "callcentre" / "S1" / "events_all.txt"
S15 = FIXTURES / "callcentre" / "S15" / "events_all.txt"


# --------------------------------------------------------------------- helpers
class EslReader:
    """A minimal, strict ESL client for these tests: reads one frame at a time."""

    def __init__(self, port: int, timeout: float = 2.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def frame(self) -> tuple:
        """Return (outer headers dict, body bytes, raw frame bytes); EOFError at clean EOF."""
        while b"\n\n" not in self.buf:
            if not self._fill():
                raise EOFError(self.buf)
        head, _, rest = self.buf.partition(b"\n\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\n"))
        length = int(headers.get("Content-Length", 0))
        while len(rest) < length:
            if not self._fill():
                raise EOFError(self.buf)
            head, _, rest = self.buf.partition(b"\n\n")
        body = rest[:length]
        raw = self.buf[: len(head) + 2 + length]
        self.buf = rest[length:]
        return headers, body, raw

    def command(self, text: str) -> tuple:
        self.sock.sendall(text.encode() + b"\n\n")
        return self.frame()

    def login(self, password: str = "ClueCon") -> None:
        assert self.frame()[0] == {"Content-Type": "auth/request"}
        assert self.command(f"auth {password}")[0]["Reply-Text"] == "+OK accepted"

    def assert_eof(self) -> None:
        with pytest.raises(EOFError):
            self.frame()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def fs():
    baseline = threading.active_count()
    with FakeFreeSwitch() as server:
        yield server
    assert threading.active_count() <= baseline, "fake FreeSWITCH leaked threads"


@pytest.fixture
def zammad():
    baseline = threading.active_count()
    with ZammadStandIn() as server:
        yield server
    assert threading.active_count() <= baseline, "Zammad stand-in leaked threads"


def post(zammad, accept_json: bool = False, url: str | None = None, **fields):
    headers = {"Accept": "application/json"} if accept_json else {}
    return requests.post(url or zammad.url, data=fields, headers=headers, timeout=5)


# ------------------------------------------------------------ fake FreeSWITCH
def test_auth_accepted_and_api(fs):
    esl = EslReader(fs.port)
    esl.login()
    headers, body, _ = esl.command("api status")
    assert headers["Content-Type"] == "api/response"
    assert body.startswith(b"UP 0 years, ")
    assert esl.command("api show channels as json")[1] == b'{"row_count":0}'
    assert esl.command("bogus")[0]["Reply-Text"] == "-ERR command not found"
    assert fs.commands == ["auth ClueCon", "api status", "api show channels as json", "bogus"]
    assert fs.api_calls == ["status", "show channels as json"]
    headers, _, _ = esl.command("exit")
    assert headers["Reply-Text"] == "+OK bye"
    assert esl.frame()[0]["Content-Type"] == "text/disconnect-notice"
    esl.assert_eof()


def test_wrong_password_gets_error_notice_and_close(fs):
    esl = EslReader(fs.port)
    esl.frame()
    assert esl.command("auth wrong")[0] == {"Content-Type": "command/reply", "Reply-Text": "-ERR invalid"}
    headers, body, _ = esl.frame()
    assert headers["Content-Type"] == "text/disconnect-notice"
    assert body == b"Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"
    esl.assert_eof()
    assert fs.commands == ["auth wrong"]


def test_acl_deny_is_rude(fs):
    fs.acl_deny = True
    esl = EslReader(fs.port)
    assert esl.frame()[:2] == ({"Content-Type": "text/rude-rejection", "Content-Length": "24"},
                               b"Access Denied, go away.\n")
    esl.assert_eof()


def test_silent_never_asks_for_auth(fs):
    fs.silent = True
    esl = EslReader(fs.port, timeout=0.3)
    with pytest.raises(socket.timeout):
        esl.frame()
    esl.close()


def test_replay_honours_subscription_and_forwards_frames_unchanged(fs):
    esl = EslReader(fs.port)
    esl.login()
    reply = esl.command("event plain CHANNEL_CREATE CHANNEL_HANGUP_COMPLETE")[0]
    assert reply["Reply-Text"] == "+OK event listener enabled plain"
    assert fs.wait_for_subscription(2) == {"CHANNEL_CREATE", "CHANNEL_HANGUP_COMPLETE"}
    assert fs.replay(S1) == 4
    expected = [raw for headers, raw in iter_frames(S1)
                if headers["Event-Name"] in ("CHANNEL_CREATE", "CHANNEL_HANGUP_COMPLETE")]
    got = [esl.frame() for _ in range(4)]
    assert [raw for _, _, raw in got] == expected
    names = [b"CHANNEL_CREATE" in body.split(b"\n", 1)[0] for _, body, _ in got]
    assert names.count(True) == 2
    fs.heartbeat()  # not subscribed: must not arrive; the next frame is the drop notice
    fs.drop()
    assert esl.frame()[1] == b"The system is being shut down.\n"
    esl.assert_eof()


def test_filter_and_custom_subclass(fs):
    a_leg = next(h["Unique-ID"] for h, _ in iter_frames(S1) if h["Event-Name"] == "CHANNEL_CREATE")
    esl = EslReader(fs.port)
    esl.login()
    esl.command("event plain CHANNEL_CREATE CHANNEL_HANGUP_COMPLETE CUSTOM callcenter::info")
    assert esl.command(f"filter Unique-ID {a_leg}")[0]["Reply-Text"] == f"+OK filter added. [Unique-ID]=[{a_leg}]"
    assert fs.replay(S1) == 2  # A-leg only
    assert fs.replay(S15) == 0  # other call: the Unique-ID filter hides everything
    esl.command("filter delete all")
    frames = [h for h, _ in iter_frames(S15)]
    n_info = sum(1 for h in frames if h.get("Event-Subclass") == "callcenter::info")
    n_core = sum(1 for h in frames if h["Event-Name"] in ("CHANNEL_CREATE", "CHANNEL_HANGUP_COMPLETE"))
    assert n_info and n_core and fs.replay(S15) == n_core + n_info  # no filesystem/vm CUSTOM events


def test_emit_encodes_like_freeswitch(fs):
    esl = EslReader(fs.port)
    esl.login()
    esl.command("event plain ALL")
    fs.emit([("Event-Name", "CHANNEL_CREATE"), ("Caller-Caller-ID-Number", "+49 (221) 4/7,1"),
             ("Hangup-Cause", "A"), ("Hangup-Cause", "B"), ("variable_x", "")])
    body = esl.frame()[1].decode()
    assert body.startswith("Event-Name: CHANNEL_CREATE\nCore-UUID: ")
    assert "Caller-Caller-ID-Number: %2B49%20(221)%204/7,1\n" in body
    assert "Hangup-Cause: A\nHangup-Cause: B\nvariable_x: _undef_\n\n" in body
    assert body.endswith("\n\n")


def test_drop_pause_resume_same_port(fs):
    esl = EslReader(fs.port)
    esl.login()
    esl.command("event plain HEARTBEAT")
    first = fs.connections_total
    fs.drop(notice=False)
    esl.assert_eof()
    fs.pause_accepting()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", fs.port), timeout=1)
    fs.resume_accepting()
    esl = EslReader(fs.port)
    esl.login()
    esl.command("event plain HEARTBEAT")
    assert fs.wait_for_subscription(2, after=first) == {"HEARTBEAT"}
    assert fs.heartbeat() == 1
    assert b"Event-Name: HEARTBEAT\n" in esl.frame()[1]
    esl.close()


# ------------------------------------------------------------- Zammad stand-in
def test_unknown_call_id_is_500_html_or_json(zammad):
    r = post(zammad, event="hangup", direction="in", callId="nope", cause="cancel")
    assert r.status_code == 500
    assert r.headers["Content-Type"].startswith("text/html")
    assert "<h1>500</h1>" in r.text and "No such call_id nope" in r.text
    r = post(zammad, accept_json=True, event="answer", direction="in", callId="nope")
    assert (r.status_code, r.json()) == (500, {"error": "No such call_id nope"})
    assert zammad.caller_log() == []


def test_duplicate_new_call_direction_token_disabled(zammad):
    new_call = dict(event="newCall", direction="in", callId="c1", **{"from": "493023125741", "to": "492214710334"})
    assert post(zammad, **new_call).json() == {}
    r = post(zammad, accept_json=True, **new_call)
    assert (r.status_code, r.json()) == (500, {"error": "call_id c1 already exists!"})
    r = post(zammad, event="hangup", callId="c1", cause="cancel")
    assert (r.status_code, r.json()) == (422, {"error": "Invalid direction!"})
    r = post(zammad, event="newCall", direction="in", callId="c2")
    assert r.status_code == 422
    r = post(zammad, url=zammad.url.replace("secret-token", "wrong"), **new_call)
    assert (r.status_code, r.json()) == (401, {"error": "Invalid token, please contact your admin!"})
    zammad.disabled = True
    r = post(zammad, url=zammad.url.replace("secret-token", "wrong"), **new_call)
    assert (r.status_code, r.json()) == (422, {"error": "Feature is disabled, please contact your administrator!"})
    assert [c["callId"] for c in zammad.caller_log()] == ["c1"]


def test_missed_call_rule_and_second_hangup(zammad):
    common = {"direction": "in", "callId": "m1"}
    post(zammad, event="newCall", user="1001", **common, **{"from": "493023125741", "to": "492214710334"})
    post(zammad, event="hangup", cause="cancel", **common)
    (call,) = zammad.caller_log()
    assert call["missed"] and call["answered_by"] is None and call["cause"] == "cancel"
    assert call["queue"] == "492214710334" and call["hangups"] == 1
    post(zammad, event="hangup", cause="cancel", **common)  # the bug the service must never commit
    (call,) = zammad.caller_log()
    assert call["hangups"] == 2 and not call["missed"]
    assert [r.status for r in zammad.requests_for("m1")] == [200, 200, 200]


def test_answered_outbound_and_reject(zammad):
    zammad.reject_callers.add("491111")
    session = requests.Session()
    out = {"direction": "out", "callId": "o1"}
    session.post(zammad.url, data={"event": "newCall", "from": "1001", "to": "4989123456789",
                                   "user[]": ["1001"], **out}, timeout=5)
    session.post(zammad.url, data={"event": "answer", **out}, timeout=5)
    session.post(zammad.url, data={"event": "hangup", "cause": "normalClearing", **out}, timeout=5)
    r = session.post(zammad.url, data={"event": "newCall", "direction": "in", "callId": "r1",
                                       "from": "491111", "to": "492214710334"}, timeout=5)
    assert r.json() == {"action": "reject", "reason": "busy"}
    out_call, rejected = zammad.caller_log()
    assert (out_call["from_comment"], out_call["missed"], out_call["state"]) == ("1001", False, "hangup")
    assert zammad.requests[0].fields["user"] == ["1001"]
    assert rejected["callId"] == "r1" and rejected["state"] == "newCall"


def test_fault_injection(zammad):
    new_call = dict(event="newCall", direction="in", callId="f1", **{"from": "4930", "to": "4922"})
    zammad.fail_next(1)
    assert post(zammad, **new_call).status_code == 503
    zammad.close_without_response_next(1)
    with pytest.raises(requests.ConnectionError):
        post(zammad, **new_call)
    assert zammad.caller_log() == []
    zammad.set_hang(0.5)
    with pytest.raises(requests.Timeout):
        requests.post(zammad.url, data=new_call, timeout=0.2)
    zammad.set_hang(None)
    req = zammad.wait_for(lambda: next((r for r in zammad.requests if r.completed and r.processed), None), 3)
    assert req.processed_after_client_gone
    assert [c["callId"] for c in zammad.caller_log()] == ["f1"]
    assert [r.outcome for r in zammad.requests] == ["injected", "closed", "processed"]


def test_keep_alive_is_fast(zammad):
    """Single-send responses: a keep-alive session is not throttled by delayed ACK."""
    session = requests.Session()
    started = time.monotonic()
    for i in range(60):
        session.post(zammad.url, data={"event": "newCall", "direction": "in", "callId": f"k{i}",
                                       "from": "4930", "to": "4922"}, timeout=5)
    assert time.monotonic() - started < 1.5
    assert len({r.conn_id for r in zammad.wait_for_requests(60, 2)}) == 1
