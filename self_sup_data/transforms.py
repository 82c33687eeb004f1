"""Geometric transforms on numpy images (and their label masks), and conversion to tensors.

A transform is a callable ``t(image, mask, rng) -> (image, mask)``:

- ``image``: ``uint8`` array ``H x W x C`` (C = 1 or 3),
- ``mask``: ``float32`` array ``H x W x 1``, or ``None`` (passed through as ``None``),
- ``rng``: a ``numpy.random.Generator``; every random draw comes from it, so a transform
  applied with generators in the same state gives the same result.

Image and mask always undergo the same geometric change (masks are resampled with nearest
neighbour so that their values stay in the set they came from).
"""
import math
import numbers

import cv2
import numpy as np
import torch

from self_sup_data.images import resize, with_channel_axis

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# For single-channel images: the mean of the three channel means and of the three stds.
GRAY_MEAN = (sum(IMAGENET_MEAN) / 3,)
GRAY_STD = (sum(IMAGENET_STD) / 3,)


def _positive_size(size, name):
    """``size`` as an int; ValueError naming the transform ``name`` unless it is a whole number
    (an int, or a float such as 64.0) of at least 1."""
    whole = (isinstance(size, numbers.Real) and not isinstance(size, bool) and math.isfinite(size)
             and size == int(size))
    if not whole or size < 1:
        raise ValueError(f"{name} size must be at least 1 pixel, a whole number, got {size!r}")
    return int(size)


def _check_side(size, image, name):
    height, width = image.shape[:2]
    if size > height or size > width:
        raise ValueError(f"{name}({size}) needs an image at least {size}x{size}, got {height}x{width}")


def _crop(image, mask, top, left, size):
    window = (slice(top, top + size), slice(left, left + size))
    return (np.ascontiguousarray(image[window]),
            None if mask is None else np.ascontiguousarray(mask[window]))


class Compose:
    """Apply transforms in order, all drawing from the same generator."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, mask, rng):
        for transform in self.transforms:
            image, mask = transform(image, mask, rng)
        return image, mask

    def __repr__(self):
        return f"Compose({self.transforms!r})"


class Resize:
    """Resize to ``size x size`` (image: area/bilinear, mask: nearest neighbour at the centre of
    each output pixel, so that it stays on the image; see ``images.resize_mask``)."""

    def __init__(self, size):
        self.size = _positive_size(size, "Resize")

    def __call__(self, image, mask, rng):
        image = resize(image, self.size)
        if mask is not None:
            mask = resize(mask, self.size, cv2.INTER_NEAREST_EXACT)
        return image, mask

    def __repr__(self):
        return f"Resize({self.size})"


class RandomRotation:
    """Rotate about the centre by an angle drawn uniformly from [-max_degrees, max_degrees].

    Borders are filled by reflection. The recipes follow a rotation with a centre crop that
    removes the corners (a 5 degree turn of a 256 image keeps a 236 square intact).
    """

    def __init__(self, max_degrees):
        self.max_degrees = float(max_degrees)
        if not 0 <= self.max_degrees < math.inf:
            raise ValueError(f"RandomRotation max_degrees must be a finite angle of 0 or more, got {max_degrees!r}")

    def __call__(self, image, mask, rng):
        angle = rng.uniform(-self.max_degrees, self.max_degrees)
        height, width = image.shape[:2]
        matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), angle, 1.0)

        def warp(array, interpolation):
            out = cv2.warpAffine(array, matrix, (width, height), flags=interpolation,
                                 borderMode=cv2.BORDER_REFLECT_101)
            return with_channel_axis(out, array.shape[2])

        image = warp(image, cv2.INTER_LINEAR)
        if mask is not None:
            mask = warp(mask, cv2.INTER_NEAREST)
        return image, mask

    def __repr__(self):
        return f"RandomRotation({self.max_degrees:g})"


class CenterCrop:
    """Crop the central ``size x size`` square."""

    def __init__(self, size):
        self.size = _positive_size(size, "CenterCrop")

    def __call__(self, image, mask, rng):
        _check_side(self.size, image, "CenterCrop")
        top = (image.shape[0] - self.size) // 2
        left = (image.shape[1] - self.size) // 2
        return _crop(image, mask, top, left, self.size)

    def __repr__(self):
        return f"CenterCrop({self.size})"


class RandomCrop:
    """Crop a ``size x size`` square at a uniformly drawn position."""

    def __init__(self, size):
        self.size = _positive_size(size, "RandomCrop")

    def __call__(self, image, mask, rng):
        _check_side(self.size, image, "RandomCrop")
        top = rng.integers(0, image.shape[0] - self.size + 1)
        left = rng.integers(0, image.shape[1] - self.size + 1)
        return _crop(image, mask, top, left, self.size)

    def __repr__(self):
        return f"RandomCrop({self.size})"


class RandomVerticalFlip:
    """Flip upside down with probability ``p``."""

    def __init__(self, p=0.5):
        self.p = float(p)
        if not 0 <= self.p <= 1:
            raise ValueError(f"RandomVerticalFlip p must be a probability in [0, 1], got {p!r}")

    def __call__(self, image, mask, rng):
        if rng.random() < self.p:
            image = np.ascontiguousarray(image[::-1])
            mask = None if mask is None else np.ascontiguousarray(mask[::-1])
        return image, mask

    def __repr__(self):
        return f"RandomVerticalFlip(p={self.p:g})"


def normalization(channels):
    """(mean, std) per channel of the normalisation of ``channels``-channel images (1 or 3)."""
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    if channels == 1:
        return GRAY_MEAN, GRAY_STD
    raise ValueError(f"expected 1 or 3 channels, got {channels}")


def to_image_tensor(image):
    """uint8 ``H x W x C`` -> float32 tensor ``C x H x W`` holding ``(x / 255 - mean) / std``.

    mean/std: ImageNet's for RGB; for one channel the mean of ImageNet's three means and stds.
    """
    return normalize_images(to_uint8_tensor(image))


def to_uint8_tensor(image):
    """uint8 ``H x W x C`` -> uint8 tensor ``C x H x W`` (a quarter of the float32 bytes to send
    between processes; ``normalize_images`` makes it what ``to_image_tensor`` gives)."""
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"expected a uint8 H x W x C image, got {image.dtype} of shape {image.shape}")
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def normalize_images(images):
    """uint8 tensor ``... x C x H x W`` -> float32 ``(x / 255 - mean) / std`` on its device (the
    normalisation of ``to_image_tensor``)."""
    mean, std = normalization(images.shape[-3])
    x = images.float().div_(255)
    mean = torch.tensor(mean, dtype=torch.float32, device=x.device)[:, None, None]
    std = torch.tensor(std, dtype=torch.float32, device=x.device)[:, None, None]
    return (x - mean) / std


def to_label_tensor(label):
    """float ``H x W x 1`` label (or mask) -> float32 tensor ``1 x H x W``."""
    if label.ndim != 3 or label.shape[2] != 1:
        raise ValueError(f"expected an H x W x 1 label, got shape {label.shape}")
    return torch.from_numpy(np.ascontiguousarray(label.transpose(2, 0, 1), dtype=np.float32))


def denormalize(tensor):
    """Inverse of :func:`to_image_tensor`: tensor ``C x H x W`` -> uint8 ``H x W x C`` (for figures)."""
    x = tensor.detach().cpu().float()
    mean, std = normalization(x.shape[0])
    x = x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    x = (x * 255).round().clamp(0, 255).to(torch.uint8)
    return x.permute(1, 2, 0).numpy()
