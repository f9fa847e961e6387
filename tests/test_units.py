"""Pure pieces: numbers, settings, the event-plain parser, Zammad's answers."""

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fs_zammad.config import (
    STANDARD_VARIABLES,
    VARIABLES,
    ConfigError,
    load_settings,
    proxy_for,
    redact_url,
)
from fs_zammad.numbers import to_e164
from fs_zammad.wire import (
    FrameError,
    HeaderFilter,
    iter_capture,
    iter_frames,
    parse_event_plain,
)
from fs_zammad.zammad import DELIVERED, FAILED, RETRY, ZAMMAD_DOWN, classify, error_text

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("raw,country,expected", [
    ("+49 221 4710334", "", "492214710334"),
    ("00492214710334", "", "492214710334"),
    ("004312345678", "", "4312345678"),
    ("06641234567", "43", "436641234567"),
    ("06641234567", "", "06641234567"),        # Zammad itself would assume Germany
    ("1001", "43", "1001"),                    # extensions stay
    ("anonymous", "43", "anonymous"),
    ("sip:+4930123456@carrier", "", "4930123456"),
    ("(030) 123-456 78", "49", "493012345678"),
])
def test_to_e164(raw, country, expected):
    assert to_e164(raw, country) == expected


def test_defaults_need_no_environment():
    settings = load_settings({})
    assert settings.dry_run
    assert (settings.freeswitch_host, settings.freeswitch_port) == ("127.0.0.1", 8021)
    assert settings.freeswitch_password == "ClueCon"
    assert settings.external_contexts == {"public"}


CTI_OK = {"ZAMMAD_CTI_URL": "https://z.example.com/api/v1/cti/tok3n"}


@pytest.mark.parametrize("env,names", [
    ({"FREESWITCH_PORT": "80a"}, "FREESWITCH_PORT"),
    ({"FREESWITCH_PORT": "70000"}, "FREESWITCH_PORT"),
    ({"ZAMMAD_CTI_URL": "zammad.example.com"}, "ZAMMAD_CTI_URL"),
    ({"ZAMMAD_CTI_URL": "https://zammad.example.com/api/v1/other"}, "ZAMMAD_CTI_URL"),
    # URLs no connection can be made to: a broken IPv6 host, a port that is none
    ({"ZAMMAD_CTI_URL": "https://[::1/api/v1/cti/tok3n"}, "ZAMMAD_CTI_URL"),
    ({"ZAMMAD_CTI_URL": "http://h:99999/api/v1/cti/tok3n"}, "ZAMMAD_CTI_URL"),
    ({"ZAMMAD_CTI_URL": "http://h:port/api/v1/cti/tok3n"}, "ZAMMAD_CTI_URL"),
    ({"ZAMMAD_CTI_URL": "http://127.0.0.1:0/api/v1/cti/tok3n"}, "ZAMMAD_CTI_URL"),
    ({"ZAMMAD_CTI_URL": "http://exa mple.com/api/v1/cti/tok3n"}, "ZAMMAD_CTI_URL"),
    ({**CTI_OK, "ZAMMAD_API_TOKEN": "t", "ZAMMAD_API_URL": "http://[::1"}, "ZAMMAD_API_URL"),
    ({**CTI_OK, "ZAMMAD_API_TOKEN": "t", "ZAMMAD_API_URL": "http://z:70000"}, "ZAMMAD_API_URL"),
    ({"ZAMMAD_TLS_VERIFY": "maybe"}, "ZAMMAD_TLS_VERIFY"),
    ({"ZAMMAD_CAUSE_MAP": "USER_BUSY=later"}, "ZAMMAD_CAUSE_MAP"),
    ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
    ({"COUNTRY_CODE": "+4x"}, "COUNTRY_CODE"),
    ({"ZAMMAD_CA_BUNDLE": "/nonexistent.pem"}, "ZAMMAD_CA_BUNDLE"),
    ({"FREESWITCH_PASSWORD_FILE": "/nonexistent"}, "FREESWITCH_PASSWORD_FILE"),
    ({"ZAMMAD_CONCURRENCY": "0"}, "ZAMMAD_CONCURRENCY"),
])
def test_bad_values_name_the_variable(env, names):
    with pytest.raises(ConfigError, match=names) as err:
        load_settings(env)
    assert "tok3n" not in str(err.value)


CTI = {"ZAMMAD_CTI_URL": "https://z.example.com/api/v1/cti/tok3n-xyz"}


@pytest.mark.parametrize("proxy", ["socks5://u:pw@h:1080", "ftp://h", "http://h:99999",
                                   "http://h:port", "http://[::1", "u:pw@h:x", "://",
                                   "http://u:pw://x@h:x", "u:pw://x@h:x", "u:pw@h://x",
                                   "u:pw@proxy://3128"])
@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "https_proxy"])
def test_a_proxy_variable_fs_zammad_cannot_use_is_a_configuration_error(proxy, variable):
    with pytest.raises(ConfigError) as err:
        load_settings({**CTI, variable: proxy})
    said = str(err.value)
    assert said.startswith(f"{variable}=") and "NO_PROXY" in said, said
    assert "pw" not in said and "tok3n" not in said, said
    # not used for this Zammad: no error
    load_settings({**CTI, variable: proxy, "NO_PROXY": "example.com"})
    load_settings({**CTI, {"HTTPS_PROXY": "HTTP_PROXY", "https_proxy": "http_proxy"}[variable]: proxy})


@pytest.mark.parametrize("variables,proxy", [
    ({"HTTPS_PROXY": "proxy.example:3128"}, "http://proxy.example:3128"),
    ({"https_proxy": "https://p:8443", "HTTPS_PROXY": "http://q:1"}, "https://p:8443"),
    ({"HTTPS_PROXY": "http://p:1", "no_proxy": "*"}, ""),
    ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": ".example.com"}, ""),
    ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "other.example"}, "http://p:1"),
    ({"HTTP_PROXY": "http://p:1"}, ""),
    ({"https_proxy": "", "HTTPS_PROXY": "http://q:1"}, ""),
    ({"https_proxy": "http://p:1", "HTTPS_PROXY": ""}, "http://p:1"),
])
def test_the_proxy_for_a_zammad_url_is_read_as_requests_reads_it(variables, proxy):
    assert proxy_for(CTI["ZAMMAD_CTI_URL"], variables) == proxy


def test_secrets_stay_out_of_repr_and_errors(tmp_path):
    secret_file = tmp_path / "pw"
    secret_file.write_text("s3cret-pass\n")
    settings = load_settings({"FREESWITCH_PASSWORD_FILE": str(secret_file),
                              "ZAMMAD_CTI_URL": "https://z.example.com/api/v1/cti/tok3n-xyz"})
    assert settings.freeswitch_password == "s3cret-pass"
    assert "s3cret" not in repr(settings) and "tok3n" not in repr(settings)
    assert redact_url(settings.zammad_url) == "https://z.example.com/api/v1/cti/***"
    assert set(settings.secrets) == {"s3cret-pass", "tok3n-xyz"}
    with pytest.raises(ConfigError) as err:
        load_settings({"ZAMMAD_CTI_URL": "ftp://z.example.com/api/v1/cti/tok3n-xyz"})
    assert "tok3n" not in str(err.value)
    assert redact_url("https://u:pw@z:8443/api/v1/cti/abc") == "https://z:8443/api/v1/cti/***"


def test_every_variable_is_documented_in_readme_and_env_file():
    readme = (ROOT / "README.md").read_text()
    env_file = (ROOT / "conf" / "fs-zammad.env").read_text()
    for name, default, _ in VARIABLES:
        assert f"`{name}`" in readme, name
        assert f"{name}={default}" in env_file or f"# {name}={default}" in env_file, name
    for name, _, meaning in STANDARD_VARIABLES:
        assert f"| `{name}` | (unset) | {meaning} |" in readme, name
        assert f"# {name}=" in env_file or f"# {name}: {meaning}" in env_file, name


def test_every_variable_the_code_reads_is_declared():
    import re
    declared = {name for name, _, _ in VARIABLES} | {name for name, _, _ in STANDARD_VARIABLES}
    source = (ROOT / "fs_zammad" / "config.py").read_text()
    read = set(re.findall(r'"([A-Z][A-Z_]+[A-Z])"', source))
    read = {n for n in read if not n.startswith(("DEBUG", "INFO", "WARNING", "ERROR", "USER_",
                                                 "CALL_"))}
    for module in (ROOT / "fs_zammad").glob("*.py"):   # os.environ, and env = os.environ
        read |= set(re.findall(r'\b(?:os\.environ|env)\.get\(\s*"([A-Z][A-Z0-9_]+)"',
                               module.read_text()))
    # proxy_for builds the proxy variables' names from the URL's scheme
    read |= {f"{scheme.upper()}_PROXY" for scheme in ("http", "https")}
    assert read <= declared | {f"{n}_FILE" for n in declared}, read - declared


def test_parse_event_plain_decodes_after_splitting():
    body = b"Event-Name: CUSTOM\nCaller-Caller-ID-Name: Evil%0AEvent-Name%3A%20FAKE\n" \
           b"Hangup-Cause: USER_BUSY\nHangup-Cause: USER_BUSY\n\n"
    headers = parse_event_plain(body)
    assert headers["Event-Name"] == "CUSTOM"
    assert headers["Caller-Caller-ID-Name"] == "Evil\nEvent-Name: FAKE"
    assert headers["Hangup-Cause"] == "USER_BUSY"


def kept_the_slow_way(body: str, keep: HeaderFilter) -> dict:
    """What the filtered parse must give: every header, then keep's choice."""
    return {name: value for name, value in parse_event_plain(body)._raw.items() if keep(name)}


def test_filtered_parse_keeps_what_the_filter_accepts_in_every_fixture():
    from fs_zammad.calls import HEADER_PREFIXES_READ, HEADERS_READ

    keep = HeaderFilter(HEADERS_READ, HEADER_PREFIXES_READ)
    channel_events = 0
    for path in sorted((ROOT / "tests/fixtures").glob("*/*/events*.txt")):
        for head, body in iter_frames(path.read_bytes()):
            if head.get("Content-Type") != "text/event-plain":
                continue
            filtered = parse_event_plain(body, keep)._raw
            assert filtered == kept_the_slow_way(body.decode(), keep)
            if filtered["Event-Name"].startswith("CHANNEL_"):
                assert "Unique-ID" in filtered
                channel_events += 1
    assert channel_events > 500


# Names that are prefixes of each other, and of the wanted ones, with the
# characters a regex built from them could get wrong.
NAMES = ["Event-Name", "Unique-ID", "Unique-ID-x", "Unique", "Application", "Application-Data",
         "variable_zammad_", "variable_zammad_user", "variable_zammad", "variable_x.y",
         "variable_a+b", "Other-Leg-Unique-ID", "a", "b: c", "no separator"]
LINE = st.one_of(st.tuples(st.sampled_from(NAMES), st.text("ab%:. +\r", max_size=6)).map(
    lambda nv: f"{nv[0]}: {nv[1]}"), st.text("ab:\r -", max_size=8))


@given(st.lists(LINE, max_size=12), st.sets(st.sampled_from(NAMES[:-2])),
       st.sets(st.sampled_from(["variable_zammad_", "variable_", "Uni", "b"])),
       st.integers(0, 12))
def test_filtered_parse_matches_the_filter_on_any_body(lines, names, prefixes, at):
    keep = HeaderFilter(names, prefixes)
    lines.insert(min(at, len(lines)), "Event-Name: X")  # anywhere, the first line too
    body = "\n".join(lines)
    assert parse_event_plain(body, keep)._raw == kept_the_slow_way(body, keep)


@pytest.mark.parametrize("word", ["", "a: b", "a\nb", "a\x00b"])
def test_header_filter_refuses_what_is_no_header_name(word):
    with pytest.raises(ValueError, match="not a header name"):
        HeaderFilter([word])
    with pytest.raises(ValueError, match="not a header name"):
        HeaderFilter([], [word])


@pytest.mark.parametrize("body", [b"no colon here\n\n", b"Unique-ID: x\n\n"])
def test_malformed_events_raise(body):
    with pytest.raises(FrameError):
        parse_event_plain(body)


def test_capture_cut_short_is_reported():
    data = (ROOT / "tests/fixtures/callcentre/S1/events_all.txt").read_bytes()
    assert len(list(iter_capture(data))) == 57
    with pytest.raises(FrameError, match="cut short"):
        list(iter_capture(data[:-10]))


@pytest.mark.parametrize("length", ["-57", "5_7", "+57", "٥٧", "0x39", "", "9" * 13])
def test_a_capture_with_a_content_length_that_is_no_length_is_reported(length):
    """int() would take several of these; "-57" walked the reader backwards for ever."""
    frame = b"Content-Type: text/event-plain\nContent-Length: %s\n\n" % length.encode()
    data = frame + b"Event-Name: HEARTBEAT\n\n" * 3
    with pytest.raises(FrameError, match="bad Content-Length"):
        list(iter_capture(data))


@pytest.mark.parametrize("event,status,body,kind", [
    ("newCall", 200, "{}", DELIVERED),
    ("newCall", 500, '{"error":"call_id abc already exists!"}', DELIVERED),
    ("answer", 500, '{"error":"No such call_id abc"}', FAILED),
    ("hangup", 500, "<html><body><h1>No such call_id abc</h1></body></html>", FAILED),
    ("hangup", 500, '{"error":"PG::ConnectionBad"}', RETRY),
    ("newCall", 401, '{"error":"Invalid token, please contact your admin!"}', FAILED),
    ("newCall", 422, '{"error":"Feature is disabled, please contact your administrator!"}', FAILED),
    ("newCall", 502, "<html><head><title>502 Bad Gateway</title></head></html>", ZAMMAD_DOWN),
    ("newCall", 503, "", ZAMMAD_DOWN),
    ("newCall", 429, "", RETRY),
    ("newCall", 400, "", FAILED),
])
def test_classify(event, status, body, kind):
    assert classify(event, status, body).kind == kind


def test_reject_action_is_returned_and_error_texts_are_one_line():
    outcome = classify("newCall", 200, '{"action":"reject","reason":"busy"}')
    assert outcome.action == {"action": "reject", "reason": "busy"}
    assert error_text("<html><title>502 Bad\n Gateway</title></html>") == "502 Bad Gateway"
    assert error_text('{"error":"Invalid token"}') == "Invalid token"


def test_the_house_is_one_way():
    """socket -> tracker -> outbox -> delivery -> HTTP: the later rooms never import the
    earlier ones (delivery reads the outbox it sends from; service.py and the CLI wire)."""
    import ast

    earlier = {
        "outbox": {"wire", "esl", "calls", "voicemail", "capture"},
        "delivery": {"wire", "esl", "calls", "voicemail", "capture"},
        "tickets": {"wire", "esl", "calls", "voicemail", "capture", "outbox"},
        "zammad": {"wire", "esl", "calls", "voicemail", "capture", "outbox", "delivery"},
        "zammad_api": {"wire", "esl", "calls", "voicemail", "capture", "outbox", "delivery"},
        "calls": {"esl", "outbox", "delivery", "zammad", "zammad_api", "tickets", "service"},
        "wire": {"esl", "calls", "outbox", "delivery", "zammad", "service"},
    }
    package = ROOT / "fs_zammad"
    for module, forbidden in earlier.items():
        tree = ast.parse((package / f"{module}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "fs_zammad":
                    imported |= {alias.name for alias in node.names}
                elif node.module.startswith("fs_zammad."):
                    imported.add(node.module.split(".")[1])
        assert not imported & forbidden, f"{module}.py imports {imported & forbidden}"
