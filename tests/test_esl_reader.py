"""The event socket's reader: events handled as they are read, and the batching signal.

fs_zammad.esl hands each event to the handler in the reader greenlet, as its
frame is read, and ``more_arrived`` tells the handler whether more of the
stream is already here, never waiting for it: the event path commits when it
says no, so that what arrived together shares one commit and nothing that
arrived alone waits. Tested over TCP against the fake FreeSWITCH.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
import time

import gevent
import pytest

from fs_zammad import service as service_module
from fs_zammad.config import load_settings
from fs_zammad.esl import EslSupervisor
from tests.support.fake_freeswitch import frame_event, iter_frames, serialize_event
from tests.support.service import ESL_PASSWORD
from tests.test_calls import FIXTURES

COMMAND_REPLY = b"Content-Type: command/reply\nReply-Text: +OK\n\n"


def event(n: int) -> bytes:
    return frame_event(serialize_event({"Event-Name": "CHANNEL_CREATE", "Unique-ID": f"u-{n}"}))


def connected(sup: EslSupervisor) -> gevent.Greenlet:
    runner = gevent.spawn(sup.run)
    with gevent.Timeout(10):
        while not sup.connected:
            gevent.sleep(0.01)
    return runner


@pytest.fixture
def supervised(fake_fs):
    """An EslSupervisor in this process, connected to the fake FreeSWITCH (conftest's
    fake_fs) over TCP; each
    event handled is recorded with the greenlet it ran in and what more_arrived said,
    and the end of each frame that is no event with what more_arrived said then."""
    seen, frames = [], []
    sup = EslSupervisor("127.0.0.1", fake_fs.port, ESL_PASSWORD, timeout=5,
                        events=("CHANNEL_CREATE",))
    sup.on_event = lambda headers: seen.append(
        (headers["Unique-ID"], gevent.getcurrent(), sup.more_arrived()))
    sup.after_frame = lambda: frames.append(sup.more_arrived())
    runner = connected(sup)
    frames.clear()   # (the frames of auth and subscription)
    try:
        yield fake_fs, sup, seen, frames
    finally:
        sup.stop()
        runner.join(timeout=5)


def wait_for(seen: list, count: int) -> None:
    with gevent.Timeout(10):
        while len(seen) < count:
            gevent.sleep(0.005)


def test_a_burst_is_one_batch_and_events_apart_are_each_their_own(supervised):
    fake_fs, sup, seen, _ = supervised
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
    fake_fs, sup, seen, _ = supervised
    cut = event(1)
    fake_fs.send_raw(event(0) + cut[:30])
    wait_for(seen, 1)
    gevent.sleep(0.1)
    assert [(uuid, more) for uuid, _, more in seen] == [("u-0", True)]
    fake_fs.send_raw(cut[30:])
    wait_for(seen, 2)
    assert [(uuid, more) for uuid, _, more in seen] == [("u-0", True), ("u-1", False)]


@pytest.mark.parametrize("seed", range(6))
def test_frames_cut_anywhere_come_out_whole_in_order_and_the_last_says_no_more(supervised,
                                                                               seed):
    """A burst of frames written in random pieces, with pauses between some: every
    event is handled once, in order; "more arrived" is no only where the stream
    paused at a frame's end, and always for the last."""
    fake_fs, sup, seen, _ = supervised
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


def test_a_frame_that_is_no_event_still_ends_the_batch(supervised):
    """An event, then a command's reply in the same write: the event sees more, so
    the reader asks again after the reply (and only then), when nothing more has come."""
    fake_fs, sup, seen, frames = supervised
    fake_fs.send_raw(event(0) + COMMAND_REPLY)
    wait_for(seen, 1)
    with gevent.Timeout(5):
        while not frames:
            gevent.sleep(0.005)
    gevent.sleep(0.05)
    assert [more for _, _, more in seen] == [True]
    assert frames == [False]   # after the reply; the event's own look was on_event's


def test_more_arrived_outside_the_reader_says_no_and_leaves_the_stream_alone(supervised):
    fake_fs, sup, seen, _ = supervised
    gevent.sleep(0.05)                   # the reader waits on the socket now
    assert sup.more_arrived() is False   # not its greenlet: no read from here
    fake_fs.send_raw(event(0) + event(1))
    gevent.sleep(0)
    assert sup.more_arrived() is False
    wait_for(seen, 2)
    assert [(uuid, more) for uuid, _, more in seen] == [("u-0", True), ("u-1", False)]


def test_a_reset_seen_while_an_event_is_handled_ends_the_connection_with_its_reason(
        fake_fs, caplog):
    """The look for more meets the peer's RST: the handler is told no more (its batch
    is written at once), nothing raises into it, and the reconnect names the reset."""
    told = []

    def handle(headers):
        time.sleep(0.3)   # blocks the loop: the reset lands meanwhile
        told.append(sup.more_arrived())

    sup = EslSupervisor("127.0.0.1", fake_fs.port, ESL_PASSWORD, timeout=5,
                        events=("CHANNEL_CREATE",), on_event=handle)
    runner = connected(sup)
    try:
        with caplog.at_level(logging.WARNING, logger="fs_zammad.esl"):
            threading.Timer(0.1, fake_fs.drop, kwargs={"notice": False, "reset": True}).start()
            fake_fs.send_raw(event(0))
            with gevent.Timeout(10):
                while "lost FreeSWITCH" not in caplog.text:
                    gevent.sleep(0.01)
        assert told == [False]
        assert "ConnectionResetError" in caplog.text, caplog.text
        assert "could not process" not in caplog.text
    finally:
        sup.stop()
        runner.join(timeout=5)


def test_the_service_writes_a_call_whose_last_frame_is_followed_by_a_reply(tmp_path, fake_fs):
    """The service in this process, no checkpoint loop: a whole recorded call and a
    command's reply in one write. Its Zammad events are on disk only if the reader's
    look after the reply writes them (nothing else would)."""
    settings = load_settings({"FREESWITCH_HOST": "127.0.0.1", "FREESWITCH_PORT": str(fake_fs.port),
                              "FREESWITCH_PASSWORD": ESL_PASSWORD,
                              "ZAMMAD_CTI_URL": "http://127.0.0.1:9/api/v1/cti/tok",
                              "STATE_DIR": str(tmp_path / "state")})
    svc = service_module.Service(settings)   # no delivery, no checkpoint loop
    runner = connected(svc.esl)
    try:
        frames = iter_frames(FIXTURES / "callcentre" / "S1" / "events_all.txt")
        fake_fs.send_raw(b"".join(raw for headers, raw in frames if headers.get("Event-Name"))
                         + COMMAND_REPLY)
        with gevent.Timeout(10):   # (a mutation that drops the look waits here for good)
            while True:
                db = sqlite3.connect(svc.outbox.path)
                try:
                    events = [row[0] for row in db.execute("SELECT event FROM outbox ORDER BY id")]
                finally:
                    db.close()
                if events:
                    break
                gevent.sleep(0.01)
        assert events == ["newCall", "answer", "hangup"]
    finally:
        svc.esl.stop()
        runner.join(timeout=5)
        svc.outbox.close()
        svc.lock.release()
