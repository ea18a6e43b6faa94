"""Hostile data and model files for forecast/evaluate: each is
one line, exit 2, in bounded time and memory, and nothing is created."""
from __future__ import annotations

import contextlib
import copy
import csv
import io
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forecasting import evaluate as forecast_evaluate
from forecasting import forecast
from forecasting.inputs import prepare_forecast_input
from forecasting.model_file import LoadedModel, load_model_file
from tests.bounded import run_bounded
from tests.conftest import fuzz_examples, small_overrides
from tests.test_forecast import SEQ_LEN, model_path, read_rows, train_tiny, write_rows
from tests.test_fuzz_inputs import broken_csvs
from tests.test_refused_start import refused
from trainer.errors import UserError


@pytest.fixture(scope="module")
def model_file(short_csv, tmp_path_factory) -> Path:
    return model_path(train_tiny(short_csv, tmp_path_factory.mktemp("hostile_model"), steps=2))


def forecast_bounded(*args, seconds: float = 20, memory_mb: int = 400) -> tuple[int, str]:
    """`celestial-forecast ARGS` in a forked child within the bounds: (status, stderr)."""
    def go():
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = forecast.run([str(a) for a in args])
        return status, err.getvalue()
    return run_bounded(go, seconds=seconds, memory_mb=memory_mb)


def assert_one_line_refusal(status: int, err: str, *expected: str) -> None:
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, err[-2000:]
    assert all(e in err for e in expected), err


# --- the forecast CSV reader is the training reader ----------------------------------------------

def _latin1(short_csv: Path, path: Path) -> Path:
    path.write_bytes(short_csv.read_bytes().replace(b"\n", b"\ncaf\xe9 ", 1))
    return path


def _huge_cell(short_csv: Path, path: Path) -> Path:
    header, rows = read_rows(short_csv)
    rows[10][3] = "1" * 50_000_000
    return write_rows(path, header, rows)


def _many_columns(short_csv: Path, path: Path) -> Path:
    header, rows = read_rows(short_csv)
    extra = [f"Sun_extra{i}" for i in range(10_000)]
    return write_rows(path, header + extra, [r + ["0"] * len(extra) for r in rows[:200]])


HOSTILE_CSVS = {"latin-1 bytes": (_latin1, "not a UTF-8 text CSV"),
                "a 50 MB cell": (_huge_cell, "line 12"),
                "10,000 feature columns": (_many_columns, "columns, more than the 1000")}


@pytest.mark.parametrize("case", list(HOSTILE_CSVS))
def test_hostile_forecast_csv_is_one_line_in_bounded_time_and_memory(model_file, short_csv,
                                                                     tmp_path, case):
    make, expected = HOSTILE_CSVS[case]
    bad = make(short_csv, tmp_path / "bad.csv")
    status, err = forecast_bounded("--checkpoint", model_file, "--data", bad,
                                   "--out", tmp_path / "out")
    assert_one_line_refusal(status, err, str(bad), expected)
    assert not (tmp_path / "out").exists()


def test_10000_feature_columns_are_refused_before_training_creates_anything(short_csv,
                                                                            tmp_path):
    bad = _many_columns(short_csv, tmp_path / "wide.csv")
    overrides = small_overrides(bad, tmp_path, "wide") + [("data.source", "csv")]
    line = run_bounded(refused, overrides, tmp_path, seconds=30, memory_mb=600)
    assert "columns, more than the 1000" in line
    assert not (tmp_path / "logs").exists() and not (tmp_path / "checkpoints").exists()


# --- a model file is data, bounded ---------------------------------------------------------------

def _saved_with(model_file: Path, out: Path, edit) -> Path:
    saved = torch.load(model_file, weights_only=True)
    edit(saved)
    torch.save(saved, out)
    return out


def _set(section: str, key: str, value):
    def edit(saved):
        saved[section][key] = value
    return edit


def _config(section: str, key: str, value):
    def edit(saved):
        saved["config"][section][key] = value
    return edit


def _top(key: str, value):
    def edit(saved):
        saved[key] = value
    return edit


HOSTILE_MODEL_FILES = {
    "d_model 65536": (_config("model", "d_model", 65536),
                      "the saved weights do not fit the saved config"),
    "heads that do not divide d_model": (_config("model", "num_heads", 7),
                                         "must be divisible by model.num_heads"),
    "unknown config key": (_config("train", "evil", 1), "unknown config key train.evil"),
    "spec feature names not a list": (_set("spec", "feature_names", 5),
                                      "spec.feature_names: expected a list"),
    "spec column index outside": (_set("spec", "body_columns", [[10**6]] * 10),
                                  "input spec is damaged"),
    "spec not a mapping": (_top("spec", [1, 2]), "input spec is damaged"),
    "step text": (_top("step", "abc"), "the saved step is damaged"),
    "step negative": (_top("step", -4), "the saved step is damaged"),
    "weights not tensors": (_top("model", {"a": 1}), "more than its weights hold (0 tensors)"),
    "a billion graph rounds": (_config("model", "graph_rounds", 10**9),
                               "model.graph_rounds = 1000000000, more than its weights hold"),
}


@pytest.mark.parametrize("case", list(HOSTILE_MODEL_FILES))
def test_hostile_model_file_is_one_line_in_bounded_time_and_memory(model_file, short_csv,
                                                                   tmp_path, case):
    edit, expected = HOSTILE_MODEL_FILES[case]
    bad = _saved_with(model_file, tmp_path / "bad.pth", edit)
    status, err = forecast_bounded("--checkpoint", bad, "--data", short_csv,
                                   "--out", tmp_path / "out")
    assert_one_line_refusal(status, err, str(bad), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth"]


@pytest.mark.slow
def test_builtin_data_named_by_a_model_file_is_computed_in_the_users_cache(model_file,
                                                                         tmp_path,
                                                                         monkeypatch):
    chosen = tmp_path / "chosen_by_the_file" / "data.csv"
    builtin = {"start_date": "2001-01-01", "end_date": "2003-12-31"}

    def edit(saved):
        saved["config"]["data"].update(source="builtin", path=str(chosen), builtin=builtin)
    crafted = _saved_with(model_file, tmp_path / "crafted.pth", edit)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    status, err = forecast_bounded("--checkpoint", crafted, "--out", tmp_path / "out",
                                   seconds=120, memory_mb=1500)
    assert status == 0, err[-2000:]
    assert not chosen.parent.exists()
    cached = list((tmp_path / "cache" / "celestial-pgat").glob("builtin_2001-01-01_*.csv"))
    assert len(cached) == 1 and f"computing the dataset into {cached[0]}" in err
    assert (tmp_path / "out" / "forecast.csv").is_file()


# --- fuzzing (hypothesis), each example within bounds ------------------------------------------

FUZZ = settings(max_examples=fuzz_examples(40), deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def loaded(model_file) -> LoadedModel:
    return load_model_file(model_file)


@pytest.fixture(scope="module")
def forecast_rows(short_csv) -> list[list[str]]:
    header, rows = read_rows(short_csv)
    return [header, *rows[:SEQ_LEN + 100]]


def _as_bytes(rows: list[list[str]]) -> bytes:
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    return text.getvalue().encode()


@st.composite
def fuzzed_forecast_csvs(draw, base: list[list[str]]) -> bytes:
    """A broken table (as the training reader's fuzzing makes them), or the intact one with
    bytes inserted, overwritten or cut off anywhere."""
    if draw(st.booleans()):
        content, _ = draw(broken_csvs(base))
        return content if isinstance(content, bytes) else _as_bytes(content)
    data = bytearray(_as_bytes(base))
    at = draw(st.integers(0, len(data)))
    kind = draw(st.sampled_from(["insert", "overwrite", "truncate"]))
    if kind == "truncate":
        return bytes(data[:at])
    junk = draw(st.binary(min_size=1, max_size=64) | st.sampled_from(
        [b"\xe9", b"\x00", b'"', b"\r", b"\n\n", b",,,", b"1" * 200_000, b"nan", b"1e999"]))
    end = at + (len(junk) if kind == "overwrite" else 0)
    return bytes(data[:at] + junk + data[end:])


def forecast_verdict(loaded_model: LoadedModel, path: Path) -> str:
    try:
        prepare_forecast_input(loaded_model, path, allow_builtin=False)
        return "read"
    except UserError as err:
        return str(err)


@FUZZ
@given(data=st.data())
def test_fuzzed_forecast_csv_is_read_or_one_line_within_bounds(loaded, forecast_rows, data):
    content = data.draw(fuzzed_forecast_csvs(forecast_rows))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "input.csv"
        path.write_bytes(content)
        verdict = run_bounded(forecast_verdict, loaded, path, seconds=20, memory_mb=300)
    assert verdict == "read" or (str(path) in verdict and "\n" not in verdict), verdict


_ODD_VALUES = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
               | st.sampled_from([0, -1, 10**6, 2**31, 2**63, 65536])
               | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
               | st.lists(st.integers(-3, 10**6), max_size=4)
               | st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))


@st.composite
def model_file_edits(draw, saved: dict):
    """One value of a model file replaced: a config or spec entry, a scaling list, the step,
    or a weight by a tensor of another shape."""
    where = draw(st.sampled_from(["config", "spec", "scaling", "step", "weight"]))
    if where == "step":
        return ("step",), draw(_ODD_VALUES)
    if where == "weight":
        name = draw(st.sampled_from(sorted(saved["model"])))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        return ("model", name), torch.zeros(shape)
    if where == "config":
        section = draw(st.sampled_from(sorted(saved["config"])))
        key = draw(st.sampled_from(sorted(saved["config"][section])))
        return ("config", section, key), draw(_ODD_VALUES)
    key = draw(st.sampled_from(sorted(saved[where])))
    return (where, key), draw(_ODD_VALUES)


def model_verdict(path: Path) -> str:
    try:
        load_model_file(path)
        return "loaded"
    except UserError as err:
        return str(err)


@pytest.fixture(scope="module")
def saved_model(model_file) -> dict:
    return torch.load(model_file, weights_only=True)


@FUZZ
@given(data=st.data())
def test_fuzzed_model_file_loads_or_is_one_line_within_bounds(saved_model, data):
    keys, value = data.draw(model_file_edits(saved_model))
    edited = copy.deepcopy(saved_model)
    target = edited
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pth"
        torch.save(edited, path)
        verdict = run_bounded(model_verdict, path, seconds=20, memory_mb=400)
    assert verdict == "loaded" or (str(path) in verdict and "\n" not in verdict), verdict


def test_a_model_too_large_for_the_memory_is_refused_before_allocating(short_csv, tmp_path):
    overrides = small_overrides(short_csv, tmp_path, "huge") + [("model.d_model", 65536)]
    line = run_bounded(refused, overrides, tmp_path, seconds=60, memory_mb=600)
    assert "parameters (model.d_model=65536" in line and "lower model.d_model" in line, line
    assert not (tmp_path / "logs").exists() and not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_evaluate_never_writes_the_dataset_at_a_path_from_the_model_file(model_file, tmp_path,
                                                                        monkeypatch):
    chosen = tmp_path / "chosen_by_the_file" / "data.csv"

    def edit(saved):
        saved["config"]["data"].update(
            source="builtin", path=str(chosen),
            builtin={"start_date": "2001-01-01", "end_date": "2003-12-31"})
    crafted = _saved_with(model_file, tmp_path / "crafted.pth", edit)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def go():
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = forecast_evaluate.run(["--checkpoint", str(crafted),
                                            "--out", str(tmp_path / "out" / "e.json")])
        return status, err.getvalue()
    status, err = run_bounded(go, seconds=120, memory_mb=1500)
    assert status in (0, 2) and "Traceback" not in err, err[-2000:]
    assert not chosen.parent.exists()
    assert list((tmp_path / "cache" / "celestial-pgat").glob("builtin_2001-01-01_*.csv"))
