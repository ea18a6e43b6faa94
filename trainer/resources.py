"""What the machine has: memory readings of this process (CUDA allocator and NVML on GPU, RSS on
CPU) and the CPU's model name and instruction-set flags."""
from __future__ import annotations

import functools
import platform
import socket
from pathlib import Path

import psutil
import torch


def memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory on GPU, resident set size on CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return psutil.Process().memory_info().rss / 2**20


@functools.lru_cache(maxsize=1)
def _nvml_ready() -> bool:
    try:
        import pynvml
        pynvml.nvmlInit()
        return True
    except Exception:  # noqa: BLE001 - no driver, no library, no GPU: NVML is just absent
        return False


def memory_report(device: torch.device) -> dict:
    """Everything known about this rank's memory (MiB)."""
    process = psutil.Process().memory_info()
    report = {"host": socket.gethostname(), "rss_mb": process.rss / 2**20,
              "system_total_mb": psutil.virtual_memory().total / 2**20}
    if device.type == "cuda":
        report["cuda_allocated_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        report["cuda_reserved_peak_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
        if _nvml_ready():
            import pynvml
            handle = _nvml_handle(device)
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            report["nvml_used_mb"], report["nvml_total_mb"] = info.used / 2**20, info.total / 2**20
    return report


def _nvml_handle(device: torch.device):
    """NVML's handle of the device torch calls `device` (by UUID: CUDA_VISIBLE_DEVICES-safe)."""
    import pynvml
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    try:
        return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    except pynvml.NVMLError:
        return pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)


def cpuinfo_field(name: str) -> str | None:
    """The first value of `name` in /proc/cpuinfo (Linux); None elsewhere or if absent."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == name:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model_name() -> str:
    """The CPU's model name, else the machine type."""
    return cpuinfo_field("model name") or platform.processor() or platform.machine() or "cpu"


def cpu_flags() -> set[str]:
    """The CPU's instruction-set flags as the kernel lists them (empty where unknown)."""
    return set((cpuinfo_field("flags") or "").split())
