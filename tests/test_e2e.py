"""End to end: the real fs-zammad process, a fake FreeSWITCH speaking ESL over
TCP replaying real captures, and a Zammad stand-in with Zammad's rules."""

import subprocess
import time
from pathlib import Path

import pytest

from tests import synth
from tests.support.fake_freeswitch import iter_frames
from tests.support.service import FS_ZAMMAD, ServiceProcess, base_env
from tests.test_calls import RECORDED

FIXTURES = Path(__file__).parent / "fixtures" / "callcentre"

# What the caller log must say for each recorded scenario (fixtures/README.md).
CALLER_LOG = {
    "S1": dict(direction="in", to="492214710334", answered_by="1001", cause="normalClearing",
               missed=False),
    "S3": dict(direction="in", to="492214710334", answered_by=None, cause="cancel", missed=True),
    "S4": dict(direction="in", to="492214710334", answered_by=None, cause="busy", missed=True),
    "S5": dict(direction="in", to="492214710334", answered_by=None, cause="noAnswer", missed=True),
    "S6": dict(direction="in", to="492214710399", answered_by=None, cause="notFound", missed=True),
    "S8": dict(direction="out", to="4989123456789", answered_by=None, cause="normalClearing",
               missed=False),
    "S9": dict(direction="out", to="4989123456789", answered_by=None, cause="busy", missed=False),
    "S13": dict(direction="in", to="492214710336", answered_by="1001", cause="normalClearing",
                missed=False),
    "S15": dict(direction="in", to="492214710340", answered_by="1001", cause="normalClearing",
                missed=False, queue="support"),
    "S17": dict(direction="in", to="492214710341", answered_by="voicemail",
                cause="voicemail", missed=True),
    "S23": dict(direction="in", to="492214710351", answered_by="1002", cause="normalClearing",
                missed=False),
    "S25": dict(direction="in", to="492214710353", answered_by=None, cause="forwarded",
                missed=False),
    "S28": dict(direction="in", to="492214710356", answered_by="1001", cause="normalClearing",
                missed=False, queue="support"),
    "S34": dict(direction="in", to="492214710359", answered_by="1001", cause="normalClearing",
                missed=False),
}


def a_leg(scenario):
    path = FIXTURES / scenario / "events_all.txt"
    return next(h["Unique-ID"] for h, _ in iter_frames(path) if h["Event-Name"] == "CHANNEL_CREATE")


def answered(zammad, call_id):
    """Requests for this call that Zammad has finished answering."""
    return [r for r in zammad.requests_for(call_id) if r.status is not None]


def emit_all(fs, events):
    for headers in events:
        fs.emit(headers)


def sentinel_call(fs, zammad):
    """A short inbound call; once its hangup is in, everything before it was processed."""
    a = synth.caller(cid="4940000000")
    emit_all(fs, [a.create(), a.hangup("NORMAL_CLEARING", "recv_cancel")])
    zammad.wait_for(lambda: any(r.call_id == a.uuid and r.event == "hangup"
                                for r in zammad.requests))
    return a.uuid


@pytest.fixture
def service(start_service):
    return start_service()


@pytest.mark.parametrize("scenario", sorted(RECORDED))
def test_recorded_call_reaches_zammad(scenario, service, fake_fs, zammad):
    call_id = a_leg(scenario)
    fake_fs.replay(FIXTURES / scenario / "events_all.txt")
    sentinel_call(fake_fs, zammad)  # all events were read and processed
    expected = [(name, {"event": name, "callId": call_id, **fields})
                for name, fields in RECORDED[scenario]]
    zammad.wait_for(lambda: len(answered(zammad, call_id)) >= len(expected))
    time.sleep(0.2)  # room for a wrong extra request to show up
    sent = [(r.event, dict(r.form)) for r in zammad.requests_for(call_id)]
    assert sent == expected
    for request in zammad.requests_for(call_id):
        assert request.content_type == "application/x-www-form-urlencoded"
        assert request.status == 200
        assert [k for k, _ in request.form][:3] == ["event", "direction", "callId"]
    log = {entry["callId"]: entry for entry in zammad.caller_log()}
    if scenario == "S12":
        assert call_id not in log
        return
    entry = log[call_id]
    want = CALLER_LOG[scenario]
    assert {k: entry[k] for k in want} == want
    assert entry["state"] == "hangup" and entry["hangups"] == 1
    assert entry["from"] == ("1001" if want["direction"] == "out" else "493023125741")
    # one line per event sent, with what an admin needs to read it
    line = service.wait_for_log(rf"hangup callId={call_id} direction={want['direction']}")[0]
    assert f"cause={want['cause']}" in line and "status=200" in line and "ms=" in line


def test_only_the_needed_events_are_subscribed(service, fake_fs):
    subscription = fake_fs.wait_for_subscription()
    assert subscription == {"CHANNEL_CREATE", "CHANNEL_EXECUTE", "CHANNEL_ANSWER",
                            "CHANNEL_BRIDGE", "CHANNEL_HANGUP_COMPLETE", "HEARTBEAT"}
    assert fake_fs.commands[0] == "auth esl-pass-Xy7"


def test_many_calls_in_parallel_keep_per_call_order(service, fake_fs, zammad):
    calls = []
    for i in range(30):
        a = synth.caller(cid=f"49301234{i:04d}")
        b = synth.agent_leg(a, "1001")
        calls.append((a, b))
    # interleave the calls' events
    stories = [[a.create(), a.execute("bridge"), b.create(), b.answer(), a.bridge(b),
                a.hangup("NORMAL_CLEARING", "recv_bye"), b.hangup("NORMAL_CLEARING")]
               for a, b in calls]
    for step in range(7):
        emit_all(fake_fs, [story[step] for story in stories])
    zammad.wait_for(lambda: sum(e["hangups"] for e in zammad.caller_log()) == 30, timeout=20)
    for a, _ in calls:
        assert [r.event for r in zammad.requests_for(a.uuid)] == ["newCall", "answer", "hangup"]
    bad = [e for e in zammad.caller_log() if e["hangups"] != 1 or e["missed"]]
    assert not bad, bad


def test_malformed_frames_are_skipped_and_the_stream_goes_on(service, fake_fs, zammad):
    fake_fs.emit_body(b"this is not an event\n\n")
    fake_fs.send_raw(b"Content-Length: 12\nContent-Type: text/event-json\n\n{\"a\": \"b\"}\n\n")
    service.wait_for_log("skipped a malformed event")
    service.wait_for_log("skipped a frame of type text/event-json")
    sentinel_call(fake_fs, zammad)
    assert fake_fs.connections_total == 1  # the connection survived


def test_broken_framing_rebuilds_the_connection(service, fake_fs, zammad):
    before = fake_fs.connections_total
    fake_fs.send_raw(b"Content-Length: many\nContent-Type: text/event-plain\n\n")
    service.wait_for_log("lost FreeSWITCH.*Content-Length")
    fake_fs.wait_for_subscription(after=before)
    sentinel_call(fake_fs, zammad)


def test_wrong_esl_password_is_reported_and_retried_slowly(start_service, fake_fs):
    service = start_service(wait=False, FREESWITCH_PASSWORD="wrong-secret-77",
                            FREESWITCH_RECONNECT_MAX="30")
    line = service.wait_for_log("rejected the event socket password")[0]
    assert "retrying in" in line and "wrong-secret-77" not in service.log
    assert float(line.split("retrying in ")[1].split()[0]) >= 20
    assert service.proc.poll() is None
    assert service.stop() == 0
    service.assert_no_secrets("wrong-secret-77")


def test_acl_refusal_is_reported(start_service, fake_fs):
    fake_fs.acl_deny = True
    service = start_service(wait=False)
    service.wait_for_log("refused us by its ACL")


def test_freeswitch_drop_and_return(service, fake_fs, zammad):
    """FreeSWITCH restarts mid-call (with and without notice); the call still ends right."""
    a = synth.caller()
    b = synth.agent_leg(a)
    emit_all(fake_fs, [a.create(), a.execute("bridge"), b.create(), b.answer(), a.bridge(b)])
    zammad.wait_for(lambda: len(answered(zammad, a.uuid)) == 2)
    fake_fs.api_responses["show channels as json"] = (
        '{"row_count":2,"rows":[{"uuid":"%s","direction":"inbound","context":"public",'
        '"callstate":"ACTIVE"},{"uuid":"%s","direction":"outbound","call_uuid":"%s",'
        '"callstate":"ACTIVE"}]}' % (a.uuid, b.uuid, a.uuid))
    for notice in (True, False):
        before = fake_fs.connections_total
        fake_fs.drop(notice=notice)
        fake_fs.wait_for_subscription(after=before)
    service.wait_for_log("The system is being shut down")
    emit_all(fake_fs, [a.hangup("NORMAL_CLEARING", "recv_bye"), b.hangup("NORMAL_CLEARING")])
    zammad.wait_for(lambda: len(answered(zammad, a.uuid)) == 3)
    entry = zammad.caller_log()[0]
    assert (entry["answered_by"], entry["cause"], entry["hangups"]) == ("1001", "normalClearing", 1)
    assert "show channels as json" in fake_fs.api_calls


@pytest.mark.parametrize("status,body,words", [
    (401, None, "Invalid token"),
    (422, None, "Feature is disabled"),
])
def test_configuration_errors_are_set_aside_logged_once_and_replayable(
        status, body, words, start_service, fake_fs, zammad, tmp_path):
    service = start_service()
    if status == 401:
        right_token = zammad.token
        zammad.token = "other-token"
    else:
        zammad.disabled = True
    for _ in range(2):
        a = synth.caller()
        emit_all(fake_fs, [a.create(), a.hangup("NORMAL_CLEARING", "recv_cancel")])
    service.wait_for_log(words)
    zammad.wait_for(lambda: len(zammad.requests) >= 2)
    service.wait_for_log("run 'fs-zammad outbox retry'")
    errors = [line for line in service.lines if "ERROR" in line and words in line]
    assert len(errors) == 1, errors  # once, not per event
    assert len(zammad.requests) == 2  # the two newCalls; their hangups were held, not sent
    env = base_env(fake_fs, zammad, tmp_path / "state")
    listing = subprocess.run([FS_ZAMMAD, "outbox", "list"], env=env, capture_output=True,
                             text=True, timeout=30)
    assert "4 set aside" in listing.stdout and words in listing.stdout
    if status == 401:
        zammad.token = right_token
    else:
        zammad.disabled = False
    retry = subprocess.run([FS_ZAMMAD, "outbox", "retry"], env=env, capture_output=True,
                           text=True, timeout=30)
    assert "4 events put back" in retry.stdout
    zammad.wait_for(lambda: sum(e["hangups"] for e in zammad.caller_log()) == 2, timeout=15)
    assert [e["cause"] for e in zammad.caller_log()] == ["cancel", "cancel"]


def test_zammad_5xx_and_error_pages_are_retried(service, fake_fs, zammad):
    zammad.fail_next(3, status=503)
    zammad.fail_next(1, status=500, body="<html><h1>We're sorry, but something went wrong."
                                         "</h1></html>")
    a = synth.caller()
    b = synth.agent_leg(a)
    emit_all(fake_fs, [a.create(), a.execute("bridge"), b.create(), b.answer(), a.bridge(b),
                       a.hangup("NORMAL_CLEARING", "recv_bye"), b.hangup("NORMAL_CLEARING")])
    zammad.wait_for(lambda: zammad.caller_log() and zammad.caller_log()[0]["state"] == "hangup",
                    timeout=20)
    injected = [r.status for r in zammad.requests if r.outcome == "injected"]
    assert injected == [503, 503, 503, 500]
    # while Zammad was down only probes went out: they store nothing
    probes = [r for r in zammad.requests if r.call_id.startswith("fs-zammad-probe-")]
    assert probes and all(r.event == "answer" for r in probes)
    assert [e["callId"] for e in zammad.caller_log()] == [a.uuid]
    assert zammad.caller_log()[0]["hangups"] == 1
    service.wait_for_log("Zammad unreachable: HTTP 503: 502 Bad Gateway")
    service.wait_for_log("Zammad answers again")


def test_bad_env_var_stops_with_one_line_and_exit_2():
    env = base_env(FREESWITCH_PORT="eighty")
    result = subprocess.run([FS_ZAMMAD], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "FREESWITCH_PORT" in result.stderr and "Traceback" not in result.stderr


def test_dry_run_logs_what_would_be_sent(fake_fs):
    env = base_env(fake_fs)
    before = fake_fs.connections_total
    service = ServiceProcess(env)
    try:
        fake_fs.wait_for_subscription(after=before)
        fake_fs.replay(FIXTURES / "S1" / "events_all.txt")
        line = service.wait_for_log("hangup callId=")[0]
        assert "cause=normalClearing" in line
        assert "dry run" in service.log
    finally:
        assert service.stop() == 0


def test_half_dead_connection_is_noticed_and_rebuilt(start_service, fake_fs, zammad):
    """FreeSWITCH keeps the socket open but sends nothing and answers nothing."""
    service = start_service(FREESWITCH_LIVENESS="2", FREESWITCH_TIMEOUT="1")
    before = fake_fs.connections_total
    fake_fs.set_frozen(True)
    service.wait_for_log("lost FreeSWITCH.*(liveness probe failed|no event for)", timeout=15)
    fake_fs.set_frozen(False)
    fake_fs.wait_for_subscription(after=before, timeout=15)
    sentinel_call(fake_fs, zammad)


def test_silent_freeswitch_times_out_instead_of_hanging(start_service, fake_fs):
    fake_fs.silent = True
    service = start_service(wait=False, FREESWITCH_TIMEOUT="0.5")
    service.wait_for_log("did not ask for a password within 0.5 s", count=2)
