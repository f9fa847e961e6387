"""A damaged outbox file: moved aside, and what can still be read carried over.

A file SQLite cannot read, or one that fails its integrity check at start,
must never stop delivery for good (a container would restart forever): the
service moves it aside and starts with a fresh outbox holding every row that
could be read. Kept apart from outbox.py, which is the everyday path.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

from fs_zammad.outbox import ADDED_COLUMNS, COLUMNS, SIDE_JOB, WITHOUT_WAL, Outbox, is_damage

log = logging.getLogger("fs_zammad.outbox")

def open_outbox(path: str | Path, max_events: int = 200_000,
                background_checkpoint: bool = False) -> Outbox:
    """The service's outbox. A file SQLite cannot read, or one that fails its
    integrity check, is moved aside (``<name>.damaged-<UTC time>``, with its
    -wal and -shm) and every row that can still be read goes into a fresh
    outbox, so that a damaged file never stops delivery for good."""
    path = Path(path)
    problem = None
    if path.exists() and not path.is_file():
        problem = "not a file"
    else:
        try:
            outbox = Outbox(path, max_events, background_checkpoint)
        except sqlite3.DatabaseError as exc:
            if not is_damage(exc):
                raise
            problem = str(exc)
        else:
            try:
                problem = outbox.integrity_problem()
            except sqlite3.DatabaseError as exc:
                if not is_damage(exc):
                    outbox.close()
                    raise
                problem = str(exc)
            if problem is None:
                return outbox
            outbox.close()
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    for suffix in ("", "-wal", "-shm"):
        if os.path.lexists(f"{path}{suffix}"):
            os.rename(f"{path}{suffix}", f"{aside}{suffix}")
    rows, calls, finished, lost, doubtful = salvage(aside)
    try:
        outbox = Outbox(path, max_events, background_checkpoint)
        outbox.adopt(rows, calls, finished, doubtful)
    except sqlite3.Error:
        # No fresh outbox (a full disk): put the damaged file back as it was, so
        # that the next start salvages it again instead of starting empty.
        for suffix in ("", "-wal", "-shm"):
            if os.path.lexists(f"{path}{suffix}") and not os.path.isdir(f"{path}{suffix}"):
                os.unlink(f"{path}{suffix}")
            if os.path.lexists(f"{aside}{suffix}"):
                os.rename(f"{aside}{suffix}", f"{path}{suffix}")
        raise
    if lost is None:
        unread = "how many more it held could not be read"
    else:
        unread = f"{lost} events could not be read" if lost else "every event was read"
    log.error("the outbox %s was damaged (%s): moved aside as %s; %d events and %d calls in "
              "progress carried into a fresh outbox, %s (calls cut short are settled by the "
              "resync with FreeSWITCH); keep the damaged file for a post-mortem or delete it",
              path, problem, aside.name, len(rows), len(calls), unread)
    return outbox


Salvaged = tuple[list[tuple], list[tuple], list[tuple], "int | None", tuple[str, ...]]


def salvage(path: Path) -> Salvaged:
    """(outbox rows as COLUMNS, calls rows, finished rows, events lost or None if
    unknown, the calls whose hangup may have reached Zammad) of a damaged file. Read
    from a copy, so that the file moved aside stays as it was found (and a truncated
    one can be padded); with no room for a copy, from the file, read-only."""
    if not path.is_file():
        return [], [], [], None, ()
    try:
        with tempfile.TemporaryDirectory(prefix=".salvage-", dir=path.parent) as tmp:
            copy = Path(tmp) / "outbox.sqlite3"
            shutil.copyfile(path, copy)
            _pad_truncated(copy)
            if os.path.isfile(f"{path}-wal") and os.path.getsize(f"{path}-wal"):
                if _sound(copy):  # the file alone is whole: its -wal made the damage
                    return _without_wal(*_salvage_file(str(copy)))
                shutil.copyfile(f"{path}-wal", f"{copy}-wal")
            return _salvage_file(str(copy))
    except OSError as exc:
        log.warning("no room to copy the damaged outbox (%s); reading it in place", exc)
        return _salvage_file(path.resolve().as_uri() + "?mode=ro")


def _salvage_file(name: str) -> Salvaged:
    try:
        db = sqlite3.connect(name, isolation_level=None, uri=name.startswith("file:"))
        present = [r[1] for r in db.execute("PRAGMA table_info(outbox)")]
    except sqlite3.Error:
        return [], [], [], None, ()
    try:
        return _salvage_rows(db, present)
    finally:
        db.close()


def _sound(path: Path) -> bool:
    """Does this file (alone, without a -wal) pass SQLite's check and hold an outbox?"""
    try:
        db = sqlite3.connect(path, isolation_level=None)
        try:
            return [r[0] for r in db.execute("PRAGMA quick_check")] == ["ok"] and \
                db.execute("SELECT count(*) FROM outbox").fetchone() is not None
        finally:
            db.close()
    except sqlite3.Error:
        return False


def _without_wal(rows, calls, finished, lost, doubtful) -> Salvaged:
    """What the file held without its -wal (one from another database, say a backup
    restored beside a stale one, or damaged itself): the commits since its last
    checkpoint are lost, among them the deletes of events Zammad had taken and the
    ends of calls. So a missed call's hangup is not sent again blindly: one carried
    over is unsure, for the admin, and so is one the resync finds a carried call
    owes (the call may have ended, its hangup delivered, after that checkpoint)."""
    log.error("the outbox's -wal does not fit the outbox (another database's, or damaged): "
              "what the outbox held before it is carried over; a missed call's hangup from "
              "it may have reached Zammad already, so each is kept as unsure "
              "('fs-zammad outbox list')")
    state, error, once = (COLUMNS.index(c) for c in ("state", "last_error", "once"))
    carried = []
    for row in rows:
        if row[once] and row[state] == "pending":
            row = (*row[:state], "unsure", WITHOUT_WAL, *row[error + 1:])
        carried.append(row)
    return (carried, calls, finished, lost,
            tuple({*doubtful, *(call_id for call_id, _state in calls)}))


def _pad_truncated(path: Path) -> None:
    """A cut-off file: SQLite reads nothing of it, not even its schema, unless it
    is as long as its header says; zeros stand in for the missing pages."""
    with open(path, "r+b") as handle:
        header = handle.read(100)
        if len(header) < 100 or not header.startswith(b"SQLite format 3\0"):
            return
        page_size = int.from_bytes(header[16:18], "big")
        page_size = 65536 if page_size == 1 else page_size
        declared = int.from_bytes(header[28:32], "big") * page_size
        if 0 < declared <= 1 << 34 and os.path.getsize(path) < declared:
            handle.truncate(declared)


def _salvage_rows(db: sqlite3.Connection, present: list[str]) -> Salvaged:
    if "id" not in present:
        return [], [], [], None, ()
    # A file from before a column was added: its rows read as an upgrade reads them.
    old_rows = {name: value for name, _declaration, value in ADDED_COLUMNS}
    wanted = [c if c in present else f"{old_rows.get(c, '0')} AS {c}" for c in COLUMNS]
    read, unreadable = _readable(db, "outbox", ", ".join(wanted))
    rows = [row[1:] for row in read if _sound_row(row[1:])]
    calls = [row[1:] for row in _readable(db, "calls", "call_id, state")[0]
             if _sound_call(row[1:])]
    # Finished calls whose late events must stay ignored (their legs, as saved).
    finished = [row[1:] for row in _readable(db, "finished", "call_id, legs")[0]
                if _sound_call(row[1:])]
    try:  # the index usually survives a damaged table page: it knows how many there were
        total = db.execute("SELECT count(*) FROM outbox INDEXED BY outbox_by_call").fetchone()[0]
        lost = max(0, total - len(rows))
    except sqlite3.Error:
        lost = None if unreadable is None else unreadable + len(read) - len(rows)
    # Calls still marked from an earlier salvage without the -wal keep their mark.
    doubtful = tuple(row[1] for row in _readable(db, "doubtful", "call_id")[0]
                     if isinstance(row[1], str))
    return rows, calls, finished, lost, doubtful


def _sound_row(row: tuple) -> bool:
    """A row read from a damaged page may be half zeros: carry only whole ones."""
    values = dict(zip(COLUMNS, row))
    try:
        pairs = json.loads(values["fields"])
        return (values["event"] in ("newCall", "answer", "hangup", SIDE_JOB) and
                values["state"] in ("pending", "failed", "unsure") and
                isinstance(values["call_id"], str) and "\0" not in values["call_id"] and
                isinstance(values["created"], float) and
                all(isinstance(k, str) and isinstance(v, str) for k, v in pairs))
    except (ValueError, TypeError):
        return False


def _sound_call(row: tuple) -> bool:
    try:
        return isinstance(row[0], str) and isinstance(json.loads(row[1]), dict)
    except (ValueError, TypeError):
        return False


def _readable(db: sqlite3.Connection, table: str, columns: str
              ) -> tuple[list[tuple], int | None]:
    """Every row of ``table`` SQLite can still read, in rowid order, stepping over
    damaged pages one rowid at a time; also how many rowids could not be read
    (None: unknown, the table's end was unreadable)."""
    try:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?",
                          (table,)).fetchone():
            return [], 0
    except sqlite3.Error:
        return [], 0
    try:
        top = db.execute(f"SELECT max(rowid) FROM {table}").fetchone()[0] or 0
    except sqlite3.Error:
        top = None
    rows: list[tuple] = []
    unreadable, last = 0, 0
    # With the end unknown, stepping stops 10,000 rowids past the last row found:
    # only a row found moves that bound, so the search always ends.
    bound = top
    scan = f"SELECT rowid, {columns} FROM {table} WHERE rowid>? ORDER BY rowid"
    while True:
        try:
            for row in db.execute(scan, (last,)):
                if row[0] > last:  # a damaged page can point backwards
                    rows.append(row)
                    last = row[0]
            return rows, unreadable
        except sqlite3.Error:
            pass
        # The scan hit a damaged page after ``last``: find the next readable rowid.
        if top is None:
            bound = (rows[-1][0] if rows else 0) + 10_000
        while True:
            last += 1
            if last > bound:  # past the end; if the end is unknown, so is what was lost
                return rows, unreadable if top is not None else None
            try:
                found = db.execute(f"SELECT rowid, {columns} FROM {table} WHERE rowid=?",
                                   (last,)).fetchone()
            except sqlite3.Error:
                unreadable += 1
                continue
            if found:
                rows.append(found)
            break
