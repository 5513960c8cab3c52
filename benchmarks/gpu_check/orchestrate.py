"""The process that owns a GPU check: the record (``gpu_check.json``, rewritten after every step, so a
kill leaves the latest state), the time budget, and the phases.

- phase 1, two lanes at once: (A) the just-in-time build of the C++/CUDA extension (CPU-bound) and
  (B) the environment measurements, the Triton parity tests, then a warm-up of the torch.compile /
  Triton caches (stopped when the build ends, so no timing runs beside another GPU job);
- phase 2: the CUDA parity tests, then the benchmarks (main cases first, then per-check parity
  diagnosis when a parity test failed or pytest is missing, then the other shapes and dtypes, the
  enhancement alone, the block sweep and the SPEC grid);
- phase 3 (``training``): the training-step benchmark and the DeepSpeed run.

This process imports only the standard library and the suite's torch-free modules; everything that
touches torch runs in a worker (``worker``) or a pytest subprocess.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

from benchmarks import ROOT
from benchmarks.environment import now_utc
from benchmarks.gpu_check import plan, report, training
from benchmarks.gpu_check.supervise import Supervisor, tail
from benchmarks.gpu_check.worker import clean

SCHEMA = 2
RESERVE_S = 8.0  # kept at the end of the budget to write the JSON and the summary


def _run_text(cmd, timeout=30) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return (p.stdout + p.stderr).strip()
    except Exception as exc:  # recorded, never fatal
        return f"unavailable ({type(exc).__name__}: {exc})"


def host_env() -> dict:
    """What this host says about itself, before any worker runs."""
    e = {"date_utc": now_utc(), "python": sys.version.split()[0], "platform": platform.platform(),
         "cpu_count": os.cpu_count(),
         "env": {k: os.environ.get(k) for k in ("MAX_JOBS", "TORCH_CUDA_ARCH_LIST", "CSSFE_EXT_DIR", "CUDA_HOME",
                                               "TRITON_INTERPRET", "CSSFE_NO_CUDA", "CSSFE_NO_JIT",
                                               "CSSFE_KERNEL_BACKEND", "CUDA_VISIBLE_DEVICES")}}
    commit, source = None, None
    if os.path.exists(os.path.join(ROOT, ".git")) and shutil.which("git"):
        with contextlib.suppress(Exception):
            p = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=20)
            if p.returncode == 0 and p.stdout.strip():
                commit, source = p.stdout.strip(), "git"
                d = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=20)
                e["git_dirty"] = bool(d.stdout.strip())
    if commit is None:
        path = os.path.join(ROOT, "benchmarks", "results", "COMMIT")
        if os.path.exists(path):
            with open(path) as fh:
                commit, source = fh.read().strip() or None, "benchmarks/results/COMMIT"
    e["commit"], e["commit_source"] = commit or "unknown", source or "none"
    nvcc = shutil.which("nvcc")
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if nvcc is None and home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            nvcc = os.path.join(home, "bin", "nvcc")
    e["nvcc_path"] = nvcc
    text = _run_text([nvcc, "--version"]) if nvcc else None
    e["nvcc_version"] = " ".join(text.splitlines()[-2:]) if text else None
    if shutil.which("nvidia-smi"):
        e["nvidia_smi"] = _run_text(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap,"
                                     "clocks.max.sm,power.limit", "--format=csv,noheader"])
    e["ninja"] = shutil.which("ninja")
    e["pytest_available"] = importlib.util.find_spec("pytest") is not None
    e["triton_installed"] = importlib.util.find_spec("triton") is not None
    return e


def child_env(dry: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.pop("CSSFE_KERNEL_BACKEND", None)
    if not dry:
        for k in ("TRITON_INTERPRET", "CSSFE_NO_JIT", "CSSFE_NO_CUDA"):
            env.pop(k, None)
    if shutil.which("ninja") is None:  # a pip `ninja` whose binary is not on PATH
        with contextlib.suppress(Exception):
            import ninja  # type: ignore

            env["PATH"] = ninja.BIN_DIR + os.pathsep + env.get("PATH", "")
    return env


class Orchestrator:
    def __init__(self, args):
        self.args = args
        self.dry = args.cpu_dry_run
        self.t_start = time.time()
        self.deadline = self.t_start + args.budget_s
        self.out = os.path.abspath(args.out)
        self.logs = os.path.join(self.out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.work = tempfile.mkdtemp(prefix="cssfe_gpu_check_")
        self.json_path = os.path.join(self.out, "gpu_check.json")
        self.lock = threading.RLock()
        self.save_lock = threading.Lock()
        self.native = "cpu" if self.dry else "cuda"
        self.sup = Supervisor(self.logs, self.work, child_env(self.dry))
        a = args
        self.opts = ({"warmup": 1, "reps": 3, "max_case_s": 0.3, "flush_bytes": 0, "copy_bytes": 16 << 20,
                      "matmul_n": 256, "compile_backend": a.compile_backend or "aot_eager"} if self.dry else
                     {"warmup": 5, "reps": 15 if a.quick else 30, "max_case_s": 1.0 if a.quick else 1.5,
                      "flush_bytes": 256 << 20, "copy_bytes": 1 << 30, "matmul_n": 8192,
                      "compile_backend": a.compile_backend or "inductor"})
        self.R = {"schema": SCHEMA, "mode": "cpu-dry-run" if self.dry else "gpu", "status": "running",
                  "started_utc": now_utc(), "args": vars(args), "budget_s": args.budget_s, "environment": {},
                  "build": {}, "parity": {"pytest": {"runs": []}, "direct": {"checks": []}},
                  "benchmarks": {"definitions": report.DEFINITIONS, "providers": {}},
                  "main_cases": plan.main_cases(self.dry), "rows": [], "steps": [], "errors": []}
        self._counter = 0

    # -------------------------------------------------------------- recording
    def save(self):
        with self.save_lock:  # both lanes save: one writer of the temporary file at a time
            with self.lock:
                data = clean(self.R)
            tmp = self.json_path + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(data, fh, indent=1)
            os.replace(tmp, self.json_path)

    def error(self, where, exc=None, message=None):
        with self.lock:
            item = {"where": where, "error": message or (f"{type(exc).__name__}: {exc}" if exc else "error")}
            if exc is not None:
                item["traceback"] = traceback.format_exc()[-4000:]
            self.R["errors"].append(item)

    def time_left(self):
        return self.deadline - RESERVE_S - time.time()

    def step_record(self, name, lane, **kw):
        with self.lock:
            rec = {"name": name, "lane": lane, "start_s": round(time.time() - self.t_start, 2), **kw}
            self.R["steps"].append(rec)
            return rec

    def next_id(self, prefix):
        with self.lock:
            self._counter += 1
            return f"{prefix}{self._counter}"

    def on_record(self, task, record, subs):
        """Called as results arrive: keep the JSON current."""
        if task is None:
            return
        with self.lock:
            if task["kind"] == "bench" and not task.get("prewarm"):
                self.R["rows"].extend(report.task_rows(task, record))
            elif task["kind"] == "parity":
                fields = {k: v for k, v in task.items() if k not in ("timeout_s", "limit")}
                self.R["parity"]["direct"].setdefault("suites", []).append(dict(fields, **record))
                self.R["parity"]["direct"]["checks"].extend(subs or [])
        with contextlib.suppress(Exception):
            self.save()

    def run_worker(self, step, tasks, cap_s, stop_event=None, lane="main", env=None):
        info = self.step_record(step, lane, tasks=len(tasks), launches=0, log=f"logs/{step}.log")
        t0 = time.time()
        deadline = min(time.time() + cap_s, self.deadline - RESERVE_S)
        records, subs = self.sup.run_worker(step, tasks, info, deadline, {"device": self.native, "opts": self.opts},
                                            self.on_record, stop_event, env=env)
        info.update(seconds=round(time.time() - t0, 2),
                    failed=sum(1 for r in records.values() if not r.get("ok") and not r.get("skipped")),
                    skipped=sum(1 for r in records.values() if r.get("skipped")))
        self.save()
        return records, subs

    # -------------------------------------------------------------- build, environment, parity
    def step_build(self):
        keep = self.args.providers
        if keep and not any(p.split("_")[0] == self.native for p in keep.split(",")):
            with self.lock:
                self.R["build"] = {"ok": False, "skipped": f"--providers {keep} names no {self.native} provider"}
            return
        task = {"id": "build", "kind": "build", "timeout_s": int(self.args.build_timeout_s),
                "setup_py_fallback": not self.dry}
        records, _ = self.run_worker("build", [task], cap_s=self.args.build_timeout_s + 15, lane="A",
                                     env={"CSSFE_EXT_VERBOSE": "1"})  # compiler output goes to logs/build.log
        rec = records.get("build", {"ok": False, "error": "no result"})
        if not rec.get("ok"):
            rec["log_tail"] = tail(os.path.join(self.logs, "build.log"), 8000)
        with self.lock:
            self.R["build"] = rec

    def step_env(self):
        records, _ = self.run_worker("env", [{"id": "env", "kind": "env", "timeout_s": 150}], cap_s=180, lane="B")
        rec = records.get("env", {"ok": False, "error": "no result"})
        with self.lock:
            self.R["environment"].update({k: v for k, v in rec.items() if k != "seconds"})
            self.R["environment"]["env_step_ok"] = rec.get("ok", False)

    def triton_available(self):
        env = self.R["environment"]
        if not env.get("triton"):
            return False, "triton not importable"
        if self.dry:
            if os.environ.get("TRITON_INTERPRET") == "1":
                return True, "TRITON_INTERPRET=1 (CPU interpreter)"
            return False, "dry-run: set TRITON_INTERPRET=1 to include triton"
        if not env.get("cuda_available"):
            return False, "no CUDA device"
        return True, "triton with a CUDA device"

    def native_available(self):
        b = self.R.get("build") or {}
        if b.get("ok"):
            return True, b.get("reason", "built")
        return False, b.get("error") or b.get("skipped") or "extension not built"

    def parity_for(self, node, backend, lane, cap_s):
        """pytest test ``node`` when pytest is importable, else the direct checks of ``backend``;
        returns 'passed' | 'failed' | 'error' | 'skipped' for the summary."""
        if self.R["environment"].get("pytest_available") and not self.args.no_pytest:
            nodes = plan.PYTEST_NODES[node] + (["-k", plan.PYTEST_DRY_SELECT[node]] if self.dry else [])
            info = self.step_record(f"pytest_{node}", lane, log=f"logs/pytest_{node}.log")
            timeout = min(cap_s, self.time_left())
            run = {"name": node, "nodes": nodes, "skipped": "time budget"} if timeout < 20 else \
                dict(self.sup.pytest(node, nodes, timeout), name=node, nodes=nodes)
            info.update(seconds=run.get("seconds"), status=run.get("skipped") or run.get("error")
                        or f"rc={run['rc']} {run['counts']}")
            with self.lock:
                self.R["parity"]["pytest"]["runs"].append(run)
            counts = run.get("counts", {})
            if run.get("skipped") or run.get("error") or not run.get("tests"):
                return "error"
            return "failed" if counts.get("failed") or counts.get("error") else \
                "passed" if counts.get("passed") else "skipped"
        with self.lock:
            self.R["parity"]["pytest"]["note"] = "skipped: pytest not installed (or --no-pytest); direct checks run"
        records, _ = self.run_worker(f"parity_{backend}", plan.parity_tasks(backend, self.dry, self.next_id), cap_s,
                                     lane=lane)
        return "passed" if records and all(r.get("ok") for r in records.values()) else "failed"

    def parity_summary(self, key, available, why, backend, lane):
        if self.args.no_parity:
            value = "skipped: --no-parity"
        elif key not in self.args.parity_backends:
            value = "skipped: not in --parity-backends"
        elif available:  # the dry run: the same pytest path; the GPU tests are collected and skip
            value = self.parity_for(key, backend, lane, cap_s=240)
        else:
            value = f"skipped: {why}"
        with self.lock:
            self.R["parity"].setdefault("summary", {})[key] = value
        self.save()

    # -------------------------------------------------------------- phases
    def providers(self, triton_ok, native_ok):
        plist = plan.providers(self.native, triton_ok, native_ok, self.args.quick, self.dry)
        if self.args.providers:  # --providers eager,triton keeps those (and their *_kernel variants)
            keep = set(self.args.providers.split(","))
            plist = {f: [p for p in names if p in keep or p.rsplit("_kernel", 1)[0] in keep] for f, names in plist.items()}
        return plist

    def phase1(self):
        build_done = threading.Event()

        def lane_a():
            try:
                self.step_build()
            finally:
                build_done.set()

        def lane_b():
            self.step_env()
            if not self.R["environment"].get("cuda_available") and not self.dry:
                self.error("environment", message="torch sees no CUDA device: GPU steps will fail")
            ok, why = self.triton_available()
            self.parity_summary("triton", ok, why, "triton", "B")
            if not self.args.no_prewarm and not build_done.is_set():
                tasks = sum(plan.bench_tasks(self.args, self.providers(ok, False), self.next_id, self.dry, True), [])
                if tasks:
                    self.run_worker("prewarm", tasks, cap_s=300, stop_event=build_done, lane="B")

        threads = [threading.Thread(target=self.guard, args=(f, name), daemon=True)
                   for f, name in ((lane_a, "lane A (build)"), (lane_b, "lane B (env, triton parity, prewarm)"))]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(timeout=0.5)

    def phase2(self):
        triton_ok, triton_why = self.triton_available()
        native_ok, native_why = self.native_available()
        self.parity_summary("cuda", native_ok, native_why, self.native, "main")
        plist = self.providers(triton_ok, native_ok)
        with self.lock:
            self.R["benchmarks"]["providers"] = report.provider_docs(plist, triton_ok, triton_why, self.native,
                                                                     native_ok, native_why)
            self.R["benchmarks"]["plan"] = plist
        tier1, tier2, grid = plan.bench_tasks(self.args, plist, self.next_id, self.dry)
        # per-check diagnosis: always in the dry run; on a GPU when pytest ran and reported a failure
        diag = []
        if not self.args.no_parity:
            pyt = self.R["environment"].get("pytest_available") and not self.args.no_pytest
            summ = self.R["parity"].get("summary", {})
            for backend, ok in ((self.native, native_ok), ("triton", triton_ok)):
                key = "cuda" if backend in ("cuda", "cpu") else backend
                if ok and pyt and key in self.args.parity_backends and (self.dry or summ.get(key) in ("failed", "error")):
                    diag += plan.parity_tasks(backend, self.dry, self.next_id)
        tasks = tier1 + diag + tier2 + grid
        if not self.dry and not self.R["environment"].get("cuda_available"):
            with self.lock:
                self.R["benchmarks"]["skipped"] = "torch sees no CUDA device (see environment.errors)"
            tasks = []
        if tasks:  # the training steps of phase 3 keep their share of the budget
            self.run_worker("bench", tasks, cap_s=max(30.0, self.time_left() - training.reserve_s(self.args)))
        if diag:
            with self.lock:
                for s in self.R["parity"]["direct"].get("suites", []):
                    key = "cuda" if s.get("backend") in ("cuda", "cpu") else s.get("backend")
                    if not s.get("ok"):
                        self.R["parity"]["summary"][f"{key}_direct"] = "failed"
                    else:
                        self.R["parity"]["summary"].setdefault(f"{key}_direct", "passed")

    def phase3(self):
        if not self.dry and not self.R["environment"].get("cuda_available"):
            with self.lock:
                self.R["train_step"] = self.R["deepspeed"] = {"skipped": "torch sees no CUDA device"}
            return
        if not self.args.no_train_step:
            self.guard(lambda: training.step_train_step(self), "train_step")
        if not self.args.no_deepspeed:
            self.guard(lambda: training.step_deepspeed(self), "deepspeed")

    def guard(self, fn, where):
        try:
            fn()
        except Exception as exc:
            self.error(where, exc)
        with contextlib.suppress(Exception):
            self.save()

    # -------------------------------------------------------------- finishing
    def finish(self, status="done"):
        with self.lock:
            skipped = [r for r in self.R["rows"] if "time budget" in str(r.get("skipped", ""))]
            if skipped:
                self.R["budget_exhausted"] = f"{len(skipped)} benchmark tasks skipped for time"
                if status == "done":
                    status = "done (time budget ran out: some tasks skipped)"
            self.R.update(status=status, finished_utc=now_utc(), elapsed_s=round(time.time() - self.t_start, 2))
        try:
            with self.lock:
                report.postprocess(self.R)
        except Exception as exc:
            self.error("postprocess", exc)
        try:
            text = report.summarize(self.R)
        except Exception as exc:
            self.error("summary", exc)
            text = f"# GPU check\n\nsummary failed: {exc}\n"
        with contextlib.suppress(Exception):
            with open(os.path.join(self.out, "summary.md"), "w") as fh:
                fh.write(text)
        self.save()
        for name in os.listdir(self.logs):  # keep logs small
            p = os.path.join(self.logs, name)
            with contextlib.suppress(OSError):
                if os.path.getsize(p) > 2_000_000:
                    text_tail = tail(p, 2_000_000)
                    with open(p, "w") as fh:
                        fh.write("[... truncated ...]\n" + text_tail)
        shutil.rmtree(self.work, ignore_errors=True)
        return text

    def on_signal(self, signum, frame):
        self.sup.kill_all()
        self.error("signal", message=f"terminated by signal {signum} after {time.time() - self.t_start:.0f} s")
        with contextlib.suppress(Exception):
            print(self.finish(status=f"terminated (signal {signum})"), flush=True)
        os._exit(124)

    def run(self):
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        with self.lock:
            self.R["environment"].update(host_env())
        self.save()
        for phase in (self.phase1, self.phase2, self.phase3):
            try:
                phase()
            except Exception as exc:
                self.error(phase.__name__, exc)
            self.save()
        print(self.finish(), flush=True)
        return 0
