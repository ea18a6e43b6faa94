"""Data: the CSV checks, body grouping, time splits without leakage, windows, the sampler."""
from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from series.builtin import (
    BODY_NAMES,
    BuiltinDataConfig,
    celestial_features,
    planted_log_prices,
)
from series.dataset import (
    DataConfig,
    ResumableDistributedSampler,
    WindowDataset,
    ablate_bodies,
    build_loader,
    group_bodies,
    parse_date,
    prepare,
)
from tests.conftest import small_config
from trainer.errors import UserError

S, P = 48, 12


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def write_rows(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def config_for(path: Path, **kw) -> DataConfig:
    return DataConfig(source="csv", path=str(path), **kw)


def edited(short_csv: Path, tmp_path: Path, edit) -> Path:
    rows = read_rows(short_csv)
    edit(rows)
    return write_rows(tmp_path / "edited.csv", rows)


def test_builtin_dataset_schema(short_csv):
    header = read_rows(short_csv)[0]
    assert header[:5] == ["date", "Asset_A", "Asset_B", "Asset_C", "Asset_D"]
    groups = group_bodies(header[5:], list(BODY_NAMES))
    assert all(groups[b] for b in BODY_NAMES)
    assert "North_Node_speed" in groups["North_Node"] and "Sun_lon_sin" in groups["Sun"]
    for body in ("Moon", "Mars", "Pluto"):
        expected = {f"{body}_{k}" for k in ("lon_sin", "lon_cos", "speed", "lat", "dist")}
        assert expected <= set(groups[body])


def test_ephemeris_values_are_real():
    """Spot checks against known astronomy: Moon ~13 deg/day, nodes regress, Mercury retrogrades."""
    dates = np.arange(np.datetime64("2000-01-01"), np.datetime64("2001-01-01"))
    f = celestial_features(BuiltinDataConfig(), dates)
    assert 11.5 < f["Moon_speed"].mean() < 14.5
    assert f["North_Node_speed"].mean() < 0
    assert (f["Mercury_speed"] < 0).any() and (f["Mercury_speed"] > 1.5).any()
    assert 0.98 < f["Sun_dist"].min() < f["Sun_dist"].max() < 1.02
    assert np.allclose(f["North_Node_lon_sin"], -f["South_Node_lon_sin"], atol=1e-9)


@pytest.mark.slow
def test_planted_driver_is_in_the_returns():
    config = BuiltinDataConfig(start_date="1990-01-01", end_date="2005-12-31")
    dates = np.arange(np.datetime64(config.start_date), np.datetime64(config.end_date) + 1)
    features = celestial_features(config, dates)
    prices = planted_log_prices(config, features)
    for driver in config.drivers:
        returns = np.diff(prices[driver.target])          # returns[t - 1] is day t's return
        z = features[f"{driver.body}_{driver.feature}"]
        days = np.arange(max(1, driver.lag), len(z))
        corr = np.corrcoef(returns[days - 1], z[days - driver.lag])[0, 1]
        assert corr > 0.15, (driver, corr)
        assert 0.008 < returns.std() < 0.02      # realistic daily volatility


def test_prepare_splits_scales_and_spec(short_csv):
    data = prepare(config_for(short_csv), S, P)
    (a, b), (c, d), (e, f) = data.borders["train"], data.borders["val"], data.borders["test"]
    assert a == 0 and b == c and d == e and f == len(data.dates)
    train_features = data.features_RF[a:b]
    assert torch.allclose(train_features.mean(0), torch.zeros(1), atol=1e-4)   # fitted on train
    assert not torch.allclose(data.features_RF[c:].mean(0), torch.zeros(1), atol=1e-3)
    assert data.spec.targets == ["Asset_A", "Asset_B", "Asset_C", "Asset_D"]
    assert len(data.spec.bodies) == 13 and np.array(data.spec.change_scale).shape == (P, 4)
    assert "Pluto_lon_sin" not in data.spec.feature_names   # slow bodies' positions dropped


def test_scaler_uses_training_rows_only(short_csv, tmp_path):
    """Changing validation/test rows must not change how training rows are scaled."""
    base = prepare(config_for(short_csv), S, P)
    n_train = base.borders["train"][1]

    def shift_late_rows(rows):
        for row in rows[1 + n_train:]:
            row[1:] = [str(float(v) + 50.0) for v in row[1:]]
    changed = prepare(config_for(edited(short_csv, tmp_path, shift_late_rows)), S, P)
    assert torch.allclose(base.features_RF[:n_train], changed.features_RF[:n_train])
    assert torch.allclose(base.targets_RT[:n_train], changed.targets_RT[:n_train])


def test_windows_stay_inside_their_split(short_csv):
    data = prepare(config_for(short_csv), S, P)
    for split, (start, end) in data.borders.items():
        ds = WindowDataset(data, split, S, P, stride=1)
        assert int(ds.starts[0]) == start and int(ds.starts[-1]) + S + P == end
        item = ds[len(ds) - 1]
        assert item.wave.shape == (S, data.spec.num_features) and item.future_target.shape == (P, 4)
        s = int(ds.starts[-1])
        assert torch.equal(item.future_wave, data.features_RF[s + S:s + S + P])


def test_drop_and_difference_columns(short_csv):
    data = prepare(config_for(short_csv, drop_columns=["Moon_dist"],
                              difference_columns=["Jupiter_lon_*"]), S, P)
    assert "Moon_dist" not in data.spec.feature_names
    raw = prepare(config_for(short_csv), S, P)
    assert len(data.dates) == len(raw.dates) - 1      # the first row has no difference


def test_user_csv_with_ohlc_targets(short_csv, tmp_path):
    def rename(rows):
        for i, name in enumerate(["log_Open", "log_High", "log_Low", "log_Close"], start=1):
            rows[0][i] = name
    path = edited(short_csv, tmp_path, rename)
    data = prepare(config_for(path, targets=["log_Open", "log_High", "log_Low", "log_Close"]), S, P)
    assert data.spec.targets[-1] == "log_Close"


@pytest.mark.parametrize("edit, message", [
    (lambda rows: [r.pop(2) for r in rows], "missing target column(s) ['Asset_B']"),
    (lambda rows: rows[10].__setitem__(7, "abc"), "is not numeric: 'abc' at line 11"),
    (lambda rows: rows[20].__setitem__(3, "nan"),
     "column 'Asset_C' has a non-finite value (nan) at line 21"),
    (lambda rows: rows[25].__setitem__(9, "inf"), "has a non-finite value (inf) at line 26"),
    (lambda rows: rows.__setitem__(5, rows[4][:]), "duplicate dates"),
    (lambda rows: rows.__setitem__(slice(5, 7), [rows[6], rows[5]]), "unsorted dates"),
    (lambda rows: rows.__setitem__(slice(1, None), rows[1:80]), "too few rows for one window"),
    (lambda rows: rows[3].__setitem__(0, "03/01/1996"), "is not YYYY-MM-DD"),
    (lambda rows: rows[3].__setitem__(0, "1996-01"), "date '1996-01' at line 4 is not YYYY-MM-DD"),
    (lambda rows: rows[3].pop(), "line 4 has"),
])
def test_bad_data_fails_clearly(short_csv, tmp_path, edit, message):
    with pytest.raises(UserError) as err:
        prepare(config_for(edited(short_csv, tmp_path, edit)), S, P)
    assert message in str(err.value)


@pytest.mark.parametrize("text", ["2025-12", "2025", "", "NaT", "2025-12-01T05:00", "2025-02-30",
                                  " 2025-12-01"])
def test_parse_date_takes_only_full_calendar_dates(text):
    assert parse_date("2025-12-01") == np.datetime64("2025-12-01")
    with pytest.raises(ValueError, match="is not a"):
        parse_date(text)


def test_missing_file_and_bodies_without_columns(short_csv, tmp_path):
    with pytest.raises(UserError, match="data file not found"):
        prepare(config_for(tmp_path / "absent.csv"), S, P)
    with pytest.raises(UserError, match="body 'Vulcan' has no columns"):
        prepare(config_for(short_csv, bodies=list(BODY_NAMES) + ["Vulcan"]), S, P)
    with pytest.raises(UserError, match="body 'Sun' has no columns"):
        prepare(config_for(short_csv, drop_columns=["Sun_*"]), S, P)


def _drain(n: int, world: int, position: int, epoch: int = 3) -> list[list[int]]:
    out = []
    for r in range(world):
        sampler = ResumableDistributedSampler(range(n), world, r, shuffle=True, seed=7,
                                              drop_last=True)
        sampler.start_epoch(epoch, position)
        out.append(list(sampler))
    return out


def test_sampler_resumes_mid_epoch_across_world_sizes():
    n, batch = 103, 5
    two_ranks = _drain(n, 2, 0)
    consumed = 4 * batch * 2                      # 4 batches per rank on 2 ranks
    seen = {i for shard in two_ranks for i in shard[:4 * batch]}
    one_rank = _drain(n, 1, consumed)[0]
    assert seen.isdisjoint(one_rank) and len(seen) + len(one_rank) == n
    again = _drain(n, 2, consumed)
    assert again[0] == two_ranks[0][4 * batch:] and again[1] == two_ranks[1][4 * batch:]


def test_loader_workers_give_the_same_batches_in_the_same_order(short_csv, tmp_path):
    """The configs use no loader workers (a window is a slice of tensors in memory); a user who
    sets data.num_workers still gets the same batches, mid-epoch resume position included."""
    config = small_config(short_csv, tmp_path)
    data = prepare(config.data, config.model.seq_len, config.model.pred_len)
    train = WindowDataset(data, "train", config.model.seq_len, config.model.pred_len,
                          config.data.window_stride)
    drawn = []
    for workers in (0, 2):
        loader = build_loader(train, dataclasses.replace(config.data, num_workers=workers),
                              rank=1, world_size=2, seed=3, train=True)
        loader.sampler.start_epoch(1, 2 * config.data.batch_size)
        drawn.append([torch.cat([part.flatten() for part in batch]) for batch in loader])
    assert len(drawn[0]) == len(drawn[1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(drawn[0], drawn[1]))


def test_validation_sampler_covers_each_sample_once():
    n = 101
    shards = []
    for r in range(3):
        sampler = ResumableDistributedSampler(range(n), 3, r, shuffle=False, seed=0,
                                              drop_last=False)
        shards += list(sampler)
        assert len(sampler) == len(list(sampler))
    assert sorted(shards) == list(range(n))


def _driver_correlation(data, split: str) -> float:
    """Correlation of Asset_D's daily change with its planted driver, Mercury's speed a day
    earlier (series/builtin.py), on one split's rows."""
    start, end = data.borders[split]
    column = data.spec.feature_names.index("Mercury_speed")
    change = np.diff(data.targets_RT[start:end, 3].numpy())
    driver = data.features_RF[start:end - 1, column].numpy()
    return float(np.corrcoef(driver, change)[0, 1])


@pytest.mark.parametrize("ablation", ["block_shuffle", "time_shift"])
def test_ablation_keeps_each_splits_rows_and_removes_the_planted_driver(short_csv, ablation):
    plain = prepare(config_for(short_csv), S, P)
    ablated = prepare(config_for(short_csv, celestial_ablation=ablation), S, P)
    assert torch.equal(plain.targets_RT, ablated.targets_RT)
    for split, (start, end) in plain.borders.items():
        before, after = plain.features_RF[start:end], ablated.features_RF[start:end]
        assert torch.equal(torch.sort(before, 0).values, torch.sort(after, 0).values), split
        assert (before == after).all(1).float().mean() < 0.05, split
        assert abs(_driver_correlation(plain, split)) > 0.25, split
        # One ablation may align a periodic driver by chance; over ablation seeds it averages out.
        correlations = [_driver_correlation(dataclasses.replace(plain, features_RF=torch.tensor(
            ablate_bodies(plain.features_RF.numpy(), plain.borders, config_for(
                short_csv, celestial_ablation=ablation, ablation_seed=seed)))), split)
            for seed in range(40)]
        assert abs(np.mean(correlations)) < 0.05, (split, np.mean(correlations))


def test_ablation_depends_on_its_own_seed_only(short_csv):
    def features(**kw):
        return prepare(config_for(short_csv, celestial_ablation="block_shuffle", **kw),
                       S, P).features_RF
    assert torch.equal(features(), features())
    assert not torch.equal(features(), features(ablation_seed=1))


def test_no_bodies_blanks_every_celestial_column_and_keeps_the_layout(short_csv):
    plain = prepare(config_for(short_csv), S, P)
    ablated = prepare(config_for(short_csv, celestial_ablation="no_bodies"), S, P)
    assert ablated.features_RF.shape == plain.features_RF.shape
    assert not ablated.features_RF.any() and ablated.spec == plain.spec
    assert torch.equal(plain.targets_RT, ablated.targets_RT)


def test_block_shuffle_of_a_split_shorter_than_a_block_still_moves_it():
    features_RF = np.arange(40, dtype=np.float64)[:, None]
    config = DataConfig(celestial_ablation="block_shuffle", ablation_block_rows=397)
    ablated = ablate_bodies(features_RF, {"test": (0, 40)}, config)
    assert sorted(ablated[:, 0]) == list(range(40))
    assert (ablated[:, 0] != features_RF[:, 0]).mean() > 0.5
