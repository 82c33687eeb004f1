"""Median milliseconds per synthetic-anomaly sample from patch_ex, one thread, 224 x 224 images.

Uses the paper's MVTec texture setting (``experiments.settings.KIND_DEFAULTS['texture']``: gamma
(2, 0.05, 0.03), resize bounds (0.5, 2), 4 patches, half-width bounds ((0.03, 0.4), (0.03, 0.4)),
logistic label (1/3, 7)) on scikit-image's bundled sample images.

    python bench/generation.py [--n N]
"""
import argparse
import time

import cv2
import numpy as np
import skimage.data

from experiments.settings import KIND_DEFAULTS
from self_sup_data.self_sup_tasks import patch_ex

SIZE = 224
TEXTURE_SETTING = {name: KIND_DEFAULTS['texture'][name] for name in (
    'gamma_params', 'resize_bounds', 'num_patches', 'width_bounds_pct', 'intensity_logistic_params')}
CASES = [(cv2.NORMAL_CLONE, 'NORMAL_CLONE', ('binary', 'logistic-intensity')),
         (cv2.MIXED_CLONE, 'MIXED_CLONE', ('binary', 'logistic-intensity')),
         ('mix', 'mix', ('binary', 'logistic-intensity')),
         ('swap', 'swap', ('binary', 'logistic-intensity')),
         ('uniform', 'uniform', ('binary', 'logistic-intensity', 'continuous'))]


def sample_images(channels):
    """Four 224 x 224 uint8 images with ``channels`` channels from scikit-image's bundled data."""
    if channels == 3:
        images = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    else:
        images = [skimage.data.brick(), skimage.data.grass(), skimage.data.gravel(), skimage.data.camera()]
    return [cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_AREA).reshape(SIZE, SIZE, channels)
            for image in images]


def median_ms(images, n, rng, **kwargs):
    times = []
    for i in range(n):
        dest, src = images[i % len(images)], images[(i + 1) % len(images)]
        start = time.perf_counter()
        patch_ex(dest, src, rng=rng, verbose=False, **kwargs)
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--n', type=int, default=200, help='samples per case (default 200)')
    args = parser.parse_args()
    if args.n < 1:
        parser.error(f'--n must be a positive integer, got {args.n}')
    cv2.setNumThreads(1)
    rng = np.random.default_rng(0)
    images = {channels: sample_images(channels) for channels in (3, 1)}

    print(f'patch_ex, {SIZE}x{SIZE}, MVTec texture setting, one thread, median ms/sample over {args.n} samples')
    print(f'{"mode":<14}{"label":<20}{"RGB":>8}{"gray":>8}')
    headline = None
    for mode, mode_name, label_modes in CASES:
        for label_mode in label_modes:
            ms = {c: median_ms(images[c], args.n, rng, mode=mode, label_mode=label_mode, **TEXTURE_SETTING)
                  for c in (3, 1)}
            print(f'{mode_name:<14}{label_mode:<20}{ms[3]:>8.2f}{ms[1]:>8.2f}')
            if mode == cv2.MIXED_CLONE and label_mode == 'logistic-intensity':
                headline = ms[3]
    per_core = 1e3 / headline
    print(f'\nMIXED_CLONE + logistic-intensity, RGB: {headline:.2f} ms/sample = {per_core:.0f} samples/s per core, '
          f'{16 * per_core:.0f} samples/s on 16 cores if it scales linearly')


if __name__ == '__main__':
    main()
