"""argparse types and warning output shared by the command lines; free of torch, which
``predict.py`` does not import to run an exported (ONNX) model."""
import argparse
import warnings
from contextlib import contextmanager

INTERRUPTED_STATUS = 130  # the exit status of a command stopped by Ctrl-C, as a shell reports a SIGINT (128 + 2)


def path_argument(value):
    """argparse type of a path option: ``value``, refused when empty (an unset shell variable would
    otherwise mean the current folder)."""
    if not value.strip():
        raise argparse.ArgumentTypeError('an empty path (an unset variable in the command?)')
    return value


@contextmanager
def one_line_warnings(prog):
    """Inside: warnings print as one line ``prog: warning: message`` (instead of the file, line
    number and source line of the code that warned). Usable as a decorator of a command's main."""
    formatwarning = warnings.formatwarning
    warnings.formatwarning = lambda message, *rest, **kwargs: f'{prog}: warning: {message}\n'
    try:
        yield
    finally:
        warnings.formatwarning = formatwarning
