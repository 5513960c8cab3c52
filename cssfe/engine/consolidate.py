"""One standalone checkpoint from a DeepSpeed run: ``python -m cssfe.engine.consolidate RUN_DIR [--out PATH]``.

Runs DeepSpeed's own converter (``zero_to_fp32``: the fp32 master weights merged from every rank's
ZeRO shards) on the run's newest complete checkpoint tag and writes them, with the run's config and class
names, in the format of ``best.pt`` (default ``RUN_DIR/checkpoints/consolidated.pt``):
``evaluate.py``, ``predict.py``, ``visualize.py`` and ``export.py`` read it unchanged. These are the
trained weights at that checkpoint, not the EMA weights that ``best.pt`` and the run's metrics use
(the two agree when ``optim.ema_decay=0``). A ZeRO stage-0 checkpoint has no shards to merge: its
model file already holds every weight (in the training precision: the fp32 master copy of a
bf16/fp16 stage-0 run stays inside the optimizer state), and is read as it is. ``--precision bf16`` (or fp16)
rounds the weights to what a run in that precision computed with (they stay stored as fp32).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
from typing import Dict, List, Optional

import torch

from cssfe.engine import ds_checkpoint
from cssfe.engine.checkpoint import save_checkpoint
from cssfe.engine.ds_checkpoint import client_path

METADATA = ("config", "class_names", "groups", "class_freq")
ROUNDING = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _weights(ds_dir: str, tag: str) -> Dict[str, torch.Tensor]:
    folder = os.path.join(ds_dir, tag)
    if glob.glob(os.path.join(folder, "*_optim_states.pt")):  # ZeRO 1-3, or a bf16/fp16 optimizer's fp32 partitions
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # a file conversion: no GPU needed
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(ds_dir, tag=tag)
    state = torch.load(os.path.join(folder, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
    return {k: v.float() if v.is_floating_point() else v for k, v in state["module"].items()}


def consolidate(run_dir: str, out: Optional[str] = None, precision: str = "fp32") -> str:
    """Write the consolidated checkpoint of ``run_dir``'s newest DeepSpeed tag; returns its path."""
    if precision not in ROUNDING:
        raise ValueError(f"precision must be one of {', '.join(ROUNDING)}, got {precision!r}")
    ds_dir = ds_checkpoint.ds_dir(run_dir)
    tag = ds_checkpoint.require_tag(ds_dir)
    client = torch.load(client_path(ds_dir, tag, 0), map_location="cpu", weights_only=False)
    missing = [k for k in METADATA if k not in client]
    if missing:
        raise ValueError(f"{client_path(ds_dir, tag, 0)} lacks {', '.join(missing)} (written by an older cssfe); "
                         "evaluate the run's best.pt instead")
    out = out or os.path.join(run_dir, "checkpoints", "consolidated.pt")
    weights = {k: v.to(ROUNDING[precision]).float() if v.is_floating_point() else v for k, v in _weights(ds_dir, tag).items()}
    save_checkpoint({"model": weights, **{k: client[k] for k in METADATA}, "tag": tag}, out)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="the training run's --output-dir")
    p.add_argument("--out", help="where to write it (default: RUN_DIR/checkpoints/consolidated.pt)")
    p.add_argument("--precision", choices=sorted(ROUNDING), default="fp32",
                   help="round the weights to this precision (default: DeepSpeed's fp32 master weights)")
    args = p.parse_args(argv)
    try:
        path = consolidate(args.run_dir, args.out, args.precision)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
