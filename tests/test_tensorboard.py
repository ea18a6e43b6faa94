"""What TensorBoard shows (read back from the event files): the last validation as it was, the
restored best weights and the test at the step of the weights they score; the custom-scalars
layout (model with its baselines, skill with its interval) and the resolved config as text."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from tests.conftest import small_config
from trainer import distributed
from trainer.build import build_parts
from trainer.checkpoint.model_file import load_consolidated
from trainer.loop import Trainer

VAL_NLL = [1.0, 0.5, 0.7, 0.8]     # at steps 0, 2, 4, 6: best at step 2, stop at step 6
KEPT_NLL, TEST_NLL = 0.5, 0.6


def window_series(nll: float, num_windows: int) -> dict[str, np.ndarray]:
    """Per-window scores in the layout of trainer/evaluate.py's `series`."""
    wiggle = 0.01 * np.sin(np.arange(num_windows))
    return {**{name: np.full(num_windows, v) + wiggle
               for name, v in (("model", nll), ("rw", 1.0), ("ewma", 1.0))},
            **{f"{name}_{score}_T": np.ones((num_windows, 4))
               for name in ("model", "rw", "ewma") for score in ("nll", "crps")}}


def scripted(real_evaluate):
    """Validation NLLs from VAL_NLL in turn (then the best's, for the restored weights)."""
    calls = {"val": 0}

    def evaluate(split="val", **kwargs):
        if split == "val" and "blank_columns" not in kwargs:
            calls["val"] += 1
        nll = TEST_NLL if split == "test" else (VAL_NLL + [KEPT_NLL])[min(calls["val"], 5) - 1]
        return {"nll": nll, "rw_nll": 1.0, "ewma_nll": 1.0, "mae": 0.1, "coverage_50": 0.5,
                "coverage_90": 0.9, "nll_per_target": [nll] * 4,
                "series": window_series(nll, len(real_evaluate.data.test_loader.dataset))}
    return evaluate


def scalars(log_dir, tag) -> list[tuple[int, float]]:
    events = EventAccumulator(str(log_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return []
    return [(e.step, pytest.approx(e.value)) for e in events.Scalars(tag)]


@pytest.fixture(scope="module")
def early_stopped(short_csv, tmp_path_factory):
    """A run stopped early at step 6 whose best validation was at step 2."""
    root = tmp_path_factory.mktemp("tb")
    config = small_config(short_csv, root, "es", train__max_steps=40, train__eval_interval=2,
                          train__early_stopping_patience=2, train__log_interval=2,
                          checkpoint__interval=100)
    parts = build_parts(config, distributed.init_distributed("cpu"))
    trainer = Trainer(dataclasses.replace(parts, evaluate=scripted(parts.evaluate)))
    torch.manual_seed(0)
    assert trainer.train() == 0 and trainer.train_state.step == 6
    return root


def test_val_nll_keeps_the_last_validation_and_the_kept_weights_have_their_own_tag(early_stopped):
    log_dir = early_stopped / "logs" / "es"
    assert scalars(log_dir, "val/nll") == list(zip([0, 2, 4, 6], VAL_NLL))
    assert scalars(log_dir, "val_kept/nll") == [(2, KEPT_NLL)]
    assert scalars(log_dir, "test/nll") == [(2, TEST_NLL)]


def test_lines_and_model_file_name_the_step_of_the_weights(early_stopped):
    lines = [json.loads(x) for x in (early_stopped / "logs" / "es" / "metrics.jsonl").open()]
    restored = [x for x in lines if x.get("restored_best")]
    test = [x for x in lines if x["kind"] == "test"]
    assert [(x["step"], x["weights_step"]) for x in restored + test] == [(6, 2), (6, 2)]
    assert load_consolidated(early_stopped / "checkpoints" / "es" / "final_model.pth")["step"] == 2


def test_the_log_says_what_is_scored_with_which_weights(early_stopped):
    text = (early_stopped / "logs" / "es" / "training_full.log").read_text()
    for phase in ("validation at step 4: ", "validation of the restored weights of step 2: ",
                  "test with the weights of step 2: "):
        assert phase in text and "batches" in text.split(phase)[1].splitlines()[0], phase


def tensor_values(log_dir, tag) -> list[bytes]:
    events = EventAccumulator(str(log_dir / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    return [e.tensor_proto.string_val[0] for e in events.Tensors(tag)]


def test_custom_scalars_draw_the_model_with_its_baselines_and_the_skill_interval(early_stopped):
    log_dir = early_stopped / "logs" / "es"
    (layout_bytes,) = tensor_values(log_dir, "custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(layout_bytes)
    charts = {chart.title: chart for category in layout.category for chart in category.chart}
    nll = next(c for title, c in charts.items() if title.startswith("validation NLL"))
    assert list(nll.multiline.tag) == ["^val/nll$", "^val_kept/nll$", "^val/rw_nll$",
                                       "^val/ewma_nll$"]
    skill = next(c for title, c in charts.items() if title.startswith("test skill"))
    (series,) = skill.margin.series
    assert (series.value, series.lower, series.upper) == ("test/skill", "test/skill_low",
                                                         "test/skill_high")
    for tag in ("val/rw_nll", "val/ewma_nll", "val/skill", "val/skill_low", "val/skill_high",
                "test/skill_low", "test/skill_high"):
        assert scalars(log_dir, tag), f"the layout draws {tag}, which the run does not log"


def test_the_resolved_config_is_logged_as_text(early_stopped):
    log_dir = early_stopped / "logs" / "es"
    (text,) = tensor_values(log_dir, "config/text_summary")
    written = yaml.safe_load((log_dir / "config.yaml").read_text())
    shown = yaml.safe_load("\n".join(line[4:] for line in text.decode().splitlines()))
    assert shown == written and shown["train"]["experiment_name"] == "es"
