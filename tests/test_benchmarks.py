"""The benchmarks run in smoke mode so they cannot rot; compare and plot run on small synthetic result
sets and on the committed GPU results. Nothing here asserts a time."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
GPU_RUN = os.path.join(BENCH, "results", "gpu", "2026-11-26_h200_2612892", "gpu_check.json")
LATER_GPU_RUN = os.path.join(BENCH, "results", "gpu", "2026-11-26_h200_f066e94", "gpu_check.json")


def _load_common():
    spec = importlib.util.spec_from_file_location("benchmarks_common", os.path.join(BENCH, "_common.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(script, *args, timeout=120):
    return subprocess.run([sys.executable, os.path.join(BENCH, script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def _kernel_row(provider, p50, commit="aaaaaaa", date="2026-01-01T00:00:00+00:00", kernel="asl", shape=(8, 4), **extra):
    return {"benchmark": "kernels", "kernel": kernel, "mode": "forward+backward", "shape": list(shape), "dtype": "float32",
            "provider": provider, "p20_ms": 0.9 * p50, "p50_ms": p50, "p80_ms": 1.1 * p50, "peak_bytes": 1024,
            "machine": {"device": "cpu (test)"}, "torch": "2.0", "triton": None, "commit": commit, "date": date, **extra}


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def _line(output, provider):
    return next(line for line in output.splitlines() if f" {provider} " in line)


def test_train_step_benchmark_smoke():
    proc = _run("train_step.py", "--smoke", timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "img/s" in line]
    assert len(lines) == 2 and "cssfe" in lines[1]


def test_kernels_benchmark_smoke_appends_nothing():
    results = os.path.join(BENCH, "results", "kernels_cpu.jsonl")
    before = os.path.getsize(results) if os.path.exists(results) else None
    proc = _run("kernels.py", "--smoke", timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if " p50 " in line or " FAILED " in line]
    assert any(line.startswith("asl") for line in lines) and any(line.startswith("class_attention") for line in lines)
    assert (os.path.getsize(results) if os.path.exists(results) else None) == before


def _check_kernel_rows(rows):
    for kernel in ("asl", "class_attention", "progressive_enhance"):
        providers = {row["provider"] for row in rows if row["kernel"] == kernel}
        assert {"compile", "ops reference"} <= providers, providers
        assert {row["mode"] for row in rows if row["kernel"] == kernel} == {"forward", "forward+backward"}
        # the reference through the op runs everywhere: its rows are measured, not errors
        measured = {row["mode"] for row in rows if row["kernel"] == kernel and row["provider"] == "ops reference"
                    and "error" not in row}
        assert measured == {"forward", "forward+backward"}, f"{kernel}: the ops reference rows were not measured"
    for row in rows:
        assert row["copy_gb_per_s"] > 0 and row["matmul_tflop_per_s"] > 0  # the roofs, measured in the run
        assert row["machine"]["device"] and row["torch"] and row["commit"] and row["date"]
        assert "triton" in row  # None when triton is not installed
        if "error" in row:  # a provider may fail on a machine, but only with its error recorded
            assert row["error"] and "p50_ms" not in row
            continue
        assert row["p20_ms"] <= row["p50_ms"] <= row["p80_ms"]
        assert row["peak_method"] and (row["peak_bytes"] is None or row["peak_bytes"] >= 0)
        assert row["gb_per_s"] > 0 and 0 < row["bandwidth_fraction"]
        assert (row["kernel"] == "asl") == ("tflop_per_s" not in row)
    compiled = [row for row in rows if row["provider"] == "compile" and "error" not in row]
    assert compiled and all(row["compile_backend"] == "aot_eager" for row in compiled)


def test_kernels_benchmark_rows_carry_versions_percentiles_memory_and_compile(tmp_path):
    proc = _run("kernels.py", "--smoke", "--out", tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in open(tmp_path / "kernels_cpu.jsonl")]
    _check_kernel_rows(rows)
    # A benchmark whose every provider errors (each row with its error recorded) must not pass.
    failed = [{k: v for k, v in row.items() if not k.startswith(("p20", "p50", "p80"))} | {"error": "RuntimeError: boom"}
              for row in rows]
    with pytest.raises(AssertionError, match="ops reference rows were not measured"):
        _check_kernel_rows(failed)


def test_compare_flags_a_regression_over_the_threshold_and_lists_unmatched_rows(tmp_path):
    base = _write_jsonl(tmp_path / "base.jsonl", [_kernel_row("slower", 10.0), _kernel_row("steady", 10.0),
                                                  _kernel_row("gone", 10.0)])
    new = _write_jsonl(tmp_path / "new.jsonl", [_kernel_row("slower", 12.0, commit="bbbbbbb"),
                                                _kernel_row("steady", 10.5, commit="bbbbbbb"),
                                                _kernel_row("added", 1.0, commit="bbbbbbb")])
    proc = _run("compare.py", base, new)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "REGRESSION" in _line(proc.stdout, "slower") and "1.2" in _line(proc.stdout, "slower")
    assert "REGRESSION" not in _line(proc.stdout, "steady")
    only_base, only_new = proc.stdout.index("only in base"), proc.stdout.index("only in new")
    assert only_base < proc.stdout.index(" gone ") < only_new < proc.stdout.index(" added ")

    assert _run("compare.py", base, new, "--no-fail").returncode == 0
    assert _run("compare.py", base, new, "--threshold", "0.25").returncode == 0
    assert _run("compare.py", base, new, "--filter", "provider=steady").returncode == 0


def test_compare_uses_the_latest_of_repeated_runs_unless_told_which(tmp_path):
    base = _write_jsonl(tmp_path / "base.jsonl", [
        _kernel_row("fused", 5.0, commit="ccccccc", date="2026-01-02T00:00:00+00:00"),
        _kernel_row("fused", 10.0, commit="aaaaaaa", date="2026-01-01T00:00:00+00:00"),  # older, though later in the file
    ])
    new = _write_jsonl(tmp_path / "new.jsonl", [_kernel_row("fused", 10.0, commit="ddddddd")])
    assert _run("compare.py", base, new).returncode == 1  # against the latest base run (5 ms): 2x slower
    assert _run("compare.py", base, new, "--base-select", "commit=aaaa").returncode == 0
    within_one_file = _run("compare.py", base, base, "--base-select", "commit=aaaaaaa", "--new-select", "commit=ccccccc")
    assert within_one_file.returncode == 0 and "faster" in _line(within_one_file.stdout, "fused")


def test_compare_reads_gpu_check_json():
    common = _load_common()
    doc = json.load(open(GPU_RUN))
    rows = common.load_rows([GPU_RUN])
    timed = next(rec for rec in doc["benchmarks"]["asl"] if rec.get("ok"))
    match = rows[(rows["op"] == "asl") & (rows["provider"] == timed["provider"]) & (rows["dtype"] == timed["dtype"])
                 & (rows["shape"] == f"{timed['B']}x{timed['C']}")]
    assert len(match) == 1 and match["median_ms"].iloc[0] == timed["median_ms"]
    assert set(rows["commit"]) == {"2612892"}  # the run folder's name wins over the HEAD recorded inside
    assert set(rows["device"]) == {doc["environment"]["device_name"]}
    measured = sum(not rec.get("skipped") for family in ("asl", "attention", "grid") for rec in doc["benchmarks"][family])
    forward_only = sum("fwd_median_ms" in rec for rec in doc["benchmarks"]["attention"])
    assert len(rows) == measured + forward_only and (rows["mode"] == "forward").sum() == forward_only
    assert rows["error"].notna().sum() == sum(not rec.get("ok") and not rec.get("skipped")
                                              for family in ("asl", "attention", "grid") for rec in doc["benchmarks"][family])

    same = _run("compare.py", GPU_RUN, GPU_RUN)
    assert same.returncode == 0 and "0 regressions" in same.stdout, same.stdout + same.stderr
    later = _run("compare.py", GPU_RUN, LATER_GPU_RUN, "--no-fail", "--filter", "provider=eager")
    assert later.returncode == 0 and "attention" in later.stdout and "only in base" in later.stdout


def test_gpu_check_enhancement_rows_are_read(tmp_path):
    common = _load_common()
    doc = json.load(open(GPU_RUN))
    rec = {"kind": "enhance", "provider": "cuda", "B": 64, "C": 80, "L": 512, "dtype": "bfloat16", "ok": True,
           "median_ms": 0.5, "p20_ms": 0.4, "p80_ms": 0.6, "fwd_median_ms": 0.2, "check": {"agrees": True}}
    failed = {"kind": "enhance", "provider": "triton", "B": 64, "C": 80, "L": 512, "dtype": "bfloat16", "ok": False,
              "error": "RuntimeError: boom"}
    doc["benchmarks"]["enhance"] = [rec, failed, dict(rec, provider="eager", skipped="time budget")]
    path = tmp_path / "2026-11-27_h200_abcdef0" / "gpu_check.json"
    path.parent.mkdir()
    path.write_text(json.dumps(doc))
    rows = common.load_rows([str(path)])
    enh = rows[rows["op"] == "progressive_enhance (masked affinity)"]
    assert sorted(zip(enh["provider"], enh["mode"])) == [("cuda", "forward"), ("cuda", "forward+backward"),
                                                         ("triton", "forward+backward")]
    assert set(enh["shape"]) == {"64x80x512"}
    both = enh[enh["mode"] == "forward+backward"].set_index("provider")
    assert both.loc["cuda", "median_ms"] == 0.5 and both.loc["triton", "error"] == "RuntimeError: boom"


def test_plot_writes_png_charts(tmp_path):
    rows = [_kernel_row(provider, ms, commit=commit, date=date, shape=shape)
            for commit, date, scale in (("aaaaaaa", "2026-01-01", 1.0), ("bbbbbbb", "2026-01-02", 0.8))
            for provider, ms in (("eager", 4.0 * scale), ("ops cpu", 1.0 * scale))
            for shape in ((8, 4), (16, 4))]
    rows.append(_kernel_row("compile", 0.0, commit="bbbbbbb", error="BackendCompilerFailed: no compiler"))
    rows[-1].pop("p50_ms")
    rows += [{"benchmark": "train_step", "backbone": "smallcnn", "head": head, "image_size": 32, "batch": 2, "classes": 4,
              "step_s_p50": 0.02, "step_s_p20": 0.018, "step_s_p80": 0.025, "images_per_s": 100.0, "peak_memory_bytes": None,
              "machine": {"device": "cpu (test)"}, "torch": "2.0", "commit": "aaaaaaa", "date": "2026-01-01"}
             for head in ("baseline", "cssfe")]
    results = _write_jsonl(tmp_path / "results.jsonl", rows)
    proc = _run("plot.py", results, "--out", tmp_path / "charts")
    assert proc.returncode == 0, proc.stderr
    written = proc.stdout.split()
    names = {os.path.basename(path) for path in written}
    assert names == {"kernels_asl_forward-backward_cpu-test.png", "train_step_cpu-test.png",
                     "tracking_kernels_asl_cpu-test.png"}, names
    for path in written:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(path) > 2000


def test_distributed_benchmark_smoke_writes_rows(tmp_path):
    """Two CPU ranks on the bundled data through the real launcher; rows go to --out, not results/."""
    import pytest

    pytest.importorskip("deepspeed")
    results = os.path.join(BENCH, "results", "distributed.jsonl")
    before = os.path.getsize(results) if os.path.exists(results) else None
    proc = _run("distributed.py", "--smoke", "--ranks", "2", "--out", tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if "2 rank(s)" in l)
    assert "img/s" in line and "peak RSS per rank" in line
    row = json.loads((tmp_path / "distributed.jsonl").read_text().splitlines()[0])
    assert row["ranks"] == 2 and row["global_batch"] == 32 and row["images_per_s"] > 0
    assert all(r > 0 for r in row["peak_rss_bytes_per_rank"]) and {"machine", "torch", "commit", "date"} <= set(row)
    assert (os.path.getsize(results) if os.path.exists(results) else None) == before


def test_enhancement_rows_of_each_affinity_stay_apart(tmp_path):
    """Dense and masked enhancement rows of one shape and provider are different keys; rows from
    before the ``affinity`` field count as dense."""
    common = _load_common()
    path = _write_jsonl(tmp_path / "k.jsonl", [
        _kernel_row("ops cpu", 5.0, kernel="progressive_enhance", shape=(8, 80, 256)),
        _kernel_row("ops cpu", 4.0, kernel="progressive_enhance", shape=(8, 80, 256), affinity="dense"),
        _kernel_row("ops cpu", 2.0, kernel="progressive_enhance", shape=(8, 80, 256), affinity="masked")])
    latest = common.latest_per_key(common.load_rows([str(path)]))
    assert sorted(zip(latest["op"], latest["median_ms"])) == [
        ("progressive_enhance", 4.0), ("progressive_enhance (masked affinity)", 2.0)]
