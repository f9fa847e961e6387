#!/usr/bin/env python3
"""Micro-benchmarks of fs_zammad's per-call work, in-process, no sockets.

Explains the end-to-end CPU figure stage by stage for one S1 call (the 13
frames fs-zammad subscribes, 3 POSTs), and prices the fixes proposed in
bench/README.md with stand-in code that lives here, not in fs_zammad:

* parse: ``wire.parse_event_plain`` as is; with ``unquote`` only for values
  that contain ``%``; and parsing only the headers the tracker reads.
* tracker: ``CallTracker.handle`` for the 13 frames.
* persist: what ``Service._store`` does per event (``Call.to_json`` for every
  dirty call + one ``Outbox.record`` transaction) on a WAL file in a temp
  dir, with the per-transaction p50/p99/max (WAL checkpoints fsync); and the
  same events committed once per call (group commit) for comparison.
* delivery bookkeeping: ``Outbox.ready`` + ``Outbox.delivered`` per POST.
* memory: bytes held per queued event, raw frame vs parsed dict.

    .venv/bin/python bench/micro.py [--calls 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import CallTemplate  # noqa: E402

# fs_zammad is imported in main(), after --rev has put a revision first on sys.path
wire = CallTracker = Outbox = None


def subscribed() -> list[str]:
    """The channel events the tracker reads (fs-zammad subscribes these + HEARTBEAT)."""
    try:  # noqa: SIM105
        from fs_zammad.calls import TRACKED_EVENTS
        return list(TRACKED_EVENTS) + ["HEARTBEAT"]
    except ImportError:
        return ["CHANNEL_CREATE", "CHANNEL_EXECUTE", "CHANNEL_ANSWER", "CHANNEL_BRIDGE",
                "CHANNEL_HANGUP_COMPLETE", "HEARTBEAT"]


def bodies_for(tmpl: CallTemplate, calls: int, tag: int = 7) -> list[list[str]]:
    out = []
    for c in range(calls):
        frames = tmpl.call_frames(c, tag)
        out.append([f.split(b"\n\n", 1)[1].decode() for f in frames])
    return out


def parse_pct_only(body: str) -> dict[str, str]:
    """parse_event_plain, but unquote() only values that contain '%'."""
    headers: dict[str, str] = {}
    for line in body.split("\n"):
        name, sep, value = line.partition(": ")
        if not sep:
            continue
        if name not in headers:
            headers[name] = unquote(value) if "%" in value else value
    return headers


def timed(fn, repeat: int = 1) -> float:
    best = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return best


def deep_size(obj) -> int:
    """Bytes held by an object and what it references (dicts, sequences, slots)."""
    seen = set()

    def size(o):
        if id(o) in seen:
            return 0
        seen.add(id(o))
        n = sys.getsizeof(o)
        if isinstance(o, dict):
            n += sum(size(k) + size(v) for k, v in o.items())
        elif isinstance(o, (list, tuple, set, frozenset)):
            n += sum(size(v) for v in o)
        elif not isinstance(o, (str, bytes, int, float)):
            for slot in getattr(type(o), "__slots__", ()):
                if hasattr(o, slot):
                    n += size(getattr(o, slot))
            if hasattr(o, "__dict__"):
                n += size(vars(o))
        return n
    return size(obj)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--json", default="")
    ap.add_argument("--rev", default="", help="measure this git revision of fs_zammad")
    args = ap.parse_args(argv)
    calls = args.calls
    global wire, CallTracker, Outbox
    if args.rev:
        import atexit
        import shutil

        from run import extract_rev
        code_dir, sha = extract_rev(args.rev)
        atexit.register(shutil.rmtree, code_dir, True)
        sys.path.insert(0, code_dir)
        print(f"fs_zammad at {sha[:12]} ({args.rev})")
    from fs_zammad import wire
    from fs_zammad.calls import CallTracker
    from fs_zammad.outbox import Outbox
    try:  # the product's own filter (revisions after 6fd0d0d)
        from fs_zammad.calls import HEADER_PREFIXES_READ, HEADERS_READ
        keep = wire.HeaderFilter(HEADERS_READ, HEADER_PREFIXES_READ)
        wanted = keep.names

        def parse_wanted(body):
            return wire.parse_event_plain(body, keep)
    except (ImportError, AttributeError):  # older revisions: decode everything
        wanted, parse_wanted = frozenset(), wire.parse_event_plain

    sub = subscribed()
    tmpl = CallTemplate(set(sub))
    frames = tmpl.frames_per_call
    bodies = bodies_for(tmpl, calls)
    flat = [b for call in bodies for b in call]
    res: dict = {"calls": calls, "frames_per_call": frames, "subscription": sub,
                 "headers_per_frame_avg": round(statistics.mean(
                     len(wire.parse_event_plain(b)) for b in bodies[0]), 1),
                 "headers_read_by_tracker": len(wanted)}

    def per_call_us(seconds: float) -> float:
        return round(seconds / calls * 1e6, 1)

    # -- parse --------------------------------------------------------------
    res["parse_current_us_per_call"] = per_call_us(timed(
        lambda: [wire.parse_event_plain(b) for b in flat], 3))
    res["parse_pct_only_us_per_call"] = per_call_us(timed(
        lambda: [parse_pct_only(b) for b in flat], 3))
    res["parse_wanted_only_us_per_call"] = per_call_us(timed(
        lambda: [parse_wanted(b) for b in flat], 3))
    # same answers for the tracker?
    check = CallTracker(), CallTracker()
    same = True
    for call in bodies[:50]:
        for b in call:
            a = check[0].handle(wire.parse_event_plain(b), 0.0)
            w = check[1].handle(parse_wanted(b), 0.0)
            same = same and [e.fields for e in a] == [e.fields for e in w]
    res["parse_wanted_same_zammad_events"] = same

    # -- tracker --------------------------------------------------------------
    parsed = [[wire.parse_event_plain(b) for b in call] for call in bodies]
    tracker = CallTracker()

    def track():
        for call in parsed:
            for h in call:
                tracker.handle(h, 0.0)
                tracker.dirty.clear()
    res["tracker_us_per_call"] = per_call_us(timed(track))

    # -- persist (what Service._store does) ----------------------------------------
    tmp = Path(tempfile.mkdtemp(prefix="fszmicro-"))
    outbox = Outbox(tmp / "outbox.sqlite3", 10**9)
    tracker = CallTracker()
    to_json_s = 0.0
    record_times = []
    emitted = 0
    t_all = time.perf_counter()
    for call in parsed:
        for h in call:
            events = tracker.handle(h, time.time())
            emitted += len(events)
            if not events and not tracker.dirty:
                continue
            t0 = time.perf_counter()
            upserts, deletes = tracker.dirty_rows()
            tracker.dirty.clear()
            t1 = time.perf_counter()
            outbox.record(events, upserts, deletes)
            t2 = time.perf_counter()
            to_json_s += t1 - t0
            record_times.append(t2 - t1)
    persist_total = time.perf_counter() - t_all
    res["events_emitted_per_call"] = emitted / calls
    res["transactions_per_call"] = len(record_times) / calls
    res["to_json_us_per_call"] = per_call_us(to_json_s)
    res["record_us_per_call"] = per_call_us(sum(record_times))
    res["record_txn_us"] = {"p50": round(statistics.median(record_times) * 1e6, 1),
                            "p99": round(sorted(record_times)[int(len(record_times) * .99)] * 1e6, 1),
                            "max": round(max(record_times) * 1e6, 1)}
    res["track_and_persist_us_per_call"] = per_call_us(persist_total)

    # -- delivery bookkeeping: ready + delivered per POST ------------------------------
    posted = 0
    t0 = time.perf_counter()
    while True:
        rows = outbox.ready(8, {})
        if not rows:
            break
        for row in rows:
            outbox.delivered(row.id)
            posted += 1
    res["ready_delivered_us_per_post"] = round((time.perf_counter() - t0) / max(posted, 1) * 1e6, 1)
    res["posts"] = posted
    outbox.close()

    # -- group commit: one transaction per call instead of one per event ------------
    outbox2 = Outbox(tmp / "outbox2.sqlite3", 10**9)
    tracker = CallTracker()
    t_all = time.perf_counter()
    for call in parsed:
        events = []
        for h in call:
            events += tracker.handle(h, time.time())
        outbox2.record(events, *tracker.dirty_rows())
        tracker.dirty.clear()
    res["track_and_persist_group_commit_us_per_call"] = per_call_us(time.perf_counter() - t_all)
    outbox2.close()
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)

    # -- memory per queued event ---------------------------------------------------
    raw = [len(f) for f in tmpl.call_frames(0, 1)]
    dicts = [deep_size(wire.parse_event_plain(b)) for b in bodies[0]]
    res["queued_bytes_per_event"] = {"raw_frame": round(statistics.mean(raw)),
                                     "parsed_dict": round(statistics.mean(dicts)),
                                     "wanted_only_dict": round(statistics.mean(
                                         deep_size(parse_wanted(b)) for b in bodies[0]))}
    res["queued_mb_per_1000_calls_parsed"] = round(sum(dicts) * 1000 / 2**20, 1)

    for line in format_micro(res):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


def format_micro(res: dict) -> list[str]:
    q = res["queued_bytes_per_event"]
    return [
        f"per S1 call ({res['frames_per_call']} frames, avg {res['headers_per_frame_avg']} "
        f"headers; tracker reads {res['headers_read_by_tracker']} header names):",
        f"  parse_event_plain (current)           {res['parse_current_us_per_call']:8.1f} µs",
        f"  parse, unquote only values with '%'   {res['parse_pct_only_us_per_call']:8.1f} µs",
        f"  parse, only the headers tracker reads {res['parse_wanted_only_us_per_call']:8.1f} µs"
        f"  (same Zammad events: {res['parse_wanted_same_zammad_events']})",
        f"  CallTracker.handle                    {res['tracker_us_per_call']:8.1f} µs",
        f"  Call.to_json (per dirty call/event)   {res['to_json_us_per_call']:8.1f} µs",
        f"  Outbox.record ({res['transactions_per_call']:.0f} transactions)     "
        f"{res['record_us_per_call']:8.1f} µs   (per txn p50 {res['record_txn_us']['p50']} µs, "
        f"p99 {res['record_txn_us']['p99']} µs, max {res['record_txn_us']['max']} µs)",
        f"  track + persist, as _store does       {res['track_and_persist_us_per_call']:8.1f} µs",
        f"  track + persist, one txn per call     "
        f"{res['track_and_persist_group_commit_us_per_call']:8.1f} µs",
        f"  Outbox.ready + delivered per POST     {res['ready_delivered_us_per_post']:8.1f} µs",
        f"  memory per queued event: raw frame {q['raw_frame']} B, parsed dict "
        f"{q['parsed_dict']} B, wanted-only dict {q['wanted_only_dict']} B "
        f"({res['queued_mb_per_1000_calls_parsed']} MB per 1000 calls queued parsed)",
    ]


if __name__ == "__main__":
    sys.exit(main())
