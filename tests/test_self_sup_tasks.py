"""Properties of the synthetic-anomaly generator (self_sup_data/self_sup_tasks.py)."""
import dataclasses
import inspect
import warnings

import cv2
import numpy as np
import pytest
import scipy.ndimage as ndi
from hypothesis import given, settings, strategies as st
from skimage.morphology import disk

from self_sup_data.self_sup_tasks import (LABEL_MODES, MIN_PATCH_SIDE, MODES, PATCH_PARAM_NAMES, CutPaste3Way,
                                          PatchParams, SyntheticAnomaly, blends_too_small, cutpaste_scar, make_label,
                                          object_mask, patch_ex, poisson_blend)

SETTINGS = settings(max_examples=40)
TEXTURE = dict(gamma_params=(2, 0.05, 0.03), resize_bounds=(0.5, 2), num_patches=4,
               width_bounds_pct=((0.03, 0.4), (0.03, 0.4)))


def textured(rng, height, width, channels):
    """Smooth random texture with noise, uint8 H x W x C."""
    coarse = rng.uniform(40, 215, (height // 8 + 2, width // 8 + 2, channels)).astype(np.float32)
    smooth = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).reshape(height, width, channels)
    return np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)


def changed_pixels(before, after):
    return (before != after).any(axis=-1)


def box_of(mask):
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def reference_label(dest, image, patch_mask, label_mode, tol, factor, logistic_params):
    """Whole-image label computation, written independently of the cropped one in the module."""
    diff = np.mean(np.abs(image.astype(np.float64) - dest), axis=-1) * patch_mask
    label_mask = cv2.medianBlur((diff > tol).astype(np.uint8), 5)
    label_mask = label_mask * (diff > 0)
    if label_mode == 'binary':
        return label_mask.astype(np.float32)[..., None]
    if label_mode == 'continuous':
        return (label_mask * np.float32(factor))[..., None]
    intensity = ndi.median_filter(diff * label_mask, footprint=disk(5), mode='nearest')
    if label_mode == 'intensity':
        label = label_mask * intensity
    else:
        k, x0 = logistic_params
        label = np.minimum(label_mask / (1 + np.exp(-k * (intensity - x0))), np.nextafter(np.float32(1), 0))
    return label.astype(np.float32)[..., None]


@st.composite
def generator_cases(draw):
    height, width = draw(st.integers(32, 96)), draw(st.integers(32, 96))
    channels = draw(st.sampled_from([1, 3]))
    kwargs = dict(
        mode=draw(st.sampled_from(MODES)),
        label_mode=draw(st.sampled_from(LABEL_MODES)),
        num_patches=draw(st.integers(1, 4)),
        shift=draw(st.booleans()),
        resize=draw(st.booleans()),
        same=draw(st.booleans()),
        num_ellipses=draw(st.sampled_from([None, 1, 3])),
        gamma_params=draw(st.sampled_from([None, (2, 0.05, 0.03)])),
        width_bounds_pct=draw(st.sampled_from([((0.05, 0.2), (0.05, 0.2)), ((0.03, 0.4), (0.1, 0.3))])),
        resize_bounds=draw(st.sampled_from([(0.7, 1.3), (0.5, 2)])),
        cutpaste_patch_generation=draw(st.booleans()) and draw(st.booleans()),
        clip_at_border=draw(st.booleans()),
        paste_fraction=draw(st.sampled_from([None, (0, 1), (0.5, 0.5)])),
        normal_fraction=draw(st.sampled_from([0.0, 0.5])),
    )
    if kwargs['same'] and not PatchParams(**{**kwargs, 'same': False}).moves_patches:
        kwargs['shift'] = True  # a patch pasted back in its place is refused (PatchParams)
    return height, width, channels, kwargs, draw(st.integers(0, 2 ** 32 - 1))


@SETTINGS
@given(generator_cases())
def test_output_types_and_label_invariants(case):
    height, width, channels, kwargs, seed = case
    rng = np.random.default_rng(seed)
    dest, src = textured(rng, height, width, channels), textured(rng, height, width, channels)
    image, label = patch_ex(dest, src, rng=rng, verbose=False, **kwargs)

    assert image.shape == dest.shape and image.dtype == np.uint8
    assert label.shape == (height, width, 1) and label.dtype == np.float32
    assert np.all(label[~changed_pixels(dest, image)] == 0)
    assert np.all(label >= 0)
    if kwargs['label_mode'] == 'binary':
        assert set(np.unique(label)) <= {0.0, 1.0}
    if kwargs['label_mode'] == 'logistic-intensity':
        assert np.all(label < 1)
    if kwargs['label_mode'] == 'continuous':
        assert len(np.unique(label)) <= 2 and np.all(label < 0.95)


@SETTINGS
@given(height=st.integers(32, 96), width=st.integers(32, 96), channels=st.sampled_from([1, 3]),
       label_mode=st.sampled_from(LABEL_MODES), tol=st.sampled_from([0, 1, 2.5]),
       num_boxes=st.integers(1, 3), seed=st.integers(0, 2 ** 32 - 1))
def test_cropped_label_equals_whole_image_reference(height, width, channels, label_mode, tol, num_boxes, seed):
    rng = np.random.default_rng(seed)
    dest = textured(rng, height, width, channels)
    patch_mask = np.zeros((height, width), dtype=bool)
    boxes = []
    for _ in range(num_boxes):  # boxes anywhere, touching the border included
        top, left = rng.integers(0, height - 4), rng.integers(0, width - 4)
        box_h, box_w = min(rng.integers(4, 40), height - top), min(rng.integers(4, 40), width - left)
        patch_mask[top:top + box_h, left:left + box_w] = True
        boxes.append((top, left, box_h, box_w))
    change = rng.integers(-60, 61, dest.shape) * (rng.random(dest.shape[:2]) < 0.9)[..., None]
    image = np.clip(dest.astype(int) + change * patch_mask[..., None], 0, 255).astype(np.uint8)
    factor, params = 0.3, (1 / 6, 20)

    expected = reference_label(dest, image, patch_mask, label_mode, tol, factor, params)
    for patch_boxes in (None, boxes):  # connected parts of the mask, or the boxes that made it
        label = make_label(dest, image, patch_mask, label_mode, tol, factor, params, patch_boxes)
        np.testing.assert_array_equal(label, expected)


def test_make_label_reads_any_non_zero_mask_as_the_patches():
    rng = np.random.default_rng(0)
    dest = textured(rng, 40, 40, 1)
    patch_mask = np.zeros((40, 40), bool)
    patch_mask[8:24, 10:30] = True
    image = np.where(patch_mask[..., None], np.clip(dest.astype(int) + 30, 0, 255), dest).astype(np.uint8)
    for label_mode in ('binary', 'intensity', 'logistic-intensity'):
        expected = make_label(dest, image, patch_mask, label_mode, 1, 1, (1 / 6, 20))
        assert expected.any()
        for mask in (patch_mask.astype(np.uint8) * 255, patch_mask.astype(np.int64)):  # OpenCV's, numpy's
            np.testing.assert_array_equal(make_label(dest, image, mask, label_mode, 1, 1, (1 / 6, 20)), expected)


def test_a_steep_logistic_label_far_below_its_centre_is_zero_without_a_warning():
    dest = np.full((32, 32, 1), 100, np.uint8)
    image, patch_mask = dest.copy(), np.zeros((32, 32), bool)
    patch_mask[8:24, 8:24] = True
    image[patch_mask] = 110  # a change of 10, with k (x0 - 10) = 700 and more: exp(700) and beyond overflow
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        for k in (10, 100):
            label = make_label(dest, image, patch_mask, 'logistic-intensity', 1, 1, (k, 80))
            assert label.dtype == np.float32 and not label.any()


def test_make_label_without_patch_is_zero():
    dest = np.full((32, 32, 3), 7, np.uint8)
    label = make_label(dest, dest.copy(), np.zeros((32, 32), bool), 'logistic-intensity', 1, 1, (1 / 6, 20))
    assert label.shape == (32, 32, 1) and not label.any()


@SETTINGS
@given(height=st.integers(32, 96), width=st.integers(32, 96), channels=st.sampled_from([1, 3]),
       seed=st.integers(0, 2 ** 32 - 1))
def test_swap_without_shift_and_resize_copies_source_at_source_position(height, width, channels, seed):
    rng = np.random.default_rng(seed)
    dest = textured(rng, height, width, channels)
    src = dest + np.uint8(128)  # differs from dest everywhere
    image, label = patch_ex(dest, src, mode='swap', shift=False, resize=False, rng=rng)

    changed = changed_pixels(dest, image)
    top, bottom, left, right = box_of(changed)
    assert changed[top:bottom, left:right].all()  # one rectangle
    assert min(bottom - top, right - left) >= MIN_PATCH_SIDE
    np.testing.assert_array_equal(image[changed], src[changed])
    np.testing.assert_array_equal(image[~changed], dest[~changed])
    assert np.all(label[top + 1:bottom - 1, left + 1:right - 1] == 1)  # the 5 x 5 median only rounds corners


@SETTINGS
@given(height=st.integers(32, 96), width=st.integers(32, 96), channels=st.sampled_from([1, 3]),
       seed=st.integers(0, 2 ** 32 - 1))
def test_clipped_swap_pastes_a_cut_source_rectangle(height, width, channels, seed):
    rng = np.random.default_rng(seed)
    dest = np.zeros((height, width, channels), np.uint8)
    src = textured(rng, height, width, channels) // 2 + 1  # never 0: every pasted pixel shows
    image, _ = patch_ex(dest, src, mode='swap', shift=True, resize=False, clip_at_border=True, rng=rng)

    changed = changed_pixels(dest, image)
    top, bottom, left, right = box_of(changed)
    assert changed[top:bottom, left:right].all()  # one rectangle, possibly cut by the border
    assert min(bottom - top, right - left) >= MIN_PATCH_SIDE
    # its content is a block of the source: found at some offset in src
    block = image[top:bottom, left:right]
    windows = np.lib.stride_tricks.sliding_window_view(src, block.shape)
    assert (windows == block).all(axis=(-3, -2, -1)).any()


@SETTINGS
@given(height=st.integers(32, 96), width=st.integers(32, 96), channels=st.sampled_from([1, 3]),
       mode=st.sampled_from([cv2.NORMAL_CLONE, cv2.MIXED_CLONE]), fraction=st.floats(0, 1),
       shift=st.booleans(), seed=st.integers(0, 2 ** 32 - 1))
@pytest.mark.slow
def test_paste_fraction_mixes_the_blend_with_the_plain_paste(height, width, channels, mode, fraction,
                                                             shift, seed):
    rng = np.random.default_rng(seed)
    dest, src = textured(rng, height, width, channels), textured(rng, height, width, channels)
    kwargs = dict(mode=mode, shift=shift, resize=False, num_patches=1, label_mode='logistic-intensity',
                  verbose=False)

    def run(paste_fraction):
        return patch_ex(dest, src, paste_fraction=paste_fraction, rng=np.random.default_rng(seed), **kwargs)

    seamless, _ = run(None)
    pasted, pasted_label = run((1, 1))
    mixed, label = run((fraction, fraction))
    np.testing.assert_array_equal(run((0, 0))[0], seamless)  # fraction 0: the paper's blend
    # fraction 1: the plain paste over the whole patch, its outer ring included, and its label
    swapped, swapped_label = patch_ex(dest, src, rng=np.random.default_rng(seed),
                                      **{**kwargs, 'mode': 'swap'})
    np.testing.assert_array_equal(pasted, swapped)
    np.testing.assert_array_equal(pasted_label, swapped_label)
    expected = np.round((1 - fraction) * seamless.astype(np.float64) + fraction * pasted.astype(np.float64))
    np.testing.assert_array_equal(mixed, expected.astype(np.uint8))
    assert np.all(label[~changed_pixels(dest, mixed)] == 0)


@pytest.mark.parametrize('mode', ['swap', cv2.NORMAL_CLONE])
@pytest.mark.slow
def test_clip_at_border_changes_border_pixels_about_as_often_as_inner_ones(mode):
    """The paper's placement (fully inside) never changes the outermost pixels and rarely the band
    next to them (measured: 0.03-0.1 of the centre's rate); clipped patches cover the band nearly as
    often as the centre (0.6 with Poisson blending, which keeps the image border fixed, 0.9 pasted)."""
    rng = np.random.default_rng(3)
    size, samples = 64, 300
    dest, src = textured(rng, size, size, 1), textured(rng, size, size, 1)
    kwargs = dict(mode=mode, shift=True, resize=False, label_mode='binary', verbose=False,
                  width_bounds_pct=((0.1, 0.3), (0.1, 0.3)), rng=rng)
    band, centre = slice(1, 5), slice(24, 40)
    for clip in (False, True):
        coverage = np.zeros((size, size))
        for _ in range(samples):
            coverage += patch_ex(dest, src, clip_at_border=clip, **kwargs)[1][..., 0] > 0
        coverage /= samples
        border_rate = np.mean([coverage[band, centre].mean(), coverage[-5:-1, centre].mean(),
                               coverage[centre, band].mean(), coverage[centre, -5:-1].mean()])
        ratio = border_rate / coverage[centre, centre].mean()
        if clip:
            assert ratio > 0.5
        else:
            assert coverage[[0, -1], :].max() == 0 and coverage[:, [0, -1]].max() == 0
            assert ratio < 0.2


@SETTINGS
@given(height=st.integers(32, 96), width=st.integers(32, 96), channels=st.sampled_from([1, 3]),
       mode=st.sampled_from([cv2.NORMAL_CLONE, cv2.MIXED_CLONE, 'uniform']), seed=st.integers(0, 2 ** 32 - 1))
@pytest.mark.slow
def test_blends_without_shift_and_resize_stay_at_source_position(height, width, channels, mode, seed):
    rng = np.random.default_rng(seed)
    dest = textured(rng, height, width, channels)
    src = dest + np.uint8(128)
    kwargs = dict(shift=False, resize=False, label_mode='continuous')
    swapped, _ = patch_ex(dest, src, mode='swap', rng=np.random.default_rng(seed), **kwargs)
    blended, label = patch_ex(dest, src, mode=mode, rng=np.random.default_rng(seed), **kwargs)

    top, bottom, left, right = box_of(changed_pixels(dest, swapped))  # the source rectangle
    inside = np.zeros((height, width), dtype=bool)
    if mode == 'uniform':
        inside[top:bottom, left:right] = True
        factor = label.max()
        expected = np.floor((1 - factor) * dest.astype(np.float64) + factor * src.astype(np.float64))
        np.testing.assert_allclose(blended[inside], expected[inside], atol=1)  # factor rounded to float32
    else:
        inside[top + 1:bottom - 1, left + 1:right - 1] = True  # the mask's outer ring stays unchanged
    assert not changed_pixels(dest, blended)[~inside].any()


def _ellipse_or_box_mask(rng, height, width):
    mask = np.zeros((height, width), dtype=np.uint8)
    if rng.random() < 0.5:
        center = (int(rng.integers(3, width - 3)), int(rng.integers(3, height - 3)))
        axes = (int(rng.integers(3, width // 2)), int(rng.integers(3, height // 2)))
        cv2.ellipse(mask, center, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
    else:
        mask[rng.integers(1, 4):height - rng.integers(1, 4), rng.integers(1, 4):width - rng.integers(1, 4)] = 255
    mask[[0, -1], :] = 0
    mask[:, [0, -1]] = 0
    return mask


@SETTINGS
@given(height=st.integers(12, 60), width=st.integers(12, 60), channels=st.sampled_from([1, 3]),
       mode=st.sampled_from([cv2.NORMAL_CLONE, cv2.MIXED_CLONE]), seed=st.integers(0, 2 ** 32 - 1))
def test_poisson_blend_keeps_source_in_place(height, width, channels, mode, seed):
    """Blending an image into itself must reproduce it: a shifted paste would not."""
    rng = np.random.default_rng(seed)
    dest = textured(rng, height, width, channels)
    mask = _ellipse_or_box_mask(rng, height, width)
    mask_before = mask.copy()
    blended = poisson_blend(dest, dest.copy(), mask, mode)
    np.testing.assert_array_equal(mask, mask_before)  # OpenCV 5.0 would overwrite it
    assert blended.shape == dest.shape and blended.dtype == np.uint8
    assert np.abs(blended.astype(int) - dest).max() <= 2

    other = textured(rng, height, width, channels)
    blended = poisson_blend(dest, other, mask, mode)
    top, bottom, left, right = box_of(mask > 0)
    outside = np.ones((height, width), dtype=bool)
    outside[top:bottom, left:right] = False
    assert not changed_pixels(dest, blended)[outside].any()


@SETTINGS
@given(height=st.integers(12, 40), width=st.integers(12, 40),
       mode=st.sampled_from([cv2.NORMAL_CLONE, cv2.MIXED_CLONE]),
       reach=st.lists(st.booleans(), min_size=4, max_size=4), seed=st.integers(0, 2 ** 32 - 1))
def test_poisson_blend_ignores_the_outer_ring_of_a_mask_that_reaches_it(height, width, mode, reach, seed):
    """A mask whose box reaches the outer ring blends as the same mask without that ring: the
    content is placed from what seamlessClone keeps, not shifted by a pixel."""
    rng = np.random.default_rng(seed)
    dest, src = textured(rng, height, width, 1), textured(rng, height, width, 1)
    mask = np.zeros((height, width), np.uint8)
    top, left = (0 if reach[0] else 2), (0 if reach[1] else 2)
    bottom, right = (height if reach[2] else height - 2), (width if reach[3] else width - 2)
    mask[top:bottom, left:right] = 255
    inside = mask.copy()
    inside[[0, -1], :] = 0
    inside[:, [0, -1]] = 0
    np.testing.assert_array_equal(poisson_blend(dest, src, mask, mode), poisson_blend(dest, src, inside, mode))
    with pytest.raises(ValueError, match='no non-zero pixel inside its outer pixel ring'):
        poisson_blend(dest, src, np.pad(np.full((height - 2, width - 2), 0, np.uint8), 1, constant_values=255),
                      mode)


@settings(max_examples=20)
@given(channels=st.sampled_from([1, 3]), mode=st.sampled_from([cv2.NORMAL_CLONE, cv2.MIXED_CLONE]),
       seed=st.integers(0, 2 ** 32 - 1))
def test_poisson_blend_on_crop_equals_whole_image_clone(channels, mode, seed):
    rng = np.random.default_rng(seed)
    dest, src = textured(rng, 80, 90, channels), textured(rng, 80, 90, channels)
    top, left, height, width = rng.integers(0, 40), rng.integers(0, 40), rng.integers(10, 40), rng.integers(10, 50)
    region = (slice(top, top + height), slice(left, left + width))
    mask = _ellipse_or_box_mask(rng, height, width)
    cropped = dest.copy()
    cropped[region] = poisson_blend(dest[region], src[region], mask, mode)

    full_mask = np.zeros(dest.shape[:2], np.uint8)
    full_mask[region] = mask
    mask_top, mask_bottom, mask_left, mask_right = box_of(full_mask > 0)
    center = (int(mask_left + (mask_right - mask_left) // 2), int(mask_top + (mask_bottom - mask_top) // 2))
    src3, dest3 = (cv2.merge([src] * 3), cv2.merge([dest] * 3)) if channels == 1 else (src, dest)
    whole = cv2.seamlessClone(src3, dest3, full_mask, center, mode)[..., :channels]
    np.testing.assert_array_equal(cropped, whole)


@SETTINGS
@given(mode=st.sampled_from(MODES), channels=st.sampled_from([1, 3]), num_patches=st.integers(1, 4),
       seed=st.integers(0, 2 ** 32 - 1))
@pytest.mark.slow
def test_skip_background_never_patches_pure_background(mode, channels, num_patches, seed):
    rng = np.random.default_rng(seed)
    background = np.zeros((64, 64, channels), np.uint8)
    with_object = background.copy()
    with_object[16:48, 16:48] = textured(rng, 32, 32, channels) // 2 + 100
    kwargs = dict(mode=mode, num_patches=num_patches, skip_background=(0, 20), verbose=False, rng=rng)

    for dest, src in ((background, background), (background, with_object), (with_object, background)):
        image, label = patch_ex(dest, src, **kwargs)
        np.testing.assert_array_equal(image, dest)
        assert label.shape == (64, 64, 1) and not label.any()

    if mode == 'swap':  # every changed pixel is destination object or now shows source object
        image, _ = patch_ex(with_object, with_object, resize=False, **kwargs)
        changed = changed_pixels(with_object, image)
        is_object = with_object.mean(axis=-1) > 20
        assert np.all(is_object[changed] | (image.mean(axis=-1)[changed] > 20))


@pytest.mark.parametrize('channels', [1, 3])
@pytest.mark.parametrize('skip_background', [(200, 10), [(200, 10), (30, 5)], ((0, 20), (255, 20))])
def test_object_mask_is_pixels_far_from_every_background(channels, skip_background):
    rng = np.random.default_rng(8)
    image = rng.integers(0, 256, (40, 48, channels), dtype=np.uint8)
    image[10:30, 10:30] = 200  # a background block, whatever else is noise
    pairs = [skip_background] if isinstance(skip_background[0], int) else skip_background
    mean = image.astype(np.float64).mean(axis=-1)
    expected = np.all([np.abs(mean - b) > t for b, t in pairs], axis=0)
    expected = ndi.median_filter(expected.astype(np.uint8), size=7, mode='nearest').astype(bool)
    np.testing.assert_array_equal(object_mask(image, skip_background), expected)


def test_skip_background_accepts_several_backgrounds():
    rng = np.random.default_rng(0)
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, 32:] = 255  # two backgrounds, no object
    out, label = patch_ex(image, skip_background=[(0, 20), (255, 20)], verbose=False, rng=rng)
    np.testing.assert_array_equal(out, image)
    assert not label.any()


def test_no_patch_placed_warns_when_verbose():
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.warns(RuntimeWarning, match='no suitable patch'):
        patch_ex(image, skip_background=(0, 5), rng=np.random.default_rng(0))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        patch_ex(image, skip_background=(0, 5), verbose=False, rng=np.random.default_rng(0))


@SETTINGS
@given(seed=st.integers(0, 2 ** 32 - 1), channels=st.sampled_from([1, 3]))
def test_cutpaste_patch_generation_pastes_one_rectangle(seed, channels):
    rng = np.random.default_rng(seed)
    dest = textured(rng, 96, 96, channels)
    src = dest + np.uint8(128)
    image, _ = patch_ex(dest, src, mode='swap', shift=False, cutpaste_patch_generation=True, num_patches=4, rng=rng)
    changed = changed_pixels(dest, image)
    top, bottom, left, right = box_of(changed)
    assert changed[top:bottom, left:right].all()
    height, width = bottom - top, right - left
    assert 0.015 <= height * width / 96 ** 2 <= 0.16
    assert 0.25 <= height / width <= 3.6


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('channels', [1, 3])
def test_same_rng_state_gives_same_output(mode, channels):
    rng = np.random.default_rng(1)
    dest, src = textured(rng, 64, 72, channels), textured(rng, 64, 72, channels)
    kwargs = dict(mode=mode, label_mode='logistic-intensity', num_ellipses=2, **TEXTURE)
    first = patch_ex(dest, src, rng=np.random.default_rng(5), **kwargs)
    second = patch_ex(dest, src, rng=np.random.default_rng(5), **kwargs)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_global_numpy_seed_makes_default_rng_repeatable():
    rng = np.random.default_rng(2)
    dest, src = textured(rng, 64, 64, 3), textured(rng, 64, 64, 3)
    np.random.seed(3)
    first = [patch_ex(dest, src, mode='mix') for _ in range(3)]
    np.random.seed(3)
    second = [patch_ex(dest, src, mode='mix') for _ in range(3)]
    for (image_a, label_a), (image_b, label_b) in zip(first, second):
        np.testing.assert_array_equal(image_a, image_b)
        np.testing.assert_array_equal(label_a, label_b)
    assert not np.array_equal(first[0][0], first[1][0])


def test_inputs_are_not_modified():
    rng = np.random.default_rng(4)
    dest, src = textured(rng, 64, 64, 3), textured(rng, 64, 64, 3)
    dest_copy, src_copy = dest.copy(), src.copy()
    for mode in MODES:
        patch_ex(dest, src, mode=mode, rng=rng, **TEXTURE)
        patch_ex(dest, mode=mode, rng=rng, **TEXTURE)
    np.testing.assert_array_equal(dest, dest_copy)
    np.testing.assert_array_equal(src, src_copy)


def test_synthetic_anomaly_wraps_patch_ex():
    rng = np.random.default_rng(6)
    dest, src = textured(rng, 64, 64, 3), textured(rng, 64, 64, 3)
    kwargs = dict(mode=cv2.MIXED_CLONE, label_mode='logistic-intensity', **TEXTURE)
    anomaly = SyntheticAnomaly(**kwargs)
    expected = patch_ex(dest, src, rng=np.random.default_rng(7), **kwargs)
    for a, b in zip(anomaly(dest, src, rng=np.random.default_rng(7)), expected):
        np.testing.assert_array_equal(a, b)
    assert repr(anomaly).startswith('SyntheticAnomaly(') and 'logistic-intensity' in repr(anomaly)
    with pytest.raises(ValueError, match='label_mode'):
        SyntheticAnomaly(label_mode='nope')
    with pytest.raises(ValueError, match='colour'):
        SyntheticAnomaly(colour=1)


IMAGE = np.zeros((32, 32, 3), np.uint8)
INVALID = [
    (dict(ima_dest=IMAGE.astype(np.float32)), 'ima_dest'),
    (dict(ima_dest=IMAGE[..., :2]), 'ima_dest'),
    (dict(ima_dest=IMAGE[..., 0]), 'ima_dest'),
    (dict(ima_dest=IMAGE[:8]), 'ima_dest'),
    (dict(ima_src=np.zeros((32, 30, 3), np.uint8)), 'ima_src'),
    (dict(ima_src=np.zeros((32, 32, 1), np.uint8)), 'ima_src'),
    (dict(ima_src=IMAGE.astype(np.uint16)), 'ima_src'),
    (dict(mode='poisson'), 'mode'),
    (dict(mode=7), 'mode'),
    (dict(label_mode='soft'), 'label_mode'),
    (dict(num_patches=0), 'num_patches'),
    (dict(num_patches=1.5), 'num_patches'),
    (dict(width_bounds_pct=((0.1, 0.6), (0.1, 0.2))), 'width_bounds_pct'),
    (dict(width_bounds_pct=((0.3, 0.2), (0.1, 0.2))), 'width_bounds_pct'),
    (dict(width_bounds_pct=((-0.1, 0.2), (0.1, 0.2))), 'width_bounds_pct'),
    (dict(width_bounds_pct=(0.1, 0.2)), 'width_bounds_pct'),
    (dict(min_object_pct=1.5), 'min_object_pct'),
    (dict(min_object_pct=1), 'min_object_pct'),  # more than all of a patch: no patch could be placed
    (dict(min_overlap_pct=1.0), 'min_overlap_pct'),
    (dict(min_overlap_pct=-0.1), 'min_overlap_pct'),
    (dict(clip_at_border='False'), 'clip_at_border'),  # a string is truthy: refused
    (dict(same=1), 'same'),
    (dict(shift='no'), 'shift'),
    (dict(skip_background=(0,)), 'skip_background'),
    (dict(skip_background=[(0, 5), (255, -1)]), 'skip_background'),
    (dict(tol=-1), 'tol'),
    (dict(gamma_params=(2, 0.05)), 'gamma_params'),
    (dict(gamma_params=(0, 0.05, 0.03)), 'gamma_params'),
    (dict(intensity_logistic_params=(1,)), 'intensity_logistic_params'),
    (dict(resize_bounds=(1.3, 0.7)), 'resize_bounds'),
    (dict(resize_bounds=(0, 1)), 'resize_bounds'),
    (dict(num_ellipses=0), 'num_ellipses'),
    (dict(num_ellipses=101), 'num_ellipses'),
    (dict(paste_fraction=(0.5,)), 'paste_fraction'),
    (dict(paste_fraction=(0.8, 0.2)), 'paste_fraction'),
    (dict(paste_fraction=(0, 1.5)), 'paste_fraction'),
    (dict(normal_fraction=1), 'normal_fraction'),
    (dict(normal_fraction=-0.1), 'normal_fraction'),
    (dict(normal_fraction=float('nan')), 'normal_fraction'),
    (dict(same=True, shift=False, resize=False), 'same'),  # each patch back in its place: nothing changes
    (dict(same=True, shift=False, cutpaste_patch_generation=True), 'same'),  # CutPaste's patches: never resized
    (dict(ima_src=None, shift=False, resize=False), 'ima_src'),  # no source: the patches come from ima_dest
    (dict(ima_src=IMAGE, shift=False, resize=False), 'ima_src'),
    (dict(rng=np.random.RandomState(0)), 'rng'),
]


def test_normal_fraction_leaves_that_share_of_samples_normal_and_patches_the_others_as_without_it():
    rng = np.random.default_rng(0)
    dest, src = textured(rng, 48, 48, 1), textured(rng, 48, 48, 1)
    kwargs = dict(mode='swap', label_mode='binary', num_patches=2, verbose=False)
    normal = 0
    for seed in range(200):
        image, label = patch_ex(dest, src, normal_fraction=0.25, rng=np.random.default_rng(seed), **kwargs)
        reference = np.random.default_rng(seed)
        if reference.random() < 0.25:  # the one draw the option adds, before any other
            normal += 1
            assert np.array_equal(image, dest) and not label.any() and label.shape == (48, 48, 1)
        else:
            expected_image, expected_label = patch_ex(dest, src, rng=reference, **kwargs)
            assert np.array_equal(image, expected_image) and np.array_equal(label, expected_label)
            assert label.any()  # a plain paste of another image always changes pixels
    assert 30 <= normal <= 70  # 50 expected; binomial standard deviation 6.1


@pytest.mark.parametrize('kwargs, name', INVALID, ids=[f'{name}-{i}' for i, (_, name) in enumerate(INVALID)])
def test_invalid_arguments_raise_value_error_naming_them(kwargs, name):
    kwargs = dict(kwargs)
    dest = kwargs.pop('ima_dest', IMAGE)
    with pytest.raises(ValueError, match=name):
        patch_ex(dest, **kwargs)


PARAM_CASES = [(kwargs, name) for kwargs, name in INVALID if name not in ('ima_dest', 'ima_src', 'rng')]


@pytest.mark.parametrize('kwargs, name', PARAM_CASES, ids=[name for _, name in PARAM_CASES])
def test_patch_params_and_synthetic_anomaly_name_the_invalid_argument(kwargs, name):
    with pytest.raises(ValueError, match=f'^{name} must'):
        PatchParams(**kwargs)
    with pytest.raises(ValueError, match=f'^{name} must'):
        SyntheticAnomaly(**kwargs)


def test_patch_params_hold_the_defaults_of_patch_ex():
    signature = inspect.signature(patch_ex).parameters
    assert PATCH_PARAM_NAMES == tuple(name for name in signature if name not in ('ima_dest', 'ima_src', 'rng'))
    assert all(signature[name].default == getattr(PatchParams(), name) for name in PATCH_PARAM_NAMES)
    with pytest.raises(dataclasses.FrozenInstanceError):
        PatchParams().num_patches = 2


def test_synthetic_anomaly_gives_the_samples_of_patch_ex():
    dest = textured(np.random.default_rng(0), 64, 64, 3)
    src = dest[::-1].copy()
    anomaly = SyntheticAnomaly(mode='mix', num_patches=3, label_mode='logistic-intensity')
    for seed in range(5):
        expected = patch_ex(dest, src, mode='mix', num_patches=3, label_mode='logistic-intensity',
                            rng=np.random.default_rng(seed))
        got = anomaly(dest, src, rng=np.random.default_rng(seed))
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])


@SETTINGS
@given(height=st.integers(16, 96), width=st.integers(16, 96), channels=st.sampled_from([1, 3]),
       mode=st.sampled_from(['mix', cv2.NORMAL_CLONE]), resize=st.booleans(), ellipses=st.sampled_from([None, 3]),
       clip=st.booleans(), seed=st.integers(0, 2 ** 32 - 1))
def test_blends_told_too_small_change_no_pixel_by_more_than_one_grey_level(height, width, channels, mode, resize,
                                                                           ellipses, clip, seed):
    rng = np.random.default_rng(seed)
    dest, src = textured(rng, height, width, channels), textured(rng, height, width, channels)
    params = PatchParams(mode=mode, resize=resize, num_ellipses=ellipses, clip_at_border=clip)
    image, label = patch_ex(dest, src, rng=rng, **dataclasses.asdict(params))
    if blends_too_small((height, width), params):  # one patch: a single blend (several may add up)
        assert not label.any() and np.abs(image.astype(int) - dest).mean(axis=-1).max() <= 1


def test_blends_too_small_names_the_widths_and_the_size():
    params = PatchParams()
    message = blends_too_small((40, 40), params)  # default widths: resized patches of at most 8 x 8 pixels
    assert message.startswith('width_bounds_pct ((0.05, 0.2), (0.05, 0.2)) on images of 40 x 40 pixels with resize '
                              'give patches of at most 8 x 8 pixels')
    assert message.endswith('nearly every sample is left normal; give larger width_bounds_pct, resize=False, '
                            'larger images, a paste_fraction or a mode that is not seamless')
    for dims, widths in (((16, 16), ((0.5, 0.5), (0.5, 0.5))), ((16, 16), ((0.05, 0.2), (0.05, 0.2))),
                         ((16, 100), ((0.05, 0.5), (0.05, 0.2)))):  # no width gets a side past 8 pixels
        message = blends_too_small(dims, dataclasses.replace(params, width_bounds_pct=widths))
        assert message.endswith('give resize=False, larger images, a paste_fraction or a mode that is not seamless')
    for changes in (dict(mode='swap'), dict(resize=False), dict(paste_fraction=(0.5, 1)), dict(tol=0.5),
                    dict(width_bounds_pct=((0.05, 0.3), (0.05, 0.3))), dict(cutpaste_patch_generation=True)):
        assert blends_too_small((40, 40), dataclasses.replace(params, **changes)) is None, changes
    assert blends_too_small((40, 40), dataclasses.replace(params, paste_fraction=(0, 0)))  # seamless still
    assert blends_too_small((48, 48), params) is None  # patches up to 10 pixels: some blends are labelled
    rng = np.random.default_rng(0)
    larger = textured(rng, 48, 48, 1)
    assert any(patch_ex(larger, larger[::-1].copy(), rng=np.random.default_rng(seed))[1].any() for seed in range(20))


@pytest.mark.parametrize('label_mode', LABEL_MODES)
def test_uniform_mode_interpolates_by_a_random_factor_with_every_label(label_mode):
    """Unlike the paper's code, which pastes the patch as it is unless the label is continuous."""
    dest, src = np.full((64, 64, 1), 20, np.uint8), np.full((64, 64, 1), 200, np.uint8)
    image, label = patch_ex(dest, src, mode='uniform', label_mode=label_mode, rng=np.random.default_rng(0))
    values = set(np.unique(image).tolist())
    assert len(values) == 2 and 20 in values and 20 < max(values) < 200
    if label_mode == 'continuous':  # the label is the interpolation factor
        factor = float(label.max())
        assert max(values) == int(np.floor((1 - factor) * 20 + factor * 200))


def test_scar_takes_a_generator_or_none():
    image = textured(np.random.default_rng(0), 64, 64, 3)
    with pytest.raises(ValueError, match='rng must be a numpy.random.Generator'):
        cutpaste_scar(image, np.random.RandomState(0))
    np.random.seed(5)
    first = cutpaste_scar(image, None)
    np.random.seed(5)
    np.testing.assert_array_equal(cutpaste_scar(image, None)[0], first[0])
    views, classes = CutPaste3Way()(image, None)
    assert len(views) == 3 and list(classes) == [0, 1, 2]


@pytest.mark.parametrize('label_mode', ['Binary', 'bogus', None])
def test_make_label_refuses_an_unknown_label_mode(label_mode):
    dest = np.zeros((32, 32, 1), np.uint8)
    image = dest.copy()
    image[8:24, 8:24] = 200
    with pytest.raises(ValueError, match='label_mode'):
        make_label(dest, image, image[..., 0] > 0, label_mode, 1, 1.0, (1 / 6, 20))
