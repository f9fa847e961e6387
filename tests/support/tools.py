"""External tools the ops checks run for real (promtool, prometheus, systemd-analyze)."""

from __future__ import annotations

import os
import shutil

import pytest


def need_tool(name: str, package: str) -> str:
    """The tool's path; skip when it is missing, but fail on CI (CI=true), whose
    .ci/run installs it: a check must never pass there by being skipped."""
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"{name} is missing on CI: .ci/run must install Debian's {package} package")
    pytest.skip(f"{name} is not installed (apt-get install {package})")
