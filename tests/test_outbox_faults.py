"""One service per outbox, the CLI next to a running service, damaged outboxes
and a full disk: the real processes. Each test ends with what Zammad has:
every call once, never a second hangup, no traceback anywhere."""

import json
import os
import pathlib
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from fs_zammad.calls import CallTracker, ZammadEvent, saved_state
from fs_zammad.config import load_settings
from fs_zammad.outbox import Outbox
from fs_zammad.service import tracker_rules
from tests import synth
from tests.support.service import ESL_PASSWORD, FS_ZAMMAD, ServiceProcess, base_env
from tests.test_e2e import emit_all
from tests.test_faults import answered_call, channels_json, missed_call


def cli(env, *args, timeout=30):
    done = subprocess.run([FS_ZAMMAD, "outbox", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    assert "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    return done


def hangups_by_call(zammad):
    return {e["callId"]: e["hangups"] for e in zammad.caller_log()}


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthz(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# -- one service per outbox ----------------------------------------------------------


def test_second_service_on_the_same_outbox_exits_2_naming_the_first(start_service, fake_fs,
                                                                    zammad):
    first = start_service()
    calls = [missed_call(f"4931100{i:03d}") for i in range(6)]
    for _, events in calls[:3]:
        emit_all(fake_fs, events)
    second = ServiceProcess(first.env)
    assert second.proc.wait(timeout=30) == 2
    second._reader.join(timeout=5)
    assert len(second.lines) == 1, second.lines
    assert f"PID {first.proc.pid}" in second.lines[0] and "STATE_DIR" in second.lines[0]
    second.assert_no_secrets(ESL_PASSWORD, zammad.token)
    for _, events in calls[3:]:               # the first goes on as if nothing happened
        emit_all(fake_fs, events)
    zammad.wait_for(lambda: sum(hangups_by_call(zammad).values()) == 6, timeout=20)
    assert hangups_by_call(zammad) == {a.uuid: 1 for a, _ in calls}
    assert all(len(zammad.requests_for(a.uuid)) == 2 for a, _ in calls)  # newCall + hangup, once
    # kill -9 frees the lock: the next service starts at once
    first.kill()
    third = start_service()
    third.wait_for_log("fs-zammad starting")


# -- the CLI next to a running service --------------------------------------------------


def test_hangup_cut_off_by_kill_is_set_aside_once_by_the_next_service(start_service, fake_fs,
                                                                       zammad):
    service = start_service(ZAMMAD_TIMEOUT="30")
    a, events = missed_call("4932300000")
    emit_all(fake_fs, events[:2])
    zammad.wait_for(lambda: len(zammad.caller_log()) == 1)
    zammad.set_hang(2)                          # Zammad stores the hangup, answers late
    emit_all(fake_fs, events[2:])
    zammad.wait_for(lambda: any(r.event == "hangup" for r in zammad.requests))
    service.kill()                              # while the hangup is in flight
    zammad.set_hang(None)
    listing = cli(service.env, "list").stdout   # no service: still no recovery by the CLI
    assert ": 1 pending, 0 set aside, 0 unsure" in listing, listing
    restarted = start_service()
    restarted.wait_for_log("1 hangups were being sent when the service last stopped")
    listing = cli(restarted.env, "list").stdout
    assert "1 unsure hangups" in listing and a.uuid in listing and "process stopped" in listing
    zammad.wait_for(lambda: hangups_by_call(zammad) == {a.uuid: 1}, timeout=10)
    b, more = missed_call("4932300001")         # the next call goes through; a's is not resent
    emit_all(fake_fs, more)
    zammad.wait_for(lambda: hangups_by_call(zammad).get(b.uuid) == 1, timeout=10)
    assert hangups_by_call(zammad) == {a.uuid: 1, b.uuid: 1}
    assert [r.event for r in zammad.requests_for(a.uuid)] == ["newCall", "hangup"]



def test_cli_next_to_a_running_service_leaves_hangups_in_flight_alone(start_service, fake_fs,
                                                                      zammad):
    service = start_service(ZAMMAD_TIMEOUT="5")
    zammad.set_delay(0.15)                     # every hangup spends a while in flight
    calls = [missed_call(f"4931200{i:03d}") for i in range(16)]
    talking = [answered_call(f"4931300{i:03d}") for i in range(4)]
    runs, stop = [], threading.Event()

    def admin():  # what an admin may run at any moment, over and over
        commands = [("list",), ("retry",), ("retry", "--unsure", "--yes"), ("list",),
                    ("retry", "--unsure", "--call", calls[0][0].uuid)]
        while not stop.is_set():
            for args in commands:
                done = cli(service.env, *args)
                runs.append((args, done.returncode, done.stdout + done.stderr))

    thread = threading.Thread(target=admin)
    thread.start()
    try:
        for _, events in calls:            # calls keep coming while the admin works
            emit_all(fake_fs, events)
            time.sleep(0.1)
        for _, _, start, end in talking:
            emit_all(fake_fs, start + end)
        zammad.wait_for(lambda: sum(hangups_by_call(zammad).values()) == 20 and len(runs) >= 10,
                        timeout=40)
    finally:
        stop.set()
        thread.join(timeout=60)
    # (a --call that matches nothing says so and exits 1: the call has nothing set aside)
    assert all(code == 0 or (code == 1 and "--call" in args and "nothing changed" in out)
               for args, code, out in runs), runs
    assert not any("unsure" in out and " 0 unsure" not in out for args, _, out in runs
                   if args == ("list",)), runs
    expected = {a.uuid: 1 for a, _ in calls} | {t[0].uuid: 1 for t in talking}
    assert hangups_by_call(zammad) == expected
    assert [r.event for r in zammad.requests].count("hangup") == 20
    assert cli(service.env, "list").stdout.startswith(f"{service.env['STATE_DIR']}"
                                                      "/outbox.sqlite3: 0 pending, 0 set aside, "
                                                      "0 unsure")
    assert "unsure" not in service.log.replace("0 unsure", "")


def make_unsure_hangups(start_service, fake_fs, zammad, n=3):
    """n missed calls whose hangup's connection is lost mid-request: (service, calls,
    the ids of those listed unsure, the listing)."""
    service = start_service(ZAMMAD_TIMEOUT="2")
    calls = [missed_call(f"4931400{i:03d}") for i in range(n)]
    for _, events in calls:
        emit_all(fake_fs, events[:2])
    zammad.wait_for(lambda: len(zammad.caller_log()) == n)
    zammad.close_without_response_next(n)       # the connection is lost mid-request
    for _, events in calls:
        emit_all(fake_fs, events[2:])
    service.wait_for_log("may have reached Zammad")
    listing = ""
    deadline = time.monotonic() + 20
    while ": 0 pending" not in listing and time.monotonic() < deadline:
        listing = cli(service.env, "list").stdout
    # a probe may have taken one of the closed connections: that hangup went through
    return service, calls, [a.uuid for a, _ in calls if a.uuid in listing], listing


def test_unsure_hangups_listed_with_their_call_and_sent_only_when_confirmed(start_service,
                                                                           fake_fs, zammad):
    service, calls, unsure, listing = make_unsure_hangups(start_service, fake_fs, zammad)
    assert len(unsure) >= 2 and f": 0 pending, 0 set aside, {len(unsure)} unsure hangups" \
        in listing, listing
    for call_id in unsure:   # the call: direction, from, to, time, and why
        line = next(line for line in listing.splitlines() if call_id in line)
        assert " in " in line and "from 4931400" in line and "to 492214710334" in line
        assert time.strftime("%Y-%m-%d", time.gmtime()) in line and "UTC" in line
    assert listing.count("why: ") == len(unsure)
    before = hangups_by_call(zammad)
    assert before == {a.uuid: int(a.uuid not in unsure) for a, _ in calls}
    refused = cli(service.env, "retry", "--unsure")   # no terminal, no --yes
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "--yes" in refused.stderr
    assert f"{len(unsure)} unsure hangups" in cli(service.env, "list").stdout
    time.sleep(1.5)                                    # the service would have seen a change
    assert hangups_by_call(zammad) == before
    sent = cli(service.env, "retry", "--unsure", "--yes")
    assert sent.returncode == 0 and f"{len(unsure)} events put back in line" in sent.stdout
    assert "running service" in sent.stdout
    zammad.wait_for(lambda: sum(hangups_by_call(zammad).values()) == 3, timeout=10)
    assert hangups_by_call(zammad) == {a.uuid: 1 for a, _ in calls}


def test_unsure_hangups_that_arrived_are_dropped_only_when_named_or_confirmed(
        start_service, fake_fs, zammad):
    service, calls, unsure, _ = make_unsure_hangups(start_service, fake_fs, zammad)
    assert len(unsure) >= 2
    before = hangups_by_call(zammad)
    for args in (("drop",), ("drop", "--unsure")):   # nothing named; no terminal, no --yes
        refused = cli(service.env, *args)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused
    plain = cli(service.env, "retry", "--call", unsure[0])   # its hangup needs --unsure
    assert plain.returncode == 1 and "add --unsure" in plain.stderr, plain
    one = cli(service.env, "drop", "--call", unsure[0])
    assert one.returncode == 0 and f"1 unsure hangups forgotten (call {unsure[0]})" in one.stdout
    for args in (("drop", "--call", unsure[0]), ("retry", "--call", "no-such-call")):
        again = cli(service.env, *args)               # gone already; a mistyped callId
        assert again.returncode == 1 and again.stderr.count("\n") == 1, again
        assert "nothing changed" in again.stderr and "outbox list" in again.stderr, again
    assert f"{len(unsure) - 1} unsure hangups" in cli(service.env, "list").stdout
    rest = cli(service.env, "drop", "--unsure", "--yes")
    assert rest.returncode == 0 and f"{len(unsure) - 1} unsure hangups forgotten" in rest.stdout
    listing = cli(service.env, "list").stdout
    assert ": 0 pending, 0 set aside, 0 unsure hangups" in listing, listing
    time.sleep(1.5)                               # the service has seen the change
    assert hangups_by_call(zammad) == before      # and sent nothing for it
    a, events = missed_call("4931499999")         # the service goes on as before
    emit_all(fake_fs, events)
    zammad.wait_for(lambda: hangups_by_call(zammad).get(a.uuid) == 1, timeout=10)
    assert "Traceback" not in service.log


def test_unsure_retry_asks_on_a_terminal(start_service, fake_fs, zammad):
    import pty

    service = start_service(ZAMMAD_TIMEOUT="2")
    a, events = missed_call("4931500000")
    emit_all(fake_fs, events[:2])
    zammad.wait_for(lambda: len(zammad.caller_log()) == 1)
    zammad.close_without_response_next(1)
    emit_all(fake_fs, events[2:])
    service.wait_for_log("may have reached Zammad")

    def on_terminal(answer: bytes) -> str:
        pid, fd = pty.fork()
        if pid == 0:
            os.execve(FS_ZAMMAD, [FS_ZAMMAD, "outbox", "retry", "--unsure"], service.env)
        out = b""
        while b"[y/N]" not in out:
            out += os.read(fd, 4096)
        os.write(fd, answer)
        while True:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        os.waitpid(pid, 0)
        return out.decode()

    declined = on_terminal(b"n\n")
    assert a.uuid in declined and "nothing changed" in declined
    assert hangups_by_call(zammad) == {a.uuid: 0}
    accepted = on_terminal(b"y\n")
    assert "1 events put back in line" in accepted and "Traceback" not in accepted
    zammad.wait_for(lambda: hangups_by_call(zammad) == {a.uuid: 1}, timeout=10)


@pytest.mark.parametrize("setup, words", [
    ("missing", "no outbox at"),
    ("garbage", "damaged"),
    ("directory", "cannot use the outbox"),
    ("no_table", "damaged"),
])
def test_cli_errors_are_one_line(tmp_path, setup, words):
    state = tmp_path / "state"
    path = state / "outbox.sqlite3"
    if setup != "missing":
        state.mkdir()
    if setup == "garbage":
        path.write_bytes(random.Random(1).randbytes(9000))
    elif setup == "directory":
        path.mkdir()
    elif setup == "no_table":
        sqlite3.connect(path).execute("CREATE TABLE other (x)").connection.close()
    env = base_env(state_dir=state)
    for args in (("list",), ("retry",), ("retry", "--unsure", "--yes")):
        done = cli(env, *args)
        out = (done.stdout + done.stderr).strip()
        assert "\n" not in out and words in out, out
        assert done.returncode == (0 if setup == "missing" else 1)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root to run the CLI as another user")
@pytest.mark.parametrize("mode", [0o600, 0o700])   # the file, then the directory, not ours
def test_cli_as_the_wrong_user_says_so_in_one_line(mode):
    import tempfile

    top = tempfile.mkdtemp(prefix="fs-zammad-perm-")   # pytest's tmp is private to root
    os.chmod(top, 0o755)
    state = pathlib.Path(top) / "state"
    Outbox(state / "outbox.sqlite3").close()
    (state / "outbox.sqlite3").chmod(mode)
    state.chmod(0o755 if mode == 0o600 else mode)
    try:
        run_as_nobody(state)
    finally:
        shutil.rmtree(top)


@pytest.mark.parametrize("setup,words", [
    ("the file is root's", "cannot write the outbox"),
    ("its -shm is a directory", "cannot write the outbox"),
    ("its -wal is a directory", "outbox.sqlite3-wal there is a directory, not a file: move it"),
    ("its -wal is a dangling link", "outbox.sqlite3-wal there is a link to nothing"),
    ("its -wal is root's", "let this user read and write outbox.sqlite3-wal there"),
])
def test_an_outbox_the_service_cannot_write_stops_the_start_in_one_line(setup, words):
    import tempfile

    top = tempfile.mkdtemp(prefix="fs-zammad-ro-")
    os.chmod(top, 0o755)
    state = pathlib.Path(top) / "state"
    Outbox(state / "outbox.sqlite3").close()
    before = (state / "outbox.sqlite3").read_bytes()
    command = [FS_ZAMMAD, "run"]
    if setup in ("the file is root's", "its -wal is root's"):
        if os.geteuid() != 0 or not shutil.which("setpriv"):
            pytest.skip("needs root to run the service as another user")
        state.chmod(0o777)   # the directory may be written (lock, -wal), the file may not
        if setup == "the file is root's":
            (state / "outbox.sqlite3").chmod(0o644)
        else:
            (state / "outbox.sqlite3").chmod(0o666)
            wal = state / "outbox.sqlite3-wal"
            wal.write_bytes(b"")
            wal.chmod(0o600)
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    elif setup == "its -shm is a directory":
        (state / "outbox.sqlite3-shm").mkdir()
    elif setup == "its -wal is a directory":
        (state / "outbox.sqlite3-wal").mkdir()
    else:
        (state / "outbox.sqlite3-wal").symlink_to(pathlib.Path(top) / "gone" / "wal")
    try:
        env = base_env(state_dir=state, ZAMMAD_CTI_URL="http://127.0.0.1:9/api/v1/cti/t0k")
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
        out = (done.stdout + done.stderr).strip()
        assert done.returncode == 1 and "Traceback" not in out, out
        errors = [x for x in out.splitlines() if "cannot start" in x]
        assert len(errors) == 1 and words in errors[0], out
        # nothing moved aside, nothing lost: the file is there for the next start
        assert (state / "outbox.sqlite3").read_bytes() == before
        assert not list(state.glob("*.damaged-*"))
    finally:
        shutil.rmtree(top)


def run_as_nobody(state):
    for args in (("list",), ("retry",)):
        done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               FS_ZAMMAD, "outbox", *args], env=base_env(state_dir=state),
                              capture_output=True, text=True, timeout=30)
        out = (done.stdout + done.stderr).strip()
        assert done.returncode == 1 and "\n" not in out and "Traceback" not in out, out
        assert "run this as the user the service runs as" in out, out


# -- damaged outboxes -----------------------------------------------------------------


def write_outbox(state, n_ended=40, n_up=3):
    """A real outbox: ended missed calls waiting for Zammad, and calls still ringing."""
    settings = load_settings({"STATE_DIR": str(state)})
    tracker = CallTracker(tracker_rules(settings))
    box = Outbox(state / "outbox.sqlite3")
    ended, up, now = [], [], time.time()
    for i in range(n_ended + n_up):
        a = synth.caller(cid=f"49316{i:05d}")
        headers = [a.create(), a.execute("bridge")]
        if i < n_ended:
            headers.append(a.hangup("NORMAL_CLEARING", "recv_cancel"))
        (ended if i < n_ended else up).append(a.uuid)
        for h in headers:
            box.record(tracker.handle(h, now), *tracker.dirty_rows())
            tracker.dirty.clear()
    # No free pages: the last page holds rows (the truncation cases cut into it).
    box.db.execute("VACUUM")
    box.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    box.close()
    return ended, up


def truncate_at(fraction):
    def damage(path):
        size = path.stat().st_size
        os.truncate(path, max(100, int(size * fraction)))
    return damage


def zero_middle_page(path):
    page = 4096
    with open(path, "r+b") as handle:
        handle.seek((path.stat().st_size // page // 2) * page)
        handle.write(b"\0" * page)


def garbage(path):
    path.write_bytes(random.Random(7).randbytes(path.stat().st_size))


def garbage_header(path):
    with open(path, "r+b") as handle:
        handle.write(random.Random(3).randbytes(100))


def garbage_wal(path):
    path.with_name(path.name + "-wal").write_bytes(random.Random(5).randbytes(40_000))


def garbage_shm(path):
    path.with_name(path.name + "-shm").write_bytes(random.Random(6).randbytes(32_768))


def a_directory(path):
    path.unlink()
    path.mkdir()
    (path / "x").write_text("x")


def no_permissions(path):
    path.chmod(0)


# damage -> (moved aside?, least share of the ended calls carried over)
DAMAGE = {
    "random garbage": (garbage, True, 0.0),
    "garbage header": (garbage_header, True, 0.0),
    "truncated to 100 bytes": (truncate_at(0.0), True, 0.0),
    "truncated at a third": (truncate_at(0.33), True, 0.0),
    "truncated at the last page": (truncate_at(0.97), True, 0.5),
    "zeroed page in the middle": (zero_middle_page, True, 0.5),
    "WAL of garbage": (garbage_wal, False, 1.0),
    "shared-memory file of garbage": (garbage_shm, False, 1.0),
    "a directory": (a_directory, True, 0.0),
    "no permissions": (no_permissions, os.geteuid() != 0, 0.0 if os.geteuid() else 1.0),
}


@pytest.mark.parametrize("name", DAMAGE)
def test_damaged_outbox_is_moved_aside_and_what_can_be_read_is_delivered(
        name, start_service, fake_fs, zammad, tmp_path):
    damage, moved, least = DAMAGE[name]
    state = tmp_path / "state"
    ended, up = write_outbox(state)
    damage(state / "outbox.sqlite3")
    service = start_service()
    service.wait_for_log("fs-zammad starting")
    damaged = [line for line in service.lines if "was damaged" in line]
    aside = [p.name for p in state.iterdir() if ".damaged-" in p.name]
    if moved:
        assert len(damaged) == 1 and "ERROR" in damaged[0], service.log
        assert str(state / "outbox.sqlite3") in damaged[0]
        assert any(p.startswith("outbox.sqlite3.damaged-") and p[-1] == "Z" for p in aside)
        found = re.search(r"(\d+) events and \d+ calls in progress carried", damaged[0])
        assert found, damaged[0]
        carried = int(found.group(1))
    else:
        assert damaged == [] and aside == []
        carried = 2 * len(ended) + len(up)
    # Zammad gets every carried event once; the calls still ringing end by the resync.
    def sent():  # answered by Zammad (a hangup whose newCall was lost: "No such call_id")
        return {(r.call_id, r.event) for r in zammad.requests if r.status is not None}

    def delivered_from_the_outbox():  # not the resync's hangups of the calls still ringing
        return {k for k in sent() if k[0] in ended or k[1] == "newCall"}

    zammad.wait_for(lambda: len(delivered_from_the_outbox()) >= carried, timeout=30,
                    raise_on_timeout=False)
    assert len(delivered_from_the_outbox()) == carried, (carried, sorted(sent()), service.log)
    whole = [c for c in ended if {(c, "newCall"), (c, "hangup")} <= sent()]
    assert len(whole) >= least * len(ended)
    assert all(e["hangups"] <= 1 for e in zammad.caller_log())
    # and the fresh outbox works: a new call goes through
    a, events = missed_call("4931799999")
    emit_all(fake_fs, events)
    zammad.wait_for(lambda: hangups_by_call(zammad).get(a.uuid) == 1, timeout=15)


def test_a_wal_of_another_outbox_loses_nothing_and_doubles_no_hangup(
        start_service, fake_fs, zammad, tmp_path):
    """Another outbox's -wal beside this one (a main file restored from a backup beside
    a stale -wal; one copied over): its frames are valid, so SQLite applies them and
    the outbox reads as garbage. The main file alone is whole: its rows are carried
    over. The deletes of events Zammad took since its last checkpoint were in the
    real -wal: a missed call's hangup is unsure, never sent blindly. (A -wal whose own
    frames are damaged fails their checksums and is ignored: "WAL of garbage" above.)"""
    state, other = tmp_path / "state", tmp_path / "other"
    ended, up = write_outbox(state)
    write_outbox(other, n_ended=5, n_up=0)
    db = sqlite3.connect(other / "outbox.sqlite3", isolation_level=None)
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("DELETE FROM outbox WHERE id > 3")     # frames for pages of this outbox
    shutil.copyfile(f"{other}/outbox.sqlite3-wal", f"{state}/outbox.sqlite3-wal")
    db.close()
    still_up = synth.caller(cid=f"49316{len(ended):05d}")   # the first of the ringing calls
    still_up.uuid = still_up.base["Unique-ID"] = up[0]
    fake_fs.api_responses["show channels as json"] = channels_json((still_up, None, False))
    service = start_service()
    service.wait_for_log("fs-zammad starting")
    assert len([x for x in service.lines if "was damaged" in x]) == 1, service.log
    assert any("-wal does not fit" in x for x in service.lines), service.log
    zammad.wait_for(lambda: {r.call_id for r in zammad.requests if r.event == "newCall"
                             and r.status is not None} >= set(ended) | set(up), timeout=30)
    # The calls still ringing in the file may have ended since its last checkpoint, their
    # hangups delivered: the hangup the resync finds they owe is unsure too. One still up
    # at the resync ends after the restart: its hangup cannot have reached Zammad.
    service.wait_for_log("resync: 1 channels up")
    listing = cli(service.env, "list").stdout
    assert f"{len(ended) + len(up) - 1} unsure hangups" in listing, listing
    assert not [c for c, n in hangups_by_call(zammad).items() if n], listing
    emit_all(fake_fs, [still_up.hangup("NORMAL_CLEARING", "recv_cancel")])
    zammad.wait_for(lambda: hangups_by_call(zammad).get(still_up.uuid) == 1, timeout=15)
    a, events = missed_call("4931799998")   # a new call is no doubtful one
    emit_all(fake_fs, events)
    zammad.wait_for(lambda: hangups_by_call(zammad).get(a.uuid) == 1, timeout=15)


def test_a_damaged_outbox_carries_the_finished_calls_over(tmp_path, caplog):
    """The finished calls kept for their late events (issue 11, point 8) are carried into
    the fresh outbox like the calls in progress: a late event of one of them after the
    salvage still makes no second Zammad call."""
    from fs_zammad.salvage import open_outbox
    path = tmp_path / "outbox.sqlite3"
    tracker = CallTracker(tracker_rules(load_settings({"STATE_DIR": str(tmp_path)})))
    box, now, hangups = Outbox(path), time.time(), []
    for i in range(30):
        a = synth.caller(cid=f"49317{i:05d}")
        hangups.append(a.hangup("NORMAL_CLEARING", "recv_cancel"))
        for h in (a.create(), a.execute("bridge"), hangups[-1]):
            box.record(tracker.handle(h, now), *tracker.dirty_rows(),
                       finished_calls=tracker.take_finished())
            tracker.dirty.clear()
    kept = box.load_finished()
    assert len(kept) == 30
    box.adopt([], [], [], doubtful=["doubted"])
    # Zero an index's root page: every table row stays readable, the file fails its check.
    root = box.db.execute("SELECT rootpage FROM sqlite_master WHERE name='outbox_by_instance'"
                          ).fetchone()[0]
    box.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    box.close()
    with open(path, "r+b") as handle:
        handle.seek((root - 1) * 4096)
        handle.write(b"\0" * 4096)
    with caplog.at_level("ERROR"):
        fresh = open_outbox(path)
    try:
        assert any("was damaged" in r.getMessage() for r in caplog.records), caplog.text
        assert fresh.load_finished() == kept
        restarted = CallTracker(tracker_rules(load_settings({"STATE_DIR": str(tmp_path)})),
                                [saved_state(text) for text in fresh.load_calls() + kept])
        # each call's hangup once more, late: nothing for Zammad
        assert [e for h in hangups for e in restarted.handle(h, now + 5)] == []
        # a call marked by an earlier salvage without the -wal keeps its mark
        fresh.record([ZammadEvent("doubted", (("event", "hangup"),), once=True)])
        assert [(r[1], r[4]) for r in fresh.failed_rows()] == [("doubted", "unsure")]
    finally:
        fresh.close()


# -- a full disk ---------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """tmp_path/state on its own 4 MB tmpfs, or skip where the sandbox cannot mount."""
    state = tmp_path / "state"
    state.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(state)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here; tests/test_outbox.py covers a full disk "
                    "in-process with a failing connection")
    try:
        yield state
    finally:
        subprocess.run(["umount", "-l", str(state)], capture_output=True)


def fill(directory):
    """Take every free byte; returns the filler file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (65536, 512):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def test_full_disk_keeps_the_service_up_and_loses_nothing(small_disk, start_service, fake_fs,
                                                          zammad):
    port = free_port()
    service = start_service(METRICS_PORT=str(port))
    zammad.set_down(True)
    stored = [missed_call(f"4931700{i:03d}") for i in range(20)]
    for _, events in stored:
        emit_all(fake_fs, events)
    service.wait_for_log("Zammad unreachable")
    deadline = time.monotonic() + 10
    while ": 40 pending" not in cli(service.env, "list").stdout:
        assert time.monotonic() < deadline
    filler = fill(small_disk)
    calls = [missed_call(f"4931800{i:03d}") for i in range(100)]
    talking = answered_call("4931900000")
    emit_all(fake_fs, talking[2])
    for _, events in calls:
        emit_all(fake_fs, events)
    service.wait_for_log("disk full")
    status, body = healthz(port)
    assert status == 503 and any("disk full" in r and str(small_disk) in r
                                 for r in body["reasons"]), body
    # Zammad back while the disk is still full: the stored newCalls go out, their
    # deletion waits in memory; no hangup goes out (its mark cannot be stored).
    zammad.set_down(False)
    zammad.wait_for(lambda: len(zammad.caller_log()) == 20, timeout=15)
    emit_all(fake_fs, talking[3])                     # a call's end arrives meanwhile
    time.sleep(2.5)                                   # the retries each second fail quietly
    assert sum(hangups_by_call(zammad).values()) == 0
    assert [r.event for r in zammad.requests if r.outcome == "processed"] == ["newCall"] * 20
    errors = [line for line in service.lines if "ERROR" in line]
    assert len(errors) == 1 and "disk full" in errors[0] and str(small_disk) in errors[0], errors
    assert service.proc.poll() is None
    filler.unlink()
    service.wait_for_log("can be written again")
    expected = {a.uuid: 1 for a, _ in stored + calls} | {talking[0].uuid: 1}
    zammad.wait_for(lambda: hangups_by_call(zammad) == expected, timeout=30)
    for call_id in expected:   # nothing twice: not the newCalls delivered while the disk was full
        events = [r.event for r in zammad.requests_for(call_id) if r.outcome == "processed"]
        assert events in (["newCall", "hangup"], ["newCall", "answer", "hangup"]), events
    assert not any("outbox cannot be written" in r for r in healthz(port)[1]["reasons"])
    assert len([line for line in service.lines if "ERROR" in line]) == 1
    assert service.stop(signal.SIGTERM) == 0


def test_full_disk_beyond_the_cap_refuses_new_calls_counts_them_and_ends_the_known_ones(
        small_disk, start_service, fake_fs, zammad):
    port = free_port()
    service = start_service(METRICS_PORT=str(port), OUTBOX_MAX_EVENTS="120")
    zammad.set_down(True)
    stored = [missed_call(f"4932000{i:03d}") for i in range(20)]
    for _, events in stored:
        emit_all(fake_fs, events)
    deadline = time.monotonic() + 10
    while ": 40 pending" not in cli(service.env, "list").stdout:
        assert time.monotonic() < deadline
    filler = fill(small_disk)
    talking = answered_call("4932100000")
    emit_all(fake_fs, talking[2])                 # newCall + answer: in memory
    calls = [missed_call(f"4932200{i:03d}") for i in range(100)]
    for _, events in calls:
        emit_all(fake_fs, events)
    service.wait_for_log("OUTBOX FULL .*wait in memory")
    emit_all(fake_fs, talking[3])                 # a known call's end is never refused
    filler.unlink()
    service.wait_for_log("can be written again")
    zammad.set_down(False)
    # 40 on disk + 2 of the talking call + 2 per new call up to the cap of 120
    admitted = calls[:39]
    expected = {a.uuid: 1 for a, _ in stored + admitted} | {talking[0].uuid: 1}
    zammad.wait_for(lambda: hangups_by_call(zammad) == expected, timeout=30)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        metrics_text = answer.read().decode()
    refused = re.search(r"^fs_zammad_outbox_refused_total (\S+)$", metrics_text, re.M)
    assert float(refused.group(1)) == 2 * (len(calls) - len(admitted))
    errors = [line for line in service.lines if "ERROR" in line]
    assert sum("disk full" in line and "cannot write the outbox" in line for line in errors) == 1
    assert all("OUTBOX FULL" in line for line in errors if "cannot write" not in line)
    assert service.stop(signal.SIGTERM) == 0


def test_stop_while_the_disk_is_full_says_what_is_lost_and_resends_no_hangup(
        small_disk, start_service, fake_fs, zammad):
    service = start_service()
    stored = [missed_call(f"4932400{i:03d}") for i in range(10)]
    for _, events in stored:
        emit_all(fake_fs, events[:2])
    zammad.wait_for(lambda: len(zammad.caller_log()) == 10)
    zammad.set_delay(1.0)                            # hangups in flight when the disk fills
    for _, events in stored:
        emit_all(fake_fs, events[2:])
    zammad.wait_for(lambda: sum(r.event == "hangup" for r in zammad.requests) == 10)
    filler = fill(small_disk)
    for i in range(3000):                           # until a write meets the full disk
        emit_all(fake_fs, missed_call(f"49325{i:05d}")[1])
        if i % 20 == 19 and "disk full" in service.log:
            break
        time.sleep(0.002)
    service.wait_for_log("disk full")
    zammad.wait_for(lambda: all(hangups_by_call(zammad).get(a.uuid) for a, _ in stored),
                    timeout=10)                      # the hangups in flight were answered
    assert service.stop(signal.SIGTERM) == 0
    line = service.wait_for_log("still cannot be written")[0]
    assert "ERROR" in line and "events waiting in memory are lost" in line
    filler.unlink()
    zammad.set_delay(0)
    restarted = start_service()
    restarted.wait_for_log("fs-zammad starting")
    time.sleep(1.5)                                  # whatever the restart would send, it has
    by_call = hangups_by_call(zammad)
    assert {a.uuid: by_call.get(a.uuid) for a, _ in stored} == {a.uuid: 1 for a, _ in stored}
    assert all(count <= 1 for count in by_call.values())
    errors = [line for line in service.lines if "ERROR" in line]
    assert len(errors) == 2 and "cannot write the outbox" in errors[0], "\n".join(errors)
    assert "still cannot be written" in errors[1]


def test_a_full_disk_at_start_keeps_the_sound_outbox_for_the_next_start(
        small_disk, start_service, fake_fs, zammad):
    """SQLite says "disk I/O error" when a full disk stops it growing the -shm file:
    that is no damage, and the file with its waiting events must not be moved aside."""
    ended, up = write_outbox(small_disk, n_ended=20, n_up=0)
    shm = small_disk / "outbox.sqlite3-shm"
    if shm.exists():
        shm.unlink()
    (small_disk / "fs-zammad.lock").write_text("1 an-earlier-run\n")
    filler = fill(small_disk)
    service = start_service(wait=False)
    assert service.proc.wait(timeout=20) == 1
    service._reader.join(timeout=5)
    lines = [line for line in service.lines if line.strip()]
    assert any("cannot start" in line and "STATE_DIR" in line for line in lines), lines
    assert "Traceback" not in service.log
    assert not [p for p in small_disk.iterdir() if ".damaged-" in p.name]
    filler.unlink()
    service = start_service()
    zammad.wait_for(lambda: sum(hangups_by_call(zammad).values()) == len(ended), timeout=30)
    assert hangups_by_call(zammad) == {call_id: 1 for call_id in ended}
    assert "was damaged" not in service.log


def test_real_damage_and_real_trouble_are_told_apart(tmp_path):
    from fs_zammad.outbox import is_damage

    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(random.Random(1).randbytes(8192))
    with pytest.raises(sqlite3.DatabaseError) as caught:
        sqlite3.connect(junk).execute("SELECT * FROM sqlite_master").fetchall()
    assert is_damage(caught.value)
    with pytest.raises(sqlite3.OperationalError) as caught:
        sqlite3.connect(tmp_path / "no" / "such" / "dir.sqlite3")
    assert not is_damage(caught.value)
