"""The call tracker, pure: recorded calls and synthetic leg stories."""

from pathlib import Path

import pytest

from fs_zammad.calls import (
    Call,
    CallTracker,
    TrackerRules,
    channels_to_headers,
    hangup_sent_once,
)
from fs_zammad.wire import iter_capture
from tests import synth

FIXTURES = Path(__file__).parent / "fixtures"

IN_MAIN = {"direction": "in", "from": "493023125741", "to": "492214710334"}
OUT = {"direction": "out", "from": "1001", "to": "4989123456789"}

# scenario -> [(event, fields other than callId)], from fixtures/README.md's table.
RECORDED = {
    "S1": [("newCall", IN_MAIN),
           ("answer", {**IN_MAIN, "user": "1001", "answeringNumber": "1001"}),
           ("hangup", {**IN_MAIN, "cause": "normalClearing"})],
    "S3": [("newCall", IN_MAIN), ("hangup", {**IN_MAIN, "cause": "cancel"})],
    "S4": [("newCall", IN_MAIN), ("hangup", {**IN_MAIN, "cause": "busy"})],
    "S5": [("newCall", IN_MAIN), ("hangup", {**IN_MAIN, "cause": "noAnswer"})],
    "S6": [("newCall", {**IN_MAIN, "to": "492214710399"}),
           ("hangup", {**IN_MAIN, "to": "492214710399", "cause": "notFound"})],
    "S8": [("newCall", {**OUT, "user": "1001"}), ("answer", OUT),
           ("hangup", {**OUT, "cause": "normalClearing"})],
    "S9": [("newCall", {**OUT, "user": "1001"}), ("hangup", {**OUT, "cause": "busy"})],
    "S12": [],
    "S13": [("newCall", {**IN_MAIN, "to": "492214710336"}),
            ("answer", {**IN_MAIN, "to": "492214710336", "user": "1001",
                        "answeringNumber": "1001"}),
            ("hangup", {**IN_MAIN, "to": "492214710336", "cause": "normalClearing"})],
    "S15": [("newCall", {**IN_MAIN, "to": "492214710340", "queue": "support"}),
            ("answer", {**IN_MAIN, "to": "492214710340", "user": "1001",
                        "answeringNumber": "1001", "queue": "support"}),
            ("hangup", {**IN_MAIN, "to": "492214710340", "cause": "normalClearing",
                        "queue": "support"})],
    "S17": [("newCall", {**IN_MAIN, "to": "492214710341"}),
            ("answer", {**IN_MAIN, "to": "492214710341", "user": "voicemail"}),
            ("hangup", {**IN_MAIN, "to": "492214710341", "cause": "voicemail"})],
    "S23": [("newCall", {**IN_MAIN, "to": "492214710351"}),
            ("answer", {**IN_MAIN, "to": "492214710351", "user": "1002",
                        "answeringNumber": "1002"}),
            ("hangup", {**IN_MAIN, "to": "492214710351", "cause": "normalClearing"})],
    # follow-me: 1001 rings, then a loopback sends the call to the mobile, which answers
    "S25": [("newCall", {**IN_MAIN, "to": "492214710353"}),
            ("hangup", {**IN_MAIN, "to": "492214710353", "cause": "forwarded"})],
    "S28": [("newCall", {**IN_MAIN, "to": "492214710356", "queue": "support"}),
            ("answer", {**IN_MAIN, "to": "492214710356", "user": "1001",
                        "answeringNumber": "1001", "queue": "support"}),
            ("hangup", {**IN_MAIN, "to": "492214710356", "cause": "normalClearing",
                        "queue": "support"})],
    # answered by 1001, then transferred to 1002's mailbox: a person answered
    "S34": [("newCall", {**IN_MAIN, "to": "492214710359"}),
            ("answer", {**IN_MAIN, "to": "492214710359", "user": "1001",
                        "answeringNumber": "1001"}),
            ("hangup", {**IN_MAIN, "to": "492214710359", "cause": "normalClearing"})],
}


def capture(scenario):
    return list(iter_capture((FIXTURES / "callcentre" / scenario / "events_all.txt").read_bytes()))


def run(events, tracker=None):
    tracker = tracker or CallTracker()
    out = []
    for i, headers in enumerate(events):
        out += tracker.handle(headers, 1000.0 + i)
    return tracker, out


def simple(events):
    return [(e.name, {k: v for k, v in e.fields if k not in ("event", "callId")}) for e in events]


@pytest.mark.parametrize("scenario", sorted(RECORDED))
def test_recorded_scenario(scenario):
    events = capture(scenario)
    tracker, sent = run(events)
    assert simple(sent) == RECORDED[scenario]
    a_leg = next(h["Unique-ID"] for h in events if h["Event-Name"] == "CHANNEL_CREATE")
    assert {e.call_id for e in sent} <= {a_leg}
    assert all(e.get("callId") == a_leg for e in sent)
    assert tracker.calls == {}  # nothing left over
    # Only the hangup of an inbound call nobody answered must never go out twice.
    missed = scenario in ("S3", "S4", "S5", "S6")
    assert [e.name for e in sent if e.once] == (["hangup"] if missed else [])


@pytest.mark.parametrize("scenario", ["S1", "S5", "S15", "S17", "S25"])
def test_restart_mid_call_keeps_the_story(scenario):
    """State saved after every event and loaded into a new tracker gives the same result."""
    events = capture(scenario)
    whole = simple(run(events)[1])
    for cut in range(1, len(events)):
        first, sent = run(events[:cut])
        restored = CallTracker(calls=[Call.from_json(c.to_json()) for c in first.calls.values()])
        rest = sent
        for i, headers in enumerate(events[cut:]):
            rest += restored.handle(headers, 2000.0 + i)
        assert simple(rest) == whole, f"cut after event {cut}"


def test_hangup_order_of_legs_does_not_matter():
    events = capture("S1")
    hangups = [h for h in events if h["Event-Name"] == "CHANNEL_HANGUP_COMPLETE"]
    others = [h for h in events if h["Event-Name"] != "CHANNEL_HANGUP_COMPLETE"]
    assert simple(run(others + hangups[::-1])[1]) == RECORDED["S1"]


def test_loopback_calls_are_internal_by_default_and_one_call_when_external():
    path = FIXTURES / "loopback" / "05_originator_cancel" / "events.txt"
    events = list(iter_capture(path.read_bytes()))
    assert run(events)[1] == []
    rules = TrackerRules(external_contexts=frozenset({"default"}))
    sent = run(events, CallTracker(rules))[1]
    assert [e.name for e in sent] == ["newCall", "hangup"]
    assert len({e.call_id for e in sent}) == 1
    assert sent[-1].get("cause") == "cancel"


# -- synthetic stories (no capture exists for these) ---------------------------


def test_agent_hangs_up_first():
    a = synth.caller()
    b = synth.agent_leg(a)
    tracker, sent = run([a.create(), a.execute("bridge"), b.create(), b.answer(), a.answer(),
                         a.bridge(b), b.hangup("NORMAL_CLEARING", "recv_bye")])
    assert [e.name for e in sent] == ["newCall", "answer"]
    sent += run([a.hangup("NORMAL_CLEARING", "send_bye")], tracker)[1]
    assert [e.name for e in sent] == ["newCall", "answer", "hangup"]
    assert sent[-1].get("cause") == "normalClearing"


def test_ring_group_one_answers_losers_change_nothing():
    a = synth.caller()
    legs = [synth.agent_leg(a, ext) for ext in ("1001", "1002", "1003")]
    events = [a.create(), a.execute("bridge", "{ignore_early_media=true}user/1001,user/1002")]
    events += [leg.create() for leg in legs]
    events += [legs[1].answer(), legs[0].hangup("LOSE_RACE", "send_cancel"),
               legs[2].hangup("ORIGINATOR_CANCEL", "send_cancel"), a.answer(), a.bridge(legs[1]),
               a.hangup("NORMAL_CLEARING", "recv_bye"), legs[1].hangup("NORMAL_CLEARING")]
    sent = run(events)[1]
    assert simple(sent)[1] == ("answer", {**IN_MAIN, "user": "1002", "answeringNumber": "1002"})
    assert [e.name for e in sent] == ["newCall", "answer", "hangup"]
    assert sent[-1].get("cause") == "normalClearing"


def test_ring_group_nobody_answers():
    a = synth.caller()
    legs = [synth.agent_leg(a, ext) for ext in ("1001", "1002")]
    events = [a.create(), a.execute("bridge")] + [leg.create() for leg in legs]
    events += [legs[0].hangup("ALLOTTED_TIMEOUT", "send_cancel"),
               legs[1].hangup("ORIGINATOR_CANCEL", "send_cancel"),
               a.hangup("NORMAL_CLEARING", "send_refuse", variable_originate_disposition="ALLOTTED_TIMEOUT")]
    assert simple(run(events)[1])[-1] == ("hangup", {**IN_MAIN, "cause": "noAnswer"})


@pytest.mark.parametrize("b_cause,a_cause,disposition,expected", [
    ("CALL_REJECTED", "CALL_REJECTED", "send_refuse", "noAnswer"),          # 603
    ("UNALLOCATED_NUMBER", "UNALLOCATED_NUMBER", "send_refuse", "notFound"),  # 404
    ("ORIGINATOR_CANCEL", "ORIGINATOR_CANCEL", "recv_cancel", "cancel"),   # agent gives up
    ("NORMAL_TEMPORARY_FAILURE", "NORMAL_TEMPORARY_FAILURE", "send_refuse", "congestion"),
])
def test_outbound_failures(b_cause, a_cause, disposition, expected):
    a = synth.agent_call()
    b = synth.carrier_leg(a)
    sent = run([a.create(), a.execute("bridge", "sofia/gateway/carrier/4989123456789"), b.create(),
                b.hangup(b_cause, "recv_refuse"),
                a.hangup(a_cause, disposition, variable_originate_disposition=b_cause)])[1]
    assert simple(sent) == [("newCall", {**OUT, "user": "1001"}),
                            ("hangup", {**OUT, "cause": expected})]


def test_internal_call_sends_nothing_and_forgets():
    a = synth.agent_call(dest="1002")
    b = synth.agent_leg(a, "1002", context="default")
    tracker, sent = run([a.create(), a.execute("bridge"), b.create(), b.answer(), a.bridge(b),
                         a.hangup("NORMAL_CLEARING"), b.hangup("NORMAL_CLEARING")])
    assert sent == [] and tracker.calls == {}


def test_direction_overrides_from_the_dialplan():
    a = synth.agent_call(dest="1002")          # internal by the rules...
    b = synth.agent_leg(a, "1002", context="default")
    a.set(zammad_direction="out", zammad_user="alice@example.com")  # ...but the dialplan says out
    sent = run([a.create(), a.execute("set", "zammad_direction=out"), a.execute("bridge"),
                b.create(), b.hangup("USER_BUSY"), a.hangup("USER_BUSY", "send_refuse")])[1]
    assert simple(sent) == [
        ("newCall", {"direction": "out", "from": "1001", "to": "1002", "user": "alice@example.com"}),
        ("hangup", {"direction": "out", "from": "1001", "to": "1002", "cause": "busy"})]


def test_ignore_override_on_an_external_call():
    a = synth.caller()
    a.set(zammad_direction="ignore")
    tracker, sent = run([a.create(), a.execute("bridge"), a.hangup("NORMAL_CLEARING", "recv_bye")])
    assert sent == [] and tracker.calls == {}


def test_queue_from_dialplan_variable_and_domain_kept_on_request():
    a = synth.caller()
    a.set(zammad_queue="sales@tenant1")
    sent = run([a.create(), a.execute("playback", "welcome.wav"),
                a.hangup("NORMAL_CLEARING", "recv_bye")],
               CallTracker(TrackerRules(queue_keep_domain=True)))[1]
    assert sent[0].get("queue") == "sales@tenant1"
    assert sent[-1].get("cause") == "cancel"  # left during the announcement: missed


def test_blind_transfer_to_second_agent_keeps_first_number_and_one_call():
    """uuid_transfer: the A-leg's destination changes; still one callId, original to."""
    a = synth.caller()
    b1 = synth.agent_leg(a, "1001")
    events = [a.create(), a.execute("bridge"), b1.create(), b1.answer(), a.bridge(b1)]
    a.base["Caller-Destination-Number"] = "1002"
    a.base["Caller-Context"] = "default"
    b2 = synth.agent_leg(a, "1002", context="default")
    events += [b1.hangup("NORMAL_CLEARING", "recv_bye"), a.execute("bridge"), b2.create(),
               b2.answer(), a.bridge(b2), a.hangup("NORMAL_CLEARING", "recv_bye"),
               b2.hangup("NORMAL_CLEARING")]
    sent = run(events)[1]
    assert [e.name for e in sent] == ["newCall", "answer", "hangup"]
    assert all(e.get("to") == "492214710334" for e in sent)
    assert sent[-1].get("cause") == "normalClearing"


def test_pickup_makes_the_intercepting_agent_the_one_who_answered():
    _, events = synth.picked_up_call()
    tracker, sent = run(events)
    assert simple(sent) == [
        ("newCall", IN_MAIN),
        ("answer", {**IN_MAIN, "user": "1002", "answeringNumber": "1002"}),
        ("hangup", {**IN_MAIN, "cause": "normalClearing"})]
    assert tracker.calls == {}


def test_attended_transfer_consult_leg_joins_the_customer_call():
    a = synth.caller()
    b = synth.agent_leg(a, "1001")
    consult = synth.agent_call("1001", dest="1002")
    c = synth.agent_leg(consult, "1002", context="default")
    events = [a.create(), a.execute("bridge"), b.create(), b.answer(), a.bridge(b),
              consult.create(), consult.execute("bridge"), c.create(), c.answer(),
              consult.bridge(c),
              # transfer completes: the customer is bridged to 1002, 1001's legs go
              a.bridge(c), b.hangup("ATTENDED_TRANSFER"), consult.hangup("ATTENDED_TRANSFER"),
              a.hangup("NORMAL_CLEARING", "recv_bye"), c.hangup("NORMAL_CLEARING")]
    tracker, sent = run(events)
    assert [e.name for e in sent] == ["newCall", "answer", "hangup"]
    assert sent[1].get("user") == "1001"
    assert sent[-1].get("cause") == "normalClearing"
    assert tracker.calls == {}


def test_inbound_call_forwarded_to_external_number():
    a = synth.caller()
    fwd = synth.carrier_leg(a, dest="4917012345678")
    sent = run([a.create(), a.execute("bridge"), fwd.create(), fwd.answer(), a.bridge(fwd),
                a.hangup("NORMAL_CLEARING", "recv_bye"), fwd.hangup("NORMAL_CLEARING")])[1]
    assert simple(sent) == [("newCall", IN_MAIN), ("hangup", {**IN_MAIN, "cause": "forwarded"})]


def test_national_numbers_become_e164_with_country_code():
    a = synth.caller(did="022147103", cid="0664123456789")
    rules = TrackerRules(country_code="43")
    sent = run([a.create(), a.hangup("NORMAL_CLEARING", "recv_cancel")], CallTracker(rules))[1]
    assert sent[0].get("from") == "43664123456789"
    assert sent[0].get("to") == "4322147103"


def test_reconcile_ends_calls_gone_during_a_gap_and_starts_new_ones():
    a = synth.caller()
    b = synth.agent_leg(a)
    gone = synth.caller(cid="4930999")
    tracker, sent = run([a.create(), a.execute("bridge"), b.create(), b.answer(), a.bridge(b),
                         gone.create(), gone.execute("bridge")])
    live = channels_to_headers([
        {"uuid": a.uuid, "direction": "inbound", "context": "public", "cid_num": "493023125741",
         "dest": "492214710334", "callstate": "ACTIVE", "name": a.base["Channel-Name"]},
        {"uuid": b.uuid, "direction": "outbound", "context": "public", "call_uuid": a.uuid,
         "cid_num": "493023125741", "dest": "1001", "callstate": "ACTIVE"},
        {"uuid": "new-a", "direction": "inbound", "context": "public", "cid_num": "4940111",
         "dest": "492214710334", "callstate": "RINGING", "name": "sofia/external/4940111"},
    ])
    events = tracker.reconcile(live, 2000.0)
    by_call = {}
    for e in events:
        by_call.setdefault(e.call_id, []).append(e.name)
    assert by_call == {gone.uuid: ["hangup"], "new-a": ["newCall"]}
    assert [e for e in events if e.call_id == gone.uuid][0].get("cause") == "cancel"
    assert set(tracker.calls) == {a.uuid, "new-a"}


def test_expire_ends_calls_without_hangup():
    a = synth.caller()
    tracker, sent = run([a.create(), a.execute("bridge")], CallTracker(TrackerRules(max_call_seconds=60)))
    assert tracker.expire(1030.0) == []
    events = tracker.expire(5000.0)
    assert [e.name for e in events] == ["hangup"] and tracker.calls == {}


def test_hangup_for_a_call_never_seen_still_gives_a_whole_lifecycle():
    """fs-zammad started mid-call: the first event is the hangup."""
    a = synth.caller()
    sent = run([a.hangup("NORMAL_CLEARING", "recv_cancel")])[1]
    assert [e.name for e in sent] == ["newCall", "hangup"]


def test_b_leg_seen_before_its_a_leg_still_makes_one_call():
    a = synth.caller()
    b = synth.agent_leg(a)
    tracker, sent = run([b.create(), a.create(), a.execute("bridge"), b.answer(), a.bridge(b),
                         b.hangup("NORMAL_CLEARING"), a.hangup("NORMAL_CLEARING", "recv_bye")])
    assert simple(sent) == [
        ("newCall", IN_MAIN), ("answer", {**IN_MAIN, "user": "1001", "answeringNumber": "1001"}),
        ("hangup", {**IN_MAIN, "cause": "normalClearing"})]
    assert {e.call_id for e in sent} == {a.uuid} and tracker.calls == {}


def test_ringing_b_leg_listed_after_a_gap_joins_its_call_on_its_next_event():
    a = synth.caller()
    b = synth.agent_leg(a)
    tracker, sent = run([a.create(), a.execute("bridge")])
    live = channels_to_headers([
        {"uuid": a.uuid, "direction": "inbound", "context": "public", "callstate": "RINGING"},
        {"uuid": b.uuid, "direction": "outbound", "context": "public", "dest": "1001",
         "callstate": "RINGING"}])          # ringing: show channels gives no call_uuid yet
    sent += tracker.reconcile(live, 2000.0)
    sent += run([b.answer(), a.bridge(b), a.hangup("NORMAL_CLEARING", "recv_bye"),
                 b.hangup("NORMAL_CLEARING")], tracker)[1]
    assert [(e.call_id, e.name) for e in sent] == [(a.uuid, "newCall"), (a.uuid, "answer"),
                                                   (a.uuid, "hangup")]
    assert sent[-1].get("cause") == "normalClearing"


def test_agent_answered_during_a_gap_is_not_a_missed_call():
    a = synth.caller()
    b = synth.agent_leg(a)
    tracker, sent = run([a.create(), a.execute("bridge"), b.create()])
    live = channels_to_headers([
        {"uuid": a.uuid, "direction": "inbound", "context": "public", "callstate": "ACTIVE"},
        {"uuid": b.uuid, "direction": "outbound", "call_uuid": a.uuid, "callstate": "ACTIVE"}])
    sent += tracker.reconcile(live, 2000.0)
    sent += run([a.hangup("NORMAL_CLEARING", "recv_bye"), b.hangup("NORMAL_CLEARING")], tracker)[1]
    assert [e.name for e in sent] == ["newCall", "answer", "hangup"]
    assert sent[-1].get("cause") == "normalClearing"


def test_answer_seen_only_in_the_hangup_event_counts():
    a = synth.caller()
    b = synth.agent_leg(a)
    sent = run([a.create(), a.execute("bridge"), b.create(),
                b.hangup("NORMAL_CLEARING", **{"Caller-Channel-Answered-Time": "1795604773462533"}),
                a.hangup("NORMAL_CLEARING", "recv_bye")])[1]
    assert [e.name for e in sent] == ["newCall", "answer", "hangup"]


def test_forward_nobody_answers_is_missed_not_forwarded():
    a = synth.caller()
    mobile = synth.carrier_leg(a, dest="4917012345678")
    sent = run([a.create(), a.execute("bridge"), mobile.create(),
                mobile.hangup("USER_BUSY", "recv_refuse"),
                a.hangup("USER_BUSY", "send_refuse", variable_originate_disposition="USER_BUSY")])[1]
    assert sent[-1].get("cause") == "busy"


def test_bridge_on_early_media_is_not_an_answer():
    a = synth.agent_call()
    b = synth.carrier_leg(a)
    sent = run([a.create(), a.execute("bridge"), b.create(), a.bridge(b),
                b.hangup("USER_BUSY", "recv_refuse"),
                a.hangup("USER_BUSY", "send_refuse", variable_originate_disposition="USER_BUSY")])[1]
    assert simple(sent) == [("newCall", {**OUT, "user": "1001"}), ("hangup", {**OUT, "cause": "busy"})]


def test_click_to_dial_customer_first():
    """originate sofia/gateway/carrier/4989... &bridge(user/1001)"""
    customer = synth.Leg("outbound", "default", "492214710334", "4989123456789",
                         "sofia/gateway/carrier/4989123456789",
                         variables={"variable_sip_gateway_name": "carrier"})
    agent = synth.agent_leg(customer, "1001", context="default")
    sent = run([customer.create(), customer.answer(), customer.execute("bridge", "user/1001"),
                agent.create(), agent.answer(), customer.bridge(agent),
                agent.hangup("NORMAL_CLEARING", "recv_bye"), customer.hangup("NORMAL_CLEARING")])[1]
    assert simple(sent) == [("newCall", {**OUT, "user": "1001"}), ("answer", OUT),
                            ("hangup", {**OUT, "cause": "normalClearing"})]


def test_long_queue_call_state_stays_small():
    a = synth.caller(did="492214710340")
    tracker, _ = run([a.create(), a.execute("callcenter", "support@default"), a.answer()])
    for _ in range(300):
        leg = synth.agent_leg(a, "1001", context="default")
        run([leg.create(), leg.hangup("NO_ANSWER", "send_cancel")], tracker)
    call = tracker.calls[a.uuid]
    assert len(call.legs) == 1 and len(call.to_json()) < 2000


class RecordingHeaders(dict):
    """Headers that remember which names were read."""

    read: set = set()

    def get(self, name, default=None):
        RecordingHeaders.read.add(name)
        return super().get(name, default)

    def __getitem__(self, name):
        RecordingHeaders.read.add(name)
        return super().__getitem__(name)


def test_the_tracker_reads_only_the_headers_the_service_parses():
    from fs_zammad.calls import HEADER_PREFIXES_READ, HEADERS_READ
    from fs_zammad.wire import HeaderFilter

    RecordingHeaders.read = set()
    keep = HeaderFilter(HEADERS_READ, HEADER_PREFIXES_READ)
    for path in sorted(FIXTURES.glob("*/*/events*.txt")):
        events = list(iter_capture(path.read_bytes()))
        full = run([RecordingHeaders(h) for h in events])[1]
        # the same stream parsed the service's way: only the headers read
        filtered = list(iter_capture(path.read_bytes(), keep))
        assert run(filtered)[1] == full, path
    unexpected = {n for n in RecordingHeaders.read
                  if n not in HEADERS_READ and not n.startswith(HEADER_PREFIXES_READ)}
    assert not unexpected


DIRECTION_CASES = [
    # (story, context the call enters in, leg FreeSWITCH creates, zammad_direction, direction sent)
    ("carrier call to an agent", "public", "agent", "", "in"),
    ("carrier call forwarded out", "public", "carrier", "", "in"),
    ("agent dials out through the gateway", "default", "carrier", "", "out"),
    ("agent calls agent", "default", "agent", "", None),
    ("agent calls agent, dialplan says out", "default", "agent", "out", "out"),
    ("agent calls agent, dialplan says in", "default", "agent", "in", "in"),
    ("carrier call the dialplan ignores", "public", "agent", "ignore", None),
    ("agent dials out, dialplan ignores", "default", "carrier", "ignore", None),
]


@pytest.mark.parametrize("story,context,leg,forced,expected", DIRECTION_CASES,
                         ids=[c[0] for c in DIRECTION_CASES])
def test_direction(story, context, leg, forced, expected):
    a = synth.caller() if context == "public" else synth.agent_call()
    if forced:
        a.set(zammad_direction=forced)
    b = synth.agent_leg(a, "1002", context=context) if leg == "agent" else synth.carrier_leg(a)
    sent = run([a.create(), a.execute("bridge"), b.create(), b.hangup("NO_ANSWER"),
                a.hangup("NO_ANSWER", "send_refuse")])[1]
    assert {e.get("direction") for e in sent} == ({expected} if expected else set())
    if expected:
        assert [e.name for e in sent] == ["newCall", "hangup"]


def test_external_contexts_are_configurable():
    a = synth.agent_call()
    rules = TrackerRules(external_contexts=frozenset({"public", "default"}))
    sent = run([a.create(), a.execute("bridge"), a.hangup("NORMAL_CLEARING", "recv_cancel")],
               CallTracker(rules))[1]
    assert [e.get("direction") for e in sent] == ["in", "in"]


def test_every_header_name_in_the_tracker_source_is_parsed():
    """Static twin of the replay check above: branches no capture reaches count too."""
    import re

    from fs_zammad import calls
    from fs_zammad.calls import HEADER_PREFIXES_READ, HEADERS_READ

    source = Path(calls.__file__).read_text()
    names = set(re.findall(r'"((?:[A-Z][a-z]+-)+[A-Z][A-Za-z]*|variable_[a-z_]+)"', source))
    missing = {n for n in names if n not in HEADERS_READ and not n.startswith(HEADER_PREFIXES_READ)}
    assert not missing


@pytest.mark.parametrize("direction, answer_sent, cause, once", [
    ("in", False, "cancel", True),           # missed: a second hangup would mark it done
    ("in", False, "busy", True),
    ("in", False, "noAnswer", True),
    ("in", False, "normalClearing", True),   # unanswered, whatever the cause string says
    ("in", False, "forwarded", False),       # forwarded is never missed
    ("in", True, "normalClearing", False),   # answered (a person or the mailbox)
    ("in", True, "voicemail", False),
    ("out", False, "busy", False),           # outbound calls are always done
    ("out", True, "normalClearing", False),
])
def test_which_hangups_a_second_copy_would_harm(direction, answer_sent, cause, once):
    assert hangup_sent_once(direction, answer_sent, cause) is once
