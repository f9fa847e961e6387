"""Environment -> frozen Settings, validated once at start.

Every variable the service reads is declared in ``VARIABLES`` (name, default,
meaning): ``--help``, the README table and ``conf/fs-zammad.env`` are checked
against it by the tests. A bad value raises ConfigError naming the variable;
the CLI turns that into one line and exit code 2. Secrets never appear in
``repr()`` or error messages.
"""

from __future__ import annotations

import dataclasses
import os
import re
import urllib.request
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit, urlunsplit

from fs_zammad.causes import parse_cause_map


class ConfigError(ValueError):
    """A setting is missing or wrong; the message names the variable."""


#: (name, default, meaning): the single list of what can be configured.
VARIABLES: tuple[tuple[str, str, str], ...] = (
    ("FREESWITCH_HOST", "127.0.0.1", "FreeSWITCH event socket host"),
    ("FREESWITCH_PORT", "8021", "FreeSWITCH event socket port"),
    ("FREESWITCH_PASSWORD", "ClueCon", "event socket password (or FREESWITCH_PASSWORD_FILE)"),
    ("FREESWITCH_PASSWORD_FILE", "", "file holding the event socket password"),
    ("FREESWITCH_TIMEOUT", "5", "seconds for connecting, authenticating and each ESL command"),
    ("FREESWITCH_LIVENESS", "60", "seconds without any event (HEARTBEAT every 20 s) before the "
                                  "connection is declared dead and rebuilt"),
    ("FREESWITCH_RECONNECT_MAX", "30", "longest wait between reconnect attempts, seconds"),
    ("ZAMMAD_CTI_URL", "", "https://zammad.example.com/api/v1/cti/<token>; unset = dry run "
                           "(log what would be sent)"),
    ("ZAMMAD_CTI_URL_FILE", "", "file holding ZAMMAD_CTI_URL (keeps the token out of the env)"),
    ("ZAMMAD_INSTANCES", "", "names of further Zammad systems (tenants), e.g. acme,globex; each "
                             "needs ZAMMAD_CTI_URL_<NAME> (or ZAMMAD_CTI_URL_<NAME>_FILE) and "
                             "may have ZAMMAD_API_TOKEN_<NAME>(_FILE), ZAMMAD_API_URL_<NAME>"),
    ("ZAMMAD_ROUTES", "", "which calls go to which instance: did:<glob>=<name>, "
                          "domain:<glob>=<name>, comma-separated, first match wins; the channel "
                          "variable zammad_instance overrides; unmatched calls go to "
                          "ZAMMAD_CTI_URL (if unset: not sent)"),
    ("ZAMMAD_API_URL", "", "Zammad's base URL for its REST API, e.g. https://zammad.example.com; "
                           "default: taken from ZAMMAD_CTI_URL"),
    ("ZAMMAD_API_TOKEN", "", "Zammad access token (Profile > Token Access) for the REST API, "
                             "or ZAMMAD_API_TOKEN_FILE; unset = no REST calls"),
    ("ZAMMAD_API_TOKEN_FILE", "", "file holding ZAMMAD_API_TOKEN"),
    ("VOICEMAIL_TICKETS", "false", "a message left in a mailbox becomes a Zammad ticket with the "
                                   "recording (true/false; needs ZAMMAD_API_TOKEN and "
                                   "VOICEMAIL_GROUP); per tenant VOICEMAIL_TICKETS_<NAME>"),
    ("VOICEMAIL_GROUP", "", "name of the Zammad group the voicemail tickets go to; per tenant "
                            "VOICEMAIL_GROUP_<NAME>"),
    ("VOICEMAIL_CUSTOMER", "", "login or email of the Zammad customer for messages from "
                               "anonymous callers; unset = none (Zammad refuses such a ticket: "
                               "set aside); per tenant VOICEMAIL_CUSTOMER_<NAME>"),
    ("VOICEMAIL_PATH_MAP", "", "where FreeSWITCH's voicemail files are for fs-zammad, e.g. "
                               "/var/lib/freeswitch/storage=/voicemail (comma-separated, "
                               "longest match wins); unset = the same paths"),
    ("ZAMMAD_TIMEOUT", "10", "seconds to wait for Zammad's answer to one request"),
    ("ZAMMAD_CA_BUNDLE", "", "CA bundle file for Zammad's TLS certificate (default: system CAs)"),
    ("ZAMMAD_TLS_VERIFY", "true", "verify Zammad's TLS certificate (true/false)"),
    ("ZAMMAD_CONCURRENCY", "8", "requests in flight to Zammad at once (one per call)"),
    ("ZAMMAD_RETRY_MAX", "15", "longest pause between probes while Zammad is down, seconds"),
    ("ZAMMAD_CAUSE_MAP", "", "cause overrides, e.g. CALL_REJECTED=busy,NO_ANSWER=cancel"),
    ("ZAMMAD_AGENTS", "", "extension -> Zammad login of the agent, e.g. "
                          "1001=emma@example.com,1002=max@example.com (or 1001@<domain>=...); "
                          "the directory variable zammad_user wins"),
    ("ZAMMAD_AGENTS_FILE", "", "file of more such mappings, one per line or comma-separated "
                               "(# starts a comment)"),
    ("EXTERNAL_CONTEXTS", "public", "dialplan contexts whose calls come from outside (direction in)"),
    ("EXTERNAL_PROFILES", "external", "sofia profiles that lead outside: a leg created on one "
                                      "(or through any gateway) makes a local user's call 'out'"),
    ("COUNTRY_CODE", "", "country code for national numbers (e.g. 43); empty = leave as is"),
    ("NATIONAL_PREFIX", "0", "trunk prefix of national numbers, replaced by COUNTRY_CODE"),
    ("QUEUE_DOMAIN", "strip", "queue names (mod_callcenter, mod_fifo): strip (support) or keep (support@default)"),
    ("REJECT_BLOCKED", "false", "hang up callers Zammad's block list rejects (true/false)"),
    ("REJECT_CAUSE", "USER_BUSY", "hangup cause used for rejected callers"),
    ("STATE_DIR", "/var/lib/fs-zammad", "directory of the outbox database; unset: "
                                        "/var/lib/fs-zammad if that directory exists and is "
                                        "writable, else $XDG_STATE_HOME/fs-zammad (default "
                                        "~/.local/state/fs-zammad); set but not writable: the "
                                        "service does not start"),
    ("OUTBOX_MAX_EVENTS", "200000", "outbox size cap; new events beyond it are refused and counted"),
    ("MAX_CALL_SECONDS", "14400", "a call with no hangup after this long is ended (cause from "
                                  "what is known)"),
    ("SHUTDOWN_TIMEOUT", "10", "seconds to finish in-flight requests on SIGTERM"),
    ("METRICS_PORT", "", "port for /healthz and /metrics; empty = off"),
    ("METRICS_ADDRESS", "127.0.0.1", "address the metrics port binds to"),
    ("LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR"),
    ("LOG_FORMAT", "text", "text (one readable line per event) or json (one object per line)"),
)

#: (name, default, meaning) of the standard variables fs-zammad also reads: the
#: proxy and CA ones as Python's urllib and requests read them, XDG's, systemd's.
STANDARD_VARIABLES: tuple[tuple[str, str, str], ...] = (
    ("HTTPS_PROXY", "", "proxy for https:// Zammad URLs (https_proxy first; an empty "
                        "https_proxy= turns it off; ALL_PROXY is not read)"),
    ("HTTP_PROXY", "", "proxy for http:// Zammad URLs (http_proxy first)"),
    ("NO_PROXY", "", "hosts reached without the proxy, comma-separated (no_proxy first)"),
    ("REQUESTS_CA_BUNDLE", "", "CA bundle for Zammad's TLS certificate when ZAMMAD_CA_BUNDLE "
                               "is unset"),
    ("CURL_CA_BUNDLE", "", "the same, when REQUESTS_CA_BUNDLE is unset too"),
    ("XDG_STATE_HOME", "", "where STATE_DIR goes when unset and /var/lib/fs-zammad is not "
                           "writable (default ~/.local/state)"),
    ("NOTIFY_SOCKET", "", "set by systemd (Type=notify): readiness and watchdog pings"),
    ("WATCHDOG_USEC", "", "set by systemd (WatchdogSec=)"),
    ("WATCHDOG_PID", "", "set by systemd (WatchdogSec=)"),
)

DEFAULTS = {name: default for name, default, _ in VARIABLES}


def redact_url(url: str) -> str:
    """The CTI URL with its token replaced, safe for logs."""
    if not url:
        return ""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # "http://[::1", a port that is no number: no host worth showing
        return "(an unreadable URL)"
    head, _, _token = parts.path.rstrip("/").rpartition("/")
    netloc = parts.hostname or ""
    if port:
        netloc += f":{port}"
    return urlunsplit((parts.scheme, netloc, f"{head}/***", "", ""))


def _connectable(url: str) -> bool:
    """An http(s) URL with a host, and a port, if given, that is one."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # "http://[::1", a port that is no number or beyond 65535
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and port != 0


def _usable_http(url: str) -> bool:
    """A Zammad URL one can connect to: no space or stray character in its host part."""
    return _connectable(url) and not re.search(r"[\s<>\"{}|\\^`]", urlsplit(url).netloc)


def proxy_for(url: str, env: Mapping[str, str]) -> str:
    """The proxy the environment names for this Zammad URL ("" for none or NO_PROXY),
    read as Python's urllib reads it: the lowercase variable first (set but empty: no
    proxy), and a bare host:port means http://; ALL_PROXY is not read. ConfigError
    for one fs-zammad cannot use (socks, garbage)."""
    parts = urlsplit(url)
    names = (f"{parts.scheme}_proxy", f"{parts.scheme.upper()}_PROXY")
    name = next((name for name in names if name in env), None)
    if name is None or not env[name].strip():  # an empty https_proxy= turns it off
        return ""
    no_proxy = env.get("no_proxy") or env.get("NO_PROXY") or ""
    if no_proxy and urllib.request.proxy_bypass_environment(parts.hostname or "",
                                                            {"no": no_proxy}):
        return ""
    raw = env[name].strip()
    proxy = raw if "://" in raw else f"http://{raw}"
    if not _connectable(proxy):
        scheme, found, rest = raw.partition("://")  # the first "://": a password may hold one
        if not (found and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme)):
            scheme, rest = "", raw  # "u:pw://x@h": no scheme, all of it may be user:password
        shown = (f"{scheme}://" if scheme else "") + rest.rpartition("@")[2]
        raise ConfigError(f"{name}={shown!r} is not a proxy fs-zammad can use for "
                          f"{redact_url(url)}: set an http:// or https:// proxy like "
                          f"http://proxy.example:3128, or add {parts.hostname} to NO_PROXY")
    return proxy


@dataclasses.dataclass(frozen=True)
class Settings:
    freeswitch_host: str
    freeswitch_port: int
    freeswitch_password: str = dataclasses.field(repr=False)
    freeswitch_timeout: float
    freeswitch_liveness: float
    freeswitch_reconnect_max: float
    zammad_url: str = dataclasses.field(repr=False)
    instances: Mapping[str, str] = dataclasses.field(repr=False)  # name -> CTI URL; "" = default
    # name -> (REST base URL, token), for the instances given a ZAMMAD_API_TOKEN
    api: Mapping[str, tuple[str, str]] = dataclasses.field(repr=False)
    # name -> (group, fallback customer), for the instances with VOICEMAIL_TICKETS on
    voicemail: Mapping[str, tuple[str, str]]
    voicemail_path_map: tuple[tuple[str, str], ...]  # (FreeSWITCH's prefix, ours), longest first
    routes: tuple[tuple[str, str, str], ...]  # (did|domain, glob, instance name)
    zammad_timeout: float
    zammad_verify: bool | str
    zammad_concurrency: int
    zammad_retry_max: float
    cause_overrides: Mapping[str, str]
    agents: Mapping[str, str]  # extension (or extension@domain) -> Zammad login
    external_contexts: frozenset[str]
    external_profiles: frozenset[str]
    country_code: str
    national_prefix: str
    queue_keep_domain: bool
    reject_blocked: bool
    reject_cause: str
    state_dir: Path
    outbox_max_events: int
    max_call_seconds: float
    shutdown_timeout: float
    metrics_port: int | None
    metrics_address: str
    log_level: str
    log_format: str

    @property
    def dry_run(self) -> bool:
        return not self.instances

    @property
    def secrets(self) -> tuple[str, ...]:
        """Strings that must never be logged (the log filter masks them)."""
        tokens = [url.rstrip("/").rpartition("/")[2] for url in self.instances.values()]
        tokens += [token for _url, token in self.api.values()]
        return tuple(s for s in (self.freeswitch_password, *tokens) if len(s) >= 3)


def _read_secret(env: Mapping[str, str], name: str) -> str:
    """``name``, or the content of the file ``name_FILE`` names (which wins)."""
    path = env.get(f"{name}_FILE", "").strip()
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise ConfigError(f"{name}_FILE: cannot read {path}: {why}") from None
    return env.get(name, DEFAULTS.get(name, "")).strip()


def _number(env, name, kind=float, low=0.0, high=None):
    raw = env.get(name, DEFAULTS[name]).strip()
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a {'whole ' if kind is int else ''}number") from None
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"{name}={raw!r} must be {bounds}")
    return value


def _bool(env, name) -> bool:
    raw = env.get(name, DEFAULTS.get(name, "")).strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} must be true or false")


def _choice(env, name, choices) -> str:
    raw = env.get(name, DEFAULTS[name]).strip()
    if raw.lower() in choices:
        return raw.lower()
    if raw.upper() in choices:
        return raw.upper()
    raise ConfigError(f"{name}={raw!r} must be one of {', '.join(choices)}")


def _words(env, name) -> frozenset[str]:
    return frozenset(w.strip() for w in env.get(name, DEFAULTS[name]).split(",") if w.strip())


def _zammad_url(env, name: str = "ZAMMAD_CTI_URL") -> str:
    url = _read_secret(env, name)
    if not url:
        return ""
    if not _usable_http(url):
        raise ConfigError(f"{name}={redact_url(url) or '***'!s} must be an http(s) URL like "
                          "https://zammad.example.com/api/v1/cti/<token>")
    parts = urlsplit(url)
    if "/api/v1/cti/" not in parts.path or not parts.path.rstrip("/").rpartition("/")[2]:
        raise ConfigError(f"{name}={redact_url(url)} must end in /api/v1/cti/<token> "
                          "(copy it from Zammad: Admin > Integrations > CTI (generic))")
    return url


def url_variable(instance: str) -> str:
    """The variable that holds an instance's CTI URL ("" = the default one)."""
    return "ZAMMAD_CTI_URL" + _suffix(instance)


def _instances(env, default_url: str) -> dict[str, str]:
    instances = {"": default_url} if default_url else {}
    for name in _words(env, "ZAMMAD_INSTANCES"):
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"ZAMMAD_INSTANCES: {name!r} must be letters, digits, - or _")
        var = url_variable(name)
        url = _zammad_url(env, var)
        if not url:
            raise ConfigError(f"ZAMMAD_INSTANCES names {name!r} but {var} is not set")
        instances[name] = url
    return instances


def _http_url(env, name: str) -> str:
    url = env.get(name, "").strip().rstrip("/")
    parts = urlsplit(url) if url and _usable_http(url) else None
    if url and (parts is None or parts.username or parts.query):
        raise ConfigError(f"{name} must be an http(s) URL like https://zammad.example.com")
    return url


def _api(env, instances: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """Instances with a REST token -> (base URL, token); the URL defaults to the
    part of the CTI URL before /api/v1/cti/."""
    api = {}
    for name in ["", *(n for n in instances if n)]:
        suffix = _suffix(name)
        token_var, url_var = "ZAMMAD_API_TOKEN" + suffix, "ZAMMAD_API_URL" + suffix
        token = _read_secret(env, token_var)
        url = _http_url(env, url_var)
        path = env.get(f"{token_var}_FILE", "").strip()
        if path and not token:
            raise ConfigError(f"{token_var}_FILE: {path} is empty")
        if not token:
            continue
        if not token.isascii() or not token.isprintable() or " " in token:
            raise ConfigError(f"{token_var}: not a Zammad token (letters, digits and "
                              "punctuation, no spaces)")
        cti = instances.get(name, "")
        if not url and cti:
            url = cti[:cti.find("/api/v1/cti/")]
        if not url:
            raise ConfigError(f"{token_var} is set but neither {url_var} nor the CTI URL "
                              "says where Zammad is")
        api[name] = (url, token)
    return api


def _suffix(instance: str) -> str:
    return "_" + instance.upper().replace("-", "_") if instance else ""


def _tenant_value(env, var: str, suffix: str) -> tuple[str, str]:
    """(value, the variable it came from): a tenant's own ``<var>_<NAME>`` wins."""
    own = env.get(var + suffix, "").strip()
    if own or not suffix:
        return own or DEFAULTS[var], var + suffix
    return env.get(var, DEFAULTS[var]).strip(), var


def _voicemail(env, instances: Mapping[str, str], api: Mapping) -> dict[str, tuple[str, str]]:
    """Instances with VOICEMAIL_TICKETS on -> (group, fallback customer)."""
    if not instances and _bool(env, "VOICEMAIL_TICKETS"):
        raise ConfigError("VOICEMAIL_TICKETS=true but ZAMMAD_CTI_URL is not set: which Zammad "
                          "should get the tickets?")
    voicemail = {}
    for name in instances:
        suffix = _suffix(name)
        raw, tickets_var = _tenant_value(env, "VOICEMAIL_TICKETS", suffix)
        if not _bool({tickets_var: raw or "false"}, tickets_var):
            continue
        if name not in api:
            raise ConfigError(f"{tickets_var}=true needs ZAMMAD_API_TOKEN{suffix} (a token with "
                              "ticket.agent and cti.agent)")
        group, group_var = _tenant_value(env, "VOICEMAIL_GROUP", suffix)
        if not group:
            raise ConfigError(f"{tickets_var}=true needs {group_var} (the Zammad group the "
                              "tickets go to)")
        voicemail[name] = (group, _tenant_value(env, "VOICEMAIL_CUSTOMER", suffix)[0])
    return voicemail


def _path_map(env) -> tuple[tuple[str, str], ...]:
    pairs = []
    for entry in env.get("VOICEMAIL_PATH_MAP", "").split(","):
        entry = entry.strip()
        if not entry:
            continue
        source, sep, target = (part.strip() for part in entry.partition("="))
        if not sep or not source.startswith("/") or not target.startswith("/"):
            raise ConfigError(f"VOICEMAIL_PATH_MAP: {entry!r} is not <FreeSWITCH's path>="
                              "<path here>, e.g. /var/lib/freeswitch/storage=/voicemail")
        pairs.append((source.rstrip("/") or "/", target.rstrip("/") or "/"))
    return tuple(sorted(pairs, key=lambda pair: -len(pair[0])))


def _routes(env, instances) -> tuple[tuple[str, str, str], ...]:
    routes = []
    for rule in env.get("ZAMMAD_ROUTES", "").split(","):
        rule = rule.strip()
        if not rule:
            continue
        match, sep, name = rule.rpartition("=")
        kind, colon, pattern = match.partition(":")
        if not sep or not colon or kind not in ("did", "domain") or not pattern:
            raise ConfigError(f"ZAMMAD_ROUTES: {rule!r} is not did:<glob>=<instance> or "
                              "domain:<glob>=<instance>")
        if name not in instances:
            raise ConfigError(f"ZAMMAD_ROUTES: {rule!r} names {name!r}, which is not in "
                              "ZAMMAD_INSTANCES")
        routes.append((kind, pattern, name))
    return tuple(routes)


def parse_agents(text: str, known: Mapping[str, str] | None = None) -> dict[str, str]:
    """``1001=emma@example.com,1002=max@example.com`` (commas or lines; ``#``
    comments) -> {extension: login}. Raises ValueError naming the bad entry."""
    agents: dict[str, str] = {}
    for line in text.splitlines():
        for entry in line.split("#", 1)[0].split(","):
            entry = entry.strip()
            if not entry:
                continue
            extension, sep, login = (part.strip() for part in entry.partition("="))
            if not sep or not extension or not login or any(c.isspace() for c in extension + login):
                raise ValueError(f"{entry!r} is not <extension>=<Zammad login>")
            if extension in agents or extension in (known or {}):
                raise ValueError(f"extension {extension!r} is mapped twice")
            agents[extension] = login
    return agents


def _agents(env) -> dict[str, str]:
    try:
        agents = parse_agents(env.get("ZAMMAD_AGENTS", ""))
    except ValueError as exc:
        raise ConfigError(f"ZAMMAD_AGENTS: {exc}") from None
    path = env.get("ZAMMAD_AGENTS_FILE", "").strip()
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"ZAMMAD_AGENTS_FILE: cannot read {path}: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None
        try:
            agents.update(parse_agents(text, agents))
        except ValueError as exc:
            raise ConfigError(f"ZAMMAD_AGENTS_FILE ({path}): {exc}") from None
    return agents


def _state_dir(env) -> Path:
    configured = env.get("STATE_DIR", "").strip()
    if configured:
        return Path(configured)
    default = Path(DEFAULTS["STATE_DIR"])
    if os.access(default, os.W_OK):
        return default
    xdg = env.get("XDG_STATE_HOME", "").strip() or str(Path.home() / ".local" / "state")
    return Path(xdg) / "fs-zammad"


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every variable; raise ConfigError on the first bad one."""
    env = os.environ if env is None else env
    try:
        cause_overrides = parse_cause_map(env.get("ZAMMAD_CAUSE_MAP", ""))
    except ValueError as exc:
        raise ConfigError(f"ZAMMAD_CAUSE_MAP: {exc}") from None
    host = env.get("FREESWITCH_HOST", DEFAULTS["FREESWITCH_HOST"]).strip()
    if not host:
        raise ConfigError("FREESWITCH_HOST is empty")
    country = env.get("COUNTRY_CODE", "").strip().lstrip("+")
    if country and not (country.isdigit() and len(country) <= 3):
        raise ConfigError(f"COUNTRY_CODE={country!r} must be 1 to 3 digits, e.g. 43")
    ca_bundle = env.get("ZAMMAD_CA_BUNDLE", "").strip()
    if ca_bundle and not Path(ca_bundle).is_file():
        raise ConfigError(f"ZAMMAD_CA_BUNDLE={ca_bundle!r} is not a readable file")
    verify: bool | str = ca_bundle or _bool(env, "ZAMMAD_TLS_VERIFY")
    metrics_raw = env.get("METRICS_PORT", "").strip()
    url = _zammad_url(env)
    instances = _instances(env, url)
    api = _api(env, instances)
    for target in [*instances.values(), *(base for base, _token in api.values())]:
        proxy_for(target, env)  # a proxy variable it cannot use: said now, not at the first call
    return Settings(
        freeswitch_host=host,
        freeswitch_port=_number(env, "FREESWITCH_PORT", int, 1, 65535),
        freeswitch_password=_read_secret(env, "FREESWITCH_PASSWORD"),
        freeswitch_timeout=_number(env, "FREESWITCH_TIMEOUT", float, 0.1, 600),
        freeswitch_liveness=_number(env, "FREESWITCH_LIVENESS", float, 1, 3600),
        freeswitch_reconnect_max=_number(env, "FREESWITCH_RECONNECT_MAX", float, 0.1, 3600),
        zammad_url=url,
        instances=instances,
        api=api,
        voicemail=_voicemail(env, instances, api),
        voicemail_path_map=_path_map(env),
        routes=_routes(env, instances),
        zammad_timeout=_number(env, "ZAMMAD_TIMEOUT", float, 0.1, 600),
        zammad_verify=verify,
        zammad_concurrency=_number(env, "ZAMMAD_CONCURRENCY", int, 1, 256),
        zammad_retry_max=_number(env, "ZAMMAD_RETRY_MAX", float, 0.1, 3600),
        cause_overrides=cause_overrides,
        agents=_agents(env),
        external_contexts=_words(env, "EXTERNAL_CONTEXTS"),
        external_profiles=_words(env, "EXTERNAL_PROFILES"),
        country_code=country,
        national_prefix=env.get("NATIONAL_PREFIX", DEFAULTS["NATIONAL_PREFIX"]).strip(),
        queue_keep_domain=_choice(env, "QUEUE_DOMAIN", ("strip", "keep")) == "keep",
        reject_blocked=_bool(env, "REJECT_BLOCKED"),
        reject_cause=_choice(env, "REJECT_CAUSE", ("USER_BUSY", "CALL_REJECTED")),
        state_dir=_state_dir(env),
        outbox_max_events=_number(env, "OUTBOX_MAX_EVENTS", int, 100, 10**9),
        max_call_seconds=_number(env, "MAX_CALL_SECONDS", float, 10, 7 * 86400),
        shutdown_timeout=_number(env, "SHUTDOWN_TIMEOUT", float, 0, 600),
        metrics_port=_number(env, "METRICS_PORT", int, 1, 65535) if metrics_raw else None,
        metrics_address=env.get("METRICS_ADDRESS", DEFAULTS["METRICS_ADDRESS"]).strip(),
        log_level=_choice(env, "LOG_LEVEL", ("DEBUG", "INFO", "WARNING", "ERROR")),
        log_format=_choice(env, "LOG_FORMAT", ("text", "json")),
    )
