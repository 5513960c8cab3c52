"""Phase 3 of the GPU check: the training-step benchmark (``benchmarks.train_step``) under every
kernels x compile setting, and ``deepspeed --num_gpus 1 launch/train.py`` killed and resumed."""
from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import signal
import socket
import sys
import time

from benchmarks import ROOT

TRAIN = os.path.join(ROOT, "launch", "train.py")


def reserve_s(args) -> float:
    """The share of the budget phase 3 keeps."""
    return (0 if args.no_train_step else args.train_step_s) + (0 if args.no_deepspeed else args.deepspeed_s)


def _read_jsonl(path):
    with contextlib.suppress(OSError):
        with open(path) as fh:
            return [json.loads(line) for line in fh if line.strip()]
    return []


def train_step_args(dry: bool, compile_backend) -> list:
    """ResNet50 448 px b32 bf16 on a GPU: the baseline head and CSSFE under each kernels x compile
    setting, eager first (a compiled case spends most of its time compiling)."""
    if dry:
        # aot_eager has no modes: default and reduce-overhead would be the same run
        return ["--backbone", "smallcnn", "--image-size", "32", "--batch-size", "2", "--classes", "8",
                "--precision", "bf16", "--kernels", "auto,cpu", "--compile", "off,default",
                "--warmup", "1", "--repeats", "2", "--device", "cpu", "--compile-backend", compile_backend or "aot_eager"]
    return ["--backbone", "resnet50", "--image-size", "448", "--batch-size", "32", "--classes", "80",
            "--precision", "bf16", "--kernels", "auto,cuda,triton,reference", "--compile", "off,default,reduce-overhead",
            "--warmup", "3", "--repeats", "10", "--device", "cuda"]


def step_train_step(orch):
    args = orch.args
    cap = min(args.train_step_s, orch.time_left() - (0 if args.no_deepspeed else args.deepspeed_s))
    info = orch.step_record("train_step", "main", log="logs/train_step.log")
    out = os.path.join(orch.work, "train_step")
    if cap < 20:
        info["status"] = "skipped: time budget"
        with orch.lock:
            orch.R["train_step"] = {"skipped": "time budget"}
        return
    _, rec = orch.sup.command("train_step", [sys.executable, "-m", "benchmarks.train_step",
                                             *train_step_args(orch.dry, args.compile_backend), "--out", out], cap)
    rows = _read_jsonl(os.path.join(out, "train_step.jsonl"))
    base = {(r["compile"], r["dtype"]): r for r in rows if r["head"] == "baseline"}
    for r in rows:
        b = base.get((r["compile"], r["dtype"]))
        if r["head"] == "cssfe" and b:
            r["vs_baseline"] = r["images_per_s"] / b["images_per_s"]
    rec["rows"] = rows
    info.update(seconds=rec["seconds"], status=rec.get("error") or f"rc={rec['rc']}, {len(rows)} rows")
    with orch.lock:
        orch.R["train_step"] = rec


def deepspeed_args(dry: bool):
    """(config overrides, kill once this checkpoint tag prefix is written)."""
    zero2 = os.path.join(ROOT, "configs", "deepspeed", "zero2.yaml")
    # group norm: DeepSpeed's bf16 module keeps batch norm's running statistics in fp32, which CPU batch
    # norm refuses beside bf16 weights (the dry run); no download: rie embeddings
    common = ["model.backbone=smallcnn_gn", "model.embedding=rie", "progress=false", "compile=true",
              f"distributed.deepspeed_config={zero2}", "distributed.precision=bf16"]
    if dry:  # 2 epochs of 9 steps at 16 px
        return common + ["data.image_size=16", "data.batch_size=128", "optim.epochs=2", "model.dim=16",
                         "checkpoint_every_steps=3"], "epoch0001-step"
    # about 35 steps an epoch at batch 32: 280 steps, killed in epoch 5
    return common + ["data.image_size=64", "optim.epochs=8", "checkpoint_every_steps=20"], "epoch0004-step"


def step_deepspeed(orch):
    """ZeRO-2 bf16, compiled: an uninterrupted run, then one killed (SIGKILL to the launcher and its
    rank) once a mid-epoch checkpoint is written, and resumed."""
    cap = min(orch.args.deepspeed_s, orch.time_left())
    info = orch.step_record("deepspeed", "main", log="logs/deepspeed_*.log")
    if cap < 30:
        info["status"] = "skipped: time budget"
        with orch.lock:
            orch.R["deepspeed"] = {"skipped": "time budget"}
        return
    shm_before = set(glob.glob("/dev/shm/deepspeed_*"))
    overrides, kill_at = deepspeed_args(orch.dry)
    env = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "CSSFE_COMPILE_BACKEND": orch.args.compile_backend or "aot_eager"} if orch.dry else {}
    deadline = time.time() + cap

    def launch(name, out, resume=False, wait=True):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(port),
               TRAIN, "--output-dir", out, *(["--resume"] if resume else []), *overrides]
        return orch.sup.command(f"deepspeed_{name}", cmd, deadline - time.time(), env=env, wait=wait)

    R = {"overrides": overrides, "kill_after_checkpoint": kill_at, "runs": {}}
    whole, cut = os.path.join(orch.work, "ds_whole"), os.path.join(orch.work, "ds_killed")
    try:
        # dry run: the uninterrupted run beside the killed one (the launchers' start-up dominates on CPU);
        # on a GPU one after the other, so that the images/s are the card's alone
        whole_proc, whole_rec = launch("whole", whole, wait=not orch.dry)
        if not orch.dry:
            R["runs"]["whole"] = whole_rec
        proc, rec = launch("killed", cut, wait=False)
        latest = os.path.join(cut, "checkpoints", "deepspeed", "latest")
        while proc.poll() is None and time.time() < deadline:  # the checkpoint file is the event waited for
            with contextlib.suppress(OSError):
                with open(latest) as fh:
                    if fh.read().strip().startswith(kill_at):
                        os.killpg(proc.pid, signal.SIGKILL)
                        rec["killed_at"] = kill_at
                        break
            time.sleep(0.05)
        R["runs"]["killed"] = orch.sup.wait(proc, rec, max(1.0, deadline - time.time()))
        if orch.dry:
            R["runs"]["whole"] = orch.sup.wait(whole_proc, whole_rec, max(1.0, deadline - time.time()))
        R["runs"]["resumed"] = launch("resumed", cut, resume=True)[1]
        R.update(outcome(whole, cut, R["runs"]))
    finally:
        for path in set(glob.glob("/dev/shm/deepspeed_*")) - shm_before:
            with contextlib.suppress(OSError):
                os.remove(path)
    info.update(seconds=round(sum(r.get("seconds", 0) for r in R["runs"].values()), 2),
                status=f"trains {R.get('trains')}, resumes to the same loss {R.get('resumed_same_loss')}")
    with orch.lock:
        orch.R["deepspeed"] = R


def outcome(whole, cut, runs) -> dict:
    """Did the run train (finite, falling loss), does the killed-and-resumed run end where the
    uninterrupted one does (final loss and mAP), and its images/s (training steps only)."""
    logs = {name: _read_jsonl(os.path.join(path, "log.jsonl")) for name, path in (("whole", whole), ("resumed", cut))}
    out = {"train_loss": {k: [r.get("train_loss") for r in v] for k, v in logs.items()}}
    w, r = logs["whole"], logs["resumed"]
    losses = [x.get("train_loss") for x in w]
    out["trains"] = bool(losses) and all(isinstance(x, float) and math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    out["killed_mid_run"] = runs.get("killed", {}).get("rc") not in (0, None) and bool(runs["killed"].get("killed_at"))
    if w and r and len(w) == len(r):
        rel = abs(r[-1]["train_loss"] - w[-1]["train_loss"]) / max(abs(w[-1]["train_loss"]), 1e-12)
        out["final_loss_rel_diff"] = rel
        out["final_map"] = {"whole": w[-1].get("mAP", {}).get("total"), "resumed": r[-1].get("mAP", {}).get("total")}
        out["resumed_same_loss"] = out["killed_mid_run"] and rel <= 1e-3
    else:
        out["resumed_same_loss"] = False
    # images/s of each epoch's training steps (evaluation excluded), from rank 0's own log; the first
    # epoch includes the compilation, the last is the steady state
    ranks = _read_jsonl(os.path.join(whole, "ranks", "rank0.log"))
    out["images_per_s"] = [x["micro_batches"] * x["micro_batch"] * x["world_size"] / x["epoch_seconds"]
                           for x in ranks if x.get("epoch_seconds")]
    out["steps"] = sum(x["micro_batches"] for x in ranks)
    return out
