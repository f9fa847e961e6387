"""Nothing lost: the real process under Zammad outages, hangs, SIGKILL,
FreeSWITCH restarts and shutdown. Each test ends by checking the caller log
Zammad is left with: every call there, ended, right cause, one hangup."""

import json
import signal
import subprocess

from tests import synth
from tests.support.service import FS_ZAMMAD, ServiceProcess, base_env
from tests.test_e2e import answered, emit_all


def answered_call(cid):
    """An inbound call answered by agent 1001: (events until talking, events to end it)."""
    a = synth.caller(cid=cid)
    b = synth.agent_leg(a, "1001")
    start = [a.create(), a.execute("bridge"), b.create(), b.answer(), a.answer(), a.bridge(b)]
    end = [a.hangup("NORMAL_CLEARING", "recv_bye"), b.hangup("NORMAL_CLEARING", "send_bye")]
    return a, b, start, end


def missed_call(cid):
    a = synth.caller(cid=cid)
    return a, [a.create(), a.execute("bridge"), a.hangup("NORMAL_CLEARING", "recv_cancel")]


def channels_json(*legs_and_parents):
    """What `show channels as json` says is up: (leg, parent-or-None, answered)."""
    rows = []
    for leg, parent, is_answered in legs_and_parents:
        row = {"uuid": leg.uuid, "direction": leg.base["Call-Direction"],
               "context": leg.base["Caller-Context"], "name": leg.base["Channel-Name"],
               "cid_num": leg.base["Caller-Caller-ID-Number"],
               "dest": leg.base["Caller-Destination-Number"],
               "callstate": "ACTIVE" if is_answered else "RINGING"}
        if parent is not None:
            row["call_uuid"] = parent.uuid
        rows.append(row)
    return json.dumps({"row_count": len(rows), "rows": rows})


def assert_caller_log(zammad, expected):
    """expected: callId -> (cause, missed, answered_by)."""
    log = {e["callId"]: e for e in zammad.caller_log()}
    assert set(log) == set(expected)
    for call_id, (cause, missed, answered_by) in expected.items():
        entry = log[call_id]
        assert (entry["state"], entry["hangups"]) == ("hangup", 1), entry
        assert (entry["cause"], entry["missed"], entry["answered_by"]) == \
            (cause, missed, answered_by), entry


def test_zammad_outage_then_recovery(start_service, fake_fs, zammad):
    service = start_service()
    zammad.set_down(True)
    calls = [missed_call(f"4930100{i:03d}") for i in range(10)]
    talking = answered_call("4930200000")
    for _, events in calls:
        emit_all(fake_fs, events)
    emit_all(fake_fs, talking[2])
    service.wait_for_log("unreachable: HTTP 503")
    zammad.wait_for(lambda: len(zammad.requests) >= 3)  # probing, one at a time
    emit_all(fake_fs, talking[3])                       # a call ends during the outage
    zammad.set_down(False)
    expected = {a.uuid: ("cancel", True, None) for a, _ in calls}
    expected[talking[0].uuid] = ("normalClearing", False, "1001")
    zammad.wait_for(lambda: sum(e["hangups"] for e in zammad.caller_log()) == 11, timeout=20)
    assert_caller_log(zammad, expected)
    for call_id in expected:
        events = [r.event for r in zammad.requests_for(call_id) if r.outcome == "processed"]
        assert events in (["newCall", "hangup"], ["newCall", "answer", "hangup"])
    service.wait_for_log("answers again")


def test_zammad_hanging_newcall_retried_missed_hangup_never_twice(start_service, fake_fs, zammad):
    service = start_service(ZAMMAD_TIMEOUT="0.5")
    a, events = missed_call("4930300000")
    zammad.set_hang(1.5)                         # slow, but it does process what it gets
    emit_all(fake_fs, events[:2])
    zammad.wait_for(lambda: len(zammad.requests) >= 1)
    zammad.set_hang(None)
    zammad.wait_for(lambda: len(zammad.caller_log()) == 1)
    zammad.set_hang(1.5)
    emit_all(fake_fs, events[2:])
    zammad.wait_for(lambda: any(r.event == "hangup" for r in zammad.requests))
    zammad.set_hang(None)
    service.wait_for_log("hangup of a missed call may have reached Zammad")
    zammad.wait_for(lambda: zammad.caller_log()[0]["state"] == "hangup", timeout=10)
    assert_caller_log(zammad, {a.uuid: ("cancel", True, None)})
    assert [r.event for r in zammad.requests].count("hangup") == 1
    newcalls = [r for r in zammad.requests if r.event == "newCall"]
    assert len(newcalls) >= 2  # the timed-out newCall was sent again...
    assert len(zammad.calls) == 1  # ...and Zammad has the call once
    listing = subprocess.run([FS_ZAMMAD, "outbox", "list"], env=service.env, capture_output=True,
                             text=True, timeout=30)
    assert "hangup" in listing.stdout and "may have reached Zammad" in listing.stdout


def test_sigkill_mid_stream_then_restart(start_service, fake_fs, zammad):
    # Calls queue while Zammad is down; one call is still talking when the process dies.
    service = start_service()
    zammad.set_down(True)
    finished = [missed_call(f"4930400{i:03d}") for i in range(5)]
    for _, events in finished:
        emit_all(fake_fs, events)
    a, b, start, end = answered_call("4930500000")
    emit_all(fake_fs, start)
    zammad.wait_for(lambda: len(zammad.requests) >= 2)
    service.wait_for_log("unreachable")
    service.kill()                                   # SIGKILL: no goodbye
    zammad.set_down(False)
    # FreeSWITCH still has the talking call when fs-zammad comes back.
    fake_fs.api_responses["show channels as json"] = channels_json((a, None, True), (b, a, True))
    restarted = start_service()
    zammad.wait_for(lambda: sum(e["hangups"] for e in zammad.caller_log()) == 5, timeout=20)
    zammad.wait_for(lambda: len(answered(zammad, a.uuid)) >= 2)
    emit_all(fake_fs, end)                          # the call that began before the restart
    zammad.wait_for(lambda: sum(e["hangups"] for e in zammad.caller_log()) == 6, timeout=15)
    expected = {x.uuid: ("cancel", True, None) for x, _ in finished}
    expected[a.uuid] = ("normalClearing", False, "1001")
    assert_caller_log(zammad, expected)
    restarted.wait_for_log(r"outbox .* \(\d+ pending, 1 calls in progress\)")


def test_freeswitch_gone_while_calls_start_and_end(start_service, fake_fs, zammad):
    """FreeSWITCH away (crash: no notice); meanwhile one call ends and another starts."""
    service = start_service()
    ended_away, ended_b, ended_start, _ = answered_call("4930600000")
    ringing_away = synth.caller(cid="4930700000")
    emit_all(fake_fs, ended_start + [ringing_away.create(), ringing_away.execute("bridge")])
    zammad.wait_for(lambda: len(answered(zammad, ended_away.uuid)) == 2
                    and len(answered(zammad, ringing_away.uuid)) == 1)
    fake_fs.pause_accepting()
    fake_fs.drop(notice=False)
    service.wait_for_log("lost FreeSWITCH")
    # While away: both calls end; a new one starts and an agent answers it.
    new_a, new_b, new_start, new_end = answered_call("4930800000")
    fake_fs.api_responses["show channels as json"] = channels_json((new_a, None, True),
                                                                   (new_b, new_a, True))
    before = fake_fs.connections_total
    fake_fs.resume_accepting()
    fake_fs.wait_for_subscription(after=before, timeout=15)
    service.wait_for_log("resync")
    zammad.wait_for(lambda: len(answered(zammad, new_a.uuid)) == 2, timeout=15)
    emit_all(fake_fs, new_end)
    zammad.wait_for(lambda: sum(e["hangups"] for e in zammad.caller_log()) == 3, timeout=15)
    assert_caller_log(zammad, {
        ended_away.uuid: ("normalClearing", False, "1001"),
        ringing_away.uuid: ("cancel", True, None),
        new_a.uuid: ("normalClearing", False, "1001"),
    })


def test_sigterm_stops_cleanly_and_keeps_the_rest(start_service, fake_fs, zammad, tmp_path):
    service = start_service(SHUTDOWN_TIMEOUT="1")
    zammad.set_delay(0.4)                            # slow Zammad: the queue builds up
    calls = [missed_call(f"4930900{i:03d}") for i in range(12)]
    for _, events in calls:
        emit_all(fake_fs, events)
    zammad.wait_for(lambda: len(zammad.requests) >= 1)
    assert service.stop(signal.SIGTERM) == 0
    line = service.wait_for_log(r"events kept in the outbox")[0]
    assert "stopped" in line
    zammad.set_delay(0)
    restarted = ServiceProcess(base_env(fake_fs, zammad, tmp_path / "state"))
    try:
        zammad.wait_for(lambda: sum(e["hangups"] for e in zammad.caller_log()) == 12, timeout=20)
    finally:
        assert restarted.stop(signal.SIGINT) == 0
    assert_caller_log(zammad, {a.uuid: ("cancel", True, None) for a, _ in calls})


def test_outbox_cap_is_loud(start_service, fake_fs, zammad):
    service = start_service(OUTBOX_MAX_EVENTS="100")
    zammad.set_down(True)
    for i in range(60):
        emit_all(fake_fs, missed_call(f"4931000{i:03d}")[1])
    service.wait_for_log("OUTBOX FULL")
    zammad.set_down(False)
    zammad.wait_for(lambda: sum(e["hangups"] for e in zammad.caller_log()) >= 40, timeout=20)
