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
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

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
"""

HELD = "held: an earlier event of this call failed"
WAL_RESET_FRAMES = 10_000  # ~40 MB of WAL
CUT_OFF = "the process stopped while this hangup was being sent; it may have reached Zammad"


@dataclass(frozen=True)
class Row:
    id: int
    call_id: str
    event: str
    fields: tuple[tuple[str, str], ...]
    created: float
    attempts: int
    once: bool = False  # a second copy would harm: see calls.hangup_sent_once


class Outbox:
    def __init__(self, path: str | Path = ":memory:", max_events: int = 200_000,
                 background_checkpoint: bool = False):
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path)
        self.max_events = max_events
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a commit survives a killed process (kill -9); only a power
        # loss can take the last moments with it.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self._checkpointer = None
        if background_checkpoint and self.path != ":memory:":
            # SQLite's automatic checkpoint runs inside a COMMIT and its fsyncs
            # stall the event loop (p99 latency); the caller runs checkpoint()
            # in a thread instead.
            self.db.execute("PRAGMA wal_autocheckpoint=0")
            self._checkpointer = sqlite3.connect(self.path, isolation_level=None,
                                                 check_same_thread=False)
        self.db.executescript(SCHEMA)
        self._add_once_column()
        self.refused = 0
        self._refused_calls: set[str] = set()
        # A hangup cut off by a crash may have reached Zammad: never resend it blindly.
        self.db.execute("UPDATE outbox SET state='unsure', sending=0, last_error=? "
                        "WHERE state='pending' AND sending=1", (CUT_OFF,))
        self.recount()

    def _add_once_column(self) -> None:
        """Outboxes written before the ``once`` column: a hangup there may be of
        the harmful kind, and nothing tells which, so each counts as one."""
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(outbox)")}
        if "once" not in columns:
            self.db.execute("ALTER TABLE outbox ADD COLUMN once INTEGER NOT NULL DEFAULT 0")
            self.db.execute("UPDATE outbox SET once=1 WHERE event='hangup'")

    def recount(self) -> int:
        """Re-read the pending count (``outbox retry`` may run in another process)."""
        self.pending = self.db.execute(
            "SELECT count(*) FROM outbox WHERE state='pending'").fetchone()[0]
        return self.pending

    def close(self) -> None:
        self.db.close()
        if self._checkpointer is not None:
            self._checkpointer.close()

    def checkpoint(self) -> None:
        """Copy the WAL into the database file; safe to call from another thread.

        A passive checkpoint never waits for the writer, but under steady
        load the writer never finds it complete, so the WAL (and its index,
        mapped into memory) would keep growing: past WAL_RESET_FRAMES the
        checkpoint waits for the writer once and truncates the WAL.
        """
        if self._checkpointer is not None:
            _busy, frames, _done = self._checkpointer.execute(
                "PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if frames > WAL_RESET_FRAMES:
                self._checkpointer.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # -- writing --------------------------------------------------------

    def record(self, events: Iterable, upsert_calls: Sequence[tuple[str, str]] = (),
               delete_calls: Sequence[str] = (), now: float | None = None) -> int:
        """Store new Zammad events and call state in one transaction.

        Returns how many events were refused because the outbox is full:
        when it is, new calls are refused (with their later events), while
        the calls Zammad already knows still get their answer and hangup.
        """
        now = time.time() if now is None else now
        refused = 0
        db = self.db
        db.execute("BEGIN IMMEDIATE")  # the write lock first: see checkpoint()
        try:
            for event in events:
                if event.call_id in self._refused_calls or (
                        event.name == "newCall" and self.pending >= self.max_events):
                    self._refused_calls.add(event.call_id)
                    if event.name == "hangup":
                        self._refused_calls.discard(event.call_id)
                    refused += 1
                    continue
                held = db.execute("SELECT 1 FROM outbox WHERE call_id=? AND state='failed' LIMIT 1",
                                  (event.call_id,)).fetchone()
                db.execute(
                    "INSERT INTO outbox (call_id, instance, event, fields, created, state, "
                    "last_error, once) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (event.call_id, event.instance, event.name, json.dumps(event.fields), now,
                     "failed" if held else "pending", HELD if held else None,
                     int(event.once)))
                if not held:
                    self.pending += 1
            if upsert_calls:
                db.executemany("INSERT OR REPLACE INTO calls (call_id, state) VALUES (?, ?)",
                               upsert_calls)
            if delete_calls:
                db.executemany("DELETE FROM calls WHERE call_id=?", [(c,) for c in delete_calls])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.refused += refused
        return refused

    def delivered(self, row_id: int) -> None:
        if self.db.execute("DELETE FROM outbox WHERE id=? AND state='pending'", (row_id,)).rowcount:
            self.pending -= 1

    def mark_sending(self, row_id: int) -> None:
        self.db.execute("UPDATE outbox SET sending=1 WHERE id=?", (row_id,))

    def retry_later(self, row_id: int, next_at: float, error: str) -> None:
        """Zammad answered without storing it: send again after ``next_at``."""
        self.db.execute("UPDATE outbox SET attempts=attempts+1, next_at=?, last_error=?, "
                        "sending=0 WHERE id=?", (next_at, error, row_id))

    def attempted(self, row_id: int, error: str) -> None:
        """Not stored by Zammad, which is down as a whole: count the attempt."""
        self.db.execute("UPDATE outbox SET attempts=attempts+1, last_error=?, sending=0 "
                        "WHERE id=?", (error, row_id))

    def set_unsure(self, row: Row, error: str) -> None:
        """A hangup that may have reached Zammad: set aside, never resent by itself."""
        if self.db.execute("UPDATE outbox SET state='unsure', sending=0, attempts=attempts+1, "
                           "last_error=? WHERE id=? AND state='pending'",
                           (error, row.id)).rowcount:
            self.pending -= 1

    def fail(self, row: Row, error: str) -> None:
        """Move a row aside for good, with the rest of its call behind it."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")  # the write lock first: see checkpoint()
        db.execute("UPDATE outbox SET state='failed', attempts=attempts+1, last_error=? WHERE id=?",
                   (error, row.id))
        held = db.execute("UPDATE outbox SET state='failed', last_error=? "
                          "WHERE call_id=? AND state='pending' AND id>?",
                          (HELD, row.call_id, row.id)).rowcount
        db.execute("COMMIT")
        self.pending -= 1 + held

    # -- reading --------------------------------------------------------

    def ready(self, limit: int, skip_ids: Iterable[int] = (), now: float | None = None,
              instance: str = "") -> list[Row]:
        """Oldest events that may be sent now: the first pending event of each call."""
        now = time.time() if now is None else now
        skip = set(skip_ids)
        rows = self.db.execute(
            "SELECT id, call_id, event, fields, created, attempts, once FROM outbox AS o "
            "WHERE instance=? AND state='pending' AND next_at<=? AND NOT EXISTS ("
            "  SELECT 1 FROM outbox AS p WHERE p.call_id=o.call_id AND p.id<o.id"
            "  AND p.state='pending') "
            "ORDER BY id LIMIT ?", (instance, now, limit + len(skip))).fetchall()
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
        """Rows set aside: (id, call, instance, event, state, attempts, error, created)."""
        return self.db.execute("SELECT id, call_id, instance, event, state, attempts, last_error, "
                               "created FROM outbox WHERE state IN ('failed', 'unsure') "
                               "ORDER BY id").fetchall()

    def counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT state, count(*) FROM outbox GROUP BY state").fetchall())

    def retry_failed(self, call_id: str | None = None, unsure: bool = False) -> int:
        """Put set-aside rows back in line (all, or one call's), oldest first.

        ``unsure`` hangups only when asked: the admin has checked that
        Zammad's caller log still shows the call open.
        """
        states = "('failed', 'unsure')" if unsure else "('failed')"
        where, args = (f"state IN {states}", ()) if call_id is None else (
            f"state IN {states} AND call_id=?", (call_id,))
        n = self.db.execute(f"UPDATE outbox SET state='pending', next_at=0, attempts=0, sending=0 "
                            f"WHERE {where}", args).rowcount
        self.pending += n
        return n

    def load_calls(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT state FROM calls")]
