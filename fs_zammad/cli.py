"""``fs-zammad``: run (default), check, replay, outbox.

gevent patches the standard library before anything imports sockets, so
every import beyond argparse happens inside :func:`main`.
"""

from __future__ import annotations

import argparse
import os
import sys

from fs_zammad import __version__

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def _variables_help() -> str:
    from fs_zammad.config import VARIABLES

    width = max(len(name) for name, _, _ in VARIABLES)
    lines = ["environment variables (default in brackets):"]
    for name, default, meaning in VARIABLES:
        lines.append(f"  {name:<{width}}  {meaning} [{default or 'unset'}]")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fs-zammad",
        description="Forward FreeSWITCH calls to Zammad's CTI caller log. With no command: run.",
        epilog=_variables_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fs-zammad {__version__}")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="connect to FreeSWITCH and forward calls until stopped")
    sub.add_parser("check", help="check both ends (FreeSWITCH login, Zammad token) and exit")
    sub.add_parser("health", help="ask the running service's /healthz (METRICS_PORT); exit 0 "
                                  "if healthy (for HEALTHCHECK)")
    replay = sub.add_parser("replay", help="print the Zammad requests that captured ESL events "
                                           "produce (or --send them)")
    replay.add_argument("files", nargs="+", metavar="FILE",
                        help="captured event-socket byte streams (text/event-plain frames)")
    replay.add_argument("--send", action="store_true", help="POST them to ZAMMAD_CTI_URL")
    capture = sub.add_parser("capture", help="record FreeSWITCH's events to FILE, byte for byte "
                                             "as replay reads them (the password never)")
    capture.add_argument("file", metavar="FILE")
    capture.add_argument("--seconds", type=float, metavar="N",
                         help="stop after N seconds (default: at Ctrl-C or SIGTERM)")
    capture.add_argument("--call", metavar="UUID",
                         help="only the legs of this call (its callId in Zammad and the log)")
    capture.add_argument("--all", action="store_true", dest="all_events",
                         help="every event, not only those fs-zammad reads")
    outbox = sub.add_parser("outbox", help="show or replay events Zammad refused; forget "
                                           "hangups that may have reached it")
    outbox.add_argument("action", choices=("list", "retry", "drop"),
                        help="drop: forget unsure hangups for good, once Zammad's caller "
                             "log shows they arrived (a call's, or with --unsure every one)")
    outbox.add_argument("--call", metavar="CALL_ID", help="only this call (retry, drop)")
    outbox.add_argument("--unsure", action="store_true",
                        help="retry also hangups that may have reached Zammad (check Zammad's "
                             "caller log first: a second hangup turns a missed call into done); "
                             "drop: every unsure hangup")
    outbox.add_argument("--yes", action="store_true",
                        help="--unsure without --call: do not ask for confirmation")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run_command(args)
    except KeyboardInterrupt:
        print("fs-zammad: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the last net: one line, never a traceback
        print(f"fs-zammad: unexpected error ({type(exc).__name__}: {_redacted(str(exc))}); "
              "please report it with the command that caused it", file=sys.stderr)
        return EXIT_FAILED


# Secrets (also percent-encoded or HTML-escaped) as ***, once the settings are read.
_redacted = str




def _run_command(args) -> int:
    global _redacted
    from gevent import monkey

    monkey.patch_all()
    from fs_zammad import logs
    from fs_zammad.config import ConfigError, load_settings

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"fs-zammad: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    _redacted = logs.Redactor(settings.secrets)  # rows stored by older versions too
    logs.setup(settings.log_level, settings.log_format, settings.secrets)
    command = args.command or "run"
    if command == "run":
        import sqlite3

        from fs_zammad.outbox import OutboxInUse
        from fs_zammad.service import Service

        try:
            return Service(settings).run()
        except OutboxInUse as exc:  # a second service on the same STATE_DIR
            print(f"fs-zammad: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        except sqlite3.Error as exc:  # a full disk or a permission: the file itself is sound
            from fs_zammad.outbox import read_only, write_trouble

            trouble = write_trouble(exc)
            if trouble == "disk full":
                fix = "free space there"
            elif read_only(exc):
                fix = "let this user write it (chown or chmod; a 'sudo fs-zammad run' leaves root's files)"
            else:  # e.g. a directory or a dangling link where the outbox or its -wal should be
                fix = _outbox_files_hint(settings.state_dir)
            said = trouble if trouble == str(exc) else f"{trouble} ({exc})"
            print(f"fs-zammad: cannot start: cannot open the outbox in STATE_DIR="
                  f"{settings.state_dir}: {said}; {fix}: what it holds is kept for the next start",
                  file=sys.stderr)
            return EXIT_FAILED
        except OSError as exc:  # the outbox directory, the metrics port
            print(f"fs-zammad: cannot start: {exc} (STATE_DIR={settings.state_dir}, "
                  f"METRICS_PORT={settings.metrics_port or 'off'})", file=sys.stderr)
            return EXIT_FAILED
    if command == "check":
        return check(settings)
    if command == "health":
        return health(settings)
    if command == "replay":
        return replay(settings, args.files, args.send)
    if command == "capture":
        from fs_zammad.capture import capture

        return capture(settings, args.file, args.seconds, args.call, args.all_events)
    return outbox_command(settings, args.action, args.call, args.unsure, args.yes)


def check(settings) -> int:
    """One line per check; exit 0 only if every configured end works."""
    import gevent

    from fs_zammad.esl import EslError, EslSupervisor

    ok = True

    def say(passed: bool | None, what: str) -> None:
        nonlocal ok
        ok = ok and passed is not False
        print(f"{ {True: 'ok  ', False: 'FAIL', None: 'skip'}[passed] } {what}", flush=True)

    supervisor = EslSupervisor(settings.freeswitch_host, settings.freeswitch_port,
                               settings.freeswitch_password, settings.freeswitch_timeout)
    where = f"FreeSWITCH {supervisor.address}"
    try:
        conn = supervisor.connect()
    except EslError as exc:
        say(False, f"{where}: {str(exc).replace(f'FreeSWITCH at {supervisor.address} ', '', 1)}")
    else:
        say(True, f"{where}: reachable, password accepted, events subscribed")
        conn.close()
    gevent.sleep(0)

    if settings.dry_run:
        say(None, "Zammad: ZAMMAD_CTI_URL is not set (dry run)")
    for name, url in settings.instances.items():
        passed, what = _check_zammad(settings, url, name)
        say(passed, f"Zammad{f' [{name}]' if name else ''} {what}")
    if settings.api:
        from fs_zammad.zammad_api import ZammadApi, check_api

        apis = {name: ZammadApi(url, token, settings.zammad_timeout, settings.zammad_verify)
                for name, (url, token) in settings.api.items()}
        for passed, what in check_api(apis, settings.agents.values()):
            say(passed, what)
        from fs_zammad.tickets import check_tickets

        for name, (group, _customer) in settings.voicemail.items():
            for passed, what in check_tickets(apis[name], group,
                                              f"Zammad API{f' [{name}]' if name else ''}"):
                say(passed, what)
        for api in apis.values():
            api.close()
    elif settings.agents:
        say(None, "ZAMMAD_AGENTS: set ZAMMAD_API_TOKEN to check the mapped logins in Zammad")
    return EXIT_OK if ok else EXIT_FAILED


def _check_zammad(settings, url: str, name: str = "") -> tuple[bool, str]:
    """(passed, "<redacted url>: what was found") for one CTI endpoint."""
    import re
    from urllib.parse import urlsplit

    from fs_zammad import zammad
    from fs_zammad.config import url_variable
    from fs_zammad.delivery import probe_fields

    client = zammad.ZammadClient(url, settings.zammad_timeout, settings.zammad_verify,
                                 setting=url_variable(name))
    # Delivery's probe proves URL, TLS, token and CTI settings without
    # creating a line in the caller log.
    probe = probe_fields("check")
    try:
        outcome = client.post(probe)
    finally:
        client.close()
    where = client.redacted_url
    parts = urlsplit(url)
    status, detail = outcome.status, outcome.detail
    if outcome.kind == zammad.NOT_ZAMMAD:  # the same words as the service's ERROR line
        return False, f"{where}: {detail}"
    if outcome.kind == zammad.THROTTLED:
        return False, f"{where}: Zammad is busy (HTTP {status}): {detail}"
    if status == 500 and "No such call_id" in detail or outcome.kind == zammad.DELIVERED:
        tls = "TLS ok" if parts.scheme == "https" else "plain HTTP (no TLS)"
        return True, (f"{where}: reachable, {tls}, token accepted, CTI enabled "
                      f"({outcome.elapsed_ms:.0f} ms)")
    if status == 401:
        return False, f"{where}: token rejected (401: {detail}); copy the URL from Zammad again"
    if status == 422:
        return False, (f"{where}: CTI integration not usable (422: {detail}); is CTI (generic) "
                       "switched on in Admin > Integrations?")
    if status in (502, 503, 504):
        return False, f"{where}: Zammad or the proxy in front of it is down (HTTP {status}: {detail})"
    if status:
        return False, f"{where}: unexpected answer HTTP {status}: {detail}"
    if detail.startswith("TLS error"):
        # "... [SSL: CODE] reason (_ssl.c:NNN) ..." unless the detail was cut short
        found = re.search(r"\[SSL: ([A-Z_]+)\](?: ([^'\"]*?) \(_ssl\.c)?", detail)
        reason = (found.group(2) or found.group(1).lower().replace("_", " ")) if found \
            else detail[len("TLS error: "):]
        if found and found.group(1) == "CERTIFICATE_VERIFY_FAILED":
            return False, (f"{where}: TLS certificate not accepted ({reason}); fix the "
                           "certificate or name its CA in ZAMMAD_CA_BUNDLE")
        return False, (f"{where}: TLS handshake failed ({reason}); does "
                       f"{parts.hostname}:{parts.port or 443} speak https?")
    if detail.startswith("DNS"):
        return False, f"{where}: DNS lookup failed: no address for host {parts.hostname!r}"
    return False, f"{where}: {detail}"


def health(settings) -> int:
    import json
    import urllib.error
    import urllib.request

    if not settings.metrics_port:
        print("fs-zammad health: METRICS_PORT is not set, nothing to ask", file=sys.stderr)
        return EXIT_FAILED
    host = "127.0.0.1" if settings.metrics_address in ("0.0.0.0", "::", "") \
        else settings.metrics_address
    url = f"http://{host}:{settings.metrics_port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read().decode()
    except urllib.error.HTTPError as exc:
        body = exc.read().decode()
    except OSError as exc:
        print(f"unhealthy: {url} not answering ({exc})")
        return EXIT_FAILED
    try:
        state = json.loads(body)
    except ValueError:
        print(f"unhealthy: {url} did not answer with fs-zammad's health JSON")
        return EXIT_FAILED
    reasons = "; ".join(state.get("reasons", []))
    print(f"{state.get('status')}: {reasons}" if reasons else state.get("status"))
    return EXIT_OK if state.get("status") == "ok" else EXIT_FAILED


def replay(settings, files: list[str], send: bool) -> int:
    """Captured events -> the requests fs-zammad would send (stdout)."""
    from urllib.parse import urlencode

    from fs_zammad.calls import CallTracker
    from fs_zammad.service import tracker_rules
    from fs_zammad.wire import FrameError, iter_capture
    from fs_zammad.zammad import ZammadClient

    if send and settings.dry_run:
        print("fs-zammad: replay --send needs ZAMMAD_CTI_URL", file=sys.stderr)
        return EXIT_CONFIG
    clients = {name: ZammadClient(url, settings.zammad_timeout, settings.zammad_verify)
               for name, url in settings.instances.items()} if send else {}
    status = EXIT_OK
    for path in files:
        tracker = CallTracker(tracker_rules(settings))
        print(f"# {path}")
        try:
            with open(path, "rb") as handle:
                data = handle.read()
            events = []
            for headers in iter_capture(data):
                stamp = headers.get("Event-Date-Timestamp", "")
                now = int(stamp) / 1e6 if stamp.isdigit() else 0.0
                events += tracker.handle(headers, now)
        except (OSError, FrameError) as exc:
            print(f"fs-zammad: {path}: {exc}", file=sys.stderr)
            status = EXIT_FAILED
            continue
        if not events:
            print("# (no call for Zammad: internal or ignored)")
        for event in events:
            line = urlencode(event.fields)
            if event.instance:
                line = f"[{event.instance}] {line}"
            if send:
                outcome = clients[event.instance].post(event.fields)
                line += f"  -> HTTP {outcome.status or '-'} {outcome.kind} {outcome.detail}".rstrip()
                if outcome.kind != "delivered":
                    status = EXIT_FAILED
            print(line, flush=True)
        for call in tracker.calls.values():
            print(f"# call {call.call_id} has not ended in this capture")
    return status


def outbox_command(settings, action: str, call_id: str | None, unsure: bool = False,
                   yes: bool = False) -> int:
    """``outbox list``, ``outbox retry`` and ``outbox drop``, next to a running
    service or not.

    Reads through a read-only connection and never runs the service's
    crash recovery (that would catch hangups in flight). ``retry`` is one
    UPDATE and ``drop`` one DELETE of set-aside rows, which are never in
    flight; the running service notices either within a second.
    """
    import sqlite3

    from fs_zammad.outbox import Outbox, ServiceLock, is_damage

    path = settings.state_dir / "outbox.sqlite3"
    try:
        if not path.exists():
            print(f"no outbox at {path} (STATE_DIR): nothing stored yet, or STATE_DIR is not "
                  "the service's")
            return EXIT_OK
        if action == "drop" and call_id is None and not unsure:
            print("fs-zammad: outbox drop forgets unsure hangups for good: say which, --call <callId> "
                  "or --unsure (see 'fs-zammad outbox list')", file=sys.stderr)
            return EXIT_CONFIG
        outbox = Outbox.for_cli(path, write=action != "list")
        try:
            if action == "list":
                return _outbox_list(outbox, path)
            if action == "drop":
                return _outbox_drop(outbox, call_id, yes)
            running = ServiceLock(settings.state_dir).held_elsewhere()
            return _outbox_retry(outbox, call_id, unsure, yes, running)
        finally:
            outbox.close()
    except sqlite3.Error as exc:
        text = str(exc)
        if is_damage(exc) or "no such table" in text:  # (no outbox in that file)
            hint = ("it is damaged: the service moves it aside at its next start and carries "
                    "over what can still be read (restart it)")
        elif "readonly" in text or "unable to open" in text:
            hint = "run this as the user the service runs as (e.g. with docker exec)"
        else:
            hint = "try again; if it persists, check the disk and STATE_DIR"
        print(f"fs-zammad: cannot use the outbox {path}: {text}; {hint}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"fs-zammad: cannot use the outbox {path}: {exc.strerror or exc}; run this as the "
              "user the service runs as", file=sys.stderr)
        return EXIT_FAILED


def _outbox_list(outbox, path) -> int:
    rows = outbox.failed_rows()
    counts = outbox.counts()
    print(f"{path}: {counts.get('pending', 0)} pending, {counts.get('failed', 0)} set aside, "
          f"{counts.get('unsure', 0)} unsure hangups")
    unsure = [row for row in rows if row[4] == "unsure"]
    if unsure:
        print("unsure hangups: they may have reached Zammad; send one again only if Zammad's "
              "caller log still shows its call open ('fs-zammad outbox retry --unsure --call "
              "<callId>'), forget it if the call shows ended ('fs-zammad outbox drop --call "
              "<callId>'):")
        for line in _unsure_lines(unsure):
            print(line)
    failed = [row for row in rows if row[4] != "unsure"]
    if failed:
        print("set aside: Zammad refused these; fix the cause, then 'fs-zammad outbox retry':")
    for row_id, call, instance, event, _state, attempts, error, _created, _fields in failed:
        print(_redacted(f"  {row_id}\t{call}\t{instance or 'default'}\t{event}\t"
                        f"attempts={attempts}\t{error}"))
    return EXIT_OK


def _unsure_lines(rows) -> list[str]:
    """Each unsure hangup with its call: direction, from, to, time, and why."""
    import time

    lines = []
    for row_id, call, instance, event, _state, attempts, error, created, fields in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(created))
        lines.append(_redacted(
            f"  {call}  {event} {fields.get('direction', '?')}  from {fields.get('from') or '-'}  "
            f"to {fields.get('to') or '-'}  {when}  Zammad {instance or 'default'}  "
            f"(row {row_id}, attempts={attempts})\n    why: {error}"))
    return lines


def _confirmed_unsure(outbox, yes: bool, what: str, question: str) -> list | int:
    """Every unsure hangup, once the admin confirmed these very rows (``--yes``, or
    asked on a terminal); an exit code if not."""
    chosen = [row for row in outbox.failed_rows() if row[4] == "unsure"]
    if chosen and not yes:
        if not sys.stdin.isatty():
            print(f"fs-zammad: {what} {len(chosen)} hangups that may have reached Zammad; "
                  "there is no terminal to ask: add --yes to confirm", file=sys.stderr)
            return EXIT_CONFIG
        for line in _unsure_lines(chosen):
            print(line)
        if input(f"{question} [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing changed")
            return EXIT_FAILED
    return chosen


def _outbox_files_hint(state_dir: str) -> str:
    """What is wrong with the outbox's files, as far as the file system tells. Never
    'move it away' for a file that may hold events (a -wal holds the last commits)."""
    for name in ("outbox.sqlite3", "outbox.sqlite3-wal", "outbox.sqlite3-shm"):
        path = os.path.join(state_dir, name)
        if os.path.isdir(path) or (os.path.islink(path) and not os.path.exists(path)):
            what = "a directory" if os.path.isdir(path) else "a link to nothing"
            return f"{name} there is {what}, not a file: move it away"
        if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
            return f"let this user read and write {name} there (chown or chmod)"
    return "check that outbox.sqlite3 and its -wal/-shm there are plain files this user may write"


def _nothing_for(call_id: str, what: str,
                 hint: str = "'fs-zammad outbox list' shows the calls that have some") -> int:
    """A --call that matched nothing: most often a mistyped callId."""
    print(f"fs-zammad: call {call_id} has {what} in the outbox: nothing changed; {hint}",
          file=sys.stderr)
    return EXIT_FAILED


def _outbox_retry(outbox, call_id: str | None, unsure: bool, yes: bool, running: bool) -> int:
    ids = None
    if unsure and call_id is None:
        chosen = _confirmed_unsure(
            outbox, yes, "outbox retry --unsure would send",
            "Send these hangups again? A second hangup turns a missed call into a done one: "
            "check Zammad's caller log first.")
        if isinstance(chosen, int):
            return chosen
        ids = [row[0] for row in outbox.failed_rows() if row[4] == "failed"] + \
            [row[0] for row in chosen]
    count = outbox.retry_failed(call_id, unsure, ids)
    if call_id is not None and count == 0:
        if not unsure and any(row[1] == call_id and row[4] == "unsure"
                              for row in outbox.failed_rows()):
            return _nothing_for(call_id, "only unsure hangups", "add --unsure to send them, "
                                "once Zammad's caller log shows that call still ringing")
        return _nothing_for(call_id, "no refused events" + (" or unsure hangups" if unsure else ""))
    where = ("the running service sends them within seconds" if running else
             "no service is running on this outbox: they are sent when it starts")
    print(f"{count} events put back in line; {where}")
    return EXIT_OK


def _outbox_drop(outbox, call_id: str | None, yes: bool) -> int:
    """Forget unsure hangups once Zammad's caller log shows they arrived: a call's, or
    every one (confirmed). Unsure rows are never in flight; refused events are not
    touched (they wait for 'retry')."""
    ids = None
    if call_id is None:
        chosen = _confirmed_unsure(
            outbox, yes, "outbox drop --unsure would forget",
            "Forget these hangups? Do it only if Zammad's caller log shows each call ended.")
        if isinstance(chosen, int):
            return chosen
        ids = [row[0] for row in chosen]
    count = outbox.drop_unsure(call_id, ids)
    if call_id is not None and count == 0:
        return _nothing_for(call_id, "no unsure hangups")
    print(f"{count} unsure hangups forgotten" + (f" (call {call_id})" if call_id else ""))
    return EXIT_OK
