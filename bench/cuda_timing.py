# What the attention benchmarks share: timing a CUDA call and comparing two results.
import os

import torch

REPEAT = int(os.environ.get("REPEAT", 2))


def timed(fn):
    """Mean seconds of fn over REPEAT calls after one warm-up (which builds cuDNN's graphs)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(REPEAT):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / REPEAT


def rel(a, b):
    """Largest difference of a from b, over b's largest magnitude."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
