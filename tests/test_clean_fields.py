"""What FreeSWITCH puts in numbers, names and queues never reaches Zammad
raw: control characters go, overlong values are cut to Zammad's columns, each
kind of problem is logged once (issue 11, point 8)."""

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fs_zammad.calls import CallTracker
from fs_zammad.numbers import FIELD_LIMITS, UNREADABLE_NUMBER, clean_fields, to_e164
from tests import synth

CONTROLS = [chr(c) for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))]

# (field, raw value, what Zammad gets (None: left out), problems)
CASES = [
    ("from", "4930123456", "4930123456", []),
    ("from", "", "", []),                                   # none given: as before
    ("from", "4930\x00123", "4930123", ["control characters"]),
    ("from", "+49 30 123\n456", "4930123456", ["control characters"]),
    ("to", "1001\r\nX-Forged: yes", "1001X-Forged: yes", ["control characters"]),
    ("from", "\x00\n\x1b", UNREADABLE_NUMBER, ["control characters"]),
    ("from", "anonymous\x7f", "anonymous", ["control characters"]),
    ("from", "4930\x85123", "4930123", ["control characters"]),  # C1 (NEL)
    ("from", "9" * 101, "9" * 100, ["longer than 100 characters"]),
    ("to", "sip:" + "a" * 200 + "@x", "a" * 100, ["longer than 100 characters"]),
    ("from", "1\x00" * 150, "1" * 100, ["control characters", "longer than 100 characters"]),
    ("answeringNumber", "1001\x00", "1001", ["control characters"]),
    ("answeringNumber", "7" * 120, "7" * 100, ["longer than 100 characters"]),
    ("user", "alice\n@example.com", "alice@example.com", ["control characters"]),
    ("user", "\x00", None, ["control characters"]),          # optional: left out
    ("queue", "support\x00", "support", ["control characters"]),
    ("queue", "q" * 300, "q" * 250, ["longer than 250 characters"]),
    ("callId", "abc\ndef", "abc%0Adef", ["control characters"]),  # ids stay distinct
    ("callId", "u" * 260, "u" * 250, ["longer than 250 characters"]),
    ("cause", "c" * 600, "c" * 500, ["longer than 500 characters"]),
    ("direction", "in", "in", []),
]


@pytest.mark.parametrize("field,raw,expected,problems", CASES)
def test_clean_fields_table(field, raw, expected, problems):
    cleaned, found = clean_fields([("event", "newCall"), (field, raw)], to_e164)
    assert dict(cleaned).get(field) == expected
    assert found == [(field, problem) for problem in problems]


FIELDS = st.sampled_from(["callId", "from", "to", "user", "answeringNumber", "queue", "cause"])
VALUES = st.text(alphabet=st.one_of(st.sampled_from(CONTROLS), st.characters()), max_size=600)


@given(st.lists(st.tuples(FIELDS, VALUES), max_size=8))
def test_nothing_control_nor_overlong_is_passed_on(fields):
    cleaned, problems = clean_fields(fields, to_e164)
    for name, value in cleaned:
        assert not any(c in value for c in CONTROLS), (name, value)
        assert len(value) <= FIELD_LIMITS[name]
    # Nothing reordered or invented; only an emptied optional field is left out.
    names = [name for name, _ in cleaned]
    kept = [name for name, value in fields
            if name in ("callId", "from", "to") or not value or value.strip("".join(CONTROLS))]
    assert names == kept
    assert {problem for _, problem in problems} <= {
        "control characters", *(f"longer than {n} characters" for n in FIELD_LIMITS.values())}


@given(st.lists(st.tuples(FIELDS, VALUES), max_size=8))
def test_clean_values_pass_unchanged(fields):
    cleaned, _ = clean_fields(fields)
    assert clean_fields(cleaned) == (cleaned, [])


def test_tracker_logs_once_per_field_and_problem(caplog):
    tracker = CallTracker()
    sent = []
    with caplog.at_level(logging.WARNING, "fs_zammad.calls"):
        for i in range(5):
            a = synth.caller(cid=f"4930\x00{i}\n" + "9" * 120)
            for headers in (a.create(), a.execute("bridge"),
                            a.hangup("NORMAL_CLEARING", "recv_cancel")):
                sent += tracker.handle(headers, 1.0 + i)
    assert [e.name for e in sent] == ["newCall", "hangup"] * 5
    assert {e.get("from") for e in sent} == {f"4930{i}" + "9" * 95 for i in range(5)}
    lines = [r.getMessage() for r in caplog.records if "sent to Zammad cleaned" in r.getMessage()]
    assert len(lines) == 2, lines     # from: control characters; from: too long
    assert any("control characters" in line for line in lines)
    assert any("longer than 100" in line for line in lines)
    assert all("\x00" not in line and "\n" not in line for line in lines)
