"""A validation set without real defects: held-out normal images with other kinds of anomaly.

Without defect labels, training choices (which checkpoint, which recipe) need a score that does
not look at a test image. A fixed fraction of the normal training images is held out
(``holdout_indices``, by seed) and not trained on. Each held-out image enters the validation set
twice: as it is (normal) and with one synthetic defect of a kind that no training task of this
project draws (``VALIDATION_KINDS``, taken in turn):

    scar    a thin strip of the image, colour-jittered, rotated and pasted elsewhere (CutPaste-scar;
            its rim is darkened by the rotation, see ``self_sup_tasks._rotated``)
    blob    a smooth elliptic region brightened or darkened (its smooth edge too)
    blur    an elliptic region replaced by a Gaussian-blurred copy of itself
    noise   Gaussian noise added inside an elliptic region
    line    a thin dark or bright polyline (crack-like)

A defect lies anywhere in a texture, inside the central crop that an object category's models
score, and for a category with a background (``self_sup_tasks.object_mask``) on the object only:
centred on an object pixel, its changes to the background undone, as real defects lie on the
object. Their strength is relative to the image's own contrast (the standard deviation of its grey
levels, over the object where there is one, at least ``MIN_CONTRAST``: not the spread between
colour channels or between object and background), so that the set is about as hard on a faint
material as on a contrasted one. A defect's mask holds exactly the pixels it changed by at least
``MIN_CHANGE`` grey levels (a blob's smooth edge, beyond its ellipse, among them); a defect that
changes fewer pixels than ``min_defect_pixels`` asks (``MIN_DEFECT_PIXELS`` at 128 x 128, in
proportion to the area) is drawn again. ``VALIDATION_VERSION`` numbers the set's definition:
scores on sets of different versions do not compare.
The held-out images and their defects come from two generators seeded by the validation seed
(``--val-seed``, not the run's seed): the set is made once and is the same for every model of a
category, whatever its setting, recipe or seed, so that their scores compare. It knows nothing of
torch.
"""
import cv2
import numpy as np

from self_sup_data.images import central_box
from self_sup_data.self_sup_tasks import check_image, cutpaste_scar, object_mask

VALIDATION_KINDS = ('scar', 'blob', 'blur', 'noise', 'line')
VALIDATION_VERSION = 2  # 2: a blob's mask covers its smooth edge (1: its ellipse only)
HOLDOUT_STREAM = 0x7A11   # separates the holdout draw from other uses of the run's seed
DEFECT_STREAM = 0xDEF3
MIN_VALIDATION_IMAGES = 10  # fewer training images: no validation set
MIN_CHANGE = 2
MIN_DEFECT_PIXELS = 8  # at REFERENCE_AREA pixels; in proportion to the area elsewhere
REFERENCE_AREA = 128 * 128
MIN_CONTRAST = 8.0
MAX_DRAWS = 20


class NoObjectPixelError(ValueError):
    """A held-out image in which the category's background leaves no object pixel to draw a
    defect on."""


def holdout_indices(num_images, fraction, seed):
    """Sorted indices of the ``round(fraction * num_images)`` (at least one) held-out images, drawn
    by ``seed``; empty when ``fraction`` is 0 or there are fewer than MIN_VALIDATION_IMAGES."""
    if not 0 <= fraction < 1:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction!r}")
    if fraction == 0 or num_images < MIN_VALIDATION_IMAGES:
        return np.array([], dtype=int)
    count = min(max(1, round(fraction * num_images)), num_images - 1)
    rng = np.random.default_rng(np.random.SeedSequence([seed, HOLDOUT_STREAM]))
    return np.sort(rng.permutation(num_images)[:count])


def _contrast(image, on=None):
    """The standard deviation of the grey levels (channel means) of ``image``, over the pixels
    ``on`` where given (an object's), at least MIN_CONTRAST."""
    grey = image.mean(axis=-1)
    return max(float((grey if on is None else grey[on]).std()), MIN_CONTRAST)


def _centre(rng, shape, anchors):
    """A random pixel ``(x, y)`` of an image of ``shape``: one of ``anchors`` (``N x 2`` array of
    (row, col)), or anywhere for None."""
    if anchors is None:
        return int(rng.integers(0, shape[1])), int(rng.integers(0, shape[0]))
    row, col = anchors[rng.integers(len(anchors))]
    return int(col), int(row)


def _ellipse(rng, shape, axes_range, anchors):
    """Bool mask of a random filled ellipse with semi-axes in ``axes_range`` (fractions of the side),
    centred on a random pixel (one of ``anchors`` where given, see ``_centre``)."""
    height, width = shape
    side = min(height, width)
    axes = [max(2, int(rng.uniform(*axes_range) * side)) for _ in range(2)]
    center = _centre(rng, shape, anchors)
    region = np.zeros(shape, np.uint8)
    cv2.ellipse(region, center, tuple(axes), float(rng.uniform(0, 180)), 0, 360, 1, thickness=-1)
    return region.astype(bool)


def _add(image, delta):
    """``image + delta`` (delta float ``H x W`` or ``H x W x C``) rounded and clipped to uint8."""
    delta = delta if delta.ndim == 3 else delta[..., None]
    return np.clip(np.round(image.astype(np.float32) + delta), 0, 255).astype(np.uint8)


def _scar(image, rng, anchors, contrast):
    centre = None if anchors is None else _centre(rng, image.shape[:2], anchors)
    return cutpaste_scar(image, rng, centre=centre)


def _blob(image, rng, anchors, contrast):
    ellipse = _ellipse(rng, image.shape[:2], (0.04, 0.15), anchors)
    sigma = max(1.0, 0.15 * np.sqrt(ellipse.sum()))
    profile = cv2.GaussianBlur(ellipse.astype(np.float32), (0, 0), sigma)
    amplitude = rng.uniform(0.5, 1.5) * contrast * rng.choice((-1, 1))
    return _add(image, amplitude * profile), profile > 0  # the blurred edge changes pixels too


def _blur(image, rng, anchors, contrast):
    region = _ellipse(rng, image.shape[:2], (0.05, 0.15), anchors)
    sigma = rng.uniform(1.0, 2.5) * min(image.shape[:2]) / 128
    blurred = cv2.GaussianBlur(image, (0, 0), sigma).reshape(image.shape)
    out = image.copy()
    out[region] = blurred[region]
    return out, region


def _noise(image, rng, anchors, contrast):
    region = _ellipse(rng, image.shape[:2], (0.04, 0.12), anchors)
    noise = rng.normal(0, rng.uniform(0.3, 0.8) * contrast, image.shape).astype(np.float32)
    return _add(image, noise * region[..., None]), region


def _line(image, rng, anchors, contrast):
    height, width = image.shape[:2]
    side = min(height, width)
    points = [rng.uniform((0, 0), (width, height)) if anchors is None
              else np.array(_centre(rng, (height, width), anchors), float)]
    for _ in range(int(rng.integers(2, 5))):
        angle = rng.uniform(0, 2 * np.pi)
        step = rng.uniform(0.05, 0.15) * side
        points.append(points[-1] + step * np.array([np.cos(angle), np.sin(angle)]))
    region = np.zeros((height, width), np.uint8)
    thickness = max(1, round(rng.uniform(1, 2) * side / 128))
    cv2.polylines(region, [np.round(points).astype(np.int32)], False, 1, thickness=thickness)
    region = region.astype(bool)
    delta = rng.uniform(0.7, 1.5) * contrast * rng.choice((-1, 1))
    return _add(image, delta * region), region


DEFECTS = dict(scar=_scar, blob=_blob, blur=_blur, noise=_noise, line=_line)


def min_defect_pixels(shape):
    """Fewest changed pixels of a defect on an image of ``shape``: MIN_DEFECT_PIXELS at
    REFERENCE_AREA, in proportion to the area, at least one."""
    return max(1, round(MIN_DEFECT_PIXELS * shape[0] * shape[1] / REFERENCE_AREA))


class DefectNotShownError(ValueError):
    """No draw of a validation defect changes enough pixels of an image (``synthetic_defect``)."""


def synthetic_defect(image, kind, rng, on=None):
    """``image`` (uint8 ``H x W x C``) with one defect of ``kind`` -> (image, mask bool ``H x W``).

    ``on``: None (the defect may lie anywhere) or a bool ``H x W`` mask of the pixels it may change
    (an object, see ``self_sup_tasks.object_mask``): the defect is centred on one of them and its
    changes elsewhere are undone.
    The mask is the drawn region (for a blob, its smooth profile's whole support) where the image
    changed by at least MIN_CHANGE grey levels (mean over channels), which holds every pixel so
    changed; the defect is drawn again (up to MAX_DRAWS times) while it has fewer than
    ``min_defect_pixels(image.shape)`` pixels. DefectNotShownError when no draw changes enough pixels
    (a blank image, a tiny object, or a blur on a smooth one), ValueError when ``on`` holds no pixel.
    """
    if kind not in DEFECTS:
        raise ValueError(f"unknown validation defect kind {kind!r}; valid: {VALIDATION_KINDS}")
    check_image(image, 'image')
    if on is not None and (not isinstance(on, np.ndarray) or on.dtype != bool or on.shape != image.shape[:2]):
        shape = f'{on.dtype} array of shape {on.shape}' if isinstance(on, np.ndarray) else type(on).__name__
        raise ValueError(f"on must be None or a bool array of the image's height and width {image.shape[:2]}, "
                         f"got {shape}")
    anchors = None if on is None else np.argwhere(on)
    if anchors is not None and not len(anchors):
        raise ValueError("no object pixel to draw a defect on")
    contrast = _contrast(image, on)
    for _ in range(MAX_DRAWS):
        out, region = DEFECTS[kind](image, rng, anchors, contrast)
        if on is not None:
            out, region = np.where(on[..., None], out, image), region & on
        change = np.abs(out.astype(np.float32) - image).mean(axis=-1)
        mask = region & (change >= MIN_CHANGE)
        if mask.sum() >= min_defect_pixels(image.shape):
            return out, mask
    where = 'image' if on is None else 'object'
    raise DefectNotShownError(f"a {kind} defect changes fewer than {min_defect_pixels(image.shape)} pixels of "
                              f"this {image.shape[1]}x{image.shape[0]} {where} in {MAX_DRAWS} draws")


def make_validation_set(images, seed, kinds=VALIDATION_KINDS, names=None, crop=None, background=None):
    """Validation items from held-out normal ``images`` (uint8 ``H x W x C``, as test images are
    prepared): each image as it is and with a defect of ``kinds[i % len(kinds)]``, or where that kind
    cannot show on the image (``DefectNotShownError``: a blur on a smooth material), of the next kind
    in turn that can. ``names``: the images' files, named by the ValueError of an image on which no
    defect can be drawn.
    ``crop``: the side of the central square that an object category's model scores
    (``central_box``): defects are drawn inside it (None, textures: anywhere).
    ``background``: None or the category's background (``self_sup_tasks.object_mask``'s
    ``skip_background``): defects are drawn on the object only, where real ones lie.

    Returns (images, labels, masks, defect_types): the normal images first, then the defective
    ones; labels 0/1; masks uint8 ``H x W`` in {0, 1}; defect_types 'good' or the kind.
    """
    kinds = tuple(kinds)
    unknown = [kind for kind in kinds if kind not in DEFECTS]
    if not kinds or unknown:
        raise ValueError(f"validation kinds must be a non-empty subset of {VALIDATION_KINDS}, "
                         f"got {kinds}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, DEFECT_STREAM]))
    defective, masks, types = [], [], []
    for index, image in enumerate(images):
        box = central_box(image.shape, crop)
        part = np.ascontiguousarray(image[box])
        on = None if background is None else object_mask(part, background)
        name = f'{names[index]}' if names is not None else f'image {index}'
        if on is not None and not on.any():
            raise NoObjectPixelError(f"held-out validation image {name}: background {background!r} leaves "
                                     f"no object pixel in the part of it that models score; check the "
                                     f"background or choose other held-out images (--val-seed)")
        errors = []
        for turn in range(len(kinds)):
            kind = kinds[(index + turn) % len(kinds)]
            try:
                part, part_mask = synthetic_defect(part, kind, rng, on)
                break
            except DefectNotShownError as error:
                errors.append(str(error))
            except ValueError as error:  # an image that no defect takes (its size, its type)
                raise ValueError(f"held-out validation image {name}: {error}") from error
        else:
            raise DefectNotShownError(
                f"held-out validation image {name}: no validation defect shows on it ({'; '.join(errors)}; "
                f"is it blank?); hold out other images (--val-seed), or train without a validation set "
                f"(--val-fraction 0, with --recipe auto or table and --select last)")
        out, mask = image.copy(), np.zeros(image.shape[:2], np.uint8)
        out[box], mask[box] = part, part_mask
        defective.append(out)
        masks.append(mask)
        types.append(kind)
    zeros = [np.zeros(image.shape[:2], np.uint8) for image in images]
    return (list(images) + defective, [0] * len(images) + [1] * len(images), zeros + masks,
            ['good'] * len(images) + types)
