"""Whatever stands between fs_zammad and Zammad: the real process behind a real
HTTP server that is an SSO gateway, a reverse proxy, a web site or a throttling
Zammad. Every test ends with what Zammad's caller log holds: every call there,
one hangup for each missed call, no token in any output, no traceback."""

from __future__ import annotations

import email.utils
import json
import re
import subprocess
import time
from urllib.parse import quote

import pytest

from tests import synth
from tests.support.proxy import (
    FORWARD,
    FORWARD_THEN_CLOSE,
    Action,
    Proxy,
    answer,
    forward_then,
    forward_then_hang,
)
from tests.support.service import FS_ZAMMAD, ServiceProcess, base_env
from tests.support.zammad_standin import ZammadStandIn
from tests.test_e2e import emit_all
from tests.test_faults import answered_call, missed_call
from tests.test_ops import free_port, get

LOGIN_PAGE = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>Sign in &middot; Acme SSO"
              "</title></head><body><form method='post'>...</form></body></html>")


@pytest.fixture
def proxy(zammad):
    with Proxy(zammad.port) as server:
        yield server


def some_calls(fake_fs, prefix: str):
    """Three missed calls and two answered ones, all ended: {callId: expected}."""
    expected = {}
    for i in range(3):
        a, events = missed_call(f"{prefix}1{i:02d}")
        emit_all(fake_fs, events)
        expected[a.uuid] = ("cancel", True, None)
    for i in range(2):
        a, _b, start, end = answered_call(f"{prefix}2{i:02d}")
        emit_all(fake_fs, start + end)
        expected[a.uuid] = ("normalClearing", False, "1001")
    return expected


def assert_every_call_once(zammad, expected):
    """Every call in the caller log, ended; a missed call has exactly one hangup
    (a second would mark it done); other calls may have had theirs twice."""
    zammad.wait_for(lambda: len(zammad.caller_log()) == len(expected) and all(
        e["state"] == "hangup" for e in zammad.caller_log()), timeout=30,
        message="every call ended in the caller log")
    log = {e["callId"]: e for e in zammad.caller_log()}
    assert set(log) == set(expected)
    for call_id, (cause, missed, answered_by) in expected.items():
        entry = log[call_id]
        assert (entry["cause"], entry["missed"], entry["answered_by"]) == \
            (cause, missed, answered_by), entry
        assert entry["hangups"] == 1 if missed else entry["hangups"] >= 1, entry
        assert entry["events"].count("newCall") == 1


def run(env, *args) -> subprocess.CompletedProcess:
    result = subprocess.run([FS_ZAMMAD, *args], env=env, capture_output=True, text=True,
                            timeout=60)
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    return result


def token_forms(token: str) -> list[str]:
    forms = [token, quote(token, safe=""), "".join(f"%{b:02x}" for b in token.encode())]
    return forms + [form.upper() for form in forms]  # (a proxy may echo the path upper-cased)


def healthz(port: int, want: int, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, body = get(port, "/healthz")
        if status == want or time.monotonic() > deadline:
            assert status == want, body
            return json.loads(body)
        time.sleep(0.1)


# -- 1 and 2: something else answers instead of Zammad ----------------------------

# case -> (what answers, in place of Zammad; words the ERROR line, /healthz and check hold)
NOT_ZAMMAD = {
    "SSO login page": (lambda p, t: answer(200, LOGIN_PAGE, "text/html; charset=utf-8"),
                       "ZAMMAD_CTI_URL answered HTTP 200 (text/html, page title 'Sign in · "
                       "Acme SSO'), not Zammad's CTI answer"),
    "proxy holding page": (lambda p, t: answer(200, "<html><head><title>We'll be back soon"
                                                    "</title></head><body>Maintenance</body>"
                                                    "</html>", "text/html"),
                           "page title \"We'll be back soon\""),
    "web site at the wrong URL": (lambda p, t: answer(200, "<html><title>Acme GmbH - Home</title>"
                                                           f"<a href='/api/v1/cti/{t}'>x</a>",
                                                      "text/html"),
                                  "page title 'Acme GmbH - Home'"),
    "basic auth in front": (lambda p, t: answer(401, "<html><head><title>401 Authorization "
                                                     "Required</title></head></html>", "text/html",
                                                WWW_Authenticate='Basic realm="intranet"'),
                            "ZAMMAD_CTI_URL answered HTTP 401 (text/html, page title '401 "
                            "Authorization Required'), not Zammad's CTI answer"),
    "302 to a login page": (lambda p, t: answer(302, "", Location="https://sso.acme.test/login?"
                                                                  f"next=/api/v1/cti/{t}"),
                            "ZAMMAD_CTI_URL redirects to https://sso.acme.test/login?…, not to "
                            "Zammad's CTI endpoint (HTTP 302, not followed"),
    "303 to a relative login path": (lambda p, t: answer(303, "", Location=f"/auth/{t}/login"),
                                     "ZAMMAD_CTI_URL redirects to http://127.0.0.1:{port}/auth/***"
                                     "/login, not to Zammad's CTI endpoint (HTTP 303"),
}


@pytest.mark.parametrize("case", NOT_ZAMMAD)
def test_only_zammads_own_answer_counts(case, start_service, fake_fs, zammad, proxy):
    make, words = NOT_ZAMMAD[case]
    words = words.replace("{port}", str(proxy.port))
    in_the_way = make(proxy, zammad.token)
    proxy.behaviour = lambda request: in_the_way
    port = free_port()
    service = start_service(ZAMMAD_CTI_URL=proxy.url(zammad.token), METRICS_PORT=port,
                            METRICS_ADDRESS="127.0.0.1")
    expected = some_calls(fake_fs, "49301")
    line = service.wait_for_log(r"ERROR .*" + re.escape(words))[0]
    detail = line.split(" Zammad: ", 1)[1].split(". Nothing is lost", 1)[0]
    assert "events wait in the outbox" in line

    health = healthz(port, 503)
    assert any(words in reason for reason in health["reasons"]), health
    check = run(service.env, "check")
    assert check.returncode == 1
    failed = [x for x in check.stdout.splitlines() if x.startswith("FAIL Zammad")]
    assert failed and failed[0].endswith(f"/api/v1/cti/***: {detail}"), (failed, detail)

    proxy.wait_for(lambda: sum(r.is_probe for r in proxy.requests) >= 4)  # it keeps asking...
    assert zammad.requests == []                                         # ...Zammad saw nothing
    assert all(r.method == "POST" for r in proxy.requests)               # nothing followed
    # a probe is the only thing sent while it lasts: each real event went out once at most
    real = [(r.call_id, r.event) for r in proxy.requests if not r.is_probe]
    assert len(real) == len(set(real)) <= len(expected)
    assert len([x for x in service.lines if "ERROR" in x and words in x]) == 1  # said once

    proxy.behaviour = lambda request: FORWARD                             # the admin fixes it
    assert_every_call_once(zammad, expected)
    service.wait_for_log("itself answers again")
    assert healthz(port, 200)["reasons"] == []
    metrics_text = get(port, "/metrics")[1]
    assert 'result="not_zammad"' in metrics_text
    for output in (service.log, check.stdout + check.stderr, json.dumps(health), metrics_text):
        for form in token_forms(zammad.token):
            assert form not in output


def test_one_tenant_behind_a_login_page_never_delays_another(start_service, fake_fs, zammad,
                                                             proxy):
    """acme's URL leads to a login page: globex's calls go on; acme's wait, then arrive."""
    proxy.behaviour = lambda request: answer(200, LOGIN_PAGE, "text/html")
    port = free_port()
    with ZammadStandIn(token="globex-tok-91") as globex:
        service = start_service(
            ZAMMAD_CTI_URL="", ZAMMAD_INSTANCES="acme,globex",
            ZAMMAD_CTI_URL_ACME=proxy.url(zammad.token), ZAMMAD_CTI_URL_GLOBEX=globex.url,
            ZAMMAD_ROUTES="did:4922147*=acme,did:4940*=globex", METRICS_PORT=port)
        acme, globex_calls = {}, {}
        for i in range(3):
            for did, calls in (("492214710334", acme), ("4940999000", globex_calls)):
                a = synth.caller(did=did, cid=f"4930555{i:03d}")
                emit_all(fake_fs, [a.create(), a.execute("bridge"),
                                   a.hangup("NORMAL_CLEARING", "recv_cancel")])
                calls[a.uuid] = ("cancel", True, None)
        assert_every_call_once(globex, globex_calls)
        words = "Zammad (acme): ZAMMAD_CTI_URL_ACME answered HTTP 200 (text/html, page title " \
                "'Sign in · Acme SSO')"
        service.wait_for_log(re.escape(words))
        assert healthz(port, 503)["reasons"][0].startswith(words)
        check = run(service.env, "check")
        assert check.returncode == 1 and "FAIL Zammad [acme] " in check.stdout
        assert "ZAMMAD_CTI_URL_ACME answered HTTP 200" in check.stdout
        assert "ok   Zammad [globex]" in check.stdout
        proxy.behaviour = lambda request: FORWARD
        assert_every_call_once(zammad, acme)
        healthz(port, 200)
        service.stop()
        service.assert_no_secrets(globex.token, zammad.token)


# case -> (configured path prefix, the redirect the proxy answers, the URL the admin sets)
REDIRECTS = {
    "301 to Zammad itself": ("/old", lambda p, z: answer(301, "", Location=z.url),
                             lambda p, z: z.url),
    "308 relative": ("/zammad", lambda p, z: answer(308, "", Location=f"/api/v1/cti/{z.token}"),
                     lambda p, z: p.url(z.token)),
    "302 to https": ("/x", lambda p, z: answer(302, "", Location=z.url),
                     lambda p, z: z.url),
}


@pytest.mark.parametrize("case", REDIRECTS)
def test_a_redirect_names_the_url_to_set(case, start_service, fake_fs, zammad, proxy, tmp_path):
    prefix, make, right = REDIRECTS[case]
    redirect = make(proxy, zammad)
    proxy.behaviour = lambda request: redirect if request.path.startswith(prefix) else FORWARD
    wrong = f"http://127.0.0.1:{proxy.port}{prefix}/api/v1/cti/{zammad.token}"
    service = start_service(ZAMMAD_CTI_URL=wrong)
    expected = some_calls(fake_fs, "49302")
    target = right(proxy, zammad).rpartition("/")[0] + "/***"
    service.wait_for_log(re.escape(f"ERROR   Zammad: ZAMMAD_CTI_URL redirects to {target}: set "
                                   f"it to that URL (HTTP {redirect.status}, not followed)"))
    check = run(service.env, "check")
    assert check.returncode == 1 and f"redirects to {target}" in check.stdout
    assert zammad.requests == [] and all(r.method == "POST" for r in proxy.requests)
    assert service.stop() == 0  # events kept in the outbox

    fixed = ServiceProcess(base_env(fake_fs, zammad, tmp_path / "state",
                                    ZAMMAD_CTI_URL=right(proxy, zammad)))
    try:
        assert_every_call_once(zammad, expected)
    finally:
        assert fixed.stop() == 0
        fixed.assert_no_secrets(zammad.token, quote(zammad.token, safe=""))
    service.assert_no_secrets(zammad.token)
    assert zammad.token not in check.stdout + check.stderr


# -- 3: throttling ----------------------------------------------------------------

RETRY_AFTER = {
    "429 seconds": (429, lambda: "1", 1.0),
    "503 seconds": (503, lambda: "1", 1.0),
    "429 HTTP date": (429, lambda: email.utils.formatdate(time.time() + 2.5, usegmt=True), 1.4),
}


@pytest.mark.parametrize("case", RETRY_AFTER)
def test_retry_after_is_respected(case, start_service, fake_fs, zammad, proxy):
    status, value, at_least = RETRY_AFTER[case]
    throttled = []

    def busy_three_times(request):
        if request.is_probe or len(throttled) >= 3:
            return FORWARD
        throttled.append(request)
        return answer(status, "<html><title>Too busy</title></html>", Retry_After=value())

    proxy.behaviour = busy_three_times
    service = start_service(ZAMMAD_CTI_URL=proxy.url(zammad.token), ZAMMAD_CONCURRENCY="1")
    expected = some_calls(fake_fs, "49303")
    assert_every_call_once(zammad, expected)
    # nothing at all went to that Zammad before the time it asked for
    for slowed in throttled:
        after = [r for r in proxy.requests if r.arrived > slowed.arrived]
        assert after and after[0].arrived - slowed.answered >= at_least - 0.05, \
            (case, after[0].arrived - slowed.answered)
    busy = [x for x in service.lines if f"is busy (HTTP {status})" in x]
    assert len(busy) == 1, busy  # logged once for the whole episode
    assert not [x for x in service.lines if "unsure" in x or "may have reached" in x]


def test_retry_after_is_not_cut_short_by_a_request_that_fails_after_it(
        start_service, fake_fs, zammad, proxy):
    """Two newCalls in flight: the second gets 429 Retry-After: 3, the first a 502 just
    after it. The 502's backoff (about half a second) must not end the wait early."""
    answered = []

    def slow_502_then_429(request):
        if request.is_probe or len(answered) >= 2:
            return FORWARD
        answered.append(request)
        if len(answered) == 1:
            return Action(False, 502, "<html><title>502</title></html>", hang=0.6)
        return answer(429, "", Retry_After="3")

    proxy.behaviour = slow_502_then_429
    start_service(ZAMMAD_CTI_URL=proxy.url(zammad.token), ZAMMAD_CONCURRENCY="4")
    calls = [missed_call("4930510001"), missed_call("4930510002")]
    emit_all(fake_fs, calls[0][1][:2] + calls[1][1][:2])     # both newCalls at once
    proxy.wait_for(lambda: len(answered) == 2 and all(r.answered for r in answered))
    throttled = next(r for r in answered if r.action.status == 429)
    for _, events in calls:
        emit_all(fake_fs, events[2:])
    zammad.wait_for(lambda: all(zammad.requests_for(a.uuid) and
                                zammad.requests_for(a.uuid)[-1].event == "hangup"
                                for a, _ in calls), timeout=20)
    after = [r.arrived - throttled.answered for r in proxy.requests
             if r.arrived > throttled.answered]
    assert after and min(after) >= 3 - 0.05, after   # nothing, not even a probe, before then
    assert [[r.event for r in zammad.requests_for(a.uuid)] for a, _ in calls] == \
        [["newCall", "hangup"]] * 2


# -- 4: stores, then fails ----------------------------------------------------------

def echo_page(status: int, path: str) -> str:
    """A proxy's error page that echoes the path, token and all (plain and encoded)."""
    encoded = "".join(f"%{b:02x}" for b in path.encode())
    return f"<html><head><title>{status} for {path} ({encoded})</title></head></html>"


# case -> (the answer after the request was passed on to Zammad, env, maybe processed?)
STORES_THEN_FAILS = {
    "504 after passing it on": (lambda path: forward_then(504, echo_page(504, path)), {}, True),
    "502 after passing it on": (lambda path: forward_then(502, echo_page(502, path)),
                                {"LOG_FORMAT": "json"}, True),
    "unexplained 500": (lambda path: forward_then(500, echo_page(500, path)), {}, True),
    "connection closed": (lambda path: FORWARD_THEN_CLOSE, {}, True),
    "no answer in time": (lambda path: forward_then_hang(2.0), {"ZAMMAD_TIMEOUT": "0.5"}, True),
    "a relay's 200 OK": (lambda path: forward_then(200, "OK", "text/plain"), {}, True),
    "a relay's 200 XML": (lambda path: forward_then(200, '<?xml version="1.0"?><response>'
                                                    "<status>OK</status></response>", "text/xml"),
                          {}, True),
    "502 echoing the path upper-cased": (lambda path: forward_then(502, echo_page(502, path.upper())),
                                         {}, True),
    # control: a 503 before the request was read proves nothing was processed
    "503 not passed on": (lambda path: answer(503, echo_page(503, path)), {}, False),
}


@pytest.mark.parametrize("case", STORES_THEN_FAILS)
def test_a_proxy_that_stores_then_fails(case, start_service, fake_fs, zammad, proxy):
    make, env, maybe = STORES_THEN_FAILS[case]
    seen = set()

    def first_time_fails(request):
        key = (request.call_id, request.event)
        if request.is_probe or key in seen:
            return FORWARD
        seen.add(key)
        return make(request.path)

    proxy.behaviour = first_time_fails
    service = start_service(ZAMMAD_CTI_URL=proxy.url(zammad.token), **env)
    expected = some_calls(fake_fs, "49304")
    assert_every_call_once(zammad, expected)
    missed = [call_id for call_id, (_, is_missed, _) in expected.items() if is_missed]
    resent = set(expected) - set(missed) if maybe else set(expected)

    def hangups_sent(call_id):
        return [r.event for r in proxy.requests if r.call_id == call_id].count("hangup")

    # any hangup is sent again after an answer that proves nothing, and any but a
    # missed call's after a "maybe"
    proxy.wait_for(lambda: all(hangups_sent(c) == 2 for c in resent))
    assert service.stop() == 0
    for call_id in set(expected) - resent:  # never a second hangup after a maybe
        assert hangups_sent(call_id) == 1
    listing = run(service.env, "outbox", "list")
    assert ": 0 pending" in listing.stdout
    lines = listing.stdout.splitlines()   # an unsure hangup: its call, then "why: ..."
    unsure = [x.split()[0] for x in lines if x.startswith("  ") and " from " in x]
    assert sorted(unsure) == (sorted(missed) if maybe else [])
    whys = [x for x in lines if x.lstrip().startswith("why: ")]
    assert len(whys) == len(unsure) and all("may have reached Zammad" in x for x in whys)
    if maybe:
        service.wait_for_log("hangup of a missed call may have reached Zammad")
    for output in (service.log, listing.stdout + listing.stderr):
        for form in token_forms(zammad.token):
            assert form not in output, case
    if env.get("LOG_FORMAT") == "json":
        records = [json.loads(x) for x in service.lines if x.startswith("{")]
        assert any("***" in r.get("detail", "") for r in records)
