"""``fs-zammad capture`` against the fake FreeSWITCH: what it writes is the
bytes FreeSWITCH sent (only event frames: never the login), ``replay`` reads
it back to the same Zammad requests as the source recording, and ``--call``
keeps exactly one call's legs out of a mixed stream."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from fs_zammad.calls import TRACKED_EVENTS
from fs_zammad.wire import iter_capture
from tests.support.fake_freeswitch import iter_frames
from tests.support.service import ESL_PASSWORD, FS_ZAMMAD, ServiceProcess, base_env

CALLCENTRE = Path(__file__).parent / "fixtures" / "callcentre"
S1 = CALLCENTRE / "S1" / "events_all.txt"
SUBSCRIBED = set(TRACKED_EVENTS) | {"HEARTBEAT"}


def replay_lines(path: Path) -> list[str]:
    """What ``fs-zammad replay`` prints for a file, without its '# path' line."""
    result = subprocess.run([FS_ZAMMAD, "replay", str(path)], env=base_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"# {path}"
    return lines[1:]


def wait_for_file(path: Path, predicate, timeout: float = 15.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        data = path.read_bytes() if path.exists() else b""
        if predicate(data):
            return data
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never reached the expected content ({len(data)} bytes)")
        time.sleep(0.05)


def frames(path: Path, names=None) -> bytes:
    """The recording's frames (of these event names), byte for byte."""
    return b"".join(raw for headers, raw in iter_frames(path)
                    if names is None or headers["Event-Name"] in names)


def event_names(data: bytes) -> list[str]:
    return [headers["Event-Name"] for headers in iter_capture(data)]


def start_capture(fake_fs, out: Path, *args: str, **env) -> ServiceProcess:
    before = fake_fs.connections_total
    capture = ServiceProcess(base_env(fake_fs, **env), "capture", str(out), *args)
    subscribed = fake_fs.wait_for_subscription(after=before)
    capture.subscribed = subscribed
    return capture


def test_capture_writes_what_the_service_reads_byte_for_byte_and_never_the_password(
        fake_fs, tmp_path):
    out = tmp_path / "capture.esl"
    capture = start_capture(fake_fs, out)
    assert capture.subscribed == SUBSCRIBED  # subscribed like the service
    fake_fs.replay(S1)
    fake_fs.heartbeat()  # sent last: once it is in the file, everything before is
    data = wait_for_file(out, lambda d: b"Event-Name: HEARTBEAT" in d)
    assert capture.stop() == 0
    capture.wait_for_log(r"^\d+ events written to .*capture\.esl")

    expected = frames(S1, SUBSCRIBED)
    assert data[:len(expected)] == expected
    assert event_names(data[len(expected):]) == ["HEARTBEAT"]
    assert replay_lines(out) == replay_lines(S1)
    assert ESL_PASSWORD.encode() not in data and b"auth" not in data
    assert os.stat(out).st_mode & 0o777 == 0o600
    capture.assert_no_secrets(ESL_PASSWORD)


def test_capture_all_is_the_recording_itself(fake_fs, tmp_path):
    out = tmp_path / "all.esl"
    capture = start_capture(fake_fs, out, "--all")
    assert "ALL" in capture.subscribed
    fake_fs.replay(S1)
    fake_fs.heartbeat()
    data = wait_for_file(out, lambda d: b"Event-Name: HEARTBEAT" in d)
    assert capture.stop() == 0
    recording = S1.read_bytes()
    assert data[:len(recording)] == recording
    assert event_names(data[len(recording):]) == ["HEARTBEAT"]
    capture.assert_no_secrets(ESL_PASSWORD)


def test_capture_call_keeps_exactly_that_calls_legs_from_a_mixed_stream(fake_fs, tmp_path):
    """Four calls interleaved frame by frame (a queue with a losing agent, a
    voicemail, a cancel); one capture per call, each with --call."""
    names = ("S1", "S15", "S17", "S3")
    sources = {name: CALLCENTRE / name / "events_all.txt" for name in names}
    call_ids = {name: replay_lines(path)[0].split("callId=")[1].split("&")[0]
                for name, path in sources.items()}
    captures = {name: start_capture(fake_fs, tmp_path / f"{name}.esl", "--call", call_ids[name])
                for name in names}
    streams = {name: list(iter_frames(path)) for name, path in sources.items()}
    for index in range(max(map(len, streams.values()))):
        for stream in streams.values():
            if index < len(stream):
                headers, raw = stream[index]
                fake_fs.emit_body(raw.split(b"\n\n", 1)[1])
    for name, capture in captures.items():
        # In order, nothing of the other calls (nor HEARTBEAT: no call's).
        expected = frames(sources[name], TRACKED_EVENTS)
        wait_for_file(tmp_path / f"{name}.esl", lambda d, e=expected: d == e)
        assert capture.stop() == 0
        assert replay_lines(tmp_path / f"{name}.esl") == replay_lines(sources[name]), name
        capture.assert_no_secrets(ESL_PASSWORD)


def test_capture_stops_by_itself_and_says_what_went_wrong(fake_fs, tmp_path):
    timed = ServiceProcess(base_env(fake_fs), "capture", str(tmp_path / "quiet.esl"),
                           "--seconds", "0.5")
    assert timed.proc.wait(timeout=20) == 0
    timed.wait_for_log(r"^0 events written")

    # FreeSWITCH goes away mid-capture: what was captured is kept and replays.
    cut = tmp_path / "cut.esl"
    capture = start_capture(fake_fs, cut)
    fake_fs.replay(S1)
    fake_fs.heartbeat()
    wait_for_file(cut, lambda d: b"Event-Name: HEARTBEAT" in d)
    fake_fs.drop()
    assert capture.proc.wait(timeout=20) == 1
    capture.wait_for_log("FreeSWITCH closed the connection")
    assert replay_lines(cut) == replay_lines(S1)

    wrong = ServiceProcess(base_env(fake_fs, FREESWITCH_PASSWORD="not-the-password"), "capture",
                           str(tmp_path / "wrong.esl"))
    assert wrong.proc.wait(timeout=20) == 1
    wrong.wait_for_log("rejected the event socket password")
    assert (tmp_path / "wrong.esl").read_bytes() == b""
    for process in (timed, capture, wrong):
        process.stop()
        process.assert_no_secrets(ESL_PASSWORD, "not-the-password")
