"""Train NSA (or a baseline task) on chest X-rays (NIH ChestX-ray14) from a list of normal images.

    python train_chest_xray.py -s SETTING -d DATA_DIR -l LIST -o OUT_DIR [--no-pool] [--preact]
                               [--epochs E] [--batch-size B] [--res R] [--workers W] [--device D]
                               [--bit-depth BITS | --intensity-range LOW HIGH] [--resume] ...

LIST holds the file names (relative to DATA_DIR) of the normal training images, one per line
(see ``python -m self_sup_data.chest_xray`` to build lists from NIH's table). The model is
written to OUT_DIR/<setting dir>/chest_xray/final_chest_xray_<setting fname>.pt.
"""
import argparse
import hashlib
import sys
from pathlib import Path

from experiments import settings
from experiments.arguments import (add_image_reading_arguments, check_image_reading, image_reading,
                                  one_line_warnings, path_argument)
from experiments.cli import (add_training_arguments, check_swa_epochs, check_training_options, exit_on_input_error,
                             exit_on_interrupt, model_from_args, prepare_output_dir, print_slow_bf16_note,
                             print_warnings, refuse_twin_run, reports_from_first_process_only, train_config,
                             train_unless_finished, warn_low_contrast, warn_unused_reading)
from self_sup_data.chest_xray import SelfSupChestXRay, check_listed_once, read_file_list
from self_sup_data.images import image_shape_summary, image_span_summary
from self_sup_data.layouts import contents_sha256, names_sha256
from self_sup_data.mvtec import SET_BIT_DEPTH
from self_sup_data.recipe import check_object_pixels
from self_sup_data.self_sup_tasks import GENERATOR_VERSION

PROG = 'train_chest_xray.py'
CATEGORY = 'chest_xray'
PAPER_RES = 256  # image side; training crops of 224
MAX_RES = 1024  # the side of NIH's images


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split('\n\n')[0],
        epilog=f'setting keys: {settings.valid_setting_forms()}')
    parser.add_argument('-s', '--setting', required=True,
                        help=f'setting key: {settings.valid_setting_forms()}')
    parser.add_argument('-d', '--data-dir', '--data_dir', type=path_argument, dest='data_dir', required=True,
                        help='folder the listed names are relative to')
    parser.add_argument('-l', '--list', type=path_argument, required=True,
                        help='file list of the normal training images')
    parser.add_argument('-o', '--out-dir', '--out_dir', type=path_argument, dest='out_dir', required=True,
                        help='where models and figures go')
    parser.add_argument('--res', type=int, default=PAPER_RES,
                        help=f'side the images are resized to (default: {PAPER_RES}, the paper)')
    add_image_reading_arguments(parser)
    add_training_arguments(parser)
    settings.add_task_arguments(parser)
    args = parser.parse_args(argv)
    check_image_reading(parser, args)
    return args


def plan(args):
    """Check every input before anything is trained -> (setting, params, out_dir)."""
    setting = settings.parse_setting(args.setting)
    if setting.model != 'enc_dec':
        raise ValueError(f"setting {setting.key!r} trains a classifier; chest X-ray training "
                         "supports the encoder-decoder settings only")
    overrides = settings.param_overrides(args)
    notes = settings.ignored_task_options(args, setting, overrides)
    params = settings.chest_xray_params(overrides)
    check_training_options(args, setting.loss)
    check_swa_epochs(args, settings.training_epochs(params, args.ellipse), CATEGORY)
    if not 64 <= args.res <= MAX_RES:
        raise ValueError(f"--res must be from 64 to {MAX_RES} (the side of NIH's images), got {args.res}")
    if not Path(args.data_dir).is_dir():
        raise FileNotFoundError(f"data folder {args.data_dir} does not exist")
    names = read_file_list(args.list)
    if not names:
        raise ValueError(f"file list {args.list} names no images")
    check_listed_once(names, f'file list {args.list}', 'each training image is listed once')
    missing = [name for name in names if not (Path(args.data_dir) / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(names)} images of {args.list} are missing "
                                f"from {args.data_dir}, e.g. {missing[:3]}")
    print_warnings(PROG, notes)
    return setting, params, prepare_output_dir(args.out_dir)


def listed_names_sha256(file_list):
    """SHA-256 (hex) of the names of ``file_list`` (a list file or its names) in their order,
    folders included: what the samples of a run are (``names_sha256`` compares the sorted file
    names only)."""
    return hashlib.sha256('\n'.join(read_file_list(file_list)).encode()).hexdigest()


def prepare_run(args, setting, params):
    """Dataset, model, TrainConfig, meta and validator (none) of the run (errors here are input errors)."""
    self_sup_args = settings.self_sup_args_from_args(setting, params, args)
    seed = setting.run_seed
    names = read_file_list(args.list)
    dataset = SelfSupChestXRay(args.data_dir, args.list, is_train=True, res=args.res,
                               self_sup_args=self_sup_args, seed=seed,
                               bit_depth=image_reading(args) or SET_BIT_DEPTH)
    warn_unused_reading(args, CATEGORY, dataset)
    warn_low_contrast(args, CATEGORY, dataset)
    if self_sup_args.get('skip_background') is not None:  # a background over every pixel: no patch
        check_object_pixels(dataset.images, self_sup_args['skip_background'], CATEGORY)
    dataset[0]  # fails here, not in a worker, if the arguments do not suit the data
    model = model_from_args(args, dataset.in_channels, setting.final_activation, seed)
    config = train_config(args, epochs=settings.training_epochs(params, args.ellipse),
                          seed=seed, loss=setting.loss)
    meta = dict(dataset='chest_xray', setting=setting.key, category=CATEGORY,
                data_dir=str(Path(args.data_dir).resolve()), normal_list=str(Path(args.list).resolve()),
                res=args.res, low_res=dataset.low_res, train_size=dataset.train_size,
                in_channels=dataset.in_channels, seed=seed, category_params=params,
                self_sup_args=self_sup_args, generator_version=GENERATOR_VERSION,
                train_names=names,  # the evaluation refuses them as test images
                normal_list_sha256=names_sha256(dataset.paths),  # a rewritten list is another run
                normal_list_order_sha256=listed_names_sha256(names),  # and so is a reordered one
                train_contents_sha256=contents_sha256(dataset.paths),  # and images replaced
                train_image_shape=image_shape_summary(dataset.image_sizes),  # new images are compared with it
                train_image_span=image_span_summary(dataset.images))  # and so is their contrast
    if dataset.bit_depth is not None:  # 16-bit training images (or --bit-depth): their test and new images alike
        meta['bit_depth'] = dataset.bit_depth
    return dataset, model, config, meta, None


@one_line_warnings(PROG)
@reports_from_first_process_only()
def main(argv=None):
    """Run the command line; bad input ends with a one-line error and exit status 1."""
    args = parse_args(argv)
    with exit_on_input_error(PROG):
        setting, params, out_dir = plan(args)
        refuse_twin_run(setting, out_dir, CATEGORY)
    print_slow_bf16_note(PROG, args)
    train_unless_finished(PROG, setting.run_dir(out_dir, CATEGORY), setting.run_name(CATEGORY),
                          lambda: prepare_run(args, setting, params), args.resume, args.force)
    return 0


if __name__ == '__main__':
    with exit_on_interrupt(PROG):
        sys.exit(main())
