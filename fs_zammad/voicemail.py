"""A message left in a mailbox -> a ticket job for the outbox (pure).

mod_voicemail fires ``CUSTOM vm::maintenance`` with ``VM-Action:
leave-message`` once the recording is on disk, while the caller's leg
(``VM-UUID``) is still up: the tracker still knows which Zammad call that
leg belongs to, also after a transfer or when the leg is not the call's
first one. The job is one more outbox row of that call (event
``voicemail``), behind its ``newCall``: Zammad's caller log has matched the
caller only once newCall is processed. It holds the path of the recording,
never the audio; tickets.py turns it into the ticket.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Mapping, Sequence

from fs_zammad.calls import HEADERS_READ as TRACKER_HEADERS
from fs_zammad.calls import TRACKED_EVENTS, Call, TrackerRules, ZammadEvent
from fs_zammad.numbers import clean_fields, to_e164
from fs_zammad.outbox import SIDE_JOB as JOB  # the outbox event name of a ticket job

#: The subscription (after every plain event name: FreeSWITCH reads the words
#: after CUSTOM as subclass names).
SUBSCRIPTION = "CUSTOM vm::maintenance"
SUBCLASS = "vm::maintenance"
#: The headers read here (added to what the service parses of an event).
HEADERS_READ = frozenset("""Event-Subclass VM-Action VM-UUID VM-File-Path VM-Caller-ID-Number
    VM-Caller-ID-Name VM-Message-Len VM-Timestamp VM-User VM-Domain""".split())


def events_read(tickets: bool) -> tuple[tuple[str, ...], frozenset[str]]:
    """(the events to subscribe, the headers to parse): the tracker's, plus
    mod_voicemail's when voicemail tickets are on."""
    if not tickets:
        return TRACKED_EVENTS, TRACKER_HEADERS
    return (*TRACKED_EVENTS, SUBSCRIPTION), TRACKER_HEADERS | HEADERS_READ


_MESSAGE_FILE = re.compile(r"^msg_([0-9A-Za-z-]{8,64})\.[0-9A-Za-z]+$")


def left_message(headers: Mapping[str, str]) -> bool:
    return (headers.get("Event-Name") == "CUSTOM" and headers.get("Event-Subclass") == SUBCLASS
            and headers.get("VM-Action") == "leave-message")


def map_path(path: str, path_map: Sequence[tuple[str, str]]) -> str:
    """FreeSWITCH's path -> where fs_zammad finds the file (VOICEMAIL_PATH_MAP,
    longest prefix first, whole path components only)."""
    for source, target in path_map:
        if path == source or path.startswith(source.rstrip("/") + "/"):
            rest = path[len(source):].lstrip("/")
            return str(PurePosixPath(target) / rest) if rest else target
    return path


def message_marker(file_path: str, leg: str, timestamp: str) -> str:
    """A text only this message's ticket has: mod_voicemail names each file
    ``msg_<uuid>.<ext>``; without that, the caller leg and the time."""
    found = _MESSAGE_FILE.match(PurePosixPath(file_path).name)
    return f"vm-{found.group(1)}" if found else f"vm-{leg}-{timestamp}"


def _value(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name, "")
    return "" if value == "_undef_" else value.strip()


def ticket_job(headers: Mapping[str, str], call: Call | None, rules: TrackerRules,
               path_map: Sequence[tuple[str, str]] = ()) -> tuple[ZammadEvent | None, str]:
    """(the job, "") or (None, why there is none) for one leave-message event
    and the call its ``VM-UUID`` leg belongs to (None: no call known)."""
    leg = _value(headers, "VM-UUID") or _value(headers, "Unique-ID")
    if call is None:
        return None, f"leg {leg or '?'} belongs to no call being followed"
    if call.direction != "in" or "newCall" not in call.sent or call.instance is None:
        return None, "its call is not one Zammad knows (internal, ignored or not routed)"
    fs_path = _value(headers, "VM-File-Path")
    if not fs_path:
        return None, "the event names no recording (VM-File-Path)"
    timestamp = _value(headers, "VM-Timestamp")
    mailbox = "@".join(filter(None, (_value(headers, "VM-User"), _value(headers, "VM-Domain"))))
    fields, _problems = clean_fields([
        ("event", JOB), ("direction", "in"), ("callId", call.call_id),
        # The caller as the call's newCall named them (a transfer may have changed
        # the caller id FreeSWITCH shows since).
        ("from", call.caller or _value(headers, "VM-Caller-ID-Number")),
        ("to", call.dialed),
        ("name", _value(headers, "VM-Caller-ID-Name")),
        ("mailbox", mailbox),
        ("seconds", _value(headers, "VM-Message-Len")),
        ("time", timestamp),
        ("file", map_path(fs_path, path_map)),
        ("fs_file", fs_path),
        ("marker", message_marker(fs_path, leg, timestamp)),
    ], lambda number: to_e164(number, rules.country_code, rules.national_prefix))
    return ZammadEvent(dict(fields)["callId"], tuple(fields), call.instance or ""), ""
