"""The one timing harness of the suite: first calls, interleaved timed rounds, percentiles, peak memory.

Providers of one case are timed interleaved: each round calls every provider once, in an order that
rotates from round to round, so a slow spell of the machine (the times of a small shared machine
drift by tens of percent within a minute) slows all of them alike and the ratios between them hold.
On a GPU each call is timed with CUDA events, after an L2 flush (a write of ``flush_bytes``) so that
no call finds its inputs in the cache; on CPU with ``time.perf_counter``. ``triton.testing.do_bench``
and ``torch.utils.benchmark.Timer`` time one function at a time (no interleaving) and the first needs
a GPU, so they do not fit the CPU runs and the providers' side-by-side rounds.
"""
from __future__ import annotations

import time
import traceback
from typing import Callable, Dict, Optional, Tuple


def quantile(xs, q: float) -> Optional[float]:
    """Linear interpolation between order statistics (numpy's default method)."""
    s = sorted(xs)
    if not s:
        return None
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def percentiles(times_ms) -> Dict[str, float]:
    return {"p20_ms": quantile(times_ms, 0.2), "p50_ms": quantile(times_ms, 0.5), "p80_ms": quantile(times_ms, 0.8)}


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:3000]


class Harness:
    """Times callables on one device. ``reps``: timed rounds; ``max_case_s``: fewer rounds when one
    round would take longer than that in all (at least 3); ``flush_bytes``: the L2 flush on a GPU."""

    def __init__(self, device="cpu", warmup: int = 3, reps: int = 30, max_case_s: Optional[float] = None,
                 flush_bytes: int = 0):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.warmup, self.reps, self.max_case_s, self.flush_bytes = warmup, reps, max_case_s, flush_bytes
        self._flush = None

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def first_call(self, fn: Callable):
        """(output, seconds) of one call, compilation included for compiled providers."""
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - t0

    def time(self, fns: Dict[str, Callable], warmup: Optional[int] = None, reps: Optional[int] = None,
             flush: bool = True, back_to_back: bool = False) -> Dict[str, dict]:
        """Per name: p20/p50/p80 ms, ``reps`` and ``timer``, or ``error`` (with ``traceback``) when the
        provider raised in its warm-up; a provider that raises while timed raises."""
        warmup = self.warmup if warmup is None else warmup
        reps = self.reps if reps is None else reps
        results, live, per_call = {}, {}, {}
        for name, fn in fns.items():
            try:
                self.sync()
                t0 = time.perf_counter()
                for _ in range(max(1, warmup)):
                    fn()
                self.sync()
                per_call[name] = (time.perf_counter() - t0) / max(1, warmup)
                live[name] = fn
            except Exception as exc:  # one broken provider must not stop the others
                results[name] = {"error": error_text(exc), "traceback": traceback.format_exc()[-6000:]}
        if not live:
            return results
        if self.max_case_s:
            reps = int(max(3, min(reps, self.max_case_s / max(sum(per_call.values()), 1e-6))))
        names = list(live)
        times = {name: [] for name in names}
        for r in range(reps):
            order = [names[(i + r) % len(names)] for i in range(len(names))]
            for name, ms in zip(order, self._round([live[n] for n in order], flush)):
                times[name].append(ms)
        for name in names:
            results[name] = {**percentiles(times[name]), "reps": reps,
                             "timer": "cuda_events" if self.cuda else "perf_counter"}
            if back_to_back:
                results[name]["back_to_back_ms"] = self._back_to_back(live[name], reps)
        return results

    def _round(self, fns, flush: bool):
        """One call of each, in order: ms per call."""
        if not self.cuda:
            out = []
            for fn in fns:
                t0 = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t0) * 1e3)
            return out
        torch = self.torch
        if flush and self._flush is None and self.flush_bytes:
            self._flush = torch.empty(self.flush_bytes // 4, dtype=torch.int32, device=self.device)
        events = []
        for fn in fns:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if flush and self._flush is not None:
                self._flush.zero_()
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return [a.elapsed_time(b) for a, b in events]

    def _back_to_back(self, fn, n: int) -> float:
        """Wall ms per call of calls issued back to back, then synchronised (launch overhead included)."""
        self.sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        self.sync()
        return (time.perf_counter() - t0) * 1e3 / n

    def graph(self, fn: Callable, reps: Optional[int] = None) -> dict:
        """Device time alone: ``fn`` captured once in a CUDA graph, each replay timed after the L2
        flush. Says why when ``fn`` cannot be captured (a host sync inside, a CPU device)."""
        torch = self.torch
        if not self.cuda:
            return {"graph_note": "CPU: no CUDA graph"}
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graphs asks
                fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            torch.cuda.synchronize()
        except Exception as exc:
            torch.cuda.synchronize()
            first = str(exc).splitlines()[0][:200] if str(exc) else ""
            return {"graph_error": f"{type(exc).__name__}: {first}"}
        times = [self._round([graph.replay], flush=True)[0] for _ in range(max(3, reps or self.reps))]
        del graph
        return {f"graph_{k}": v for k, v in percentiles(times).items()}

    def peak_memory(self, fn: Callable) -> Tuple[Optional[int], str]:
        """(bytes, method) of one more, untimed call: held above what was held before it (inputs
        excluded, returned outputs included). GPU: the CUDA allocator's peak; CPU: torch's CPU
        allocations as the profiler records them, else the resident-set high-water mark's rise."""
        torch = self.torch
        if self.cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = fn()
            torch.cuda.synchronize()
            del out
            return torch.cuda.max_memory_allocated() - base, "cuda_max_memory_allocated"
        errors = []
        for method, measure in (("torch_profiler_cpu_allocations", _profiled_cpu_peak),
                                ("rss_high_water_delta", _rss_high_water_delta)):
            try:
                return measure(fn), method
            except Exception as exc:  # private profiler API or /proc missing: try the next method
                errors.append(f"{method}: {error_text(exc)}")
        return None, "; ".join(errors)


def _profiled_cpu_peak(fn: Callable) -> int:
    """Peak of bytes held by torch's CPU allocator during one call, above what it held at the start:
    torch keeps no CPU allocator statistics, but the profiler with ``profile_memory`` records every
    allocation and free with the running total."""
    import torch
    from torch._C._profiler import _EventType

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and str(event.extra_fields.device) == "cpu":
            events.append((event.start_time_ns, event.extra_fields.alloc_size, event.extra_fields.total_allocated))
    if not events:
        return 0
    events.sort()
    start = events[0][2] - events[0][1]
    return int(max(total for _, _, total in events) - start)


def _rss_high_water_delta(fn: Callable) -> int:
    """Linux: reset the resident-set high-water mark, call, read how far it rose above the RSS before
    (an underestimate once malloc keeps freed pages for reuse, hence only the fallback)."""
    def status_kb(field: str) -> int:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith(field)).split()[1])

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # 5 resets VmHWM to the current RSS
    before = status_kb("VmRSS:")
    fn()
    return max(0, status_kb("VmHWM:") - before) * 1024
