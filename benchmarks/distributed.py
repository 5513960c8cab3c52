"""Distributed training throughput: images/s and peak memory per rank count, ZeRO stage and precision.

    python -m benchmarks.distributed                              # CPU: 1 and 2 ranks, 1 thread each, ZeRO 2, fp32
    python -m benchmarks.distributed --ranks 1,2 --zero 1,2,3 --precision fp32,bf16
    python -m benchmarks.distributed --smoke [--out DIR]          # tiny, for CI; rows only to --out

Each case is a real ``deepspeed launch/train.py`` run on the bundled data at an equal per-rank
micro-batch (global batch = micro-batch x ranks), so the scaling is 2-rank images/s over 1-rank
images/s at the same work per rank. Images/s come from the training time of the last epoch (the
first one pays for start-up), read from the run's log; peak memory is each rank's peak resident
set size, virtual size (VmPeak: on CPU ranks the only place DeepSpeed's untouched communication
buckets show) and, on GPUs, torch's peak allocation, from its rank log. ``--zero-configs DIR``
runs another folder of zero1/2/3.yaml (other bucket sizes). Rows go to
``benchmarks/results/distributed.jsonl`` with the machine, versions, commit and date. Nothing is
asserted. CPU ranks need an otherwise idle machine: another job on the same cores makes the
scaling meaningless.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import socket
import subprocess
import sys
import tempfile

from benchmarks import ROOT
from benchmarks.environment import meta
from benchmarks.rows import append_rows


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(ranks: int, zero: int, precision: str, micro: int, epochs: int, threads: int, extra, workdir: str,
             zero_configs: str = os.path.join(ROOT, "configs", "deepspeed")) -> dict:
    out = os.path.join(workdir, f"r{ranks}-z{zero}-{precision}")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(_port()),
           os.path.join(ROOT, "launch", "train.py"), "--output-dir", out, f"data.batch_size={micro * ranks}",
           f"optim.epochs={epochs}", f"distributed.zero_stage={zero}", f"distributed.precision={precision}",
           f"distributed.deepspeed_config={os.path.join(zero_configs, f'zero{max(zero, 1)}.yaml')}",
           "progress=false", f"eval_every={epochs}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
           "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    port = cmd[cmd.index("--master_port") + 1]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):  # CPU all-reduce leaves one per rank
        os.remove(path)
    row = {"benchmark": "distributed", "ranks": ranks, "zero_stage": zero, "precision": precision, "micro_batch": micro,
           "global_batch": micro * ranks, "threads_per_rank": threads, "epochs": epochs, "args": list(extra),
           "zero_configs": os.path.relpath(zero_configs, ROOT)}
    if proc.returncode != 0:
        row["error"] = (proc.stdout + proc.stderr)[-1500:]
        return row
    with open(os.path.join(out, "log.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    rank_rows = []
    for r in range(ranks):
        with open(os.path.join(out, "ranks", f"rank{r}.log")) as f:
            rank_rows.append([json.loads(line) for line in f][-1])
    images = rank_rows[0]["micro_batches"] * micro * ranks
    row.update(epoch_seconds=last["epoch_seconds"], images_per_s=images / last["epoch_seconds"],
               total_mAP=last["mAP"]["total"],
               **{f"{k}_per_rank": [r.get(k) for r in rank_rows] for k in ("peak_rss_bytes", "peak_vm_bytes", "peak_gpu_bytes")})
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--zero", default="2")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="threads per rank")
    p.add_argument("--zero-configs", default=os.path.join(ROOT, "configs", "deepspeed"),
                   help="folder of zero1/2/3.yaml to run (default configs/deepspeed), e.g. to try other bucket sizes")
    p.add_argument("--out", default=None, help="folder for distributed.jsonl (default benchmarks/results)")
    p.add_argument("--smoke", action="store_true", help="tiny: 1 epoch at 32 px; rows only to --out, if given")
    p.add_argument("overrides", nargs="*", help="extra training overrides (key=value)")
    args = p.parse_args(argv)
    extra = list(args.overrides)
    if args.smoke:
        args.epochs = 1
        extra += ["data.image_size=32", "model.embedding=rie", "model.dim=16"]
    info = meta()
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for zero in map(int, args.zero.split(",")):
            for precision in args.precision.split(","):
                by_ranks = {}
                for ranks in map(int, args.ranks.split(",")):
                    row = {**run_case(ranks, zero, precision, args.micro_batch, args.epochs, args.threads, extra, workdir,
                                      os.path.abspath(args.zero_configs)), **info}
                    rows.append(row)
                    by_ranks[ranks] = row
                    if "error" in row:
                        print(f"ZeRO {zero} {precision} {ranks} rank(s): FAILED\n{row['error']}")
                        continue
                    base = by_ranks.get(1)
                    scale = f", {row['images_per_s'] / base['images_per_s']:.2f}x one rank" if base and "error" not in base and ranks > 1 else ""
                    peak = {k: max(r or 0 for r in row[f"peak_{k}_bytes_per_rank"]) / 2**20 for k in ("rss", "vm", "gpu")}
                    gpu = f", GPU {peak['gpu']:.0f} MiB" if peak["gpu"] else ""
                    print(f"ZeRO {zero} {precision} {ranks} rank(s) x {args.threads} thread(s), micro {args.micro_batch}: "
                          f"{row['images_per_s']:.1f} img/s{scale}; peak RSS per rank {peak['rss']:.0f} MiB, "
                          f"virtual {peak['vm']:.0f} MiB{gpu}")
    if not args.smoke or args.out:
        print(f"appended {len(rows)} rows to {append_rows('distributed.jsonl', rows, args.out)}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
