"""trainer/precision.py: what `train.precision: auto` means on each device."""
from __future__ import annotations

import pytest
import torch

from trainer import precision

CPU = torch.device("cpu")


def test_explicit_precisions_are_kept():
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        assert precision.resolve_precision(name, CPU) == (name, "set in the config")
        assert precision.autocast_dtype(name, CPU) is dtype


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cpu_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    chosen, why = precision.resolve_precision("auto", CPU)
    assert chosen == expected and why.startswith("auto:")


def test_native_bf16_agrees_with_the_kernels_cpu_flags():
    """torch's check and /proc/cpuinfo's flags say the same on this machine."""
    flags = precision.cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags here")
    assert precision.cpu_has_native_bf16() == bool(flags & set(precision.BF16_CPU_FLAGS))
