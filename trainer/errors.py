"""The one exception type for mistakes in the user's input (config, data, paths).

The command-line entry points print these as one line and exit with status 2, no traceback.
"""


class UserError(ValueError):
    """Bad user input; the message names the file, key, column or value at fault."""


EXIT_WRITE_FAILED = 74   # EX_IOERR (sysexits.h)


class WriteFailed(Exception):
    """A file of the run could not be written (full disk, quota, read-only filesystem).

    Raised on every rank at once (after they agree), so none is left waiting in a collective;
    the command-line entry point prints it as one line and exits with EXIT_WRITE_FAILED. The
    newest complete checkpoint is untouched: the run resumes with `--resume auto` once the
    cause is fixed."""
