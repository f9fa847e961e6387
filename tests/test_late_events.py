"""Events of a call in any order, any subset, any number of times (issue 11, point 8).

Whatever part of a recorded call's events arrives, in whatever order and
however often (only the hangups, hangups first, the whole call replayed after
it ended), Zammad hears of at most one call per FreeSWITCH call, with the
A-leg's uuid as callId, and never an answer or hangup before its newCall.
"""

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fs_zammad.calls import CallTracker, TrackerRules
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


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shuffled_story(), st.lists(st.integers(0, 40), max_size=3))
def test_reconnects_in_between_never_make_a_second_call(story, gaps):
    """A reconnect (FreeSWITCH lists no live channel: every known leg ended
    unseen) anywhere in the stream, then the rest of the events."""
    name, events, order, rules = story
    tracker, sent = CallTracker(rules), []
    for i, headers in enumerate(order):
        if i in gaps:
            sent += tracker.reconcile([], 1000.0 + i)
        sent += tracker.handle(headers, 1000.0 + i)
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
