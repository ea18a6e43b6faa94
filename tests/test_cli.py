"""trainer/cli.py: --help shows what each flag takes and its default; mistakes on the command
line are one line, exit 2, with the flag that was meant."""
from __future__ import annotations

import pytest

from trainer import cli
from trainer.config import Config


def parse(capsys, argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as stop:
        cli.parse_args(argv)
    out = capsys.readouterr()
    return stop.value.code, out.out, out.err


def test_help_shows_allowed_values_and_defaults(capsys):
    status, out, _ = parse(capsys, ["--help"])
    text = " ".join(out.split())
    assert status == 0
    assert "--precision {auto,fp32,bf16,fp16}" in text
    assert "one of auto, fp32, bf16, fp16 (default: auto)" in text
    assert f"sets train.epochs (default: {Config().train.epochs})" in text
    assert f"sets data.batch_size (default: {Config().data.batch_size})" in text
    assert "sets diagnostics.enable_attention_logging: true (default: false)" in text
    assert "75 stopped on a signal" in text


@pytest.mark.parametrize("argv, meant", [
    (["--max-steps", "100"], "--max_steps"), (["--max-steps=100"], "--max_steps"),
    (["--experiment-name", "x"], "--experiment_name"), (["--max_step", "1"], "--max_steps"),
    (["--enable-attention-logging"], "--enable_attention_logging")])
def test_a_near_miss_flag_names_the_flag_meant(capsys, argv, meant):
    status, out, err = parse(capsys, argv)
    assert status == 2 and not out
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert f"did you mean {meant}?" in err


def test_abbreviations_are_not_taken_for_flags(capsys):
    """With abbreviations on, argparse would read --max as --max_steps without a word."""
    status, _, err = parse(capsys, ["--max", "5"])
    assert status == 2 and "unrecognized argument --max" in err


def test_a_bad_value_is_one_line(capsys):
    status, _, err = parse(capsys, ["--precision", "fp8"])
    assert status == 2 and err.count("\n") == 1 and "invalid choice: 'fp8'" in err
