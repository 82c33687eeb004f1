"""Evaluation on chest X-rays (NIH ChestX-ray14 or any folder of images with file lists).

The test set is a list of normal and a list of anomalous image names (as written by
``python -m self_sup_data.chest_xray``); images are resized to the side the model was trained at
(meta ``res``, 256 in the paper), and the central square of its training crops' side
(``scored_crop``: 224 at 256) is predicted, the map padded back with zeros (as the paper's
evaluation does, and as for MVTec objects, see ``experiments.prediction``): the model never saw
the border that its training crops leave out (text markers, the collimator's edges).

Image AUROC and AP use the mean of the anomaly map as the image score (the paper); pixel AUROC,
AP and AU-PRO are computed when NIH's bounding boxes (``BBox_List_2017.csv``) are given, over the
normal images and the anomalous images that have a box. Results over settings and seeds are tabulated as for MVTec
(``experiments.tables``), one row per test set; test sets evaluated one after another into one
folder make one table (``write_report``).

    python -m experiments.chest_xray_tasks -m MODEL_DIR -d DATA_DIR -o OUT_DIR \
        -l NORMAL_TEST_LIST ANOMALOUS_TEST_LIST [--bbox-csv BBox_List_2017.csv] [-s SETTING ...]
"""
import hashlib
import math
import re
import warnings
from pathlib import Path

from tqdm import tqdm

from experiments import tables
from experiments.checkpoints import (CHECKPOINT_PATTERN, check_one_model_per_seed, failure_reason,
                                     find_checkpoints, model_seed, read_model, select_checkpoints,
                                     setting_from_path, sort_records, warn_replaced_models, warn_unlike_seeds,
                                     model_checksums)
from experiments.arguments import path_argument
from experiments.cli import add_evaluation_options, evaluation_parser, run_evaluation
from experiments.plotting import figure_path, plot_test_examples
from experiments.prediction import evaluate, undefined_note
from experiments.settings import parse_setting
from experiments.training import resolve_device
from self_sup_data.chest_xray import (SelfSupChestXRay, check_test_lists, chest_recipe, list_label, listed_paths,
                                     read_bbox_table, read_file_list)
from self_sup_data.layouts import names_sha256, warn_copies

DATASET = 'chest_xray'
NIH_NAME = re.compile(r'(\d{8})_\d{3}\.png')  # NIH ChestX-ray14 image names: patient, follow-up
DEFAULT_RES = 256
IMAGE_METRICS = ('image_auroc_mean', 'image_ap_mean')
PIXEL_METRICS = ('pixel_auroc', 'pixel_ap', 'au_pro')
METRICS = IMAGE_METRICS + PIXEL_METRICS


def load_test_set(data_dir, normal_list, anomalous_list, bbox_csv=None, res=DEFAULT_RES, bit_depth=None):
    """The test images of the two lists (names relative to ``data_dir``) at side ``res``; 16-bit
    images read with a model's ``bit_depth`` (that of its training images; None: image by image,
    as ``predict.py`` reads them)."""
    return SelfSupChestXRay(data_dir, normal_list, anomalous_list, bbox_csv=bbox_csv, is_train=False,
                            res=res, bit_depth=bit_depth)


def scored_crop(meta):
    """Side of the central square that a chest X-ray model (its meta) is evaluated on: the side of
    its training crops (``train_size``; from its ``res`` for models that did not store it)."""
    return int(meta.get('train_size') or chest_recipe(meta.get('res', DEFAULT_RES))['train_size'])


def trained_names(meta):
    """The names (relative to the meta's ``data_dir``) of a chest X-ray model's training images:
    ``train_names`` of its meta, or for a model that did not store them, those of its training
    list ``normal_list`` if that is still there and unchanged (``normal_list_sha256``); else None."""
    if meta.get('train_names') is not None:
        return list(meta['train_names'])
    trained_list = meta.get('normal_list')
    if trained_list is None or not Path(trained_list).is_file():
        return None
    names = read_file_list(trained_list)
    return names if names_sha256(names) == meta.get('normal_list_sha256') else None


def nih_patients(names):
    """{name: patient} of the names in NIH's form ``PPPPPPPP_FFF.png`` (patient, follow-up)."""
    return {name: match[1] for name in names if (match := NIH_NAME.fullmatch(Path(name).name))}


def check_not_trained_on(meta, data_dir, test_names, source='this model'):
    """ValueError when test images (names relative to ``data_dir``) are training images of a model
    (``trained_names`` of its meta; relative to its ``data_dir``): scores of images it trained on
    are no test. Images are compared as resolved paths (a folder of other images may reuse the
    names), and images named in NIH's form by their file names (``nih_patients``: unique over the
    dataset, so also in a copied or moved folder). A warning when the training images are not known
    (an older model whose list is gone or was rewritten), and when test images are NIH follow-ups
    of training patients (``nih_patients``)."""
    names = trained_names(meta)
    if names is None:
        warnings.warn(f"cannot check that {source} was not trained on test images: its training list "
                      f"{meta.get('normal_list')} is gone or changed since training, and the model "
                      f"stores no names of its own (trained before they were stored)")
        return
    trained_dir = Path(meta.get('data_dir') or data_dir)
    trained = {(trained_dir / name).resolve() for name in names}
    trained_nih = {Path(name).name for name in nih_patients(names)}
    seen = sorted(name for name in test_names if (Path(data_dir) / name).resolve() in trained
                  or Path(name).name in trained_nih)
    if seen:
        raise ValueError(f"{len(seen)} test images are training images of {source} (its list "
                         f"{meta.get('normal_list')}), e.g. {seen[:3]}; test it on images it has not seen")
    patients = set(nih_patients(names).values())
    followups = sorted(name for name, patient in nih_patients(test_names).items() if patient in patients)
    if followups:
        warnings.warn(f"{len(followups)} test images are of patients that {source} was trained on "
                      f"(NIH names PPPPPPPP_FFF.png), e.g. {followups[:3]}: follow-up images of a training "
                      f"patient make an easier test; split by patient (python -m self_sup_data.chest_xray)")


def test_set_sha256(normal_names, anomalous_names):
    """SHA-256 (hex) of a test set: of the names of its normal and of its anomalous images as their
    lists give them (``read_file_list``: folders within the data folder included, so that ``A/n0.png``
    and ``B/n0.png`` are two images), each list sorted; recorded with its results as
    ``test_lists_sha256``."""
    digests = [hashlib.sha256('\n'.join(sorted(names)).encode()).hexdigest()
               for names in (normal_names, anomalous_names)]
    return hashlib.sha256('\n'.join(digests).encode()).hexdigest()


def test_files_sha256(normal_names, anomalous_names, paths):
    """SHA-256 (hex) of the files of a test set: each listed name with its label and its file's
    size in bytes (``paths``: the files of the normal, then the anomalous names), sorted; recorded
    with its results as ``test_files_sha256``, so that the same lists read from another data folder
    (a converted or downsampled copy) or with images replaced are another test set, wherever the
    data folder lies."""
    labelled = [('normal', name) for name in normal_names] + [('anomalous', name) for name in anomalous_names]
    entries = sorted(f"{label}/{name}:{Path(path).stat().st_size}" for (label, name), path in zip(labelled, paths))
    return hashlib.sha256('\n'.join(entries).encode()).hexdigest()


def warn_copies_of_training_images(meta, data_dir, test_paths, source, checked, digests=None):
    """Warn about test images (``test_paths``) with the bytes of a training image of a model
    (``trained_names`` of its meta, in its ``data_dir``; those that are not there are not compared):
    copies under other names, which ``check_not_trained_on`` does not see (``warn_copies``, the
    message naming ``source``, the model, and its training list). Each set of training images is
    compared once (``checked``: a set of those compared, which calls share; ``digests``: the
    file digests, which they share too): the seeds of a setting are trained on one list."""
    names = trained_names(meta)
    if names is None:  # (check_not_trained_on warns of it)
        return
    trained_dir = Path(meta.get('data_dir') or data_dir).resolve()
    training_set = (trained_dir, names_sha256(names))
    if training_set in checked:
        return
    checked.add(training_set)
    trained = [path for path in (trained_dir / name for name in names) if path.is_file()]
    listed = f" (and any other model trained on {meta['normal_list']})" if meta.get('normal_list') else ''
    warn_copies(f'{source}{listed}', test_paths, trained, 'test images', 'its training images',
                'a model trained on them scores them as seen images', digests)


def bbox_sha256(bbox_csv):
    """SHA-256 (hex) of the box table file ``bbox_csv``, or 'none' without one: the pixel labels of
    a test set (recorded with its results as ``bbox_sha256``)."""
    return 'none' if bbox_csv is None else hashlib.sha256(Path(bbox_csv).read_bytes()).hexdigest()


def check_earlier_results(out_dir, test_name, lists_sha256, boxes_sha256=None, files_sha256=None):
    """ValueError when ``out_dir/results.csv`` holds results that this evaluation would lose or mix
    with its own (``write_report`` keeps the earlier results beside its own): results of other data
    than chest X-rays (an MVTec-layout evaluation's, whose tables these would replace), or of another
    test set under the row name ``test_name``: other image lists (by their recorded
    ``test_lists_sha256``), other files under the same names (``test_files_sha256``; None: not
    compared) or another box table (``bbox_sha256``; None: not compared), whose results and figures
    this one would replace, or mix pixel figures of two box tables in one row. Results recorded
    without a digest (an earlier version's) are taken to match. A results file that cannot be read is
    left to ``write_report`` (it warns)."""
    path = Path(out_dir) / 'results.csv'
    try:
        earlier = tables.read_results(path) if path.is_file() else []
    except ValueError:
        return
    other_data(earlier, path)
    for record in earlier:
        if record['category'] != test_name:
            continue
        if str(record.get('test_lists_sha256', lists_sha256)) != lists_sha256:
            other = 'other image lists'
        elif files_sha256 is not None and str(record.get('test_files_sha256', files_sha256)) != files_sha256:
            other = 'the same image lists of files of other sizes: another data folder (-d), or images replaced'
        elif boxes_sha256 is not None and str(record.get('bbox_sha256', boxes_sha256)) != boxes_sha256:
            other = 'the same images with another box table (--bbox-csv), or with and without one'
        else:
            continue
        raise ValueError(f"{path} holds the results of another test set named {test_name!r} ({other}); "
                         f"name this one apart (--name) or evaluate it into another folder")


def other_data(records, path):
    """ValueError naming the results file ``path`` when some of its ``records`` are not of chest X-rays."""
    other = [record for record in records if record.get('kind') != DATASET]
    if other:
        raise ValueError(f"{path} holds {len(other)} results of other data than chest X-rays (kind "
                         f"{other[0].get('kind')}, e.g. {other[0].get('checkpoint')}); evaluate chest X-rays into "
                         f"a folder of their own")


def evaluate_checkpoints(model_dir, data_dir, normal_list, anomalous_list, bbox_csv=None, settings=None,
                         test_name=None, device=None, batch_size=32, figure_dir=None, out_dir=None):
    """Evaluate the chest X-ray models (meta 'dataset' 'chest_xray') under ``model_dir`` on a test set.

    settings: keys (a key without a seed takes every seed found; None: all found); a requested
    key without a checkpoint gives a row of NaN and a warning. Each checkpoint is evaluated on its
    own: one that cannot be read or evaluated gives a row of NaN with the reason as ``error``
    (an unreadable checkpoint whose path names no setting: a warning), and the others are
    evaluated all the same. test_name: the row name (default: the anomalous list's file stem).
    figure_dir: ``<test_name>_<setting>.png`` of examples for the first seed of each setting.
    out_dir: the folder the results go to (``write_report``), checked before any checkpoint is
    evaluated to hold no other test set of this name and no results of other data
    (``check_earlier_results``); None: not checked. A box table that cannot be read, and a listed
    image that is missing, are the command's error, before any checkpoint is evaluated.
    Returns long-format results (``experiments.tables``): one dict per checkpoint with the metrics of
    ``metrics.evaluate_maps``, its path and the test set's ``test_lists_sha256``, ``test_files_sha256``
    and ``bbox_sha256``. Anomalous images with the bytes of a normal test image, and test images with
    the bytes of a model's training image, are counted in warnings (``warn_copies``).
    """
    device = resolve_device(device)
    if test_name is None:
        test_name = Path(anomalous_list).stem if isinstance(anomalous_list, (str, Path)) else DATASET
    if not test_name.strip() or test_name in ('.', '..') or any(sep in test_name for sep in '/\\'):
        raise ValueError(f"--name must name the test set (a table row and a figure's file name), got {test_name!r}")
    # a missing, empty or contradictory list is the command's error, not each row's
    test_names = [read_file_list(file_list) for file_list in (normal_list, anomalous_list)]
    labels = list_label(normal_list, 'normal'), list_label(anomalous_list, 'anomalous')
    check_test_lists(*test_names, *labels)
    lists_sha256 = test_set_sha256(*test_names)
    if bbox_csv is not None:
        if not Path(bbox_csv).is_file():
            raise FileNotFoundError(f"the bounding-box table {bbox_csv} (--bbox-csv) does not exist")
        read_bbox_table(bbox_csv)
    boxes_sha256 = bbox_sha256(bbox_csv)
    test_paths = listed_paths(data_dir, *test_names, *labels)  # a missing image too, once
    files_sha256 = test_files_sha256(*test_names, test_paths)
    if out_dir is not None:
        check_earlier_results(out_dir, test_name, lists_sha256, boxes_sha256, files_sha256)
    digests, checked = {}, set()  # of the files compared for copies, read once; the training sets compared
    normal_paths, anomalous_paths = test_paths[:len(test_names[0])], test_paths[len(test_names[0]):]
    warn_copies(test_name, anomalous_paths, normal_paths, 'anomalous images', 'normal test images',
                'each counts as normal and as anomalous', digests)
    unreadable = []
    found = find_checkpoints(model_dir, DATASET, unreadable)
    for path, reason in unreadable:
        key = setting_from_path(path)
        if key is None or path.parent.name != DATASET:
            warnings.warn(f'{reason}; skipped (its path names no chest X-ray setting)')
        else:
            found.append((path, dict(setting=key, category=DATASET, error=reason)))
    selected = select_checkpoints(found, settings)
    check_one_model_per_seed(selected)
    warn_replaced_models(selected)
    warn_unlike_seeds(selected)
    plotted, datasets = set(), {}

    def evaluate_one(path, meta, setting):
        if 'error' in meta:
            raise ValueError(meta['error'])
        model, meta = read_model(path, device)
        check_not_trained_on(meta, data_dir, test_names[0] + test_names[1], str(path))
        warn_copies_of_training_images(meta, data_dir, test_paths, str(path), checked, digests)
        depth = meta.get('bit_depth')  # bits, or an intensity window [low, high]
        key = meta.get('res', DEFAULT_RES), tuple(depth) if isinstance(depth, list) else depth
        if key not in datasets:
            datasets[key] = load_test_set(data_dir, normal_list, anomalous_list, bbox_csv, *key)
        values, maps = evaluate(model, datasets[key], batch_size, device, crop_size=scored_crop(meta),
                                return_maps=True)
        figure = figure_dir and figure_path(figure_dir, test_name, setting.seedless_key)
        if figure and figure not in plotted:
            plot_test_examples(datasets[key], maps, figure)
            plotted.add(figure)
        return values if bbox_csv is None else values | undefined_note(datasets[key])

    def record(setting, seed, values, path=None, meta=None):
        return dict(category=test_name, kind=DATASET, setting=setting.seedless_key, seed=seed,
                    **values, checkpoint=path and str(Path(path).resolve()), test_lists_sha256=lists_sha256,
                    test_files_sha256=files_sha256, bbox_sha256=boxes_sha256,
                    weights_sha256=(meta or {}).get('weights_sha256'))

    records = []
    for path, meta in tqdm(selected, desc='evaluating checkpoints', disable=None):
        setting = parse_setting(meta['setting'])
        try:
            values = evaluate_one(path, meta, setting)
        except Exception as error:  # any failure of one checkpoint is its row's, not the run's
            values = dict.fromkeys(METRICS, math.nan) | dict(error=failure_reason(error))
        records.append(record(setting, model_seed(meta), values, path, meta))
    for key in settings or []:
        if not select_checkpoints(selected, [key]):
            warnings.warn(f'no chest X-ray checkpoint for setting {key!r} under {model_dir}: '
                          'its cells are NaN')
            setting = parse_setting(key)
            records.append(record(setting, setting.seed, dict.fromkeys(METRICS, math.nan)))
    return sort_records(records, settings)


def write_report(records, out_dir, percent=False, model_dir=None):
    """Write ``out_dir/results.csv`` and ``out_dir/tables/<metric>.{csv,md,tex}`` (pixel metrics only
    when some result has them) of ``records`` and of the other results already in
    ``out_dir/results.csv`` (other test sets, settings or seeds: those ``records`` do not redo)
    whose checkpoints are there as they were (``tables.earlier_results``: test sets evaluated one
    after another into one folder make one table, a row each; a note counts the others left out, and
    a results file that cannot be read gives a warning, and so do kept results of other models than
    this evaluation's, those under ``model_dir``, in its rows: ``tables.mixed_models``); returns the
    tables ``{metric: DataFrame}``.
    ValueError, and nothing written, where the earlier results are of other data (``other_data``)."""
    redone = {(record['category'], record['setting'], record['seed']) for record in records}
    try:
        kept, left_out = tables.earlier_results(
            Path(out_dir) / 'results.csv',
            lambda record: (record['category'], record['setting'], record['seed']) in redone, model_checksums)
    except ValueError as error:
        warnings.warn(f"{error}; the tables hold this evaluation's results only")
        kept, left_out = [], []
    other_data(kept + left_out, Path(out_dir) / 'results.csv')  # (checked before the evaluation too)
    note = tables.left_out_note(left_out)
    if note:
        warnings.warn(note)
    for text in tables.mixed_models(records, kept, model_dir) if model_dir is not None else ():
        warnings.warn(text)
    records = sort_records(records + kept)
    with_pixels = any(not math.isnan(r.get(m, math.nan)) for r in records for m in PIXEL_METRICS)
    return tables.write_report(records, out_dir, METRICS if with_pixels else IMAGE_METRICS,
                               percent=percent)


def parse_args(argv=None):
    parser = evaluation_parser(
        'python -m experiments.chest_xray_tasks',
        'Evaluate trained chest X-ray models (final_*.pt under MODEL_DIR) on a test set given by '
        'two file lists: writes OUT_DIR/results.csv, OUT_DIR/tables/<metric>.{csv,md,tex} and '
        'OUT_DIR/figures/<name>_<setting>.png.',
        data_help='folder the listed image names are relative to')
    parser.add_argument('-l', '--lists', type=path_argument, nargs=2, required=True,
                        metavar=('NORMAL_LIST', 'ANOMALOUS_LIST'),
                        help='file lists of the normal and the anomalous test images '
                             '(one name per line)')
    parser.add_argument('--bbox-csv', type=path_argument, help="NIH's BBox_List_2017.csv for pixel metrics (optional)")
    parser.add_argument('--name',
                        help="row name of the test set (default: the anomalous list's file name without its "
                             "extension)")
    add_evaluation_options(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run_evaluation(
        args,
        lambda figure_dir: evaluate_checkpoints(
            args.model_dir, args.data_dir, *args.lists, bbox_csv=args.bbox_csv,
            settings=args.settings, test_name=args.name, device=args.device,
            batch_size=args.batch_size, figure_dir=figure_dir, out_dir=args.out_dir),
        lambda records: write_report(records, args.out_dir, percent=args.percent, model_dir=args.model_dir),
        f'no chest X-ray {CHECKPOINT_PATTERN} checkpoints under {args.model_dir} (models of train_mvtec.py '
        f'are evaluated by python -m experiments.mvtec_tasks)')


if __name__ == '__main__':
    main()
