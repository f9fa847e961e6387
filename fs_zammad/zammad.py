"""One POST to Zammad's CTI endpoint -> delivered, retry or failed.

``ZammadClient`` owns the keep-alive ``requests.Session`` and nothing else:
retry timing and ordering belong to delivery.py. ``classify`` is pure and
holds everything we know about Zammad's answers (see
``shared/reference/zammad-cti-api.md``):

* 200 is accepted; its JSON may ask to ``reject`` a blocked caller.
* 401 (token) and 422 (CTI disabled, not configured, bad field) are
  configuration errors: no retry fixes them.
* 500 "already exists" for a newCall means an earlier try was stored.
* 500 "No such call_id" means the call's newCall never arrived: permanent.
* other 5xx, 408, 429 and connection trouble are worth retrying; when the
  request may have reached Zammad (a timeout after sending), the outcome is
  ``maybe_sent``, which delivery never retries for a hangup.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
import time
from dataclasses import dataclass

import requests
from requests.adapters import HTTPAdapter

from fs_zammad import __version__
from fs_zammad.config import redact_url

log = logging.getLogger(__name__)

#: Seconds a pooled connection may sit idle before it is not reused.
KEEPALIVE_IDLE = 15.0

DELIVERED, RETRY, ZAMMAD_DOWN, FAILED, MAYBE_SENT = (
    "delivered", "retry", "zammad_down", "failed", "maybe_sent")


@dataclass(frozen=True)
class Outcome:
    kind: str           # one of the constants above
    status: int         # HTTP status, 0 without an answer
    detail: str         # Zammad's words or the network error, one line
    action: dict | None = None  # {"action": "reject", ...} from a newCall answer
    elapsed_ms: float = 0.0
    config_error: bool = False  # 401/422/404: the admin must fix something


def error_text(body: str, limit: int = 200) -> str:
    """Zammad's error message from a JSON or HTML error body, on one line."""
    body = body or ""
    try:
        data = json.loads(body)
        if isinstance(data, dict) and data.get("error"):
            return " ".join(str(data["error"]).split())[:limit]
    except ValueError:
        pass
    for pattern in (r"<h2[^>]*>(.*?)</h2>", r"<h1[^>]*>(.*?)</h1>", r"<title[^>]*>(.*?)</title>"):
        found = re.search(pattern, body, re.S | re.I)
        if found and found.group(1).strip():
            text = re.sub(r"<[^>]+>", " ", found.group(1))
            break
    else:
        text = re.sub(r"<[^>]+>", " ", body)
    return " ".join(html.unescape(text).split())[:limit]


def classify(event: str, status: int, body: str) -> Outcome:
    """HTTP answer -> Outcome (pure)."""
    if status == 200:
        action = None
        try:
            data = json.loads(body or "{}")
            if isinstance(data, dict) and data.get("action"):
                action = data
        except ValueError:
            pass
        return Outcome(DELIVERED, status, "", action)
    text = error_text(body)
    if status == 500:
        if "already exists" in (body or "") and event == "newCall":
            return Outcome(DELIVERED, status, "already stored by an earlier try")
        if "No such call_id" in (body or ""):
            return Outcome(FAILED, status, text or "No such call_id")
        return Outcome(RETRY, status, text or "server error")
    if status in (401, 403, 404, 422):
        return Outcome(FAILED, status, text or f"HTTP {status}", config_error=True)
    if status in (502, 503, 504):
        return Outcome(ZAMMAD_DOWN, status, text or f"HTTP {status}")
    if status in (408, 429) or status >= 500:
        return Outcome(RETRY, status, text or f"HTTP {status}")
    return Outcome(FAILED, status, text or f"HTTP {status}")


def _network_outcome(exc: requests.RequestException, secrets: tuple[str, ...]) -> Outcome:
    """Connection trouble: was the request possibly received?"""
    text = " ".join(str(exc).split())
    for secret in secrets:
        text = text.replace(secret, "***")
    if isinstance(exc, requests.exceptions.SSLError):
        # urllib3 wraps the reason in a long pool description: keep the reason.
        reason = re.search(r"\[SSL: [A-Z_]+\][^'\")]*", text)
        return Outcome(ZAMMAD_DOWN, 0, f"TLS error: {(reason.group(0) if reason else text)[:200]}")
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return Outcome(ZAMMAD_DOWN, 0, "connect timed out")
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return Outcome(MAYBE_SENT, 0, "no answer in time (the request may have been processed)")
    if isinstance(exc, requests.exceptions.ConnectionError):
        reason = repr(getattr(exc.args[0], "reason", exc.args[0])) if exc.args else text
        if any(word in reason for word in ("NewConnectionError", "NameResolution", "refused")):
            if "NameResolution" in reason or "Name or service" in text:
                return Outcome(ZAMMAD_DOWN, 0, "DNS lookup failed for Zammad's host")
            return Outcome(ZAMMAD_DOWN, 0, "connection refused or unreachable")
        return Outcome(MAYBE_SENT, 0, f"connection lost during the request: {text[:160]}")
    return Outcome(ZAMMAD_DOWN, 0, text[:200])


def zammad_session(url: str, verify: bool | str = True, pool_size: int = 8) -> requests.Session:
    """A keep-alive session to one Zammad (CTI endpoint or REST API)."""
    session = requests.Session()
    # requests reads proxy and CA variables from the environment on every
    # request unless told otherwise: read them once, here.
    session.trust_env = False
    session.proxies = requests.utils.get_environ_proxies(url)
    if verify is True:
        verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") \
            or True
    session.verify = verify
    session.headers.update({
        "Accept": "application/json",  # Zammad answers errors as JSON, not HTML pages
        "User-Agent": f"fs-zammad/{__version__}",
    })
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class ZammadClient:
    """Posts form-encoded CTI events over one keep-alive session."""

    def __init__(self, url: str, timeout: float = 10.0, verify: bool | str = True,
                 connect_timeout: float = 5.0, pool_size: int = 8):
        self.url = url
        self.timeout = (min(connect_timeout, timeout), timeout)
        self.session = zammad_session(url, verify, pool_size)
        token = url.rstrip("/").rpartition("/")[2]
        self._secrets = (token,) if token else ()
        self._last_used = 0.0

    @property
    def redacted_url(self) -> str:
        return redact_url(self.url)

    def post(self, fields: tuple[tuple[str, str], ...]) -> Outcome:
        event = dict(fields).get("event", "")
        started = time.monotonic()
        if started - self._last_used > KEEPALIVE_IDLE:
            # Zammad's servers close idle keep-alive connections (puma after
            # 20 s); a request racing that close may or may not have been
            # read, which would make a hangup unsure. Start afresh instead.
            self.session.close()
        self._last_used = started
        try:
            response = self.session.post(self.url, data=list(fields), timeout=self.timeout)
        except requests.RequestException as exc:
            outcome = _network_outcome(exc, self._secrets)
        else:
            outcome = classify(event, response.status_code, response.text)
        elapsed = (time.monotonic() - started) * 1000
        return Outcome(outcome.kind, outcome.status, outcome.detail, outcome.action,
                       round(elapsed, 1), outcome.config_error)

    def close(self) -> None:
        self.session.close()


class DryRunClient:
    """ZAMMAD_CTI_URL unset: log what would be sent, accept everything."""

    redacted_url = "(dry run)"

    def post(self, fields: tuple[tuple[str, str], ...]) -> Outcome:
        return Outcome(DELIVERED, 0, "dry run: not sent")

    def close(self) -> None:
        pass
