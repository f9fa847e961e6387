"""Runs the real ``fs-zammad`` console script as a child process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

FS_ZAMMAD = str(Path(sys.executable).parent / "fs-zammad")

ESL_PASSWORD = "esl-pass-Xy7"


def base_env(fs=None, zammad=None, state_dir=None, **overrides) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FREESWITCH_", "ZAMMAD_", "METRICS_", "LOG_"))}
    env.update({"FREESWITCH_PASSWORD": ESL_PASSWORD, "LOG_LEVEL": "DEBUG",
                "FREESWITCH_RECONNECT_MAX": "1", "ZAMMAD_RETRY_MAX": "0.5",
                "SHUTDOWN_TIMEOUT": "5"})
    if fs is not None:
        env["FREESWITCH_PORT"] = str(fs.port)
    if zammad is not None:
        env["ZAMMAD_CTI_URL"] = zammad.url
    if state_dir is not None:
        env["STATE_DIR"] = str(state_dir)
    env.update({k: str(v) for k, v in overrides.items()})
    return env


class ServiceProcess:
    """``fs-zammad [args]`` with its log collected line by line."""

    def __init__(self, env: dict, *args: str):
        self.env = env
        self.proc = subprocess.Popen([FS_ZAMMAD, *args], env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for_log(self, pattern: str, timeout: float = 15.0, count: int = 1) -> list[str]:
        """Lines matching ``pattern`` once there are ``count`` of them."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [line for line in self.lines if regex.search(line)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no {count}x {pattern!r} in the log:\n" +
                                         "\n".join(self.lines[-40:]))
                self._cond.wait(timeout=min(left, 0.2))

    def stop(self, sig=signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=5)
            raise AssertionError("fs-zammad did not stop in time:\n" + self.log[-3000:]) from None
        self._reader.join(timeout=5)
        return code

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
        self._reader.join(timeout=5)

    def assert_no_secrets(self, *secrets: str) -> None:
        text = self.log
        for secret in secrets:
            assert secret not in text, f"secret {secret[:3]}... leaked into the log"
        assert "Traceback" not in text, text[-3000:]
