"""The one exception type for mistakes in the user's input (config, data, paths).

The command-line entry points print these as one line and exit with status 2, no traceback.
"""


class UserError(ValueError):
    """Bad user input; the message names the file, key, column or value at fault."""
