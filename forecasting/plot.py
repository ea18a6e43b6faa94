"""The forecast fan chart: per target, the recent history and each origin's 5-95% and 25-75%
bands, median and mean, with the EWMA random walk's 5-95% band for comparison (matplotlib, Agg
backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")   # before pyplot is imported: no display needed
import matplotlib.pyplot as plt

from forecasting.inputs import ForecastInput
from forecasting.result import Forecast


def history_span(forecast: Forecast, inputs: ForecastInput, pred_len: int) -> slice:
    """Observed rows to draw: a few horizons before the first origin, to the last outcome."""
    start = max(0, forecast.origin_rows[0] - 3 * pred_len)
    return slice(start, inputs.num_observed)


def plot_fan_chart(forecast: Forecast, inputs: ForecastInput, path: Path) -> None:
    num_targets, pred_len = len(forecast.targets), forecast.mean_NPT.shape[1]
    fig, axes = plt.subplots(num_targets, 1, figsize=(9, 2.6 * num_targets), squeeze=False,
                             sharex=True)
    span = history_span(forecast, inputs, pred_len)
    for t, (ax,) in enumerate(axes):
        ax.plot(inputs.dates[span], inputs.raw_targets_OT[span, t], color="black", lw=1,
                label="observed")
        for n in range(len(forecast.origin_dates)):
            start = inputs.raw_targets_OT[forecast.origin_rows[n], t]
            _draw_fan(ax, forecast, n, t, start, label=n == len(forecast.origin_dates) - 1)
        ax.set_title(forecast.targets[t], fontsize=10, loc="left")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8, loc="upper left", ncol=5)
    fig.suptitle(f"forecast from {forecast.origin_dates[-1]}, {pred_len} steps "
                 f"({len(forecast.origin_dates)} origin(s))", fontsize=11)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _draw_fan(ax, forecast: Forecast, n: int, t: int, start: float, label: bool) -> None:
    """One origin's fan, starting at the origin's observed value so the fan joins the history."""
    dates = np.concatenate([forecast.origin_dates[n:n + 1], forecast.target_dates_NP[n]])
    q = forecast.quantiles_NPTQ[n, :, t]
    q = np.concatenate([np.full((1, q.shape[1]), start), q])
    mean = np.concatenate([[start], forecast.mean_NPT[n, :, t]])
    ax.fill_between(dates, q[:, 0], q[:, 4], color="tab:blue", alpha=0.18, lw=0,
                    label="5-95%" if label else None)
    ax.fill_between(dates, q[:, 1], q[:, 3], color="tab:blue", alpha=0.35, lw=0,
                    label="25-75%" if label else None)
    ewma = np.concatenate([np.full((1, q.shape[1]), start),
                           forecast.baseline_quantiles["ewma"][n, :, t]])
    ax.plot(dates, ewma[:, 0], color="tab:gray", lw=0.9, ls=":",
            label="EWMA random walk 5-95%" if label else None)
    ax.plot(dates, ewma[:, 4], color="tab:gray", lw=0.9, ls=":")
    ax.plot(dates, q[:, 2], color="tab:blue", lw=1.2, label="median" if label else None)
    ax.plot(dates, mean, color="tab:orange", lw=1, ls="--",
            label="mean" if label else None)
