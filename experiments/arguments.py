"""argparse types shared by the command lines; free of torch, which ``predict.py`` does not
import to run an exported (ONNX) model."""
import argparse


def path_argument(value):
    """argparse type of a path option: ``value``, refused when empty (an unset shell variable would
    otherwise mean the current folder)."""
    if not value.strip():
        raise argparse.ArgumentTypeError('an empty path (an unset variable in the command?)')
    return value
