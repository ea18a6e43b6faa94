"""Which precision `train.precision: auto` means on this device, and why.

bf16 autocast where the hardware computes bf16 natively: CUDA GPUs that support it, and CPUs
with bf16 instructions (AVX-512 BF16 or AMX), where oneDNN's bf16 matrix products run at several
times the fp32 rate. Elsewhere fp32: a CPU without them would emulate bf16 more slowly than it
computes fp32. What stays fp32 under bf16: the weights and the optimizer state (autocast casts
copies of the weights for each product), the mixture head and its NLL (model/decoder.py), the
softmaxes and the graph's log-space arithmetic (model/attention.py, model/graph.py).
"""
from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: torch's own check where it has one, else the kernel's CPU flags."""
    checks = [getattr(torch.cpu, name, None)
              for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(callable(check) for check in checks):
        return any(check() for check in checks)
    return bool(cpu_flags() & set(BF16_CPU_FLAGS))


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """(precision, why): `auto` made concrete for `device`; an explicit choice is kept."""
    if precision != "auto":
        return precision, "set in the config"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: the GPU computes bf16"
        return "fp32", "auto: this GPU has no bf16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16", "auto: the CPU has bf16 instructions (AVX-512 BF16 or AMX)"
    return "fp32", f"auto: no native bf16 on this {device.type}"


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a resolved or `auto` precision; None is plain fp32."""
    return DTYPES[resolve_precision(precision, device)[0]]
