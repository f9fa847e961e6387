"""Which agent Zammad hears about: zammad_user belongs to the leg.

Recorded ring-group, hunt-group, queue and fifo calls get a different
``zammad_user`` on each agent's leg, injected into every event of that leg as
FreeSWITCH would put a directory variable there; ZAMMAD_AGENTS maps
extensions. The tracker and then the real process must name the agent whose
phone answered.
"""

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fs_zammad.calls import CallTracker, TrackerRules
from fs_zammad.config import ConfigError, load_settings, parse_agents
from fs_zammad.wire import iter_capture
from tests import synth
from tests.support.fake_freeswitch import iter_frames
from tests.test_calls import RECORDED, capture, run, simple
from tests.test_e2e import FIXTURES, a_leg, answered, sentinel_call

EMMA, MAX, LEA = "emma@example.com", "max@example.com", "lea@example.com"

#: recorded scenario -> the extension whose phone answered (fixtures README)
ANSWERED_BY = {"S1": "1001", "S13": "1001", "S15": "1001", "S23": "1002", "S28": "1001",
               "S34": "1001"}

_AGENT_CHANNEL = re.compile(r"sofia/internal/(\d+)@")


def agent_of(headers) -> str:
    """The extension of an agent phone's leg, '' for any other leg."""
    found = _AGENT_CHANNEL.match(headers.get("Channel-Name", ""))
    return found.group(1) if found else ""


def with_directory(events, logins):
    """Every event of an agent's leg carries that agent's zammad_user."""
    return [{**h, "variable_zammad_user": logins[agent_of(h)]} if agent_of(h) in logins
            else dict(h) for h in events]


def tracker(agents=None):
    return CallTracker(TrackerRules(agents=agents or {}))


# (case, zammad_user on each agent's leg, ZAMMAD_AGENTS, login expected per answering extension)
AGENT_CASES = [
    ("directory", {"1001": EMMA, "1002": MAX}, {}, {"1001": EMMA, "1002": MAX}),
    ("directory, swapped", {"1001": MAX, "1002": EMMA}, {}, {"1001": MAX, "1002": EMMA}),
    ("map", {}, {"1001": EMMA, "1002": MAX}, {"1001": EMMA, "1002": MAX}),
    ("map per domain first", {}, {"1001@127.0.0.1": LEA, "1001": EMMA, "1002": MAX},
     {"1001": LEA, "1002": MAX}),
    ("directory wins over the map", {"1001": EMMA, "1002": MAX}, {"1001": LEA, "1002": LEA},
     {"1001": EMMA, "1002": MAX}),
    ("only the losing agent mapped", {}, {"1001": LEA, "1002": LEA, "9999": EMMA}, None),
    ("nothing configured", {}, {}, None),
]


@pytest.mark.parametrize("scenario", sorted(ANSWERED_BY))
@pytest.mark.parametrize("case,directory,agents,expected", AGENT_CASES,
                         ids=[c[0] for c in AGENT_CASES])
def test_the_agent_who_answered_is_the_user(scenario, case, directory, agents, expected):
    ext = ANSWERED_BY[scenario]
    if case == "only the losing agent mapped":
        agents = {k: v for k, v in agents.items() if k != ext}
    sent = run(with_directory(capture(scenario), directory), tracker(agents))[1]
    login = (expected or {}).get(ext, ext)
    want = [(name, {**fields, "user": login} if name == "answer" else fields)
            for name, fields in RECORDED[scenario]]
    assert simple(sent) == want
    assert dict(simple(sent))["answer"]["answeringNumber"] == ext  # Zammad's ways 1 and 2


def test_queue_race_the_losing_agent_seen_last_changes_nothing():
    """S15 with 1002's ringing leg first seen after 1001's (both ring at once)."""
    events = with_directory(capture("S15"), {"1001": EMMA, "1002": MAX})
    loser = next(i for i, h in enumerate(events)
                 if h["Event-Name"] == "CHANNEL_CREATE" and agent_of(h) == "1002")
    moved = events.pop(loser)
    winner_answer = next(i for i, h in enumerate(events)
                         if h["Event-Name"] == "CHANNEL_ANSWER" and agent_of(h) == "1001")
    events.insert(winner_answer, moved)
    answer = dict(simple(run(events)[1]))["answer"]
    assert (answer["user"], answer["answeringNumber"]) == (EMMA, "1001")


@pytest.mark.parametrize("winner", [0, 1, 2])
def test_ring_group_every_order_names_the_phone_that_answered(winner):
    """Synthetic ring-all of three phones, each leg with its own zammad_user, every
    loser's events both before and after the winner's answer."""
    logins = [EMMA, MAX, LEA]
    a = synth.caller()
    legs = [synth.agent_leg(a, ext, variable_zammad_user=login)
            for ext, login in zip(("1001", "1002", "1003"), logins)]
    losers = [leg for i, leg in enumerate(legs) if i != winner]
    events = [a.create(), a.execute("bridge", "user/1001,user/1002,user/1003"),
              losers[0].create(), legs[winner].create(), losers[1].create(),
              legs[winner].answer(), losers[0].hangup("LOSE_RACE", "send_cancel"),
              losers[1].hangup("ORIGINATOR_CANCEL", "send_cancel"), a.answer(),
              a.bridge(legs[winner]), a.hangup("NORMAL_CLEARING", "recv_bye"),
              legs[winner].hangup("NORMAL_CLEARING")]
    sent = simple(run(events)[1])
    assert [name for name, _ in sent] == ["newCall", "answer", "hangup"]
    assert sent[1][1]["user"] == logins[winner]
    assert sent[1][1]["answeringNumber"] == f"100{winner + 1}"
    assert "user" not in sent[0][1]


@settings(max_examples=150, deadline=None)
@given(agents=st.integers(2, 5), data=st.data())
def test_ring_group_any_interleaving_names_the_phone_that_answered(agents, data):
    """Any number of phones, any order of the losers' events around the winner's
    (each loser rings, then loses or gives up before or after the answer)."""
    winner = data.draw(st.integers(0, agents - 1), label="winner")
    a = synth.caller()
    legs = [synth.agent_leg(a, f"10{i:02d}", variable_zammad_user=f"agent{i}@example.com")
            for i in range(agents)]
    story = [legs[winner].create(), legs[winner].answer()]
    for i, leg in enumerate(legs):
        if i == winner:
            continue
        cause = data.draw(st.sampled_from(["LOSE_RACE", "NO_ANSWER", "USER_BUSY"]))
        at = data.draw(st.integers(0, len(story)), label="create at")
        story.insert(at, leg.create())
        story.insert(data.draw(st.integers(at + 1, len(story)), label="hangup at"),
                     leg.hangup(cause, "send_cancel"))
    events = [a.create(), a.execute("bridge", ",".join(f"user/{leg.base['Caller-Destination-Number']}"
                                                       for leg in legs))]
    events += story + [a.answer(), a.bridge(legs[winner]), a.hangup("NORMAL_CLEARING", "recv_bye"),
                       legs[winner].hangup("NORMAL_CLEARING")]
    sent = simple(run(events)[1])
    assert [name for name, _ in sent] == ["newCall", "answer", "hangup"]
    assert sent[1][1]["user"] == f"agent{winner}@example.com"
    assert sent[1][1]["answeringNumber"] == f"10{winner:02d}"
    assert sent[2][1]["cause"] == "normalClearing"


def test_pickup_names_the_agent_who_picked_up_not_the_phone_that_rang():
    a, events = synth.picked_up_call()          # 1001 rings, 1002 picks up with intercept
    logins = {"1001": EMMA, "1002": MAX}
    ext_of = {h["Unique-ID"]: agent_of(h) or h.get("variable_user_name", "") for h in events}
    events = [{**h, "variable_zammad_user": logins[ext_of[h["Unique-ID"]]]}
              if ext_of[h["Unique-ID"]] in logins else h for h in events]
    answer = dict(simple(run(events)[1]))["answer"]
    assert (answer["user"], answer["answeringNumber"]) == (MAX, "1002")


def test_agent_answered_during_a_gap_is_named_by_its_own_leg():
    """Both phones rang while connected; FreeSWITCH's channel list after a reconnect
    shows which one is talking: the other one's value must not be used."""
    from fs_zammad.calls import channels_to_headers

    a = synth.caller()
    talking = synth.agent_leg(a, "1001", variable_zammad_user=EMMA)
    lost = synth.agent_leg(a, "1002", variable_zammad_user=MAX)
    tracker_, sent = run([a.create(), a.execute("bridge"), talking.create(), lost.create()])
    live = channels_to_headers([
        {"uuid": a.uuid, "direction": "inbound", "context": "public", "callstate": "ACTIVE"},
        {"uuid": talking.uuid, "direction": "outbound", "call_uuid": a.uuid,
         "callstate": "ACTIVE"}])
    sent += tracker_.reconcile(live, 2000.0)
    answer = dict(simple(sent))["answer"]
    assert (answer["user"], answer["answeringNumber"]) == (EMMA, "1001")


@pytest.mark.parametrize("scenario", ["S8", "S9"])
@pytest.mark.parametrize("directory,agents,login", [
    ({"1001": EMMA}, {}, EMMA),
    ({}, {"1001": MAX}, MAX),
    ({"1001": EMMA}, {"1001": MAX}, EMMA),
    ({}, {}, "1001"),
])
def test_outbound_new_call_names_the_calling_agent(scenario, directory, agents, login):
    sent = run(with_directory(capture(scenario), directory), tracker(agents))[1]
    assert sent[0].name == "newCall" and sent[0].get("user") == login
    assert sent[0].get("from") == "1001"
    assert all(e.get("user") == "" for e in sent[1:])


def test_click_to_dial_names_the_agent_leg_that_joins():
    customer = synth.Leg("outbound", "default", "492214710334", "4989123456789",
                         "sofia/gateway/carrier/4989123456789",
                         variables={"variable_sip_gateway_name": "carrier"})
    agent = synth.agent_leg(customer, "1001", context="default", variable_zammad_user=EMMA)
    sent = run([customer.create(), customer.answer(), customer.execute("bridge", "user/1001"),
                agent.create(), agent.answer(), customer.bridge(agent),
                agent.hangup("NORMAL_CLEARING", "recv_bye"), customer.hangup("NORMAL_CLEARING")])[1]
    assert sent[0].get("user") == EMMA


def test_dialplan_zammad_user_on_the_caller_leg_is_the_fallback():
    a = synth.caller()
    a.set(zammad_user="hotline@example.com")
    plain, mapped = synth.agent_leg(a, "1001"), synth.agent_leg(a, "1002")
    for leg, agents, want in ((plain, {}, "hotline@example.com"), (mapped, {"1002": MAX}, MAX)):
        sent = run([a.create(), a.execute("bridge"), leg.create(), leg.answer(), a.bridge(leg),
                    a.hangup("NORMAL_CLEARING", "recv_bye"), leg.hangup("NORMAL_CLEARING")],
                   tracker(agents))[1]
        assert sent[0].get("user") == "hotline@example.com"   # newCall: the called agent
        assert sent[1].get("user") == want


def test_an_agent_calling_in_is_not_the_agent_who_answered():
    """zammad_direction=in on an agent's own call: its directory value names the caller."""
    a = synth.agent_call("1002", dest="1001")
    a.set(zammad_direction="in", zammad_user=MAX)
    b = synth.agent_leg(a, "1001", context="default")
    sent = run([a.create(), a.execute("bridge"), b.create(), b.answer(), a.bridge(b),
                a.hangup("NORMAL_CLEARING", "recv_bye"), b.hangup("NORMAL_CLEARING")],
               tracker({"1001": EMMA}))[1]
    assert sent[0].get("user") == "" and sent[1].get("user") == EMMA


# -- settings ---------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("1001=emma@example.com,1002=max@example.com", {"1001": EMMA, "1002": MAX}),
    (" 1001 = emma@example.com ,\n\n1002=max@example.com\n", {"1001": EMMA, "1002": MAX}),
    ("# who is who\n1001=emma@example.com  # desk 1\n1001@acme=max@example.com\n",
     {"1001": EMMA, "1001@acme": MAX}),
    ("", {}),
])
def test_parse_agents(text, expected):
    assert parse_agents(text) == expected


@pytest.mark.parametrize("text", ["1001", "1001=", "=emma", "1001=emma example", "10 01=emma",
                                  "1001=emma,1001=max", "1001:emma"])
def test_bad_agent_maps_name_the_variable_in_one_line(text, tmp_path):
    for env in ({"ZAMMAD_AGENTS": text}, {"ZAMMAD_AGENTS_FILE": str(tmp_path / "agents")}):
        (tmp_path / "agents").write_text(text.replace(",", "\n"))
        with pytest.raises(ConfigError) as err:
            load_settings(env)
        message = str(err.value)
        assert message.startswith(next(iter(env))) and "\n" not in message


def test_agents_from_the_variable_and_the_file(tmp_path):
    path = tmp_path / "agents"
    path.write_text("1002=max@example.com\n")
    settings = load_settings({"ZAMMAD_AGENTS": "1001=emma@example.com",
                              "ZAMMAD_AGENTS_FILE": str(path)})
    assert settings.agents == {"1001": EMMA, "1002": MAX}
    path.write_text("1001=lea@example.com\n")
    with pytest.raises(ConfigError, match="ZAMMAD_AGENTS_FILE.*mapped twice"):
        load_settings({"ZAMMAD_AGENTS": "1001=emma@example.com", "ZAMMAD_AGENTS_FILE": str(path)})
    with pytest.raises(ConfigError, match="ZAMMAD_AGENTS_FILE: cannot read"):
        load_settings({"ZAMMAD_AGENTS_FILE": str(tmp_path / "missing")})


# -- end to end: the real process ----------------------------------------------------


def replay_with_directory(fs, scenario, logins):
    for headers, _raw in iter_frames(FIXTURES / scenario / "events_all.txt"):
        if agent_of(headers) in logins:
            headers = {**headers, "variable_zammad_user": logins[agent_of(headers)]}
        fs.emit(headers, complete=False)


def test_end_to_end_the_screen_pop_reaches_the_agent_who_answered(start_service, fake_fs,
                                                                   zammad, tmp_path):
    agents_file = tmp_path / "agents"
    agents_file.write_text("# desk phones\n1001=lea@example.com\n")
    for login in (EMMA, MAX, LEA):
        zammad.rest.add_agent(login)
    zammad.rest.add_agent("wrong@example.com")
    start_service(ZAMMAD_AGENTS="1002=max@example.com", ZAMMAD_AGENTS_FILE=str(agents_file))
    # S15: queue, both agents' legs carry their own value; S23: hunt group, 1002 (mapped)
    # answers; S8: 1001 calls out (mapped in the file).
    replay_with_directory(fake_fs, "S15", {"1001": EMMA, "1002": "wrong@example.com"})
    replay_with_directory(fake_fs, "S23", {})
    replay_with_directory(fake_fs, "S8", {})
    sentinel_call(fake_fs, zammad)
    ids = {scenario: a_leg(scenario) for scenario in ("S15", "S23", "S8")}
    zammad.wait_for(lambda: all(len(answered(zammad, i)) == 3 for i in ids.values()))
    log = {entry["callId"]: entry for entry in zammad.caller_log()}
    queue, hunt, out = (log[ids[s]] for s in ("S15", "S23", "S8"))
    assert (queue["answered_by"], queue["answering_number"], queue["queue"]) == \
        (EMMA, "1001", "support")
    assert (hunt["answered_by"], hunt["answering_number"]) == (MAX, "1002")
    assert (queue["screen_pop"], hunt["screen_pop"]) == (EMMA, MAX)  # what Zammad does with it
    assert (out["from_comment"], out["from"]) == ("lea@example.com", "1001")
    assert all(e["hangups"] == 1 and e["cause"] == "normalClearing" for e in (queue, hunt, out))


def test_end_to_end_without_a_login_zammad_finds_nobody_for_an_extension(start_service,
                                                                         fake_fs, zammad):
    """The case this feature is for: '1001' reaches no agent unless typed into a phone field."""
    zammad.rest.add_agent(EMMA, phone="+49 221 4710334")
    start_service()
    fake_fs.replay(FIXTURES / "S1" / "events_all.txt")
    zammad.wait_for(lambda: len(answered(zammad, a_leg("S1"))) == 3)
    assert zammad.caller_log()[0]["screen_pop"] is None
    zammad.rest.add_agent(MAX, phone="1001")
    fake_fs.replay(FIXTURES / "S13" / "events_all.txt")
    zammad.wait_for(lambda: len(answered(zammad, a_leg("S13"))) == 3)
    assert zammad.caller_log()[1]["screen_pop"] == MAX


def test_end_to_end_a_bad_agent_map_stops_with_one_line():
    import subprocess

    from tests.support.service import FS_ZAMMAD, base_env
    result = subprocess.run([FS_ZAMMAD], env=base_env(ZAMMAD_AGENTS="1001=emma,1002"),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "ZAMMAD_AGENTS" in result.stderr
    assert "Traceback" not in result.stderr


def test_all_fixture_legs_recognised():
    """The helper above finds the agents' legs in every recording used here."""
    for scenario in ANSWERED_BY:
        events = list(iter_capture((Path(FIXTURES) / scenario / "events_all.txt").read_bytes()))
        assert ANSWERED_BY[scenario] in {agent_of(h) for h in events}
