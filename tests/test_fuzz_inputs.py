"""Bad input never ends in a traceback or a half-created run: fuzzed configs and CSVs
(hypothesis) and known cases, through `trainer.cli.run` in-process, plus a few real processes.

Whatever is wrong, the run prints one line `error: ...` naming the file, key, column or line,
returns 2, and creates no run folder (logs/<exp> and checkpoints/<exp> do not exist).
"""
from __future__ import annotations

import contextlib
import csv
import fnmatch
import io
import logging
import math
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from series.dataset import DataConfig, ensure_dataset
from tests.bounded import run_bounded
from tests.conftest import REPO, as_cli_args, fuzz_examples, run_cli, small_overrides
from trainer import cli
from trainer.config import Config, load_config
from trainer.errors import UserError

FUZZ = settings(max_examples=fuzz_examples(80), deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


# --- running the entry point in this process -------------------------------------------------

def run_refused(argv: list[str], root: Path) -> str:
    """cli.run(argv) must refuse: status 2, one error line (the last), no traceback, and no
    run folder. Returns the error line."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = cli.run(argv)
    text = stderr.getvalue()
    lines = text.strip().splitlines()
    assert status == 2, text[-3000:]
    assert "Traceback" not in text
    assert lines and lines[-1].startswith("error: ")
    assert sum(line.startswith("error: ") for line in lines) == 1
    assert not (root / "logs").exists() and not (root / "checkpoints").exists(), \
        f"a refused run left a folder behind: {lines[-1]}"
    return lines[-1]


def tree_of(overrides) -> dict:
    """Dotted (key, value) pairs as a nested YAML tree."""
    tree: dict = {}
    for key, value in overrides:
        *sections, leaf = key.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return tree


@pytest.fixture(scope="module")
def base_csv(short_csv, tmp_path_factory) -> Path:
    """400 rows of the built-in dataset: enough for one window in each split of the small model."""
    with open(short_csv, newline="") as f:
        rows = list(csv.reader(f))[:401]
    path = tmp_path_factory.mktemp("fuzz") / "base.csv"
    write_rows(path, rows)
    return path


def write_rows(path: Path, rows) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return path


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def csv_overrides(csv_path: Path, root: Path) -> list:
    return small_overrides(csv_path, root, "fuzz") + [("data.source", "csv"),
                                                      ("train.max_steps", 1)]


# --- configs ---------------------------------------------------------------------------------

def _leaves(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out += _leaves(value, dotted + ".")
        elif not (isinstance(value, list) and value and isinstance(value[0], dict)):
            out.append((dotted, value))
    return out


LEAVES = _leaves(Config().to_dict())
SECTIONS = ["", *sorted({k.rsplit(".", 1)[0] for k, _ in LEAVES if "." in k})]

junk_values = st.one_of(
    st.none(), st.booleans(), st.integers(-10**30, 10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.lists(st.integers(-5, 5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
non_finite = st.sampled_from([math.nan, math.inf, -math.inf])
non_name_keys = st.one_of(st.integers(), st.booleans(), st.none(), st.floats(allow_nan=False))


def _node(tree: dict, section: str) -> dict:
    node = tree
    for key in filter(None, section.split(".")):
        node = node.setdefault(key, {})
    return node


def _set_leaf(tree: dict, dotted: str, value) -> None:
    section, _, leaf = dotted.rpartition(".")
    _node(tree, section)[leaf] = value


@st.composite
def broken_configs(draw, always_invalid: bool):
    """A valid small config tree with one thing wrong; returns (tree, what to look for in the
    error). With always_invalid=False the change may also leave a valid config."""
    tree = tree_of(small_overrides(Path("x.csv"), Path("/nonexistent"), "fuzz"))
    sometimes_valid = [] if always_invalid else ["junk", "drop_section"]
    kind = draw(st.sampled_from(["non_finite", "non_name_key", "unknown_key", "not_a_section",
                                 "wrong_type"] + sometimes_valid))
    if kind == "non_finite":
        key = draw(st.sampled_from([k for k, v in LEAVES if isinstance(v, float)]))
        _set_leaf(tree, key, draw(non_finite))
        return tree, key
    if kind == "non_name_key":
        section = draw(st.sampled_from(SECTIONS))
        _node(tree, section)[draw(non_name_keys)] = 1
        return tree, "is not a name"
    if kind == "unknown_key":
        section = draw(st.sampled_from(SECTIONS))
        name = draw(st.text(min_size=1, max_size=12))
        assume(name not in _node(Config().to_dict(), section))
        _node(tree, section)[name] = draw(junk_values)
        return tree, "unknown config key"
    if kind == "not_a_section":
        section = draw(st.sampled_from([s for s in SECTIONS if s]))
        parent, _, leaf = section.rpartition(".")
        _node(tree, parent)[leaf] = draw(st.one_of(st.integers(), st.text(max_size=5),
                                                    st.lists(st.integers(), max_size=2)))
        return tree, section
    if kind == "wrong_type":
        numeric = [(k, v) for k, v in LEAVES
                   if isinstance(v, (int, float)) and not isinstance(v, bool)]
        key, _ = draw(st.sampled_from(numeric))
        _set_leaf(tree, key, draw(st.one_of(st.text(max_size=8).filter(lambda t: not _numeric(t)),
                                            st.lists(st.integers(), min_size=1, max_size=2))))
        return tree, key
    if kind == "junk":
        key = draw(st.sampled_from([k for k, _ in LEAVES]))
        _set_leaf(tree, key, draw(junk_values))
        return tree, key.rsplit(".", 1)[-1]
    section = draw(st.sampled_from([s for s in SECTIONS if s]))
    parent, _, leaf = section.rpartition(".")
    _node(tree, parent).pop(leaf, None)
    return tree, ""


def _numeric(text: str) -> bool:
    try:
        yaml_value = yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return False
    return isinstance(yaml_value, (int, float)) and not isinstance(yaml_value, bool)


@settings(FUZZ, max_examples=fuzz_examples(150))
@given(broken_configs(always_invalid=False))
def test_fuzzed_config_loads_or_names_what_is_wrong(case):
    tree, expected = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(yaml.safe_dump(tree, allow_unicode=True))
        try:
            load_config(path)
        except UserError as err:
            message = str(err)
            assert "\n" not in message and len(message) < 600
            assert expected in message, message
        # any other exception fails the test: it would be a traceback for the user


@FUZZ
@given(broken_configs(always_invalid=True))
def test_fuzzed_config_is_refused_by_the_entry_point(case):
    tree, expected = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(yaml.safe_dump(tree, allow_unicode=True))
        error = run_refused(["--config", str(path)], Path(tmp))
        assert expected in error, error


@pytest.mark.parametrize("text, expected", [
    ("optim:\n  lr: .nan\n", "optim.lr: expected a finite number, got nan"),
    ("model:\n  dropout: -.inf\n", "model.dropout: expected a finite number"),
    ("model:\n  1: 2\n  d_model: 32\n", "config key model.1 is not a name"),
    ("? [a, b]\n: 1\n", "not valid YAML"),
    ("a: &x [*x]\n", "line 1: the alias *x refers to a value that contains it"),
    ("train:\n  seed: 100000000000000000000000000\n",
     "train.seed: 100000000000000000000000000 is out of range"),
    (b"optim:\n  lr: \xff\xfe\n", "not a UTF-8 text file"),
])
def test_known_bad_configs(tmp_path, text, expected):
    path = tmp_path / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert expected in run_refused(["--config", str(path)], tmp_path)


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """A few hundred bytes of YAML that stand for width**levels values when written out."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def flow_mapping(block: str) -> str:
    """The lines of a block mapping as one flow mapping: `{a: 1, b: 2}`."""
    return "{" + ", ".join(block.splitlines()) + "}"


HOSTILE_CONFIGS = [
    ("alias_bomb", alias_bomb(), "more than 100000 values"),
    ("alias_bomb_in_a_value", "model:\n  d_model: " + flow_mapping(alias_bomb()) + "\n",
     "more than 100000 values"),
    ("deep_flow_list", "model:\n  patch_scales: " + "[" * 5000 + "]" * 5000 + "\n", "nest"),
    ("deep_flow_mapping", "model: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n", "nest"),
    ("deep_block_mapping", "".join(f"{' ' * i}a{i}:\n" for i in range(200)) + " " * 200 + "b: 1\n",
     "nested deeper than 32 levels"),
    ("long_integer", "train:\n  seed: " + "7" * 5000 + "\n", "an integer of 5000 characters"),
    ("long_hex_integer", "train:\n  seed: 0x" + "f" * 5000 + "\n", "an integer of 5002"),
    ("huge_file", "# " + "x" * (1 << 20) + "\n", "too large for a config file"),
]


@pytest.mark.parametrize("name, text, expected", HOSTILE_CONFIGS,
                         ids=[case[0] for case in HOSTILE_CONFIGS])
def test_hostile_config_file_is_refused_in_bounded_time_and_memory(tmp_path, name, text,
                                                                    expected):
    """A 448-byte alias bomb took 25-38 s and 1.8 GB; 5,000 levels raised RecursionError; a
    5,000-digit integer raised ValueError (Python's limit on converting long integers)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    error = run_bounded(run_refused, ["--config", str(path)], tmp_path, seconds=20, memory_mb=500)
    assert str(path) in error and expected in error, error


@pytest.mark.parametrize("override, expected", [
    ("model.patch_scales=" + "[" * 5000 + "]" * 5000, "model.patch_scales"),
    ("model.patch_scales=" + "[" * 40 + "]" * 40, "nested deeper than 32 levels"),
    ("train.seed=" + "7" * 5000, "an integer of 5000 characters"),
    ("model.d_model=" + flow_mapping(alias_bomb(levels=7)), "more than 100000 values"),
], ids=["deep_5000", "deep_40", "long_integer", "alias_bomb"])
def test_hostile_override_is_refused_in_bounded_time_and_memory(tmp_path, override, expected):
    error = run_bounded(run_refused, ["--set", override], tmp_path, seconds=20, memory_mb=500)
    assert expected in error, error


YAML_PLACES = [("model", "patch_scales"), ("model", "d_model"), ("optim", "lr"),
               ("train", "experiment_name"), ("data", "targets")]


def nested_flow(depth: int, mapping: bool) -> str:
    return "{a: " * depth + "1" + "}" * depth if mapping else "[" * depth + "]" * depth


@st.composite
def yaml_structures(draw):
    """(a config's text, what its refusal must say, or None where it may load or be refused
    for any reason). The value at section.key is deep, made of aliases, or large."""
    section, key = draw(st.sampled_from(YAML_PLACES))
    kind = draw(st.sampled_from(["nested", "aliases", "self_alias", "integer", "string"]))
    expected = None
    if kind == "nested":          # the root and the section are 2 levels
        depth = draw(st.integers(0, 80))
        value = nested_flow(depth, draw(st.booleans()))
        expected = "nest" if depth > 30 else None
    elif kind == "aliases":
        levels, width = draw(st.integers(1, 8)), draw(st.integers(1, 12))
        value = flow_mapping(alias_bomb(levels, width))
        expected = "more than 100000 values" if width ** levels > 200_000 else None
    elif kind == "self_alias":
        depth = draw(st.integers(0, 20))
        value = "&x [" + nested_flow(depth, False)[:depth] + "*x" + "]" * depth + "]"
        expected = "refers to a value that contains it"
    elif kind == "integer":
        digits = draw(st.integers(1, 6000))
        value = draw(st.sampled_from(["", "-", "0x", "0"])) + "7" * digits   # 0: octal
        expected = "an integer of" if len(value) > 40 else None
    else:
        quote = draw(st.sampled_from(["", "'", '"']))
        value = quote + "x" * draw(st.integers(0, 300_000)) + quote
    return f"{section}:\n  {key}: {value}\n", expected


def config_verdict(path: Path) -> str:
    try:
        load_config(path)
        return "loaded"
    except UserError as err:
        return str(err)


@settings(FUZZ, max_examples=fuzz_examples(60))
@given(yaml_structures())
def test_fuzzed_yaml_structure_ends_in_one_line_within_bounds(case):
    text, expected = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(text)
        verdict = run_bounded(config_verdict, path, seconds=20, memory_mb=300)
    assert "\n" not in verdict and len(verdict) < 600, verdict
    assert expected is None or expected in verdict, verdict


def test_config_path_that_is_a_directory(tmp_path):
    assert "is a directory" in run_refused(["--config", str(tmp_path)], tmp_path)


# --- CSVs ------------------------------------------------------------------------------------

def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


@st.composite
def broken_csvs(draw, base: list[list[str]]):
    """The base table with one thing wrong: (rows or raw bytes, what the error must name)."""
    rows = [row[:] for row in base]
    header = rows[0]
    kind = draw(st.sampled_from(["drop_target", "duplicate_column", "text_cell", "non_finite_cell",
                                 "duplicate_date", "unsorted_dates", "bad_date", "short_row",
                                 "empty", "binary", "nul", "few_rows", "header_only"]))
    row = draw(st.integers(1, len(rows) - 2))
    col = draw(st.integers(1, len(header) - 1))
    if kind == "drop_target":
        index = header.index(draw(st.sampled_from(["Asset_A", "Asset_B", "Asset_C", "Asset_D"])))
        name = header[index]
        rows = [r[:index] + r[index + 1:] for r in rows]
        return rows, name
    if kind == "duplicate_column":
        other = draw(st.integers(1, len(header) - 1))
        assume(other != col)
        header[col] = header[other]
        return rows, "duplicate column names"
    if kind == "text_cell":
        text = draw(st.text(min_size=1, max_size=12).filter(lambda t: not _is_float(t)))
        rows[row][col] = text
        return rows, "line" if "\0" in text else header[col]
    if kind == "non_finite_cell":     # in a column the run uses (a dropped one may hold NaN)
        dropped = DataConfig().drop_columns
        col = draw(st.sampled_from([i for i, name in enumerate(header) if i and not any(
            fnmatch.fnmatchcase(name, pattern) for pattern in dropped)]))
        rows[row][col] = draw(st.sampled_from(["nan", "inf", "-inf", "NaN", "Infinity"]))
        return rows, header[col]
    if kind == "duplicate_date":
        rows[row + 1][0] = rows[row][0]
        return rows, "duplicate dates"
    if kind == "unsorted_dates":
        rows[row][0], rows[row + 1][0] = rows[row + 1][0], rows[row][0]
        return rows, "unsorted dates"
    if kind == "bad_date":
        rows[row][0] = draw(st.sampled_from(["", "NaT", "2001", "2001-02", "02/03/2001",
                                             "2001-02-03T04:05", "2001-13-01", " 2001-02-03"]))
        return rows, f"line {row + 1}"
    if kind == "short_row":
        rows[row] = rows[row][:col]
        return rows, f"line {row + 1}"
    if kind == "empty":
        return b"", "empty file"
    if kind == "binary":
        png = b"\x89PNG\r\n\x1a\n" + draw(st.binary(min_size=1, max_size=64)) + b"\xff\xfe"
        return png, "not a UTF-8"
    if kind == "nul":
        rows[row][col] = "1\x002"
        return rows, "line"
    if kind == "few_rows":
        return rows[:draw(st.integers(2, 300))], "too few rows"
    return rows[:1], "too few rows"


@pytest.fixture(scope="module")
def base_rows(base_csv) -> list[list[str]]:
    return read_rows(base_csv)


@FUZZ
@given(data=st.data())
def test_fuzzed_csv_is_refused_with_a_line_naming_file_and_place(base_rows, data):
    content, expected = data.draw(broken_csvs(base_rows))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "input.csv"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            write_rows(path, content)
        error = run_refused(as_cli_args(csv_overrides(path, Path(tmp))), Path(tmp))
        assert str(path) in error and expected in error, error


def test_data_path_that_is_a_directory(tmp_path):
    for source in ("csv", "builtin"):
        overrides = small_overrides(tmp_path, tmp_path, "dir") + [("data.source", source)]
        assert "is a directory" in run_refused(as_cli_args(overrides), tmp_path)


def test_builtin_cache_where_it_cannot_be_written(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    overrides = small_overrides(blocker / "data.csv", tmp_path, "nowhere")
    assert "part of the folder path is a file" in run_refused(as_cli_args(overrides), tmp_path)


def test_builtin_cache_is_generated_where_data_path_says_and_the_log_says_so(tmp_path, caplog):
    target = tmp_path / "cache" / "mine.csv"
    config = DataConfig(source="builtin", path=str(target))
    config.builtin.start_date, config.builtin.end_date = "2000-01-01", "2000-03-01"
    with caplog.at_level(logging.INFO):
        assert ensure_dataset(config) == target
    assert target.is_file()
    assert f"{target} does not exist: generating the built-in dataset" in caplog.text


# --- a few real processes: the exit status and stderr a user sees ------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("case", ["binary_csv", "mixed_keys", "nan_lr"])
def test_entry_point_process_prints_one_line_and_exits_2(base_csv, tmp_path, case):
    overrides = csv_overrides(base_csv, tmp_path)
    args = []
    if case == "binary_csv":
        binary = tmp_path / "image.csv"
        binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe" * 10)
        overrides.append(("data.path", str(binary)))
    elif case == "mixed_keys":
        config = tmp_path / "mixed.yaml"
        config.write_text("optim:\n  lr: 0.001\n  3: fast\n")
        args = ["--config", str(config)]
    else:
        overrides.append(("optim.lr", ".nan"))
    result = run_cli(args + as_cli_args(overrides), timeout=300, cwd=REPO)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert not (tmp_path / "logs").exists() and not (tmp_path / "checkpoints").exists()
