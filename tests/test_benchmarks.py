"""The benchmarks run in smoke mode, through their documented commands (``python -m benchmarks.<name>``),
so they cannot rot; compare and plot run on small synthetic result sets and on a committed GPU run.
Nothing here asserts a time."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks import cases, providers, rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
GPU_RUN = os.path.join(BENCH, "results", "gpu", "2026-11-26_h200_2612892", "gpu_check.json")
LATER_GPU_RUN = os.path.join(BENCH, "results", "gpu", "2026-11-26_h200_f066e94", "gpu_check.json")
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))


def _run(module, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=ENV)


def _kernel_row(provider, p50, commit="aaaaaaa", date="2026-01-01T00:00:00+00:00", op="asl", shape=None, **extra):
    return rows.row("kernels", op, "forward+backward", provider, "float32", shape or {"B": 8, "C": 4},
                    p20_ms=0.9 * p50, p50_ms=p50, p80_ms=1.1 * p50, peak_mib=1.0, device="cpu (test)", torch="2.0",
                    triton=None, commit=commit, date=date, **extra)


def _write_jsonl(path, items):
    with open(path, "w") as f:
        f.writelines(json.dumps(item) + "\n" for item in items)
    return path


def _line(output, provider):
    return next(line for line in output.splitlines() if f" {provider} " in line)


def test_every_op_has_its_cases_and_providers_once():
    """The CPU run, the GPU run and the dry run take their cases and providers from one table each."""
    for op, spec in cases.OPS.items():
        for run, shapes in spec.cases.items():
            assert shapes and all(len(s) == len(spec.fields) for s in shapes), (op, run)
        assert "eager" in providers.PROVIDERS[op]  # the reference through the op: every run's check
    from benchmarks.kernels import CPU_PROVIDERS

    for op, names in CPU_PROVIDERS.items():
        assert set(names) <= set(providers.PROVIDERS[op]) and cases.shapes(op, "cpu"), op
    with pytest.raises(ValueError, match="unknown provider 'nope' for asl"):
        providers.build("asl", "nope", {})


def test_train_step_benchmark_smoke(tmp_path):
    proc = _run("train_step", "--smoke", "--out", tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "img/s" in line]
    assert len(lines) == 2 and "cssfe" in lines[1]
    written = [json.loads(line) for line in open(tmp_path / "train_step.jsonl")]
    assert [(r["op"], r["provider"], r["mode"]) for r in written] == [
        ("smallcnn/baseline", "auto", "train step"), ("smallcnn/cssfe", "auto", "train step")]
    for r in written:
        assert r["schema"] == rows.SCHEMA and r["shape"] == {"image_size": 32, "batch": 2, "classes": 20}
        assert r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"] and r["images_per_s"] == pytest.approx(2e3 / r["p50_ms"])
        assert 0 < r["head_loss_share"] and r["device"] and r["commit"] and r["date"]


def test_kernels_benchmark_smoke_appends_nothing():
    results = os.path.join(BENCH, "results", "kernels_cpu.jsonl")
    before = os.path.getsize(results)
    proc = _run("kernels", "--smoke", timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if " p50 " in line or " FAILED " in line]
    assert any(line.startswith("asl") for line in lines) and any(line.startswith("class_attention") for line in lines)
    assert os.path.getsize(results) == before


def _check_kernel_rows(written):
    from benchmarks.kernels import CPU_PROVIDERS

    for op, names in CPU_PROVIDERS.items():
        mine = [r for r in written if r["op"] == op]
        assert {r["provider"] for r in mine} == set(names), op
        assert {r["mode"] for r in mine} == {"forward", "forward+backward"}
        # the baseline and the reference through the op run everywhere: their rows are measured, not errors
        for provider in (names[0], "eager"):
            measured = {r["mode"] for r in mine if r["provider"] == provider and "error" not in r}
            assert measured == {"forward", "forward+backward"}, f"{op}: the {provider} rows were not measured"
    for r in written:
        assert r["schema"] == rows.SCHEMA and set(r["shape"]) == set(cases.OPS[r["op"]].fields)
        assert r["copy_gb_per_s"] > 0 and r["matmul_tflop_per_s"] > 0  # the roofs, measured in the run
        assert r["device"].startswith("cpu") and r["machine"]["device"] and r["torch"] and r["commit"] and r["date"]
        assert "triton" in r  # None when triton is not installed
        if "error" in r:  # a provider may fail on a machine, but only with its error recorded
            assert r["error"] and "p50_ms" not in r
            continue
        assert r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"]
        assert r["peak_method"] and (r.get("peak_mib") is None or r["peak_mib"] >= 0)
        assert r["gb_per_s"] > 0 and r["vs_baseline"] > 0 and r["baseline"] == CPU_PROVIDERS[r["op"]][0]
        assert (r["op"] == "asl") == ("tflop_per_s" not in r)
    compiled = [r for r in written if r["provider"].startswith("compile") and "error" not in r]
    assert compiled and all(r["compile_backend"] == "aot_eager" for r in compiled)
    variants = {r["variant"] for r in written if r["op"] == "progressive_enhance"}
    assert variants == {"masked affinity", "dense affinity"}


def test_kernels_benchmark_rows_carry_versions_percentiles_memory_and_compile(tmp_path):
    proc = _run("kernels", "--smoke", "--out", tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    written = [json.loads(line) for line in open(tmp_path / "kernels_cpu.jsonl")]
    _check_kernel_rows(written)
    # A benchmark whose every provider errors (each row with its error recorded) must not pass.
    failed = [{k: v for k, v in r.items() if not k.startswith(("p20", "p50", "p80"))} | {"error": "RuntimeError: boom"}
              for r in written]
    with pytest.raises(AssertionError, match="rows were not measured"):
        _check_kernel_rows(failed)


def test_compare_flags_a_regression_over_the_threshold_and_lists_unmatched_rows(tmp_path):
    base = _write_jsonl(tmp_path / "base.jsonl", [_kernel_row("slower", 10.0), _kernel_row("steady", 10.0),
                                                  _kernel_row("gone", 10.0)])
    new = _write_jsonl(tmp_path / "new.jsonl", [_kernel_row("slower", 12.0, commit="bbbbbbb"),
                                                _kernel_row("steady", 10.5, commit="bbbbbbb"),
                                                _kernel_row("added", 1.0, commit="bbbbbbb")])
    proc = _run("compare", base, new)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "REGRESSION" in _line(proc.stdout, "slower") and "1.2" in _line(proc.stdout, "slower")
    assert "REGRESSION" not in _line(proc.stdout, "steady")
    only_base, only_new = proc.stdout.index("only in base"), proc.stdout.index("only in new")
    assert only_base < proc.stdout.index(" gone ") < only_new < proc.stdout.index(" added ")

    assert _run("compare", base, new, "--no-fail").returncode == 0
    assert _run("compare", base, new, "--threshold", "0.25").returncode == 0
    assert _run("compare", base, new, "--filter", "provider=steady").returncode == 0


def test_compare_uses_the_latest_of_repeated_runs_unless_told_which(tmp_path):
    base = _write_jsonl(tmp_path / "base.jsonl", [
        _kernel_row("fused", 5.0, commit="ccccccc", date="2026-01-02T00:00:00+00:00"),
        _kernel_row("fused", 10.0, commit="aaaaaaa", date="2026-01-01T00:00:00+00:00"),  # older, though later in the file
    ])
    new = _write_jsonl(tmp_path / "new.jsonl", [_kernel_row("fused", 10.0, commit="ddddddd")])
    assert _run("compare", base, new).returncode == 1  # against the latest base run (5 ms): 2x slower
    assert _run("compare", base, new, "--base-select", "commit=aaaa").returncode == 0
    within_one_file = _run("compare", base, base, "--base-select", "commit=aaaaaaa", "--new-select", "commit=ccccccc")
    assert within_one_file.returncode == 0 and "faster" in _line(within_one_file.stdout, "fused")


def test_compare_reads_gpu_check_json():
    doc = json.load(open(GPU_RUN))
    table = rows.load_rows([GPU_RUN])
    timed = next(r for r in doc["rows"] if r["op"] == "asl" and r.get("ok"))
    match = table[(table["op"] == "asl") & (table["provider"] == timed["provider"]) & (table["dtype"] == timed["dtype"])
                  & (table["mode"] == timed["mode"]) & (table["shape"] == rows.shape_text(timed["shape"]))]
    assert len(match) == 1 and match["p50_ms"].iloc[0] == timed["p50_ms"]
    assert set(table["commit"]) == {"2612892"}  # the run folder's name wins over the HEAD recorded inside
    assert set(table["device"]) == {doc["environment"]["device_name"]}
    measured = [r for r in doc["rows"] if not r.get("skipped")]  # never measured (time budget): absent
    assert len(table) == len(measured) < len(doc["rows"])
    assert table["error"].notna().sum() == sum(not r.get("ok") for r in measured) > 0

    same = _run("compare", GPU_RUN, GPU_RUN)
    assert same.returncode == 0 and "0 regressions" in same.stdout, same.stdout + same.stderr
    later = _run("compare", GPU_RUN, LATER_GPU_RUN, "--no-fail", "--filter", "provider=eager")
    assert later.returncode == 0 and "attention" in later.stdout and "only in base" in later.stdout


def test_rows_of_other_benchmarks_and_not_measured_rows_are_left_out(tmp_path):
    path = _write_jsonl(tmp_path / "mixed.jsonl", [
        _kernel_row("cuda", 0.5), _kernel_row("triton", 0.7, error="RuntimeError: boom"),
        _kernel_row("eager", 1.0, skipped="time budget"), {"benchmark": "distributed", "ranks": 2}])
    table = rows.load_rows([str(path)])
    assert sorted(table["provider"]) == ["cuda", "triton"]
    assert table.set_index("provider").loc["triton", "error"] == "RuntimeError: boom"


def test_plot_writes_png_charts(tmp_path):
    written_rows = [_kernel_row(provider, ms, commit=commit, date=date, shape=shape)
                    for commit, date, scale in (("aaaaaaa", "2026-01-01", 1.0), ("bbbbbbb", "2026-01-02", 0.8))
                    for provider, ms in (("eager", 4.0 * scale), ("cpu", 1.0 * scale))
                    for shape in ({"B": 8, "C": 4}, {"B": 16, "C": 4})]
    failed = _kernel_row("compile", 0.0, commit="bbbbbbb", error="BackendCompilerFailed: no compiler")
    written_rows.append({k: v for k, v in failed.items() if not k.startswith(("p20", "p50", "p80"))})
    written_rows.append(_kernel_row("cpu", 2.0, op="progressive_enhance", shape={"B": 2, "C": 8, "L": 4},
                                    variant="masked affinity"))
    written_rows += [rows.row("train_step", f"smallcnn/{head}", "train step", "auto", "fp32",
                              {"image_size": 32, "batch": 2, "classes": 4}, p20_ms=18.0, p50_ms=20.0, p80_ms=25.0,
                              images_per_s=100.0, device="cpu (test)", torch="2.0", commit="aaaaaaa", date="2026-01-01")
                     for head in ("baseline", "cssfe")]
    results = _write_jsonl(tmp_path / "results.jsonl", written_rows)
    proc = _run("plot", results, "--out", tmp_path / "charts")
    assert proc.returncode == 0, proc.stderr
    written = proc.stdout.split()
    names = {os.path.basename(path) for path in written}
    assert names == {"kernels_asl_forward-backward_cpu-test.png", "train_step_cpu-test.png",
                     "tracking_kernels_asl_cpu-test.png",
                     "kernels_progressive_enhance-masked-affinity_forward-backward_cpu-test.png"}, names
    for path in written:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(path) > 2000


def test_distributed_benchmark_smoke_writes_rows(tmp_path):
    """Two CPU ranks on the bundled data through the real launcher; rows go to --out, not results/."""
    pytest.importorskip("deepspeed")
    results = os.path.join(BENCH, "results", "distributed.jsonl")
    before = os.path.getsize(results) if os.path.exists(results) else None
    proc = _run("distributed", "--smoke", "--ranks", "2", "--out", tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if "2 rank(s)" in l)
    assert "img/s" in line and "peak RSS per rank" in line
    row = json.loads((tmp_path / "distributed.jsonl").read_text().splitlines()[0])
    assert row["ranks"] == 2 and row["global_batch"] == 32 and row["images_per_s"] > 0
    assert all(r > 0 for r in row["peak_rss_bytes_per_rank"]) and {"machine", "torch", "commit", "date"} <= set(row)
    assert (os.path.getsize(results) if os.path.exists(results) else None) == before


def test_enhancement_rows_of_each_affinity_stay_apart(tmp_path):
    """Dense and masked enhancement rows of one shape and provider are different keys (the variant)."""
    shape = {"B": 8, "C": 80, "L": 256}
    path = _write_jsonl(tmp_path / "k.jsonl", [
        _kernel_row("cpu", 4.0, op="progressive_enhance", shape=shape, variant="dense affinity"),
        _kernel_row("cpu", 2.0, op="progressive_enhance", shape=shape, variant="masked affinity")])
    latest = rows.latest_per_key(rows.load_rows([str(path)]))
    assert sorted(zip(latest["variant"], latest["p50_ms"])) == [("dense affinity", 4.0), ("masked affinity", 2.0)]


def test_every_committed_result_is_read():
    """The committed results stay readable in the one schema: compared with themselves, every key matches."""
    table = rows.load_rows([os.path.join(BENCH, "results")])
    assert len(table) > 1000 and set(table["benchmark"]) == {"kernels", "train_step"}
    assert table["p50_ms"].notna().sum() > 1000 and (table["shape"] != "").all()
    same = _run("compare", os.path.join(BENCH, "results"), os.path.join(BENCH, "results"))
    assert same.returncode == 0 and "0 regressions" in same.stdout, same.stdout[-2000:] + same.stderr[-2000:]
