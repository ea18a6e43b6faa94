"""A forecast from one or more origins: what `forecast` computes and the fan chart draws."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Forecast:
    """Forecasts from N origins, in target units. Legend: N origins, P horizon, T targets,
    Q quantiles (forecasting.forecast.QUANTILES)."""

    targets: list[str]
    origin_rows: list[int]            # (N,) row index of each origin in ForecastInput
    origin_dates: np.ndarray          # (N,)
    target_dates_NP: np.ndarray
    mean_NPT: np.ndarray
    quantiles_NPTQ: np.ndarray
    actual_NPT: np.ndarray            # NaN where the outcome is not in the CSV
    baseline_quantiles: dict[str, np.ndarray]   # scoring.scores.BASELINES name -> (N, P, T, Q)
