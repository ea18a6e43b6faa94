"""Component profiling: component times cover the step, FLOPs, and the MFU table."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from diagnostics.profiling import ComponentTimer, count_flops_per_sample, peak_tflops
from tests.test_model import inputs, make_model


class FlopClock:
    """A clock that reads the FLOPs counted so far: deterministic "time" in which every matrix
    product of the step takes a known, exact share."""
    cuda = False

    def __init__(self, counter: FlopCounterMode) -> None:
        self.counter = counter

    def now(self) -> int:
        return self.counter.get_total_flops()

    def ms(self, start, end) -> float:
        return 0.0 if start is None or end is None else float(end - start)


def test_component_times_cover_the_step_exactly():
    """Every matrix product of the model runs inside one of its components, so on a FLOP clock
    the components' forward and backward times add up to the whole step: a part counted twice
    makes the sum larger, a part left out makes it smaller."""
    model = make_model()
    wave, target, future, y = inputs(model, batch=4)
    components = {n: getattr(model, n) for n in model.component_parameters() if n != "other"}
    counter = FlopCounterMode(display=False)
    clock = FlopClock(counter)
    timer = ComponentTimer(components, clock)
    timer.attach()
    with counter:
        start = clock.now()
        model(wave, target, future).loss(y).backward()
        step = clock.ms(start, clock.now())
    times = timer.detach()
    assert set(times) == set(components)
    assert all(t["forward_ms"] > 0 and t["backward_ms"] > 0 for t in times.values())
    assert sum(t["forward_ms"] + t["backward_ms"] for t in times.values()) == step
    assert not timer.handles        # nothing left attached after the profiled step


def test_flops_are_counted_without_touching_the_model():
    model = make_model()
    before = torch.get_rng_state()
    flops = count_flops_per_sample(model, model.spec.num_features, 4, torch.device("cpu"))
    assert flops > 1e5
    assert torch.equal(before, torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.4),
                                        ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.1),
                                        ("NVIDIA L4", 121.0), ("Some Future GPU", None)])
def test_mfu_peak_table(name, peak):
    assert peak_tflops(name) == peak


def compile_eagerly(model, enabled, mode="default"):
    """torch.compile with the "eager" backend: a compiled module (Dynamo traces the model into
    graphs) that runs the graphs as plain PyTorch, without Inductor's slow code generation."""
    return torch.compile(model, backend="eager")


def refuse_to_compile(model, mode="default"):
    raise RuntimeError("torch.compile is not supported here")


def profile_record(short_csv, tmp_path, name: str) -> dict:
    """The step-2 profile of a 2-step run with `train.compile` on and component profiling."""
    import json

    import jsonschema

    import trainer.build
    from diagnostics.schemas import PROFILE_RECORD
    from tests.conftest import small_config
    from trainer import distributed
    config = small_config(short_csv, tmp_path, name, train__compile=True,
                          train__max_steps=2, train__log_interval=2,
                          train__validate_at_start=False,
                          diagnostics__enable_component_profiling=True,
                          diagnostics__profile_interval=2)
    assert trainer.build.build_trainer(config, distributed.init_distributed("cpu")).train() == 0
    profile = tmp_path / "logs" / name / "components" / "profile_step_000002.json"
    record = json.loads(profile.read_text())
    jsonschema.validate(record, PROFILE_RECORD)
    assert record["timing"]["step_time_ms"] > 0 and record["timing"]["samples_per_s"] > 0
    return record


def test_compiled_runs_profile_the_whole_step_only(short_csv, tmp_path, monkeypatch):
    """Under torch.compile the component hooks would split the compiled graph (and recompile
    it): the profile then times the step, and says the components were not timed."""
    import trainer.build
    monkeypatch.setattr(trainer.build, "maybe_compile", compile_eagerly)
    record = profile_record(short_csv, tmp_path, "compiled")
    assert record["timing"]["components_timed"] is False and record["timing"]["components"] == {}


def test_a_run_that_fell_back_to_eager_times_its_components(short_csv, tmp_path, monkeypatch):
    """`train.compile` is on but torch.compile failed: the model runs eagerly, so the profile
    times each component as in any eager run."""
    monkeypatch.setattr(torch, "compile", refuse_to_compile)
    record = profile_record(short_csv, tmp_path, "fell_back")
    assert record["timing"]["components_timed"] is True
    assert set(record["timing"]["components"]) >= {"decoder", "celestial_node_encoder"}
