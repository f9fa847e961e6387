"""Zammad's REST API (``/api/v1/...``): what the CTI endpoint cannot do.

The CTI endpoint only logs calls. Knowing which agents exist, which customer
Zammad matched for a call and creating a ticket for a voicemail need the REST
API with an access token (``Authorization: Token token=...``). Facts and
their sources: ``shared/reference/zammad-rest-api.md`` (§ numbers below).

``ZammadApi`` owns one ``zammad.ZammadHttp`` (keep-alive connections); each method says what
it finds or makes and raises :class:`ApiError` when Zammad does not give it.
Nothing here retries or waits: that is the caller's (a job's) business, and
:attr:`ApiError.kind` tells it whether trying again can help.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence
from urllib.parse import urlencode, urlsplit, urlunsplit

from fs_zammad.zammad import NotAnswered, ZammadHttp, error_text

#: ApiError kinds: what trying again can do.
DOWN = "down"              # not processed (no connection, 502/503/504): try later
RETRY = "retry"            # a passing fault (500, 408, 429): try later
MAYBE = "maybe_processed"  # no answer after sending: look before creating again
REFUSED = "refused"        # Zammad said no (401/403/404/413/422): fix, don't repeat

#: Zammad's page size limit for searches (§8).
SEARCH_MAX = 200


class ApiError(Exception):
    """Zammad did not do what was asked; ``detail`` is one line, never the token."""

    def __init__(self, kind: str, status: int, detail: str):
        super().__init__(f"HTTP {status}: {detail}" if status else detail)
        self.kind, self.status, self.detail = kind, status, detail


@dataclass(frozen=True)
class Attachment:
    filename: str
    data: bytes
    mime_type: str = "application/octet-stream"


def api_error(status: int, body: str) -> ApiError:
    """An answer that is not the success asked for -> ApiError (pure)."""
    detail = error_text(body) or f"HTTP {status}"
    if status in (502, 503, 504):
        return ApiError(DOWN, status, detail)
    if status in (408, 429) or status >= 500:
        return ApiError(RETRY, status, detail)
    return ApiError(REFUSED, status, detail)


def normalize_number(number: str) -> str:
    """Zammad's ``Cti::CallerId.normalize_number`` (§3): how it compares phone numbers.

    Leading ``00`` dropped, a single leading ``0`` becomes Zammad's hard-coded 49."""
    number = re.sub(r"[\s-]", "", number or "")
    number = re.sub(r"^(00)?(\+?\d\d)\(0?(\d*)\)", r"\1\2\3", number)
    number = re.sub(r"\D", "", number)
    if number.startswith("00"):
        return number[2:]
    if number.startswith("0"):
        return "49" + number[1:]
    return number


def caller_log_customers(entry: dict, direction: str = "in") -> list[int]:
    """The users Zammad matched for the caller of one caller-log entry, best first:
    ``known`` before ``maybe``, as ``Cti::Log#best_customer_id_of_log_entry`` (§3)."""
    side = "from" if direction == "in" else "to"
    matches = ((entry.get("preferences") or {}).get(side)) or []
    ranked = sorted((m for m in matches if isinstance(m, dict) and m.get("user_id")),
                    key=lambda m: m.get("level") != "known")
    ids: list[int] = []
    for match in ranked:
        if match["user_id"] not in ids:
            ids.append(match["user_id"])
    return ids


def _records(data: Any, model: str) -> list[dict]:
    """A search answer as records: an array (Zammad 2025+) or, from older Zammad,
    ``{"tickets": [ids], "assets": {"Ticket": {...}}}`` (§5)."""
    if isinstance(data, list):
        return [r for r in data if isinstance(r, dict)]
    if isinstance(data, dict):
        assets = (data.get("assets") or {}).get(model.capitalize(), {})
        ids = data.get(f"{model}s") or data.get("record_ids") or []
        return [assets[str(i)] for i in ids if str(i) in assets]
    return []


class ZammadApi:
    """One Zammad system's REST API, as the token's user."""

    def __init__(self, base_url: str, token: str, timeout: float = 10.0,
                 verify: bool | str = True, connect_timeout: float = 5.0):
        self.base_url = base_url.rstrip("/")
        self._path = urlsplit(self.base_url).path
        self.http = ZammadHttp(self.base_url, (min(connect_timeout, timeout), timeout), verify,
                               pool_size=2,
                               headers={"Authorization": f"Token token={token}"})  # §1

    @property
    def shown_url(self) -> str:
        """The base URL for people (no user:password)."""
        parts = urlsplit(self.base_url)
        netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, ok: int = 200, params: dict | None = None,
              json_body: Any = None) -> Any:
        target = self._path + path + (f"?{urlencode(params)}" if params else "")
        body, headers = None, None
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers = {"Content-Type": "application/json"}
        try:
            status, text, _ = self.http.request(method, target, body, headers)
        except NotAnswered as failed:
            # The same verdict as for a CTI event: could the request have arrived?
            outcome = failed.outcome
            raise ApiError(MAYBE if outcome.maybe_processed else DOWN, 0, outcome.detail) \
                from None
        if status != ok:
            raise api_error(status, text)
        try:
            return json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: "[[[[…" nested beyond reason
            # a 200 that is not JSON is not Zammad (a login page, a proxy)
            raise ApiError(REFUSED, status, f"not Zammad's JSON: {error_text(text)[:80]}") \
                from None

    # -- who is who ------------------------------------------------------------

    def me(self, expand: bool = False) -> dict:
        """The token's own user: proves URL and token, not any permission (§6);
        ``expand`` adds ``groups`` ({name: [access, ...]})."""
        return self._call("GET", "/api/v1/users/me", params={"expand": "true"} if expand else None)

    def users_matching(self, text: str) -> list[dict]:
        """Users search (needs ``ticket.agent`` or ``admin.user``; 403 otherwise).

        Searches every text field for ``text`` as stored; with Elasticsearch
        Zammad indexes in the background, so a user created a moment ago may
        be missing (§3)."""
        return _records(self._call("GET", "/api/v1/users/search", params={
            "query": text, "limit": SEARCH_MAX}), "user")

    def missing_logins(self, logins: Iterable[str]) -> list[str]:
        """The logins no Zammad user has (the CTI ``user`` field compares them in
        lower case)."""
        missing = []
        for login in dict.fromkeys(logins):
            found = self.users_matching(login)
            if not any(str(u.get("login", "")).lower() == login.lower() for u in found):
                missing.append(login)
        return missing

    # -- the caller as Zammad knows them ----------------------------------------

    def caller_log_entry(self, call_id: str) -> dict | None:
        """The caller-log line of a call (needs ``cti.agent``); None if it is not
        among the newest lines Zammad lists (default 60, §7)."""
        data = self._call("GET", "/api/v1/cti/log")
        entries = data.get("list", []) if isinstance(data, dict) else []
        return next((e for e in entries if isinstance(e, dict) and e.get("call_id") == call_id),
                    None)

    def customer_by_phone(self, number: str) -> dict | None:
        """A user whose phone field holds ``number`` as :meth:`create_customer`
        stores it, found also right after that create.

        For the caller of a call, ask the caller log first
        (:meth:`caller_log_entry`): it matches every phone and mobile by
        Zammad's number rules. This search is for what the caller log cannot
        know yet: a customer created after the call's newCall. It reads the
        database (a ``condition``, §3 and §5), not the background index, and
        checks each hit by Zammad's number rules (an unread condition would
        match every user)."""
        wanted = normalize_number(number)
        if len(wanted) < 6:
            return None
        data = self._call("POST", "/api/v1/users/search", json_body={
            "condition": {"user.phone": {"operator": "contains", "value": wanted}},
            "limit": SEARCH_MAX})
        return next((u for u in _records(data, "user")
                     if normalize_number(str(u.get("phone") or "")) == wanted), None)

    def create_customer(self, number: str) -> dict:
        """A customer with only this phone number (§4), stored as ``+<digits>``;
        Zammad then knows the number as that user's caller id. Phones are not
        unique in Zammad: look first."""
        return self._call("POST", "/api/v1/users", ok=201,
                          json_body={"phone": "+" + normalize_number(number)})

    def customer_for_phone(self, number: str) -> dict:
        """The customer with this phone number, created if Zammad has none."""
        return self.customer_by_phone(number) or self.create_customer(number)

    # -- tickets -----------------------------------------------------------------

    def create_ticket(self, *, title: str, group: str, body: str, customer_id: int | None = None,
                      customer: str = "", attachments: Sequence[Attachment] = (),
                      subject: str = "", internal: bool = False) -> dict:
        """A ticket with one article written by the token's user (sender Agent,
        so neither the auto-reply trigger nor caller-id detection treats the
        text as the customer's, §2); 201 with the ticket, or ApiError.

        The customer is ``customer_id``, else ``customer`` (a login or email,
        §2), else none: Zammad then refuses (422) unless it allows that."""
        article = {
            "subject": subject or title, "body": body, "content_type": "text/plain",
            "type": "note", "sender": "Agent", "internal": internal,
            "preferences": {"send-auto-response": False},
            "attachments": [{"filename": a.filename, "mime-type": a.mime_type,
                             "data": base64.b64encode(a.data).decode("ascii")}
                            for a in attachments],
        }
        ticket: dict[str, Any] = {"title": title, "group": group, "article": article}
        if customer_id is not None:
            ticket["customer_id"] = customer_id
        elif customer:
            ticket["customer"] = customer
        return self._call("POST", "/api/v1/tickets", ok=201, json_body=ticket)

    def ticket_with_marker(self, marker: str) -> dict | None:
        """The ticket whose title holds ``marker``, found right after its creation:
        a ``condition`` search reads the database, a ``query`` search Zammad's
        background index (§5). A condition Zammad cannot read matches every
        ticket, so the hit's title is checked."""
        data = self._call("POST", "/api/v1/tickets/search", json_body={
            "condition": {"ticket.title": {"operator": "contains", "value": marker}},
            "limit": SEARCH_MAX})
        return next((t for t in _records(data, "ticket") if marker in str(t.get("title", ""))),
                    None)


def check_api(apis: dict, logins: Iterable[str]) -> list[tuple[bool | None, str]]:
    """``fs-zammad check``: (passed, what) lines for each system's token, then for
    the mapped agents' logins (one a login no system knows fails)."""
    lines: list[tuple[bool | None, str]] = []
    logins = list(dict.fromkeys(logins))
    unknown: set[str] | None = None
    for name, api in apis.items():
        label = f"Zammad API{f' [{name}]' if name else ''} {api.shown_url}"
        try:
            me = api.me()
        except ApiError as exc:
            hint = {401: "token rejected: create one under Profile > Token Access",
                    403: "token not usable (API token access switched off?)"}
            lines.append((False, f"{label}: {hint.get(exc.status, 'no answer')} ({exc})"))
            continue
        lines.append((True, f"{label}: token accepted (user {me.get('login', '?')})"))
        if not logins:
            continue
        try:
            missing = set(api.missing_logins(logins))
        except ApiError as exc:
            why = ("the token needs ticket.agent or admin.user to look up users"
                   if exc.status == 403 else "users search failed")
            lines.append((False, f"{label}: {why} ({exc})"))
            continue
        unknown = missing if unknown is None else unknown & missing
    if unknown is not None:
        if unknown:
            names = ", ".join(login for login in logins if login in unknown)
            lines.append((False, f"ZAMMAD_AGENTS: {len(unknown)} of {len(logins)} mapped logins "
                                 f"are no Zammad user: {names} (Zammad compares logins in "
                                 "lower case; fix the map or the user)"))
        else:
            lines.append((True, f"ZAMMAD_AGENTS: all {len(logins)} mapped logins are Zammad users"))
    elif logins and apis:
        lines.append((None, "ZAMMAD_AGENTS: not checked (no usable token)"))
    return lines
