"""The event socket's reader: events handled as they are read, and the batching signal.

fs_zammad.esl hands each event to the handler in the reader greenlet, as its
frame is read, and ``more_arrived`` tells the handler whether more of the
stream is already here, never waiting for it: the event path commits when it
says no, so that what arrived together shares one commit and nothing that
arrived alone waits. Tested over TCP against the fake FreeSWITCH.
"""

from __future__ import annotations

import random

import gevent
import pytest

from fs_zammad.esl import EslSupervisor
from tests.support.fake_freeswitch import FakeFreeSwitch, frame_event, serialize_event
from tests.support.service import ESL_PASSWORD


def event(n: int) -> bytes:
    return frame_event(serialize_event({"Event-Name": "CHANNEL_CREATE", "Unique-ID": f"u-{n}"}))


@pytest.fixture
def supervised():
    """An EslSupervisor in this process, connected to a fake FreeSWITCH over TCP; each
    event handled is recorded with the greenlet it ran in and what more_arrived said."""
    with FakeFreeSwitch(password=ESL_PASSWORD) as fake_fs:
        seen = []
        sup = EslSupervisor("127.0.0.1", fake_fs.port, ESL_PASSWORD, timeout=5,
                            events=("CHANNEL_CREATE",))
        sup.on_event = lambda headers: seen.append(
            (headers["Unique-ID"], gevent.getcurrent(), sup.more_arrived()))
        runner = gevent.spawn(sup.run)
        with gevent.Timeout(10):
            while not sup.connected:
                gevent.sleep(0.01)
        try:
            yield fake_fs, sup, seen
        finally:
            sup.stop()
            runner.join(timeout=5)


def wait_for(seen: list, count: int) -> None:
    with gevent.Timeout(10):
        while len(seen) < count:
            gevent.sleep(0.005)


def test_a_burst_is_one_batch_and_events_apart_are_each_their_own(supervised):
    fake_fs, sup, seen = supervised
    fake_fs.send_raw(b"".join(event(n) for n in range(6)))   # six frames, one write
    wait_for(seen, 6)
    for n in range(6, 9):                                    # three frames, one by one
        fake_fs.send_raw(event(n))
        wait_for(seen, n + 1)
    assert [uuid for uuid, _, _ in seen] == [f"u-{n}" for n in range(9)]
    assert [more for _, _, more in seen] == [True] * 5 + [False] * 4
    reader = sup._conn._receive_events_greenlet
    assert all(greenlet is reader for _, greenlet, _ in seen)   # handled as read


def test_a_frame_cut_in_two_waits_for_its_rest(supervised):
    """Half a frame is here: more has arrived (its rest is on its way); the event
    before it is handled, and the cut one once its rest comes."""
    fake_fs, sup, seen = supervised
    cut = event(1)
    fake_fs.send_raw(event(0) + cut[:30])
    wait_for(seen, 1)
    gevent.sleep(0.1)
    assert [(uuid, more) for uuid, _, more in seen] == [("u-0", True)]
    fake_fs.send_raw(cut[30:])
    wait_for(seen, 2)
    assert [(uuid, more) for uuid, _, more in seen] == [("u-0", True), ("u-1", False)]


def test_call_in_order_runs_behind_every_event_read(supervised):
    fake_fs, sup, seen = supervised
    fake_fs.send_raw(b"".join(event(n) for n in range(3)))
    wait_for(seen, 3)
    done = gevent.event.Event()
    sup.call_in_order(lambda: (seen.append(("function", None, None)), done.set()))
    assert done.wait(5)
    assert [uuid for uuid, _, _ in seen] == ["u-0", "u-1", "u-2", "function"]


@pytest.mark.parametrize("seed", range(6))
def test_frames_cut_anywhere_come_out_whole_in_order_and_the_last_says_no_more(supervised,
                                                                               seed):
    """A burst of frames written in random pieces, with pauses between some: every
    event is handled once, in order; "more arrived" is no only where the stream
    paused at a frame's end, and always for the last."""
    fake_fs, sup, seen = supervised
    rng = random.Random(seed)
    stream = b"".join(event(n) for n in range(8))
    ends = {len(b"".join(event(n) for n in range(k + 1))) for k in range(8)}
    cuts = sorted(rng.sample(range(1, len(stream)), 12))
    pauses = set()
    for start, stop in zip([0, *cuts], [*cuts, len(stream)]):
        fake_fs.send_raw(stream[start:stop])
        if rng.random() < 0.5 or stop == len(stream):
            gevent.sleep(0.05)   # the reader catches up: what it has is all there is
            pauses.add(stop)
    wait_for(seen, 8)
    assert [uuid for uuid, _, _ in seen] == [f"u-{n}" for n in range(8)]
    said_no = {stop for stop in ends if not seen[sorted(ends).index(stop)][2]}
    assert said_no <= pauses & ends
    assert not seen[-1][2]
