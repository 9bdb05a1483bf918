"""Which device and number format compute fastest here: one home for the bf16-or-not decision.

bf16 is fast on CUDA GPUs and on CPUs with AMX tiles; on other CPUs it is emulated and several
times slower than fp32. Rather than trust CPU flags (a virtual machine may hide or misreport them),
`bf16_is_fast` times one matrix product in each format, once per process.
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
    """True on CUDA, and on a CPU where a bf16 matmul beats fp32 by at least 1.5× (AMX)."""
    if device_type == "cuda":
        return True
    a = torch.randn(512, 512)

    def rate(dtype: torch.dtype) -> float:
        x = a.to(dtype)
        x @ x  # warm-up
        start = time.perf_counter()
        for _ in range(8):
            x @ x
        return 8 / (time.perf_counter() - start)

    return rate(torch.bfloat16) >= 1.5 * rate(torch.float32)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """'auto' → bf16 where it is fast, else fp32; or the named format ('bf16', 'fp16', 'fp32')."""
    named = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if precision == "auto":
        return torch.bfloat16 if bf16_is_fast(device.type) else torch.float32
    if precision not in named:
        raise ValueError(f"precision {precision!r}: use auto, bf16, fp16 or fp32")
    return named[precision]
