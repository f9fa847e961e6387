"""The ESL ``text/event-plain`` format (pure parsing, no sockets).

Each line of an event body is ``Name: url-encoded-value``. Values are decoded
*after* splitting the lines, so an encoded newline (``%0A``) stays inside its
value instead of forging a header (greenswitch decodes first). A repeated
header keeps its first value (``Hangup-Cause`` appears twice, equal).
"""

from __future__ import annotations

from typing import Iterator
from urllib.parse import unquote


class FrameError(ValueError):
    """Bytes that are not a valid ESL frame or event."""


def parse_event_plain(body: bytes | str) -> dict[str, str]:
    """One event body -> headers. Raises FrameError when it has no Event-Name."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", errors="replace")
    headers: dict[str, str] = {}
    for line in body.split("\n"):
        name, sep, value = line.partition(": ")
        if not sep:
            if line.strip():
                raise FrameError(f"event line without 'Name: value': {line[:60]!r}")
            continue
        if name not in headers:
            headers[name] = unquote(value.rstrip("\r"))
    if "Event-Name" not in headers:
        raise FrameError("event without Event-Name")
    return headers


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


def iter_capture(data: bytes) -> Iterator[dict[str, str]]:
    """Events from a captured socket byte stream (as in tests/fixtures).

    Frames that are not ``text/event-plain`` (command replies) are skipped;
    a truncated or malformed frame raises FrameError saying where.
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
        if head.get("Content-Type") == "text/event-plain":
            yield parse_event_plain(body)
