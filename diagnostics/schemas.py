"""JSON Schemas of the files a run writes (OUTPUTS.md), shared by the writers' tests and the
offline analysis, which validates what it reads. Floats that were non-finite are written null.
"""
from __future__ import annotations

_NUM = {"type": ["number", "null"]}
_INT = {"type": "integer"}
_STR = {"type": "string"}
_NUM_LIST = {"type": "array", "items": _NUM}
_STATUS = {"enum": ["healthy", "vanishing", "exploding", "nonfinite"]}


def _obj(required: dict, optional: dict | None = None, extra=True) -> dict:
    return {"type": "object", "required": list(required),
            "properties": {**required, **(optional or {})}, "additionalProperties": extra}


def _map_of(schema: dict) -> dict:
    return {"type": "object", "additionalProperties": schema}


_RECORD_HEAD = {"step": _INT, "epoch": _INT, "timestamp": {"type": "number"}, "world_size": _INT}

GRADIENT_COMPONENT = _obj({"num_params": _INT, "norm": _NUM, "mean": _NUM, "std": _NUM,
                           "max": _NUM, "min": _NUM, "status": _STATUS, "update_ratio": _NUM})
RANK_COMPONENT = _obj({"agreement": _NUM, "local_norm_sq_mean": _NUM, "global_norm_sq": _NUM,
                       "noise_scale": _NUM, "noise_scale_raw": _NUM})
GRADIENT_RECORD = _obj({
    **_RECORD_HEAD, "total_norm": _NUM, "clip_norm": _NUM, "clipped": {"type": "boolean"},
    "skipped": {"type": "boolean"}, "lr": _NUM, "reduced_over_ranks": {"type": "boolean"},
    "thresholds": _obj({"vanishing": _NUM, "exploding": _NUM}),
    "components": _map_of(GRADIENT_COMPONENT),
    "ranks": {"oneOf": [{"type": "null"}, _obj({
        "source": _STR, "local_batch": _INT, "global_batch": _INT,
        "components": _map_of(RANK_COMPONENT)})]},
})
GRADIENT_HISTORY = _obj({
    "steps": {"type": "array", "items": _INT}, "epochs": {"type": "array", "items": _INT},
    "total_norm": _NUM_LIST, "clipped": {"type": "array", "items": {"type": "boolean"}},
    "lr": _NUM_LIST, "thresholds": _obj({"vanishing": _NUM, "exploding": _NUM}),
    "components": _map_of(_obj({"norm": _NUM_LIST, "update_ratio": _NUM_LIST,
                                "status": {"type": "array", "items": _STATUS}})),
    "agreement": _map_of(_NUM_LIST), "noise_scale": _map_of(_NUM_LIST),
}, {"skipped": {"type": "array", "items": {"type": "boolean"}}})
ATTENTION_RECORD = _obj({
    **_RECORD_HEAD, "num_samples": _INT, "reduced_over_ranks": {"type": "boolean"},
    "fusion": _obj({"num_tokens": _INT, "num_heads": _INT,
                    "token_groups": _map_of({"type": "array", "items": _INT}),
                    "token_mean_weight": _NUM_LIST, "entropy": _NUM,
                    "normalized_entropy": _NUM, "head_entropy": _NUM_LIST,
                    "head_normalized_entropy": _NUM_LIST}),
    "c2t": _obj({"targets": {"type": "array", "items": _STR},
                 "bodies": {"type": "array", "items": _STR},
                 "weights": _map_of(_map_of(_NUM)),
                 "top_k": _map_of({"type": "array", "items": _obj({"body": _STR, "weight": _NUM})}),
                 "normalized_entropy": _map_of(_NUM)}),
    "graph": _obj({"gate_weights": _map_of(_NUM)}),
})
ATTRIBUTION_RECORD = _obj({
    "step": _INT, "epoch": _INT, "timestamp": {"type": "number"}, "num_windows": _INT,
    "baseline_nll": _map_of(_NUM), "occlusion": _map_of(_map_of(_NUM)),
    "ranking": _map_of({"type": "array", "items": _STR}),
    "c2t_weights": _map_of(_map_of(_NUM)),
    "c2t_ranking": _map_of({"type": "array", "items": _STR}),
    "spearman": _map_of(_NUM),
}, {"blank_all": _obj({"rise": _NUM, "low": _NUM, "high": _NUM, "per_target": _map_of(_NUM)})})
PROFILE_RECORD = _obj({
    "step": _INT, "timestamp": {"type": "number"}, "world_size": _INT, "device": _STR,
    "device_name": _STR,
    "parameters": _obj({"total": _INT, "trainable": _INT,
                        "components": _map_of(_obj({"total": _INT, "trainable": _INT}))}),
    "config": {"type": "object"},
    "memory": _obj({"per_rank": {"type": "array", "items": _obj(
        {"rank": _INT, "rss_mb": _NUM},
        {"host": _STR, "system_total_mb": _NUM, "cuda_allocated_peak_mb": _NUM,
         "cuda_reserved_peak_mb": _NUM, "nvml_used_mb": _NUM, "nvml_total_mb": _NUM})}}),
    "timing": _obj({"method": {"enum": ["host_timer", "cuda_events"]},
                    "components": _map_of(_obj({"forward_ms": _NUM, "backward_ms": _NUM})),
                    "step_time_ms": _NUM, "data_time_ms": _NUM, "samples_per_s": _NUM},
                   {"components_timed": {"type": "boolean"}}),
    "flops_per_sample": _NUM, "achieved_tflops": _NUM, "peak_tflops": _NUM, "mfu": _NUM,
})
METRICS_LINE = {"type": "object", "required": ["kind", "step", "time"], "properties": {
    "kind": {"enum": ["train", "val", "test", "checkpoint", "skip", "pruned"]}, "step": _INT,
    "time": {"type": "number"}}}
TRAIN_LINE = _obj({"loss": _NUM, "lr": _NUM, "grad_norm": _NUM, "clip_fraction": _NUM,
                   "skipped_steps": _INT, "samples_per_s": _NUM, "step_time_s": _NUM,
                   "data_time_s": _NUM, "memory_mb": _NUM, "epoch": _INT},
                  {"world_size": _INT, "device": {"type": "string"}})
CALIBRATION_BY_HORIZON = _obj({
    "steps": {"type": "array", "items": _INT}, "coverage_50": _NUM_LIST,
    "coverage_90": _NUM_LIST, "coverage_90_low": _NUM_LIST, "coverage_90_high": _NUM_LIST,
    "pit_counts": {"type": "array", "items": {"type": "array", "items": _INT}}})
# Runs before the baselines were scored lack the optional keys; the analysis says so.
EVAL_LINE = _obj({"nll": _NUM, "mae": _NUM, "coverage_50": _NUM, "coverage_90": _NUM,
                  "rw_nll": _NUM, "effective_components": _NUM, "sigma_at_floor": _NUM,
                  "num_windows": _INT},
                 {"crps": _NUM, "ewma_nll": _NUM, "rw_crps": _NUM, "ewma_crps": _NUM,
                  "skill": _NUM, "skill_low": _NUM, "skill_high": _NUM,
                  "best_baseline": {"enum": ["rw", "ewma"]}, "skill_block_length": _INT,
                  "blank_all_rise": _NUM, "blank_all_rise_low": _NUM, "blank_all_rise_high": _NUM,
                  **{f"{p}{k}": _NUM for p in ("", "rw_", "ewma_")
                     for k in ("crps_units", "rmse", "mase")},
                  "calibration_by_horizon": CALIBRATION_BY_HORIZON, "pred_len": _INT,
                  "window_stride": _INT, "windows_file": _STR,
                  **{f"{name}_{key}": schema
                     for name in ("skill", "skill_rw", "skill_ewma", "blank_all_rise")
                     for key, schema in (("shown", {"type": "boolean"}),
                                         ("reason", {"type": ["string", "null"]}),
                                         ("dm_pvalue", _NUM))},
                  # the step whose weights were scored (test line, restored best weights);
                  # readers fall back to `step`
                  "weights_step": _INT, "restored_best": {"type": "boolean"}})

SCHEMAS = {"gradients_step": GRADIENT_RECORD, "history": GRADIENT_HISTORY,
           "attention_step": ATTENTION_RECORD, "attribution_step": ATTRIBUTION_RECORD,
           "profile_step": PROFILE_RECORD}


def schema_for(filename: str) -> dict | None:
    """The schema of a run file by its name (`gradients_step_000050.json` -> GRADIENT_RECORD)."""
    stem = filename.rsplit(".", 1)[0]
    for prefix, schema in SCHEMAS.items():
        if stem == prefix or stem.startswith(prefix + "_"):
            return schema
    return None
