"""Prometheus metrics and the /healthz + /metrics HTTP endpoint.

Counters are module-level (one service per process); gauges that describe
the outbox and the calls are read at scrape time from the bound service.
"""

from __future__ import annotations

import json
import logging
import os
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

log = logging.getLogger("fs_zammad.metrics")

REGISTRY = CollectorRegistry()

EVENTS_RECEIVED = Counter("fs_zammad_esl_events_total", "FreeSWITCH events received, by name",
                          ["event"], registry=REGISTRY)
SENT = Counter("fs_zammad_zammad_requests_total",
               "Requests to Zammad, by CTI event, HTTP status (0 = no answer) and result",
               ["event", "status", "result"], registry=REGISTRY)
LATENCY = Histogram("fs_zammad_delivery_seconds",
                    "From storing an event in the outbox to Zammad accepting it",
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300,
                             1800), registry=REGISTRY)
CALLS_ENDED = Counter("fs_zammad_calls_ended_total",
                      "Calls whose hangup Zammad accepted, by direction and Zammad cause",
                      ["direction", "cause"], registry=REGISTRY)
OUTBOX_REFUSED = Counter("fs_zammad_outbox_refused_total",
                         "Zammad events dropped because the outbox was full", registry=REGISTRY)
ESL_CONNECTED = Gauge("fs_zammad_esl_connected", "1 while connected to FreeSWITCH",
                      registry=REGISTRY)
ESL_RECONNECTS = Counter("fs_zammad_esl_reconnects", "Reconnects to FreeSWITCH since start",
                         registry=REGISTRY)
OUTBOX_DEPTH = Gauge("fs_zammad_outbox_pending", "Events waiting in the outbox", registry=REGISTRY)
OUTBOX_FAILED = Gauge("fs_zammad_outbox_failed", "Events set aside (see fs-zammad outbox list)",
                      registry=REGISTRY)
OUTBOX_UNSURE = Gauge("fs_zammad_outbox_unsure",
                      "Hangups that may have reached Zammad, waiting for a decision "
                      "(fs-zammad outbox list; then retry --unsure or drop)", registry=REGISTRY)
OUTBOX_MAX = Gauge("fs_zammad_outbox_max_events",
                   "OUTBOX_MAX_EVENTS: pending events beyond it refuse new calls", registry=REGISTRY)
OUTBOX_AGE = Gauge("fs_zammad_outbox_oldest_seconds", "Age of the oldest waiting event",
                   registry=REGISTRY)
CALLS = Gauge("fs_zammad_calls_in_progress", "Calls being followed", registry=REGISTRY)

#: An outbox whose oldest event waits longer than this is "stuck" for /healthz.
STUCK_AFTER = 300.0

_service = None


def bind(service) -> None:
    """Read outbox and call gauges from this service at scrape time."""
    global _service
    _service = service
    OUTBOX_DEPTH.set_function(lambda: service.outbox.pending)
    OUTBOX_AGE.set_function(lambda: service.outbox.oldest_pending_age())
    OUTBOX_FAILED.set_function(lambda: service.outbox.counts().get("failed", 0))
    OUTBOX_UNSURE.set_function(lambda: service.outbox.counts().get("unsure", 0))
    OUTBOX_MAX.set(service.outbox.max_events)
    CALLS.set_function(lambda: len(service.tracker.calls))


def observe_sent(row, outcome) -> None:
    SENT.labels(row.event, str(outcome.status), outcome.kind).inc()
    if outcome.kind == "delivered":
        LATENCY.observe(max(0.0, time.time() - row.created))
        if row.event == "hangup":
            fields = dict(row.fields)
            CALLS_ENDED.labels(fields.get("direction", ""), fields.get("cause", "")).inc()


def health(service) -> tuple[int, dict]:
    """(HTTP status, reason) for /healthz."""
    reasons = []
    if not service.esl.connected:
        reasons.append("not connected to FreeSWITCH")
    # Something else answers instead of Zammad (a login page, a redirect).
    reasons += [d.problem for d in service.deliveries.values() if d.problem]
    outbox = service.outbox
    if outbox.write_error:
        reasons.append(f"outbox cannot be written ({outbox.write_error} in STATE_DIR "
                       f"{os.path.dirname(outbox.path)}); {outbox.held} events wait in memory")
    age = service.outbox.oldest_pending_age()
    if age > STUCK_AFTER:
        reasons.append(f"outbox stuck: oldest event waits {age:.0f} s "
                       f"({service.outbox.pending} pending)")
    body = {"status": "ok" if not reasons else "unhealthy", "reasons": reasons,
            "freeswitch_connected": service.esl.connected, "outbox_pending": service.outbox.pending,
            "calls_in_progress": len(service.tracker.calls)}
    return (200 if not reasons else 503), body


def app(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path == "/metrics":
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
        return [generate_latest(REGISTRY)]
    if path in ("/healthz", "/health"):
        status, body = health(_service)
        start_response(f"{status} {'OK' if status == 200 else 'Service Unavailable'}",
                       [("Content-Type", "application/json")])
        return [json.dumps(body).encode()]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"try /healthz or /metrics\n"]


def serve(service):
    """Start the endpoint on METRICS_ADDRESS:METRICS_PORT; returns the server."""
    from gevent.pywsgi import WSGIServer

    settings = service.settings
    server = WSGIServer((settings.metrics_address, settings.metrics_port), app, log=None,
                        error_log=log)
    server.start()
    log.info("health and metrics on http://%s:%d/healthz and /metrics", settings.metrics_address,
             server.server_port)
    return server
