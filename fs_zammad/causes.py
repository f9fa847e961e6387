"""FreeSWITCH hangup causes -> Zammad's cause strings (pure functions).

Zammad labels seven causes (and its new UI an eighth, ``voicemail``);
FreeSWITCH has about eighty. The table answers one
question: "if this cause is why a call was never picked up, what does Zammad
call it?"  Whether the call was answered matters more than the cause name (an
answered call that ends is always ``normalClearing``), so the call-level
decision lives in :func:`call_cause`, which reads the whole story of the call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

log = logging.getLogger(__name__)

ZAMMAD_CAUSES = frozenset(
    {"normalClearing", "busy", "cancel", "noAnswer", "congestion", "notFound", "forwarded"}
)

#: What an unknown cause name maps to ("not reached" in Zammad's UI).
UNKNOWN_CAUSE_DEFAULT = "noAnswer"

_GROUPS = {
    "normalClearing": """NORMAL_CLEARING SUCCESS CALL_AWARDED_DELIVERED NORMAL_UNSPECIFIED
        RESPONSE_TO_STATUS_ENQUIRY BOWOUT USER_CHALLENGE""",
    "busy": "USER_BUSY BUSY_EVERYWHERE",
    "cancel": "ORIGINATOR_CANCEL LOSE_RACE PICKED_OFF MANAGER_REQUEST",
    "noAnswer": """NONE NO_ANSWER NO_USER_RESPONSE CALL_REJECTED DECLINE SUBSCRIBER_ABSENT
        ALLOTTED_TIMEOUT PROGRESS_TIMEOUT NO_PICKUP UNWANTED REJECT_ALL FACILITY_REJECTED
        OUTGOING_CALL_BARRED INCOMING_CALL_BARRED""",
    "notFound": """UNALLOCATED_NUMBER NO_ROUTE_TRANSIT_NET NO_ROUTE_DESTINATION
        USER_NOT_REGISTERED NUMBER_CHANGED INVALID_NUMBER_FORMAT DOES_NOT_EXIST_ANYWHERE""",
    "forwarded": "REDIRECTION_TO_NEW_DESTINATION BLIND_TRANSFER ATTENDED_TRANSFER",
    "congestion": """CHANNEL_UNACCEPTABLE EXCHANGE_ROUTING_ERROR DESTINATION_OUT_OF_ORDER
        NORMAL_CIRCUIT_CONGESTION NETWORK_OUT_OF_ORDER NORMAL_TEMPORARY_FAILURE
        SWITCH_CONGESTION ACCESS_INFO_DISCARDED REQUESTED_CHAN_UNAVAIL PRE_EMPTED
        FACILITY_NOT_SUBSCRIBED BEARERCAPABILITY_NOTAUTH BEARERCAPABILITY_NOTAVAIL
        SERVICE_UNAVAILABLE BEARERCAPABILITY_NOTIMPL CHAN_NOT_IMPLEMENTED
        FACILITY_NOT_IMPLEMENTED SERVICE_NOT_IMPLEMENTED INVALID_CALL_REFERENCE
        INCOMPATIBLE_DESTINATION INVALID_MSG_UNSPECIFIED MANDATORY_IE_MISSING
        MESSAGE_TYPE_NONEXIST WRONG_MESSAGE IE_NONEXIST INVALID_IE_CONTENTS WRONG_CALL_STATE
        RECOVERY_ON_TIMER_EXPIRE MANDATORY_IE_LENGTH_ERROR PROTOCOL_ERROR INTERWORKING CRASH
        SYSTEM_SHUTDOWN MEDIA_TIMEOUT INVALID_GATEWAY GATEWAY_DOWN INVALID_URL INVALID_PROFILE
        SRTP_READ_ERROR NOT_ACCEPTABLE NO_IDENTITY BAD_IDENTITY_INFO UNSUPPORTED_CERTIFICATE
        INVALID_IDENTITY STALE_DATE""",
}

#: Every FreeSWITCH cause name (switch_types.h) -> Zammad cause.
CAUSE_TABLE: Mapping[str, str] = {
    name: zammad for zammad, names in _GROUPS.items() for name in names.split()
}

#: Causes that say nothing about why a call failed: a leg that ended normally,
#: lost a ring-all race or was picked up elsewhere did not fail the call.
_NOT_A_REASON = frozenset({"", "NONE", "SUCCESS", "NORMAL_CLEARING", "LOSE_RACE", "PICKED_OFF"})


def parse_cause_map(text: str) -> dict[str, str]:
    """Parse ``ZAMMAD_CAUSE_MAP`` (``CALL_REJECTED=busy,NO_ANSWER=cancel``).

    Raises ValueError with a message naming the bad entry.
    """
    overrides: dict[str, str] = {}
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            continue
        name, sep, value = entry.partition("=")
        name, value = name.strip().upper(), value.strip()
        if not sep or not name:
            raise ValueError(f"entry {entry!r} is not CAUSE=zammadCause")
        if name not in CAUSE_TABLE:
            raise ValueError(f"{name!r} is not a FreeSWITCH hangup cause")
        if value not in ZAMMAD_CAUSES:
            raise ValueError(f"{value!r} is not one of {', '.join(sorted(ZAMMAD_CAUSES))}")
        overrides[name] = value
    return overrides


class CauseMapper:
    """The cause table with the admin's overrides; logs each unknown name once."""

    def __init__(self, overrides: Mapping[str, str] | None = None):
        self._table = {**CAUSE_TABLE, **(overrides or {})}
        self._unknown_seen: set[str] = set()

    def __call__(self, fs_cause: str) -> str:
        return cause_to_zammad(fs_cause, self._table, self._unknown_seen)


def cause_to_zammad(fs_cause: str, table: Mapping[str, str] = CAUSE_TABLE,
                    unknown_seen: set[str] | None = None) -> str:
    """One FreeSWITCH cause name -> Zammad cause (unknown names: noAnswer)."""
    name = (fs_cause or "NONE").strip().upper()
    try:
        return table[name]
    except KeyError:
        if unknown_seen is None or name not in unknown_seen:
            if unknown_seen is not None:
                unknown_seen.add(name)
            log.warning("unknown FreeSWITCH hangup cause %r; sending %r (set ZAMMAD_CAUSE_MAP "
                        "to choose another)", name, UNKNOWN_CAUSE_DEFAULT)
        return UNKNOWN_CAUSE_DEFAULT


@dataclass(frozen=True)
class CallEnd:
    """What the call tracker knows when the last leg of a call is gone."""

    answered: bool = False          # a person (agent, remote party) picked up
    voicemail: bool = False         # the caller reached voicemail before any person
    forwarded: bool = False         # an inbound call went out again through a gateway
    root_cause: str = ""            # Hangup-Cause of the leg that entered FreeSWITCH
    root_disposition: str = ""      # its variable_sip_hangup_disposition
    originate_disposition: str = ""  # its variable_originate_disposition
    last_bridge_cause: str = ""     # its variable_last_bridge_hangup_cause
    other_leg_causes: Sequence[str] = ()


def _is_cause_name(value: str) -> bool:
    # originate_disposition also holds words like "failure" or "SUCCESS".
    return bool(value) and value.isupper() and value not in _NOT_A_REASON


def call_cause(end: CallEnd, mapper=cause_to_zammad) -> str:
    """The Zammad cause of a whole call.

    Order of evidence: forwarded out; answered by a person; ended in
    voicemail (``voicemail``: Zammad's new UI shows it with a mic icon, the
    call stays one to return); the caller hanging up first (``recv_cancel``/``recv_bye`` on the leg that
    entered FreeSWITCH, whatever cause name it carries); then the first real
    failure reason among the root leg's originate result, its last bridge
    result, its own cause and the other legs' causes. A call that ended with
    no reason given was not reached: ``noAnswer``.
    """
    if end.forwarded:
        return "forwarded"
    if end.answered:
        return "normalClearing"
    if end.voicemail:
        return "voicemail"
    if end.root_disposition in ("recv_cancel", "recv_bye"):
        return "cancel"
    candidates = [end.originate_disposition, end.last_bridge_cause, end.root_cause,
                  *end.other_leg_causes]
    for cause in candidates:
        if _is_cause_name(cause):
            return mapper(cause)
    return "noAnswer"
