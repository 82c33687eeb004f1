"""Convert the public Magnetic-tile-defect dataset into the MVTec AD layout.

Source (Huang, Qiu, Yuan: "Surface defect saliency of magnetic tile", The Visual Computer 36,
2020), as published: folders ``MT_Free``, ``MT_Blowhole``, ``MT_Break``, ``MT_Crack``,
``MT_Fray``, ``MT_Uneven``, each with ``Imgs/<name>.jpg`` images and a ``Imgs/<name>.png`` mask
for each image.

Result, ``OUT/magnetic_tile`` (one MVTec-layout category)::

    train/good/NNN.png                 712 normal images
    test/good/NNN.png                  240 normal images
    test/<type>/NNN.png                defective images, type in blowhole, break, crack, fray, uneven
    ground_truth/<type>/NNN_mask.png   their masks, {0, 255}

Conversion: greyscale, 256 x 256 with Pillow (bilinear for images; nearest neighbour for masks,
read as the project reads masks (``decode_mask_values``: a colour mask by its largest channel),
then thresholded: above 127 -> 255, else 0). Each mask must have its image's size. Four of the
public ``MT_Uneven`` masks mark no pixel; they are converted as they are, with a warning. A source whose
folders do not hold the published numbers of images (``PUBLISHED_COUNTS``) converts with a warning:
its split and numbering differ from the published conversion's. The ``MT_Free`` images, sorted by path, are shuffled
with ``random.Random(0).shuffle``; the first 240 are the normal test images and the rest the
training images; each split is then numbered (``NNN``, three digits) in path order. Each defect
type's images are numbered in path order. ``MT_Free``'s masks are not used. PNGs are written by
Pillow with ``optimize=True``, which reproduces the published conversion byte for byte.

    python -m self_sup_data.magnetic_tile SRC OUT      # writes OUT/magnetic_tile/
"""
import argparse
import os
import random
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from self_sup_data.folders import folder_being_built
from self_sup_data.images import as_displayed, decode_mask_values, displayed_size, is_image_name, opened_image

CATEGORY = 'magnetic_tile'
NORMAL_FOLDER = 'MT_Free'
DEFECT_FOLDERS = {'MT_Blowhole': 'blowhole', 'MT_Break': 'break', 'MT_Crack': 'crack',
                  'MT_Fray': 'fray', 'MT_Uneven': 'uneven'}
PUBLISHED_COUNTS = {NORMAL_FOLDER: 952, 'MT_Blowhole': 115, 'MT_Break': 85, 'MT_Crack': 57, 'MT_Fray': 32,
                    'MT_Uneven': 103}  # images in each folder of the public dataset
PUBLISHED_EMPTY_MASKS = 4  # MT_Uneven masks without a marked pixel
SIZE = 256
N_TEST_GOOD = 240
SPLIT_SEED = 0


def source_images(src, folder, with_masks):
    """Sorted ``SRC/<folder>/Imgs/*.jpg`` paths (any case of the suffix; not hidden files such as
    macOS's ``._`` forks); with ``with_masks`` also their ``.png`` masks.

    Returns a list of (image path, mask path or None). Raises FileNotFoundError naming the
    missing folder or the image without a mask, ValueError naming an unreadable file or a mask
    whose size is not its image's.
    """
    images_dir = Path(src) / folder / 'Imgs'
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir} does not exist; the Magnetic-tile-defect source folder "
                                f"needs {NORMAL_FOLDER} and {', '.join(DEFECT_FOLDERS)}, each with Imgs/*.jpg")
    images = sorted(path for path in images_dir.iterdir()
                    if path.suffix.lower() == '.jpg' and is_image_name(path))  # not macOS ._ forks
    if not images:
        raise FileNotFoundError(f"{images_dir} holds no .jpg images")
    if not with_masks:
        return [(path, None) for path in images]
    pairs = []
    for path in images:
        mask = path.with_suffix('.png')
        if not mask.is_file():
            raise FileNotFoundError(f"image {path} has no mask {mask}; each defect image needs "
                                    "a .png mask of the same name")
        with opened_image(path) as image, opened_image(mask) as mask_image:  # headers only
            image_size, mask_size = displayed_size(image), mask_image.size  # the image as converted
        if mask_size != image_size:
            raise ValueError(f"mask {mask} is {mask_size[0]}x{mask_size[1]} but its image {path} is "
                             f"{image_size[0]}x{image_size[1]} (as displayed, turned by its EXIF orientation)")
        pairs.append((path, mask))
    return pairs


def convert_image(path):
    """The image at ``path`` as 8-bit greyscale, resized to SIZE x SIZE bilinearly (Pillow);
    ValueError naming an unreadable file."""
    with opened_image(path) as image:
        return as_displayed(image).convert('L').resize((SIZE, SIZE), Image.BILINEAR)


def convert_mask(path):
    """The mask at ``path`` (``decode_mask_values``) thresholded (255 above 127, else 0) and resized
    to SIZE x SIZE by nearest neighbour; ValueError naming an unreadable file."""
    binary = np.where(decode_mask_values(path) > 127, 255, 0).astype(np.uint8)
    return Image.fromarray(binary).resize((SIZE, SIZE), Image.NEAREST)


def conversion_plan(src):
    """[(source image, source mask or None, image path relative to the category, mask path or None)]."""
    normal = [path for path, _ in source_images(src, NORMAL_FOLDER, with_masks=False)]
    shuffled = list(normal)
    random.Random(SPLIT_SEED).shuffle(shuffled)
    splits = {'test': sorted(shuffled[:N_TEST_GOOD]), 'train': sorted(shuffled[N_TEST_GOOD:])}
    plan = [(path, None, f'{split}/good/{i:03d}.png', None)
            for split, paths in splits.items() for i, path in enumerate(paths)]
    found = {NORMAL_FOLDER: len(normal)}
    for folder, defect in DEFECT_FOLDERS.items():
        pairs = source_images(src, folder, with_masks=True)
        found[folder] = len(pairs)
        plan += [(image, mask, f'test/{defect}/{i:03d}.png', f'ground_truth/{defect}/{i:03d}_mask.png')
                 for i, (image, mask) in enumerate(pairs)]
    if not splits['train']:
        raise ValueError(f"{Path(src) / NORMAL_FOLDER / 'Imgs'} holds {len(normal)} images; the split "
                         f"needs more than the {N_TEST_GOOD} normal test images (the public dataset "
                         f"has {PUBLISHED_COUNTS[NORMAL_FOLDER]}): is the download complete?")
    differing = [f'{Path(src) / folder / "Imgs"} holds {found[folder]} images, the public dataset {count}'
                 for folder, count in PUBLISHED_COUNTS.items() if found[folder] != count]
    if differing:
        warnings.warn('; '.join(differing) + ': the split and numbering will differ from the published '
                      'conversion (is the download complete?)')
    return plan


def convert(src, out):
    """Write ``out/magnetic_tile`` from the source folder ``src`` and return its path.

    The category is written to a hidden folder of its own in ``out`` (``.magnetic_tile.*``) and
    renamed when complete, so a failed run leaves no ``out/magnetic_tile`` and two runs into the
    same ``out`` do not mix. An existing ``out/magnetic_tile`` is never overwritten.
    """
    target = Path(out) / CATEGORY
    if os.path.lexists(target):  # a link to nothing is there too
        raise FileExistsError(f"{target} already exists; remove it or choose another OUT")
    plan = conversion_plan(src)  # checks the whole source before anything is written
    empty_masks = []
    with folder_being_built(out, CATEGORY) as build_dir:
        for image, mask, image_name, mask_name in tqdm(plan, desc='converting magnetic tiles', disable=None):
            (build_dir / image_name).parent.mkdir(parents=True, exist_ok=True)
            convert_image(image).save(build_dir / image_name, optimize=True)
            if mask is not None:
                (build_dir / mask_name).parent.mkdir(parents=True, exist_ok=True)
                converted = convert_mask(mask)
                converted.save(build_dir / mask_name, optimize=True)
                if not np.asarray(converted).any():
                    empty_masks.append(f'{mask_name} (from {mask})')
        if os.path.lexists(target):  # another run finished first (a rename would replace an empty folder)
            raise FileExistsError(f"{target} already exists; remove it or choose another OUT")
        os.rename(build_dir, target)
    if empty_masks:
        warnings.warn(f"{len(empty_masks)} defect masks mark no pixel, as in the source (the public dataset has "
                      f"{PUBLISHED_EMPTY_MASKS}), e.g. {empty_masks[0]}: their images count as defective, and add "
                      f"no defect pixel to the pixel metrics")
    return target


def main(argv=None):
    from experiments.arguments import one_line_warnings, path_argument  # here: the data side needs no training code
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src', type=path_argument,
                        help='the unpacked Magnetic-tile-defect folder (holds MT_Free, MT_Blowhole, ...)')
    parser.add_argument('out', type=path_argument, help='folder to write the magnetic_tile category folder into')
    args = parser.parse_args(argv)
    try:
        with one_line_warnings(parser.prog):
            print(convert(args.src, args.out))
    except (ValueError, OSError) as error:
        parser.error(str(error))


if __name__ == '__main__':
    main()
