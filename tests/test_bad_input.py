"""Bad input from FreeSWITCH stays small and harmless (issue 11, point 8).

The real process against a fake FreeSWITCH that sends frames no event socket
would: a line that never ends, a Content-Length of gigabytes, a frame head
that never ends. Each is a framing error: one log line, the connection is
rebuilt, memory stays bounded, the calls around it end right in Zammad.
"""

import itertools
from pathlib import Path

import pytest

from fs_zammad.calls import HEADER_PREFIXES_READ, HEADERS_READ
from fs_zammad.esl import MAX_EVENT_BODY, MAX_HEAD_LINE, MAX_HEAD_LINES
from fs_zammad.wire import MAX_VALUE, HeaderFilter, OutOfStep, parse_event_plain
from tests.support.fake_freeswitch import frame_event, iter_frames, serialize_event
from tests.test_e2e import answered, emit_all, sentinel_call
from tests.test_faults import answered_call, assert_caller_log, channels_json, missed_call

FIXTURES = Path(__file__).parent / "fixtures"
MB = 1024 * 1024


def _repeat(chunk: bytes, total: int):
    """``total`` bytes as chunks of ``chunk`` (None: endless)."""
    counter = itertools.count() if total is None else range(total // len(chunk))
    return (chunk for _ in counter)


def _endless_head():
    line = b"X-Padding: " + b"a" * 100 + b"\n"
    yield b"Content-Type: text/event-plain\n"
    yield from _repeat(line * 600, None)


def _body_over_the_bound():
    yield b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % (MAX_EVENT_BODY + 1)
    yield b"Event-Name: CHANNEL_CREATE\n" + b"X" * MAX_EVENT_BODY


# name -> (bytes FreeSWITCH sends, what the log line says)
BAD_STREAMS = {
    "64 MB line without a newline": (lambda: _repeat(b"A" * MB, 64 * MB),
                                     f"longer than {MAX_HEAD_LINE} bytes"),
    "64 MB head line inside a frame": (
        lambda: itertools.chain([b"Content-Type: text/event-plain\nX-Big: "],
                                _repeat(b"b" * MB, 64 * MB)),
        f"longer than {MAX_HEAD_LINE} bytes"),
    "huge Content-Length": (
        lambda: itertools.chain([b"Content-Length: 4000000000\nContent-Type: text/event-plain\n\n"],
                                _repeat(b"c" * MB, 64 * MB)),
        "Content-Length 4000000000 over"),
    "Content-Length of 30 digits": (
        lambda: [b"Content-Length: " + b"9" * 30 + b"\nContent-Type: text/event-plain\n\n"],
        "bad Content-Length"),
    "body one byte over the bound": (_body_over_the_bound, "over the"),
    "api/response of 4 GB": (
        lambda: itertools.chain([b"Content-Type: api/response\nContent-Length: 4000000000\n\n"],
                                _repeat(b"d" * MB, 64 * MB)),
        "Content-Length 4000000000 over"),
    "frame head with endless lines": (_endless_head, f"more than {MAX_HEAD_LINES} lines"),
}


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM), in MB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


@pytest.mark.parametrize("case", sorted(BAD_STREAMS))
def test_oversized_frames_rebuild_the_connection_with_bounded_memory(
        case, start_service, fake_fs, zammad):
    stream, reason = BAD_STREAMS[case]
    service = start_service()
    talking, agent, start, end = answered_call("4931100000")
    emit_all(fake_fs, start)
    zammad.wait_for(lambda: len(answered(zammad, talking.uuid)) == 2)
    # The call is still up when the connection comes back.
    fake_fs.api_responses["show channels as json"] = channels_json((talking, None, True),
                                                                   (agent, talking, True))
    before = fake_fs.connections_total

    fake_fs.send_raw(stream())

    service.wait_for_log("lost FreeSWITCH.*framing error")
    fake_fs.wait_for_subscription(after=before, timeout=15)
    missed, missed_events = missed_call("4931200000")
    emit_all(fake_fs, end + missed_events)
    sentinel = sentinel_call(fake_fs, zammad)
    zammad.wait_for(lambda: sum(e["hangups"] for e in zammad.caller_log()) >= 3)
    assert_caller_log(zammad, {talking.uuid: ("normalClearing", False, "1001"),
                               missed.uuid: ("cancel", True, None),
                               sentinel: ("cancel", True, None)})
    framing = [line for line in service.lines if "framing error" in line]
    assert len(framing) == 1 and reason in framing[0], framing
    assert "Traceback" not in service.log
    # A generous bound: the service idles at ~40 MB; reading the 64 MB line
    # whole cost 230 MB before the bounds.
    assert peak_rss_mb(service.proc.pid) < 120


def _heartbeat() -> bytes:
    return serialize_event([("Event-Name", "HEARTBEAT"), ("Core-UUID", "c0re"),
                            ("Event-Info", "System Ready")])


def _length_off_by(delta: int):
    """A HEARTBEAT whose Content-Length says ``delta`` bytes more (or fewer) than it has."""
    def frame(_next: bytes) -> bytes:
        body = _heartbeat()
        return b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % (len(body) + delta) \
            + body
    return frame


# name -> the bad frame, given the frame that follows it: what is read after it is out of step
OUT_OF_STEP = {
    "Content-Length 5 too long": _length_off_by(5),
    "Content-Length 40 too long": _length_off_by(40),
    "Content-Length a whole frame too long": lambda nxt: _length_off_by(len(nxt))(nxt),
    "Content-Length the next frame's head too long":
        lambda nxt: _length_off_by(nxt.index(b"\n\n") + 2)(nxt),
    "Content-Length 2 too short": _length_off_by(-2),  # (1 too short leaves a blank line)
    "Content-Length 7 too short": _length_off_by(-7),
    "a head without Content-Type": lambda _next: b"Content-Length: 3\n\nabc",
    "an event without Content-Length": lambda _next: b"Content-Type: text/event-plain\n\n"
                                                     + _heartbeat(),
}


@pytest.mark.parametrize("inner", [None, "+OK 7d3f\n", "-ERR no reply\n\n", "x" * 5000, ""])
def test_an_event_ends_where_its_length_says_also_with_a_body_of_its_own(inner):
    """An event ends at its first blank line, or (BACKGROUND_JOB and the like) with its
    own body: in step. Any bytes more (down to a whole next frame) or fewer: out of step."""
    from fs_zammad.esl import _in_step, parse_one_event

    event = serialize_event([("Event-Name", "BACKGROUND_JOB"), ("Job-UUID", "j1")], inner)
    assert _in_step(event)
    following = frame_event(_heartbeat())
    for cut in range(1, len(following) + 1):
        more = event + following[:cut]
        if more.endswith(b"\n\n"):  # the next frame's head or whole event: caught elsewhere
            continue
        assert not _in_step(more), cut
    with pytest.raises(OutOfStep):   # a whole event swallowed: two Event-Names
        parse_one_event(event + following, None)
    # its own body may hold an event's text (uuid_dump run by bgapi): one event all the same
    dump = serialize_event([("Event-Name", "BACKGROUND_JOB"), ("Job-UUID", "j2")],
                           serialize_event([("Event-Name", "CHANNEL_DATA")]).decode())
    assert _in_step(dump) and parse_one_event(dump, None)["Event-Name"] == "BACKGROUND_JOB"
    for cut in range(2, min(len(event), 200)):
        less = event[:-cut]
        assert not _in_step(less) or less.endswith(b"\n\n") and not inner, cut


@pytest.mark.parametrize("case", OUT_OF_STEP)
def test_a_stream_out_of_step_rebuilds_the_connection_and_no_call_is_lost(
        case, start_service, fake_fs, zammad):
    """A frame whose length is wrong puts what follows out of step: the hangup right
    after it must not be skipped as a malformed event. The connection is rebuilt and
    the resync (the call is no longer up) ends the call in Zammad."""
    service = start_service()
    missed, events = missed_call("4931400000")
    emit_all(fake_fs, events[:-1])
    zammad.wait_for(lambda: [r.event for r in answered(zammad, missed.uuid)] == ["newCall"])
    fake_fs.api_responses["show channels as json"] = channels_json()  # nothing is up
    before = fake_fs.connections_total
    hangup = frame_event(serialize_event(list(events[-1].items())
                                         if hasattr(events[-1], "items") else events[-1]))
    fake_fs.send_raw(OUT_OF_STEP[case](hangup) + hangup)
    service.wait_for_log("lost FreeSWITCH.*framing error")
    fake_fs.wait_for_subscription(after=before, timeout=15)
    zammad.wait_for(lambda: [e for e in zammad.caller_log() if e["callId"] == missed.uuid
                             and e["hangups"]], timeout=15)
    sentinel = sentinel_call(fake_fs, zammad)
    zammad.wait_for(lambda: [e for e in zammad.caller_log() if e["callId"] == sentinel
                             and e["hangups"]])
    ended = {e["callId"]: e for e in zammad.caller_log()}
    assert ended[missed.uuid]["hangups"] == 1 and ended[sentinel]["hangups"] == 1, ended
    assert "Traceback" not in service.log


def test_numbers_with_control_characters_or_overlong_reach_zammad_cleaned(start_service,
                                                                          fake_fs, zammad):
    service = start_service()
    calls = []
    for i in range(3):
        call, events = missed_call(f"4930\x00{i}\n\x1b[2J" + "7" * 150)
        emit_all(fake_fs, events)
        calls.append(call)
    zammad.wait_for(lambda: sum(e["hangups"] for e in zammad.caller_log()) == 3)
    assert_caller_log(zammad, {call.uuid: ("cancel", True, None) for call in calls})
    numbers = {e["callId"]: e["from"] for e in zammad.caller_log()}
    assert numbers == {call.uuid: f"4930{i}[2J" + "7" * 92 for i, call in enumerate(calls)}
    cleaned = [line for line in service.lines if "sent to Zammad cleaned" in line]
    assert len(cleaned) == 2, cleaned   # from: control characters, from: too long; once each
    assert "Traceback" not in service.log


@pytest.mark.parametrize("keep", [None, HeaderFilter(HEADERS_READ, HEADER_PREFIXES_READ)])
@pytest.mark.parametrize("name", ["Caller-Caller-ID-Number", "variable_zammad_user",
                                  "Application-Data"])
def test_a_huge_header_value_is_kept_small(keep, name):
    """A value within the body bound but far beyond any field: an event queued
    or a call saved holds at most MAX_VALUE of it."""
    body = (f"Event-Name: CHANNEL_CREATE\nUnique-ID: u-1\n{name}: " + "%41" * 300_000
            + "\nCall-Direction: inbound\n")
    headers = parse_event_plain(body, keep)
    assert len(headers[name]) <= MAX_VALUE
    assert (headers["Unique-ID"], headers["Call-Direction"]) == ("u-1", "inbound")


@pytest.mark.parametrize("order", ["hangups only", "hangups reversed", "call replayed"])
def test_late_or_replayed_events_make_no_second_call(order, start_service, fake_fs, zammad):
    """The recorded answered call S1, fed to the real service as only its
    hangups (A-leg, then the agent leg), the other way round, or whole twice."""
    frames = iter_frames(FIXTURES / "callcentre" / "S1" / "events_all.txt")
    events = [raw for headers, raw in frames if headers.get("Event-Name")]
    hangups = [raw for headers, raw in frames
               if headers.get("Event-Name") == "CHANNEL_HANGUP_COMPLETE"]
    stream = {"hangups only": hangups, "hangups reversed": hangups[::-1],
              "call replayed": events + events}[order]
    service = start_service()
    for raw in stream:
        fake_fs.send_raw(raw)
    sentinel = sentinel_call(fake_fs, zammad)
    a_leg = next(h["Unique-ID"] for h, _ in frames if h.get("Event-Name") == "CHANNEL_CREATE")
    zammad.wait_for(lambda: any(r.event == "hangup" and r.status for r in zammad.requests_for(a_leg)))
    log = {e["callId"]: e for e in zammad.caller_log()}
    assert set(log) == {a_leg, sentinel}
    assert (log[a_leg]["to"], log[a_leg]["hangups"]) == ("492214710334", 1)
    if order == "call replayed":
        assert (log[a_leg]["answered_by"], log[a_leg]["missed"]) == ("1001", False)
    assert "Traceback" not in service.log
