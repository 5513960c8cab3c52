import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pow2(n: int, lo: int = 16, hi: int = 1 << 30) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def launch_device(args) -> torch.device:
    """The device of a launch's tensor arguments (they must share one)."""
    devices = {a.device for a in args if isinstance(a, torch.Tensor)}
    if len(devices) != 1:
        raise ValueError(f"triton launch: the tensor arguments must be on one device, got {sorted(map(str, devices))}")
    return devices.pop()


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)`` on its tensors' device. Triton launches on the current device
    and its current stream: tensors on cuda:1 while cuda:0 is current would be read from the wrong
    device or race with the work queued for them. Every kernel of this package starts here."""
    device = launch_device(args)
    if device.type != "cuda":  # CPU tensors: the interpreter
        return kernel[grid](*args, **kwargs)
    with torch.cuda.device(device):
        return kernel[grid](*args, **kwargs)
