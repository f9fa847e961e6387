"""The durable outbox and call state: one SQLite file (WAL).

Every Zammad event is written here, together with the state of the calls it
came from, in one transaction, before anything is sent; a row leaves only
when Zammad accepted it. Row states:

* ``pending``: waiting to be sent (``sending=1``: a hangup on its way);
* ``failed``: Zammad refused it for good (wrong token, "No such call_id") or an
  earlier event of its call failed; kept with Zammad's answer, so that
  ``fs-zammad outbox retry`` can replay them in order;
* ``unsure``: a hangup that may have reached Zammad. Sending it again could
  give the call a second hangup, so only ``outbox retry --unsure`` does.

One service per outbox: :class:`ServiceLock`. A write that fails (disk
full) never loses what the service already knows: it waits in memory (up to
``HELD_MAX`` events) and is written once the disk takes it again. A file
SQLite cannot read is moved aside at start and what can still be read of it
is carried into a fresh outbox (salvage.py).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    call_id TEXT NOT NULL,
    instance TEXT NOT NULL DEFAULT '',
    event TEXT NOT NULL,
    fields TEXT NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL DEFAULT 0,
    sending INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'pending',
    last_error TEXT,
    once INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_by_call ON outbox (call_id, id);
CREATE INDEX IF NOT EXISTS outbox_by_instance ON outbox (instance, state, id);
CREATE TABLE IF NOT EXISTS calls (
    call_id TEXT PRIMARY KEY,
    state TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS finished (
    id INTEGER PRIMARY KEY,
    call_id TEXT NOT NULL,
    legs TEXT NOT NULL
);
-- Calls carried out of a damaged outbox without its -wal: their hangup may have
-- reached Zammad already (see salvage), so a missed call's hangup is unsure.
CREATE TABLE IF NOT EXISTS doubtful (
    call_id TEXT PRIMARY KEY
);
"""

HELD = "held: an earlier event of this call failed"
#: A ticket job (voicemail.py) waits behind its call's earlier events (the
#: customer comes from the caller-log line its newCall made) but holds none
#: back: the call's hangup does not wait for a ticket, and a refused ticket
#: sets only itself aside.
SIDE_JOB = "voicemail"
WAL_RESET_FRAMES = 10_000  # ~40 MB of WAL
CUT_OFF = "the process stopped while this hangup was being sent; it may have reached Zammad"
WITHOUT_WAL = ("carried from a damaged outbox without its -wal: this hangup may have reached "
               "Zammad already")
#: Events kept in memory while the outbox cannot be written (disk full); beyond
#: it, or beyond OUTBOX_MAX_EVENTS with those on disk, new calls are refused.
HELD_MAX = 20_000
LOCK_NAME = "fs-zammad.lock"
LOCK_TRIES = 10  # over a second
TROUBLE_QUIET = 300.0  # seconds between ERROR lines of a disk that keeps filling up
COLUMNS = ("id", "call_id", "instance", "event", "fields", "created", "attempts", "next_at",
           "sending", "state", "last_error", "once")
#: Columns added since the first outboxes: (name, declaration, its value for the rows
#: of an outbox from before it, as SQL; salvage reads such files with the same values).
ADDED_COLUMNS = (
    ("instance", "TEXT NOT NULL DEFAULT ''", "''"),  # the one Zammad of the time
    ("sending", "INTEGER NOT NULL DEFAULT 0", "0"),
    # A hangup there may be of the harmful kind, and nothing tells which: each counts.
    ("once", "INTEGER NOT NULL DEFAULT 0", "(event='hangup')"),
)


@dataclass(frozen=True)
class Row:
    id: int
    call_id: str
    event: str
    fields: tuple[tuple[str, str], ...]
    created: float
    attempts: int
    once: bool = False  # a second copy would harm: see calls.hangup_sent_once


class OutboxUnwritable(sqlite3.OperationalError):
    """A hangup's sending mark could not be stored: the hangup must not go out yet."""


class NotAnOutbox(sqlite3.DatabaseError):
    """A file SQLite reads whose outbox table fs-zammad never wrote: damage, for us."""


class OutboxInUse(Exception):
    """Another process holds the outbox's lock; the message names it."""


class ServiceLock:
    """One service per outbox: an exclusive ``flock`` on STATE_DIR/fs-zammad.lock,
    held for the life of the process. The kernel drops it when the process
    ends, however it ends (kill -9 included), so a stale file never blocks."""

    def __init__(self, state_dir: str | Path):
        self.path = Path(state_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`OutboxInUse` naming the holder (OSError: no directory)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        for attempt in range(LOCK_TRIES):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:  # maybe `fs-zammad outbox retry` looking for a moment
                if attempt < LOCK_TRIES - 1:
                    time.sleep(0.1)
        else:
            os.close(fd)
            raise OutboxInUse(f"another fs-zammad ({self.holder()}) is running on this outbox "
                              f"(it holds {self.path}); stop it, or give this one its own "
                              "STATE_DIR") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except OSError:  # a full disk: the lock holds all the same, unnamed
            pass
        self._fd = fd

    def holder(self) -> str:
        """The holder as it wrote itself: PID, and the host if another (a second container)."""
        try:
            pid, _, host = self.path.read_text().strip().partition(" ")
        except OSError:
            pid, host = "", ""
        if not pid:
            return "PID unknown"
        return f"PID {pid}" + (f" on host {host}" if host and host != socket.gethostname() else "")

    def held_elsewhere(self) -> bool:
        """Is a service running on this outbox right now?"""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_only(exc: BaseException) -> bool:
    """SQLITE_READONLY and its kinds: this user cannot write the file (or its -wal/-shm)."""
    code = getattr(exc, "sqlite_errorcode", None) or 0  # Python 3.11+
    return code & 0xFF == 8 or "readonly" in str(exc)


def write_trouble(exc: BaseException) -> str:
    """What a failed write says, in an admin's words."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+; 13 is SQLITE_FULL
    if code == 13 or "full" in str(exc) or getattr(exc, "errno", None) == errno.ENOSPC:
        return "disk full"
    if read_only(exc):
        return (f"this user (uid {os.getuid()}) cannot write the outbox or its -wal/-shm "
                "files (their owner or mode, a read-only mount)")
    return str(exc) or type(exc).__name__


# One delayed write: applies itself to the connection, returns the change in pending rows.
Write = Callable[[sqlite3.Connection], int]


class Outbox:
    def __init__(self, path: str | Path = ":memory:", max_events: int = 200_000,
                 background_checkpoint: bool = False):
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path)
        self.max_events = max_events
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._checkpointer = None
        self._init_state()
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a commit survives a killed process (kill -9); only a power
        # loss can take the last moments with it.
        self.db.execute("PRAGMA synchronous=NORMAL")
        if background_checkpoint and self.path != ":memory:":
            # SQLite's automatic checkpoint runs inside a COMMIT and its fsyncs
            # stall the event loop (p99 latency); the caller runs checkpoint()
            # in a thread instead.
            self.db.execute("PRAGMA wal_autocheckpoint=0")
            self._checkpointer = sqlite3.connect(self.path, isolation_level=None,
                                                 check_same_thread=False)
        self._add_new_columns()
        self.db.executescript(SCHEMA)
        # SQLite opens a file this user may not write (another owner, mode 0444, an
        # -shm it cannot make) read-only without a word: say so now, not at the
        # first call, whose events would then only wait in memory.
        try:
            self.db.execute("UPDATE outbox SET id=id WHERE 0")
        except sqlite3.OperationalError as exc:
            if (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF != 5:  # 5: busy, so writable
                raise
        self._doubtful = {row[0] for row in self.db.execute("SELECT call_id FROM doubtful")}
        self.recount()

    def _init_state(self) -> None:
        self.refused = 0
        self._refused_calls: set[str] = set()
        self.pending = 0
        # Writes the disk did not take yet, in order; the rows they settle are
        # not handed out again meanwhile (a delivered hangup is never resent).
        self._held: list[Write] = []
        self._held_events = 0
        self._settled: set[int] = set()
        self._not_before: dict[int, float] = {}
        self.write_error: str | None = None  # why writes wait in memory (for /healthz)
        self.damaged = False  # the file itself: only a restart (open_outbox) helps
        self._doubtful: set[str] = set()  # the doubtful table, read at open
        self._said_trouble_at: float | None = None
        self._said_trouble = False
        self._data_version = 0

    @classmethod
    def for_cli(cls, path: str | Path, write: bool = False) -> Outbox:
        """The outbox as ``fs-zammad outbox`` sees it, next to a running service:
        read-only unless ``write``; never creates, migrates or recovers anything."""
        self = cls.__new__(cls)
        self.path, self.max_events, self._checkpointer = str(path), 0, None
        self._init_state()
        uri = Path(path).resolve().as_uri() + ("?mode=rw" if write else "?mode=ro")
        self.db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=10)
        self.db.execute("SELECT count(*) FROM outbox WHERE 0").fetchone()  # readable at all?
        return self

    def _add_new_columns(self) -> None:
        """Outboxes written by an earlier fs-zammad get the columns added since (before
        SCHEMA, whose indexes name them); one that lacks others is no outbox of ours."""
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(outbox)")}
        if not columns:
            return  # a new file: SCHEMA makes the table whole
        added = [column for column in ADDED_COLUMNS if column[0] not in columns]
        known = columns | {name for name, _declaration, _old_rows in added}
        missing = [name for name in COLUMNS if name not in known]
        if missing:
            raise NotAnOutbox(f"its outbox table has no {', '.join(missing)}: not written by "
                              "fs-zammad")
        if not added:
            return
        # All in one transaction: a start cut off between adding ``once`` and marking
        # the old hangups would leave them resendable for good.
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for name, declaration, old_rows in added:
                self.db.execute(f"ALTER TABLE outbox ADD COLUMN {name} {declaration}")
                self.db.execute(f"UPDATE outbox SET {name}={old_rows}")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def recover_cut_off(self) -> int:
        """A hangup cut off by a crash may have reached Zammad: never resend it blindly.

        Only the service that holds the lock runs this, once at start: any
        other moment would catch hangups that are in flight right now.
        """
        cut = self.db.execute("SELECT count(*) FROM outbox WHERE state='pending' AND sending=1"
                              ).fetchone()[0]
        if cut:
            self._statement("UPDATE outbox SET state='unsure', sending=0, last_error=? "
                            "WHERE state='pending' AND sending=1", (CUT_OFF,),
                            leaves_pending=True)
        return cut

    def integrity_problem(self) -> str | None:
        """SQLite's own check of every page; None if the file is sound."""
        found = [r[0] for r in self.db.execute("PRAGMA integrity_check(3)")]
        if found == ["ok"]:
            return None
        text = " ".join(" ".join(found).replace("*** in database main ***", "").split())
        return f"integrity check: {text[:200]}"

    def recount(self) -> int:
        """Re-read the pending count (``outbox retry`` may run in another process)."""
        self.pending = self.db.execute(
            "SELECT count(*) FROM outbox WHERE state='pending'").fetchone()[0]
        return self.pending

    def changed_elsewhere(self) -> bool:
        """Did another process (``outbox retry``) commit since the last look? Then recount."""
        version = self.db.execute("PRAGMA data_version").fetchone()[0]
        changed, self._data_version = version != self._data_version, version
        if changed:
            self.recount()
        return changed

    def close(self) -> None:
        self.db.close()
        if self._checkpointer is not None:
            self._checkpointer.close()

    def checkpoint(self) -> None:
        """Copy the WAL into the database file; safe to call from another thread.

        A passive checkpoint never waits for the writer, but under steady
        load the writer never finds it complete, so the WAL (and its index,
        mapped into memory) would keep growing: past WAL_RESET_FRAMES the
        checkpoint waits for the writer once and truncates the WAL. While the
        disk is full, failing checkpoints are expected and say nothing more.
        """
        if self._checkpointer is not None:
            try:
                _busy, frames, _done = self._checkpointer.execute(
                    "PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                if frames > WAL_RESET_FRAMES:
                    self._checkpointer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                if self.write_error is None:
                    raise

    # -- writing --------------------------------------------------------

    @property
    def held(self) -> int:
        """Events waiting in memory for the disk."""
        return self._held_events

    @property
    def writes_waiting(self) -> bool:
        return bool(self._held)

    def _write(self, write: Write, settles: int | None = None, transaction: bool = False) -> None:
        """Apply ``write`` now, or keep it (in order) until the disk takes it."""
        if not self._held:
            db = self.db
            try:
                if transaction:
                    db.execute("BEGIN IMMEDIATE")  # the write lock first: see checkpoint()
                delta = write(db)
                if transaction:
                    db.execute("COMMIT")
                self.pending += delta
                return
            except sqlite3.Error as exc:
                self._rollback()
                self._trouble(exc)
        self._held.append(write)
        if settles is not None:
            self._settled.add(settles)

    def _statement(self, sql: str, args: tuple, leaves_pending: bool = False,
                   settles: int | None = None) -> None:
        """One UPDATE or DELETE; ``leaves_pending``: the rows it changes are no longer pending."""
        def write(db: sqlite3.Connection) -> int:
            changed = db.execute(sql, args).rowcount
            return -changed if leaves_pending else 0

        self._write(write, settles)

    def _rollback(self) -> None:
        # A failed COMMIT (disk full) may have ended the transaction already.
        if self.db.in_transaction:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def _trouble(self, exc: BaseException) -> None:
        self.damaged = self.damaged or is_damage(exc)
        if self.write_error is not None:
            return
        self.write_error = write_trouble(exc)
        # A disk on the brink takes some writes and refuses others: say it once
        # per TROUBLE_QUIET, not at every turn (/healthz says it all along).
        now = time.monotonic()
        if self._said_trouble_at is None or now - self._said_trouble_at >= TROUBLE_QUIET:
            self._said_trouble_at = now
            self._said_trouble = True
            where = Path(self.path).parent
            log.error("cannot write the outbox %s (STATE_DIR=%s): %s; new events wait in memory "
                      "(up to %d, then new calls are refused) and are written as soon as it "
                      "can be written again: free space in STATE_DIR", self.path, where,
                      self.write_error, HELD_MAX)

    def flush(self) -> bool:
        """Write what waits in memory, in one transaction; True if nothing waits any more."""
        if not self._held:
            return True
        db = self.db
        try:
            db.execute("BEGIN IMMEDIATE")
            delta = sum(write(db) for write in self._held)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            self._trouble(exc)
            return False
        self.pending += delta
        if self._said_trouble:
            self._said_trouble = False
            log.warning("the outbox can be written again: %d events and %d changes that waited "
                        "in memory are stored", self._held_events, len(self._held))
        self._held.clear()
        self._settled.clear()
        self._not_before.clear()
        self._held_events = 0
        self.write_error = None
        return True

    def record(self, events: Iterable, upsert_calls: Sequence[tuple[str, str]] = (),
               delete_calls: Sequence[str] = (), now: float | None = None,
               finished_calls: Sequence[tuple[str, str]] = (),
               keep_finished: int = 5_000) -> int:
        """Store new Zammad events and call state in one transaction.

        ``finished_calls`` (call_id, legs) are appended to the ``finished``
        table, which keeps the latest ``keep_finished``: apart from the calls
        in progress, so that their table stays small (appending at one end and
        dropping at the other touches few pages).

        Returns how many events were refused because the outbox is full (or
        the disk is, and HELD_MAX events wait in memory already): new calls
        are refused (with their later events), while the calls Zammad already
        knows still get their answer and hangup.
        """
        now = time.time() if now is None else now
        events = list(events)
        admitted = []
        for event in events:
            if event.call_id in self._refused_calls or (event.name == "newCall" and (
                    self.pending + self._held_events + len(admitted) >= self.max_events or
                    (self._held and self._held_events + len(admitted) >= HELD_MAX))):
                self._refused_calls.add(event.call_id)
                if event.name == "hangup":
                    self._refused_calls.discard(event.call_id)
                continue
            admitted.append(event)
        refused = len(events) - len(admitted)
        # Decided now, not in write(): a write the disk did not take runs again later.
        doubtful = set()
        if self._doubtful:
            doubtful = {e.call_id for e in admitted if e.name == "hangup"} & self._doubtful
            self._doubtful -= doubtful
        upsert_calls, delete_calls = list(upsert_calls), list(delete_calls)
        finished_calls = list(finished_calls)

        def write(db: sqlite3.Connection) -> int:
            added = 0
            for event in admitted:
                held = db.execute("SELECT 1 FROM outbox WHERE call_id=? AND state='failed' "
                                  "AND event!=? LIMIT 1", (event.call_id, SIDE_JOB)).fetchone()
                state, error = ("failed", HELD) if held else ("pending", None)
                if event.call_id in doubtful and event.name == "hangup":
                    db.execute("DELETE FROM doubtful WHERE call_id=?", (event.call_id,))
                    if event.once:
                        state, error = "unsure", WITHOUT_WAL
                db.execute(
                    "INSERT INTO outbox (call_id, instance, event, fields, created, state, "
                    "last_error, once) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (event.call_id, event.instance, event.name, json.dumps(event.fields), now,
                     state, error, int(event.once)))
                added += state == "pending"
            if upsert_calls:
                db.executemany("INSERT OR REPLACE INTO calls (call_id, state) VALUES (?, ?)",
                               upsert_calls)
            if delete_calls:
                db.executemany("DELETE FROM calls WHERE call_id=?", [(c,) for c in delete_calls])
            if finished_calls:
                db.executemany("INSERT INTO finished (call_id, legs) VALUES (?, ?)",
                               finished_calls)
                db.execute("DELETE FROM finished WHERE id <= (SELECT max(id) FROM finished) - ?",
                           (keep_finished,))
            return added

        if self._held:
            self.flush()  # the next event is a good moment to try again
        before = len(self._held)
        self._write(write, transaction=True)
        if len(self._held) > before:
            self._held_events += len(admitted)
        self.refused += refused
        return refused

    def delivered(self, row_id: int) -> None:
        self._statement("DELETE FROM outbox WHERE id=? AND state='pending'", (row_id,),
                        leaves_pending=True, settles=row_id)

    def mark_sending(self, row_id: int) -> None:
        """Raises if the disk does not take the mark: then the hangup is not sent
        (sent unmarked, a crash would let the next start send it again)."""
        try:
            self.db.execute("UPDATE outbox SET sending=1 WHERE id=?", (row_id,))
        except sqlite3.Error as exc:
            self._trouble(exc)
            self._held.append(lambda db: 0)  # from now on no such hangup is handed out
            raise OutboxUnwritable(f"the outbox cannot be written ({self.write_error}); the "
                                   "hangup waits") from exc

    def retry_later(self, row_id: int, next_at: float, error: str) -> None:
        """Zammad answered without storing it: send again after ``next_at``."""
        self._statement("UPDATE outbox SET attempts=attempts+1, next_at=?, last_error=?, "
                        "sending=0 WHERE id=?", (next_at, error, row_id))
        if self._held:
            self._not_before[row_id] = next_at

    def attempted(self, row_id: int, error: str) -> None:
        """Not stored by Zammad, which is down as a whole: count the attempt."""
        self._statement("UPDATE outbox SET attempts=attempts+1, last_error=?, sending=0 "
                        "WHERE id=?", (error, row_id))

    def set_unsure(self, row: Row, error: str) -> None:
        """A hangup that may have reached Zammad: set aside, never resent by itself."""
        self._statement("UPDATE outbox SET state='unsure', sending=0, attempts=attempts+1, "
                        "last_error=? WHERE id=? AND state='pending'", (error, row.id),
                        leaves_pending=True, settles=row.id)

    def fail(self, row: Row, error: str) -> None:
        """Move a row aside for good, with the rest of its call behind it (a
        ticket job: alone)."""
        alone = row.event == SIDE_JOB

        def write(db: sqlite3.Connection) -> int:
            failed = db.execute("UPDATE outbox SET state='failed', attempts=attempts+1, "
                                "last_error=? WHERE id=? AND state='pending'",
                                (error, row.id)).rowcount
            held = 0 if alone else db.execute("UPDATE outbox SET state='failed', last_error=? "
                                              "WHERE call_id=? AND state='pending' AND id>?",
                                              (HELD, row.call_id, row.id)).rowcount
            return -(failed + held)

        self._write(write, settles=row.id, transaction=True)
        if self._held and not alone:  # the rest of the call waits too
            self._settled.update(r[0] for r in self.db.execute(
                "SELECT id FROM outbox WHERE call_id=? AND state='pending' AND id>?",
                (row.call_id, row.id)))

    # -- reading --------------------------------------------------------

    def ready(self, limit: int, skip_ids: Iterable[int] = (), now: float | None = None,
              instance: str = "") -> list[Row]:
        """Oldest events that may be sent now: the first pending event of each call
        (a ticket job does not count as one: it holds nobody back).

        While writes wait in memory, no hangup a second copy would harm goes
        out: its ``sending`` mark could not be stored, and a crash would then
        let it be sent twice.
        """
        now = time.time() if now is None else now
        skip = set(skip_ids)
        if self._held:
            skip |= self._settled
            skip.update(row_id for row_id, due in self._not_before.items() if due > now)
        rows = self.db.execute(
            "SELECT id, call_id, event, fields, created, attempts, once FROM outbox AS o "
            "WHERE instance=? AND state='pending' AND sending=0 AND next_at<=? "
            "AND (? OR once=0) AND NOT EXISTS ("
            "  SELECT 1 FROM outbox AS p WHERE p.call_id=o.call_id AND p.id<o.id"
            "  AND p.state='pending' AND p.event!=?) "
            "ORDER BY id LIMIT ?", (instance, now, not self._held, SIDE_JOB,
                                    limit + len(skip))).fetchall()
        return [Row(r[0], r[1], r[2], tuple(tuple(p) for p in json.loads(r[3])), r[4], r[5],
                    bool(r[6]))
                for r in rows if r[0] not in skip][:limit]

    def next_due(self, instance: str = "") -> float | None:
        row = self.db.execute("SELECT min(next_at) FROM outbox WHERE instance=? AND "
                              "state='pending'", (instance,)).fetchone()
        return row[0]

    def pending_for(self, instance: str) -> int:
        return self.db.execute("SELECT count(*) FROM outbox WHERE instance=? AND state='pending'",
                               (instance,)).fetchone()[0]

    def oldest_pending_age(self, now: float | None = None) -> float:
        now = time.time() if now is None else now
        row = self.db.execute("SELECT min(created) FROM outbox WHERE state='pending'").fetchone()
        return max(0.0, now - row[0]) if row[0] is not None else 0.0

    def failed_rows(self) -> list[tuple]:
        """Rows set aside: (id, call, instance, event, state, attempts, error, created, fields)."""
        return [(*r[:8], dict(_fields(r[8])))
                for r in self.db.execute("SELECT id, call_id, instance, event, state, attempts, "
                                         "last_error, created, fields FROM outbox "
                                         "WHERE state IN ('failed', 'unsure') ORDER BY id")]

    def counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT state, count(*) FROM outbox GROUP BY state").fetchall())

    def retry_failed(self, call_id: str | None = None, unsure: bool = False,
                     ids: Sequence[int] | None = None) -> int:
        """Put set-aside rows back in line (all, one call's, or these ``ids``), oldest first.

        ``unsure`` hangups only when asked: the admin has checked that
        Zammad's caller log still shows the call open. One UPDATE of rows
        that are never in flight: safe while the service runs, which sees
        them within a second (:meth:`changed_elsewhere`).
        """
        where, args = _set_aside("state IN ('failed', 'unsure')" if unsure
                                 else "state='failed'", call_id, ids)
        n = self.db.execute(f"UPDATE outbox SET state='pending', next_at=0, attempts=0, sending=0 "
                            f"WHERE {where}", args).rowcount
        self.pending += n
        return n

    def drop_unsure(self, call_id: str | None = None, ids: Sequence[int] | None = None) -> int:
        """Delete unsure hangups, of one call or these ``ids``: the admin's word that
        Zammad's caller log shows them arrived. Only unsure rows (a refused event, say a
        voicemail's ticket job, is never dropped along with them), never pending, never
        in flight: safe while the service runs."""
        where, args = _set_aside("state='unsure'", call_id, ids)
        return self.db.execute(f"DELETE FROM outbox WHERE {where}", args).rowcount

    def adopt(self, rows: Sequence[tuple], calls: Sequence[tuple],
              finished: Sequence[tuple] = (), doubtful: Sequence[str] = ()) -> None:
        """Take over rows (as COLUMNS), calls and finished calls carried out of a
        damaged outbox, and the calls whose hangup may have reached Zammad."""
        self.db.execute("BEGIN IMMEDIATE")
        self.db.executemany(f"INSERT OR IGNORE INTO outbox ({', '.join(COLUMNS)}) VALUES "
                            f"({', '.join('?' * len(COLUMNS))})", rows)
        self.db.executemany("INSERT OR REPLACE INTO calls (call_id, state) VALUES (?, ?)", calls)
        self.db.executemany("INSERT INTO finished (call_id, legs) VALUES (?, ?)", finished)
        self.db.executemany("INSERT OR IGNORE INTO doubtful (call_id) VALUES (?)",
                            [(call_id,) for call_id in doubtful])
        self.db.execute("COMMIT")
        self._doubtful |= set(doubtful)
        self.recount()

    def settle_doubtful(self) -> None:
        """The first resync after a salvage without the -wal is done: a carried call it
        found ended took its mark with the hangup it owed; one still up will end, and
        send its hangup, after the restart, so none can have reached Zammad."""
        if self._doubtful:
            self._doubtful.clear()
            self._statement("DELETE FROM doubtful", ())

    def load_calls(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT state FROM calls")]

    def load_finished(self) -> list[str]:
        """The finished calls kept (see record), oldest first."""
        return [r[0] for r in self.db.execute("SELECT legs FROM finished ORDER BY id")]


def _fields(text: str) -> list:
    try:
        return [tuple(pair) for pair in json.loads(text) if len(pair) == 2]
    except (ValueError, TypeError):
        return []


#: SQLITE_CORRUPT and SQLITE_NOTADB: what SQLite says of a damaged file.
DAMAGE_CODES = (11, 26)


def is_damage(exc: BaseException) -> bool:
    """Damage to the file, as opposed to a full disk, a lock or a permission.

    Only SQLite's own verdict counts: a full disk can surface as "disk I/O
    error" (the -shm cannot grow) and a permission as "unable to open", and
    moving a sound file aside for either would strand every event in it.
    """
    if isinstance(exc, NotAnOutbox):
        return True
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF in DAMAGE_CODES
    text = str(exc)
    return "malformed" in text or "not a database" in text


def _set_aside(states: str, call_id: str | None, ids: Sequence[int] | None) -> tuple[str, list]:
    """The WHERE clause (and its arguments) for set-aside rows in ``states``, of one
    call and/or of these ids: what the admin's retry and drop commands name."""
    where, args = states, []
    if call_id is not None:
        where += " AND call_id=?"
        args.append(call_id)
    if ids is not None:
        where += " AND id IN (SELECT value FROM json_each(?))"
        args.append(json.dumps(list(ids)))
    return where, args
