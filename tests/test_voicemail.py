"""Voicemail tickets: the pure job builder (voicemail.py), the ticket text and the
job runner (tickets.py) against the Zammad stand-in's REST rules, settings and
``fs-zammad check``. End to end with the real process: tests/test_voicemail_e2e.py."""

import base64
import json
import logging
import subprocess
from pathlib import Path

import pytest

from fs_zammad import voicemail
from fs_zammad import zammad as outcomes
from fs_zammad.calls import HEADER_PREFIXES_READ, HEADERS_READ, CallTracker, TrackerRules
from fs_zammad.config import ConfigError, load_settings
from fs_zammad.tickets import (
    Recording,
    TicketJobs,
    check_tickets,
    job_outcome,
    mime_type,
    read_recording,
    ticket_content,
)
from fs_zammad.voicemail import left_message, map_path, message_marker, ticket_job
from fs_zammad.wire import HeaderFilter, iter_capture
from fs_zammad.zammad_api import DOWN, MAYBE, REFUSED, RETRY, ApiError, Attachment, ZammadApi
from tests import synth
from tests.support.proxy import FORWARD, FORWARD_THEN_CLOSE, Proxy, forward_then
from tests.support.service import FS_ZAMMAD, base_env

FIXTURES = Path(__file__).parent / "fixtures"
RECORDING = FIXTURES / "voicemail" / "msg_cf536b90-c048-4a83-868b-670ce655dfc1.wav"
TOKEN = "api-tok-vm-51c0ffee"
S17_LEG = "b2a888d7-1af3-4f67-9bfd-ada440352845"
S34_LEG = "25f4b94a-8b2f-494b-8a86-46fc9a4ef400"
S17_FILE = ("/var/lib/freeswitch/storage/voicemail/default/127.0.0.1/1001/"
            "msg_194c4357-0bd2-4896-803f-b1301e7de130.wav")
S34_FILE = "/tmp/fs/storage/voicemail/default/127.0.0.1/1002/msg_d5a3ee30-7d53-42d6-b868-083bf7023efc.wav"


def jobs_of(scenario, rules=None, path_map=(), keep=None):
    """Replay a capture through the tracker as the service does; the jobs built and
    the reasons for events that built none."""
    tracker = CallTracker(rules or TrackerRules())
    jobs, why_not = [], []
    data = (FIXTURES / "callcentre" / scenario / "events_all.txt").read_bytes()
    for i, headers in enumerate(iter_capture(data, keep)):
        if left_message(headers):
            job, why = ticket_job(headers, tracker.call_of_leg(headers.get("VM-UUID", "")),
                                  tracker.rules, path_map)
            jobs += [job] if job else []
            why_not += [why] if why else []
        else:
            tracker.handle(headers, 1000.0 + i)
    return jobs, why_not


# -- the job builder, over the real captures ----------------------------------------

S17_JOB = {"event": "voicemail", "direction": "in", "callId": S17_LEG, "from": "493023125741",
           "to": "492214710341", "name": "493023125741", "mailbox": "1001@127.0.0.1",
           "seconds": "2", "time": "1795606694", "file": S17_FILE, "fs_file": S17_FILE,
           "marker": "vm-194c4357-0bd2-4896-803f-b1301e7de130"}
# Answered by 1001, transferred to 1002's mailbox: the caller and the number
# dialled are the call's, not what the transfer left on the leg (*991002).
S34_JOB = {**S17_JOB, "callId": S34_LEG, "to": "492214710359", "mailbox": "1002@127.0.0.1",
           "time": "1796224014", "file": S34_FILE, "fs_file": S34_FILE,
           "marker": "vm-d5a3ee30-7d53-42d6-b868-083bf7023efc"}


@pytest.mark.parametrize("scenario,expected", [("S17", S17_JOB), ("S34", S34_JOB)])
def test_a_recorded_message_is_one_job_of_its_call(scenario, expected):
    # parsed the service's way: only the headers the tracker and the builder read
    keep = HeaderFilter(HEADERS_READ | voicemail.HEADERS_READ, HEADER_PREFIXES_READ)
    jobs, why_not = jobs_of(scenario, keep=keep)
    assert why_not == []
    assert [dict(job.fields) for job in jobs] == [expected]
    assert jobs[0].call_id == expected["callId"] and jobs[0].instance == "" and not jobs[0].once


def test_the_job_holds_the_mapped_path_and_the_tenant():
    rules = TrackerRules(instances=frozenset({"acme"}), routes=(("did", "4922147*", "acme"),))
    jobs, _ = jobs_of("S17", rules, (("/var/lib/freeswitch/storage", "/voicemail"),))
    job = dict(jobs[0].fields)
    assert job["file"] == "/voicemail/voicemail/default/127.0.0.1/1001/" \
                          "msg_194c4357-0bd2-4896-803f-b1301e7de130.wav"
    assert job["fs_file"] == S17_FILE and jobs[0].instance == "acme"


def _message(leg_uuid, **headers):
    return {"Event-Name": "CUSTOM", "Event-Subclass": "vm::maintenance",
            "VM-Action": "leave-message", "VM-UUID": leg_uuid, "VM-User": "1001",
            "VM-Domain": "example.com", "VM-Caller-ID-Number": "0301234567",
            "VM-Caller-ID-Name": "Emma", "VM-Message-Len": "7", "VM-Timestamp": "1700000000",
            "VM-File-Path": "/var/lib/freeswitch/storage/voicemail/default/example.com/1001/"
                            "msg_0a1b2c3d-0000-4000-8000-000000000001.wav", **headers}


def _inbound(rules=None, **variables):
    """A carrier call routed to voicemail (synthetic, shapes of the S17 capture)."""
    tracker = CallTracker(rules or TrackerRules())
    a = synth.caller(cid="0301234567")
    a.set(**variables)
    for i, event in enumerate([a.create(), a.execute("answer"), a.answer(),
                               a.execute("voicemail")]):
        tracker.handle(event, 1000.0 + i)
    return tracker, a


def _agent_call():
    tracker = CallTracker()
    a = synth.agent_call(dest="1002")
    for i, event in enumerate([a.create(), a.execute("voicemail")]):
        tracker.handle(event, 1000.0 + i)
    return tracker, a


JOB_CASES = [
    # (story, how the call came about, changes to the event, expected: fields or the reason)
    ("a carrier caller", "in", {}, {"from": "0301234567", "to": "492214710334",
                                    "mailbox": "1001@example.com", "seconds": "7",
                                    "marker": "vm-0a1b2c3d-0000-4000-8000-000000000001"}),
    ("national number, COUNTRY_CODE=49", "in+cc", {}, {"from": "49301234567"}),
    ("a file not named msg_<uuid>", "in", {"VM-File-Path": "/x/greeting.wav"},
     {"marker": "vm-{leg}-1700000000", "file": "/x/greeting.wav"}),
    ("no file path", "in", {"VM-File-Path": "_undef_"}, "names no recording"),
    ("a leg nobody follows", "unknown", {}, "belongs to no call"),
    ("an extension calling a mailbox", "internal", {}, "not one Zammad knows"),
    ("a dialplan that ignores the call", "ignored", {}, "not one Zammad knows"),
    ("control characters in the name", "in", {"VM-Caller-ID-Name": "Em\x00ma\n"},
     {"name": "Emma"}),
]


@pytest.mark.parametrize("story,how,change,expected", JOB_CASES, ids=[c[0] for c in JOB_CASES])
def test_job_builder(story, how, change, expected):
    rules = TrackerRules(country_code="49") if how == "in+cc" else None
    tracker, leg = _agent_call() if how == "internal" else _inbound(
        rules, **({"zammad_direction": "ignore"} if how == "ignored" else {}))
    uuid = "nobody-0000" if how == "unknown" else leg.uuid
    job, why = ticket_job(_message(uuid, **change), tracker.call_of_leg(uuid), tracker.rules)
    if isinstance(expected, str):
        assert job is None and expected in why
        return
    fields = dict(job.fields)
    assert why == "" and job.call_id == leg.uuid == fields["callId"]
    for key, value in expected.items():
        assert fields[key] == value.format(leg=leg.uuid), key


@pytest.mark.parametrize("path,path_map,expected", [
    ("/var/lib/freeswitch/storage/vm/1/msg_a.wav", [("/var/lib/freeswitch/storage", "/voicemail")],
     "/voicemail/vm/1/msg_a.wav"),
    ("/var/lib/freeswitch/storage2/msg_a.wav", [("/var/lib/freeswitch/storage", "/voicemail")],
     "/var/lib/freeswitch/storage2/msg_a.wav"),          # a whole path component only
    ("/a/b/c.wav", [("/a/b", "/long"), ("/a", "/short")], "/long/c.wav"),  # longest first
    ("/a/b/c.wav", [], "/a/b/c.wav"),
    ("/a/b/c.wav", [("/", "/mnt")], "/mnt/a/b/c.wav"),
])
def test_path_map(path, path_map, expected):
    assert map_path(path, path_map) == expected


def test_path_map_setting_is_sorted_and_checked():
    settings = load_settings({"VOICEMAIL_PATH_MAP": "/a=/short, /a/b/=/long/"})
    assert settings.voicemail_path_map == (("/a/b", "/long"), ("/a", "/short"))
    for bad in ("/a", "a=/b", "/a=b", "=/b"):
        with pytest.raises(ConfigError, match="VOICEMAIL_PATH_MAP"):
            load_settings({"VOICEMAIL_PATH_MAP": bad})


def test_marker():
    assert message_marker("/x/msg_ab12cd34-0000.wav", "leg", "1") == "vm-ab12cd34-0000"
    assert message_marker("/x/msg_.wav", "leg", "1") == "vm-leg-1"


def test_mwi_and_other_events_are_no_message():
    assert not left_message({"Event-Name": "CUSTOM", "Event-Subclass": "vm::maintenance",
                             "VM-Action": "mwi-update"})
    assert not left_message({"Event-Name": "CUSTOM", "Event-Subclass": "other",
                             "VM-Action": "leave-message"})


# -- settings ------------------------------------------------------------------------

CTI = "http://z.example/api/v1/cti/tok"
ON = {"ZAMMAD_CTI_URL": CTI, "ZAMMAD_API_TOKEN": "t0ken", "VOICEMAIL_TICKETS": "true",
      "VOICEMAIL_GROUP": "Service Desk"}
TENANTS = {**ON, "ZAMMAD_INSTANCES": "acme", "ZAMMAD_CTI_URL_ACME": CTI + "2"}


@pytest.mark.parametrize("env,expected", [
    ({}, {}),
    (ON, {"": ("Service Desk", "")}),
    ({**ON, "VOICEMAIL_CUSTOMER": "anonymous@example.com"},
     {"": ("Service Desk", "anonymous@example.com")}),
    ({**TENANTS, "ZAMMAD_API_TOKEN_ACME": "t2", "VOICEMAIL_GROUP_ACME": "Acme"},
     {"": ("Service Desk", ""), "acme": ("Acme", "")}),
    ({**TENANTS, "VOICEMAIL_TICKETS_ACME": "false"}, {"": ("Service Desk", "")}),
    ({**TENANTS, "VOICEMAIL_TICKETS": "false", "VOICEMAIL_TICKETS_ACME": "true",
      "ZAMMAD_API_TOKEN_ACME": "t2"}, {"acme": ("Service Desk", "")}),
])
def test_voicemail_settings(env, expected):
    assert dict(load_settings(env).voicemail) == expected


@pytest.mark.parametrize("env,words", [
    ({"VOICEMAIL_TICKETS": "true"}, "VOICEMAIL_TICKETS=true but ZAMMAD_CTI_URL is not set"),
    ({**ON, "ZAMMAD_API_TOKEN": ""}, "VOICEMAIL_TICKETS=true needs ZAMMAD_API_TOKEN "),
    ({**ON, "VOICEMAIL_GROUP": " "}, "VOICEMAIL_TICKETS=true needs VOICEMAIL_GROUP "),
    ({**ON, "VOICEMAIL_TICKETS": "sometimes"}, "VOICEMAIL_TICKETS='sometimes' must be true"),
    (TENANTS, "VOICEMAIL_TICKETS=true needs ZAMMAD_API_TOKEN_ACME"),
    ({**TENANTS, "ZAMMAD_API_TOKEN_ACME": "t2", "VOICEMAIL_TICKETS_ACME": "ja"},
     "VOICEMAIL_TICKETS_ACME='ja' must be true or false"),
])
def test_bad_voicemail_settings_are_one_line(env, words):
    with pytest.raises(ConfigError) as err:
        load_settings(env)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert "t0ken" not in str(err.value)


# -- the ticket's words -----------------------------------------------------------------

JOB = {"callId": "c-1", "from": "493023125741", "to": "492214710341", "name": "493023125741",
       "mailbox": "1001@pbx", "seconds": "75", "time": "1795606694",
       "file": "/voicemail/1001/msg_x.wav", "fs_file": "/var/lib/freeswitch/storage/1001/msg_x.wav",
       "marker": "vm-x"}
WAV = Recording(Attachment("msg_x.wav", b"RIFF....", "audio/wav"))


@pytest.mark.parametrize("story,job,name,recording,title,lines", [
    ("known caller", JOB, "Emma Example", WAV,
     "Voicemail from +493023125741 (Emma Example) [vm-x]",
     ["Time: 2026-11-25 11:38:14 UTC", "Length: 1:15", "Number dialled: +492214710341",
      "Mailbox: 1001@pbx", "Recording: attached (msg_x.wav, 8 bytes)",
      "Call: c-1 (Zammad's caller log)"]),
    ("no name: the caller id name is only the number", JOB, "", WAV,
     "Voicemail from +493023125741 [vm-x]", []),
    ("caller id name from FreeSWITCH", {**JOB, "name": "Max"}, "", WAV,
     "Voicemail from +493023125741 (Max) [vm-x]", []),
    ("Zammad's name of a phone-only customer is the number", JOB, "+49 30 23125741", WAV,
     "Voicemail from +493023125741 [vm-x]", []),
    ("anonymous", {**JOB, "from": "anonymous", "name": ""}, "", WAV,
     "Voicemail from anonymous [vm-x]", []),
    ("recording missing", JOB, "", Recording(None, "was not found (deleted)"),
     "Voicemail from +493023125741 [vm-x]",
     ["Recording: missing. The file /voicemail/1001/msg_x.wav (FreeSWITCH: "
      "/var/lib/freeswitch/storage/1001/msg_x.wav) was not found (deleted)."]),
    ("a long name keeps the marker", JOB, "N" * 400, WAV, None, []),
])
def test_ticket_content(story, job, name, recording, title, lines):
    got_title, body = ticket_content(job, name, recording)
    assert got_title.endswith(" [vm-x]") and len(got_title) <= 250
    if title:
        assert got_title == title
    for line in lines:
        assert line in body.splitlines()


@pytest.mark.parametrize("kind,status,expected,maybe", [
    (REFUSED, 422, outcomes.FAILED, False), (REFUSED, 403, outcomes.FAILED, False),
    (DOWN, 502, outcomes.RETRY, False), (DOWN, 0, outcomes.RETRY, False),
    (RETRY, 500, outcomes.RETRY, False), (RETRY, 429, outcomes.RETRY, False),
    (MAYBE, 0, outcomes.RETRY, True),
])
def test_job_outcome(kind, status, expected, maybe):
    outcome = job_outcome(ApiError(kind, status, "words"))
    assert (outcome.kind, outcome.status, outcome.maybe_processed) == (expected, status, maybe)
    assert outcome.config_error == (kind == REFUSED)


def test_reading_the_recording(tmp_path):
    assert read_recording(str(RECORDING)).attachment.data == RECORDING.read_bytes()
    assert read_recording(str(RECORDING)).attachment.mime_type == "audio/wav"
    assert "was not found" in read_recording(str(tmp_path / "gone.wav")).problem
    assert "is a directory" in read_recording(str(tmp_path)).problem
    assert "too big" in read_recording(str(RECORDING), limit=1000).problem
    locked = tmp_path / "locked.wav"
    locked.write_bytes(b"x")
    locked.chmod(0)
    import os
    if os.geteuid() != 0:
        assert "not readable" in read_recording(str(locked)).problem
    assert mime_type("a.MP3") == "audio/mpeg" and mime_type("a.unknownext") == \
        "application/octet-stream"


# -- the runner against the stand-in's REST rules ------------------------------------------


def with_voicemail_group(zammad):
    """Zammad with a group "Voicemail" and fs-zammad's agent (TOKEN) allowed to create there."""
    zammad.rest.groups["Voicemail"] = 2
    zammad.rest.add_agent("fs-zammad@example.com", token=TOKEN,
                          groups={"Users": "full", "Voicemail": "create"})
    return zammad.rest


@pytest.fixture
def rest(zammad):
    return with_voicemail_group(zammad)


def runner(zammad, fallback="", url=None, read=None):
    api = ZammadApi(url or f"http://127.0.0.1:{zammad.port}", TOKEN, timeout=2)
    return TicketJobs(api, "Voicemail", fallback, **({"read": read} if read else {}))


def run_job(jobs, **change):
    return jobs.run({**JOB, "file": str(RECORDING), **change})


def new_call(zammad, call_id="c-1", number="493023125741"):
    import requests
    requests.post(zammad.url, data={"event": "newCall", "direction": "in", "callId": call_id,
                                    "from": number, "to": "492214710341"}, timeout=5)


def test_a_known_caller_gets_the_ticket_with_the_recording(zammad, rest):
    emma = rest.add_user(firstname="Emma", lastname="Example", phone="+49 30 23125741")
    new_call(zammad)  # Zammad matches the caller at newCall
    outcome = run_job(runner(zammad))
    assert outcome.kind == outcomes.DELIVERED and outcome.status == 201
    [ticket] = rest.tickets.values()
    assert ticket["customer_id"] == emma["id"] and ticket["group_id"] == 2
    assert ticket["title"] == "Voicemail from +493023125741 (Emma Example) [vm-x]"
    article = ticket["article"]
    assert (article["type"], article["sender"], article["internal"]) == ("note", "Agent", True)
    assert article["preferences"] == {"send-auto-response": False}
    [attachment] = article["attachments"]
    assert attachment["data"] == RECORDING.read_bytes()
    assert (attachment["filename"], attachment["mime-type"]) == (RECORDING.name, "audio/wav")


def test_known_before_maybe(zammad, rest):
    agent = rest.add_agent("someone@example.com")
    rest.caller_ids.append(("493023125741", "maybe", agent["id"]))
    known = rest.add_user(firstname="Known", phone="0049 30 23125741")
    new_call(zammad)
    run_job(runner(zammad))
    assert [t["customer_id"] for t in rest.tickets.values()] == [known["id"]]


def test_an_unknown_caller_becomes_a_customer_once(zammad, rest):
    new_call(zammad)
    run_job(runner(zammad))
    run_job(runner(zammad), marker="vm-y", callId="c-2")  # the next message, no caller log line
    customers = [u for u in rest.users.values() if u.get("phone") == "+493023125741"]
    assert len(customers) == 1 and customers[0]["roles"] == ["Customer"]
    assert [t["customer_id"] for t in rest.tickets.values()] == [customers[0]["id"]] * 2


@pytest.mark.parametrize("fallback,kind,detail", [
    ("anonymous@example.com", outcomes.DELIVERED, ""),
    ("", outcomes.FAILED, "Missing required value for field 'customer_id'"),
    ("ghost@example.com", outcomes.FAILED, "No lookup value found for 'customer'"),
])
def test_anonymous_callers(zammad, rest, fallback, kind, detail):
    anon = rest.add_user(login="anonymous@example.com", email="anonymous@example.com")
    new_call(zammad, number="anonymous")
    outcome = run_job(runner(zammad, fallback), **{"from": "anonymous", "name": ""})
    assert outcome.kind == kind and detail in outcome.detail
    assert [t["customer_id"] for t in rest.tickets.values()] == \
        ([anon["id"]] if kind == outcomes.DELIVERED else [])
    assert not [u for u in rest.users.values() if u.get("phone")]  # no customer made up


@pytest.mark.parametrize("story", ["deleted", "too big for Zammad", "not readable"])
def test_a_recording_that_cannot_be_attached_still_gives_a_ticket(zammad, rest, tmp_path,
                                                                  caplog, story):
    path = str(tmp_path / "msg_x.wav")
    read = None
    if story == "too big for Zammad":
        zammad.max_body = 20_000  # the 33 KB recording in base64 is over it
        path = str(RECORDING)
    elif story == "not readable":
        read = lambda p: Recording(None, "is not readable for fs-zammad (permissions)")  # noqa: E731
    new_call(zammad)
    with caplog.at_level(logging.WARNING, logger="fs_zammad.tickets"):
        outcome = runner(zammad, read=read).run({**JOB, "file": path})
    assert outcome.kind == outcomes.DELIVERED and "without the recording" in outcome.detail
    [ticket] = rest.tickets.values()
    body = ticket["article"]["body"]
    assert ticket["article"]["attachments"] == []
    assert f"Recording: missing. The file {path}" in body
    words = {"deleted": "was not found", "too big for Zammad": "too big for Zammad (HTTP 413",
             "not readable": "not readable"}[story]
    assert words in body
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and words in lines[0] and "c-1" in lines[0]


@pytest.mark.parametrize("story,change,detail", [
    ("unknown group", {"group": "Nope"}, "No lookup value found for 'group'"),
    ("no access to the group", {"group": "Users", "access": {}}, "Not authorized"),
    ("token without cti.agent", {"token_permissions": {"ticket.agent"}},
     "Token authorization failed"),
])
def test_refusals_set_the_job_aside(zammad, story, change, detail):
    zammad.rest.groups["Voicemail"] = 2
    zammad.rest.add_agent("fs-zammad@example.com", token=TOKEN,
                          token_permissions=change.get("token_permissions"),
                          groups=change.get("access", {"Users": "full", "Voicemail": "full"}))
    jobs = runner(zammad)
    jobs.group = change.get("group", "Voicemail")
    new_call(zammad)
    outcome = run_job(jobs)
    assert (outcome.kind, outcome.config_error) == (outcomes.FAILED, True)
    assert detail in outcome.detail and zammad.rest.tickets == {}


def test_a_job_run_again_finds_its_ticket(zammad, rest):
    new_call(zammad)
    jobs = runner(zammad)
    first, again = run_job(jobs), run_job(jobs)
    assert len(rest.tickets) == 1
    assert "created" in first.detail and "exists already" in again.detail
    assert again.kind == outcomes.DELIVERED


@pytest.mark.parametrize("behaviour", ["504 after forwarding", "connection closed after forwarding"])
def test_a_create_that_may_have_been_processed_is_not_made_twice(zammad, rest, behaviour):
    """A proxy passes the create on (Zammad stores it) and then answers 504 or drops the
    connection: the next run finds the ticket by its marker."""
    def proxy_says(request):
        if request.method == "POST" and request.path == "/api/v1/tickets" and not done:
            done.append(1)
            return forward_then(504, "<html>504 Gateway Time-out</html>") \
                if behaviour.startswith("504") else FORWARD_THEN_CLOSE
        return FORWARD

    done = []
    new_call(zammad)
    with Proxy(zammad.port, proxy_says) as proxy:
        jobs = runner(zammad, url=f"http://127.0.0.1:{proxy.port}")
        first = run_job(jobs)
        assert first.kind == outcomes.RETRY and len(rest.tickets) == 1
        second = run_job(jobs)
    assert second.kind == outcomes.DELIVERED and "exists already" in second.detail
    assert len(rest.tickets) == 1


def test_zammad_down_is_tried_again(zammad, rest):
    new_call(zammad)
    zammad.set_down(True)
    outcome = run_job(runner(zammad))
    assert (outcome.kind, outcome.status) == (outcomes.RETRY, 503) and rest.tickets == {}
    zammad.set_down(False)
    assert run_job(runner(zammad)).kind == outcomes.DELIVERED and len(rest.tickets) == 1


# -- fs-zammad check ------------------------------------------------------------------------


@pytest.mark.parametrize("story,access,permissions,group,passed,words", [
    ("all good", {"Voicemail": "create"}, None, "Voicemail", [True, True],
     ["voicemail tickets go to group 'Voicemail'", "caller log readable"]),
    ("group misspelt", {"Voicemail": "full"}, None, "voicemail", [False, True],
     ["VOICEMAIL_GROUP 'voicemail' is not a group the token's user can use (its groups: "
      "Voicemail)"]),
    ("read-only access", {"Voicemail": "read"}, None, "Voicemail", [False, True],
     ["may not create tickets there (access: read)"]),
    ("no cti.agent", {"Voicemail": "full"}, {"ticket.agent"}, "Voicemail", [True, False],
     ["the token needs cti.agent"]),
])
def test_check_tickets(zammad, story, access, permissions, group, passed, words):
    zammad.rest.groups["Voicemail"] = 2
    zammad.rest.add_agent("fs-zammad@example.com", token=TOKEN, groups=access,
                          token_permissions=permissions)
    api = ZammadApi(f"http://127.0.0.1:{zammad.port}", TOKEN, timeout=2)
    lines = check_tickets(api, group, "Zammad API")
    assert [ok for ok, _ in lines] == passed
    for word in words:
        assert any(word in what for _, what in lines), lines


def test_fs_zammad_check_tests_token_and_group(fake_fs, zammad, tmp_path):
    zammad.rest.groups["Voicemail"] = 2
    zammad.rest.add_agent("fs-zammad@example.com", token=TOKEN, groups={"Users": "full"})
    env = base_env(fake_fs, zammad, tmp_path, ZAMMAD_API_TOKEN=TOKEN, VOICEMAIL_TICKETS="true",
                   VOICEMAIL_GROUP="Voicemail")
    result = subprocess.run([FS_ZAMMAD, "check"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    [failed] = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert "VOICEMAIL_GROUP 'Voicemail'" in failed
    assert TOKEN not in result.stdout + result.stderr and "Traceback" not in result.stderr
    zammad.rest.users[2]["group_access"]["Voicemail"] = "full"
    result = subprocess.run([FS_ZAMMAD, "check"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout
    assert "ok   Zammad API" in result.stdout and "tickets go to group 'Voicemail'" in \
        result.stdout


def test_the_recording_is_sent_as_strict_base64(zammad, rest):
    """The stand-in decodes strictly (Zammad's rule); the bytes arrive unchanged."""
    new_call(zammad)
    run_job(runner(zammad))
    [request] = [r for r in zammad.requests if r.path == "/api/v1/tickets"]
    import json
    sent = json.loads(request.raw_body)["article"]["attachments"][0]["data"]
    assert base64.b64decode(sent, validate=True) == RECORDING.read_bytes()


# -- the job in the outbox: behind its call's newCall, in front of nobody ---------------------


def _events(call_id="c-1"):
    from fs_zammad.calls import ZammadEvent

    def event(name, **extra):
        return ZammadEvent(call_id, (("event", name), ("callId", call_id), *extra.items()))
    return event


def test_the_job_waits_for_newcall_and_holds_nobody(tmp_path):
    from fs_zammad.outbox import Outbox
    event = _events()
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    outbox.record([event("newCall"), event("answer"), event("voicemail", marker="vm-1"),
                   event("hangup", cause="voicemail")])
    sent = []
    for _ in range(2):   # newCall, then answer: one at a time, in order
        [row] = outbox.ready(10)
        sent.append(row.event)
        outbox.delivered(row.id)
    # the job and the hangup may both go now: the hangup does not wait for the ticket
    assert sent == ["newCall", "answer"]
    assert [r.event for r in outbox.ready(10)] == ["voicemail", "hangup"]
    job = outbox.ready(10)[0]
    outbox.fail(job, "HTTP 403: Not authorized")   # the ticket refused: only it is set aside
    assert [r.event for r in outbox.ready(10)] == ["hangup"]
    outbox.record([event("late", x="1")])          # a later event of the call is not held
    hangup = outbox.ready(10)[0]
    outbox.delivered(hangup.id)
    assert [r.event for r in outbox.ready(10)] == ["late"]
    assert [(r[3], r[4]) for r in outbox.failed_rows()] == [("voicemail", "failed")]
    assert outbox.retry_failed() == 1 and outbox.ready(10)[0].event == "voicemail"
    outbox.close()


def test_a_job_is_held_when_its_newcall_is_set_aside(tmp_path):
    from fs_zammad.outbox import Outbox
    event = _events()
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    outbox.record([event("newCall"), event("voicemail", marker="vm-1")])
    [row] = outbox.ready(10)
    outbox.fail(row, "HTTP 401: token")
    assert outbox.ready(10) == []
    assert [(r[3], r[4]) for r in outbox.failed_rows()] == [("newCall", "failed"),
                                                             ("voicemail", "failed")]
    outbox.close()


def test_a_damaged_outbox_carries_its_ticket_jobs_over(tmp_path):
    from fs_zammad.outbox import COLUMNS, Outbox
    from fs_zammad.salvage import salvage
    event = _events()
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    outbox.record([event("newCall"), event("voicemail", marker="vm-1", file="/v/msg_1.wav")])
    outbox.close()
    rows, _calls, _finished, _, _ = salvage(tmp_path / "outbox.sqlite3")
    carried = [dict(zip(COLUMNS, row)) for row in rows]
    assert [(r["event"], r["state"]) for r in carried] == [("newCall", "pending"),
                                                           ("voicemail", "pending")]
    assert ["marker", "vm-1"] in json.loads(carried[1]["fields"])


@pytest.mark.parametrize("events,words", [
    (("CHANNEL_CREATE",), "CHANNEL_CREATE HEARTBEAT"),
    # every word after CUSTOM is a subclass to FreeSWITCH: HEARTBEAT must come before it
    (("CHANNEL_CREATE", "CUSTOM vm::maintenance"), "CHANNEL_CREATE HEARTBEAT CUSTOM vm::maintenance"),
    (("ALL",), "ALL HEARTBEAT"),
    (("A", "HEARTBEAT", "CUSTOM x::y", "CUSTOM z::w"), "A HEARTBEAT CUSTOM x::y z::w"),
])
def test_subscription_puts_custom_subclasses_last(events, words):
    from fs_zammad.esl import subscription
    assert subscription(events) == words
