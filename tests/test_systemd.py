"""Running without containers: the systemd unit, checked with the real
systemd-analyze, and the sd_notify protocol (READY, WATCHDOG, STOPPING)
spoken by the real ``fs-zammad`` process to a socket the test binds."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from fs_zammad.config import VARIABLES
from fs_zammad.notify import Notifier
from tests.support.service import FS_ZAMMAD, ServiceProcess, base_env
from tests.support.tools import need_tool

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "conf" / "systemd" / "fs-zammad.service"
INSTALLED = "/opt/fs-zammad/bin/fs-zammad"  # where README's steps put the venv


def unit_settings(text: str) -> dict[str, list[str]]:
    """Key -> every value it is given (systemd keys may repeat)."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart on this venv's fs-zammad (verify needs it to exist)."""
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED} run" in text
    copy = tmp_path / "fs-zammad.service"
    copy.write_text(text.replace(INSTALLED, FS_ZAMMAD))
    return copy


def systemd_analyze(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([need_tool("systemd-analyze", "systemd"), *args],
                          capture_output=True, text=True, timeout=60)


def test_unit_passes_systemd_analyze_verify(tmp_path):
    result = systemd_analyze("verify", str(unit_copy(tmp_path)))
    # verify exits 0 on unknown keys and bad values too: it must say nothing.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), \
        result.stdout + result.stderr


def test_unit_exposure_is_ok_for_systemd_analyze_security(tmp_path):
    result = systemd_analyze("security", "--offline=true", str(unit_copy(tmp_path)))
    found = re.search(r"Overall exposure level for fs-zammad\.service: ([\d.]+) (\w+)",
                      result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found[1]) <= 2.0 and found[2] == "OK", found[0]


def test_unit_runs_the_service_as_the_readme_says():
    settings = unit_settings(UNIT.read_text())
    assert settings["Type"] == ["notify"] and settings["DynamicUser"] == ["yes"]
    assert settings["ExecStart"] == [f"{INSTALLED} run"]
    assert settings["EnvironmentFile"] == ["/etc/fs-zammad/fs-zammad.env"]
    assert settings["StateDirectory"] == ["fs-zammad"]
    watchdog = int(settings["WatchdogSec"][0])
    assert 10 <= watchdog <= 120
    # Each secret is a credential, and its *_FILE variable points at it.
    credentials = dict(value.split(":", 1) for value in settings["LoadCredential"])
    environment = dict(value.split("=", 1) for value in settings["Environment"])
    assert set(credentials.values()) == {"/etc/fs-zammad/freeswitch_password",
                                         "/etc/fs-zammad/zammad_cti_url"}
    for variable in ("FREESWITCH_PASSWORD_FILE", "ZAMMAD_CTI_URL_FILE"):
        name = environment[variable].removeprefix("%d/")
        assert environment[variable] == f"%d/{name}" and name in credentials, variable
    declared = {name for name, _, _ in VARIABLES}
    assert set(environment) <= declared, set(environment) - declared


# -- sd_notify ----------------------------------------------------------------------


class NotifySocket:
    """What systemd would listen on: a Unix datagram socket (path or abstract)."""

    def __init__(self, tmp_path: Path, abstract: bool):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            self.name = f"@fs-zammad-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + self.name[1:])
        else:
            self.name = str(tmp_path / "notify.sock")
            self.sock.bind(self.name)
        self.messages: list[str] = []

    def wait_for(self, predicate, timeout: float = 15.0) -> list[str]:
        """Receive until ``predicate(messages)`` holds; the messages so far."""
        deadline = time.monotonic() + timeout
        while not predicate(self.messages):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"never got the expected notifications: {self.messages}")
            self.sock.settimeout(left)
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except socket.timeout:
                pass
        return list(self.messages)

    def drain(self) -> list[str]:
        self.sock.settimeout(0.5)
        try:
            while True:
                self.messages.append(self.sock.recv(4096).decode())
        except socket.timeout:
            return list(self.messages)

    def close(self):
        self.sock.close()


def count(messages: list[str], line: str) -> int:
    return sum(line in message.split("\n") for message in messages)


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_service_notifies_ready_once_connected_watchdog_while_alive_and_stopping(
        abstract, tmp_path, fake_fs, zammad):
    notify = NotifySocket(tmp_path, abstract)
    fake_fs.pause_accepting()  # FreeSWITCH down at start: not ready yet
    service = ServiceProcess(base_env(fake_fs, zammad, tmp_path / "state",
                                      NOTIFY_SOCKET=notify.name, WATCHDOG_USEC=200_000))
    try:
        service.wait_for_log("refused the connection")
        before = notify.wait_for(lambda m: count(m, "WATCHDOG=1") >= 3)
        assert count(before, "READY=1") == 0, before

        fake_fs.resume_accepting()
        fake_fs.wait_for_subscription(timeout=15)
        ready = notify.wait_for(lambda m: count(m, "READY=1") >= 1)
        assert "STATUS=connected to FreeSWITCH" in ready[-1].split("\n")
        notify.wait_for(lambda m: count(m, "WATCHDOG=1") >= count(ready, "WATCHDOG=1") + 2)

        assert service.stop() == 0
        messages = notify.drain()
        stopping = [i for i, m in enumerate(messages) if "STOPPING=1" in m.split("\n")]
        assert len(stopping) == 1, messages
        assert count(messages[stopping[0]:], "WATCHDOG=1") == 0, messages
    finally:
        if service.proc.poll() is None:
            service.kill()
        notify.close()
    service.assert_no_secrets(zammad.token)


def test_notifier_is_silent_without_systemd_and_never_raises(tmp_path, caplog):
    assert Notifier({}).send("READY=1") is False
    assert Notifier({}).watchdog_interval is None
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000"}).watchdog_interval == 15
    # The watchdog is meant for another process (WATCHDOG_PID), or not set up.
    for env in ({"WATCHDOG_USEC": "30000000"}, {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "0"},
                {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000",
                 "WATCHDOG_PID": str(os.getpid() + 1)}):
        assert Notifier(env).watchdog_interval is None, env
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert gone.send("READY=1") is False and gone.send("STOPPING=1") is False
    assert len([r for r in caplog.records if "cannot notify systemd" in r.message]) == 1


def test_watchdog_pings_only_while_alive(tmp_path):
    notify = NotifySocket(tmp_path, abstract=False)
    notifier = Notifier({"NOTIFY_SOCKET": notify.name, "WATCHDOG_USEC": "20000"})
    alive, stopped, checks = [True], threading.Event(), []

    def check():
        if len(checks) == 4:
            alive[0] = False   # a worker died: no more pings
        if len(checks) == 9:
            stopped.set()
        checks.append(alive[0])
        return alive[0]

    pinger = threading.Thread(target=notifier.watchdog, args=(check, stopped))
    pinger.start()
    pinger.join(timeout=10)
    assert not pinger.is_alive()
    assert count(notify.drain(), "WATCHDOG=1") == checks.count(True) == 4
    notify.close()

