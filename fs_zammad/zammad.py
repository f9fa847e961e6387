"""One POST to Zammad's CTI endpoint -> an Outcome.

``ZammadHttp`` owns the keep-alive connections to one Zammad and nothing
else: retry timing and ordering belong to delivery.py. ``classify`` is pure and
holds everything we know about the answers (see
``shared/reference/zammad-cti-api.md`` and the README's table):

* Only Zammad's own answer counts as delivered: a 200 whose body is a JSON
  object with a JSON Content-Type (``{}`` or the reject/dial action).
  Any other 2xx, and every 3xx (never followed: a client that follows would turn
  the POST into a GET), is ``not_zammad``: something else is in the way.
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
import sys
import time
import warnings
from dataclasses import dataclass, replace
from datetime import timezone
from email.utils import parsedate_to_datetime
from urllib.parse import unquote, urlencode, urljoin, urlsplit

import urllib3 as u3
from urllib3 import exceptions as u3x

from fs_zammad import __version__
from fs_zammad.config import proxy_for, redact_url
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


def is_html_page(body: str) -> bool:
    """A page for people: a body that starts as an HTML document (after a BOM, an XML
    declaration and comments). Not every body that starts with "<": a relay's XML
    answer is no page. (A scan, not one regex: comments one after the other would
    make a regex backtrack for ever, on the event loop.)"""
    rest = body[:65536].lstrip("\ufeff \t\r\n")
    if rest.startswith("<?xml"):
        rest = rest[rest.find("?>") + 2:].lstrip() if "?>" in rest else ""
    while rest.startswith("<!--"):
        end = rest.find("-->")
        rest = rest[end + 3:].lstrip() if end >= 0 else ""
    return re.match(r"<(?:!doctype\s+html|html[\s>])", rest, re.I) is not None


def page_title(body: str, limit: int = 80) -> str:
    found = re.search(r"<title[^>]*>(.*?)</title>", (body or "")[:65536], re.S | re.I)
    return " ".join(html.unescape(found.group(1)).split())[:limit] if found else ""


def parse_retry_after(value: str, now: float) -> float | None:
    """Retry-After (delta seconds or an HTTP date) -> seconds from ``now``; None if absent
    or unreadable."""
    value = (value or "").strip()
    if not value:
        return None
    if re.fullmatch(r"\d+(\.\d+)?(\s*,\s*\d+(\.\d+)?)*", value):
        # (the header twice arrives joined by ", ": the longer wait counts)
        return max(float(part) for part in value.split(","))
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
    # it. Any other 2xx (Zammad's {} with a wrong Content-Type, a relay's "OK",
    # its XML, a 202) may come from something that did pass it on.
    passed_on = 200 <= status < 300 and not (status == 200 and is_html_page(body))
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


class NotAnswered(Exception):
    """A request that got no HTTP answer; `outcome` says whether it may have arrived."""

    def __init__(self, outcome: Outcome):
        super().__init__(outcome.detail)
        self.outcome = outcome


def network_outcome(exc: BaseException, before: BaseException | None = None,
                    wrapper: BaseException | None = None) -> Outcome:
    """Connection trouble (urllib3's exceptions; an OSError that escaped them): was the
    request possibly received? Only a failure before it left proves it was not.
    `before` is the exception the caller was already handling when it sent the
    request (if any): the one raised for the request may be chained to it. `wrapper`
    is the ProxyError that carried `exc` out of urllib3, if one did."""
    text = " ".join(str(exc).split())
    if isinstance(exc, u3x.ProxyError):
        # urllib3 says ProxyError whenever its connection no longer counts as connected
        # to the proxy, and closing a connection resets that: a proxy that read the
        # request and then closed or reset the connection ends here too. What happened
        # is the wrapped error, judged like any other (with the ProxyError's traceback).
        inner = network_outcome(exc.original_error, before, wrapper=exc)
        return replace(inner, detail=f"proxy: {inner.detail}")
    connecting = _while_connecting(exc, before) or (
        wrapper is not None and _while_connecting(wrapper, before))
    if isinstance(exc, u3x.SSLError):
        reason = re.search(r"\[SSL: [A-Z_]+\][^'\")]*", text)
        detail = f"TLS error: {(reason.group(0) if reason else text)[:200]}"
        if connecting:  # the handshake or the certificate: nothing was sent
            return Outcome(ZAMMAD_DOWN, 0, detail)
        return Outcome(ZAMMAD_DOWN, 0, f"{detail} (after the request left: it may have been "
                       "processed)", maybe_processed=True)
    if isinstance(exc, u3x.NameResolutionError):
        host = getattr(exc.conn, "host", None) or "Zammad's host"  # (or the proxy's)
        return Outcome(ZAMMAD_DOWN, 0, f"DNS lookup failed for {host}")
    if isinstance(exc, u3x.NewConnectionError):  # (a subclass of ConnectTimeoutError)
        if "timed out" in text:
            return Outcome(ZAMMAD_DOWN, 0, "connect timed out")
        return Outcome(ZAMMAD_DOWN, 0, "connection refused or unreachable")
    if isinstance(exc, u3x.ConnectTimeoutError):
        return Outcome(ZAMMAD_DOWN, 0, "connect timed out")
    if connecting:  # the proxy refused CONNECT; a TLS handshake without an answer in time
        if "Tunnel connection failed" in text:
            return Outcome(ZAMMAD_DOWN, 0, f"proxy refused the tunnel: {text[:160]}")
        return Outcome(ZAMMAD_DOWN, 0, f"connection not set up: {text[:160]}")
    if isinstance(exc, u3x.ReadTimeoutError):
        return Outcome(ZAMMAD_DOWN, 0, "no answer in time (the request may have been processed)",
                       maybe_processed=True)
    # Anything else (a connection reset or closed, a body cut short, a bad chunk)
    # came after the request left.
    return Outcome(ZAMMAD_DOWN, 0, f"connection lost during the request: {text[:160]}",
                   maybe_processed=True)


def _while_connecting(exc: BaseException, before: BaseException | None = None) -> bool:
    """Was this error raised while the connection was being set up (TCP, the proxy's
    tunnel, the TLS handshake, the certificate checks), before a byte of the request
    was written? Its traceback says, or that of an error it was raised for: urllib3
    re-raises with the original traceback, and wraps a timeout in a new error. The
    walk stops at `before`, an error that was being handled before the request."""
    pending: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while pending:
        error = pending.pop()
        if error is None or error is before or id(error) in seen:
            continue
        seen.add(id(error))
        frame = error.__traceback__
        while frame is not None:
            if frame.tb_frame.f_code.co_name in ("connect", "do_handshake"):
                return True
            frame = frame.tb_next
        pending += (error.__cause__, error.__context__)
    return False


def _decoded(body: bytes, content_type: str) -> str:
    """The body as text, in the charset its Content-Type names (UTF-8 otherwise)."""
    found = re.search(r"charset=[\"']?([\w.:-]+)", content_type or "", re.I)
    try:
        return body.decode(found.group(1) if found else "utf-8", "replace")
    except (LookupError, UnicodeError):  # a charset Python does not know or cannot use
        return body.decode("utf-8", "replace")


class ZammadHttp:
    """Keep-alive HTTP/1.1 connections to one Zammad (its CTI endpoint or REST API).

    One urllib3 pool owns connection reuse, TLS and timeouts; there are no
    retries and no redirects here (delivery decides what is sent again, and a
    redirect is an answer to report). Callers say method, path and body. Proxy
    and CA variables of the environment are read once, here. Why not requests:
    its Session spent 2.5x the CPU of this pool per POST, a third of all the
    service's CPU at full speed (bench/README.md, "HTTP without requests")."""

    def __init__(self, url: str, timeout: tuple[float, float], verify: bool | str = True,
                 pool_size: int = 8, headers: dict[str, str] | None = None):
        parts = urlsplit(url)
        netloc = (parts.hostname or "") if ":" not in (parts.hostname or "") \
            else f"[{parts.hostname}]"
        self.origin = f"{parts.scheme}://{netloc}" + (f":{parts.port}" if parts.port else "")
        self.timeout = u3.Timeout(connect=timeout[0], read=timeout[1])
        self.headers = {"Accept": "application/json",  # Zammad answers errors as JSON
                        "User-Agent": f"fs-zammad/{__version__}", **(headers or {})}
        if verify is True:
            verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") \
                or True
        tls = {"cert_reqs": "CERT_REQUIRED" if verify else "CERT_NONE",
               "ca_certs": verify if isinstance(verify, str) else None}
        if not verify and parts.scheme == "https":  # the admin's choice: said once, here
            warnings.simplefilter("ignore", u3x.InsecureRequestWarning)
            log.warning("%s: Zammad's TLS certificate is not verified (ZAMMAD_TLS_VERIFY=false)",
                        self.origin)
        proxy = proxy_for(url, os.environ)
        if proxy:
            auth = u3.util.parse_url(proxy).auth
            self.manager = u3.ProxyManager(
                proxy, num_pools=1, maxsize=pool_size, retries=False,
                proxy_headers=u3.make_headers(proxy_basic_auth=unquote(auth)) if auth else None,
                **tls)
            self._pool = None  # the manager puts each request in the form the proxy needs
        else:
            self.manager = u3.PoolManager(num_pools=1, maxsize=pool_size, retries=False, **tls)
            self._pool = self.manager.connection_from_url(self.origin)
        self._last_used = 0.0

    def request(self, method: str, path: str, body: bytes | str | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, str, dict]:
        """-> (status, body text, headers); raises NotAnswered without an answer."""
        before = sys.exc_info()[1]  # what the caller was handling: not this request's error
        try:
            return self._request(method, path, body, headers)
        except (u3x.HTTPError, OSError) as exc:
            raise NotAnswered(network_outcome(exc, before)) from None

    def _request(self, method: str, path: str, body: bytes | str | None,
                 headers: dict[str, str] | None) -> tuple[int, str, dict]:
        now = time.monotonic()
        if now - self._last_used > KEEPALIVE_IDLE:
            # Zammad's servers close idle keep-alive connections (puma after
            # 20 s); a request racing that close may or may not have been
            # read, which would make a hangup unsure. Start afresh instead.
            self.manager.clear()
            if self._pool is not None:
                self._pool = self.manager.connection_from_url(self.origin)
        self._last_used = now
        send = self._pool.urlopen if self._pool is not None else self.manager.urlopen
        target = path if self._pool is not None else self.origin + path
        response = send(method, target, body=body,
                        headers={**self.headers, **headers} if headers else self.headers,
                        retries=False, redirect=False, timeout=self.timeout,
                        assert_same_host=False)
        content_type = response.headers.get("Content-Type", "")
        return response.status, _decoded(response.data, content_type), response.headers

    def close(self) -> None:
        self.manager.clear()


class ZammadClient:
    """Posts form-encoded CTI events to one Zammad."""

    def __init__(self, url: str, timeout: float = 10.0, verify: bool | str = True,
                 connect_timeout: float = 5.0, pool_size: int = 8,
                 setting: str = "ZAMMAD_CTI_URL"):
        self.url = url
        self.setting = setting  # the variable the admin fixes: named in our errors
        self.http = ZammadHttp(url, (min(connect_timeout, timeout), timeout), verify, pool_size,
                               {"Content-Type": "application/x-www-form-urlencoded"})
        parts = urlsplit(url)
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        token = url.rstrip("/").rpartition("/")[2]
        # Zammad (and proxies) echo the path in their errors: no detail carries the token.
        self._redact = Redactor([token])

    @property
    def redacted_url(self) -> str:
        return redact_url(self.url)

    def post(self, fields: tuple[tuple[str, str], ...]) -> Outcome:
        event = dict(fields).get("event", "")
        started = time.monotonic()
        try:
            status, body, headers = self.http.request("POST", self._path, urlencode(fields))
        except NotAnswered as failed:
            outcome = failed.outcome
        else:
            outcome = classify(event, status, body, headers.get("Content-Type", ""),
                               location=headers.get("Location", ""),
                               retry_after=parse_retry_after(headers.get("Retry-After", ""),
                                                             time.time()),
                               url=self.url, setting=self.setting)
        elapsed = (time.monotonic() - started) * 1000
        return Outcome(outcome.kind, outcome.status, self._redact(outcome.detail),
                       outcome.action, round(elapsed, 1), outcome.config_error,
                       outcome.maybe_processed, outcome.retry_after)

    def close(self) -> None:
        self.http.close()


class DryRunClient:
    """ZAMMAD_CTI_URL unset: log what would be sent, accept everything."""

    redacted_url = "(dry run)"

    def post(self, fields: tuple[tuple[str, str], ...]) -> Outcome:
        return Outcome(DELIVERED, 0, "dry run: not sent")

    def close(self) -> None:
        pass
