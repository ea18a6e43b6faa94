"""The offline analysis's one exception for bad input (a run folder, a file in it, a threshold).

Its command line prints it as one line and exits with status 2, as the trainer does with its own
`trainer.errors.UserError`; the analysis reads JSON and YAML only and imports nothing of the
trainer.
"""


class AnalysisError(ValueError):
    """Bad input to the analysis; the message names the file, folder or threshold at fault."""
