"""Score and map new, unlabelled images with a trained (or exported) model.

    python predict.py -m MODEL.pt -i INPUT [INPUT ...] -o OUT_DIR [--batch-size B] [--device D]
                      [--flip-average] [--overwrite]
    python predict.py --onnx MODEL.onnx -i INPUT -o OUT_DIR        # ONNX Runtime, no PyTorch

INPUT: folders (their image files, not their subfolders'), glob patterns (quote them; '**' for any
depth of folders, 'DIR/**/*.png') or files (with --overwrite, not the earlier run's overlays and
masks); any size, grey or colour
(a grey model takes colour images as their luminance, a colour model grey images as three equal
channels). Each image is prepared as the evaluation prepares test images and its map is resized
back to the image's own pixels (``experiments.detector``); images unlike the model's training
images in aspect ratio or size are counted in a warning (``Detector.shape_notes``), and so are
images of far less contrast (``Detector.contrast_notes``: e.g. a 16-bit file whose data has fewer
bits than the training images'), each also written to shape_notes.txt. OUT_DIR gets

    scores.csv              file, output name (the file's stem; bytes of a name that are not
                            UTF-8 written as \\xNN), score_mean, score_max, anomalous (score_mean
                            above the model's image threshold; empty when the model is not
                            calibrated)
    maps/<name>.npy         the map at the image's size (float32)
    overlays/<name>.png     the map as a heatmap over the image
    masks/<name>.png        pixels above the model's pixel threshold at its resolution, resized
                            (0/255; calibrated models; ``Detector.predict``)
    errors.csv              the files that could not be read (or their outputs not written), and why
    shape_notes.txt         the warnings about the images unlike the training images, one a line
                            (only where there are some)

Every file is written atomically, and scores.csv and errors.csv after each batch, so that an
interrupted run keeps what it wrote (the output names of the batch being written are kept in
.pending until scores.csv lists them). An unreadable file is listed in errors.csv and skipped; the
exit status is the number of such files (at most 100), or 101 when the run could not start (bad
arguments, a missing or unreadable model, an input that does not exist or holds no images, an
OUT_DIR with an earlier run's scores.csv or .pending unless --overwrite, which deletes the earlier
run's files once the model and the inputs are found: its scores.csv, errors.csv, shape_notes.txt and .pending, and
the map, overlay and mask of each image they list; no other file, so OUT_DIR may hold the user's
own, and an image whose output name would replace one of them gets the next free name ``<stem>-2``
...) or was stopped by a model that gave NaN or infinite maps (a diverged or damaged model; the
batches before it are written); 130 after Ctrl-C, with one line saying what was kept.
"""
import argparse
import contextlib
import csv
import io
import os
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from experiments.arguments import INTERRUPTED_STATUS, one_line_warnings, path_argument
from experiments.atomic import (remove_stale_temporaries, signals_held, write_atomic, write_failure_reason,
                                write_text_atomic)
from experiments.detector import Detector, NonFiniteMapError
from experiments.inference import contrast_notes, prepared_span, warn_flip_average_mismatch
from self_sup_data.images import image_files, to_channels

PROG = 'predict.py'
MAX_FAILED_STATUS = 100
STOPPED_STATUS = 101
SCORE_COLUMNS = ('file', 'output', 'score_mean', 'score_max', 'anomalous')
OVERLAY_ALPHA = 0.5
PENDING = '.pending'  # the output names of the batch being written, until scores.csv lists them
NOTES = 'shape_notes.txt'  # the warnings about images unlike the model's training images (shape, contrast)
RUN_FILES = ('scores.csv', 'errors.csv', NOTES, PENDING)


class StopRun(Exception):
    """An error that stops the run before any image is predicted."""


def heatmap_overlay(image, map_):
    """uint8 RGB ``H x W x 3``: the image blended with the jet colour map of ``map_`` (values
    clipped to 0..1), half and half."""
    heat = cv2.applyColorMap(np.round(np.clip(map_, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    blend = OVERLAY_ALPHA * heat[:, :, ::-1] + (1 - OVERLAY_ALPHA) * to_channels(image, 3)
    return np.round(blend).astype(np.uint8)


def write_png(path, image):
    """uint8 image ``H x W`` or ``H x W x 3`` (RGB) to ``path`` as PNG, atomically."""
    if image.ndim == 3:
        image = image[:, :, ::-1]  # OpenCV writes BGR
    ok, encoded = cv2.imencode('.png', np.ascontiguousarray(image))
    if not ok:
        raise OSError(f'cannot encode {path} as PNG')
    write_atomic(path, lambda f: f.write(encoded.tobytes()))


def write_csv(path, columns, rows):
    """Rows (tuples) under a header to ``path``, atomically."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(columns)
    writer.writerows(rows)
    write_text_atomic(path, text.getvalue())


def printable(text):
    """``text`` (a file name, or a message that holds one) as valid UTF-8: the bytes of a file name
    that is not UTF-8 (which Python keeps as surrogate escapes) are written as ``\\xNN``."""
    try:
        raw = os.fsencode(text)
    except UnicodeEncodeError:  # a surrogate that no file name's byte gave
        raw = text.encode('utf-8', 'backslashreplace')
    return raw.decode('utf-8', 'backslashreplace')


def output_names(files, out_dir):
    """A distinct output name per file: its stem (``printable``), with ``-2``, ``-3`` ... for repeats
    and for names whose map, overlay or mask is already in ``out_dir`` (``output_paths``: a file or
    link of the user's, which this run must not replace; one that cannot be looked at counts as
    free, and its write fails as an error of its image)."""
    names, used = [], set()
    for path in files:
        stem = printable(path.stem)
        name, count = stem, 1
        while name in used or any(os.path.lexists(taken) for taken in output_paths(out_dir, name).values()):
            count += 1
            name = f'{stem}-{count}'
        used.add(name)
        names.append(name)
    return names


def output_paths(out_dir, name):
    """Where the map, overlay and mask of the image with output name ``name`` go."""
    return dict(map=out_dir / 'maps' / f'{name}.npy', overlay=out_dir / 'overlays' / f'{name}.png',
                mask=out_dir / 'masks' / f'{name}.png')


def output_folders(out_dir):
    """The folders of OUT_DIR that hold the outputs of each image (maps/, overlays/, masks/)."""
    return {path.parent for path in output_paths(out_dir, 'any').values()}


def write_outputs(out_dir, name, image, map_, mask):
    """The map (.npy), its overlay and its mask (bool, None: no mask) of one image; on an
    OSError, none of them (``remove_outputs``) and the error is raised."""
    paths = output_paths(out_dir, name)
    try:
        write_atomic(paths['map'], lambda f: np.save(f, map_))
        write_png(paths['overlay'], heatmap_overlay(image, map_))
        if mask is not None:
            write_png(paths['mask'], np.where(mask, 255, 0).astype(np.uint8))
    except OSError:
        remove_outputs(out_dir, name)
        raise


def is_plain_name(name):
    """Whether ``name`` (read from an earlier run's files) is a plain file name, which never
    reaches outside OUT_DIR's folders."""
    return bool(name) and name not in ('.', '..') and Path(name).name == name


def outputs_of(out_dir, names):
    """The paths of the maps, overlays and masks of the output ``names`` (read from an earlier run's
    files) that are plain names (``is_plain_name``): never outside OUT_DIR's folders."""
    return [path for name in names if is_plain_name(name) for path in output_paths(out_dir, name).values()]


def remove_outputs(out_dir, name):
    """Delete the map, overlay and mask of output name ``name`` where they exist (``outputs_of``)."""
    for path in outputs_of(out_dir, [name]):
        with contextlib.suppress(OSError):  # one that cannot be deleted was not written
            path.unlink(missing_ok=True)


def predict_files(detector, files, out_dir, flip_average=False):
    """Predict ``files`` in batches of ``detector.batch_size`` and write OUT_DIR's files (see the
    module docstring) -> (the list of (file, error) of the files that could not be read, the notes
    on images unlike the model's training images)."""
    rows, errors, seen = [], [], []  # seen: (file, shape, span as the network gets it) of each image read
    names = output_names(files, out_dir)
    with tqdm(total=len(files), desc='predicting', unit='image', disable=None) as progress:
        for start in range(0, len(files), detector.batch_size):
            batch = []
            for path, name in zip(files[start:start + detector.batch_size],
                                  names[start:start + detector.batch_size]):
                try:
                    batch.append((path, name, detector.read(path)))
                except (ValueError, OSError) as error:
                    errors.append((printable(str(path)), printable(str(error))))
            if batch:
                images = [image for _, _, image in batch]
                seen += [(printable(str(path)), image.shape, prepared_span(image, detector.spec))
                         for path, _, image in batch]
                if detector.pixel_threshold is None:  # no masks
                    (scores, maps), masks = detector.predict(images, flip_average), [None] * len(batch)
                else:
                    scores, maps, masks = detector.predict(images, flip_average, masks=True)
                write_text_atomic(out_dir / PENDING, ''.join(f'{name}\n' for _, name, _ in batch))
                for index, ((path, name, image), map_, mask) in enumerate(zip(batch, maps, masks)):
                    try:
                        write_outputs(out_dir, name, image, map_, mask)
                    except OSError as error:
                        errors.append((printable(str(path)), printable(f'cannot write its outputs: {error}')))
                        continue
                    mean = scores['mean'][index]
                    decision = '' if detector.threshold is None else bool(mean > detector.threshold)
                    rows.append((printable(str(path)), name, f'{mean:.6g}', f'{scores["max"][index]:.6g}',
                                 decision))
            with signals_held():  # .pending goes as the batch enters scores.csv: it names no image listed there
                write_csv(out_dir / 'scores.csv', SCORE_COLUMNS, rows)
                (out_dir / PENDING).unlink(missing_ok=True)
            write_csv(out_dir / 'errors.csv', ('file', 'error'), errors)
            progress.update(len(files[start:start + detector.batch_size]))
    files_read, shapes, spans = zip(*seen) if seen else ((), (), ())
    notes = detector.shape_notes(files_read, shapes) + contrast_notes(detector.spec, files_read, spans)
    if notes:
        write_text_atomic(out_dir / NOTES, ''.join(f'{note}\n' for note in notes))
    for note in notes:
        warnings.warn(note)
    return errors, notes


def kept_batches(out_dir):
    """Where a stopped run's outputs are: the batches before it in scores.csv, and the one being
    written in .pending where it was stopped while writing one."""
    try:
        pending = f' (and the one being written in {out_dir / PENDING})' if (out_dir / PENDING).exists() else ''
    except OSError:  # a folder that cannot be looked into (perhaps why the run stopped)
        pending = f' (and the one being written in {out_dir / PENDING}, if it is there)'
    return f'the batches before it are in {out_dir / "scores.csv"}{pending}'


def earlier_output_names(out_dir):
    """The output names of the earlier run in ``out_dir``: those in its scores.csv and .pending (a
    killed run's last batch); ValueError for a scores.csv that is not this command's, or files that
    cannot be read."""
    scores, pending = out_dir / 'scores.csv', out_dir / PENDING
    names = []
    try:
        if scores.exists():
            with open(scores, newline='', encoding='utf-8') as file:
                reader = csv.DictReader(file)
                if not {'file', 'output'} <= set(reader.fieldnames or ()):
                    raise ValueError(f"{scores} is not the scores of an earlier run of this command "
                                     f"(columns {reader.fieldnames}, not {', '.join(SCORE_COLUMNS)}); "
                                     f"--overwrite replaces only its own: move it away or choose another "
                                     f"OUT_DIR")
                names = [row.get('output') or '' for row in reader]
        if pending.exists():
            names += pending.read_text(encoding='utf-8').splitlines()
    except (UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f'cannot read the earlier run\'s {scores} or {pending} ({error}); '
                         f'move them away or choose another OUT_DIR') from error
    return names


def remove_earlier_run(out_dir, names=None):
    """Delete the files that the earlier run in ``out_dir`` wrote, so that an --overwrite run
    leaves no map, overlay or mask of an image it does not predict: the outputs
    (``remove_outputs``) of each of its output ``names`` (None: its ``earlier_output_names``), then
    its RUN_FILES, and the temporary files of its killed writes of these. Other files in ``out_dir``
    (the user's, even in maps/, overlays/ or masks/) are kept. ValueError for a scores.csv that is
    not this command's."""
    names = earlier_output_names(out_dir) if names is None else names
    for name in names:
        remove_outputs(out_dir, name)
    for table in RUN_FILES:
        (out_dir / table).unlink(missing_ok=True)
    remove_stale_temporaries(out_dir, lambda name: name in RUN_FILES)  # of a killed run's writes
    outputs = {path.name for path in outputs_of(out_dir, names)}
    for folder in output_folders(out_dir):
        if folder.is_dir():
            remove_stale_temporaries(folder, lambda name: name in outputs)


def without_earlier_outputs(files, out_dir, names=None):
    """``files`` without the overlays and masks of the earlier run in ``out_dir`` (those of its output
    ``names``, None: its ``earlier_output_names``, which an input pattern over a folder above OUT_DIR
    also finds, and which --overwrite deletes; the user's own images there are kept), with a warning
    that counts them; StopRun where no file is left."""
    names = earlier_output_names(out_dir) if names is None else names
    outputs = {os.path.realpath(path) for path in outputs_of(out_dir, names)}
    kept = [path for path in files if os.path.realpath(path) not in outputs]
    if len(kept) < len(files):
        if not kept:
            raise StopRun(f'the inputs hold only the outputs of the earlier run in {out_dir}, which '
                          f'--overwrite deletes')
        print(f'{PROG}: warning: {len(files) - len(kept)} of the input files are outputs of the earlier run '
              f'in {out_dir}, which --overwrite deletes; they are not read as inputs', file=sys.stderr)
    return kept


def start_run(args):
    """(Detector, files, OUT_DIR) of the parsed arguments; StopRun for what stops the run."""
    if args.onnx and not args.onnx.lower().endswith('.onnx'):
        raise StopRun(f'--onnx takes an exported model (.onnx), got {args.onnx}')
    try:
        files = image_files(args.input)
        detector = Detector.load(args.model or args.onnx, device=args.device,
                                 batch_size=args.batch_size)
        if args.flip_average:
            detector.check_flip_average()
    except (ValueError, OSError) as error:
        raise StopRun(str(error)) from error
    out_dir = Path(args.out_dir)
    earlier = [name for name in ('scores.csv', PENDING) if (out_dir / name).exists()]
    if earlier and not args.overwrite:
        raise StopRun(f'{out_dir} holds the results of an earlier run ({", ".join(earlier)}); '
                      'choose another OUT_DIR or pass --overwrite')
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if args.overwrite:
            names = earlier_output_names(out_dir)  # read once, for both
            files = without_earlier_outputs(files, out_dir, names)
            remove_earlier_run(out_dir, names)
    except OSError as error:
        reason = write_failure_reason(out_dir / 'scores.csv', error)  # OUT_DIR, or a folder above it, a file?
        raise StopRun(f'cannot prepare output folder {out_dir}: {reason}') from error
    except ValueError as error:
        raise StopRun(str(error)) from error
    if warn_flip_average_mismatch(detector.thresholds, args.flip_average, detector.source,
                                  ': no decisions and no masks'):  # as the evaluation leaves them out
        detector = Detector(detector.run, {**detector.spec, 'thresholds': None}, detector.source,
                            detector.batch_size)
    elif detector.threshold is None:
        print(f'{PROG}: warning: {detector.source} has no thresholds: no decisions and no masks '
              '(calibrate it with python -m experiments.thresholds)', file=sys.stderr)
    return detector, files, out_dir


class Parser(argparse.ArgumentParser):
    """argparse with STOPPED_STATUS for bad arguments (the exit status counts failed files)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(STOPPED_STATUS, f'{self.prog}: error: {message}\n')


def parse_args(argv=None):
    parser = Parser(prog=PROG, description=__doc__.split('\n\n')[0],
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    epilog=__doc__.split('\n\n', 2)[2])
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument('-m', '--model', type=path_argument,
                       help='a trained model (final_*.pt), or an exported .onnx')
    model.add_argument('--onnx', type=path_argument,
                       help='an exported model (python -m experiments.export), run by ONNX Runtime '
                            'without PyTorch')
    parser.add_argument('-i', '--input', type=path_argument, nargs='+', required=True,
                        help='image folders, glob patterns or files')
    parser.add_argument('-o', '--out-dir', type=path_argument, required=True, help='output folder')
    parser.add_argument('--batch-size', type=int, default=16, help='images per batch (default: 16)')
    parser.add_argument('--device', default='cpu',
                        help="'cpu' (default), 'cuda', ... (PyTorch models only)")
    parser.add_argument('--flip-average', action='store_true',
                        help='average each map with that of the vertically flipped image '
                             '(textures only; calibrate the thresholds the same way)')
    parser.add_argument('--overwrite', action='store_true',
                        help="replace an earlier run in OUT_DIR: its scores.csv, errors.csv, "
                             "shape_notes.txt, .pending and the maps, overlays and masks of the images they list "
                             "are deleted first")
    return parser.parse_args(argv)


@one_line_warnings(PROG)
def main(argv=None):
    """Run the command; returns the exit status (the number of unreadable files, at most 100)."""
    args = parse_args(argv)
    try:
        detector, files, out_dir = start_run(args)
    except StopRun as error:
        print(f'{PROG}: error: {error}', file=sys.stderr)
        return STOPPED_STATUS
    try:
        errors, notes = predict_files(detector, files, out_dir, args.flip_average)
    except NonFiniteMapError as error:
        print(f'{PROG}: error: {error} (the batches before it are in {out_dir / "scores.csv"})',
              file=sys.stderr)
        return STOPPED_STATUS
    except OSError as error:  # a file of the whole run (scores.csv, errors.csv, .pending, the notes)
        print(f'{PROG}: error: {error}; {kept_batches(out_dir)}', file=sys.stderr)
        return STOPPED_STATUS
    except KeyboardInterrupt:
        print(f'{PROG}: interrupted; {kept_batches(out_dir)}; the same command with --overwrite predicts them all '
              f'again', file=sys.stderr)
        return INTERRUPTED_STATUS
    noted = f'; warnings about the images in {out_dir / NOTES}' if notes else ''
    print(f'{len(files) - len(errors)} images predicted, {len(errors)} unreadable '
          f'(listed in {out_dir / "errors.csv"}); scores in {out_dir / "scores.csv"}{noted}')
    return min(len(errors), MAX_FAILED_STATUS)


if __name__ == '__main__':
    sys.exit(main())
