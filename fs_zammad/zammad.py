"""One POST to Zammad's CTI endpoint -> an Outcome.

``ZammadClient`` owns the keep-alive ``requests.Session`` and nothing else:
retry timing and ordering belong to delivery.py. ``classify`` is pure and
holds everything we know about the answers (see
``shared/reference/zammad-cti-api.md`` and the README's table):

* Only Zammad's own answer counts as delivered: a 200 whose body is a JSON
  object with a JSON Content-Type (``{}`` or the reject/dial action).
  Any other 2xx, and every 3xx (never followed: requests would turn the
  POST into a GET), is ``not_zammad``: something else is in the way.
* 401 (token) and 422 (CTI disabled, not configured, bad field) with
  Zammad's JSON error are configuration errors: no retry fixes them. A
  401/403/404 page from something else is ``not_zammad``.
* 500 "already exists" for a newCall means an earlier try was stored.
* 500 "No such call_id" means the call's newCall never arrived: permanent.
* 429/503 with Retry-After: ``throttled`` for that long (capped).
* other 5xx, 408, 429 and connection trouble are worth retrying.

``maybe_processed`` says whether the answer leaves open that Zammad
processed the request: delivery never resends a hangup that a second copy
would harm (``Row.once``) after such an answer.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from datetime import timezone
from email.utils import parsedate_to_datetime
from urllib.parse import urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter

from fs_zammad import __version__
from fs_zammad.config import redact_url
from fs_zammad.logs import Redactor

log = logging.getLogger(__name__)

#: Seconds a pooled connection may sit idle before it is not reused.
KEEPALIVE_IDLE = 15.0
#: Longest pause a Retry-After gets (a proxy asking for a day would hold every call).
RETRY_AFTER_MAX = 600.0
#: Shortest: "Retry-After: 0" on every answer must not become a busy loop.
RETRY_AFTER_MIN = 1.0

DELIVERED, RETRY, ZAMMAD_DOWN, FAILED, NOT_ZAMMAD, THROTTLED = (
    "delivered", "retry", "zammad_down", "failed", "not_zammad", "throttled")


@dataclass(frozen=True)
class Outcome:
    kind: str           # one of the constants above
    status: int         # HTTP status, 0 without an answer
    detail: str         # Zammad's words or the network error, one line
    action: dict | None = None  # {"action": "reject", ...} from a newCall answer
    elapsed_ms: float = 0.0
    config_error: bool = False  # 401/422/404: the admin must fix something
    # The answer does not prove that Zammad did not process the request.
    maybe_processed: bool = False
    retry_after: float = 0.0    # throttled: seconds before anything is sent again


def _json_object(body: str) -> dict | None:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: "[[[[…" nested beyond reason
        return None
    return data if isinstance(data, dict) else None


def error_text(body: str, limit: int = 200) -> str:
    """Zammad's error message from a JSON or HTML error body, on one line."""
    body = body or ""
    data = _json_object(body)
    if data and data.get("error"):
        return " ".join(str(data["error"]).split())[:limit]
    for pattern in (r"<h2[^>]*>(.*?)</h2>", r"<h1[^>]*>(.*?)</h1>", r"<title[^>]*>(.*?)</title>"):
        found = re.search(pattern, body, re.S | re.I)
        if found and found.group(1).strip():
            text = re.sub(r"<[^>]+>", " ", found.group(1))
            break
    else:
        text = re.sub(r"<[^>]+>", " ", body)
    return " ".join(html.unescape(text).split())[:limit]


def is_json_type(content_type: str) -> bool:
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def page_title(body: str, limit: int = 80) -> str:
    found = re.search(r"<title[^>]*>(.*?)</title>", (body or "")[:65536], re.S | re.I)
    return " ".join(html.unescape(found.group(1)).split())[:limit] if found else ""


def parse_retry_after(value: str, now: float) -> float | None:
    """Retry-After (delta seconds or an HTTP date) -> seconds from ``now``; None if absent
    or unreadable."""
    value = (value or "").strip()
    if not value:
        return None
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now)


def _shown_target(url: str) -> str:
    """A redirect target fit for a log line: no user:password, no query (a login
    gateway's query can carry anything), a CTI token replaced."""
    parts = urlsplit(url)
    if "/api/v1/cti/" in parts.path:
        return redact_url(url)
    netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return f"{parts.scheme}://{netloc}{parts.path}" + ("?…" if parts.query else "")


def _not_zammads_answer(status: int, content_type: str, body: str, setting: str) -> Outcome:
    """A 2xx that is not Zammad's JSON object, or a 401/403/404 that is not Zammad's JSON
    error: a login page, a proxy's page, a web site."""
    title = page_title(body)
    words = [content_type.split(";")[0].strip() or "no Content-Type"]
    if title:
        words.append(f"page title {title!r}")
    elif body.strip():
        words.append(f"body {' '.join(body[:200].split())[:60]!r}")
    else:
        words.append("empty body")
    # An HTML page on a 200 is someone's page for people (a login form, a holding
    # page, a web site), given instead of passing the request on; a 4xx refuses
    # it. Any other 2xx (Zammad's {} with a wrong Content-Type, a relay's "OK"
    # or 202) may come from something that did pass it on.
    passed_on = 200 <= status < 300 and not (status == 200 and body.lstrip().startswith("<"))
    return Outcome(NOT_ZAMMAD, status,
                   f"{setting} answered HTTP {status} ({', '.join(words)}), not Zammad's CTI "
                   f"answer (a JSON object): a login page, a proxy or a wrong URL is in the "
                   f"way; set {setting} to Zammad's own https://<zammad>/api/v1/cti/<token> "
                   "and let the proxy pass /api/v1/cti/ to Zammad without a login",
                   config_error=True, maybe_processed=passed_on)


def _redirect(status: int, location: str, url: str, setting: str) -> Outcome:
    """Never followed: a POST would arrive as a GET (301/302/303) or not at Zammad."""
    try:
        target = urljoin(url, location.strip()) if location.strip() else ""
        shown = _shown_target(target) if target else ""
    except ValueError:  # "http://[x", a port that is no number: a target nobody can use
        shown = ""
    if not shown:
        return Outcome(NOT_ZAMMAD, status, f"{setting} answered a redirect (HTTP {status}) "
                       f"without a usable target; set {setting} to Zammad's own "
                       "/api/v1/cti/<token> URL", config_error=True)
    if "/api/v1/cti/" in urlsplit(target).path:
        text = f"{setting} redirects to {shown}: set it to that URL (HTTP {status}, not followed)"
    else:
        text = (f"{setting} redirects to {shown}, not to Zammad's CTI endpoint (HTTP {status}, "
                "not followed; a login or SSO gateway?): let /api/v1/cti/ through to Zammad "
                f"without a login, or set {setting} to Zammad's own URL")
    return Outcome(NOT_ZAMMAD, status, text, config_error=True)


def classify(event: str, status: int, body: str, content_type: str = "application/json", *,
             location: str = "", retry_after: float | None = None, url: str = "",
             setting: str = "ZAMMAD_CTI_URL") -> Outcome:
    """HTTP answer -> Outcome (pure). ``retry_after`` in seconds (parse_retry_after);
    ``url`` resolves a relative ``location``; ``setting`` names the variable to fix."""
    body = body or ""
    if 200 <= status < 300:
        data = _json_object(body) if is_json_type(content_type) else None
        # Zammad answers {} or an action; never an error with a 200 (an API gateway does).
        if status == 200 and data is not None and ("error" not in data or "action" in data):
            return Outcome(DELIVERED, status, "", data if data.get("action") else None)
        return _not_zammads_answer(status, content_type, body, setting)
    if 300 <= status < 400:
        return _redirect(status, location, url, setting)
    if status in (429, 503) and retry_after is not None:
        wait = min(RETRY_AFTER_MAX, max(RETRY_AFTER_MIN, retry_after))
        capped = f", capped at {RETRY_AFTER_MAX:.0f} s" if retry_after > RETRY_AFTER_MAX else ""
        return Outcome(THROTTLED, status, f"asked to wait {wait:.0f} s (Retry-After{capped})",
                       retry_after=wait)
    text = error_text(body)
    if status == 500:
        if "already exists" in body and event == "newCall":
            return Outcome(DELIVERED, status, "already stored by an earlier try")
        if "No such call_id" in body:
            return Outcome(FAILED, status, text or "No such call_id")
        # Zammad failed while processing: it may have stored the event first.
        return Outcome(RETRY, status, text or "server error", maybe_processed=True)
    if status in (401, 403, 404, 405, 407) and not (
            is_json_type(content_type) and (_json_object(body) or {}).get("error")):
        return _not_zammads_answer(status, content_type, body, setting)  # a gateway, a web server
    if status in (401, 403, 404, 422):
        return Outcome(FAILED, status, text or f"HTTP {status}", config_error=True)
    if status == 503:  # the proxy (or Zammad) refused it before it was processed
        return Outcome(ZAMMAD_DOWN, status, text or f"HTTP {status}")
    if status in (502, 504):  # the proxy may have passed it on before it failed
        return Outcome(ZAMMAD_DOWN, status, text or f"HTTP {status}", maybe_processed=True)
    if status in (408, 429):
        return Outcome(RETRY, status, text or f"HTTP {status}")
    if status >= 500:
        return Outcome(RETRY, status, text or f"HTTP {status}", maybe_processed=True)
    return Outcome(FAILED, status, text or f"HTTP {status}")


def network_outcome(exc: requests.RequestException) -> Outcome:
    """Connection trouble: was the request possibly received?"""
    text = " ".join(str(exc).split())
    if isinstance(exc, requests.exceptions.SSLError):
        # urllib3 wraps the reason in a long pool description: keep the reason.
        reason = re.search(r"\[SSL: [A-Z_]+\][^'\")]*", text)
        return Outcome(ZAMMAD_DOWN, 0, f"TLS error: {(reason.group(0) if reason else text)[:200]}")
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return Outcome(ZAMMAD_DOWN, 0, "connect timed out")
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return Outcome(ZAMMAD_DOWN, 0, "no answer in time (the request may have been processed)",
                       maybe_processed=True)
    if isinstance(exc, requests.exceptions.ConnectionError):
        reason = repr(getattr(exc.args[0], "reason", exc.args[0])) if exc.args else text
        if any(word in reason for word in ("NewConnectionError", "NameResolution", "refused")):
            if "NameResolution" in reason or "Name or service" in text:
                return Outcome(ZAMMAD_DOWN, 0, "DNS lookup failed for Zammad's host")
            return Outcome(ZAMMAD_DOWN, 0, "connection refused or unreachable")
        return Outcome(ZAMMAD_DOWN, 0, f"connection lost during the request: {text[:160]}",
                       maybe_processed=True)
    # Anything else (a body cut short, a bad chunk) came after the request left.
    return Outcome(ZAMMAD_DOWN, 0, text[:200], maybe_processed=True)


def _decoded(response: requests.Response) -> str:
    """The body as text; not ``.text``, whose charset guessing is slow on big pages."""
    try:
        return response.content.decode(response.encoding or "utf-8", "replace")
    except LookupError:  # a charset Python does not know
        return response.content.decode("utf-8", "replace")


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
                 connect_timeout: float = 5.0, pool_size: int = 8,
                 setting: str = "ZAMMAD_CTI_URL"):
        self.url = url
        self.setting = setting  # the variable the admin fixes: named in our errors
        self.timeout = (min(connect_timeout, timeout), timeout)
        self.session = zammad_session(url, verify, pool_size)
        token = url.rstrip("/").rpartition("/")[2]
        # Zammad (and proxies) echo the path in their errors: no detail carries the token.
        self._redact = Redactor([token])
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
            # Never follow a redirect: requests would resend the POST as a GET.
            response = self.session.post(self.url, data=list(fields), timeout=self.timeout,
                                         allow_redirects=False)
            body = _decoded(response)
        except requests.RequestException as exc:
            outcome = network_outcome(exc)
        else:
            headers = response.headers
            outcome = classify(event, response.status_code, body,
                               headers.get("Content-Type", ""),
                               location=headers.get("Location", ""),
                               retry_after=parse_retry_after(headers.get("Retry-After", ""),
                                                             time.time()),
                               url=self.url, setting=self.setting)
        elapsed = (time.monotonic() - started) * 1000
        return Outcome(outcome.kind, outcome.status, self._redact(outcome.detail),
                       outcome.action, round(elapsed, 1), outcome.config_error,
                       outcome.maybe_processed, outcome.retry_after)

    def close(self) -> None:
        self.session.close()


class DryRunClient:
    """ZAMMAD_CTI_URL unset: log what would be sent, accept everything."""

    redacted_url = "(dry run)"

    def post(self, fields: tuple[tuple[str, str], ...]) -> Outcome:
        return Outcome(DELIVERED, 0, "dry run: not sent")

    def close(self) -> None:
        pass
