import contextlib
import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pow2(n: int, lo: int = 16, hi: int = 1 << 30) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


@contextlib.contextmanager
def overriding(namespace: dict, name: str, value):
    """Set the module global ``name`` (in ``namespace``, a module's globals()) inside the block only:
    the strategy, block and scratch overrides that tests and the GPU benchmark use."""
    previous = namespace[name]
    namespace[name] = value
    try:
        yield
    finally:
        namespace[name] = previous
