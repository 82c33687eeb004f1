"""Anomaly maps of MVTec AD 2's private test sets, in the folders its evaluation server takes.

MVTec AD 2 publishes no ground truth for ``test_private`` and ``test_private_mixed``; its server
scores uploaded maps. Layout written here (as MVTec's public submission checker reads it: float16
single-channel TIFFs read with ``tifffile``, 0/255 single-channel PNGs; check it against the
current instructions before uploading)::

    OUT/anomaly_images/<category>/<split>/<image stem>.tiff              float16 map, image size
    OUT/anomaly_images_thresholded/<category>/<split>/<image stem>.png   0/255 uint8 segmentation

Each map is resized (bilinear) to its image's size; the binary map is ``map > threshold`` at the
model's resolution, where thresholds are calibrated (``experiments.thresholds``), resized by nearest
neighbour (``inference.mask_to_image_size``; the resized map is smoother, and fewer of its pixels
lie above the threshold than it was calibrated to flag). The split, the images (those of
``<category>/<split>/``, each name once: a file per name), the maps (one array, finite and within
float16's range) and the threshold (a finite number) are checked and every image's size is read
before anything is written, so that bad input or an unreadable image leaves an earlier submission
as it was; each file is written atomically (``experiments.atomic``).
"""
import io
import math
from collections import Counter
from numbers import Real
from pathlib import Path

import cv2
import numpy as np
import tifffile
from PIL import Image

from experiments.atomic import write_atomic
from experiments.inference import mask_to_image_size
from self_sup_data.images import displayed_file_size
from self_sup_data.layouts import AD2_PRIVATE_SPLITS


def _save_atomic(image, path, format):
    write_atomic(path, lambda f: image.save(f, format=format))


def _save_tiff_atomic(array, path):
    buffer = io.BytesIO()  # tifffile seeks in what it writes: a buffer, then the file at once
    tifffile.imwrite(buffer, array)
    write_atomic(path, lambda f: f.write(buffer.getvalue()))


def write_ad2_maps(out_dir, category, split, image_paths, maps, threshold):
    """Write the maps (N x H x W floats at the model's resolution, ``Detector.maps``) of
    ``image_paths`` (the images of ``<category>/<split>/``) and their thresholded masks; returns
    the paths written, (tiff, png) per image."""
    if split not in AD2_PRIVATE_SPLITS:
        raise ValueError(f"split must be one of {AD2_PRIVATE_SPLITS}, got {split!r}")
    if not isinstance(threshold, Real) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r} (calibrate the model's "
                         "thresholds first: python -m experiments.thresholds)")
    paths = [Path(path) for path in image_paths]
    for path in paths:  # the server files a map by category, split and name alone
        if (path.parent.parent.name, path.parent.name) != (category, split):
            raise ValueError(f"{path} is not an image of {category}/{split}, the maps being written")
    repeated = sorted(stem for stem, count in Counter(path.stem for path in paths).items() if count > 1)
    if repeated:
        raise ValueError(f"images of {category}/{split} share the names {repeated[:3]}; each name is "
                         f"one map file")
    try:
        maps = np.asarray(maps, dtype=np.float32)
    except ValueError:  # a list of maps of different shapes
        raise ValueError(f"maps must be one N x H x W array (Detector.maps: the model's resolution), got "
                         f"maps of shapes {[np.shape(score) for score in maps][:3]} ...") from None
    if maps.ndim != 3 or len(maps) != len(paths):
        raise ValueError(f"maps must be N x H x W with N = {len(paths)} images, got {maps.shape}")
    half_max = float(np.finfo(np.float16).max)  # resizing keeps a map within its range
    for path, score in zip(paths, maps):
        if not np.isfinite(score).all():
            raise ValueError(f"the map of {path} holds NaN or infinite values")
        if np.abs(score).max() > half_max:
            raise ValueError(f"the map of {path} reaches {np.abs(score).max():g}, beyond the float16 "
                             f"TIFF's range ({half_max:g}); rescale the maps")
    sizes = [displayed_file_size(path) for path in paths]  # every image readable before a file is written
    written = []
    for path, size, score in zip(paths, sizes, maps):
        full = cv2.resize(score, size, interpolation=cv2.INTER_LINEAR)
        mask = mask_to_image_size(score > threshold, size[::-1])
        tiff = Path(out_dir) / 'anomaly_images' / category / split / f'{path.stem}.tiff'
        png = Path(out_dir) / 'anomaly_images_thresholded' / category / split / f'{path.stem}.png'
        _save_tiff_atomic(full.astype(np.float16), tiff)
        _save_atomic(Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)), png, 'PNG')
        written.append((tiff, png))
    return written
