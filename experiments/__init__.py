"""Experiments: one question answered by many training runs compared on the same test windows.

spec (the experiment file and its checks), plan (trials and their commands), from_analysis (an
experiment from a run's recommendations), runner (trials run locally, N at a time), compare
(paired differences over seeds and windows), report (console verdict, results.csv,
experiment.json, report.html), cli (the `celestial-experiment` command).
"""
