"""The ESL ``text/event-plain`` format (pure parsing, no sockets).

Each line of an event body is ``Name: url-encoded-value``. Values are decoded
*after* splitting the lines, so an encoded newline (``%0A``) stays inside its
value instead of forging a header (greenswitch decodes first). A repeated
header (``Hangup-Cause`` appears twice) keeps its first value.

An event has about 150 headers and fs_zammad reads about 35 of them, so only
those are picked out (one regex, see HeaderFilter) and a value is decoded when
it is first read, not when the event arrives: that is most of the cost of
receiving an event.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Iterator
from urllib.parse import unquote

#: A header value is cut here (URL-encoded length): fs_zammad reads numbers,
#: names, causes and application names, Zammad stores at most 250 characters
#: of any of them, and every event queued or call saved holds its values, so
#: a 900 KB caller id must not be kept whole.
MAX_VALUE = 1024


class FrameError(ValueError):
    """Bytes that are not a valid ESL frame or event."""


class OutOfStep(FrameError):
    """A frame that holds more than one event: its length was wrong, and what
    follows it is read out of step."""


# A value is matched up to MAX_VALUE characters; the rest of its line is
# skipped, since the next match starts at a line's beginning.
_VALUE = r"([^\n]{0,%d})" % MAX_VALUE
_LINE = re.compile(r"^([^:\n]+): " + _VALUE, re.M)


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

    A queued event then holds a few KB instead of ~25 KB. The wanted lines
    are found by one regex whose names form a trie, so the regex engine drops
    an unwanted line after a few characters: testing each of ~150 lines in
    Python cost four times as much (bench/README.md, "Where the time goes").
    """

    def __init__(self, names, prefixes=()):
        self.names = frozenset(names) | {"Event-Name"}
        self.prefixes = tuple(prefixes)
        for word in (*self.names, *self.prefixes):
            # A header name never holds these; the regex below relies on it.
            if not word or any(c in word for c in (":", "\n", "\r", "\x00")):
                raise ValueError(f"not a header name: {word!r}")
        words = [re.escape(name) for name in self.names]
        words += [re.escape(prefix) + _ANY_NAME_REST for prefix in self.prefixes]
        self.lines = re.compile(r"\n(" + _trie(words) + r"): " + _VALUE)

    def __call__(self, name: str) -> bool:
        return name in self.names or name.startswith(self.prefixes)


_ANY_NAME_REST = "\x00"  # stands for [^:\n]* until the trie is built


def _trie(words: list[str]) -> str:
    """A regex alternation of ``words`` (regex-escaped) that shares common prefixes.

    The words are split into tokens (one character, or an escape), so the
    result matches exactly the same strings as ``"|".join(words)``.
    """
    tree: dict = {}
    for word in words:
        node = tree
        for token in re.findall(r"\\.|.", word, re.S):
            node = node.setdefault(token, {})
        node[""] = {}

    def emit(node: dict) -> str:
        branches = [("[^:\\n]*" if token == _ANY_NAME_REST else token) + emit(child)
                    for token, child in sorted(node.items()) if token]
        if not branches:
            return ""
        ends_here = "" in node
        if len(branches) == 1 and not ends_here:
            return branches[0]
        return "(?:" + "|".join(branches) + ")" + ("?" if ends_here else "")
    return emit(tree)


def parse_event_plain(body: bytes | str, keep: HeaderFilter | None = None,
                      one_event: bool = False) -> EventHeaders:
    """One event body -> headers (all, or those the HeaderFilter ``keep`` accepts).

    Raises FrameError when it has no Event-Name; with ``one_event``, OutOfStep when
    it has two (a frame that holds more than one event, or an event whose own body
    is an event's text: the caller tells which).
    """
    if isinstance(body, bytes):
        body = body.decode("utf-8", errors="replace")
    if "\r" in body:
        body = body.replace("\r\n", "\n")
    raw: dict[str, str] = {}
    lines = _LINE.findall(body) if keep is None else keep.lines.findall("\n" + body)
    for name, value in lines:
        if name not in raw:
            raw[name] = value
        elif one_event and name == "Event-Name":  # (other names repeat: Hangup-Cause)
            raise OutOfStep("two events in one frame")
    if "Event-Name" not in raw:
        stray = next((line for line in body.split("\n") if line and ": " not in line), "")
        raise FrameError(f"event line without 'Name: value': {stray[:60]!r}" if stray
                         else "event without Event-Name")
    return EventHeaders(raw)


def split_frame_head(head: bytes | str) -> dict[str, str]:
    """The header block of a socket frame (not URL-encoded)."""
    if isinstance(head, bytes):
        head = head.decode("utf-8", errors="replace")
    return dict(split_frame_head_line(line) for line in head.strip("\n").split("\n"))


def split_frame_head_line(line: bytes | str) -> tuple[str, str]:
    """One ``Name: value`` line of a socket frame's head."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")
    name, sep, value = line.partition(": ")
    if not sep:
        raise FrameError(f"frame header line without 'Name: value': {line.strip()[:60]!r}")
    return name, value.strip()


def content_length(text: str, limit: int = 1 << 40) -> int:
    """A frame's Content-Length: digits only (int() would take "-5", " 7" and "1_0"; a
    negative length walks a reader backwards) and at most ``limit``."""
    if not (text.isascii() and text.isdigit()) or len(text) > 12:
        raise FrameError(f"bad Content-Length {text[:40]!r}")
    length = int(text)
    if length > limit:
        raise FrameError(f"Content-Length {length} over the {limit}-byte bound")
    return length


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
        length = content_length(head.get("Content-Length", "0"))
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
