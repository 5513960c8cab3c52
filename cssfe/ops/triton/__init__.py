"""Triton kernels of the cssfe operators (the ``triton`` backend): ASL loss+grad in one pass,
class attention forward (online softmax) and backward (recomputation), progressive enhancement
forward and backward (all three group stages in one launch).

Import this module only when the backend is used: on a machine without a GPU, the kernels run
in Triton's interpreter when ``TRITON_INTERPRET=1`` is set *before* the import (products in fp32
there: its bf16 ``tl.dot`` is wrong, so every kernel loads half-precision inputs as fp32).
"""
from .asl import asl, asl_scale_grad_
from .attention import attention_bwd, attention_fwd
from .enhance import enhance_bwd, enhance_fwd

__all__ = ["asl", "asl_scale_grad_", "attention_fwd", "attention_bwd", "enhance_fwd", "enhance_bwd"]
