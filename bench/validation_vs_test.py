"""Does the validation score predict the real test scores? Rank correlation over trained models.

For every model of one category under ``--models`` (``final_*.pt``, and ``best_*.pt`` with
``--best``) that held out validation images: its scores on the validation set of synthetic defects
(``self_sup_data.validation``; the held-out images and defects its run used, rebuilt from its
meta) and on the real test set; then Spearman's rank correlation between each validation metric
(and the image AUROC of each validation defect kind alone) and the test image AUROC (map mean),
pixel AUROC and AU-PRO over the models. Models trained without a validation set saw the
validation images and are left out; a ``best_*.pt`` with the weights of a model already scored (its
run's last epoch was its best) is left out too, so that no model counts twice. All models must have
been validated on one validation set (the same held-out images, seed, defect kinds and background):
scores on different sets are not comparable, and such a folder is refused. Each model is scored at
its own resolution, on the held-out images and defects drawn at that size (not the same pixels:
models of other resolutions are ranked together by design). A model whose held-out images cannot be
found again in DATA (other training files) is refused, naming it; a missing models folder too.

    python bench/validation_vs_test.py --data-dir DATA --category magnetic_tile \
        --models bench_out/recipe [--out bench_out/recipe/correlation] [--best] [--flip-average]

``--flip-average`` scores both sets with flip-averaged maps (textures only); its default output
folder is ``MODELS/correlation_flip_average`` (beside the plain maps' ``MODELS/correlation``), and its
tables say so. ``--models`` given a
run's ``search`` folder scores its --recipe search candidates (found below any other folder, they
are left out: they are not results).

Writes ``scores.csv`` (one row per model), ``correlation.md|csv`` and prints both.
"""
import argparse
import sys
from pathlib import Path

import pandas as pd
from scipy.stats import spearmanr

from experiments.atomic import write_text_atomic
from experiments.checkpoints import is_search_candidate, is_torchscript_export, read_meta, read_model
from experiments.mvtec_tasks import load_test_set
from experiments.prediction import evaluate
from experiments.training import resolve_device
from experiments.validation import SCORE_METRICS, Validator, held_out_indices
from self_sup_data.layouts import layout_from_spec
from self_sup_data.mvtec import load_validation_set, model_test_side, train_files
from self_sup_data.validation import VALIDATION_KINDS

TEST_METRICS = ('image_auroc_mean', 'pixel_auroc', 'au_pro')
VALIDATION_COLUMNS = tuple(f'val_{name}' for name in SCORE_METRICS) + ('val_score',)
DEFAULT_VAL_FRACTION = 0.1  # for models whose meta predates the recorded fraction


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data-dir', required=True,
                        help="data root folder (in the models' recorded layout, else detected)")
    parser.add_argument('--category', required=True)
    parser.add_argument('--models', required=True, help='folder searched for final_*.pt (any depth)')
    parser.add_argument('--out', help='output folder (default: MODELS/correlation, with --flip-average '
                                      'MODELS/correlation_flip_average)')
    parser.add_argument('--best', action='store_true', help='also score the best_*.pt models')
    parser.add_argument('--device', help="'cpu', 'cuda' ... (default: CUDA if available)")
    parser.add_argument('--flip-average', action='store_true',
                        help='score the validation and test sets with flip-averaged maps (textures only)')
    return parser.parse_args(argv)


def model_files(folder, best=False):
    """The final_*.pt under ``folder``, sorted, then (with ``best``) the best_*.pt; search
    candidates and TorchScript exports excluded."""
    patterns = ('final_*.pt', 'best_*.pt') if best else ('final_*.pt',)
    return [path for pattern in patterns for path in sorted(Path(folder).rglob(pattern))
            if not (is_search_candidate(path, folder) or is_torchscript_export(path))]


def weights_epoch(meta, best_file=False):
    """The epoch whose weights a model holds: its run's best validated one for a ``best_*.pt``
    (``best_file``) or a final model chosen with --select best, else its last."""
    if best_file or meta['train_config'].get('select') == 'best':
        return meta['best_epoch']
    return meta['train_config']['epochs']


def held_out_images(data_dir, meta):
    """Indices of the images the run held out (None when it held out none), checked against the
    files it was trained on (``experiments.validation.held_out_indices``)."""
    if not meta.get('held_out'):
        return None
    layout = layout_from_spec(meta.get('layout'))  # the run's layout (None: detected)
    earlier = dict(validation_fraction=DEFAULT_VAL_FRACTION, validation_seed=0)
    return held_out_indices(train_files(data_dir, meta['category'], layout), {**earlier, **meta}, data_dir)


def score_models(args, device):
    """One row per model: its name, setting, recipe, epochs, validation and test scores."""
    rows, test_sets, validation_sets, scored = [], {}, {}, {}
    for path in model_files(args.models, args.best):
        meta = read_meta(path)
        if meta['category'] != args.category:
            print(f"skipping {path}: a model of {meta['category']!r}, not {args.category!r}",
                  file=sys.stderr)
            continue
        if meta.get('weights_sha256') in scored:
            print(f"skipping {path}: the weights of {scored[meta['weights_sha256']]}", file=sys.stderr)
            continue
        try:
            held_out = held_out_images(args.data_dir, meta)
        except ValueError as error:
            raise ValueError(f'{path}: {error}') from None
        if held_out is None:
            print(f'skipping {path}: no validation set held out', file=sys.stderr)
            continue
        model, meta = read_model(path, device)
        kinds = tuple(meta.get('validation_kinds') or VALIDATION_KINDS)  # the run's own defects
        background = meta.get('validation_background')  # None: anywhere (and in earlier models)
        validation_set = (tuple(held_out), meta.get('validation_seed', 0), kinds, repr(background))
        if rows and validation_set != rows[0]['validation_set']:
            raise ValueError(f"{path} was validated on another validation set than {rows[0]['model']} "
                             f"(held-out images, seed, defect kinds or background differ): their scores "
                             f"cannot be ranked together")
        key = (meta['res_scale'], meta.get('kind'), tuple(held_out), meta.get('validation_seed', 0),
               repr(meta.get('layout')), kinds, repr(background), meta['in_channels'], repr(meta.get('bit_depth')),
               model_test_side(meta))
        if key not in validation_sets:
            validation_sets[key] = load_validation_set(
                args.data_dir, args.category, held_out, key[3], meta['res_scale'], meta.get('kind'),
                channels=meta['in_channels'], kinds=kinds, layout=layout_from_spec(meta.get('layout')),
                bit_depth=meta.get('bit_depth'), background=background, side=key[-1])
            test_sets[key] = load_test_set(args.data_dir, meta)
        validation = Validator(validation_sets[key], flip_average=args.flip_average)(model, per_kind=True)
        test = evaluate(model, test_sets[key], device=device, flip_average=args.flip_average)
        scored[meta.get('weights_sha256', path)] = path
        best = path.name.startswith('best_')
        rows.append(dict(model=str(path.relative_to(args.models)), setting=meta['setting'],
                         recipe=meta.get('recipe', 'table'),
                         epochs=weights_epoch(meta, best),
                         held_out=len(held_out), validation_set=validation_set,
                         **{f'val_{k}' if k != 'score' else 'val_score': v
                            for k, v in validation.items()},
                         **{f'test_{name}': test[name] for name in TEST_METRICS}))
        print(rows[-1])
    return pd.DataFrame(rows).drop(columns='validation_set', errors='ignore')


def correlations(scores):
    """Spearman's rho (and its p-value) of each validation column (VALIDATION_COLUMNS, then the
    per-kind image AUROCs) against each test metric."""
    records = []
    per_kind = [column for column in scores if column.startswith('val_image_auroc_')
                and column not in VALIDATION_COLUMNS]
    for column in VALIDATION_COLUMNS + tuple(per_kind):
        record = dict(validation=column)
        for name in TEST_METRICS:
            rho, p_value = spearmanr(scores[column], scores[f'test_{name}'])
            record[f'rho {name}'], record[f'p {name}'] = float(rho), float(p_value)
        records.append(record)
    return pd.DataFrame(records)


def main(argv=None):
    args = parse_args(argv)
    if not Path(args.models).is_dir():
        print(f'error: model folder {args.models} does not exist', file=sys.stderr)
        return 1
    try:
        scores = score_models(args, resolve_device(args.device))
    except (ValueError, OSError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 1
    if len(scores) < 3:
        print(f'error: {len(scores)} models with a validation set found under {args.models}; '
              f'a rank correlation needs at least 3', file=sys.stderr)
        return 1
    table = correlations(scores)
    maps = 'flip-averaged maps' if args.flip_average else 'plain maps'
    out = Path(args.out or Path(args.models) / ('correlation_flip_average' if args.flip_average else 'correlation'))
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / 'scores.csv', scores.assign(flip_average=args.flip_average).to_csv(index=False))
    write_text_atomic(out / 'correlation.csv', table.assign(flip_average=args.flip_average).to_csv(index=False))
    text = (f'Scores of {maps}:\n\n' + scores.round(4).to_markdown(index=False) + '\n\n'
            + f'Spearman rank correlation over {len(scores)} models ({maps}):\n\n'
            + table.round(3).to_markdown(index=False) + '\n')
    write_text_atomic(out / 'correlation.md', text)
    print(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
