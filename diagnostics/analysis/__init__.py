"""Offline analysis of a run folder: load and validate (load), judge (thresholds, rules,
findings), draw (plots), summarise (summary, console, report); run.py ties them together and
cli.py is the command line."""
