"""Synthetic anomalies by pasting or blending image patches: NSA, CutPaste, FPI and PII in one generator.

`patch_ex` takes a normal image (the destination) and optionally a second normal image (the
source), moves a few random source patches into the destination and returns the anomalous image
with a pixel-wise label map (Schlueter et al., "Natural Synthetic Anomalies for Self-Supervised
Anomaly Detection and Localization", arXiv 2109.15222). The blending `mode` selects the method:

    cv2.NORMAL_CLONE / cv2.MIXED_CLONE   Poisson image editing with source / mixed gradients (NSA, PII)
    'mix'                                a coin picks one of the two per sample
    'swap'                               plain paste (CutPaste with ``same=True``)
    'uniform'                            linear interpolation with a random factor (FPI), whatever the label
                                         (the paper's code interpolates only for the 'continuous' label and
                                         pastes the patch as it is for the others)

The generator knows nothing of torch: images are uint8 numpy arrays ``H x W x C`` (C = 1 or 3),
labels float32 ``H x W x 1``, and all randomness comes from a ``numpy.random.Generator``.
"""
import inspect
import itertools
import warnings
from dataclasses import dataclass, fields, replace

import cv2
import numpy as np
from skimage.filters import rank
from skimage.morphology import disk

POISSON_MODES = (cv2.NORMAL_CLONE, cv2.MIXED_CLONE)
MODES = POISSON_MODES + ('mix', 'swap', 'uniform')
LABEL_MODES = ('binary', 'continuous', 'intensity', 'logistic-intensity')

# Revision of what patch_ex makes of given arguments, kept in each trained model's meta so that
# models of an older generator can be told apart (bench/real_data.py retrains them):
#   1  until 2026-12-02 (models without the field)
#   2  paste_fraction mixes the plain paste over the whole patch mask, not only inside its outer ring
GENERATOR_VERSION = 2
MAX_TRIES = 200  # placement attempts per patch before giving up on it
MAX_NUM_PATCHES = 32  # the paper draws up to 4; each patch costs a Poisson blend
MAX_NUM_ELLIPSES = 100  # the paper's code draws 5; each costs a pass over its patch
RESIZE_LIMITS = (0.1, 10)  # sane bounds of the patch rescaling factor (the paper: 0.5 to 2)
# pixels; seamlessClone zeroes a mask's outer ring and holds the next at the boundary values: thinner patches
# leave it nothing to solve, and a seamless blend of a patch 8 pixels wide or high changes no pixel by more than
# one grey level either (such a patch leaves its sample's label as it was; a floor of 10 scored lower by
# the validation score, BENCHMARKS.md; ``blends_too_small`` tells arguments that draw no other patches)
MIN_PATCH_SIDE = 8
MIN_CLONE_SIDE = 4  # pixels; seamlessClone raises for masks whose non-zero bounding box is under 3 pixels wide
MIN_IMAGE_SIDE = 2 * MIN_PATCH_SIDE
FACTOR_BOUNDS = (0.05, 0.95)  # interpolation factor of 'uniform' and the 'continuous' label
OBJECT_MASK_KSIZE = 7  # median filter that removes grain from the object masks of skip_background
LABEL_MASK_KSIZE = 5  # median filter that cleans the thresholded change
INTENSITY_RADIUS = 5  # disk radius of the median filter on the intensity label
CUTPASTE_AREA_RATIO = (0.02, 0.15)
CUTPASTE_ASPECT_RATIOS = ((0.3, 1.0), (1.0, 3.3))
# CutPaste-scar at a 256-pixel side: width and length (pixels), rotation (degrees); colour jitter
SCAR_WIDTH, SCAR_LENGTH, SCAR_MAX_DEGREES, SCAR_REFERENCE_SIDE = (2, 16), (10, 25), 45, 256
CUTPASTE_JITTER = 0.1

_INTENSITY_FOOTPRINT = disk(INTENSITY_RADIUS)
_BELOW_ONE = np.nextafter(np.float32(1), np.float32(0))  # logistic labels stay below 1 in float32


# ---------------------------------------------------------------------------------------------
# arguments

def _background_pairs(skip_background):
    """``skip_background`` as a list of ``(brightness, threshold)`` pairs (one pair or a sequence of them)."""
    if _pairs(skip_background, 2):
        return [tuple(skip_background)]
    return list(skip_background) if isinstance(skip_background, (tuple, list)) else []


def check_image(image, name):
    """ValueError naming ``name`` unless ``image`` is a uint8 array ``H x W x C`` (C = 1 or 3) of at
    least MIN_IMAGE_SIDE pixels a side: the images the generator takes."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
        desc = f'{image.dtype} array of shape {image.shape}' if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f'{name} must be a uint8 array H x W x C with C in (1, 3), got {desc}')
    if min(image.shape[:2]) < MIN_IMAGE_SIDE:
        raise ValueError(f'{name} must be at least {MIN_IMAGE_SIDE} pixels high and wide, got {image.shape}')


def check_label_mode(label_mode):
    """ValueError unless ``label_mode`` is one of LABEL_MODES."""
    if not isinstance(label_mode, str) or label_mode not in LABEL_MODES:
        raise ValueError(f'label_mode must be one of {LABEL_MODES}, got {label_mode!r}')


def as_generator(rng):
    """``rng`` if it is a ``numpy.random.Generator``; for None a Generator seeded from numpy's global
    state (so that ``np.random.seed`` makes runs repeatable); ValueError otherwise."""
    if rng is None:
        return np.random.default_rng(np.random.randint(2 ** 31))
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f'rng must be a numpy.random.Generator or None, got {type(rng).__name__}')
    return rng


def _is_number(x):
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and np.isfinite(x)


def _is_int(x, minimum):
    """True if x is an integer (not a bool) of at least ``minimum`` (None: any)."""
    return (isinstance(x, (int, np.integer)) and not isinstance(x, bool)
            and (minimum is None or x >= minimum))


def _pairs(x, n):
    """True if x is a sequence of n numbers."""
    return isinstance(x, (tuple, list, np.ndarray)) and len(x) == n and all(_is_number(v) for v in x)


UNMOVED = ('patches are neither shifted nor resized (cutpaste_patch_generation never resizes): a patch of the '
           'image itself would be pasted back where it was cut from, and no sample would change')
BOOL_PARAMS = ('same', 'shift', 'resize', 'verbose', 'cutpaste_patch_generation', 'clip_at_border')


@dataclass(frozen=True)
class PatchParams:
    """The arguments of ``patch_ex`` other than the images and ``rng`` (see there), with their
    defaults; constructing one checks them and raises a ValueError naming the first invalid one."""
    same: bool = False
    num_patches: int = 1
    mode: int | str = cv2.NORMAL_CLONE
    width_bounds_pct: tuple = ((0.05, 0.2), (0.05, 0.2))
    min_object_pct: float = 0.25
    min_overlap_pct: float = 0.25
    shift: bool = True
    label_mode: str = 'binary'
    skip_background: tuple | list | None = None
    tol: float = 1
    resize: bool = True
    gamma_params: tuple | None = None
    intensity_logistic_params: tuple = (1 / 6, 20)
    resize_bounds: tuple = (0.7, 1.3)
    num_ellipses: int | None = None
    verbose: bool = True
    cutpaste_patch_generation: bool = False
    clip_at_border: bool = False
    paste_fraction: tuple | None = None
    normal_fraction: float = 0.0

    @property
    def moves_patches(self):
        """Whether a patch lands other than where it was cut from: shifted, or resized (CutPaste's
        patch generation never resizes)."""
        return self.shift or (self.resize and not self.cutpaste_patch_generation)

    def __post_init__(self):
        if not _is_int(self.num_patches, 1) or self.num_patches > MAX_NUM_PATCHES:
            raise ValueError(f'num_patches must be an integer from 1 to {MAX_NUM_PATCHES}, '
                             f'got {self.num_patches!r}')
        mode = self.mode
        if not (mode in MODES[len(POISSON_MODES):] if isinstance(mode, str) else
                _is_int(mode, None) and mode in POISSON_MODES):
            raise ValueError(f'mode must be one of {MODES} (cv2.NORMAL_CLONE, cv2.MIXED_CLONE, ...), got {mode!r}')
        check_label_mode(self.label_mode)
        bounds = self.width_bounds_pct
        if (not isinstance(bounds, (tuple, list)) or len(bounds) != 2
                or not all(_pairs(b, 2) and 0 <= b[0] <= b[1] <= 0.5 for b in bounds)):
            raise ValueError('width_bounds_pct must be ((min, max), (min, max)) with 0 <= min <= max <= 0.5, '
                             f'got {bounds!r}')
        for name in ('min_object_pct', 'min_overlap_pct'):  # a patch must have more than this
            value = getattr(self, name)
            if not _is_number(value) or not 0 <= value < 1:
                raise ValueError(f'{name} must be a number in [0, 1), got {value!r}')
        for name in BOOL_PARAMS:
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f'{name} must be True or False, got {getattr(self, name)!r}')
        if self.skip_background is not None:
            pairs = _background_pairs(self.skip_background)
            if not pairs or not all(_pairs(p, 2) and p[1] >= 0 for p in pairs):
                raise ValueError('skip_background must be None, (brightness, threshold) or a list of such pairs '
                                 f'with threshold >= 0, got {self.skip_background!r}')
        if not _is_number(self.tol) or self.tol < 0:
            raise ValueError(f'tol must be a number >= 0, got {self.tol!r}')
        gamma = self.gamma_params
        if gamma is not None and not (_pairs(gamma, 3) and gamma[0] > 0 and gamma[1] > 0 and gamma[2] >= 0):
            raise ValueError(f'gamma_params must be None or (shape > 0, scale > 0, lower >= 0), got {gamma!r}')
        if not (_pairs(self.intensity_logistic_params, 2) and self.intensity_logistic_params[0] > 0):
            raise ValueError(f'intensity_logistic_params must be (k, x0) with k > 0, got '
                             f'{self.intensity_logistic_params!r}')
        low_high = self.resize_bounds
        low, high = RESIZE_LIMITS
        if not (_pairs(low_high, 2) and low <= low_high[0] <= low_high[1] <= high):
            raise ValueError(f'resize_bounds must be (low, high) with {low} <= low <= high <= {high}, '
                             f'got {low_high!r}')
        if self.num_ellipses is not None and not (_is_int(self.num_ellipses, 1)
                                                  and self.num_ellipses <= MAX_NUM_ELLIPSES):
            raise ValueError(f'num_ellipses must be None or an integer from 1 to {MAX_NUM_ELLIPSES}, '
                             f'got {self.num_ellipses!r}')
        if self.same and not self.moves_patches:
            raise ValueError(f'same must be False where {UNMOVED}; shift or resize them')
        fraction = self.paste_fraction
        if fraction is not None and not (_pairs(fraction, 2) and 0 <= fraction[0] <= fraction[1] <= 1):
            raise ValueError(f'paste_fraction must be None or (low, high) with 0 <= low <= high <= 1, '
                             f'got {fraction!r}')
        if not _is_number(self.normal_fraction) or not 0 <= self.normal_fraction < 1:
            raise ValueError(f'normal_fraction must be a number in [0, 1), got {self.normal_fraction!r}')


_DEFAULT = PatchParams()
PATCH_PARAM_NAMES = tuple(field.name for field in fields(PatchParams))


def patch_ex(ima_dest, ima_src=None, same=_DEFAULT.same, num_patches=_DEFAULT.num_patches,
             mode=_DEFAULT.mode, width_bounds_pct=_DEFAULT.width_bounds_pct,
             min_object_pct=_DEFAULT.min_object_pct, min_overlap_pct=_DEFAULT.min_overlap_pct,
             shift=_DEFAULT.shift, label_mode=_DEFAULT.label_mode,
             skip_background=_DEFAULT.skip_background, tol=_DEFAULT.tol, resize=_DEFAULT.resize,
             gamma_params=_DEFAULT.gamma_params,
             intensity_logistic_params=_DEFAULT.intensity_logistic_params,
             resize_bounds=_DEFAULT.resize_bounds, num_ellipses=_DEFAULT.num_ellipses,
             verbose=_DEFAULT.verbose, cutpaste_patch_generation=_DEFAULT.cutpaste_patch_generation,
             clip_at_border=_DEFAULT.clip_at_border, paste_fraction=_DEFAULT.paste_fraction,
             normal_fraction=_DEFAULT.normal_fraction, rng=None):
    """Create a synthetic anomaly by moving random patches of ``ima_src`` into ``ima_dest``.

    Args:
        ima_dest: uint8 array ``H x W x C`` with C in {1, 3}: the image that receives the patches.
        ima_src: uint8 array of the same shape, the source of the patches; None or ``same=True``:
            patches come from ``ima_dest`` itself (as it was before any patch was added).
        same: take patches from ``ima_dest`` even when ``ima_src`` is given.
        num_patches: the first patch is always attempted, each further one with probability 1/2.
        mode: cv2.NORMAL_CLONE, cv2.MIXED_CLONE, 'mix', 'swap' or 'uniform' (see the module docstring).
        width_bounds_pct: ((min, max) along height, (min, max) along width): bounds of the patch
            half-widths as fractions of the image size, each within [0, 0.5].
        min_object_pct: with ``skip_background``, the fraction of the source patch that must be
            object (more than it; in [0, 1)).
        min_overlap_pct: with ``skip_background``, the fraction of the source object in the patch that
            must land on the destination's object (more than it; in [0, 1)).
        shift: paste at a random position; otherwise centred where the patch was in the source.
        clip_at_border: with ``shift``, the patch may hang over the image border and is cut there
            (at least ``MIN_PATCH_SIDE`` pixels of it stay inside along each axis), so that pixels
            near the border are changed nearly as often as others (row or column ``x`` from the
            border, ``x < MIN_PATCH_SIDE - 1``, by a patch of side ``L`` with a share
            ``(L - MIN_PATCH_SIDE + 1 + x) / L`` of an inner pixel's chance: close to 1 for the large
            patches of a 256-pixel image, about a third for the outer row at 64 pixels; a seamless
            Poisson blend leaves a patch's two outer pixel rings unchanged, so without
            ``paste_fraction`` it never changes the image's outer two rows and columns); False (the
            paper's): the patch lies fully inside the image, and pixels near the border are rarely
            changed.
        label_mode: 'binary', 'continuous', 'intensity' or 'logistic-intensity':
            binary: 1 where the mean absolute change over channels exceeds ``tol``, cleaned by a
                5 x 5 median filter (the label mask M);
            continuous: M times a factor U(0.05, 0.95) drawn once per call, which with 'uniform'
                is also the interpolation factor ('uniform' draws one with any label; the paper's
                code pastes the patch as it is unless the label is continuous);
            intensity: the mean absolute change d inside M, median filtered with a disk of radius 5,
                inside M;
            logistic-intensity: ``M / (1 + exp(-k (d - x0)))`` with ``(k, x0) = intensity_logistic_params``
                (capped at the largest float32 below 1).
            Every label is zero wherever the image is unchanged.
        skip_background: None, ``(brightness, threshold)`` or a list of such pairs. A pixel is
            background if its channel mean lies within ``threshold`` of the ``brightness`` of any pair,
            object otherwise (then 7 x 7 median filtered). Patches must then cover more than
            ``min_object_pct`` object in the source and overlap the destination object by more than
            ``min_overlap_pct``, and only object pixels (of source or destination) are labelled (a
            Poisson blend also blends the box's pixels that are background in both images, against
            seams, and may change them much, by over 100 grey levels next to a bright object: they
            stay unlabelled, as no anomaly lies on the background).
        tol: mean absolute change (grey levels) above which a pixel is labelled anomalous.
        resize: rescale the source patch by a factor ~ N(1, 0.5) clipped to ``resize_bounds``,
            keeping its aspect ratio; as in the reference implementation, the rescaled side lengths
            are clipped to the pixel bounds that ``width_bounds_pct`` gives the half-widths.
        gamma_params: None (half-widths uniform within the bounds) or ``(shape, scale, lower)``:
            half-width fraction ``lower + Gamma(shape, scale)``, clipped to the bounds.
        intensity_logistic_params: ``(k, x0)`` of the logistic label.
        paste_fraction: None (the paper's: Poisson blends are seamless) or ``(low, high)`` within
            [0, 1]; only for the Poisson modes: each blended patch is mixed with its plain paste,
            ``(1 - b) * blended + b * pasted`` inside the whole patch mask with ``b ~ U(low, high)``
            per patch, so that part of the patch's intensity offset and edges stays (for materials
            on which the seamless blend leaves no visible change). The blend leaves the mask's
            outer pixel rings unchanged (seamlessClone's boundary condition); the mix covers them,
            so that ``(1, 1)`` gives the plain paste of mode 'swap'. Labels follow the resulting
            change.
        normal_fraction: probability in [0, 1) that the sample stays normal: ``ima_dest`` unchanged
            and an all-zero label, so that training also sees images with no anomaly anywhere
            (0, the paper's: every sample gets patches; drawn from ``rng`` only when above 0).
        resize_bounds: ``(low, high)`` bounds of the rescaling factor, ``0.1 <= low <= high <= 10``.
        num_ellipses: None or the number of random ellipses (1 to MAX_NUM_ELLIPSES) whose union
            replaces the rectangular patch mask (each a rotated ellipse; the paper's code tilted
            the axes of its test unequally, so that ellipses near 45 degrees became long bands). A
            Poisson blend then changes the whole bounding box of the ellipses, the label only the
            ellipses, as in the paper's code: about 40-45% of the pixels it changes by more than one
            grey level stay unlabelled (256 px, 5 ellipses).
        verbose: warn (``warnings.warn``) when a patch cannot be placed.
        cutpaste_patch_generation: sample one patch as in CutPaste (area ratio U(0.02, 0.15) of the
            image, aspect ratio from U(0.3, 1) or U(1, 3.3), fully inside the image); width bounds,
            gamma, resize, skip_background, num_ellipses and num_patches are then ignored.
        rng: ``numpy.random.Generator``; None: one seeded from numpy's global state, so that
            ``np.random.seed`` makes runs repeatable.

    The arguments other than the images and ``rng`` are checked by ``PatchParams`` (a ValueError
    naming the first invalid one), which also holds their defaults.

    Sides shorter than ``MIN_PATCH_SIDE`` pixels are raised to it; a patch that cannot be placed
    in ``MAX_TRIES`` attempts is skipped (the image is returned unchanged, with an all-zero label,
    if no patch could be placed). On small images, seamless Poisson blends may all be too small to
    change a pixel by more than one grey level, which leaves nearly every sample normal:
    ``blends_too_small`` tells such arguments (training datasets warn of them).

    Returns:
        (image, label): the anomalous image (uint8, the shape of ``ima_dest``) and the label map
        (float32, ``H x W x 1``).
    """
    params = PatchParams(
        same=same, num_patches=num_patches, mode=mode, width_bounds_pct=width_bounds_pct,
        min_object_pct=min_object_pct, min_overlap_pct=min_overlap_pct, shift=shift,
        label_mode=label_mode, skip_background=skip_background, tol=tol, resize=resize,
        gamma_params=gamma_params, intensity_logistic_params=intensity_logistic_params,
        resize_bounds=resize_bounds, num_ellipses=num_ellipses, verbose=verbose,
        cutpaste_patch_generation=cutpaste_patch_generation, clip_at_border=clip_at_border,
        paste_fraction=paste_fraction, normal_fraction=normal_fraction)
    return _patch_ex(ima_dest, ima_src, params, rng)


def _patch_ex(ima_dest, ima_src, params, rng):
    """``patch_ex`` with its arguments checked and gathered in ``params`` (a PatchParams)."""
    check_image(ima_dest, 'ima_dest')
    if ima_src is not None and not params.same:
        check_image(ima_src, 'ima_src')
        if ima_src.shape != ima_dest.shape:
            raise ValueError(f'ima_src must have the shape of ima_dest {ima_dest.shape}, got {ima_src.shape}')
    if (ima_src is None or ima_src is ima_dest) and not params.moves_patches:
        raise ValueError(f'ima_src must be another image where {UNMOVED}; pass one, or shift or resize them')
    rng = as_generator(rng)

    if params.normal_fraction and rng.random() < params.normal_fraction:
        return ima_dest.copy(), np.zeros(ima_dest.shape[:2] + (1,), dtype=np.float32)
    ima_src = ima_dest if params.same or ima_src is None else ima_src
    mode = params.mode
    if mode == 'mix':
        mode = POISSON_MODES[rng.integers(2)]
    factor = (rng.uniform(*FACTOR_BOUNDS) if mode == 'uniform' or params.label_mode == 'continuous'
              else 1.0)
    if params.cutpaste_patch_generation:
        params = replace(params, num_patches=1, resize=False, skip_background=None)

    if params.skip_background is not None:
        src_object = object_mask(ima_src, params.skip_background)
        dest_object = (src_object if ima_src is ima_dest
                       else object_mask(ima_dest, params.skip_background))
    else:
        src_object = dest_object = None

    height, width = ima_dest.shape[:2]
    bounds_px = _half_width_bounds_px((height, width), params.width_bounds_pct)
    image = ima_dest.copy()
    patch_mask = np.zeros((height, width), dtype=bool)  # union of the pasted patch masks
    boxes = []
    for i in range(params.num_patches):
        if i > 0 and rng.integers(2) == 0:
            continue
        if params.cutpaste_patch_generation:
            source = _cutpaste_source_patch(rng, (height, width))
        else:
            source = _sample_source_patch(rng, (height, width), bounds_px, params.gamma_params,
                                          params.num_ellipses, src_object, params.min_object_pct)
        placed = None
        if source is not None:
            placed = _place_patch(rng, image, ima_src, source, bounds_px, src_object, dest_object,
                                  mode, factor, params)
        if placed is None:
            if params.verbose:
                warnings.warn('patch_ex: no suitable patch found, skipping it', RuntimeWarning, stacklevel=3)
            continue
        top, left, mask = placed
        patch_mask[top:top + mask.shape[0], left:left + mask.shape[1]] |= mask
        boxes.append((top, left) + mask.shape)

    label = make_label(ima_dest, image, patch_mask, params.label_mode, params.tol, factor,
                       params.intensity_logistic_params, boxes)
    return image, label


class SyntheticAnomaly:
    """``patch_ex`` with fixed keyword arguments, for use inside a Dataset or a transform pipeline.

    ``SyntheticAnomaly(**patch_ex_kwargs)(dest, src=None, rng=None) -> (image, label)``.
    """

    def __init__(self, **patch_ex_kwargs):
        unknown = set(patch_ex_kwargs) - set(PATCH_PARAM_NAMES)
        if unknown:
            raise ValueError(f'unknown patch_ex arguments {sorted(unknown)}; valid: {list(PATCH_PARAM_NAMES)}')
        self.params = PatchParams(**patch_ex_kwargs)
        self.kwargs = dict(patch_ex_kwargs)

    def __call__(self, dest, src=None, rng=None):
        return _patch_ex(dest, src, self.params, rng)

    def __repr__(self):
        args = ', '.join(f'{k}={v!r}' for k, v in self.kwargs.items())
        return f'{type(self).__name__}({args})'


def color_jitter(patch, rng, strength=CUTPASTE_JITTER):
    """Colour jitter of a uint8 patch ``h x w x C``, in this order: brightness (times a factor
    U(1 - s, 1 + s)), contrast (distance to the mean grey level times such a factor) and, for RGB,
    saturation (distance to the pixel's grey level times such a factor) and hue (shifted by
    U(-s, s) of the hue circle), with ``s = strength``."""
    low, high = 1 - strength, 1 + strength
    x = patch.astype(np.float32) * rng.uniform(low, high)
    mean = x.mean()
    x = (x - mean) * rng.uniform(low, high) + mean
    if patch.shape[-1] == 3:
        gray = x @ np.float32([0.299, 0.587, 0.114])
        x = (x - gray[..., None]) * rng.uniform(low, high) + gray[..., None]
        hsv = cv2.cvtColor(np.clip(x, 0, 255).round().astype(np.uint8), cv2.COLOR_RGB2HSV)
        hsv[..., 0] = (hsv[..., 0].astype(int) + round(rng.uniform(-strength, strength) * 180)) % 180
        x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return np.clip(x, 0, 255).round().astype(np.uint8).reshape(patch.shape)


def _rotated(patch, degrees):
    """``patch`` rotated by ``degrees`` on a canvas that holds it -> (rotated patch, bool mask).

    The patch is interpolated bilinearly against a black canvas and the mask by nearest
    neighbour, so that the mask's rim holds pixels darkened by the black border (a sixth of a
    scar's pixels at the default sizes, a cue that a real scar need not have). Kept as it is: the
    validation sets and the CutPaste-3way models measured in BENCHMARKS.md were made with it."""
    height, width = patch.shape[:2]
    radians = np.deg2rad(degrees)
    cos, sin = abs(np.cos(radians)), abs(np.sin(radians))
    new_w, new_h = int(np.ceil(height * sin + width * cos)), int(np.ceil(height * cos + width * sin))
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), degrees, 1.0)
    matrix[:, 2] += ((new_w - width) / 2, (new_h - height) / 2)
    rotated = cv2.warpAffine(patch, matrix, (new_w, new_h), flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(np.ones((height, width), np.uint8), matrix, (new_w, new_h),
                          flags=cv2.INTER_NEAREST)
    return rotated.reshape(new_h, new_w, -1), mask.astype(bool)


def check_scar_args(width=SCAR_WIDTH, length=SCAR_LENGTH, max_degrees=SCAR_MAX_DEGREES, jitter=CUTPASTE_JITTER,
                    reference_side=SCAR_REFERENCE_SIDE, centre=None):
    """ValueError naming the first argument of ``cutpaste_scar`` that it cannot use: sizes that are
    not (low, high) with 0 < low <= high, an angle or jitter strength that is negative or not
    finite (a jitter of 1 or more: factors of 0 or below), a reference side that is not positive,
    a centre that is not two integers."""
    for name, bounds in (('width', width), ('length', length)):
        if not (_pairs(bounds, 2) and 0 < bounds[0] <= bounds[1]):
            raise ValueError(f'{name} must be (low, high) pixels with 0 < low <= high, got {bounds!r}')
    if not (_is_number(max_degrees) and max_degrees >= 0):
        raise ValueError(f'max_degrees must be a finite angle of 0 or more, got {max_degrees!r}')
    if not (_is_number(jitter) and 0 <= jitter < 1):
        raise ValueError(f'jitter must be a number in [0, 1), got {jitter!r}')
    if not (_is_number(reference_side) and reference_side > 0):
        raise ValueError(f'reference_side must be a positive number of pixels, got {reference_side!r}')
    if centre is not None and not (isinstance(centre, (tuple, list)) and len(centre) == 2
                                   and all(_is_int(v, None) for v in centre)):
        raise ValueError(f'centre must be None or (x, y) integer pixels, got {centre!r}')


def cutpaste_scar(image, rng, width=SCAR_WIDTH, length=SCAR_LENGTH, max_degrees=SCAR_MAX_DEGREES,
                  jitter=CUTPASTE_JITTER, reference_side=SCAR_REFERENCE_SIDE, centre=None):
    """CutPaste-scar (Li et al. 2021): a thin, long rectangle cut from a random place of ``image``,
    colour-jittered (``color_jitter``), rotated by U(-max_degrees, max_degrees) and pasted at a
    random place, or centred on the pixel ``centre`` = (x, y) (moved inside the image where it
    would hang over the border).

    Width and length are drawn uniformly from ``width`` and ``length`` (pixels at a side of
    ``reference_side``) and scaled to the image's shorter side (at least one pixel).
    Returns (image uint8 like ``image``, mask bool ``H x W``: the pasted pixels). ValueError for
    arguments it cannot use (``check_scar_args``).
    """
    check_image(image, 'image')
    check_scar_args(width, length, max_degrees, jitter, reference_side, centre)
    rng = as_generator(rng)
    height, width_px = image.shape[:2]
    scale = min(height, width_px) / reference_side
    scar_w = min(max(1, round(rng.uniform(*width) * scale)), width_px)
    scar_h = min(max(1, round(rng.uniform(*length) * scale)), height)
    top = int(rng.integers(0, height - scar_h, endpoint=True))
    left = int(rng.integers(0, width_px - scar_w, endpoint=True))
    patch = color_jitter(image[top:top + scar_h, left:left + scar_w], rng, jitter)
    rotated, mask = _rotated(patch, rng.uniform(-max_degrees, max_degrees))
    if rotated.shape[0] <= height and rotated.shape[1] <= width_px and mask.any():
        patch = rotated
    else:  # a scar about as long as the image: pasted unrotated
        mask = np.ones(patch.shape[:2], bool)
    if centre is None:
        top, left = _random_start(rng, height, patch.shape[0]), _random_start(rng, width_px, patch.shape[1])
    else:
        top = min(max(centre[1] - patch.shape[0] // 2, 0), height - patch.shape[0])
        left = min(max(centre[0] - patch.shape[1] // 2, 0), width_px - patch.shape[1])
    out = image.copy()
    out[top:top + patch.shape[0], left:left + patch.shape[1]][mask] = patch[mask]
    pasted = np.zeros((height, width_px), bool)
    pasted[top:top + patch.shape[0], left:left + patch.shape[1]] = mask
    return out, pasted


class CutPaste3Way:
    """CutPaste's 3-way task: ``views(image, rng) -> ([normal, CutPaste, CutPaste-scar], [0, 1, 2])``.

    The CutPaste view is ``patch_ex(image, same=True, mode='swap',
    cutpaste_patch_generation=True, ...)`` updated with ``patch_ex_args`` (a rectangle of the
    image pasted elsewhere in it; never left normal: ``normal_fraction`` 0); the scar view is
    ``cutpaste_scar(image, rng, **scar_args)``.
    """
    num_classes = 3

    def __init__(self, patch_ex_args=None, scar_args=None):
        self.patch_ex_args = {**dict(mode='swap', cutpaste_patch_generation=True, resize=False),
                              **(patch_ex_args or {}), 'same': True,
                              'normal_fraction': 0.0}  # a class-1 view is never the normal one
        SyntheticAnomaly(**self.patch_ex_args)  # validates
        self.scar_args = dict(scar_args or {})
        valid = list(inspect.signature(check_scar_args).parameters)
        unknown = set(self.scar_args) - set(valid)
        if unknown:
            raise ValueError(f'unknown cutpaste_scar arguments {sorted(unknown)}; valid: {valid}')
        check_scar_args(**self.scar_args)

    def __call__(self, image, rng):
        cutpaste, _ = patch_ex(image, rng=rng, **self.patch_ex_args)
        scar, _ = cutpaste_scar(image, rng, **self.scar_args)
        return [image, cutpaste, scar], [0, 1, 2]

    def __repr__(self):
        return f'{type(self).__name__}(patch_ex_args={self.patch_ex_args!r}, scar_args={self.scar_args!r})'


def check_object_pixels(images, skip_background, names):
    """ValueError naming the images (``names``, one per image) in which ``skip_background`` leaves
    no object pixel (``object_mask``): their samples would have no patch and empty labels. (A
    crop of an image may be all background; ``patch_ex`` then places no patch.)"""
    empty = [name for image, name in zip(images, names)
             if not object_mask(image, skip_background).any()]
    if empty:
        raise ValueError(f'background {skip_background!r} leaves no object pixel in {len(empty)} '
                         f'of {len(names)} images, e.g. {empty[0]}; choose a brightness and '
                         f'threshold that keep the object')


def object_mask(image, skip_background):
    """Boolean ``H x W`` mask of the object: pixels whose channel mean differs from the brightness of
    every ``(brightness, threshold)`` pair by more than its threshold, 7 x 7 median filtered."""
    mean = image.mean(axis=-1)
    is_object = np.ones(image.shape[:2], dtype=np.uint8)
    for brightness, threshold in _background_pairs(skip_background):
        is_object &= np.abs(mean - brightness) > threshold
    return cv2.medianBlur(is_object, OBJECT_MASK_KSIZE).astype(bool)


def make_label(dest, image, patch_mask, label_mode, tol, factor, intensity_logistic_params, patch_boxes=None):
    """Label map (float32 ``H x W x 1``) of the change from ``dest`` to ``image`` inside ``patch_mask``.

    ``patch_mask``: ``H x W``, non-zero (True) where patches were pasted (any dtype: read as
    ``!= 0``). ``patch_boxes``: rectangles ``(top, left, height, width)`` that together contain ``patch_mask``
    (default: the bounding boxes of its connected parts). The median filters only need the
    neighbourhood of the patches (a median over zeros is zero), so they run on crops around these
    boxes, padded by the reach of both filters and merged until disjoint; the values equal those
    of whole-image filtering with replicated borders. ValueError for a ``label_mode`` not in LABEL_MODES.
    """
    check_label_mode(label_mode)
    if patch_mask.dtype != bool:  # a 0/255 mask would multiply the changes by 255
        patch_mask = np.asarray(patch_mask) != 0
    height, width = patch_mask.shape
    label = np.zeros((height, width, 1), dtype=np.float32)
    if patch_boxes is None:
        _, _, stats, _ = cv2.connectedComponentsWithStats(patch_mask.view(np.uint8), connectivity=8)
        patch_boxes = [(top, left, h, w) for left, top, w, h, _ in stats[1:]]
    reach = LABEL_MASK_KSIZE // 2 + INTENSITY_RADIUS
    for top, left, bottom, right in _merge_boxes(patch_boxes, reach):
        core = (slice(max(top, 0), min(bottom, height)), slice(max(left, 0), min(right, width)))
        crop = (slice(max(top - reach, 0), min(bottom + reach, height)),
                slice(max(left - reach, 0), min(right + reach, width)))
        inner = tuple(slice(c.start - p.start, c.stop - p.start) for c, p in zip(core, crop))
        label[core][..., 0] = _crop_label(dest[crop], image[crop], patch_mask[crop], inner, label_mode, tol,
                                          factor, intensity_logistic_params)
    return label


def _crop_label(dest, image, patch_mask, inner, label_mode, tol, factor, intensity_logistic_params):
    """Label values on ``inner`` (a pair of slices of the crop, at least ``INTENSITY_RADIUS`` +
    ``LABEL_MASK_KSIZE // 2`` pixels from the crop's edges unless those are image borders)."""
    channels = dest.shape[-1]
    abs_diff = cv2.absdiff(image, dest).reshape(image.shape)
    abs_sum = abs_diff[..., 0].astype(np.uint16)
    for channel in range(1, channels):
        abs_sum += abs_diff[..., channel]
    abs_sum *= patch_mask
    label_mask = cv2.medianBlur((abs_sum / channels > tol).astype(np.uint8), LABEL_MASK_KSIZE)
    label_mask &= abs_sum > 0
    inner_mask = label_mask[inner]
    if label_mode == 'binary':
        return inner_mask
    if label_mode == 'continuous':
        return inner_mask * np.float32(factor)
    value = np.zeros(inner_mask.shape, dtype=np.float32)
    rows, cols = np.flatnonzero(inner_mask.any(axis=1)), np.flatnonzero(inner_mask.any(axis=0))
    if rows.size == 0:
        return value
    # the median is only needed on the bounding box of the label mask; its windows reach r further
    r = INTENSITY_RADIUS
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    padded = cv2.copyMakeBorder(abs_sum * label_mask, r, r, r, r, cv2.BORDER_REPLICATE)
    window = tuple(slice(i.start + b.start, i.start + b.stop + 2 * r) for i, b in zip(inner, box))
    intensity = rank.median(padded[window], _INTENSITY_FOOTPRINT)[r:-r, r:-r] / channels
    if label_mode == 'intensity':
        value[box] = inner_mask[box] * intensity
    else:
        k, x0 = intensity_logistic_params
        with np.errstate(over='ignore'):  # exp overflows to inf far below x0: a label of 0, as it should be
            value[box] = np.minimum(inner_mask[box] / (1 + np.exp(-k * (intensity - x0))), _BELOW_ONE)
    return value


def _merge_boxes(boxes, gap):
    """Boxes ``(top, left, height, width)`` as ``(top, left, bottom, right)``, any two that are closer
    than ``2 * gap`` pixels replaced by their common bounding box until the boxes grown by ``gap``
    are disjoint."""
    merged = [(top, left, top + h, left + w) for top, left, h, w in boxes]
    while True:
        close = next(((a, b) for a, b in itertools.combinations(merged, 2)
                      if all(a[i] < b[i + 2] + 2 * gap and b[i] < a[i + 2] + 2 * gap for i in (0, 1))), None)
        if close is None:
            return merged
        a, b = close
        merged.remove(a)
        merged.remove(b)
        merged.append((min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])))


def inside_outer_ring(mask):
    """A copy of ``mask`` with its outer pixel ring zeroed: the part that seamlessClone uses."""
    mask = mask.copy()
    mask[[0, -1], :] = 0
    mask[:, [0, -1]] = 0
    return mask


def poisson_blend(dest, src, mask, mode):
    """Poisson-blend ``src`` into ``dest`` (same size ``h x w x C``) inside ``mask`` (uint8 ``h x w``)
    with cv2.seamlessClone so that every source pixel lands on the same position in ``dest``.

    seamlessClone centres the content of the mask's non-zero bounding box on the given point and
    only changes pixels inside that box; the centre is chosen so that the box maps onto itself.
    The outer pixel ring of ``mask`` is ignored (seamlessClone zeroes it; here too, before the box
    is measured, and a ValueError where nothing is left), and the non-zero box must be at least
    ``MIN_CLONE_SIDE`` pixels wide. Grayscale is replicated to three channels
    only for this crop. OpenCV 5.0 overwrites the mask it is given (eroded and inverted), so it
    gets a copy.
    """
    mask = inside_outer_ring(mask)  # as seamlessClone does, before the box is measured: it places the rest
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError('mask has no non-zero pixel inside its outer pixel ring, which seamlessClone ignores')
    center = (int(cols[0] + (cols[-1] + 1 - cols[0]) // 2), int(rows[0] + (rows[-1] + 1 - rows[0]) // 2))
    if dest.shape[-1] == 1:
        blended = cv2.seamlessClone(cv2.merge([src] * 3), cv2.merge([dest] * 3), mask, center, mode)
        return blended[..., :1]
    return cv2.seamlessClone(src, dest, mask, center, mode)


# ---------------------------------------------------------------------------------------------
# patch sampling

def _half_width_bounds_px(dims, width_bounds_pct):
    """Pixel bounds ``[(min, max) per axis]`` of the half-widths, at least MIN_PATCH_SIDE / 2."""
    min_half = MIN_PATCH_SIDE // 2
    bounds = []
    for size, (low, high) in zip(dims, width_bounds_pct):
        low_px = max(int(round(low * size)), min_half)
        high_px = min(max(int(round(high * size)), low_px), size // 2)
        bounds.append((min(low_px, high_px), high_px))
    return bounds


def largest_patch_sides(dims, params):
    """Per axis, the longest side that a patch of ``params`` (a PatchParams, not CutPaste's patch
    generation) can have on an image of ``dims``: a resized patch's sides are clipped to the
    half-width bounds (``_resize_patch``, the paper's behaviour), an unresized box spans at most
    twice its half-width."""
    bounds_px = _half_width_bounds_px(dims, params.width_bounds_pct)
    if params.resize:
        return [max(high, MIN_PATCH_SIDE) for _, high in bounds_px]
    return [2 * high for _, high in bounds_px]


def blends_too_small(dims, params):
    """A message (else None) where every patch that ``params`` (a PatchParams) draws on an image of
    ``dims`` is a seamless Poisson blend of a patch ``MIN_PATCH_SIDE`` pixels wide or high along some
    axis: such a blend changes no pixel by more than one grey level, so that with a ``tol`` of 1 or
    more nearly every sample is left normal, with an all-zero label (only overlapping patches add
    up to more, rarely). Small images with the default ``width_bounds_pct``: with ``resize``
    patches are at most as long as the largest half-width, 8 pixels at 40."""
    seamless = params.mode in POISSON_MODES + ('mix',) and not (params.paste_fraction
                                                                and params.paste_fraction[1] > 0)
    if not seamless or params.cutpaste_patch_generation or params.tol < 1:
        return None
    sides = largest_patch_sides(dims, params)
    if min(sides) > MIN_PATCH_SIDE:
        return None
    widest = replace(params, width_bounds_pct=tuple((low, 0.5) for low, _ in params.width_bounds_pct))
    remedies = (['larger width_bounds_pct'] if min(largest_patch_sides(dims, widest)) > MIN_PATCH_SIDE else []) + (
        ['resize=False'] if params.resize else []) + ['larger images, a paste_fraction or a mode that is not seamless']
    return (f'width_bounds_pct {params.width_bounds_pct} on images of {dims[0]} x {dims[1]} pixels'
            f'{" with resize" if params.resize else ""} give patches of at most {sides[0]} x {sides[1]} pixels, '
            f'and a seamless Poisson blend of a patch {MIN_PATCH_SIDE} pixels wide or high changes no pixel by '
            f'more than one grey level (tol {params.tol:g}): nearly every sample is left normal; give '
            f'{", ".join(remedies)}')


def _sample_half_widths(rng, dims, bounds_px, gamma_params):
    if gamma_params is None:
        return [int(rng.integers(low, high, endpoint=True)) for low, high in bounds_px]
    shape, scale, lower = gamma_params
    return [int(min(max((lower + rng.gamma(shape, scale)) * size, low), high))
            for size, (low, high) in zip(dims, bounds_px)]


def _ellipse_mask(rng, shape, num_ellipses, min_axes, max_axes):
    """Union of ``num_ellipses`` random ellipses (random centre in the patch, orientation, semi-axes)."""
    rows = np.arange(shape[0])[:, None]
    cols = np.arange(shape[1])[None, :]
    mask = np.zeros(shape, dtype=bool)
    for _ in range(num_ellipses):
        theta = rng.uniform(0, np.pi)
        center_row, center_col = rng.integers(shape[0]), rng.integers(shape[1])
        semi_a = rng.integers(min_axes[0], max_axes[0], endpoint=True)
        semi_b = rng.integers(min_axes[1], max_axes[1], endpoint=True)
        d_row, d_col = rows - center_row, cols - center_col
        u = d_row * np.cos(theta) + d_col * np.sin(theta)
        v = -d_row * np.sin(theta) + d_col * np.cos(theta)
        mask |= (u / semi_a) ** 2 + (v / semi_b) ** 2 <= 1
    return mask


def _bbox_sides(mask):
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return 0, 0
    return rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0]


def _sample_source_patch(rng, dims, bounds_px, gamma_params, num_ellipses, src_object, min_object_pct):
    """Random source rectangle ``(top, left, mask)``: centre uniform with at least the minimal half-width
    to the border, half-widths uniform or gamma-distributed, clipped to the image. None if no patch
    with enough object (``skip_background``) is found in MAX_TRIES attempts."""
    half_widths = _sample_half_widths(rng, dims, bounds_px, gamma_params)
    for _ in range(MAX_TRIES):
        box = []
        for size, (low, _), half in zip(dims, bounds_px, half_widths):
            center = int(rng.integers(low, max(size - low, low + 1)))
            box.append((max(center - half, 0), min(center + half, size)))
        (top, bottom), (left, right) = box
        shape = (bottom - top, right - left)
        if num_ellipses is None:
            mask = np.ones(shape, dtype=bool)
        else:
            min_axes = [low for low, _ in bounds_px]
            max_axes = [max(low + 1, half // 2) for (low, _), half in zip(bounds_px, half_widths)]
            mask = _ellipse_mask(rng, shape, num_ellipses, min_axes, max_axes)
            if min(_bbox_sides(mask)) < MIN_PATCH_SIDE:
                continue
        if src_object is not None:
            area = mask.sum()
            if (mask & src_object[top:bottom, left:right]).sum() <= min_object_pct * area:
                continue
        return top, left, mask
    return None


def _cutpaste_source_patch(rng, dims):
    """Source rectangle as in CutPaste: area ratio U(0.02, 0.15), aspect ratio (height / width) from
    U(0.3, 1) or U(1, 3.3) with equal probability, fully inside the image."""
    height, width = dims
    area = rng.uniform(*CUTPASTE_AREA_RATIO) * height * width
    aspect = rng.uniform(*CUTPASTE_ASPECT_RATIOS[rng.integers(2)])
    patch_h = min(max(round(np.sqrt(area * aspect)), MIN_PATCH_SIDE), height - 2)
    patch_w = min(max(round(area / patch_h), MIN_PATCH_SIDE), width - 2)
    top = int(rng.integers(0, height - patch_h, endpoint=True))
    left = int(rng.integers(0, width - patch_w, endpoint=True))
    return top, left, np.ones((patch_h, patch_w), dtype=bool)


def _random_start(rng, size, length):
    """Start of a segment of ``length`` inside ``size``, one pixel off the border where possible."""
    margin = 1 if size - length >= 2 else 0
    return int(rng.integers(margin, size - length - margin, endpoint=True))


def _overhanging_start(rng, size, length):
    """Start of a segment of ``length`` that may hang over either end of ``[0, size)``, keeping at
    least ``min(length, MIN_PATCH_SIDE)`` of it inside; every inner position is equally covered."""
    inside = min(length, MIN_PATCH_SIDE, size)
    return int(rng.integers(inside - length, size - inside, endpoint=True))


def _clip_to_image(top, left, arrays, image_shape):
    """Cut the patch arrays (``h x w ...``, placed at ``top, left``) to the image:
    ``(top, left, arrays)`` of the part inside ``image_shape``; None entries stay None."""
    height, width = next(a for a in arrays if a is not None).shape[:2]
    rows = slice(max(-top, 0), min(height, image_shape[0] - top))
    cols = slice(max(-left, 0), min(width, image_shape[1] - left))
    return top + rows.start, left + cols.start, [None if a is None else a[rows, cols] for a in arrays]


def _resize_patch(rng, patch, mask, src_object, bounds_px, resize_bounds):
    """Rescale the patch by N(1, 0.5) clipped to ``resize_bounds`` keeping the aspect ratio; the sides
    are clipped to the half-width pixel bounds (reference behaviour)."""
    height, width = mask.shape
    (low_h, high_h), (low_w, high_w) = [(max(low, MIN_PATCH_SIDE), max(high, MIN_PATCH_SIDE))
                                        for low, high in bounds_px]
    scale = min(max(rng.normal(1, 0.5), resize_bounds[0]), resize_bounds[1])
    new_h = min(max(scale * height, low_h), high_h)
    new_w = min(max(int(new_h / height * width), low_w), high_w)
    new_h = min(max(int(new_w / width * height), low_h), high_h)
    size = (new_w, new_h)
    patch = cv2.resize(patch, size, interpolation=cv2.INTER_LINEAR).reshape(new_h, new_w, -1)
    mask = cv2.resize(mask.view(np.uint8), size, interpolation=cv2.INTER_NEAREST).view(bool)
    if src_object is not None:
        src_object = cv2.resize(src_object.view(np.uint8), size, interpolation=cv2.INTER_NEAREST).view(bool)
    return patch, mask, src_object


def _place_patch(rng, image, ima_src, source, bounds_px, src_object, dest_object, mode, factor, params):
    """Blend the source patch into ``image`` (in place); return ``(top, left, mask)`` of the changed
    region in ``image``, or None if the patch could not be placed."""
    src_top, src_left, mask = source
    height, width = mask.shape
    patch = ima_src[src_top:src_top + height, src_left:src_left + width]
    patch_object = None if src_object is None else src_object[src_top:src_top + height, src_left:src_left + width]
    if params.resize:
        patch, mask, patch_object = _resize_patch(rng, patch, mask, patch_object, bounds_px, params.resize_bounds)
    position = _find_position(rng, image.shape[:2], source, patch, mask, patch_object, dest_object, params)
    if position is None:
        return None
    top, left, patch, mask, patch_object = position
    mask = _blend(rng, image, top, left, patch, mask, patch_object, dest_object, mode, factor, params)
    return None if mask is None else (top, left, mask)


def _find_position(rng, image_shape, source, patch, mask, patch_object, dest_object, params):
    """Where the (resized) patch goes in the image: ``(top, left, patch, mask, patch_object)``, the
    arrays cut to the image when ``params.clip_at_border`` lets the patch hang over its border;
    None when no position within ``MAX_TRIES`` attempts (``params.shift``; else the one position
    centred on the source) has enough object overlap (``_enough_object``)."""
    image_h, image_w = image_shape
    height, width = mask.shape
    whole = patch, mask, patch_object
    for _ in range(MAX_TRIES if params.shift else 1):
        if params.shift and params.clip_at_border:
            top, left = _overhanging_start(rng, image_h, height), _overhanging_start(rng, image_w, width)
            top, left, (patch, mask, patch_object) = _clip_to_image(top, left, whole, image_shape)
            if min(_bbox_sides(mask)) < MIN_PATCH_SIDE:  # an ellipse patch may leave little inside
                continue
        elif params.shift:
            top, left = _random_start(rng, image_h, height), _random_start(rng, image_w, width)
        else:  # centred on the source position
            src_top, src_left, src_mask = source
            top = min(max(src_top + (src_mask.shape[0] - height) // 2, 0), image_h - height)
            left = min(max(src_left + (src_mask.shape[1] - width) // 2, 0), image_w - width)
        if patch_object is None or _enough_object(top, left, mask, patch_object, dest_object, params):
            return top, left, patch, mask, patch_object
    return None


def _enough_object(top, left, mask, patch_object, dest_object, params):
    """Whether a patch at ``(top, left)`` is more than ``params.min_object_pct`` source object and
    more than ``params.min_overlap_pct`` of that object lands on the destination's object."""
    src_in_mask = patch_object & mask
    dest_region = dest_object[top:top + mask.shape[0], left:left + mask.shape[1]]
    return (src_in_mask.sum() > params.min_object_pct * mask.sum()
            and (src_in_mask & dest_region).sum() > params.min_overlap_pct * src_in_mask.sum())


def _blend(rng, image, top, left, patch, mask, patch_object, dest_object, mode, factor, params):
    """Blend ``patch`` into ``image`` at ``(top, left)`` inside ``mask`` (in place) with ``mode``
    ('swap', 'uniform' with ``factor``, or a Poisson mode, then mixed with the plain paste by
    ``params.paste_fraction``); with object masks only object pixels are labelled. Returns the
    patch's label region (the label marks the pixels in it that changed), or None when the Poisson
    mask is too thin to blend. A Poisson blend solves over the mask's whole box: it may also change pixels of
    the box outside the mask (outside an ellipse, background of both images; next to a bright object by
    over 100 grey levels), which stay unlabelled."""
    region = (slice(top, top + mask.shape[0]), slice(left, left + mask.shape[1]))
    clone_mask = mask
    if patch_object is not None:
        dest_region = dest_object[region]
        mask = mask & (patch_object | dest_region)
        clone_mask = mask | (~patch_object & ~dest_region)  # background in both: blend it too, against artefacts
    if mode == 'swap' and mask.all():
        image[region] = patch
    elif mode == 'swap':
        image[region][mask] = patch[mask]
    elif mode == 'uniform':
        dest_values = image[region][mask].astype(np.float64)
        image[region][mask] = np.floor((1 - factor) * dest_values + factor * patch[mask])
    else:
        clone_mask = inside_outer_ring(clone_mask.astype(np.uint8) * np.uint8(np.ceil(factor * 255)))
        if min(_bbox_sides(clone_mask)) < MIN_CLONE_SIDE:
            return None
        blended = poisson_blend(image[region], np.ascontiguousarray(patch), clone_mask, mode)
        if params.paste_fraction is not None:  # over the whole mask: the paste reaches the ring too
            blended = mix_with_paste(blended, patch, mask, rng.uniform(*params.paste_fraction))
        else:  # seamlessClone leaves the mask's outer ring unchanged
            mask = mask.copy()
            mask[[0, -1], :] = False
            mask[:, [0, -1]] = False
        image[region] = blended
    return mask


def mix_with_paste(blended, patch, mask, fraction):
    """``(1 - fraction) * blended + fraction * patch`` inside ``mask`` (bool ``h x w``), rounded to
    uint8; ``blended`` elsewhere. ``blended`` and ``patch`` are uint8 ``h x w x C``."""
    mixed = np.round((1 - fraction) * blended[mask].astype(np.float64) + fraction * patch[mask])
    out = blended.copy()
    out[mask] = mixed.astype(np.uint8)
    return out
