"""Component profiling: parameters, memory per rank, per-component time, FLOPs, MFU.

Forward time of a component runs from its forward pre-hook to its forward hook. Backward time
runs from the moment the gradient of its output arrives (a hook on the output tensor) until
the gradients of all its parameters exist (a multi-grad hook): its own share of the backward.
GPU: CUDA events (read after one synchronize at the end of the profiled step); CPU: host
timers. Hooks exist only during a profiled step. FLOPs per sample are counted once with
torch.utils.flop_counter on a copy of the model; MFU compares achieved FLOP/s with the GPU's
bf16 dense peak from a table (unknown devices report null, never a guess).
"""
from __future__ import annotations

import copy
import logging
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from diagnostics.records import step_file, write_json
from trainer import distributed, resources
from trainer.diagnostics_config import DiagnosticsConfig
from trainer.observer import Observer, RunContext, StepContext
from trainer.resources import memory_report

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peak (TFLOP/s) by a substring of torch.cuda.get_device_name(),
# from the vendor's data sheets; the first match wins (more specific names first).
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
                    ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0), ("A10G", 70.0),
                    ("RTX 4090", 165.2))


def peak_tflops(device_name: str) -> float | None:
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in device_name), None)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return resources.cpu_model_name()


def count_flops_per_sample(model: torch.nn.Module, num_features: int, num_targets: int,
                           device: torch.device, batch: int = 2) -> float:
    """Forward + backward FLOPs per sample (a private copy: no gradients or RNG disturbed)."""
    cfg = model.config
    clone = copy.deepcopy(model).to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        wave = torch.randn(batch, cfg.seq_len, num_features, device=device)
        target = torch.randn(batch, cfg.seq_len, num_targets, device=device)
        future = torch.randn(batch, cfg.pred_len, num_features, device=device)
        y = torch.randn(batch, cfg.pred_len, num_targets, device=device)
        counter = FlopCounterMode(display=False)
        with counter:
            clone(wave, target, future).loss(y).backward()
    return counter.get_total_flops() / batch


class _Clock:
    """Timestamps on the host (CPU) or CUDA events (GPU), turned into milliseconds later."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end) -> float:
        if start is None or end is None:
            return 0.0
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3


class ComponentTimer:
    """Hooks that time each component's forward and backward during one step."""

    def __init__(self, components: dict[str, torch.nn.Module], clock: _Clock) -> None:
        self.components, self.clock = components, clock
        self.marks: dict[str, dict[str, object]] = {}
        self.handles: list = []

    def attach(self) -> None:
        self.marks = {name: {} for name in self.components}
        for name, module in self.components.items():
            self.handles.append(module.register_forward_pre_hook(self._mark(name, "fwd_start")))
            self.handles.append(module.register_forward_hook(self._on_forward_end(name)))
            params = [p for p in module.parameters() if p.requires_grad]
            if params:
                self.handles.append(torch.autograd.graph.register_multi_grad_hook(
                    params, self._mark(name, "bwd_end")))

    def _mark(self, name: str, key: str):
        def hook(*_):
            self.marks[name][key] = self.clock.now()
        return hook

    def _on_forward_end(self, name: str):
        def hook(module, inputs, output):
            self.marks[name]["fwd_end"] = self.clock.now()
            tensors = output if isinstance(output, tuple) else (output,)
            for t in tensors:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    self.handles.append(t.register_hook(self._first_grad(name)))
        return hook

    def _first_grad(self, name: str):
        def hook(grad):
            self.marks[name].setdefault("bwd_start", self.clock.now())
        return hook

    def detach(self) -> dict[str, dict[str, float]]:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        ms = self.clock.ms
        return {name: {"forward_ms": ms(m.get("fwd_start"), m.get("fwd_end")),
                       "backward_ms": ms(m.get("bwd_start"), m.get("bwd_end"))}
                for name, m in self.marks.items()}


class ProfileObserver(Observer):
    communicates = True      # gathers every rank's memory

    def __init__(self, config: DiagnosticsConfig, interval: int) -> None:
        self.config, self.interval = config, interval

    def on_start(self, run: RunContext) -> None:
        self.run = run
        model = run.model
        self.clock = _Clock(run.device)
        components = {n: getattr(model, n) for n in model.component_parameters() if n != "other"}
        # Under torch.compile the components are fused into one graph: timing hooks would split
        # it (and recompile it), measuring a different program. Time the whole step only.
        self.timer = None if run.compiled else ComponentTimer(components, self.clock)
        if self.timer is None:
            log.info("component profiling of a compiled model: step time, memory, throughput "
                     "and MFU are measured, per-component forward/backward times are not")
        self.flops_per_sample = count_flops_per_sample(model, model.spec.num_features,
                                                       len(model.spec.targets), run.device)
        self.device_name = device_name(run.device)
        self.peak = peak_tflops(self.device_name) if run.device.type == "cuda" else None

    def is_active(self, step: int) -> bool:
        return step % self.interval == 0

    def before_forward(self, ctx: StepContext) -> None:
        if self.clock.cuda:
            torch.cuda.synchronize()
        if self.timer is not None:
            self.timer.attach()
        self.step_start = self.clock.now()

    def before_optimizer_step(self, ctx: StepContext) -> None:
        self.optimizer_start = self.clock.now()

    def after_step(self, ctx: StepContext) -> None:
        step_end = self.clock.now()
        if self.clock.cuda:
            torch.cuda.synchronize()
        components = self.timer.detach() if self.timer is not None else {}
        step_ms = self.clock.ms(self.step_start, step_end)
        optimizer_ms = self.clock.ms(self.optimizer_start, step_end)
        memory = distributed.all_gather_object({"rank": distributed.rank(),
                                                **memory_report(self.run.device)})
        if self.run.is_main:
            self.write(ctx, components, step_ms, optimizer_ms, memory)

    def write(self, ctx: StepContext, components: dict, step_ms: float, optimizer_ms: float,
              memory: list[dict]) -> None:
        samples = self.run.local_batch_size * self.run.world_size
        samples_per_s = samples / (step_ms / 1e3) if step_ms > 0 else None
        achieved = self.flops_per_sample * samples_per_s / 1e12 if samples_per_s else None
        record = {
            "step": ctx.step, "timestamp": time.time(), "world_size": self.run.world_size,
            "device": str(self.run.device), "device_name": self.device_name,
            "parameters": parameter_counts(self.run.model), "config": self.run.config.to_dict(),
            "memory": {"per_rank": memory},
            "timing": {"method": "cuda_events" if self.clock.cuda else "host_timer",
                       "components_timed": self.timer is not None, "components": components,
                       "step_time_ms": step_ms,
                       "optimizer_ms": optimizer_ms, "data_time_ms": ctx.data_time_s * 1e3,
                       "samples_per_s": samples_per_s},
            "flops_per_sample": self.flops_per_sample, "achieved_tflops": achieved,
            "peak_tflops": self.peak,
            "mfu": achieved / self.peak if achieved and self.peak else None}
        write_json(step_file(self.run.log_dir / "components", "profile", ctx.step), record)
        scalars = {f"rank{m['rank']}_rss_mb": m["rss_mb"] for m in memory}
        scalars.update({"step_time_ms": step_ms, "samples_per_s": samples_per_s or 0.0})
        self.run.run_log.scalars("profile", ctx.step, scalars)


def parameter_counts(model) -> dict:
    groups = model.component_parameters()
    return {"total": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "components": {name: {"total": sum(p.numel() for _, p in ps),
                                  "trainable": sum(p.numel() for _, p in ps if p.requires_grad)}
                           for name, ps in groups.items()}}
