"""Single-process training: ``train(cfg)``. No argument parsing, no global state.

Writes to ``cfg.output_dir``: ``config.yaml`` (resolved), ``log.jsonl`` (one line per evaluated
epoch), ``checkpoints/last.pt`` and ``checkpoints/best.pt``, and ``metrics.json`` with the final
and best models' metrics.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from typing import Any, Dict, Optional

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from cssfe.config import TrainConfig, to_dict, validate
from cssfe.data import GROUP_NAMES, build_data
from cssfe.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from cssfe.engine.ema import ModelEMA
from cssfe.engine.evaluate import evaluate, format_table
from cssfe.losses import build_loss
from cssfe.models.model import build_model

# Keys that may differ between a run and its resumption: they do not change the numbers.
RESUMABLE_CHANGES = {"progress", "device", "eval_every", "output_dir", "cache_dir", "data.num_workers", "data.eval_batch_size"}


def default_cache_dir() -> str:
    return os.environ.get("CSSFE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cssfe")


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"config key 'device' asks for {name!r} but CUDA is not available; use device=cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _param_groups(model: torch.nn.Module, weight_decay: float):
    """No weight decay on biases, norms, label embeddings and lambda (SPEC: lambda undecayed)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith("embeddings") or name.endswith("lam_raw"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("params", "embedding_options"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _check_resume_config(saved: Dict[str, Any], cfg: TrainConfig, path: str) -> None:
    old, new = _flatten(saved), _flatten(to_dict(cfg))
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise ValueError(f"cannot resume {path}: the config differs from the run's ({details})")


def _amp_context(device: torch.device, amp: str):
    enabled = amp == "on" or (amp == "auto" and device.type == "cuda")
    if not enabled:
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def _metric_rows(metrics: Dict[str, Any], label: str) -> Dict[str, Dict[str, float]]:
    rows = {label: metrics["mAP"]}
    if "first_pass_mAP" in metrics:
        rows[f"{label} (1st pass)"] = metrics["first_pass_mAP"]
    return rows


def train(cfg: TrainConfig, resume: bool = False) -> Dict[str, Any]:
    """Train ``cfg`` and return ``{"final": metrics, "best": metrics, "best_epoch": int}``.

    With ``resume``, continue the run in ``cfg.output_dir`` from its last checkpoint.
    """
    validate(cfg)
    out_dir = cfg.output_dir
    last_path = os.path.join(out_dir, "checkpoints", "last.pt")
    best_path = os.path.join(out_dir, "checkpoints", "best.pt")
    if resume and not os.path.isfile(last_path):
        raise FileNotFoundError(f"--resume: no checkpoint at {last_path}")
    if not resume and os.path.exists(last_path):
        raise FileExistsError(
            f"{out_dir} already holds a run ({last_path}); pass --resume to continue it or choose another --output-dir"
        )
    device = select_device(cfg.device)
    cache_dir = cfg.cache_dir or default_cache_dir()
    seed_everything(cfg.seed)

    data = build_data(cfg.data, cache_dir, progress=cfg.progress)
    loss_fn = build_loss(cfg.loss.name, data.class_freq, len(data.train), **cfg.loss.params)
    model = build_model(cfg.model, data.class_names, data.groups, cfg.data.image_size, cache_dir).to(device)
    ema = ModelEMA(model, cfg.optim.ema_decay)

    generator = torch.Generator()
    train_loader = DataLoader(
        data.train,
        batch_size=cfg.data.batch_size,
        shuffle=True,
        generator=generator,
        drop_last=len(data.train) > cfg.data.batch_size,  # no size-1 batch for batch norm
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
    )
    test_loader = DataLoader(data.test, batch_size=cfg.data.eval_batch_size, shuffle=False, num_workers=cfg.data.num_workers)
    steps_per_epoch = len(train_loader)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.optim.lr, total_steps=cfg.optim.epochs * steps_per_epoch, pct_start=cfg.optim.pct_start
    )
    autocast, scaler = _amp_context(device, cfg.optim.amp)

    start_epoch, best_total, best_metrics, best_epoch, skipped = 0, -math.inf, None, -1, 0
    if resume:
        state = load_checkpoint(last_path)
        _check_resume_config(state["config"], cfg, last_path)
        model.load_state_dict(state["model"])
        ema.module.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start_epoch, best_total, best_metrics, best_epoch = state["epoch"], state["best_total"], state["best_metrics"], state["best_epoch"]
        skipped = state.get("skipped_steps", 0)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)

    has_aux = cfg.model.head == "cssfe" and cfg.model.enhance
    metrics: Optional[Dict[str, Any]] = None
    log_path = os.path.join(out_dir, "log.jsonl")
    for epoch in range(start_epoch, cfg.optim.epochs):
        generator.manual_seed(cfg.seed * 100003 + epoch)  # the epoch's order depends on seed and epoch only
        model.train()
        t0, loss_sum, n_steps = time.time(), 0.0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", disable=not cfg.progress, leave=False)
        for images, labels, _ in bar:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast():
                out = model(images)
            loss = loss_fn(out["logits"].float(), labels)
            if has_aux:
                loss = loss + cfg.model.aux_weight * loss_fn(out["logits0"].float(), labels)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
            if torch.isfinite(loss) and torch.isfinite(grad_norm):
                if scaler is not None:
                    scaler.step(optimizer)
                else:
                    optimizer.step()
                ema.update(model)
                loss_sum += loss.item()
                n_steps += 1
            else:  # never apply a non-finite update
                skipped += 1
            if scaler is not None:
                scaler.update()
            scheduler.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        last_epoch = epoch + 1 == cfg.optim.epochs
        record: Dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(n_steps, 1),
            "lr": scheduler.get_last_lr()[0],
            "skipped_steps": skipped,
            "epoch_seconds": round(time.time() - t0, 3),
        }
        if hasattr(model.head, "lam"):
            record["lambda"] = float(model.head.lam.detach())
        if (epoch + 1) % cfg.eval_every == 0 or last_epoch:
            metrics = evaluate(ema.module, test_loader, data.groups, device, progress=cfg.progress)
            record.update({k: metrics[k] for k in ("mAP", "f1", "first_pass_mAP") if k in metrics})
            if metrics["mAP"]["total"] > best_total:
                best_total, best_metrics, best_epoch = metrics["mAP"]["total"], metrics, epoch + 1
                save_checkpoint(
                    {
                        "model": ema.module.state_dict(),
                        "config": to_dict(cfg),
                        "epoch": epoch + 1,
                        "metrics": metrics,
                        "class_names": data.class_names,
                        "groups": data.groups.tolist(),
                        "class_freq": data.class_freq.tolist(),
                    },
                    best_path,
                )
            if cfg.progress:
                lam = f", lambda {record['lambda']:.3f}" if "lambda" in record else ""
                tqdm.write(f"epoch {epoch + 1}/{cfg.optim.epochs}: loss {record['train_loss']:.4f}{lam}\n" + format_table(_metric_rows(metrics, "EMA model")))
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        save_checkpoint(
            {
                "model": model.state_dict(),
                "ema": ema.module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng_state(),
                "epoch": epoch + 1,
                "best_total": best_total,
                "best_metrics": best_metrics,
                "best_epoch": best_epoch,
                "skipped_steps": skipped,
                "config": to_dict(cfg),
                "class_names": data.class_names,
                "groups": data.groups.tolist(),
                "class_freq": data.class_freq.tolist(),
            },
            last_path,
        )
    if metrics is None:  # resumed a finished run: evaluate its final weights
        metrics = evaluate(ema.module, test_loader, data.groups, device)
    result = {"final": metrics, "best": best_metrics, "best_epoch": best_epoch, "groups": {n: int((data.groups == g).sum()) for g, n in enumerate(GROUP_NAMES)}}
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(result, f, indent=2)
    if cfg.progress:
        rows = {**_metric_rows(metrics, "final"), f"best (epoch {best_epoch})": best_metrics["mAP"]}
        print(format_table(rows))
        print(f"F1 (final): weighted {metrics['f1']['weighted']:.3f}, micro {metrics['f1']['micro']:.3f}, macro {metrics['f1']['macro']:.3f}")
        print(f"outputs in {out_dir}")
    return result
