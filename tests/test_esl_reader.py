"""The event socket's reader: events handled as they are read, and the batching signal.

fs_zammad.esl reads the socket through its own buffer (``_SocketReader``) and
hands each event to the handler in the reader greenlet. Two things rest on it:
frames come out exactly as a buffered file would give them, however the bytes
are cut by the network; and ``more_arrived`` says whether more of the stream
is already here, never waiting for it (the event path commits when it says
no, so what arrived together shares one commit and nothing else waits).
"""

from __future__ import annotations

import io

import gevent
import gevent.socket
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fs_zammad import esl
from fs_zammad.esl import EslSupervisor, _SocketReader
from tests.support.fake_freeswitch import FakeFreeSwitch, frame_event, serialize_event
from tests.support.service import ESL_PASSWORD

OPS = st.lists(st.one_of(st.tuples(st.just("readline"), st.integers(1, 40)),
                         st.tuples(st.just("read"), st.integers(0, 60))), max_size=40)


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=600).map(lambda b: b.replace(b"\x00", b"\n")),
       cuts=st.lists(st.integers(0, 600), max_size=8), chunk=st.integers(1, 70), ops=OPS)
def test_reads_give_what_a_buffered_file_gives_however_the_bytes_arrive(data, cuts, chunk,
                                                                        ops):
    """Any stream, written in any pieces, read by any mix of readline(limit) and
    read(n) through any read size: the same bytes as io.BufferedReader, then b"" at EOF."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(esl, "READ_CHUNK", chunk)
        reads_like_a_buffered_file(data, cuts, ops)


def reads_like_a_buffered_file(data: bytes, cuts: list, ops: list) -> None:
    ours, theirs = gevent.socket.socketpair()
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    for start, end in zip(bounds, bounds[1:]):
        theirs.sendall(data[start:end])
    theirs.close()
    reader, reference = _SocketReader(ours), io.BufferedReader(io.BytesIO(data))
    for op, size in [*ops, ("read", len(data) + 1), ("readline", 5)]:
        assert getattr(reader, op)(size) == getattr(reference, op)(size), (op, size)
    ours.close()


def test_more_arrived_never_waits_and_says_what_is_here():
    ours, theirs = gevent.socket.socketpair()
    reader = _SocketReader(ours)
    with gevent.Timeout(1):
        assert not reader.more_arrived()        # nothing sent: no, at once
        theirs.sendall(b"Content-Type: x\n\n")
        assert reader.more_arrived()            # in the kernel: taken, yes
        assert reader.readline(100) == b"Content-Type: x\n"
        assert reader.more_arrived()            # buffered: yes
        assert reader.readline(100) == b"\n"
        assert not reader.more_arrived()        # all handed out: no
        theirs.close()
        assert not reader.more_arrived()        # EOF: nothing more will come
        assert reader.readline(100) == b""
    ours.close()


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
