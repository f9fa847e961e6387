"""Monitoring that ships in conf/: the Prometheus alert rules and the Grafana
dashboard, checked with the real tools (promtool, a Prometheus server) against
the real ``fs-zammad`` process, not by reading their text."""

from __future__ import annotations

import json
import re
import subprocess
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fs_zammad import metrics
from fs_zammad.calls import ZammadEvent
from fs_zammad.cli import _parser
from fs_zammad.outbox import Outbox
from tests.support.prometheus import PrometheusServer
from tests.support.tools import need_tool
from tests.test_ops import S1, free_port, get, sample, wait_for_metrics

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "conf" / "prometheus" / "fs-zammad.rules.yml"
RULE_TESTS = ROOT / "tests" / "prometheus" / "fs-zammad.test.yml"
EXAMPLE_CONFIG = ROOT / "conf" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "conf" / "grafana" / "fs-zammad.json"

#: A metric selector in PromQL: a series name the service (or Prometheus: up) has.
SELECTOR = re.compile(r"\b(fs_zammad_\w+|up)\b(\{[^}]*\})?")


#: PromQL words that are neither metric nor function names.
KEYWORDS = frozenset("by without on ignoring group_left group_right and or unless bool offset "
                     "inf nan".split())
GROUPING = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) that a PromQL expression reads."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    labels = {label for matchers in re.findall(r"\{([^}]*)\}", expr)
              for label in re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers)}
    labels |= {label for grouping in re.findall(GROUPING, expr)
               for label in re.findall(r"[a-zA-Z_]\w*", grouping)}
    rest = re.sub(GROUPING, " ", re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr))
    names = {word for word, call in re.findall(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", rest)
             if not call and word.lower() not in KEYWORDS}
    return names, labels


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expr) of every query on the dashboard."""
    board = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in board["panels"]
            for target in panel.get("targets", [])]


def as_promql(expr: str, rate_interval: str = "1m") -> str:
    """A dashboard query with Grafana's variables filled in as Grafana would."""
    for variable, value in (("$__rate_interval", rate_interval), ("$__interval", rate_interval),
                            ("$__range", "1h"), ("$instance", ".*")):
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown dashboard variable in {expr}"
    return expr


def stamp(rfc3339: str) -> float:
    """Prometheus's lastEvaluation (RFC 3339, nanoseconds) as seconds."""
    found = re.fullmatch(r"(.*T[\d:]{8})(?:\.(\d+))?(Z|[+-][\d:]{5})", rfc3339)
    assert found, rfc3339
    zone = "+00:00" if found[3] == "Z" else found[3]
    return datetime.fromisoformat(found[1] + zone).timestamp() + float(f"0.{found[2] or 0}")


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([need_tool("promtool", "prometheus"), *args], input=stdin,
                          capture_output=True, text=True, timeout=120)


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_rules_pass_promtool_check_and_their_unit_tests():
    for args in (("check", "rules", str(RULES)), ("test", "rules", str(RULE_TESTS)),
                 ("check", "config", str(EXAMPLE_CONFIG))):
        result = promtool(*args)
        assert result.returncode == 0 and "SUCCESS" in result.stdout, \
            f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def test_every_alert_says_what_to_do_and_is_tested_firing_and_quiet():
    alerts = alert_rules()
    names = {rule["alert"] for rule in alerts}
    # What the issue asks to be raised, by the series it watches.
    watched = " ".join(rule["expr"] for rule in alerts)
    for series in ('up{job="fs-zammad"}', "fs_zammad_esl_connected", "fs_zammad_outbox_oldest_seconds",
                   "fs_zammad_outbox_failed", "fs_zammad_outbox_unsure",
                   "fs_zammad_outbox_max_events", "fs_zammad_outbox_refused_total"):
        assert series in watched, series
    commands = _parser()._subparsers._group_actions[0].choices
    for rule in alerts:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        runbook = rule["annotations"]["runbook"]
        # A command starts the runbook or a clause (not `journalctl -u fs-zammad`).
        named = re.findall(r"(?:^|[;:(] )fs-zammad (\w+)(?: (\w+))?", runbook)
        assert named, f"{rule['alert']}: the runbook names no fs-zammad command"
        for command, action in named:
            assert command in commands, f"{rule['alert']}: no command fs-zammad {command}"
            if command == "outbox":
                actions = next(a.choices for a in commands["outbox"]._actions if a.dest == "action")
                assert action in actions, f"{rule['alert']}: no command fs-zammad outbox {action}"
    cases = [case for group in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for case in group["alert_rule_test"]]
    fired = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    assert fired == names, f"alerts never shown firing: {names - fired}"
    assert quiet == names, f"alerts never shown staying quiet: {names - quiet}"


def test_outbox_gauges_the_alerts_read():
    """Unsure hangups and the cap, as the alerts compare them with pending."""
    outbox = Outbox(":memory:", max_events=1000)
    outbox.record([ZammadEvent(f"call-{n}", (("event", "hangup"), ("callId", f"call-{n}")))
                   for n in range(3)])
    for row in outbox.ready(2):
        outbox.set_unsure(row, "no answer in time")
    metrics.bind(SimpleNamespace(outbox=outbox, tracker=SimpleNamespace(calls={})))
    values = {sample.name: sample.value for family in text_string_to_metric_families(
        generate_latest(metrics.REGISTRY).decode()) for sample in family.samples}
    assert values["fs_zammad_outbox_unsure"] == 2
    assert values["fs_zammad_outbox_pending"] == 1
    assert values["fs_zammad_outbox_max_events"] == 1000


def start_with_a_call(start_service, fake_fs):
    """The service with METRICS_PORT, after one recorded call (labelled series exist)."""
    port = free_port()
    service = start_service(METRICS_PORT=port)
    service.wait_for_log("health and metrics on")
    fake_fs.replay(S1)
    wait_for_metrics(port, lambda s: sample(s, "fs_zammad_delivery_seconds_count") == 3)
    return service, port


def test_metrics_pass_promtool_check_metrics(start_service, fake_fs):
    _service, port = start_with_a_call(start_service, fake_fs)
    status, text = get(port, "/metrics")
    assert status == 200 and "fs_zammad_zammad_requests_total{" in text
    result = promtool("check", "metrics", stdin=text)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), \
        result.stdout + result.stderr


def test_prometheus_scrapes_the_service_and_alerts_when_freeswitch_goes(start_service, fake_fs,
                                                                         tmp_path):
    binary = need_tool("prometheus", "prometheus")
    _service, metrics_port = start_with_a_call(start_service, fake_fs)
    # The shipped rules with every `for:` cut to 2 s, in the shipped example
    # config with the test's intervals and target.
    rules = tmp_path / "fs-zammad.rules.yml"
    rules.write_text(re.sub(r"(?m)^(\s+for:) \S+$", r"\1 2s", RULES.read_text()))
    config = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    config["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s",
                        "evaluation_interval": "1s"}
    config["rule_files"] = [str(rules)]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]

    with PrometheusServer(binary, tmp_path, free_port(), config) as prometheus:
        # Every series the rules read exists, with the labels they match and
        # the `instance` their summaries name.
        selectors = {"".join(match) for rule in alert_rules()
                     for match in SELECTOR.findall(rule["expr"])}
        assert len(selectors) >= 8, selectors
        found = prometheus.wait_until(
            lambda: (lambda r: r if all(r.values()) else None)(
                {s: prometheus.query(s) for s in selectors}), 20, f"series {sorted(selectors)}")
        for selector, series in found.items():
            for one in series:
                assert one["metric"].get("instance") == f"127.0.0.1:{metrics_port}", selector
                assert one["metric"].get("job") == "fs-zammad", selector
        assert prometheus.query("fs_zammad_esl_connected")[0]["value"][1] == "1"

        # Healthy: every rule evaluates without error and none is active. (The
        # 2-second "not scraped" may fire before the first scrape: wait for a
        # quiet evaluation, then check the next one is quiet too.)
        def quiet_after(after: float = 0.0):
            rules_now = prometheus.alert_rules()
            done = len(rules_now) == len(alert_rules()) and all(
                stamp(rule["lastEvaluation"]) > after and rule["state"] == "inactive"
                for rule in rules_now.values())
            return rules_now if done else None

        settled = prometheus.wait_until(quiet_after, 20, "every rule evaluated and quiet")
        last = max(stamp(rule["lastEvaluation"]) for rule in settled.values())
        healthy = prometheus.wait_until(lambda: quiet_after(last), 5, "a second quiet evaluation")
        assert {name: rule["health"] for name, rule in healthy.items()} == \
            {name: "ok" for name in healthy}, healthy

        # Every dashboard query finds series on the real server.
        for title, expr in dashboard_targets():
            assert prometheus.query(as_promql(expr, rate_interval="10s")), f"{title}: {expr}"

        # FreeSWITCH goes away (and stays away): the alert fires.
        fake_fs.pause_accepting()
        fake_fs.drop(notice=False)

        def firing():
            rule = prometheus.alert_rules()["FsZammadFreeSwitchDisconnected"]
            return rule if rule["state"] == "firing" else None

        rule = prometheus.wait_until(firing, 20, "FsZammadFreeSwitchDisconnected to fire")
        (alert,) = rule["alerts"]
        assert alert["labels"]["instance"] == f"127.0.0.1:{metrics_port}"
        assert "has not been connected to FreeSWITCH" in alert["annotations"]["summary"]
        assert "fs-zammad check" in alert["annotations"]["runbook"]
        others = {name for name, rule in prometheus.alert_rules().items()
                  if rule["state"] != "inactive"}
        assert others == {"FsZammadFreeSwitchDisconnected"}


# -- the Grafana dashboard ---------------------------------------------------------


def test_dashboard_is_an_importable_dashboard_with_the_panels_an_operator_needs():
    board = json.loads(DASHBOARD.read_text())
    assert board["title"] and re.fullmatch(r"[\w-]{1,40}", board["uid"])
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    assert "id" not in board or board["id"] is None  # an id would clash on import
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    source = {"type": "prometheus", "uid": "${datasource}"}
    ids, occupied = set(), set()
    for panel in board["panels"]:
        title = panel["title"]
        assert title and panel["type"] in ("timeseries", "stat", "gauge", "bargauge", "table")
        assert panel["id"] not in ids, title
        ids.add(panel["id"])
        assert panel["datasource"] == source, title
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and 0 <= grid["x"] and grid["x"] + grid["w"] <= 24
        cells = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                 for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & occupied, f"{title} overlaps another panel"
        occupied |= cells
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(set(refs)) == len(refs), title
        for target in panel["targets"]:
            assert target["datasource"] == source and target["expr"].strip(), title
            for variable in re.findall(r"\$(\w+)", target["expr"]):
                assert variable.startswith("__") or variable in variables, (title, variable)
    queries = " ".join(expr for _title, expr in dashboard_targets())
    for wanted in ("sum by (direction, cause) (rate(fs_zammad_calls_ended_total",
                   "sum by (event, result) (rate(fs_zammad_zammad_requests_total",
                   "histogram_quantile(0.5, sum by (le) (rate(fs_zammad_delivery_seconds_bucket",
                   "histogram_quantile(0.99, sum by (le) (rate(fs_zammad_delivery_seconds_bucket",
                   "fs_zammad_outbox_pending", "fs_zammad_outbox_oldest_seconds",
                   "fs_zammad_outbox_failed", "fs_zammad_outbox_unsure",
                   "fs_zammad_esl_connected", "fs_zammad_esl_reconnects_total",
                   "fs_zammad_calls_in_progress"):
        assert wanted in queries, wanted


def test_every_dashboard_query_parses(tmp_path):
    targets = dashboard_targets()
    queries = tmp_path / "dashboard-queries.yml"
    queries.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{n}", "expr": as_promql(expr)}
        for n, (_title, expr) in enumerate(targets)]}]}))
    result = promtool("check", "rules", str(queries))
    assert result.returncode == 0 and f"SUCCESS: {len(targets)} rules found" in result.stdout, \
        result.stdout + result.stderr


def test_alerts_and_dashboard_read_only_what_the_service_exports(start_service, fake_fs):
    _service, port = start_with_a_call(start_service, fake_fs)
    _status, text = get(port, "/metrics")
    exported: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for one in family.samples:
            exported.setdefault(one.name, set()).update(one.labels)
    # Prometheus adds these to every series it scrapes.
    exported = {name: labels | {"instance", "job"} for name, labels in exported.items()}
    exported["up"] = {"instance", "job"}
    queries = dashboard_targets() + [(rule["alert"], rule["expr"]) for rule in alert_rules()]
    assert len(queries) > 20
    for title, expr in queries:
        names, labels = promql_names(expr)
        assert names, (title, expr)
        unknown = names - exported.keys()
        assert not unknown, f"{title}: {sorted(unknown)} not exported by the service"
        known_labels = set().union(*(exported[name] for name in names))
        assert labels <= known_labels, f"{title}: no label {sorted(labels - known_labels)}"


def test_promql_names_reads_names_and_labels():
    """The reader the check above relies on, on the shapes the queries use."""
    cases = {
        'sum by (event, result) (rate(a_total{instance=~"$x", x="{y}"}[5m]))':
            ({"a_total"}, {"event", "result", "instance", "x"}),
        "histogram_quantile(0.99, sum by (le) (rate(b_bucket[1m])))": ({"b_bucket"}, {"le"}),
        "max(c / d) > 0.5 and on (instance) e offset 5m": ({"c", "d", "e"}, {"instance"}),
        'absent(up{job="fs-zammad"})': ({"up"}, {"job"}),
        "increase(f_total[10m]) > 1e3": ({"f_total"}, set()),
    }
    for expr, expected in cases.items():
        assert promql_names(expr) == expected, expr
