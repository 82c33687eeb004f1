"""argparse types and warning output shared by the command lines; free of torch, which
``predict.py`` does not import to run an exported (ONNX) model."""
import argparse
import numbers
import warnings
from contextlib import contextmanager

from self_sup_data.images import BIT_DEPTH_RULE

INTERRUPTED_STATUS = 130  # the exit status of a command stopped by Ctrl-C, as a shell reports a SIGINT (128 + 2)


def path_argument(value):
    """argparse type of a path option: ``value``, refused when empty (an unset shell variable would
    otherwise mean the current folder)."""
    if not value.strip():
        raise argparse.ArgumentTypeError('an empty path (an unset variable in the command?)')
    return value


def bit_depth_argument(value):
    """argparse type of --bit-depth: an integer from 8 to 16."""
    if not value.strip().isdigit() or not 8 <= int(value) <= 16:
        raise argparse.ArgumentTypeError(f'an integer from 8 to 16 (bits of the data), got {value!r}')
    return int(value)


def intensity_argument(value):
    """argparse type of an --intensity-range bound: a 16-bit value, an integer from 0 to 65535."""
    if not value.strip().isdigit() or not 0 <= int(value) < 2 ** 16:
        raise argparse.ArgumentTypeError(f'an integer from 0 to 65535 (a 16-bit value), got {value!r}')
    return int(value)


def add_image_reading_arguments(parser):
    """--bit-depth or --intensity-range: how a training command reads 16-bit image files."""
    reading = parser.add_mutually_exclusive_group()
    reading.add_argument('--bit-depth', type=bit_depth_argument, metavar='BITS',
                         help='bits of the data in 16-bit image files (8 to 16), from which they are scaled to '
                              f'8 bits; stored with the model for its test and new images (default: {BIT_DEPTH_RULE} '
                              'among the training images)')
    reading.add_argument('--intensity-range', type=intensity_argument, nargs=2, metavar=('LOW', 'HIGH'),
                         help='read 16-bit image files by mapping the values LOW..HIGH onto 0..255 (values outside '
                              'saturate), for data that uses a small part of the 16-bit range; stored with the model '
                              'for its test and new images (default: by the bit depth)')


def check_image_reading(parser, args):
    """Refuse (``parser.error``) an --intensity-range whose LOW is not below its HIGH."""
    if args.intensity_range and args.intensity_range[0] >= args.intensity_range[1]:
        parser.error(f"argument --intensity-range: LOW must be below HIGH, got {args.intensity_range[0]} "
                     f"{args.intensity_range[1]}")


def reading_option(reading):
    """The option that gives an image ``reading`` (``image_reading``): ``--bit-depth BITS`` or
    ``--intensity-range LOW HIGH``."""
    return (f"--bit-depth {reading}" if isinstance(reading, numbers.Integral)
            else f"--intensity-range {reading[0]} {reading[1]}")


def image_reading(args):
    """How 16-bit images are read (``self_sup_data.images.to_uint8``): --bit-depth's bits,
    --intensity-range's window [low, high], or None (the training images' bit depth)."""
    return args.bit_depth or (args.intensity_range and list(args.intensity_range))


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
