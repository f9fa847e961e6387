"""Zammad's REST API: the client (fs_zammad/zammad_api.py) against the stand-in's
REST side, which follows Zammad's rules (tests/support/zammad_rest.py), and
``fs-zammad check`` listing mapped logins Zammad does not know."""

import base64
import socket
import subprocess
from pathlib import Path

import pytest
import requests

from fs_zammad.config import ConfigError, load_settings
from fs_zammad.zammad_api import (
    DOWN,
    MAYBE,
    REFUSED,
    RETRY,
    ApiError,
    Attachment,
    ZammadApi,
    api_error,
    caller_log_customers,
    normalize_number,
)
from tests.support.service import FS_ZAMMAD, base_env
from tests.support.zammad_rest import normalize_number as zammads_normalize_number

TOKEN = "api-tok-7f3a9c1e55"
RECORDING = Path(__file__).parent / "fixtures" / "voicemail" / \
    "msg_cf536b90-c048-4a83-868b-670ce655dfc1.wav"


@pytest.fixture
def api(zammad):
    zammad.rest.add_agent("fs-zammad@example.com", token=TOKEN)
    client = ZammadApi(f"http://127.0.0.1:{zammad.port}", TOKEN, timeout=2)
    yield client
    client.close()


def cti(zammad, **fields):
    """One CTI event, as fs_zammad's delivery would post it."""
    return requests.post(zammad.url, data=fields, timeout=5)


# -- pure ------------------------------------------------------------------------


@pytest.mark.parametrize("status,kind", [
    (401, REFUSED), (403, REFUSED), (404, REFUSED), (413, REFUSED), (422, REFUSED),
    (408, RETRY), (429, RETRY), (500, RETRY), (502, DOWN), (503, DOWN), (504, DOWN),
])
def test_api_error_says_whether_trying_again_helps(status, kind):
    error = api_error(status, '{"error":"Not authorized","error_human":"Not authorized"}')
    assert (error.kind, error.status, error.detail) == (kind, status, "Not authorized")


@pytest.mark.parametrize("raw", ["+49 30 23125741", "0049 (0)30 23125741", "030-23125741",
                                 "493023125741", "+43 664 1234567", "0664 1234567", "1001",
                                 "", "anonymous"])
def test_number_rules_are_zammads(raw):
    assert normalize_number(raw) == zammads_normalize_number(raw)


def test_caller_log_customers_known_before_maybe():
    entry = {"preferences": {"from": [
        {"caller_id": "493023125741", "level": "maybe", "user_id": 7},
        {"caller_id": "493023125741", "level": "known", "user_id": 3},
        {"caller_id": "493023125741", "level": "known", "user_id": 7},
        {"caller_id": "493023125741", "level": "known"}]}}
    assert caller_log_customers(entry) == [3, 7]
    assert caller_log_customers({"preferences": {}}) == []
    assert caller_log_customers({}, "out") == []


# -- settings ----------------------------------------------------------------------


@pytest.mark.parametrize("env,api", [
    ({"ZAMMAD_CTI_URL": "https://z.example.com/api/v1/cti/abc", "ZAMMAD_API_TOKEN": "t0k"},
     {"": ("https://z.example.com", "t0k")}),
    ({"ZAMMAD_CTI_URL": "https://h.example.com/zammad/api/v1/cti/abc",
      "ZAMMAD_API_TOKEN": "t0k"}, {"": ("https://h.example.com/zammad", "t0k")}),
    ({"ZAMMAD_API_URL": "https://api.example.com/", "ZAMMAD_API_TOKEN": "t0k"},
     {"": ("https://api.example.com", "t0k")}),
    ({"ZAMMAD_CTI_URL": "https://z.example.com/api/v1/cti/abc"}, {}),
    ({"ZAMMAD_INSTANCES": "acme", "ZAMMAD_CTI_URL_ACME": "https://acme.example/api/v1/cti/x",
      "ZAMMAD_API_TOKEN_ACME": "acme-t0k"}, {"acme": ("https://acme.example", "acme-t0k")}),
])
def test_api_settings(env, api):
    assert dict(load_settings(env).api) == api


@pytest.mark.parametrize("env,name", [
    ({"ZAMMAD_API_TOKEN": "t0k"}, "ZAMMAD_API_TOKEN"),              # where is Zammad?
    ({"ZAMMAD_API_URL": "zammad.example.com", "ZAMMAD_API_TOKEN": "t"}, "ZAMMAD_API_URL"),
    ({"ZAMMAD_API_URL": "https://z.example", "ZAMMAD_API_TOKEN": "a b"}, "ZAMMAD_API_TOKEN"),
    ({"ZAMMAD_API_URL": "https://z.example", "ZAMMAD_API_TOKEN_FILE": "/nonexistent"},
     "ZAMMAD_API_TOKEN_FILE"),
])
def test_bad_api_settings_name_the_variable(env, name):
    with pytest.raises(ConfigError) as err:
        load_settings(env)
    assert str(err.value).startswith(name) and "\n" not in str(err.value)
    assert "a b" not in str(err.value)


def test_an_empty_token_file_is_an_error(tmp_path):
    (tmp_path / "token").write_text("\n")
    with pytest.raises(ConfigError, match="ZAMMAD_API_TOKEN_FILE: .* is empty"):
        load_settings({"ZAMMAD_API_URL": "https://z.example",
                       "ZAMMAD_API_TOKEN_FILE": str(tmp_path / "token")})


def test_the_api_token_is_a_secret(tmp_path):
    path = tmp_path / "token"
    path.write_text("file-t0ken-123\n")
    settings = load_settings({"ZAMMAD_API_URL": "https://z.example",
                              "ZAMMAD_API_TOKEN_FILE": str(path)})
    assert "file-t0ken-123" in settings.secrets and "file-t0ken" not in repr(settings)


# -- the client against Zammad's rules --------------------------------------------


@pytest.mark.parametrize("story,token,token_permissions,status,detail", [
    ("unknown token", "wrong-token", None, 401, "Can't find User for Token"),
    ("token without ticket.agent", TOKEN, {"cti.agent"}, 403, "Token authorization failed."),
])
def test_token_rules(story, token, token_permissions, status, detail, zammad):
    zammad.rest.add_agent("bridge@example.com", token=TOKEN, token_permissions=token_permissions)
    client = ZammadApi(f"http://127.0.0.1:{zammad.port}", token, timeout=2)
    with pytest.raises(ApiError) as err:
        client.users_matching("emma")
    assert (err.value.kind, err.value.status, err.value.detail) == (REFUSED, status, detail)
    assert token not in str(err.value)
    request = zammad.requests[-1]
    assert request.header("Authorization") == f"Token token={token}"
    assert request.header("Accept") == "application/json"


def test_a_customer_tokens_user_cannot_search_users(zammad):
    customer = zammad.rest.add_user("cust@example.com")
    zammad.rest.tokens["cust-tok"] = (customer["id"], {"ticket.agent"})
    with pytest.raises(ApiError, match="User authorization failed"):
        ZammadApi(f"http://127.0.0.1:{zammad.port}", "cust-tok").users_matching("x")


def test_no_credentials_is_403(zammad):
    answer = requests.get(f"http://127.0.0.1:{zammad.port}/api/v1/users/me", timeout=5)
    assert (answer.status_code, answer.json()["error"]) == (403, "Authentication required")


def test_missing_logins(api, zammad):
    zammad.rest.add_agent("emma@example.com")
    zammad.rest.add_agent("max", email="max@example.com")
    zammad.rest.add_user("emma@example.com.old")
    assert api.me()["login"] == "fs-zammad@example.com"
    assert api.missing_logins(["emma@example.com", "MAX", "max@example.com", "emma",
                               "nobody@example.com"]) == \
        ["max@example.com", "emma", "nobody@example.com"]


def test_the_caller_as_zammad_matched_them(api, zammad):
    known = zammad.rest.add_user("anna@example.com", phone="+49 30 23125741")
    other = zammad.rest.add_user("bert@example.com")
    zammad.rest.caller_ids.insert(0, ("493023125741", "maybe", other["id"]))
    assert cti(zammad, event="newCall", direction="in", callId="c-1", **{
        "from": "493023125741", "to": "492214710334"}).status_code == 200
    assert cti(zammad, event="newCall", direction="in", callId="c-2", **{
        "from": "4940111222", "to": "492214710334"}).status_code == 200
    entry = api.caller_log_entry("c-1")
    assert caller_log_customers(entry) == [known["id"], other["id"]]
    assert caller_log_customers(api.caller_log_entry("c-2")) == []
    assert api.caller_log_entry("never-sent") is None


def test_caller_log_needs_cti_agent(zammad):
    zammad.rest.add_agent("nocti@example.com", token="no-cti", token_permissions={"ticket.agent"})
    with pytest.raises(ApiError) as err:
        ZammadApi(f"http://127.0.0.1:{zammad.port}", "no-cti").caller_log_entry("x")
    assert err.value.status == 403


def test_a_customer_created_a_moment_ago_is_found_not_made_twice(api, zammad):
    zammad.rest.index_delay = 3600   # Elasticsearch far behind
    first = api.customer_for_phone("493023125741")
    assert first["phone"] == "+493023125741" and "Customer" in first["roles"]
    assert api.customer_for_phone("0049 30 23125741")["id"] == first["id"]
    assert api.users_matching("493023125741") == []     # what a query search would see
    phones = [u for u in zammad.rest.users.values() if u["phone"] == "+493023125741"]
    assert len(phones) == 1
    # Zammad now knows the number: the next call from it is matched in the caller log
    cti(zammad, event="newCall", direction="in", callId="c-9", **{
        "from": "493023125741", "to": "492214710334"})
    assert caller_log_customers(api.caller_log_entry("c-9")) == [first["id"]]


def test_short_or_anonymous_numbers_find_no_customer(api):
    assert api.customer_by_phone("anonymous") is None
    assert api.customer_by_phone("1001") is None


def test_ticket_with_the_recording_and_found_by_its_marker(api, zammad):
    zammad.rest.index_delay = 3600
    zammad.rest.groups["Service Desk"] = 2
    zammad.rest.users[2]["group_access"]["Service Desk"] = "full"
    customer = api.customer_for_phone("493023125741")
    audio = RECORDING.read_bytes()
    ticket = api.create_ticket(
        title="Voicemail from 493023125741 [vm:cf536b90]", group="Service Desk",
        customer_id=customer["id"], body="Message of 2 s for 1001",
        attachments=[Attachment("msg.wav", audio, "audio/wav")])
    assert ticket["customer_id"] == customer["id"] and ticket["number"]
    stored = zammad.rest.tickets[ticket["id"]]["article"]
    assert stored["attachments"] == [{"filename": "msg.wav", "mime-type": "audio/wav",
                                      "data": audio}]
    assert (stored["sender"], stored["type"], stored["preferences"]) == \
        ("Agent", "note", {"send-auto-response": False})
    assert api.ticket_with_marker("[vm:cf536b90]")["id"] == ticket["id"]
    assert api.ticket_with_marker("[vm:00000000]") is None


def test_a_recording_too_big_for_the_proxy_is_refused_not_retried(api, zammad):
    zammad.max_body = 20_000     # nginx client_max_body_size (Zammad ships 50M)
    with pytest.raises(ApiError) as err:
        api.create_ticket(title="t", group="Users", customer_id=2, body="b", attachments=[
            Attachment("msg.wav", RECORDING.read_bytes(), "audio/wav")])
    assert (err.value.kind, err.value.status, err.value.detail) == \
        (REFUSED, 413, "413 Request Entity Too Large")
    assert zammad.rest.tickets == {}


@pytest.mark.parametrize("story,change,status,detail", [
    ("unknown group", {"group": "Nope"}, 422, "No lookup value found for 'group': \"Nope\""),
    ("no group", {"group": None}, 422, "The required value 'group_id' is missing."),
    ("no body", {"body": ""}, 422, "Need at least an 'article body' field."),
    ("group without access", {"group": "Sales"}, 403, "Not authorized"),
])
def test_ticket_refusals(story, change, status, detail, api, zammad):
    zammad.rest.groups["Sales"] = 3
    args = {"title": "Voicemail", "group": "Users", "customer_id": 2, "body": "text", **change}
    with pytest.raises(ApiError) as err:
        api.create_ticket(**args)
    assert (err.value.kind, err.value.status, err.value.detail) == (REFUSED, status, detail)
    assert zammad.rest.tickets == {}


@pytest.mark.parametrize("attachment,detail", [
    ({"filename": "a.wav", "mime-type": "audio/wav"}, "Attachment needs 'data' param for "
                                                      "attachment with index '0'"),
    ({"filename": "a.wav", "data": "UklGRg==", "mime-type": ""}, "Attachment needs "
                                                                "'mime-type' param"),
    ({"filename": "a.wav", "data": "UklGRg=!", "mime-type": "audio/wav"},
     "Invalid base64 for attachment with index '0'"),
    ({"filename": "a.wav", "data": "UklG Rg==", "mime-type": "audio/wav"}, "Invalid base64"),
])
def test_zammads_attachment_rules(attachment, detail, api, zammad):
    answer = requests.post(f"http://127.0.0.1:{zammad.port}/api/v1/tickets", timeout=5,
                           headers={"Authorization": f"Token token={TOKEN}"}, json={
                               "title": "t", "group": "Users", "customer_id": 2,
                               "article": {"body": "b", "attachments": [attachment]}})
    assert answer.status_code == 422 and answer.json()["error"].startswith(detail)
    assert zammad.rest.tickets == {}
    wrapped = base64.encodebytes(RECORDING.read_bytes()).decode()  # CR/LF are stripped first
    answer = requests.post(f"http://127.0.0.1:{zammad.port}/api/v1/tickets", timeout=5,
                           headers={"Authorization": f"Token token={TOKEN}"}, json={
                               "title": "t", "group": "Users", "customer_id": 2, "article": {
                                   "body": "b", "attachments": [{
                                       "filename": "a.wav", "mime-type": "audio/wav",
                                       "data": wrapped.replace("\n", "\r\n")}]}})
    assert answer.status_code == 201


def test_no_connection_and_no_answer(zammad):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ApiError) as err:
        ZammadApi(f"http://127.0.0.1:{port}", TOKEN, timeout=1).me()
    assert err.value.kind == DOWN
    zammad.rest.add_agent("bridge@example.com", token=TOKEN)
    zammad.set_hang(2)
    with pytest.raises(ApiError) as err:
        ZammadApi(f"http://127.0.0.1:{zammad.port}", TOKEN, timeout=0.5).create_customer("4930")
    assert err.value.kind == MAYBE   # it may exist now: look before creating again
    zammad.set_hang(None)


# -- fs-zammad check ------------------------------------------------------------------


def run_check(fake_fs, zammad, tmp_path, **env):
    return subprocess.run([FS_ZAMMAD, "check"], env=base_env(fake_fs, zammad, tmp_path, **env),
                          capture_output=True, text=True, timeout=60)


def test_check_lists_mapped_logins_zammad_does_not_know(fake_fs, zammad, tmp_path):
    zammad.rest.add_agent("bridge@example.com", token=TOKEN)
    zammad.rest.add_agent("emma@example.com")
    agents = tmp_path / "agents"
    agents.write_text("1003=ghost@example.com\n")
    result = run_check(fake_fs, zammad, tmp_path, ZAMMAD_API_TOKEN=TOKEN,
                       ZAMMAD_AGENTS="1001=Emma@example.com,1002=max@example.com",
                       ZAMMAD_AGENTS_FILE=str(agents))
    assert result.returncode == 1, result.stdout
    lines = result.stdout.splitlines()
    assert any(line.startswith("ok") and "token accepted (user bridge@example.com)" in line
               for line in lines)
    failed = [line for line in lines if line.startswith("FAIL")]
    assert len(failed) == 1 and "2 of 3 mapped logins" in failed[0]
    assert "max@example.com, ghost@example.com" in failed[0] and "Emma" not in failed[0]
    assert TOKEN not in result.stdout + result.stderr and "Traceback" not in result.stderr
    zammad.rest.add_agent("max@example.com")
    zammad.rest.add_agent("ghost@example.com")
    result = run_check(fake_fs, zammad, tmp_path, ZAMMAD_API_TOKEN=TOKEN,
                       ZAMMAD_AGENTS="1001=Emma@example.com,1002=max@example.com",
                       ZAMMAD_AGENTS_FILE=str(agents))
    assert result.returncode == 0, result.stdout
    assert "all 3 mapped logins are Zammad users" in result.stdout


@pytest.mark.parametrize("story,token_permissions,words", [
    ("wrong token", None, "token rejected"),
    ("token cannot search users", {"cti.agent"}, "needs ticket.agent or admin.user"),
])
def test_check_says_what_is_wrong_with_the_token(story, token_permissions, words, fake_fs,
                                                 zammad, tmp_path):
    zammad.rest.add_agent("bridge@example.com", token="right-token-1",
                          token_permissions=token_permissions)
    token = "wrong-token-2" if story == "wrong token" else "right-token-1"
    result = run_check(fake_fs, zammad, tmp_path, ZAMMAD_API_TOKEN=token,
                       ZAMMAD_AGENTS="1001=emma@example.com")
    assert result.returncode == 1
    assert [line for line in result.stdout.splitlines() if line.startswith("FAIL")] and \
        words in result.stdout
    assert token not in result.stdout + result.stderr and "Traceback" not in result.stderr


def test_check_without_a_token_says_the_map_is_not_checked(fake_fs, zammad, tmp_path):
    result = run_check(fake_fs, zammad, tmp_path, ZAMMAD_AGENTS="1001=emma@example.com")
    assert result.returncode == 0
    assert "skip ZAMMAD_AGENTS: set ZAMMAD_API_TOKEN" in result.stdout
