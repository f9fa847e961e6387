"""The ESL ``text/event-plain`` format (pure parsing, no sockets).

Each line of an event body is ``Name: url-encoded-value``. Values are decoded
*after* splitting the lines, so an encoded newline (``%0A``) stays inside its
value instead of forging a header (greenswitch decodes first). A repeated
header (``Hangup-Cause`` appears twice) keeps its first value.

An event has about 150 headers and fs_zammad reads about 25 of them, so a
value is decoded when it is first read, not when the event arrives: that is
most of the cost of receiving an event.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Iterator
from urllib.parse import unquote


class FrameError(ValueError):
    """Bytes that are not a valid ESL frame or event."""


_LINE = re.compile(r"^([^:\n]+): ([^\n]*)$", re.M)


class EventHeaders(Mapping):
    """Read-only headers of one event; values URL-decoded on first access."""

    __slots__ = ("_raw", "_decoded")

    def __init__(self, raw: dict[str, str]):
        self._raw = raw
        self._decoded: dict[str, str] = {}

    def __getitem__(self, name: str) -> str:
        try:
            return self._decoded[name]
        except KeyError:
            value = self._raw[name]
            if "%" in value:
                value = unquote(value)
            self._decoded[name] = value
            return value

    def get(self, name: str, default=None):
        try:
            return self[name]
        except KeyError:
            return default

    def __contains__(self, name) -> bool:
        return name in self._raw

    def __iter__(self):
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)


class HeaderFilter:
    """Which headers :func:`parse_event_plain` keeps: these names and prefixes.

    A queued event then holds a few KB instead of ~25 KB.
    """

    def __init__(self, names, prefixes=()):
        self.names = frozenset(names) | {"Event-Name"}
        self.prefixes = tuple(prefixes)

    def __call__(self, name: str) -> bool:
        return name in self.names or name.startswith(self.prefixes)


def parse_event_plain(body: bytes | str, keep: HeaderFilter | None = None) -> EventHeaders:
    """One event body -> headers (all, or those ``keep`` accepts).

    Raises FrameError when it has no Event-Name.
    """
    if isinstance(body, bytes):
        body = body.decode("utf-8", errors="replace")
    if "\r" in body:
        body = body.replace("\r\n", "\n")
    raw: dict[str, str] = {}
    for name, value in _LINE.findall(body):
        if name not in raw and (keep is None or keep(name)):
            raw[name] = value
    if "Event-Name" not in raw:
        stray = next((line for line in body.split("\n") if line and ": " not in line), "")
        raise FrameError(f"event line without 'Name: value': {stray[:60]!r}" if stray
                         else "event without Event-Name")
    return EventHeaders(raw)


def split_frame_head(head: bytes | str) -> dict[str, str]:
    """The header block of a socket frame (not URL-encoded)."""
    if isinstance(head, bytes):
        head = head.decode("utf-8", errors="replace")
    headers = {}
    for line in head.strip("\n").split("\n"):
        name, sep, value = line.partition(": ")
        if not sep:
            raise FrameError(f"frame header line without 'Name: value': {line[:60]!r}")
        headers[name] = value.strip()
    return headers


def iter_frames(data: bytes) -> Iterator[tuple[dict[str, str], bytes]]:
    """(frame head, body) pairs from a captured socket byte stream.

    A truncated or malformed frame raises FrameError saying where.
    """
    pos = 0
    while pos < len(data):
        if data[pos:pos + 1] in (b"\n", b"\r"):
            pos += 1
            continue
        end = data.find(b"\n\n", pos)
        if end < 0:
            raise FrameError(f"unterminated frame header at byte {pos}")
        head = split_frame_head(data[pos:end])
        pos = end + 2
        try:
            length = int(head.get("Content-Length", "0"))
        except ValueError:
            raise FrameError(f"bad Content-Length {head.get('Content-Length')!r}") from None
        body = data[pos:pos + length]
        if len(body) < length:
            raise FrameError(f"frame at byte {end} is cut short ({len(body)} of {length} bytes)")
        pos += length
        yield head, body


def iter_capture(data: bytes, keep: HeaderFilter | None = None) -> Iterator[EventHeaders]:
    """The events of a captured socket byte stream (as in tests/fixtures);
    frames that are not ``text/event-plain`` (command replies) are skipped."""
    for head, body in iter_frames(data):
        if head.get("Content-Type") == "text/event-plain":
            yield parse_event_plain(body, keep)
