"""`python launch/analyze.py logs/<exp>` or `--log_dir logs/<exp>` (also the `celestial-analyze`
console script).

Writes <log_dir>/analysis/ (plots, gradient_norms.csv, recommendations.json, report.html) and
prints a summary. `--compare logs/a logs/b ...` overlays runs in one report. Bad input (not a
run folder, an unreadable or invalid file) is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from diagnostics.analysis.console import console_summary
from diagnostics.analysis.errors import AnalysisError
from diagnostics.analysis.run import (
    COMPARE_HEADER,
    RunComparison,
    analyze_run,
    compare_row,
    compare_runs,
)
from diagnostics.analysis.thresholds import Thresholds, parse_threshold


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="launch/analyze.py",
        description="Analyse a training run folder: plots, report and recommendations.")
    parser.add_argument("run_dir", type=Path, nargs="?", metavar="LOG_DIR",
                        help="the run folder, e.g. logs/<experiment> (same as --log_dir)")
    parser.add_argument("--log_dir", type=Path, help="the run folder, e.g. logs/<experiment>")
    parser.add_argument("--compare", type=Path, nargs="+", metavar="LOG_DIR",
                        help="overlay these runs (after --log_dir, if given) in one report")
    parser.add_argument("--out", type=Path, help="output folder (default: <log_dir>/analysis, "
                                                 "or <first run>/analysis/compare)")
    parser.add_argument("--threshold", action="append", default=[], metavar="NAME=VALUE",
                        help="override a threshold, e.g. --threshold vanishing=1e-6 (repeatable)")
    parser.add_argument("--list_thresholds", action="store_true",
                        help="print the thresholds and their defaults, then exit")
    args = parser.parse_args(argv)
    if args.run_dir and args.log_dir and args.run_dir != args.log_dir:
        parser.error(f"two run folders given: {args.run_dir} and --log_dir {args.log_dir}")
    args.log_dir = args.log_dir or args.run_dir
    if not (args.log_dir or args.compare or args.list_thresholds):
        parser.error("give a run folder (logs/<experiment>) or --compare logs/a logs/b ...")
    return args


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def _print_compare(c: RunComparison) -> None:
    _print_table([COMPARE_HEADER, *(compare_row(a) for a in c.analyses)])
    print("\nOn test:")
    for comparison in c.on_test:
        print(f"  {comparison.sentence()}")
    if not c.on_test:
        print("  not compared: fewer than two runs have a scored test line")
    print("\nConfig differences:")
    if c.config_rows:
        _print_table([["  key", *c.names], *(["  " + row[0], *row[1:]] for row in c.config_rows)])
    else:
        print("  none: the configs are identical")


def _print_written(paths: list[Path]) -> None:
    folder = paths[-1].parent
    names = ", ".join(str(p.relative_to(folder)) if p.is_relative_to(folder) else str(p)
                      for p in paths)
    print(f"\nWrote {folder}/: {names}")


def run(argv: list[str] | None = None) -> int:
    """Analyse; returns the exit status (0 done, 2 bad input)."""
    args = parse_args(argv)
    try:
        if args.list_thresholds:
            for f in dataclasses.fields(Thresholds):
                print(f"{f.name}={f.default}")
            return 0
        overrides = [parse_threshold(text) for text in args.threshold]
        if args.compare:
            log_dirs = ([args.log_dir] if args.log_dir else []) + args.compare
            comparison, paths = compare_runs(log_dirs, args.out, overrides)
            _print_compare(comparison)
        else:
            analysis, paths = analyze_run(args.log_dir, args.out, overrides)
            print(console_summary(analysis.run, analysis.verdict, analysis.stats,
                                  analysis.findings))
        _print_written(paths)
        return 0
    except AnalysisError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(argv))
