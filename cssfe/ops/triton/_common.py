import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pow2(n: int, lo: int = 16, hi: int = 1 << 30) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))
