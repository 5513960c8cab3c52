"""Child processes of the GPU check: workers with a per-task watchdog, pytest runs and commands, each in
its own process group, killed as a group; their ids go to ``GPU_CHECK_PGID_FILE`` so that the shell
script can kill what is left if this process itself is killed hard."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET

from benchmarks import ROOT
from benchmarks.environment import now_utc

IDLE_TIMEOUT_S = 120.0  # a worker that reports nothing this long outside a task is killed (start-up/exit hang)
POLL_S = 0.25


def tail(path: str, n: int = 3000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - n))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def read_events(path, offset):
    """The complete JSON lines written to ``path`` after ``offset``: (new offset, events)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except OSError:
        return offset, []
    end = data.rfind(b"\n")
    if end < 0:
        return offset, []
    events = []
    for line in data[: end + 1].splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return offset + end + 1, events


def parse_junit(path):
    tests = []
    try:
        root = ET.parse(path).getroot()
    except Exception:  # missing or truncated
        return tests
    for tc in root.iter("testcase"):
        t = {"id": f"{tc.get('classname')}::{tc.get('name')}", "seconds": float(tc.get("time") or 0),
             "outcome": "passed"}
        for tag, outcome in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            el = tc.find(tag)
            if el is not None:
                t["outcome"] = outcome
                t["message"] = ((el.get("message") or "") + "\n" + (el.text or ""))[-6000:]
                break
        tests.append(t)
    return tests


def _task_key(t):
    """What a crash is counted against: the provider (or backend) of the task."""
    return t.get("provider") or t.get("backend") or t["kind"]


class Supervisor:
    def __init__(self, logs: str, work: str, env: dict):
        self.logs, self.work, self.env = logs, work, env
        self.children = set()
        self.lock = threading.RLock()

    # -------------------------------------------------------------- process groups
    def _register(self, proc):
        with self.lock:
            self.children.add(proc)
            self._write_pgids()

    def _unregister(self, proc):
        with self.lock:
            self.children.discard(proc)
            self._write_pgids()

    def _write_pgids(self):
        path = os.environ.get("GPU_CHECK_PGID_FILE")
        if path:
            with contextlib.suppress(OSError), open(path, "w") as fh:
                fh.write("\n".join(str(p.pid) for p in self.children if p.poll() is None))

    @staticmethod
    def kill(proc):
        if proc.poll() is not None:
            return
        with contextlib.suppress(Exception):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except Exception:
            with contextlib.suppress(Exception):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)

    def kill_all(self):
        for proc in list(self.children):
            self.kill(proc)

    def popen(self, cmd, log_path, env=None, mode="w"):
        with open(log_path, mode) as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**self.env, **(env or {})},
                                    start_new_session=True)
        self._register(proc)
        return proc

    # -------------------------------------------------------------- commands
    def wait(self, proc, rec, cap_s):
        """Wait at most ``cap_s`` (then kill); fill rc, seconds, output tail and error into ``rec``."""
        try:
            proc.wait(timeout=max(1.0, cap_s))
        except subprocess.TimeoutExpired:
            self.kill(proc)
            rec["error"] = f"ran over {cap_s:.0f} s and was killed"
        self._unregister(proc)
        rec["rc"] = proc.returncode
        rec["seconds"] = round(time.time() - rec.pop("t0"), 2)
        rec["output_tail"] = tail(os.path.join(self.logs, os.path.basename(rec["log"])), 3000)
        return rec

    def command(self, name, cmd, cap_s, env=None, wait=True):
        """A subprocess with its output in logs/NAME.log; returns (proc, record)."""
        rec = {"cmd": " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd),
               "log": f"logs/{name}.log"}
        proc = self.popen(cmd, os.path.join(self.logs, f"{name}.log"), env)
        rec["t0"] = time.time()
        if wait:
            self.wait(proc, rec, cap_s)
        return proc, rec

    def pytest(self, name, nodes, timeout):
        """pytest on ``nodes`` (junit summary per test); the run's record."""
        xml = os.path.join(self.work, f"junit_{name}.xml")
        cmd = [sys.executable, "-m", "pytest", *nodes, "-q", "-rs", "-p", "no:cacheprovider", "-m", "not slow",
               f"--junitxml={xml}"]
        _, run = self.command(f"pytest_{name}", cmd, timeout)
        run["error"] = run.get("error", "").replace("ran over", "pytest ran over") or None
        run["tests"] = parse_junit(xml)
        counts = {}
        for t in run["tests"]:
            counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
        run.update(cmd=" ".join(cmd[1:]), counts=counts, output_tail=tail(os.path.join(self.logs, f"pytest_{name}.log"), 4000))
        if run["error"] is None:
            del run["error"]
        return run

    # -------------------------------------------------------------- workers
    def run_worker(self, step, tasks, info, deadline, spec, on_record, stop_event=None, max_launches=6, env=None):
        """Runs ``tasks`` in worker processes until each has a record: a task that runs over its
        ``timeout_s`` (the watchdog) or kills its worker is recorded as failed and the worker restarts on
        the rest; a provider that breaks two workers is skipped. Returns ({id: record}, {id: [subs]})."""
        records, subs, crashes, reported = {}, {}, {}, set()
        log_path = os.path.join(self.logs, f"{step}.log")
        by_id = {t["id"]: t for t in tasks}
        pending = list(tasks)
        info["status"] = "done"

        def give_up(reason):
            for t in pending:
                records[t["id"]] = {"ok": False, "skipped": reason}
            info["status"] = reason

        while pending:
            if time.time() > deadline - 3:
                give_up("skipped: time budget")
                break
            if stop_event is not None and stop_event.is_set():
                give_up("skipped: stopped (the build finished)")
                break
            if info["launches"] >= max_launches:
                give_up("skipped: too many worker restarts")
                break
            info["launches"] += 1
            spec_path = os.path.join(self.work, f"{step}_{info['launches']}.json")
            res_path = os.path.join(self.work, f"{step}_{info['launches']}.jsonl")
            with open(spec_path, "w") as fh:
                json.dump({**spec, "tasks": pending, "deadline": deadline}, fh)
            with open(log_path, "a") as log:
                log.write(f"\n===== {now_utc()} launch {info['launches']}: {len(pending)} tasks\n")
            proc = self.popen([sys.executable, "-m", "benchmarks.gpu_check.worker", spec_path, res_path], log_path,
                              env, mode="a")
            offset, current, current_start, killed, fatal, unhealthy = 0, None, None, None, None, None
            last_event = time.time()
            while True:
                rc = proc.poll()
                offset, events = read_events(res_path, offset)
                if events:
                    last_event = time.time()
                for ev in events:
                    kind = ev.get("event")
                    if kind == "start":
                        current, current_start = ev["id"], time.time()
                    elif kind == "sub":
                        subs.setdefault(ev["id"], []).append(ev["record"])
                    elif kind == "result":
                        records[ev["id"]] = ev["record"]
                        current = None
                        on_record(by_id.get(ev["id"]), ev["record"], subs.get(ev["id"]))
                        reported.add(ev["id"])
                    elif kind == "fatal":
                        fatal = ev
                    elif kind == "unhealthy":
                        unhealthy = ev["id"]
                if rc is not None:
                    break
                now = time.time()
                budget = by_id[current].get("timeout_s", 120) if current is not None else None
                if current is not None and now - current_start > budget:
                    killed = f"timeout: task ran over its {budget:g} s watchdog"
                elif current is None and now - last_event > IDLE_TIMEOUT_S:
                    killed = f"timeout: worker idle for {IDLE_TIMEOUT_S:.0f} s between tasks (start-up or exit hang)"
                elif now > deadline:
                    killed = "step time budget ran out while running"
                elif stop_event is not None and stop_event.is_set():
                    killed = "stopped (the build finished)"
                if killed:
                    self.kill(proc)
                    rc = proc.poll()
                    offset, events = read_events(res_path, offset)
                    for ev in events:
                        if ev.get("event") == "result":
                            records[ev["id"]] = ev["record"]
                            current = None
                        elif ev.get("event") == "sub":
                            subs.setdefault(ev["id"], []).append(ev["record"])
                    break
                time.sleep(POLL_S)
            self._unregister(proc)
            if fatal:
                for t in pending:
                    records.setdefault(t["id"], {"ok": False, "error": f"worker could not start: {fatal['error']}",
                                                 "traceback": fatal.get("traceback")})
                info["status"] = "fatal"
                break
            if current is not None and current not in records:
                records[current] = {"ok": False, "error": killed or f"worker died (exit code {rc}) while running this task",
                                    "log_tail": tail(log_path)}
                crashes[_task_key(by_id[current])] = crashes.get(_task_key(by_id[current]), 0) + 1
            if unhealthy is not None:
                crashes[_task_key(by_id[unhealthy])] = crashes.get(_task_key(by_id[unhealthy]), 0) + 1
            pending = [t for t in pending if t["id"] not in records]
            for t in pending:
                if crashes.get(_task_key(t), 0) >= 2:
                    records[t["id"]] = {"ok": False, "skipped": f"{_task_key(t)} broke the worker twice (crash, hang "
                                                                 "or unusable CUDA context)"}
            pending = [t for t in pending if t["id"] not in records]
            if killed and not killed.startswith("timeout"):
                give_up(f"skipped: {killed}")
                pending = []
            elif rc == 0 and pending:  # should not happen: the worker answers every task
                for t in pending:
                    records[t["id"]] = {"ok": False, "error": "worker exited without running this task"}
                pending = []
        for t in tasks:  # results that did not come from the worker (crash, timeout, skipped)
            if t["id"] in records and t["id"] not in reported:
                on_record(t, records[t["id"]], subs.get(t["id"]))
        return records, subs
