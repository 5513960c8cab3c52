"""The kernel backends of the cssfe operators, each registering itself and its kernels
(``cssfe/ops/kernels.py``): ``reference`` (plain PyTorch, ``cssfe/ops/reference.py``), ``cpu`` /
``cuda`` (the C++/CUDA extension in ``csrc/``, ``native_ops.py``) and ``triton`` (``triton/``).
A new backend is a module imported here."""
from cssfe.ops import reference  # noqa: F401
from cssfe.ops.backends import native_ops, triton  # noqa: F401
