"""Shared fixtures: tiny categories in the MVTec AD folder layout, written into tmp dirs."""
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image


def _smooth_texture(rng, size, channels):
    """A random, smooth uint8 image (each channel different for RGB)."""
    noise = rng.random((size // 4, size // 4, channels)).astype(np.float32)
    image = cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC).reshape(size, size, channels)
    return np.clip(40 + 170 * image, 0, 255).astype(np.uint8)


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[:, :, 0] if array.ndim == 3 and array.shape[2] == 1 else array).save(path)


def make_mvtec_category(root, name, n_train=6, n_test_good=3, defects=None, size=64, channels=1,
                        with_masks=True, seed=0):
    """Write ``root/name`` in MVTec AD layout and return its path.

    Normal images are smooth random textures (``channels`` 1: grayscale PNG, 3: RGB PNG).
    Each defect image has a bright square (random position, side size/4); with ``with_masks``
    its mask ``ground_truth/<defect>/<NNN>_mask.png`` (0/255) marks exactly that square.
    ``defects``: {defect type: number of images}, default {'crack': 3}.
    """
    defects = {'crack': 3} if defects is None else defects
    rng = np.random.default_rng(seed)
    category = Path(root) / name
    for i in range(n_train):
        _save(category / 'train' / 'good' / f'{i:03d}.png', _smooth_texture(rng, size, channels))
    for i in range(n_test_good):
        _save(category / 'test' / 'good' / f'{i:03d}.png', _smooth_texture(rng, size, channels))
    side = size // 4
    for defect, count in defects.items():
        for i in range(count):
            image = _smooth_texture(rng, size, channels)
            top, left = rng.integers(0, size - side, 2)
            image[top:top + side, left:left + side] = 250
            mask = np.zeros((size, size), np.uint8)
            mask[top:top + side, left:left + side] = 255
            _save(category / 'test' / defect / f'{i:03d}.png', image)
            if with_masks:
                _save(category / 'ground_truth' / defect / f'{i:03d}_mask.png', mask)
    return category


@pytest.fixture
def tiny_mvtec(tmp_path):
    """(root, name) of a tiny grayscale category: 6 train, 3 test good, 3 'crack' with masks, 64 px."""
    make_mvtec_category(tmp_path, 'tiny')
    return tmp_path, 'tiny'
