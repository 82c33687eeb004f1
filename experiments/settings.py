"""Setting keys -> generator arguments, loss and final activation; per-category parameters.

A setting key names one of the self-supervised tasks of the paper's code, written as a small
grammar rather than a table of every combination::

    BASE[-M][-SEED]

    BASE   Shift, Shift-Intensity, Shift-Raw-Intensity, Shift-Intensity-Swap   (NSA and ablations)
           FPI, FPI-Poisson                                                     (foreign patch
                                                                                 interpolation, PII)
           CutPaste
           CutPaste-3way   (CutPaste's classifier: normal / CutPaste / CutPaste-scar, scored
                            by a one-class model on its encoder features, experiments/one_class.py)
    -M     Poisson blending with mixed gradients (cv2.MIXED_CLONE) instead of the source's
           gradients (cv2.NORMAL_CLONE); only for the bases that blend with Poisson editing
    -SEED  a non-negative integer seeding the run (default DEFAULT_SEED)

e.g. ``Shift-Intensity-M-923874273``. ``parse_setting(key)`` returns a ``Setting`` with the
generator (``patch_ex``) arguments that the task fixes; the arguments that depend on the data
(patch sizes, number of patches, logistic label parameters, object mask) come from the category's
parameters: ``mvtec_self_sup_args`` and ``chest_xray_self_sup_args`` merge both.

Per-category parameters are data: the paper's values for the 15 MVTec AD categories are in the
dicts below (``WIDTH_BOUNDS_PCT`` ... ``EPOCHS``) and are gathered into ``CATEGORY_PARAMS``,
which a user extends for a custom category (``CATEGORY_PARAMS['my_part'] = dict(num_patches=2)``);
the command lines override single values (``--num-patches``, ``--logistic K X0``, ...).
A category without an entry gets the defaults of its kind (``KIND_DEFAULTS``).
"""
import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path

import cv2

from experiments.training import final_model_path
from self_sup_data.mvtec import category_kind
from self_sup_data.self_sup_tasks import PatchParams

DEFAULT_SEED = 0
MAX_SEED = 2**63 - 1  # torch's generator takes 64-bit seeds; checkpoints store them as int64

# ------------------------------------------------------------------------------------------------
# Setting keys
# ------------------------------------------------------------------------------------------------

POISSON = 'poisson'  # placeholder mode of a base: cv2.NORMAL_CLONE, or cv2.MIXED_CLONE with -M
PAPER_GAMMA_PARAMS = (2, 0.05, 0.03)  # (shape, scale, lower bound) of the patch half-width


@dataclass(frozen=True)
class BaseSetting:
    """A self-supervised task before the -M and seed suffixes.

    ``self_sup_args`` are the ``patch_ex`` arguments the task fixes; ``gamma_params`` not None
    means half-widths are drawn from a gamma distribution (the data's parameters replace the
    paper's MVTec values), None means uniformly between the width bounds. ``model``: 'enc_dec'
    (NSA's encoder-decoder, trained on label maps) or 'classifier' (the encoder with CutPaste's
    heads, trained on the ``CutPaste3Way`` views of each image; ``self_sup_args`` make its
    CutPaste view).
    """
    slug: str
    self_sup_args: dict
    loss: str = 'bce'
    final_activation: str = 'sigmoid'
    model: str = 'enc_dec'


def _shift(label_mode, mode=POISSON):
    """NSA: a resized patch of another image moved to a random place and blended."""
    return dict(gamma_params=PAPER_GAMMA_PARAMS, resize=True, shift=True, same=False,
                mode=mode, label_mode=label_mode)


def _foreign_patch(mode, label_mode):
    """FPI/PII: the patch at the same place in another image, interpolated or Poisson-blended.

    Half-widths uniform between the bounds, as in FPI (the released code also passed the gamma
    parameters to FPI and CutPaste)."""
    return dict(gamma_params=None, resize=False, shift=False, same=False,
                mode=mode, label_mode=label_mode)


BASE_SETTINGS = {
    'Shift': BaseSetting('shift', _shift('binary')),
    'Shift-Intensity': BaseSetting('shift_intensity', _shift('logistic-intensity')),
    'Shift-Raw-Intensity': BaseSetting('shift_raw_intensity', _shift('intensity'),
                                       loss='mse', final_activation='relu'),
    'Shift-Intensity-Swap': BaseSetting('shift_intensity_swap',
                                        _shift('logistic-intensity', mode='swap')),
    'FPI': BaseSetting('fpi', _foreign_patch('uniform', 'continuous')),
    # PII-like: the foreign patch Poisson-blended, labelled by its intensity change. (The released
    # code's 'FPI-Poisson' used mixed gradients and the 'continuous' label.)
    'FPI-Poisson': BaseSetting('fpi_poisson', _foreign_patch(POISSON, 'logistic-intensity')),
    'CutPaste': BaseSetting('cut_paste', dict(gamma_params=None, resize=False, shift=True,
                                              same=True, mode='swap', label_mode='binary')),
    'CutPaste-3way': BaseSetting('cut_paste_3way',
                                 dict(gamma_params=None, resize=False, shift=True, same=True,
                                      mode='swap', label_mode='binary',
                                      cutpaste_patch_generation=True),
                                 loss='cross_entropy', final_activation='identity',
                                 model='classifier'),
}
POISSON_BASES = tuple(name for name, base in BASE_SETTINGS.items()
                      if base.self_sup_args['mode'] == POISSON)

# longest names first, so that 'Shift-Intensity-Swap' is not read as 'Shift-Intensity' + junk
_KEY_PATTERN = re.compile(  # ASCII digits, no leading zero: one key per seed
    r'(?P<base>{})(?P<mixed>-M)?(?:-(?P<seed>0|[1-9][0-9]*))?'.format(
        '|'.join(re.escape(name) for name in sorted(BASE_SETTINGS, key=len, reverse=True))))


@dataclass(frozen=True)
class Setting:
    """A parsed setting key: the task's ``patch_ex`` arguments, loss and final activation.

    ``seed`` is None when the key has none (then runs use DEFAULT_SEED); ``fname`` names the
    trained model (e.g. 'shift_intensity_m_923874273') and ``dir_name`` the folder shared by
    the seeds of a setting (e.g. 'shift_intensity_m').
    """
    key: str
    base: str
    mixed: bool
    seed: int | None
    self_sup_args: dict
    loss: str
    final_activation: str
    fname: str
    dir_name: str
    model: str = 'enc_dec'

    @property
    def seedless_key(self):
        """The key without its seed, ``BASE[-M]``: the setting that its seeds share."""
        return self.base + ('-M' if self.mixed else '')

    @property
    def run_seed(self):
        """The seed of a run with this setting: the key's seed, else DEFAULT_SEED."""
        return DEFAULT_SEED if self.seed is None else self.seed

    def run_name(self, category):
        """Name of a run on ``category``, e.g. 'zipper_shift_intensity_923874273'."""
        return f'{category}_{self.fname}'

    def run_dir(self, out_dir, category):
        """Folder of the runs of this setting on ``category``: out_dir/<dir_name>/<category>."""
        return Path(out_dir) / self.dir_name / category


def valid_setting_forms():
    """One line describing the valid setting keys (for error messages and --help)."""
    return (f"BASE[-M][-SEED] with BASE one of {', '.join(BASE_SETTINGS)}; "
            f"-M (mixed gradients) only for {', '.join(POISSON_BASES)}; "
            f"SEED an integer from 0 to 2**63 - 1 without leading zeros "
            f"(e.g. Shift-Intensity-M-923874273)")


def parse_setting(key):
    """Parse a setting key ``BASE[-M][-SEED]`` into a ``Setting``; ValueError for unknown keys."""
    match = _KEY_PATTERN.fullmatch(key) if isinstance(key, str) else None
    if match is None:
        raise ValueError(f"unknown setting key {key!r}; valid keys: {valid_setting_forms()}")
    name, mixed, seed = match['base'], match['mixed'] is not None, match['seed']
    base = BASE_SETTINGS[name]
    args = dict(base.self_sup_args)
    if args['mode'] == POISSON:
        args['mode'] = cv2.MIXED_CLONE if mixed else cv2.NORMAL_CLONE
    elif mixed:
        raise ValueError(f"setting key {key!r}: -M (mixed gradients) applies only to the "
                         f"Poisson-blending bases {', '.join(POISSON_BASES)}, not to {name}")
    dir_name = base.slug + ('_m' if mixed else '')
    seed = None if seed is None else int(seed)
    if seed is not None and seed > MAX_SEED:
        raise ValueError(f"setting key {key!r}: seed {seed} is too large; seeds go from 0 to "
                         f"2**63 - 1 = {MAX_SEED}")
    fname = dir_name if seed is None else f'{dir_name}_{seed}'
    return Setting(key=key, base=name, mixed=mixed, seed=seed, self_sup_args=args,
                   loss=base.loss, final_activation=base.final_activation,
                   fname=fname, dir_name=dir_name, model=base.model)


def paper_setting_key(base, class_name, kind=None, seed=None):
    """The key the paper evaluates for a category: source gradients for objects, mixed for textures
    (the Poisson-blending bases; the others have no -M).

    >>> paper_setting_key('Shift-Intensity', 'carpet')
    'Shift-Intensity-M'
    """
    params = category_params(class_name, kind)
    key = base + ('-M' if params['mixed_gradients'] and base in POISSON_BASES else '')
    key += '' if seed is None else f'-{seed}'
    parse_setting(key)  # validates
    return key


# ------------------------------------------------------------------------------------------------
# Per-category parameters (the paper's code, MVTec AD)
# ------------------------------------------------------------------------------------------------
# Half-width bounds of a patch as fractions of the image side: ((h_min, h_max), (w_min, w_max)).
_FULL = ((0.03, 0.4), (0.03, 0.4))
WIDTH_BOUNDS_PCT = {
    'bottle': _FULL, 'cable': ((0.05, 0.4), (0.05, 0.4)), 'capsule': ((0.03, 0.15), (0.03, 0.4)),
    'hazelnut': ((0.03, 0.35), (0.03, 0.35)), 'metal_nut': _FULL,
    'pill': ((0.03, 0.2), (0.03, 0.4)), 'screw': ((0.03, 0.12), (0.03, 0.12)),
    'toothbrush': ((0.03, 0.4), (0.03, 0.2)), 'transistor': _FULL,
    'zipper': ((0.03, 0.4), (0.03, 0.2)),
    'carpet': _FULL, 'grid': _FULL, 'leather': _FULL, 'tile': _FULL, 'wood': _FULL,
}
# Maximum number of patches (the first is always attempted, each further one with probability 1/2).
NUM_PATCHES = {'bottle': 3, 'cable': 3, 'capsule': 3, 'hazelnut': 3, 'metal_nut': 3, 'pill': 3,
               'screw': 4, 'toothbrush': 3, 'transistor': 3, 'zipper': 4,
               'carpet': 4, 'grid': 4, 'leather': 4, 'tile': 4, 'wood': 4}
# (k, x0) of the logistic label 1 / (1 + exp(-k (d - x0))) of the mean absolute difference d.
INTENSITY_LOGISTIC_PARAMS = {
    'bottle': (1 / 12, 24), 'cable': (1 / 12, 24), 'capsule': (1 / 2, 4),
    'hazelnut': (1 / 12, 24), 'metal_nut': (1 / 3, 7), 'pill': (1 / 3, 7), 'screw': (1, 3),
    'toothbrush': (1 / 6, 15), 'transistor': (1 / 6, 15), 'zipper': (1 / 6, 15),
    'carpet': (1 / 3, 7), 'grid': (1 / 3, 7), 'leather': (1 / 3, 7), 'tile': (1 / 3, 7),
    'wood': (1 / 6, 15),
}
# (brightness, threshold) of the background: pixels within threshold of brightness are background.
BACKGROUND = {'bottle': (200, 60), 'screw': (200, 60), 'capsule': (200, 60), 'zipper': (200, 60),
              'hazelnut': (20, 20), 'pill': (20, 20), 'toothbrush': (20, 20),
              'metal_nut': (20, 20)}
# Minimum object fraction of a patch and minimum overlap of source and destination objects.
MIN_OBJECT_PCT = {'bottle': 0.7, 'capsule': 0.7, 'hazelnut': 0.7, 'metal_nut': 0.5, 'pill': 0.7,
                  'screw': 0.5, 'toothbrush': 0.25, 'zipper': 0.7}
MIN_OVERLAP_PCT = {name: 0.25 for name in MIN_OBJECT_PCT}
# Unaligned objects train longer.
EPOCHS = {name: 560 if name in ('hazelnut', 'metal_nut', 'screw') else 320
          for name in WIDTH_BOUNDS_PCT}

_PAPER_TABLES = dict(width_bounds_pct=WIDTH_BOUNDS_PCT, num_patches=NUM_PATCHES,
                     intensity_logistic_params=INTENSITY_LOGISTIC_PARAMS, background=BACKGROUND,
                     min_object_pct=MIN_OBJECT_PCT, min_overlap_pct=MIN_OVERLAP_PCT, epochs=EPOCHS)

# Defaults of a category without its own entry. 'background' None: no object mask.
# 'mixed_gradients': which Poisson blend the paper evaluates (paper_setting_key).
# 'clip_at_border': shifted patches may hang over the image border (patch_ex's clip_at_border), for
# data whose defects reach the border; the paper's patches lie inside the image.
# 'paste_fraction': None (seamless Poisson blends, the paper's) or (low, high): Poisson-blended
# patches are mixed with their plain paste by a fraction U(low, high) (patch_ex's paste_fraction).
KIND_DEFAULTS = {
    'object': dict(width_bounds_pct=_FULL, num_patches=3, intensity_logistic_params=(1 / 6, 15),
                   background=None, min_object_pct=None, min_overlap_pct=None,
                   gamma_params=PAPER_GAMMA_PARAMS, resize_bounds=(0.7, 1.3), epochs=320,
                   mixed_gradients=False, clip_at_border=False, paste_fraction=None),
    'texture': dict(width_bounds_pct=_FULL, num_patches=4, intensity_logistic_params=(1 / 3, 7),
                    background=None, min_object_pct=None, min_overlap_pct=None,
                    gamma_params=PAPER_GAMMA_PARAMS, resize_bounds=(0.5, 2), epochs=320,
                    mixed_gradients=True, clip_at_border=False, paste_fraction=None),
}
# Optional parameters, off where absent (so that the parameters of earlier runs stay as they were):
# 'normal_fraction': probability that a training sample gets no patch and an all-zero label
# (patch_ex's normal_fraction); absent or 0: the paper's, every sample is anomalous.
OPTIONAL_PARAM_NAMES = ('normal_fraction',)
CATEGORY_PARAM_NAMES = tuple(KIND_DEFAULTS['texture']) + OPTIONAL_PARAM_NAMES
# the command-line flag of each category parameter, and its patch_ex argument where it differs
OVERRIDE_FLAGS = dict(width_bounds_pct='--width-bounds', num_patches='--num-patches',
                      intensity_logistic_params='--logistic', background='--background',
                      min_object_pct='--min-object-pct', min_overlap_pct='--min-overlap-pct',
                      resize_bounds='--resize-bounds', gamma_params='--gamma',
                      clip_at_border='--clip-at-border', paste_fraction='--paste-fraction',
                      normal_fraction='--normal-fraction')
PATCH_ARGUMENT = dict(background='skip_background')
# the object mask of a category's images: kept by every recipe (calibration does not set it)
OBJECT_MASK_PARAMS = ('background', 'min_object_pct', 'min_overlap_pct')
# what else every recipe keeps of a category's entry: its training budget, and which Poisson blend
# the paper evaluates it with; neither describes the synthetic anomalies
RECIPE_INDEPENDENT_PARAMS = OBJECT_MASK_PARAMS + ('epochs', 'mixed_gradients')

# Per-category parameters: the paper's 15 categories; add entries for custom categories.
CATEGORY_PARAMS = {name: {param: table[name] for param, table in _PAPER_TABLES.items()
                          if name in table}
                   for name in WIDTH_BOUNDS_PCT}

# Custom categories tuned in this project (see BENCHMARKS.md for what was tried and measured).
# magnetic_tile (Huang et al. 2020, a grey streaked texture: mean intensity 110, std 30): NSA's
# blends change it by only 3-4 grey levels (median), so the paper's texture label (1/3, 7) leaves
# almost every label below 0.5; the logistic is moved to the material's scale of change. Its
# defects lie largely next to the image border (86% of the break pixels, 36-51% of the other types'
# within the outer 10% of each side), where patches that must lie inside the image rarely reach.
# A seamless blend leaves no visible change on it (image AUROC 0.51 at 60 epochs); mixing each
# blend with its plain paste by U(0.5, 1) keeps part of the patch's offset and edges. Up to 8
# patches (4.5 on average, against the texture default's 2.5) found its small defects better.
CATEGORY_PARAMS['magnetic_tile'] = dict(intensity_logistic_params=(1, 3), clip_at_border=True,
                                        paste_fraction=(0.5, 1), num_patches=8)

# NIH ChestX-ray14 (the paper's chest X-ray experiments).
CHEST_XRAY_PARAMS = dict(width_bounds_pct=_FULL, num_patches=3, intensity_logistic_params=(1 / 2, 4),
                         background=(0, 20), min_object_pct=0.7, min_overlap_pct=0.7,
                         gamma_params=(2, 0.03, 0.05), resize_bounds=(0.7, 1.3), epochs=240,
                         mixed_gradients=False, clip_at_border=False, paste_fraction=None)

# --ellipse (paper's code): patches become unions of random ellipses, trained for 240 more epochs.
NUM_ELLIPSES = 5
ELLIPSE_EXTRA_EPOCHS = 240


def _checked_overrides(overrides):
    """Drop None values; KeyError for names that are not category parameters."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - set(CATEGORY_PARAM_NAMES))
    if unknown:
        raise KeyError(f"unknown category parameters {unknown}; valid: {list(CATEGORY_PARAM_NAMES)}")
    return overrides


def category_params(class_name, kind=None, overrides=None, use_entry=True):
    """Parameters of an MVTec-layout category: kind defaults < CATEGORY_PARAMS entry < overrides.

    ``kind`` ('object' or 'texture') overrides the category's kind (a name outside the paper's 15
    is a texture unless ``kind='object'``); ``overrides`` maps parameter names (see
    ``CATEGORY_PARAM_NAMES``) to values, None meaning 'keep'. ``use_entry`` False ignores the
    category's CATEGORY_PARAMS entry (the starting point of a calibrated recipe) except its
    RECIPE_INDEPENDENT_PARAMS (the object mask, which describes the images, and the training
    budget: the paper's 560 epochs of screw, hazelnut and metal nut).
    """
    kind = category_kind(class_name, kind)
    entry = _checked_overrides(CATEGORY_PARAMS.get(class_name))
    if not use_entry:
        entry = {name: value for name, value in entry.items() if name in RECIPE_INDEPENDENT_PARAMS}
    return {**KIND_DEFAULTS[kind], **entry, **_checked_overrides(overrides)}


def self_sup_args_for(setting, params, single_patch=False, cutpaste_patch_gen=False,
                      use_mask=True, ellipse=False):
    """``patch_ex`` keyword arguments (plain types) of ``setting`` on data with ``params``.

    single_patch: one patch instead of params['num_patches']; cutpaste_patch_gen: CutPaste's
    patch shapes; use_mask False: ignore the background (no object mask); ellipse: patches made
    of NUM_ELLIPSES random ellipses.
    """
    args = dict(setting.self_sup_args)
    if args['gamma_params'] is not None:
        args['gamma_params'] = tuple(params['gamma_params'])
    args.update(width_bounds_pct=tuple(tuple(b) for b in params['width_bounds_pct']),
                num_patches=1 if single_patch else int(params['num_patches']),
                intensity_logistic_params=tuple(params['intensity_logistic_params']),
                resize_bounds=tuple(params['resize_bounds']))
    if use_mask and params['background'] is not None:
        args['skip_background'] = tuple(params['background'])
        for name in ('min_object_pct', 'min_overlap_pct'):
            if params[name] is not None:
                args[name] = float(params[name])
    if params['clip_at_border'] and args['shift']:
        args['clip_at_border'] = True
    if params['paste_fraction'] is not None and setting.base in POISSON_BASES:
        args['paste_fraction'] = tuple(float(v) for v in params['paste_fraction'])
    if params.get('normal_fraction'):
        args['normal_fraction'] = float(params['normal_fraction'])
    if ellipse:
        args['num_ellipses'] = NUM_ELLIPSES
    if cutpaste_patch_gen:
        args['cutpaste_patch_generation'] = True
    return args


def training_epochs(params, ellipse=False):
    """Number of epochs of the paper for data with ``params`` (more with --ellipse)."""
    return int(params['epochs']) + (ELLIPSE_EXTRA_EPOCHS if ellipse else 0)


def mvtec_self_sup_args(setting, class_name, kind=None, overrides=None, **flags):
    """``patch_ex`` arguments of ``setting`` on an MVTec-layout category (see self_sup_args_for)."""
    return self_sup_args_for(setting, category_params(class_name, kind, overrides), **flags)


def chest_xray_params(overrides=None):
    """CHEST_XRAY_PARAMS with ``overrides`` applied (None values keep the default)."""
    return {**CHEST_XRAY_PARAMS, **_checked_overrides(overrides)}


def chest_xray_self_sup_args(setting, overrides=None, **flags):
    """``patch_ex`` arguments of ``setting`` on chest X-rays (see self_sup_args_for)."""
    return self_sup_args_for(setting, chest_xray_params(overrides), **flags)


def trained_model_path(out_dir, setting, category):
    """Where the training scripts put the model of ``setting`` (key or Setting) on ``category``:
    ``out_dir/<setting.dir_name>/<category>/final_<category>_<setting.fname>.pt``."""
    setting = parse_setting(setting) if isinstance(setting, str) else setting
    return final_model_path(setting.run_dir(out_dir, category), setting.run_name(category))


# ------------------------------------------------------------------------------------------------
# Command-line overrides of the category parameters
# ------------------------------------------------------------------------------------------------

def add_task_arguments(parser):
    """Add the paper's task flags and the options that override single category parameters."""
    group = parser.add_argument_group('task flags (as in the paper\'s code, whose underscore '
                                      'spellings are accepted too)')
    group.add_argument('--single-patch', '--single_patch', dest='single_patch', action='store_true',
                       help='one patch per sample')
    group.add_argument('--cutpaste-patch-gen', '--cutpaste_patch_gen', dest='cutpaste_patch_gen',
                       action='store_true', help="CutPaste's patch shapes")
    group.add_argument('--no-mask', '--no_mask', dest='no_mask', action='store_true',
                       help='no object mask (ignore backgrounds)')
    group.add_argument('--ellipse', action='store_true',
                       help=f'patches made of {NUM_ELLIPSES} random ellipses '
                            f'(+{ELLIPSE_EXTRA_EPOCHS} epochs, as in the paper\'s code)')
    group = parser.add_argument_group('category parameters (override the per-category values)')
    group.add_argument('--width-bounds', type=float, nargs=4, metavar=('H_MIN', 'H_MAX', 'W_MIN', 'W_MAX'),
                       help='half-width bounds of a patch as fractions of the image side')
    group.add_argument('--num-patches', type=int, metavar='N', help='maximum number of patches')
    group.add_argument('--logistic', type=float, nargs=2, metavar=('K', 'X0'),
                       help='logistic label parameters: label = 1 / (1 + exp(-K (d - X0)))')
    group.add_argument('--background', type=float, nargs=2, metavar=('BRIGHTNESS', 'THRESHOLD'),
                       help='object mask: pixels within THRESHOLD of BRIGHTNESS (a grey level, 0 to 255) are '
                            'background')
    group.add_argument('--min-object-pct', type=float, metavar='F',
                       help='minimum object fraction of a patch (with a background)')
    group.add_argument('--min-overlap-pct', type=float, metavar='F',
                       help='minimum overlap of source and destination objects (with a background)')
    group.add_argument('--resize-bounds', type=float, nargs=2, metavar=('LOW', 'HIGH'),
                       help='bounds of the random patch rescaling factor')
    group.add_argument('--gamma', type=float, nargs=3, metavar=('SHAPE', 'SCALE', 'LOWER'),
                       help='gamma distribution of the patch half-width (settings that use it)')
    group.add_argument('--clip-at-border', action=argparse.BooleanOptionalAction,
                       help='shifted patches may hang over the image border and are cut there')
    group.add_argument('--paste-fraction', type=float, nargs=2, metavar=('LOW', 'HIGH'),
                       help='mix each Poisson-blended patch with its plain paste by a fraction '
                            'U(LOW, HIGH) (0 0: seamless blending, the paper\'s)')
    group.add_argument('--normal-fraction', type=float, metavar='P',
                       help='leave each training sample normal (no patch, all-zero label) with '
                            'probability P (default 0, the paper\'s)')


def param_overrides(args):
    """Category parameter overrides from parsed ``add_task_arguments`` options."""
    def pairs(values):
        return None if values is None else tuple(values)
    width = args.width_bounds
    overrides = dict(
        width_bounds_pct=None if width is None else ((width[0], width[1]), (width[2], width[3])),
        num_patches=args.num_patches, intensity_logistic_params=pairs(args.logistic),
        background=pairs(args.background), min_object_pct=args.min_object_pct,
        min_overlap_pct=args.min_overlap_pct, resize_bounds=pairs(args.resize_bounds),
        gamma_params=pairs(args.gamma), clip_at_border=args.clip_at_border,
        paste_fraction=pairs(args.paste_fraction), normal_fraction=args.normal_fraction)
    if width is not None and not (all(0 < w <= 0.5 for w in width)
                                  and width[0] <= width[1] and width[2] <= width[3]):
        raise ValueError(f"--width-bounds must be half-widths with 0 < min <= max <= 0.5, got {width}")
    background = args.background
    if background is not None and not (0 <= background[0] <= 255 and 0 <= background[1] < math.inf):  # not NaN
        raise ValueError(f"--background must be BRIGHTNESS THRESHOLD with BRIGHTNESS a grey level from 0 to 255 "
                         f"(of the images as read, 8 bits) and THRESHOLD a finite value >= 0, got {background[0]:g} "
                         f"{background[1]:g}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    for name, value in overrides.items():  # the generator's own checks, before any run
        try:
            PatchParams(**{PATCH_ARGUMENT.get(name, name): value})
        except ValueError as error:
            raise ValueError(f'{OVERRIDE_FLAGS[name]}: {error}') from None
    return overrides


def draws_cutpaste_patches(args, setting):
    """Whether the generator draws CutPaste's rectangles (one patch of its own size, anywhere):
    the setting's own patch generation (CutPaste-3way) or --cutpaste-patch-gen."""
    return setting.self_sup_args.get('cutpaste_patch_generation', False) or args.cutpaste_patch_gen


def task_uses(args, setting):
    """{category parameter: whether ``setting``'s task, with the task flags of parsed
    ``add_task_arguments`` options, uses it}: the logistic label only with a logistic label, the
    gamma distribution and resizing where the task draws them, the border only for shifted
    patches, the paste fraction only for Poisson blends, normal samples not for a classifier;
    CutPaste's patch generation (one rectangle of its own anywhere, ``patch_ex``) uses no patch
    size, count or object mask. (--single-patch and --no-mask are not counted here.)"""
    task = setting.self_sup_args
    cutpaste_patches = draws_cutpaste_patches(args, setting)
    uses = dict(intensity_logistic_params=task['label_mode'] == 'logistic-intensity',
                gamma_params=task['gamma_params'] is not None and not cutpaste_patches,
                resize_bounds=task['resize'] and not cutpaste_patches,
                clip_at_border=task['shift'], paste_fraction=setting.base in POISSON_BASES,
                normal_fraction=setting.model != 'classifier')
    uses.update({name: not cutpaste_patches for name in ('width_bounds_pct', 'num_patches')
                 + OBJECT_MASK_PARAMS})
    return uses


def ignored_task_options(args, setting, overrides):
    """Notes naming each task flag or category parameter option (``overrides``, from
    ``param_overrides``) that ``setting`` ignores: one that its task does not use (``task_uses``;
    and ellipses with CutPaste's patch generation), or one that another flag turns off
    (--num-patches with --single-patch, the object mask's options with --no-mask). They are notes,
    not errors: runs trained with such options stay resumable with the same command."""
    uses = task_uses(args, setting)
    cutpaste_patches = draws_cutpaste_patches(args, setting)
    task_name = f"{setting.key}{' with --cutpaste-patch-gen' if args.cutpaste_patch_gen else ''}"
    notes = [f"{OVERRIDE_FLAGS[name]} does not apply to {task_name}, whose task does not use it: ignored"
             for name, used in uses.items() if name in overrides and not used
             and overrides[name] is not False]  # --no-clip-at-border: what such a task does anyway
    if args.ellipse and cutpaste_patches:
        notes.append(f"--ellipse does not apply to {task_name}, whose patches are CutPaste's "
                     f"rectangles: ignored (but for its extra epochs)")
    if args.single_patch and 'num_patches' in overrides and uses['num_patches']:
        notes.append('--num-patches with --single-patch: one patch, --num-patches ignored')
    masked = [OVERRIDE_FLAGS[name] for name in OBJECT_MASK_PARAMS if name in overrides and uses[name]]
    if args.no_mask and masked:
        kept = (" (where a validation set is held out, its synthetic defects still lie on the object that "
                "--background finds)"
                if 'background' in overrides and uses['background'] else '')
        notes.append(f"--no-mask turns off the object mask that {masked[0]} sets: ignored for training{kept}")
    return notes


def ignored_category_options(class_name, kind, overrides):
    """Notes naming --min-object-pct or --min-overlap-pct where the category has no background
    (neither --background nor a table entry), which they need (see ``ignored_task_options``)."""
    params = category_params(class_name, kind, overrides)
    return [f"{OVERRIDE_FLAGS[name]} applies to an object mask, and {class_name!r} has no background "
            f"(--background BRIGHTNESS THRESHOLD, or its CATEGORY_PARAMS entry): ignored"
            for name in ('min_object_pct', 'min_overlap_pct')
            if name in overrides and params['background'] is None]


def self_sup_args_from_args(setting, params, args):
    """``self_sup_args_for`` with the task flags of parsed ``add_task_arguments`` options."""
    return self_sup_args_for(setting, params, single_patch=args.single_patch,
                             cutpaste_patch_gen=args.cutpaste_patch_gen, use_mask=not args.no_mask,
                             ellipse=args.ellipse)
