"""Gradient diagnostics: records equal direct norms, ranks agree with one process, and the
agreement and noise-scale estimators recover a known gradient noise."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from diagnostics.gradients import GradientObserver, noise_scale_terms, status_of
from diagnostics.plugin import build_observers
from diagnostics.schemas import GRADIENT_HISTORY, GRADIENT_RECORD
from tests import dist_workers
from tests.conftest import small_config
from trainer import distributed
from trainer.build import build_trainer
from trainer.observer import Observer

jsonschema = pytest.importorskip("jsonschema")


def test_record_norms_equal_norms_of_grad(short_csv, tmp_path):
    config = small_config(short_csv, tmp_path, "g", train__max_steps=4,
                          train__validate_at_start=False,
                          diagnostics__enable_gradient_diagnostics=True,
                          diagnostics__gradient_log_interval=2)
    reference = {}

    class Reference(Observer):
        """Beside the gradient observer: the norms computed directly from `.grad`."""

        def on_start(self, run):
            self.model = run.model

        def is_active(self, step):
            return step % 2 == 0

        def after_backward(self, ctx):
            groups = self.model.component_parameters()
            reference[ctx.step] = {
                name: torch.sqrt(sum(p.grad.double().square().sum() for _, p in ps)).item()
                for name, ps in groups.items()}
            reference[ctx.step]["__total__"] = torch.sqrt(sum(
                p.grad.double().square().sum() for p in self.model.parameters())).item()
    trainer = build_trainer(config, distributed.init_distributed("cpu"),
                            observers=lambda c: [*build_observers(c), Reference()])
    assert any(isinstance(o, GradientObserver) for o in trainer.observers.observers)
    assert trainer.train() == 0
    folder = tmp_path / "logs" / "g" / "gradients"
    for step in (2, 4):
        record = json.loads((folder / f"gradients_step_{step:06d}.json").read_text())
        jsonschema.validate(record, GRADIENT_RECORD)
        for name, comp in record["components"].items():
            assert comp["norm"] == pytest.approx(reference[step][name], rel=1e-5)
            params = trainer.train_step.model.component_parameters()[name]
            assert comp["num_params"] == sum(p.numel() for _, p in params)
            assert comp["update_ratio"] > 0 and comp["status"] == "healthy"
        assert record["total_norm"] == pytest.approx(reference[step]["__total__"], rel=1e-5)
        assert record["ranks"] is None and record["world_size"] == 1
    history = json.loads((folder / "history.json").read_text())
    jsonschema.validate(history, GRADIENT_HISTORY)
    assert history["steps"] == [2, 4]


def _load(folder, name):
    return json.loads(next(folder.glob(f"{name}_step_*.json")).read_text())


@pytest.mark.slow
def test_two_ranks_match_one_rank_on_the_same_global_batch(tmp_path):
    dist_workers.observed_step(0, 1, 0, str(tmp_path))
    dist_workers.spawn(dist_workers.observed_step, 2, str(tmp_path))
    one, two = tmp_path / "w1", tmp_path / "w2"
    g1, g2 = _load(one / "gradients", "gradients"), _load(two / "gradients", "gradients")
    assert g2["total_norm"] == pytest.approx(g1["total_norm"], rel=1e-4)
    for name, comp in g1["components"].items():
        for key in ("norm", "mean", "max", "min", "update_ratio"):
            expected = pytest.approx(comp[key], rel=1e-4, abs=1e-9)
            assert g2["components"][name][key] == expected, (name, key)
    assert g1["ranks"] is None and set(g2["ranks"]["components"]) == set(g1["components"])
    a1, a2 = _load(one / "attention", "attention"), _load(two / "attention", "attention")
    assert a2["num_samples"] == a1["num_samples"] == 8
    assert torch.allclose(torch.tensor(a2["fusion"]["token_mean_weight"]),
                          torch.tensor(a1["fusion"]["token_mean_weight"]), atol=1e-6)
    assert a2["fusion"]["head_entropy"] == pytest.approx(a1["fusion"]["head_entropy"], rel=1e-5)
    for target, row in a1["c2t"]["weights"].items():
        assert a2["c2t"]["weights"][target] == pytest.approx(row, rel=1e-5)
    assert a2["graph"]["gate_weights"] == pytest.approx(a1["graph"]["gate_weights"], rel=1e-5)


@pytest.mark.slow
def test_agreement_and_noise_scale_recover_known_noise(tmp_path):
    dim, sigma2, local_batch = 200_000, 1e-4, 4          # true B_noise = sigma2 * dim / |G|^2 = 20
    dist_workers.spawn(dist_workers.known_noise, 2, str(tmp_path), dim, sigma2, local_batch)
    result = json.loads((tmp_path / "noise.json").read_text())
    assert result["noise_scale"] == pytest.approx(20.0, rel=0.1)
    expected_cosine = 1.0 / (1.0 + sigma2 * dim / local_batch)     # |G|^2 / (|G|^2 + noise)
    assert result["agreement"] == pytest.approx(expected_cosine, abs=0.02)


def test_noise_scale_terms_are_unbiased_in_expectation():
    # |g_b|^2 = |G|^2 + tr/b and |g_B|^2 = |G|^2 + tr/B exactly -> both recovered exactly.
    g2, trace, b, big = 2.0, 30.0, 4, 16
    true_sq, est_trace = noise_scale_terms(g2 + trace / b, g2 + trace / big, b, big)
    assert true_sq == pytest.approx(g2) and est_trace == pytest.approx(trace)


def test_status_thresholds():
    assert status_of(1e-6, 1e-5, 100) == "vanishing"
    assert status_of(0.5, 1e-5, 100) == "healthy"
    assert status_of(500.0, 1e-5, 100) == "exploding"
    assert status_of(float("nan"), 1e-5, 100) == "nonfinite"


def test_warning_when_a_component_turns_exploding(caplog):
    from trainer.run_log import RunLog
    observer = GradientObserver.__new__(GradientObserver)
    observer.previous_status = {}
    observer.run = type("R", (), {"run_log": RunLog(None, 1, 0, False, False)})()
    record = {"step": 7, "total_norm": 300.0, "clipped": True, "ranks": None,
              "components": {"decoder": {"norm": 300.0, "update_ratio": 0.1,
                                         "status": "exploding"}}}
    with caplog.at_level(logging.WARNING):
        observer.report(record)
        observer.report({**record, "step": 8})
    assert caplog.text.count("component decoder turned exploding at step 7") == 1
