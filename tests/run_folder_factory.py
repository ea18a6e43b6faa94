"""Synthetic run folders for the analysis tests: healthy by default, with knobs to plant each
problem. Every file follows diagnostics/schemas.py (checked as it is written)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import numpy as np
import yaml

from diagnostics import schemas

COMPONENTS = ("wave_patching_composer", "target_patching_composer", "celestial_node_encoder",
              "stochastic_learner", "graph_combiner", "fusion_cross_attention",
              "hierarchical_fusion_proj", "celestial_to_target_attention", "decoder")
TARGETS = ("Asset_A", "Asset_B", "Asset_C", "Asset_D")
BODIES = ("Sun", "Moon", "Mercury", "Venus", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune",
          "Pluto", "North_Node", "South_Node", "Ascendant")
DRIVERS = {"Asset_A": "Moon", "Asset_B": "Mars", "Asset_C": "Venus", "Asset_D": "Mercury"}
NUM_TOKENS, NUM_HEADS = 170, 4


@dataclass
class RunSpec:
    """What the synthetic run looks like; every default is healthy."""

    num_steps: int = 200
    log_interval: int = 10
    gradient_interval: int = 20
    attention_interval: int = 50
    val_interval: int = 50
    profile_interval: int = 100
    world_size: int = 2
    batch_size: int = 64                 # per rank
    lr: float = 1e-3
    grad_clip_norm: float = 1.0
    num_workers: int = 0
    precision: str = "auto"
    device: str = "cpu"
    gradients: bool = True               # diagnostics switched on
    attention: bool = True
    profiles: bool = True
    # planted problems
    dead_component: str | None = None            # zero gradient, weights still
    vanishing_component: str | None = None       # tiny gradient, weights still move
    lr_too_small: bool = False                   # tiny gradients and updates everywhere
    exploding_component: str | None = None
    clip_fraction: float = 0.0
    loss_spike_steps: tuple[int, ...] = ()       # train-line steps whose loss jumps
    skipped_steps: tuple[int, ...] = ()          # optimizer steps skipped as non-finite
    fusion_entropy: str = "learning"             # learning | flat | collapsed
    c2t_uniform: bool = False
    spearman: float = 0.8
    effective_components: float = 2.5
    sigma_at_floor: float = 0.0
    coverage_90: float = 0.9
    skill: float = -0.2                          # model NLL - best baseline NLL (test and val)
    skill_halfwidth: float = 0.03                # of its 95% interval
    overfit: bool = False                        # val NLL rises after validation overfit_best
    overfit_best: int = 1                        # 1-based validation with the lowest NLL
    early_stopped: bool = False                  # best weights restored before the test
    weights_step: bool = True                    # test (and restored) lines name their weights
    test_skill_shift: float = 0.0                # the test's skill minus the kept validation's
    last_val_coverage_90: float | None = None    # the last validation's (weights discarded)
    horizon_coverage_90: tuple[float, ...] = ()  # calibration_by_horizon's 90% coverage per step
    judged: bool = True                          # intervals carry _shown/_reason (newer runs)
    test_windows: int = 0                        # rows of test_windows.csv (0: no file)
    window_seed: int = 0                         # the run's own per-window noise
    first_window_day: int = 1                    # the first window's origin (day of 2020-01)
    blank_all_rise: float = 0.3                  # NLL rise with every body blanked
    blank_all_halfwidth: float = 0.05
    agreement: float = 0.5
    noise_scale: float = 150.0
    data_time_fraction: float = 0.02
    memory_fraction: float = 0.3
    extra_config: dict = field(default_factory=dict)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size


def _check(doc, schema: dict) -> None:
    jsonschema.Draft202012Validator(schema).validate(doc)


def _write(path: Path, doc, schema: dict) -> None:
    _check(doc, schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def _steps(spec: RunSpec, interval: int) -> list[int]:
    return list(range(interval, spec.num_steps + 1, interval))


def config_of(spec: RunSpec) -> dict:
    config = {
        "model": {"d_model": 64, "num_mixtures": 3, "dropout": 0.2, "sigma_min": 0.001},
        "data": {"targets": list(TARGETS), "bodies": list(BODIES), "batch_size": spec.batch_size,
                 "num_workers": spec.num_workers},
        "optim": {"lr": spec.lr, "warmup_steps": 50, "grad_clip_norm": spec.grad_clip_norm},
        "train": {"experiment_name": "synthetic", "precision": spec.precision,
                  "max_steps": spec.num_steps, "log_interval": spec.log_interval,
                  "grad_accum_steps": 1},
        "diagnostics": {"enable_gradient_diagnostics": spec.gradients,
                        "enable_attention_logging": spec.attention,
                        "enable_component_profiling": spec.profiles,
                        "gradient_log_interval": spec.gradient_interval,
                        "attention_log_interval": spec.attention_interval,
                        "vanishing_threshold": 1e-5, "exploding_threshold": 100.0},
        "checkpoint": {"interval": spec.profile_interval},
    }
    for dotted, value in spec.extra_config.items():
        section, key = dotted.split(".")
        config[section][key] = value
    return config


# --- metrics.jsonl ------------------------------------------------------------------------------

def train_line(spec: RunSpec, step: int, rng: np.random.Generator) -> dict:
    loss = -2.0 - 0.3 * (1 - math.exp(-step / 80)) + 0.004 * rng.standard_normal()
    if step in spec.loss_spike_steps:
        loss += 1.0
    interval = range(step - spec.log_interval + 1, step + 1)
    step_time = 0.07
    return {"kind": "train", "step": step, "time": 1.7e9 + step, "epoch": 0, "loss": loss,
            "lr": spec.lr, "grad_norm": 150.0 if spec.exploding_component else 0.5,
            "clip_fraction": spec.clip_fraction,
            "skipped_steps": sum(s in spec.skipped_steps for s in interval),
            "samples_per_s": spec.global_batch / step_time, "step_time_s": step_time,
            "data_time_s": spec.data_time_fraction * step_time, "memory_mb": 450.0}


def _per_target(value: float) -> list[float]:
    return [value + 0.01 * i for i in range(len(TARGETS))]


def _val_nll(spec: RunSpec, step: int) -> float:
    if spec.overfit:     # better up to validation overfit_best, then worse at every one
        after = step // spec.val_interval - spec.overfit_best
        return -2.3 + (0.03 * after if after >= 0 else -0.05 * after)
    return -2.2 - 0.1 * step / spec.num_steps


def best_step(spec: RunSpec) -> int:
    """The step of the validation with the lowest NLL."""
    return min(_steps(spec, spec.val_interval), key=lambda s: _val_nll(spec, s),
               default=spec.num_steps)


def kept_step(spec: RunSpec) -> int:
    """The step of the weights the run keeps for its test."""
    return best_step(spec) if spec.early_stopped else spec.num_steps


def _skill_values(spec: RunSpec, nll: float, skill: float) -> dict:
    ewma = nll - skill
    skill = {"skill": skill, "skill_low": skill - spec.skill_halfwidth,
             "skill_high": skill + spec.skill_halfwidth}
    return {"ewma_nll": ewma, "crps": 0.3, "rw_crps": 0.32, "ewma_crps": 0.31,
            **{f"skill_ewma{k[5:]}": v for k, v in skill.items()},
            **{f"skill_rw{k[5:]}": v + nll + 2.01 - skill["skill"] for k, v in skill.items()
               if k != "skill"}, "skill_rw": nll + 2.01, **skill}


def calibration_by_horizon(spec: RunSpec) -> dict:
    """Per-step coverage as the evaluation writes it, a 95% interval of +-0.007 around each."""
    coverage = list(spec.horizon_coverage_90)
    pit = [[100 + (30 if c < 0.9 and b in (0, 9) else 0) for b in range(10)] for c in coverage]
    return {"steps": list(range(1, len(coverage) + 1)), "coverage_50": [0.5] * len(coverage),
            "coverage_90": coverage, "coverage_90_low": [c - 0.007 for c in coverage],
            "coverage_90_high": [c + 0.007 for c in coverage], "pit_counts": pit}


def _judgement(name: str, low: float, high: float) -> dict:
    """`<name>_shown` and `<name>_reason` as stats.paired_difference words them (enough blocks)."""
    shown = not low <= 0 <= high
    return {f"{name}_shown": shown, f"{name}_reason": None if shown else "the interval includes 0",
            f"{name}_dm_pvalue": 0.001 if shown else 0.5}


def _coverage_90(spec: RunSpec, kind: str, step: int, weights_step: int | None) -> float:
    last = step == spec.num_steps // spec.val_interval * spec.val_interval
    if kind == "val" and last and weights_step is None and spec.last_val_coverage_90 is not None:
        return spec.last_val_coverage_90
    return spec.coverage_90


def eval_line(spec: RunSpec, kind: str, step: int, best: bool, weights_step: int | None = None
              ) -> dict:
    """A val or test line at `step` scoring the weights of `weights_step` (default: `step`)."""
    shift = spec.test_skill_shift if kind == "test" else 0.0
    nll, skill = _val_nll(spec, weights_step or step) + shift, spec.skill + shift
    values = {"nll": nll, "mae": 0.03,
              "coverage_50": 0.5, "coverage_90": _coverage_90(spec, kind, step, weights_step),
              "rw_nll": -2.01, "effective_components": spec.effective_components,
              "sigma_at_floor": spec.sigma_at_floor, **_skill_values(spec, nll, skill)}
    line = {"kind": kind, "step": step, "time": 1.7e9 + step + 0.5, "epoch": 0,
            "num_windows": 4044, **values,
            **{f"{k}_per_target": _per_target(v) for k, v in values.items()},
            "best_baseline": "ewma", "skill_block_length": 48}
    if spec.horizon_coverage_90:
        line["calibration_by_horizon"] = calibration_by_horizon(spec)
    if weights_step is not None and spec.weights_step:
        line["weights_step"] = weights_step
    if kind == "test" and spec.test_windows:
        line.update(pred_len=4, window_stride=1, windows_file="test_windows.csv")
    if kind == "val":
        line["best"] = best
    else:
        line.update({"blank_all_rise": spec.blank_all_rise,
                     "blank_all_rise_low": spec.blank_all_rise - spec.blank_all_halfwidth,
                     "blank_all_rise_high": spec.blank_all_rise + spec.blank_all_halfwidth})
    if spec.judged:
        for name in ("skill", "skill_rw", "skill_ewma", "blank_all_rise"):
            if f"{name}_low" in line:
                line.update(_judgement(name, line[f"{name}_low"], line[f"{name}_high"]))
    return line


def metrics_lines(spec: RunSpec) -> list[dict]:
    rng = np.random.default_rng(0)
    lines, best_nll = [], math.inf
    for step in range(1, spec.num_steps + 1):
        if step % spec.log_interval == 0:
            lines.append(train_line(spec, step, rng))
        if step % spec.val_interval == 0:
            lines.append(eval_line(spec, "val", step, best=_val_nll(spec, step) < best_nll))
            best_nll = min(best_nll, _val_nll(spec, step))
        if step % spec.profile_interval == 0:
            lines.append({"kind": "checkpoint", "step": step, "time": 1.7e9 + step + 0.7,
                          "blocked_s": 0.1})
    if spec.early_stopped:
        lines.append({**eval_line(spec, "val", spec.num_steps, False, kept_step(spec)),
                      "restored_best": True})
    lines.append(eval_line(spec, "test", spec.num_steps, best=False, weights_step=kept_step(spec)))
    return lines


def write_metrics(folder: Path, spec: RunSpec) -> None:
    rows = []
    for line in metrics_lines(spec):
        _check(line, schemas.METRICS_LINE)
        kind_schema = {"train": schemas.TRAIN_LINE, "val": schemas.EVAL_LINE,
                       "test": schemas.EVAL_LINE}.get(line["kind"])
        if kind_schema is not None:
            _check(line, kind_schema)
        rows.append(json.dumps(line))
    (folder / "metrics.jsonl").write_text("\n".join(rows) + "\n")


# --- gradients ------------------------------------------------------------------------------------

def _component_norm(spec: RunSpec, comp: str, index: int, step: int) -> tuple[float, float]:
    """(norm, update ratio) of a component at a step."""
    if comp == spec.dead_component:
        return 0.0, 0.0
    if spec.lr_too_small:
        return 3e-6 * (1 + index), 2e-7
    if comp == spec.vanishing_component:
        return 2e-6, 8e-4
    if comp == spec.exploding_component and step > spec.gradient_interval:
        return 150.0 + step, 5e-2
    return 0.02 * (1 + index) * (1 + 0.1 * math.sin(step)), 1e-3


def _rank_record(spec: RunSpec) -> dict | None:
    if spec.world_size == 1:
        return None
    comps = {c: {"agreement": spec.agreement, "local_norm_sq_mean": 2e-3,
                 "global_norm_sq": 1e-3, "noise_scale": spec.noise_scale,
                 "noise_scale_raw": spec.noise_scale * 1.1} for c in COMPONENTS}
    return {"source": "synthetic", "local_batch": spec.batch_size,
            "global_batch": spec.global_batch, "components": comps}


def gradient_record(spec: RunSpec, step: int, index: int, num_records: int) -> dict:
    components = {}
    for i, comp in enumerate(COMPONENTS):
        norm, ratio = _component_norm(spec, comp, i, step)
        status = "vanishing" if norm < 1e-5 else "exploding" if norm > 100 else "healthy"
        components[comp] = {"num_params": 1000 * (i + 1), "norm": norm, "mean": norm / 3,
                            "std": norm / 10, "max": norm / 2, "min": norm / 5,
                            "status": status, "update_ratio": ratio}
    total = math.sqrt(sum(c["norm"] ** 2 for c in components.values()))
    return {"step": step, "epoch": 0, "timestamp": 1.7e9 + step, "world_size": spec.world_size,
            "total_norm": total, "clip_norm": spec.grad_clip_norm,
            "clipped": index < spec.clip_fraction * num_records,
            "skipped": step in spec.skipped_steps, "lr": spec.lr, "reduced_over_ranks": True,
            "thresholds": {"vanishing": 1e-5, "exploding": 100.0},
            "components": components, "ranks": _rank_record(spec)}


def history_of(records: list[dict]) -> dict:
    """The compact series of all records, as the writer keeps it."""
    history = {"steps": [], "epochs": [], "total_norm": [], "clipped": [], "lr": [],
               "thresholds": {"vanishing": 1e-5, "exploding": 100.0}, "components": {},
               "agreement": {}, "noise_scale": {}}
    for record in records:
        for key, source in (("steps", "step"), ("epochs", "epoch"), ("total_norm", "total_norm"),
                            ("clipped", "clipped"), ("lr", "lr")):
            history[key].append(record[source])
        ranks = (record["ranks"] or {}).get("components", {})
        for comp, values in record["components"].items():
            series = history["components"].setdefault(comp, {"norm": [], "update_ratio": [],
                                                             "status": []})
            for key in series:
                series[key].append(values[key])
            for key in ("agreement", "noise_scale"):
                history[key].setdefault(comp, []).append(ranks.get(comp, {}).get(key))
    return history


def write_gradients(folder: Path, spec: RunSpec) -> None:
    steps = _steps(spec, spec.gradient_interval)
    records = [gradient_record(spec, s, i, len(steps)) for i, s in enumerate(steps)]
    for record in records:
        _write(folder / "gradients" / f"gradients_step_{record['step']:06d}.json", record,
               schemas.GRADIENT_RECORD)
    _write(folder / "gradients" / "history.json", history_of(records), schemas.GRADIENT_HISTORY)


# --- attention and attribution ----------------------------------------------------------------

def _normalized_entropy(weights: list[float]) -> float:
    return -sum(w * math.log(w) for w in weights if w > 0) / math.log(len(weights))


def _fusion_entropy(spec: RunSpec, progress: float) -> float:
    if spec.fusion_entropy == "flat":
        return 0.999
    if spec.fusion_entropy == "collapsed":
        return 0.99 - 0.9 * progress
    return 0.99 - 0.2 * progress


def c2t_weights(spec: RunSpec) -> dict[str, dict[str, float]]:
    weights = {}
    for target in TARGETS:
        if spec.c2t_uniform:
            row = {b: 1 / len(BODIES) for b in BODIES}
        else:
            row = {b: 0.7 / (len(BODIES) - 1) * (1 - 0.01 * i) for i, b in enumerate(BODIES)}
            row[DRIVERS[target]] = 0.3
        weights[target] = row
    return weights


def attention_record(spec: RunSpec, step: int) -> dict:
    entropy = _fusion_entropy(spec, step / spec.num_steps)
    weights = c2t_weights(spec)
    top = {t: [{"body": b, "weight": w} for b, w in sorted(row.items(), key=lambda kv: -kv[1])[:5]]
           for t, row in weights.items()}
    return {"step": step, "epoch": 0, "timestamp": 1.7e9 + step, "world_size": spec.world_size,
            "num_samples": spec.global_batch, "reduced_over_ranks": True,
            "fusion": {"num_tokens": NUM_TOKENS, "num_heads": NUM_HEADS,
                       "token_groups": {"wave": [0, 85], "target": [85, 170]},
                       "token_mean_weight": [1 / NUM_TOKENS] * NUM_TOKENS,
                       "entropy": entropy * math.log(NUM_TOKENS), "normalized_entropy": entropy,
                       "head_entropy": [entropy * math.log(NUM_TOKENS)] * NUM_HEADS,
                       "head_normalized_entropy": [entropy] * NUM_HEADS},
            "c2t": {"targets": list(TARGETS), "bodies": list(BODIES), "weights": weights,
                    "top_k": top,
                    "normalized_entropy": {t: _normalized_entropy(list(r.values()))
                                           for t, r in weights.items()}},
            "graph": {"gate_weights": {"dynamic": 0.3, "adaptive": 0.4, "stochastic": 0.3}}}


def attribution_record(spec: RunSpec, step: int) -> dict:
    weights = c2t_weights(spec)
    occlusion = {t: {b: 0.1 * w for b, w in row.items()} for t, row in weights.items()}

    def ranked(scores):
        return [b for b, _ in sorted(scores.items(), key=lambda kv: -kv[1])]
    return {"step": step, "epoch": 0, "timestamp": 1.7e9 + step, "num_windows": 2048,
            "baseline_nll": dict.fromkeys(TARGETS, -2.2), "occlusion": occlusion,
            "ranking": {t: ranked(occlusion[t]) for t in TARGETS}, "c2t_weights": weights,
            "c2t_ranking": {t: ranked(weights[t]) for t in TARGETS},
            "spearman": dict.fromkeys(TARGETS, spec.spearman),
            "blank_all": {"rise": spec.blank_all_rise,
                          "low": spec.blank_all_rise - spec.blank_all_halfwidth,
                          "high": spec.blank_all_rise + spec.blank_all_halfwidth,
                          "per_target": dict.fromkeys(TARGETS, spec.blank_all_rise)}}


def write_attention(folder: Path, spec: RunSpec) -> None:
    for step in _steps(spec, spec.attention_interval):
        _write(folder / "attention" / f"attention_step_{step:06d}.json",
               attention_record(spec, step), schemas.ATTENTION_RECORD)
    for step in _steps(spec, spec.val_interval):
        _write(folder / "attention" / f"attribution_step_{step:06d}.json",
               attribution_record(spec, step), schemas.ATTRIBUTION_RECORD)


# --- component profiles -------------------------------------------------------------------------

def _memory(spec: RunSpec, rank: int) -> dict:
    if spec.device == "cuda":
        total = 81559.0
        return {"rank": rank, "rss_mb": 3000.0, "system_total_mb": 257000.0,
                "cuda_allocated_peak_mb": spec.memory_fraction * total * 0.9,
                "cuda_reserved_peak_mb": spec.memory_fraction * total * 0.95,
                "nvml_used_mb": spec.memory_fraction * total, "nvml_total_mb": total}
    total = 16000.0
    return {"rank": rank, "rss_mb": spec.memory_fraction * total / spec.world_size,
            "system_total_mb": total}


def profile_record(spec: RunSpec, step: int) -> dict:
    step_ms = 70.0
    return {"step": step, "timestamp": 1.7e9 + step, "world_size": spec.world_size,
            "device": "cuda:0" if spec.device == "cuda" else "cpu",
            "device_name": "NVIDIA H100 80GB HBM3" if spec.device == "cuda" else "x86_64",
            "parameters": {"total": 45000, "trainable": 45000,
                           "components": {c: {"total": 1000 * (i + 1), "trainable": 1000 * (i + 1)}
                                          for i, c in enumerate(COMPONENTS)}},
            "config": config_of(spec),
            "memory": {"per_rank": [_memory(spec, r) for r in range(spec.world_size)]},
            "timing": {"method": "cuda_events" if spec.device == "cuda" else "host_timer",
                       "components": {c: {"forward_ms": 2.0, "backward_ms": 4.0}
                                      for c in COMPONENTS},
                       "step_time_ms": step_ms, "data_time_ms": spec.data_time_fraction * step_ms,
                       "samples_per_s": spec.global_batch / step_ms * 1e3},
            "flops_per_sample": 2.0e8, "achieved_tflops": None, "peak_tflops": None, "mfu": None}


def write_profiles(folder: Path, spec: RunSpec) -> None:
    for step in _steps(spec, spec.profile_interval):
        _write(folder / "components" / f"profile_step_{step:06d}.json",
               profile_record(spec, step), schemas.PROFILE_RECORD)


WINDOW_COLUMNS = ("window", "origin", "target", "model_nll", "random_walk_nll", "ewma_nll",
                  "model_crps", "random_walk_crps", "ewma_crps")


def write_test_windows(folder: Path, spec: RunSpec) -> None:
    """test_windows.csv: the test NLL per window, noise shared by every run (the windows' own
    difficulty, autocorrelated) plus the run's own noise (window_seed)."""
    shared = np.convolve(np.random.default_rng(0).standard_normal(spec.test_windows + 3),
                         np.ones(4) / 2, mode="valid")[: spec.test_windows]
    own = 0.05 * np.random.default_rng(100 + spec.window_seed).standard_normal(spec.test_windows)
    test = eval_line(spec, "test", spec.num_steps, False, kept_step(spec))
    nll = test["nll"] + 0.3 * shared + own
    start = np.datetime64("2020-01-01") + np.timedelta64(spec.first_window_day - 1, "D")
    rows = [",".join(WINDOW_COLUMNS)]
    for i, value in enumerate(nll.tolist()):
        origin = str(start + np.timedelta64(i, "D"))
        for target in (*TARGETS, "all"):
            rows.append(f"{i},{origin},{target},{value!r},{value + 0.2!r},{value + 0.1!r},"
                        "0.3,0.32,0.31")
    (folder / "test_windows.csv").write_text("\n".join(rows) + "\n")


def build_run_folder(folder: Path, spec: RunSpec | None = None, **knobs) -> Path:
    """Write a run folder; `knobs` are RunSpec fields (e.g. dead_component="decoder")."""
    spec = spec or RunSpec(**knobs)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config_of(spec), sort_keys=False))
    write_metrics(folder, spec)
    if spec.test_windows:
        write_test_windows(folder, spec)
    if spec.gradients:
        write_gradients(folder, spec)
    if spec.attention:
        write_attention(folder, spec)
    if spec.profiles:
        write_profiles(folder, spec)
    return folder
