"""``fs-zammad capture``: record FreeSWITCH's events as ``replay`` reads them.

It logs in like the service (same settings, same connection code) and
subscribes to the same events (or ALL), then writes every event frame
exactly as it came off the socket: ``Content-Length`` and
``Content-Type: text/event-plain`` heads around the unchanged body. Only
event frames are written, so the login (and so the password) never is.
With ``--call`` only the legs of that call are kept: a CallTracker follows
the stream, as the service would, to know which legs belong to it.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import gevent
from gevent.event import Event

from fs_zammad.calls import CallTracker
from fs_zammad.esl import EslError, EslSupervisor
from fs_zammad.voicemail import events_read

FRAME_HEAD = b"Content-Length: %d\nContent-Type: text/event-plain\n\n"


class CallLegs:
    """Does an event belong to the call with this id (the Zammad callId)?"""

    def __init__(self, tracker: CallTracker, call_id: str):
        self.tracker = tracker
        self.call_id = call_id

    def _legs(self) -> set[str]:
        call = self.tracker.calls.get(self.call_id)
        return set(call.legs) if call is not None else {self.call_id}

    def __call__(self, headers) -> bool:
        uuid = headers.get("Unique-ID", "")
        before = self._legs()  # a leg that ends now is gone from the call after handle()
        self.tracker.handle(headers, time.time())
        return bool(uuid) and (uuid in before or uuid in self._legs())


def capture(settings, path: str, seconds: float | None, call_id: str | None,
            everything: bool) -> int:
    from fs_zammad.service import tracker_rules

    wanted = CallLegs(CallTracker(tracker_rules(settings)), call_id) if call_id else None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # calls are personal data
    except OSError as exc:
        print(f"fs-zammad capture: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return 1
    written = 0
    with os.fdopen(fd, "wb") as out:
        def write(body: bytes, headers) -> None:
            nonlocal written
            if wanted is None or wanted(headers):
                out.write(FRAME_HEAD % len(body) + body)
                out.flush()  # a capture cut short still replays
                written += 1

        supervisor = EslSupervisor(
            settings.freeswitch_host, settings.freeswitch_port, settings.freeswitch_password,
            settings.freeswitch_timeout,
            events=("ALL",) if everything else events_read(bool(settings.voicemail))[0],
            on_frame=write)
        try:
            conn = supervisor.connect()
        except EslError as exc:
            print(f"fs-zammad capture: {exc}", file=sys.stderr)
            return 1
        stop = Event()
        gevent.signal_handler(signal.SIGTERM, stop.set)
        gevent.signal_handler(signal.SIGINT, stop.set)
        print(f"capturing {supervisor.subscription} from FreeSWITCH {supervisor.address}"
              f"{f' for call {call_id}' if call_id else ''} to {path}; "
              f"{f'{seconds:g} s' if seconds else 'until Ctrl-C'}", flush=True)
        deadline = time.monotonic() + seconds if seconds else None
        while conn.connected and not stop.wait(0.2):
            if deadline is not None and time.monotonic() >= deadline:
                break
        lost = not conn.connected and not stop.is_set()
        conn.close()
    print(f"{written} events written to {path}; see them with: fs-zammad replay {path}",
          flush=True)
    if lost:
        print(f"fs-zammad capture: FreeSWITCH closed the connection "
              f"({conn.disconnect_reason or 'connection closed'})", file=sys.stderr)
        return 1
    return 0
