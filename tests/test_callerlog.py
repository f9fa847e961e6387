"""Two details of the caller log: calls that end in voicemail, mod_fifo queues."""

import pytest

from fs_zammad.calls import CallTracker, TrackerRules
from tests import synth
from tests.test_calls import capture, run, simple
from tests.test_e2e import a_leg, answered, sentinel_call

FIFO = [
    # (fifo application data, QUEUE_DOMAIN=keep, queue sent)
    ("support in", False, "support"),
    ("support in undef local_stream://moh", False, "support"),
    ("support!5 in", False, "support"),                  # importance 5
    ("support@acme.pbx in", False, "support"),
    ("support@acme.pbx in", True, "support@acme.pbx"),
    ("support out nowait", False, ""),                  # an agent fetching a caller
    ("support", False, ""),
]


@pytest.mark.parametrize("data,keep,queue", FIFO, ids=[f"{d} keep={k}" for d, k, _ in FIFO])
def test_fifo_name_is_the_queue(data, keep, queue):
    a = synth.caller(did="492214710356")
    sent = run([a.create(), a.execute("set", "fifo_music=local_stream://moh"),
                a.execute("fifo", data), a.answer(), a.hangup("NORMAL_CLEARING", "recv_bye")],
               CallTracker(TrackerRules(queue_keep_domain=keep)))[1]
    assert [e.name for e in sent] == ["newCall", "hangup"]
    assert {e.get("queue") for e in sent} == {queue}


def test_dialplan_queue_wins_over_the_fifo_name():
    a = synth.caller(did="492214710356")
    a.set(zammad_queue="hotline")
    sent = run([a.create(), a.execute("fifo", "support in"), a.hangup("NORMAL_CLEARING",
                                                                      "recv_bye")])[1]
    assert {e.get("queue") for e in sent} == {"hotline"}


def test_recorded_fifo_call_is_a_queue_call_on_every_event():
    sent = run(capture("S28"))[1]
    assert [(e.name, e.get("queue")) for e in sent] == [
        ("newCall", "support"), ("answer", "support"), ("hangup", "support")]


VOICEMAIL = [
    # (story, events after the caller was routed to voicemail, answer user, cause)
    ("message left, caller hangs up", "leave", "voicemail", "voicemail"),
    ("caller hangs up during the greeting", "greeting", "voicemail", "voicemail"),
    ("agent rings out, voicemail only seen on the hangup", "hangup-only", "voicemail",
     "voicemail"),
    ("an agent answered first, then the mailbox", "after-agent", "1001", "normalClearing"),
]


@pytest.mark.parametrize("story,how,user,cause", VOICEMAIL, ids=[v[0] for v in VOICEMAIL])
def test_calls_that_end_in_voicemail(story, how, user, cause):
    a = synth.caller(did="492214710341")
    b = synth.agent_leg(a, "1001")
    events = [a.create(), a.execute("bridge", "user/1001"), b.create()]
    if how == "after-agent":
        events += [b.answer(), a.answer(), a.bridge(b), b.hangup("NORMAL_CLEARING", "recv_bye"),
                   a.execute("voicemail", "default 127.0.0.1 1002"),
                   a.hangup("NORMAL_CLEARING", "recv_bye", variable_voicemail_message_len="2")]
    elif how == "hangup-only":
        events += [b.hangup("NO_ANSWER", "send_cancel"), a.answer(),
                   a.hangup("NORMAL_CLEARING", "recv_bye",
                            variable_current_application="voicemail",
                            variable_originate_disposition="NO_ANSWER")]
    else:
        events += [b.hangup("NO_ANSWER", "send_cancel"), a.execute("answer"), a.answer(),
                   a.execute("voicemail", "default 127.0.0.1 1001")]
        extra = {"variable_voicemail_message_len": "2"} if how == "leave" else {}
        events += [a.hangup("NORMAL_CLEARING", "recv_bye", **extra)]
    sent = simple(run(events)[1])
    assert [name for name, _ in sent] == ["newCall", "answer", "hangup"]
    assert (sent[1][1]["user"], sent[2][1]["cause"]) == (user, cause)


def test_outbound_call_to_a_mailbox_is_just_answered():
    """An agent's call out that reaches voicemail is not Zammad's voicemail case."""
    a = synth.agent_call(dest="1002")
    a.set(zammad_direction="out")
    sent = run([a.create(), a.execute("voicemail", "default 127.0.0.1 1002"),
                a.hangup("NORMAL_CLEARING", "recv_bye", variable_voicemail_message_len="2")])[1]
    assert [e.name for e in sent] == ["newCall", "hangup"]
    assert sent[-1].get("cause") != "voicemail"


def test_end_to_end_voicemail_is_to_call_back_and_fifo_is_a_queue(start_service, fake_fs,
                                                                  zammad):
    from tests.test_e2e import FIXTURES
    start_service()
    for scenario in ("S17", "S28", "S34"):
        fake_fs.replay(FIXTURES / scenario / "events_all.txt")
    sentinel_call(fake_fs, zammad)
    ids = {s: a_leg(s) for s in ("S17", "S28", "S34")}
    zammad.wait_for(lambda: all(len(answered(zammad, i)) == 3 for i in ids.values()))
    log = {e["callId"]: e for e in zammad.caller_log()}
    got = {s: (log[i]["answered_by"], log[i]["cause"], log[i]["missed"], log[i]["queue"],
               log[i]["hangups"]) for s, i in ids.items()}
    assert got == {
        "S17": ("voicemail", "voicemail", True, "492214710341", 1),  # to call back
        "S28": ("1001", "normalClearing", False, "support", 1),
        "S34": ("1001", "normalClearing", False, "492214710359", 1),  # a person answered
    }
