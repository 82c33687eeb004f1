"""Recipe calibration: the generator's parameters set from what its anomalies do to a material.

A user's own category comes with normal images only. ``calibrate_recipe`` draws a few hundred
single-patch synthetic anomalies from those images (training crops, as the training loop sees
them) and sets the data-dependent parameters of ``patch_ex`` from the measured effect, never from
a defective image:

- **logistic label** ``(k, x0)`` from the distribution of the seamless blends' intensity change
  ``d`` (the values the 'intensity' label takes on changed pixels; the plain pastes' where fewer
  than a tenth of the blends, ``MIN_CHANGED_SHARE``, change anything, or fewer blends than pastes
  where fewer than that share of pastes do, ``label_from_pastes``; a warning where fewer than
  that share of anomalies change the images at all, and an error where none does): ``x0`` is its
  median, so that half of the changed pixels are labelled above 0.5, and
  ``k = 2 ln 9 / (q90 - q10)``, the slope that takes the label from 0.1 to 0.9 across a span as
  wide as the central 80% of the changes (percentiles of the quantised
  changes interpolated within their grey level, ``change_percentiles``):
  the blends' labels use the range (0, 1) whatever the material's contrast (the paper's texture label
  (1/3, 7) takes it from 0.1 to 0.9 between 0.4 and 13.6 grey levels). Where the label follows the
  blends and pastes are mixed in (next item), the mixes change the image far more than the blends,
  so most trained labels are near 1 (a label fitted to the mixes was rejected by the validation
  score, BENCHMARKS.md).
- **paste fraction** from the blend's *visibility* ``v``: the mean absolute change of the seamless
  blend over the mean absolute change that a plain paste of the same patch makes (pooled over the
  samples). Poisson editing removes the patch's low-frequency difference; when it removes nearly
  all of it (``v <= INVISIBLE``) the blend is nearly invisible and each blend is mixed with its
  plain paste by ``b ~ U(low, 1)``, ``low = (MIN_VISIBILITY - v) / (1 - v)``, so that the mix
  keeps at least ``MIN_VISIBILITY`` of the paste's change; a blend that keeps ``VISIBLE`` or more
  stays seamless, as in the paper, and between the two the range ``(low, 1)`` shrinks linearly
  towards ``(0, 0)`` (materials of nearly equal visibility get nearly equal mixes). Where the label
  follows the plain pastes (``label_from_pastes``: few blends change a pixel by more than the
  label's tolerance), the blends count as invisible (``v = 0``) whatever their visibility, so that
  the anomalies trained change the image as much as the changes the label was fitted to. Only for
  the Poisson-blending settings.
- **patch sizes**: a patch is *effective* when at least half of its pixels are labelled as
  anomalous by the setting's own label with the calibrated ``(k, x0)`` (``labelled_anomalous``: a
  label of 0.5 or more for the logistic and binary labels, any change for the continuous and raw
  intensity labels). Patch sides are measured as fractions of the training crop's side, the side
  that ``patch_ex``'s bounds are fractions of, from the pixels that the plain paste changes (its
  'intensity' label): unchanged pixels and the label's median-filtered rim are not counted, so a
  side comes out smaller than drawn (a median 0.78 of it on the brick demo at 64 px, 0.88 at 128
  px); the recipes in BENCHMARKS.md were calibrated so. Patches are binned by size; the lower half-width
  bound is raised to the smallest size from which on most patches (``MIN_EFFECTIVE``) are
  effective (small blends often vanish).
- **patch count**: the first patch is always drawn and each further one with probability 1/2, so
  up to N patches give ``1 + (N - 1) / 2`` on average. N is raised until the expected number of
  *effective* patches reaches the kind default's expected number of patches (up to
  ``MAX_PATCH_FACTOR`` times the default).
- **patches over the border** (``clip_at_border``) for textures whose border band looks like the
  inside: the median local standard deviation (``LOCAL_WINDOW`` pixels) of the outer tenth of each
  side within a factor ``BORDER_RATIO`` of the inner region's (``border_texture_ratio``). A
  stationary texture can have a defect anywhere, and patches that must lie inside the image rarely
  cover its border. Objects (and data with an object mask) keep their patches inside.

Parameters that the user set explicitly are kept as given (``fixed``). The calibration is
deterministic for a given seed and set of images. It knows nothing of torch.
"""
import math
import warnings

import cv2
import numpy as np

from self_sup_data.images import WINDOW_MARGIN
from self_sup_data.self_sup_tasks import POISSON_MODES, object_mask, patch_ex

NUM_SAMPLES = 300
MIN_CHANGED_SHARE = 0.1  # of the samples: the fewest changed ones a recipe is measured on
OBJECT_MASK_OPTIONS = ("the object mask (--background or the category's entry, --min-object-pct, "
                       "--min-overlap-pct)")  # what restricts where patches go, in messages
CALIBRATION_STREAM = 0x5EC1  # separates the calibration's random stream from the training items'
INVISIBLE = 0.1  # blends keeping at most this share of a paste's change are nearly invisible
VISIBLE = 0.2  # ... and those keeping at least this share are visible: they stay seamless
MIN_VISIBILITY = 0.5  # the least share of a paste's change that a mix of an invisible blend keeps
LABEL_QUANTILES = (10, 50, 90)
MIN_CHANGE_SPREAD = 1.0  # grey levels: the smallest q90 - q10 that k is computed from
EFFECTIVE_LABEL = 0.5
MIN_EFFECTIVE = 0.5
SIZE_BINS = 5
MAX_PATCH_FACTOR = 4
MAX_LOWER_HALF_WIDTH = 0.15  # a raised lower half-width bound stays at most this fraction of the side
BORDER_BAND = 0.1
BORDER_RATIO = 2.0
LOCAL_WINDOW = 7
SHOWN_RATIO = 1000  # a border / inner ratio above it is printed as such (an inside flat in most windows)
LOW_CONTRAST = 16  # grey levels: training images spanning fewer (median) are too flat for NSA's labels
CALIBRATED_PARAMS = ('intensity_logistic_params', 'paste_fraction', 'width_bounds_pct',
                     'gamma_params', 'num_patches', 'clip_at_border')
PATCH_SIZE_PARAMS = ('width_bounds_pct', 'gamma_params')  # calibrated together, kept together


def kept_as_given(fixed):
    """The calibrated parameters that ``calibrate_recipe`` keeps as given for the explicitly set
    ``fixed``: those named, and both patch-size parameters where either one is."""
    kept = set(fixed) & set(CALIBRATED_PARAMS)
    return kept | set(PATCH_SIZE_PARAMS) if kept & set(PATCH_SIZE_PARAMS) else kept


def expected_patches(num_patches):
    """Mean number of patches ``patch_ex`` attempts with up to ``num_patches``: 1 + (N - 1) / 2."""
    return 1 + (num_patches - 1) / 2


def change_percentiles(changes, percentiles=LABEL_QUANTILES):
    """Percentiles of ``changes`` read as grouped data: each distinct value stands for a bin that
    reaches halfway to its neighbours (the outer bins as far out as inside), and the percentile is
    interpolated inside its bin, linearly in the count (the grouped-data median of statistics
    textbooks, ``L + (n p - F) / f * w``).

    The changes are quantised (whole grey levels, or thirds of one for three channels), so
    ``np.percentile`` of them jumps from one level to the next when a few samples change (a
    median of 3 or 4 grey levels from the same images drawn with different seeds); this one moves
    continuously with the counts."""
    levels, counts = np.unique(np.asarray(changes, dtype=np.float64), return_counts=True)
    if levels.size == 1:
        return np.full(len(percentiles), levels[0])
    middles = (levels[1:] + levels[:-1]) / 2
    edges = np.concatenate([[2 * levels[0] - middles[0]], middles, [2 * levels[-1] - middles[-1]]])
    cumulative = np.concatenate([[0], np.cumsum(counts)]) / counts.sum()
    return np.interp(np.asarray(percentiles, dtype=np.float64) / 100, cumulative, edges)


def logistic_from_changes(changes):
    """``(k, x0)``: ``x0`` the median of ``changes``, ``k = 2 ln 9 / (q90 - q10)`` (the label goes
    from 0.1 to 0.9 over ``x0 -+ (q90 - q10) / 2``); q90 - q10 at least MIN_CHANGE_SPREAD. The
    percentiles are ``change_percentiles``."""
    q10, q50, q90 = change_percentiles(changes, LABEL_QUANTILES)
    return 2 * math.log(9) / max(float(q90 - q10), MIN_CHANGE_SPREAD), float(q50)


def paste_fraction_for(visibility):
    """The paste fraction ``(low, high)`` for seamless blends that keep a share ``v`` of a paste's
    change, or None (seamless blends). Up to INVISIBLE, ``(low, 1)`` with
    ``low = (MIN_VISIBILITY - v) / (1 - v)``, rounded to the hundredth: every mix keeps
    MIN_VISIBILITY of the paste's change, less what that rounding takes (magnetic tile, v = 0.05:
    U(0.47, 1), whose weakest mix keeps 0.4965); from VISIBLE on, None; in between, both ends times
    ``(VISIBLE - v) / (VISIBLE - INVISIBLE)``, so that the mix fades into the seamless blend."""
    fade = round(float(min(1.0, (VISIBLE - visibility) / (VISIBLE - INVISIBLE))), 2)
    if fade <= 0:
        return None
    low = fade * (MIN_VISIBILITY - visibility) / (1 - visibility)
    return (round(float(low), 2), fade)


def labelled_anomalous(label, label_mode):
    """Boolean map of the pixels of ``label`` (of ``patch_ex``'s ``label_mode``) that it marks as
    anomalous: at least EFFECTIVE_LABEL for the logistic and binary labels (whose values say how
    anomalous a pixel is, 0 to 1), above 0 for the continuous label (the patch's interpolation
    factor wherever the image changed) and the raw intensity label (the change itself)."""
    if label_mode in ('continuous', 'intensity'):
        return label > 0
    return label >= EFFECTIVE_LABEL


def patches_for(effective_fraction, default_patches):
    """Smallest N >= ``default_patches`` whose expected effective patches (``effective_fraction``
    of ``expected_patches(N)``) reach ``expected_patches(default_patches)``, at most
    ``MAX_PATCH_FACTOR * default_patches``."""
    target = expected_patches(default_patches)
    most = MAX_PATCH_FACTOR * default_patches
    if effective_fraction <= 0:
        return most
    needed = math.ceil(1 + 2 * (target / effective_fraction - 1) - 1e-9)
    return int(min(max(needed, default_patches), most))


def lower_half_width(sides, effective, default_lower):
    """Lower half-width bound (fraction of the side) from which on most patches are effective.

    ``sides``: patch sides as fractions of the image side, ``effective``: bool per patch. Patches
    are split into SIZE_BINS bins of equal count; the bound is half the smallest side of the first
    bin from which on every bin has at least MIN_EFFECTIVE effective patches (``default_lower`` if
    that is the first bin or no bin qualifies), at most MAX_LOWER_HALF_WIDTH.
    """
    order = np.argsort(sides, kind='stable')
    bins = np.array_split(order, SIZE_BINS)
    rates = [effective[b].mean() if b.size else 0.0 for b in bins]
    start = len(bins)
    while start > 0 and rates[start - 1] >= MIN_EFFECTIVE:
        start -= 1
    if start in (0, len(bins)):
        return default_lower
    return float(min(max(default_lower, sides[bins[start][0]] / 2), MAX_LOWER_HALF_WIDTH))


def fewest_changed(samples):
    """The fewest of ``samples`` synthetic anomalies that must change the images for a recipe to
    rest on them (MIN_CHANGED_SHARE, rounded up: 30 of the default 300)."""
    return math.ceil(MIN_CHANGED_SHARE * samples)


def label_from_pastes(report):
    """Whether ``calibrate_recipe`` took the label from the plain pastes' change (a ``report`` of it):
    where fewer blends than ``fewest_changed`` (or than the pastes, if fewer) change anything, else
    from the blends'."""
    return report['blends_changed'] < min(fewest_changed(report['samples']), report['changed'])


def border_texture_ratio(images, band=BORDER_BAND, window=LOCAL_WINDOW):
    """Median local standard deviation (``window`` x ``window``) in the outer ``band`` of each
    side over that of the inner region, pooled over ``images`` (uint8 H x W x C). Where both medians
    are 0 (flat in most windows), the ratio of the means: sparse specks everywhere are alike (about
    1), a small object on a plain background is not (0); 1 where both means are 0 too."""
    border, inner = [], []
    for image in images:
        gray = image.astype(np.float32).mean(axis=-1)
        mean = cv2.blur(gray, (window, window))
        local_std = np.sqrt(np.maximum(cv2.blur(gray * gray, (window, window)) - mean * mean, 0))
        height, width = gray.shape
        rows, cols = max(1, round(band * height)), max(1, round(band * width))
        in_band = np.ones_like(gray, dtype=bool)
        in_band[rows:height - rows, cols:width - cols] = False
        border.append(local_std[in_band])
        inner.append(local_std[~in_band])
    border, inner = np.concatenate(border), np.concatenate(inner)
    for statistic in (np.median, np.mean):
        border_value, inner_value = float(statistic(border)), float(statistic(inner))
        if max(border_value, inner_value) >= 1e-6:
            return border_value / max(inner_value, 1e-6)
    return 1.0  # flat everywhere


def grey_level_spread(images):
    """The grey levels that the uint8 ``images`` (``H x W x C``) span: the median over the images of
    the difference between the 99th and the 1st percentile of an image's values in its widest
    channel (a flat colour spans few levels in each channel, however far apart the channels)."""
    return float(np.median([np.subtract(*np.percentile(image.reshape(-1, image.shape[2]), (99, 1), axis=0)).max()
                            for image in images]))


def low_contrast_message(images, category, bit_depth=None, depth_given=False, window=None):
    """A warning's text where the training ``images`` of ``category`` span fewer than LOW_CONTRAST
    grey levels (``grey_level_spread``) as the generator sees them, else None: a blend or paste
    then changes a pixel by a level or two, which most labels leave at 0, so that a model learns to
    find nothing (a flat material, or 16-bit data that uses a small part of its range, which is
    read as 8 bits from the range of ``bit_depth`` bits: found in 16-bit training images, or
    ``depth_given`` by --bit-depth or --intensity-range, whatever the files hold; from an intensity
    window where ``bit_depth`` is a pair [low, high]). ``window``: the intensity window that the
    message suggests for the 16-bit files among them (``mvtec.suggested_intensity_window``; None:
    none is suggested)."""
    spread = grey_level_spread(images)
    if spread >= LOW_CONTRAST:
        return None
    whose = '16-bit files among them' if depth_given else 'their 16-bit values'
    if bit_depth is None:
        read_as = ''
    elif isinstance(bit_depth, int):
        read_as = f"; {whose} read as 8 bits from the {bit_depth}-bit range 0..{2 ** bit_depth - 1}"
    else:
        read_as = f"; {whose} read as 8 bits from the window {bit_depth[0]}..{bit_depth[1]}"
    fix = ("stretch the images' contrast to a wider range before training, by one fixed mapping for "
           "training, test and new images alike")
    if window is not None:
        fix = (f"train with --intensity-range {window[0]} {window[1]} (their 16-bit values' 1st to 99th "
               f"percentile, widened by {WINDOW_MARGIN:.0%} of that range on each side), which the model keeps "
               f"for its test and new images, or {fix}")
    return (f"category {category!r}: the training images span only {grey_levels(spread)} (1st to 99th "
            f"percentile, median over the images{read_as}): synthetic anomalies change them by a level or "
            f"two, which their labels mostly leave at 0; {fix}")


def grey_levels(count):
    """``count`` grey levels in words: '1 grey level', '2.5 grey levels'."""
    return f"{count:g} grey level{'' if count == 1 else 's'}"


def _draw_pairs(images, transform, rng, num_samples):
    """``num_samples`` (dest, src) training crops of two different images (the same image when
    there is only one)."""
    pairs = []
    for _ in range(num_samples):
        if len(images) > 1:
            i, j = rng.choice(len(images), 2, replace=False)
        else:
            i = j = 0
        dest, _ = transform(images[i].copy(), None, rng)
        src, _ = transform(images[j].copy(), None, rng)
        pairs.append((dest, src))
    return pairs


def _single_patches(pairs, args, seeds, **changes):
    """``patch_ex`` with one patch per pair (none left normal) and ``args`` updated with
    ``changes``; patch ``i`` uses the generator seeded by ``seeds[i]``, so two calls with the same
    seeds draw the same patches."""
    args = {**args, 'num_patches': 1, 'verbose': False, 'normal_fraction': 0.0, **changes}
    return [patch_ex(dest, src, rng=np.random.default_rng(seed), **args)
            for (dest, src), seed in zip(pairs, seeds)]


def background_text(background):
    """How the user set ``background``: ``'--background B T'`` for one (brightness, threshold)
    pair, else the pairs as the category parameter ``background`` holds them."""
    pairs = np.asarray(background, dtype=float).reshape(-1, 2)
    if len(pairs) == 1:
        return f"--background {pairs[0, 0]:g} {pairs[0, 1]:g}"
    return f"background {[tuple(float(v) for v in pair) for pair in pairs]}"


def check_object_pixels(images, background, category):
    """ValueError naming ``category`` and its background (``background_text``) when no image has
    an object pixel."""
    if not any(object_mask(image, background).any() for image in images):
        raise ValueError(f"category {category!r}: {background_text(background)} leaves no object "
                         f"pixel in any training image; choose a brightness and threshold that "
                         f"only cover the background")


def calibrate_recipe(images, transform, self_sup_args, params, kind, seed=0, fixed=(),
                     category='category', num_samples=None):
    """Calibrate the category parameters ``params`` to the normal ``images``.

    Args:
        images: uint8 training images ``H x W x C`` (the training split only).
        transform: the training transform ``t(image, None, rng) -> (crop, None)``.
        self_sup_args: ``patch_ex`` arguments of the setting with the uncalibrated ``params``.
        params: category parameters (``experiments.settings.CATEGORY_PARAM_NAMES``), the kind's
            defaults with the user's overrides.
        kind: 'object' or 'texture'.
        fixed: names of parameters the user set explicitly; they are kept.
        num_samples: synthetic anomalies drawn (default ``NUM_SAMPLES``).
    Returns:
        (params, report): the calibrated parameters, and a dict of plain values with what was
        measured (see the module docstring) and the values chosen.
    """
    num_samples = NUM_SAMPLES if num_samples is None else num_samples
    rng = np.random.default_rng(np.random.SeedSequence([seed, CALIBRATION_STREAM]))
    if self_sup_args.get('skip_background') is not None:
        check_object_pixels(images, self_sup_args['skip_background'], category)
    pairs = _draw_pairs(images, transform, rng, num_samples)
    seeds = rng.integers(2**63, size=num_samples)
    poisson = self_sup_args['mode'] in POISSON_MODES or self_sup_args['mode'] == 'mix'
    plain = {'paste_fraction': None} if poisson else {}
    params, report = dict(params), dict(samples=num_samples)
    fixed = kept_as_given(fixed)

    blends = _single_patches(pairs, self_sup_args, seeds, label_mode='intensity', **plain)
    pastes = _single_patches(pairs, self_sup_args, seeds, label_mode='intensity',
                             **({'paste_fraction': (1.0, 1.0)} if poisson else {}))
    report['changed'] = changed = sum(bool((label > 0).any()) for _, label in pastes)
    report['blends_changed'] = sum(bool((label > 0).any()) for _, label in blends)
    masked = self_sup_args.get('skip_background') is not None

    def spread():
        return f"they span {grey_levels(grey_level_spread(images))}, 1st to 99th percentile, median over the images"
    if changed == 0:
        raise ValueError(f"category {category!r}: none of {num_samples} synthetic anomalies changed "
                         f"the training images: are they blank or nearly uniform ({spread()})"
                         + (f", or does {OBJECT_MASK_OPTIONS} leave no place for a patch?" if masked else "?"))
    if changed < fewest_changed(num_samples):
        cause = (f"{OBJECT_MASK_OPTIONS} may leave little place for a patch" if masked
                 else f"the images may be nearly uniform ({spread()})")
        warnings.warn(f"category {category!r}: only {changed} of {num_samples} synthetic anomalies "
                      f"changed the training images, and the calibrated recipe rests on them; "
                      f"{cause}, else --recipe table")
    # blends that (almost) never change anything: the label follows the pastes' change
    from_pastes = label_from_pastes(report)
    source = pastes if from_pastes else blends
    changes = np.concatenate([label[label > 0] for _, label in source])
    report['change_quantiles'] = [float(q) for q in change_percentiles(changes)]
    if 'intensity_logistic_params' not in fixed:
        k, x0 = logistic_from_changes(changes)
        params['intensity_logistic_params'] = (round(float(k), 4), round(float(x0), 2))
    if poisson:
        blend_change = paste_change = 0.0
        for (dest, _), (blended, _), (pasted, label) in zip(pairs, blends, pastes):
            changed = label[..., 0] > 0
            blend_change += np.abs(blended.astype(np.float32) - dest)[changed].sum()
            paste_change += np.abs(pasted.astype(np.float32) - dest)[changed].sum()
        report['visibility'] = float(blend_change / max(paste_change, 1e-6))
        if 'paste_fraction' not in fixed:  # a label fitted to the pastes' change marks few of the blends
            params['paste_fraction'] = paste_fraction_for(0.0 if from_pastes else report['visibility'])

    final_args = {**self_sup_args,
                  'intensity_logistic_params': tuple(params['intensity_logistic_params'])}
    if poisson:
        final_args['paste_fraction'] = params['paste_fraction']
    labelled = _single_patches(pairs, final_args, seeds)
    side = min(pairs[0][0].shape[:2])  # the training crop's
    sides, effective = [], []
    for (_, label), (_, footprint) in zip(labelled, pastes):
        area = int((footprint > 0).sum())
        if area:
            sides.append(math.sqrt(area) / side)
            anomalous = labelled_anomalous(label, final_args.get('label_mode', 'binary'))
            effective.append(anomalous.sum() >= area / 2)
    sides, effective = np.array(sides), np.array(effective, dtype=bool)
    report['effective_fraction'] = float(effective.mean()) if effective.size else 0.0

    default_lower = params['width_bounds_pct'][0][0]
    if sides.size and 'width_bounds_pct' not in fixed:  # nor gamma_params (kept_as_given)
        lower = lower_half_width(sides, effective, default_lower)
        if lower > default_lower:
            (_, h_max), (_, w_max) = params['width_bounds_pct']
            params['width_bounds_pct'] = ((round(lower, 3), max(h_max, lower)),
                                          (round(lower, 3), max(w_max, lower)))
            shape, scale, _ = params['gamma_params']
            params['gamma_params'] = (shape, scale, round(lower, 3))
            kept = sides >= 2 * lower
            report['effective_fraction_kept_sizes'] = float(effective[kept].mean())
    if 'num_patches' not in fixed:
        fraction = report.get('effective_fraction_kept_sizes', report['effective_fraction'])
        params['num_patches'] = patches_for(fraction, params['num_patches'])

    report['border_texture_ratio'] = border_texture_ratio(images)
    if 'clip_at_border' not in fixed:
        stationary = 1 / BORDER_RATIO <= report['border_texture_ratio'] <= BORDER_RATIO
        params['clip_at_border'] = bool(kind == 'texture' and params['background'] is None
                                        and stationary)
    report['params'] = {name: params[name] for name in CALIBRATED_PARAMS}
    return params, report


def describe(report, unused=(), given=()):
    """One line per calibrated value and what it was derived from (for printing); a value whose
    parameter is named in ``unused`` (one the setting's task ignores) is marked so, and one named
    in ``given`` (``fixed`` of ``calibrate_recipe``: set, not calibrated, ``kept_as_given``) is
    marked as set, beside what the calibration measured."""
    params = report['params']
    given = kept_as_given(given)

    def shown(name, text):
        notes = [note for note, applies in (('set, not calibrated', name in given),
                                            ('not used by this task', name in unused)) if applies]
        return f"{text} ({'; '.join(notes)})" if notes else text
    q10, q50, q90 = report['change_quantiles']
    label = shown('intensity_logistic_params',
                  f"logistic label (k, x0) = {params['intensity_logistic_params']}")
    change = f"10/50/90th percentile {q10:.1f} / {q50:.1f} / {q90:.1f} grey levels"
    from_pastes = label_from_pastes(report)
    source = ("the plain pastes' intensity change (few seamless blends change anything)" if from_pastes
              else "the blends' intensity change")
    lines = [f"{label}; {source}: {change}" if 'intensity_logistic_params' in given
             else f"{label} from {source} ({change})"]
    if 'visibility' in report:
        fraction = params['paste_fraction']
        mix = 'none (seamless blends)' if fraction is None else f"U{tuple(fraction)}"
        paste = shown('paste_fraction', f'paste fraction = {mix}')
        keep = f"seamless blends keep {report['visibility']:.3f} of a plain paste's change"
        rule = "the label follows the pastes, so they are mixed in" if from_pastes else f"mixed in below {VISIBLE}"
        lines.append(f"{paste}; {keep}" if 'paste_fraction' in given else f"{paste} ({keep}; {rule})")
    widths = shown('width_bounds_pct', f"patch half-widths {params['width_bounds_pct']}")
    gamma = shown('gamma_params', f"gamma {params['gamma_params']}")
    count = shown('num_patches', f"up to {params['num_patches']} patches")
    if 'effective_fraction_kept_sizes' in report:  # the count follows the patches of the sizes kept
        effective = f"{report['effective_fraction_kept_sizes']:.2f} of single patches of these sizes effective"
    else:
        effective = f"{report['effective_fraction']:.2f} of single patches effective"
    lines.append(f"{widths}, {gamma}, {count} ({effective})")
    border = shown('clip_at_border', f"patches over the border: {params['clip_at_border']}")
    ratio = report['border_texture_ratio']
    ratio_text = f'{ratio:.2f}' if ratio <= SHOWN_RATIO else f'over {SHOWN_RATIO:g}: flat inside'
    lines.append(f"{border} (border / inner local contrast {ratio_text})")
    return lines
