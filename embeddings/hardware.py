"""Which device and number format compute fastest here: one home for the bf16-or-not decision.

bf16 is fast on CUDA GPUs and on CPUs with AMX tiles (~6× fp32), about 2× on AMD's AVX512-BF16; on
other CPUs it is emulated and several times slower than fp32. Rather than trust CPU flags (a virtual
machine may hide or misreport them), `bf16_is_fast` times a matrix product in each format (the best of
5 rounds), once per process and device type. A job whose workers must agree (the embed job resuming its
own shards) pins the format it recorded instead of measuring again.
"""

from __future__ import annotations

import functools
import time

import torch


def default_device() -> torch.device:
    """cuda when a GPU is visible, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.lru_cache(maxsize=None)
def bf16_is_fast(device_type: str = "cpu") -> bool:
    """True on CUDA, and on a CPU where a bf16 matmul beats fp32 by at least 1.5× (AMX ~6×, AVX512-BF16 ~2×).

    Each format's time is the best of 5 interleaved rounds: a process that starts beside others (Ray's own
    processes, a second test) sees its rounds slowed at random, and one slow round must not flip the choice.
    """
    if device_type == "cuda":
        return True
    a = torch.randn(512, 512)
    formats = {dtype: a.to(dtype) for dtype in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(formats, float("inf"))
    for _ in range(5):
        for dtype, x in formats.items():
            x @ x  # warm-up
            start = time.perf_counter()
            for _ in range(4):
                x @ x
            best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best[torch.float32] >= 1.5 * best[torch.bfloat16]


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def precision_name(dtype: torch.dtype | str) -> str:
    """The precision name ('bf16', 'fp16', 'fp32') of a torch dtype or its name ('bfloat16')."""
    name = str(dtype).removeprefix("torch.")
    for key, value in DTYPES.items():
        if str(value).removeprefix("torch.") == name:
            return key
    raise ValueError(f"no precision name for dtype {dtype!r}")


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """'auto' → bf16 where it is fast, else fp32; or the named format ('bf16', 'fp16', 'fp32')."""
    if precision == "auto":
        return torch.bfloat16 if bf16_is_fast(device.type) else torch.float32
    if precision not in DTYPES:
        raise ValueError(f"precision {precision!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[precision]
