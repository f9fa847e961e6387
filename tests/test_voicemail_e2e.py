"""Voicemail tickets end to end: the real fs-zammad replays the recorded calls S17
(a caller nobody answered leaves a message) and S34 (answered by 1001, transferred
to 1002's mailbox) from the fake FreeSWITCH, with the real recording mounted where
VOICEMAIL_PATH_MAP says; the Zammad stand-in follows Zammad's REST rules. Each
fault test asserts what Zammad ends with: one ticket per message, the caller log
as without tickets."""

import shutil
import subprocess

import pytest

from tests.support.proxy import FORWARD, FORWARD_THEN_CLOSE, Proxy, forward_then, forward_then_hang
from tests.support.service import FS_ZAMMAD
from tests.support.zammad_standin import ZammadStandIn
from tests.test_e2e import FIXTURES, a_leg
from tests.test_voicemail import RECORDING, S17_FILE, S34_FILE, TOKEN, with_voicemail_group

MESSAGES = {"S17": S17_FILE, "S34": S34_FILE}
MARKERS = {"S17": "vm-194c4357-0bd2-4896-803f-b1301e7de130",
           "S34": "vm-d5a3ee30-7d53-42d6-b868-083bf7023efc"}
CALLER = "493023125741"


@pytest.fixture
def storage(tmp_path):
    """FreeSWITCH's two storage directories of the captures, mounted under tmp_path,
    each message file holding the real recording."""
    mounts = {"/var/lib/freeswitch/storage": tmp_path / "vm-a", "/tmp/fs/storage": tmp_path / "vm-b"}
    for path in MESSAGES.values():
        source = next(s for s in mounts if path.startswith(s + "/"))
        local = mounts[source] / path[len(source) + 1:]
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(RECORDING, local)
    return ",".join(f"{source}={target}" for source, target in mounts.items())


@pytest.fixture
def rest(zammad):
    return with_voicemail_group(zammad)


def vm_env(storage, **env):
    return {"ZAMMAD_API_TOKEN": TOKEN, "VOICEMAIL_TICKETS": "true",
            "VOICEMAIL_GROUP": "Voicemail", "VOICEMAIL_PATH_MAP": storage,
            "ZAMMAD_TIMEOUT": "2", **env}


def delivered(scenario):
    return rf"voicemail callId={a_leg(scenario)} .*result=delivered"


def replay(fake_fs, *scenarios):
    for scenario in scenarios:
        fake_fs.replay(FIXTURES / scenario / "events_all.txt")


def tickets_by_marker(rest):
    found = {}
    for ticket in rest.tickets.values():
        marker = ticket["title"].rsplit("[", 1)[-1].rstrip("]")
        found.setdefault(marker, []).append(ticket)
    return found


def wait_for_tickets(zammad, rest, scenarios, timeout=20.0):
    zammad.wait_for(lambda: all(MARKERS[s] in tickets_by_marker(rest) for s in scenarios),
                    timeout=timeout)
    return tickets_by_marker(rest)


def assert_one_ticket_each(rest, scenarios, customer_id):
    found = tickets_by_marker(rest)
    assert sorted(found) == sorted(MARKERS[s] for s in scenarios)
    for scenario in scenarios:
        [ticket] = found[MARKERS[scenario]]
        assert ticket["customer_id"] == customer_id and ticket["group_id"] == 2
        [attachment] = ticket["article"]["attachments"]
        assert attachment["data"] == RECORDING.read_bytes()
        assert attachment["filename"] == MESSAGES[scenario].rsplit("/", 1)[1]


def assert_caller_log_as_without_tickets(zammad):
    zammad.wait_for(lambda: all(any(r.event == "hangup" and r.status == 200
                                    for r in zammad.requests_for(a_leg(s)))
                                for s in ("S17", "S34")))
    log = {e["callId"]: e for e in zammad.caller_log()}
    assert (log[a_leg("S17")]["cause"], log[a_leg("S17")]["missed"]) == ("voicemail", True)
    assert (log[a_leg("S34")]["cause"], log[a_leg("S34")]["missed"]) == ("normalClearing", False)
    assert all(log[a_leg(s)]["hangups"] == 1 for s in ("S17", "S34"))


@pytest.mark.parametrize("caller", ["known to Zammad", "new to Zammad"])
def test_each_recorded_message_becomes_one_ticket(start_service, fake_fs, zammad, rest, storage,
                                                  caller):
    if caller == "known to Zammad":
        customer = rest.add_user(firstname="Emma", lastname="Example", phone="030 23125741")
    service = start_service(**vm_env(storage))
    assert "vm::maintenance" in fake_fs.wait_for_subscription()
    replay(fake_fs, "S17", "S34")
    found = wait_for_tickets(zammad, rest, ("S17", "S34"))
    if caller == "new to Zammad":
        # created once, with just the number; the second message found it
        [customer] = [u for u in rest.users.values() if u.get("phone") == "+" + CALLER]
        assert customer["roles"] == ["Customer"]
        name = ""
    else:
        name = " (Emma Example)"
    assert_one_ticket_each(rest, ("S17", "S34"), customer["id"])
    s17, s34 = found[MARKERS["S17"]][0], found[MARKERS["S34"]][0]
    assert s17["title"] == f"Voicemail from +{CALLER}{name} [{MARKERS['S17']}]"
    body = s34["article"]["body"].splitlines()
    assert "Mailbox: 1002@127.0.0.1" in body and "Number dialled: +492214710359" in body
    assert "Time: 2026-12-02 15:06:54 UTC" in body and "Length: 0:02" in body
    assert (s34["article"]["internal"], s34["article"]["sender"]) == (True, "Agent")
    assert_caller_log_as_without_tickets(zammad)
    service.wait_for_log(delivered("S34"))


def test_tickets_off_subscribes_and_sends_nothing_more(start_service, fake_fs, zammad, rest,
                                                      storage):
    start_service(ZAMMAD_API_TOKEN=TOKEN, VOICEMAIL_PATH_MAP=storage)
    assert "vm::maintenance" not in fake_fs.wait_for_subscription()
    replay(fake_fs, "S17", "S34")
    assert rest.tickets == {} and not [r for r in zammad.requests if "tickets" in r.path]
    assert_caller_log_as_without_tickets(zammad)


def test_a_recording_not_mounted_still_gives_a_ticket(start_service, fake_fs, zammad, rest,
                                                      tmp_path):
    service = start_service(**vm_env(f"/var/lib/freeswitch/storage={tmp_path}/not-mounted"))
    replay(fake_fs, "S17")
    [ticket] = wait_for_tickets(zammad, rest, ("S17",))[MARKERS["S17"]]
    body = ticket["article"]["body"]
    assert ticket["article"]["attachments"] == []
    assert f"{tmp_path}/not-mounted/voicemail/default/127.0.0.1/1001/" in body
    assert f"(FreeSWITCH: {S17_FILE}) was not found" in body
    assert len(service.wait_for_log(r"recording .* was not found")) == 1


def test_zammad_down_then_back_gives_one_ticket_each(start_service, fake_fs, zammad, rest,
                                                     storage):
    customer = rest.add_user(firstname="Emma", phone="+493023125741")
    zammad.set_down(True)
    service = start_service(**vm_env(storage))
    replay(fake_fs, "S17", "S34")
    service.wait_for_log("unreachable")
    zammad.wait_for(lambda: len(zammad.requests) >= 4)   # tried while down
    zammad.set_down(False)
    wait_for_tickets(zammad, rest, ("S17", "S34"), timeout=30)
    assert_one_ticket_each(rest, ("S17", "S34"), customer["id"])
    assert_caller_log_as_without_tickets(zammad)


@pytest.mark.parametrize("behaviour", ["504 after passing it on", "connection dropped after "
                                       "passing it on"])
def test_a_create_that_may_have_reached_zammad_is_not_made_twice(start_service, fake_fs, zammad,
                                                                 rest, storage, behaviour):
    """A proxy in front of Zammad's REST API passes the first create on (Zammad stores
    the ticket), then answers 504 or drops the connection."""
    customer = rest.add_user(firstname="Emma", phone="+493023125741")
    cut = []

    def proxy_says(request):
        if request.method == "POST" and request.path == "/api/v1/tickets" and not cut:
            cut.append(request)
            return forward_then(504, "<html>504 Gateway Time-out</html>") \
                if behaviour.startswith("504") else FORWARD_THEN_CLOSE
        return FORWARD

    with Proxy(zammad.port, proxy_says) as proxy:
        service = start_service(**vm_env(storage, ZAMMAD_API_URL=f"http://127.0.0.1:{proxy.port}"))
        replay(fake_fs, "S17")
        wait_for_tickets(zammad, rest, ("S17",))
        service.wait_for_log(delivered("S17"))
        assert cut and len(rest.tickets) == 1
    assert_one_ticket_each(rest, ("S17",), customer["id"])
    assert "exists already" in service.log


def test_killed_mid_job_then_restarted_gives_one_ticket(start_service, fake_fs, zammad, rest,
                                                        storage):
    """kill -9 while the create is at Zammad (stored, the answer held back by a proxy):
    the next start finds the ticket by its marker instead of making a second."""
    customer = rest.add_user(firstname="Emma", phone="+493023125741")

    def proxy_says(request):
        if request.method == "POST" and request.path == "/api/v1/tickets":
            return forward_then_hang(30)
        return FORWARD

    with Proxy(zammad.port, proxy_says) as proxy:
        service = start_service(**vm_env(storage, ZAMMAD_API_URL=f"http://127.0.0.1:{proxy.port}",
                                         ZAMMAD_TIMEOUT="60"))
        replay(fake_fs, "S17")
        zammad.wait_for(lambda: len(rest.tickets) == 1)
        service.kill()
    again = start_service(**vm_env(storage))
    again.wait_for_log(delivered("S17"))
    assert_one_ticket_each(rest, ("S17",), customer["id"])
    assert "exists already" in again.log


def test_a_refused_ticket_is_set_aside_without_holding_the_call(start_service, fake_fs, zammad,
                                                               storage):
    """The token's user may not create tickets in the group: the job is set aside with
    Zammad's words, the call's hangup still goes out; after the fix, 'outbox retry'
    makes the ticket."""
    zammad.rest.groups["Voicemail"] = 2
    bridge = zammad.rest.add_agent("fs-zammad@example.com", token=TOKEN,
                                   groups={"Users": "full", "Voicemail": "read"})
    service = start_service(**vm_env(storage))
    replay(fake_fs, "S17", "S34")
    assert_caller_log_as_without_tickets(zammad)
    service.wait_for_log(r"voicemail for call .* not delivered \(HTTP 403: Not authorized\)")
    listing = subprocess.run([FS_ZAMMAD, "outbox", "list"], env=service.env,
                             capture_output=True, text=True, timeout=30).stdout
    set_aside = [line for line in listing.splitlines() if "\tvoicemail\t" in line]
    assert "0 pending, 2 set aside" in listing, listing
    assert len(set_aside) == 2 and all("HTTP 403: Not authorized" in line
                                       for line in set_aside), listing
    assert "\thangup\t" not in listing and zammad.rest.tickets == {}
    bridge["group_access"]["Voicemail"] = "create"
    subprocess.run([FS_ZAMMAD, "outbox", "retry"], env=service.env, check=True,
                   capture_output=True, timeout=30)
    wait_for_tickets(zammad, zammad.rest, ("S17", "S34"))
    assert len(zammad.rest.tickets) == 2
    assert_caller_log_as_without_tickets(zammad)   # nothing sent twice


def test_rest_api_failing_alone_delays_only_the_ticket(start_service, fake_fs, zammad, rest,
                                                       storage):
    """Zammad's REST API answers 502 (a proxy route) while its CTI endpoint works: the
    caller log gets every event at once; the ticket follows once the API answers."""
    failing = [True]

    def proxy_says(request):
        return forward_then(502, "<html>502 Bad Gateway</html>") if failing[0] else FORWARD

    customer = rest.add_user(firstname="Emma", phone="+493023125741")
    with Proxy(zammad.port, proxy_says) as proxy:
        service = start_service(**vm_env(storage, ZAMMAD_API_URL=f"http://127.0.0.1:{proxy.port}"))
        replay(fake_fs, "S17", "S34")
        assert_caller_log_as_without_tickets(zammad)
        proxy.wait_for(lambda: len(proxy.requests) >= 2)
        assert rest.tickets == {}
        failing[0] = False
        wait_for_tickets(zammad, rest, ("S17", "S34"), timeout=30)
    assert_one_ticket_each(rest, ("S17", "S34"), customer["id"])
    assert "Traceback" not in service.log


def test_each_tenant_gets_its_own_tickets(start_service, fake_fs, zammad, rest, storage):
    """Two Zammad systems: S17's number is routed to acme, whose settings are its own
    (VOICEMAIL_GROUP_ACME, ZAMMAD_API_TOKEN_ACME); S34 goes to the default one."""
    with ZammadStandIn(token="acme-cti-tok-77") as acme:
        acme.rest.groups["Acme Voicemail"] = 5
        acme.rest.add_agent("fs-zammad@acme.example", token="acme-api-tok-78",
                            groups={"Acme Voicemail": "full"})
        service = start_service(**vm_env(storage, ZAMMAD_INSTANCES="acme",
                                         ZAMMAD_CTI_URL_ACME=acme.url,
                                         ZAMMAD_API_TOKEN_ACME="acme-api-tok-78",
                                         VOICEMAIL_GROUP_ACME="Acme Voicemail",
                                         ZAMMAD_ROUTES="did:492214710341=acme"))
        replay(fake_fs, "S17", "S34")
        wait_for_tickets(acme, acme.rest, ("S17",))
        wait_for_tickets(zammad, rest, ("S34",))
        [acme_ticket] = acme.rest.tickets.values()
        assert acme_ticket["group_id"] == 5 and MARKERS["S17"] in acme_ticket["title"]
        assert [MARKERS["S34"] in t["title"] for t in rest.tickets.values()] == [True]
        assert acme_ticket["article"]["attachments"][0]["data"] == RECORDING.read_bytes()
        service.assert_no_secrets("acme-api-tok-78", acme.token, TOKEN)
