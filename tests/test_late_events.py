"""Events of a call in any order, any subset, any number of times (issue 11, point 8).

Whatever part of a recorded call's events arrives, in whatever order and
however often (only the hangups, hangups first, the whole call replayed after
it ended), Zammad hears of at most one call per FreeSWITCH call, with the
A-leg's uuid as callId, and never an answer or hangup before its newCall;
also when the process restarts in between (kill -9: the state saved after
every event, finished legs included, is read back) or a resync lists legs of
a call already sent.
"""

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fs_zammad import calls as calls_module
from fs_zammad.calls import CallTracker, TrackerRules, channels_to_headers, saved_state
from fs_zammad.wire import iter_capture

FIXTURES = Path(__file__).parent / "fixtures"
EXTERNAL_DEFAULT = TrackerRules(external_contexts=frozenset({"public", "default"}))


def _recordings():
    """(name, events, rules): every recorded call, loopback ones also as external calls."""
    found = []
    for path in sorted((FIXTURES / "callcentre").glob("*/events_all.txt")):
        found.append((path.parent.name, list(iter_capture(path.read_bytes())), TrackerRules()))
    for path in sorted((FIXTURES / "loopback").glob("*/events.txt")):
        events = list(iter_capture(path.read_bytes()))
        found.append((path.parent.name, events, TrackerRules()))
        found.append((path.parent.name + "+external", events, EXTERNAL_DEFAULT))
    return found


RECORDINGS = _recordings()
TRACKED = ("CHANNEL_CREATE", "CHANNEL_EXECUTE", "CHANNEL_ANSWER", "CHANNEL_BRIDGE",
           "CHANNEL_HANGUP_COMPLETE")


def _channel_events(events):
    return [h for h in events if h.get("Event-Name") in TRACKED]


def _calls(events, rules) -> set[str]:
    """The recording's Zammad calls: the callIds the complete recording is sent
    with (in the call-centre recordings: the A-leg), else the leg created first.
    A loopback originated by the API has no A-leg: its -b half is the call."""
    sent = feed(events, rules)[1]
    if sent:
        return {e.call_id for e in sent}
    return {next(h["Unique-ID"] for h in events if h["Event-Name"] == "CHANNEL_CREATE")}


def feed(events, rules):
    """What Zammad is sent for ``events``, including the calls that expire later."""
    tracker = CallTracker(rules)
    sent = []
    for i, headers in enumerate(events):
        sent += tracker.handle(headers, 1000.0 + i)
    sent += tracker.expire(1000.0 + len(events) + rules.max_call_seconds + 1)
    return tracker, sent


def assert_one_call_at_most(sent, calls, label=""):
    """Only the recording's ``calls``, each newCall, answer, hangup at most once, in order."""
    why = (label, [(e.call_id, e.name) for e in sent])
    assert {e.call_id for e in sent} <= calls, why          # never a B-leg as a call
    for call_id in calls:
        names = [e.name for e in sent if e.call_id == call_id]
        assert names in ([], ["newCall"], ["newCall", "answer"], ["newCall", "hangup"],
                         ["newCall", "answer", "hangup"]), why


def _orders(events):
    """The named orders: (label, events)."""
    hangups = [h for h in events if h["Event-Name"] == "CHANNEL_HANGUP_COMPLETE"]
    others = [h for h in events if h["Event-Name"] != "CHANNEL_HANGUP_COMPLETE"]
    return [("only hangups", hangups), ("only hangups, reversed", hangups[::-1]),
            ("hangups first", hangups + others), ("reversed", events[::-1]),
            ("replayed after the end", events + events),
            ("hangups replayed", events + hangups), ("each twice", [h for h in events
                                                                    for _ in (1, 2)])]


@pytest.mark.parametrize("name,events,rules", RECORDINGS, ids=[r[0] for r in RECORDINGS])
def test_named_orders_never_make_a_second_call(name, events, rules):
    events = _channel_events(events)
    calls = _calls(events, rules)
    for label, order in _orders(events):
        tracker, sent = feed(order, rules)
        assert_one_call_at_most(sent, calls, label)
        assert tracker.calls == {}, label


@pytest.mark.parametrize("name,events,rules", RECORDINGS, ids=[r[0] for r in RECORDINGS])
def test_hangups_alone_make_at_most_the_one_call(name, events, rules):
    """The issue's example: only the HANGUP_COMPLETE events of a call never seen."""
    events = _channel_events(events)
    whole = [e.call_id for e in feed(events, rules)[1]]
    hangups = [h for h in events if h["Event-Name"] == "CHANNEL_HANGUP_COMPLETE"]
    sent = feed(hangups, rules)[1]
    assert_one_call_at_most(sent, _calls(events, rules))
    if sent:    # the one call, and it ends
        assert {e.call_id for e in sent} <= set(whole)
        assert sent[0].name == "newCall" and sent[-1].name == "hangup"


@pytest.mark.parametrize("scenario", ["S1", "S13", "S15"])
def test_hangups_of_an_answered_call_are_one_call_to_the_number_dialled(scenario):
    """Today's bug: the A-leg's and the agent leg's hangups made two missed
    calls, one of them "to 1001" (the agent leg as a call of its own)."""
    events = _channel_events(next(e for n, e, _ in RECORDINGS if n == scenario))
    whole = feed(events, TrackerRules())[1]
    hangups = [h for h in events if h["Event-Name"] == "CHANNEL_HANGUP_COMPLETE"]
    for order in (hangups, hangups[::-1]):
        sent = feed(order, TrackerRules())[1]
        assert [e.name for e in sent] == ["newCall", "hangup"]
        assert {e.call_id for e in sent} == {whole[0].call_id}
        assert sent[0].get("to") == whole[0].get("to") != "1001"


@st.composite
def shuffled_story(draw):
    """A recording and any sequence of its events: subset, reordered, repeated."""
    name, events, rules = draw(st.sampled_from(RECORDINGS))
    events = _channel_events(events)
    picks = draw(st.lists(st.integers(0, len(events) - 1), max_size=2 * len(events)))
    return name, events, [events[i] for i in picks], rules


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shuffled_story())
def test_any_order_subset_or_repeat_never_makes_a_second_call(story):
    name, events, order, rules = story
    assert_one_call_at_most(feed(order, rules)[1], _calls(events, rules))


class SavedCalls:
    """The outbox's ``calls`` and ``finished`` tables as the service keeps them:
    the tracker's ``dirty_rows`` and ``take_finished`` written after every event
    (the latest FINISHED_MEMORY finished calls kept), read back at a restart."""

    def __init__(self):
        self.rows: dict[str, str] = {}
        self.finished: list[str] = []
        self.writes = 0

    def save(self, tracker):
        upserts, deletes = tracker.dirty_rows()
        finished = tracker.take_finished()
        self.rows.update(upserts)
        for call_id in deletes:
            self.rows.pop(call_id, None)
        self.finished = (self.finished + [legs for _, legs in finished])[
            -calls_module.FINISHED_MEMORY:]
        self.writes += len(upserts) + len(deletes) + len(finished)
        tracker.dirty.clear()

    def feed(self, tracker, events, start=1000.0):
        sent = []
        for i, headers in enumerate(events):
            sent += tracker.handle(headers, start + i)
            self.save(tracker)
        return sent

    def restart(self, rules):
        return CallTracker(rules, [saved_state(text)
                                   for text in [*self.rows.values(), *self.finished]])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shuffled_story(), st.lists(st.integers(0, 40), max_size=3), st.integers(0, 80))
def test_reconnects_or_a_restart_in_between_never_make_a_second_call(story, gaps, restart):
    """A reconnect (FreeSWITCH lists no live channel: every known leg ended
    unseen) anywhere in the stream, and the process restarting (kill -9;
    the state saved after every event is read back) anywhere, then the rest
    of the events."""
    name, events, order, rules = story
    saved, tracker, sent = SavedCalls(), CallTracker(rules), []
    for i, headers in enumerate(order):
        if i == restart:
            tracker = saved.restart(rules)
        if i in gaps:
            sent += tracker.reconcile([], 1000.0 + i)
        sent += tracker.handle(headers, 1000.0 + i)
        saved.save(tracker)
    sent += tracker.expire(1000.0 + len(order) + rules.max_call_seconds + 1)
    assert_one_call_at_most(sent, _calls(events, rules))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shuffled_story())
def test_events_after_the_whole_call_change_nothing(story):
    """The complete call, then any of its events again: Zammad gets nothing more."""
    name, events, late, rules = story
    tracker, sent = feed(events, rules)
    more = []
    for i, headers in enumerate(late):
        more += tracker.handle(headers, 5000.0 + i)
    more += tracker.expire(5000.0 + len(late) + rules.max_call_seconds + 1)
    assert more == []
    assert tracker.calls == {}


# S25, follow-me: the caller's call 26e4… rings 1001, then bridges to the -a half
# of a loopback whose -b half 1a49… bridges the carrier leg 9cd0… to the mobile.
FOLLOW_ME = "26e4d685-76b5-4836-907a-81bfc68188b7"
LOOPBACK_B = "1a4974db-0833-4434-9d8b-81e2b11166a3"
CARRIER_LEG = "9cd024b4-1d20-4345-a1cf-a135c2255fc7"


def _s25():
    return _channel_events(next(e for n, e, _ in RECORDINGS if n == "S25"))


def test_follow_me_hangups_in_their_order_are_the_callers_call_only():
    """The carrier leg's hangup comes after the caller's call ended and names
    only the -b half; the -b half's own hangup then names the caller's call
    (other_loopback_from_uuid): the carrier leg's placeholder is dropped."""
    hangups = [h for h in _s25() if h["Event-Name"] == "CHANNEL_HANGUP_COMPLETE"]
    assert [h["Unique-ID"] for h in hangups][-2:] == [CARRIER_LEG, LOOPBACK_B]
    tracker, sent = feed(hangups, TrackerRules())
    assert [(e.call_id, e.name) for e in sent] == [(FOLLOW_ME, "newCall"), (FOLLOW_ME, "hangup")]
    assert sent[0].get("direction") == "in" and tracker.calls == {}


@pytest.mark.parametrize("before", [[], ["26e4 whole"]])
def test_only_the_carrier_leg_of_a_loopback_is_never_a_call(before):
    """Nothing links the carrier leg's hangup to the caller's call but
    ``Other-Leg-Channel-Name: loopback/…-b``: it ends (expiry) without a
    Zammad call, whether or not the caller's call was seen."""
    events = _s25()
    stream = [h for h in events if h["Unique-ID"] == FOLLOW_ME] if before else []
    stream += [h for h in events if h["Unique-ID"] == CARRIER_LEG
               and h["Event-Name"] == "CHANNEL_HANGUP_COMPLETE"]
    tracker, sent = feed(stream, TrackerRules())
    assert {e.call_id for e in sent} == ({FOLLOW_ME} if before else set())
    assert tracker.calls == {}
    # ...and a reconnect that finds the -b half gone ends it the same way.
    tracker = CallTracker(TrackerRules())
    assert tracker.handle(stream[-1], 1000.0) == []
    assert tracker.reconcile([], 1001.0) == [] and tracker.calls == {}


@pytest.mark.parametrize("first", ["carrier leg", "carrier leg and -a half"])
def test_follow_me_legs_seen_before_the_loopback_half_join_the_callers_call(first):
    """The carrier leg's events (and the -a half's) overtake the -b half's:
    they wait for it, and when its event names the caller's call they join
    it: the same Zammad call as in the recorded order, forwarded to the mobile."""
    from tests.test_calls import RECORDED, simple
    events = _s25()
    early = {CARRIER_LEG} | ({"574464c5-dc29-45dd-9359-6b7d4d14b099"} if "-a" in first else set())
    order = [h for h in events if h["Unique-ID"] in early] + \
            [h for h in events if h["Unique-ID"] not in early]
    tracker, sent = feed(order, TrackerRules())
    assert simple(sent) == RECORDED["S25"]
    assert {e.call_id for e in sent} == {FOLLOW_ME} and tracker.calls == {}


# -- across a restart: the finished legs are saved with the calls -----------------


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shuffled_story())
def test_events_after_the_whole_call_and_a_restart_change_nothing(story):
    name, events, late, rules = story
    saved = SavedCalls()
    saved.feed(CallTracker(rules), events)
    tracker = saved.restart(rules)
    more = saved.feed(tracker, late, 5000.0)
    more += tracker.expire(5000.0 + len(late) + rules.max_call_seconds + 1)
    assert more == [] and tracker.calls == {}


def _rows_still_up(events, a_leg, with_a_leg):
    """`show channels as json` rows listing the call's legs as still up (FreeSWITCH
    lists a channel until it is destroyed, after its HANGUP_COMPLETE): the B-legs
    bridged to the A-leg, and the A-leg itself if ``with_a_leg``."""
    rows = []
    for headers in events:
        uuid = headers["Unique-ID"]
        if headers["Event-Name"] != "CHANNEL_CREATE" or (uuid == a_leg and not with_a_leg):
            continue
        rows.append({"uuid": uuid, "direction": headers["Call-Direction"],
                     "name": headers["Channel-Name"], "context": headers["Caller-Context"],
                     "cid_num": headers.get("Caller-Caller-ID-Number", ""),
                     "dest": headers.get("Caller-Destination-Number", ""),
                     "callstate": "ACTIVE", "call_uuid": a_leg})
    return rows


CALLCENTRE = [r for r in RECORDINGS if (FIXTURES / "callcentre" / r[0]).is_dir()]


@pytest.mark.parametrize("with_a_leg", [False, True], ids=["B-legs", "all legs"])
@pytest.mark.parametrize("name,events,rules", CALLCENTRE, ids=[r[0] for r in CALLCENTRE])
def test_a_resync_after_a_restart_listing_legs_of_a_sent_call_sends_nothing(
        name, events, rules, with_a_leg):
    """The call ended and was sent; the process restarts; FreeSWITCH still
    lists its legs, then their hangups arrive again and a later resync finds
    them gone. Without the saved finished legs this sent a newCall ("already
    exists") and a second hangup for the A-leg (a missed call then shows done)."""
    events = _channel_events(events)
    saved = SavedCalls()
    whole = saved.feed(CallTracker(rules), events)
    a_leg = next(h["Unique-ID"] for h in events if h["Event-Name"] == "CHANNEL_CREATE")
    rows = _rows_still_up(events, a_leg, with_a_leg)
    tracker = saved.restart(rules)
    more = tracker.reconcile(channels_to_headers(rows), 5000.0, known=set())
    more += saved.feed(tracker, [h for h in events if h["Event-Name"] ==
                                 "CHANNEL_HANGUP_COMPLETE"], 5001.0)
    more += tracker.reconcile([], 5100.0)
    more += tracker.expire(5100.0 + rules.max_call_seconds + 1)
    assert more == [], (name, [(e.call_id, e.name) for e in whole + more])
    assert tracker.calls == {}


def _missed_call_events(n):
    from tests.test_faults import missed_call
    return missed_call(f"49301{n:06d}")[1]


def test_finished_calls_saved_are_bounded_and_cost_one_write_per_call(monkeypatch):
    """Each event writes its call's row, as before; a finished call adds one row
    to the ``finished`` table, which keeps the latest FINISHED_MEMORY. After a
    restart the late events of the calls remembered change nothing."""
    from tests.test_faults import answered_call
    monkeypatch.setattr(calls_module, "FINISHED_MEMORY", 50)
    saved, tracker, events, stories = SavedCalls(), CallTracker(), 0, []
    for n in range(100):                         # two legs a call: the last 25 fit in memory
        _, _, start, end = answered_call(f"49301{n:06d}")
        sent = saved.feed(tracker, start + end)
        assert [e.name for e in sent] == ["newCall", "answer", "hangup"]
        events += len(start + end)
        stories.append(start + end)
    assert saved.writes == events + 100
    assert saved.rows == {} and len(saved.finished) == 50
    restarted = saved.restart(TrackerRules())
    assert restarted.dirty_rows() == ([], []) and restarted.take_finished() == []
    late = [headers for story in stories[-25:] for headers in story]
    assert saved.feed(restarted, late, 9000.0) == [] and restarted.calls == {}


def test_the_outbox_keeps_the_latest_finished_calls(tmp_path):
    from fs_zammad.outbox import Outbox

    box = Outbox(tmp_path / "o.sqlite3")
    for n in range(10):
        box.record([], finished_calls=[(f"c{n}", f'{{"call_id":"c{n}","finished":["l{n}"]}}')],
                   keep_finished=3)
    assert [json.loads(text)["call_id"] for text in box.load_finished()] == ["c7", "c8", "c9"]


def _ended_call(kind):
    """(call, its legs, events of the whole call, caller-log cause, missed)."""
    from tests import synth
    if kind == "missed inbound":
        a = synth.caller(cid="4931300000")
        b = synth.agent_leg(a, "1001")
        events = [a.create(), a.execute("bridge"), b.create(),
                  a.hangup("NORMAL_CLEARING", "recv_cancel"), b.hangup("ORIGINATOR_CANCEL")]
        return a, (a, b), events, "cancel", True
    a = synth.agent_call("1001")
    b = synth.carrier_leg(a)
    events = [a.create(), a.execute("bridge"), b.create(), b.answer(), a.answer(), a.bridge(b),
              a.hangup("NORMAL_CLEARING", "recv_bye"), b.hangup("NORMAL_CLEARING", "send_bye")]
    return a, (a, b), events, "normalClearing", False


@pytest.mark.parametrize("kind", ["missed inbound", "answered outbound"])
def test_kill_restart_and_a_resync_listing_the_legs_of_a_sent_call(kind, start_service,
                                                                  fake_fs, zammad):
    """The real process: a call ends and is sent, the process is killed (-9)
    and restarts while FreeSWITCH still lists the call's legs (a channel is
    listed until destroyed); the legs' hangups come again and a later resync
    finds them gone. Zammad keeps one call with one hangup (a second one
    would turn the missed call into a done one)."""
    from tests.test_e2e import emit_all, sentinel_call
    from tests.test_faults import channels_json
    call, (a, b), events, cause, missed = _ended_call(kind)
    service = start_service(ZAMMAD_CONCURRENCY="1")
    emit_all(fake_fs, events)
    # Killed once the hangup is out of the outbox (else the restart resends
    # it: another story, see test_faults.py).
    service.wait_for_log(rf"hangup callId={call.uuid} .*result=delivered")
    service.kill()
    fake_fs.api_responses["show channels as json"] = channels_json((a, None, True),
                                                                   (b, a, True))
    def after_the_resync():
        """Once FreeSWITCH answered `show channels` and a sentinel call went
        through, whatever follows is read after the resync's answer."""
        fake_fs.wait_until(lambda: fake_fs.api_calls.count("show channels as json") > listed)
        return sentinel_call(fake_fs, zammad)

    listed = fake_fs.api_calls.count("show channels as json")
    restarted = start_service(ZAMMAD_CONCURRENCY="1")
    sentinels = [after_the_resync()]
    emit_all(fake_fs, [h for h in events if h["Event-Name"] == "CHANNEL_HANGUP_COMPLETE"])
    fake_fs.api_responses["show channels as json"] = channels_json()
    listed = fake_fs.api_calls.count("show channels as json")
    fake_fs.drop()
    sentinels.append(after_the_resync())
    # One at a time, in order: once this one is in, what the resync owed is too.
    sentinels.append(sentinel_call(fake_fs, zammad))
    log = {e["callId"]: e for e in zammad.caller_log()}
    assert set(log) == {call.uuid, *sentinels}
    entry = log[call.uuid]
    assert (entry["state"], entry["hangups"], entry["cause"], entry["missed"]) == \
        ("hangup", 1, cause, missed), entry
    assert [r.event for r in zammad.requests_for(call.uuid)].count("newCall") == 1
    assert "Traceback" not in service.log + restarted.log
