"""Anomaly detection and localisation metrics: plain functions of numpy arrays.

Image level (one score per image, see `image_scores`):
    image_auroc, image_ap
Pixel level (anomaly maps against binary ground-truth masks):
    pixel_auroc, pixel_ap, au_pro, au_spro (MVTec LOCO AD's saturated PRO)
All of them at once, as reported in the tables:
    evaluate_maps
Decisions at a threshold (anomalous when the score is above it):
    threshold_at_fpr (from normal scores only), best_f1_threshold, precision_recall_f1,
    threshold_metrics (both levels, as reported in the tables)

Maps and masks are stacks `N x H x W` or `N x 1 x H x W`. Every metric validates its input in the
manner of scikit-learn (a `ValueError` naming the argument) and returns a python float.

The ranking metrics never sort indices over all pixels (a 40-million-element argsort takes ~8 s on
a laptop core); they sort the scores of the negative pixels by value only and locate the few
distinct positive scores in that sorted array, which is exact and several times faster.
"""
import math
from fractions import Fraction

import numpy as np
from scipy import ndimage

__all__ = ['image_scores', 'image_auroc', 'image_ap', 'image_auroc_per_type', 'pixel_auroc', 'pixel_ap',
           'au_pro', 'au_spro', 'evaluate_maps', 'allowed_above', 'threshold_at_fpr', 'best_f1_threshold',
           'precision_recall_f1', 'threshold_metrics']
THRESHOLD_METRICS = ('image_f1_best', 'image_threshold_best', 'image_precision', 'image_recall',
                     'image_f1', 'pixel_f1_best', 'pixel_threshold_best', 'pixel_precision',
                     'pixel_recall', 'pixel_f1')

# 8-connectivity within each image, none across the images of a stack
_EIGHT_CONNECTED_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_EIGHT_CONNECTED_IN_PLANE[1] = True


# ---------------------------------------------------------------------------------------------
# input validation

def _as_binary(values, name):
    """`values` as a bool array; ValueError unless every entry is 0 or 1 (or bool)."""
    values = np.asarray(values)
    if values.dtype == bool:
        return values
    if not np.issubdtype(values.dtype, np.number):
        raise ValueError(f'{name} must hold 0/1 or bool values, got dtype {values.dtype}')
    binary = values != 0
    if np.any(binary & (values != 1)):
        bad = np.unique(values[binary & (values != 1)])[:5]
        raise ValueError(f'{name} must be binary (0/1 or bool), found values such as {bad.tolist()}')
    return binary


def _as_scores(values, name):
    """`values` as a float array; ValueError for non-numeric, NaN or infinite entries."""
    values = np.asarray(values)
    if values.dtype == bool or not np.issubdtype(values.dtype, np.number):
        raise ValueError(f'{name} must hold real-valued scores, got dtype {values.dtype}')
    if not np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError(f'{name} contains NaN or infinite values')
    return values


def _as_stack(values, name):
    """View an `N x H x W` or `N x 1 x H x W` array as `N x H x W`."""
    values = np.asarray(values)
    if values.ndim == 4 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 3:
        raise ValueError(f'{name} must have shape N x H x W or N x 1 x H x W, got {values.shape}')
    return values


def _check_same_length(a, b, name_a, name_b):
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError(f'{name_a} and {name_b} must be 1-d, got shapes {a.shape} and {b.shape}')
    if len(a) != len(b):
        raise ValueError(f'{name_a} and {name_b} must have the same length, got {len(a)} and {len(b)}')


def _pixel_inputs(masks, maps):
    """Validated (defect bool N x H x W, scores N x H x W) with matching shapes."""
    masks = _as_stack(masks, 'masks')
    maps = _as_stack(maps, 'maps')
    if masks.shape != maps.shape:
        raise ValueError(f'masks and maps must have the same shape, got {masks.shape} and {maps.shape}')
    return _as_binary(masks, 'masks'), _as_scores(maps, 'maps')


def _image_inputs(labels, scores):
    labels, scores = np.asarray(labels), np.asarray(scores)
    _check_same_length(labels, scores, 'labels', 'scores')
    return _as_binary(labels, 'labels'), _as_scores(scores, 'scores')


def _split_by_class(positive, scores, name):
    """(sorted scores of the negatives, scores of the positives); ValueError if a class is missing."""
    positive, scores = positive.ravel(), scores.ravel()
    n_pos = np.count_nonzero(positive)
    if n_pos == 0 or n_pos == positive.size:
        missing = 'positive (1)' if n_pos == 0 else 'negative (0)'
        raise ValueError(f'{name} must contain both classes; there is no {missing} entry')
    return np.sort(scores[~positive]), scores[positive]


# ---------------------------------------------------------------------------------------------
# ranking metrics from (sorted negatives, positives)

def _distinct_values(scores):
    """Distinct values of `scores` in ascending order and how often each occurs."""
    scores = np.sort(scores)
    starts = np.flatnonzero(np.concatenate(([True], scores[1:] != scores[:-1])))
    return scores[starts], np.diff(np.append(starts, scores.size))


def _auroc(neg_sorted, pos):
    """P(s_pos > s_neg) + P(s_pos == s_neg) / 2, summed exactly over the distinct positive scores."""
    values, counts = _distinct_values(pos)
    below = np.searchsorted(neg_sorted, values, side='left')        # negatives <  v
    below_or_tie = np.searchsorted(neg_sorted, values, side='right')  # negatives <= v
    twice_wins = np.sum(counts * (below + below_or_tie))  # int64, exact
    return float(twice_wins / (2.0 * pos.size * neg_sorted.size))


def _average_precision(neg_sorted, pos):
    """sum_n (R_n - R_{n-1}) P_n over the distinct thresholds (scikit-learn's definition)."""
    values, counts = _distinct_values(pos)
    true_pos = pos.size - np.concatenate(([0], np.cumsum(counts)[:-1]))       # positives >= v
    false_pos = neg_sorted.size - np.searchsorted(neg_sorted, values, side='left')  # negatives >= v
    precision = true_pos / (true_pos + false_pos)
    return float(np.sum(counts * precision) / pos.size)


# ---------------------------------------------------------------------------------------------
# image level

def image_scores(maps, reduction='mean'):
    """Score of each image from its anomaly map: the mean over its pixels (the NSA paper) or the
    maximum (the MVTec AD protocol).

    maps: N x H x W or N x 1 x H x W.  Returns a float array of shape (N,).
    """
    maps = _as_scores(_as_stack(maps, 'maps'), 'maps')
    if reduction == 'mean':
        return maps.mean(axis=(1, 2), dtype=np.float64)
    if reduction == 'max':
        return maps.max(axis=(1, 2)).astype(np.float64)
    raise ValueError(f"reduction must be 'mean' or 'max', got {reduction!r}")


def image_auroc(labels, scores):
    """Area under the ROC curve of image scores against image labels (1 = anomalous).

    Equals P(s_anomalous > s_normal) + P(s_anomalous == s_normal) / 2 over all pairs, i.e.
    scikit-learn's `roc_auc_score`.
    """
    labels, scores = _image_inputs(labels, scores)
    return _auroc(*_split_by_class(labels, scores, 'labels'))


def image_ap(labels, scores):
    """Average precision of image scores against image labels (1 = anomalous):
    AP = sum_n (R_n - R_{n-1}) P_n over the thresholds n, as scikit-learn's
    `average_precision_score` (no interpolation of the precision-recall curve).
    """
    labels, scores = _image_inputs(labels, scores)
    return _average_precision(*_split_by_class(labels, scores, 'labels'))


def image_auroc_per_type(defect_types, maps, normal='good'):
    """Image AUROC (score: the map's mean) of each defect type's images against the normal ones
    (type ``normal``): {type: AUROC}, types in order of first appearance in ``defect_types``."""
    types = np.asarray(defect_types)
    scores = image_scores(maps, 'mean')
    if types.shape != scores.shape:
        raise ValueError(f'defect_types must have shape {scores.shape} to match maps, got {types.shape}')
    is_normal = types == normal
    result = {}
    for defect in dict.fromkeys(types[~is_normal].tolist()):
        chosen = is_normal | (types == defect)
        result[defect] = image_auroc(~is_normal[chosen], scores[chosen])
    return result


# ---------------------------------------------------------------------------------------------
# pixel level

def pixel_auroc(masks, maps):
    """Area under the ROC curve over all pixels of all images (pixels of masks == 1 are positive).

    masks: binary, N x H x W or N x 1 x H x W; maps: real scores of the same shape.
    """
    defect, maps = _pixel_inputs(masks, maps)
    return _auroc(*_split_by_class(defect, maps, 'masks'))


def pixel_ap(masks, maps):
    """Average precision over all pixels of all images (pixels of masks == 1 are positive),
    with scikit-learn's definition AP = sum_n (R_n - R_{n-1}) P_n."""
    defect, maps = _pixel_inputs(masks, maps)
    return _average_precision(*_split_by_class(defect, maps, 'masks'))


def _pro_curve(defect, maps):
    """Per-region-overlap curve, as MVTec AD's official evaluation defines it.

    Regions are the 8-connected components of each mask. For a threshold t,
        FPR(t) = #{defect-free pixels with score >= t} / #{defect-free pixels}   (all images)
        PRO(t) = mean over all regions r of all images of #{p in r : score >= t} / |r|.
    The curve has one point per distinct score, starts at (0, 0) and ends at (1, 1).

    Returned here without the points that lie inside a horizontal run of the curve (thresholds at
    which only defect-free pixels enter): they are collinear with their neighbours, so the area
    under the curve and any linear interpolation along it are unchanged. What remains, for the
    distinct defect scores d_1 > ... > d_m, is
        (0, 0), (FPR(>d_j), PRO(d_{j-1})), (FPR(d_j), PRO(d_j)) for j = 1..m, (1, PRO(d_m)), (1, 1).
    """
    regions, num_regions = ndimage.label(defect, structure=_EIGHT_CONNECTED_IN_PLANE)
    region_of_pixel = regions[defect]
    region_size = np.bincount(region_of_pixel)
    weights = 1.0 / (num_regions * region_size[region_of_pixel])

    ok_sorted = np.sort(maps[~defect])
    defect_scores = maps[defect]
    order = np.argsort(defect_scores)[::-1]  # descending; only the (few) defect pixels
    defect_scores, weights = defect_scores[order], weights[order]
    pro = np.cumsum(weights)
    last_of_run = np.append(defect_scores[1:] != defect_scores[:-1], True)
    thresholds, pro = defect_scores[last_of_run], pro[last_of_run]

    fpr, pros = _curve_points(ok_sorted, thresholds, pro)
    return np.append(fpr, 1.0), np.minimum(np.append(pros, 1.0), 1.0)


def _curve_points(ok_sorted, thresholds, overlap):
    """The points (0, 0), (FPR(>d_j), overlap_{j-1}), (FPR(d_j), overlap_j) for j = 1..m, and
    (1, overlap_m) of an overlap curve, given the sorted defect-free scores, the distinct defect
    scores d_1 > ... > d_m and the overlap at each."""
    n_ok = ok_sorted.size
    fp_at = n_ok - np.searchsorted(ok_sorted, thresholds, side='left')     # ok >= d_j
    fp_above = n_ok - np.searchsorted(ok_sorted, thresholds, side='right')  # ok >  d_j
    before = np.concatenate(([0.0], overlap[:-1]))
    fpr = np.column_stack([fp_above, fp_at]).ravel() / n_ok
    values = np.column_stack([before, overlap]).ravel()
    return np.concatenate(([0.0], fpr, [1.0])), np.concatenate(([0.0], values, [overlap[-1]]))


def _area_up_to(x, y, x_max):
    """Trapezoid area under the polyline (x, y), x non-decreasing, from x[0] to x_max; the value
    at x_max is interpolated linearly between its neighbours (as MVTec AD's `trapezoid`)."""
    correction = 0.0
    if not np.any(x == x_max):
        ins = np.searchsorted(x, x_max, side='right')
        y_max = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_max + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)) + correction)


def au_pro(masks, maps, max_fpr=0.3):
    """Normalised area under the per-region-overlap (PRO) curve up to a false positive rate
    `max_fpr`, exactly as MVTec AD's official evaluation (Bergmann et al., IJCV 2021):

        AU-PRO = (1 / max_fpr) * integral_0^max_fpr PRO d(FPR),

    regions being the 8-connected components of each mask, FPR taken over the defect-free pixels
    of all images (defect-free images count only there), PRO the mean overlap over all regions of
    all images, one curve point per distinct score, the curve starting at (0, 0), PRO at max_fpr
    interpolated linearly and the integral taken with the trapezoid rule. (The official code keeps
    the FPR in float32; here it is float64, which moves the result by at most ~1e-7.)

    masks: binary, N x H x W or N x 1 x H x W, with at least one defect pixel.
    maps: real scores of the same shape.  max_fpr: in (0, 1].
    """
    if not 0 < max_fpr <= 1:
        raise ValueError(f'max_fpr must be in (0, 1], got {max_fpr}')
    defect, maps = _pixel_inputs(masks, maps)
    n_defect = np.count_nonzero(defect)
    if n_defect == 0:
        raise ValueError('masks contain no defect pixel; AU-PRO needs at least one region')
    if n_defect == defect.size:
        raise ValueError('masks contain no defect-free pixel; the false positive rate is undefined')
    fpr, pro = _pro_curve(defect, maps)
    return _area_up_to(fpr, pro, max_fpr) / max_fpr


def _spro_curve(maps, defect_masks, defect_image, saturation):
    """Saturated per-region-overlap curve (MVTec LOCO AD), built like ``_pro_curve``.

    For a threshold t, with defects A_i (pixel sets of image defect_image[i]) and their saturation
    pixel counts s_i:
        FPR(t)  = #{pixels of defect-free images with score >= t} / #{pixels of defect-free images}
        sPRO(t) = mean over i of min(#{p in A_i : score >= t} / s_i, 1).
    Returned without the points inside horizontal runs (only defect-free pixels enter there).
    """
    ok_sorted = np.sort(maps[np.setdiff1d(np.arange(len(maps)), defect_image)], axis=None)
    defect_scores = np.concatenate([maps[image][mask] for image, mask in zip(defect_image, defect_masks)])
    defect_of_pixel = np.repeat(np.arange(len(defect_masks)), [np.count_nonzero(m) for m in defect_masks])
    order = np.argsort(defect_scores, kind='stable')[::-1]  # descending
    defect_scores, defect_of_pixel = defect_scores[order], defect_of_pixel[order]
    # rank of each pixel among the pixels of its defect, in that order (1, 2, ...)
    by_defect = np.argsort(defect_of_pixel, kind='stable')
    starts = np.searchsorted(defect_of_pixel[by_defect], defect_of_pixel[by_defect])
    rank = np.empty(len(order), dtype=np.int64)
    rank[by_defect] = np.arange(len(order)) - starts + 1
    s = saturation[defect_of_pixel]
    gain = (np.minimum(rank / s, 1.0) - np.minimum((rank - 1) / s, 1.0)) / len(defect_masks)
    spro = np.cumsum(gain)
    last_of_run = np.append(defect_scores[1:] != defect_scores[:-1], True)
    thresholds, spro = defect_scores[last_of_run], spro[last_of_run]
    fpr, spros = _curve_points(ok_sorted, thresholds, spro)
    return fpr, np.minimum(spros, 1.0)


def au_spro(maps, defect_masks, defect_image, saturation, max_fpr=0.05):
    """Normalised area under the saturated per-region-overlap (sPRO) curve up to ``max_fpr``, the
    localisation metric of MVTec LOCO AD (Bergmann et al., IJCV 2022; reported at max_fpr 0.05):

        AU-sPRO = (1 / max_fpr) * integral_0^max_fpr sPRO d(FPR),
        sPRO(t) = mean over all defects i of min(|A_i ∩ {score >= t}| / s_i, 1),

    A_i being the pixels of defect i (one ground-truth PNG of LOCO) and s_i its saturation
    threshold in pixels; FPR(t) the fraction of the pixels of the defect-free images (the images
    that no defect belongs to) with score >= t. One curve point per distinct defect score, the curve
    starting at (0, 0), sPRO at max_fpr interpolated linearly, trapezoid rule (as ``au_pro``).

    maps: N x H x W (or N x 1 x H x W) scores.  defect_masks: D x H x W binary, one per defect, each
    with at least one pixel.  defect_image: (D,) index into maps of each defect's image.
    saturation: (D,) positive pixel counts.  max_fpr: in (0, 1].
    """
    if not 0 < max_fpr <= 1:
        raise ValueError(f'max_fpr must be in (0, 1], got {max_fpr}')
    maps = _as_scores(_as_stack(maps, 'maps'), 'maps')
    defect_masks = _as_binary(_as_stack(defect_masks, 'defect_masks'), 'defect_masks')
    if len(defect_masks) == 0:
        raise ValueError('defect_masks holds no defect; AU-sPRO needs at least one')
    if defect_masks.shape[1:] != maps.shape[1:]:
        raise ValueError(f'defect_masks must be D x {maps.shape[1]} x {maps.shape[2]} like maps, '
                         f'got {defect_masks.shape}')
    empty = np.flatnonzero(~defect_masks.any(axis=(1, 2)))
    if empty.size:
        raise ValueError(f'defect_masks {empty[:5].tolist()} have no pixel; each defect needs at least one')
    defect_image = np.asarray(defect_image)
    saturation = np.asarray(saturation, dtype=np.float64)
    for name, values in (('defect_image', defect_image), ('saturation', saturation)):
        if values.shape != (len(defect_masks),):
            raise ValueError(f'{name} must have shape ({len(defect_masks)},), one per defect, got {values.shape}')
    if not np.issubdtype(defect_image.dtype, np.integer) or defect_image.min() < 0 or defect_image.max() >= len(maps):
        raise ValueError(f'defect_image must hold integer indices into maps (0..{len(maps) - 1})')
    if not np.all(saturation > 0):
        raise ValueError('saturation must hold positive pixel counts')
    if len(np.unique(defect_image)) == len(maps):
        raise ValueError('every image has a defect; the false positive rate needs defect-free images')
    fpr, spro = _spro_curve(maps, defect_masks, defect_image, saturation)
    return _area_up_to(fpr, spro, max_fpr) / max_fpr


# ---------------------------------------------------------------------------------------------
# everything at once

def undefined_pixel_metrics(labels, masks=None, has_mask=None):
    """Why the pixel metrics of ``evaluate_maps`` are undefined (NaN) for these labels, masks and
    has_mask: one line, or None when they are defined."""
    if masks is None:
        return 'the test set has no masks'
    with_mask = np.asarray(labels, bool) & (True if has_mask is None else np.asarray(has_mask, bool))
    if not with_mask.any():
        return 'no defect image has a mask'
    if not np.asarray(masks)[with_mask].any():
        return 'the masks of the defect images mark no defect pixel'
    return None


def _checked_test_set(labels, maps, masks=None, has_mask=None):
    """(labels bool (N,), maps N x H x W, masks bool N x H x W or None, has_mask bool (N,)) of a
    test set as ``evaluate_maps`` takes it; ValueError naming what does not fit: a label per
    map, masks of the maps' shape, a has_mask per label, and empty masks for normal images."""
    labels = _as_binary(labels, 'labels')
    maps = _as_stack(maps, 'maps')
    if labels.shape != (len(maps),):
        raise ValueError(f'labels must have shape ({len(maps)},) to match maps, got {labels.shape}')
    has_mask = np.ones(len(maps), dtype=bool) if has_mask is None else _as_binary(has_mask, 'has_mask')
    if has_mask.shape != labels.shape:
        raise ValueError(f'has_mask must have shape {labels.shape} to match labels, got {has_mask.shape}')
    if masks is None:
        return labels, maps, None, has_mask
    masks = _as_binary(_as_stack(masks, 'masks'), 'masks')
    if masks.shape != maps.shape:
        raise ValueError(f'masks and maps must have the same shape, got {masks.shape} and {maps.shape}')
    marked_normal = np.flatnonzero(~labels & masks.any(axis=(1, 2)))
    if marked_normal.size:
        raise ValueError(f'masks of normal images (label 0) must be empty; items {marked_normal[:5].tolist()} '
                         'have defect pixels')
    return labels, maps, masks, has_mask


def evaluate_maps(labels, maps, masks=None, has_mask=None, max_fpr=0.3):
    """Image and pixel metrics of a test set from its anomaly maps.

    labels: (N,) 0 = normal, 1 = anomalous.  maps: N x H x W or N x 1 x H x W.
    masks: binary maps of the same shape, or None when the data set has no masks.
    has_mask: (N,) bool, False for anomalous images whose mask is missing; those are left out of
    the pixel metrics (normal images always have a valid, all-zero mask). Default: all True.

    Returns a dict of floats: image_auroc_mean, image_auroc_max, image_ap_mean, image_ap_max
    (image score = mean / max of the map), and pixel_auroc, pixel_ap, au_pro, which are NaN where
    they are undefined (``undefined_pixel_metrics`` says why).
    """
    labels, maps, masks, has_mask = _checked_test_set(labels, maps, masks, has_mask)
    results = {}
    for reduction in ('mean', 'max'):
        scores = image_scores(maps, reduction)
        results[f'image_auroc_{reduction}'] = image_auroc(labels, scores)
        results[f'image_ap_{reduction}'] = image_ap(labels, scores)

    results.update(pixel_auroc=float('nan'), pixel_ap=float('nan'), au_pro=float('nan'))
    if masks is None:
        return results
    if undefined_pixel_metrics(labels, masks, has_mask) is not None:
        return results
    masks, maps = masks[has_mask], maps[has_mask]
    results.update(pixel_auroc=pixel_auroc(masks, maps), pixel_ap=pixel_ap(masks, maps),
                   au_pro=au_pro(masks, maps, max_fpr))
    return results


# ---------------------------------------------------------------------------------------------
# decisions at a threshold: anomalous when score > threshold

MIN_MARGIN = 1e-4  # of the largest normal score's magnitude: a threshold that flags none lies above it by this


def allowed_above(fpr, count):
    """``k = floor(fpr * count)``, the number of ``count`` normal scores that a threshold at false
    positive rate ``fpr`` may flag, with ``fpr`` as written (0.29 of 100 allows 29, though
    ``0.29 * 100`` is 28.999999999999996 in floating point)."""
    return math.floor(Fraction(repr(float(fpr))) * count)


def threshold_at_fpr(normal_scores, fpr):
    """The threshold that flags at most ``k = floor(fpr * n)`` of the ``n`` normal scores (a score
    is anomalous when it is above the threshold): halfway between the ``(k + 1)``-th and the
    ``k``-th largest normal score (for k = 0, as far above the largest as halfway to it from the
    second largest, and at least ``MIN_MARGIN`` of the largest's magnitude above it: one score, or
    the top two tied), so that no normal score lies on it and a score that another backend or batch
    size computes a rounding error apart gets the same decision. The threshold is a value of the
    scores' dtype (``_above_in_dtype``: float32 maps are compared in float32), the ``(k + 1)``-th
    score itself where none lies between the two. Computed from normal scores only; returns a
    float."""
    scores = _as_scores(np.ravel(np.asarray(normal_scores)), 'normal_scores')
    if not 0 <= fpr < 1:
        raise ValueError(f'fpr must be in [0, 1), got {fpr!r}')
    if scores.size == 0:
        raise ValueError('normal_scores is empty; a threshold needs normal images')
    allowed = allowed_above(fpr, scores.size)
    top = min(scores.size, allowed + 2)  # the scores needed, in decreasing order
    largest = np.sort(np.partition(scores, scores.size - top)[scores.size - top:])[::-1]
    kept = largest[allowed]  # the (k + 1)-th largest: the highest score that is not flagged
    wide = largest.astype(np.float64)
    if allowed > 0:
        threshold = (wide[allowed] + wide[allowed - 1]) / 2
    else:  # nothing flagged: above the largest, by half the gap to the next and at least MIN_MARGIN
        half_gap = (wide[0] - wide[1]) / 2 if wide.size > 1 else 0.0
        threshold = wide[0] + max(half_gap, MIN_MARGIN * abs(wide[0]))
    return _above_in_dtype(threshold, kept, largest[allowed - 1] if allowed > 0 else None)


def _above_in_dtype(threshold, kept, flagged=None):
    """``threshold`` as a value of the scores' dtype (``kept``'s) that is above ``kept`` and, where
    one fits, below ``flagged``: float32 maps are compared with float32 thresholds, and a midpoint
    rounded to float32 may land on either score (then the next value above ``kept``, or ``kept``
    itself where no value lies between the two)."""
    dtype = kept.dtype if np.issubdtype(kept.dtype, np.floating) else np.dtype(np.float64)
    value = dtype.type(threshold)
    if value <= kept:
        value = np.nextafter(dtype.type(kept), dtype.type(np.inf))
    if flagged is not None and value >= flagged:
        value = dtype.type(kept)
    return float(value)


def precision_recall_f1(labels, scores, threshold):
    """Precision, recall and F1 of the decisions ``scores > threshold`` against binary ``labels``
    (any shape; 0 where nothing is predicted or nothing is positive) -> dict of floats."""
    labels = _as_binary(np.ravel(np.asarray(labels)), 'labels')
    scores = _as_scores(np.ravel(np.asarray(scores)), 'scores')
    _check_same_length(labels, scores, 'labels', 'scores')
    if not np.isfinite(threshold):
        raise ValueError(f'threshold must be a finite number, got {threshold!r}')
    predicted = scores > threshold
    true_positives = int(np.count_nonzero(predicted & labels))
    precision = true_positives / max(1, int(np.count_nonzero(predicted)))
    recall = true_positives / max(1, int(np.count_nonzero(labels)))
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return dict(precision=precision, recall=recall, f1=f1)


def best_f1_threshold(labels, scores):
    """The threshold with the highest F1 of ``scores > threshold`` against binary ``labels`` ->
    (threshold, F1). The best decisions flag the scores at or above one of the positive scores
    ``p``; the threshold returned is the float just below it (``nextafter(p, -inf)``)."""
    labels = _as_binary(np.ravel(np.asarray(labels)), 'labels')
    scores = _as_scores(np.ravel(np.asarray(scores)), 'scores')
    _check_same_length(labels, scores, 'labels', 'scores')
    positive, negative = np.sort(scores[labels]), np.sort(scores[~labels])
    if positive.size == 0:
        raise ValueError('labels has no positive; F1 needs at least one')
    candidates = np.unique(positive)
    true_positives = positive.size - np.searchsorted(positive, candidates, 'left')
    false_positives = negative.size - np.searchsorted(negative, candidates, 'left')
    f1 = 2 * true_positives / (true_positives + false_positives + positive.size)
    best = int(np.argmax(f1))
    return float(np.nextafter(candidates[best], -np.inf)), float(f1[best])


def threshold_metrics(labels, maps, masks=None, has_mask=None, image_threshold=None,
                      pixel_threshold=None):
    """``THRESHOLD_METRICS`` of a test set: the F1-optimal threshold and its F1
    (``best_f1_threshold``), and precision, recall and F1 at the given threshold
    (``precision_recall_f1``), for the image score (the map's mean) and for the pixels (images
    with a mask, see ``evaluate_maps``). NaN where a threshold is None, there are no masks, or
    nothing is anomalous -> dict of floats. The inputs are checked as by ``evaluate_maps``."""
    labels, maps, masks, has_mask = _checked_test_set(labels, maps, masks, has_mask)
    results = dict.fromkeys(THRESHOLD_METRICS, float('nan'))
    levels = [('image', labels, image_scores(maps, 'mean'), image_threshold)]
    if masks is not None:
        levels.append(('pixel', masks[has_mask], maps[has_mask], pixel_threshold))
    for level, truth, scores, threshold in levels:
        if not np.any(truth):
            continue
        threshold_best, f1_best = best_f1_threshold(truth, scores)
        results.update({f'{level}_threshold_best': threshold_best, f'{level}_f1_best': f1_best})
        if threshold is not None:
            results.update({f'{level}_{name}': value for name, value
                            in precision_recall_f1(truth, scores, threshold).items()})
    return results
