"""Train NSA (or a baseline task) on MVTec-layout data: one, several or all categories.

    python train_mvtec.py -s SETTING -d DATA_DIR -o OUT_DIR [-n CATEGORY | -c all|texture|object]
                          [--single_patch] [--cutpaste_patch_gen] [--no_mask] [--no_pool]
                          [--preact] [--ellipse] [--epochs E] [--batch-size B] [--res-scale S]
                          [--workers W] [--device D] [--resume] [--kind object|texture] ...
    python train_mvtec.py -o OUT_DIR      # quick start: the built-in demo dataset, small budget
    python train_mvtec.py -s SETTING --format folder --normal DIR [-n NAME] -o OUT_DIR

DATA_DIR is in MVTec AD, VisA, MVTec LOCO AD or MVTec AD 2 layout (detected, or --format); a
plain folder of normal images trains with --format folder (see self_sup_data/layouts.py).

SETTING is a key such as Shift-Intensity-M-923874273 (see experiments/settings.py). The model of
category C is written to OUT_DIR/<setting dir>/C/final_C_<setting fname>.pt (e.g.
OUT_DIR/shift_intensity_m/carpet/final_carpet_shift_intensity_m_923874273.pt) with a resume
checkpoint, example figures and the loss curve next to it. ``CutPaste-3way`` trains CutPaste's
classifier on the views of ``CutPaste3Way`` (normal, CutPaste, CutPaste-scar) instead;
``python -m experiments.mvtec_tasks`` scores it with a one-class model on its encoder features.
"""
import argparse
import sys
from pathlib import Path

from experiments import settings
from experiments.training import (add_training_arguments, check_training_options, exit_on_input_error,
                                  model_from_args, prepare_output_dir, resolve_device, train_config,
                                  train_unless_finished)
from self_sup_data.layouts import FOLDER_CATEGORY, add_layout_arguments, detect_layout, layout_from_args
from self_sup_data.mvtec import SelfSupMVTecDataset, category_kind
from self_sup_data.self_sup_tasks import GENERATOR_VERSION, CutPaste3Way

PROG = 'train_mvtec.py'
CATEGORY_GROUPS = ('all', 'texture', 'object')
# Quick start without -d: the demo category at 64 pixels, 450 steps of 8 images, about 2 minutes
# on a 2-core CPU. Measured with Shift-Intensity: image AUROC 0.74 (mean) / 0.80 (max), pixel
# AUROC 0.88, AU-PRO 0.55; 12 epochs of 16 images at 128 pixels (48 steps) learnt nothing.
DEMO_EPOCHS, DEMO_BATCH_SIZE, DEMO_RES_SCALE = 60, 8, 0.25


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split('\n\n')[0],
        epilog=f'setting keys: {settings.valid_setting_forms()}')
    parser.add_argument('-s', '--setting', required=True, help='setting key, e.g. Shift-Intensity-M')
    parser.add_argument('-d', '--data_dir', help='data root folder (default: the demo dataset)')
    parser.add_argument('-o', '--out_dir', required=True, help='where models and figures go')
    which = parser.add_mutually_exclusive_group()
    which.add_argument('-n', '--class_name', help='one category (a folder of DATA_DIR)')
    which.add_argument('-c', '--categories', choices=CATEGORY_GROUPS, default='all',
                       help='the categories found in DATA_DIR: all, or those of one kind (default: all)')
    parser.add_argument('--kind', choices=('object', 'texture'),
                        help='treat the categories as this kind (default: MVTec AD\'s grouping; '
                             'other names are textures)')
    parser.add_argument('--res-scale', type=float,
                        help="resolution relative to the paper's (224/256-pixel crops); "
                             "0.5 trains at half (default: 1)")
    add_layout_arguments(parser)
    add_training_arguments(parser)
    settings.add_task_arguments(parser)
    return parser.parse_args(argv)


def select_categories(args, data_dir):
    """The categories to train: -n, or the -c group among the categories found in ``data_dir``
    (in MVTec layout: the folders with ``train/good``)."""
    layout = layout_from_args(args) or detect_layout(data_dir)
    found = layout.categories(data_dir)
    if layout.name == 'mvtec':
        found = [c for c in found if (Path(data_dir) / c / 'train' / 'good').is_dir()]
    if args.class_name is not None:
        if args.class_name not in found:
            raise FileNotFoundError(f"category {args.class_name!r} not found in {data_dir} "
                                    f"({layout.name} layout: {layout.expected}); "
                                    f"categories found: {', '.join(found) or 'none'}")
        return [args.class_name]
    chosen = [c for c in found
              if args.categories == 'all' or category_kind(c, args.kind) == args.categories]
    if not chosen:
        raise FileNotFoundError(f"no {'' if args.categories == 'all' else args.categories + ' '}"
                                f"categories with train/good images in {data_dir}; "
                                f"found: {', '.join(found) or 'none'}")
    return chosen


def plan(args):
    """Check every input before anything is trained -> (setting, data_dir, categories, out_dir).

    Without -d, generates the demo dataset in OUT_DIR/demo_data and sets the demo budget.
    """
    setting = settings.parse_setting(args.setting)
    overrides = settings.param_overrides(args)
    resolve_device(args.device)
    check_training_options(args, setting.loss)
    if args.res_scale is not None and not args.res_scale > 0:
        raise ValueError(f"--res-scale must be positive, got {args.res_scale}")
    layout = layout_from_args(args)
    if layout is not None and layout.name == 'folder':
        layout.train_files()  # checks the folder now, not after loading
        categories = [args.class_name or FOLDER_CATEGORY]
        settings.category_params(categories[0], args.kind, overrides)
        return setting, None, categories, prepare_output_dir(args.out_dir)
    if args.data_dir is not None:
        data_dir = Path(args.data_dir)
        if not data_dir.is_dir():
            raise FileNotFoundError(f"data folder {data_dir} does not exist")
        categories = select_categories(args, data_dir)
        for category in categories:
            settings.category_params(category, args.kind, overrides)
        return setting, data_dir, categories, prepare_output_dir(args.out_dir)

    out_dir = prepare_output_dir(args.out_dir)
    from self_sup_data.demo import make_demo_dataset
    category_dir = make_demo_dataset(out_dir / 'demo_data')
    args.epochs = args.epochs or DEMO_EPOCHS
    args.res_scale = args.res_scale or DEMO_RES_SCALE
    args.batch_size = args.batch_size or DEMO_BATCH_SIZE
    print(f"{PROG}: no -d DATA_DIR given: training on the built-in demo dataset {category_dir} "
          f"with a small budget ({args.epochs} epochs, batch {args.batch_size}, "
          f"res-scale {args.res_scale}); pass -d for real data")
    return setting, category_dir.parent, [category_dir.name], out_dir


def prepare_run(args, setting, data_dir, category):
    """Dataset, model, TrainConfig and meta of one category (errors here are input errors)."""
    params = settings.category_params(category, args.kind, settings.param_overrides(args))
    self_sup_args = settings.self_sup_args_from_args(setting, params, args)
    seed = setting.run_seed
    res_scale = args.res_scale or 1.0
    views = CutPaste3Way(self_sup_args) if setting.model == 'classifier' else None
    dataset = SelfSupMVTecDataset(data_dir, category, is_train=True, self_sup_args=self_sup_args,
                                  seed=seed, kind=args.kind, res_scale=res_scale, views=views,
                                  layout=layout_from_args(args))
    dataset[0]  # fails here, not in a worker, if the arguments do not suit the data
    model = model_from_args(args, dataset.in_channels, setting.final_activation, seed,
                            num_classes=None if views is None else views.num_classes)
    config = train_config(args, epochs=settings.training_epochs(params, args.ellipse),
                          seed=seed, loss=setting.loss)
    meta = dict(dataset='mvtec', setting=setting.key, category=category, kind=dataset.kind,
                data_dir=data_dir and str(Path(data_dir).resolve()), layout=dataset.layout.spec(),
                res_scale=res_scale,
                low_res=dataset.low_res, train_size=dataset.train_size,
                in_channels=dataset.in_channels, seed=seed, category_params=params,
                self_sup_args=self_sup_args, generator_version=GENERATOR_VERSION)
    return dataset, model, config, meta


def main(argv=None):
    """Run the command line; bad input ends with a one-line error and exit status 1."""
    args = parse_args(argv)
    with exit_on_input_error(PROG):
        setting, data_dir, categories, out_dir = plan(args)
    for category in categories:
        train_unless_finished(PROG, setting.run_dir(out_dir, category), setting.run_name(category),
                              lambda: prepare_run(args, setting, data_dir, category), args.resume)
    return 0


if __name__ == '__main__':
    sys.exit(main())
