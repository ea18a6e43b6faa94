"""trainer/precision.py: what `train.precision: auto` means on each device."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from trainer import precision, resources

CPU = torch.device("cpu")


def test_explicit_precisions_are_kept():
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        assert precision.resolve_precision(name, CPU) == (name, "set in the config")
        assert precision.autocast_dtype(name) is dtype


@pytest.mark.parametrize("native, speedup, expected", [
    (True, 3.7, "bf16"), (True, 0.5, "fp32"), (False, 3.7, "fp32")])
def test_auto_on_cpu_needs_native_bf16_that_is_faster(monkeypatch, native, speedup, expected):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: speedup)
    chosen, why = precision.resolve_precision("auto", CPU)
    assert chosen == expected and why.startswith("auto:")
    if native:
        assert f"{speedup:.2f}x" in why


def test_the_probe_measures_a_positive_speedup_once():
    first = precision.cpu_bf16_speedup()
    assert math.isfinite(first) and first > 0
    assert precision.cpu_bf16_speedup() == first          # cached: one probe per process


def test_native_bf16_agrees_with_the_kernels_cpu_flags():
    """torch's check and /proc/cpuinfo's flags say the same on this machine."""
    flags = resources.cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags here")
    assert precision.cpu_has_native_bf16() == bool(flags & set(precision.BF16_CPU_FLAGS))


@pytest.mark.parametrize("setting, native_bf16, speedup, fp16_flags, slower", [
    ("fp16", True, 3.7, set(), True), ("fp16", True, 3.7, {"avx512_fp16"}, False),
    ("bf16", False, 3.7, set(), True), ("bf16", True, 0.5, set(), True),
    ("bf16", True, 3.7, set(), False), ("fp32", False, 0.5, set(), False),
    ("auto", False, 0.5, set(), False)])
def test_an_explicit_half_precision_slower_than_fp32_on_this_cpu_is_named(
        monkeypatch, setting, native_bf16, speedup, fp16_flags, slower):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native_bf16)
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: speedup)
    monkeypatch.setattr(resources, "cpu_flags", lambda: fp16_flags)
    warning = precision.slower_than_fp32(setting, CPU)
    assert (warning is not None) == slower
    if slower:
        assert f"train.precision {setting}" in warning and "fp32" in warning
    assert precision.slower_than_fp32(setting, torch.device("cuda")) is None


def test_the_run_log_warns_when_fp16_is_set_on_a_cpu(monkeypatch, caplog):
    from trainer import distributed
    from trainer.build import agreed_precision
    monkeypatch.setattr(resources, "cpu_flags", lambda: set())
    with caplog.at_level(logging.WARNING):
        assert agreed_precision("fp16", distributed.init_distributed("cpu")) == "fp16"
    assert "train.precision fp16 on a CPU" in caplog.text and "slower than fp32" in caplog.text
