"""The Triton kernels compiled for real GPUs (sm_80, sm_90) without one: the interpreter runs the
kernels' arithmetic (test_triton.py) but not the compiler, which is where on-chip limits bite.

The host functions run on CPU tensors with launches recorded instead of run, so each launch
configuration compiled here (block sizes, warps, stages, dtypes) is the one the code picks for
that shape on a GPU. Each compiled kernel must fit the architecture's shared memory per block.
Another Triton version can be checked the same way: ``pip install --target DIR triton==X``, then run
this file with ``PYTHONPATH=DIR`` and a separate ``TRITON_CACHE_DIR``.
"""
import importlib
import os
import re

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("the kernels are interpreter functions under TRITON_INTERPRET=1", allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from cssfe.ops.backends.triton import attention, attention_gemm  # noqa: E402

# the modules, not the functions of the same names that the package exports
triton_asl = importlib.import_module("cssfe.ops.backends.triton.asl")
triton_enhance = importlib.import_module("cssfe.ops.backends.triton.enhance")

# Shared memory one block may use (opt-in maximum): A100 (sm_80) 163 KB, H100/H200 (sm_90) 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
         torch.int64: "i64", torch.int32: "i32", torch.uint8: "u8", torch.int8: "i8", torch.bool: "i1"}


class Launch:
    def __init__(self, fn, args, kwargs):
        self.fn = fn
        values = dict(zip([p.name for p in fn.params], args))
        values.update(kwargs)
        self.options = {k: values.pop(k) for k in ("num_warps", "num_stages") if k in values}
        self.signature, self.constexprs = {}, {}
        for p in fn.params:
            v = values[p.name]
            if p.is_constexpr:
                self.signature[p.name] = "constexpr"
                self.constexprs[p.name] = v
            elif isinstance(v, torch.Tensor):
                self.signature[p.name] = "*" + TYPES[v.dtype]
            elif isinstance(v, bool):
                self.signature[p.name] = "i1"
            elif isinstance(v, int):
                self.signature[p.name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
            else:
                self.signature[p.name] = "fp32"

    def key(self):
        return (self.fn.__name__, tuple(sorted(self.signature.items())), tuple(sorted(self.constexprs.items())),
                tuple(sorted(self.options.items())))

    def __repr__(self):
        return f"{self.fn.__name__} {self.constexprs} {self.options} {self.signature}"


@pytest.fixture
def record(monkeypatch):
    """Launches are appended to the returned list instead of running."""
    launches = []

    def run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs))

    monkeypatch.setattr(triton.runtime.jit.JITFunction, "run", run)
    return launches


def compile_for(launch, capability):
    src = ASTSource(fn=launch.fn, signature=launch.signature, constexprs=launch.constexprs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=dict(launch.options))


def unique(launches):
    seen = {}
    for launch in launches:
        seen.setdefault(launch.key(), launch)
    return list(seen.values())


def attention_launches(c, d, n, dtype):
    b = 2  # the block choice does not depend on the batch
    q, k, v = torch.randn(1, c, d).to(dtype), torch.randn(b, d, n).to(dtype), torch.randn(b, d, n).to(dtype)
    z, lse = attention.attention_fwd(q, k, v)
    attention.attention_bwd(torch.randn(b, c, d).to(dtype), q, k, v, torch.randn(b, c, d).to(dtype), lse.zero_())


# Kernels with one program row per image: their offsets (b * C * L, b * D * N) pass 2^31 elements in
# large evaluation batches, so the image index must be widened to 64 bits before it is multiplied.
PER_IMAGE_KERNELS = {"_enhance_fwd", "_enhance_bwd", "_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkv"}


def check_image_offsets_are_64_bit(launch, kernel):
    if launch.fn.__name__ not in PER_IMAGE_KERNELS:
        return
    ttir = kernel.asm["ttir"]
    pid = re.search(r"(%[\w.]+) = tt.get_program_id x : i32", ttir)
    assert pid, f"{launch.fn.__name__}: no program id along x in its TTIR"
    assert re.search(rf"arith.extsi {re.escape(pid.group(1))} : i32 to i64", ttir), (
        f"{launch.fn.__name__}: the image index is not widened to 64 bits (32-bit offsets wrap at 2^31 elements)")


def check_fits(launches, capabilities=(80, 90)):
    assert launches, "no launch recorded"
    for launch in unique(launches):
        for cap in capabilities:
            kernel = compile_for(launch, cap)
            assert kernel.metadata.shared <= SHARED_LIMIT[cap], (
                f"sm_{cap}: {launch} asks {kernel.metadata.shared} B of shared memory (limit {SHARED_LIMIT[cap]})")
            check_image_offsets_are_64_bit(launch, kernel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_default_strategy_compiles_and_fits(record, dtype):
    """Each width's strategy (flash up to d = 128, GEMM above) at C = 80, N = 784."""
    for d in (128, 512, 768):
        attention_launches(80, d, 784, dtype)
    names = {launch.fn.__name__ for launch in record}
    assert names == {"_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkv", "_softmax_rows", "_softmax_grad_rows"}, names
    check_fits(record)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forced_flash_strategy_fits_where_check_supported_allows_it(record, dtype):
    """The flash kernels at the wide widths the GPU benchmark forces them to (d = 256, 512, and 768 in
    half precision; fp32 at d = 768 is refused by check_supported, see the next test)."""
    with attention.strategy("flash"):
        for d in (256, 512, 768):
            if dtype == torch.float32 and d > attention.MAX_FP32_D:
                with pytest.raises(ValueError, match="flash kernels support"):
                    attention_launches(80, d, 784, dtype)
                continue
            attention_launches(80, d, 784, dtype)
    check_fits(record, capabilities=(90,))


def test_flash_fp32_refusal_is_needed_on_sm90(record, monkeypatch):
    """check_supported refuses flash in fp32 beyond MAX_FP32_D because it does not fit: the
    compiler says so (an H200 reported the same launch asking ~256 KB)."""
    monkeypatch.setattr(attention, "check_supported", lambda d, dtype: None)
    with attention.strategy("flash"):
        attention_launches(80, 768, 784, torch.float32)
    dkv = [launch for launch in unique(record) if launch.fn.__name__ == "_attn_bwd_dkv"]
    assert len(dkv) == 1
    assert compile_for(dkv[0], 90).metadata.shared > SHARED_LIMIT[90]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_enhance_and_asl_compile_and_fit(record, dtype):
    """Also the ASL's 0/1-target form with its soft-target branch, which failed to compile (the
    general form's types disagreed with it) before this test existed."""
    b, c, length = 2, 80, 784
    groups = torch.arange(c) % 3
    order = torch.argsort(groups, stable=True)
    bounds = torch.tensor([0, int((groups == 0).sum()), int((groups <= 1).sum()), c])
    z = torch.randn(b, c, length).to(dtype)
    r, w = torch.rand(c, c), torch.rand(b, c)
    out = triton_enhance.enhance_fwd(z, r, order, bounds, w)
    triton_enhance.enhance_bwd(torch.randn(b, c, length).to(dtype), z, r, order, bounds, w, out)
    x = torch.randn(4096, 80).to(dtype)
    triton_asl.asl(x, torch.rand(4096, 80) > 0.5, 0.0, 4.0, 0.05, 1e-8, False, False, True)  # bool targets
    byte_targets = (torch.rand(4096, 80) > 0.5).to(torch.uint8)  # 0/1 too, but checked for soft ones
    triton_asl.asl(x, byte_targets, 0.0, 4.0, 0.05, 1e-8, False, False, True)
    triton_asl.asl(x, torch.rand(4096, 80), 1.5, 2.5, 0.05, 1e-8, True, True, True)  # soft targets
    triton_asl.asl(x, torch.rand(4096, 80) > 0.5, 1.0, 3.0, 0.0, 1e-8, True, False, False)  # focal grad, no clip, value only
    triton_asl.asl_scale_grad_(x, torch.tensor(1.5))  # the backward's in-place scaling
    names = {launch.fn.__name__ for launch in record}
    assert {"_enhance_fwd", "_enhance_bwd", "_asl_kernel", "_sum_kernel", "_scale_kernel"} <= names, names
    check_fits(record)


def test_gemm_strategy_row_kernels_at_long_rows(record):
    """Rows longer than one block loop over it (N = 4096 > 1024), in every dtype the rows hold."""
    with attention.strategy("gemm"), attention_gemm.scratch_bytes(1 << 30):
        for dtype in (torch.float16, torch.float64):
            attention_launches(7, 16, 4096, dtype)
    check_fits(record, capabilities=(90,))
