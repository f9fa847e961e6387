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


def test_drop_forgets_unsure_hangups_only(tmp_path):
    box = Outbox(tmp_path / "o.sqlite3")
    box.record([ev("a", "hangup"), ev("b", "hangup")])
    box.set_unsure(box.ready(1)[0], "may have reached Zammad")
    box.set_unsure(box.ready(1)[0], "may have reached Zammad")
    box.record([ev("a", "ticket"), ev("c", "newCall")])  # a's voicemail job and c's newCall:
    box.fail(box.ready(1)[0], "HTTP 422: x")              # both refused
    box.fail(box.ready(1)[0], "HTTP 422: x")
    box.record([ev("d", "newCall")])                     # pending
    assert box.drop_unsure(call_id="c") == 0             # refused: for retry, never dropped
    assert box.drop_unsure(call_id="a") == 1
    assert [(r[1], r[3], r[4]) for r in box.failed_rows()] == [
        ("b", "hangup", "unsure"), ("a", "ticket", "failed"), ("c", "newCall", "failed")]
    failed_ids = [r[0] for r in box.failed_rows() if r[4] == "failed"]
    assert box.drop_unsure(ids=failed_ids) == 0 and box.drop_unsure() == 1
    assert box.counts() == {"pending": 1, "failed": 2}


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


# -- a disk that does not take writes (in-process; tests/test_outbox_faults.py uses a tmpfs) --

import logging  # noqa: E402
import sqlite3  # noqa: E402

import pytest  # noqa: E402

from fs_zammad import outbox as outbox_module  # noqa: E402
from fs_zammad.outbox import OutboxInUse, ServiceLock  # noqa: E402
from fs_zammad.salvage import open_outbox  # noqa: E402


class FullDisk:
    """Stands in for the outbox's connection. While ``full``, writes fail the way
    SQLite fails on a full disk: at the statement (``where="statement"``), or at
    COMMIT, after SQLite has already rolled the transaction back (``"commit"``)."""

    WRITES = ("INSERT", "UPDATE", "DELETE", "ALTER")

    def __init__(self, db, where, error=sqlite3.OperationalError("database or disk is full")):
        self.db, self.where, self.full, self.error = db, where, False, error

    def _check(self, sql):
        if not self.full:
            return
        verb = sql.lstrip().split(None, 1)[0].upper()
        in_transaction = self.db.in_transaction
        if verb == "COMMIT" and self.where == "commit":
            self.db.execute("ROLLBACK")
            raise self.error
        if verb in self.WRITES and (self.where == "statement" or not in_transaction):
            raise self.error

    def execute(self, sql, args=()):
        self._check(sql)
        return self.db.execute(sql, args)

    def executemany(self, sql, rows):
        self._check(sql)
        return self.db.executemany(sql, rows)

    @property
    def in_transaction(self):
        return self.db.in_transaction

    def close(self):
        self.db.close()


def once_hangup(call_id):
    return ZammadEvent(call_id, (("event", "hangup"), ("direction", "in"), ("callId", call_id)),
                       "", True)


@pytest.fixture(params=["statement", "commit"])
def full_box(request, tmp_path):
    box = Outbox(tmp_path / "o.sqlite3")
    box.db = FullDisk(box.db, request.param)
    return box


def test_full_disk_keeps_events_in_memory_then_writes_them_in_order(full_box, caplog):
    box = full_box
    box.record([ev("a", "newCall")], [("a", "{}")])
    box.db.full = True
    with caplog.at_level(logging.ERROR, logger="fs_zammad.outbox"):
        for i in range(30):
            assert box.record([ev(f"b{i}", "newCall")], [(f"b{i}", "{}")]) == 0
        assert box.record([ev("a", "hangup")], (), ["a"]) == 0
        assert not box.flush()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "disk full" in errors[0] and "STATE_DIR" in errors[0]
    assert box.write_error == "disk full" and box.held == 31
    assert heads(box) == [("a", "newCall")] and box.pending == 1
    box.db.full = False
    box.record([ev("c", "newCall")])              # the next event writes what waited
    assert box.write_error is None and box.held == 0 and box.pending == 33
    assert [r.call_id for r in box.ready(40)] == ["a"] + [f"b{i}" for i in range(30)] + ["c"]
    assert len(box.load_calls()) == 30            # a's call ended (deleted), b's stored


def test_delivery_writes_on_a_full_disk_never_hand_a_row_out_twice(full_box):
    box = full_box
    box.record([once_hangup("a"), once_hangup("b"), ev("c", "newCall"), ev("d", "newCall")])
    rows = {r.call_id: r for r in box.ready(10)}
    box.db.full = True
    box.delivered(rows["a"].id)                   # Zammad has it: must not go again
    box.set_unsure(rows["b"], "may have reached Zammad")
    box.retry_later(rows["c"].id, 9e9, "HTTP 500")
    box.attempted(rows["d"].id, "HTTP 503")
    box.fail(rows["d"], "HTTP 422: x")
    with pytest.raises(sqlite3.OperationalError):
        box.mark_sending(rows["a"].id)            # unmarked, a hangup is not sent
    assert box.ready(10) == []
    assert box.counts() == {"pending": 4}         # nothing on disk yet
    box.db.full = False
    assert box.flush()
    assert box.ready(10) == [] and box.pending == 1
    assert box.counts() == {"pending": 1, "unsure": 1, "failed": 1}
    assert [(r[1], r[4]) for r in box.failed_rows()] == [("b", "unsure"), ("d", "failed")]


@pytest.mark.parametrize("first_failure", ["record", "mark_sending"])
def test_no_harmful_hangup_goes_out_while_writes_wait(full_box, first_failure):
    box = full_box
    box.record([once_hangup("a"), ev("b", "hangup"), ev("d", "newCall")])
    box.db.full = True
    if first_failure == "record":
        box.record([ev("c", "newCall")])          # waits in memory
    else:
        with pytest.raises(sqlite3.OperationalError):
            box.mark_sending(box.ready(1)[0].id)
    # a's sending mark cannot be stored; b's hangup (answered call) needs none
    assert heads(box) == [("b", "hangup"), ("d", "newCall")]
    box.db.full = False
    assert box.flush()
    assert ("a", "hangup") in heads(box)


def test_beyond_the_memory_bound_new_calls_are_refused_known_ones_go_on(full_box, monkeypatch):
    monkeypatch.setattr(outbox_module, "HELD_MAX", 3)
    box = full_box
    box.record([ev("stored", "newCall")])
    box.db.full = True
    assert box.record([ev("a", "newCall"), ev("b", "newCall"), ev("c", "newCall")]) == 0
    assert box.record([ev("d", "newCall"), ev("d", "answer")]) == 2   # refused, counted
    assert box.record([ev("a", "hangup"), ev("stored", "hangup"), ev("d", "hangup")]) == 1
    assert box.refused == 3
    box.db.full = False
    assert box.flush()
    assert sorted((r.call_id, r.event) for r in box.ready(10)) == [
        ("a", "newCall"), ("b", "newCall"), ("c", "newCall"), ("stored", "newCall")]
    assert box.pending == 6


# -- one service per outbox; the CLI's view ----------------------------------------------


def test_service_lock_is_exclusive_names_the_holder_and_dies_with_it(tmp_path):
    import os

    first = ServiceLock(tmp_path)
    first.acquire()
    assert ServiceLock(tmp_path).held_elsewhere()
    with pytest.raises(OutboxInUse, match=f"PID {os.getpid()}.*STATE_DIR"):
        ServiceLock(tmp_path).acquire()
    first.release()
    assert not ServiceLock(tmp_path).held_elsewhere()
    ServiceLock(tmp_path).acquire()


def test_cli_view_changes_nothing(tmp_path):
    path = tmp_path / "o.sqlite3"
    box = Outbox(path)
    box.record([ev("a", "hangup")])
    box.mark_sending(box.ready(1)[0].id)          # in flight in the service
    view = Outbox.for_cli(path)
    assert view.counts() == {"pending": 1} and view.failed_rows() == []
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        view.retry_failed(unsure=True)
    writer = Outbox.for_cli(path, write=True)
    assert writer.retry_failed(unsure=True) == 0  # only set-aside rows, never one in flight
    assert box.db.execute("SELECT sending, state FROM outbox").fetchall() == [(1, "pending")]
    with pytest.raises(sqlite3.OperationalError):
        Outbox.for_cli(tmp_path / "missing.sqlite3")
    assert not (tmp_path / "missing.sqlite3").exists()


def test_service_notices_rows_put_back_by_another_process(tmp_path):
    path = tmp_path / "o.sqlite3"
    box = Outbox(path)
    box.record([ev("a", "newCall"), ev("b", "newCall")])
    box.fail(box.ready(1)[0], "HTTP 401")
    box.changed_elsewhere()
    assert box.pending == 1 and not box.changed_elsewhere()
    assert Outbox.for_cli(path, write=True).retry_failed() == 1
    assert box.changed_elsewhere() and box.pending == 2


# -- a damaged file ------------------------------------------------------------------------


@pytest.mark.parametrize("where", [0.3, 0.5, 0.7, 0.9])
def test_damaged_outbox_rows_and_calls_carried_over_file_kept_as_found(tmp_path, caplog, where):
    path = tmp_path / "outbox.sqlite3"
    box = Outbox(path)
    for i in range(400):
        box.record([ev(f"c{i}", "newCall")], [(f"c{i}", '{"n": %d}' % i)])
    box.fail(box.ready(1)[0], "HTTP 422: x")
    box.set_unsure(box.ready(1)[0], "may have reached Zammad")
    box.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    box.close()
    page = 4096
    with open(path, "r+b") as handle:             # a zeroed page in the middle
        handle.seek(int(path.stat().st_size // page * where) * page)
        handle.write(b"\0" * page)
    damaged = path.read_bytes()
    with caplog.at_level(logging.ERROR, logger="fs_zammad.outbox"):
        fresh = open_outbox(path)
    [line] = [r.getMessage() for r in caplog.records]
    aside = [p for p in tmp_path.iterdir() if ".damaged-" in p.name and p.name.endswith("Z")]
    assert len(aside) == 1 and aside[0].read_bytes() == damaged
    assert str(path) in line and aside[0].name in line
    carried = fresh.counts()
    events, calls = sum(carried.values()), len(fresh.load_calls())
    assert f"{events} events and {calls} calls in progress carried" in line
    assert 400 <= events + calls <= 800           # a table page costs its rows, an index page nothing
    lost = 400 - events
    assert (f"{lost} events could not be read" if lost else "every event was read") in line
    assert all(state in ("pending", "failed", "unsure") for state in carried)
    assert [r.call_id for r in fresh.ready(500)] == sorted(
        {f"c{i}" for i in range(2, 400)} & {r[0] for r in fresh.db.execute(
            "SELECT call_id FROM outbox WHERE state='pending'")}, key=lambda c: int(c[1:]))
    assert fresh.integrity_problem() is None


@pytest.mark.parametrize("error, damaged", [
    (sqlite3.OperationalError("database or disk is full"), False),
    # a full disk stopping the -shm from growing; only SQLite's own verdict is damage
    (sqlite3.OperationalError("disk I/O error"), False),
    (sqlite3.OperationalError("unable to open database file"), False),  # a permission
    (sqlite3.DatabaseError("database disk image is malformed"), True),
    (sqlite3.DatabaseError("file is not a database"), True),
    (sqlite3.OperationalError("database is locked"), False),
])
def test_a_write_error_says_whether_only_a_restart_helps(tmp_path, error, damaged):
    box = Outbox(tmp_path / "o.sqlite3")
    box.db = FullDisk(box.db, "statement", error)
    box.db.full = True
    assert box.record([ev("a", "newCall")]) == 0 and box.held == 1
    assert box.damaged is damaged
    assert box.write_error == ("disk full" if "full" in str(error) else str(error))


def test_a_disk_on_the_brink_says_error_once_not_at_every_turn(full_box, caplog):
    box = full_box
    with caplog.at_level(logging.WARNING, logger="fs_zammad.outbox"):
        for _ in range(5):                        # full, space, full, space...
            box.db.full = True
            box.record([ev("a", "newCall")])
            box.db.full = False
            assert box.flush()
    levels = [r.levelname for r in caplog.records]
    assert levels == ["ERROR", "WARNING"]         # said once, and once that it is over
    assert box.pending == 5 and box.write_error is None


# -- outboxes of earlier versions, and tables fs-zammad never wrote --

OUTBOX_COLUMNS = {  # the outbox table's columns as SCHEMA declares them
    "id": "INTEGER PRIMARY KEY AUTOINCREMENT", "call_id": "TEXT NOT NULL",
    "instance": "TEXT NOT NULL DEFAULT ''", "event": "TEXT NOT NULL", "fields": "TEXT NOT NULL",
    "created": "REAL NOT NULL", "attempts": "INTEGER NOT NULL DEFAULT 0",
    "next_at": "REAL NOT NULL DEFAULT 0", "sending": "INTEGER NOT NULL DEFAULT 0",
    "state": "TEXT NOT NULL DEFAULT 'pending'", "last_error": "TEXT",
    "once": "INTEGER NOT NULL DEFAULT 0"}


def old_outbox(path, without: tuple[str, ...]):
    """An outbox as an earlier fs-zammad wrote it: without the columns added since."""
    import sqlite3

    columns = ", ".join(f"{name} {decl}" for name, decl in OUTBOX_COLUMNS.items()
                        if name not in without)
    db = sqlite3.connect(path)
    db.executescript(f"""CREATE TABLE outbox ({columns});
        CREATE TABLE calls (call_id TEXT PRIMARY KEY, state TEXT NOT NULL);
        INSERT INTO outbox (call_id, event, fields, created) VALUES
            ('x', 'hangup', '[["event","hangup"]]', 1), ('y', 'newCall', '[["event","newCall"]]', 1);
    """)
    db.commit()
    db.close()


@pytest.mark.parametrize("without", [("once",), ("sending", "once"),
                                     ("instance", "sending", "once")])
def test_an_outbox_of_an_earlier_version_is_brought_up_to_date(tmp_path, without):
    # its rows: for the one Zammad of the time; every hangup may be of the harmful kind
    old_outbox(tmp_path / "old.sqlite3", without)
    box = open_outbox(tmp_path / "old.sqlite3")
    assert sorted((r.call_id, r.once) for r in box.ready(10)) == [("x", True), ("y", False)]
    assert box.pending_for("") == 2 and box.integrity_problem() is None
    box.mark_sending(box.ready(1)[0].id)
    assert not list(tmp_path.glob("*.damaged-*"))


def test_an_outbox_table_fs_zammad_never_wrote_is_moved_aside(tmp_path, caplog):
    import sqlite3

    db = sqlite3.connect(tmp_path / "o.sqlite3")
    db.executescript("CREATE TABLE outbox (id INTEGER PRIMARY KEY, payload TEXT);"
                     "INSERT INTO outbox (payload) VALUES ('someone else''s');")
    db.commit()
    db.close()
    with caplog.at_level("ERROR"):
        box = open_outbox(tmp_path / "o.sqlite3")
    assert box.counts() == {} and [p.name[-1] for p in tmp_path.glob("o.sqlite3.damaged-*")
                                   if p.name.endswith("Z")] == ["Z"]
    assert any("not written by fs-zammad" in r.getMessage() for r in caplog.records)


def test_an_upgrade_cut_off_halfway_is_done_whole_at_the_next_start(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite3"
    old_outbox(path, ("sending", "once"))
    db = sqlite3.connect(path)   # the upgrade's marking of old hangups fails (a full disk, say)
    db.executescript("CREATE TRIGGER fail BEFORE UPDATE ON outbox "
                     "BEGIN SELECT RAISE(ABORT, 'disk full'); END;")
    db.close()
    with pytest.raises(sqlite3.DatabaseError):
        Outbox(path)
    db = sqlite3.connect(path)
    db.executescript("DROP TRIGGER fail")
    db.close()
    box = Outbox(path)  # the next start: the old hangup still counts as a once-hangup
    assert sorted((r.call_id, r.once) for r in box.ready(10)) == [("x", True), ("y", False)]


def test_a_doubtful_calls_missed_hangup_is_unsure_even_after_a_restart(tmp_path):
    """Calls carried out of an outbox without its -wal may have ended since, their
    hangups delivered: the hangup the resync owes such a missed call is unsure (the
    mark survives a restart); an answered call's is sent; other calls are untouched."""
    from dataclasses import replace

    path = tmp_path / "o.sqlite3"
    box = Outbox(path)
    box.adopt([], [], [], doubtful=["missed", "answered"])
    box.close()
    box = Outbox(path)                               # restarted before the resync
    box.record([replace(ev("missed", "hangup"), once=True), ev("answered", "hangup"),
                replace(ev("new", "hangup"), once=True)])
    assert sorted((r[1], r[4]) for r in box.failed_rows()) == [("missed", "unsure")]
    assert "may have reached Zammad already" in box.failed_rows()[0][6]
    assert sorted(heads(box)) == [("answered", "hangup"), ("new", "hangup")]
    assert box.pending == 2
    box.record([replace(ev("missed", "hangup"), once=True)])   # no longer doubtful
    assert ("missed", "hangup") in heads(box)
    box.adopt([], [], [], doubtful=["up"])
    box.settle_doubtful()   # the resync found it up: it ends, and hangs up, after it
    box.close()
    box = Outbox(path)
    box.record([replace(ev("up", "hangup"), once=True)])
    assert ("up", "hangup") in heads(box)
