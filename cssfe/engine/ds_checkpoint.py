"""The tags of a DeepSpeed run's checkpoints (``RUN_DIR/checkpoints/deepspeed/<tag>/``): which are
complete, which one to resume, which world sizes can load one, and the storage every rank must share.

A tag is complete when it holds ``cssfe_complete.json``. Rank 0 writes it (atomically) after a
barrier that every rank reaches only once its ZeRO shards and cssfe state are on disk, and then
points DeepSpeed's ``latest`` at the tag. Resuming takes the newest complete tag and never trusts
``latest`` alone: a job killed between the shards and the marker leaves a folder without it, which
resume passes over (and the next checkpoint removes).

Every rank reads rank 0's files (the marker, rank 0's cssfe state with the EMA weights) and writes
its own shards into the same folder: the run folder must be on storage every node sees (a shared
filesystem); :func:`check_shared` refuses a run whose ranks see different folders before any work.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import uuid
from typing import Any, Dict, List, Optional

UNIVERSAL_SUFFIX = "_universal"  # a tag converted by cssfe.engine.reshard
CONSOLIDATED_MODEL = "consolidated_model.pt"  # per ZeRO-3 checkpoint tag: the gathered weights
COMPLETE = "cssfe_complete.json"  # in a tag folder: every rank's files are on disk
_PROBE = ".shared_check"


def ds_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints", "deepspeed")


def tag_name(epoch: int, step: int) -> str:
    """Names that sort in training order; a converted tag sorts right after its source."""
    return f"epoch{epoch:04d}-step{step:06d}"


def client_path(ds_dir: str, tag: str, rank: int) -> str:
    """A rank's cssfe state in a tag: its RNG states and position; rank 0's also the EMA weights."""
    return os.path.join(ds_dir, tag, f"cssfe_rank{rank}.pt")


def _tags(ds_dir: str) -> List[str]:
    if not os.path.isdir(ds_dir):
        return []
    return sorted(t for t in os.listdir(ds_dir) if t.startswith("epoch") and os.path.isdir(os.path.join(ds_dir, t)))


def is_complete(ds_dir: str, tag: str) -> bool:
    return os.path.isfile(os.path.join(ds_dir, tag, COMPLETE))


def complete_tags(ds_dir: str) -> List[str]:
    """The complete tags, oldest first."""
    return [t for t in _tags(ds_dir) if is_complete(ds_dir, t)]


def newest_complete_tag(ds_dir: str) -> Optional[str]:
    tags = complete_tags(ds_dir)
    return tags[-1] if tags else None


def require_tag(ds_dir: str) -> str:
    """The newest complete tag, or FileNotFoundError saying what is there instead."""
    tag = newest_complete_tag(ds_dir)
    if tag is None:
        partial = _tags(ds_dir)
        found = f" (tags without {COMPLETE}, written only in part: {', '.join(partial)})" if partial else ""
        raise FileNotFoundError(f"no complete DeepSpeed checkpoint in {ds_dir}{found}")
    return tag


def read_marker(ds_dir: str, tag: str) -> Dict[str, Any]:
    with open(os.path.join(ds_dir, tag, COMPLETE)) as f:
        return json.load(f)


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def mark_complete(ds_dir: str, tag: str, world_size: int) -> None:
    """Call once every rank's files of ``tag`` are on disk (after a barrier), on one process: the
    marker, then DeepSpeed's ``latest`` (read by its own tools), each written by rename."""
    _write_atomically(os.path.join(ds_dir, tag, COMPLETE), json.dumps({"tag": tag, "world_size": world_size}) + "\n")
    _write_atomically(os.path.join(ds_dir, "latest"), tag)


def clear_tag(ds_dir: str, tag: str) -> None:
    """Before writing ``tag``, on one process: a folder of that name is a leftover of an
    interrupted write (resume starts from an older tag), whose stale files must not mix in."""
    shutil.rmtree(os.path.join(ds_dir, tag), ignore_errors=True)


def prune(ds_dir: str, keep: int = 2) -> None:
    """Keep the ``keep`` newest complete tags; remove older ones and every incomplete tag (called
    after a checkpoint is complete, when no rank is writing)."""
    complete = complete_tags(ds_dir)
    kept = set(complete[-keep:])
    for tag in _tags(ds_dir):
        if tag not in kept:
            shutil.rmtree(os.path.join(ds_dir, tag), ignore_errors=True)


def world_size_free(folder: str) -> bool:
    """True when a tag holds no per-rank optimizer shards (ZeRO stage 0 without a bf16 optimizer:
    one ``mp_rank_00`` file with the weights and the whole optimizer): any world size loads it."""
    return not glob.glob(os.path.join(folder, "*_optim_states.pt"))


def has_checkpoint(run_dir: str) -> bool:
    """A complete checkpoint to continue from: one process's ``last.pt`` or a DeepSpeed tag."""
    last = os.path.join(run_dir, "checkpoints", "last.pt")
    return os.path.isfile(last) or os.path.isfile(last + ".prev") or newest_complete_tag(ds_dir(run_dir)) is not None


def check_node_local_storage(ds_config: Dict[str, Any], path: Optional[str]) -> None:
    """DeepSpeed's ``checkpoint.use_node_local_storage`` writes shards under local ranks' numbers, on
    each node's own disk: cssfe's resume reads rank 0's files on every rank, so it is refused."""
    from cssfe.config import ConfigError

    if (ds_config.get("checkpoint") or {}).get("use_node_local_storage"):
        raise ConfigError(f"{path or 'the DeepSpeed config'}: checkpoint.use_node_local_storage is not supported: "
                          "every rank reads rank 0's checkpoint files, so --output-dir must be on a filesystem "
                          "that every node sees; remove the key")


def check_shared(folder: str, ctx) -> None:
    """Every rank must see the files rank 0 writes in ``folder``: rank 0 writes a probe with a fresh
    token, every rank reads it back, and all ranks raise together (naming the ranks that did not
    see it) when one could not. A collective: every rank calls it."""
    if ctx.world_size == 1:
        return
    import torch.distributed as dist

    probe = os.path.join(folder, _PROBE)
    token = [uuid.uuid4().hex if ctx.main else None]
    dist.broadcast_object_list(token, src=0)
    if ctx.main:
        os.makedirs(folder, exist_ok=True)
        _write_atomically(probe, token[0])
    dist.barrier()
    try:
        with open(probe) as f:
            seen = f.read() == token[0]
    except OSError:
        seen = False
    blind: List[Optional[tuple]] = [None] * ctx.world_size
    dist.all_gather_object(blind, None if seen else (ctx.rank, os.uname().nodename))
    dist.barrier()  # every rank has read it
    if ctx.main:
        os.remove(probe)
    blind = [b for b in blind if b is not None]
    if blind:
        where = ", ".join(f"rank {r} on {host}" for r, host in blind)
        raise ValueError(f"{folder} is not shared by every rank: {where} cannot see what rank 0 writes there. "
                         "Checkpoints need one folder that every node sees (a shared filesystem): "
                         "put --output-dir on one")
