"""Make a DeepSpeed run resumable at another world size: ``python -m cssfe.engine.reshard RUN_DIR``.

Converts the run's newest complete checkpoint into DeepSpeed's universal format (``ds_to_universal``:
the ZeRO shards of parameters and optimizer states are merged per parameter), copies each rank's
cssfe state beside it and marks the result complete, which makes it the tag ``--resume`` loads, with
any number of ranks; ranks that did not exist before start from rank 0's EMA weights and a fresh
random state, which only data augmentation draws from. A tag without per-rank optimizer shards
(ZeRO stage 0 in fp32: one ``mp_rank_00`` file) loads at any world size as it is and is kept.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
from typing import List, Optional

from cssfe.engine import ds_checkpoint
from cssfe.engine.ds_checkpoint import UNIVERSAL_SUFFIX


def reshard(run_dir: str) -> str:
    """The tag that ``--resume`` loads at any world size: the newest complete one, converted when it
    holds per-rank shards."""
    ds_dir = ds_checkpoint.ds_dir(run_dir)
    tag = ds_checkpoint.require_tag(ds_dir)
    if tag.endswith(UNIVERSAL_SUFFIX) or ds_checkpoint.world_size_free(os.path.join(ds_dir, tag)):
        return tag
    universal = tag + UNIVERSAL_SUFFIX
    out = os.path.join(ds_dir, universal)
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}  # a file conversion: no GPU needed
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", os.path.join(ds_dir, tag),
           "--output_folder", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed on {os.path.join(ds_dir, tag)}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    for path in glob.glob(os.path.join(ds_dir, tag, "cssfe_rank*.pt")):
        shutil.copy2(path, out)
    ds_checkpoint.mark_complete(ds_dir, universal, ds_checkpoint.read_marker(ds_dir, tag)["world_size"])
    return universal


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="the training run's --output-dir")
    args = p.parse_intermixed_args(argv)
    try:
        tag = reshard(args.run_dir)
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.run_dir}: the checkpoint to resume is {tag}; resume it with any number of ranks (--resume)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
