"""Operations of the CSSFE head, with interchangeable kernel backends.

Public API::

    class_attention(q, k, v, *, return_maps=False, backend=None)
    progressive_enhance(z, affinity, groups, gate, lam, *, plan=None, backend=None)
    enhance_plan(groups, mask=None) -> EnhancePlan   # computed once by the caller, passed as plan=
    asymmetric_loss(logits, targets, *, gamma_pos=0.0, gamma_neg=4.0, clip=0.05, eps=1e-8,
                    disable_torch_grad_focal_loss=True, reduction="sum", backend=None)
    semantic_affinity(embeddings, groups, mask=True, tau=0.1)      # plain PyTorch

Backends: ``reference`` | ``cpu`` | ``cuda`` | ``triton`` (``auto`` picks per device), each
registered by its own module (``cssfe/ops/kernels.py``). Choose with the ``backend=`` argument,
``with use_backend(name):``, ``with kernel_backend(cfg.kernels):`` (the config's ``kernels`` key,
checked first), ``set_default_backend(name)`` or the env var ``CSSFE_KERNEL_BACKEND``; see
``cssfe/ops/dispatch.py``. ``available_backends()`` says what can run here and why not
(``backend_status(name)`` for one backend).
``cssfe.ops.reference`` holds the plain-PyTorch definitions that every kernel must match.
"""
from cssfe.ops import backends  # noqa: F401  (first: every backend registers itself)
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
from cssfe.ops.kernels import backend as _registered_backend
from cssfe.ops.plan import EnhancePlan, enhance_plan
from cssfe.ops.reference import semantic_affinity


def kernel_backend(kernels: str):
    """``with kernel_backend(cfg.kernels):`` runs the CSSFE ops on that backend (``auto``: the
    ``CSSFE_KERNEL_BACKEND`` variable if set, else the automatic choice). A backend that is named
    and absent raises here, before any work (building it first if it can)."""
    if kernels != "auto":
        available, reason = backend_status(kernels, build=_registered_backend(kernels).builds)
        if not available:  # asked for and absent: say so before any work, never fall back
            raise ValueError(f"config key 'kernels': backend {kernels!r} is not available here: {reason} "
                             "(kernels=auto picks what is)")
    return use_backend(kernels)


__all__ = [
    "BACKENDS",
    "EnhancePlan",
    "asymmetric_loss",
    "available_backends",
    "backend_status",
    "class_attention",
    "enhance_plan",
    "get_default_backend",
    "kernel_backend",
    "progressive_enhance",
    "resolve",
    "semantic_affinity",
    "set_default_backend",
    "use_backend",
]
