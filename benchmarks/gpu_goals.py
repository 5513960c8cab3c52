#!/usr/bin/env python
"""The kernels' GPU goals, read off a ``gpu_check.json`` (standard library only).

    python benchmarks/gpu_goals.py benchmarks/results/gpu/<run>/gpu_check.json
    python -m benchmarks.gpu_goals benchmarks/results/gpu/<run>/gpu_check.json    # the same

``benchmarks.gpu_check`` calls :func:`evaluate` when it finishes and puts the result in its JSON
(``goals``) and its summary, so a GPU run says at once which goals it meets. The goals are data
(``GOALS``); each is judged for every fused provider at the family's main case (``main_cases``), on
the forward + backward rows (``rows``, the schema of ``benchmarks/rows.py``), and only on rows whose
numbers agreed with eager PyTorch. The same function gives, per op and dtype, the fastest
backend as called through the op (the choice ``kernels: auto`` should make on that card:
``CUDA_AUTO`` in ``cssfe/ops/dispatch.py``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Dict, List, NamedTuple, Optional


class Goal(NamedTuple):
    id: str
    family: str  # the rows' ``family`` (the GPU check's benchmark family)
    text: str
    column: str  # the summary table's header
    metric: str  # a row field, or "peak_vs_sdpa" (computed here)
    target: float
    at_least: bool  # True: value >= target; False: value <= target
    dtypes: Optional[tuple] = None  # None: every dtype measured


GOALS = (
    Goal("asl_vs_eager", "asl", "ASL fwd+bwd >= 5x eager (per call)", "x eager",
         "speedup_vs_eager", 5.0, True),
    Goal("asl_vs_eager_graph", "asl", "ASL fwd+bwd >= 5x eager (CUDA-graph replay)",
         "x eager, graph", "graph_speedup_vs_eager", 5.0, True),
    Goal("asl_copy_bw", "asl", "ASL fwd+bwd >= 70 % of copy bandwidth (per call)",
         "copy BW", "copy_fraction", 0.70, True),
    Goal("asl_copy_bw_graph", "asl", "ASL fwd+bwd >= 70 % of copy bandwidth (CUDA-graph replay)",
         "copy BW, graph", "graph_copy_fraction", 0.70, True),
    Goal("attention_vs_eager", "attention", "attention + enhancement >= 3x the eager composition",
         "x eager", "speedup_vs_eager", 3.0, True, ("bfloat16",)),
    Goal("attention_vs_eager_graph", "attention",
         "attention + enhancement >= 3x the eager composition (CUDA-graph replay)", "x eager, graph",
         "graph_speedup_vs_eager", 3.0, True, ("bfloat16",)),
    Goal("attention_vs_sdpa", "attention", "attention + enhancement no slower than SDPA + mixing",
         "x SDPA + mixing", "speedup_vs_sdpa", 1.0, True, ("bfloat16",)),
    Goal("attention_peak_vs_sdpa", "attention", "attention + enhancement peak memory <= SDPA + mixing",
         "peak / SDPA + mixing", "peak_vs_sdpa", 1.0, False, ("bfloat16",)),
)

# Providers that are not ours (the baselines the goals compare against).
BASELINES = {"eager", "eager_module", "compile", "compile_ro", "compile_autograd", "sdpa", "sdpa_flash", "sdpa_efficient",
             "sdpa_cudnn", "sdpa_math"}
# Providers that are a whole call through the op with one backend: provider -> backend name.
THROUGH_OP = {"eager": "reference", "triton": "triton", "cuda": "cuda", "cpu": "cpu"}


# How a family's case is written, from its shape's named fields in order.
CASE_FORMAT = {"asl": "BxC={}x{}", "attention": "B={} C={} N={} d={}", "enhance": "B={} C={} L={}"}
# The op each family times (the names CUDA_AUTO in cssfe/ops/dispatch.py uses).
FAMILY_OP = {"asl": "asymmetric_loss", "attention": "class_attention + progressive_enhance",
             "enhance": "progressive_enhance"}
FULL = "forward+backward"


def _case(r: dict) -> tuple:
    return tuple((r.get("shape") or {}).values())


def _case_name(case: tuple, family: str) -> str:
    return CASE_FORMAT[family].format(*case)


def _family_rows(result: dict, family: str) -> List[dict]:
    return [r for r in result.get("rows", []) if r.get("family") == family and r.get("mode") == FULL]


def main_case(result: dict, family: str) -> Optional[tuple]:
    """The case a family's goals are judged at: the one the GPU check names, else the largest measured."""
    named = (result.get("main_cases") or {}).get(family)
    if named:
        return tuple(named.values())
    cases = {_case(r) for r in _family_rows(result, family)}
    cases = [c for c in cases if c and all(isinstance(x, int) for x in c)]
    if not cases:
        return None
    return max(cases, key=math.prod)


def _value(goal: Goal, row: dict, peers: Dict[str, dict]) -> Optional[float]:
    if goal.metric == "peak_vs_sdpa":
        base, own = peers.get("sdpa", {}).get("peak_mib"), row.get("peak_mib")
        return own / base if isinstance(own, (int, float)) and isinstance(base, (int, float)) and base > 0 else None
    v = row.get(goal.metric)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def evaluate(result: dict) -> dict:
    """``{"goals": [one row per goal, provider and dtype], "fastest_backend": [one row per op and dtype]}``."""
    goals: List[dict] = []
    fastest: List[dict] = []
    for family in CASE_FORMAT:
        case = main_case(result, family)
        if case is None:
            continue
        rows = [r for r in _family_rows(result, family) if _case(r) == case]
        by_dtype: Dict[str, Dict[str, dict]] = {}
        for r in rows:
            by_dtype.setdefault(r.get("dtype"), {})[r.get("provider")] = r
        for dtype in sorted(by_dtype):
            peers = by_dtype[dtype]
            for goal in (g for g in GOALS if g.family == family and (g.dtypes is None or dtype in g.dtypes)):
                for provider in sorted(p for p in peers if p not in BASELINES):
                    row = peers[provider]
                    entry = {"goal": goal.id, "text": goal.text, "case": _case_name(case, family), "dtype": dtype,
                             "provider": provider, "target": goal.target, "at_least": goal.at_least,
                             "value": None, "met": None, "note": ""}
                    if not row.get("ok"):
                        entry.update(met=False, note="did not run: " + str(row.get("error") or row.get("skipped"))[:120])
                    elif not row.get("check", {}).get("agrees"):
                        entry.update(met=False, note="numbers disagree with eager")
                    else:
                        value = _value(goal, row, peers)
                        entry["value"] = value
                        if value is None:
                            entry["note"] = "not measured"
                        else:
                            entry["met"] = value >= goal.target if goal.at_least else value <= goal.target
                    goals.append(entry)
            times = {THROUGH_OP[p]: r["p50_ms"] for p, r in peers.items()
                     if p in THROUGH_OP and r.get("ok") and r.get("check", {}).get("agrees") and r.get("p50_ms")}
            if times:
                best = min(times, key=times.get)
                fastest.append({"op": family, "case": _case_name(case, family), "dtype": dtype, "backend": best,
                                "median_ms": times})
    out = {"goals": goals, "fastest_backend": fastest}
    training = _training(result)
    if training:  # a run with the training steps of phase 3
        out["training"] = training
    return out


# The training step goal: CSSFE with the default settings (compile off, kernels auto) within 5 % of
# the baseline head's images/s.
STEP_GOAL = 0.95
DEFAULT_STEP = ("off", "auto")


def _training(result: dict) -> dict:
    """The training-step goal, the fastest (compile, kernels) setting per head (what the defaults
    ``compile`` and ``kernels: auto`` should be on this card), and the DeepSpeed verdicts."""
    rows = [r for r in (result.get("train_step") or {}).get("rows", []) if r.get("images_per_s")]
    out: dict = {}
    default = [r for r in rows if r["head"] == "cssfe" and (r["compile"], r["provider"]) == DEFAULT_STEP]
    if default and default[0].get("vs_baseline"):
        v = default[0]["vs_baseline"]
        out["cssfe_default_vs_baseline"] = {"value": v, "target": STEP_GOAL, "met": v >= STEP_GOAL}
    for head in sorted({r["head"] for r in rows}):
        best = max((r for r in rows if r["head"] == head), key=lambda r: r["images_per_s"])
        out.setdefault("fastest_step", {})[head] = {"compile": best.get("compile"), "kernels": best.get("provider"),
                                                    **{k: best.get(k) for k in ("images_per_s", "vs_baseline")}}
    ds = result.get("deepspeed") or {}
    if "trains" in ds:
        out["deepspeed"] = {k: ds.get(k) for k in ("trains", "resumed_same_loss", "images_per_s")}
    return out


def _cell(goal: dict) -> str:
    if goal["met"] is None and goal["value"] is None:
        return "-"
    v = goal["value"]
    shown = "" if v is None else (f"{100 * v:.1f} %" if "copy_bw" in goal["goal"] else f"{v:.2f}")
    verdict = {True: "met", False: "**not met**", None: "?"}[goal["met"]]
    return f"{shown} {verdict}".strip()


def markdown(evaluation: dict) -> List[str]:
    """The summary's goal section (empty when nothing could be judged): a table per family, one row
    per dtype and provider, one column per goal."""
    goals, fastest = evaluation.get("goals", []), evaluation.get("fastest_backend", [])
    if not goals and not fastest and not evaluation.get("training"):
        return []
    lines = ["## Goals", "", "Judged at each family's main case, only on rows that agree with eager PyTorch."]
    for family in CASE_FORMAT:
        rows = [g for g in goals if g["goal"] in {x.id for x in GOALS if x.family == family}]
        if not rows:
            continue
        order = [x for x in GOALS if x.family == family and any(g["goal"] == x.id for g in rows)]
        heads = [f"{x.column} ({'>=' if x.at_least else '<='} "
                 + (f"{100 * x.target:.0f} %)" if "copy_bw" in x.id else f"{x.target:g})") for x in order]
        lines += ["", f"{family} at {rows[0]['case']}:", "", "| dtype | provider | " + " | ".join(heads) + " | notes |",
                  "|---|---|" + "---|" * (len(order) + 1)]
        keys = sorted({(g["dtype"], g["provider"]) for g in rows})
        for dtype, provider in keys:
            mine = {g["goal"]: g for g in rows if (g["dtype"], g["provider"]) == (dtype, provider)}
            cells = [_cell(mine[x.id]) if x.id in mine else "" for x in order]
            notes = sorted({g["note"] for g in mine.values() if g["note"] and g["note"] != "not measured"})
            lines.append(f"| {dtype} | {provider} | " + " | ".join(cells) + f" | {'; '.join(notes)} |")
    training = evaluation.get("training") or {}
    if training.get("cssfe_default_vs_baseline"):
        g = training["cssfe_default_vs_baseline"]
        lines += ["", f"- training step, CSSFE with the defaults (compile off, kernels auto) vs the baseline head: "
                      f"{g['value']:.3f} (>= {g['target']}) {'met' if g['met'] else '**not met**'}"]
    for head, r in (training.get("fastest_step") or {}).items():
        lines.append(f"- fastest training step, {head}: compile {r['compile']}, kernels {r['kernels']} "
                     f"({r['images_per_s']:.1f} images/s)")
    if training.get("deepspeed"):
        d = training["deepspeed"]
        lines.append(f"- DeepSpeed: trains {d['trains']}, resumes to the same loss {d['resumed_same_loss']}")
    if fastest:
        lines += ["", "Fastest backend through the op (what `kernels: auto` should pick on this card):", ""]
        for f in fastest:
            others = ", ".join(f"{b} {ms:.3f} ms" for b, ms in sorted(f["median_ms"].items(), key=lambda kv: kv[1]))
            op = FAMILY_OP.get(f["op"], f["op"])
            lines.append(f"- {op} {f['dtype']} at {f['case']}: **{f['backend']}** ({others})")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description="The kernels' GPU goals, judged on the rows of a GPU check.")
    p.add_argument("gpu_check_json", help="OUT/gpu_check.json of benchmarks/run_gpu_check.sh")
    path = p.parse_args(argv).gpu_check_json
    try:
        with open(path) as fh:
            result = json.load(fh)
    except (OSError, ValueError) as exc:
        print(f"gpu_goals: cannot read {path}: {exc}", file=sys.stderr)
        return 2
    lines = markdown(evaluate(result))
    print("\n".join(lines) if lines else f"gpu_goals: {path} has no benchmark rows to judge")
    return 0


if __name__ == "__main__":
    sys.exit(main())
