import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from experiments.metrics import (au_pro, au_spro, evaluate_maps, image_ap, image_auroc,
                                 image_auroc_per_type, image_scores, pixel_ap, pixel_auroc)


# ---------------------------------------------------------------------------------------------
# an independent, slow AU-PRO: a loop over thresholds with explicit per-region overlaps

def reference_au_pro(masks, maps, max_fpr=0.3):
    regions = []
    for mask, score in zip(masks, maps):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [score[labelled == k] for k in range(1, n + 1)]
    ok_scores = maps[masks == 0]
    fpr, pro = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fpr.append(np.mean(ok_scores >= t))
        pro.append(np.mean([np.mean(r >= t) for r in regions]))
    fpr, pro = np.array(fpr + [1.0]), np.array(pro + [1.0])
    below = np.flatnonzero(fpr < max_fpr)
    i, j = below[-1], below[-1] + 1
    pro_at_max = np.interp(max_fpr, fpr[[i, j]], pro[[i, j]])
    area = np.trapezoid(np.append(pro[:i + 1], pro_at_max), np.append(fpr[:i + 1], max_fpr))
    return area / max_fpr


def random_case(rng, levels=None):
    n, h, w = rng.integers(1, 4), rng.integers(2, 9), rng.integers(2, 9)
    masks = rng.random((n, h, w)) < rng.uniform(0.05, 0.5)
    masks.flat[rng.integers(masks.size)] = True
    masks.flat[rng.integers(masks.size)] = False
    if not masks.any() or masks.all():
        return random_case(rng, levels)
    if levels is None:
        maps = rng.random((n, h, w)) + 0.5 * masks
    else:  # few distinct scores: many ties within and across classes
        maps = rng.integers(0, levels, (n, h, w)) / levels + masks * rng.integers(0, 2, (n, h, w)) / levels
    return masks, maps


# ---------------------------------------------------------------------------------------------
# AU-PRO by hand

def row(*values):
    """One image of one row: shape 1 x 1 x W."""
    return np.array(values, dtype=float)[None, None]


def test_au_pro_region_detected_before_any_false_positive_is_one():
    masks = np.zeros((2, 6, 6), dtype=bool)
    masks[0, 1:4, 2:5] = True
    maps = np.where(masks, 0.9, 0.1)
    assert au_pro(masks, maps) == pytest.approx(1.0)
    assert au_pro(masks, 1 - maps) == pytest.approx(0.0)


def test_au_pro_staircase_by_hand():
    # thresholds 0.95 (ok), 0.9 (region), 0.7 (ok), 0.5 (region), ...:
    # (0,0) (1/8,0) (1/8,.5) (2/8,.5) (2/8,1) (3/8,1) ... -> area to 0.3 = .5*.125 + 1*.05
    masks = row(1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
    maps = row(0.9, 0.5, 0.95, 0.7, 0.4, 0.3, 0.2, 0.1, 0.05, 0.0)
    assert au_pro(masks, maps) == pytest.approx((0.5 * 0.125 + 0.05) / 0.3)
    assert au_pro(masks, maps, max_fpr=0.25) == pytest.approx(0.5 * 0.125 / 0.25)
    assert au_pro(masks, maps, max_fpr=1.0) == pytest.approx(0.0625 + 0.75)


def test_au_pro_ties_across_classes_interpolated_at_max_fpr():
    # one threshold 0.6 takes 4 of 10 ok pixels and half the region: the curve runs straight from
    # (0,0) to (0.4,0.5), so PRO(0.3) = 0.375 and the area is 0.3 * 0.375 / 2
    masks = row(1, 1, 1, 1, *[0] * 10)
    maps = row(0.6, 0.6, 0.1, 0.1, 0.6, 0.6, 0.6, 0.6, *[0.05] * 6)
    assert au_pro(masks, maps) == pytest.approx(0.5 * 0.3 * 0.375 / 0.3)


def test_au_pro_ties_merged_into_one_curve_point():
    # 0.8 takes one ok and one region pixel at once: (0,0) -> (1/8,.5) diagonally, then (.5,.5)
    masks = row(1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
    maps = row(0.8, 0.2, 0.8, 0.5, 0.5, 0.5, 0.1, 0.1, 0.1, 0.1)
    assert au_pro(masks, maps) == pytest.approx((0.5 * 0.125 * 0.5 + 0.5 * 0.175) / 0.3)


def test_au_pro_averages_over_regions_not_pixels():
    # region A: 1 pixel (score .9); region B: 2x2, half at .8; one ok pixel at .85, the rest .1
    masks = np.zeros((1, 5, 5))
    masks[0, 0, 0] = 1
    masks[0, 3:, 3:] = 1
    maps = np.full((1, 5, 5), 0.1)
    maps[0, 0, 0] = 0.9
    maps[0, 3, 3:] = 0.8
    maps[0, 4, 3:] = 0.2
    maps[0, 0, 4] = 0.85
    # (0,0) (0,.5) (.05,.5) (.05,.75) (.05,1) (1,1): area = .5*.05 + 1*.25
    assert au_pro(masks, maps) == pytest.approx((0.025 + 0.25) / 0.3)


def test_au_pro_regions_are_eight_connected():
    # (0,0) and (1,1) touch diagonally: one region of 2, half detected; (3,3) a second region.
    # Ok pixels score between: (0,0) (0,.25) (1,.25) (1,1); 4-connectivity would give PRO 1/3.
    masks = np.zeros((1, 4, 4))
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 3, 3] = 1
    maps = np.where(masks > 0, 0.0, 0.5)
    maps[0, 0, 0] = 1
    assert au_pro(masks, maps) == pytest.approx(0.25)


def test_au_pro_regions_do_not_connect_across_images():
    # a detected 1-pixel region above an undetected 3-pixel region: PRO 1/2, not 1/4
    masks = np.array([[[1, 0, 0, 0]], [[1, 1, 1, 0]]])
    maps = np.array([[[1.0, 0.5, 0.5, 0.5]], [[0.0, 0.0, 0.0, 0.5]]])
    assert au_pro(masks, maps) == pytest.approx(0.5)


def test_au_pro_defect_free_images_count_only_for_fpr():
    # defect image [.9 .5 | .2 .2] and a normal image [.95 .1 .1 .1]: 6 ok pixels, one region
    # (0,0) (1/6,0) (1/6,.5) (1/6,1) (1/2,1) (1,1): area to .3 = .3 - 1/6
    masks = np.array([[[1, 1, 0, 0]], [[0, 0, 0, 0]]])
    maps = np.array([[[0.9, 0.5, 0.2, 0.2]], [[0.95, 0.1, 0.1, 0.1]]])
    assert au_pro(masks, maps) == pytest.approx((0.3 - 1 / 6) / 0.3)
    assert au_pro(masks[:1], maps[:1]) == pytest.approx(1.0)


def test_au_pro_accepts_channel_axis_and_is_invariant_to_monotone_rescaling():
    rng = np.random.default_rng(1)
    masks, maps = random_case(rng)
    expected = au_pro(masks, maps)
    assert au_pro(masks[:, None], maps[:, None]) == pytest.approx(expected)
    assert au_pro(masks, 3 * maps - 7) == pytest.approx(expected)
    assert au_pro(masks.astype(np.uint8), maps.astype(np.float32)) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize('seed', range(40))
def test_au_pro_matches_slow_reference(seed):
    rng = np.random.default_rng(seed)
    masks, maps = random_case(rng, levels=None if seed % 2 else 4)
    for max_fpr in (0.3, 0.05, 1.0, rng.uniform(0.01, 1)):
        assert au_pro(masks, maps, max_fpr) == pytest.approx(reference_au_pro(masks, maps, max_fpr), abs=1e-12)


# ---------------------------------------------------------------------------------------------
# AUROC / AP against scikit-learn

@pytest.mark.parametrize('seed', range(10))
def test_pixel_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    masks, maps = random_case(rng, levels=None if seed % 2 else 3)
    y, s = masks.ravel(), maps.ravel()
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert pixel_ap(masks, maps) == pytest.approx(average_precision_score(y, s), abs=1e-12)


@pytest.mark.parametrize('seed', range(10))
def test_image_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = rng.integers(2, 60)
    labels = rng.random(n) < 0.6
    labels[:2] = [True, False]
    scores = rng.integers(0, 6, n) + labels * rng.random(n) if seed % 2 else rng.random(n) + labels
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_ap(labels.astype(int), scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def test_image_auroc_per_type_is_each_types_auroc_against_the_normal_images():
    rng = np.random.default_rng(0)
    types = np.array(['good', 'crack', 'good', 'hole', 'crack', 'good', 'hole', 'crack', 'good'])
    maps = rng.random((len(types), 3, 3))
    result = image_auroc_per_type(types, maps)
    assert list(result) == ['crack', 'hole']  # first appearance
    means = maps.mean(axis=(1, 2))
    for defect, value in result.items():
        chosen = np.isin(types, ['good', defect])
        assert value == pytest.approx(roc_auc_score(types[chosen] == defect, means[chosen]), abs=1e-12)
    with pytest.raises(ValueError, match=r'defect_types must have shape \(9,\)'):
        image_auroc_per_type(types[:-1], maps)


def test_image_scores_mean_and_max():
    maps = np.arange(2 * 1 * 2 * 3, dtype=np.float32).reshape(2, 1, 2, 3)
    np.testing.assert_allclose(image_scores(maps), [2.5, 8.5])
    np.testing.assert_allclose(image_scores(maps[:, 0], 'max'), [5, 11])


# ---------------------------------------------------------------------------------------------
# evaluate_maps

def test_evaluate_maps_combines_the_metrics_and_skips_defects_without_mask():
    rng = np.random.default_rng(3)
    masks = np.zeros((6, 8, 8), dtype=np.uint8)
    masks[3:, 2:5, 2:5] = 1
    labels = np.array([0, 0, 0, 1, 1, 1])
    maps = rng.random(masks.shape) + masks
    has_mask = np.array([True, True, True, True, True, False])
    masks[5] = 0  # its mask file is missing

    results = evaluate_maps(labels, maps[:, None], masks[:, None], has_mask)
    assert results['image_auroc_mean'] == pytest.approx(image_auroc(labels, maps.mean(axis=(1, 2))))
    assert results['image_ap_max'] == pytest.approx(image_ap(labels, maps.max(axis=(1, 2))))
    assert results['pixel_auroc'] == pytest.approx(pixel_auroc(masks[:5], maps[:5]))
    assert results['pixel_ap'] == pytest.approx(pixel_ap(masks[:5], maps[:5]))
    assert results['au_pro'] == pytest.approx(au_pro(masks[:5], maps[:5]))
    assert all(isinstance(v, float) for v in results.values())

    no_masks = evaluate_maps(labels, maps)
    assert np.isnan([no_masks['pixel_auroc'], no_masks['pixel_ap'], no_masks['au_pro']]).all()
    assert no_masks['image_auroc_max'] == results['image_auroc_max']


# ---------------------------------------------------------------------------------------------
# errors

@pytest.mark.parametrize('metric', [au_pro, pixel_auroc, pixel_ap])
def test_pixel_metrics_reject_bad_input(metric):
    masks = np.zeros((2, 4, 4))
    masks[0, 1, 1] = 1
    maps = np.random.default_rng(0).random((2, 4, 4))
    with pytest.raises(ValueError, match='same shape'):
        metric(masks, maps[:, :3])
    with pytest.raises(ValueError, match='maps contains NaN'):
        metric(masks, np.where(masks > 0, np.nan, maps))
    with pytest.raises(ValueError, match='masks'):
        metric(np.zeros_like(masks), maps)
    with pytest.raises(ValueError, match='masks must be binary'):
        metric(masks * 255, maps)
    with pytest.raises(ValueError, match='N x H x W'):
        metric(masks[0], maps[0])


def test_au_pro_rejects_bad_max_fpr():
    with pytest.raises(ValueError, match='max_fpr'):
        au_pro(np.eye(3)[None], np.eye(3)[None], max_fpr=0)


@pytest.mark.parametrize('metric', [image_auroc, image_ap])
def test_image_metrics_reject_bad_input(metric):
    with pytest.raises(ValueError, match='same length'):
        metric([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match='labels must contain both classes'):
        metric([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match='scores contains NaN'):
        metric([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match='labels must be binary'):
        metric([0, 2], [0.1, 0.2])


def test_image_scores_and_evaluate_maps_reject_bad_input():
    with pytest.raises(ValueError, match='reduction'):
        image_scores(np.zeros((2, 3, 3)), 'median')
    maps, masks = np.zeros((2, 3, 3)), np.zeros((2, 3, 3))
    masks[0, 1, 1] = 1
    with pytest.raises(ValueError, match='labels must have shape'):
        evaluate_maps([0, 1, 1], maps)
    with pytest.raises(ValueError, match=r'normal images .* items \[0\]'):
        evaluate_maps([0, 1], maps, masks)


# ---------------------------------------------------------------------------------------------
# AU-sPRO (MVTec LOCO AD) against an independent loop over thresholds

def reference_au_spro(maps, defect_masks, defect_image, saturation, max_fpr):
    ok_scores = np.concatenate([maps[i].ravel() for i in range(len(maps)) if i not in set(defect_image)])
    fpr, spro = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fpr.append(np.mean(ok_scores >= t))
        spro.append(np.mean([min(np.sum(maps[i][m] >= t) / s, 1.0)
                             for m, i, s in zip(defect_masks, defect_image, saturation)]))
    fpr, spro = np.array(fpr), np.array(spro)
    below = np.flatnonzero(fpr < max_fpr)
    i = below[-1]
    spro_at_max = np.interp(max_fpr, fpr[[i, i + 1]], spro[[i, i + 1]])
    return np.trapezoid(np.append(spro[:i + 1], spro_at_max), np.append(fpr[:i + 1], max_fpr)) / max_fpr


def random_spro_case(rng, levels=None):
    n, h, w = rng.integers(2, 5), rng.integers(2, 8), rng.integers(2, 8)
    n_defects = rng.integers(1, 6)
    defect_image = rng.integers(1, n, n_defects)  # image 0 is always defect-free
    defect_masks = rng.random((n_defects, h, w)) < rng.uniform(0.1, 0.6)
    for mask in defect_masks:
        mask.flat[rng.integers(mask.size)] = True
    area = defect_masks.sum(axis=(1, 2))
    saturation = np.maximum(1, np.round(area * rng.uniform(0.2, 1.0, n_defects)))
    maps = rng.random((n, h, w)) if levels is None else rng.integers(0, levels, (n, h, w)) / levels
    for mask, i in zip(defect_masks, defect_image):
        maps[i] += 0.3 * mask
    return maps, defect_masks, defect_image, saturation


@pytest.mark.parametrize('seed', range(30))
def test_au_spro_matches_slow_reference(seed):
    rng = np.random.default_rng(seed)
    case = random_spro_case(rng, levels=None if seed % 2 else 4)
    for max_fpr in (0.05, 0.3, 1.0):
        assert au_spro(*case, max_fpr=max_fpr) == pytest.approx(reference_au_spro(*case, max_fpr), abs=1e-12)


def test_au_spro_saturates_and_without_saturation_is_pro():
    maps = np.zeros((2, 1, 4))
    maps[1, 0] = [0.9, 0.8, 0.1, 0.0]
    defect = np.zeros((1, 1, 4), bool)
    defect[0, 0] = True  # four pixels; two of them score above every normal pixel
    # saturated at 2 pixels: full overlap before the first false positive
    assert au_spro(maps, defect, [1], [2], max_fpr=0.05) == pytest.approx(1.0)
    # saturation at the defect's area is PRO's overlap: half the pixels found at FPR 0 ... 0.05
    assert au_spro(maps, defect, [1], [4], max_fpr=0.05) == pytest.approx(au_pro(
        np.concatenate([np.zeros((1, 1, 4), bool), defect]), maps, max_fpr=0.05))


@pytest.mark.parametrize('change,message', [
    (dict(saturation=[0]), 'positive pixel counts'),
    (dict(defect_image=[2]), 'integer indices into maps'),
    (dict(defect_image=[0, 1]), r'shape \(1,\), one per defect'),
    (dict(defect_masks=np.zeros((1, 1, 4), bool)), r'defect_masks \[0\] have no pixel'),
    (dict(maps=np.zeros((1, 1, 4)), defect_image=[0]), 'needs defect-free images'),
    (dict(max_fpr=0), 'max_fpr'),
])
def test_au_spro_validates_its_input(change, message):
    args = dict(maps=np.zeros((2, 1, 4)), defect_masks=np.ones((1, 1, 4), bool), defect_image=[1],
                saturation=[2], max_fpr=0.05)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        au_spro(**args)
