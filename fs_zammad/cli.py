"""``fs-zammad``: run (default), check, replay, outbox.

gevent patches the standard library before anything imports sockets, so
every import beyond argparse happens inside :func:`main`.
"""

from __future__ import annotations

import argparse
import sys
import uuid

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
    outbox = sub.add_parser("outbox", help="show or replay events Zammad refused")
    outbox.add_argument("action", choices=("list", "retry"))
    outbox.add_argument("--call", metavar="CALL_ID", help="only this call (retry)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from gevent import monkey

    monkey.patch_all()
    from fs_zammad import logs
    from fs_zammad.config import ConfigError, load_settings

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"fs-zammad: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logs.setup(settings.log_level, settings.log_format, settings.secrets)
    command = args.command or "run"
    if command == "run":
        from fs_zammad.service import Service

        try:
            return Service(settings).run()
        except OSError as exc:  # the outbox directory, the metrics port
            print(f"fs-zammad: cannot start: {exc}", file=sys.stderr)
            return EXIT_FAILED
    if command == "check":
        return check(settings)
    if command == "health":
        return health(settings)
    if command == "replay":
        return replay(settings, args.files, args.send)
    return outbox_command(settings, args.action, args.call)


def check(settings) -> int:
    """One line per check; exit 0 only if every configured end works."""
    import gevent

    from fs_zammad.esl import EslError, EslSupervisor
    from fs_zammad.zammad import ZammadClient

    ok = True

    def say(passed: bool | None, what: str) -> None:
        nonlocal ok
        ok = ok and passed is not False
        print(f"{ {True: 'ok  ', False: 'FAIL', None: 'skip'}[passed] } {what}", flush=True)

    supervisor = EslSupervisor(settings.freeswitch_host, settings.freeswitch_port,
                               settings.freeswitch_password, settings.freeswitch_timeout)
    try:
        conn = supervisor.connect()
    except EslError as exc:
        say(False, f"FreeSWITCH {supervisor.address}: {exc}")
    else:
        say(True, f"FreeSWITCH {supervisor.address}: reachable, password accepted, events "
                  "subscribed")
        conn.close()
    gevent.sleep(0)

    if settings.dry_run:
        say(None, "Zammad: ZAMMAD_CTI_URL is not set (dry run)")
        return EXIT_OK if ok else EXIT_FAILED
    client = ZammadClient(settings.zammad_url, settings.zammad_timeout, settings.zammad_verify)
    # An answer for a call Zammad never saw: proves URL, TLS, token and CTI
    # settings without creating a line in the caller log.
    probe = (("event", "answer"), ("direction", "in"),
             ("callId", f"fs-zammad-check-{uuid.uuid4()}"))
    outcome = client.post(probe)
    where = f"Zammad {client.redacted_url}"
    if outcome.status == 500 and "No such call_id" in outcome.detail or outcome.status == 200:
        say(True, f"{where}: reachable, TLS ok, token accepted, CTI enabled "
                  f"({outcome.elapsed_ms:.0f} ms)")
    elif outcome.status == 401:
        say(False, f"{where}: token rejected (401: {outcome.detail})")
    elif outcome.status == 422:
        say(False, f"{where}: CTI integration not usable (422: {outcome.detail})")
    elif outcome.status:
        say(False, f"{where}: unexpected answer HTTP {outcome.status}: {outcome.detail}")
    else:
        say(False, f"{where}: {outcome.detail}")
    client.close()
    return EXIT_OK if ok else EXIT_FAILED


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
    state = json.loads(body)
    print(state.get("status"), "; ".join(state.get("reasons", [])))
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
    client = ZammadClient(settings.zammad_url, settings.zammad_timeout,
                          settings.zammad_verify) if send else None
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
            if client is not None:
                outcome = client.post(event.fields)
                line += f"  -> HTTP {outcome.status or '-'} {outcome.kind} {outcome.detail}".rstrip()
                if outcome.kind != "delivered":
                    status = EXIT_FAILED
            print(line, flush=True)
        for call in tracker.calls.values():
            print(f"# call {call.call_id} has not ended in this capture")
    return status


def outbox_command(settings, action: str, call_id: str | None) -> int:
    from fs_zammad.outbox import Outbox

    path = settings.state_dir / "outbox.sqlite3"
    if not path.exists():
        print(f"no outbox at {path} (STATE_DIR)")
        return EXIT_OK
    outbox = Outbox(path, settings.outbox_max_events)
    if action == "list":
        rows = outbox.failed_rows()
        counts = outbox.counts()
        print(f"{path}: {counts.get('pending', 0)} pending, {counts.get('failed', 0)} set aside")
        for row_id, call, instance, event, attempts, error, _created in rows:
            print(f"{row_id}\t{call}\t{instance or 'default'}\t{event}\tattempts={attempts}\t"
                  f"{error}")
    else:
        count = outbox.retry_failed(call_id)
        print(f"{count} events put back in line; the running service sends them within seconds")
    outbox.close()
    return EXIT_OK
