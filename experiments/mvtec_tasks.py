"""The MVTec-layout evaluation command: score the trained models under a folder on their
categories' test sets, tabulate and plot.

Each model's test set is rebuilt from its meta (category, kind, res_scale) and predicted as in
the paper (``experiments.prediction``: objects on the central crop of the training size, textures
whole); ``--flip-average`` averages each texture map with that of the vertical flip (not in the
paper). ``--one-class gde kde ocsvm`` also evaluates the two-stage variants
(``experiments.one_class``): a one-class model fitted to the encoder features of the category's
normal training images, prepared as the test images (``load_normal_set``); their results are named
after the setting and the model, e.g. ``Shift-Intensity-M+GDE`` (``checkpoints.result_setting``);
their image score of the pooled features is in ``image_auroc_pooled``/``image_ap_pooled``, and
their ``image_auroc_mean``/``_max`` are of the patch heatmap's mean and maximum. A classifier
setting (``CutPaste-3way``) has no map of its own and is evaluated with the one-class models only
(default: GDE).

Beyond the paper, each model's own maps also get decision metrics (``threshold_values``): the
F1-optimal image and pixel thresholds of the test set with their F1, and precision, recall and
F1 at the thresholds calibrated on normal images and stored with the model
(``experiments.thresholds``; NaN for a model without them).

MVTec LOCO AD models (``loco`` layout) also get that dataset's own metric, AU-sPRO up to an FPR
of 0.05 (``SPRO_METRICS``, ``spro_values``): of all defects, and of the logical and of the
structural anomalies apart, on the maps of the other pixel metrics.

    python -m experiments.mvtec_tasks -m MODEL_DIR -d DATA_DIR -o OUT_DIR \
        [-s SETTING ...] [-n CATEGORY ...] [--one-class gde kde ocsvm] [--flip-average]
        [--paper-layout] [--percent] [--format mvtec|visa|loco|ad2|folder ...]

The data layout is each model's own (recorded in its meta), detected for older models, or given
with ``--format`` (``self_sup_data.layouts``); ``-d`` is not needed for a ``--format folder`` model,
and ``--abnormal DIR [--mask-dir DIR]`` alone test such models on other defect images with their
own normal folder (``layouts.DefectFolders``).
"""
import functools
import hashlib
import math
import warnings
from pathlib import Path

from tqdm import tqdm

import numpy as np

from experiments import metrics, one_class, tables
from experiments.inference import warn_flip_average_mismatch
from experiments.checkpoints import (CHECKPOINT_PATTERN, CLASSIFIER_ONE_CLASS, check_one_model_per_seed,
                                     failure_reason, find_checkpoints, read_model, result_setting,
                                     result_variants, select_checkpoints, setting_from_path, sort_records,
                                     thresholds_sha256, warn_replaced_models, warn_unlike_seeds)
from experiments.cli import (add_evaluation_options, add_layout_arguments, evaluation_parser,
                             layout_from_args, run_evaluation)
from experiments.plotting import figure_path, plot_test_examples
from experiments.prediction import check_flip_average, evaluate_variants, undefined_note
from experiments.settings import parse_setting
from experiments.training import resolve_device
from self_sup_data.layouts import DefectFolders, FolderLayout, LocoLayout, layout_for_model
from self_sup_data.mvtec import SelfSupMVTecDataset, category_kind, model_test_side
from self_sup_data.transforms import Compose

METRICS = ('image_auroc_mean', 'image_auroc_max', 'image_ap_mean', 'image_ap_max',
           'pixel_auroc', 'pixel_ap', 'au_pro')
# LOCO's AU-sPRO and the defect type (test folder) it covers; None: every type
SPRO_METRICS = {'au_spro': None, 'au_spro_logical': 'logical_anomalies',
                'au_spro_structural': 'structural_anomalies'}


def threshold_values(dataset, maps, thresholds=None, flip_average=False, source='the model'):
    """``metrics.THRESHOLD_METRICS`` of the maps of a test set: the F1-optimal thresholds, and
    precision, recall and F1 at the model's calibrated ``thresholds`` (``experiments.thresholds``;
    NaN without them, and NaN with a warning naming ``source`` when they were calibrated on maps
    with another ``flip_average`` than these: their values do not apply to these maps)."""
    if warn_flip_average_mismatch(thresholds, flip_average, source,
                                  ': no precision, recall or F1 at them'):
        thresholds = None
    thresholds = thresholds or {}
    return metrics.threshold_metrics(dataset.labels, maps, np.stack(dataset.masks),
                                     dataset.has_mask, thresholds.get('image'),
                                     thresholds.get('pixel'))


def loco_defects(data_dir, dataset):
    """The defects of a LOCO test set at the side of its images (``LocoLayout.defect_regions``, one
    per mask PNG): (masks bool D x H x W, saturation thresholds in pixels (D,), index of each
    defect's image (D,)). A defect with no pixel at that side is left out, counted in a warning."""
    owned = [(index, path) for index, paths in enumerate(dataset.mask_paths) for path in paths or ()]
    image = np.array([index for index, _ in owned], int)
    regions = dataset.layout.defect_regions(data_dir, dataset.class_name, [path for _, path in owned],
                                            dataset.low_res)
    kept = np.array([mask.any() for mask, _ in regions], bool)
    if not kept.all():
        warnings.warn(f'{dataset.class_name}: {np.count_nonzero(~kept)} of {len(regions)} defects '
                      f'have no pixel at {dataset.low_res} pixels and are left out of AU-sPRO')
    masks = np.array([mask for mask, _ in regions], bool).reshape(-1, dataset.low_res, dataset.low_res)
    saturation = np.array([threshold for _, threshold in regions], float)
    return masks[kept], saturation[kept], image[kept]


def spro_values(dataset, maps, defects):
    """``SPRO_METRICS`` of the maps of a LOCO test set whose ``loco_defects`` are ``defects``:
    ``metrics.au_spro`` (FPR up to 0.05) of the defects of each metric's type against the good
    images (the defect images of other types, and those without a defect, left out); NaN for a
    type without defects."""
    masks, saturation, image = defects
    types = np.asarray(dataset.defect_types)
    good = np.flatnonzero(types == 'good')
    values = {}
    for name, defect_type in SPRO_METRICS.items():
        chosen = (np.arange(len(image)) if defect_type is None
                  else np.flatnonzero(types[image] == defect_type))
        if not chosen.size:
            values[name] = math.nan
            continue
        defect_images, position = np.unique(image[chosen], return_inverse=True)
        values[name] = metrics.au_spro(maps[np.concatenate([good, defect_images])], masks[chosen],
                                       len(good) + position, saturation[chosen])
    return values


def load_test_set(data_dir, meta, layout=None, allow_missing_masks=False):
    """The test set of a checkpoint's category, at the resolution and kind it was trained with, in
    ``layout`` (None: the layout in the meta, else detected). A defect image without a mask is an
    error unless ``allow_missing_masks`` (see ``SelfSupMVTecDataset``). Images are read as the
    model takes them: with its channels (``in_channels``) and 16-bit images with its
    ``bit_depth`` (that of its training images). A folder-format layout is checked against the
    model's held-out test fifth (``layouts.layout_for_model``)."""
    return SelfSupMVTecDataset(data_dir, meta['category'], is_train=False, kind=meta.get('kind'),
                               res_scale=meta.get('res_scale', 1.0), low_res=model_test_side(meta),
                               layout=layout_for_model(layout, meta.get('layout')),
                               allow_missing_masks=allow_missing_masks, bit_depth=meta.get('bit_depth'),
                               channels=meta.get('in_channels'))



def load_normal_set(data_dir, meta, layout=None):
    """The normal training images of a checkpoint's category prepared as its test images (resized
    to the test side, no augmentation, no synthetic anomalies): what two-stage models are fitted to."""
    category, kind, res_scale = meta['category'], meta.get('kind'), meta.get('res_scale', 1.0)
    dataset = SelfSupMVTecDataset(data_dir, category, is_train=True, kind=kind, res_scale=res_scale,
                                  low_res=model_test_side(meta),
                                  transform=Compose([]),
                                  layout=layout_for_model(layout, meta.get('layout')),
                                  bit_depth=meta.get('bit_depth'), channels=meta.get('in_channels'))
    dataset.configure_self_sup(False)
    return dataset


def test_set_sha256(dataset):
    """SHA-256 (hex) of a test set as scored: each image's defect type, file name and size in bytes,
    with its mask's (none, or the files of MVTec LOCO AD's mask folder), sorted. Recorded with each
    result, so that an evaluation does not keep in its tables results of another test set of a
    category (images added, removed or replaced by others of another size, other masks), wherever
    the data folder lies."""
    def entry(path):
        return f"{Path(path).name}:{Path(path).stat().st_size}"
    entries = []
    for path, defect_type, mask in zip(dataset.paths, dataset.defect_types, dataset.mask_paths):
        masks = [] if mask is None else [mask] if isinstance(mask, (str, Path)) else list(mask)
        entries.append('/'.join([defect_type, entry(path)] + sorted(map(entry, masks))))
    return hashlib.sha256('\n'.join(sorted(entries)).encode()).hexdigest()


def _record(meta, setting, path, values, one_class_name=None):
    return dict(category=meta['category'], kind=category_kind(meta['category'], meta.get('kind')),
                setting=result_setting(setting, one_class_name), seed=meta.get('seed', setting.run_seed),
                **values, checkpoint=None if path is None else str(Path(path).resolve()),
                weights_sha256=meta.get('weights_sha256'))


def _undefined(one_class_name=None, error=None):
    """NaN for each metric of a result (a missing or failed checkpoint), with the failure's reason
    as ``error`` when it failed."""
    names = METRICS + (() if one_class_name is None else one_class.POOLED_METRICS)
    return dict.fromkeys(names, math.nan) | ({} if error is None else dict(error=error))


def failed_rows(path, meta, setting, variants, error):
    """The records of ``variants`` of the checkpoint at ``path`` that ``error`` failed: NaN metrics
    and its reason."""
    return [_record(meta, setting, path, _undefined(variant, failure_reason(error)), variant)
            for variant in variants]


def check_channels(model, dataset, path):
    """ValueError naming the checkpoint ``path`` when its model takes another number of image
    channels than the test images of ``dataset`` have."""
    channels = model.config.get('in_channels')
    if channels is not None and channels != dataset.in_channels:
        raise ValueError(f'{path} takes {channels}-channel images, but the test images of '
                         f'{dataset.class_name!r} have {dataset.in_channels} channels')


def missing_records(found, settings, categories, one_class_names=None):
    """NaN records, with a warning each, for the pairs of setting keys and categories that have no
    checkpoint in ``found`` (one per ``result_variants``)."""
    records = []
    kinds = {meta['category']: meta.get('kind') for _, meta in found if 'error' not in meta}
    for key in settings:
        for category in categories:
            if not select_checkpoints(found, [key], [category]):
                warnings.warn(f'no checkpoint for setting {key!r} on category {category!r}: '
                              'its cells are NaN')
                setting = parse_setting(key)
                for variant in result_variants(setting, one_class_names):
                    records.append(_record(dict(category=category, kind=kinds.get(category), seed=setting.seed),
                                           setting, None, _undefined(variant), variant))
    return records


def find_evaluable(model_dir):
    """The checkpoints of MVTec-layout models under ``model_dir`` -> list of (path, meta); an
    unreadable one at the training scripts' path is kept with the meta (setting, category, error)
    of that path (``setting_from_path``) and the kind of its category's readable models (if any),
    any other is skipped with a warning."""
    unreadable = []
    found = find_checkpoints(model_dir, unreadable=unreadable)
    kinds = {meta['category']: meta.get('kind') for _, meta in found}
    for path, reason in unreadable:
        key = setting_from_path(path)
        if key is None:
            warnings.warn(f'{reason}; skipped (its path names no setting and category)')
        else:
            category = path.parent.name
            found.append((path, dict(setting=key, category=category, kind=kinds.get(category), error=reason)))
    return found


def check_data_dir_needless(selected, layout):
    """FileNotFoundError, before any work, when a model of ``selected`` ((path, meta) pairs) reads its
    test set from a data root folder and none was given (-d): in any format but 'folder', given as
    ``layout`` or else the model's (``layout_for_model``; ``DefectFolders``: the model's own)."""
    def reads_root(spec):
        if layout is None or isinstance(layout, DefectFolders):  # the model's own layout
            return (spec or {}).get('format') != 'folder'
        return not isinstance(layout, FolderLayout)
    needing = [(path, meta) for path, meta in selected  # an unreadable one fails as its own row
               if 'error' not in meta and reads_root(meta.get('layout'))]
    if needing:
        path, meta = needing[0]
        raise FileNotFoundError(f"no data root folder given (-d DATA_DIR): {len(needing)} of the {len(selected)} "
                                f"models read their test sets from one, e.g. {path} (trained on "
                                f"{meta.get('data_dir')}); only models of --format folder evaluate without it")


def evaluate_checkpoints(model_dir, data_dir, settings=None, categories=None, device=None,
                         batch_size=32, figure_dir=None, one_class_names=None, flip_average=False,
                         layout=None, allow_missing_masks=False):
    """Evaluate the trained models under ``model_dir`` on their categories' test sets in ``data_dir``.

    settings: keys to evaluate (a key without a seed takes every seed found; None: all found);
    categories: names to evaluate (None: all found). Each model's test set is rebuilt from its
    meta (category, kind, res_scale); objects are cropped to its ``train_size``. When settings or
    categories are given, every requested pair (the other list defaulting to all found) without a
    checkpoint gives a row of NaN and a warning; seeds of a setting and category that were trained
    differently are named in a warning (``warn_unlike_seeds``). Each checkpoint is evaluated on its
    own: one that cannot be read (see ``find_evaluable``), evaluated (a test set that cannot be
    loaded or has one class only, a model that outputs NaN or takes other channels ...) gives rows
    of NaN with the reason as ``error``, and the others are evaluated all the same; a failure of
    the two-stage variants alone (e.g. too few normal images to fit them) fails their rows only.
    figure_dir:
    also write ``<category>_<setting>.png`` (first seed found of each setting, see
    ``plot_test_examples``).
    one_class_names: also evaluate the two-stage variants with these one-class models ('gde',
    'kde', 'ocsvm'; see ``result_variants``). flip_average: average each map with that of the
    vertical flip (``prediction.predict``; textures only). Returns the long-format results (see
    ``experiments.tables``), one dict per checkpoint and variant with the metrics of ``METRICS``
    (the model's own maps also ``metrics.THRESHOLD_METRICS``, see ``threshold_values``; two-stage
    variants also ``one_class.POOLED_METRICS``; LOCO models also ``SPRO_METRICS``, see
    ``spro_values``) and its path. layout: the data layout (None: each
    model's own, from its meta; see ``self_sup_data.layouts``). allow_missing_masks: evaluate
    defect images without a mask at image level only (counted in a warning) instead of failing.
    Results whose pixel metrics are undefined say why in ``undefined`` (``undefined_note``).
    """
    device = resolve_device(device)
    if data_dir is not None and not Path(data_dir).is_dir():
        raise FileNotFoundError(f'data folder {data_dir} does not exist')
    found = find_evaluable(model_dir)
    selected = sorted(select_checkpoints(found, settings, categories),
                      key=lambda item: (item[1]['category'], str(item[0])))
    if data_dir is None:
        check_data_dir_needless(selected, layout)
    check_one_model_per_seed(selected)
    warn_replaced_models(selected)
    warn_unlike_seeds(selected)
    if isinstance(one_class_names, str):  # it would be read letter by letter
        raise ValueError(f'one_class_names must be a list of names, e.g. [{one_class_names!r}], or None; '
                         f'got the string {one_class_names!r}')
    for name in one_class_names or ():
        one_class.make_one_class(name)  # validates before any work
    if flip_average:  # an inconsistent request: refused whole, before any work
        for path, meta in selected:
            try:
                check_flip_average(meta['category'], meta.get('kind'),
                                   result_variants(parse_setting(meta['setting']), one_class_names), path)
            except ValueError as error:
                raise ValueError(f"{error}; evaluate the others with -s SETTING ... or -n CATEGORY ..., "
                                 f"this one without --flip-average") from None
    plotted, loaded = set(), dict(key=None)  # one test set in memory at a time

    def test_set(meta):
        """(test set, normal set loader, LOCO defects loader) of a checkpoint's meta, loaded when
        it is another one."""
        key = (meta['category'], meta.get('kind'), meta.get('res_scale'), meta.get('layout'),
               meta.get('bit_depth'), meta.get('in_channels'), model_test_side(meta))
        if key != loaded['key']:
            loaded.update(key=None, sets=None)  # frees the last one; a failed load loads again
            dataset = load_test_set(data_dir, meta, layout, allow_missing_masks)
            # the normal set and the defects are loaded once per test set, when a result needs them
            loaded.update(sets=(dataset, functools.cache(functools.partial(
                load_normal_set, data_dir, meta, layout)), functools.cache(functools.partial(
                    loco_defects, data_dir, dataset))), key=key)
        return loaded['sets']

    def evaluate_group(path, meta, setting, model, dataset, normal_set, defects, variants):
        """The rows of ``variants`` (the model's own maps, or the two-stage variants: they share
        the normal images' features) of one checkpoint."""
        crop_size = meta.get('train_size', dataset.train_size) if dataset.kind == 'object' else None
        errors = {}  # of the one-class models that cannot be fitted: their rows fail alone
        results = evaluate_variants(model, dataset, variants, normal_set, batch_size, device,
                                    crop_size, source=str(path), flip_average=flip_average, errors=errors)
        rows, digest = [], test_set_sha256(dataset)
        for variant in variants:
            if variant in errors:
                rows += failed_rows(path, meta, setting, [variant], errors[variant])
                continue
            values, maps = results[variant]
            if variant is None:
                values = dict(values, **threshold_values(dataset, maps, meta.get('thresholds'),
                                                         flip_average, str(path)),
                              thresholds_sha256=thresholds_sha256(meta.get('thresholds')))
            if isinstance(dataset.layout, LocoLayout):
                values = dict(values, **spro_values(dataset, maps, defects()))
            rows.append(_record(meta, setting, path, values | undefined_note(dataset) | dict(test_set_sha256=digest),
                                variant))
            figure = figure_dir and figure_path(figure_dir, meta['category'],
                                                result_setting(setting, variant))
            if figure and figure not in plotted:
                plot_test_examples(dataset, maps, figure)
                plotted.add(figure)
        return rows

    def evaluate_one(path, meta, setting):
        """The rows of one checkpoint: a failure of the two-stage variants (e.g. too few normal
        images to fit them) fails their rows only, not the model's own, and a one-class model that
        cannot be fitted its own row only (``evaluate_group``)."""
        variants = result_variants(setting, one_class_names)
        try:
            if 'error' in meta:
                raise ValueError(meta['error'])
            model, meta = read_model(path, device)
            loaded_sets = test_set(meta)
            check_channels(model, loaded_sets[0], path)
        except Exception as error:  # any failure of one checkpoint is its rows', not the run's
            return failed_rows(path, meta, setting, variants, error)
        rows = []
        for group in ([v for v in variants if v is None], [v for v in variants if v is not None]):
            if group:
                try:
                    rows += evaluate_group(path, meta, setting, model, *loaded_sets, group)
                except Exception as error:
                    rows += failed_rows(path, meta, setting, group, error)
        return rows

    records = []
    for path, meta in tqdm(selected, desc='evaluating checkpoints', disable=None):
        records += evaluate_one(path, meta, parse_setting(meta['setting']))
    if settings is not None or categories is not None:
        found_settings = dict.fromkeys(parse_setting(meta['setting']).seedless_key for _, meta in found)
        records += missing_records(found, settings or list(found_settings),
                                   categories or sorted({meta['category'] for _, meta in found}),
                                   one_class_names)
    records = [dict(record, flip_average=flip_average) for record in records]  # which maps were scored
    return sort_records(records, settings)


def warn_seeds_on_other_test_sets(records):
    """Warn for each category and setting whose seeds, merged in the tables as ``mean ± std``, were
    scored on different test sets (``test_set_sha256``: e.g. folder-format models evaluated on the
    --abnormal folders they were each trained with), naming the seeds of each test set."""
    groups = {}
    for record in records:
        digest = record.get('test_set_sha256')
        if isinstance(digest, str):
            key = (record['category'], record['setting'])
            groups.setdefault(key, {}).setdefault(digest, []).append(record['seed'])
    for (category, setting), by_set in groups.items():
        if len(by_set) > 1:
            sets = '; '.join(f"seed{'s' * (len(seeds) > 1)} {', '.join(map(str, sorted(seeds)))}"
                             for seeds in by_set.values())
            warnings.warn(f"{category} {setting}: the seeds merged in the tables were scored on {len(by_set)} "
                          f"different test sets (other images or masks: {sets}), so their mean mixes them; "
                          f"evaluate every seed on one test set (models of the folder format: python -m "
                          f"experiments.mvtec_tasks with --abnormal DIR [--mask-dir DIR])")


def write_report(records, out_dir, paper_layout=False, percent=False):
    """Write ``out_dir/results.csv`` (long format) and ``out_dir/tables/<metric>.{csv,md,tex}``,
    with a warning where a row's seeds were scored on different test sets
    (``warn_seeds_on_other_test_sets``); returns the tables ``{metric: DataFrame}``."""
    warn_seeds_on_other_test_sets(records)
    extra = one_class.POOLED_METRICS + metrics.THRESHOLD_METRICS + tuple(SPRO_METRICS)
    present = tuple(m for m in extra if any(m in r for r in records))
    return tables.write_report(records, out_dir, METRICS + present, paper_layout=paper_layout,
                               percent=percent)


def parse_args(argv=None):
    parser = evaluation_parser(
        'python -m experiments.mvtec_tasks',
        'Evaluate trained models (final_*.pt under MODEL_DIR) on MVTec-layout test sets: '
        'writes OUT_DIR/results.csv, OUT_DIR/tables/<metric>.{csv,md,tex} and '
        'OUT_DIR/figures/<category>_<setting>.png.',
        data_help='data root folder (one folder per category; not needed for --format folder)',
        data_required=False)
    parser.add_argument('-n', '--categories', nargs='+', default=None,
                        help='categories (default: all found)')
    parser.add_argument('--one-class', nargs='+', choices=list(one_class.ONE_CLASS_MODELS),
                        metavar='MODEL', default=None,
                        help='also evaluate two-stage variants: fit these one-class models '
                             f'({", ".join(one_class.ONE_CLASS_MODELS)}) to each model\'s encoder '
                             'features of its category\'s normal training images; results are '
                             'named SETTING+GDE etc. (classifier settings such as CutPaste-3way '
                             'are scored this way only; default for them: '
                             f'{" ".join(CLASSIFIER_ONE_CLASS)})')
    parser.add_argument('--flip-average', action='store_true',
                        help='average each map with that of the vertically flipped image, the flip '
                             'of the texture training recipe (textures only; not in the paper; not '
                             'with --one-class)')
    parser.add_argument('--paper-layout', action='store_true',
                        help="merge X (objects) and X-M (textures) into one column, as in the paper")
    add_evaluation_options(parser)
    add_layout_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run_evaluation(
        args,
        lambda figure_dir: evaluate_checkpoints(
            args.model_dir, args.data_dir, args.settings, args.categories, device=args.device,
            batch_size=args.batch_size, figure_dir=figure_dir, one_class_names=args.one_class,
            flip_average=args.flip_average, layout=layout_from_args(args, test_folders=True),
            allow_missing_masks=args.allow_missing_masks),
        lambda records: write_report(records, args.out_dir, paper_layout=args.paper_layout,
                                     percent=args.percent),
        f'no {CHECKPOINT_PATTERN} checkpoints for the requested settings and categories under '
        f'{args.model_dir} (chest X-ray models are evaluated by python -m experiments.chest_xray_tasks)')


if __name__ == '__main__':
    main()
