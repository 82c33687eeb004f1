"""The built-in demo dataset: one small texture category in MVTec AD layout, made on the fly.

The material is the brick-wall photograph that ships inside scikit-image
(``skimage.data.brick()``, 512 x 512 grayscale; read from the installed package, no download);
``texture='grass'`` or ``'gravel'`` takes the other two textures shipped with it instead (category
``demo_grass`` or ``demo_gravel``: more materials to try a recipe on). Normal images are random
128 x 128 crops: training crops come from the left 320 columns of the photograph and test crops
from the right 192 columns, so no test pixel was seen in training.

Test defects are drawn on test crops and are deliberately unlike NSA's blended patches:

- ``scratch``: thin dark or bright polylines (1-2 px, ``cv2.polylines``),
- ``hole``:    filled dark or bright ellipses (spots, holes),
- ``stain``:   a smooth, low-contrast blob that brightens or darkens the surface,
- ``blur``:    an elliptic region replaced by a Gaussian-blurred copy of itself.

Masks are exact: a pixel is 1 where it was changed by at least ``MIN_CHANGE`` grey levels inside
the drawn region; every other pixel keeps its original value. Everything is drawn from one
``numpy`` generator, so a seed gives byte-identical files.

    python -m self_sup_data.demo OUT_DIR [--seed S] [--texture grass|gravel]
"""
import argparse
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import cv2
import numpy as np
import skimage.data

from self_sup_data.folders import folder_being_built

DEMO_CATEGORY = "demo_texture"
TEXTURES = ("brick", "grass", "gravel")  # 512 x 512 grayscale photographs in skimage.data
DEFECT_KINDS = ("scratch", "hole", "stain", "blur")
IMAGE_SIZE = 128
N_TRAIN, N_TEST_GOOD, N_PER_DEFECT = 60, 20, 10
TRAIN_COLUMNS = slice(0, 320)   # of the 512-column photograph
TEST_COLUMNS = slice(320, 512)
MIN_CHANGE = 3         # grey levels: smaller changes are undone and not marked
MIN_DEFECT_PIXELS = 15  # a defect that changes fewer pixels is drawn again
INFO_FILE = "demo_info.json"
FORMAT_VERSION = 1


def _random_crop(texture, rng):
    top = rng.integers(0, texture.shape[0] - IMAGE_SIZE + 1)
    left = rng.integers(0, texture.shape[1] - IMAGE_SIZE + 1)
    return texture[top:top + IMAGE_SIZE, left:left + IMAGE_SIZE].copy()


def _dark_or_bright(rng):
    return rng.uniform(5, 40) if rng.random() < 0.5 else rng.uniform(200, 245)


def _ellipse_region(rng, axes_range, margin):
    region = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    center = tuple(int(c) for c in rng.integers(margin, IMAGE_SIZE - margin, 2))
    axes = tuple(int(a) for a in rng.integers(*axes_range, 2))
    cv2.ellipse(region, center, axes, float(rng.uniform(0, 180)), 0, 360, 1, thickness=-1)
    return region.astype(bool)


def _scratch(image, rng):
    """1-3 thin polylines blended towards a dark or bright value."""
    region = np.zeros(image.shape, np.uint8)
    for _ in range(rng.integers(1, 4)):
        points = [rng.uniform(16, IMAGE_SIZE - 16, 2)]
        angle = rng.uniform(0, 2 * np.pi)
        for _ in range(rng.integers(1, 3)):
            angle += rng.normal(0, 0.4)
            points.append(points[-1] + rng.uniform(15, 40) * np.array([np.cos(angle), np.sin(angle)]))
        polyline = np.round(points).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(region, [polyline], False, 1, thickness=int(rng.integers(1, 3)))
    alpha = rng.uniform(0.6, 0.9)
    return (1 - alpha) * image + alpha * _dark_or_bright(rng), region.astype(bool)


def _hole(image, rng):
    """1-3 filled ellipses of a dark or bright, slightly noisy value."""
    region = np.zeros(image.shape, bool)
    for _ in range(rng.integers(1, 4)):
        region |= _ellipse_region(rng, (3, 10), margin=10)
    value = _dark_or_bright(rng) + rng.normal(0, 3, image.shape)
    return value, region


def _stain(image, rng):
    """A smooth blob: intensity offset of 15-35 grey levels fading out over its border."""
    blob = _ellipse_region(rng, (10, 26), margin=20).astype(np.float32)
    profile = cv2.GaussianBlur(blob, (0, 0), sigmaX=rng.uniform(3, 6))
    amplitude = rng.uniform(15, 35) * rng.choice([-1, 1])
    return image + amplitude * profile, profile > 0


def _blur(image, rng):
    """An elliptic region replaced by a strongly Gaussian-blurred copy of the image."""
    blurred = cv2.GaussianBlur(image.astype(np.float32), (0, 0), sigmaX=rng.uniform(3, 5))
    return blurred, _ellipse_region(rng, (12, 26), margin=24)


DEFECTS = {"scratch": _scratch, "hole": _hole, "stain": _stain, "blur": _blur}


def add_defect(image, kind, rng):
    """Draw a defect of ``kind`` on a uint8 H x W image -> (defective image, bool mask).

    mask = drawn region AND |change| >= MIN_CHANGE; pixels outside it keep their value.
    """
    while True:
        candidate, region = DEFECTS[kind](image.astype(np.float32), rng)
        candidate = np.clip(np.round(candidate), 0, 255).astype(np.uint8)
        mask = region & (np.abs(candidate.astype(np.int16) - image) >= MIN_CHANGE)
        if mask.sum() >= MIN_DEFECT_PIXELS:
            return np.where(mask, candidate, image), mask


def _write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), array):
        raise OSError(f"could not write {path}")


def category_name(texture="brick"):
    """The demo category of ``texture``: demo_texture for the brick (the quick start's), else
    demo_<texture>."""
    if texture not in TEXTURES:
        raise ValueError(f"unknown demo texture {texture!r}; choose one of {', '.join(TEXTURES)}")
    return DEMO_CATEGORY if texture == "brick" else f"demo_{texture}"


def _write_category(category_dir, seed, texture_name):
    rng = np.random.default_rng(seed)
    texture = getattr(skimage.data, texture_name)()
    train_area, test_area = texture[:, TRAIN_COLUMNS], texture[:, TEST_COLUMNS]
    for i in range(N_TRAIN):
        _write_png(category_dir / "train" / "good" / f"{i:03d}.png", _random_crop(train_area, rng))
    for i in range(N_TEST_GOOD):
        _write_png(category_dir / "test" / "good" / f"{i:03d}.png", _random_crop(test_area, rng))
    for kind in DEFECT_KINDS:
        for i in range(N_PER_DEFECT):
            image, mask = add_defect(_random_crop(test_area, rng), kind, rng)
            _write_png(category_dir / "test" / kind / f"{i:03d}.png", image)
            _write_png(category_dir / "ground_truth" / kind / f"{i:03d}_mask.png",
                       mask.astype(np.uint8) * 255)
    (category_dir / INFO_FILE).write_text(json.dumps(_info(seed, texture_name), indent=1))


def _info(seed, texture_name):
    """What INFO_FILE records of a category: its seed, its photograph and the format version."""
    return {"seed": seed, "source": f"skimage.data.{texture_name}", "format_version": FORMAT_VERSION}


def _made_with(category_dir, seed, texture_name):
    """Whether ``category_dir`` holds the demo of ``seed`` and ``texture_name`` (``_recorded``)."""
    return _records(_recorded(category_dir), seed, texture_name)


def _records(info, seed, texture_name):
    """Whether the INFO_FILE contents ``info`` (None: none) are those of the demo of ``seed`` and
    ``texture_name`` in the current format."""
    return info is not None and all(info.get(key) == value for key, value in _info(seed, texture_name).items())


def _recorded(category_dir):
    """What a category's INFO_FILE records (None without one); ValueError for one that is not
    make_demo_dataset's."""
    info_path = category_dir / INFO_FILE
    if not info_path.is_file():
        return None
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{info_path} is not a {INFO_FILE} written by make_demo_dataset ({error}); "
                         f"remove {category_dir} to make the demo again") from None
    if not isinstance(info, dict):
        raise ValueError(f"{info_path} is not a {INFO_FILE} written by make_demo_dataset (not a JSON object); "
                         f"remove {category_dir} to make the demo again")
    return info


def make_demo_dataset(out_dir, seed=0, texture="brick"):
    """Write ``out_dir/demo_texture`` (MVTec AD layout; ``out_dir/demo_<texture>`` for another
    ``texture`` of TEXTURES) and return its path.

    A dataset already there from the same seed is reused; one from another seed (or an earlier
    format version) is replaced, with a warning. The category is built in a temporary
    folder next to it and renamed into place, so an interrupted run leaves no partial dataset.
    A folder of that name not made by this function is never overwritten, nor one of the same seed
    that another process (torchrun's others) put in place while this one built it: that process
    may be reading it.
    """
    out_dir = Path(out_dir)
    name = category_name(texture)
    target = out_dir / name
    if _made_with(target, seed, texture):
        return target
    if os.path.lexists(target) and not (target / INFO_FILE).is_file():  # a link to nothing too
        raise FileExistsError(f"{target} exists and was not made by make_demo_dataset; "
                              "choose another OUT_DIR or remove it")
    try:
        with folder_being_built(out_dir, name) as build_dir:
            _write_category(build_dir, seed, texture)
            if _made_with(target, seed, texture):  # a concurrent writer finished first: keep its copy
                return target
            if target.exists():  # made with another seed: move it aside, then replace it
                earlier = _recorded(target)  # read once: another writer may have put this seed's copy there
                if _records(earlier, seed, texture):
                    return target
                warnings.warn(f"{target} held the demo made with seed {(earlier or {}).get('seed')} (format "
                              f"version {(earlier or {}).get('format_version')}); it is replaced by that of seed "
                              f"{seed}: models trained on the earlier images would be tested on other ones")
                old = Path(tempfile.mkdtemp(prefix=f".{name}.old.", dir=out_dir))
                os.replace(target, old / name)
                shutil.rmtree(old)
            os.replace(build_dir, target)
    except OSError:
        if not _made_with(target, seed, texture):  # not a concurrent writer that finished first
            raise
    return target


def main(argv=None):
    from experiments.arguments import one_line_warnings, path_argument  # here: the data side needs no training code
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=path_argument, help="folder to write the category folder into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--texture", choices=TEXTURES, default="brick",
                        help="scikit-image photograph the crops come from (default: brick)")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"--seed must be 0 or more, got {args.seed}")
    try:
        with one_line_warnings(parser.prog):
            print(make_demo_dataset(args.out_dir, args.seed, args.texture))
    except (ValueError, OSError) as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
