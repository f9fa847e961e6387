"""Zammad's REST API for the stand-in (tests/support/zammad_standin.py).

The parts fs_zammad uses, with Zammad's rules as read from its code
(/work/shared/reference/zammad-rest-api.md, § numbers below):

- token auth (``Authorization: Token token=<t>``, also ``Token <t>`` and
  ``Bearer <t>``): none -> 403 "Authentication required", unknown -> 401;
  a permission counts only if both the token and its user hold it (a parent
  such as ``admin`` covers ``admin.user``); otherwise 403 "Token
  authorization failed." / "User authorization failed." (§1);
- ``GET /api/v1/users/me``; ``GET|POST /api/v1/users/search`` (``ticket.agent``
  or ``admin.user``; ``query`` = case-insensitive substring of every text
  field as stored, no number normalisation, user 1 never listed; ``condition``
  read at once); ``POST /api/v1/users`` (201; one identifier needed; phone not
  unique; the new user's phone and mobile become ``known`` caller ids);
- ``GET /api/v1/cti/log`` (``cti.agent``): the newest 60 caller-log lines with
  ``preferences.from``/``to`` = the caller-id matches made at newCall with
  Zammad's number normalisation;
- ``POST /api/v1/tickets`` (201; group by name, customer must exist, article
  body required, attachments need filename/data/mime-type and strict base64;
  a failing article creates no ticket); ``GET|POST /api/v1/tickets/search``.

Search is asynchronous as with Elasticsearch: a ``query`` search sees users
and tickets only once indexed (``index_delay`` seconds after their creation,
or at :meth:`ZammadRest.index_now`); a ``condition`` search sees them at once.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
import uuid

#: (status, body) of an answer; bodies are JSON-serialisable.
Answer = tuple


class RestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def normalize_number(number: str) -> str:
    """``Cti::CallerId.normalize_number`` (written here from the reference, not
    imported from the product, so that a wrong product copy fails the tests)."""
    number = re.sub(r"[\s-]", "", str(number or ""))
    number = re.sub(r"^(00)?(\+?\d\d)\(0?(\d*)\)", r"\1\2\3", number)
    number = re.sub(r"\D", "", number)
    if number[:2] == "00":
        return number[2:]
    return "49" + number[1:] if number[:1] == "0" else number


def extract_numbers(text: str) -> list:
    """``Cti::CallerId.extract_numbers``: runs of 6-26 digits/spaces/dashes/brackets."""
    return [normalize_number(m) for m in re.findall(r"[\d\s\-(|)]{6,26}", str(text or ""))]


def _has(held: set, wanted: str) -> bool:
    parts = wanted.split(".")
    return any(".".join(parts[:i]) in held for i in range(1, len(parts) + 1))


class ZammadRest:
    """Users, tokens, tickets and caller ids of one Zammad system."""

    VIEW_LIMIT = 60

    def __init__(self):
        self.users: dict = {}      # id -> user record
        self.tokens: dict = {}     # token -> (user id, set of permissions)
        self.groups: dict = {"Users": 1}  # name -> id
        self.tickets: dict = {}    # id -> ticket record (with "articles")
        self.caller_ids: list = []  # (caller_id, level, user_id)
        self.index_delay = 0.0
        self._indexed_at: dict = {}  # ("user"|"ticket", id) -> monotonic time it is searchable
        self._next_user = 1
        self.add_user(login="-", firstname="-")  # Zammad's user 1, never in searches

    # ---------------------------------------------------------------- set up
    def add_user(self, login: str = "", roles=("Customer",), permissions=(), groups=None,
                 **fields) -> dict:
        """A user as an admin would create it; ``permissions`` are the role's."""
        uid = self._next_user
        self._next_user += 1
        user = {"id": uid, "login": (login or fields.get("email") or f"auto-{uuid.uuid4()}").lower(),
                "firstname": "", "lastname": "", "email": "", "phone": "", "mobile": "",
                "active": True, "roles": list(roles), "created_at": time.time(), **fields}
        user["permissions"] = set(permissions) or (
            {"ticket.customer"} if "Customer" in roles else set())
        user["group_access"] = dict(groups or {})  # group name -> "full" | "create" | ...
        self.users[uid] = user
        self._index("user", uid)
        for column in ("phone", "mobile"):   # after_commit :update_caller_id (§3)
            for number in extract_numbers(user.get(column, "")):
                self.caller_ids.append((number, "known", uid))
        return user

    def add_agent(self, login: str, token: str | None = None, token_permissions=None,
                  groups=None, **fields) -> dict:
        """An agent (``ticket.agent``, ``cti.agent``), optionally with an access token."""
        user = self.add_user(login, roles=("Agent",), permissions={"ticket.agent", "cti.agent"},
                             groups=groups if groups is not None else {"Users": "full"}, **fields)
        if token:
            self.tokens[token] = (user["id"], set(token_permissions if token_permissions
                                                   is not None else user["permissions"]))
        return user

    def index_now(self) -> None:
        """The search index caught up with every record."""
        for key in self._indexed_at:
            self._indexed_at[key] = 0.0

    def _index(self, kind: str, rid: int) -> None:
        self._indexed_at[(kind, rid)] = time.monotonic() + self.index_delay

    def _indexed(self, kind: str, rid: int) -> bool:
        return time.monotonic() >= self._indexed_at.get((kind, rid), 0.0)

    # ---------------------------------------------------------- CTI side
    def caller_matches(self, number: str) -> list:
        """``Cti::CallerId.lookup(extract_numbers(number))``: known, then maybe, max 20."""
        wanted = set(extract_numbers(number))
        found = []
        for level in ("known", "maybe"):
            for caller_id, lvl, uid in self.caller_ids:
                if lvl == level and caller_id in wanted and len(found) < 20:
                    found.append({"caller_id": caller_id, "level": level, "object": "User",
                                  "o_id": uid, "user_id": uid})
        return found

    def matches_comment(self, matches: list) -> str | None:
        """``Cti::CallerId.get_comment_preferences``' comment: the known users' names
        joined, else "maybe " and the others'; None without a match."""
        names = {level: [] for level in ("known", "maybe")}
        for match in matches:
            user = self.users[match["user_id"]]
            name = " ".join(filter(None, (user["firstname"], user["lastname"]))) or \
                user.get("phone") or user["login"]
            if name not in names[match["level"]]:
                names[match["level"]].append(name)
        if names["known"]:
            return ", ".join(names["known"])
        return "maybe " + ", ".join(names["maybe"]) if names["maybe"] else None

    def screen_pop_agent(self, answering_number, user) -> str | None:
        """``Cti::Driver::Base``: which agent gets the screen pop on an inbound answer:
        a known caller id equal to answeringNumber (6-26 digits only), a user
        whose phone is exactly answeringNumber, then login = user (downcased)."""
        if answering_number:
            for number in extract_numbers(answering_number):
                for caller_id, level, uid in self.caller_ids:
                    if level == "known" and caller_id == number:
                        return self.users[uid]["login"]
            for u in self.users.values():
                if u.get("phone") == answering_number:
                    return u["login"]
        if user:
            for u in self.users.values():
                if u["login"] == str(user).lower():
                    return u["login"]
        return None

    # ---------------------------------------------------------- requests
    def process(self, method: str, path: str, params: dict, headers: dict,
                cti_calls: dict) -> Answer:
        """One request: ``params`` are the query's and the JSON body's fields,
        ``headers`` with lower-case names; ``cti_calls`` the CTI caller log."""
        try:
            return self._route(method, path.rstrip("/"), params, headers, cti_calls)
        except RestError as exc:
            return exc.status, {"error": exc.message, "error_human": exc.message}

    def _route(self, method, path, params, headers, cti_calls) -> Answer:
        routes = {
            ("GET", "/api/v1/users/me"): (None, self._me),
            ("GET", "/api/v1/users/search"): (("ticket.agent", "admin.user"), self._users_search),
            ("POST", "/api/v1/users/search"): (("ticket.agent", "admin.user"), self._users_search),
            ("POST", "/api/v1/users"): (("ticket.agent", "admin.user"), self._users_create),
            ("GET", "/api/v1/cti/log"): (("cti.agent",), self._cti_log),
            ("POST", "/api/v1/tickets"): (("ticket.agent", "ticket.customer"), self._tickets_create),
            ("GET", "/api/v1/tickets/search"): ((), self._tickets_search),
            ("POST", "/api/v1/tickets/search"): ((), self._tickets_search),
        }
        if (method, path) not in routes:
            raise RestError(404, f"No route matches [{method}] {path!r}")
        needed, handler = routes[(method, path)]
        me, token_permissions = self._authenticate(headers)

        def can(permission: str) -> bool:
            """Token::Permissions: the token and its user must both hold it."""
            return _has(token_permissions, permission) and _has(me["permissions"], permission)

        if needed and not any(can(p) for p in needed):
            if not any(_has(token_permissions, p) for p in needed):
                raise RestError(403, "Token authorization failed.")
            raise RestError(403, "User authorization failed.")
        return handler(me, can, params, cti_calls)

    def _authenticate(self, headers: dict):
        auth = headers.get("authorization") or ""
        found = re.match(r"^(?:Token|Bearer)\s+(?:token=)?\"?([^\s\"]+)\"?\s*$", auth)
        if not found:
            raise RestError(403, "Authentication required")
        entry = self.tokens.get(found.group(1))
        if entry is None:
            raise RestError(401, "Can't find User for Token")
        user = self.users[entry[0]]
        if not user["active"]:
            raise RestError(401, "Login failed. Have you double-checked your credentials and "
                                 "completed the email verification step?")
        return user, entry[1]

    @staticmethod
    def _public(user: dict) -> dict:
        return {k: v for k, v in user.items()
                if k not in ("permissions", "group_access", "password")}

    def _me(self, me, can, params, cti_calls) -> Answer:
        user = self._public(me)
        if str(params.get("expand", "")).lower() == "true":  # §6: names, and the group access
            user["groups"] = {name: [access] for name, access in me["group_access"].items()}
        return 200, user

    def _page(self, params) -> int:
        try:
            return max(1, min(int(params.get("limit") or params.get("per_page") or 50), 200))
        except ValueError:
            raise RestError(422, "limit must be a number") from None

    def _users_search(self, me, can, params, cti_calls) -> Answer:
        limit = self._page(params)
        text = str(params.get("query") or params.get("term") or "").replace("*", "").lower()
        condition = params.get("condition")
        hits = []
        for uid, user in self.users.items():
            if uid == 1:
                continue
            if text:
                if not self._indexed("user", uid):
                    continue  # Elasticsearch has not indexed it yet
                if not any(text in str(v).lower() for k, v in user.items()
                           if isinstance(v, str)):
                    continue
            elif isinstance(condition, dict):
                if not _condition_holds(condition, "user", user):
                    continue
            hits.append(self._public(user))
        return 200, hits[:limit]

    def _users_create(self, me, can, params, cti_calls) -> Answer:
        fields = {k: params.get(k) or "" for k in ("firstname", "lastname", "email", "phone",
                                                   "mobile", "login", "note")}
        if not any(fields[k] for k in ("email", "firstname", "lastname", "phone", "mobile")):
            raise RestError(422, "At least one identifier (firstname, lastname, phone, mobile "
                                 "or email) for user is required.")
        email = fields["email"].lower()
        if email and any(u["email"].lower() == email for u in self.users.values()):
            raise RestError(422, f"Email address '{email}' is already used for another user.")
        login = fields.pop("login")
        user = self.add_user(login=login, roles=("Customer",), **fields)
        return 201, self._public(user)

    def _cti_log(self, me, can, params, cti_calls) -> Answer:
        entries = []
        for number, (call_id, rec) in enumerate(cti_calls.items(), start=1):
            entries.append({
                "id": number, "call_id": call_id, "direction": rec["direction"],
                "state": rec["state"], "from": rec["from"], "to": rec["to"],
                "queue": rec["queue"], "comment": rec["comment"], "done": rec["done"],
                "from_comment": rec["from_comment"], "to_comment": rec["to_comment"],
                "preferences": rec.get("preferences", {}),
            })
        newest = list(reversed(entries))[:self.VIEW_LIMIT]
        return 200, {"list": newest, "assets": {}, "backends": []}

    def _tickets_create(self, me, can, params, cti_calls) -> Answer:
        group_id = params.get("group_id")
        if group_id is None and params.get("group") is not None:
            group_id = self.groups.get(params["group"])
            if group_id is None:
                raise RestError(422, f"No lookup value found for 'group': "
                                     f"{json.dumps(params['group'])}")
        if group_id is None:
            raise RestError(422, "The required value 'group_id' is missing.")
        group = next((n for n, i in self.groups.items() if i == group_id), None)
        agent = can("ticket.agent")
        if agent and me["group_access"].get(group) not in ("full", "create"):
            raise RestError(403, "Not authorized")
        customer_id = params.get("customer_id") if agent else me["id"]
        if customer_id is None and isinstance(params.get("customer"), str):
            wanted = params["customer"].lower()   # by login, then email (§2)
            found = next((u for u in self.users.values() if u["login"] == wanted), None) or \
                next((u for u in self.users.values() if u["email"].lower() == wanted), None)
            if found is None:
                raise RestError(422, f"No lookup value found for 'customer': "
                                     f"{json.dumps(params['customer'])}")
            customer_id = found["id"]
        if customer_id is None:
            raise RestError(422, "Missing required value for field 'customer_id'!")
        if customer_id not in self.users:
            raise RestError(422, "Error ID x1y2z3: Please contact your administrator.")
        article = params.get("article")
        if not isinstance(article, dict):
            raise RestError(422, "article hash is missing")
        if not article.get("body"):
            raise RestError(422, "Need at least an 'article body' field.")
        if len(article["body"]) > 1_500_000:
            raise RestError(422, f"body of article is too large, {len(article['body'])} chars "
                                 "- only 1500000 allowed")
        files = []
        for index, item in enumerate(article.get("attachments") or []):
            for key in ("filename", "data", "mime-type"):
                if not item.get(key):
                    raise RestError(422, f"Attachment needs '{key}' param for attachment with "
                                         f"index '{index}'")
            try:
                data = base64.b64decode(str(item["data"]).replace("\r", "").replace("\n", ""),
                                        validate=True)
            except (binascii.Error, ValueError):
                raise RestError(422, f"Invalid base64 for attachment with index '{index}'") \
                    from None
            files.append({"filename": item["filename"], "mime-type": item["mime-type"],
                          "data": data})
        tid = len(self.tickets) + 1
        ticket = {"id": tid, "number": str(31000 + tid), "title": params.get("title", ""),
                  "group_id": group_id, "customer_id": customer_id, "state_id": 1,
                  "created_by_id": me["id"], "article_ids": [tid]}
        self.tickets[tid] = {**ticket, "article": {**article, "attachments": files}}
        self._index("ticket", tid)
        return 201, ticket

    def _tickets_search(self, me, can, params, cti_calls) -> Answer:
        if not (can("ticket.agent") or can("ticket.customer")):
            raise RestError(403, "Token authorization failed.")
        limit = self._page(params)
        text = str(params.get("query") or "").replace("*", "").lower()
        condition = params.get("condition")
        hits = []
        for tid, ticket in self.tickets.items():
            if text:
                if not self._indexed("ticket", tid) or text not in (
                        ticket["title"] + ticket["number"] + ticket["article"]["body"]).lower():
                    continue
            elif isinstance(condition, dict):
                if not _condition_holds(condition, "ticket", {
                        **ticket, "article.body": ticket["article"]["body"]}):
                    continue
            hits.append({k: v for k, v in ticket.items() if k != "article"})
        return 200, hits[:limit]


def _condition_holds(condition: dict, model: str, record: dict) -> bool:
    """Selector conditions: ``{"<model>.<field>": {"operator": ..., "value": ...}}``.
    A condition Zammad cannot read is dropped: it then matches everything (§5)."""
    for key, rule in condition.items():
        if not isinstance(rule, dict):
            continue
        field = key.split(".", 1)[1] if key.startswith(f"{model}.") else key
        value, wanted = str(record.get(field, "")).lower(), str(rule.get("value", "")).lower()
        operator = rule.get("operator")
        if operator == "is" and value != wanted:
            return False
        if operator == "contains" and wanted not in value:
            return False
    return True
