#!/usr/bin/env python3
"""fs_zammad benchmark: ceilings, end to end, latency, slow Zammad, memory/CPU.

One invocation runs everything and prints a Markdown table; the full numbers
go to bench/results/latest.json. See bench/README.md for what each row means.

    .venv/bin/python bench/run.py            # default run (~6 min on 2 cores)
    .venv/bin/python bench/run.py --quick    # smoke run, < 90 s
    .venv/bin/python bench/run.py --calls 200000 --outage 300   # the long figures
    .venv/bin/python bench/run.py --only e2e --profile           # + py-spy profile

Processes (all on 127.0.0.1):

* orchestrator (this file), the firehose (fake FreeSWITCH, bench/firehose.py)
  and the Zammad stand-in (bench/standin.py): pinned to core 0;
* the measured process: the real ``fs-zammad`` console script, or one of the
  bare clients of bench/bare.py: pinned to core 1 ("the service on one core").
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import firehose  # noqa: E402
import standin  # noqa: E402
from common import (  # noqa: E402
    CallTemplate,
    call_index,
    capture,
    proc_context_switches,
    proc_cpu_seconds,
    proc_mem_kb,
)

PASSWORD = "bench-esl-pw"
TOKEN = "bench-token-0123456789"
BIN = Path(sys.executable).parent
FS_ZAMMAD = str(BIN / "fs-zammad")
PY_SPY = shutil.which("py-spy") or str(BIN / "py-spy")
POSTS_PER_CALL = 3
GENERATOR_CORE, SERVICE_CORE = 0, 1

# Targets from the issue (reported, never asserted).
TARGET_CALLS_PER_S = 200
TARGET_RATIO = 1.0
TARGET_P99_MS = 10.0
TARGET_BURST_RSS_MB = 80.0
TARGET_CPU_FACTOR = 1.1
TARGET_PACED_FACTOR = 1.5      # CPU per call, one by one at 40 calls/s, vs the firehose

#: The paced phase: rates (calls/s) and the captures cloned in turn (S1 inbound,
#: S8 outbound: 12.5 frames per call with fs-zammad's subscription).
PACED_RATES = (10, 40, 100)
PACED_MIX = ("S1", "S8")
PACED_COUNT_RATE = 40          # the rate of the counting sub-run (strace, greenlet switches)

PROFILES = {
    #            quick   default
    "esl_all_calls": (150, 1000),     # ceiling a, ALL: 57 frames/call
    "esl_sub_calls": (400, 3000),     # ceiling a, fs-zammad's subscription: 13 frames/call
    "post_seconds": (2.0, 6.0),       # ceiling b
    "e2e_calls": (600, 5000),
    "info_calls": (300, 2000),
    "latency_seconds": (5.0, 20.0),
    "latency_rate": (50, 50),
    "slow_calls": (80, 500),
    "long_calls": (2000, 20000),
    "burst_calls": (500, 2000),
    "outage_seconds": (8.0, 60.0),
    "outage_rate": (50, 50),
    "paced_seconds": (4.0, 8.0),        # calls start for this long, per rate (fs-zammad)
    "paced_bare_seconds": (3.0, 5.0),   # the same for the bare forwarder (ceiling)
    "paced_count_seconds": (2.0, 3.0),  # the counting sub-run under strace
    "paced_ref_calls": (600, 2000),     # firehose reference if the info phase did not run
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values, q):
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def r(x, n=1):
    return None if x is None else round(x, n)


class Remote:
    """A forked helper process answering (command, arg) over a Pipe."""

    def __init__(self, target, *args):
        ctx = mp.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child, *args), daemon=True)
        self.proc.start()
        self.hello = self.conn.recv()
        self.lock = threading.Lock()

    def __call__(self, cmd, arg=None, timeout=None):
        with self.lock:
            self.conn.send((cmd, arg))
            if timeout is not None and not self.conn.poll(timeout):
                raise TimeoutError(f"{cmd} not answered in {timeout} s")
            return self.conn.recv()

    def close(self):
        try:
            with self.lock:
                self.conn.send(("quit", None))
        except OSError:
            pass
        self.proc.join(3)
        if self.proc.is_alive():
            self.proc.terminate()


class Sampler(threading.Thread):
    """Every ``interval`` s: RSS, peak RSS, CPU of ``pid`` and the outbox file sizes."""

    def __init__(self, pid: int, state_dir: Path | None, interval: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.state_dir, self.interval = pid, state_dir, interval
        self.samples: list[dict] = []
        self._halt = threading.Event()
        self.t0 = time.monotonic()

    def sample(self) -> dict | None:
        try:
            mem = proc_mem_kb(self.pid)
            cpu = proc_cpu_seconds(self.pid)
        except (OSError, ValueError):
            return None
        s = {"t": round(time.monotonic() - self.t0, 2), "rss_kb": mem.get("VmRSS"),
             "hwm_kb": mem.get("VmHWM"), "cpu_s": cpu}
        if self.state_dir is not None:
            size = 0
            for suffix in ("", "-wal"):
                try:
                    size += (self.state_dir / f"outbox.sqlite3{suffix}").stat().st_size
                except OSError:
                    pass
            s["outbox_bytes"] = size
        return s

    def run(self):
        while not self._halt.is_set():
            s = self.sample()
            if s is not None:
                self.samples.append(s)
            self._halt.wait(self.interval)

    def stop(self):
        self._halt.set()
        self.join(2)
        s = self.sample()
        if s is not None:
            self.samples.append(s)

    def window(self, t_from: float, t_to: float) -> list[dict]:
        return [s for s in self.samples if t_from <= s["t"] <= t_to]


def quartiles_flat(samples: list[dict]) -> dict:
    """Mean RSS of the first vs the last quarter of the samples (MB)."""
    rss = [s["rss_kb"] / 1024 for s in samples if s.get("rss_kb")]
    if len(rss) < 4:
        return {"first_q_mb": None, "last_q_mb": None, "growth_pct": None, "samples": len(rss)}
    q = len(rss) // 4
    first, last = statistics.mean(rss[:q]), statistics.mean(rss[-q:])
    return {"first_q_mb": r(first), "last_q_mb": r(last),
            "growth_pct": r((last - first) / first * 100), "samples": len(rss),
            "min_mb": r(min(rss)), "max_mb": r(max(rss))}


class Service:
    """The real fs-zammad process, pinned to the service core."""

    def __init__(self, bench: "Bench", log_level: str = "WARNING", extra_env: dict | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="fszb-", dir=bench.args.state_base or None))
        bench.temp_dirs.append(self.dir)   # removed by Bench.close() whatever happens
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("FREESWITCH_", "ZAMMAD_", "METRICS_", "LOG_", "STATE_DIR",
                                    "OUTBOX_"))}
        env.update({"FREESWITCH_HOST": "127.0.0.1", "FREESWITCH_PORT": str(bench.fs_port),
                    "FREESWITCH_PASSWORD": PASSWORD, "ZAMMAD_CTI_URL": bench.url,
                    "STATE_DIR": str(self.dir / "state"), "LOG_LEVEL": log_level})
        env.update(extra_env or {})
        self.log_path = self.dir / "service.log"
        self.log_file = open(self.log_path, "wb")
        if bench.code_dir:      # --rev: the service runs that revision's fs_zammad
            env["PYTHONPATH"] = bench.code_dir + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen([FS_ZAMMAD], env=env, stdin=subprocess.DEVNULL,
                                     stdout=self.log_file, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        bench.pin(self.pid, SERVICE_CORE)
        self.state_dir = self.dir / "state"
        events = None
        deadline = time.monotonic() + 20
        while events is None and time.monotonic() < deadline and self.alive():
            events = bench.fs("wait_client", 0.5, timeout=10)
        if events is None:
            self.stop()
            raise RuntimeError(f"fs-zammad did not subscribe (exit code {self.proc.returncode}):"
                               "\n" + self.log_tail())
        self.subscription = events
        time.sleep(0.5)  # let the post-connect resync (api show channels) finish

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 3000) -> str:
        if not self.log_file.closed:
            self.log_file.flush()
        return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")

    def log_summary(self) -> dict:
        if not self.log_file.closed:
            self.log_file.flush()
        text = self.log_path.read_text("utf-8", "replace")
        lines = text.splitlines()
        return {"lines": len(lines), "bytes": len(text.encode()),
                "errors": sum(1 for line in lines if " ERROR " in line),
                "warnings": sum(1 for line in lines if " WARNING " in line),
                "tracebacks": text.count("Traceback")}

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log_file.close()
        return self.proc.returncode

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class Bench:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.code_dir = args.code_dir
        self.pinning = not args.no_pin and (os.cpu_count() or 1) >= 2
        if self.pinning:
            os.sched_setaffinity(0, {GENERATOR_CORE})  # helpers inherit core 0
        # hangups accepted by the stand-in, read by the firehose (closed loop)
        self.delivered = mp.get_context("fork").Value("q", 0, lock=False)
        self.fs = Remote(firehose.main, PASSWORD, self.delivered)
        self.zammad = Remote(standin.main, self.delivered)
        self.fs_port = self.fs.hello["port"]
        self.url = f"http://127.0.0.1:{self.zammad.hello['port']}/api/v1/cti/{TOKEN}"
        self.tag = 0
        self.next_call = 0
        self.results: dict = {}
        self._subscription: list[str] | None = None
        self.temp_dirs: list[Path] = []

    def p(self, key):
        value = PROFILES[key][0 if self.quick else 1]
        override = getattr(self.args, key, None)
        return value if override is None else override

    def pin(self, pid: int, core: int) -> None:
        if self.pinning:
            os.sched_setaffinity(pid, {core})

    def service_subscription(self) -> list[str]:
        """What fs-zammad sends in ``event plain ...``: asked of a real fs-zammad once."""
        if self._subscription is None:
            svc = Service(self, "WARNING")
            self._subscription = list(svc.subscription)
            svc.stop()
            svc.cleanup()
        return self._subscription

    def new_tag(self) -> int:
        self.tag += 1
        return self.tag

    def close(self):
        self.fs.close()
        self.zammad.close()
        for path in self.temp_dirs:
            shutil.rmtree(path, ignore_errors=True)

    # -- helpers ---------------------------------------------------------------

    def run_calls(self, calls: int, rate: float | None = None, triggers=None,
                  window: int = 0) -> dict:
        params = {"calls": calls, "first": self.next_call, "tag": self.new_tag(), "rate": rate,
                  "triggers": triggers, "window": window}
        self.next_call += calls
        info = self.fs("run", params, timeout=30)
        if "error" in info:
            raise RuntimeError(f"firehose: {info['error']}")
        return info

    def fs_result(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            res = self.fs("result", 1.0, timeout=10)
            if res is not None:
                if "error" in res:
                    raise RuntimeError(f"firehose: {res['error']}")
                return res
        raise TimeoutError("firehose run did not finish")

    def fs_result_quiet(self) -> None:
        """Wait (briefly) for a run that is being abandoned."""
        try:
            self.fs_result(10)
        except (RuntimeError, TimeoutError):
            pass

    def wait_hangups(self, expected: int, service: Service | None, stall_s: float = 30.0,
                     limit_s: float = 900.0) -> dict:
        """Poll the stand-in until ``expected`` hangups were accepted (or a stall)."""
        last, last_change = -1, time.monotonic()
        start = time.monotonic()
        while True:
            st = self.zammad("stats", timeout=10)
            if st["hangups_ok"] >= expected:
                st["complete"] = True
                return st
            if st["hangups_ok"] != last:
                last, last_change = st["hangups_ok"], time.monotonic()
            now = time.monotonic()
            if (now - last_change > stall_s or now - start > limit_s
                    or (service is not None and not service.alive())):
                st["complete"] = False
                log(f"  !! stopped waiting: {st['hangups_ok']}/{expected} hangups")
                return st
            time.sleep(0.05)

    def triggers(self, subscription, path=None) -> dict:
        """Which template frame makes fs-zammad send newCall / answer / hangup."""
        from fs_zammad.calls import CallTracker
        from fs_zammad.wire import parse_event_plain

        tmpl = CallTemplate(set(subscription), *([path] if path else []))
        tracker = CallTracker()
        found = {}
        for index, raw in enumerate(tmpl.call_frames(0, 0)):
            body = raw.split(b"\n\n", 1)[1]
            for event in tracker.handle(parse_event_plain(body), 0.0):
                found[index] = event.name
        return found

    # -- ceilings --------------------------------------------------------------

    def ceiling_esl(self, subscription: list[str], calls: int) -> dict:
        tmpl = CallTemplate(set(subscription))
        expect = calls * tmpl.frames_per_call
        proc = subprocess.Popen([sys.executable, str(HERE / "bare.py"), "esl", str(self.fs_port),
                                 PASSWORD, str(expect), *subscription],
                                stdout=subprocess.PIPE, text=True)
        self.pin(proc.pid, SERVICE_CORE)
        try:
            if proc.stdout.readline().strip() != "READY":
                raise RuntimeError("bare ESL client did not start")
            self.run_calls(calls)
            line = proc.stdout.readline()
            fs = self.fs_result(60)
            res = json.loads(line)
        finally:
            proc.wait(10)
        elapsed = (res["t_last_ns"] - fs["t_first_ns"]) / 1e9
        return {"subscription": " ".join(subscription), "calls": calls,
                "frames_per_call": tmpl.frames_per_call,
                "avg_frame_bytes": round(tmpl.bytes_per_call / tmpl.frames_per_call),
                "events": res["events"], "elapsed_s": r(elapsed, 3),
                "events_per_s": r(res["events"] / elapsed), "calls_per_s": r(calls / elapsed),
                "cpu_s": res["cpu_s"], "cpu_us_per_event": r(res["cpu_s"] / res["events"] * 1e6),
                "cpu_ms_per_call": r(res["cpu_s"] / calls * 1e3, 3)}

    def ceiling_post(self, seconds: float, mode: str = "plain") -> dict:
        self.zammad("set", {"status": 200, "delay_ms": 0, "reset": True, "record": False})
        proc = subprocess.Popen([sys.executable, str(HERE / "bare.py"), "post", self.url,
                                 str(seconds), mode], stdout=subprocess.PIPE, text=True)
        self.pin(proc.pid, SERVICE_CORE)
        res = json.loads(proc.stdout.readline())
        proc.wait(10)
        return {"mode": mode, "posts": res["posts"], "elapsed_s": r(res["elapsed_s"], 3),
                "posts_per_s": r(res["posts"] / res["elapsed_s"]), "cpu_s": res["cpu_s"],
                "cpu_us_per_post": r(res["cpu_s"] / res["posts"] * 1e6)}

    # -- fs-zammad ---------------------------------------------------------------

    def e2e(self, calls: int, log_level: str = "WARNING", name: str = "e2e",
            profile: bool = False, window: int | None = None) -> dict:
        """N calls as fast as fs-zammad keeps up; first frame -> last hangup POST.

        ``window`` W > 0: closed loop, at most W calls between their first frame
        and their hangup POST; 0: open loop, all N pushed at once.
        """
        window = self.args.window if window is None else window
        self.zammad("set", {"status": 200, "delay_ms": 0, "reset": True, "record": False})
        svc = Service(self, log_level)
        sampler = Sampler(svc.pid, svc.state_dir)
        spy = None
        try:
            cpu0 = proc_cpu_seconds(svc.pid)
            sampler.start()
            info = self.run_calls(calls, window=window)
            if profile:
                spy = self.start_profile(svc.pid, name)
            st = self.wait_hangups(calls, svc)
            cpu1 = proc_cpu_seconds(svc.pid)
            fs = self.fs_result(60)
            mem = proc_mem_kb(svc.pid)
        finally:
            if spy is not None:
                self.stop_profile(spy)
            sampler.stop()
            rc = svc.stop()
        elapsed = (st["last_hangup_ok_ns"] - fs["t_first_ns"]) / 1e9
        done = st["hangups_ok"]
        counts_ok = all(st["counts"].get(f"{event}/200", 0) == calls
                        for event in ("newCall", "answer", "hangup"))
        out = {"log_level": log_level, "calls": calls, "complete": st["complete"],
               "counts_ok": counts_ok, "window": window,
               "frames_per_call": info["frames_per_call"],
               "subscription": " ".join(svc.subscription),
               "hangups_delivered": done, "posts": st["ok"], "counts": st["counts"],
               "elapsed_s": r(elapsed, 3), "calls_per_s": r(done / elapsed),
               "events_per_s": r(done * info["frames_per_call"] / elapsed),
               "posts_per_s": r(st["ok"] / elapsed),
               "cpu_s": r(cpu1 - cpu0, 2), "cpu_s_per_1000_calls": r((cpu1 - cpu0) / done * 1000, 3),
               "cpu_utilisation": r((cpu1 - cpu0) / elapsed, 2),
               "peak_rss_mb": r(mem["VmHWM"] / 1024), "rss_flat": quartiles_flat(sampler.samples),
               "exit_code": rc, "log": svc.log_summary(), "samples": sampler.samples}
        if spy is not None:
            out["profile"] = spy["summary"]
        svc.cleanup()
        return out

    def floor_firehose(self, calls: int) -> dict:
        """bare.py's raw-socket ``floor`` fed the firehose (closed loop, as ``e2e``): the
        same work as at a PBX's pace with frames back to back. The difference between
        the two is what being woken per frame costs, with no library work at all."""
        self.zammad("set", {"status": 200, "delay_ms": 0, "reset": True, "record": False})
        proc = subprocess.Popen([sys.executable, str(HERE / "bare.py"), "floor",
                                 str(self.fs_port), PASSWORD, self.url, str(calls),
                                 *self.service_subscription()], stdout=subprocess.PIPE,
                                stdin=subprocess.PIPE, text=True,
                                env={**os.environ, "BARE_LINGER": "1"})
        try:
            self.pin(proc.pid, SERVICE_CORE)
            if proc.stdout.readline().strip() != "READY":
                raise RuntimeError("bare.py floor did not start")
            info = self.run_calls(calls, window=self.args.window)
            own = json.loads(proc.stdout.readline() or "{}")
            self.fs_result(60)
        finally:
            if proc.stdin:
                proc.stdin.close()
            proc.wait(10)
        frames = info["frames_per_call"]
        return {"target": "wake-up floor, firehose", "calls": calls,
                "complete": own.get("hangups") == calls, "frames_per_call": frames,
                "cpu_s": r(own.get("cpu_s", 0.0), 3),
                "cpu_ms_per_call": r(own.get("cpu_s", 0.0) / calls * 1000, 3),
                "cpu_us_per_event": r(own.get("cpu_s", 0.0) / (calls * frames) * 1e6, 1),
                "wakeups_per_call": r(own.get("wakeups", 0) / calls, 2)}

    def latency(self, seconds: float, rate: float, bare: bool = False) -> dict:
        """Steady ``rate`` calls/s: frame leaving the firehose -> POST arriving.

        ``bare``: the same traffic into bare.py's stateless greenswitch+requests
        forwarder instead of fs-zammad: the floor of this measurement chain.
        """
        self.zammad("set", {"status": 200, "delay_ms": 0, "reset": True, "record": True})
        calls = int(seconds * rate)
        svc = proc = None
        if bare:
            subscription = self.service_subscription()
            proc = subprocess.Popen([sys.executable, str(HERE / "bare.py"), "forward",
                                     str(self.fs_port), PASSWORD, self.url, str(calls),
                                     *subscription], stdout=subprocess.PIPE, text=True)
            self.pin(proc.pid, SERVICE_CORE)
            if proc.stdout.readline().strip() != "READY":
                raise RuntimeError("bare forwarder did not start")
            pid = proc.pid
        else:
            svc = Service(self, "WARNING")
            subscription, pid = svc.subscription, svc.pid
        triggers = self.triggers(subscription)
        sampler = Sampler(pid, svc.state_dir if svc else None)
        try:
            cpu0 = proc_cpu_seconds(pid)
            sampler.start()
            self.run_calls(calls, rate=rate, triggers=triggers)
            fs = self.fs_result(seconds + 60)
            st = self.wait_hangups(calls, svc)
            cpu1 = proc_cpu_seconds(pid)
            records = self.zammad("records", timeout=30)
        finally:
            self.zammad("set", {"record": False})
            sampler.stop()
            if svc is not None:
                rc = svc.stop()
            else:
                proc.stdout.readline()
                rc = proc.wait(10)
        sent = {(c, label): t for c, label, t in fs["stamps"]}
        first_call = min(c for c, _, _ in fs["stamps"])
        warm = first_call + int(rate)  # the first second is warm-up (connections open)
        by_event: dict[str, list] = {}
        series: list = []   # (sent, s after the first frame; event; latency ms)
        missing = 0
        for t_arr, call_id, event, status in records:
            c = call_index(call_id)
            t_sent = sent.get((c, event))
            if t_sent is None:
                missing += 1
                continue
            if c >= warm and status == 200:
                by_event.setdefault(event, []).append((t_arr - t_sent) / 1e6)
                series.append((round((t_sent - fs["t_first_ns"]) / 1e9, 4), event,
                               round((t_arr - t_sent) / 1e6, 3)))
        every = [x for v in by_event.values() for x in v]
        out = {"target": "bare forwarder" if bare else "fs-zammad",
               "rate_calls_per_s": rate, "calls": calls, "complete": st["complete"],
               "trigger_frames": {str(k): v for k, v in triggers.items()},
               "warmup_calls_excluded": int(rate), "requests_matched": len(every),
               "unmatched": missing, "p50_ms": r(pct(every, 0.5), 2),
               "p99_ms": r(pct(every, 0.99), 2), "max_ms": r(max(every) if every else None, 2),
               "per_event": {e: {"n": len(v), "p50_ms": r(pct(v, 0.5), 2),
                                 "p99_ms": r(pct(v, 0.99), 2), "max_ms": r(max(v), 2)}
                             for e, v in by_event.items()},
               "cpu_utilisation": r((cpu1 - cpu0) / (seconds + 2.6), 3),
               "cpu_s_per_1000_calls": r((cpu1 - cpu0) / calls * 1000, 3),
               "rss_flat": quartiles_flat(sampler.samples), "exit_code": rc,
               "samples": sorted(series)}
        if svc is not None:
            out["log"] = svc.log_summary()
            svc.cleanup()
        return out

    def slow_zammad(self, calls: int, delay_ms: float = 100.0) -> dict:
        self.zammad("set", {"status": 200, "delay_ms": delay_ms, "reset": True, "record": False})
        svc = Service(self, "WARNING")
        try:
            self.run_calls(calls)
            fs = self.fs_result(120)
            st = self.wait_hangups(calls, svc, stall_s=30, limit_s=calls * 3 / 5 + 60)
        finally:
            self.zammad("set", {"delay_ms": 0})
            rc = svc.stop()
        elapsed = (st["last_hangup_ok_ns"] - fs["t_first_ns"]) / 1e9
        steady = (st["last_ok_ns"] - st["first_ok_ns"]) / 1e9
        concurrency = 8
        bound_req = concurrency / (delay_ms / 1000)
        out = {"delay_ms": delay_ms, "calls": calls, "complete": st["complete"],
               "hangups_delivered": st["hangups_ok"], "elapsed_s": r(elapsed, 2),
               "calls_per_s": r(st["hangups_ok"] / elapsed, 2),
               "requests_per_s": r((st["ok"] - 1) / steady, 2) if steady > 0 else None,
               "bound_requests_per_s": bound_req,
               "bound_calls_per_s": r(bound_req / POSTS_PER_CALL, 2),
               "connections_opened": st["connections"], "exit_code": rc,
               "log": svc.log_summary()}
        out["pct_of_bound"] = r(out["calls_per_s"] / out["bound_calls_per_s"] * 100)
        svc.cleanup()
        return out

    def outage(self, seconds: float, rate: float) -> dict:
        """``rate`` calls/s; Zammad answers 503 for ``seconds``; then drain."""
        warmup = 3.0
        calls_cap = int((warmup + seconds + 5) * rate)
        self.zammad("set", {"status": 200, "delay_ms": 0, "reset": True, "record": False})
        svc = Service(self, "WARNING", {"ZAMMAD_RETRY_MAX": self.args.retry_max}
                      if self.args.retry_max else None)
        sampler = Sampler(svc.pid, svc.state_dir)
        try:
            sampler.start()
            self.run_calls(calls_cap, rate=rate)
            time.sleep(warmup)
            before = self.zammad("set", {"status": 503})
            t_down = time.monotonic() - sampler.t0
            time.sleep(seconds)
            self.fs("stop", timeout=10)              # no new calls; started ones finish
            t_up_ns = time.monotonic_ns()
            self.zammad("set", {"status": 200, "reset": True})
            t_up = time.monotonic() - sampler.t0
            fs = self.fs_result(30)
            t_fs_done = time.monotonic() - sampler.t0
            expected = fs["calls_sent"] - before["hangups_ok"]
            st = self.wait_hangups(expected, svc, stall_s=(float(self.args.retry_max or 60) + 30))
            t_drained = time.monotonic() - sampler.t0
        finally:
            sampler.stop()
            rc = svc.stop()
        during = sampler.window(t_down, t_up)
        drain_s = (st["last_ok_ns"] - st["first_ok_ns"]) / 1e9
        out = {"outage_s": seconds, "rate_calls_per_s": rate, "calls": fs["calls_sent"],
               "complete": st["complete"], "delivered_after_recovery": st["ok"],
               "rss_during_mb": quartiles_flat(during),
               "outbox_max_mb": r(max((s.get("outbox_bytes", 0) for s in sampler.samples),
                                      default=0) / 2**20, 2),
               "outbox_at_recovery_mb": r((during[-1].get("outbox_bytes", 0) if during else 0)
                                          / 2**20, 2),
               "peak_rss_mb": r(max((s["hwm_kb"] for s in sampler.samples), default=0) / 1024),
               "first_ok_after_recovery_s": r((st["first_ok_ns"] - t_up_ns) / 1e9, 2)
               if st["first_ok_ns"] else None,
               "drain_s": r(drain_s, 2),
               "drain_events_per_s": r(st["ok"] / drain_s) if drain_s > 0 else None,
               "calls_finishing_after_recovery_s": r(t_fs_done - t_up, 2),
               "total_recovery_s": r(t_drained - t_up, 2),
               "counts_after_recovery": st["counts"], "exit_code": rc, "log": svc.log_summary(),
               "samples": sampler.samples}
        svc.cleanup()
        return out

    def paced(self, rate: float, seconds: float, bare: str = "", count: bool = False,
              profile: bool = False) -> dict:
        """The operating point of a PBX: ``rate`` calls/s, each call's frames one by one
        over its ring and talk time (firehose ``_run_one_by_one``), interleaved.

        ``bare``: the same stream into bare.py's ``forward`` (greenswitch+requests:
        the ceiling of this operating point) or ``floor`` (raw sockets: the wake-ups
        alone). ``count``: fs-zammad under strace
        and with a greenlet-switch counter, for counts only (its CPU is not used).
        """
        self.zammad("set", {"status": 200, "delay_ms": 0, "reset": True, "record": True})
        calls = max(2, int(seconds * rate))
        svc = proc = strace = None
        counter = None
        if bare:
            subscription = self.service_subscription()
            proc = subprocess.Popen([sys.executable, str(HERE / "bare.py"), bare,
                                     str(self.fs_port), PASSWORD, self.url, str(calls),
                                     *subscription], stdout=subprocess.PIPE,
                                    stdin=subprocess.PIPE, text=True,
                                    env={**os.environ, "BARE_LINGER": "1"})
            self.pin(proc.pid, SERVICE_CORE)
            if proc.stdout.readline().strip() != "READY":
                raise RuntimeError(f"bare.py {bare} did not start")
            pid = proc.pid
        else:
            extra = None
            if count:
                counter = Path(tempfile.mkdtemp(prefix="fszb-count-"))
                self.temp_dirs.append(counter)
                (counter / "sitecustomize.py").write_text(GREENLET_COUNTER)
                extra = {"PYTHONPATH": str(counter), "FSZB_GREENLET_COUNT": str(counter / "n")}
            svc = Service(self, "INFO", extra)
            subscription, pid = svc.subscription, svc.pid
        triggers = [self.triggers(subscription, capture(name)) for name in PACED_MIX]
        sampler = Sampler(pid, svc.state_dir if svc else None)
        spy = None
        try:
            if count:
                strace_out = counter / "strace.txt"
                strace = subprocess.Popen(["strace", "-f", "-qq", "-y", "-s", "8", "-x", "-o",
                                           str(strace_out), "-p", str(pid)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                self.pin(strace.pid, GENERATOR_CORE)
                time.sleep(1.0)   # attached to every thread
                switches0 = read_counter(counter / "n")
            if profile:
                spy = self.start_profile(pid, f"paced-{rate:g}")
            cpu0, ctx0 = proc_cpu_seconds(pid), proc_context_switches(pid)
            sampler.start()
            info = self.fs("run", {"calls": calls, "first": self.next_call, "tag": self.new_tag(),
                                   "rate": rate, "mix": PACED_MIX, "triggers": triggers},
                           timeout=30)
            self.next_call += calls
            if "error" in info:
                raise RuntimeError(f"firehose: {info['error']}")
            fs = self.fs_result(seconds + 60)
            st = self.wait_hangups(calls, svc)
            cpu1, ctx1 = proc_cpu_seconds(pid), proc_context_switches(pid)
            if count:
                switches1 = read_counter(counter / "n")
                strace.send_signal(signal.SIGINT)
                strace.wait(30)
            records = self.zammad("records", timeout=30)
            mem = proc_mem_kb(pid) if svc is not None else {}
        finally:
            if spy is not None:
                self.stop_profile(spy)
            if strace is not None and strace.poll() is None:
                strace.kill()
            self.zammad("set", {"record": False})
            sampler.stop()
            if svc is not None:
                rc = svc.stop()
            else:
                own = json.loads(proc.stdout.readline() or "{}")
                proc.stdin.close()   # the firehose is done: the forwarder may go
                rc = proc.wait(10)
        if svc is None:
            # The forwarder exits once done: its own figures (READY -> last hangup).
            cpu1, ctx1 = cpu0 + own.get("cpu_s", 0.0), (ctx0[0] + own.get("wakeups", 0), ctx0[1])
            last = max((s["rss_kb"] for s in sampler.samples if s.get("rss_kb")), default=0)
            mem = {"VmHWM": own.get("peak_rss_kb", 0), "VmRSS": last}
        sent = {(c, label): t for c, label, t in fs["stamps"]}
        lat, missing = [], 0
        for t_arr, call_id, event, status in records:
            t_sent = sent.get((call_index(call_id), event))
            if t_sent is None:
                missing += 1
            elif status == 200:
                lat.append((t_arr - t_sent) / 1e6)
        done = st["hangups_ok"]
        frames = info["frames_per_call"]
        cpu = cpu1 - cpu0
        out = {"target": {"forward": "bare forwarder", "floor": "wake-up floor"}.get(bare, "fs-zammad"),
               "rate_calls_per_s": rate,
               "calls": calls, "complete": st["complete"], "hangups_delivered": done,
               "frames_per_call": frames, "mix": list(PACED_MIX),
               "span_s": r((st["last_hangup_ok_ns"] - fs["t_first_ns"]) / 1e9, 2),
               "cpu_s": r(cpu, 3), "cpu_ms_per_call": r(cpu / calls * 1000, 3),
               "cpu_us_per_event": r(cpu / (calls * frames) * 1e6, 1),
               "wakeups_per_call": r((ctx1[0] - ctx0[0]) / calls, 1),
               "wakeups_per_event": r((ctx1[0] - ctx0[0]) / (calls * frames), 2),
               "involuntary_per_call": r((ctx1[1] - ctx0[1]) / calls, 2),
               "requests_matched": len(lat), "unmatched": missing,
               "p50_ms": r(pct(lat, 0.5), 2), "p99_ms": r(pct(lat, 0.99), 2),
               "max_ms": r(max(lat) if lat else None, 2),
               "peak_rss_mb": r(mem["VmHWM"] / 1024), "last_rss_mb": r(mem["VmRSS"] / 1024),
               "exit_code": rc, "samples": sampler.samples}
        if svc is not None:
            out["log"] = svc.log_summary()
            svc.cleanup()
        if count:
            out["counts"] = count_strace(strace_out, calls, calls * frames)
            out["counts"]["greenlet_switches_per_event"] = (
                r((switches1 - switches0) / (calls * frames), 1)
                if switches0 is not None and switches1 is not None else None)
            out["counts"]["greenlet_switches_per_call"] = (
                r((switches1 - switches0) / calls, 1)
                if switches0 is not None and switches1 is not None else None)
        if spy is not None:
            out["profile"] = spy["summary"]
        return out

    # -- profiling -------------------------------------------------------------

    def start_profile(self, pid: int, name: str) -> dict | None:
        if not Path(PY_SPY).exists():
            log("  py-spy not installed (pip install py-spy): no profile")
            return None
        out_dir = HERE / "results"
        out_dir.mkdir(exist_ok=True)
        tag = ""
        if self.args.rev:
            tag += "-" + self.args.rev.replace("/", "_")[:12]
        raw = out_dir / f"profile-{name}{tag}.txt"
        proc = subprocess.Popen([PY_SPY, "record", "-p", str(pid), "-o", str(raw), "--format",
                                 "raw", "-r", "250", "--nonblocking"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.pin(proc.pid, GENERATOR_CORE)
        time.sleep(0.3)
        return {"proc": proc, "raw": raw, "summary": None}

    def stop_profile(self, spy: dict) -> None:
        spy["proc"].send_signal(signal.SIGINT)
        try:
            spy["proc"].wait(20)
        except subprocess.TimeoutExpired:
            spy["proc"].kill()
        if spy["raw"].exists():
            spy["summary"] = summarize_profile(spy["raw"])
            (spy["raw"].with_suffix(".summary.txt")).write_text(format_profile(spy["summary"]))


#: Injected (bench only) into the counting sub-run's fs-zammad through PYTHONPATH:
#: counts greenlet switches and writes the count to a file every 64 switches.
GREENLET_COUNTER = """
import os
_path = os.environ.get("FSZB_GREENLET_COUNT")
if _path:
    import greenlet
    _fd = os.open(_path, os.O_WRONLY | os.O_CREAT, 0o600)
    _n = [0]

    def _trace(event, args):
        if event in ("switch", "throw"):
            _n[0] += 1
            if not _n[0] & 63:
                os.pwrite(_fd, b"%20d" % _n[0], 0)
        return None

    greenlet.settrace(_trace)
"""


def read_counter(path: Path) -> int | None:
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return None


_STRACE_CALL = re.compile(r"^\d+\s+(?:<\.\.\. )?(\w+)(\(| resumed>)")
# A WAL frame header (24 bytes): page number, then the database size in pages
# after the commit, which only the last frame of a transaction carries (non-zero).
_WAL_HEADER = re.compile(r'pwrite64\(\d+<[^>]*-wal>, "((?:\\x[0-9a-f]{2})+)"(?:\.\.\.)?, 24, ')


def count_strace(path: Path, calls: int, events: int) -> dict:
    """Syscalls per event from ``strace -f -y -s 8 -x`` output; SQLite commits are
    the WAL frames whose header says "commit" (writes to the WAL file itself)."""
    counts: dict[str, int] = {}
    commits = frames = 0
    for line in path.read_text("utf-8", "replace").splitlines():
        m = _STRACE_CALL.match(line)
        if not m or m.group(2) == " resumed>":
            continue
        counts[m.group(1)] = counts.get(m.group(1), 0) + 1
        w = _WAL_HEADER.search(line)
        if w:
            frames += 1
            raw = bytes(int(x, 16) for x in w.group(1).split("\\x")[1:])
            if len(raw) >= 8 and raw[4:8] != b"\0\0\0\0":
                commits += 1
    total = sum(counts.values())
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:12]
    return {"calls": calls, "events": events, "syscalls_per_event": r(total / events, 1),
            "sqlite_commits_per_call": r(commits / calls, 2),
            "wal_frames_per_call": r(frames / calls, 1),
            "fdatasync_per_call": r((counts.get("fdatasync", 0) + counts.get("fsync", 0)) / calls, 2),
            "epoll_waits_per_event": r((counts.get("epoll_wait", 0) + counts.get("epoll_pwait", 0))
                                       / events, 2),
            "top_syscalls_per_call": {k: r(v / calls, 1) for k, v in top}}


_LINE = re.compile(r":\d+\)$")


def summarize_profile(path: Path, top: int = 30) -> dict:
    """py-spy raw (collapsed stacks) -> share of samples per function and per line.

    ``self``: the function is on top of the stack; ``inclusive``: anywhere in
    it (counted once per stack); ``lines``: self share of single source lines.
    """
    self_fn: dict[str, int] = {}
    incl_fn: dict[str, int] = {}
    self_line: dict[str, int] = {}
    total = 0
    for line in path.read_text("utf-8", "replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        n = int(n)
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        total += n
        self_line[frames[-1]] = self_line.get(frames[-1], 0) + n
        functions = [_LINE.sub(")", f) for f in frames]
        self_fn[functions[-1]] = self_fn.get(functions[-1], 0) + n
        for f in set(functions):
            incl_fn[f] = incl_fn.get(f, 0) + n

    def table(d):
        return [(f, round(c / total * 100, 1)) for f, c in
                sorted(d.items(), key=lambda kv: -kv[1])[:top]]
    return {"samples": total, "self": table(self_fn), "inclusive": table(incl_fn),
            "lines": table(self_line)}


def format_profile(summary: dict) -> str:
    lines = [f"samples: {summary['samples']}"]
    for key, title in (("inclusive", "inclusive % (function anywhere on the stack)"),
                       ("self", "self % (function on top of the stack)"),
                       ("lines", "self % by source line")):
        lines += ["", title + ":"]
        lines += [f"{p:6.1f}  {f}" for f, p in summary[key]]
    return "\n".join(lines) + "\n"


# -- report ----------------------------------------------------------------------

def combined(cal: dict, posts: dict, frames: int) -> dict:
    """Bare cost of one call = its frames at ceiling a + 3 POSTs at ceiling b."""
    per_call_s = frames / cal["events_per_s"] + POSTS_PER_CALL / posts["posts_per_s"]
    cpu_ms = frames * cal["cpu_us_per_event"] / 1000 + POSTS_PER_CALL * posts["cpu_us_per_post"] / 1000
    return {"calls_per_s": round(1 / per_call_s, 1), "cpu_s_per_1000_calls": round(cpu_ms, 3)}


#: The two combined ceilings: (key in res["ceilings"], how the table names it).
CEILINGS = (("all", "naive forwarder (ALL, 57 frames)"), ("sub", "same subscription (13 frames)"))


def build_rows(res: dict) -> list[tuple]:
    rows = []

    def row(name, measured, target="", verdict=""):
        rows.append((name, measured, target, verdict))

    def flags(x):
        """What went wrong with a run's requests, if anything."""
        out = "" if x.get("complete", True) else " INCOMPLETE"
        if x.get("counts_ok") is False:
            out += f" (requests per call not 1 newCall + 1 answer + 1 hangup: {x.get('counts')})"
        return out

    def ok(flag):
        return "" if flag is None else ("met" if flag else "**missed**")

    a_all, a_sub, b = res.get("ceiling_esl_all"), res.get("ceiling_esl_sub"), res.get("ceiling_post")
    if a_all:
        row("(a) bare greenswitch, `event plain ALL`",
            f"{a_all['events_per_s']:,.0f} events/s ({a_all['avg_frame_bytes']} B avg, "
            f"{a_all['frames_per_call']} frames/call = {a_all['calls_per_s']:,.0f} calls/s); "
            f"{a_all['cpu_us_per_event']} µs CPU/event")
    if a_sub:
        row("(a) bare greenswitch, fs-zammad's subscription",
            f"{a_sub['events_per_s']:,.0f} events/s ({a_sub['avg_frame_bytes']} B avg, "
            f"{a_sub['frames_per_call']} frames/call = {a_sub['calls_per_s']:,.0f} calls/s); "
            f"{a_sub['cpu_us_per_event']} µs CPU/event")
    if b:
        row("(b) bare requests.Session", f"{b['posts_per_s']:,.0f} POSTs/s; "
            f"{b['cpu_us_per_post']} µs CPU/POST")
    b8 = res.get("ceiling_post_gevent8")
    if b8:
        row("(b') requests.Session under gevent, 8 greenlets (info)",
            f"{b8['posts_per_s']:,.0f} POSTs/s; {b8['cpu_us_per_post']} µs CPU/POST")
    ceil = res.get("ceilings", {})
    ceil_end = res.get("ceilings_end", {}).get("ceilings", {})

    def cpu_factor_rows(run, which):
        """CPU per call against the bare cost; with the ceilings measured again at
        the end of the run, the verdict takes the worse of the two factors."""
        for key, label in (("all", "naive forwarder"), ("sub", "same subscription")):
            if key not in ceil:
                continue
            factors = [run["cpu_s_per_1000_calls"] / c[key]["cpu_s_per_1000_calls"]
                       for c in (ceil, ceil_end) if key in c]
            text = f"{factors[0]:.2f}×" + (f" ({factors[1]:.2f}× against the ceilings measured "
                                           f"at the end)" if len(factors) > 1 else "")
            row(f"CPU per call vs bare ({label}){which}", text, f"≤ {TARGET_CPU_FACTOR}×",
                ok(max(factors) <= TARGET_CPU_FACTOR))

    for key, label in CEILINGS:
        if key in ceil:
            row(f"combined ceiling: {label} + 3 POSTs",
                f"{ceil[key]['calls_per_s']:,.1f} calls/s; "
                f"{ceil[key]['cpu_s_per_1000_calls']:.3f} CPU s/1000 calls")
    e = res.get("e2e")
    if e:
        row(f"fs-zammad end to end, LOG_LEVEL=WARNING ({e['calls']:,} calls)",
            f"{e['calls_per_s']:,.1f} calls/s ({e['posts_per_s']:,.0f} POSTs/s, "
            f"{e['events_per_s']:,.0f} events/s){flags(e)}",
            f"≥ {TARGET_CALLS_PER_S}", ok(e["calls_per_s"] >= TARGET_CALLS_PER_S))
        for key, label in (("all", "vs naive forwarder"), ("sub", "vs same subscription")):
            if key in ceil:
                ratio = e["calls_per_s"] / ceil[key]["calls_per_s"]
                row(f"ratio {label}", f"{ratio:.2f}", f"≥ {TARGET_RATIO}",
                    ok(ratio >= TARGET_RATIO))
        row("CPU per 1000 calls (WARNING)", f"{e['cpu_s_per_1000_calls']:.3f} s "
            f"(service core {e['cpu_utilisation'] * 100:.0f} % busy)")
        cpu_factor_rows(e, "")
    i = res.get("e2e_info")
    if i:
        row(f"fs-zammad end to end, LOG_LEVEL=INFO ({i['calls']:,} calls)",
            f"{i['calls_per_s']:,.1f} calls/s; {i['cpu_s_per_1000_calls']:.3f} CPU s/1000 calls; "
            f"{i['log']['lines']:,} log lines{flags(i)}",
            f"≥ {TARGET_CALLS_PER_S}", ok(i["calls_per_s"] >= TARGET_CALLS_PER_S))
    lat = res.get("latency")
    if lat:
        row(f"added latency at {lat['rate_calls_per_s']} calls/s ({lat['requests_matched']:,} POSTs)",
            f"p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms",
            f"p99 ≤ {TARGET_P99_MS} ms", ok(lat["p99_ms"] is not None and lat["p99_ms"] <= TARGET_P99_MS))
    fl = res.get("latency_floor")
    if fl:
        row("latency floor: bare greenswitch+requests forwarder, same traffic",
            f"p50 {fl['p50_ms']} ms, p99 {fl['p99_ms']} ms, max {fl['max_ms']} ms; "
            f"{fl['cpu_s_per_1000_calls']:.3f} CPU s/1000 calls")
    lt = res.get("latency_tmpfs")
    if lt:
        row("latency, outbox on tmpfs (diagnostic: fsync-free WAL checkpoints)",
            f"p50 {lt['p50_ms']} ms, p99 {lt['p99_ms']} ms, max {lt['max_ms']} ms")
    paced_rows(res, row, ok)
    s = res.get("slow")
    if s:
        row(f"slow Zammad ({s['delay_ms']:.0f} ms/answer, {s['calls']} calls)",
            f"{s['calls_per_s']} calls/s ({s['requests_per_s']} req/s) = {s['pct_of_bound']} % of "
            f"bound {s['bound_calls_per_s']} calls/s ({s['bound_requests_per_s']:.0f} req/s)")
    lr = res.get("long")
    if lr:
        f = lr["rss_flat"]
        row(f"long run ({lr['calls']:,} calls at full speed)",
            f"{lr['calls_per_s']:,.1f} calls/s; peak RSS {lr['peak_rss_mb']} MB; RSS first/last "
            f"quartile {f['first_q_mb']}/{f['last_q_mb']} MB ({f['growth_pct']:+} %); "
            f"{lr['cpu_s_per_1000_calls']:.3f} CPU s/1000 calls{flags(lr)}",
            "flat", ok(f["growth_pct"] is not None and abs(f["growth_pct"]) <= 10))
        cpu_factor_rows(lr, ", long run")
    bu = res.get("burst")
    if bu:
        row(f"burst ({bu['calls']:,} calls at full speed)",
            f"peak RSS {bu['peak_rss_mb']} MB ({bu['calls_per_s']:,.1f} calls/s){flags(bu)}",
            f"≤ {TARGET_BURST_RSS_MB:.0f} MB", ok(bu["peak_rss_mb"] <= TARGET_BURST_RSS_MB))
    o = res.get("outage")
    if o:
        f = o["rss_during_mb"]
        row(f"outage: 503 for {o['outage_s']:.0f} s at {o['rate_calls_per_s']} calls/s "
            f"({o['calls']:,} calls)",
            f"RSS during {f['first_q_mb']}→{f['last_q_mb']} MB ({f['growth_pct']:+} %), peak "
            f"{o['peak_rss_mb']} MB; outbox+wal {o['outbox_at_recovery_mb']} MB at recovery",
            "flat", ok(f["growth_pct"] is not None and abs(f["growth_pct"]) <= 10))
        row("outage: drain after recovery",
            f"{o['drain_events_per_s']:,.0f} events/s ({o['delivered_after_recovery']:,} events "
            f"in {o['drain_s']} s); first 200 after {o['first_ok_after_recovery_s']} s "
            f"(retry backoff)")
    if ceil_end:
        for key, label in CEILINGS:
            if key not in ceil or key not in ceil_end:  # a ceilings phase failed
                continue
            drift = ceil_end[key]["cpu_s_per_1000_calls"] / ceil[key]["cpu_s_per_1000_calls"] - 1
            row(f"combined ceiling at the end of the run: {label} + 3 POSTs",
                f"{ceil_end[key]['calls_per_s']:,.1f} calls/s; "
                f"{ceil_end[key]['cpu_s_per_1000_calls']:.3f} CPU s/1000 calls "
                f"({drift * 100:+.1f} % CPU against the start)")
    return rows


def paced_rows(res: dict, row, ok) -> None:
    """The one-by-one rows, each beside the bare forwarder fed the same stream."""
    paced = res.get("paced")
    if not paced:
        return
    ref = res.get("e2e_info") or res.get("paced_reference")
    ref_frame = ref and ref["cpu_s_per_1000_calls"] / ref["frames_per_call"]
    if ref:
        row(f"firehose reference for the paced rows (INFO, {ref['calls']:,} calls)",
            f"{ref['cpu_s_per_1000_calls']:.3f} CPU ms/call "
            f"({ref_frame * 1000:.0f} µs/event, {ref['frames_per_call']} frames/call)")
    for rate, pair in paced["rates"].items():
        s, b = pair["service"], pair["bare"]
        # 12.5 frames/call against the firehose's 13: compare per event (the stricter)
        factor = s["cpu_us_per_event"] / 1000 / ref_frame if ref else None
        text = (f"{s['cpu_ms_per_call']:.3f} CPU ms/call ({s['cpu_us_per_event']:.0f} µs/event"
                + (f", {factor:.2f}× the firehose" if factor else "")
                + f"; bare forwarder {b['cpu_ms_per_call']:.3f} = {s['cpu_ms_per_call'] / b['cpu_ms_per_call']:.2f}×); "
                f"{s['wakeups_per_call']} wake-ups/call (bare {b['wakeups_per_call']}); "
                f"latency p50 {s['p50_ms']} / p99 {s['p99_ms']} ms (bare {b['p50_ms']} / "
                f"{b['p99_ms']}); RSS {s['last_rss_mb']} MB, peak {s['peak_rss_mb']} MB"
                + ("" if s["complete"] and b["complete"] else " INCOMPLETE"))
        target, verdict = f"p99 ≤ {TARGET_P99_MS} ms", ok(s["p99_ms"] is not None
                                                          and s["p99_ms"] <= TARGET_P99_MS)
        if float(rate) == PACED_COUNT_RATE and factor:
            target = f"≤ {TARGET_PACED_FACTOR}× firehose, < bare; " + target
            verdict = ok(factor <= TARGET_PACED_FACTOR and s["cpu_ms_per_call"] < b["cpu_ms_per_call"]
                         and s["p99_ms"] is not None and s["p99_ms"] <= TARGET_P99_MS)
        row(f"paced {rate} calls/s, events one by one ({s['calls']:,} calls, "
            f"{s['frames_per_call']} frames/call, INFO)", text, target, verdict)
        floor, fire = pair.get("floor"), paced.get("floor_firehose")
        if floor and fire and ref:
            woken = floor["cpu_us_per_event"] - fire["cpu_us_per_event"]
            row(f"wake-up floor at {rate} calls/s: the same stream into raw sockets "
                "(bare.py floor), no library work",
                f"{floor['cpu_us_per_event']:.0f} µs/event ({floor['wakeups_per_call']} "
                f"wake-ups/call); fed the firehose {fire['cpu_us_per_event']:.0f} µs/event: "
                f"being woken per frame alone costs {woken:.0f} µs/event = "
                f"{woken / (ref_frame * 1000):.2f}× fs-zammad's firehose event "
                f"(≤ {TARGET_PACED_FACTOR}× leaves {TARGET_PACED_FACTOR - 1:.2f}× for all "
                "that the paced point adds)"
                + ("" if floor["complete"] and fire["complete"] else " INCOMPLETE"))
    c = paced.get("count", {}).get("counts")
    if c:
        top = ", ".join(f"{k} {v}" for k, v in list(c["top_syscalls_per_call"].items())[:6])
        row(f"paced {PACED_COUNT_RATE} calls/s under strace (counts per call)",
            f"SQLite commits {c['sqlite_commits_per_call']}, WAL frames {c['wal_frames_per_call']}, "
            f"fdatasync {c['fdatasync_per_call']}; {c['syscalls_per_event']} syscalls/event, "
            f"{c['epoll_waits_per_event']} epoll waits/event, greenlet switches "
            f"{c['greenlet_switches_per_event']}/event; top: {top}")


def markdown(rows) -> str:
    out = ["| measurement | result | target | verdict |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(out)


def median_of(runs: list[dict], key: str) -> dict:
    """The run with the median ``key``; every run's value is kept alongside."""
    ordered = sorted(runs, key=lambda run: run[key])
    chosen = dict(ordered[len(ordered) // 2])
    chosen["runs"] = [run[key] for run in runs]
    chosen["all_runs"] = runs
    return chosen


def strip_samples(d):
    if isinstance(d, dict):
        return {k: strip_samples(v) for k, v in d.items() if k != "samples"}
    return d


PHASES = ("ceilings", "e2e", "info", "latency", "paced", "slow", "long", "burst", "outage")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small N everywhere (< 90 s)")
    ap.add_argument("--calls", type=int, dest="long_calls", help="calls in the long run "
                    "(default 20000; the issue's full figure: 200000)")
    ap.add_argument("--outage", type=float, dest="outage_seconds",
                    help="seconds Zammad answers 503 (default 60; the 5-minute figure: 300)")
    ap.add_argument("--e2e-calls", type=int, dest="e2e_calls")
    ap.add_argument("--burst-calls", type=int, dest="burst_calls")
    ap.add_argument("--latency-seconds", type=float, dest="latency_seconds")
    ap.add_argument("--paced-rates", default=",".join(map(str, PACED_RATES)),
                    help="calls/s of the paced rows (default 10,40,100; the verdict is at 40)")
    ap.add_argument("--paced-seconds", type=float, dest="paced_seconds",
                    help="seconds during which paced calls start, per rate (default 8)")
    ap.add_argument("--retry-max", default="", help="ZAMMAD_RETRY_MAX for the outage run "
                    "(default: the service default, 15 s; --quick uses 2)")
    ap.add_argument("--only", default="", help=f"comma list of phases: {','.join(PHASES)}")
    ap.add_argument("--profile", action="store_true",
                    help="after the e2e row, run it again under py-spy and summarise hot spots")
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    ap.add_argument("--window", type=int, default=64,
                    help="closed loop: most calls between first frame and hangup POST in the "
                    "end-to-end, INFO and long runs (0 = open loop; default 64)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs per ceiling, the median is used (default 3; --quick: 1)")
    ap.add_argument("--state-base", default="", help="directory for the services' STATE_DIR "
                    "(default: the system temp dir; /dev/shm takes fsync out of the picture)")
    ap.add_argument("--rev", default="", help="measure this git revision of fs_zammad "
                    "(git archive into a temp dir, put first on the service's PYTHONPATH); "
                    "default: the working tree. For before/after: --rev <before> vs --rev HEAD")
    ap.add_argument("--out", default=str(HERE / "results" / "latest.json"))
    args = ap.parse_args(argv)
    if args.quick and not args.retry_max:
        args.retry_max = "2"
    phases = [p for p in args.only.split(",") if p] or list(PHASES)
    unknown = set(phases) - set(PHASES)
    if unknown:
        ap.error(f"unknown phases {sorted(unknown)}")
    if not Path(FS_ZAMMAD).exists():
        ap.error(f"{FS_ZAMMAD} not found: run with the venv's python")

    started = time.monotonic()
    args.code_dir = ""
    if args.rev:
        args.code_dir, rev_sha = extract_rev(args.rev)
        sys.path.insert(0, args.code_dir)   # triggers() uses the same tracker
        log(f"measuring fs_zammad at {rev_sha[:12]} ({args.rev}) from {args.code_dir}")
    code_at_start = code_version(args.code_dir, args.rev and rev_sha)
    bench = Bench(args)
    res: dict = {}
    errors: dict = {}

    def phase_ceilings(out=res):
        sub = bench.service_subscription()
        repeat = 1 if args.quick else args.repeat
        log(f"ceiling (a): bare greenswitch, event plain ALL (median of {repeat})")
        out["ceiling_esl_all"] = median_of(
            [bench.ceiling_esl(["ALL"], bench.p("esl_all_calls")) for _ in range(repeat)],
            "events_per_s")
        log(f"ceiling (a): bare greenswitch, fs-zammad's subscription (median of {repeat})")
        out["ceiling_esl_sub"] = median_of(
            [bench.ceiling_esl(sub, bench.p("esl_sub_calls")) for _ in range(repeat)],
            "events_per_s")
        log(f"ceiling (b): bare requests.Session (median of {repeat})")
        out["ceiling_post"] = median_of(
            [bench.ceiling_post(bench.p("post_seconds")) for _ in range(repeat)], "posts_per_s")
        out["ceiling_post_gevent8"] = bench.ceiling_post(bench.p("post_seconds") / 2, "gevent8")
        out["ceilings"] = {
            "all": combined(out["ceiling_esl_all"], out["ceiling_post"],
                            out["ceiling_esl_all"]["frames_per_call"]),
            "sub": combined(out["ceiling_esl_sub"], out["ceiling_post"],
                            out["ceiling_esl_sub"]["frames_per_call"])}
        log(f"  combined: {out['ceilings']['all']['calls_per_s']} calls/s (ALL), "
            f"{out['ceilings']['sub']['calls_per_s']} calls/s (same subscription)")

    def phase_ceilings_end():
        """This VM's speed drifts by up to 15 % over minutes: the ceilings again,
        so that the long rows are also compared with a ceiling measured near them."""
        log("ceilings again, at the end of the run")
        res["ceilings_end"] = {}
        phase_ceilings(res["ceilings_end"])

    def phase_e2e():
        log(f"fs-zammad end to end, WARNING, {bench.p('e2e_calls')} calls")
        res["e2e"] = bench.e2e(bench.p("e2e_calls"))
        log(f"  {res['e2e']['calls_per_s']} calls/s")
        if args.profile:
            log("  again under py-spy (numbers of this run not used)")
            res["e2e_profiled"] = bench.e2e(bench.p("e2e_calls"), name="e2e", profile=True)

    def phase_info():
        log(f"fs-zammad end to end, INFO, {bench.p('info_calls')} calls")
        res["e2e_info"] = bench.e2e(bench.p("info_calls"), "INFO", name="info")
        log(f"  {res['e2e_info']['calls_per_s']} calls/s")

    def phase_latency():
        log(f"latency at {bench.p('latency_rate')} calls/s for {bench.p('latency_seconds')} s")
        res["latency"] = bench.latency(bench.p("latency_seconds"), bench.p("latency_rate"))
        log(f"  p50 {res['latency']['p50_ms']} ms, p99 {res['latency']['p99_ms']} ms")
        log("  the same traffic into the bare greenswitch+requests forwarder (floor)")
        res["latency_floor"] = bench.latency(bench.p("latency_seconds"),
                                             bench.p("latency_rate"), bare=True)
        log(f"  p50 {res['latency_floor']['p50_ms']} ms, p99 {res['latency_floor']['p99_ms']} ms")
        if not args.quick and os.access("/dev/shm", os.W_OK) and not args.state_base:
            log("  again with the outbox on tmpfs (/dev/shm: no fsync), diagnostic")
            args.state_base = "/dev/shm"
            try:
                res["latency_tmpfs"] = bench.latency(bench.p("latency_seconds"),
                                                     bench.p("latency_rate"))
            finally:
                args.state_base = ""
            log(f"  p50 {res['latency_tmpfs']['p50_ms']} ms, p99 {res['latency_tmpfs']['p99_ms']} ms")

    def phase_paced():
        if "e2e_info" not in res:
            log(f"firehose reference for the paced rows: INFO, {bench.p('paced_ref_calls')} calls")
            res["paced_reference"] = bench.e2e(bench.p("paced_ref_calls"), "INFO", name="info")
        out = res["paced"] = {"rates": {}}
        log(f"paced: the raw-socket floor fed the firehose, {bench.p('paced_ref_calls')} calls")
        out["floor_firehose"] = bench.floor_firehose(bench.p("paced_ref_calls"))
        log(f"  {out['floor_firehose']['cpu_ms_per_call']} CPU ms/call")
        for rate in [float(x) if "." in x else int(x) for x in args.paced_rates.split(",") if x]:
            log(f"paced: {rate} calls/s, frames one by one ({'+'.join(PACED_MIX)}), "
                f"{bench.p('paced_seconds')} s of calls")
            svc = bench.paced(rate, bench.p("paced_seconds"))
            log(f"  {svc['cpu_ms_per_call']} CPU ms/call, p99 {svc['p99_ms']} ms; the same "
                f"stream into the bare forwarder, {bench.p('paced_bare_seconds')} s of calls")
            bare = bench.paced(rate, bench.p("paced_bare_seconds"), bare="forward")
            floor = bench.paced(rate, bench.p("paced_bare_seconds"), bare="floor")
            log(f"  bare: {bare['cpu_ms_per_call']} CPU ms/call; wake-up floor (raw sockets): "
                f"{floor['cpu_ms_per_call']}")
            out["rates"][str(rate)] = {"service": svc, "bare": bare, "floor": floor}
        log(f"paced: counting sub-run at {PACED_COUNT_RATE} calls/s under strace (counts only)")
        if shutil.which("strace"):
            out["count"] = bench.paced(PACED_COUNT_RATE, bench.p("paced_count_seconds"),
                                       count=True)
            log(f"  {out['count']['counts']}")
        else:
            log("  strace not installed: no counts")
        if args.profile:
            log(f"paced: again at {PACED_COUNT_RATE} calls/s under py-spy (numbers not used)")
            out["profiled"] = bench.paced(PACED_COUNT_RATE, bench.p("paced_seconds"),
                                          profile=True)

    def phase_slow():
        log(f"slow Zammad (100 ms), {bench.p('slow_calls')} calls")
        res["slow"] = bench.slow_zammad(bench.p("slow_calls"))
        log(f"  {res['slow']['calls_per_s']} calls/s")

    def phase_long():
        log(f"long run, {bench.p('long_calls')} calls")
        res["long"] = bench.e2e(bench.p("long_calls"), name="long")
        log(f"  {res['long']['calls_per_s']} calls/s, peak RSS {res['long']['peak_rss_mb']} MB")

    def phase_burst():
        log(f"burst, {bench.p('burst_calls')} calls at once (open loop)")
        res["burst"] = bench.e2e(bench.p("burst_calls"), name="burst", window=0)
        log(f"  peak RSS {res['burst']['peak_rss_mb']} MB")

    def phase_outage():
        log(f"outage, 503 for {bench.p('outage_seconds')} s at {bench.p('outage_rate')} calls/s")
        res["outage"] = bench.outage(bench.p("outage_seconds"), bench.p("outage_rate"))
        log(f"  drain {res['outage']['drain_events_per_s']} events/s")

    runners = {"ceilings": phase_ceilings, "e2e": phase_e2e, "info": phase_info,
               "latency": phase_latency, "paced": phase_paced, "slow": phase_slow, "long": phase_long,
               "burst": phase_burst, "outage": phase_outage, "ceilings_end": phase_ceilings_end}
    if "ceilings" in phases and {"long", "outage"} & set(phases):
        phases.append("ceilings_end")
    try:
        for name in phases:
            try:
                runners[name]()
            except Exception as exc:  # one broken phase must not lose the others
                errors[name] = f"{type(exc).__name__}: {exc}"[:3000]
                log(f"  !! phase {name} failed: {errors[name][:500]}")
                bench.fs("stop", timeout=10)
                bench.fs_result_quiet()
    finally:
        bench.close()
    total = time.monotonic() - started
    rows = build_rows(res)
    for name, error in errors.items():
        rows.append((f"phase `{name}`", f"FAILED: {error.splitlines()[0][:200]}", "", ""))
    table = markdown(rows)
    print(table)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "quick": args.quick,
            "machine": {"cpus": os.cpu_count(), "model": _cpu_model(), "kernel": platform.release(),
                        "python": platform.python_version(), "pinned": bench.pinning},
            "versions": _versions(), "code": code_at_start, "duration_s": round(total, 1),
            "phases": phases, "errors": errors, "args": vars(args)}
    code_at_end = code_version(args.code_dir, args.rev and rev_sha)
    if code_at_end["fs_zammad_sha256"] != code_at_start["fs_zammad_sha256"]:
        meta["code_changed_during_run"] = code_at_end
        log("  !! fs_zammad/ changed while the benchmark ran: the rows mix two versions")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "table": table, "results": res}, indent=1))
    (out.with_name(out.stem + ".summary.json")).write_text(
        json.dumps({"meta": meta, "results": strip_samples(res)}, indent=1))
    if args.code_dir:
        shutil.rmtree(args.code_dir, ignore_errors=True)
    log(f"done in {total:.0f} s; wrote {out}")
    return 0


def extract_rev(rev: str) -> tuple[str, str]:
    """``git archive REV fs_zammad`` into a temp dir: (dir for PYTHONPATH, full sha)."""
    root = HERE.parent
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=root,
                         capture_output=True, text=True, check=True).stdout.strip()
    target = Path(tempfile.mkdtemp(prefix=f"fszb-rev-{sha[:8]}-"))
    archive = subprocess.run(["git", "archive", sha, "fs_zammad"], cwd=root,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return str(target), sha


def code_version(code_dir: str = "", rev: str = "") -> dict:
    """Which fs_zammad was measured: git HEAD, local changes, hash of the sources."""
    import hashlib

    root = HERE.parent
    source = Path(code_dir) if code_dir else root
    digest = hashlib.sha256()
    for path in sorted((source / "fs_zammad").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    if code_dir:
        return {"rev": rev, "fs_zammad_sha256": digest.hexdigest()[:16],
                "note": "service ran `git archive` of this revision, not the working tree"}

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"git_head": git("rev-parse", "--short", "HEAD"),
            "git_changed": git("status", "--porcelain", "--", "fs_zammad").splitlines(),
            "fs_zammad_sha256": digest.hexdigest()[:16]}


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for name in ("fs-zammad", "greenswitch", "gevent", "requests", "urllib3"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


if __name__ == "__main__":
    sys.exit(main())
