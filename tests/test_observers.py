"""Diagnostics as observers of real runs: off means no extra work; on, across 2 ranks, every
file of OUTPUTS.md appears, validates, and TensorBoard's own reader reads the events back."""
from __future__ import annotations

import json
import math
from pathlib import Path

import jsonschema
import pytest

from diagnostics.schemas import METRICS_LINE, schema_for
from tests.conftest import as_cli_args, run_cli, small_config, small_overrides
from trainer import distributed
from trainer.build import build_trainer


def test_with_every_flag_off_the_step_asks_for_nothing(short_csv, tmp_path):
    config = small_config(short_csv, tmp_path, "off", train__max_steps=3,
                          train__validate_at_start=False)
    trainer = build_trainer(config, distributed.init_distributed("cpu"))
    assert trainer.observers.observers == []
    requested = []

    def spy(module, args, kwargs):
        requested.append(kwargs.get("return_attention", False))
    trainer.train_step.model.register_forward_pre_hook(spy, with_kwargs=True)
    assert trainer.train() == 0
    assert requested and not any(requested)
    assert not (tmp_path / "logs" / "off" / "gradients").exists()


def read_tensorboard(folder: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return set(events.Tags()["scalars"])


def validate_run_folder(log_dir: Path) -> None:
    for path in log_dir.rglob("*.json"):
        if path.parent.name != "analysis":
            jsonschema.validate(json.loads(path.read_text()), schema_for(path.name))
    for line in (log_dir / "metrics.jsonl").read_text().splitlines():
        jsonschema.validate(json.loads(line), METRICS_LINE)


@pytest.mark.slow
def test_two_rank_run_writes_every_diagnostic(short_csv, tmp_path):
    overrides = small_overrides(short_csv, tmp_path, "diag2") + [
        ("train.max_steps", 12), ("train.log_interval", 3), ("checkpoint.interval", 6),
        ("diagnostics.gradient_log_interval", 4), ("diagnostics.attention_log_interval", 6),
        ("diagnostics.attribution_max_samples", 128)]
    result = run_cli(as_cli_args(overrides) + ["--enable_gradient_diagnostics",
                                               "--enable_attention_logging",
                                               "--enable_component_profiling"], torchrun=2)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    log_dir = tmp_path / "logs" / "diag2"
    validate_run_folder(log_dir)
    names = {p.name for p in log_dir.rglob("*.json")}
    assert {"gradients_step_000004.json", "gradients_step_000012.json", "history.json",
            "attention_step_000006.json", "attribution_step_000000.json",
            "attribution_step_000012.json", "profile_step_000006.json"} <= names
    grad = json.loads((log_dir / "gradients" / "gradients_step_000012.json").read_text())
    assert grad["world_size"] == 2 and grad["ranks"]["global_batch"] == 32
    for comp in grad["ranks"]["components"].values():
        assert -1.0 <= comp["agreement"] <= 1.0 and math.isfinite(comp["local_norm_sq_mean"])
    profile = json.loads((log_dir / "components" / "profile_step_000012.json").read_text())
    assert [m["rank"] for m in profile["memory"]["per_rank"]] == [0, 1]
    assert all(m["rss_mb"] > 50 for m in profile["memory"]["per_rank"])
    assert profile["flops_per_sample"] > 0 and profile["mfu"] is None      # CPU: no peak known
    tags = read_tensorboard(log_dir / "tensorboard")
    for tag in ("train/loss", "train/lr", "train/grad_norm", "gradients/total_norm",
                "gradients/norm/decoder", "gradients/agreement/decoder", "attention/fusion_entropy",
                "profile/rank1_rss_mb", "train/samples_per_s", "val/nll", "hparam/best_val_nll"):
        assert tag in tags, tag


@pytest.mark.slow
def test_the_card_command_works_as_written(tmp_path):
    """The reference card's full command, with our paths; a short run on a recent date range."""
    card = ["--config", "configs/celestial_enhanced_pgat_production.yaml",
            "--experiment_name", "prod_fusion_c2t_test", "--enable_gradient_diagnostics",
            "--enable_attention_logging", "--enable_component_profiling", "--log_interval", "10",
            "--gradient_log_interval", "50", "--attention_log_interval", "100",
            "--checkpoint_interval", "500"]
    short = ["--max_steps", "100", "--set", f"train.log_root={tmp_path}/logs",
             f"checkpoint.root={tmp_path}/checkpoints", "data.builtin.start_date=2012-01-01",
             "data.num_workers=0", "train.validate_at_start=false",
             "diagnostics.profile_interval=50",
             "diagnostics.attribution_max_samples=64", "data.eval_batch_size=64"]
    result = run_cli(card + short, torchrun=2, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    log_dir = tmp_path / "logs" / "prod_fusion_c2t_test"
    validate_run_folder(log_dir)
    for name in ("gradients/gradients_step_000050.json", "gradients/gradients_step_000100.json",
                 "attention/attention_step_000100.json", "components/profile_step_000100.json"):
        assert (log_dir / name).stat().st_size < 100_000, name     # each record well under 100 KB
    assert (tmp_path / "checkpoints" / "prod_fusion_c2t_test" / "final_model.pth").is_file()
