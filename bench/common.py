"""Shared by the bench processes: the S1 call template and /proc readers.

The call template is the real capture ``tests/fixtures/callcentre/S1/events_all.txt``
(inbound call, agent 1001 answers, caller hangs up: 57 frames, both legs).
Every 36-character UUID in it except ``Core-UUID`` (Unique-ID, Channel-Call-UUID,
Other-Leg-Unique-ID, variable_uuid, Application-UUID, variable_sip_call_id, ...)
is a *slot*; a synthetic call gets its own UUID for every slot. The new UUIDs
have the same length, so every Content-Length and frame offset stays valid and
a call is produced with one ``bytes.join`` over the pre-cut template.

Synthetic UUIDs encode the call: ``CCCCCCCC-SSSS-4TTT-8000-000000000000``
(C = call index, S = slot, T = run tag), so the Zammad stand-in's ``callId``
gives the call index back without any lookup table.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
S1_CAPTURE = ROOT / "tests" / "fixtures" / "callcentre" / "S1" / "events_all.txt"


def capture(name: str) -> Path:
    """A call-centre capture by scenario name (S1 inbound, S8 outbound, ...)."""
    return ROOT / "tests" / "fixtures" / "callcentre" / name / "events_all.txt"

UUID_RE = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Frame:
    name: str          # Event-Name
    raw: bytes         # the whole socket frame (outer header + body), as captured
    offset_s: float    # Event-Date-Timestamp relative to the first frame


def _split_frames(data: bytes) -> list[Frame]:
    frames = []
    pos = 0
    first_ts = None
    while pos < len(data):
        end = data.find(b"\n\n", pos)
        head = data[pos:end].decode()
        length = int(re.search(r"Content-Length: (\d+)", head).group(1))
        stop = end + 2 + length
        raw = data[pos:stop]
        body = data[end + 2:stop]
        name = re.search(rb"^Event-Name: (\S+)", body, re.M).group(1).decode()
        ts = int(re.search(rb"^Event-Date-Timestamp: (\d+)", body, re.M).group(1))
        first_ts = ts if first_ts is None else first_ts
        frames.append(Frame(name, raw, (ts - first_ts) / 1e6))
        pos = stop
    return frames


class CallTemplate:
    """The frames of one S1 call, filtered by a subscription, ready to stamp out."""

    def __init__(self, subscription: set[str] | None = None, path: Path = S1_CAPTURE):
        data = path.read_bytes()
        core = re.search(rb"^Core-UUID: (\S+)", data, re.M).group(1)
        all_frames = _split_frames(data)
        if subscription is None or "ALL" in subscription:
            frames = all_frames
        else:
            frames = [f for f in all_frames if f.name in subscription]
        self.frames = frames
        self.names = [f.name for f in frames]
        self.offsets_s = [f.offset_s for f in frames]
        self.blob = b"".join(f.raw for f in frames)
        self.bounds = []
        pos = 0
        for f in frames:
            self.bounds.append((pos, pos + len(f.raw)))
            pos += len(f.raw)
        seen: list[bytes] = []
        for found in UUID_RE.findall(b"".join(f.raw for f in all_frames)):
            if found != core and found not in seen:
                seen.append(found)
        self.slots = seen                # original UUIDs, slot = index
        # the blob cut at every slot UUID: parts[0], slot, parts[1], slot, ...
        slot_of = {u: i for i, u in enumerate(seen)}
        self._parts: list[bytes] = []
        self._part_slots: list[int] = []
        pos = 0
        for m in UUID_RE.finditer(self.blob):
            if m.group(0) in slot_of:
                self._parts.append(self.blob[pos:m.start()])
                self._part_slots.append(slot_of[m.group(0)])
                pos = m.end()
        self._tail = self.blob[pos:]
        self.a_leg = re.search(rb"^Unique-ID: (\S+)", all_frames[0].raw, re.M).group(1)
        self.bytes_per_call = len(self.blob)
        self.frames_per_call = len(frames)

    @staticmethod
    def uuid(call: int, slot: int, tag: int) -> bytes:
        return b"%08x-%04x-4%03x-8000-000000000000" % (call & 0xFFFFFFFF, slot, tag & 0xFFF)

    def call_blob(self, call: int, tag: int) -> bytes:
        uuids = [self.uuid(call, slot, tag) for slot in range(len(self.slots))]
        out = []
        for part, slot in zip(self._parts, self._part_slots):
            out.append(part)
            out.append(uuids[slot])
        out.append(self._tail)
        return b"".join(out)

    def call_frames(self, call: int, tag: int) -> list[bytes]:
        blob = self.call_blob(call, tag)
        return [blob[a:b] for a, b in self.bounds]


def call_index(call_id: str) -> int:
    return int(call_id[:8], 16)


# -- /proc readers ------------------------------------------------------------

def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, seconds (children not included)."""
    with open(f"/proc/{pid}/stat") as handle:
        text = handle.read()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_mem_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) in kB."""
    out = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


def proc_context_switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches summed over every thread of ``pid``.

    A voluntary switch is the process going to sleep (epoll_wait, a lock, a
    read with nothing to read): each one is a wake-up later.
    """
    vol = invol = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/status") as handle:
                for line in handle:
                    if line.startswith("voluntary_ctxt_switches:"):
                        vol += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        invol += int(line.split()[1])
        except OSError:   # a thread that just ended
            pass
    return vol, invol
