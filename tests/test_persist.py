"""What a kill -9 at any instant finds on disk, event by event.

The service writes a change of call state that owes Zammad nothing up to a
second later (with the next WAL checkpoint: Service.write_waiting_state) so
that several share one commit, and does not
write a call whose saved form did not change. That is safe only if, at every
instant, the file holds exactly the state after some prefix of the events
read, with every Zammad event of that prefix, and no prefix shorter than the
last event that owed Zammad something (those are committed before on_event
returns, so before anything can send them). These tests read the file as a
second process would after a kill, after every event of every recorded
scenario, with the delayed write firing never, always, or at random moments.
"""

from __future__ import annotations

import json
import random
import sqlite3

import gevent
import pytest

from fs_zammad import service as service_module
from fs_zammad.calls import TRACKED_EVENTS
from fs_zammad.config import load_settings
from tests.test_calls import RECORDED, capture

SCENARIOS = sorted(RECORDED)


@pytest.fixture
def service(tmp_path):
    settings = load_settings({"FREESWITCH_PASSWORD": "pw",
                              "ZAMMAD_CTI_URL": "http://127.0.0.1:9/api/v1/cti/tok",
                              "STATE_DIR": str(tmp_path / "state")})
    svc = service_module.Service(settings)   # not run: no FreeSWITCH, no delivery
    yield svc
    svc.outbox.close()


def on_disk(path: str) -> tuple[dict, list]:
    """What a restart would load: call states, and the Zammad events in order."""
    db = sqlite3.connect(path)
    try:
        calls = dict(db.execute("SELECT call_id, state FROM calls"))
        events = db.execute("SELECT call_id, fields FROM outbox ORDER BY id").fetchall()
    finally:
        db.close()
    return calls, events


def replay(svc, scenario: str, flush: str, seed: int = 0):
    """Feed a scenario event by event; after each, check the file against every prefix."""
    rng = random.Random(seed)
    tracker = svc.tracker
    # prefix k (events 0..k-1 handled): the call states and the Zammad events owed so far
    prefixes = [({}, [])]
    must_reach = 0   # the shortest prefix the file may show: the last one that owed Zammad
    records = []
    real_record = svc.outbox.record
    svc.outbox.record = lambda *a, **k: records.append(a) or real_record(*a, **k)
    for k, headers in enumerate(capture(scenario), start=1):
        before = len(prefixes[-1][1])
        owed = list(prefixes[-1][1])
        handled = tracker.handle   # the service's own path, watching what it returns

        def spy(h, now, handled=handled, owed=owed):
            out = handled(h, now)
            owed.extend((e.call_id, json.dumps(e.fields)) for e in out)
            return out
        tracker.handle = spy
        svc.on_event(headers)
        tracker.handle = handled
        prefixes.append((tracker.saved_rows(), owed))
        if len(owed) > before:
            must_reach = k
        if flush == "always" or (flush == "random" and rng.random() < 0.4):
            svc.write_waiting_state()
        calls, events = on_disk(svc.outbox.path)
        events = [(c, f) for c, f in events]
        shown = [j for j, (state, zammad) in enumerate(prefixes)
                 if calls == state and [tuple(e) for e in events] == [tuple(e) for e in zammad]]
        assert shown, f"{scenario} after event {k}: the file matches no prefix of the events"
        assert max(shown) >= must_reach, (
            f"{scenario} after event {k}: a Zammad event of event {must_reach} is not on disk")
    svc.write_waiting_state()
    calls, _ = on_disk(svc.outbox.path)
    assert calls == prefixes[-1][0], f"{scenario}: the last state never reached the file"
    return records, prefixes


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("flush", ["never", "always", "random"])
def test_the_file_always_holds_a_prefix_of_the_events(service, scenario, flush):
    replay(service, scenario, flush, seed=hash(scenario) & 0xFFFF)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_commit_only_when_the_saved_form_or_zammad_is_owed_something(service, scenario):
    records, prefixes = replay(service, scenario, "always")
    changed = sum(1 for before, after in zip(prefixes, prefixes[1:]) if before != after)
    assert len(records) == changed
    tracked = sum(1 for h in capture(scenario) if h.get("Event-Name") in
                  TRACKED_EVENTS)
    assert len(records) < tracked, "events that changed nothing were written"


def test_shutdown_writes_state_that_waits(service):
    for headers in capture("S1")[:3]:     # the A-leg is created: state only, no Zammad event
        service.on_event(headers)
    assert on_disk(service.outbox.path)[0] == {}
    service._shutdown([], None, gevent.spawn(lambda: None))
    db = sqlite3.connect(service.outbox.path)
    try:
        assert db.execute("SELECT count(*) FROM calls").fetchone()[0] == 1
    finally:
        db.close()


def test_the_running_service_writes_waiting_state_with_the_checkpoint(service, monkeypatch):
    monkeypatch.setattr(service_module, "CHECKPOINT_INTERVAL", 0.01)
    loop = gevent.spawn(service._checkpoint_loop)
    try:
        for headers in capture("S1")[:3]:
            service.on_event(headers)
        assert on_disk(service.outbox.path)[0] == {}
        gevent.sleep(0.1)
        assert list(on_disk(service.outbox.path)[0]) == list(service.tracker.calls)
    finally:
        service.stop_requested.set()
        loop.join(timeout=5)
