"""The one exception type for mistakes in the user's input (config, data, paths).

The command-line entry points print these as one line and exit with status 2, no traceback.
"""
import reprlib


class UserError(ValueError):
    """Bad user input; the message names the file, key, column or value at fault."""


class _BoundedRepr(reprlib.Repr):
    """repr that stops at a few items per container and a few levels, and never converts a
    huge integer to decimal (slow, and refused past 4300 digits)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxlist, self.maxtuple, self.maxdict = 3, 6, 6, 6
        self.maxset = self.maxfrozenset = self.maxdeque = self.maxarray = 6
        self.maxstring = self.maxother = self.maxlong = 80

    def repr_int(self, value: int, level: int) -> str:
        if value.bit_length() > 256:
            return f"<an integer of {value.bit_length()} bits>"
        return super().repr_int(value, level)


_BOUNDED_REPR = _BoundedRepr()


def short_repr(value) -> str:
    """A value for a one-line message, at most 80 characters, in time and memory bounded
    whatever the value (a fuzzed, crafted or mistaken one may be huge or deeply nested)."""
    text = _BOUNDED_REPR.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


EXIT_WRITE_FAILED = 74   # EX_IOERR (sysexits.h)


class WriteFailed(Exception):
    """A file of the run could not be written (full disk, quota, read-only filesystem).

    Raised on every rank at once (after they agree), so none is left waiting in a collective;
    the command-line entry point prints it as one line and exits with EXIT_WRITE_FAILED. The
    newest complete checkpoint is untouched: the run resumes with `--resume auto` once the
    cause is fixed."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's text, or its type's name when it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
