"""Kernel backends of the cssfe operators: ``reference`` (plain PyTorch), ``cpu`` / ``cuda``
(the C++/CUDA extension in ``csrc/``) and ``triton`` (``cssfe/ops/triton``)."""
