"""Property-based comparison of the ops with their float64 references on generated inputs
(hypothesis draws the shapes, seeds and options; the checks are those of kernel_cases.py), with
uninitialised memory poisoned, so an output element the kernel leaves unwritten fails."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_cases import check_asl, check_attention, check_enhance

BACKENDS = ["reference", "cpu"]
SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(b=st.integers(1, 3), c=st.integers(1, 24), d=st.integers(1, 40), n=st.integers(1, 70),
       batched_q=st.booleans(), seed=st.integers(0, 2**16))
def test_class_attention_property(backend, native_backend, poison, b, c, d, n, batched_q, seed):
    check_attention(backend, (b, c, d, n), torch.float32, batched_q=batched_q, seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(b=st.integers(1, 3), c=st.integers(1, 30), length=st.integers(1, 60), mask=st.booleans(), seed=st.integers(0, 2**16))
def test_progressive_enhance_property(backend, native_backend, poison, b, c, length, mask, seed):
    check_enhance(backend, (b, c, length), torch.float32, mask=mask, seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(b=st.integers(1, 40), c=st.integers(1, 90), reduction=st.sampled_from(["sum", "mean"]),
       target_dtype=st.sampled_from([torch.bool, torch.uint8, torch.float32]), seed=st.integers(0, 2**16))
def test_asymmetric_loss_property(backend, native_backend, poison, b, c, reduction, target_dtype, seed):
    check_asl(backend, (b, c), torch.float32, target_dtype=target_dtype, reduction=reduction, seed=seed)
