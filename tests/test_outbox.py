"""The SQLite outbox: order, set-aside states, crash safety, the cap."""

from fs_zammad.calls import ZammadEvent
from fs_zammad.outbox import CUT_OFF, Outbox


def ev(call_id, name, instance=""):
    return ZammadEvent(call_id, (("event", name), ("direction", "in"), ("callId", call_id)),
                       instance)


def heads(outbox, **kw):
    return [(r.call_id, r.event) for r in outbox.ready(10, **kw)]


def test_first_pending_event_of_each_call_in_arrival_order(tmp_path):
    box = Outbox(tmp_path / "o.sqlite3")
    box.record([ev("a", "newCall"), ev("b", "newCall"), ev("a", "hangup"), ev("c", "newCall", "acme")])
    assert heads(box) == [("a", "newCall"), ("b", "newCall")]
    assert heads(box, instance="acme") == [("c", "newCall")]
    first = box.ready(1)[0]
    assert heads(box, skip_ids=[first.id]) == [("b", "newCall")]  # a's hangup waits behind
    box.delivered(first.id)
    assert heads(box) == [("b", "newCall"), ("a", "hangup")]
    assert box.pending == 3


def test_failure_holds_the_rest_of_the_call_and_retry_replays_in_order(tmp_path):
    box = Outbox(tmp_path / "o.sqlite3")
    box.record([ev("a", "newCall"), ev("a", "answer")])
    box.fail(box.ready(1)[0], "HTTP 401: Invalid token")
    box.record([ev("a", "hangup")])               # arrives after the failure: held too
    assert heads(box) == [] and box.pending == 0
    assert [r[3:5] for r in box.failed_rows()] == [("newCall", "failed"), ("answer", "failed"),
                                                   ("hangup", "failed")]
    assert box.retry_failed() == 3
    assert heads(box) == [("a", "newCall")]


def test_unsure_hangup_is_only_retried_when_asked(tmp_path):
    box = Outbox(tmp_path / "o.sqlite3")
    box.record([ev("a", "hangup"), ev("b", "newCall")])
    box.set_unsure(box.ready(1)[0], "may have reached Zammad")
    box.fail(box.ready(1)[0], "HTTP 422: x")
    assert box.retry_failed() == 1                # b's newCall only
    assert heads(box) == [("b", "newCall")]
    assert box.retry_failed(call_id="a", unsure=True) == 1
    assert ("a", "hangup") in heads(box)


def test_hangup_cut_off_by_a_crash_becomes_unsure(tmp_path):
    path = tmp_path / "o.sqlite3"
    box = Outbox(path)
    box.record([ev("a", "hangup"), ev("b", "hangup")])
    box.mark_sending(box.ready(1)[0].id)          # then kill -9: no outcome recorded
    box.close()
    reader = Outbox.for_cli(path)                 # `outbox list` meanwhile: changes nothing
    assert reader.failed_rows() == [] and reader.counts() == {"pending": 2}
    reopened = Outbox(path)
    assert heads(reopened) == [("b", "hangup")]   # never handed out again, even before recovery
    assert reopened.recover_cut_off() == 1        # the service, once, holding the lock
    assert heads(reopened) == [("b", "hangup")] and reopened.pending == 1
    assert [(r[1], r[4], r[6]) for r in reopened.failed_rows()] == [("a", "unsure", CUT_OFF)]
    assert reader.counts() == {"pending": 1, "unsure": 1}


def test_cap_refuses_new_calls_but_not_the_end_of_known_ones(tmp_path):
    box = Outbox(tmp_path / "o.sqlite3", max_events=2)
    assert box.record([ev("a", "newCall"), ev("b", "newCall")]) == 0
    assert box.record([ev("c", "newCall"), ev("a", "hangup"), ev("c", "hangup")]) == 2
    assert box.pending == 3 and box.refused == 2
    assert {r.call_id for r in box.ready(10)} == {"a", "b"}


def test_background_checkpoint_keeps_the_wal_small_under_steady_writes(tmp_path):
    path = tmp_path / "o.sqlite3"
    box = Outbox(path, background_checkpoint=True)
    for i in range(12000):
        box.record([ev(f"call-{i}", "newCall")])
        box.delivered(box.ready(1)[0].id)
    wal = path.with_name(path.name + "-wal")
    assert wal.stat().st_size > 40_000_000   # no automatic checkpoint any more
    box.checkpoint()
    assert wal.stat().st_size == 0
    box.close()


def test_writes_go_on_while_a_checkpoint_truncates_in_another_thread(tmp_path, monkeypatch):
    import threading
    import time

    from fs_zammad import outbox

    monkeypatch.setattr(outbox, "WAL_RESET_FRAMES", 50)   # truncate often
    box = Outbox(tmp_path / "o.sqlite3", background_checkpoint=True)
    stop = threading.Event()
    errors = []

    def checkpoints():
        while not stop.is_set():
            try:
                box.checkpoint()
            except Exception as exc:  # noqa: BLE001 - any error fails the test below
                errors.append(exc)
            time.sleep(0.005)

    thread = threading.Thread(target=checkpoints)
    thread.start()
    try:
        for i in range(1500):
            box.record([ev(f"call-{i}", "newCall")], [(f"call-{i}", "{}")])
            box.delivered(box.ready(1)[0].id)
    finally:
        stop.set()
        thread.join()
    assert errors == [] and box.pending == 0


def test_once_flag_is_stored_and_read_back(tmp_path):
    box = Outbox(tmp_path / "o.sqlite3")
    once = ZammadEvent("a", (("event", "hangup"), ("direction", "in"), ("callId", "a")), "", True)
    box.record([ev("a", "newCall"), once, ev("b", "newCall")])
    assert [(r.call_id, r.event, r.once) for r in box.ready(10)] == [
        ("a", "newCall", False), ("b", "newCall", False)]
    box.delivered(box.ready(1)[0].id)
    assert [(r.event, r.once) for r in box.ready(10) if r.call_id == "a"] == [("hangup", True)]


def test_outbox_from_before_the_once_column_treats_every_hangup_as_once(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("""CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT,
        call_id TEXT NOT NULL, instance TEXT NOT NULL DEFAULT '', event TEXT NOT NULL,
        fields TEXT NOT NULL, created REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
        next_at REAL NOT NULL DEFAULT 0, sending INTEGER NOT NULL DEFAULT 0,
        state TEXT NOT NULL DEFAULT 'pending', last_error TEXT);
        INSERT INTO outbox (call_id, event, fields, created) VALUES
            ('x', 'hangup', '[["event","hangup"]]', 1), ('y', 'newCall', '[["event","newCall"]]', 1);
    """)
    db.commit()
    db.close()
    box = Outbox(path)
    assert sorted((r.call_id, r.once) for r in box.ready(10)) == [("x", True), ("y", False)]
