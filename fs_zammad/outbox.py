"""The durable outbox and call state: one SQLite file (WAL).

Every Zammad event is written here, together with the state of the calls it
came from, in one transaction, before anything is sent; a row leaves only
when Zammad accepted it. A row that failed for good (wrong token, "No such
call_id", a hangup that may have reached Zammad) stays in the file marked
``failed`` with Zammad's answer, and so do the later events of its call, so
that ``fs-zammad outbox retry`` can replay them in order.
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
    state TEXT NOT NULL DEFAULT 'pending',
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS outbox_by_call ON outbox (call_id, id);
CREATE INDEX IF NOT EXISTS outbox_by_instance ON outbox (instance, state, id);
CREATE TABLE IF NOT EXISTS calls (
    call_id TEXT PRIMARY KEY,
    state TEXT NOT NULL
);
"""

HELD = "held: an earlier event of this call failed"


@dataclass(frozen=True)
class Row:
    id: int
    call_id: str
    event: str
    fields: tuple[tuple[str, str], ...]
    created: float
    attempts: int


class OutboxFull(Exception):
    """The size cap is reached; the event was not stored."""


class Outbox:
    def __init__(self, path: str | Path = ":memory:", max_events: int = 200_000):
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path)
        self.max_events = max_events
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a commit survives a killed process (kill -9); only a power
        # loss can take the last moments with it.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self.refused = 0
        self.recount()

    def recount(self) -> int:
        """Re-read the pending count (``outbox retry`` may run in another process)."""
        self.pending = self.db.execute(
            "SELECT count(*) FROM outbox WHERE state='pending'").fetchone()[0]
        return self.pending

    def close(self) -> None:
        self.db.close()

    # -- writing --------------------------------------------------------

    def record(self, events: Iterable, upsert_calls: Sequence[tuple[str, str]] = (),
               delete_calls: Sequence[str] = (), now: float | None = None) -> int:
        """Store new Zammad events and call state in one transaction.

        Returns how many events were refused because the outbox is full.
        """
        now = time.time() if now is None else now
        refused = 0
        db = self.db
        db.execute("BEGIN")
        try:
            for event in events:
                if self.pending >= self.max_events:
                    refused += 1
                    continue
                held = db.execute("SELECT 1 FROM outbox WHERE call_id=? AND state='failed' LIMIT 1",
                                  (event.call_id,)).fetchone()
                db.execute(
                    "INSERT INTO outbox (call_id, instance, event, fields, created, state, "
                    "last_error) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (event.call_id, event.instance, event.name, json.dumps(event.fields), now,
                     "failed" if held else "pending", HELD if held else None))
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

    def retry_later(self, row_id: int, next_at: float, error: str) -> None:
        self.db.execute("UPDATE outbox SET attempts=attempts+1, next_at=?, last_error=? WHERE id=?",
                        (next_at, error, row_id))

    def attempted(self, row_id: int, error: str) -> None:
        """Count an attempt without delaying the row (Zammad as a whole is down)."""
        self.db.execute("UPDATE outbox SET attempts=attempts+1, last_error=? WHERE id=?",
                        (error, row_id))

    def fail(self, row: Row, error: str) -> None:
        """Move a row aside for good, with the rest of its call behind it."""
        db = self.db
        db.execute("BEGIN")
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
            "SELECT id, call_id, event, fields, created, attempts FROM outbox AS o "
            "WHERE instance=? AND state='pending' AND next_at<=? AND NOT EXISTS ("
            "  SELECT 1 FROM outbox AS p WHERE p.call_id=o.call_id AND p.id<o.id"
            "  AND p.state='pending') "
            "ORDER BY id LIMIT ?", (instance, now, limit + len(skip))).fetchall()
        return [Row(r[0], r[1], r[2], tuple(tuple(p) for p in json.loads(r[3])), r[4], r[5])
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
        return self.db.execute("SELECT id, call_id, instance, event, attempts, last_error, created "
                               "FROM outbox WHERE state='failed' ORDER BY id").fetchall()

    def counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT state, count(*) FROM outbox GROUP BY state").fetchall())

    def retry_failed(self, call_id: str | None = None) -> int:
        """Put failed rows back in line (all, or one call's), oldest first."""
        where, args = ("state='failed'", ()) if call_id is None else (
            "state='failed' AND call_id=?", (call_id,))
        n = self.db.execute(f"UPDATE outbox SET state='pending', next_at=0, attempts=0 WHERE {where}",
                            args).rowcount
        self.pending += n
        return n

    def load_calls(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT state FROM calls")]
