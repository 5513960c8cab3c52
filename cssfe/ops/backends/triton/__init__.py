"""Triton kernels of the cssfe operators (the ``triton`` backend): ASL loss+grad in one pass,
class attention forward (online softmax) and backward (recomputation), progressive enhancement
forward and backward (all three group stages in one launch). ``ops.py`` registers them.

The kernel modules (``asl``, ``attention``, ``attention_gemm``, ``enhance``) import Triton: they are
imported only when the backend runs. On a machine without a GPU the kernels run in Triton's
interpreter when ``TRITON_INTERPRET=1`` is set *before* that import (products in fp32 there: its
bf16 ``tl.dot`` is wrong, so every kernel loads half-precision inputs as fp32).
"""
from . import ops  # noqa: F401  (registers the backend; imports no Triton)
