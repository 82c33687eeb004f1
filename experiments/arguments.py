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
    number and source line of the code that warned), each text once (a check before training and
    the evaluation after it list the same test set, and a library's change of the warning filters
    between them makes Python show a warning again). Usable as a decorator of a command's main."""
    formatwarning, showwarning = warnings.formatwarning, warnings.showwarning
    shown = set()

    def show_once(message, *rest, **kwargs):
        if str(message) not in shown:
            shown.add(str(message))
            showwarning(message, *rest, **kwargs)
    warnings.formatwarning = lambda message, *rest, **kwargs: f'{prog}: warning: {message}\n'
    warnings.showwarning = show_once
    try:
        yield
    finally:
        warnings.formatwarning, warnings.showwarning = formatwarning, showwarning
