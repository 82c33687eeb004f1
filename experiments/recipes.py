"""How a training run gets its generator recipe and its validation set (``train_mvtec.py``).

Recipes (``--recipe``):

    table    the category's parameters as written: the paper's for the 15 MVTec AD categories,
             ``CATEGORY_PARAMS`` entries, the kind's defaults for other names (the paper's way)
    auto     calibrated from the normal training images (``self_sup_data.recipe``): the
             category's ``CATEGORY_PARAMS`` entry is ignored; the default for categories without
             an entry
    search   the auto recipe and a few alternatives (``search_candidates``: the calibrated
             recipe with more patches, the calibration with the paste fraction switched
             (``calibrate_switched``), the table recipe) are each trained for a short budget and
             scored on the validation set; the best is trained in full, on all the training images
             (the held-out ones too) unless ``--select best`` needs them

Command-line overrides (``--logistic`` ...) are kept by every recipe. The validation set
(``--val-fraction``) holds out normal training images (``self_sup_data.validation``), drawn by
``--val-seed`` (not by the run's seed: every run of a category is validated on the same images, so
that runs of different settings, recipes and seeds compare); no recipe looks at a test image.
Images held out are images not trained on: on magnetic tile, holding out 10% cost about 0.05 image
AUROC (BENCHMARKS.md). So by default a validation set is held out only where a choice is made on
it (``--recipe search``, ``--select best``: ``DEFAULT_VAL_FRACTION``); ``--val-fraction F`` asks
for one in any other run (its curve is written beside the model). With ``--recipe search`` and
without ``--select best`` it sizes the candidates' validation set only: the chosen recipe's final
run trains on every image and has no curve.
"""
from experiments import settings
from self_sup_data.recipe import CALIBRATED_PARAMS, calibrate_recipe, describe, label_from_pastes, paste_fraction_for

RECIPES = ('table', 'auto', 'search')
DEFAULT_VAL_FRACTION = 0.1
SEARCH_FRACTION = 5  # search candidates train for a fifth of the epochs by default
MORE_PATCHES_FACTOR = 2  # the more-patches candidate: at least this many times the default count


def add_recipe_arguments(parser):
    """Add --recipe, --val-fraction, --val-seed, --val-every, --select and --search-epochs."""
    group = parser.add_argument_group('recipe and validation (not in the paper)')
    group.add_argument('--recipe', choices=RECIPES,
                       help="table: the category's parameters as written; auto: calibrated from "
                            "the normal training images; search: auto and alternatives trained "
                            "briefly and chosen by the validation score, the chosen one then "
                            "trained on all images (default: table for categories with "
                            "parameters in experiments/settings.py, else auto)")
    group.add_argument('--val-fraction', type=float, metavar='F',
                       help=f'fraction of the normal training images held out for a validation '
                            f'set of synthetic defects, scored during training (with --recipe search '
                            f'but not --select best: the candidates\' training only; default: '
                            f'{DEFAULT_VAL_FRACTION} with --recipe search or --select best, else 0: '
                            f'held-out images are not trained on)')
    group.add_argument('--val-seed', type=int, default=0, metavar='S',
                       help='seed of the held-out images and their synthetic defects, the same '
                            'for every run of a category so that their scores compare (default: 0)')
    group.add_argument('--val-every', type=int, metavar='E',
                       help='validate every E epochs (default: a tenth of the epochs)')
    group.add_argument('--select', choices=('last', 'best'), default='last',
                       help="final model: the 'last' epoch's weights (default) or the 'best' "
                            "validated ones")
    group.add_argument('--search-epochs', type=int, metavar='E',
                       help=f'epochs of each --recipe search candidate (default: a '
                            f'{SEARCH_FRACTION}th of the epochs)')


def check_recipe_options(args, setting):
    """ValueError naming the first out-of-range recipe option, one that needs a validation set
    where there can be none (``--val-fraction 0``; a classifier ``setting``, which outputs no map
    to score the validation set's defects with) or is not asked for (--val-every, --val-seed), or
    ``--val-every`` with ``--recipe search`` but without ``--select best`` (nothing it would
    apply to), ``--select best`` or a validation set (but for the search's candidates) with ``--swa-epochs``,
    whose averaged weights are not the ones validated."""
    if args.val_fraction is not None and not 0 <= args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    for name in ('val_every', 'search_epochs'):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.val_seed < 0:
        raise ValueError(f"--val-seed must be a non-negative integer, got {args.val_seed}")
    needing = [name for name, needs in (('--recipe search', args.recipe == 'search'),
                                        ('--select best', args.select == 'best')) if needs]
    if needing and args.val_fraction == 0:
        raise ValueError(f"{needing[0]} needs a validation set; --val-fraction is 0")
    if not needing and not args.val_fraction:
        for option, given in ((f'--val-every {args.val_every}', args.val_every is not None),
                              (f'--val-seed {args.val_seed}', args.val_seed != 0)):
            if given:
                raise ValueError(f"{option} applies to a validation set, and there is none: pass "
                                 f"--val-fraction F (e.g. {DEFAULT_VAL_FRACTION}) to hold one out")
    if args.recipe == 'search' and args.select != 'best' and args.val_every is not None:
        raise ValueError(f"--val-every {args.val_every} applies to nothing with --recipe search: its candidates "
                         f"are scored after their last epoch, and the chosen recipe trains on every image; "
                         f"add --select best to validate the final run (on held-out images) every "
                         f"{args.val_every} epochs")
    if args.search_epochs is not None and args.recipe != 'search':
        raise ValueError(f"--search-epochs {args.search_epochs} applies to --recipe search only")
    if args.select == 'best' and getattr(args, 'swa_epochs', 0):
        raise ValueError(f"--select best keeps one validated checkpoint; it does not combine with "
                         f"weight averaging (--swa-epochs {args.swa_epochs})")
    if args.val_fraction and getattr(args, 'swa_epochs', 0) and args.recipe != 'search':
        raise ValueError(f"--val-fraction {args.val_fraction:g} scores each epoch's weights, and weight "
                         f"averaging (--swa-epochs {args.swa_epochs}) keeps their average, which it would "
                         f"not score; pass one of them")
    if setting.model == 'classifier' and (needing or args.val_fraction):
        option = needing[0] if needing else f'--val-fraction {args.val_fraction:g}'
        raise ValueError(f"{option} needs a validation set, scored by anomaly maps, and "
                         f"{setting.key} is a classifier that outputs none")


def recipe_name(requested, category):
    """The recipe of ``category``: ``requested``, else table for categories with
    CATEGORY_PARAMS entries (the paper's 15 among them) and auto for others."""
    if requested is not None:
        return requested
    return 'table' if category in settings.CATEGORY_PARAMS else 'auto'


def val_fraction(args, recipe, searched=False):
    """--val-fraction, else DEFAULT_VAL_FRACTION where a choice is made on the validation set
    (the search recipe, --select best) and 0 elsewhere. ``searched``: the final run of --recipe
    search, its recipe already chosen: 0 (every image trained on) unless --select best."""
    if searched and args.select != 'best':
        return 0.0
    if args.val_fraction is not None:
        return args.val_fraction
    return DEFAULT_VAL_FRACTION if recipe == 'search' or args.select == 'best' else 0.0


def val_every(args, epochs):
    """--val-every, else a tenth of the epochs (at least 1)."""
    return args.val_every or max(1, epochs // 10)


def calibrate(dataset, setting, params, args, overrides, seed):
    """Calibrated category parameters of ``dataset``'s training images -> (params, report)."""
    self_sup_args = settings.self_sup_args_from_args(setting, params, args)
    return calibrate_recipe(dataset.images, dataset.transform, self_sup_args, params,
                            dataset.kind, seed=seed, fixed=tuple(overrides),
                            category=dataset.class_name)


def switched_paste_fraction(auto_params):
    """The paste fraction that --recipe search tries instead of the calibrated one: off (seamless
    blends) when calibration set one, U(0.5, 1) when it did not."""
    return None if auto_params['paste_fraction'] else paste_fraction_for(0.0)


def calibrate_switched(dataset, setting, start_params, auto_report, args, overrides, seed):
    """The calibration with the paste fraction fixed to ``switched_paste_fraction`` -> (params,
    report), or (None, None) when the user fixed the paste fraction, the setting blends no
    patch (no visibility in ``auto_report``, the calibration report of the auto recipe), or the
    label follows the plain pastes (``label_from_pastes``: seamless blends, the switch, would
    train anomalies that the label almost never marks). The
    other parameters are calibrated again to it (patch sizes and count depend on how visible the
    blends are as trained). ``start_params``: the uncalibrated parameters the auto recipe came
    from."""
    if 'paste_fraction' in overrides or 'visibility' not in auto_report or label_from_pastes(auto_report):
        return None, None
    switched = switched_paste_fraction(auto_report['params'])
    return calibrate(dataset, setting, {**start_params, 'paste_fraction': switched}, args,
                     {**overrides, 'paste_fraction': switched}, seed)


def more_patches(auto_params, default_patches, overrides, one_patch=False):
    """The calibrated recipe with up to ``MORE_PATCHES_FACTOR * default_patches`` patches where it
    has fewer (``default_patches``: the uncalibrated count), which --recipe search tries beside
    it: the patch count that calibration sets from the default is the choice on which the
    validation score disagrees between materials (magnetic tile prefers twice the default, the
    grass demo the calibrated count; BENCHMARKS.md). None when the user fixed the count, or
    when the generator draws one patch whatever the count (``one_patch``: --single-patch,
    CutPaste's patch generation), where it would train the calibrated recipe again."""
    if 'num_patches' in overrides or one_patch:
        return None
    return {**auto_params,
            'num_patches': max(auto_params['num_patches'], MORE_PATCHES_FACTOR * default_patches)}


def search_candidates(auto_params, more_patches_params, switched_params, table_params):
    """{name: params} tried by --recipe search: the calibrated recipe, the calibrated recipe with
    more patches (``more_patches``), the calibration with the paste fraction switched
    (``calibrate_switched``) and the table recipe; None: not tried; duplicates dropped."""
    candidates = {'auto': auto_params, 'auto-more-patches': more_patches_params,
                  'auto-paste-switched': switched_params, 'table': table_params}
    unique = {}
    for name, params in candidates.items():
        if params is not None and params not in unique.values():
            unique[name] = params
    return unique


def unused_params(args, setting):
    """The calibrated parameters that ``setting``'s task ignores with the task flags of ``args``
    (``settings.task_uses``; the patch count under --single-patch): calibration sets and records
    them all the same."""
    uses = settings.task_uses(args, setting)
    return {name for name in CALIBRATED_PARAMS
            if not uses[name] or (name == 'num_patches' and args.single_patch)}


def report_lines(prog, category, recipe, report, unused=(), given=()):
    """What calibration measured and chose, one printed line each; the values named in ``unused``
    (``unused_params``) or in ``given`` (set on the command line or by the search, not
    calibrated) are marked as such."""
    return [f"{prog}: {category}: recipe {recipe}: {line}" for line in describe(report, unused, given)]


def mix_note(prog, category, recipe, report, overrides, searchable=True):
    """A printed note when the auto recipe mixes pastes into the blends by its own choice (not
    --paste-fraction): the calibration's least certain choice (right on magnetic tile, wrong on
    the gravel demo texture, BENCHMARKS.md), which --recipe search checks; else None, and None
    where the category is too small to search (``searchable`` False: no validation set)."""
    mixed = report['params'].get('paste_fraction')
    if recipe != 'auto' or 'paste_fraction' in overrides or not mixed or not searchable:
        return None
    return (f"{prog}: {category}: note: mixing plain pastes into the blends is the calibration's "
            f"least certain choice; --recipe search checks it against seamless blends and the "
            f"defaults on held-out images")
