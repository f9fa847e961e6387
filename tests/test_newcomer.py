"""What a new user stumbled over (issue 12, part 6), tried the same way: the
dry run's log, where the outbox goes, the env file's header, and that the run
command keeps running until Ctrl-C or SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from fs_zammad.config import DEFAULTS, VARIABLES, load_settings
from tests.support.service import ESL_PASSWORD, FS_ZAMMAD, ServiceProcess, base_env

ROOT = Path(__file__).resolve().parents[1]
S1 = ROOT / "tests" / "fixtures" / "callcentre" / "S1" / "events_all.txt"


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_dry_run_says_dry_run_not_delivered(fake_fs, log_format):
    before = fake_fs.connections_total
    service = ServiceProcess(base_env(fake_fs, LOG_FORMAT=log_format))
    try:
        fake_fs.wait_for_subscription(after=before)
        fake_fs.replay(S1)
        service.wait_for_log("hangup")
        sent = [line for line in service.lines if "callId" in line]
        assert len(sent) == 3, sent
        for line in sent:
            if log_format == "json":
                fields = json.loads(line)
                assert (fields["result"], fields["detail"]) == \
                    ("dry-run", "not sent: ZAMMAD_CTI_URL is unset"), line
                assert fields["message"].endswith(" dry-run")
            else:
                assert " result=dry-run detail=not sent: ZAMMAD_CTI_URL is unset" in line
            assert "delivered" not in line
    finally:
        assert service.stop() == 0
    service.assert_no_secrets(ESL_PASSWORD)


def test_state_dir_is_what_readme_config_and_env_file_say(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    default = Path(DEFAULTS["STATE_DIR"])
    usable_default = default.is_dir() and os.access(default, os.W_OK)
    cases = [  # env -> state_dir
        ({"STATE_DIR": str(tmp_path / "set")}, tmp_path / "set"),
        ({"XDG_STATE_HOME": str(tmp_path / "xdg")},
         default if usable_default else tmp_path / "xdg" / "fs-zammad"),
        ({}, default if usable_default else tmp_path / "home" / ".local" / "state" / "fs-zammad"),
    ]
    for env, expected in cases:
        assert load_settings(env).state_dir == expected, env

    # One description, the same in config.py, the README table and the env file.
    (meaning,) = [m for name, _, m in VARIABLES if name == "STATE_DIR"]
    assert f"| `STATE_DIR` | `{default}` | {meaning} |" in (ROOT / "README.md").read_text()
    assert f"# {meaning}\n# STATE_DIR={default}\n" in (ROOT / "conf" / "fs-zammad.env").read_text()


def test_a_state_dir_that_cannot_be_written_stops_the_service_with_one_line(tmp_path, zammad):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = base_env(zammad=zammad, STATE_DIR=blocker / "state")
    result = subprocess.run([FS_ZAMMAD, "run"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "cannot start" in line]
    assert f"STATE_DIR={blocker / 'state'}" in line


def test_env_file_header_says_where_it_goes():
    header = (ROOT / "conf" / "fs-zammad.env").read_text().split("\n\n")[0]
    unit = (ROOT / "conf" / "systemd" / "fs-zammad.service").read_text()
    (environment_file,) = [line.split("=", 1)[1] for line in unit.splitlines()
                           if line.startswith("EnvironmentFile=")]
    assert environment_file in header
    assert "--env-file" in header and "docker-compose.yml" in header
    assert "Copy to fs-zammad.env" not in header


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_run_keeps_running_until_ctrl_c_or_sigterm(fake_fs, stop):
    """README: `fs-zammad` stays in the foreground until Ctrl-C or SIGTERM."""
    before = fake_fs.connections_total
    service = ServiceProcess(base_env(fake_fs))
    fake_fs.wait_for_subscription(after=before)
    fake_fs.replay(S1)
    service.wait_for_log("hangup")
    assert service.proc.poll() is None  # a whole call later, still there
    assert service.stop(stop) == 0
    service.wait_for_log("stopped")
    readme = (ROOT / "README.md").read_text()
    assert "until you stop it with Ctrl-C or SIGTERM" in readme
