"""Evaluation on MVTec-layout data: predict anomaly maps, score them, tabulate, plot.

Prediction follows the paper. Test images are resized to the category's test side
(``data_recipe(...)['test_res']``, 256 pixels at ``res_scale=1``) and then

- objects: the central ``train_size x train_size`` square (224 at ``res_scale=1``, the size the
  model was trained on) is predicted and the map is padded back to the full size with zeros;
- textures: the whole image is predicted. The network needs sides that are multiples of 32, so
  an image of another size is reflect-padded at its bottom and right up to the next multiple of
  32 and the map is cropped back to the image.

The image score is the mean (the paper) or the maximum (MVTec AD's protocol) of the map; see
``experiments.metrics.evaluate_maps`` for the metrics.

Flip averaging (``--flip-average``, textures only; not in the paper): the map is the mean of the
image's map and the map of its vertical flip, flipped back. The texture training recipe draws that
flip (``data_recipe``), so both views are images of the kind the model was trained on; the objects'
recipe has no flip, and a flipped object would be an image it never saw.

Two-stage variants (``--one-class gde kde ocsvm``, see ``experiments.one_class``): a one-class
model fitted to the encoder features of the category's normal training images, prepared as the
test images (``load_normal_set``), scores each test image (metrics ``image_auroc_pooled``,
``image_ap_pooled``) and, from the patch-level features, each pixel (the heatmap gives the other
metrics). Their results are named after the setting and the model, e.g.
``Shift-Intensity-M+GDE`` (``result_setting``). A classifier setting (``CutPaste-3way``) has no
map of its own: it is evaluated with the one-class models only (default: GDE).

    python -m experiments.mvtec_tasks -m MODEL_DIR -d DATA_DIR -o OUT_DIR \
        [-s SETTING ...] [-n CATEGORY ...] [--one-class gde kde ocsvm] [--flip-average]
        [--paper-layout] [--percent]
"""
import argparse
import functools
import math
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from experiments import metrics, one_class, plotting, tables
from experiments.settings import BASE_SETTINGS, parse_setting
from experiments.training import load_model, resolve_device
from self_sup_data.layouts import add_layout_arguments, layout_from_args, layout_from_spec
from self_sup_data.mvtec import SelfSupMVTecDataset, category_kind, data_recipe
from self_sup_data.transforms import Compose

SIDE_MULTIPLE = 32  # the encoder-decoder downsamples by 32
METRICS = ('image_auroc_mean', 'image_auroc_max', 'image_ap_mean', 'image_ap_max',
           'pixel_auroc', 'pixel_ap', 'au_pro')
CHECKPOINT_PATTERN = 'final_*.pt'
REQUIRED_META = ('setting',)
EXAMPLES_PER_CLASS = 3  # normal and defective test images in a figure
CLASSIFIER_ONE_CLASS = ('gde',)  # how a classifier (CutPaste-3way) is scored without --one-class


def check_flip_average(category, kind, variants, source):
    """ValueError naming ``source`` (a checkpoint, a setting, a test set) when flip averaging does
    not apply to it: an object category (``category_kind(category, kind)``), whose training recipe
    does not flip, or two-stage variants among ``variants`` (see ``result_variants``)."""
    if category_kind(category, kind) == 'object':
        raise ValueError(f'flip averaging is for textures: {source} is of the object category '
                         f'{category!r}, whose training recipe does not flip its images')
    two_stage = [variant for variant in variants if variant is not None]
    if two_stage:
        raise ValueError(f'flip averaging applies to the maps of the encoder-decoder, not to the '
                         f'two-stage variants {two_stage} of {source}')


def paper_crop_size(dataset):
    """Side of the central crop the paper predicts on: ``dataset.train_size`` for objects, else None."""
    return dataset.train_size if getattr(dataset, 'kind', None) == 'object' else None


def predict_batch(model, images, crop_size=None, flip_average=False):
    """Anomaly maps ``B x H x W`` of images ``B x C x H x W`` (see the module docstring).

    ``crop_size``: predict the central ``crop_size`` square and pad the map with zeros (objects);
    None: predict the whole image, reflect-padded to a multiple of 32 (textures).
    ``flip_average``: the mean of the map and the flipped-back map of the vertically flipped images.
    """
    maps = _predict_view(model, images, crop_size)
    if flip_average:
        maps = (maps + _predict_view(model, images.flip(-2), crop_size).flip(-2)) / 2
    return maps


def _predict_view(model, images, crop_size):
    """``predict_batch`` of one view of the images."""
    height, width = images.shape[-2:]
    if crop_size is not None:
        if crop_size > min(height, width):
            raise ValueError(f'crop size {crop_size} is larger than the test images ({height}x{width})')
        top, left = (height - crop_size) // 2, (width - crop_size) // 2
        crop = model(images[..., top:top + crop_size, left:left + crop_size])
        maps = crop.new_zeros(crop.shape[:2] + (height, width))
        maps[..., top:top + crop_size, left:left + crop_size] = crop
    else:
        pad_bottom, pad_right = -height % SIDE_MULTIPLE, -width % SIDE_MULTIPLE
        if pad_bottom or pad_right:
            images = F.pad(images, (0, pad_right, 0, pad_bottom), mode='reflect')
        maps = model(images)[..., :height, :width]
    return maps[:, 0]


def predict(model, dataset, batch_size=32, device='cpu', crop_size='auto', flip_average=False):
    """Predict every test item of ``dataset`` (items ``(image, label, mask)``).

    ``crop_size``: 'auto' -> ``paper_crop_size(dataset)``; None or an int as in ``predict_batch``.
    ``flip_average``: average each map with that of the vertical flip (textures only: ValueError
    for an object category, whose training recipe does not flip).
    Returns (maps float32 N x H x W, labels int N, masks uint8 N x H x W), in dataset order.
    """
    if flip_average:
        check_flip_average(getattr(dataset, 'class_name', None), getattr(dataset, 'kind', None),
                           [None], 'the test set')
    if crop_size == 'auto':
        crop_size = paper_crop_size(dataset)
    device = torch.device(device)
    model.eval()
    maps, labels, masks = [], [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    with torch.no_grad():
        for images, batch_labels, batch_masks in tqdm(loader, 'predicting', leave=False, disable=None):
            maps.append(predict_batch(model, images.to(device), crop_size, flip_average)
                        .float().cpu().numpy())
            labels.append(np.asarray(batch_labels))
            masks.append(batch_masks[:, 0].numpy().astype(np.uint8))
    return np.concatenate(maps).astype(np.float32), np.concatenate(labels), np.concatenate(masks)


def predict_maps(model, dataset, batch_size=32, device='cpu', crop_size='auto', flip_average=False):
    """Anomaly maps (float32 N x H x W) of the test items of ``dataset`` (see ``predict``)."""
    return predict(model, dataset, batch_size, device, crop_size, flip_average)[0]


def evaluate(model, dataset, batch_size=32, device='cpu', crop_size='auto', return_maps=False,
             flip_average=False):
    """Metrics of ``model`` on the test set ``dataset`` (``metrics.evaluate_maps``).

    Image AUROC/AP with the mean and the max of the map as image score, pixel AUROC/AP and
    AU-PRO; the pixel metrics are NaN when no defective image has a mask
    (``dataset.has_mask``). With ``return_maps`` returns (metrics, maps). ``flip_average`` as in
    ``predict``.
    """
    maps, labels, masks = predict(model, dataset, batch_size, device, crop_size, flip_average)
    results = metrics.evaluate_maps(labels, maps, masks, has_mask=getattr(dataset, 'has_mask', None))
    return (results, maps) if return_maps else results


def evaluate_variants(model, dataset, variants, normal_set, batch_size=32, device='cpu',
                      crop_size='auto', source='model', flip_average=False):
    """{variant: (metrics, maps)} of ``model`` on the test set ``dataset`` for each of ``variants``
    (see ``result_variants``): None scores the model's own maps (``evaluate``), a one-class name
    the two-stage model fitted to the normal images ``normal_set()`` (a callable, called only when
    a two-stage variant needs it; see ``one_class.evaluate_two_stage``). ``crop_size`` as in
    ``predict``, for both kinds of variant; ``flip_average`` (``predict``) for the model's own maps
    only: ValueError with a two-stage variant."""
    if flip_average:
        check_flip_average(getattr(dataset, 'class_name', None), getattr(dataset, 'kind', None),
                           variants, source)
    if crop_size == 'auto':
        crop_size = paper_crop_size(dataset)
    results = {}
    if None in variants:
        results[None] = evaluate(model, dataset, batch_size, device, crop_size, return_maps=True,
                                 flip_average=flip_average)
    two_stage = [variant for variant in variants if variant is not None]
    if two_stage:
        results.update(one_class.evaluate_two_stage(
            model, normal_set(), dataset, two_stage, crop_size=crop_size, batch_size=batch_size,
            device=device, source=source))
    return results


# ------------------------------------------------------------------------------ figures

def example_indices(labels, per_class=EXAMPLES_PER_CLASS):
    """Up to ``per_class`` normal and ``per_class`` anomalous items, evenly spread over the test set."""
    labels = np.asarray(labels)
    chosen = []
    for label in (0, 1):
        items = np.flatnonzero(labels == label)
        spread = np.linspace(0, items.size - 1, min(per_class, items.size)).round().astype(int)
        chosen += sorted(set(items[spread].tolist()))
    return chosen


def plot_test_examples(dataset, maps, path, per_class=EXAMPLES_PER_CLASS):
    """Figure of a few normal and defective test images: input, ground truth (unless no defect image
    of the category has a mask) and predicted map."""
    indices = example_indices(dataset.labels, per_class)
    with_masks = dataset.has_mask[dataset.labels == 1].any()
    masks = [dataset.masks[i] if with_masks and dataset.has_mask[i] else None for i in indices]
    titles = [f'{dataset.defect_types[i]}\nmean {maps[i].mean():.3f}, max {maps[i].max():.3f}'
              for i in indices]
    return plotting.plot_examples([dataset.images[i] for i in indices], masks,
                                  [maps[i] for i in indices], titles, path)


def figure_path(figure_dir, category, setting_key):
    """``figure_dir/<category>_<setting without seed>.png``: the examples of a category and setting."""
    return Path(figure_dir) / f'{category}_{setting_key}.png'


def figure_paths(records, figure_dir):
    """The example figures of the results ``records`` that exist in ``figure_dir``, in record order."""
    paths = dict.fromkeys(figure_path(figure_dir, r['category'], r['setting']) for r in records)
    return [path for path in paths if path.is_file()]


# ------------------------------------------------------------------------------ checkpoints

def _read_error(path, error):
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ''
    return ValueError(f'cannot read checkpoint {path}: {type(error).__name__}: {first_line[:200]}')


def read_meta(path):
    """The meta of a checkpoint without loading its weights; ValueError naming an unreadable file."""
    try:
        meta = torch.load(path, map_location='cpu', weights_only=True, mmap=True)['meta']
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError) as error:
        raise _read_error(path, error) from error
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        raise ValueError(f'checkpoint {path} has no {missing} in its meta; '
                         'is it a model of the training scripts?')
    return meta


def read_model(path, device):
    """``training.load_model`` with a ValueError naming an unreadable file."""
    try:
        return load_model(path, device)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError) as error:
        raise _read_error(path, error) from error


def seedless_key(setting):
    """The setting key without its seed, e.g. 'Shift-Intensity-M' (a table column)."""
    return setting.base + ('-M' if setting.mixed else '')


def result_setting(setting, one_class_name=None):
    """The name of a checkpoint's results (a table column): ``seedless_key(setting)``, followed for
    a two-stage variant by its one-class model, e.g. 'Shift-Intensity-M+GDE'."""
    suffix = '' if one_class_name is None else one_class.column_suffix(one_class_name)
    return seedless_key(setting) + suffix


def split_result_setting(name):
    """Inverse of ``result_setting``: 'Shift-M+GDE' -> (Setting of 'Shift-M', 'gde'); 'Shift-M' ->
    (Setting, None). ValueError for an unknown key or one-class model."""
    key, plus, model = name.partition('+')
    if plus:
        one_class.make_one_class(model.lower())  # validates
    return parse_setting(key), model.lower() if plus else None


def result_variants(setting, one_class_names=None):
    """How a checkpoint of ``setting`` is scored: None (its own maps) for the encoder-decoder,
    followed by the one-class models ``one_class_names``; a classifier has no maps and is scored
    by ``one_class_names`` or else ``CLASSIFIER_ONE_CLASS``."""
    names = list(dict.fromkeys(one_class_names or ()))
    if setting.model == 'classifier':
        return names or list(CLASSIFIER_ONE_CLASS)
    return [None] + names


def matches(requested, setting):
    """Whether a checkpoint of ``setting`` belongs to the requested key: same key, or any seed of
    a requested key without a seed."""
    same_task = (requested.base, requested.mixed) == (setting.base, setting.mixed)
    return same_task and (requested.seed is None or requested.seed == setting.seed)


def find_checkpoints(model_dir, dataset='mvtec'):
    """The trained models of ``dataset`` (meta 'dataset': 'mvtec' or 'chest_xray') under
    ``model_dir`` (any depth, ``final_*.pt``) -> list of (path, meta)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f'model folder {model_dir} does not exist; it should hold the '
                                f'{CHECKPOINT_PATTERN} files written by the training scripts')
    found = [(path, read_meta(path)) for path in sorted(model_dir.rglob(CHECKPOINT_PATTERN))]
    return [(path, meta) for path, meta in found if meta.get('dataset', dataset) == dataset]


def select_checkpoints(found, settings=None, categories=None):
    """The (path, meta) of ``found`` whose setting matches one of the keys ``settings`` (see
    ``matches``; None: any) and whose category is in ``categories`` (None: any)."""
    requested = None if settings is None else [parse_setting(key) for key in settings]

    def wanted(meta):
        setting = parse_setting(meta['setting'])
        return ((categories is None or meta['category'] in categories)
                and (requested is None or any(matches(r, setting) for r in requested)))
    return [(path, meta) for path, meta in found if wanted(meta)]


def load_test_set(data_dir, meta, layout=None):
    """The test set of a checkpoint's category, at the resolution and kind it was trained with, in
    ``layout`` (None: the layout in the meta, else detected)."""
    return SelfSupMVTecDataset(data_dir, meta['category'], is_train=False, kind=meta.get('kind'),
                               res_scale=meta.get('res_scale', 1.0),
                               layout=layout or layout_from_spec(meta.get('layout')))


def load_normal_set(data_dir, meta, layout=None):
    """The normal training images of a checkpoint's category prepared as its test images (resized
    to the test side, no augmentation, no synthetic anomalies): what two-stage models are fitted to."""
    category, kind, res_scale = meta['category'], meta.get('kind'), meta.get('res_scale', 1.0)
    dataset = SelfSupMVTecDataset(data_dir, category, is_train=True, kind=kind, res_scale=res_scale,
                                  low_res=data_recipe(category, res_scale, kind)['test_res'],
                                  transform=Compose([]), layout=layout or layout_from_spec(meta.get('layout')))
    dataset.configure_self_sup(False)
    return dataset


def _record(meta, setting, path, values, one_class_name=None):
    return dict(category=meta['category'], kind=category_kind(meta['category'], meta.get('kind')),
                setting=result_setting(setting, one_class_name), seed=meta.get('seed', setting.seed),
                **values, checkpoint=None if path is None else str(path))


def missing_records(found, settings, categories, one_class_names=None):
    """NaN records, with a warning each, for the pairs of setting keys and categories that have no
    checkpoint in ``found`` (one per ``result_variants``)."""
    records = []
    kinds = {meta['category']: meta.get('kind') for _, meta in found}
    for key in settings:
        for category in categories:
            if not select_checkpoints(found, [key], [category]):
                warnings.warn(f'no checkpoint for setting {key!r} on category {category!r}: '
                              'its cells are NaN')
                setting = parse_setting(key)
                for variant in result_variants(setting, one_class_names):
                    names = METRICS + (() if variant is None else one_class.POOLED_METRICS)
                    records.append(_record(dict(category=category, kind=kinds.get(category)),
                                           setting, None, dict.fromkeys(names, math.nan), variant))
    return records


def evaluate_checkpoints(model_dir, data_dir, settings=None, categories=None, device=None,
                         batch_size=32, figure_dir=None, one_class_names=None, flip_average=False,
                         layout=None):
    """Evaluate the trained models under ``model_dir`` on their categories' test sets in ``data_dir``.

    settings: keys to evaluate (a key without a seed takes every seed found; None: all found);
    categories: names to evaluate (None: all found). Each model's test set is rebuilt from its
    meta (category, kind, res_scale); objects are cropped to its ``train_size``. When settings or
    categories are given, every requested pair (the other list defaulting to all found) without a
    checkpoint gives a row of NaN and a warning; an unreadable checkpoint raises ValueError naming
    it. figure_dir: also write ``<category>_<setting>.png`` (first seed found of each setting, see
    ``plot_test_examples``). one_class_names: also evaluate the two-stage variants with these
    one-class models ('gde', 'kde', 'ocsvm'; see ``result_variants``). flip_average: average each
    map with that of the vertical flip (``predict``; textures only). Returns the long-format
    results (see ``experiments.tables``), one dict per checkpoint and variant with the metrics of
    ``METRICS`` (two-stage variants also ``one_class.POOLED_METRICS``) and its path. layout: the
    data layout (None: each model's own, from its meta; see ``self_sup_data.layouts``).
    """
    device = resolve_device(device)
    found = find_checkpoints(model_dir)
    selected = sorted(select_checkpoints(found, settings, categories),
                      key=lambda item: (item[1]['category'], str(item[0])))
    for name in one_class_names or ():
        one_class.make_one_class(name)  # validates before any work
    if flip_average:
        for path, meta in selected:
            check_flip_average(meta['category'], meta.get('kind'),
                               result_variants(parse_setting(meta['setting']), one_class_names), path)
    records, plotted, data_key = [], set(), None
    for path, meta in tqdm(selected, desc='evaluating checkpoints', disable=None):
        model, meta = read_model(path, device)
        if (meta['category'], meta.get('kind'), meta.get('res_scale'), meta.get('layout')) != data_key:
            data_key = (meta['category'], meta.get('kind'), meta.get('res_scale'), meta.get('layout'))
            dataset = load_test_set(data_dir, meta, layout)  # one test set in memory at a time
            # loaded once per test set, when a two-stage variant needs it
            normal_set = functools.cache(functools.partial(load_normal_set, data_dir, meta, layout))
        crop_size = meta.get('train_size', dataset.train_size) if dataset.kind == 'object' else None
        setting = parse_setting(meta['setting'])
        results = evaluate_variants(model, dataset, result_variants(setting, one_class_names),
                                    normal_set, batch_size, device, crop_size, source=str(path),
                                    flip_average=flip_average)
        for variant, (values, maps) in results.items():
            records.append(_record(meta, setting, path, values, variant))
            figure = figure_dir and figure_path(figure_dir, meta['category'],
                                                result_setting(setting, variant))
            if figure and figure not in plotted:
                plot_test_examples(dataset, maps, figure)
                plotted.add(figure)
    if settings is not None or categories is not None:
        found_settings = dict.fromkeys(seedless_key(parse_setting(meta['setting'])) for _, meta in found)
        records += missing_records(found, settings or list(found_settings),
                                   categories or sorted({meta['category'] for _, meta in found}),
                                   one_class_names)
    return sort_records(records, settings)


def sort_records(records, settings=None):
    """Records ordered by setting (the order of ``settings`` when given, else the paper's order of
    the base tasks, plain before -M), each setting's own results before its two-stage variants
    (in the order of ``one_class.ONE_CLASS_MODELS``), then category and seed: the tables keep
    this column order."""
    requested = settings and list(dict.fromkeys(seedless_key(parse_setting(k)) for k in settings))
    variant_order = [None] + list(one_class.ONE_CLASS_MODELS)

    def order(record):
        setting, variant = split_result_setting(record['setting'])
        if requested:
            rank = (requested.index(seedless_key(setting)),)
        else:
            rank = (list(BASE_SETTINGS).index(setting.base), setting.mixed)
        return (rank + (variant_order.index(variant),), record['category'],
                -1 if record['seed'] is None else record['seed'])
    return sorted(records, key=order)


# ------------------------------------------------------------------------------ command line

def write_report(records, out_dir, paper_layout=False, percent=False):
    """Write ``out_dir/results.csv`` (long format) and ``out_dir/tables/<metric>.{csv,md,tex}``;
    returns the tables ``{metric: DataFrame}``."""
    out_dir = Path(out_dir)
    tables.write_results(records, out_dir / 'results.csv')
    pooled = tuple(m for m in one_class.POOLED_METRICS if any(m in r for r in records))
    built = tables.build_tables(records, METRICS + pooled, paper_layout=paper_layout,
                                percent=percent)
    tables.write_tables(built, out_dir / 'tables')
    return built


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog='python -m experiments.mvtec_tasks',
        description='Evaluate trained models (final_*.pt under MODEL_DIR) on MVTec-layout test sets: '
                    'writes OUT_DIR/results.csv, OUT_DIR/tables/<metric>.{csv,md,tex} and '
                    'OUT_DIR/figures/<category>_<setting>.png.')
    parser.add_argument('-m', '--model-dir', required=True,
                        help='folder of the trained models (searched recursively)')
    parser.add_argument('-d', '--data-dir',
                        help='data root folder (one folder per category; not needed for --format folder)')
    parser.add_argument('-o', '--out-dir', required=True, help='folder for results, tables and figures')
    parser.add_argument('-s', '--settings', nargs='+', default=None,
                        help='setting keys (a key without seed takes every seed; default: all found)')
    parser.add_argument('-n', '--categories', nargs='+', default=None,
                        help='categories (default: all found)')
    parser.add_argument('--one-class', nargs='+', choices=list(one_class.ONE_CLASS_MODELS),
                        metavar='MODEL', default=None,
                        help='also evaluate two-stage variants: fit these one-class models '
                             f'({", ".join(one_class.ONE_CLASS_MODELS)}) to each model\'s encoder '
                             'features of its category\'s normal training images; results are '
                             'named SETTING+GDE etc. (classifier settings such as CutPaste-3way '
                             'are scored this way only; default for them: '
                             f'{" ".join(CLASSIFIER_ONE_CLASS)})'),
    parser.add_argument('--flip-average', action='store_true',
                        help='average each map with that of the vertically flipped image, the flip '
                             'of the texture training recipe (textures only; not in the paper; not '
                             'with --one-class)')
    parser.add_argument('--device', default=None, help="e.g. cpu, cuda (default: cuda when available)")
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--paper-layout', action='store_true',
                        help="merge X (objects) and X-M (textures) into one column, as in the paper")
    parser.add_argument('--percent', action='store_true', help='tables in percent with one decimal')
    parser.add_argument('--no-figures', action='store_true', help='skip the example figures')
    add_layout_arguments(parser)
    return parser.parse_args(argv)


def run_command(work):
    """Run ``work()`` for a command line: each warning becomes a ``warning: ...`` line and an input
    error (ValueError, FileNotFoundError, KeyError) one ``error: ...`` line and exit status 1."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always', UserWarning)
        try:
            return work()
        except (ValueError, FileNotFoundError, KeyError) as error:
            sys.exit(f'error: {error.args[0] if error.args else error}')
        finally:
            for warning in caught:
                print(f'warning: {warning.message}', file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)

    def work():
        figure_dir = None if args.no_figures else Path(args.out_dir) / 'figures'
        records = evaluate_checkpoints(args.model_dir, args.data_dir, args.settings, args.categories,
                                       device=args.device, batch_size=args.batch_size,
                                       figure_dir=figure_dir, one_class_names=args.one_class,
                                       flip_average=args.flip_average, layout=layout_from_args(args))
        if not records:
            raise FileNotFoundError(f'no {CHECKPOINT_PATTERN} checkpoints for the requested settings '
                                    f'and categories under {args.model_dir}')
        write_report(records, args.out_dir, paper_layout=args.paper_layout, percent=args.percent)
        return records
    records = run_command(work)
    print(f"{len(records)} results; tables in {Path(args.out_dir) / 'tables'}")


if __name__ == '__main__':
    main()
