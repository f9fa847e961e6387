"""Delivery: outbox -> one Zammad, per-call order, calls in parallel, backoff.

One dispatcher greenlet takes the first pending event of each call from the
outbox (never two of one call at once) and runs up to ``concurrency`` POSTs.
What happens after an answer (zammad.classify; the README has the table):

* delivered: the row is deleted.
* Zammad down (connection refused, 502/503/504, TLS, no answer in time):
  nothing is sent; after a pause that doubles up to ``retry_max`` (with
  jitter) a probe asks Zammad about a call that does not exist, which stores
  nothing, and only its answer lets the queue move again. So no real event,
  least of all a hangup, is spent on finding out whether Zammad is back.
* not Zammad's answer (a page instead of its JSON, a redirect): a
  configuration error. The events stay; one ERROR line (and /healthz) says
  what answered and what to fix; a probe every ``retry_max`` until Zammad
  itself answers.
* throttled (429/503 with Retry-After): nothing is sent before that time.
* retry (a 500 Zammad did not explain, 429): this event waits, others go on.
* failed (401/422, "No such call_id"): set aside, logged once per reason.
* A hangup a second copy would harm (``Row.once``: an inbound call nobody
  answered) is set aside as ``unsure`` after any answer that does not prove
  Zammad left it alone (``Outcome.maybe_processed``: no answer in time, a
  connection lost mid-request, an unexplained 500, 502, 504, ...): a second
  hangup turns the missed call into a done one. Such a hangup is marked in
  the outbox before it is sent, so one cut off by a crash is treated the
  same way. Every other event is sent again after those answers: a repeated
  newCall is answered "already exists", a repeated answer or other hangup
  only moves a time.
"""

from __future__ import annotations

import logging
import random
import re
import time
import uuid

import gevent
from gevent.event import Event
from gevent.pool import Pool

from fs_zammad import zammad
from fs_zammad.outbox import SIDE_JOB, Outbox, OutboxUnwritable, Row

log = logging.getLogger("fs_zammad.delivery")

UNSURE_HANGUP = "hangup of a missed call may have reached Zammad"
#: Reasons remembered for logging once; a flood of distinct ones stays bounded.
REPORTED_MAX = 1000
NOT_RESENT = "not resent: a second hangup would turn the missed call into a done one"


def backoff(attempt: int, cap: float, base: float = 0.5, rng=random.random) -> float:
    """Exponential backoff with jitter: 50-100 % of min(cap, base * 2^attempt)."""
    delay = min(cap, base * (2 ** min(attempt, 30)))
    return delay * (0.5 + rng() / 2)


#: What becomes of an event after an answer (see :func:`disposition`).
SENT, UNSURE, SET_ASIDE, RETRY_LATER, WAIT = "sent", "unsure", "set_aside", "retry_later", "wait"


def disposition(outcome: zammad.Outcome, once: bool) -> str:
    """The event's fate after this answer (pure). ``once``: a hangup a second copy
    would harm, which is never sent again after an answer that leaves open whether
    Zammad processed it. WAIT: it stays first in line while everyone waits
    (Zammad down, throttled, or something else answering for it)."""
    if once and outcome.maybe_processed:
        return UNSURE
    return {zammad.DELIVERED: SENT, zammad.FAILED: SET_ASIDE,
            zammad.RETRY: RETRY_LATER}.get(outcome.kind, WAIT)


def probe_fields(purpose: str = "probe") -> tuple[tuple[str, str], ...]:
    """A request Zammad answers without storing anything (an answer for an unknown callId)."""
    return (("event", "answer"), ("direction", "in"),
            ("callId", f"fs-zammad-{purpose}-{uuid.uuid4()}"))


class Delivery:
    def __init__(self, outbox: Outbox, client, concurrency: int = 8, retry_max: float = 60.0,
                 on_sent=None, on_action=None, instance: str = "", jobs=None):
        self.outbox = outbox
        self.instance = instance  # the outbox rows this delivery sends (one per Zammad)
        self.client = client
        self.jobs = jobs  # tickets.TicketJobs: runs the outbox's ticket jobs (None: off)
        self.concurrency = concurrency
        self.retry_max = retry_max
        self.on_sent = on_sent or (lambda row, outcome: None)
        self.on_action = on_action or (lambda row, action: None)
        self._pool = Pool(concurrency)
        self._inflight: dict[int, Row] = {}
        self._wake = Event()
        self._stopping = False
        self.down_since: float | None = None   # Zammad unreachable since (monotonic)
        #: Something else answers instead of Zammad (its ERROR line): /healthz reports it.
        self.problem: str | None = None
        self._throttled = False
        self._down_failures = 0
        self._paused_until = 0.0
        self._look_again = 0.0  # before then, a count of nothing pending is trusted
        self._reported: set[str] = set()

    @property
    def _name(self) -> str:
        return f" ({self.instance})" if self.instance else ""

    def wake(self) -> None:
        self._wake.set()

    @property
    def idle(self) -> bool:
        return not self._inflight and self.outbox.pending_for(self.instance) == 0

    def run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                wait = self._dispatch()
            except Exception as exc:  # e.g. the outbox file unreadable: log, keep trying
                log.error("delivery%s: %s: %s", self._name, type(exc).__name__, exc)
                wait = 5.0
            if wait:
                self._wake.wait(timeout=wait)

    def _dispatch(self) -> float:
        """Start what may start now; returns how long to wait before looking again."""
        now = time.monotonic()
        if now < self._paused_until:
            return self._paused_until - now
        if self.down_since is not None or self.problem is not None:
            if not self._inflight:
                self._probe()
            return 0.0 if self.down_since is None and self.problem is None else 0.5
        free = self.concurrency - len(self._inflight)
        if free <= 0:
            return 1.0
        if self.outbox.pending <= len(self._inflight) and now < self._look_again:
            # The outbox's own count says that nothing but our rows in flight is
            # pending, for anyone: no read is needed to know nothing is ready. At a
            # PBX's pace this is the state after most answers. Another process's
            # changes (outbox retry) reach the count through the service's
            # housekeeping, which wakes us; a full look once a second still runs.
            return self._look_again - now
        # In-flight rows are skipped; the rest of their calls wait behind them.
        rows = self.outbox.ready(free, self._inflight, instance=self.instance)
        for row in rows:
            self._inflight[row.id] = row
            self._pool.spawn(self._send, row)
        if rows:
            return 0.0 if len(rows) == free else 1.0
        self._look_again = now + 1.0
        if not self._inflight:
            self.outbox.recount()
        # Rows due but not ready wait behind an event in flight (or a write the
        # full disk holds): its end wakes us, so there is nothing to poll for.
        due = self.outbox.next_due(self.instance)
        left = None if due is None else due - time.time()
        return 1.0 if left is None or left <= 0 else min(1.0, max(0.01, left))

    def _probe(self) -> None:
        """Is Zammad back? Asked with a request that stores nothing."""
        outcome = self.client.post(probe_fields())
        if outcome.kind in (zammad.DELIVERED, zammad.FAILED):   # any real answer from Zammad
            if self.problem is not None:
                log.info("Zammad%s itself answers again; sending the %d events that waited",
                         self._name, self.outbox.pending_for(self.instance))
            elif self.down_since is not None:
                log.info("Zammad%s answers again after %.0f s; sending the backlog (%d events)",
                         self._name, time.monotonic() - self.down_since,
                         self.outbox.pending_for(self.instance))
            self.down_since, self.problem, self._down_failures, self._paused_until = \
                None, None, 0, 0.0
        elif outcome.kind in (zammad.NOT_ZAMMAD, zammad.THROTTLED):
            self._hold(outcome)
        else:  # what was in the way is gone, but Zammad does not answer (yet)
            self.problem = None
            if self.down_since is None:
                self._hold(outcome)
            else:
                self._pause()

    def _pause(self) -> None:
        self._pause_until(time.monotonic() + backoff(self._down_failures, self.retry_max))
        self._down_failures += 1

    def _pause_until(self, when: float) -> None:
        # Never shorter than a pause already running: a request in flight when Zammad
        # asked for Retry-After may fail afterwards, and must not cut that short.
        self._paused_until = max(self._paused_until, when)

    def _send(self, row: Row) -> None:
        try:
            if row.once:  # so that a crash mid-request leaves it unsure, never resent
                self.outbox.mark_sending(row.id)
            outcome = self._perform(row)
            self._settle(row, outcome)
        except gevent.GreenletExit:
            if row.once:
                self.outbox.set_unsure(row, f"{UNSURE_HANGUP} (stopped while sending); "
                                            f"{NOT_RESENT}")
            raise
        except OutboxUnwritable:  # disk full, logged by the outbox: not sent, the row waits
            pass
        except Exception as exc:  # a bug must not kill delivery; the row stays queued
            log.error("delivery of %s for call %s failed unexpectedly: %s: %s",
                      row.event, row.call_id, type(exc).__name__, exc)
            # Only the type is stored: the text may quote a URL (the log line is redacted).
            error = f"unexpected {type(exc).__name__} (see the log)"
            if row.once:  # the request may have left before the failure
                self.outbox.set_unsure(row, f"{UNSURE_HANGUP} ({error}); {NOT_RESENT}")
            else:
                self.outbox.retry_later(row.id, time.time() + self.retry_max, error)
        finally:
            self._inflight.pop(row.id, None)
            self._wake.set()

    def _perform(self, row: Row) -> zammad.Outcome:
        """A CTI event is POSTed; a ticket job is run over Zammad's REST API."""
        if row.event != SIDE_JOB:
            return self.client.post(row.fields)
        if self.jobs is None:
            return zammad.Outcome(zammad.FAILED, 0, "VOICEMAIL_TICKETS is off for this Zammad",
                                  config_error=True)
        return self.jobs.run(dict(row.fields))

    def _settle(self, row: Row, outcome: zammad.Outcome) -> None:
        kind = outcome.kind
        error = f"HTTP {outcome.status}: {outcome.detail}" if outcome.status else outcome.detail
        fate = disposition(outcome, row.once)
        if fate == UNSURE:
            why = f"{UNSURE_HANGUP} ({error}); {NOT_RESENT}"
            self.outbox.set_unsure(row, why)
            self._report(row, outcome, why, key=f"unsure:{outcome.status}")
        elif fate == SENT:
            self.outbox.delivered(row.id)
            self._throttled = False
            if outcome.action:
                self.on_action(row, outcome.action)
        elif fate == SET_ASIDE:
            self.outbox.fail(row, error)
            self._report(row, outcome, outcome.detail)
        elif fate == RETRY_LATER:
            delay = backoff(row.attempts, self.retry_max)
            self.outbox.retry_later(row.id, time.time() + delay, error)
        else:  # down, throttled, not Zammad: the row waits with the rest
            self.outbox.attempted(row.id, error)
        if kind in (zammad.ZAMMAD_DOWN, zammad.NOT_ZAMMAD, zammad.THROTTLED):
            self._hold(outcome)
        self.on_sent(row, outcome)

    def _hold(self, outcome: zammad.Outcome) -> None:
        """Everyone waits: Zammad is down, busy, or something else answers for it."""
        now = time.monotonic()
        if outcome.kind == zammad.NOT_ZAMMAD:
            problem, self.problem = self.problem, f"Zammad{self._name}: {outcome.detail}"
            if problem != self.problem:
                log.error("%s. Nothing is lost: the events wait in the outbox (%d), and a "
                          "request that stores nothing asks every %.0f s until Zammad itself "
                          "answers", self.problem, self.outbox.pending_for(self.instance),
                          self.retry_max)
            self._pause_until(now + self.retry_max)
        elif outcome.kind == zammad.THROTTLED:
            if not self._throttled:
                log.warning("Zammad%s is busy (HTTP %d): %s; nothing is sent to it before then",
                            self._name, outcome.status, outcome.detail)
            self._throttled = True
            self._pause_until(now + outcome.retry_after)
        elif self.down_since is None:
            self.down_since = now
            log.warning("Zammad%s unreachable: %s%s; events wait in the outbox and are sent "
                        "once it answers again", self._name,
                        f"HTTP {outcome.status}: " if outcome.status else "", outcome.detail)
            self._pause()

    def _report(self, row: Row, outcome: zammad.Outcome, why: str, key: str = "") -> None:
        """Log a row set aside: loudly the first time per reason, quietly after."""
        # Zammad's words may quote the call's own numbers: those make no new reason.
        key = key or f"{outcome.status}:" + re.sub(r"\d+", "#", why.replace(row.call_id, ""))[:80]
        if key.startswith("unsure:"):
            hint = ("'fs-zammad outbox list' shows it; send it again only if Zammad's caller log "
                    f"shows the call still ringing: 'fs-zammad outbox retry --unsure --call "
                    f"{row.call_id}'")
        elif outcome.config_error:
            hint = "fix the setting, then run 'fs-zammad outbox retry' to send the events set aside"
        else:
            hint = "'fs-zammad outbox list' shows it, 'fs-zammad outbox retry' sends it again"
        level = logging.ERROR if key not in self._reported else logging.DEBUG
        if len(self._reported) < REPORTED_MAX:
            self._reported.add(key)
        log.log(level, "Zammad%s: %s for call %s not delivered (HTTP %s: %s); set aside: %s",
                self._name, row.event, row.call_id, outcome.status or "-", why, hint)

    def drain(self, deadline: float) -> bool:
        """Keep sending until the outbox is empty or the deadline; True if empty."""
        while time.monotonic() < deadline:
            held = self.down_since is not None or self.problem is not None \
                or time.monotonic() < self._paused_until
            if self.idle or (held and not self._inflight):
                break
            self._wake.set()
            gevent.sleep(0.02)
        return self.idle

    def stop(self, deadline: float) -> None:
        """Stop starting requests; wait for the ones in flight until the deadline."""
        self._stopping = True
        self._wake.set()
        self._pool.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._inflight:
            log.warning("stopping with %d requests unanswered; they stay in the outbox",
                        len(self._inflight))
            self._pool.kill(timeout=1)
