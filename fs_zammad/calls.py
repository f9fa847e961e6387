"""Call tracking: FreeSWITCH channel events in, Zammad CTI events out (pure).

FreeSWITCH reports *legs* (channels); Zammad wants *calls*. A call starts
with its root leg (usually the ``inbound`` channel that entered FreeSWITCH)
and gathers every leg linked to it: bridged B-legs (``Other-Leg-Unique-ID``,
``variable_originating_leg_uuid``), mod_callcenter agent legs
(``variable_cc_member_session_uuid``), the far half of loopback channels, and
legs bridged in later (pickup, attended transfer, an agent taking a mod_fifo
caller). The call ends when its last leg has hung up, so the cause can use
everything the legs reported, and an agent hanging up first, a transfer or a
lost ring-group race ends nothing.

Events arrive in any order and some twice (a reconnect, a replay). A leg
seen before the leg it belongs to (a B-leg, or the inbound half of a loopback
a call started: ``other_loopback_from_uuid``) waits in a placeholder call
keyed by that leg's uuid. When that leg shows up, its own event may name yet
another call as its parent (the carrier leg of a follow-me waited for the
loopback half, which names the caller's call): the placeholder's legs then
join that call, or are finished with it if it has ended. A placeholder that
waited for a loopback half no event of which ever came is dropped, not sent
(see :meth:`CallTracker._owed`). Legs of finished calls are remembered
(FINISHED_MEMORY): their late events, and any new leg that names one of them
as its parent, are dropped, so replayed events or the hangups alone of a call
never make a second Zammad call (nor a B-leg a call of its own). The memory
survives a restart: the outbox keeps the legs of the latest finished calls
(:class:`FinishedCall`, :meth:`CallTracker.take_finished`) beside the calls in
progress.

Who a person is belongs to their leg, not to the call: FreeSWITCH puts a
directory user's ``zammad_user`` variable on that user's own calls and on
legs dialled with ``user/<ext>``, so in a ring group every ringing phone's leg
carries its own value. The leg that answered names the agent Zammad hears
about on ``answer`` (its ``zammad_user``, else ``ZAMMAD_AGENTS`` for its
extension); on an outbound call the agent's own leg names ``user`` on
``newCall``. A ``zammad_user`` the dialplan sets on a carrier caller's leg
names the called agent of that call and is the fallback for its answer.

The Zammad call id is the root leg's uuid. What Zammad is owed is derived
from the call's state by :meth:`CallTracker._owed`: ``newCall`` once the
direction is known and the call is routed, ``answer`` once a person (or
voicemail) picked up, ``hangup`` once every leg is gone — each exactly once,
in that order. A call that ended in voicemail before any person answered
hangs up with cause ``voicemail``.

Nothing here does I/O: the shell feeds header dicts and a clock and persists
``dirty`` calls (:meth:`CallTracker.dirty_rows`); the tests feed recorded events.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Iterable, Mapping

from fs_zammad.causes import CallEnd, call_cause, cause_to_zammad
from fs_zammad.numbers import clean_fields, to_e164

Headers = Mapping[str, str]

log = logging.getLogger(__name__)

#: Dialplan applications that prepare a call rather than route it: newCall
#: waits until the first other application, so that ``set zammad_queue=...``
#: and friends are already on the channel.
SETUP_APPS = frozenset("""set export unset multiset push unshift set_global set_profile_var
    set_user set_zombie_exec log info hash db limit limit_hash event sched_hangup
    sched_transfer bind_meta_app bind_digit_action digit_action_set_realm enable_heartbeat
    record_session set_audio_level set_mute jitterbuffer eval""".split())

#: Leg variables that name the leg this one was created for, in order of trust.
_PARENT_KEYS = ("variable_cc_member_session_uuid", "variable_originating_leg_uuid",
                "variable_other_loopback_leg_uuid", "variable_other_loopback_from_uuid")

DIRECTIONS = ("in", "out", "ignore")

#: Every header the tracker reads (and so all the service parses of an event:
#: about 30 of FreeSWITCH's ~150); tests/test_calls.py checks the list.
HEADERS_READ = frozenset("""Event-Name Unique-ID Call-Direction Caller-Context Channel-Name
    Caller-Caller-ID-Number Caller-Orig-Caller-ID-Number Caller-Destination-Number
    Caller-Callee-ID-Number Caller-Channel-Answered-Time Answer-State Application Application-Data Hangup-Cause
    Other-Leg-Unique-ID Other-Leg-Direction Other-Leg-Channel-Name Other-Leg-Caller-ID-Number
    Other-Leg-Destination-Number variable_cc_agent variable_cc_queue
    variable_cc_member_session_uuid variable_originating_leg_uuid
    variable_other_loopback_leg_uuid variable_other_loopback_from_uuid
    variable_current_application variable_dialed_user variable_domain_name
    variable_hangup_cause variable_last_bridge_hangup_cause variable_originate_disposition
    variable_sip_gateway variable_sip_gateway_name variable_sip_hangup_disposition
    variable_sip_req_user variable_user_name variable_voicemail_message_len""".split())
#: ...and every channel variable the dialplan sets for us.
HEADER_PREFIXES_READ = ("variable_zammad_",)

#: How many finished legs are remembered to ignore their late events: late
#: means milliseconds, and 5,000 legs are half a minute at 100 calls/s. The
#: outbox keeps as many finished calls (FinishedCall rows, a few hundred KB) for a restart.
FINISHED_MEMORY = 5_000

#: Causes kept of a call's ended legs (a queue call can ring hundreds).
MAX_CAUSES = 20

#: The channel events the tracker reads; the service subscribes to exactly these.
TRACKED_EVENTS = ("CHANNEL_CREATE", "CHANNEL_EXECUTE", "CHANNEL_ANSWER", "CHANNEL_BRIDGE",
                  "CHANNEL_HANGUP_COMPLETE")


@dataclass(frozen=True)
class TrackerRules:
    """What the admin configured about the PBX layout."""

    external_contexts: frozenset[str] = frozenset({"public"})
    external_profiles: frozenset[str] = frozenset({"external"})
    country_code: str = ""
    national_prefix: str = "0"
    queue_keep_domain: bool = False
    max_call_seconds: float = 4 * 3600
    cause_mapper: object = cause_to_zammad
    instances: frozenset[str] = frozenset({""})  # Zammad systems; "" = ZAMMAD_CTI_URL
    routes: tuple[tuple[str, str, str], ...] = ()  # (did|domain, glob, instance)
    # ZAMMAD_AGENTS: extension (or extension@domain) -> Zammad login
    agents: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ZammadEvent:
    """One request Zammad is owed: ``fields`` in the order they are sent."""

    call_id: str
    fields: tuple[tuple[str, str], ...]
    instance: str = ""  # which Zammad system (ZAMMAD_INSTANCES); "" = ZAMMAD_CTI_URL
    #: A second copy would change what Zammad shows: the hangup of an inbound
    #: call nobody answered (see :func:`hangup_sent_once`).
    once: bool = False

    @property
    def name(self) -> str:
        return dict(self.fields)["event"]

    def get(self, key: str, default: str = "") -> str:
        return dict(self.fields).get(key, default)


@dataclass
class Leg:
    uuid: str
    external: bool = False   # reaches outside: a gateway or an external profile
    loopback: bool = False   # half of a loopback channel: never a person
    party: str = ""          # the number/extension on this leg's far side
    agent: str = ""          # mod_callcenter agent name, if any
    inbound: bool = False    # a phone's own call (Call-Direction inbound)
    user: str = ""           # zammad_user on this leg (directory variable or dialplan)
    answered: bool = False   # CHANNEL_ANSWER seen (or answered when listed)
    ended: bool = False


@dataclass
class Call:
    call_id: str
    started: float
    root_external: bool
    caller: str
    dialed: str
    local_user: str
    direction: str = ""          # "", in, out, ignore
    routed: bool = False
    queue: str = ""
    agent_leg: str = ""          # out calls: the agent's leg when it is not the root
    out_to: str = ""
    answered: bool = False
    answered_by: str = ""
    answering_number: str = ""
    answered_user: str = ""      # Zammad login of who answered, if known (zammad_user, map)
    voicemail: bool = False
    forwarded: bool = False
    root_end: dict = field(default_factory=dict)
    other_causes: list = field(default_factory=list)
    lost_end: bool = False       # some leg ended unseen (reconnect gap, expiry)
    domain: str = ""             # variable_domain_name (multi-tenant PBXs)
    company_number: str = ""     # caller id the outside leg presents (out calls)
    instance: str | None = None  # zammad_instance, or chosen by the routes at newCall
    root_seen: bool = True       # False while only B-legs of this call have been seen
    legs: dict = field(default_factory=dict)  # uuid -> Leg
    sent: list = field(default_factory=list)  # names of the Zammad events emitted

    @property
    def ended(self) -> bool:
        return all(leg.ended for leg in self.legs.values())

    def to_json(self) -> str:
        # vars() rather than dataclasses.asdict(): this runs for every event.
        data = {**vars(self), "legs": {uuid: vars(leg) for uuid, leg in self.legs.items()}}
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Call":
        """Saved state; fields this version does not know are dropped."""
        data = json.loads(text)
        leg_fields = {f.name for f in dataclasses.fields(Leg)}
        data["legs"] = {uuid: Leg(**{k: v for k, v in leg.items() if k in leg_fields})
                        for uuid, leg in data["legs"].items()}
        call_fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in call_fields})


@dataclass(frozen=True)
class FinishedCall:
    """The legs of a finished call, kept in the outbox's ``finished`` table
    (the latest FINISHED_MEMORY calls): a restart still drops the call's late
    events and the B-legs a resync lists."""

    call_id: str
    legs: tuple[str, ...]

    def to_json(self) -> str:
        return json.dumps({"call_id": self.call_id, "finished": self.legs},
                          separators=(",", ":"))


def saved_state(text: str) -> Call | FinishedCall:
    """A row of the outbox's ``calls`` table: a call in progress or a finished one."""
    data = json.loads(text)
    if isinstance(data, dict) and "finished" in data:
        return FinishedCall(str(data["call_id"]), tuple(str(uuid) for uuid in data["finished"]))
    return Call.from_json(text)


def _h(headers: Headers, *names: str) -> str:
    for name in names:
        value = headers.get(name, "")
        if value and value != "_undef_":
            return value
    return ""


def _strip_domain(name: str) -> str:
    return name.split("@", 1)[0]


class CallTracker:
    """Follows every call; ``handle()`` returns the Zammad events now owed.

    ``dirty`` collects the ids of calls changed since the caller last cleared
    it (live ones in ``calls``, finished ones gone), so the shell can persist
    exactly those.
    """

    def __init__(self, rules: TrackerRules | None = None,
                 calls: Iterable[Call | FinishedCall] = ()):
        self.rules = rules or TrackerRules()
        self.calls: dict[str, Call] = {}
        self._leg_call: dict[str, str] = {}
        # Legs of calls already finished (leg -> its call's id), oldest first:
        # a late event for one of them must not start a second Zammad call.
        self._finished: OrderedDict[str, str] = OrderedDict()
        self._finished_legs: dict[str, list[str]] = {}  # call_id -> its legs, as saved
        self._newly_finished: list[tuple[str, str]] = []  # (call_id, FinishedCall json)
        self.dirty: set[str] = set()
        self._cleaned_logged: set[tuple[str, str]] = set()  # (field, problem) already logged
        for saved in calls:
            if isinstance(saved, FinishedCall):
                for uuid in saved.legs:
                    self._remember_finished(uuid, saved.call_id)
            else:
                self._adopt(saved)
        self.dirty.clear()  # what was loaded is on disk already

    # -- public ---------------------------------------------------------

    def handle(self, headers: Headers, now: float) -> list[ZammadEvent]:
        name = headers.get("Event-Name", "")
        uuid = headers.get("Unique-ID", "")
        if not uuid or name not in TRACKED_EVENTS:
            return []
        call = self._call_of(uuid)
        if call is None:
            parent, finished_call = self._parent(headers)
            finished_call = self._finished.get(uuid) or finished_call
            if finished_call:
                self._remember_finished(uuid, finished_call)
                return []
            call = self._new_leg(headers, now, parent)
        elif uuid == call.call_id and not call.root_seen:
            call = self._placeholder_root(call, headers, now)
            if call is None:
                return []
        leg = call.legs[uuid]
        is_root = uuid == call.call_id
        if is_root and not call.root_seen:
            self._take_root(call, headers)
        leg.user = _h(headers, "variable_zammad_user") or leg.user
        self._read_variables(call, headers)

        if name == "CHANNEL_EXECUTE" and is_root:
            self._on_execute(call, headers)
        elif name == "CHANNEL_ANSWER":
            leg.answered = True
            if is_root and not leg.external:
                call.routed = True  # FreeSWITCH itself answered (IVR, queue): not a person
            else:
                self._person_answered(call, leg)
        elif name == "CHANNEL_BRIDGE":
            call = self._on_bridge(call, leg, headers)
        elif name == "CHANNEL_HANGUP_COMPLETE":
            self._on_hangup(call, leg, headers, is_root)
        return self._owed(call)

    def reconcile(self, live: Iterable[Headers], now: float, known: Iterable[str] | None = None,
                  skip: Iterable[str] = ()) -> list[ZammadEvent]:
        """Align with FreeSWITCH after a gap in the event stream.

        ``live`` is what ``show channels as json`` listed, as CHANNEL_CREATE
        style headers (see :func:`channels_to_headers`). Legs we followed
        (of ``known``, the legs known when the list was asked for) that are
        not live ended unseen; live channels we never heard of started
        unseen. Legs in ``skip`` had events since the list was asked for:
        those events are the truth.
        """
        live = list(live)
        live_ids = {h.get("Unique-ID", "") for h in live}
        known = self.leg_ids() if known is None else set(known)
        skip = set(skip)
        events: list[ZammadEvent] = []
        answered_now = {h.get("Unique-ID") for h in live if h.get("Answer-State") == "answered"}
        for call in list(self.calls.values()):
            for leg in list(call.legs.values()):
                if leg.ended or leg.uuid not in known or leg.uuid in skip:
                    continue
                if leg.uuid not in live_ids:
                    leg.ended = True
                    call.lost_end = True
                elif leg.uuid in answered_now and leg.uuid != call.call_id:
                    leg.answered = True     # picked up while we were away
                    self._person_answered(call, leg)
            events += self._owed(call)
        for headers in live:
            uuid = headers.get("Unique-ID", "")
            if not uuid or uuid in skip or uuid in self._finished or self._call_of(uuid):
                continue
            if headers.get("Call-Direction") == "outbound" and "Other-Leg-Unique-ID" not in headers:
                # A ringing B-leg is listed without its A-leg: its next event links it.
                continue
            events += self.handle({**headers, "Event-Name": "CHANNEL_CREATE"}, now)
            call = self._call_of(uuid)
            if call is None:
                continue
            call.routed = True
            if headers.get("Answer-State") == "answered":
                events += self.handle({**headers, "Event-Name": "CHANNEL_ANSWER"}, now)
            else:
                events += self._owed(call)
        return events

    def dirty_rows(self) -> tuple[list[tuple[str, str]], list[str]]:
        """The changed calls to save: ([(call_id, json)], [ended call_id]).

        The caller clears ``dirty`` once they are written."""
        upserts, deletes = [], []
        for call_id in self.dirty:
            call = self.calls.get(call_id)
            if call is None:
                deletes.append(call_id)
            else:
                upserts.append((call_id, call.to_json()))
        return upserts, deletes

    def take_finished(self) -> list[tuple[str, str]]:
        """Calls finished since the last call: (call_id, :class:`FinishedCall` json), to be
        kept beside the calls in progress (the latest FINISHED_MEMORY of them), so that a
        restart still ignores their late events."""
        finished, self._newly_finished = self._newly_finished, []
        return finished

    def saved_rows(self) -> dict[str, str]:
        """Every row of the ``calls`` table (the calls in progress) once the dirty ones
        are written."""
        return {call_id: call.to_json() for call_id, call in self.calls.items()}

    def leg_ids(self) -> set[str]:
        return set(self._leg_call)

    def call_of_leg(self, uuid: str) -> Call | None:
        """The call a leg belongs to now (None: not followed, or ended)."""
        return self._call_of(uuid)

    def expire(self, now: float) -> list[ZammadEvent]:
        """End calls older than ``max_call_seconds`` (their hangup was lost)."""
        events: list[ZammadEvent] = []
        for call in list(self.calls.values()):
            if now - call.started > self.rules.max_call_seconds:
                for leg in call.legs.values():
                    leg.ended = True
                call.lost_end = True
                events += self._owed(call)
        return events

    # -- legs and calls ---------------------------------------------------

    def _call_of(self, uuid: str) -> Call | None:
        call_id = self._leg_call.get(uuid)
        return self.calls.get(call_id) if call_id else None

    @staticmethod
    def _parent_keys(h: Headers) -> tuple[str, ...]:
        """The headers that may name the leg this one belongs to, most trusted first."""
        if h.get("Call-Direction") == "outbound":
            return _PARENT_KEYS + ("Other-Leg-Unique-ID",)
        return _PARENT_KEYS

    def _parent(self, h: Headers, exclude: Call | None = None) -> tuple[Call | None, str]:
        """The call this leg belongs to, by the first leg it names that we know
        (a leg that ended while its call goes on counts): (the live call, "")
        or (None, the id of the finished call: its late or replayed events, or
        only its hangup, must not start a Zammad call of its own)."""
        for key in self._parent_keys(h):
            uuid = _h(h, key)
            call = self._call_of(uuid)
            finished_call = "" if call is not None else self._finished.get(uuid, "")
            if finished_call:
                call = self._call_of(finished_call)
            if call is not None:
                if call is not exclude:
                    return call, ""
            elif finished_call:
                return None, finished_call
        return None, ""

    def _adopt(self, call: Call) -> None:
        self.calls[call.call_id] = call
        for uuid, leg in call.legs.items():
            if leg.ended and uuid != call.call_id:  # kept by a placeholder (see _on_hangup)
                self._remember_finished(uuid, call.call_id)
            else:
                self._leg_call[uuid] = call.call_id

    def _leg(self, h: Headers) -> Leg:
        """A leg as its own event describes it."""
        outbound = h.get("Call-Direction") == "outbound"
        return Leg(uuid=h["Unique-ID"], external=self._is_external_leg(h),
                   loopback=h.get("Channel-Name", "").startswith("loopback/"),
                   agent=_strip_domain(_h(h, "variable_cc_agent")), inbound=not outbound,
                   party=_h(h, "variable_dialed_user", "Caller-Destination-Number",
                            "Caller-Callee-ID-Number") if outbound
                   else _h(h, "variable_user_name", "Caller-Caller-ID-Number"))

    def _new_leg(self, h: Headers, now: float, parent: Call | None) -> Call:
        uuid = h["Unique-ID"]
        outbound = h.get("Call-Direction") == "outbound"
        leg = self._leg(h)
        if parent is None and (outbound or _h(h, "variable_other_loopback_from_uuid")):
            parent = self._placeholder(h, now)
        if parent is not None:
            parent.legs[uuid] = leg
            self._leg_call[uuid] = parent.call_id
            self._leg_joined(parent, leg, _h(h, "Caller-Destination-Number"),
                             _h(h, "Caller-Caller-ID-Number"))
            self.dirty.add(parent.call_id)
            return parent
        call = Call(call_id=uuid, started=now, root_external=False, caller="", dialed="",
                    local_user="", legs={uuid: leg})
        self._take_root(call, h)
        self._adopt(call)
        self.dirty.add(uuid)
        return call

    def _take_root(self, call: Call, h: Headers) -> None:
        """The leg that entered FreeSWITCH decides who called whom."""
        outbound = h.get("Call-Direction") == "outbound"
        call.root_seen = True
        call.root_external = h.get("Caller-Context", "") in self.rules.external_contexts
        # Pickup and transfers rewrite the caller id later: keep the first one.
        call.caller = _h(h, "Caller-Orig-Caller-ID-Number", "Caller-Caller-ID-Number")
        call.dialed = _h(h, "Caller-Destination-Number") if h.get("Event-Name") == \
            "CHANNEL_CREATE" else _h(h, "variable_sip_req_user", "Caller-Destination-Number")
        call.local_user = _h(h, "variable_user_name") or _h(
            h, "Caller-Destination-Number" if outbound else "Caller-Caller-ID-Number")
        if call.root_external and not call.direction:
            call.direction = "in"
        elif self._is_external_leg(h) and not call.direction:
            # originate to the customer first (click-to-dial): the agent joins later
            call.direction, call.out_to, call.local_user = "out", call.dialed, ""
            call.company_number = _h(h, "Caller-Caller-ID-Number")

    def _awaited_parent(self, h: Headers) -> str:
        """The leg a placeholder for this leg waits for ("" if none)."""
        keys = self._parent_keys(h) if h.get("Call-Direction") == "outbound" \
            else ("variable_other_loopback_from_uuid",)
        return next((_h(h, key) for key in keys if _h(h, key)), "")

    def _placeholder(self, h: Headers, now: float) -> Call | None:
        """A B-leg whose A-leg has not been seen yet (events can overtake each other).

        The inbound half of a loopback started by a call waits for that call
        (``other_loopback_from_uuid``), not for its own outbound half.
        """
        parent_uuid = self._awaited_parent(h)
        if not parent_uuid or parent_uuid in self._finished:
            return None
        # Bridged from a loopback half: see _owed on a root never seen.
        loopback = (h.get("Other-Leg-Unique-ID") == parent_uuid
                    and h.get("Other-Leg-Channel-Name", "").startswith("loopback/"))
        call = Call(call_id=parent_uuid, started=now,
                    root_external=h.get("Caller-Context", "") in self.rules.external_contexts,
                    caller="", dialed="", local_user="", root_seen=False,
                    legs={parent_uuid: Leg(uuid=parent_uuid, loopback=loopback)})
        self._adopt(call)
        return call

    def _placeholder_root(self, placeholder: Call, h: Headers, now: float) -> Call | None:
        """The leg a placeholder waited for arrived. Its own event may name
        another call as its parent (the inbound half of a loopback that call
        started, e.g. a follow-me to a mobile): then the placeholder's legs
        are that call's, as if its legs had come after it (when that call is
        not seen yet either, they all wait in its placeholder). Returns the
        call the event now belongs to; None if that call has finished (the
        legs are finished too: nothing is owed)."""
        parent, finished_call = self._parent(h, exclude=placeholder)
        if finished_call:
            self._forget(placeholder)
            return None
        awaited = self._awaited_parent(h)
        if parent is None and awaited and self._call_of(awaited) is None:
            parent = self._placeholder(h, now)
        if parent is not None:
            # A leg of that call now, no root: what it is comes from its own event.
            seen = placeholder.legs[placeholder.call_id]
            placeholder.legs[seen.uuid] = dataclasses.replace(
                self._leg(h), answered=seen.answered, ended=seen.ended, user=seen.user)
            self._merge(placeholder, parent)
            return parent
        # Its own call after all: drop what the ended legs left behind.
        for ended in [u for u, leg in placeholder.legs.items()
                      if leg.ended and u != placeholder.call_id]:
            del placeholder.legs[ended]
        return placeholder

    def _merge(self, placeholder: Call, into: Call) -> None:
        """The legs of ``placeholder`` join ``into``; ended ones only leave what they told."""
        self.calls.pop(placeholder.call_id, None)
        self.dirty.add(placeholder.call_id)
        for leg in placeholder.legs.values():
            if not leg.ended:
                into.legs[leg.uuid] = leg
                self._leg_call[leg.uuid] = into.call_id
            self._leg_joined(into, leg, "" if leg.inbound else leg.party,
                             placeholder.company_number)
            if leg.answered:
                self._person_answered(into, leg)
        into.other_causes = (into.other_causes + placeholder.other_causes)[-MAX_CAUSES:]
        into.lost_end = into.lost_end or placeholder.lost_end
        self.dirty.add(into.call_id)

    def _is_external_leg(self, h: Headers) -> bool:
        if h.get("Call-Direction") != "outbound":
            return False
        if _h(h, "variable_sip_gateway_name", "variable_sip_gateway"):
            return True
        parts = h.get("Channel-Name", "").split("/")
        return len(parts) > 2 and parts[0] == "sofia" and (
            parts[1] == "gateway" or parts[1] in self.rules.external_profiles)

    def _leg_joined(self, call: Call, leg: Leg, number: str, presented: str) -> None:
        """A leg became part of ``call``: ``number`` is where it goes, ``presented``
        the caller id it shows."""
        call.routed = True
        if not leg.external:
            if call.direction == "out" and not call.local_user:
                call.local_user = leg.party   # the agent of a click-to-dial call
                call.agent_leg = leg.uuid
            return
        if not call.direction and not call.root_external:
            call.direction = "out"         # a local user reaching outside
            call.out_to = number
            call.company_number = presented

    def _move_leg(self, uuid: str, to: Call, h: Headers) -> None:
        """Pickup / attended transfer: a leg of an undecided call joins ``to``."""
        source = self._call_of(uuid)
        if source is None:  # never seen: all we know is on the bridge event
            inbound = h.get("Other-Leg-Direction") == "inbound"
            leg = Leg(uuid=uuid, inbound=inbound, party=_h(
                h, "Other-Leg-Caller-ID-Number" if inbound else "Other-Leg-Destination-Number"),
                external=self._is_external_leg({
                    "Call-Direction": h.get("Other-Leg-Direction", ""),
                    "Channel-Name": h.get("Other-Leg-Channel-Name", "")}))
        else:
            leg = source.legs.pop(uuid)
            self.dirty.add(source.call_id)
            if not source.legs:
                self.calls.pop(source.call_id, None)
        to.legs[uuid] = leg
        self._leg_call[uuid] = to.call_id
        self._leg_joined(to, leg, leg.party, "")

    # -- events ---------------------------------------------------------

    def _read_variables(self, call: Call, h: Headers) -> None:
        forced = _h(h, "variable_zammad_direction").lower()
        if forced in DIRECTIONS and not call.sent:
            call.direction = forced
        queue = _h(h, "variable_zammad_queue", "variable_cc_queue")
        if queue and not call.sent:
            call.queue = queue
        if not call.sent:
            call.domain = _h(h, "variable_domain_name") or call.domain
            call.instance = _h(h, "variable_zammad_instance") or call.instance

    def _on_execute(self, call: Call, h: Headers) -> None:
        app = h.get("Application", "")
        if app in SETUP_APPS:
            return
        call.routed = True
        if app == "callcenter" and not call.queue:
            call.queue = _h(h, "Application-Data").split(" ", 1)[0]
        elif app == "fifo" and not call.queue:
            # "fifo <name>[!<importance>] in [...]": the caller waits in that queue
            # ("out" is an agent's own call fetching a caller from it).
            words = _h(h, "Application-Data").split()
            if len(words) > 1 and words[1].lower() == "in":
                call.queue = words[0].split("!", 1)[0]
        elif app == "voicemail" and not call.answered:
            call.voicemail = True

    def _person_answered(self, call: Call, leg: Leg) -> None:
        call.routed = True
        if call.answered or leg.loopback:
            return
        if call.direction == "in" and leg.external:
            call.forwarded = True           # taken outside: cause 'forwarded', not missed
            return
        if call.direction == "out" and not leg.external:
            return                          # e.g. the agent's own phone of a click-to-dial
        if not call.direction and not leg.external:
            return                          # internal call (so far)
        call.answered = True
        call.answered_by = leg.agent or leg.party
        call.answering_number = leg.party
        call.answered_user = leg.user or self._mapped_login(call, leg.party, leg.agent)

    def _on_bridge(self, call: Call, leg: Leg, h: Headers) -> Call:
        """A leg got bridged; returns the call the event's leg now belongs to.

        Two legs of one call: the other one is who answered. A leg of an
        undecided local call bridged to a Zammad call (pickup with
        ``intercept``, attended transfer) joins that call and answered it.
        """
        other = _h(h, "Other-Leg-Unique-ID")
        if not other or other in self._finished:
            return call
        other_call = self._call_of(other)
        if other_call is None or (other_call is not call and self._absorbable(other_call)):
            self._move_leg(other, call, h)
        elif other_call is not call:
            if not self._absorbable(call):
                return call                 # two Zammad calls bridged: both stand as they are
            self._move_leg(leg.uuid, other_call, h)
            self._person_answered(other_call, leg)
            return other_call
        other_leg = call.legs[other]
        # Bridged is not answered: early media bridges a ringing phone. A
        # phone's own call (pickup, the transfer target) is up once bridged.
        if other_leg.answered or other_leg.inbound:
            self._person_answered(call, other_leg)
        return call

    @staticmethod
    def _absorbable(call: Call) -> bool:
        return not call.sent and not call.root_external and call.direction != "in"

    def _on_hangup(self, call: Call, leg: Leg, h: Headers, is_root: bool) -> None:
        leg.ended = True
        if not is_root and not leg.answered and _h(h, "Caller-Channel-Answered-Time") not in ("", "0"):
            leg.answered = True             # answered while events were lost
            self._person_answered(call, leg)
        if is_root:
            call.root_end = {
                "cause": _h(h, "Hangup-Cause", "variable_hangup_cause"),
                "disposition": _h(h, "variable_sip_hangup_disposition"),
                "originate": _h(h, "variable_originate_disposition"),
                "last_bridge": _h(h, "variable_last_bridge_hangup_cause"),
            }
            reached_voicemail = (_h(h, "variable_current_application") == "voicemail"
                                 or _h(h, "variable_voicemail_message_len"))
            if reached_voicemail and not call.answered:
                call.voicemail = True
        else:
            call.other_causes = (call.other_causes + [_h(h, "Hangup-Cause",
                                                         "variable_hangup_cause")])[-MAX_CAUSES:]
            # A long queue call rings agents for hours: keep the call small.
            # A placeholder keeps them until its root shows which call they
            # belong to (see _merge).
            if call.root_seen:
                del call.legs[leg.uuid]
            self._leg_call.pop(leg.uuid, None)
            self._remember_finished(leg.uuid, call.call_id)

    # -- what Zammad is owed ----------------------------------------------

    def _owed(self, call: Call) -> list[ZammadEvent]:
        self.dirty.add(call.call_id)
        events = []
        ended = call.ended
        if "newCall" not in call.sent:
            # An outbound call needs its agent: a click-to-dial that rings the
            # customer first knows the agent only when the agent's leg joins.
            ready = (call.routed and call.root_seen
                     and (call.direction != "out" or call.local_user)) or ended
            if call.direction in ("in", "out") and ready:
                call.instance = self._route(call)
            root = call.legs.get(call.call_id)
            if ended and not call.root_seen and root is not None and root.loopback:
                # Only legs bridged from a loopback half were seen (e.g. the
                # carrier leg of a follow-me, hangups alone). That half is
                # either the far end of a loopback a call's dialplan started
                # (the call is the caller's, sent under the caller's uuid) or
                # one the API originated (a call of its own), and nothing left
                # tells which. Sending it could give Zammad a second call for
                # one FreeSWITCH call, with a guessed direction and no caller;
                # dropping it loses at most a call of which only a leg's end
                # was ever seen. At most one Zammad call per call wins.
                self._forget(call)
                return events
            if call.direction not in ("in", "out") or not ready or call.instance is None:
                if ended:
                    self._forget(call)      # internal or ignored: Zammad never hears of it
                return events
            events.append(self._event(call, "newCall"))
        wants_answer = call.answered or (call.voicemail and call.direction == "in")
        if wants_answer and "answer" not in call.sent:
            events.append(self._event(call, "answer"))
        if ended and "hangup" not in call.sent:
            events.append(self._event(call, "hangup"))
            self._forget(call)
        return events

    def _route(self, call: Call) -> str | None:
        """Which Zammad system gets this call; None: none (not sent)."""
        rules = self.rules
        if call.instance is not None and call.instance in rules.instances:
            return call.instance
        if call.instance:
            log.warning("call %s: zammad_instance=%s is not in ZAMMAD_INSTANCES; using the "
                        "routes", call.call_id, call.instance)
        number = call.dialed if call.direction == "in" else call.company_number
        for kind, pattern, instance in rules.routes:
            value = number if kind == "did" else call.domain
            if value and fnmatchcase(value, pattern):
                return instance
        if "" in rules.instances:
            return ""
        log.info("call %s (%s, domain %s) matches no ZAMMAD_ROUTES and ZAMMAD_CTI_URL is not "
                 "set: not sent", call.call_id, number or "-", call.domain or "-")
        return None

    def _forget(self, call: Call) -> None:
        self.calls.pop(call.call_id, None)
        self.dirty.add(call.call_id)
        for uuid in call.legs:
            if self._leg_call.get(uuid) == call.call_id:
                del self._leg_call[uuid]
            self._remember_finished(uuid, call.call_id)
        legs = self._finished_legs.get(call.call_id)
        if legs:
            self._newly_finished.append(
                (call.call_id, FinishedCall(call.call_id, tuple(legs)).to_json()))

    def _remember_finished(self, uuid: str, call_id: str) -> None:
        if uuid in self._finished:
            return
        self._finished[uuid] = call_id
        self._finished_legs.setdefault(call_id, []).append(uuid)
        if len(self._finished) > FINISHED_MEMORY:
            oldest, oldest_call = self._finished.popitem(last=False)
            # Legs go in the order they came: the call's last one gone, all are.
            # (The outbox keeps as many finished calls and drops the oldest.)
            if self._finished_legs[oldest_call][-1] == oldest:
                del self._finished_legs[oldest_call]

    def _mapped_login(self, call: Call, *extensions: str) -> str:
        """ZAMMAD_AGENTS' login for the first of ``extensions`` it maps."""
        agents = self.rules.agents
        for extension in filter(None, extensions):
            login = agents.get(f"{extension}@{call.domain}") or agents.get(extension)
            if login:
                return login
        return ""

    def _called_agent(self, call: Call) -> str:
        """The dialplan's zammad_user on a carrier caller's leg (a caller's own
        phone would carry its directory value: that is no agent of this call)."""
        root = call.legs.get(call.call_id)
        return root.user if root is not None and call.root_external else ""

    def _calling_agent(self, call: Call) -> str:
        """Out calls: the agent's login, else their extension."""
        leg = call.legs.get(call.agent_leg or call.call_id)
        return ((leg.user if leg is not None else "")
                or self._mapped_login(call, call.local_user) or call.local_user)

    def _number(self, number: str) -> str:
        return to_e164(number, self.rules.country_code, self.rules.national_prefix)

    def _event(self, call: Call, name: str) -> ZammadEvent:
        call.sent.append(name)
        if call.direction == "in":
            from_, to = call.caller, call.dialed
        else:
            from_, to = call.local_user, call.out_to or call.dialed
        fields = [("event", name), ("direction", call.direction), ("callId", call.call_id),
                  ("from", from_), ("to", to)]
        queue = call.queue if self.rules.queue_keep_domain else _strip_domain(call.queue)
        if name == "newCall":
            user = self._calling_agent(call) if call.direction == "out" \
                else self._called_agent(call)
            if user:
                fields.append(("user", user))
        elif name == "answer" and call.direction == "in":
            if call.answered:
                fields.append(("user", call.answered_user or self._called_agent(call)
                               or call.answered_by))
                if call.answering_number:
                    fields.append(("answeringNumber", call.answering_number))
            else:
                fields.append(("user", "voicemail"))
        elif name == "hangup":
            fields.append(("cause", self._cause(call)))
        if queue:
            fields.append(("queue", queue))
        fields, problems = clean_fields(fields, self._number)
        for field_name, problem in problems:
            self._log_cleaned(call.call_id, field_name, problem)
        once = name == "hangup" and hangup_sent_once(call.direction, "answer" in call.sent,
                                                     dict(fields)["cause"])
        return ZammadEvent(dict(fields)["callId"], tuple(fields), call.instance or "", once)

    def _log_cleaned(self, call_id: str, field_name: str, problem: str) -> None:
        """Once per field and problem: a bad PBX setting would repeat it on every call."""
        if (field_name, problem) in self._cleaned_logged:
            return
        self._cleaned_logged.add((field_name, problem))
        log.warning("FreeSWITCH gave %s with %s (call %r): sent to Zammad cleaned (see README, "
                    "'What Zammad receives'); check the caller ids and zammad_* variables the "
                    "trunk and dialplan set. Logged once.", field_name, problem, call_id[:60])

    def _cause(self, call: Call) -> str:
        end = call.root_end
        causes = list(call.other_causes)
        if call.lost_end and not end and not any(c and c != "NORMAL_CLEARING" for c in causes):
            causes.append("ORIGINATOR_CANCEL")  # ended while we were away: caller gone
        return call_cause(CallEnd(
            answered=call.answered,
            voicemail=call.voicemail and call.direction == "in",
            forwarded=call.forwarded and call.direction == "in" and not call.answered,
            root_cause=end.get("cause", ""),
            root_disposition=end.get("disposition", ""),
            originate_disposition=end.get("originate", ""),
            last_bridge_cause=end.get("last_bridge", ""),
            other_leg_causes=tuple(causes),
        ), self.rules.cause_mapper)


def hangup_sent_once(direction: str, answer_sent: bool, cause: str) -> bool:
    """Would a second copy of this hangup change what Zammad shows?

    Zammad marks an inbound call missed (``done=false``) when its hangup
    arrives while the call is still in state ``newCall`` and the cause is
    not ``forwarded``; a second hangup then finds state ``hangup`` and sets
    ``done=true``: the missed call shows as done. Only that kind of call
    is harmed; every other hangup may be sent again freely.
    (``shared/reference/zammad-cti-api.md``, "Missed-call rule".)
    """
    return direction == "in" and not answer_sent and cause != "forwarded"


def channels_to_headers(rows: Iterable[Mapping[str, str]]) -> list[dict[str, str]]:
    """``show channels as json`` rows -> CHANNEL_CREATE-style headers.

    The rows name the A-leg of a bridged channel in ``call_uuid``; that is
    all the linking information ``show channels`` gives.
    """
    result = []
    for row in rows:
        uuid = row.get("uuid", "")
        if not uuid:
            continue
        headers = {
            "Unique-ID": uuid,
            "Call-Direction": row.get("direction", ""),
            "Channel-Name": row.get("name", ""),
            "Caller-Context": row.get("initial_context") or row.get("context", ""),
            "Caller-Caller-ID-Number": row.get("initial_cid_num") or row.get("cid_num", ""),
            "Caller-Destination-Number": row.get("initial_dest") or row.get("dest", ""),
            "Answer-State": "answered" if row.get("callstate") in ("ACTIVE", "HELD") else "",
        }
        call_uuid = row.get("call_uuid", "")
        if call_uuid and call_uuid != uuid:
            headers["Other-Leg-Unique-ID"] = call_uuid
        result.append(headers)
    # Parents first, so that B-legs find the call they belong to.
    result.sort(key=lambda h: "Other-Leg-Unique-ID" in h)
    return result
