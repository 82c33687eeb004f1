"""Timing of the pixel metrics on a test-set-sized input: 600 anomaly maps of 256 x 256 with blob
masks (about 70% defect images, as in MVTec AD). Run from the repository root:

    python bench/metrics.py [--num-maps 600] [--size 256] [--repeats 3]
"""
import argparse
import time

import numpy as np
from scipy import ndimage

from experiments.metrics import au_pro, pixel_ap, pixel_auroc


def blob_masks_and_maps(num_maps, size, rng):
    """Binary masks of smoothed-noise blobs and float32 maps that are noisy, blurred and higher
    inside the blobs."""
    defective = rng.random(num_maps) < 0.7
    noise = ndimage.gaussian_filter(rng.standard_normal((num_maps, size, size)), sigma=(0, 6, 6))
    masks = (noise > 1.8 * noise.std()) & defective[:, None, None]
    maps = ndimage.gaussian_filter(masks + 1.0 * rng.standard_normal(masks.shape), sigma=(0, 2, 2))
    return masks, maps.astype(np.float32)


def best_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return min(times), value


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--num-maps', type=int, default=600)
    parser.add_argument('--size', type=int, default=256)
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()
    for name, value, least in (('--num-maps', args.num_maps, 2), ('--size', args.size, 16),
                               ('--repeats', args.repeats, 1)):
        if value < least:
            parser.error(f'{name} must be at least {least}, got {value}')

    masks, maps = blob_masks_and_maps(args.num_maps, args.size, np.random.default_rng(0))
    num_regions = ndimage.label(masks, structure=np.pad(np.ones((1, 3, 3)), ((1, 1), (0, 0), (0, 0))))[1]
    print(f'{args.num_maps} maps of {args.size}x{args.size} (float32), '
          f'{masks.any(axis=(1, 2)).sum()} defect images, {num_regions} regions, '
          f'{masks.mean():.2%} defect pixels; best of {args.repeats}')
    for name, metric in (('au_pro', au_pro), ('pixel_auroc', pixel_auroc), ('pixel_ap', pixel_ap)):
        seconds, value = best_time(lambda: metric(masks, maps), args.repeats)
        print(f'{name:12s} {seconds:6.2f} s   value {value:.4f}')


if __name__ == '__main__':
    main()
