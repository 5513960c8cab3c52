"""Operations of the CSSFE head, with interchangeable kernel backends.

Public API::

    class_attention(q, k, v, *, return_maps=False, backend=None)
    progressive_enhance(z, affinity, groups, gate, lam, *, backend=None)
    asymmetric_loss(logits, targets, *, gamma_pos=0.0, gamma_neg=4.0, clip=0.05, eps=1e-8,
                    disable_torch_grad_focal_loss=True, reduction="sum", backend=None)
    semantic_affinity(embeddings, groups, mask=True, tau=0.1)      # plain PyTorch

Backends: ``reference`` | ``cpu`` | ``cuda`` | ``triton`` (``auto`` picks per device). Choose with
the ``backend=`` argument, ``with use_backend(name):``, ``set_default_backend(name)`` (e.g. from the
model config ``kernels: auto|reference|triton|cuda|cpu``) or the env var ``CSSFE_KERNEL_BACKEND``;
see ``cssfe/ops/dispatch.py``. ``available_backends()`` says what can run here and why not
(``backend_status(name)`` for one backend).
``cssfe.ops.reference`` holds the plain-PyTorch definitions that every kernel must match.
"""
from cssfe.ops.api import asymmetric_loss, class_attention, progressive_enhance
from cssfe.ops.dispatch import (
    BACKENDS,
    available_backends,
    backend_status,
    get_default_backend,
    resolve,
    set_default_backend,
    use_backend,
)
from cssfe.ops.reference import semantic_affinity

__all__ = [
    "BACKENDS",
    "asymmetric_loss",
    "available_backends",
    "backend_status",
    "class_attention",
    "get_default_backend",
    "progressive_enhance",
    "resolve",
    "semantic_affinity",
    "set_default_backend",
    "use_backend",
]
