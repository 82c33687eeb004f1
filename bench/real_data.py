"""Real-data benchmark: NSA against the baselines that the same generator makes, on real defects.

Trains each setting on one MVTec-layout category with one fixed CPU budget (same resolution,
epochs and batch size for all), evaluates each as ``experiments.mvtec_tasks`` does and writes one
table (image AUROC from the mean and the max of the map, pixel AUROC, AU-PRO, training time), a
table of image AUROC per defect type, and a figure of heatmaps on the same test images.
``CutPaste-3way`` (CutPaste's own classifier, not in the default list) is scored as in its paper, by
a Gaussian density on its encoder features: its row adds ``image AUROC (pooled)``, and its maps are
the density's patch-level heatmaps. Its epochs see three views of each image, so at the same
epochs it trains about twice as long as an encoder-decoder setting.

    python bench/real_data.py --data-dir DATA_DIR [--category magnetic_tile]
                              [--out bench_out/real_data] [--settings KEY ...]
                              [--res-scale 0.5] [--epochs 60] [--batch-size 16] [--workers 2]
                              [--bf16] [--recipe table|auto] [--[no-]standardize-input]
                              [--loss bce|bce-bf16|focal]
                              [--train-only | --evaluate-only]
                              [--flip-average]

``--recipe`` is passed to the training script: ``table`` (default) trains with the category's
parameters in ``experiments/settings.py``, ``auto`` with the recipe calibrated from the training
images (``experiments.recipes``), trained on every image (no validation set held out);
``--[no-]standardize-input`` too, where given (default: the training script's, on with ``auto``).
``--loss`` is passed on for the settings trained with BCE (``bce-bf16``: the earlier loss;
``focal``: the focal loss; see ``experiments.training``).

It resumes where it stopped: a finished model whose configuration (the recipe, with ``table`` the
generator arguments that the category's parameters give, the generator's version, the budget, the
loss, and none of the training script's options that this script never gives: ``mismatches``)
matches the request is not retrained, and an interrupted one continues from its last checkpoint. A model that no longer
matches (e.g. after tuning a category's parameters in ``experiments/settings.py``, or trained
before a fix of the generator: ``GENERATOR_VERSION``) is renamed ``stale_*.pt`` and retrained.
Other differences are found by the training script, which refuses to resume a run of other
arguments: a calibrated recipe whose values changed (after a change of the calibration), the data
folder, the category's parameters under ``auto``. They stop the benchmark with the end of the
script's log, which names them; move the model aside (or use another ``--out``) to train it again.
Training output goes to ``OUT/logs/<category>_<key>.log``, so the whole run can go to the background:
``nohup python bench/real_data.py > bench.log 2>&1 &``.

``--flip-average`` evaluates with each map averaged with that of the vertically flipped image
(``experiments.prediction``; textures only, not for ``CutPaste-3way``) and writes its tables and
figure beside the plain ones, as ``real_data_flip_average.md`` etc. A model that is missing or cannot
be evaluated (or, with ``--evaluate-only``, was trained otherwise) is left out, the others' tables are
written as ``real_data_partial.md`` etc. (those of the last whole run stay), and the status is 1.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from experiments import cli, metrics, plotting, settings
from experiments.atomic import write_text_atomic
from experiments.checkpoints import read_meta, read_model, result_variants
from experiments.mvtec_tasks import load_normal_set, load_test_set
from experiments.prediction import check_flip_average, evaluate_variants
from experiments.training import LOGIT_LOSSES, last_checkpoint_path, resolve_device
from self_sup_data.mvtec import check_test_set
from self_sup_data.self_sup_tasks import GENERATOR_VERSION
from self_sup_data.images import central_box

REPO = Path(__file__).resolve().parents[1]  # the training script is run from here

# NSA with the paper's texture recipe (mixed gradients, logistic and binary label), NSA's patches
# without blending, then the baselines.
DEFAULT_SETTINGS = ('Shift-Intensity-M', 'Shift-M', 'Shift-Intensity-Swap', 'FPI-Poisson', 'FPI', 'CutPaste')
SETTING_NAMES = {'Shift-Intensity-M': 'NSA (logistic, mixed gradients)',
                 'Shift-M': 'NSA (binary, mixed gradients)',
                 'Shift-Intensity': 'NSA (logistic, source gradients)',
                 'Shift': 'NSA (binary, source gradients)',
                 'Shift-Intensity-Swap': 'NSA patches pasted, no blending (logistic)',
                 'FPI-Poisson': 'PII', 'FPI': 'FPI', 'CutPaste': 'CutPaste',
                 'CutPaste-3way': 'CutPaste (3-way classifier) + Gaussian density'}
# The budget is part of a model's identity: a model trained with another budget is retrained.
BUDGET_FIELDS = ('epochs', 'batch_size', 'lr')
# what the models of this script are trained with, and a model trained with other options of the
# training script is not: all images, the last epoch's weights, no averaging, the default network
# (whose input is standardised with a calibrated recipe: ``trained_network``)
TRAINED_AS = dict(held_out=0, select='last', swa_epochs=0, param_overrides={},
                  network=dict(pool=True, preact=False, paper_network=False, dropout_rate=0.0,
                               standardize_input=False))
TABLE_COLUMNS = {'image_auroc_mean': 'image AUROC (mean)', 'image_auroc_max': 'image AUROC (max)',
                 'pixel_auroc': 'pixel AUROC', 'au_pro': 'AU-PRO',
                 'pixel_auroc_border': 'pixel AUROC (border band)', 'pixel_auroc_inner': 'pixel AUROC (inner)',
                 'image_auroc_pooled': 'image AUROC (pooled)'}
EXAMPLES_PER_TYPE = 2  # test images per defect type (and normal) in the heatmap figure
LOG_LINES_SHOWN = 5  # of a failed training's log
BORDER_BAND = 0.1  # fraction of each side: the band along the image border, where many defects lie


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data-dir', required=True,
                        help='MVTec-layout folder holding the category folder (for magnetic_tile: '
                             'the output of python -m self_sup_data.magnetic_tile SRC OUT)')
    parser.add_argument('--category', default='magnetic_tile')
    parser.add_argument('--out', default=str(REPO / 'bench_out' / 'real_data'))
    parser.add_argument('--settings', nargs='+', default=list(DEFAULT_SETTINGS))
    parser.add_argument('--res-scale', type=float, default=0.5)
    parser.add_argument('--epochs', type=int, default=60)
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--device', default=None)
    parser.add_argument('--bf16', action='store_true',
                        help='train with the forward pass in bfloat16 autocast on the CPU too')
    parser.add_argument('--recipe', choices=('table', 'auto'), default='table',
                        help="the generator's recipe: the category's parameters (table) or "
                             'calibrated from its training images (auto)')
    parser.add_argument('--standardize-input', action=argparse.BooleanOptionalAction,
                        help="the network standardises each input image first (default: the training "
                             "script's, on with --recipe auto); --no-standardize-input with --recipe auto "
                             "trains the calibrated recipe's earlier network")
    parser.add_argument('--loss', choices=LOGIT_LOSSES,
                        help="the loss of the settings trained with BCE (default: 'bce', the "
                             "training script's; 'bce-bf16': the earlier loss; 'focal': the focal "
                             "loss)")
    stage = parser.add_mutually_exclusive_group()
    stage.add_argument('--evaluate-only', action='store_true',
                       help='tabulate the trained models (those of this run\'s budget and recipe; a missing or '
                            'other one is left out, the tables of the others written as real_data_partial.md '
                            'etc., and the run fails); train nothing')
    stage.add_argument('--train-only', action='store_true', help='train; evaluate nothing')
    parser.add_argument('--flip-average', action='store_true',
                        help='evaluate with each map averaged with that of the vertically flipped '
                             'image; writes real_data_flip_average.md etc.')
    args = parser.parse_args(argv)
    if args.flip_average and args.train_only:
        parser.error('--flip-average applies to the evaluation, and --train-only evaluates nothing')
    # checked before any model is set aside for retraining (the training script checks them again)
    for name, value, valid in (('--epochs', args.epochs, args.epochs >= 1),
                               ('--batch-size', args.batch_size, args.batch_size >= 1),
                               ('--workers', args.workers, args.workers >= 0),
                               ('--lr', args.lr, 0 < args.lr < math.inf),
                               ('--res-scale', args.res_scale, 0 < args.res_scale <= 4)):
        if not valid:
            parser.error(f'{name} out of range: {value}')
    try:
        resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    # absolute: the training runs from the repository's root, the rest from here
    args.data_dir, args.out = str(Path(args.data_dir).resolve()), str(Path(args.out).resolve())
    return args


def model_path(args, key):
    setting = settings.parse_setting(key)
    return settings.trained_model_path(Path(args.out) / 'models', setting, args.category)


def checkpoint_path(args, key):
    """Where an interrupted training of ``key`` keeps its last checkpoint (``--resume`` continues it)."""
    setting = settings.parse_setting(key)
    return last_checkpoint_path(setting.run_dir(Path(args.out) / 'models', args.category),
                                setting.run_name(args.category))


def training_loss(args, key):
    """The loss ``key`` trains with here: --loss for a setting trained with BCE
    (``experiments.cli.training_loss``), else its own."""
    loss = settings.parse_setting(key).loss
    return cli.training_loss(args, loss) if loss in LOGIT_LOSSES else loss


def trained_network(args):
    """The network options of the models this script trains: the training script's defaults
    (``TRAINED_AS``), whose network standardises its input with a calibrated recipe, unless
    --[no-]standardize-input says otherwise (``cli.standardizes_input``)."""
    return dict(TRAINED_AS['network'], standardize_input=cli.standardizes_input(args, args.recipe != 'table'))


def mismatches(meta, args, key):
    """The fields in which a model's meta differs from what this run would train: the recipe, with
    ``table`` the generator's arguments (from the category's parameters; a calibrated recipe is
    reproduced from the same images and seed), the generator's version, the budget, and what the
    training script's options would change and this script never gives (images held out, the weights
    chosen, weight averaging, the network, category parameters set by hand: ``TRAINED_AS``)."""
    setting = settings.parse_setting(key)
    config, network = meta.get('train_config', {}), meta.get('model_config', {})
    wanted = dict(recipe=args.recipe, generator_version=GENERATOR_VERSION, res_scale=args.res_scale,
                  loss=training_loss(args, key),
                  **{field: getattr(args, field) for field in BUDGET_FIELDS},
                  **dict(TRAINED_AS, network=trained_network(args)))
    found = dict(recipe=meta.get('recipe', 'table'), generator_version=meta.get('generator_version', 1),
                 res_scale=meta.get('res_scale'), loss=config.get('loss'),
                 **{field: config.get(field) for field in BUDGET_FIELDS},
                 held_out=meta.get('held_out', 0), select=config.get('select', 'last'),
                 swa_epochs=config.get('swa_epochs', 0), param_overrides=meta.get('param_overrides') or {},
                 network={name: network.get(name, value) for name, value in TRAINED_AS['network'].items()})
    if args.recipe == 'table':
        wanted['self_sup_args'] = settings.mvtec_self_sup_args(setting, args.category)
        found['self_sup_args'] = meta.get('self_sup_args')
    # Compared as JSON: tuples and lists of the same values are equal (command-line vs stored values).
    normal = json.loads(json.dumps(wanted)), json.loads(json.dumps(found))
    return sorted(k for k in wanted if normal[0][k] != normal[1][k])


def set_aside_if_stale(args, key):
    """Rename the trained model of ``key`` and its last checkpoint to stale_*.pt when they do not
    match this run's configuration; without a final model, the last checkpoint (an interrupted run)
    decides, so that no run resumes from another configuration."""
    path, last = model_path(args, key), checkpoint_path(args, key)
    found = next((p for p in (path, last) if p.is_file()), None)
    if found is None:
        return
    differing = mismatches(read_meta(found), args, key)
    if differing:
        stamp = int(found.stat().st_mtime)
        while any(old.with_name(f'stale_{stamp}_{old.name}').exists() for old in (path, last)):
            stamp += 1  # never over an earlier stale model
        print(f'{key}: {found.name} was trained with other {differing}; kept as stale_{stamp}_*, retraining')
        for old in (path, last):
            if old.is_file():
                os.replace(old, old.with_name(f'stale_{stamp}_{old.name}'))
        remove_outputs(args)


def output_files(out, suffix):
    """The tables and figures that an evaluation writes into ``out`` (``suffix``: '' for the plain
    ones, '_flip_average', each with '_partial': ``output_suffix``), the markdown table first."""
    return [Path(out) / f'{stem}{suffix}{ending}' for stem, ending in (
        ('real_data', '.md'), ('real_data', '.csv'), ('real_data', '_per_type.csv'), ('heatmaps', '.png'))]


def shows_category(table, category):
    """Whether the markdown ``table`` (``write_tables``) is of ``category``, by its heading."""
    try:
        return table.read_text().startswith(f'## {category}: ')
    except OSError:
        return False


def remove_outputs(args, suffixes=None, why='of the models set aside'):
    """Remove the tables and figures of ``args.category`` in ``args.out`` with the given ``suffixes``
    (default all: plain, flip-averaged, and their partial ones; they show a model set aside as stale),
    saying ``why``; an evaluation writes them again."""
    removed = []
    if suffixes is None:
        suffixes = [output_suffix(flip, partial) for flip in (False, True) for partial in (False, True)]
    for suffix in suffixes:
        files = output_files(args.out, suffix)
        if shows_category(files[0], args.category):
            removed += [path for path in files if path.is_file()]
    for path in removed:
        path.unlink()
    if removed:
        print(f'removed the tables and figures {why}: {", ".join(p.name for p in removed)}')


class TrainingFailed(Exception):
    """A setting's training script failed; the message ends with the last lines of its log."""


def train(args, key):
    """Train ``key`` with the training script (resuming an interrupted run); its output to a log."""
    log = Path(args.out) / 'logs' / f'{args.category}_{key}.log'
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(REPO / 'train_mvtec.py'), '-s', key, '-d', args.data_dir,
               '-n', args.category, '-o', str(Path(args.out) / 'models'),
               '--res-scale', str(args.res_scale), '--epochs', str(args.epochs),
               '--batch-size', str(args.batch_size), '--lr', str(args.lr),
               '--workers', str(args.workers), '--recipe', args.recipe, '--resume']
    loss = training_loss(args, key)
    if loss in LOGIT_LOSSES:
        command += ['--loss', loss]
    if args.device:
        command += ['--device', args.device]
    if args.bf16:
        command.append('--bf16')
    if args.standardize_input is not None:
        command.append('--standardize-input' if args.standardize_input else '--no-standardize-input')
    print(f'{key}: training ({" ".join(command[1:])}), log in {log}', flush=True)
    with open(log, 'a') as out:
        status = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if status:
        last_lines = log.read_text(errors='replace').strip().splitlines()[-LOG_LINES_SHOWN:]
        raise TrainingFailed(f'{key}: training failed (exit status {status}); the end of {log}:\n'
                             + '\n'.join(last_lines))


def border_band(shape, band=BORDER_BAND):
    """Boolean ``H x W`` mask of the pixels within ``band`` of the side length from the border."""
    rows, cols = (max(1, round(band * side)) for side in shape)
    inner = np.zeros(shape, dtype=bool)
    inner[rows:-rows, cols:-cols] = True
    return ~inner


def pixel_auroc_by_region(dataset, maps, band=BORDER_BAND, crop=None):
    """Pixel AUROC over the border band's pixels and over the inner pixels, each on its own (images
    whose mask is missing are left out, as in the pixel metrics of the evaluation); NaN for a
    region without defect or without normal pixels. ``crop``: the side of the central square that
    an object's model scores (``images.central_box``): the band is that square's, and the
    pixels outside it (never scored) count in neither region."""
    chosen = np.asarray(dataset.has_mask, dtype=bool)
    masks = np.stack(dataset.masks)[chosen]
    maps = np.asarray(maps)[chosen]
    scored = np.zeros(maps.shape[1:], dtype=bool)
    box = central_box(maps.shape[1:], crop)
    scored[box] = True
    in_band = np.zeros_like(scored)
    in_band[box] = border_band(scored[box].shape, band)
    values = {}
    for name, region in (('border', in_band), ('inner', scored & ~in_band)):
        defect = masks[:, region]
        both_classes = defect.any() and not defect.all()
        values[f'pixel_auroc_{name}'] = (metrics.pixel_auroc(defect[:, None], maps[:, region][:, None])
                                         if both_classes else float('nan'))
    return values


def evaluate_model(args, key, device):
    """(record of metrics and training time, test set, maps) of one trained setting.

    An encoder-decoder is scored by its maps; a classifier (CutPaste-3way) by a Gaussian density
    fitted to its encoder features of the normal training images (``result_variants``): its maps
    are the patch-level heatmaps, and ``image_auroc_pooled`` scores each image by its pooled
    features."""
    path = model_path(args, key)
    model, meta = read_model(path, device)
    dataset = load_test_set(args.data_dir, meta)
    (values, maps), = evaluate_variants(
        model, dataset, result_variants(settings.parse_setting(key)),
        lambda: load_normal_set(args.data_dir, meta), device=device, source=str(path),
        flip_average=args.flip_average).values()
    per_type = metrics.image_auroc_per_type(dataset.defect_types, maps)
    record = dict(setting=key, method=method_name(key, meta['self_sup_args']), **values,
                  **pixel_auroc_by_region(dataset, maps, crop=meta['train_size'] if dataset.kind == 'object'
                                          else None),
                  per_type_auroc=dict(sorted(per_type.items())),
                  train_minutes=meta['train_time_s'] / 60, epochs=meta['train_config']['epochs'])
    return record, dataset, maps


def method_name(key, self_sup_args):
    """The table's name of a setting, with the generator option that changes the paper's method."""
    setting = settings.parse_setting(key)
    name = SETTING_NAMES.get(setting.seedless_key, setting.seedless_key)
    if setting.seed is not None:
        name += f', seed {setting.seed}'
    paste_fraction = self_sup_args.get('paste_fraction')
    if paste_fraction is not None:
        low, high = paste_fraction
        name += f', blend mixed with paste U({low:g}, {high:g})'
    return name


def output_suffix(flip_average, partial=False):
    """The suffix of the tables' and figure's names: '_flip_average' for a flip-averaged evaluation, and
    '_partial' where settings were left out (so that the tables of a whole run are not replaced)."""
    return ('_flip_average' if flip_average else '') + ('_partial' if partial else '')


def write_figure(args, maps_by_setting, dataset, partial=False):
    indices = plotting.example_indices(dataset.defect_types, EXAMPLES_PER_TYPE, first='good')
    masks = [dataset.masks[i] if dataset.has_mask[i] else None for i in indices]
    titles = [dataset.defect_types[i] for i in indices]
    rows = {SETTING_NAMES.get(key, key): [maps[i] for i in indices]
            for key, maps in maps_by_setting.items()}
    return plotting.plot_map_comparison([dataset.images[i] for i in indices], masks, rows, titles,
                                        Path(args.out) / f'heatmaps{output_suffix(args.flip_average, partial)}.png')


def write_tables(args, records, left_out=()):
    main = pd.DataFrame([{'setting': r['setting'], 'method': r['method'],
                          **{name: r.get(m, np.nan) for m, name in TABLE_COLUMNS.items()},
                          'training (min)': r['train_minutes'], 'epochs': r['epochs']}
                         for r in records])
    pooled = TABLE_COLUMNS['image_auroc_pooled']
    if main[pooled].isna().all():  # no classifier setting in the table
        main = main.drop(columns=pooled)
    per_type = pd.DataFrame([{'setting': r['setting'], **r['per_type_auroc']} for r in records])
    out = Path(args.out)
    averaged = ', maps averaged with the vertical flip' if args.flip_average else ''
    standardized = ', each input image standardised' if trained_network(args)['standardize_input'] else ''
    text = (f'## {args.category}: res-scale {args.res_scale}, {args.epochs} epochs, batch {args.batch_size}, '
            f'recipe {args.recipe}{standardized}, BCE settings trained with {args.loss or "bce"}{averaged}\n\n'
            + (f'Left out (see the run\'s errors): {", ".join(left_out)}.\n\n' if left_out else '')
            + main.to_markdown(index=False, floatfmt='.3f')
            + '\n\nImage AUROC (mean of the map) per defect type against the normal test images:\n\n'
            + per_type.to_markdown(index=False, floatfmt='.3f') + '\n')
    suffix = output_suffix(args.flip_average, bool(left_out))
    write_text_atomic(out / f'real_data{suffix}.md', text)
    write_text_atomic(out / f'real_data{suffix}.csv', main.to_csv(index=False))
    write_text_atomic(out / f'real_data{suffix}_per_type.csv', per_type.to_csv(index=False))
    return text


def main(argv=None):
    args = parse_args(argv)
    category_dir = Path(args.data_dir) / args.category
    if not (category_dir / 'train' / 'good').is_dir():
        print(f'real_data: no data: {category_dir}/train/good does not exist. This benchmark needs '
              f'a real MVTec-layout category (e.g. the Magnetic-tile-defect dataset converted with '
              f'python -m self_sup_data.magnetic_tile SRC OUT); pass --data-dir and --category',
              file=sys.stderr)
        return 1
    try:
        return run(args)
    except (TrainingFailed, ValueError, OSError) as error:  # an unreadable model or test set, ...
        print(f'real_data: {error}', file=sys.stderr)
        return 1


def run(args):
    """Train (unless --evaluate-only) and evaluate (unless --train-only) the settings of ``args``,
    write and print the tables -> exit status. Unknown setting keys, a model named twice, a test set
    that cannot be evaluated and flip averaging that does not apply fail before anything is trained; a
    model that is missing, cannot be evaluated, or (--evaluate-only) was trained otherwise than this run
    states, is left out of the tables of the others, which are then written as ``real_data_partial*``
    (those of a whole run stay as they were), and the status is 1."""
    trained = {}
    for key in args.settings:
        setting = settings.parse_setting(key)
        twin = trained.setdefault((setting.seedless_key, setting.run_seed), key)
        if twin != key or args.settings.count(key) > 1:
            raise ValueError(f'--settings {twin} and {key} name the same model ({setting.seedless_key}, seed '
                             f'{setting.run_seed}); give each model once')
        if args.flip_average:
            check_flip_average(args.category, None, result_variants(setting), key)
    if not args.train_only:
        check_test_set(args.data_dir, args.category)
    started = time.perf_counter()
    if not args.evaluate_only:
        for key in args.settings:
            set_aside_if_stale(args, key)
            train(args, key)
    if args.train_only:
        return 0
    device = resolve_device(args.device)
    records, maps_by_setting, datasets, failed = [], {}, {}, []
    for key in args.settings:
        path = model_path(args, key)
        if not path.is_file():
            print(f'real_data: {key}: no trained model at {path}', file=sys.stderr)
            failed.append(key)
            continue
        try:
            differing = mismatches(read_meta(path), args, key)
            if differing:  # (--evaluate-only) the table's heading states this run's values
                raise ValueError(f'{path} was trained with other {differing} than this run states; left out '
                                 f'(give its values, or train it again without --evaluate-only)')
            record, datasets[key], maps_by_setting[key] = evaluate_model(args, key, device)
        except (ValueError, OSError) as error:  # one model's failure leaves the others' table
            print(f'real_data: {key}: {error}', file=sys.stderr)
            failed.append(key)
            continue
        records.append(record)
    if not records:
        print('real_data: no trained model to evaluate', file=sys.stderr)
        return 1
    print(write_tables(args, records, failed))
    if not failed:  # the whole run's tables: an earlier run's partial ones are out of date
        remove_outputs(args, [output_suffix(args.flip_average, partial=True)], 'of an earlier partial run')
    print(f'figure: {write_figure(args, maps_by_setting, datasets[records[0]["setting"]], bool(failed))}')
    print(f'wall time of this run: {(time.perf_counter() - started) / 60:.1f} min')
    if failed:
        print(f'real_data: left out of the tables: {", ".join(failed)}; the others\' are in '
              f'real_data{output_suffix(args.flip_average, True)}.md', file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
