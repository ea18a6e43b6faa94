"""What every benchmark script here shares: where the repository and its production config are,
the machine a measurement ran on and how busy other processes kept it, loading a config with
overrides, the options every script takes, a folder for the runs, and printing the result.

The scripts run as files (`python benchmarks/NAME.py`): each puts the repository on sys.path
before importing this module."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import torch

from trainer import resources

REPO = Path(__file__).resolve().parents[1]
PRODUCTION = REPO / "configs" / "celestial_enhanced_pgat_production.yaml"
# Other processes (or the hypervisor's steal) taking more than this many cores on average during
# a measurement make it "not quiet" (the load average lags and counts our own earlier runs too).
QUIET_OTHER_CORES = 0.1


def machine_info() -> dict:
    info = {"cpu": resources.cpu_model_name(), "cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _busy_cpu_seconds() -> float:
    t = psutil.cpu_times()
    return sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq"))


def _stolen_cpu_seconds() -> float:
    """Time the hypervisor gave this VM's virtual cores to someone else (a noisy neighbour)."""
    return getattr(psutil.cpu_times(), "steal", 0.0)


def _own_cpu_seconds() -> float:
    """This process and its finished (waited-for) children, grandchildren included."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuWitness:
    """How many cores OTHER processes kept busy while a measurement ran: the whole machine's
    busy CPU time minus ours (children included, once they have been waited for)."""

    def __init__(self) -> None:
        self.load_before = os.getloadavg()[0]
        self.started = time.perf_counter()
        self.busy0, self.own0 = _busy_cpu_seconds(), _own_cpu_seconds()
        self.steal0 = _stolen_cpu_seconds()

    def report(self) -> dict:
        wall = time.perf_counter() - self.started
        others = (_busy_cpu_seconds() - self.busy0) - (_own_cpu_seconds() - self.own0)
        other_cores = max(0.0, others / wall) if wall > 0 else 0.0
        stolen_cores = (_stolen_cpu_seconds() - self.steal0) / wall if wall > 0 else 0.0
        return {"load_1m_before": round(self.load_before, 2),
                "load_1m_after": round(os.getloadavg()[0], 2), "wall_s": round(wall, 1),
                "other_processes_cores": round(other_cores, 3),
                "stolen_cores": round(stolen_cores, 3),
                "quiet": other_cores < QUIET_OTHER_CORES and stolen_cores < QUIET_OTHER_CORES}


def describe_load(witness: dict) -> str:
    verdict = "quiet" if witness["quiet"] else "NOT QUIET: these numbers are not trustworthy"
    return (f"load: 1-min load average {witness['load_1m_before']} before, "
            f"{witness['load_1m_after']} after; other processes used "
            f"{witness['other_processes_cores']:.2f} cores on average over "
            f"{witness['wall_s']} s, the hypervisor took {witness.get('stolen_cores', 0):.2f} "
            f"({verdict})")


def load_config(config_path: str | None, overrides: list[str]):
    """The config file with `key=value` overrides (as the CLI's --set reads them)."""
    from trainer.config import load_config, parse_override
    return load_config(config_path, [parse_override(text) for text in overrides])


def add_common_options(p: argparse.ArgumentParser) -> None:
    """--set and --json: the same in every benchmark here."""
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                   metavar="KEY=VALUE", help="config overrides, e.g. --set model.d_model=64")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def add_out_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="run folders go here (default: a temporary folder, removed)")


@contextlib.contextmanager
def run_folder(out: str | None, prefix: str) -> Iterator[Path]:
    """The folder given with --out (kept), or a temporary one removed afterwards."""
    if out:
        yield Path(out)
        return
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def print_result(result: dict, as_json: bool, format_report: Callable[[dict], str]) -> None:
    """The result as one JSON object (--json), or as the script's text report."""
    print(json.dumps(result, indent=1) if as_json else format_report(result))
