"""A real Prometheus server (Debian's ``prometheus``) for one test.

It listens on the given loopback port, keeps its data in the test's tmp dir and
is stopped (SIGTERM, then killed) when the ``with`` block ends.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path


class PrometheusServer:
    def __init__(self, binary: str, directory: Path, port: int, config: dict):
        self.directory = directory
        self.port = port
        config_file = directory / "prometheus.yml"
        config_file.write_text(json.dumps(config, indent=1))  # JSON is YAML
        self.log_path = directory / "prometheus.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config_file}",
             f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)

    def __enter__(self) -> PrometheusServer:
        try:
            self.wait_until(self._ready, 30, "Prometheus to be ready")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def api(self, path: str, **params) -> object:
        """GET /api/v1/<path>: its ``data``; raises on an API error."""
        query = urllib.parse.urlencode(params)
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}" + (f"?{query}" if query else "")
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = json.load(response)
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query's vector: [{"metric": labels, "value": [t, "v"]}, ...]."""
        return self.api("query", query=expr)["result"]

    def alert_rules(self) -> dict[str, dict]:
        """Alerting rules by name, with their state, health and active alerts."""
        groups = self.api("rules", type="alert")["groups"]
        return {rule["name"]: rule for group in groups for rule in group["rules"]}

    def wait_until(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"Prometheus exited ({self.proc.returncode}):\n{self.log}")
            result = predicate()
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.log[-3000:]}")
            time.sleep(0.2)
