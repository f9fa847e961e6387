"""Ticket jobs (voicemail.py) -> Zammad tickets over the REST API.

Delivery hands a job row here instead of POSTing it to the CTI endpoint
and gets an ``Outcome`` back, so the job waits, backs off and is set aside
like every other event. One run:

1. The ticket may exist already (an earlier try whose answer was lost, a
   crash between the create and the outbox update): look for its marker
   first, with the search that reads Zammad's database, not its index.
2. The customer: who Zammad's caller log matched for this call (``known``
   before ``maybe``); else the customer with the caller's number, created
   with only that number if Zammad has none; an anonymous caller gets
   VOICEMAIL_CUSTOMER, or none.
3. The ticket, with the recording attached. A recording that cannot be read
   (not mounted, deleted, too big for Zammad) still gives a ticket whose
   article says where the file was and why it is missing.

``ticket_content`` and ``job_outcome`` are pure; reading the file and the
HTTP calls are the shell around them.
"""

from __future__ import annotations

import logging
import mimetypes
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import Callable, Mapping

from gevent.lock import BoundedSemaphore

from fs_zammad import zammad
from fs_zammad.zammad_api import (
    MAYBE,
    REFUSED,
    ApiError,
    Attachment,
    ZammadApi,
    caller_log_customers,
    normalize_number,
)

log = logging.getLogger("fs_zammad.tickets")

#: A recording bigger than this is not read into memory: Zammad's nginx takes
#: 50 MB per request by default, 36 MB of audio once in base64 (a five-minute
#: message, mod_voicemail's default limit, is about 5 MB as 8 kHz WAV).
RECORDING_MAX = 36 * 1024 * 1024
#: Zammad's ticket title column.
TITLE_MAX = 250
AUDIO_TYPES = {".wav": "audio/wav", ".mp3": "audio/mpeg", ".ogg": "audio/ogg",
               ".opus": "audio/ogg", ".flac": "audio/flac", ".gsm": "audio/x-gsm"}


@dataclass(frozen=True)
class Recording:
    """What became of reading a job's file: the attachment, or why there is none."""
    attachment: Attachment | None
    problem: str = ""


@dataclass(frozen=True)
class Customer:
    id: int | None = None
    login: str = ""   # VOICEMAIL_CUSTOMER (a login or email), used when id is None
    name: str = ""    # how Zammad names the caller, where known


def mime_type(path: str) -> str:
    suffix = PurePosixPath(path).suffix.lower()
    return AUDIO_TYPES.get(suffix) or mimetypes.guess_type(path)[0] or "application/octet-stream"


def read_recording(path: str, limit: int = RECORDING_MAX) -> Recording:
    """The file as an attachment, or why it cannot be one (one line)."""
    name = PurePosixPath(path).name
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except FileNotFoundError:
        return Recording(None, "was not found (deleted, or not mounted here: check "
                               "VOICEMAIL_PATH_MAP and the volume)")
    except IsADirectoryError:
        return Recording(None, "is a directory, not a file")
    except PermissionError:
        return Recording(None, "is not readable for fs-zammad (permissions)")
    except OSError as exc:
        return Recording(None, f"cannot be read: {exc.strerror or exc}")
    if len(data) > limit:
        return Recording(None, f"is bigger than {limit // (1024 * 1024)} MB: too big to attach")
    return Recording(Attachment(name, data, mime_type(path)))


def shown_number(number: str) -> str:
    """A phone number as people read it: +<digits> for an E.164 number."""
    return f"+{number}" if number.isdigit() and len(number) >= 6 else (number or "anonymous")


def _length(seconds: str) -> str:
    try:
        total = int(float(seconds))
    except ValueError:
        return seconds or "?"
    return f"{total // 60}:{total % 60:02d}"


def _time(epoch: str) -> str:
    try:
        return datetime.fromtimestamp(int(epoch), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (ValueError, OverflowError, OSError):
        return epoch or "?"


def ticket_content(job: Mapping[str, str], customer_name: str,
                   recording: Recording) -> tuple[str, str]:
    """(title, article body) of a job's ticket. The marker closes the title:
    it is how a later try finds this ticket."""
    number = job.get("from", "")
    name = customer_name or job.get("name", "")
    if normalize_number(name) == normalize_number(number) or not name.strip():
        name = ""
    who = shown_number(number) + (f" ({name[:80]})" if name else "")
    title = f"Voicemail from {who}"
    marker = f" [{job['marker']}]"
    title = title[:TITLE_MAX - len(marker)] + marker
    if recording.attachment is not None:
        file_line = (f"Recording: attached ({recording.attachment.filename}, "
                     f"{len(recording.attachment.data)} bytes)")
    else:
        where = job.get("file", "")
        if job.get("fs_file") and job["fs_file"] != where:
            where += f" (FreeSWITCH: {job['fs_file']})"
        file_line = f"Recording: missing. The file {where} {recording.problem}."
    body = "\n".join([
        f"Voicemail from {who}",
        f"Time: {_time(job.get('time', ''))}",
        f"Length: {_length(job.get('seconds', ''))}",
        f"Number dialled: {shown_number(job.get('to', ''))}",
        f"Mailbox: {job.get('mailbox') or '?'}",
        file_line,
        f"Call: {job.get('callId', '')} (Zammad's caller log)",
    ])
    return title, body


def job_outcome(error: ApiError, elapsed_ms: float = 0.0) -> zammad.Outcome:
    """A REST failure -> the Outcome delivery acts on (pure).

    Refused (401/403/404/422): set aside until the admin fixes it and runs
    ``outbox retry``. Everything else is tried again after a backoff,
    without holding the caller log's events: Zammad being down as a whole
    shows in those, and a job that may have been processed is looked for
    by its marker before the next create."""
    if error.kind == REFUSED:
        return zammad.Outcome(zammad.FAILED, error.status, error.detail, elapsed_ms=elapsed_ms,
                              config_error=True)
    return zammad.Outcome(zammad.RETRY, error.status, error.detail, elapsed_ms=elapsed_ms,
                          maybe_processed=error.kind == MAYBE)


class TicketJobs:
    """Runs ticket jobs against one Zammad system."""

    def __init__(self, api: ZammadApi, group: str, fallback_customer: str = "",
                 read: Callable[[str], Recording] = read_recording):
        self.api, self.group, self.fallback_customer, self.read = \
            api, group, fallback_customer, read
        # One job at a time: two messages of a new caller must not each create
        # a customer (Zammad's phones are not unique). Voicemails are rare.
        self._one_at_a_time = BoundedSemaphore(1)

    def close(self) -> None:
        self.api.close()

    def run(self, job: Mapping[str, str]) -> zammad.Outcome:
        started = time.monotonic()
        try:
            with self._one_at_a_time:
                detail = self._run(job)
        except ApiError as exc:
            return job_outcome(exc, round((time.monotonic() - started) * 1000, 1))
        return zammad.Outcome(zammad.DELIVERED, 201, detail,
                              elapsed_ms=round((time.monotonic() - started) * 1000, 1))

    def _run(self, job: Mapping[str, str]) -> str:
        existing = self.api.ticket_with_marker(job["marker"])
        if existing is not None:
            return f"ticket {existing.get('number', existing.get('id'))} exists already"
        customer = self._customer(job)
        recording = self.read(job["file"])
        try:
            ticket = self._create(job, customer, recording)
        except ApiError as exc:
            if exc.status != 413 or recording.attachment is None:
                raise
            # Refused by the proxy in front of Zammad before anything was stored.
            recording = Recording(None, f"({len(recording.attachment.data)} bytes) is too big "
                                        f"for Zammad (HTTP 413: raise client_max_body_size "
                                        f"in its nginx)")
            ticket = self._create(job, customer, recording)
        if recording.problem:  # once, when the ticket that says so exists
            log.warning("voicemail of call %s: recording %s %s; ticket %s says so",
                        job["callId"], job.get("file", ""), recording.problem,
                        ticket.get("number", ticket.get("id")))
        return f"ticket {ticket.get('number', ticket.get('id'))} created" + (
            "" if recording.attachment else " without the recording")

    def _create(self, job, customer: Customer, recording: Recording) -> dict:
        title, body = ticket_content(job, customer.name, recording)
        return self.api.create_ticket(
            title=title, group=self.group, body=body, customer_id=customer.id,
            customer=customer.login, subject=title, internal=True,
            attachments=[recording.attachment] if recording.attachment else [])

    def _customer(self, job: Mapping[str, str]) -> Customer:
        entry = self.api.caller_log_entry(job["callId"])
        matched = caller_log_customers(entry) if entry else []
        if matched:
            # Zammad's names of the matched users ("maybe ..." when none is known)
            name = str(entry.get("from_comment") or "").removeprefix("maybe ")
            return Customer(matched[0], name=name)
        number = job.get("from", "")
        if len(normalize_number(number)) >= 6:
            user = self.api.customer_for_phone(number)
            name = " ".join(filter(None, (user.get("firstname"), user.get("lastname"))))
            return Customer(user["id"], name=name)
        return Customer(login=self.fallback_customer)


def check_tickets(api: ZammadApi, group: str, label: str) -> list[tuple[bool, str]]:
    """``fs-zammad check``: may the token make voicemail tickets in ``group``
    (the user's group access, §6) and read the caller log (``cti.agent``)?"""
    lines = []
    try:
        groups = api.me(expand=True).get("groups") or {}
    except ApiError as exc:
        return [(False, f"{label}: voicemail tickets: the token does not work ({exc})")]
    access = groups.get(group) if isinstance(groups, dict) else None
    access = {access} if isinstance(access, str) else set(access or ())
    if access & {"full", "create"}:
        lines.append((True, f"{label}: voicemail tickets go to group {group!r}"))
    elif group in groups:
        lines.append((False, f"{label}: VOICEMAIL_GROUP {group!r}: the token's user may not "
                             f"create tickets there (access: {', '.join(sorted(access))}); "
                             "give it 'create' or 'full' in that group"))
    else:
        known = ", ".join(sorted(map(str, groups))) or "none"
        lines.append((False, f"{label}: VOICEMAIL_GROUP {group!r} is not a group the token's "
                             f"user can use (its groups: {known}); check the name"))
    try:
        api.caller_log_entry("fs-zammad-check")
    except ApiError as exc:
        why = "the token needs cti.agent to read the caller log" if exc.status == 403 \
            else "caller log not readable"
        lines.append((False, f"{label}: voicemail tickets: {why} ({exc})"))
    else:
        lines.append((True, f"{label}: caller log readable (finds each caller as Zammad "
                            "matched them)"))
    return lines
