"""Decision thresholds of a trained model from normal images only, stored with the model.

    python -m experiments.thresholds -m MODEL.pt [-d DATA_DIR | -i IMAGES ...] [--fpr 0.01]
                                     [--flip-average] [--batch-size B] [--device D] [-o OUT.pt]

The normal images are, by default, the model's held-out normal training images (models trained
with a validation set hold out a fraction of ``train/good`` and never see it: ``meta['held_out']``,
``self_sup_data.validation.holdout_indices``), else all of its normal training images (which it
was trained on: their scores are lower than those of new normal images, and the thresholds flag
more than ``fpr`` of those). They come from ``DATA_DIR/<category>/train/good`` (default: the data
folder the model was trained on; a ``-d`` of other images gives them as ``normal images of
DATA_DIR``); ``-i`` takes other normal images instead. No test image is read.
Images unlike the model's training images in shape or contrast are noted in warnings, as
``predict.py`` notes them (``Detector.shape_notes``, ``Detector.contrast_notes``).

The image threshold flags at most the fraction ``fpr`` (default 1%) of these images by their
score (the map's mean), the pixel threshold at most ``fpr`` of their pixels (maps at the model's
resolution; for objects, the pixels of the central crop that the model scores, the rest of their
maps being 0; ``metrics.threshold_at_fpr``). They are stored in the checkpoint's meta as plain
values, ``thresholds = dict(image, pixel, fpr, flip_average, images, source)``; the checkpoint is
rewritten atomically (or written to ``-o``) and stays loadable with ``weights_only=True``.
``predict.py``, ``experiments.detector`` and exported models use them, and the evaluation reports
precision, recall and F1 at them.
"""
import argparse
import itertools
import math
import os
import shlex
import sys
import warnings
from pathlib import Path

import torch

from experiments import metrics
from experiments.arguments import one_line_warnings, path_argument
from experiments.atomic import save_torch_atomic
from experiments.checkpoints import read_meta
from experiments.chest_xray_tasks import trained_names
from experiments.cli import exit_on_input_error, exit_on_interrupt
from experiments.detector import Detector
from experiments.export import FORMATS, default_export_path
from self_sup_data.images import image_files
from experiments.validation import held_out_indices
from self_sup_data.layouts import (FolderLayout, contents_sha256, detect_layout, identical_files, layout_from_spec,
                                   names_sha256)
from self_sup_data.mvtec import train_files
from self_sup_data.images import central_box

PROG = 'python -m experiments.thresholds'
DEFAULT_FPR = 0.01
TRAINING_IMAGES = 'normal training images'  # the source of a model's thresholds when it held out none


def normal_image_files(meta, data_dir=None):
    """(files, source) of the normal images a model's thresholds come from: its held-out normal
    training images when it has them, else all its normal training images, in ``data_dir``
    (default ``meta['data_dir']``) read in the layout the model was trained on (``meta['layout']``,
    e.g. the folder format, which needs no ``data_dir``). The held-out images are found again by
    their index, so the images it was trained on must be those named in the model
    (``train_files_sha256``, where it has it). A ``data_dir`` of other images than the model was
    trained on (``are_training_images``) gives them as ``normal images of <data_dir>``."""
    layout = layout_from_spec(meta.get('layout'))
    in_folders = layout is not None and layout.name == 'folder'
    if in_folders and data_dir is not None:
        raise ValueError(f"-d {data_dir} is not read for a model of the folder format, whose "
                         f"normal images are the model's --normal folder; pass other normal "
                         f"images with -i")
    data_dir = data_dir or meta.get('data_dir')
    if meta.get('dataset', 'mvtec') != 'mvtec':
        raise ValueError(f"this model was trained on {meta['dataset']} images from a list, not an "
                         f"MVTec-layout folder: pass normal images it has not seen with -i")
    if data_dir is None and not in_folders:
        raise ValueError('this model does not name its MVTec-layout data folder; pass -d DATA_DIR '
                         'or normal images with -i')
    files = train_files(data_dir, meta['category'], layout)
    if not meta.get('held_out'):
        return files, TRAINING_IMAGES if are_training_images(meta, files) else (
            f'normal images of {layout.normal if in_folders else data_dir}')
    try:
        indices = held_out_indices(files, meta, data_dir or 'the folder format')
    except ValueError as error:
        raise ValueError(f'{error}; pass normal images it has not seen with -i') from None
    return [files[index] for index in indices], 'held-out normal training images'


def are_training_images(meta, files):
    """Whether ``files`` are the images the model of ``meta`` was trained on, by their names
    (``train_files_sha256``), then their contents (``train_contents_sha256``, read only where the
    names match), as far as it recorded them (a model that recorded neither: taken to be)."""
    if meta.get('train_files_sha256') not in (None, names_sha256(files)):
        return False
    return meta.get('train_contents_sha256') in (None, contents_sha256(files))


def training_images(meta):
    """Resolved paths of the images the model of ``meta`` was trained on, as far as they can be
    found: a chest X-ray model's training images (``trained_names``), an MVTec-layout model's
    normal training images in its data folder less those it held out; an empty set where they
    cannot be found (a data folder moved or changed since)."""
    data_dir = meta.get('data_dir')
    try:
        if meta.get('dataset') == 'chest_xray':
            names = trained_names(meta) or []
            return {(Path(data_dir) / name).resolve() for name in names} if data_dir else set()
        files = train_files(data_dir, meta['category'], layout_from_spec(meta.get('layout')))
        held_out = set(held_out_indices(files, meta, data_dir))
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    trained = [path for index, path in enumerate(files) if index not in held_out]
    if meta.get('train_files_sha256') not in (None, names_sha256(trained)):
        return set()  # images added, removed or renamed since
    return {Path(path).resolve() for path in trained}


def normal_test_images(meta):
    """Resolved paths of the normal test images of the model of ``meta``, as far as they can be
    found: the fifth of the normal images that the folder format holds out, or the 'good' test images
    of its category in its data folder, in its layout (its test folders' own warnings silenced); an
    empty set where they cannot be listed (a data folder moved, a test set the layout refuses) and
    for chest X-rays, whose test lists are given to the evaluation."""
    if meta.get('dataset') == 'chest_xray':
        return set()
    layout = layout_from_spec(meta.get('layout'))
    try:
        with warnings.catch_warnings():  # the test folders' notes are the evaluation's to give
            warnings.simplefilter('ignore')
            if isinstance(layout, FolderLayout):
                files = layout.normal_test_files()
            else:
                data_dir = meta['data_dir']
                tested = (layout or detect_layout(data_dir, meta['category'])).test_files(data_dir, meta['category'])
                files = [path for path, kind in zip(tested.paths, tested.defect_types) if kind == 'good']
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {Path(path).resolve() for path in files}


def warn_test_images(meta, files):
    """Warn where the normal ``files`` given for the thresholds include the model's normal test
    images (``normal_test_images``; by their paths, not copies): the evaluation's precision and
    recall at the thresholds would then be measured on images that set them."""
    tested = normal_test_images(meta)
    seen = [str(path) for path in files if Path(path).resolve() in tested]
    if seen:
        warnings.warn(f"{len(seen)} of the {len(files)} given normal images are normal test images of the model's "
                      f"data, e.g. {seen[:2]}: the evaluation's precision and recall at these thresholds would be "
                      f"measured on images that set them; give normal images outside its test set")


def warn_trained_on(meta, files, source='given normal images'):
    """Warn where the normal ``files`` (named ``source`` in the message) include images the model
    was trained on (``training_images``), or copies of them (the same bytes:
    ``layouts.identical_files``; only their paths where a file cannot be read), whose scores are
    lower than those of new normal images."""
    trained = training_images(meta)
    try:
        seen = [str(path) for path, _ in identical_files(files, sorted(trained))]
    except OSError:
        seen = [str(path) for path in files if Path(path).resolve() in trained]
    if seen:
        warnings.warn(f"{len(seen)} of the {len(files)} {source} are images the model was trained on (or copies "
                      f"of them), e.g. {seen[:2]}: their scores are lower than those of new normal images, and the "
                      f"thresholds flag more than the FPR of these; give normal images it has not seen")


def calibrate(detector, images, fpr=DEFAULT_FPR, flip_average=False):
    """Thresholds (dict of plain values, see the module docstring) from normal ``images``."""
    if not images:
        raise ValueError('calibration needs at least one normal image')
    maps = detector.maps(images, flip_average, progress=True)
    scored = maps[(slice(None),) + central_box(maps.shape[1:], detector.spec.get('crop'))]
    return dict(image=metrics.threshold_at_fpr(metrics.image_scores(maps, 'mean'), fpr),
                pixel=metrics.threshold_at_fpr(scored, fpr), fpr=float(fpr),
                flip_average=bool(flip_average), images=len(images))


def store_thresholds(path, thresholds, out_path=None):
    """Write the checkpoint ``path`` with ``thresholds`` in its meta to ``out_path`` (default:
    ``path``; where it is a symbolic link to the model ``path``, to that file: the link stays; a link to
    another file is replaced), atomically; returns the written path."""
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    checkpoint['meta']['thresholds'] = dict(thresholds)
    target = Path(out_path or path)
    if target.is_symlink() and target.exists() and os.path.samefile(target, path):  # in place, through a link
        target = Path(os.path.realpath(target))
    return save_torch_atomic(checkpoint, target)


def warn_earlier_exports(*model_paths):
    """Warn once for each export of the checkpoint at ``model_paths`` (the file written, and the link it
    was written through) at its default name (``default_export_path``), made before its thresholds were
    stored: it carries the thresholds its model had then (or none), by which predict.py would flag
    images with an ONNX export."""
    warned = set()
    for model_path, fmt in itertools.product(model_paths, FORMATS):
        export_path = default_export_path(model_path, fmt)
        if export_path.is_file() and os.path.realpath(export_path) not in warned:
            warned.add(os.path.realpath(export_path))
            uses = ('predict.py with it decides by those its model had then, or makes no decisions'
                    if fmt == 'onnx' else 'its spec holds those its model had then, or none')
            options = ', with the options it was exported with (--dynamic-size ...)' if fmt == 'onnx' else ''
            warnings.warn(f"{export_path} was exported before these thresholds were stored and does not carry "
                          f"them ({uses}); export the model again{options}: python -m experiments.export "
                          f"-m {shlex.quote(str(model_path))} --format {fmt}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split('\n\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('-m', '--model', type=path_argument, required=True, help='a trained model (final_*.pt)')
    source = parser.add_mutually_exclusive_group()
    source.add_argument('-d', '--data-dir', type=path_argument,
                        help='MVTec-layout root folder (default: the one the model was trained on)')
    source.add_argument('-i', '--input', type=path_argument, nargs='+',
                        help='normal images instead (folders, glob patterns or files)')
    parser.add_argument('--fpr', type=float, default=DEFAULT_FPR,
                        help=f'false-positive rate on the normal images (default: {DEFAULT_FPR})')
    parser.add_argument('--flip-average', action='store_true',
                        help='thresholds for flip-averaged maps (textures; predict with it too)')
    parser.add_argument('--batch-size', type=int, default=16, help='default: 16')
    parser.add_argument('--device', default='cpu', help="default: 'cpu'")
    parser.add_argument('-o', '--out', type=path_argument,
                        help='write the calibrated model here (default: in place)')
    return parser.parse_args(argv)


@one_line_warnings(PROG)
def main(argv=None):
    args = parse_args(argv)
    with exit_on_interrupt(PROG, 'no thresholds were stored'), exit_on_input_error(PROG):
        if not 0 <= args.fpr < 1:
            raise ValueError(f'--fpr must be in [0, 1), got {args.fpr}')
        if Path(args.model).suffix.lower() == '.onnx':
            raise ValueError(f'{args.model}: calibrate the checkpoint (.pt), then export it')
        if args.out is not None and Path(args.out).suffix.lower() == '.onnx':
            raise ValueError(f'-o {args.out}: the calibrated model is a checkpoint; write it as .pt, '
                             f'then export it (python -m experiments.export)')
        detector, meta = Detector.load(args.model, args.device, args.batch_size), read_meta(args.model)
        if args.input:
            files, source = image_files(args.input), 'given normal images'
        else:
            files, source = normal_image_files(meta, args.data_dir)
        if source != TRAINING_IMAGES:  # (all the training images: the docstring says what that does)
            warn_trained_on(meta, files, source)
        if args.input:
            warn_test_images(meta, files)
        images = [detector.read(path) for path in files]
        for note in (detector.shape_notes(files, [image.shape for image in images])
                     + detector.contrast_notes(files, images)):  # as predict.py notes them
            warnings.warn(note)
        thresholds = calibrate(detector, images, args.fpr, args.flip_average)
        thresholds['source'] = source
        path = store_thresholds(args.model, thresholds, args.out)
        warn_earlier_exports(path, args.out or args.model)  # exports made of a link lie beside it
    print(f"thresholds from {len(files)} {source} at FPR {args.fpr:g}: image (map mean) "
          f"{thresholds['image']:.6g}, pixel {thresholds['pixel']:.6g}; stored in {path}")
    if source == TRAINING_IMAGES:
        print(f"{PROG}: note: the model was trained on these images, and scores them lower than new normal images: "
              f"the thresholds flag somewhat more than {args.fpr:g} of new ones; normal images it has not seen set "
              f"them right (-i, or the images a model trained with --val-fraction holds out)", file=sys.stderr)
    if args.fpr > 0 and metrics.allowed_above(args.fpr, len(files)) == 0:
        print(f"{PROG}: note: at FPR {args.fpr:g}, {len(files)} images allow none of them to be flagged: the image "
              f"threshold lies above all their scores, and it flags new normal images at a rate of about "
              f"1/{len(files) + 1}, not {args.fpr:g}; {math.ceil(1 / args.fpr)} images or more give that rate",
              file=sys.stderr)
    return thresholds


if __name__ == '__main__':
    main()
