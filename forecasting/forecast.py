"""`python launch/forecast.py --checkpoint checkpoints/<exp>/best_model.pth --data my.csv --out
forecasts/` (also the `celestial-forecast` console script).

A forecast is issued at an *origin*, a row with targets: the model sees the `seq_len` rows up to
and including it and forecasts the `pred_len` rows after it, with those rows' celestial columns
as the horizon's inputs. By default the origin is the CSV's last row with targets. `--origins N`
takes the N latest origins whose horizon rows the data has, `pred_len` rows apart (a backtest
whose horizons tile the recent past without overlap; with future rows, the latest is the live
forecast), and `--origins 2003-06-30,2003-09-30` names the origins by date.

Writes `forecast.csv` (`origin_date, target, horizon, target_date, mean, q05, q25, q50, q75,
q95, actual`, then the naive baselines' quantiles `rw_q05 .. rw_q95` (random walk, training
spread) and `ewma_q05 .. ewma_q95` (random walk, EWMA volatility): target units; `actual` is the
outcome where the CSV has it, else empty) and `forecast.png` (a fan chart per target with the
recent history and the EWMA baseline's 5-95% band). The quantiles are exact
quantiles of the forecast mixture (bisection on its CDF). Bad input is one line on stderr and
exit status 2, with nothing written.
"""
from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from forecasting.inputs import ForecastInput, prepare_forecast_input, typical_step
from forecasting.model_file import LoadedModel, input_data, load_model_file
from forecasting.result import Forecast
from model.decoder import mixture_mean, mixture_quantiles
from scoring.scores import BASELINES, baseline_forecasts
from series.dataset import ensure_dataset, given_data_file, parse_date
from trainer.distributed import pick_device
from trainer.errors import UserError

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
_QUANTILE_NAMES = ("q05", "q25", "q50", "q75", "q95")
COLUMNS = ("origin_date", "target", "horizon", "target_date", "mean", *_QUANTILE_NAMES,
           "actual", *(f"{b}_{q}" for b in BASELINES for q in _QUANTILE_NAMES))
_BATCH = 256


def choose_origins(inputs: ForecastInput, spec: str | None, loaded: LoadedModel) -> list[int]:
    """Row indices of the origins: `None` (the last row with targets), `N`, or `DATE,DATE,...`."""
    if not spec:
        inputs.check_horizon(inputs.num_observed - 1)
        return [inputs.num_observed - 1]
    if spec.strip().isdigit():
        last = inputs.last_origin
        count = int(spec)
        rows = [last - k * loaded.pred_len for k in range(count)][::-1]
        if count < 1:
            raise UserError(f"--origins {spec}: give at least 1 origin")
        if rows[0] < loaded.seq_len - 1:
            most = (last - (loaded.seq_len - 1)) // loaded.pred_len + 1
            raise UserError(f"--origins {spec}: {inputs.path} has history for at most {most} "
                            f"origin(s) {loaded.pred_len} rows apart (each needs model.seq_len = "
                            f"{loaded.seq_len} rows up to it)")
        return rows
    return [_origin_row(inputs, text.strip(), loaded) for text in spec.split(",")]


def _origin_row(inputs: ForecastInput, text: str, loaded: LoadedModel) -> int:
    try:
        date = parse_date(text)
    except ValueError as err:
        raise UserError(f"--origins: {err} (give a count or full dates)") from None
    found = np.flatnonzero(inputs.dates[:inputs.num_observed] == date)
    if not len(found):
        raise UserError(f"--origins: {text} is not a row with targets in {inputs.path}")
    if found[0] < loaded.seq_len - 1:
        raise UserError(f"--origins: {text} has {found[0] + 1} row(s) up to it in {inputs.path}; "
                        f"the model looks back model.seq_len = {loaded.seq_len}")
    inputs.check_horizon(int(found[0]))
    return int(found[0])


def _model_inputs(inputs: ForecastInput, rows: list[int], loaded: LoadedModel):
    """(wave, target, future_wave) tensors for the origins; horizon rows past the end of the
    data are zeros (only for a model that does not use future celestial inputs)."""
    S, P = loaded.seq_len, loaded.pred_len
    features = np.concatenate([inputs.features_RF, np.zeros((P, inputs.features_RF.shape[1]))])
    wave = np.stack([features[r - S + 1:r + 1] for r in rows])
    target = np.stack([inputs.targets_OT[r - S + 1:r + 1] for r in rows])
    future = np.stack([features[r + 1:r + 1 + P] for r in rows])
    return tuple(torch.tensor(x, dtype=torch.float32) for x in (wave, target, future))


@torch.no_grad()
def mixture_forecasts(loaded: LoadedModel, inputs: ForecastInput, rows: list[int]):
    """(N, P, T) mean and (N, P, T, Q) quantiles, in target units."""
    device = next(loaded.model.parameters()).device
    means, quantiles = [], []
    for start in range(0, len(rows), _BATCH):
        batch = [x.to(device) for x in _model_inputs(inputs, rows[start:start + _BATCH], loaded)]
        out = loaded.model(*batch)
        means.append(mixture_mean(out.log_pi.float(), out.mu.float()).double().cpu())
        quantiles.append(mixture_quantiles(out.log_pi, out.mu, out.sigma, QUANTILES).double().cpu())
    # An affine map with a positive scale keeps quantiles quantiles: un-scale them directly.
    mean_NPT = torch.cat(means).numpy() * loaded.target_std + loaded.target_mean
    q_NPTQ = (torch.cat(quantiles).numpy() * loaded.target_std[:, None]
              + loaded.target_mean[:, None])
    return mean_NPT, q_NPTQ


def baseline_quantiles(loaded: LoadedModel, inputs: ForecastInput, rows: list[int]
                       ) -> dict[str, np.ndarray]:
    """The naive baselines' (N, P, T, Q) quantiles, in target units (scoring/scores.py)."""
    S = loaded.seq_len
    target_NST = torch.tensor(np.stack([inputs.targets_OT[r - S + 1:r + 1] for r in rows]),
                              dtype=torch.float32)
    change_scale_PT = loaded.model.decoder.change_scale_PT.cpu().float()
    z_Q = torch.special.ndtri(torch.tensor(QUANTILES, dtype=torch.float64))
    found = {}
    for name, (_, mu, sigma) in baseline_forecasts(target_NST, change_scale_PT).items():
        q_NPTQ = (mu.double() + sigma.double() * z_Q).numpy()
        found[name] = q_NPTQ * loaded.target_std[:, None] + loaded.target_mean[:, None]
    return found


def horizon_dates(inputs: ForecastInput, row: int, pred_len: int) -> np.ndarray:
    """The dates of rows row+1 .. row+P; past the data's end, by its typical date step."""
    last = len(inputs.dates) - 1
    step = typical_step(inputs.dates)
    return np.array([inputs.dates[r] if r <= last else inputs.dates[last] + (r - last) * step
                     for r in range(row + 1, row + 1 + pred_len)], dtype="datetime64[D]")


def outcomes(inputs: ForecastInput, row: int, pred_len: int) -> np.ndarray:
    """(P, T) observed targets after the origin, NaN where the CSV has none."""
    actual = np.full((pred_len, inputs.raw_targets_OT.shape[1]), np.nan)
    known = inputs.raw_targets_OT[row + 1:row + 1 + pred_len]
    actual[:len(known)] = known
    return actual


def make_forecast(loaded: LoadedModel, inputs: ForecastInput, rows: list[int]) -> Forecast:
    mean_NPT, q_NPTQ = mixture_forecasts(loaded, inputs, rows)
    P = loaded.pred_len
    return Forecast(list(loaded.spec.targets), rows, inputs.dates[rows],
                    np.stack([horizon_dates(inputs, r, P) for r in rows]), mean_NPT, q_NPTQ,
                    np.stack([outcomes(inputs, r, P) for r in rows]),
                    baseline_quantiles(loaded, inputs, rows))


def write_forecast_csv(forecast: Forecast, path: Path) -> int:
    """One row per (origin, target, horizon step); returns the number of rows."""
    count = 0
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for n, origin in enumerate(forecast.origin_dates):
            for t, target in enumerate(forecast.targets):
                for p in range(forecast.mean_NPT.shape[1]):
                    actual = forecast.actual_NPT[n, p, t]
                    writer.writerow([str(origin), target, p + 1,
                                     str(forecast.target_dates_NP[n, p]),
                                     f"{forecast.mean_NPT[n, p, t]:.8g}",
                                     *(f"{q:.8g}" for q in forecast.quantiles_NPTQ[n, p, t]),
                                     "" if np.isnan(actual) else f"{actual:.8g}",
                                     *(f"{q:.8g}" for b in BASELINES
                                       for q in forecast.baseline_quantiles[b][n, p, t])])
                    count += 1
    return count


def backtest_summary(forecast: Forecast) -> str | None:
    """Coverage of the 50%/90% intervals and MAE of the median where outcomes are known."""
    known = ~np.isnan(forecast.actual_NPT)
    if not known.any():
        return None
    y, q = forecast.actual_NPT[known], forecast.quantiles_NPTQ[known]
    inside_50 = ((y >= q[:, 1]) & (y <= q[:, 3])).mean()
    inside_90 = ((y >= q[:, 0]) & (y <= q[:, 4])).mean()
    mae = np.abs(y - q[:, 2]).mean()
    origins = int(known.any((1, 2)).sum())
    return (f"backtest on {origins} origin(s) with outcomes ({int(known.sum())} values): "
            f"MAE of the median {mae:.4g}, inside the 50% band {inside_50:.0%}, "
            f"inside the 90% band {inside_90:.0%}")


def summary_lines(forecast: Forecast, inputs: ForecastInput) -> list[str]:
    n_last, P = -1, forecast.mean_NPT.shape[1]
    lines = [(f"forecast from {forecast.origin_dates[n_last]} (origin) over {P} steps to "
              f"{forecast.target_dates_NP[n_last, -1]}, {len(forecast.origin_dates)} origin(s)"),
             f"future celestial inputs: {inputs.future_note}",
             (f"{'target':<14}{'last value':>12}{f'median at step {P}':>20}"
             f"{'90% interval':>26}")]
    for t, name in enumerate(forecast.targets):
        last = inputs.raw_targets_OT[forecast.origin_rows[n_last], t]
        q = forecast.quantiles_NPTQ[n_last, -1, t]
        lines.append(f"{name:<14}{last:>12.5g}{q[2]:>20.5g}{f'[{q[0]:.5g}, {q[4]:.5g}]':>26}")
    backtest = backtest_summary(forecast)
    return lines + ([backtest] if backtest else [])


def data_path(loaded: LoadedModel, given: Path | None) -> tuple[Path, bool]:
    """The CSV to forecast from, and whether missing future rows may be computed (built-in)."""
    data = input_data(loaded, given)
    builtin = data.source == "builtin"
    if given is not None:
        return Path(data.path), builtin
    return (ensure_dataset(data) if builtin else given_data_file(Path(data.path))), builtin


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch/forecast.py",
                                     description="Forecast with a trained model file.")
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="a consolidated model file, e.g. checkpoints/<exp>/best_model.pth")
    parser.add_argument("--data", type=Path, help="CSV in the training layout (default: the "
                        "training data; the built-in dataset's future rows are computed)")
    parser.add_argument("--out", type=Path, default=Path("forecasts"), help="output folder")
    parser.add_argument("--origins", help="N (the N latest origins whose horizon the data has, "
                        "pred_len rows apart) or DATE,DATE,... (origins by date): a backtest; "
                        "default: the last row with targets")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    return parser.parse_args(argv)


def forecast_command(args: argparse.Namespace) -> list[str]:
    """Check every input, then write the outputs; returns the summary lines."""
    from forecasting.plot import plot_fan_chart  # matplotlib only when writing
    loaded = load_model_file(args.checkpoint, pick_device(args.device, 0))
    path, builtin = data_path(loaded, args.data)
    inputs = prepare_forecast_input(loaded, path, allow_builtin=builtin)
    forecast = make_forecast(loaded, inputs, choose_origins(inputs, args.origins, loaded))
    args.out.mkdir(parents=True, exist_ok=True)        # only now: nothing written on bad input
    num_rows = write_forecast_csv(forecast, args.out / "forecast.csv")
    plot_fan_chart(forecast, inputs, args.out / "forecast.png")
    return [*summary_lines(forecast, inputs),
            f"wrote {args.out / 'forecast.csv'} ({num_rows} rows) and {args.out / 'forecast.png'}"]


def run_command(command, args: argparse.Namespace) -> int:
    """Run `command(args)` and print its lines: exit status 0, or 2 with one `error: ...` line
    on stderr (no traceback) when the user's input is at fault."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        lines = command(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


def run(argv: list[str] | None = None) -> int:
    """Forecast; returns the exit status (0 done, 2 bad input)."""
    return run_command(forecast_command, parse_args(argv))


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(argv))
