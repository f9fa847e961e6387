"""Cause mapping: every FreeSWITCH cause, and the call-level decision."""

import csv
from pathlib import Path

import pytest

from fs_zammad.causes import (
    CAUSE_TABLE,
    ZAMMAD_CAUSES,
    CallEnd,
    CauseMapper,
    call_cause,
    cause_to_zammad,
    parse_cause_map,
)

TSV = Path(__file__).parent / "fixtures" / "freeswitch-hangup-causes.tsv"

# What each FreeSWITCH cause means when it is why a call was not picked up.
EXPECTED = [
    ("NONE", "noAnswer"),
    ("UNALLOCATED_NUMBER", "notFound"),
    ("NO_ROUTE_TRANSIT_NET", "notFound"),
    ("NO_ROUTE_DESTINATION", "notFound"),
    ("CHANNEL_UNACCEPTABLE", "congestion"),
    ("CALL_AWARDED_DELIVERED", "normalClearing"),
    ("NORMAL_CLEARING", "normalClearing"),
    ("USER_BUSY", "busy"),
    ("NO_USER_RESPONSE", "noAnswer"),
    ("NO_ANSWER", "noAnswer"),
    ("SUBSCRIBER_ABSENT", "noAnswer"),
    ("CALL_REJECTED", "noAnswer"),
    ("NUMBER_CHANGED", "notFound"),
    ("REDIRECTION_TO_NEW_DESTINATION", "forwarded"),
    ("EXCHANGE_ROUTING_ERROR", "congestion"),
    ("DESTINATION_OUT_OF_ORDER", "congestion"),
    ("INVALID_NUMBER_FORMAT", "notFound"),
    ("FACILITY_REJECTED", "noAnswer"),
    ("RESPONSE_TO_STATUS_ENQUIRY", "normalClearing"),
    ("NORMAL_UNSPECIFIED", "normalClearing"),
    ("NORMAL_CIRCUIT_CONGESTION", "congestion"),
    ("NETWORK_OUT_OF_ORDER", "congestion"),
    ("NORMAL_TEMPORARY_FAILURE", "congestion"),
    ("SWITCH_CONGESTION", "congestion"),
    ("ACCESS_INFO_DISCARDED", "congestion"),
    ("REQUESTED_CHAN_UNAVAIL", "congestion"),
    ("PRE_EMPTED", "congestion"),
    ("FACILITY_NOT_SUBSCRIBED", "congestion"),
    ("OUTGOING_CALL_BARRED", "noAnswer"),
    ("INCOMING_CALL_BARRED", "noAnswer"),
    ("BEARERCAPABILITY_NOTAUTH", "congestion"),
    ("BEARERCAPABILITY_NOTAVAIL", "congestion"),
    ("SERVICE_UNAVAILABLE", "congestion"),
    ("BEARERCAPABILITY_NOTIMPL", "congestion"),
    ("CHAN_NOT_IMPLEMENTED", "congestion"),
    ("FACILITY_NOT_IMPLEMENTED", "congestion"),
    ("SERVICE_NOT_IMPLEMENTED", "congestion"),
    ("INVALID_CALL_REFERENCE", "congestion"),
    ("INCOMPATIBLE_DESTINATION", "congestion"),
    ("INVALID_MSG_UNSPECIFIED", "congestion"),
    ("MANDATORY_IE_MISSING", "congestion"),
    ("MESSAGE_TYPE_NONEXIST", "congestion"),
    ("WRONG_MESSAGE", "congestion"),
    ("IE_NONEXIST", "congestion"),
    ("INVALID_IE_CONTENTS", "congestion"),
    ("WRONG_CALL_STATE", "congestion"),
    ("RECOVERY_ON_TIMER_EXPIRE", "congestion"),
    ("MANDATORY_IE_LENGTH_ERROR", "congestion"),
    ("PROTOCOL_ERROR", "congestion"),
    ("INTERWORKING", "congestion"),
    ("SUCCESS", "normalClearing"),
    ("ORIGINATOR_CANCEL", "cancel"),
    ("CRASH", "congestion"),
    ("SYSTEM_SHUTDOWN", "congestion"),
    ("LOSE_RACE", "cancel"),
    ("MANAGER_REQUEST", "cancel"),
    ("BLIND_TRANSFER", "forwarded"),
    ("ATTENDED_TRANSFER", "forwarded"),
    ("ALLOTTED_TIMEOUT", "noAnswer"),
    ("USER_CHALLENGE", "normalClearing"),
    ("MEDIA_TIMEOUT", "congestion"),
    ("PICKED_OFF", "cancel"),
    ("USER_NOT_REGISTERED", "notFound"),
    ("PROGRESS_TIMEOUT", "noAnswer"),
    ("INVALID_GATEWAY", "congestion"),
    ("GATEWAY_DOWN", "congestion"),
    ("INVALID_URL", "congestion"),
    ("INVALID_PROFILE", "congestion"),
    ("NO_PICKUP", "noAnswer"),
    ("SRTP_READ_ERROR", "congestion"),
    ("BOWOUT", "normalClearing"),
    ("BUSY_EVERYWHERE", "busy"),
    ("DECLINE", "noAnswer"),
    ("DOES_NOT_EXIST_ANYWHERE", "notFound"),
    ("NOT_ACCEPTABLE", "congestion"),
    ("UNWANTED", "noAnswer"),
    ("NO_IDENTITY", "congestion"),
    ("BAD_IDENTITY_INFO", "congestion"),
    ("UNSUPPORTED_CERTIFICATE", "congestion"),
    ("INVALID_IDENTITY", "congestion"),
    ("STALE_DATE", "congestion"),
    ("REJECT_ALL", "noAnswer"),
]


def tsv_causes():
    lines = [line for line in TSV.read_text().splitlines() if not line.startswith("#")]
    return [row["cause_name"] for row in csv.DictReader(lines, delimiter="\t")]


def test_every_freeswitch_cause_is_in_the_expected_table():
    assert sorted(tsv_causes()) == sorted(name for name, _ in EXPECTED)


@pytest.mark.parametrize("fs_cause,zammad", EXPECTED)
def test_cause_to_zammad(fs_cause, zammad):
    assert zammad in ZAMMAD_CAUSES
    assert cause_to_zammad(fs_cause) == zammad


def test_unknown_cause_gets_default_and_is_logged_once(caplog):
    mapper = CauseMapper()
    assert mapper("SOMETHING_NEW") == "noAnswer"
    assert mapper("SOMETHING_NEW") == "noAnswer"
    assert len([r for r in caplog.records if "SOMETHING_NEW" in r.getMessage()]) == 1


def test_overrides_replace_single_entries():
    mapper = CauseMapper(parse_cause_map("CALL_REJECTED=busy, no_answer=cancel"))
    assert mapper("CALL_REJECTED") == "busy"
    assert mapper("NO_ANSWER") == "cancel"
    assert mapper("USER_BUSY") == "busy"
    assert CAUSE_TABLE["CALL_REJECTED"] == "noAnswer"  # the table itself is untouched


@pytest.mark.parametrize("text,message", [
    ("CALL_REJECTED", "is not CAUSE=zammadCause"),
    ("NOT_A_CAUSE=busy", "is not a FreeSWITCH hangup cause"),
    ("USER_BUSY=Busy", "is not one of"),
])
def test_bad_overrides_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_cause_map(text)


CALLS = [
    # (what happened, CallEnd, Zammad cause)
    ("answered, caller hangs up", CallEnd(answered=True, root_cause="NORMAL_CLEARING",
                                          root_disposition="recv_bye"), "normalClearing"),
    ("answered, ended by media timeout", CallEnd(answered=True, root_cause="MEDIA_TIMEOUT"),
     "normalClearing"),
    ("voicemail took it", CallEnd(voicemail=True, root_cause="NORMAL_CLEARING",
                                  originate_disposition="NO_ANSWER"), "voicemail"),
    ("caller leaves a message and hangs up",
     CallEnd(voicemail=True, root_cause="NORMAL_CLEARING", root_disposition="recv_bye",
             other_leg_causes=("NO_ANSWER",)), "voicemail"),
    ("voicemail, then an agent took the call back", CallEnd(answered=True, voicemail=True,
                                                          root_cause="NORMAL_CLEARING"),
     "normalClearing"),
    ("voicemail after a forward to outside answered", CallEnd(forwarded=True, voicemail=True),
     "forwarded"),
    ("caller cancels while the agent rings (A-leg says NORMAL_CLEARING)",
     CallEnd(root_cause="NORMAL_CLEARING", root_disposition="recv_cancel",
             other_leg_causes=("ORIGINATOR_CANCEL",)), "cancel"),
    ("caller leaves the IVR / queue before an agent answers",
     CallEnd(root_cause="NORMAL_CLEARING", root_disposition="recv_bye"), "cancel"),
    ("agent busy", CallEnd(root_cause="USER_BUSY", root_disposition="send_refuse",
                           originate_disposition="USER_BUSY"), "busy"),
    ("ring timeout: reason only in originate_disposition",
     CallEnd(root_cause="NORMAL_CLEARING", root_disposition="send_refuse",
             originate_disposition="NO_ANSWER", last_bridge_cause="NO_ANSWER",
             other_leg_causes=("NO_ANSWER",)), "noAnswer"),
    ("number does not exist", CallEnd(root_cause="UNALLOCATED_NUMBER",
                                      root_disposition="send_refuse"), "notFound"),
    ("reason only on the B-leg", CallEnd(root_cause="NORMAL_CLEARING",
                                         other_leg_causes=("LOSE_RACE", "CALL_REJECTED")),
     "noAnswer"),
    ("gateway down", CallEnd(root_cause="NORMAL_TEMPORARY_FAILURE",
                             originate_disposition="GATEWAY_DOWN"), "congestion"),
    ("forwarded out wins over everything", CallEnd(forwarded=True, root_cause="NO_ANSWER"),
     "forwarded"),
    ("blind transfer away", CallEnd(root_cause="BLIND_TRANSFER"), "forwarded"),
    ("nothing said why", CallEnd(root_cause="NORMAL_CLEARING", root_disposition="send_bye"),
     "noAnswer"),
    ("originate_disposition holds a word, not a cause",
     CallEnd(root_cause="USER_BUSY", originate_disposition="failure"), "busy"),
]


@pytest.mark.parametrize("story,end,expected", CALLS, ids=[c[0] for c in CALLS])
def test_call_cause(story, end, expected):
    assert call_cause(end) == expected

