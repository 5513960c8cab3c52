"""The GPU check's derived numbers (speedups, fractions of the measured roofs, the goals) and its
Markdown summary, from the rows the workers reported."""
from __future__ import annotations

from benchmarks import gpu_goals, providers
from benchmarks.gpu_check.plan import FAMILY_OP
from benchmarks.rows import row, shape_text

FULL, FORWARD = "forward+backward", "forward"
FAMILIES = ("asl", "attention", "enhance", "blocks", "grid")  # in the summary's order

DEFINITIONS = {
    "timing": "benchmarks/harness.py: GPU: CUDA events around each call, L2 flushed (256 MB write) before each "
              "call, after warm-up; p20/p50/p80 over the repeats. back_to_back_ms: wall time per call of calls "
              "issued back to back then synchronised (includes launch overhead). CPU dry run: perf_counter per call.",
    "asl_bytes": "B*C*(2*sizeof(logits) + 1): read logits and bool targets, write the gradient (the minimum a "
                 "one-pass loss+grad moves). The op as called through autograd also multiplies the saved "
                 "gradient by d loss in backward (one more read + write of B*C*sizeof(logits)), not counted.",
    "graph_timing": "ASL and attention rows, graph_*: the call captured once in a CUDA graph, each replay timed with "
                    "CUDA events after the L2 flush: device time without the host's per-call work (graph_error says "
                    "why a call could not be captured).",
    "blocks": "Triton attention + enhancement at the main attention shape with the block configuration of the row's "
              "variant; speedup_vs_eager against the attention family's eager row of the same case.",
    "copy_bandwidth": "dst.copy_(src) of a large device buffer; GB/s = 2*bytes/time (read + write), 1e9 bytes.",
    "attention_flop": "4*B*C*N*d for the forward (QK^T and AV); forward+backward = 3.5x forward (FlashAttention "
                      "benchmark convention: backward recomputes QK^T). The progressive enhancement (C x C mixing) "
                      "is timed but not counted.",
    "enhance": "progressive_enhance alone, forward+backward (gradients of z, the affinity and lam), on z of the main "
               "attention case's Z0 shape [B, C, d] with its masked affinity: which backend kernels=auto should pick "
               "for the enhancement. bytes: read z, write the output, read its gradient, write dz (B*C*L*4*sizeof(z)).",
    "peak_memory": "peak_mib: torch.cuda.max_memory_allocated during one call minus memory_allocated before it "
                   "(inputs excluded, returned gradients included); CPU: torch's allocations seen by the profiler.",
    "check": "max |out - ref| / max |ref| per output (benchmarks/cases.py Op.outputs), where ref is the eager "
             "reference backend in fp32 on the same inputs (half-precision cases: the inputs upcast). 'agrees': every "
             "error <= 1e-3 (fp32) or 3e-2 (bf16/fp16), or <= twice the eager reference's own error in the case's "
             "dtype ('eager_err': a sum over millions of half-precision terms, such as d lam, can be off by more than "
             "3e-2 in eager PyTorch itself).",
}


def provider_docs(plist, triton_ok, triton_why, native, native_ok, native_why) -> dict:
    docs = {}
    for family, names in plist.items():
        table = providers.PROVIDERS[FAMILY_OP[family]]
        for p in names:
            docs.setdefault(p, {"available": True, "what": table[p].doc if p in table else p})
    if not triton_ok:
        docs["triton"] = {"available": False, "why": triton_why}
    if not native_ok:
        docs[native] = {"available": False, "why": native_why}
    return docs


def task_rows(task, record) -> list:
    """A benchmark task's rows (the schema of benchmarks/rows.py): its measured modes, or one failed row."""
    common = {"family": task["family"], "seconds": record.get("seconds"),
              **{k: task[k] for k in ("block_c", "block_n", "num_warps", "num_stages") if k in task}}
    args = ("kernels", task["op"])
    provider = task.get("label") or task["provider"]
    if record.get("rows"):
        return [row(*args, r["mode"], provider, task["dtype"], task["shape"], task["variant"], ok=True,
                    **common, **{k: v for k, v in r.items() if k != "mode"}) for r in record["rows"]]
    failed = {k: record[k] for k in ("error", "skipped", "traceback", "log_tail") if k in record}
    return [row(*args, FULL, provider, task["dtype"], task["shape"], task["variant"], ok=False, **common, **failed)]


def _peer_key(r):
    family = "attention" if r["family"] == "blocks" else r["family"]  # a block config's peers: the attention rows
    return family, shape_text(r["shape"]), r["dtype"], r["mode"]


def postprocess(R) -> None:
    """Fill the rows' run fields and the ratios between them; count the parity checks; judge the goals."""
    env = R.get("environment", {})
    commit = (env.get("commit") or "unknown")[:7] + ("+dirty" if env.get("git_dirty") else "")
    run = {"device": env.get("device_name") or "unknown", "commit": commit, "date": env.get("date_utc"),
           "torch": env.get("torch"), "triton": env.get("triton")}
    rows = R.get("rows", [])
    peers = {}
    for r in rows:
        r.update(run)
        if r["family"] != "blocks":
            peers.setdefault(_peer_key(r), {})[r["provider"]] = r
    copy = env.get("copy_gbps")
    for r in rows:
        if not r.get("ok") or not r.get("p50_ms"):
            continue
        mine = peers.get(_peer_key(r), {})
        for base in ("eager", "sdpa"):
            e = mine.get(base)
            if e and e.get("ok") and e.get("p50_ms"):
                r[f"speedup_vs_{base}"] = e["p50_ms"] / r["p50_ms"]
        if r["family"] == "asl" and copy and r.get("gb_per_s"):
            r["copy_fraction"] = r["gb_per_s"] / copy
            if r.get("graph_gb_per_s"):
                r["graph_copy_fraction"] = r["graph_gb_per_s"] / copy
        e = mine.get("eager")
        if r.get("graph_p50_ms") and e and e.get("graph_p50_ms"):
            r["graph_speedup_vs_eager"] = e["graph_p50_ms"] / r["graph_p50_ms"]
    rows.sort(key=lambda r: (FAMILIES.index(r["family"]), tuple(r["shape"].values()), r["dtype"], r["variant"],
                             r["provider"], r["mode"]))
    counts = {}
    for c in R.get("parity", {}).get("direct", {}).get("checks", []):
        k = counts.setdefault(c.get("backend", "?"), {"passed": 0, "failed": 0})
        k["passed" if c.get("ok") else "failed"] += 1
    R["parity"]["direct"]["counts"] = counts
    R["goals"] = gpu_goals.evaluate(R)


# ----------------------------------------------------------------------------- summary
def fmt(x, nd=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 10 ** -nd):
            return f"{x:.2e}"
        return f"{x:.{nd}f}"
    return str(x)


def _cell(key, nd=3, scale=1.0):
    return lambda r: fmt(r[key] * scale, nd) if isinstance(r.get(key), (int, float)) else "-"


def _field(key):
    return lambda r: str(r.get(key))


def _shape(*fields):
    return lambda r: "x".join(str(r["shape"][f]) for f in fields)


def _graph_ms(r):
    return fmt(r.get("graph_p50_ms")) if r.get("graph_p50_ms") else (r.get("graph_error") or "-")[:40]


def _provider(r):  # auto: with the backends it resolved to
    resolved = r.get("resolved") or {}
    return str(r.get("provider")) + (" (" + ", ".join(f"{op}: {be}" for op, be in resolved.items()) + ")"
                                     if resolved else "")


def _err_of(r):
    return (r.get("skipped") or r.get("error") or "failed").splitlines()[0][:90]


def _check_cell(r):
    chk = r.get("check", {})
    return "ok" if chk.get("agrees") else "MISMATCH " + str(chk.get("max_rel_err"))[:80]


def _fwd_ms(forward):
    return lambda r: fmt(forward.get(id(r), {}).get("p50_ms"))


def _table(lines, title, key_cols, value_cols, rows):
    """Key columns, measurement columns and the check, one line per row; a row that did not run shows
    its error in place of the measurements. Columns are (header, row -> text)."""
    heads = [h for h, _ in key_cols] + [h for h, _ in value_cols] + ["check"]
    lines += [""] + title + ["", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        keys = [f(r) for _, f in key_cols]
        values = [f(r) for _, f in value_cols] + [_check_cell(r)] if r.get("ok") else [_err_of(r)] + [""] * len(value_cols)
        lines.append("| " + " | ".join(keys + values) + " |")


TIMING = [("median ms", _cell("p50_ms")), ("p20-p80", lambda r: f"{fmt(r.get('p20_ms'))}-{fmt(r.get('p80_ms'))}")]
PEAK = ("peak MiB", _cell("peak_mib", 1))


def _family_tables(lines, R):
    rows = R.get("rows", [])
    full = {f: [r for r in rows if r["family"] == f and r["mode"] == FULL] for f in FAMILIES}
    forward = {}
    for r in rows:
        if r["mode"] == FORWARD:
            twin = next((x for x in full[r["family"]] if _peer_key(x)[:3] == _peer_key(r)[:3]
                         and x["provider"] == r["provider"]), None)
            if twin is not None:
                forward[id(twin)] = r
    if full["asl"]:
        _table(lines, ["## ASL forward+backward (bytes: read logits + targets, write grad)", "",
                       "Per call: CUDA events around each eager call (host work included when the GPU waits for "
                       "it). Graph: the same call captured in a CUDA graph and replayed (device time alone)."],
               [("B x C", _shape("B", "C")), ("dtype", _field("dtype")), ("provider", _field("provider"))],
               TIMING + [("GB/s", _cell("gb_per_s", 1)), ("% copy BW", _cell("copy_fraction", 1, 100.0)),
                         ("x eager", _cell("speedup_vs_eager", 2)), ("graph ms", _graph_ms),
                         ("graph % copy BW", _cell("graph_copy_fraction", 1, 100.0)),
                         ("graph x eager", _cell("graph_speedup_vs_eager", 2))], full["asl"])
    if full["attention"]:
        s = full["attention"][0]["shape"]
        _table(lines, [f"## class_attention + progressive_enhance fwd+bwd (B={s['B']} C={s['C']} N={s['N']} d={s['d']}; "
                       "TFLOP/s on 3.5 x 4BCNd)"],
               [("dtype", _field("dtype")), ("provider", _provider)],
               TIMING + [("fwd ms", _fwd_ms(forward)), ("TFLOP/s", _cell("tflop_per_s", 2)), PEAK,
                         ("x eager", _cell("speedup_vs_eager", 2)), ("x sdpa", _cell("speedup_vs_sdpa", 2)),
                         ("graph ms", _graph_ms), ("graph x eager", _cell("graph_speedup_vs_eager", 2))],
               full["attention"])
    if full["enhance"]:
        s = full["enhance"][0]["shape"]
        _table(lines, [f"## progressive_enhance alone, fwd+bwd (z: B={s['B']} x C x L={s['L']}; "
                       "bytes: read z, write out, read its gradient, write dz)"],
               [("C", lambda r: str(r["shape"]["C"])), ("dtype", _field("dtype")), ("provider", _field("provider"))],
               TIMING + [("fwd ms", _fwd_ms(forward)), ("GB/s", _cell("gb_per_s", 1)), PEAK,
                         ("x eager", _cell("speedup_vs_eager", 2))], full["enhance"])
    if full["blocks"]:
        s = full["blocks"][0]["shape"]
        _table(lines, [f"## Triton attention + enhancement block sweep, fwd+bwd (B={s['B']} C={s['C']} N={s['N']} "
                       f"d={s['d']})"],
               [("dtype", _field("dtype")), ("BLOCK_C", _field("block_c")), ("BLOCK_N", _field("block_n")),
                ("warps", _field("num_warps")), ("stages", _field("num_stages"))],
               [("median ms", _cell("p50_ms")), ("TFLOP/s", _cell("tflop_per_s", 2)),
                ("x eager", _cell("speedup_vs_eager", 2))], full["blocks"])
    if full["grid"]:
        grid = full["grid"]
        provs = list(dict.fromkeys(r["provider"] for r in grid))
        by_case = {}
        for r in grid:
            by_case.setdefault((r["shape"]["C"], r["shape"]["N"], r["shape"]["d"]), {})[r["provider"]] = r
        lines += ["", f"## SPEC section 6 grid: fwd+bwd median ms (B={grid[0]['shape']['B']}, {grid[0]['dtype']}; "
                  "* = check mismatch)", "", "| C | N | d | " + " | ".join(provs) + " |",
                  "|---|---|---|" + "---|" * len(provs)]
        for (c, n, d), per in sorted(by_case.items()):
            cells = [("" if per.get(p) is None else ("skip" if per[p].get("skipped") else "err") if not per[p].get("ok")
                      else fmt(per[p].get("p50_ms")) + ("" if per[p].get("check", {}).get("agrees") else "*"))
                     for p in provs]
            lines.append(f"| {c} | {n} | {d} | " + " | ".join(cells) + " |")


def _header(R) -> list:
    env, b = R.get("environment", {}), R.get("build", {})
    lines = [f"# cssfe GPU check ({R.get('mode')}, {R.get('status')})", "",
             f"- device: {env.get('device_name') or 'NO CUDA DEVICE'} (capability {env.get('capability')}, "
             f"{fmt((env.get('total_memory_bytes') or 0) / 2**30, 1)} GiB); date {env.get('date_utc')}; "
             f"commit {env.get('commit')} ({env.get('commit_source')})",
             f"- torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), triton {env.get('triton')}, "
             f"nvcc: {env.get('nvcc_version')}",
             f"- device copy bandwidth {fmt(env.get('copy_gbps'), 1)} GB/s, bf16 matmul "
             f"({env.get('matmul_n')}^3) {fmt(env.get('matmul_bf16_tflops'), 1)} TFLOP/s"]
    berr = b.get("error") or b.get("skipped")
    lines.append(f"- build: {'ok' if b.get('ok') else 'FAILED'} in {fmt(b.get('build_s') or b.get('seconds'), 1)} s "
                 f"(with_cuda={b.get('with_cuda')}, ninja={b.get('ninja')})" + (f": {str(berr)[:300]}" if berr else ""))
    parity = R.get("parity", {})
    lines.append("- parity: " + (", ".join(f"{k}: {v}" for k, v in parity.get("summary", {}).items()) or "not run"))
    counts = parity.get("direct", {}).get("counts")
    if counts:
        lines.append("- direct parity checks: " + ", ".join(f"{k} {v['passed']} passed / {v['failed']} failed"
                                                           for k, v in counts.items()))
    for run in parity.get("pytest", {}).get("runs", []):
        for t in run.get("tests", []):
            msg = (t.get("message") or "").strip().splitlines()
            lines.append(f"  - pytest {t['id']}: {t['outcome']}" + (f" ({msg[0][:160]})" if msg else ""))
        if run.get("error") or run.get("skipped"):
            lines.append(f"  - pytest {run['name']}: {run.get('error') or run.get('skipped')}")
    lines.append(f"- elapsed {R.get('elapsed_s')} s of budget {R.get('budget_s')} s")
    if R.get("benchmarks", {}).get("skipped"):
        lines.append(f"- benchmarks skipped: {R['benchmarks']['skipped']}")
    return lines


def _training_lines(R) -> list:
    """The training-step table and the DeepSpeed run."""
    lines = []
    ts = R.get("train_step")
    if ts:
        lines += ["", "## Training step (forward + loss + backward + AdamW)", ""]
        if ts.get("skipped") or ts.get("error"):
            lines.append(f"- {ts.get('skipped') or ts.get('error')}")
        rows = ts.get("rows", [])
        if rows:
            r0 = rows[0]
            lines += [f"- {r0['backbone']} {r0['shape']['image_size']} px, batch {r0['shape']['batch']}, {r0['dtype']}, "
                      f"{r0['shape']['classes']} classes; `{ts.get('cmd')}`", "",
                      "| compile | head | kernels | images/s | vs baseline | step p50 ms | first step s | peak MiB |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in rows:
                peak = r.get("peak_mib")
                lines.append(f"| {r['compile']} | {r['head']} | {r['provider']} | {fmt(r['images_per_s'], 1)} | "
                             f"{fmt(r.get('vs_baseline'))} | {fmt(r['p50_ms'], 2)} | {fmt(r.get('first_step_s'), 1)} | "
                             f"{fmt(peak, 0) if peak else ''} |")
    ds = R.get("deepspeed")
    if ds:
        lines += ["", "## DeepSpeed (ZeRO-2, bf16, compiled, one rank): killed and resumed", ""]
        if ds.get("skipped"):
            lines.append(f"- {ds['skipped']}")
        for name, run in ds.get("runs", {}).items():
            lines.append(f"- {name}: rc {run.get('rc')} in {run.get('seconds')} s" + (f" ({run['error']})" if run.get("error") else "")
                         + (f", killed once `{run['killed_at']}*` was written" if run.get("killed_at") else ""))
        if "trains" in ds:
            ips = ds.get("images_per_s") or []
            lines.append(f"- trains: {ds['trains']} ({ds.get('steps')} steps, loss {ds.get('train_loss', {}).get('whole')}); "
                         f"resumes to the same loss: {ds.get('resumed_same_loss')} (final loss relative difference "
                         f"{fmt(ds.get('final_loss_rel_diff'), 6)}, mAP {ds.get('final_map')}); images/s per epoch "
                         + ", ".join(fmt(x, 1) for x in ips))
    return lines


def summarize(R) -> str:
    lines = _header(R)
    goal_lines = gpu_goals.markdown(R.get("goals", {}))
    if goal_lines:
        lines += [""] + goal_lines
    _family_tables(lines, R)
    lines += _training_lines(R)
    errs = [f"{r['family']} {r['provider']} {shape_text(r['shape'])} {r['dtype']}: {_err_of(r)}"
            for r in R.get("rows", []) if not r.get("ok") and not r.get("skipped")]
    for c in [c for c in R.get("parity", {}).get("direct", {}).get("checks", []) if not c.get("ok")][:20]:
        errs.append(f"parity {c.get('backend')} {c.get('op')} {c.get('shape')} {c.get('dtype')}: "
                    f"{(c.get('error') or '').splitlines()[0][:160] if c.get('error') else ''}")
    errs += [f"{e.get('where')}: {str(e.get('error'))[:200]}" for e in R.get("errors", [])]
    if errs:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in errs[:60]]
    lines.append("")
    return "\n".join(lines)
