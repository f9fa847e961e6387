"""What an HTTP answer means (pure): delivered only on Zammad's own answer, a
hangup a second copy would harm never sent again after an answer that may mean
"processed", Retry-After, redirects, and no token in any word we pass on."""

import email.utils
import json
import logging
import string
import time

import gevent
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fs_zammad import logs, zammad
from fs_zammad.delivery import (
    RETRY_LATER,
    SENT,
    SET_ASIDE,
    UNSURE,
    WAIT,
    Delivery,
    disposition,
)
from fs_zammad.outbox import Outbox
from fs_zammad.zammad import (
    DELIVERED,
    FAILED,
    NOT_ZAMMAD,
    RETRY,
    THROTTLED,
    ZAMMAD_DOWN,
    Outcome,
    ZammadClient,
    classify,
    parse_retry_after,
)
from tests.support.proxy import Proxy, answer

JSON = "application/json; charset=utf-8"
HTML = "text/html; charset=utf-8"
LOGIN = "<!DOCTYPE html><html><head><title>Sign in &middot; Acme SSO</title></head><body>" \
        "<form>...</form></body></html>"
URL = "https://helpdesk.acme.test/api/v1/cti/tok-9d8e7f"

# status, content type, body, event, once -> (kind, delivered to the fate of the row)
# The fate for once=False is the same for every event; for a once-hangup it is UNSURE
# exactly when the answer leaves open that Zammad processed it.
ANSWERS = [
    # Zammad's own answers
    (200, JSON, "{}", "newCall", DELIVERED, SENT, SENT),
    (200, "application/json", '{"action":"reject","reason":"busy"}', "newCall", DELIVERED, SENT,
     SENT),
    (200, JSON, "{}", "hangup", DELIVERED, SENT, SENT),
    (500, JSON, '{"error":"call_id abc already exists!"}', "newCall", DELIVERED, SENT, SENT),
    (500, JSON, '{"error":"No such call_id abc"}', "hangup", FAILED, SET_ASIDE, SET_ASIDE),
    (401, JSON, '{"error":"Invalid token, please contact your admin!"}', "hangup", FAILED,
     SET_ASIDE, SET_ASIDE),
    (422, JSON, '{"error":"Feature is disabled, please contact your administrator!"}', "hangup",
     FAILED, SET_ASIDE, SET_ASIDE),
    (500, JSON, '{"error":"PG::ConnectionBad"}', "hangup", RETRY, RETRY_LATER, UNSURE),
    (500, HTML, "<html><h1>We're sorry, but something went wrong.</h1></html>", "answer",
     RETRY, RETRY_LATER, UNSURE),
    # pages that are not Zammad's answer: a login page, a holding page, a web site
    (200, HTML, LOGIN, "hangup", NOT_ZAMMAD, WAIT, WAIT),
    (200, "text/html", "<html><title>Back soon</title></html>", "newCall", NOT_ZAMMAD, WAIT,
     WAIT),
    (200, "", "  <html>no content type</html>", "hangup", NOT_ZAMMAD, WAIT, WAIT),
    (200, HTML, "\ufeff<!-- sso -->\n<HTML lang=en><title>Login</title>", "hangup", NOT_ZAMMAD,
     WAIT, WAIT),
    (200, "application/xhtml+xml", '<?xml version="1.0"?>\n<!DOCTYPE html PUBLIC "-//W3C//DTD '
     'XHTML 1.0 Strict//EN"><html><title>Login</title></html>', "hangup", NOT_ZAMMAD, WAIT, WAIT),
    # 2xx that something may have passed on: Zammad's {} relabelled, a relay's OK, 202, 204
    (200, "text/html", "{}", "hangup", NOT_ZAMMAD, WAIT, UNSURE),
    (200, "text/plain", "OK", "hangup", NOT_ZAMMAD, WAIT, UNSURE),
    (200, "text/xml", '<?xml version="1.0"?><response><status>OK</status></response>', "hangup",
     NOT_ZAMMAD, WAIT, UNSURE),
    (200, JSON, "<ok/>", "hangup", NOT_ZAMMAD, WAIT, UNSURE),
    (200, "text/html", "<p>Accepted</p>", "hangup", NOT_ZAMMAD, WAIT, UNSURE),
    (200, JSON, "[]", "hangup", NOT_ZAMMAD, WAIT, UNSURE),
    (200, JSON, '{"error":"Unauthorized"}', "hangup", NOT_ZAMMAD, WAIT, UNSURE),
    (200, JSON, "", "hangup", NOT_ZAMMAD, WAIT, UNSURE),
    (202, JSON, "{}", "hangup", NOT_ZAMMAD, WAIT, UNSURE),
    (204, "", "", "hangup", NOT_ZAMMAD, WAIT, UNSURE),
    # redirects: never followed, never processed by Zammad
    (301, HTML, "", "hangup", NOT_ZAMMAD, WAIT, WAIT),
    (302, HTML, "", "newCall", NOT_ZAMMAD, WAIT, WAIT),
    (307, HTML, "", "hangup", NOT_ZAMMAD, WAIT, WAIT),
    (308, HTML, "", "hangup", NOT_ZAMMAD, WAIT, WAIT),
    # proxies
    (502, HTML, "<html><title>502 Bad Gateway</title></html>", "hangup", ZAMMAD_DOWN, WAIT,
     UNSURE),
    (504, HTML, "<html><title>504 Gateway Time-out</title></html>", "hangup", ZAMMAD_DOWN, WAIT,
     UNSURE),
    (503, HTML, "<html><title>503 Service Temporarily Unavailable</title></html>", "hangup",
     ZAMMAD_DOWN, WAIT, WAIT),
    (429, "", "", "hangup", RETRY, RETRY_LATER, RETRY_LATER),
    (408, "", "", "hangup", RETRY, RETRY_LATER, RETRY_LATER),
    (404, HTML, "<html><title>404 Not Found</title></html>", "hangup", NOT_ZAMMAD, WAIT, WAIT),
    (403, HTML, "<html><title>403 Forbidden</title></html>", "hangup", NOT_ZAMMAD, WAIT, WAIT),
    (401, "text/plain", "Unauthorized", "newCall", NOT_ZAMMAD, WAIT, WAIT),
    (407, "", "", "hangup", NOT_ZAMMAD, WAIT, WAIT),
    (404, JSON, '{"error":"No route matches [POST] /api/v1/ctix/x"}', "hangup", FAILED,
     SET_ASIDE, SET_ASIDE),
    (400, JSON, '{"error":"bad"}', "hangup", FAILED, SET_ASIDE, SET_ASIDE),
]


@pytest.mark.parametrize("status,ctype,body,event,kind,fate,fate_once", ANSWERS)
def test_each_answer_and_what_becomes_of_the_event(status, ctype, body, event, kind, fate,
                                                   fate_once):
    outcome = classify(event, status, body, ctype, location="/elsewhere", url=URL)
    assert outcome.kind == kind
    assert disposition(outcome, once=False) == fate
    assert disposition(outcome, once=True) == fate_once


NETWORK = [  # the client's own outcomes without an HTTP answer (see network_outcome)
    (Outcome(ZAMMAD_DOWN, 0, "connection refused or unreachable"), WAIT),
    (Outcome(ZAMMAD_DOWN, 0, "DNS lookup failed for Zammad's host"), WAIT),
    (Outcome(ZAMMAD_DOWN, 0, "TLS error: [SSL: WRONG_VERSION_NUMBER]"), WAIT),
    (Outcome(ZAMMAD_DOWN, 0, "no answer in time", maybe_processed=True), UNSURE),
    (Outcome(ZAMMAD_DOWN, 0, "connection lost during the request", maybe_processed=True),
     UNSURE),
]


@pytest.mark.parametrize("outcome,fate_once", NETWORK)
def test_without_an_answer(outcome, fate_once):
    assert disposition(outcome, once=False) == WAIT
    assert disposition(outcome, once=True) == fate_once


def proves_not_processed(status: int, body: str) -> bool:
    """The answers the README lists as proof that Zammad did not process the request."""
    page = body.lstrip("\ufeff \t\r\n").lower()
    return (300 <= status < 500 or status == 503
            or (status == 200 and page.startswith(("<!doctype html", "<html>", "<html "))))


content_types = st.sampled_from(["application/json", JSON, "application/problem+json",
                                 "text/html", HTML, "text/plain", "", "application/xml"])
bodies = st.one_of(st.text(max_size=80), st.just("{}"), st.just('{"error":"x"}'),
                   st.just(LOGIN), st.just("[]"), st.just("null"), st.just('"{}"'),
                   st.builds(str.__add__, st.sampled_from(["<", "<?xml ?>", "\ufeff<html>",
                                                           "<HTML ", "<!-- x -->"]),
                             st.text(max_size=40)))


@settings(max_examples=300)
@given(st.integers(100, 599), content_types, bodies,
       st.sampled_from(["newCall", "answer", "hangup"]), st.one_of(st.none(), st.floats(0, 1e6)))
def test_only_zammads_own_answer_is_delivered(status, ctype, body, event, retry_after):
    outcome = classify(event, status, body, ctype, retry_after=retry_after, url=URL)
    if outcome.kind == DELIVERED:
        if status == 200:
            assert zammad.is_json_type(ctype) and isinstance(json.loads(body), dict)
            assert "error" not in json.loads(body)
        else:
            assert (status, event) == (500, "newCall") and "already exists" in body


@settings(max_examples=300)
@given(st.integers(100, 599), content_types, bodies, st.one_of(st.none(), st.floats(0, 1e6)))
def test_a_harmful_hangup_is_kept_pending_only_on_proof(status, ctype, body, retry_after):
    outcome = classify("hangup", status, body, ctype, retry_after=retry_after, url=URL)
    fate = disposition(outcome, once=True)
    if fate in (WAIT, RETRY_LATER):  # it will be sent again
        assert proves_not_processed(status, body), (status, ctype, body, outcome)
    if not proves_not_processed(status, body) and outcome.kind != DELIVERED \
            and outcome.kind != FAILED:
        assert fate == UNSURE


class ScriptedClient:
    """Answers each POST with the next outcome; counts what it was sent."""

    redacted_url = "(test)"

    def __init__(self, outcomes):
        self.outcomes = list(outcomes)
        self.sent = []

    def post(self, fields):
        self.sent.append(dict(fields))
        return self.outcomes.pop(0) if self.outcomes else Outcome(DELIVERED, 200, "")


class Missed:
    """A missed call's newCall + hangup, as the tracker stores them."""

    def __init__(self, call_id, name, once):
        self.call_id, self.name, self.once, self.instance = call_id, name, once, ""
        self.fields = (("event", name), ("direction", "in"), ("callId", call_id)) + (
            (("from", "491"), ("to", "492")) if name == "newCall" else (("cause", "cancel"),))


answers = st.tuples(st.integers(200, 599), content_types, bodies,
                    st.one_of(st.none(), st.floats(0, 100)))


@settings(max_examples=200, deadline=None)
@given(st.lists(answers, min_size=1, max_size=6), st.booleans())
def test_no_second_post_of_a_hangup_after_a_maybe(script, once):
    outbox = Outbox(":memory:")
    outbox.record([Missed("c1", "hangup", once)])
    outcomes = [classify("hangup", s, b, c, retry_after=r, url=URL) for s, c, b, r in script]
    client = ScriptedClient(outcomes)
    delivery = Delivery(outbox, client, retry_max=0.01)
    for _ in range(len(outcomes) + 1):
        rows = outbox.ready(1, now=float("inf"))  # every pause is over
        if not rows:
            break
        delivery._send(rows[0])
    posts = len(client.sent)
    used = outcomes[:posts]
    if once:  # nothing after the first "maybe", which leaves the hangup unsure
        assert not any(o.maybe_processed for o in used[:-1]), used
        assert (outbox.counts().get("unsure") == 1) == used[-1].maybe_processed
    else:     # any other hangup is sent again after a "maybe"
        assert outbox.counts().get("unsure") is None
        for i, outcome in enumerate(used):
            if outcome.maybe_processed and i + 1 < len(outcomes):
                assert posts > i + 1


def test_events_waiting_behind_one_in_flight_are_not_polled_for():
    """The call's hangup waits behind its newCall in flight: the end of that request
    wakes the dispatcher, so it does not look again every few milliseconds."""
    outbox = Outbox(":memory:")
    outbox.record([Missed("c1", "newCall", False), Missed("c1", "hangup", True)])
    delivery = Delivery(outbox, ScriptedClient([]), retry_max=0.01)
    delivery._inflight[outbox.ready(1)[0].id] = outbox.ready(1)[0]
    assert delivery._dispatch() == 1.0


def test_a_bug_after_a_missed_calls_hangup_left_makes_it_unsure_not_resent():
    class BrokenClient(ScriptedClient):
        def post(self, fields):
            self.sent.append(dict(fields))
            raise RuntimeError("a bug after the request left")

    outbox = Outbox(":memory:")
    outbox.record([Missed("c1", "hangup", True), Missed("c2", "hangup", False)])
    delivery = Delivery(outbox, BrokenClient([]), retry_max=0.01)
    for row in outbox.ready(2):
        delivery._send(row)
    assert outbox.counts() == {"unsure": 1, "pending": 1}
    assert [r.call_id for r in outbox.ready(5, now=float("inf"))] == ["c2"]


@pytest.mark.parametrize("value,seconds", [
    ("120", 120.0), (" 5 ", 5.0), ("0", 0.0), ("1.5", 1.5), ("", None), ("soon", None),
    ("-5", None), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0), ("1, 2", 2.0), ("30,5", 30.0),
    ("1,", None),
])
def test_retry_after_values(value, seconds):
    assert parse_retry_after(value, now=2e9) == seconds


def test_retry_after_http_date_and_the_cap():
    now = 1_800_000_000.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now) == 30.0
    assert parse_retry_after("Fri, 15 Jan 2027 08:00:00", now) is not None  # no zone: GMT
    throttled = classify("hangup", 429, "", "", retry_after=30.0)
    assert (throttled.kind, throttled.retry_after, throttled.maybe_processed) == \
        (THROTTLED, 30.0, False)
    capped = classify("newCall", 503, "", "", retry_after=86400.0)
    assert capped.retry_after == zammad.RETRY_AFTER_MAX == 600.0 and "capped at 600 s" in \
        capped.detail
    assert classify("newCall", 503, "", "", retry_after=0.0).retry_after == zammad.RETRY_AFTER_MIN
    assert classify("newCall", 503, "", "").kind == ZAMMAD_DOWN      # no Retry-After: as before
    assert classify("newCall", 429, "", "").kind == RETRY
    assert classify("newCall", 502, "", "", retry_after=5.0).kind == ZAMMAD_DOWN


@pytest.mark.parametrize("status,location,words", [
    (301, "https://zammad.acme.test/api/v1/cti/tok-9d8e7f",
     "ZAMMAD_CTI_URL redirects to https://zammad.acme.test/api/v1/cti/***: set it to that URL "
     "(HTTP 301, not followed)"),
    (308, "/zammad/api/v1/cti/tok-9d8e7f",
     "redirects to https://helpdesk.acme.test/zammad/api/v1/cti/***: set it to that URL (HTTP "
     "308, not followed)"),
    (302, "https://sso.acme.test/login?next=%2Fapi%2Fv1%2Fcti%2Ftok-9d8e7f",
     "ZAMMAD_CTI_URL redirects to https://sso.acme.test/login?…, not to Zammad's CTI endpoint "
     "(HTTP 302, not followed; a login or SSO gateway?)"),
    (303, "", "ZAMMAD_CTI_URL answered a redirect (HTTP 303) without a usable target"),
    (302, "http://[x", "ZAMMAD_CTI_URL answered a redirect (HTTP 302) without a usable target"),
    (302, "http://h:abc/", "ZAMMAD_CTI_URL answered a redirect (HTTP 302) without a usable target"),
])
def test_redirects_name_their_target_without_the_token(status, location, words):
    outcome = classify("newCall", status, "", "text/html", location=location, url=URL)
    assert outcome.kind == NOT_ZAMMAD and outcome.config_error and not outcome.maybe_processed
    assert words in outcome.detail
    assert "tok-9d8e7f" not in outcome.detail


def test_a_page_is_named_by_its_title_and_the_variable_to_fix():
    outcome = classify("newCall", 200, LOGIN, "text/html; charset=utf-8",
                       setting="ZAMMAD_CTI_URL_ACME")
    assert outcome.detail.startswith("ZAMMAD_CTI_URL_ACME answered HTTP 200 (text/html, page "
                                     "title 'Sign in · Acme SSO'), not Zammad's CTI answer")
    assert "set ZAMMAD_CTI_URL_ACME to Zammad's own" in outcome.detail


SPECIAL = "t/k+n%3 ü&x"   # a token that needs percent-encoding in every form


@pytest.mark.parametrize("echo", [
    lambda t: f"No route matches [POST] /api/v1/cti/{t}",
    lambda t: "No route matches " + "".join(f"%{b:02x}" for b in t.encode()),
    lambda t: "No route matches " + "".join(f"%{b:02X}" for b in t.encode()),
    lambda t: "upstream " + __import__("urllib.parse").parse.quote(t, safe=""),
    lambda t: "upstream " + __import__("urllib.parse").parse.quote_plus(t),
    lambda t: "page " + __import__("html").escape(t),
    lambda t: f"ERROR FOR /API/V1/CTI/{t.upper()}",
    lambda t: "upstream " + __import__("urllib.parse").parse.quote(t, safe="").upper(),
])
def test_every_form_of_the_token_is_redacted(echo):
    text = logs.Redactor([SPECIAL, "esl-pw"])(echo(SPECIAL) + " and esl-pw")
    assert "***" in text and "esl-pw" not in text
    for form in ("t/k", "n%3", "%2F", "%2f", "k+n", "&amp;x"):
        assert form not in text.replace("***", ""), text


@pytest.mark.parametrize("body,page", [
    ("<!-- a -->" * 5000 + "<p>relay</p>", False),      # no regex backtracking on these
    ("<!-- a -->" * 5000 + "<html><title>x</title>", True),
    ("<!-- a --> <!-- -- --> \n<!DOCTYPE html>", True),
    ("<!-- never closed <html>", False),
    ("<?xml version='1.0'?><html>", True), ("<?xml never closed <html>", False),
])
def test_a_page_for_people_is_told_from_other_markup_in_linear_time(body, page):
    assert zammad.is_html_page(body) is page


@settings(max_examples=200)
@given(st.text(string.ascii_letters + string.digits + "-_", min_size=8, max_size=40),
       st.lists(st.booleans(), min_size=40, max_size=40), st.text(max_size=20))
def test_the_token_in_any_letter_case_is_redacted(token, upper, around):
    # a token of the characters a URL path carries as they are (ASCII letters case-fold)
    echoed = "".join(c.upper() if up else c.lower() for c, up in zip(token, upper))
    text = logs.Redactor([token])(f"{around}/api/v1/cti/{echoed} {around}")
    assert echoed not in text and "***" in text, (token, echoed, text)


def test_log_fields_are_redacted_in_text_and_json(capsys):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logs.setup("INFO", "json", secrets=("tok-9d8e7f",))
    try:
        log = logging.getLogger("fs_zammad.sent")
        fields = {"event": "hangup", "callId": "c1", "status": 404,
                  "detail": "No route matches [POST] /api/v1/cti/tok%2D9d8e7f tok-9d8e7f"}
        log.warning("hangup %s", "tok-9d8e7f", extra={"event_fields": fields})
        logs.setup("INFO", "text", secrets=("tok-9d8e7f",))
        log.warning("hangup", extra={"event_fields": fields})
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    err = capsys.readouterr().err
    assert err.count("***") >= 3 and "9d8e7f" not in err, err
    assert json.loads(err.splitlines()[0])["detail"].endswith("/api/v1/cti/*** ***")


@pytest.mark.parametrize("reply", [
    answer(404, '{"error":"No route matches [POST] /api/v1/cti/%s"}', "application/json"),
    answer(502, "<html><title>502 upstream /api/v1/cti/%s failed</title></html>"),
    answer(200, "<html><title>Login for /api/v1/cti/%s</title></html>"),
    answer(302, "", Location="/login?next=/api/v1/cti/%s"),
    answer(301, "", Location="http://elsewhere.test/x/%s/y"),
])
def test_the_client_passes_on_no_token(reply):
    token = "tok-4f9c2e81b7"
    filled = type(reply)(**{**reply.__dict__, "body": reply.body.replace("%s", token),
                            "headers": tuple((k, v.replace("%s", token))
                                             for k, v in reply.headers)})
    with Proxy(behaviour=lambda request: filled) as server:
        client = ZammadClient(server.url(token), timeout=5)
        try:
            outcome = client.post((("event", "newCall"), ("callId", "c1")))
        finally:
            client.close()
        assert server.requests[0].method == "POST" and len(server.requests) == 1  # not followed
    assert outcome.status == reply.status and token not in outcome.detail, outcome
    assert "***" in outcome.detail or "?…" in outcome.detail, outcome


class CountingOutbox(Outbox):
    """Counts the reads delivery makes to find what is ready."""

    def __init__(self):
        super().__init__(":memory:")
        self.reads = 0

    def ready(self, *args, **kwargs):
        self.reads += 1
        return super().ready(*args, **kwargs)


def wait_until(done, seconds=5.0):
    with gevent.Timeout(seconds, False):
        while not done():
            gevent.sleep(0.01)
    return done()


def test_delivery_trusts_a_count_of_nothing_pending_but_still_looks_each_second():
    outbox = CountingOutbox()
    client = ScriptedClient([])
    delivery = Delivery(outbox, client)
    runner = gevent.spawn(delivery.run)
    try:
        outbox.record([Missed("c1", "newCall", False)])
        delivery.wake()
        assert wait_until(lambda: outbox.pending == 0 and not delivery._inflight)
        gevent.sleep(0.05)
        reads = outbox.reads
        for _ in range(20):   # woken with nothing pending (answers, other tenants' events)
            delivery.wake()
            gevent.sleep(0.001)
        assert outbox.reads == reads  # no read to find out that nothing is ready
        # a count that went wrong (or a change it missed) costs at most a second's wait
        outbox.db.execute("INSERT INTO outbox (call_id, instance, event, fields, created, "
                          "state) VALUES ('c2', '', 'newCall', '[[\"callId\", \"c2\"]]', "
                          "0, 'pending')")
        assert outbox.pending == 0
        delivery.wake()
        assert wait_until(lambda: len(client.sent) == 2)
    finally:
        runner.kill()
    assert [f["callId"] for f in client.sent] == ["c1", "c2"]


def test_delivery_holds_while_something_else_answers(caplog):
    outbox = Outbox(":memory:")
    outbox.record([Missed("c1", "newCall", False)])
    page = classify("newCall", 200, LOGIN, "text/html")
    client = ScriptedClient([page,                                             # the event
                             page,                                             # probe: same page
                             classify("answer", 503, "", "text/html"),         # probe: down
                             page,                                             # probe: page again
                             classify("answer", 429, "", "", retry_after=5.0),  # probe: busy
                             classify("answer", 500, '{"error":"No such call_id x"}')])
    delivery = Delivery(outbox, client, retry_max=0.01)
    delivery._send(outbox.ready(1)[0])
    assert delivery.problem.startswith("Zammad: ZAMMAD_CTI_URL answered HTTP 200 (text/html, "
                                       "page title 'Sign in · Acme SSO')")
    assert outbox.pending == 1 and outbox.counts() == {"pending": 1}
    delivery._probe()
    assert delivery.problem and delivery.down_since is None
    delivery._probe()                 # the page is gone, Zammad behind it is down
    assert delivery.problem is None and delivery.down_since is not None
    delivery._probe()
    assert delivery.problem is not None
    delivery._probe()                 # asked to wait: nothing before then
    assert delivery._paused_until - time.monotonic() > 4
    delivery._probe()                 # Zammad itself answers
    assert delivery.problem is None and delivery.down_since is None
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2  # once per episode, not per probe
    assert [dict(f)["callId"].startswith("fs-zammad-probe") for f in client.sent] == \
        [False] + [True] * 5  # only probes while it lasted


def test_healthz_names_what_answers_instead_of_zammad():
    from types import SimpleNamespace

    from fs_zammad import metrics
    service = SimpleNamespace(
        esl=SimpleNamespace(connected=True),
        outbox=SimpleNamespace(pending=3, oldest_pending_age=lambda: 1.0, write_error=None),
        tracker=SimpleNamespace(calls={}),
        deliveries={"": SimpleNamespace(problem=None),
                    "acme": SimpleNamespace(problem="Zammad (acme): ZAMMAD_CTI_URL_ACME "
                                                    "redirects to https://x/api/v1/cti/***")})
    status, body = metrics.health(service)
    assert status == 503 and body["reasons"] == [service.deliveries["acme"].problem]


def test_outbox_list_redacts_errors_stored_by_older_versions(tmp_path):
    import subprocess

    from tests.support.service import FS_ZAMMAD, base_env
    token = "tok-77aa99"
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    outbox.record([Missed("c1", "newCall", False)])
    outbox.db.execute("UPDATE outbox SET state='failed', last_error=?",
                      (f"HTTP 404: No route matches [POST] /api/v1/cti/{token} (%74ok-77aa99)",))
    outbox.close()
    env = base_env(state_dir=tmp_path, ZAMMAD_CTI_URL=f"http://127.0.0.1:9/api/v1/cti/{token}")
    listing = subprocess.run([FS_ZAMMAD, "outbox", "list"], env=env,
                             capture_output=True, text=True, timeout=30)
    assert "No route matches [POST] /api/v1/cti/*** (***)" in listing.stdout, listing
    assert "77aa99" not in listing.stdout + listing.stderr


@pytest.mark.parametrize("body", ["[" * 100_000, '{"a":' * 100_000, "<title>" + "x" * 300_000])
def test_hostile_bodies_give_one_line(body):
    for status in (200, 404, 500):
        outcome = classify("hangup", status, body, JSON)
        assert outcome.kind != DELIVERED and len(outcome.detail) < 1000
