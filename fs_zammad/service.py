"""The running service: wires socket -> tracker -> outbox -> delivery.

Data flows one way: EslSupervisor hands each event to ``on_event``, which
asks the CallTracker what Zammad is now owed and stores that (and the calls'
state) in the outbox in one transaction; Delivery sends from the outbox.
``run()`` is the short main loop; SIGTERM/SIGINT only set an Event, and
``_shutdown()`` stops in explicit steps: stop reading, drain until the
deadline, then cut what is still in flight (it stays in the outbox).
"""

from __future__ import annotations

import json
import logging
import signal
import sqlite3
import time

import gevent
from gevent.event import Event

from fs_zammad import metrics, voicemail
from fs_zammad.calls import (
    FINISHED_MEMORY,
    HEADER_PREFIXES_READ,
    Call,
    CallTracker,
    FinishedCall,
    TrackerRules,
    channels_to_headers,
    saved_state,
)
from fs_zammad.causes import CauseMapper
from fs_zammad.config import Settings, url_variable
from fs_zammad.delivery import Delivery
from fs_zammad.esl import EslError, EslSupervisor
from fs_zammad.notify import Notifier
from fs_zammad.outbox import Outbox, ServiceLock, is_damage
from fs_zammad.salvage import open_outbox
from fs_zammad.tickets import TicketJobs
from fs_zammad.wire import HeaderFilter
from fs_zammad.zammad import DryRunClient, ZammadClient
from fs_zammad.zammad_api import ZammadApi

log = logging.getLogger("fs_zammad")
sent_log = logging.getLogger("fs_zammad.sent")

EXPIRY_INTERVAL = 30.0
CHECKPOINT_INTERVAL = 1.0
BATCH_MAX = 200
RESYNC_RETRY = 10.0


def tracker_rules(settings: Settings) -> TrackerRules:
    return TrackerRules(
        external_contexts=settings.external_contexts,
        external_profiles=settings.external_profiles,
        country_code=settings.country_code,
        national_prefix=settings.national_prefix,
        queue_keep_domain=settings.queue_keep_domain,
        max_call_seconds=settings.max_call_seconds,
        cause_mapper=CauseMapper(settings.cause_overrides),
        # The dry run logs every call as if sent to ZAMMAD_CTI_URL.
        instances=frozenset(settings.instances) or frozenset({""}),
        routes=settings.routes,
        agents=settings.agents,
    )


def outbox_path(settings: Settings) -> str:
    """The dry run keeps nothing: it must work without a writable directory."""
    return ":memory:" if settings.dry_run else str(settings.state_dir / "outbox.sqlite3")


class Service:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.lock = None
        if settings.dry_run:
            self.outbox = Outbox(":memory:", settings.outbox_max_events)
        else:
            # One service per outbox, for its whole life (OutboxInUse: exit 2).
            self.lock = ServiceLock(settings.state_dir)
            self.lock.acquire()
            self.outbox = open_outbox(outbox_path(settings), settings.outbox_max_events,
                                      background_checkpoint=True)
            cut = self.outbox.recover_cut_off()
            if cut:
                log.warning("%d hangups were being sent when the service last stopped; they may "
                            "have reached Zammad, so they are set aside as unsure: "
                            "'fs-zammad outbox list' shows them", cut)
        self.tracker = CallTracker(tracker_rules(settings), self._saved_calls())
        # One client and one delivery per Zammad system, each with its own
        # queue in the outbox: one tenant's outage never delays another's calls.
        clients = {"": DryRunClient()} if settings.dry_run else {
            name: ZammadClient(url, settings.zammad_timeout, settings.zammad_verify,
                               pool_size=settings.zammad_concurrency, setting=url_variable(name))
            for name, url in settings.instances.items()}
        self.deliveries = {
            name: Delivery(self.outbox, client, settings.zammad_concurrency,
                           settings.zammad_retry_max, on_sent=self._log_sent,
                           on_action=self._on_action, instance=name,
                           jobs=self._ticket_jobs(name))
            for name, client in clients.items()}
        # Voicemail tickets: also mod_voicemail's events, and their VM-* headers.
        events, headers = voicemail.events_read(bool(settings.voicemail))
        self.esl = EslSupervisor(
            settings.freeswitch_host, settings.freeswitch_port, settings.freeswitch_password,
            settings.freeswitch_timeout, settings.freeswitch_liveness,
            settings.freeswitch_reconnect_max, events=events,
            keep=HeaderFilter(headers, HEADER_PREFIXES_READ), on_event=self.on_event,
            after_frame=self.store_if_quiet, on_connected=self.on_connected,
            on_state=self._esl_state)
        self._resync_seen: set | None = None  # uuids seen while a resync is under way
        self._batch: list = []  # Zammad events not yet written (see on_event)
        self._saved: dict[str, int] = {}  # call id -> hash of the state last written
        self.stop_requested = Event()
        self.failed = False  # a worker died or the outbox is damaged: exit 1
        self.notifier = Notifier()  # systemd Type=notify; does nothing elsewhere
        metrics.bind(self)

    def _ticket_jobs(self, instance: str) -> TicketJobs | None:
        """The runner of an instance's voicemail ticket jobs (None: tickets off)."""
        if instance not in self.settings.voicemail:
            return None
        url, token = self.settings.api[instance]
        group, fallback_customer = self.settings.voicemail[instance]
        return TicketJobs(ZammadApi(url, token, self.settings.zammad_timeout,
                                    self.settings.zammad_verify), group, fallback_customer)

    def _saved_calls(self) -> list[Call | FinishedCall]:
        """Calls in progress at the last stop, and the legs of recently finished
        ones (their late events stay ignored); an unreadable one is logged and skipped."""
        calls = []
        for text in self.outbox.load_calls() + self.outbox.load_finished():
            try:
                calls.append(saved_state(text))
            except (ValueError, TypeError, KeyError) as exc:
                log.error("skipped a saved call the outbox cannot give back (%s): %.80s", exc, text)
        return calls

    # -- event path (runs in the ESL reader greenlet: keep it quick) ------------

    def on_event(self, headers) -> None:
        name = headers.get("Event-Name", "")
        metrics.EVENTS_RECEIVED.labels(name).inc()
        if name == "CUSTOM":
            if voicemail.left_message(headers):
                self._voicemail_left(headers)
        elif name != "HEARTBEAT":
            if self._resync_seen is not None:
                self._resync_seen.add(headers.get("Unique-ID", ""))
            self._batch += self.tracker.handle(headers, time.time())
        self.store_if_quiet()

    def store_if_quiet(self) -> None:
        """Write the Zammad events owed, unless more of the stream has arrived to share
        their transaction (up to BATCH_MAX). Run after every event, and by the reader
        after every other frame (a command's reply right after a call's hangup).

        A frame only partly here counts as more: the rest is on its way, and the
        once-a-second checkpoint writes the batch in any case. Call state that owes
        Zammad nothing waits (up to CHECKPOINT_INTERVAL, see _checkpoint_loop) to
        share a commit: the file then always holds the state after some prefix of
        the events read, with every Zammad event of that prefix. A kill -9 is then
        the same as a kill that much earlier, whose lost events the resync with
        FreeSWITCH settles, as it does for the events still in the socket.
        """
        if self._batch and (len(self._batch) >= BATCH_MAX or not self.esl.more_arrived()):
            self._store(())

    def write_waiting_state(self) -> None:
        """Write the call state that waits for company (see on_event)."""
        self._store(())

    def _voicemail_left(self, headers) -> None:
        """A message was left: its ticket job joins the call's events."""
        job, why = voicemail.ticket_job(headers, self.tracker.call_of_leg(
            headers.get("VM-UUID", "")), self.tracker.rules, self.settings.voicemail_path_map)
        if job is None:
            log.info("voicemail for %s@%s (leg %s): no ticket, %s", headers.get("VM-User", "?"),
                     headers.get("VM-Domain", "?"), headers.get("VM-UUID", "?"), why)
        elif job.instance not in self.settings.voicemail:
            log.info("voicemail of call %s: no ticket, VOICEMAIL_TICKETS is off for Zammad %s",
                     job.call_id, job.instance or "(default)")
        else:
            self._batch.append(job)

    def on_connected(self, supervisor: EslSupervisor) -> None:
        """After every (re)connect: learn which calls are up, settle the gap.

        The channel list is a snapshot taken while events keep coming. Events
        are handled as they are read, so when the answer has been read every
        event FreeSWITCH sent before it has been handled; the comparison leaves
        alone the legs that showed up in events since (their events tell their
        story).
        """
        known = self.tracker.leg_ids()
        self._resync_seen = set()
        try:
            body = supervisor.api("show channels as json")
            rows = json.loads(body or "{}").get("rows") or []
        except (EslError, ValueError, AttributeError) as exc:
            self._resync_seen = None
            log.warning("could not list FreeSWITCH's channels after connecting (%s); trying "
                        "again in %.0f s", exc, RESYNC_RETRY)
            connection = supervisor.reconnects
            gevent.spawn_later(RESYNC_RETRY, lambda: supervisor.connected and
                               supervisor.reconnects == connection and
                               self.on_connected(supervisor))
            return
        self._resync(rows, known)

    def _resync(self, rows, known) -> None:
        seen, self._resync_seen = self._resync_seen or set(), None
        events = self.tracker.reconcile(channels_to_headers(rows), time.time(),
                                        known=known, skip=seen)
        if events or self.tracker.calls:
            log.info("resync: %d channels up, %d calls followed, %d events from the gap",
                     len(rows), len(self.tracker.calls), len(events))
        self._store(events)
        self.outbox.settle_doubtful()

    def _store(self, events) -> None:
        """Write the Zammad events owed (and the calls' state) in one transaction."""
        tracker = self.tracker
        events, self._batch = self._batch + list(events), []
        if not events and not tracker.dirty:
            return
        upserts, deletes = tracker.dirty_rows()
        finished = tracker.take_finished()
        # A call whose saved form did not change need not be written again.
        saved = self._saved
        upserts = [(call_id, text) for call_id, text in upserts if saved.get(call_id) != hash(text)]
        # A disk that does not take them keeps them in the outbox's memory (bounded).
        refused = self.outbox.record(events, upserts, deletes, finished_calls=finished,
                                     keep_finished=FINISHED_MEMORY) \
            if events or upserts or deletes or finished else 0
        for call_id, text in upserts:
            saved[call_id] = hash(text)
        for call_id in deletes:
            saved.pop(call_id, None)
        tracker.dirty.clear()
        if refused:
            metrics.OUTBOX_REFUSED.inc(refused)
            if self.outbox.write_error:
                log.error("OUTBOX FULL (%d events wait in memory: %s in STATE_DIR): %d Zammad "
                          "events of new calls dropped", self.outbox.held,
                          self.outbox.write_error, refused)
            else:
                log.error("OUTBOX FULL (%d events, OUTBOX_MAX_EVENTS): %d Zammad events dropped "
                          "(Zammad down? see the warnings above)", self.outbox.max_events,
                          refused)
        for instance in {event.instance for event in events}:
            delivery = self.deliveries.get(instance)
            if delivery is not None:
                delivery.wake()

    def _esl_state(self, connected: bool) -> None:
        metrics.ESL_CONNECTED.set(connected)
        if connected and self.esl.reconnects:
            metrics.ESL_RECONNECTS.inc()
        # Ready once connected (the outbox is open since __init__); again is harmless.
        if connected:
            self.notifier.send("READY=1", "STATUS=connected to FreeSWITCH")
        elif not self.stop_requested.is_set():
            self.notifier.send("STATUS=not connected to FreeSWITCH, reconnecting")

    def _fail(self, why: str) -> None:
        if not self.failed:
            log.error("%s; stopping (exit 1) so that the container restarts", why)
        self.failed = True
        self.stop_requested.set()

    # -- delivery callbacks -------------------------------------------------------

    def _log_sent(self, row, outcome) -> None:
        fields = dict(row.fields)
        metrics.observe_sent(row, outcome)
        level = logging.INFO if outcome.kind == "delivered" else logging.WARNING
        # The dry run accepts everything: say what it did instead of "delivered".
        result, detail = ("dry-run", "not sent: ZAMMAD_CTI_URL is unset") \
            if self.settings.dry_run else (outcome.kind, outcome.detail or None)
        sent_log.log(level, "%s %s", row.event, result, extra={"event_fields": {
            "event": row.event, "callId": row.call_id, "direction": fields.get("direction"),
            "from": fields.get("from"), "to": fields.get("to"), "user": fields.get("user"),
            "cause": fields.get("cause"), "status": outcome.status or None,
            "ms": outcome.elapsed_ms, "result": result, "detail": detail}})

    def _on_action(self, row, action: dict) -> None:
        kind = action.get("action")
        if kind == "reject":
            if not self.settings.reject_blocked:
                log.info("Zammad's block list rejects call %s (%s); REJECT_BLOCKED=false, so it "
                         "rings on", row.call_id, action.get("reason", ""))
                return
            try:
                reply = self.esl.api(f"uuid_kill {row.call_id} {self.settings.reject_cause}")
                log.info("call %s rejected by Zammad's block list: hung up with %s (%s)",
                         row.call_id, self.settings.reject_cause, reply.strip() or "no reply")
            except EslError as exc:
                log.error("could not hang up blocked call %s: %s", row.call_id, exc)
        elif kind == "dial":
            log.info("Zammad suggests for call %s: dial %s with caller id %s", row.call_id,
                     action.get("number", "?"), action.get("caller_id", "?"))

    # -- lifecycle ------------------------------------------------------------

    def _expire_loop(self) -> None:
        while not self.stop_requested.is_set():
            self.stop_requested.wait(EXPIRY_INTERVAL)
            events = self.tracker.expire(time.time())
            if events:
                log.warning("%d calls exceeded MAX_CALL_SECONDS without a hangup; ended",
                            sum(1 for e in events if e.name == "hangup"))
            self._store(events)

    def _checkpoint(self) -> str | None:
        """Runs in a pool thread; the error, if any, as text."""
        try:
            self.outbox.checkpoint()
        except sqlite3.Error as exc:
            return str(exc)
        return None

    def _checkpoint_loop(self) -> None:
        """Every second: checkpoint, write what waits in memory (disk full), and
        notice rows that ``outbox retry`` put back in line from another process."""
        threadpool = gevent.get_hub().threadpool
        checkpoint_error = read_error = None  # each said once
        while not self.stop_requested.wait(CHECKPOINT_INTERVAL):
            self.write_waiting_state()
            # gevent prints the traceback of whatever a pool thread raises: return it instead.
            failed = threadpool.apply(self._checkpoint)
            if failed and failed != checkpoint_error:
                log.warning("outbox checkpoint failed: %s", failed)
            checkpoint_error = failed
            outbox = self.outbox
            try:
                changed = (outbox.writes_waiting and outbox.flush()) | outbox.changed_elsewhere()
                read_error = None
            except sqlite3.Error as exc:
                outbox.damaged = outbox.damaged or is_damage(exc)
                changed = False
                if not outbox.damaged and str(exc) != read_error:
                    log.warning("cannot read the outbox: %s", exc)
                read_error = str(exc)
            if outbox.damaged:
                self._fail(f"the outbox {outbox.path} is damaged ({outbox.write_error or read_error})"
                           "; the next start moves it aside and carries over what can be read")
                return
            if changed:
                for delivery in self.deliveries.values():
                    delivery.wake()

    def run(self) -> int:
        settings = self.settings
        targets = ", ".join(f"{name or 'default'}={delivery.client.redacted_url}"
                            for name, delivery in self.deliveries.items())
        log.info("fs-zammad starting: FreeSWITCH %s:%s -> Zammad %s; outbox %s (%d pending, %d "
                 "calls in progress)", settings.freeswitch_host, settings.freeswitch_port,
                 targets, self.outbox.path, self.outbox.pending, len(self.tracker.calls))
        if settings.dry_run:
            log.warning("ZAMMAD_CTI_URL is not set: dry run, events are logged, not sent")
        gevent.signal_handler(signal.SIGTERM, self.stop_requested.set)
        gevent.signal_handler(signal.SIGINT, self.stop_requested.set)
        checkpointer = gevent.spawn(self._checkpoint_loop)
        workers = [gevent.spawn(self.esl.run), gevent.spawn(self._expire_loop), checkpointer]
        workers += [gevent.spawn(delivery.run) for delivery in self.deliveries.values()]
        # The watchdog pings from this event loop only while every worker lives.
        workers.append(gevent.spawn(self.notifier.watchdog,
                                    lambda: not any(worker.dead for worker in workers),
                                    self.stop_requested))
        for worker in workers:
            worker.link_exception(lambda g: self._fail(f"internal error: {g.exception!r}"))
        server = metrics.serve(self) if settings.metrics_port else None
        self.stop_requested.wait()
        self._shutdown(workers, server, checkpointer)
        return 1 if self.failed else 0

    def _shutdown(self, workers, server, checkpointer) -> None:
        deadline = time.monotonic() + self.settings.shutdown_timeout
        self.notifier.send("STOPPING=1", "STATUS=stopping: sending what is queued")
        log.info("stopping: no more events from FreeSWITCH; sending what is queued (up to "
                 "%.0f s)", self.settings.shutdown_timeout)
        self.esl.stop()                      # 1. stop accepting
        self.write_waiting_state()
        drained = all([delivery.drain(deadline)  # 2. drain until the deadline (all keep sending)
                       for delivery in self.deliveries.values()])
        for delivery in self.deliveries.values():
            delivery.stop(deadline)          # 3. then cut the rest: it stays in the outbox
        if server is not None:
            server.stop(timeout=1)
        # The checkpoint runs in an OS thread that a kill would not stop: let it
        # finish (it ends by itself once stop is requested) before closing the file.
        checkpointer.join(timeout=60)
        gevent.killall(workers, timeout=2)
        held = self.outbox.held
        if not self.outbox.flush():
            log.error("the outbox still cannot be written (%s): %d events waiting in memory are "
                      "lost (the resync with FreeSWITCH at the next start settles the calls still "
                      "up), and events Zammad took meanwhile may be sent again (hangups among "
                      "them are set aside as unsure)", self.outbox.write_error, held)
        pending = self.outbox.recount()
        for delivery in self.deliveries.values():
            delivery.client.close()
            if delivery.jobs is not None:
                delivery.jobs.close()
        self.outbox.close()
        if self.lock is not None:
            self.lock.release()
        log.info("stopped%s; %d events kept in the outbox for the next start",
                 "" if drained else " before the queue was empty", pending)
