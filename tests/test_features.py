"""Call-centre features end to end: queues, voicemail, pickup, forwarding,
block list, several Zammad systems.

The queue (S15) and voicemail (S17) recordings are checked in test_e2e.py;
the stories here are synthetic (no capture exists), built from the header
shapes of those recordings (tests/synth.py).
"""

import pytest

from tests import synth
from tests.support.zammad_standin import ZammadStandIn
from tests.test_e2e import answered, emit_all


def queue_agent(caller, ext, queue="support@default"):
    leg = synth.Leg("outbound", "default", caller.base["Caller-Caller-ID-Number"], ext,
                    f"sofia/internal/{ext}@127.0.0.1:5090",
                    variables={"variable_cc_member_session_uuid": caller.uuid,
                               "variable_cc_queue": queue, "variable_cc_agent": f"{ext}@default"})
    return leg


def test_caller_abandons_the_queue(start_service, fake_fs, zammad):
    """Synthetic: mod_callcenter answers, both agents ring, the caller gives up."""
    start_service()
    a = synth.caller(did="492214710340")
    agents = [queue_agent(a, "1001"), queue_agent(a, "1002")]
    events = [a.create(), a.execute("callcenter", "support@default"), a.answer()]
    events += [leg.create() for leg in agents]
    a.set(cc_cause="cancel", cc_cancel_reason="BREAK_OUT", cc_queue="support@default")
    events += [leg.hangup("ORIGINATOR_CANCEL", "send_cancel") for leg in agents]
    events += [a.hangup("NORMAL_CLEARING", "recv_bye")]
    emit_all(fake_fs, events)
    zammad.wait_for(lambda: len(answered(zammad, a.uuid)) == 2)
    entry = zammad.caller_log()[0]
    assert (entry["queue"], entry["cause"], entry["missed"], entry["answered_by"]) == \
        ("support", "cancel", True, None)
    assert all(dict(r.form)["queue"] == "support" for r in zammad.requests_for(a.uuid))


def test_pickup_and_forwarding(start_service, fake_fs, zammad):
    """Synthetic: 1002 picks up 1001's ringing phone; a second call is forwarded to a mobile."""
    start_service()
    a, events = synth.picked_up_call()
    f = synth.caller(cid="4930555")
    mobile = synth.carrier_leg(f, dest="4917012345678")
    events += [f.create(), f.execute("bridge"), mobile.create(), mobile.answer(), f.bridge(mobile),
               f.hangup("NORMAL_CLEARING", "recv_bye"), mobile.hangup("NORMAL_CLEARING")]
    emit_all(fake_fs, events)
    zammad.wait_for(lambda: sum(e["hangups"] for e in zammad.caller_log()) == 2)
    log = {e["callId"]: e for e in zammad.caller_log()}
    picked, forwarded = log[a.uuid], log[f.uuid]
    assert (picked["from"], picked["answered_by"], picked["answering_number"], picked["cause"]) == \
        ("493023125741", "1002", "1002", "normalClearing")
    assert (forwarded["cause"], forwarded["missed"]) == ("forwarded", False)


@pytest.mark.parametrize("enabled", [True, False])
def test_block_list_reject_hangs_up_the_caller(enabled, start_service, fake_fs, zammad):
    zammad.reject_callers = {"4966612345"}
    service = start_service(REJECT_BLOCKED=str(enabled).lower())
    a = synth.caller(cid="4966612345")
    emit_all(fake_fs, [a.create(), a.execute("bridge")])
    if enabled:
        fake_fs.wait_until(lambda: any(c.startswith("uuid_kill") for c in fake_fs.api_calls))
        assert f"uuid_kill {a.uuid} USER_BUSY" in fake_fs.api_calls
        service.wait_for_log("rejected by Zammad's block list")
    else:
        service.wait_for_log("REJECT_BLOCKED=false")
        assert not any(c.startswith("uuid_kill") for c in fake_fs.api_calls)
    # FreeSWITCH reports the hangup; Zammad still gets it.
    emit_all(fake_fs, [a.hangup("USER_BUSY", "send_refuse")])
    zammad.wait_for(lambda: len(answered(zammad, a.uuid)) == 2)
    assert zammad.caller_log()[0]["cause"] == "busy"


def test_two_zammad_systems_one_down(start_service, fake_fs, zammad):
    """Tenant acme's Zammad is down: globex's calls are not delayed; acme's arrive later."""
    with ZammadStandIn(token="globex-tok-91") as globex:
        zammad.set_down(True)  # acme
        service = start_service(
            ZAMMAD_CTI_URL="", ZAMMAD_INSTANCES="acme,globex",
            ZAMMAD_CTI_URL_ACME=zammad.url, ZAMMAD_CTI_URL_GLOBEX=globex.url,
            ZAMMAD_ROUTES="did:4922147*=acme,domain:globex.*=globex")
        to_acme = synth.caller(did="492214710334")
        to_globex = synth.caller(did="4940999000")
        to_globex.set(domain_name="globex.pbx.example")
        by_variable = synth.caller(did="492214710399")
        by_variable.set(zammad_instance="globex")
        nowhere = synth.caller(did="4930111222")      # no route, no default: not sent
        for call in (to_acme, to_globex, by_variable, nowhere):
            emit_all(fake_fs, [call.create(), call.execute("bridge"),
                               call.hangup("NORMAL_CLEARING", "recv_cancel")])
        globex.wait_for(lambda: sum(e["hangups"] for e in globex.caller_log()) == 2)
        assert {e["callId"] for e in globex.caller_log()} == {to_globex.uuid, by_variable.uuid}
        assert zammad.caller_log() == []
        zammad.wait_for(lambda: len(zammad.requests) >= 1)  # acme was tried meanwhile
        service.wait_for_log(r"Zammad \(acme\) unreachable")
        zammad.set_down(False)
        zammad.wait_for(lambda: sum(e["hangups"] for e in zammad.caller_log()) == 1, timeout=15)
        assert [e["callId"] for e in zammad.caller_log()] == [to_acme.uuid]
        service.wait_for_log("matches no ZAMMAD_ROUTES")
        assert not any(r.call_id == nowhere.uuid for r in zammad.requests + globex.requests)
        service.stop()
        service.assert_no_secrets(globex.token)
