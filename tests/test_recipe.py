"""Recipe calibration from normal images, the validation set of synthetic defects, and their use
in training (validation curve, best checkpoint) and in train_mvtec.py (--recipe)."""
import copy
import json
import math
import re
import shutil
import warnings

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings as hyp_settings, strategies as st
from sklearn.metrics import roc_auc_score

import train_mvtec
from conftest import make_mvtec_category
from experiments import metrics, recipes, settings
from experiments.prediction import predict
from experiments.training import RunError, TrainConfig, best_model_path, final_model_path, last_checkpoint_path, train
from experiments.validation import Validator
from self_sup_data import recipe, validation
from self_sup_data.images import central_box
from self_sup_data.mvtec import load_validation_set
from self_sup_data.self_sup_tasks import object_mask
from self_sup_data.transforms import RandomCrop
from test_training import CrashAtEpoch, SquaresDataset, TinyNet

FAST = ['--epochs', '2', '--batch-size', '4', '--res-scale', '0.25', '--workers', '0',
        '--no-figures', '--checkpoint-every', '100']


def shaded_images(count, size=64, seed=0, grain_std=4):
    """A smooth material whose images differ mainly in brightness (a seamless blend hides a
    foreign patch's offset on it): grain of standard deviation ``grain_std`` on offsets 60-190 (at
    4, mixed gradients' blends change almost no pixel beyond the label's tolerance; at 10 some do)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        grain = rng.normal(0, grain_std, (size, size))
        images.append(np.clip(rng.uniform(60, 190) + grain, 0, 255).astype(np.uint8)[..., None])
    return images


def contrasted_images(count, size=64, seed=0):
    """A high-contrast random texture of equal brightness in every image."""
    rng = np.random.default_rng(seed)
    return [rng.choice((30, 220), (size, size, 1)).astype(np.uint8) for _ in range(count)]


def texture_args(key='Shift-Intensity-M', **changes):
    params = {**settings.KIND_DEFAULTS['texture'], **changes}
    return params, settings.self_sup_args_for(settings.parse_setting(key), params)


# ---------------------------------------------------------------------------- calibration rules

def grouped_percentile(whole_levels, percentile):
    """The textbook grouped-data percentile of integers, bins of width 1 centred on each level:
    ``L + (n p - F) / f``, L the lower edge of the bin holding the n p-th value, F the count below
    that bin and f the count in it (every level between the smallest and largest present)."""
    values = np.sort(np.asarray(whole_levels))
    rank = len(values) * percentile / 100
    for level in range(values[0], values[-1] + 1):
        below, inside = np.sum(values < level), np.sum(values == level)
        if below + inside >= rank:
            return level - 0.5 + (rank - below) / inside


@given(st.integers(1, 6), st.lists(st.integers(1, 30), min_size=2, max_size=12),
       st.sampled_from([10, 50, 90]))
def test_change_percentiles_of_whole_grey_levels_are_the_grouped_data_percentiles(
        lowest, counts, percentile):
    # every level between the extremes present, as the textbook formula takes it
    levels = [lowest + i for i, count in enumerate(counts) for _ in range(count)]
    assert recipe.change_percentiles(levels, [percentile])[0] == pytest.approx(
        grouped_percentile(levels, percentile))


def test_change_percentiles_move_with_the_counts_where_plain_percentiles_jump():
    assert recipe.change_percentiles(np.full(10, 3.0)).tolist() == [3.0, 3.0, 3.0]
    # the median moves from level 3 to 4 as the share of 4s grows; the plain median jumps
    medians = [recipe.change_percentiles([3] * (100 - n) + [4] * n, [50])[0] for n in (40, 50, 60)]
    assert medians == pytest.approx([2.5 + 0.5 / 0.6, 3.5, 3.5 + 0.1 / 0.6])
    assert [np.percentile([3] * (100 - n) + [4] * n, 50) for n in (40, 60)] == [3.0, 4.0]
    # three channels: levels a third apart, bins a third wide
    assert recipe.change_percentiles([1, 4 / 3, 4 / 3, 5 / 3], [50])[0] == pytest.approx(4 / 3)
    continuous = np.random.default_rng(0).gamma(2, 3, 5000)
    assert recipe.change_percentiles(continuous) == pytest.approx(
        np.percentile(continuous, (10, 50, 90)), abs=0.01)


def test_logistic_is_centred_on_the_median_change_and_spans_the_central_80_percent():
    changes = np.random.default_rng(0).integers(1, 20, 5000)
    k, x0 = recipe.logistic_from_changes(changes)
    q10, q50, q90 = recipe.change_percentiles(changes, (10, 50, 90))
    logistic = lambda d: 1 / (1 + math.exp(-k * (d - x0)))  # noqa: E731
    assert logistic(q50) == pytest.approx(0.5)
    half_span = (q90 - q10) / 2
    assert logistic(x0 - half_span) == pytest.approx(0.1)
    assert logistic(x0 + half_span) == pytest.approx(0.9)
    assert recipe.logistic_from_changes(np.full(10, 3.0)) == (2 * math.log(9), 3.0)


def test_paste_fraction_mixes_invisible_blends_to_the_minimum_visibility_and_keeps_visible_ones():
    for visibility in (0.0, 0.05, recipe.INVISIBLE):
        low, high = recipe.paste_fraction_for(visibility)
        assert high == 1.0
        # the weakest mix keeps (1 - low) v + low of a paste's change: MIN_VISIBILITY (rounded)
        assert (1 - low) * visibility + low == pytest.approx(recipe.MIN_VISIBILITY, abs=0.01)
    for visibility in (recipe.VISIBLE, 0.3, 1.0, 1.2):
        assert recipe.paste_fraction_for(visibility) is None
    # halfway between, both ends of the range are halved
    low, high = recipe.paste_fraction_for((recipe.INVISIBLE + recipe.VISIBLE) / 2)
    assert high == 0.5 and low == pytest.approx(
        recipe.paste_fraction_for(recipe.INVISIBLE)[0] / 2, abs=0.02)


def _paste_range(visibility):
    return recipe.paste_fraction_for(visibility) or (0.0, 0.0)  # None: seamless, no paste


@given(st.floats(0.0, 1.0), st.floats(0.0, 0.02))
def test_paste_fraction_shrinks_continuously_as_blends_get_more_visible(visibility, step):
    (low, high), (next_low, next_high) = _paste_range(visibility), _paste_range(visibility + step)
    assert 0 <= low <= high <= 1
    assert next_low <= low + 1e-9 and next_high <= high + 1e-9
    # nearly equal visibilities give nearly equal ranges (slope at most 1 / (VISIBLE - INVISIBLE))
    slope = 1 / (recipe.VISIBLE - recipe.INVISIBLE)
    assert high - next_high <= slope * step + 0.011
    assert low - next_low <= slope * step + 0.011


@given(st.floats(0.05, 1.0), st.integers(1, 6))
def test_patch_count_is_the_smallest_that_reaches_the_default_effective_patches(fraction, default):
    count = recipe.patches_for(fraction, default)
    target = recipe.expected_patches(default)
    assert default <= count <= recipe.MAX_PATCH_FACTOR * default
    if count < recipe.MAX_PATCH_FACTOR * default:
        assert fraction * recipe.expected_patches(count) >= target - 1e-9
    if count > default:
        assert fraction * recipe.expected_patches(count - 1) < target


def test_lower_half_width_rises_past_small_ineffective_patches():
    sides = np.linspace(0.05, 0.5, 100)
    assert recipe.lower_half_width(sides, sides > 0.2, 0.03) == pytest.approx(
        sides[sides > 0.2][0] / 2, abs=0.03)
    assert recipe.lower_half_width(sides, np.ones(100, bool), 0.03) == 0.03
    assert recipe.lower_half_width(sides, np.zeros(100, bool), 0.03) == 0.03
    assert recipe.lower_half_width(sides, sides > 0.45, 0.03) <= recipe.MAX_LOWER_HALF_WIDTH


def test_border_ratio_tells_a_texture_from_an_object_on_a_plain_background():
    assert 0.8 < recipe.border_texture_ratio(contrasted_images(4)) < 1.25
    objects = []
    for image in contrasted_images(4):
        framed = np.full_like(image, 128)
        framed[12:-12, 12:-12] = image[12:-12, 12:-12]
        objects.append(framed)
    assert recipe.border_texture_ratio(objects) < 1 / recipe.BORDER_RATIO
    # flat in most windows at the border as inside (sparse specks): alike, not a ratio of 0
    specks = np.zeros((4, 64, 64, 1), np.uint8)
    specks[:, ::16, ::16] = 255
    assert 0.8 < recipe.border_texture_ratio(specks) < 1.25
    # flat in most windows too, but the contrast is all inside: a small object on a plain background
    small_objects = np.zeros((4, 64, 64, 1), np.uint8)
    small_objects[:, 26:38, 26:38] = contrasted_images(4, size=12)
    assert recipe.border_texture_ratio(small_objects) == 0.0
    assert recipe.border_texture_ratio(np.full((2, 64, 64, 1), 90, np.uint8)) == 1.0  # flat everywhere


# ---------------------------------------------------------------------------- calibrate_recipe

def calibrate(images, key='Shift-Intensity-M', kind='texture', seed=0, fixed=(), **changes):
    params, args = texture_args(key, **changes)
    return recipe.calibrate_recipe(images, RandomCrop(48), args, params, kind, seed=seed,
                                   fixed=fixed, num_samples=60)


def test_calibration_mixes_in_the_paste_where_a_seamless_blend_is_invisible():
    params, report = calibrate(shaded_images(12, grain_std=10))
    assert not recipe.label_from_pastes(report)  # blends change the label: the mix follows their visibility
    assert report['visibility'] <= recipe.INVISIBLE
    assert params['paste_fraction'] == recipe.paste_fraction_for(report['visibility']) != (0.5, 1.0)
    q10, q50, q90 = report['change_quantiles']
    k, x0 = params['intensity_logistic_params']
    assert x0 == pytest.approx(q50, abs=0.01)
    assert k == pytest.approx(2 * math.log(9) / max(q90 - q10, recipe.MIN_CHANGE_SPREAD), abs=1e-3)
    assert params['clip_at_border'] is True  # a stationary material
    json.dumps(report)  # plain types only


def test_calibration_measures_patches_whatever_share_of_samples_training_leaves_normal():
    images = shaded_images(12)
    params, report = calibrate(images)
    params_normal, report_normal = calibrate(images, normal_fraction=0.5)
    assert report_normal == report
    assert params_normal == {**params, 'normal_fraction': 0.5}


@pytest.mark.slow
def test_calibration_is_deterministic_and_keeps_what_the_user_fixed():
    images = shaded_images(12)
    assert calibrate(images) == calibrate(images)
    assert calibrate(images)[0] != calibrate(images, seed=1)[0]
    params, _ = calibrate(images, fixed=('paste_fraction', 'intensity_logistic_params',
                                         'num_patches', 'clip_at_border'))
    defaults = settings.KIND_DEFAULTS['texture']
    for name in ('paste_fraction', 'intensity_logistic_params', 'num_patches', 'clip_at_border'):
        assert params[name] == defaults[name]


def faint_images(count, size=64, seed=0, grain=2.0):
    """A material of fine grain whose standard deviation is ``grain`` grey levels: a seamless blend
    changes its pixels by about a grey level, which the label's tolerance does not count."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        noise = cv2.GaussianBlur(rng.normal(size=(size, size)).astype(np.float32), (0, 0), 1)
        images.append(np.clip(128 + grain * noise / noise.std(), 0, 255).round().astype(np.uint8)[..., None])
    return images


def test_blends_that_change_no_label_count_as_invisible_and_are_mixed_with_their_pastes():
    """The label follows the plain pastes where few blends change anything beyond the label's
    tolerance; the blends' sub-tolerance change must not keep them seamless, or training would
    draw anomalies that its label almost never marks."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # few anomalies change such a flat material: warned
        params, report = calibrate(faint_images(12))
    assert recipe.label_from_pastes(report) and report['blends_changed'] == 0
    assert report['visibility'] > recipe.INVISIBLE  # the faint change alone would call for a weaker mix
    assert params['paste_fraction'] == recipe.paste_fraction_for(0.0) == (0.5, 1.0)
    assert "the label follows the pastes, so they are mixed in" in recipe.describe(report)[1]


def test_visible_blends_are_mixed_where_the_label_follows_the_pastes_so_that_training_is_labelled():
    """Flat images with a small textured square: few patches change anything, so the label is fitted
    to the plain pastes' change although the blends that change the images are visible; kept
    seamless, none of them would be labelled as anomalous, mixed with their pastes some are."""
    rng = np.random.default_rng(0)
    images = [np.full((64, 64, 1), 100, np.uint8) for _ in range(8)]
    for image in images:
        image[30:38, 30:38, 0] = rng.integers(0, 256, (8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # few anomalies change the images: warned
        params, report = calibrate(images, key='Shift-Intensity', seed=1)
        _, seamless = calibrate(images, key='Shift-Intensity', seed=1, fixed=('paste_fraction',))
    assert recipe.label_from_pastes(report) and report['visibility'] >= recipe.VISIBLE
    assert params['paste_fraction'] == (0.5, 1.0)
    assert seamless['params']['paste_fraction'] is None
    assert report['effective_fraction'] > seamless['effective_fraction'] == 0.0


def test_calibration_keeps_seamless_blends_where_they_are_visible():
    # source gradients on a high-contrast texture keep about a quarter of a paste's change
    params, report = calibrate(contrasted_images(12), key='Shift-Intensity')
    assert report['visibility'] >= recipe.VISIBLE
    assert params['paste_fraction'] is None


def test_objects_keep_their_patches_inside_and_plain_pastes_get_no_paste_fraction():
    params, report = calibrate(contrasted_images(8), key='Shift-Intensity-Swap', kind='object')
    assert params['clip_at_border'] is False
    assert 'visibility' not in report and params['paste_fraction'] is None


@pytest.mark.parametrize('key', ['CutPaste', 'FPI'])
def test_settings_of_other_labels_judge_their_patches_by_their_own_label(key):
    # a plain paste (binary label) or an interpolation (continuous label) marks every changed
    # pixel; judged by the logistic label, most patches seemed ineffective and the count rose
    params, report = calibrate(contrasted_images(8), key=key)
    assert report['effective_fraction'] > 0.9
    assert params['num_patches'] == settings.KIND_DEFAULTS['texture']['num_patches']
    assert params['width_bounds_pct'] == settings.KIND_DEFAULTS['texture']['width_bounds_pct']
    assert recipe.labelled_anomalous(np.array([0.0, 0.2, 0.5]), 'binary').tolist() == [False, False, True]
    assert recipe.labelled_anomalous(np.array([0.0, 0.2, 3.0]), 'continuous').tolist() == [False, True, True]


def test_patch_sides_are_fractions_of_the_training_crop(monkeypatch):
    measured = []
    monkeypatch.setattr(recipe, 'lower_half_width',
                        lambda sides, effective, lower: measured.append(sides) or lower)
    calibrate(shaded_images(8), key='FPI', width_bounds_pct=((0.2, 0.2), (0.2, 0.2)))
    # foreign patches of half-width 0.2 of the 48-pixel crop change a square of 0.4 of its side
    # (0.3 of the stored 64 pixels)
    assert np.median(measured[0]) == pytest.approx(0.4, abs=0.03)


def test_a_recipe_from_few_changed_samples_warns_and_none_names_what_to_relax():
    def spotted(side):  # flat images with a textured square in the middle: most patches change nothing
        rng = np.random.default_rng(0)
        images = [np.full((64, 64, 1), 100, np.uint8) for _ in range(8)]
        for image in images:
            image[30:30 + side, 30:30 + side, 0] = rng.integers(0, 256, (side, side))
        return images
    with pytest.warns(UserWarning, match=r"only 4 of 60 synthetic anomalies changed the training images, and the "
                                         r"calibrated recipe rests on them; the images may be nearly uniform \(they "
                                         r"span 0.175 grey levels, .*\), else --recipe table$"):
        params, report = calibrate(spotted(8))
    assert (report['changed'], report['blends_changed']) == (4, 0)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # 14 of 60: enough, but of one blend: the pastes' change
        params, report = calibrate(spotted(12))
    assert (report['changed'], report['blends_changed']) == (14, 1)
    with pytest.raises(ValueError, match=r"none of 60 synthetic anomalies changed the training images: are "
                                         r"they blank or nearly uniform \(they span 0 grey levels, 1st to 99th "
                                         r"percentile, median over the images\)\?$"):
        calibrate(spotted(4))
    # with an object mask, the mask may be what leaves no place (here: most of the image is background)
    with pytest.raises(ValueError, match=r"median over the images\), or does the object mask .*--min-object-pct.* "
                                         r"leave no place for a patch\?$"):
        calibrate(spotted(8), background=(100, 0), min_object_pct=0.9, min_overlap_pct=0.9)
    with pytest.warns(UserWarning, match=r"calibrated recipe rests on them; the object mask .* may leave little place "
                                         r"for a patch, else --recipe table$"):
        calibrate(spotted(8), background=(100, 0), min_object_pct=0.5, min_overlap_pct=0.5)


def test_calibration_without_object_pixels_names_the_category_and_flag():
    params, args = texture_args(background=(128, 127))  # every grey level is background
    args['skip_background'] = (128, 127)
    with pytest.raises(ValueError, match=r"category 'parts'.*--background 128 127"):
        recipe.calibrate_recipe(contrasted_images(4), RandomCrop(48), args, params, 'object',
                                category='parts', num_samples=10)
    pairs = [(64, 64), (192, 64)]  # a background of several pairs, as a table entry may hold
    with pytest.raises(ValueError, match=r"category 'parts': background \[\(64.0, 64.0\), \(192.0, "
                                         r"64.0\)\] leaves no object pixel"):
        recipe.check_object_pixels(contrasted_images(2), pairs, 'parts')


# ---------------------------------------------------------------------------- validation set

def test_holdout_is_a_seeded_fraction_and_none_for_small_categories():
    held = validation.holdout_indices(100, 0.1, seed=3)
    assert len(held) == 10 and len(set(held)) == 10 and held.max() < 100
    np.testing.assert_array_equal(held, validation.holdout_indices(100, 0.1, seed=3))
    assert not np.array_equal(held, validation.holdout_indices(100, 0.1, seed=4))
    assert validation.holdout_indices(9, 0.5, 0).size == 0
    assert validation.holdout_indices(100, 0.0, 0).size == 0
    with pytest.raises(ValueError, match='fraction'):
        validation.holdout_indices(100, 1.0, 0)


@hyp_settings(max_examples=25)
@given(st.sampled_from(validation.VALIDATION_KINDS), st.integers(0, 2**32 - 1),
       st.sampled_from([1, 3]))
def test_defect_masks_hold_exactly_the_changed_pixels(kind, seed, channels):
    image = contrasted_images(1, size=64, seed=seed % 7)[0].repeat(channels, axis=2)
    out, mask = validation.synthetic_defect(image, kind, np.random.default_rng(seed))
    assert out.shape == image.shape and out.dtype == np.uint8 and mask.shape == image.shape[:2]
    change = np.abs(out.astype(float) - image).mean(axis=-1)
    assert mask.sum() >= validation.min_defect_pixels(image.shape) == 2
    # a blob's smooth edge beyond its ellipse too: a changed pixel outside would count as normal
    np.testing.assert_array_equal(mask, change >= validation.MIN_CHANGE)


def test_validation_set_pairs_each_image_with_a_defect_of_each_kind_in_turn():
    images = shaded_images(7)
    items, labels, masks, types = validation.make_validation_set(images, seed=0)
    assert labels == [0] * 7 + [1] * 7 and types[:7] == ['good'] * 7
    assert types[7:] == [validation.VALIDATION_KINDS[i % 5] for i in range(7)]
    for image, normal in zip(images, items[:7]):
        np.testing.assert_array_equal(image, normal)
    assert all(not m.any() for m in masks[:7]) and all(m.any() for m in masks[7:])
    again = validation.make_validation_set(images, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(items, again[0]))
    with pytest.raises(ValueError, match='validation kinds'):
        validation.make_validation_set(images, 0, kinds=('smudge',))
    # objects: every defect inside the central crop that their models score
    items, _, masks, _ = validation.make_validation_set(images, seed=0, crop=32)
    box = central_box(images[0].shape, 32)
    for image, defective, mask in zip(images, items[7:], masks[7:]):
        outside = np.ones(mask.shape, bool)
        outside[box] = False
        assert mask.any() and not mask[outside].any()
        np.testing.assert_array_equal(defective[outside], image[outside])
    blank = images[:2] + [np.full_like(images[2], 128)]
    with pytest.raises(validation.DefectNotShownError,
                       match=r'^held-out validation image c.png: no validation defect shows on it \(a blur defect '
                             r'changes fewer than \d+ pixels of this 64x64 image in 20 draws; is it blank\?\); hold '
                             r'out other images \(--val-seed\), or train without a validation set \(--val-fraction 0, '
                             r'with --recipe auto or table and --select last\)$'):
        validation.make_validation_set(blank, 0, kinds=('blur',), names=['a.png', 'b.png', 'c.png'])


def test_a_defect_kind_that_cannot_show_on_an_image_gives_way_to_the_next_kind(monkeypatch):
    """A blur changes nothing on a smooth gradient: that image gets the next kind that shows."""
    gradient = np.tile(np.linspace(60, 140, 64), (64, 1)).astype(np.uint8)[..., None]
    images = [np.clip(gradient.astype(int) + i, 0, 255).astype(np.uint8) for i in range(6)]
    items, labels, masks, types = validation.make_validation_set(images, seed=0)
    assert types[6:] == ['scar', 'blob', 'noise', 'noise', 'line', 'scar']  # 'noise' for the third's blur
    assert labels == [0] * 6 + [1] * 6 and all(mask.any() for mask in masks[6:])
    again = validation.make_validation_set(images, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(items + masks, again[0] + again[2]))
    # where no kind shows, each kind's failure is named (a scar drawn as a blur: neither shows on a flat image)
    monkeypatch.setitem(validation.DEFECTS, 'scar', validation.DEFECTS['blur'])
    with pytest.raises(validation.DefectNotShownError, match=r"image 0: no validation defect shows on it \(a blur "
                                                             r"defect .*; a scar defect .*; is it blank\?\)"):
        validation.make_validation_set([np.full_like(images[0], 100)], 0, kinds=('blur', 'scar'))


def object_on_background(size=64, radius=9, seed=0):
    """A textured disc (the object, about 6% of the image) on a plain black background."""
    rng = np.random.default_rng(seed)
    image = np.zeros((size, size, 1), np.uint8)
    disc = np.zeros((size, size), np.uint8)
    cv2.circle(disc, (size // 2 + 7, size // 2 - 5), radius, 1, thickness=-1)
    image[disc.astype(bool)] = rng.choice((90, 220), (int(disc.sum()), 1))
    return image


@hyp_settings(max_examples=25)
@given(st.sampled_from(validation.VALIDATION_KINDS), st.integers(0, 2**32 - 1))
def test_defects_on_an_object_change_only_its_pixels(kind, seed):
    image = object_on_background(seed=seed % 5)
    on = object_mask(image, (0, 20))
    assert 0.04 < on.mean() < 0.1
    out, mask = validation.synthetic_defect(image, kind, np.random.default_rng(seed), on)
    assert mask.sum() >= validation.min_defect_pixels(image.shape) and not mask[~on].any()
    np.testing.assert_array_equal(out[~on], image[~on])


@pytest.mark.parametrize('kind', ['blob', 'noise', 'line'])
def test_defect_strength_follows_the_grey_levels_not_colour_or_background(kind):
    grey = np.clip(np.random.default_rng(0).normal(120, 10, (64, 64, 1)), 0, 255).astype(np.uint8)
    brown = np.concatenate([grey + 60, grey, grey - 40], axis=2)  # the same grey levels, in colour
    mean_change = []
    for image in (grey, brown):
        out, mask = validation.synthetic_defect(image, kind, np.random.default_rng(1))
        mean_change.append(np.abs(out.astype(float) - image)[mask].mean())  # per channel
    assert mean_change[1] == pytest.approx(mean_change[0], rel=0.3)  # not 3-4 times as strong
    # on an object, the object's grey levels set it, not the step to a black background
    on_black = np.zeros((64, 64, 1), np.uint8)
    on_black[16:48, 16:48] = grey[16:48, 16:48]
    on = object_mask(on_black, (0, 20))
    out, mask = validation.synthetic_defect(on_black, kind, np.random.default_rng(1), on)
    alone, alone_mask = validation.synthetic_defect(grey[16:48, 16:48].copy(), kind, np.random.default_rng(1))
    assert np.abs(out.astype(float) - on_black)[mask].mean() < 2.5 * np.abs(
        alone.astype(float) - grey[16:48, 16:48])[alone_mask].mean()


def test_validation_defects_follow_the_background_and_name_an_image_without_object():
    images = [object_on_background(seed=i) for i in range(6)]
    items, _, masks, _ = validation.make_validation_set(images, seed=0, background=(0, 20), crop=48)
    box = central_box(images[0].shape, 48)
    for image, defective, mask in zip(images, items[6:], masks[6:]):
        on = np.zeros(mask.shape, bool)
        on[box] = object_mask(np.ascontiguousarray(image[box]), (0, 20))
        assert mask.any() and not mask[~on].any()
        np.testing.assert_array_equal(defective[~on], image[~on])
    # without a background the same images get defects on the black background too
    _, _, anywhere, _ = validation.make_validation_set(images, seed=0)
    assert any(mask[object_mask(image, (0, 20)) == 0].any() for image, mask in zip(images, anywhere[6:]))
    empty = images[:2] + [np.zeros_like(images[0])]
    with pytest.raises(ValueError, match=r"validation image c.png: background \(0, 20\) leaves no "
                                         r"object pixel .*check the background"):
        validation.make_validation_set(empty, 0, names=['a.png', 'b.png', 'c.png'], background=(0, 20))
    with pytest.raises(ValueError, match='no object pixel'):
        validation.synthetic_defect(images[0], 'blob', np.random.default_rng(0),
                                    np.zeros(images[0].shape[:2], bool))


@pytest.mark.parametrize('kind', validation.VALIDATION_KINDS)
def test_a_validation_defect_refuses_images_that_the_generator_refuses(kind):
    grey = contrasted_images(1)[0]
    for image, found in ((grey[..., 0], 'uint8 array of shape (64, 64)'),
                         (grey.astype(np.float32), 'float32 array of shape (64, 64, 1)'),
                         (np.repeat(grey, 4, axis=2), 'uint8 array of shape (64, 64, 4)'),
                         (grey[:12], 'at least 16 pixels high and wide, got (12, 64, 1)')):
        with pytest.raises(ValueError, match=re.escape(found)):
            validation.synthetic_defect(image, kind, np.random.default_rng(0))
    for on, found in ((np.ones((32, 32), bool), 'bool array of shape (32, 32)'),
                      (np.ones((64, 64), np.uint8), 'uint8 array of shape (64, 64)'),
                      ([[True]], 'list')):
        with pytest.raises(ValueError, match=r"on must be None or a bool array of the image's height and width "
                                             r"\(64, 64\), got " + re.escape(found)):
            validation.synthetic_defect(grey, kind, np.random.default_rng(0), on)
    with pytest.raises(ValueError, match=r"^held-out validation image flat.png: image must be a uint8 array"):
        validation.make_validation_set([grey[..., 0]], 0, kinds=(kind,), names=['flat.png'])


class Brightness(torch.nn.Module):
    """An anomaly map that grows with the image's brightness: the sigmoid of its channel mean."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return torch.sigmoid(self.scale * x.mean(dim=1, keepdim=True))


def test_validator_scores_the_validation_set_and_each_defect_kind(tiny_mvtec):
    root, name = tiny_mvtec
    dataset = load_validation_set(root, name, [0, 1, 2, 3, 4, 5], seed=0, res_scale=0.25)
    maps, labels, masks = predict(Brightness(), dataset)
    scores = Validator(dataset)(Brightness(), per_kind=True)
    results = metrics.evaluate_maps(labels, maps, masks)
    assert {key: scores[key] for key in ('image_auroc_mean', 'pixel_auroc', 'au_pro')} == {
        key: pytest.approx(results[key]) for key in ('image_auroc_mean', 'pixel_auroc', 'au_pro')}
    assert scores['score'] == pytest.approx(np.mean([results['image_auroc_mean'],
                                                     results['pixel_auroc'], results['au_pro']]))
    kinds = [f'image_auroc_{kind}' for kind in validation.VALIDATION_KINDS]  # 6 images, 5 kinds
    assert [key for key in scores if key.startswith('image_auroc_')][1:] == kinds
    means, types = maps.mean(axis=(1, 2)), np.array(dataset.defect_types)
    for kind in validation.VALIDATION_KINDS:
        keep = (types == 'good') | (types == kind)
        assert scores[f'image_auroc_{kind}'] == pytest.approx(roc_auc_score(labels[keep], means[keep]))
    assert set(Validator(dataset)(Brightness())) == {'image_auroc_mean', 'pixel_auroc', 'au_pro',
                                                     'score'}


# ---------------------------------------------------------------------------- training loop

class ScriptedValidator:
    """Returns the scores of ``scores`` in turn (a stand-in for experiments.validation.Validator)."""

    def __init__(self, scores, every=1):
        self.scores, self.every, self.calls = list(scores), every, 0

    def due(self, epoch, epochs):
        return epoch % self.every == 0 or epoch == epochs

    def __call__(self, model):
        score = self.scores[self.calls]
        self.calls += 1
        return {'image_auroc_mean': score, 'pixel_auroc': score, 'au_pro': score, 'score': score}


@pytest.mark.slow
def test_training_records_the_curve_and_keeps_the_best_model(tmp_path):
    config = TrainConfig(epochs=4, batch_size=4, lr=1e-2, figures=True, select='best')
    states = {}

    class Recording(ScriptedValidator):
        def __call__(self, model):
            states[self.calls + 1] = {k: v.clone() for k, v in model.state_dict().items()}
            return super().__call__(model)
    meta = train(TinyNet(), SquaresDataset(), config, tmp_path, 'run',
                 validator=Recording([0.5, 0.9, 0.7, 0.8]))
    assert [entry['epoch'] for entry in meta['validation']] == [1, 2, 3, 4]
    assert meta['best_epoch'] == 2 and (tmp_path / 'run_validation.png').is_file()
    curve = (tmp_path / 'run_validation.csv').read_text().splitlines()
    assert curve[0] == 'epoch,image_auroc_mean,pixel_auroc,au_pro,score'
    assert [float(line.split(',')[-1]) for line in curve[1:]] == [0.5, 0.9, 0.7, 0.8]
    for path in (best_model_path(tmp_path, 'run'), final_model_path(tmp_path, 'run')):
        saved = torch.load(path, weights_only=True)['model']
        assert all(torch.equal(saved[k], states[2][k].cpu()) for k in saved)


def test_each_validation_is_logged_with_its_metrics(tmp_path, capsys):
    config = TrainConfig(epochs=3, batch_size=4, figures=False, progress=False)
    train(TinyNet(), SquaresDataset(), config, tmp_path, 'run',
          validator=ScriptedValidator([0.25, 0.75], every=2))
    logged = [line for line in capsys.readouterr().out.splitlines() if 'validation' in line]
    assert logged == ['run: epoch 2/3, validation score 0.2500 (image AUROC 0.250, '
                      'pixel AUROC 0.250, AU-PRO 0.250)',
                      'run: epoch 3/3, validation score 0.7500 (image AUROC 0.750, '
                      'pixel AUROC 0.750, AU-PRO 0.750)']


def test_select_best_needs_a_validator_and_no_weight_averaging(tmp_path):
    with pytest.raises(ValueError, match='validation set'):
        train(TinyNet(), SquaresDataset(), TrainConfig(epochs=1, select='best'), tmp_path, 'r')
    with pytest.raises(ValueError, match='weight averaging'):
        TrainConfig(epochs=4, swa_epochs=2, select='best')


@pytest.mark.slow
def test_resumed_run_keeps_the_validation_curve(tmp_path):
    scores, config = [0.2, 0.6, 0.4], TrainConfig(epochs=3, figures=False, checkpoint_every=1)
    whole = train(TinyNet(), SquaresDataset(), config, tmp_path / 'a', 'run',
                  validator=ScriptedValidator(scores))
    with pytest.raises(KeyboardInterrupt):
        train(TinyNet(), CrashAtEpoch(2), config, tmp_path / 'b', 'run',
              validator=ScriptedValidator(scores))
    resumed = train(TinyNet(), SquaresDataset(), config, tmp_path / 'b', 'run', resume=True,
                    validator=ScriptedValidator(scores[2:]))
    assert resumed['validation'] == whole['validation'] and resumed['best_epoch'] == 2


@pytest.mark.slow
def test_a_damaged_resume_checkpoint_is_refused_not_trained_on(tmp_path):
    config = TrainConfig(epochs=3, figures=False, checkpoint_every=1, select='best')
    with pytest.raises(KeyboardInterrupt):
        train(TinyNet(), CrashAtEpoch(2), config, tmp_path, 'run', validator=ScriptedValidator([0.2, 0.6]))
    path = last_checkpoint_path(tmp_path, 'run')
    intact = torch.load(path, weights_only=True)
    assert {'model_sha256', 'best_model_sha256'} <= set(intact)
    for state in ('model', 'best_model'):
        checkpoint = copy.deepcopy(intact)
        weights = next(tensor for tensor in checkpoint[state].values() if tensor.is_floating_point())
        weights[(0,) * weights.dim()] += 1  # a flipped bit, say
        torch.save(checkpoint, path)
        with pytest.raises(RunError, match=rf"the resume checkpoint {path} is damaged: its "
                                           rf"{state.replace('_', ' ')} weights do not match their checksum"):
            train(TinyNet(), SquaresDataset(), config, tmp_path, 'run', resume=True,
                  validator=ScriptedValidator([0.4]))
    for field in ('model_sha256', 'best_model_sha256'):  # written before checkpoints had checksums
        del intact[field]
    torch.save(intact, path)
    resumed = train(TinyNet(), SquaresDataset(), config, tmp_path, 'run', resume=True,
                    validator=ScriptedValidator([0.4]))
    assert len(resumed['epoch_losses']) == 3 and resumed['best_epoch'] == 2


@pytest.mark.slow
def test_a_best_model_written_again_on_resume_keeps_the_meta_of_its_epoch(tmp_path):
    scores, config = [0.2, 0.6, 0.4], TrainConfig(epochs=3, figures=False, checkpoint_every=1)
    for run in ('a', 'b'):
        train(TinyNet(), SquaresDataset(), config, tmp_path / run, 'run', validator=ScriptedValidator(scores))
    final_model_path(tmp_path / 'b', 'run').unlink()  # killed while writing the final model
    train(TinyNet(), SquaresDataset(), config, tmp_path / 'b', 'run', resume=True,
          validator=ScriptedValidator([]))
    whole, resumed = (torch.load(best_model_path(tmp_path / run, 'run'), weights_only=True)['meta']
                      for run in ('a', 'b'))
    assert len(resumed['epoch_losses']) == 2 and [v['epoch'] for v in resumed['validation']] == [1, 2]
    assert resumed['validation'] == whole['validation'] and resumed['best_epoch'] == whole['best_epoch'] == 2
    assert resumed.keys() == whole.keys()


@pytest.mark.slow
def test_a_resumed_run_never_keeps_the_best_model_of_the_epochs_it_lost(tmp_path):
    # checkpoint after epoch 2, epoch 3 validated best (0.9), killed in epoch 4; resumed, epochs 3
    # and 4 score lower (a run that does not repeat exactly: another device, CUDA's kernels)
    config = TrainConfig(epochs=4, batch_size=4, figures=False, checkpoint_every=2, select='best')
    states = {}

    class Recording(ScriptedValidator):
        def __init__(self, scores, first_epoch):
            super().__init__(scores)
            self.first_epoch = first_epoch

        def __call__(self, model):
            states[self.first_epoch + self.calls] = {k: v.clone() for k, v in model.state_dict().items()}
            return super().__call__(model)
    with pytest.raises(KeyboardInterrupt):
        train(TinyNet(), CrashAtEpoch(3), config, tmp_path, 'run', validator=Recording([0.5, 0.6, 0.9], 1))
    lost = torch.load(best_model_path(tmp_path, 'run'), weights_only=True)
    assert lost['meta']['best_epoch'] == 3
    meta = train(TinyNet(), SquaresDataset(), config, tmp_path, 'run', resume=True,
                 validator=Recording([0.55, 0.58], 3))
    assert meta['best_epoch'] == 2 and [v['score'] for v in meta['validation']] == [0.5, 0.6, 0.55, 0.58]
    for path in (best_model_path(tmp_path, 'run'), final_model_path(tmp_path, 'run')):
        saved = torch.load(path, weights_only=True)
        assert saved['meta']['best_epoch'] == 2
        assert all(torch.equal(saved['model'][k], states[2][k]) for k in saved['model'])


# ---------------------------------------------------------------------------- train_mvtec.py

def prepared(tmp_path, data, category, *extra):
    args = train_mvtec.parse_args(['-s', 'Shift-Intensity-M', '-d', str(data),
                                   '-o', str(tmp_path / 'out')] + FAST + list(extra))
    setting, _, _, _ = train_mvtec.plan(args)
    return train_mvtec.prepare_run(args, setting, data, category)


@pytest.mark.slow
def test_auto_recipe_is_the_default_for_new_categories_and_ignores_test_images(tmp_path, capsys):
    data = tmp_path / 'data'
    make_mvtec_category(data, 'plates', n_train=12)
    _, model, _, meta, validator = prepared(tmp_path, data, 'plates', '--val-fraction', '0.1')
    assert meta['recipe'] == 'auto' and meta['held_out'] == 1 and len(validator) == 2
    printed = capsys.readouterr().out
    assert 'recipe auto: logistic label' in printed
    # the calibrated recipe's network standardises each image, and says so
    assert model.config['standardize_input'] is True and model.encoder.standardize_input
    assert 'recipe auto: each image standardised by its own mean and standard deviation' in printed
    shutil.rmtree(data / 'plates' / 'test')
    _, _, _, again, _ = prepared(tmp_path, data, 'plates', '--val-fraction', '0.1')
    assert again['category_params'] == meta['category_params']
    assert again['calibration'] == meta['calibration']


@pytest.mark.parametrize('recipe_name,paste_fraction,overrides,noted', [
    ('auto', (0.47, 1.0), {}, True),           # calibrated mix: the least certain choice
    ('auto', None, {}, False),                 # seamless blends
    ('auto', (0.5, 1.0), {'paste_fraction': (0.5, 1.0)}, False),  # the user's --paste-fraction
    ('search', (0.47, 1.0), {}, False),        # the search checks the mix itself
])
def test_the_auto_recipe_notes_a_calibrated_mix_of_pastes(recipe_name, paste_fraction, overrides,
                                                           noted):
    note = recipes.mix_note('prog', 'plates', recipe_name,
                            {'params': {'paste_fraction': paste_fraction}}, overrides)
    assert (note is not None) == noted
    if noted:
        assert note.startswith('prog: plates: note:') and '--recipe search' in note
        # a category too small to hold out a validation set cannot be searched: no note pointing there
        assert recipes.mix_note('prog', 'plates', recipe_name, {'params': {'paste_fraction': paste_fraction}},
                                overrides, searchable=False) is None


@pytest.mark.parametrize('key,flags,unused', [
    ('Shift-Intensity-M', [], set()),
    ('Shift-M', [], {'intensity_logistic_params'}),                  # binary label
    ('Shift-Intensity', ['--single-patch'], {'num_patches'}),
    ('FPI', [], {'intensity_logistic_params', 'clip_at_border', 'paste_fraction', 'gamma_params'}),
    ('CutPaste', [], {'intensity_logistic_params', 'paste_fraction', 'gamma_params'}),  # NSA's patch shapes
    ('Shift-Intensity', ['--cutpaste-patch-gen'], {'width_bounds_pct', 'num_patches', 'gamma_params'}),
])
def test_the_printed_calibration_marks_the_values_the_task_does_not_use(key, flags, unused):
    args = train_mvtec.parse_args(['-s', key, '-o', 'out'] + flags)
    assert recipes.unused_params(args, settings.parse_setting(key)) == unused
    report = dict(params=dict(intensity_logistic_params=(0.5, 3.5), paste_fraction=None,
                              width_bounds_pct=((0.03, 0.4), (0.03, 0.4)), gamma_params=(2, 0.05, 0.03),
                              num_patches=5, clip_at_border=True),
                  change_quantiles=[1.0, 3.5, 12.0], visibility=0.3, effective_fraction=0.9,
                  border_texture_ratio=1.2, samples=300, changed=300, blends_changed=290)
    text = '\n'.join(recipes.report_lines('prog', 'plates', 'auto', report, unused))
    marked = {'intensity_logistic_params': '(k, x0) = (0.5, 3.5) (not used',
              'paste_fraction': 'none (seamless blends) (not used', 'clip_at_border': 'True (not used',
              'width_bounds_pct': '(0.03, 0.4)) (not used', 'gamma_params': '0.03) (not used',
              'num_patches': 'up to 5 patches (not used'}
    assert {name for name, shown in marked.items() if shown in text} == unused
    assert text.count('(not used by this task)') == len(unused)


def test_the_printed_calibration_marks_the_values_set_rather_than_calibrated():
    report = dict(params=dict(intensity_logistic_params=(1.0, 4.0), paste_fraction=(0.2, 0.9),
                              width_bounds_pct=((0.03, 0.4), (0.03, 0.4)), gamma_params=(2, 0.05, 0.03),
                              num_patches=3, clip_at_border=True),
                  change_quantiles=[2.2, 6.6, 17.5], visibility=0.132, effective_fraction=0.9,
                  border_texture_ratio=1.2, samples=300, changed=300, blends_changed=290)
    calibrated = '\n'.join(recipe.describe(report))
    assert ("logistic label (k, x0) = (1.0, 4.0) from the blends' intensity change (10/50/90th percentile "
            "2.2 / 6.6 / 17.5 grey levels)") in calibrated and 'set, not calibrated' not in calibrated
    # --logistic 1 4 --paste-fraction 0.2 0.9 --num-patches 3 --background ...: a median change of 6.6 did
    # not give x0 = 4, nor a visibility of 0.132 (below the mixing bound) this mix
    given = {'intensity_logistic_params', 'paste_fraction', 'num_patches', 'background'}
    lines = recipe.describe(report, given=given)
    assert lines[:2] == ["logistic label (k, x0) = (1.0, 4.0) (set, not calibrated); the blends' intensity "
                         "change: 10/50/90th percentile 2.2 / 6.6 / 17.5 grey levels",
                         "paste fraction = U(0.2, 0.9) (set, not calibrated); seamless blends keep 0.132 of "
                         "a plain paste's change"]
    assert 'up to 3 patches (set, not calibrated) (0.90' in lines[2] and lines[2].count('set, not') == 1
    # either of the patch sizes set keeps both; a value set and unused says both
    lines = recipe.describe(report, unused={'num_patches'}, given={'width_bounds_pct', 'num_patches'})
    assert lines[2].count('(set, not calibrated)') == 2
    assert 'up to 3 patches (set, not calibrated; not used by this task)' in lines[2]


def test_the_printed_calibration_names_the_sources_its_values_came_from():
    report = dict(params=dict(intensity_logistic_params=(0.24, 10.89), paste_fraction=(0.47, 1.0),
                              width_bounds_pct=((0.1, 0.4), (0.1, 0.4)), gamma_params=(2, 0.05, 0.1),
                              num_patches=7, clip_at_border=True),
                  change_quantiles=[2.6, 10.9, 21.2], visibility=0.05, effective_fraction=0.34,
                  effective_fraction_kept_sizes=0.69, border_texture_ratio=1.2, samples=300, changed=280,
                  blends_changed=13)  # fewer than 30 blends changed anything: the label from the pastes
    assert recipe.label_from_pastes(report)
    lines = recipe.describe(report)
    assert lines[0].startswith("logistic label (k, x0) = (0.24, 10.89) from the plain pastes' intensity change")
    # the patch count follows the patches of the sizes kept (the lower half-width raised), and says so
    assert lines[2].endswith('up to 7 patches (0.69 of single patches of these sizes effective)')
    assert not recipe.label_from_pastes(dict(report, blends_changed=30))
    assert not recipe.label_from_pastes(dict(report, changed=10, blends_changed=10))  # as many as the pastes
    # an inside flat in most windows (median local contrast 0) and a busy border: no ratio of about 1e7
    assert recipe.describe(dict(report, border_texture_ratio=3 / 1e-6))[3].endswith(
        '(border / inner local contrast over 1000: flat inside)')
    assert recipe.describe(dict(report, border_texture_ratio=0.0))[3].endswith('(border / inner local contrast 0.00)')


def test_table_recipe_keeps_the_written_parameters_and_trains_on_every_image(tmp_path):
    data = tmp_path / 'data'
    make_mvtec_category(data, 'plates', n_train=12)
    dataset, _, _, meta, validator = prepared(tmp_path, data, 'plates', '--recipe', 'table')
    assert meta['category_params'] == settings.category_params('plates')
    assert validator is None and len(dataset) == 12 and meta['calibration'] is None


def test_a_category_named_as_a_table_entry_gets_its_recipe_and_says_so(tmp_path, capsys):
    data = tmp_path / 'data'
    make_mvtec_category(data, 'wood', n_train=12)  # a material of one's own, in a folder named as MVTec AD's
    capsys.readouterr()
    _, _, _, meta, _ = prepared(tmp_path, data, 'wood')
    assert meta['recipe'] == 'table' and meta['category_params'] == settings.category_params('wood')
    assert ("wood: note: recipe table: the entry of 'wood' in CATEGORY_PARAMS" in capsys.readouterr().out)
    prepared(tmp_path, data, 'wood', '--recipe', 'table')  # asked for: nothing to note
    assert 'CATEGORY_PARAMS' not in capsys.readouterr().out


SLOW = pytest.mark.slow  # the auto recipe calibrates on the training images


@pytest.mark.parametrize('extra,held_out', [
    pytest.param([], 0, marks=SLOW),  # auto, nothing chosen on a validation set: every image is trained on
    (['--recipe', 'table'], 0),
    pytest.param(['--select', 'best'], 2, marks=SLOW),  # DEFAULT_VAL_FRACTION of 20
    pytest.param(['--recipe', 'search'], 2, marks=SLOW),
    pytest.param(['--val-fraction', '0.25'], 5, marks=SLOW),
])
def test_validation_images_are_held_out_where_a_choice_is_made_or_asked(tmp_path, extra,
                                                                         held_out):
    data = tmp_path / 'data'
    make_mvtec_category(data, 'plates', n_train=20)
    dataset, _, _, meta, validator = prepared(tmp_path, data, 'plates', *extra)
    assert meta['held_out'] == held_out and len(dataset) == 20 - held_out
    assert (validator is None) == (held_out == 0)
    assert held_out == 0 or len(validator) == 2 * held_out


def test_an_object_categorys_validation_defects_lie_on_its_object_for_every_recipe(tmp_path):
    data = tmp_path / 'data'
    make_mvtec_category(data, 'parts', n_train=12, size=128)
    background = ['--background', '40', '60']  # grey levels below 100 are background
    sets = []
    for recipe_name in ('table', 'auto'):  # one validation set, whatever the recipe
        _, _, _, meta, validator = prepared(tmp_path, data, 'parts', '--kind', 'object', *background,
                                            '--recipe', recipe_name, '--val-fraction', '0.25')
        assert meta['validation_background'] == [40, 60] and meta['held_out'] == 3
        assert meta['validation_version'] == validation.VALIDATION_VERSION
        # tested at the training images' side (73 px), where the 64-px crop shows them at their scale
        assert meta['test_res'] == meta['low_res'] == 73 and validator.dataset.images[0].shape[0] == 73
        sets.append(validator.dataset)
    images, masks = sets[0].images, sets[0].masks
    assert all(np.array_equal(a, b) for a, b in zip(images, sets[1].images))
    for normal, defective, mask in zip(images[:3], images[3:], masks[3:]):
        on = object_mask(normal, (40, 60))
        assert mask.any() and not mask.astype(bool)[~on].any()
        np.testing.assert_array_equal(defective[~on], normal[~on])
    _, _, _, meta, _ = prepared(tmp_path, data, 'parts', '--kind', 'object', '--recipe', 'table')
    assert meta['validation_background'] is meta['validation_version'] is None  # no validation set


@pytest.mark.slow
def test_validating_during_training_leaves_the_trained_weights_unchanged(tmp_path):
    data = tmp_path / 'data'
    make_mvtec_category(data, 'plates', n_train=20)
    weights = []
    for every in ('1', '2'):  # after each of the 2 epochs, or after the last one only
        out = tmp_path / f'every{every}'
        train_mvtec.main(['-s', 'Shift-Intensity-M', '-d', str(data), '-o', str(out),
                          '--recipe', 'table', '--val-fraction', '0.1', '--val-every', every]
                         + FAST)
        checkpoint = torch.load(settings.trained_model_path(out, 'Shift-Intensity-M', 'plates'),
                                weights_only=True)
        assert len(checkpoint['meta']['validation']) == 3 - int(every)
        weights.append(checkpoint['model'])
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


@pytest.mark.slow
def test_small_category_trains_without_validation_and_says_so(tmp_path, capsys):
    data = tmp_path / 'data'
    make_mvtec_category(data, 'plates', n_train=6)
    dataset, _, _, meta, validator = prepared(tmp_path, data, 'plates', '--val-fraction', '0.1')
    assert validator is None and len(dataset) == 6 and meta['held_out'] == 0
    assert meta['validation_fraction'] == 0  # as trained: nothing held out
    assert 'without a validation set' in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize('recipe, flags, standardized', [
    ('table', [], False), ('table', ['--standardize-input'], True), ('auto', ['--no-standardize-input'], False),
    ('auto', ['--paper-network'], False), ('table', ['--paper-network', '--standardize-input'], True)])
def test_input_standardisation_follows_the_recipe_unless_asked(tmp_path, capsys, recipe, flags, standardized):
    data = tmp_path / 'data'
    make_mvtec_category(data, 'plates', n_train=12)
    _, model, _, _, _ = prepared(tmp_path, data, 'plates', '--recipe', recipe, *flags)
    assert model.config.get('standardize_input', False) is standardized
    assert model.encoder.standardize_input is standardized
    # said where a calibrated recipe standardises (test above), not here
    assert 'each image standardised' not in capsys.readouterr().out


@pytest.mark.slow
def test_small_category_searches_nothing_and_keeps_the_last_weights_and_says_so(tmp_path, capsys):
    data = tmp_path / 'data'
    make_mvtec_category(data, 'plates', n_train=6)
    out = tmp_path / 'out'
    assert train_mvtec.main(['-s', 'Shift-Intensity', '-d', str(data), '-n', 'plates', '-o', str(out),
                             '--recipe', 'search', '--select', 'best', '--search-epochs', '1']
                            + FAST) == 0
    printed = capsys.readouterr().out
    assert ("plates: fewer than 10 training images: training without a validation set; recipe auto "
            "instead of search; the last epoch's weights instead of --select best") in printed
    assert 'search candidate' not in printed
    meta = torch.load(settings.trained_model_path(out, 'Shift-Intensity', 'plates'),
                      weights_only=True)['meta']
    assert meta['recipe'] == 'auto' and meta['held_out'] == 0 and meta['recipe_search'] is None
    assert meta['train_config']['select'] == 'last' and meta['calibration'] is not None


@pytest.mark.parametrize('argv,expected', [
    (['--val-fraction', '1'], '--val-fraction'),
    (['--val-every', '0'], '--val-every'),
    (['--search-epochs', '0'], '--search-epochs'),
    (['--select', 'best', '--val-fraction', '0'], '--select best'),
    (['--recipe', 'search', '--val-fraction', '0'], '--recipe search needs a validation set'),
    (['-s', 'CutPaste-3way', '--val-fraction', '0.1'], 'CutPaste-3way is a classifier'),
    (['-s', 'CutPaste-3way', '--recipe', 'search'], '--recipe search needs a validation set, scored'),
    (['--val-every', '5'], '--val-every 5 applies to a validation set, and there is none: pass --val-fraction'),
    (['--recipe', 'search', '--val-every', '5'], '--val-every 5 applies to nothing with --recipe search: its '
                                                 'candidates are scored after their last epoch'),
    (['--val-seed', '3', '--val-fraction', '0'], '--val-seed 3 applies to a validation set, and there is none'),
    (['--select', 'best', '--swa-epochs', '2'], '--select best keeps one validated checkpoint; it does not '
                                                'combine with weight averaging (--swa-epochs 2)'),
    (['--val-fraction', '0.1', '--swa-epochs', '2'], '--val-fraction 0.1 scores each epoch\'s weights, and '
                                                     'weight averaging (--swa-epochs 2) keeps their average'),
    (['--paper-network', '--preact'], "--paper-network builds the paper's post-activation network"),
])
def test_recipe_options_are_checked_before_anything_is_written(tiny_mvtec, tmp_path, capsys,
                                                                argv, expected):
    root, _ = tiny_mvtec
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train_mvtec.main(['-s', 'Shift', '-d', str(root), '-o', str(tmp_path / 'out')] + argv)
    assert expected in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_search_alternative_is_calibrated_again_to_the_switched_paste_fraction(tmp_path):
    data = tmp_path / 'data'
    make_mvtec_category(data, 'plates', n_train=12)

    def run(*extra, key='Shift-Intensity-M'):
        args = train_mvtec.parse_args(['-s', key, '-d', str(data), '-o', str(tmp_path / 'out')]
                                      + FAST + ['--res-scale', '0.5'] + list(extra))
        setting, _, _, _ = train_mvtec.plan(args)
        dataset, _, _, meta, _ = train_mvtec.prepare_run(args, setting, data, 'plates')
        overrides = settings.param_overrides(args)
        start = settings.category_params('plates', None, overrides, use_entry=False)
        return meta['category_params'], recipes.calibrate_switched(
            dataset, setting, start, meta['calibration'], args, overrides, setting.run_seed)

    auto, (switched, report) = run()
    assert auto['paste_fraction'] is None  # visible blends at 128 px: seamless
    assert switched['paste_fraction'] == recipes.switched_paste_fraction(auto) == (0.5, 1.0)
    assert report['params'] == {name: switched[name] for name in recipe.CALIBRATED_PARAMS}
    # the same recipe as the calibration with that paste fraction given on the command line,
    # which mixes pastes into the blends, so that more single patches are labelled: fewer patches
    given, not_switched = run('--paste-fraction', '0.5', '1')
    assert switched == given and switched['num_patches'] < auto['num_patches']
    assert not_switched == (None, None)  # the user's fraction is kept
    assert run(key='Shift-Intensity-Swap')[1] == (None, None)  # pastes only: nothing to switch
    # a label fitted to the plain pastes (few blends change anything): seamless blends are no alternative
    faint = dict(visibility=0.3, samples=300, changed=20, blends_changed=3, params=dict(paste_fraction=(0.5, 1.0)))
    assert recipe.label_from_pastes(faint)
    assert recipes.calibrate_switched(None, None, {}, faint, None, {}, 0) == (None, None)
    assert recipes.search_candidates(auto, None, None, auto) == {'auto': auto}


def test_a_search_run_whose_choice_set_its_epochs_is_resumable(tmp_path):
    """The check before the search compares the run as its chosen parameters make it: a choice
    with other default epochs (an entry's) is not another run; another --lr is."""
    from experiments.training import model_checkpoint, run_meta
    from experiments.atomic import save_torch_atomic
    data, out = tmp_path / 'data', tmp_path / 'out'
    make_mvtec_category(data, 'plates', n_train=12)
    argv = ['-s', 'Shift-Intensity', '-d', str(data), '-o', str(out), '--recipe', 'search', '--resume',
            '--batch-size', '4', '--res-scale', '0.25', '--workers', '0']  # no --epochs: the choice's
    args = train_mvtec.parse_args(argv)
    setting, _, _, _ = train_mvtec.plan(args)
    chosen = dict(settings.category_params('plates', None, {}, use_entry=False), epochs=560, num_patches=9)
    _, model, config, meta, validator = train_mvtec.prepare_run(args, setting, data, 'plates', chosen,
                                                                searched=True)
    assert config.epochs == 560
    final = settings.trained_model_path(out, 'Shift-Intensity', 'plates')
    final.parent.mkdir(parents=True)
    save_torch_atomic(model_checkpoint(model, dict(run_meta(model, config, meta, validator),
                                                   recipe_search={'table': dict(score=0.5, params=chosen)})),
                      final)
    train_mvtec.refuse_other_run_before_search(args, setting, data, 'plates', out)  # the same run
    other = train_mvtec.parse_args(argv + ['--lr', '0.01'])
    with pytest.raises(ValueError, match=f'cannot resume the finished run {final}: .*lr: 0.001 vs 0.01'):
        train_mvtec.refuse_other_run_before_search(other, setting, data, 'plates', out)
    single = train_mvtec.parse_args(argv + ['--single-patch'])  # a task flag: other samples
    with pytest.raises(ValueError, match='self_sup_args.num_patches: 9 vs 1'):
        train_mvtec.refuse_other_run_before_search(single, setting, data, 'plates', out)


def test_more_patches_candidate_raises_the_count_to_twice_the_default_unless_fixed():
    auto = dict(num_patches=5, paste_fraction=(0.47, 1.0))
    assert recipes.more_patches(auto, 4, {}) == dict(num_patches=8, paste_fraction=(0.47, 1.0))
    assert recipes.more_patches({**auto, 'num_patches': 16}, 4, {})['num_patches'] == 16
    assert recipes.more_patches(auto, 4, {'num_patches': 5}) is None  # the user's count is kept
    assert recipes.more_patches(auto, 4, {}, one_patch=True) is None  # --single-patch: one anyway
    nine = {**auto, 'num_patches': 9}
    assert recipes.search_candidates(nine, recipes.more_patches(nine, 4, {}), None, auto) == {
        'auto': nine, 'table': auto}  # as many patches already: no candidate of its own


@pytest.mark.slow
@pytest.mark.parametrize('select', ['best', 'last'])
def test_search_trains_the_candidates_and_keeps_the_best(tmp_path, capsys, select):
    data = tmp_path / 'data'
    make_mvtec_category(data, 'plates', n_train=12)
    out = tmp_path / 'out'
    train_mvtec.main(['-s', 'Shift-Intensity-M', '-d', str(data), '-o', str(out), '--recipe',
                      'search', '--search-epochs', '1', '--select', select, '--evaluate'] + FAST)
    printed = capsys.readouterr().out
    assert 'search candidate auto, 1 epoch, in' in printed
    results = pd.read_csv(out / 'eval' / 'results.csv')  # the final model only, not the candidates
    assert len(results) == 1 and results['category'].tolist() == ['plates']
    meta = torch.load(settings.trained_model_path(out, 'Shift-Intensity-M', 'plates'),
                      weights_only=True)['meta']
    search = meta['recipe_search']
    more = 'auto-more-patches'
    assert set(search) - {more} == {'auto', 'auto-paste-switched', 'table'}
    doubled = recipes.MORE_PATCHES_FACTOR * settings.KIND_DEFAULTS['texture']['num_patches']
    assert (more in search) == (search['auto']['params']['num_patches'] < doubled)
    if more in search:
        assert search[more]['params'] == {**search['auto']['params'], 'num_patches': doubled}
    assert search['auto-paste-switched']['params']['paste_fraction'] == (
        recipes.switched_paste_fraction(search['auto']['params']))
    reports = meta['search_calibration']  # what each candidate's calibration measured
    assert set(reports) == set(search) and reports['table'] is None
    for name in set(search) - {'table'}:
        assert reports[name]['visibility'] > 0 and reports[name]['samples'] == recipe.NUM_SAMPLES
    for name in ('auto', 'auto-paste-switched'):  # the calibrated values of its parameters
        calibrated = reports[name]['params']
        assert calibrated == {key: search[name]['params'][key] for key in calibrated}
    if more in search:
        assert reports[more] == reports['auto']
    assert 'recipe search, paste fraction switched: patch half-widths' in printed
    chosen = max(search, key=lambda name: search[name]['score'])
    assert meta['category_params'] == search[chosen]['params']
    scores = ', '.join(f"{name} {result['score']:.4f}" for name, result in search.items())
    assert f"search chose {chosen} (validation scores: {scores})" in printed
    values = ', '.join(f"{name} {search[chosen]['params'][name]}" for name in recipe.CALIBRATED_PARAMS)
    assert f"plates: {chosen}: {values}\n" in printed  # also the table recipe's, which no calibration printed
    if select == 'best':  # the checkpoint is chosen on the held-out images
        assert meta['held_out'] == 1 and meta['best_epoch'] in (1, 2)
    else:  # the chosen recipe is trained on every image, the held-out ones too
        assert meta['held_out'] == 0 and meta['validation_kinds'] == []
        # run again: the finished run's choice is read back, no candidate is trained or read again
        written = {path: path.stat().st_mtime_ns for path in out.rglob('*.pt')}
        final = settings.trained_model_path(out, 'Shift-Intensity-M', 'plates')
        train_mvtec.main(['-s', 'Shift-Intensity-M', '-d', str(data), '-o', str(out), '--recipe',
                          'search', '--search-epochs', '1', '--resume'] + FAST)
        printed = capsys.readouterr().out
        assert printed.count('exists, skipping it') == 1 and 'search candidate' not in printed
        assert {path: path.stat().st_mtime_ns for path in out.rglob('*.pt')} == written
        assert f"search chose {chosen} (validation scores: {scores}), as recorded in {final}" in printed
        # ... also where the candidates' folder was removed
        search_dir = final.parent / train_mvtec.SEARCH_DIR
        shutil.move(search_dir, tmp_path / 'kept')
        train_mvtec.main(['-s', 'Shift-Intensity-M', '-d', str(data), '-o', str(out), '--recipe',
                          'search', '--search-epochs', '1', '--resume'] + FAST)
        printed = capsys.readouterr().out
        assert printed.count('exists, skipping it') == 1 and 'search candidate' not in printed
        assert not search_dir.exists()
        shutil.move(tmp_path / 'kept', search_dir)
        # --resume with another flag: refused before the search trains its candidates again
        with pytest.raises(SystemExit):
            train_mvtec.main(['-s', 'Shift-Intensity-M', '-d', str(data), '-o', str(out), '--recipe',
                              'search', '--search-epochs', '1', '--resume', '--lr', '0.01'] + FAST)
        error = capsys.readouterr().err
        assert f'cannot resume the finished run {final}' in error and 'lr: 0.001 vs 0.01' in error
        assert 'recipe_search' not in error
        assert {path: path.stat().st_mtime_ns for path in out.rglob('*.pt')} == written
        # ... and with a category option, which the chosen parameters alone do not show
        with pytest.raises(SystemExit):
            train_mvtec.main(['-s', 'Shift-Intensity-M', '-d', str(data), '-o', str(out), '--recipe',
                              'search', '--search-epochs', '1', '--resume', '--logistic', '1', '3'] + FAST)
        error = capsys.readouterr().err
        assert (f'cannot resume the finished run {final}' in error
                and 'param_overrides.intensity_logistic_params: absent vs (1.0, 3.0)' in error)
        assert {path: path.stat().st_mtime_ns for path in out.rglob('*.pt')} == written
        # ... and with another search budget, which the final run records
        assert meta['search_budget'] == dict(epochs=1, validation_fraction=0.1)
        for other, difference in ((['--search-epochs', '2'], 'search_budget.epochs: 1 vs 2'),
                                  (['--search-epochs', '1', '--val-fraction', '0.2'],
                                   'search_budget.validation_fraction: 0.1 vs 0.2'),
                                  (['--search-epochs', '1', '--val-seed', '1'],  # other held-out images
                                   'validation_seed: 0 vs 1')):
            with pytest.raises(SystemExit):
                train_mvtec.main(['-s', 'Shift-Intensity-M', '-d', str(data), '-o', str(out), '--recipe',
                                  'search', '--resume'] + other + FAST)
            error = capsys.readouterr().err
            assert f'cannot resume the finished run {final}' in error and difference in error
            assert {path: path.stat().st_mtime_ns for path in out.rglob('*.pt')} == written
        # a run of older code, which recorded neither the search's budget nor its calibration reports, is
        # checked by searching again (its candidates read back), as before; another --val-seed is refused
        older = tmp_path / 'older'
        shutil.copytree(out, older)
        older_final = settings.trained_model_path(older, 'Shift-Intensity-M', 'plates')
        for path in (older_final, older_final.with_name(older_final.name.replace('final_', 'last_'))):
            checkpoint = torch.load(path, weights_only=True)
            for name in ('search_budget', 'search_calibration'):
                del checkpoint['meta'][name]
            torch.save(checkpoint, path)
        assert train_mvtec.main(['-s', 'Shift-Intensity-M', '-d', str(data), '-o', str(older), '--recipe',
                                 'search', '--search-epochs', '1', '--resume'] + FAST) == 0
        printed = capsys.readouterr().out
        assert printed.count('exists, skipping it') == len(search) + 1
        with pytest.raises(SystemExit):
            train_mvtec.main(['-s', 'Shift-Intensity-M', '-d', str(data), '-o', str(older), '--recipe',
                              'search', '--search-epochs', '1', '--resume', '--val-seed', '1'] + FAST)
        error = capsys.readouterr().err
        assert f'cannot resume the finished run {older_final}' in error and 'validation_seed: 0 vs 1' in error
        # the final run gone (as if interrupted before it), a search with other arguments trains
        # its candidates again instead of refusing them
        final.unlink()
        final.with_name(final.name.replace('final_', 'last_')).unlink()
        assert train_mvtec.main(['-s', 'Shift-Intensity-M', '-d', str(data), '-o', str(out),
                                 '--recipe', 'search', '--search-epochs', '2'] + FAST) == 0
        printed = capsys.readouterr().out
        assert printed.count('was run with other arguments: training it again') == len(search)
        assert torch.load(final, weights_only=True)['meta']['recipe_search'] is not None
