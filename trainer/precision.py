"""Which precision `train.precision: auto` means on this device, and why.

bf16 autocast where bf16 is native *and* pays: CUDA GPUs that support it, and CPUs with bf16
instructions (AVX-512 BF16 or AMX) whose bf16 matrix products, measured at start, run at least
`MIN_CPU_SPEEDUP` times as fast as fp32's. Native is not enough on a CPU: bf16 matrix products
ran at about 3.7x fp32's on a 2-core AMD EPYC with AVX-512 BF16, but at 0.54x on a 2-core Intel
Xeon VM with the same instruction set (oneDNN's avx512_core_bf16 kernels, no AMX), where bf16
training was 25% slower than fp32. The probe takes about 0.1 s.
Elsewhere fp32. All ranks take rank 0's choice.

What stays fp32 under bf16: the weights and the optimizer state (autocast casts copies of the
weights for each product), the mixture head and its NLL (model/decoder.py), the softmaxes and the
graph's log-space arithmetic (model/attention.py, model/graph.py).
"""
from __future__ import annotations

import functools
import time

import torch

from trainer import resources

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
FP16_CPU_FLAGS = ("avx512_fp16", "amx_fp16")
MIN_CPU_SPEEDUP = 1.2          # bf16 products this much faster than fp32's, or fp32 is kept
PROBE_SIZE, PROBE_REPEATS = 1024, 3


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: torch's own check where it has one, else the kernel's CPU flags."""
    checks = [getattr(torch.cpu, name, None)
              for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(callable(check) for check in checks):
        return any(check() for check in checks)
    return bool(resources.cpu_flags() & set(BF16_CPU_FLAGS))


def _best_time(a: torch.Tensor, b: torch.Tensor) -> float:
    torch.mm(a, b)                                   # warm-up: the library picks its kernel
    best = float("inf")
    for _ in range(PROBE_REPEATS):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return best


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup() -> float:
    """fp32 time / bf16 time of one square matrix product on this CPU, best of a few each."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(PROBE_SIZE, PROBE_SIZE, generator=generator) for _ in range(2))
    return _best_time(a, b) / _best_time(a.bfloat16(), b.bfloat16())


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """(precision, why): `auto` made concrete for `device`; an explicit choice is kept."""
    if precision != "auto":
        return precision, "set in the config"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: the GPU computes bf16"
        return "fp32", "auto: this GPU has no bf16"
    if device.type != "cpu" or not cpu_has_native_bf16():
        return "fp32", f"auto: no native bf16 on this {device.type}"
    speedup = cpu_bf16_speedup()
    verdict = "bf16" if speedup >= MIN_CPU_SPEEDUP else "fp32"
    return verdict, (f"auto: the CPU has bf16 instructions and its bf16 matrix products run at "
                     f"{speedup:.2f}x fp32's here (bf16 from {MIN_CPU_SPEEDUP}x)")


def slower_than_fp32(precision: str, device: torch.device) -> str | None:
    """Why an explicit bf16 or fp16 runs slower than fp32 on this CPU, in words; None where it
    need not (fp32, auto, a GPU, a CPU with native instructions for it)."""
    if device.type != "cpu" or precision not in ("bf16", "fp16"):
        return None
    if precision == "fp16":
        if resources.cpu_flags() & set(FP16_CPU_FLAGS):
            return None
        return ("train.precision fp16 on a CPU without fp16 instructions (AVX-512 FP16 or AMX): "
                "slower than fp32 there; use fp32 or auto")
    if not cpu_has_native_bf16():
        return ("train.precision bf16 on a CPU without bf16 instructions (AVX-512 BF16 or AMX): "
                "slower than fp32 there; use fp32 or auto")
    speedup = cpu_bf16_speedup()
    if speedup >= MIN_CPU_SPEEDUP:
        return None
    return (f"train.precision bf16: this CPU's bf16 matrix products run at {speedup:.2f}x fp32's "
            f"here, so bf16 training is slower than fp32 or hardly faster; auto would pick fp32")


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision; None is plain fp32."""
    return DTYPES[precision]


def name_of(dtype: torch.dtype | None) -> str:
    return next(name for name, each in DTYPES.items() if each == dtype)
