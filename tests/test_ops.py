"""Operating it: /healthz and /metrics, both log formats, and the commands
an admin runs (check, health, replay, --version, --help), each against the
real ``fs-zammad`` process, the fake FreeSWITCH and the Zammad stand-in."""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qsl

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fs_zammad import __version__, metrics
from fs_zammad.config import VARIABLES
from tests.support.fake_freeswitch import iter_frames
from tests.support.service import ESL_PASSWORD, FS_ZAMMAD, base_env
from tests.support.zammad_standin import ZammadStandIn
from tests.test_calls import RECORDED

FIXTURES = Path(__file__).parent / "fixtures"
S1 = FIXTURES / "callcentre" / "S1" / "events_all.txt"
S1_CALL = "0e0470c2-489b-46af-9ea6-35866f3fd175"
SENT_FIELDS = ("event", "callId", "direction", "from", "to", "status", "ms", "result")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fs_zammad(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([FS_ZAMMAD, *args], env=env, capture_output=True, text=True, timeout=60)


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(port: int) -> dict:
    """/metrics as {(sample name, ((label, value), ...)): value}."""
    status, text = get(port, "/metrics")
    assert status == 200
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def sample(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def wait_for_metrics(port: int, condition, timeout: float = 15.0) -> dict:
    """Scrape until ``condition(samples)`` holds (a wait, not an assertion on time)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if condition(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics never reached the expected state: {samples}")
        time.sleep(0.05)


def s1_expected(name: str) -> dict:
    return {"event": name, "callId": S1_CALL, **dict(RECORDED["S1"])[name]}


# -- /healthz -------------------------------------------------------------------


def fake_service(connected=True, oldest=0.0, pending=0, calls=0, write_error=None):
    """Just what metrics.health() reads from the service."""
    return SimpleNamespace(
        esl=SimpleNamespace(connected=connected),
        outbox=SimpleNamespace(pending=pending, oldest_pending_age=lambda: oldest,
                               write_error=write_error, held=3, path="/state/outbox.sqlite3"),
        tracker=SimpleNamespace(calls={str(i): None for i in range(calls)}), deliveries={})


def test_health_reports_a_stuck_outbox(monkeypatch):
    moving = fake_service(oldest=metrics.STUCK_AFTER - 1, pending=4, calls=2)
    assert metrics.health(moving) == (200, {
        "status": "ok", "reasons": [], "freeswitch_connected": True, "outbox_pending": 4,
        "calls_in_progress": 2})

    stuck = fake_service(oldest=metrics.STUCK_AFTER + 1, pending=7)
    status, body = metrics.health(stuck)
    assert status == 503 and body["status"] == "unhealthy"
    assert len(body["reasons"]) == 1
    assert body["reasons"][0].startswith("outbox stuck") and "7 pending" in body["reasons"][0]

    both = fake_service(connected=False, oldest=metrics.STUCK_AFTER + 1)
    assert metrics.health(both)[0] == 503 and len(metrics.health(both)[1]["reasons"]) == 2

    full = fake_service(write_error="disk full")
    assert metrics.health(full) == (503, {
        "status": "unhealthy", "reasons": ["outbox cannot be written (disk full in STATE_DIR "
                                           "/state); 3 events wait in memory"],
        "freeswitch_connected": True, "outbox_pending": 0, "calls_in_progress": 0})

    # the same over the WSGI endpoint: 503 and a short JSON body
    monkeypatch.setattr(metrics, "_service", stuck)
    started = []
    chunks = metrics.app({"PATH_INFO": "/healthz"},
                         lambda status, headers: started.append((status, dict(headers))))
    assert started == [("503 Service Unavailable", {"Content-Type": "application/json"})]
    answer = json.loads(b"".join(chunks))
    assert answer["status"] == "unhealthy" and answer["reasons"] == body["reasons"]
    assert len(b"".join(chunks)) < 300


def test_healthz_and_health_command_follow_the_freeswitch_connection(start_service, fake_fs):
    port = free_port()
    service = start_service(METRICS_PORT=port, METRICS_ADDRESS="127.0.0.1")
    service.wait_for_log(rf"health and metrics on http://127\.0\.0\.1:{port}/healthz")
    service.wait_for_log("connected to FreeSWITCH at")  # subscribed is not yet connected
    command_env = base_env(METRICS_PORT=port, METRICS_ADDRESS="127.0.0.1")

    status, body = get(port, "/healthz")
    assert status == 200
    assert json.loads(body) == {"status": "ok", "reasons": [], "freeswitch_connected": True,
                                "outbox_pending": 0, "calls_in_progress": 0}
    healthy = fs_zammad(command_env, "health")
    assert (healthy.returncode, healthy.stdout) == (0, "ok\n")

    fake_fs.pause_accepting()  # FreeSWITCH goes away and stays away
    fake_fs.drop()
    service.wait_for_log("lost FreeSWITCH")
    status, body = get(port, "/healthz")
    assert status == 503
    state = json.loads(body)
    assert state["status"] == "unhealthy" and state["freeswitch_connected"] is False
    assert state["reasons"] == ["not connected to FreeSWITCH"]
    sick = fs_zammad(command_env, "health")
    assert (sick.returncode, sick.stdout) == (1, "unhealthy: not connected to FreeSWITCH\n")

    fake_fs.resume_accepting()
    service.wait_for_log("connected to FreeSWITCH at .* again")
    assert get(port, "/healthz")[0] == 200
    assert fs_zammad(command_env, "health").returncode == 0
    assert sample(scrape(port), "fs_zammad_esl_reconnects_total") == 1  # one lost connection


def test_health_command_without_a_service():
    nobody = fs_zammad(base_env(METRICS_PORT=free_port()), "health")
    assert nobody.returncode == 1
    assert nobody.stdout.startswith("unhealthy: http://127.0.0.1:") and "not answering" in nobody.stdout
    unset = fs_zammad(base_env(), "health")
    assert unset.returncode == 1 and "METRICS_PORT is not set" in unset.stderr


# -- /metrics -------------------------------------------------------------------


def test_metrics_after_a_replayed_call(start_service, fake_fs, zammad):
    port = free_port()
    service = start_service(METRICS_PORT=port)
    service.wait_for_log("health and metrics on")
    service.wait_for_log("connected to FreeSWITCH at")
    subscribed = fake_fs.wait_for_subscription()
    fake_fs.replay(S1)
    fake_fs.heartbeat()  # read after every replayed event: once counted, all were handled
    samples = wait_for_metrics(port, lambda s: (
        sample(s, "fs_zammad_esl_events_total", event="HEARTBEAT") == 1
        and sample(s, "fs_zammad_delivery_seconds_count") == 3))

    received = Counter(h["Event-Name"] for h, _ in iter_frames(S1) if h["Event-Name"] in subscribed)
    received["HEARTBEAT"] += 1
    assert received["CHANNEL_CREATE"] == 2
    counted = {dict(labels)["event"]: value for (name, labels), value in samples.items()
               if name == "fs_zammad_esl_events_total"}
    assert counted == received  # only subscribed events arrive, each counted once
    requests = {(dict(labels)["event"], dict(labels)["status"], dict(labels)["result"]): value
                for (name, labels), value in samples.items()
                if name == "fs_zammad_zammad_requests_total"}
    assert requests == {("newCall", "200", "delivered"): 1, ("answer", "200", "delivered"): 1,
                        ("hangup", "200", "delivered"): 1}
    assert sample(samples, "fs_zammad_delivery_seconds_count") == 3
    expected = {"fs_zammad_outbox_pending": 0, "fs_zammad_outbox_failed": 0,
                "fs_zammad_outbox_oldest_seconds": 0, "fs_zammad_outbox_refused_total": 0,
                "fs_zammad_calls_in_progress": 0, "fs_zammad_esl_connected": 1,
                "fs_zammad_esl_reconnects_total": 0}
    assert {name: sample(samples, name) for name in expected} == expected
    assert [e["answered_by"] for e in zammad.caller_log()] == ["1001"]


# -- logs -----------------------------------------------------------------------


def text_fields(line: str) -> dict:
    """'<time> INFO    hangup callId=... cause=...' -> {"event": "hangup", "callId": ...}."""
    _stamp, _level, event, *pairs = line.split()
    return {"event": event, **dict(pair.split("=", 1) for pair in pairs)}


def test_text_and_json_logs_carry_the_same_fields(start_service, fake_fs, zammad, tmp_path):
    with ZammadStandIn(token=zammad.token) as second:
        text = start_service()
        as_json = start_service(LOG_FORMAT="json", ZAMMAD_CTI_URL=second.url,
                                STATE_DIR=tmp_path / "json-state")
        fake_fs.replay(S1)  # both services are subscribed: each gets the call
        text.wait_for_log(r"hangup callId=")
        as_json.wait_for_log(r'"event": "hangup"')
        assert text.stop() == 0 and as_json.stop() == 0

    stamp = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR) "
    assert all(re.match(stamp, line) for line in text.lines), text.log  # one record, one line
    objects = [json.loads(line) for line in as_json.lines]
    assert all(isinstance(o, dict) and {"time", "level", "logger", "message"} <= o.keys()
               for o in objects)

    from_text = [text_fields(line) for line in text.lines
                 if re.search(r" (newCall|answer|hangup) callId=", line)]
    from_json = [o for o in objects if o["logger"] == "fs_zammad.sent"]
    assert [f["event"] for f in from_text] == [o["event"] for o in from_json] == \
        ["newCall", "answer", "hangup"]
    for line, obj in zip(from_text, from_json):
        expected = s1_expected(line["event"])  # its cause, user, answeringNumber too
        for name in SENT_FIELDS:
            assert name in line and name in obj, (name, line, obj)
        for name in expected.keys() & {"event", "callId", "direction", "from", "to", "user",
                                       "cause"}:
            assert line[name] == obj[name] == expected[name], (name, line, obj)
        assert line["status"] == str(obj["status"]) == "200"
        assert float(line["ms"]) >= 0 and isinstance(obj["ms"], (int, float))
        assert line.keys() - {"ms"} == obj.keys() - {"time", "level", "logger", "message", "ms"}
    for secret in (ESL_PASSWORD, zammad.token):
        assert secret not in text.log and secret not in as_json.log


# -- fs-zammad check ------------------------------------------------------------


@pytest.fixture
def tls_server(self_signed):
    """A TLS listener with the self-signed certificate; its port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*self_signed)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                try:
                    context.wrap_socket(conn, server_side=True).close()
                except (OSError, ssl.SSLError):
                    pass  # the client gave up on our certificate

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(5)
    listener.close()


def with_token(url: str, token: str) -> str:
    return url.rpartition("/")[0] + "/" + token


# case -> (setup(fake_fs, zammad, tls_port) -> env overrides, which line fails (0 FreeSWITCH,
# 1 Zammad), words that line must hold); tls_port() starts the self-signed TLS server.
CHECK_CASES = {
    "wrong ESL password": (lambda fs, z, p: {"FREESWITCH_PASSWORD": "wrong-secret-77"},
                           0, ["rejected the event socket password", "FREESWITCH_PASSWORD"]),
    "ACL denial": (lambda fs, z, p: setattr(fs, "acl_deny", True) or {},
                   0, ["refused us by its ACL"]),
    "FreeSWITCH not listening": (lambda fs, z, p: {"FREESWITCH_PORT": free_port()},
                                 0, ["refused the connection"]),
    "FreeSWITCH silent": (lambda fs, z, p: setattr(fs, "silent", True) or {"FREESWITCH_TIMEOUT": 1},
                          0, ["did not ask for a password within 1 s"]),
    "Zammad wrong token": (lambda fs, z, p: {"ZAMMAD_CTI_URL": with_token(z.url, "wrong-tok-99")},
                           1, ["token rejected (401"]),
    "CTI disabled": (lambda fs, z, p: setattr(z, "disabled", True) or {},
                     1, ["CTI integration not usable (422", "Feature is disabled"]),
    "Zammad down": (lambda fs, z, p: z.set_down() or {}, 1, ["is down (HTTP 503"]),
    "DNS failure": (lambda fs, z, p: {"ZAMMAD_CTI_URL": "https://no-such-host.invalid/api/v1/cti/"
                                                        + z.token},
                    1, ["DNS lookup failed", "no-such-host.invalid"]),
    "TLS on a plain HTTP port": (lambda fs, z, p: {"ZAMMAD_CTI_URL": z.url.replace("http:", "https:")},
                                 1, ["TLS handshake failed", "speak https"]),
    "TLS certificate not trusted": (
        lambda fs, z, p: {"ZAMMAD_CTI_URL": f"https://127.0.0.1:{p()}/api/v1/cti/{z.token}"},
        1, ["TLS certificate not accepted (certificate verify failed", "ZAMMAD_CA_BUNDLE"]),
}


def test_check_all_good_creates_no_call(fake_fs, zammad):
    result = fs_zammad(base_env(fake_fs, zammad), "check")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["ok", "ok"], lines
    assert lines[0] == (f"ok   FreeSWITCH 127.0.0.1:{fake_fs.port}: reachable, password accepted, "
                        "events subscribed")
    assert lines[1].startswith(f"ok   Zammad http://127.0.0.1:{zammad.port}/api/v1/cti/***: reachable")
    assert zammad.caller_log() == []  # the probe names a call Zammad never saw
    assert [(r.event, r.status) for r in zammad.requests] == [("answer", 500)]
    assert zammad.token not in result.stdout + result.stderr
    assert ESL_PASSWORD not in result.stdout + result.stderr


@pytest.mark.parametrize("case", CHECK_CASES)
def test_check_says_what_is_wrong(case, fake_fs, zammad, request):
    setup, failing, words = CHECK_CASES[case]
    env = base_env(fake_fs, zammad,
                   **setup(fake_fs, zammad, lambda: request.getfixturevalue("tls_server")))
    result = fs_zammad(env, "check")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2, lines  # one line per check
    assert lines[failing].startswith("FAIL ") and lines[1 - failing].startswith("ok   "), lines
    for word in words:
        assert word in lines[failing], lines[failing]
    assert zammad.caller_log() == []
    for secret in (ESL_PASSWORD, "wrong-secret-77", zammad.token, "wrong-tok-99"):
        assert secret not in result.stdout + result.stderr


def test_check_without_zammad_and_with_several_instances(fake_fs, zammad):
    dry = fs_zammad(base_env(fake_fs), "check")
    assert dry.returncode == 0
    assert [line.split()[0] for line in dry.stdout.splitlines()] == ["ok", "skip"]
    assert "ZAMMAD_CTI_URL is not set" in dry.stdout

    several = fs_zammad(base_env(fake_fs, zammad, ZAMMAD_INSTANCES="acme",
                                 ZAMMAD_CTI_URL_ACME=with_token(zammad.url, "wrong-tok-99")), "check")
    assert several.returncode == 1
    lines = several.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [["ok", "FreeSWITCH"], ["ok", "Zammad"],
                                                    ["FAIL", "Zammad"]], lines
    assert lines[2].startswith("FAIL Zammad [acme] http://") and "token rejected (401" in lines[2]
    assert "wrong-tok-99" not in several.stdout + several.stderr
    assert zammad.caller_log() == []


# -- fs-zammad replay -----------------------------------------------------------


def replay_sections(stdout: str, files) -> dict:
    """replay's output, one '# <path>' headed section per file -> {path: [lines]}."""
    headings = {f"# {path}": str(path) for path in files}
    sections: dict = {}
    for line in stdout.splitlines():
        if line in headings:
            current = sections[headings[line]] = []
        else:
            current.append(line)
    return sections


def test_replay_prints_what_zammad_would_receive():
    files = sorted((FIXTURES / "callcentre").glob("*/events_all.txt"))
    assert {f.parent.name for f in files} == set(RECORDED)
    result = fs_zammad(base_env(), "replay", *map(str, files))
    assert result.returncode == 0, result.stderr
    sections = replay_sections(result.stdout, files)
    assert list(sections) == [str(f) for f in files]
    for path in files:
        lines = sections[str(path)]
        scenario = path.parent.name
        a_leg = next(h["Unique-ID"] for h, _ in iter_frames(path)
                     if h["Event-Name"] == "CHANNEL_CREATE")
        if not RECORDED[scenario]:
            assert lines == ["# (no call for Zammad: internal or ignored)"], (scenario, lines)
            continue
        sent = [parse_qsl(line, keep_blank_values=True) for line in lines]
        assert [dict(pairs) for pairs in sent] == [{"event": name, "callId": a_leg, **fields}
                                                   for name, fields in RECORDED[scenario]], scenario
        assert all([k for k, _ in pairs][:3] == ["event", "direction", "callId"] for pairs in sent)


# Loopback captures: the loopback/ endpoint calls never leave FreeSWITCH (no
# call for Zammad by default); the sofia ones come back in through the
# 'internal' profile into context 'public', so they are inbound calls.
LOOPBACK_SIP = {"07_sip_answered_normal_clearing": "cancel", "08_sip_user_busy": "busy",
                "09_sip_originator_cancel": "cancel", "10_sip_no_answer": "cancel"}


def test_replay_loopback_captures():
    files = sorted((FIXTURES / "loopback").glob("*/events.txt"))
    assert len(files) == 10
    result = fs_zammad(base_env(), "replay", *map(str, files))
    assert result.returncode == 0, result.stderr
    sections = replay_sections(result.stdout, files)
    assert list(sections) == [str(f) for f in files]
    for path in files:
        lines = sections[str(path)]
        cause = LOOPBACK_SIP.get(path.parent.name)
        if cause is None:
            assert lines == ["# (no call for Zammad: internal or ignored)"], (path, lines)
            continue
        sent = [dict(parse_qsl(line)) for line in lines]
        assert [f["event"] for f in sent] == ["newCall", "hangup"], (path, lines)
        assert len({f["callId"] for f in sent}) == 1 and {f["direction"] for f in sent} == {"in"}
        assert sent[-1]["cause"] == cause, (path, lines)


def test_replay_send_fills_the_caller_log(zammad):
    result = fs_zammad(base_env(zammad=zammad), "replay", "--send", str(S1))
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line.endswith("-> HTTP 200 delivered") for line in result.stdout.splitlines()[1:]] \
        == [True] * 3
    (entry,) = zammad.caller_log()
    assert (entry["callId"], entry["answered_by"], entry["cause"], entry["missed"],
            entry["hangups"]) == (S1_CALL, "1001", "normalClearing", False, 1)
    assert zammad.token not in result.stdout + result.stderr


def test_replay_of_a_truncated_capture_fails_with_one_line(tmp_path):
    data = S1.read_bytes()
    cut = tmp_path / "cut.txt"
    cut.write_bytes(data[:data.index(b"Content-Type: text/event-plain", 2000) + 200])
    result = fs_zammad(base_env(), "replay", str(cut))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"fs-zammad: {cut}: ")
    assert "cut short" in result.stderr and "Traceback" not in result.stderr


# -- --version, --help ----------------------------------------------------------


def test_version_and_help_list_every_variable_and_no_secret():
    env = base_env(FREESWITCH_PASSWORD="esl-secret-5521",
                   ZAMMAD_CTI_URL="https://helpdesk.acme.test/api/v1/cti/tok-secret-8812")
    version = fs_zammad(env, "--version")
    assert (version.returncode, version.stdout) == (0, f"fs-zammad {__version__}\n")
    usage = fs_zammad(env, "--help")
    assert usage.returncode == 0
    for name, _default, _meaning in VARIABLES:
        assert re.search(rf"^  {name} ", usage.stdout, re.M), name
    for command in ("check", "health", "replay", "outbox"):
        assert command in usage.stdout
    for secret in ("esl-secret-5521", "tok-secret-8812", "helpdesk.acme.test"):
        assert secret not in usage.stdout + usage.stderr
