"""Train NSA (or a baseline task) on MVTec-layout data: one, several or all categories.

    python train_mvtec.py -s SETTING -d DATA_DIR -o OUT_DIR [-n CATEGORY | -c all|texture|object]
                          [--single-patch] [--cutpaste-patch-gen] [--no-mask] [--no-pool]
                          [--preact] [--[no-]standardize-input] [--ellipse] [--epochs E] [--batch-size B]
                          [--res-scale S] [--workers W] [--device D] [--resume] [--kind object|texture] ...
    python train_mvtec.py -s SETTING -o OUT_DIR   # quick start: the demo dataset, small budget
    python train_mvtec.py -s SETTING --format folder --normal DIR [-n NAME] -o OUT_DIR

DATA_DIR is in MVTec AD, VisA, MVTec LOCO AD or MVTec AD 2 layout (detected, or --format); a
plain folder of normal images trains with --format folder (see self_sup_data/layouts.py).

SETTING is a key such as Shift-Intensity-M-923874273 (see experiments/settings.py). The model of
category C is written to OUT_DIR/<setting dir>/C/final_C_<setting fname>.pt (e.g.
OUT_DIR/shift_intensity_m/carpet/final_carpet_shift_intensity_m_923874273.pt) with a resume
checkpoint, example figures and the loss curve next to it. ``CutPaste-3way`` trains CutPaste's
classifier on the views of ``CutPaste3Way`` (normal, CutPaste, CutPaste-scar) instead;
``python -m experiments.mvtec_tasks`` scores it with a one-class model on its encoder features.

``--evaluate`` (the default on the demo dataset) ends the run with that evaluation of the
setting's models in OUT_DIR (every seed found there), written to OUT_DIR/eval, and prints its main
figures. Its test sets are checked before anything is trained; test images with image-level
labels only (defect images without masks) need --allow-missing-masks.
"""
import argparse
import dataclasses
import re
import sys
import warnings
from contextlib import ExitStack
from pathlib import Path

from experiments import recipes, settings, tables
from experiments.arguments import (add_image_reading_arguments, check_image_reading, image_reading,
                                  one_line_warnings, path_argument)
from experiments.cli import (add_layout_arguments, add_training_arguments, check_evaluation_dir, check_output_dir,
                             check_swa_epochs, check_training_options, exit_on_input_error, exit_on_interrupt,
                             figure_files, found_run, layout_from_args, model_from_args, other_run_message,
                             prepare_output_dir, print_slow_bf16_note, print_summary, print_warnings,
                             refuse_existing_run, refuse_twin_run, remove_report_temporaries, report_problems,
                             reports_from_first_process_only, standardizes_input, train_config,
                             train_unless_finished, warn_low_contrast, warn_unused_reading, write_evaluation)
from experiments.checkpoints import (NO_THRESHOLDS, SEARCH_DIR, check_one_model_per_seed, model_checksums,
                                     read_meta, select_checkpoints, sort_records)
from experiments.mvtec_tasks import evaluate_checkpoints, find_evaluable, write_report
from experiments.run_lock import refuse_run_in_progress, run_lock
from experiments.training import (TrainConfig, dict_differences, final_model_path, is_distributed, is_first_process,
                                  run_differences, run_meta)
from experiments.validation import Validator
from self_sup_data.demo import DEMO_CATEGORY, make_demo_dataset
from self_sup_data.images import image_shape_summary, image_span_summary, is_high_depth_file
from self_sup_data.layouts import FOLDER_CATEGORY, LAYOUTS, contents_sha256, detect_layout, names_sha256
from self_sup_data.mvtec import (CHECK_SIZE, SET_BIT_DEPTH, SelfSupMVTecDataset, category_kind, check_test_set,
                                 data_recipe, load_images, load_validation_set, train_files, training_bit_depth,
                                 warn_faint_images)
from self_sup_data.recipe import CALIBRATED_PARAMS
from self_sup_data.self_sup_tasks import (GENERATOR_VERSION, CutPaste3Way, check_object_pixels,
                                          object_mask)
from self_sup_data.validation import (MIN_VALIDATION_IMAGES, VALIDATION_KINDS, VALIDATION_VERSION,
                                      NoObjectPixelError, holdout_indices)

PROG = 'train_mvtec.py'
CATEGORY_GROUPS = ('all', 'texture', 'object')
# Quick start without -d: the demo category at 64 pixels, 450 steps of 8 images, about a minute on
# 2 AVX512 cores. Measured with Shift-Intensity and the calibrated recipe (3 seeds): see README's
# quick start; 12 epochs of 16 images at 128 pixels (48 steps) learnt nothing.
DEMO_EPOCHS, DEMO_BATCH_SIZE, DEMO_RES_SCALE = 60, 8, 0.25
# 1,024-pixel textures (896-pixel objects): the side of MVTec AD's largest images
MAX_RES_SCALE = 4
# the meta entries that record a --recipe search run's choice (what the choice sets is rebuilt
# from its parameters before the search; see refuse_other_run_before_search)
SEARCH_RECORD_FIELDS = ('recipe_search', 'search_calibration', 'calibration')


def category_argument(value):
    """argparse type of -n: the category's folder name, without the trailing separator that a
    shell's completion of a folder adds (``-n wood/``)."""
    return value.rstrip('/\\') or value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split('\n\n')[0],
        epilog=f'setting keys: {settings.valid_setting_forms()}')
    parser.add_argument('-s', '--setting', required=True,
                        help=f'setting key: {settings.valid_setting_forms()}')
    parser.add_argument('-d', '--data-dir', '--data_dir', type=path_argument, dest='data_dir',
                        help='data root folder (default: the demo dataset)')
    parser.add_argument('-o', '--out-dir', '--out_dir', type=path_argument, dest='out_dir', required=True,
                        help='where models and figures go')
    which = parser.add_mutually_exclusive_group()
    which.add_argument('-n', '--class-name', '--class_name', dest='class_name', type=category_argument,
                       help='one category (a folder of DATA_DIR)')
    which.add_argument('-c', '--categories', choices=CATEGORY_GROUPS, default='all',
                       help='the categories found in DATA_DIR: all, or those of one kind (default: all)')
    parser.add_argument('--kind', choices=('object', 'texture'),
                        help='treat the categories as this kind (default: MVTec AD\'s grouping; '
                             'other names are textures)')
    add_image_reading_arguments(parser)
    parser.add_argument('--res-scale', type=float,
                        help="resolution relative to the paper's (224/256-pixel crops); "
                             "0.5 trains at half (default: 1)")
    add_layout_arguments(parser)
    add_training_arguments(parser)
    settings.add_task_arguments(parser)
    recipes.add_recipe_arguments(parser)
    parser.add_argument('--evaluate', action=argparse.BooleanOptionalAction, default=None,
                        help='evaluate the trained models, every seed of the setting in OUT_DIR, on '
                             'the test set at the end (as python -m experiments.mvtec_tasks does, '
                             'into OUT_DIR/eval) and print the figures '
                             '(default: on for the demo dataset only)')
    args = parser.parse_args(argv)
    check_image_reading(parser, args)
    return args


def category_layouts(args, data_dir):
    """{category: layout} of the categories in ``data_dir``: those of --format's layout, else each
    category in the first layout that finds it (``detect_layout``'s order; a root may hold
    categories of several layouts); MVTec-layout folders only with ``train/good``."""
    given = layout_from_args(args)
    found = {}
    for layout in [given] if given else LAYOUTS.values():
        for category in layout.categories(data_dir):
            found.setdefault(category, layout)
    if not found and given is None:
        detect_layout(data_dir)  # the FileNotFoundError that says what each layout expects
    return {category: layout for category, layout in sorted(found.items())
            if layout.name != 'mvtec' or (Path(data_dir) / category / 'train' / 'good').is_dir()}


def select_categories(args, data_dir):
    """The categories to train: -n, or the -c group among the categories found in ``data_dir``
    (``category_layouts``); FileNotFoundError naming the folder and the layouts looked for when
    there is none."""
    found = category_layouts(args, data_dir)
    given = layout_from_args(args)
    where = (f"{given.name} layout: {given.expected}" if given else "layouts: " + '; '.join(
        f"{name}: {layout.expected}" for name, layout in LAYOUTS.items()))
    if args.class_name is not None:
        if args.class_name not in found:
            raise FileNotFoundError(f"category {args.class_name!r} not found in {data_dir} ({where}); "
                                    f"categories found: {', '.join(found) or 'none'}")
        return [args.class_name]
    chosen = [c for c in found
              if args.categories == 'all' or category_kind(c, args.kind) == args.categories]
    if not chosen and found:  # all of the other kind
        other = 'object' if args.categories == 'texture' else 'texture'
        why = (f"by --kind {args.kind}" if args.kind else
               "by their names (MVTec AD's grouping; other names are textures unless --kind object)")
        raise FileNotFoundError(f"no {args.categories} categories in {data_dir}: found {', '.join(found)}, "
                                f"{other}s {why}; pass --kind {args.categories} to treat them as "
                                f"{args.categories}s, or choose with -n NAME")
    if not chosen:
        raise FileNotFoundError(f"no {'' if args.categories == 'all' else args.categories + ' '}"
                                f"categories in {data_dir} ({where}); found: none")
    return chosen


def plan(args):
    """Check every input before anything is trained -> (setting, data_dir, categories, out_dir).

    Without -d, generates the demo dataset in OUT_DIR/demo_data and sets the demo budget.
    """
    setting = settings.parse_setting(args.setting)
    overrides = settings.param_overrides(args)
    notes = settings.ignored_task_options(args, setting, overrides)
    layout = layout_from_args(args)
    demo = args.data_dir is None and layout is None
    check_training_options(args, setting.loss, DEMO_BATCH_SIZE if demo else TrainConfig.batch_size)
    recipes.check_recipe_options(args, setting)
    if args.res_scale is not None and not 0 < args.res_scale <= MAX_RES_SCALE:
        raise ValueError(f"--res-scale must be in (0, {MAX_RES_SCALE}], got {args.res_scale}")
    if layout is not None and layout.name == 'folder' and args.data_dir is not None:
        raise ValueError("-d DATA_DIR is not read with --format folder, whose images are in the "
                         "--normal, --abnormal and --mask-dir folders; leave it out")
    if layout is not None and layout.name != 'folder' and args.data_dir is None:
        raise ValueError(f"--format {layout.name} reads a data root: pass -d DATA_DIR")
    if layout is not None and layout.name == 'folder':
        layout.train_files()  # checks the folders now, not after loading or training
        if layout.abnormal is not None or layout.mask_dir is not None:
            layout.test_files()
        if not args.evaluate:  # (--evaluate checks the whole test set)
            check_held_out_normal_images(layout, image_reading(args))
        categories = [args.class_name or FOLDER_CATEGORY]
        if Path(categories[0]).name != categories[0] or categories[0] in ('.', '..'):
            raise ValueError(f"-n {categories[0]!r}: with --format folder the name of the category is "
                             f"a file name of its models (no folder separator, not . or ..)")
        notes += settings.ignored_category_options(categories[0], args.kind, overrides)  # checks them
        check_default_swa_epochs(args, categories, overrides)
        check_evaluable(args, setting, None, categories)
        print_warnings(PROG, notes)
        return setting, None, categories, prepare_output_dir(args.out_dir)
    if args.data_dir is not None:
        data_dir = Path(args.data_dir)
        if not data_dir.is_dir():
            raise FileNotFoundError(f"data folder {data_dir} does not exist")
        categories = select_categories(args, data_dir)
        for category in categories:
            notes += settings.ignored_category_options(category, args.kind, overrides)
        check_default_swa_epochs(args, categories, overrides)
        check_evaluable(args, setting, data_dir, categories)
        print_warnings(PROG, notes)
        return setting, data_dir, categories, prepare_output_dir(args.out_dir)

    for option, given in ((f'-n {args.class_name}', args.class_name not in (None, DEMO_CATEGORY)),
                          (f'-c {args.categories}', args.categories != 'all')):
        if given:
            raise ValueError(f"{option} chooses categories of a data folder, and there is none: pass "
                             f"-d DATA_DIR (without it, the built-in demo category {DEMO_CATEGORY} trains)")
    print_warnings(PROG, notes + settings.ignored_category_options(DEMO_CATEGORY, args.kind, overrides))
    check_default_swa_epochs(args, [DEMO_CATEGORY], overrides, DEMO_EPOCHS)
    if args.evaluate is not False:
        check_evaluation_dir(Path(args.out_dir) / 'eval', figures=not args.no_figures)
        check_one_model_each(args.out_dir, setting, [DEMO_CATEGORY])
    out_dir = prepare_output_dir(args.out_dir)
    category_dir = make_demo_dataset(out_dir / 'demo_data')
    args.epochs = args.epochs or DEMO_EPOCHS
    args.res_scale = args.res_scale or DEMO_RES_SCALE
    args.batch_size = args.batch_size or DEMO_BATCH_SIZE
    print(f"{PROG}: no -d DATA_DIR given: training on the built-in demo dataset {category_dir} "
          f"with a small budget ({args.epochs} epoch{'s' * (args.epochs != 1)}, batch {args.batch_size}, "
          f"res-scale {args.res_scale}); pass -d for real data")
    if args.evaluate is None:
        args.evaluate = True
    return setting, category_dir.parent, [category_dir.name], out_dir


def check_default_swa_epochs(args, categories, overrides, default_epochs=None):
    """``check_swa_epochs`` for each of ``categories``, against ``default_epochs`` or its parameters'
    (``settings.training_epochs``)."""
    for category in categories:
        check_swa_epochs(args, default_epochs or settings.training_epochs(
            settings.category_params(category, args.kind, overrides), args.ellipse), category)


def check_held_out_normal_images(layout, reading=None):
    """ValueError naming a normal image of the folder ``layout`` that it holds out for testing and
    that cannot be read, or holds values beyond the training images' bit depth (decoded at
    CHECK_SIZE, 16-bit files with ``reading``, the command's --bit-depth or --intensity-range, else
    the bit depth that training will find, ``training_bit_depth``): training never reads it, and an
    evaluation later would fail on it, while removing it moves the held-out fifth, which the model
    then refuses."""
    held_out = layout.normal_test_files()

    def check(read):
        try:
            return read()
        except ValueError as error:
            raise ValueError(f"{error}; it is among the normal images held out for testing, which training does not "
                             f"read and an evaluation later would fail on: fix it now, or replace it (removing it "
                             f"moves the held-out fifth)") from None
    if reading is None and check(lambda: any(is_high_depth_file(path) for path in held_out)):
        reading = training_bit_depth(None, None, layout)  # (a training image's error is its own)
    check(lambda: load_images(held_out, CHECK_SIZE, desc='checking the held-out normal images', bit_depth=reading,
                              stretch_note=False))


def check_evaluable(args, setting, data_dir, categories):
    """With --evaluate: every category's test set can be evaluated (``check_test_set``: its
    folders, normal and defect images, a mask for each defect image unless --allow-missing-masks,
    every image and mask readable, 16-bit images within the training images' bit depth, MVTec LOCO
    AD's masks in its defects_config.json), OUT_DIR/eval can be an output folder, and OUT_DIR will
    hold one model per seed of ``setting`` (``check_one_model_each``), checked before anything is
    trained."""
    if args.evaluate:
        check_evaluation_dir(Path(args.out_dir) / 'eval', figures=not args.no_figures)
        layout = layout_from_args(args)
        for category in categories:
            bit_depth = image_reading(args) or training_bit_depth(data_dir, category, layout)
            check_test_set(data_dir, category, layout, args.allow_missing_masks, bit_depth)
        check_one_model_each(args.out_dir, setting, categories)


def check_one_model_each(out_dir, setting, categories):
    """ValueError where the evaluation after training would find two models of one category, setting
    and seed under ``out_dir`` (``check_one_model_per_seed``): two there already, or one of this
    run's seed at another path than the final model that the run writes (a copy or a moved model)."""
    if not Path(out_dir).is_dir():
        return
    for category in categories:  # a twin run (Shift-0 beside Shift) is told so, as training would
        refuse_twin_run(setting, out_dir, category)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # unreadable checkpoints: the evaluation warns of them
        selected = select_checkpoints(find_evaluable(out_dir), [setting.seedless_key], categories)
    present = {path.resolve() for path, _ in selected}
    planned = [(f'{path} (the model this run writes)', dict(category=category, setting=setting.key,
                                                            seed=setting.run_seed))
               for category in categories
               if (path := final_model_path(setting.run_dir(out_dir, category), setting.run_name(category))).resolve()
               not in present]
    try:
        check_one_model_per_seed(selected + planned, 'keep one model per seed under OUT_DIR, or train into '
                                                     'another one')
    except ValueError as error:
        raise ValueError(f"--evaluate would find {error}") from None


def redone_results(records, setting, categories, model_dir):
    """Predicate: whether an earlier result is one that this evaluation (``records``, of ``setting``
    on ``categories``, of the models under ``model_dir``) redoes: of a requested category and
    setting (variant) or of one in ``records``, unless it is of another seed than those evaluated
    whose model lies under ``model_dir`` (another seed's training into the same folder, evaluated
    meanwhile: ``earlier_results`` keeps it while its checkpoint is there as it was). A seed of
    another model folder's is redone (left out), so that a row holds this folder's models only."""
    evaluated = {(record['category'], record['setting'], record['seed'])
                 for record in records if record.get('checkpoint')}
    pairs = ({(category, setting.seedless_key) for category in categories}
             | {(record['category'], record['setting']) for record in records})

    def redone(record):
        if (record['category'], record['setting']) not in pairs:
            return False
        return ((record['category'], record['setting'], record['seed']) in evaluated
                or not tables.of_models_under(record, model_dir))
    return redone


def earlier_results(eval_dir, records, redone):
    """The results in ``eval_dir/results.csv`` that this evaluation (``records``) does not redo
    (``redone``, of ``redone_results``) and that still hold: those of other categories and settings
    (two-stage variants such as ``SETTING+GDE`` included), and of other seeds of this folder's, whose
    checkpoint is still there as it was, of plain maps as this evaluation's (not ``--flip-average``d),
    of the kind that this evaluation gives their category, of the test set it scores of their
    category (``test_set_sha256``; failed results, which scored none, are kept), and, for results of a
    model's own maps written before results recorded their thresholds, of a model without thresholds
    (``unrecorded_thresholds``); so that runs of several settings or
    categories into one output folder leave one table of them all. A note counts those left out. A
    results file that cannot be read gives a warning line and none."""
    try:
        kept, left_out = tables.earlier_results(Path(eval_dir) / 'results.csv', redone, model_checksums)
    except ValueError as error:
        print(f"{PROG}: warning: {error}; the tables hold this evaluation's results only", file=sys.stderr)
        return []
    note = tables.left_out_note(left_out)
    if note:
        print(f"{PROG}: note: {note}")
    kinds = {record['category']: record['kind'] for record in records if not tables.failed(record)}
    test_sets = {record['category']: record['test_set_sha256'] for record in records if 'test_set_sha256' in record}
    still, other_kind, flipped, other_test_set, thresholds_unrecorded = [], [], [], [], []
    for record in kept:
        if kinds.get(record['category'], record['kind']) != record['kind']:
            other_kind.append(record)
        elif record.get('flip_average') is not False:
            flipped.append(record)
        elif (record['category'] in test_sets and not tables.failed(record)
              and record.get('test_set_sha256') != test_sets[record['category']]):
            other_test_set.append(record)
        elif unrecorded_thresholds(record):
            thresholds_unrecorded.append(record)
        else:
            still.append(record)
    categories_of_other_kind = ', '.join(sorted({record['category'] for record in other_kind}))
    for left, why in ((other_kind, f"this evaluation gives their categories ({categories_of_other_kind}) "
                                   f"another kind"),
                      (flipped, "they were evaluated with --flip-average (or before the results recorded "
                                "whether they were), and this evaluation's maps are plain"),
                      (other_test_set, "they were scored on another test set of their category than this "
                                       "evaluation's (other images, defect types or masks), or before the results "
                                       "recorded their test set"),
                      (thresholds_unrecorded, "they were evaluated before the results recorded the thresholds of "
                                              "their precision, recall and F1, and their models store thresholds "
                                              "now")):
        if left:
            print(f"{PROG}: note: {len(left)} earlier results left out of the tables: {why}, e.g. "
                  f"{left[0].get('checkpoint')}")
    return still


def unrecorded_thresholds(record):
    """Whether ``record`` is a result of a model's own maps (with precision, recall and F1 at its
    thresholds) written before results recorded the thresholds of those (no ``thresholds_sha256``),
    whose model stores thresholds now: they may not be the ones it was evaluated at."""
    return ('thresholds_sha256' not in record and not tables.failed(record) and '+' not in record['setting']
            and model_checksums(record['checkpoint'])['thresholds_sha256'] not in (NO_THRESHOLDS, None))


def evaluate_trained(args, setting, data_dir, categories, out_dir):
    """--evaluate: the MVTec-layout evaluation (``experiments.mvtec_tasks``) of the models of
    ``setting`` on ``categories`` under ``out_dir``, every seed found there (runs of several seeds
    into one folder leave tables of all of them, ``mean ± std``), written to ``out_dir/eval`` with
    the ``earlier_results`` of other settings and categories found there; prints one line per
    model of this evaluation (``print_summary``), then the notes and failures of
    ``report_problems``, and returns the failed records."""
    eval_dir = Path(out_dir) / 'eval'
    remove_report_temporaries(eval_dir)
    figure_dir = None if args.no_figures else eval_dir / 'figures'
    earlier_figures = figure_files(figure_dir)
    records = evaluate_checkpoints(out_dir, data_dir, [setting.seedless_key], categories,
                                   device=args.device, figure_dir=figure_dir,
                                   layout=layout_from_args(args),
                                   allow_missing_masks=args.allow_missing_masks)
    redone = redone_results(records, setting, categories, out_dir)
    kept = []

    def write_with_earlier_results(records):  # read while the results are locked (write_evaluation)
        kept.extend(earlier_results(eval_dir, records, redone))
        return write_report(sort_records(records + kept), eval_dir)
    written = write_evaluation(records, eval_dir, figure_dir, write_with_earlier_results, earlier_figures)
    if written is not None and kept:
        print(f"{PROG}: the tables also hold {len(kept)} earlier result{'s' * (len(kept) != 1)} of other "
              f"settings, categories or seeds from {eval_dir / 'results.csv'}")
    print_summary(records)
    if written is not None:
        print(f"{PROG}: evaluation tables in {eval_dir / 'tables'}")
    else:
        warn_replaced_results(eval_dir, redone)
    return report_problems(records, written is not None)


def warn_replaced_results(eval_dir, redone):
    """Where an evaluation wrote nothing (every result failed): a warning line when
    ``eval_dir/results.csv`` (kept as it was) holds results that it redoes (``redone``) of models
    gone, written again or given other thresholds since (or, written before results recorded them,
    ``unrecorded_thresholds``), which its tables still show."""
    try:
        unchanged, replaced = tables.earlier_results(Path(eval_dir) / 'results.csv',
                                                     lambda record: not redone(record), model_checksums)
    except ValueError:
        return  # earlier_results warned of it
    replaced = [record for record in replaced if record.get('checkpoint')] + [
        record for record in unchanged if unrecorded_thresholds(record)]
    if replaced:
        print(f"{PROG}: warning: the tables in {eval_dir} still show {len(replaced)} results of models gone, "
              f"trained again or given other thresholds since they were evaluated, e.g. "
              f"{replaced[0]['checkpoint']}: they are not the figures of the models now there", file=sys.stderr)


def held_out_images(args, data_dir, category, recipe, searched=False):
    """(layout, validation fraction, sorted indices of the training images held out for the
    validation set: none below MIN_VALIDATION_IMAGES images) of ``category`` under ``recipe``."""
    layout = layout_from_args(args) or detect_layout(data_dir, category)
    fraction = recipes.val_fraction(args, recipe, searched)
    count = len(train_files(data_dir, category, layout))
    held_out = holdout_indices(count, fraction, args.val_seed)
    if held_out.size and count - held_out.size < 2:
        raise ValueError(f"--val-fraction {fraction:g} holds out {held_out.size} of the {count} training images "
                         f"of {category!r} and leaves {count - held_out.size} to train on; hold out fewer")
    return layout, fraction, held_out


def background_source(from_flag):
    """Where a category's background came from: --background (``from_flag``) or its table entry."""
    return ('--background' if from_flag else
            "the background of its entry in CATEGORY_PARAMS (experiments/settings.py)")


def check_background(category, background, from_flag, dataset):
    """ValueError naming ``category`` and where its ``background`` comes from (--background or
    the category's table entry) when it leaves no object pixel in a training image of
    ``dataset`` (``check_object_pixels``); before the recipe is calibrated on them. A note where
    it marks no part of any training image as background: then it masks nothing (e.g. a
    brightness given on another scale than the images' grey levels, 0-255)."""
    if background is None:
        return
    source = background_source(from_flag)
    try:
        check_object_pixels(dataset.images, tuple(background), dataset.paths)
    except ValueError as error:
        raise ValueError(f"category {category!r}, {source}: {error}") from None
    if all(object_mask(image, tuple(background)).all() for image in dataset.images):
        print(f"{PROG}: {category}: note: {source} marks no part of any training image as "
              f"background (grey levels 0-255): the object mask is the whole image")


def prepare_run(args, setting, data_dir, category, params=None, searched=False):
    """Dataset, model, TrainConfig, meta and validator (None without a validation set) of one
    category; errors here are input errors. ``searched``: the final run of --recipe search (its
    validation set: ``recipes.val_fraction``).

    The generator's category parameters are ``params`` (a candidate of --recipe search) or the
    recipe's (``experiments.recipes``): as written (table) or calibrated from the training
    images (auto, search), with the command line's overrides kept. A category too small for a
    validation set trains without one, and says so: --recipe search becomes auto, and --select
    best keeps the last epoch's weights.
    """
    overrides = settings.param_overrides(args)
    recipe = recipes.recipe_name(args.recipe, category)
    seed = setting.run_seed
    res_scale = args.res_scale or 1.0
    layout, fraction, held_out = held_out_images(args, data_dir, category, recipe, searched)
    if fraction and not held_out.size:
        instead = [text for text, replaced in (("recipe auto instead of search", recipe == 'search'),
                                               ("the last epoch's weights instead of --select best",
                                                args.select == 'best')) if replaced]
        print(f"{PROG}: {category}: fewer than {MIN_VALIDATION_IMAGES} training images: training "
              f"without a validation set" + ''.join(f"; {text}" for text in instead))
        recipe = 'auto' if recipe == 'search' else recipe
        fraction = 0.0  # as stored: nothing was held out
    dataset = SelfSupMVTecDataset(data_dir, category, is_train=True, seed=seed, kind=args.kind,
                                  res_scale=res_scale, exclude=held_out, layout=layout,
                                  bit_depth=image_reading(args) or SET_BIT_DEPTH)
    first_prepared = params is None  # once: not again for --recipe search's candidates and final run
    if first_prepared:
        warn_unused_reading(args, category, dataset)
        warn_low_contrast(args, category, dataset)
        warn_faint_images(category, dataset.paths, dataset.images, dataset.bit_depth)
    table_params = settings.category_params(category, args.kind, overrides,
                                            use_entry=recipe == 'table')
    if not args.no_mask:
        check_background(category, table_params['background'], 'background' in overrides, dataset)
    # the category's background, which every recipe and candidate keeps: one validation set for
    # all, made before the calibration, so that its held-out images are checked first
    validation_background = table_params['background']
    validation_set = None
    if held_out.size:
        try:
            validation_set = load_validation_set(data_dir, category, held_out, args.val_seed, res_scale,
                                                 args.kind, channels=dataset.in_channels, layout=layout,
                                                 bit_depth=dataset.bit_depth,
                                                 background=validation_background)
        except NoObjectPixelError as error:
            raise ValueError(f"category {category!r}, "
                             f"{background_source('background' in overrides)}: {error}") from None
    calibration = None
    if params is None:
        params = table_params
        if recipe == 'table' and args.recipe is None:  # chosen by the category's name
            print(f"{PROG}: {category}: note: recipe table: the entry of {category!r} in CATEGORY_PARAMS "
                  f"(experiments/settings.py; MVTec AD's categories: the paper's values); --recipe auto "
                  f"calibrates the generator on the training images instead")
        if recipe != 'table':
            params, calibration = recipes.calibrate(dataset, setting, table_params, args,
                                                    overrides, seed)
            print('\n'.join(recipes.report_lines(PROG, category, recipe, calibration,
                                                  recipes.unused_params(args, setting), overrides)))
            if standardizes_input(args, calibrated=True):
                print(f"{PROG}: {category}: recipe {recipe}: each image standardised by its own mean and "
                      f"standard deviation before the network (--no-standardize-input: not)")
            note = recipes.mix_note(PROG, category, recipe, calibration, overrides,
                                    searchable=len(dataset.images) + held_out.size >= MIN_VALIDATION_IMAGES)
            if note:
                print(note)
    self_sup_args = settings.self_sup_args_from_args(setting, params, args)
    views = CutPaste3Way(self_sup_args) if setting.model == 'classifier' else None
    dataset.views = views
    dataset.configure_self_sup(on=True, self_sup_args=self_sup_args)  # warns of blends too small to show
    dataset[0]  # fails here, not in a worker, if the arguments do not suit the data
    if len(dataset.images) == 1 and views is not None:
        raise ValueError(f"category {category!r}: one training image: {setting.key} is scored by a one-class model "
                         f"fitted to the features of the normal training images, which needs two or more; add "
                         f"normal images, or train an encoder-decoder setting")
    if len(dataset.images) == 1 and views is None and not self_sup_args.get('same'):
        print(f"{PROG}: {category}: note: one training image: its patches come from the image itself, "
              f"where {setting.key} takes them from another image")
    model = model_from_args(args, dataset.in_channels, setting.final_activation, seed,
                            num_classes=None if views is None else views.num_classes,
                            calibrated=recipe != 'table')
    config = dataclasses.replace(
        train_config(args, epochs=settings.training_epochs(params, args.ellipse), seed=seed,
                     loss=setting.loss), select=args.select if held_out.size else 'last')
    validator = None if validation_set is None else Validator(validation_set,
                                                              recipes.val_every(args, config.epochs))
    if first_prepared and 0 < held_out.size < len(VALIDATION_KINDS):
        kinds = sorted(set(validation_set.defect_types) - {'good'}, key=VALIDATION_KINDS.index)
        print(f"{PROG}: {category}: note: the validation set holds {held_out.size} held-out "
              f"image{'s' * (held_out.size != 1)}, with "
              f"defects of {len(kinds)} of the {len(VALIDATION_KINDS)} kinds ({', '.join(kinds)}): its score is "
              f"coarse (its image AUROC, a third of it, compares {held_out.size} normal with {held_out.size} "
              f"defective image{'s' * (held_out.size != 1)}"
              f"{', and is 0, 0.5 or 1' if held_out.size == 1 else ''}), and even distant scores may be ties")
    meta = dict(dataset='mvtec', setting=setting.key, category=category, kind=dataset.kind,
                data_dir=data_dir and str(Path(data_dir).resolve()), layout=layout.spec(),
                res_scale=res_scale, low_res=dataset.low_res, train_size=dataset.train_size,
                test_res=data_recipe(category, res_scale, args.kind)['test_res'],
                train_files_sha256=names_sha256(dataset.paths),  # images added or removed: another run
                train_contents_sha256=contents_sha256(dataset.paths),  # and images replaced
                train_image_shape=image_shape_summary(dataset.image_sizes),  # new images are compared with it
                train_image_span=image_span_summary(dataset.images),  # and so is their contrast
                in_channels=dataset.in_channels, seed=seed, category_params=params,
                param_overrides=overrides,  # what calibration was not to change
                self_sup_args=self_sup_args, generator_version=GENERATOR_VERSION, recipe=recipe,
                calibration=calibration, held_out=len(held_out), validation_fraction=fraction,
                validation_seed=args.val_seed,
                validation_kinds=list(VALIDATION_KINDS) if held_out.size else [],
                validation_version=VALIDATION_VERSION if held_out.size else None,  # scores of others do not compare
                validation_background=(None if validation_background is None or not held_out.size
                                       else list(validation_background)))
    if dataset.bit_depth is not None:  # 16-bit training images (or --bit-depth): their test and new images alike
        meta['bit_depth'] = dataset.bit_depth
    return dataset, model, config, meta, validator


def search_recipe(args, setting, data_dir, category, out_dir):
    """--recipe search: train each candidate of ``recipes.search_candidates`` for the search
    epochs (in ``<run dir>/search/<candidate>``: an interrupted candidate is continued, a finished
    one read back, both trained again with --force) and score it on the validation set
    -> (the best candidate's params, {candidate: dict(score, params)}, {candidate: the report of
    the calibration it came from, None for the table recipe}). Only for categories with held-out
    images (``held_out_images``)."""
    dataset, model, config, meta, validator = prepare_run(args, setting, data_dir, category)
    overrides = settings.param_overrides(args)
    start = settings.category_params(category, args.kind, overrides, use_entry=False)
    switched, report = recipes.calibrate_switched(dataset, setting, start, meta['calibration'],
                                                  args, overrides, setting.run_seed)
    if report is not None:
        print('\n'.join(recipes.report_lines(PROG, category, 'search, paste fraction switched',
                                              report, recipes.unused_params(args, setting),
                                              {*overrides, 'paste_fraction'})))
    one_patch = args.single_patch or settings.draws_cutpaste_patches(args, setting)
    more = recipes.more_patches(meta['category_params'], start['num_patches'], overrides, one_patch)
    candidates = recipes.search_candidates(meta['category_params'], more, switched,
                                           settings.category_params(category, args.kind, overrides))
    reports = {name: {'auto-paste-switched': report, 'table': None}.get(name, meta['calibration'])
               for name in candidates}
    epochs = search_budget(args, config.epochs)['epochs']
    run_name, results = setting.run_name(category), {}
    for name, params in candidates.items():
        def prepare_candidate(params=params):
            dataset, model, config, meta, validator = prepare_run(args, setting, data_dir,
                                                                  category, params)
            validator.every = epochs
            return (dataset, model, dataclasses.replace(config, epochs=epochs, select='last',
                                                        swa_epochs=0), meta, validator)
        run_dir = setting.run_dir(out_dir, category) / SEARCH_DIR / name
        print(f"{PROG}: {category}: search candidate {name}, {epochs} epoch{'s' * (epochs != 1)}, in {run_dir}")
        meta = train_unless_finished(PROG, run_dir, run_name, prepare_candidate,
                                     resume=not args.force, force=args.force, replace_other=True)
        results[name] = dict(score=meta['validation'][-1]['score'], params=params)
    return results[print_search_choice(category, results)]['params'], results, reports


def print_search_choice(category, results, found=None):
    """Print which candidate of the search ``results`` ({candidate: dict(score, params)}) scored
    best, with its calibrated parameters, and return its name; ``found``: the finished run whose
    meta recorded them."""
    best = max(results, key=lambda name: results[name]['score'])
    scores = ', '.join(f"{name} {result['score']:.4f}" for name, result in results.items())
    recorded = '' if found is None else f", as recorded in {found}"
    print(f"{PROG}: {category}: search chose {best} (validation scores: {scores}){recorded}")
    print(f"{PROG}: {category}: {best}: " + ', '.join(f"{name} {results[best]['params'][name]}"
                                                     for name in CALIBRATED_PARAMS))
    return best


def search_budget(args, epochs):
    """What --recipe search trains each candidate with, for a final run of ``epochs``: its epochs
    (--search-epochs, else a SEARCH_FRACTION-th of the final run's) and the fraction of the images
    held out to score it; recorded in the final run's meta (``search_budget``), so that a resume
    with another budget is refused before the search instead of training its candidates again."""
    return dict(epochs=args.search_epochs or max(1, epochs // recipes.SEARCH_FRACTION),
                validation_fraction=recipes.val_fraction(args, 'search'))


def refuse_other_run_before_search(args, setting, data_dir, category, out_dir):
    """--resume of a --recipe search run: refuse a finished or interrupted run of other arguments
    before the search, which would train its candidates again for them: the run is rebuilt from
    the finished run's chosen parameters, so that what they set compares equal and the command
    line's arguments (task flags included) are compared; the record of the choice
    (SEARCH_RECORD_FIELDS) is compared once the search has chosen, by ``train_unless_finished``.
    The category options of the command line (``param_overrides``, which the chosen parameters
    would hide) are compared too: other ones would train other candidates. Returns the found run's
    (path, state, meta), or (None, None, None)."""
    found, state = found_run(setting.run_dir(out_dir, category), setting.run_name(category))
    if found is None:
        return None, None, None
    previous = read_meta(found)  # its chosen parameters: what they set (the epochs ...) is the same
    _, model, config, meta, validator = prepare_run(args, setting, data_dir, category,
                                                    previous['category_params'], searched=True)
    meta['search_budget'] = search_budget(args, config.epochs)
    differing = [line for line in run_differences(previous, run_meta(model, config, meta, validator))
                 if re.split('[.:]', line)[0] not in SEARCH_RECORD_FIELDS]
    differing += dict_differences({'param_overrides': previous.get('param_overrides') or {}},
                                  {'param_overrides': meta['param_overrides']})
    if differing:
        raise ValueError(other_run_message(found, state, differing, previous))
    return found, state, previous


def recorded_search(meta):
    """Whether the run of ``meta`` recorded its search whole: the candidates' scores and calibration
    reports and the budget they were trained with (a run of older code may lack the last two, and is
    checked by searching again)."""
    return (bool(meta.get('recipe_search')) and 'search_calibration' in meta
            and meta.get('search_budget') is not None)


@one_line_warnings(PROG)
@reports_from_first_process_only()
def main(argv=None):
    """Run the command line; bad input ends with a one-line error and exit status 1, and so does
    an --evaluate in which a model's evaluation failed (its tables are written all the same).
    Of several categories, one that fails (its error printed) does not stop the others: the
    last line names the failed ones, --evaluate covers the others, and the status is 1 (under
    torchrun it stops the run: a failure of the first process alone would leave the others
    waiting for it)."""
    args = parse_args(argv)
    with exit_on_input_error(PROG):
        setting, data_dir, categories, out_dir = plan(args)
        for category in categories:  # before the first category trains
            check_output_dir(setting.run_dir(out_dir, category))
            refuse_twin_run(setting, out_dir, category)
            if is_first_process():  # the one that takes the lock (under torchrun, the others' check would race it)
                refuse_run_in_progress(setting.run_dir(out_dir, category), setting.run_name(category))
        if not (args.resume or args.force):
            for category in categories:
                refuse_existing_run(*found_run(setting.run_dir(out_dir, category), setting.run_name(category)))
    print_slow_bf16_note(PROG, args)
    failed = []
    for category in categories:
        try:
            train_category(args, setting, data_dir, category, out_dir)
        except SystemExit:  # its error is printed; the other categories go on
            if len(categories) == 1 or is_distributed():  # processes must not part ways
                raise
            failed.append(category)
    trained = [category for category in categories if category not in failed]
    evaluation_failed = False
    try:
        if args.evaluate and trained and is_first_process():  # under torchrun, the first process alone
            with exit_on_input_error(PROG):
                evaluation_failed = bool(evaluate_trained(args, setting, data_dir, trained, out_dir))
    finally:  # the last line, after an evaluation that stopped on an error too
        if failed:
            print(f"{PROG}: error: {len(failed)} of {len(categories)} categories failed (their errors "
                  f"are above): {', '.join(failed)}", file=sys.stderr)
    return 1 if failed or evaluation_failed else 0


def train_category(args, setting, data_dir, category, out_dir):
    """Train ``setting`` on one category (after its --recipe search, if asked), unless --resume
    finds it finished (the search too: its choice is read from the finished run, even where the
    candidates' folder is gone, if it recorded the search whole: ``recorded_search``), holding the
    run's lock throughout (``run_lock``, from before the search's candidates; under torchrun the
    first process holds it for all); an error ends in ``exit_on_input_error``'s message and SystemExit."""
    params = search = reports = None
    recipe = recipes.recipe_name(args.recipe, category)
    run_dir, run_name = setting.run_dir(out_dir, category), setting.run_name(category)
    with ExitStack() as held:
        with exit_on_input_error(PROG):
            if is_first_process():
                held.enter_context(run_lock(run_dir, run_name))
            if recipe == 'search' and held_out_images(args, data_dir, category, recipe)[2].size:
                found, state, previous = (refuse_other_run_before_search(args, setting, data_dir, category, out_dir)
                                          if args.resume else (None, None, None))
                if state == 'finished' and recorded_search(previous):
                    params, search, reports = (previous[name] for name in ('category_params', 'recipe_search',
                                                                           'search_calibration'))
                    print_search_choice(category, search, found)
                else:
                    params, search, reports = search_recipe(args, setting, data_dir, category, out_dir)

        def prepare():
            run = prepare_run(args, setting, data_dir, category, params, searched=search is not None)
            run[3].update(recipe_search=search, search_calibration=reports,
                          search_budget=None if search is None else search_budget(args, run[2].epochs))
            return run
        train_unless_finished(PROG, run_dir, run_name, prepare, args.resume, args.force)


if __name__ == '__main__':
    with exit_on_interrupt(PROG):
        sys.exit(main())
