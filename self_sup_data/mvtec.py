"""Datasets in the MVTec AD folder layout: the 15 MVTec AD categories and any custom category.

Layout (``root`` holds one folder per category)::

    root/<category>/train/good/*.png                    normal training images
    root/<category>/test/good/*.png                     normal test images
    root/<category>/test/<defect>/<name>.png            defective test images
    root/<category>/ground_truth/<defect>/<name>_mask.png   their masks (any nonzero pixel is a
                                                             defect, ``mask_pixels``; matched by
                                                             exact name)

The same datasets read VisA, MVTec LOCO AD, MVTec AD 2 and a plain pair of folders through
``self_sup_data.layouts`` (which layout: given, or detected from the folder).

Images are decoded (Pillow, which rejects truncated files) and resized once, in parallel, and
kept in memory as ``uint8 H x W x C``. A category whose images are all grayscale (one channel,
or three identical channels) stays single-channel; otherwise every image is RGB. Non-square
images are resized to a square.

Training items are the self-supervised samples of NSA: a randomly transformed training image
``dest``, a randomly transformed *other* training image ``src``, and
``patch_ex(dest, src, rng=rng, **self_sup_args)`` -> (anomalous image, label map). The
generator of item ``i`` is seeded from ``(seed, epoch, i)``, so a seed gives the same samples for
any number of DataLoader workers (call ``set_epoch`` before each epoch's iterator is created;
with ``persistent_workers=True`` the workers would not see it).

With ``views`` (e.g. ``CutPaste3Way``, CutPaste's classification task) a training item is
instead several views of the transformed image with their class labels.
"""
import collections
import math
import numbers
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from self_sup_data.layouts import LocoLayout, MVTecLayout, detect_layout, warn_copies
from self_sup_data.images import (GREY_MODES, TRANSPARENT_NOTE, WINDOW_MARGIN, central_box, decode_mask_values,
                                  displayed_file_size, high_bit_depth, high_depth_maximum, high_depth_percentiles,
                                  image_span, lossy_compression, opened_image, read_image, reading_words, resize,
                                  resize_mask, to_channels, turned_note)
from self_sup_data.self_sup_tasks import PatchParams, SyntheticAnomaly, blends_too_small, patch_ex
from self_sup_data.validation import VALIDATION_KINDS, make_validation_set
from self_sup_data.transforms import (CenterCrop, Compose, RandomCrop, RandomRotation,
                                      RandomVerticalFlip, to_image_tensor, to_label_tensor,
                                      to_uint8_tensor)

OBJECTS = ['bottle', 'cable', 'capsule', 'hazelnut', 'metal_nut',
           'pill', 'screw', 'toothbrush', 'transistor', 'zipper']
TEXTURES = ['carpet', 'grid', 'leather', 'tile', 'wood']
CLASS_NAMES = OBJECTS + TEXTURES
UNALIGNED_OBJECTS = ['bottle', 'hazelnut', 'metal_nut', 'screw']
KINDS = ('object', 'texture')
CHECK_SIZE = 8  # the side that check_test_set decodes test images and masks to
SET_BIT_DEPTH = 'set'  # load_images: one bit depth for a set's 16-bit images, found from them


# ----------------------------------------------------------------------------- categories

def list_categories(root):
    """Sorted names of the folders in ``root`` that hold ``train/good`` or ``test`` (MVTec layout)."""
    return MVTecLayout().categories(root)


def category_kind(class_name, kind=None):
    """'object' or 'texture': ``kind`` if given, else MVTec AD's grouping; other names -> 'texture'."""
    if kind is not None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
        return kind
    return 'object' if class_name in OBJECTS else 'texture'


def _round_to_multiple(x, multiple):
    return max(multiple, int(np.floor(x / multiple + 0.5)) * multiple)


def data_recipe(class_name, res_scale=1.0, kind=None):
    """The paper's per-category training transform, at resolution factor ``res_scale``.

    At ``res_scale=1`` (the paper):
      objects:  resize 256, [rotation up to 5 degrees for UNALIGNED_OBJECTS], centre crop 230,
                random crop 224;
      textures: resize 264, random vertical flip, random crop 256.
    Otherwise the training crop is ``train_size = 224 * res_scale`` (objects) or
    ``256 * res_scale`` (textures) rounded to a multiple of 32 (the network needs it), and the
    other sizes keep their proportion to it (objects: resize ``train_size * 256/224``, centre crop
    ``train_size * 230/224``; textures: resize ``train_size * 264/256``), e.g. 0.5 -> 128 for both.

    Returns dict(low_res, train_size, test_res, transform): ``low_res`` is the side training
    images are resized to, ``test_res`` the side test images are resized to (256 for both kinds at
    ``res_scale=1``, as in the paper's evaluation): for textures ``low_res`` rounded to a multiple
    of 32 (whole test images go through the network), for objects ``low_res`` itself, so that
    their central ``train_size`` crop, all that the network sees, shows them at the scale they
    were trained at (``model_test_side``: the side of a trained model).
    """
    if not res_scale > 0:
        raise ValueError(f"res_scale must be positive, got {res_scale}")
    is_object = category_kind(class_name, kind) == 'object'
    if is_object:
        train_size = _round_to_multiple(224 * res_scale, 32)
        low_res = int(train_size * 256 / 224 + 0.5)
        steps = [RandomRotation(5)] if class_name in UNALIGNED_OBJECTS else []
        steps += [CenterCrop(int(train_size * 230 / 224 + 0.5)), RandomCrop(train_size)]
    else:
        train_size = _round_to_multiple(256 * res_scale, 32)
        low_res = int(train_size * 264 / 256 + 0.5)
        steps = [RandomVerticalFlip(), RandomCrop(train_size)]
    return dict(low_res=low_res, train_size=train_size,
                test_res=low_res if is_object else _round_to_multiple(low_res, 32),
                transform=Compose(steps))


def model_test_side(meta):
    """The side a trained model's test (and new) images are resized to: its ``test_res``, or, for
    a model written before it was stored, the earlier rule (``low_res`` rounded to a multiple of
    32, for objects too: at a ``res_scale`` other than 1 their scale then differs from training's,
    and thresholds stored in such a model were calibrated so)."""
    if meta.get('test_res') is not None:
        return int(meta['test_res'])
    recipe = data_recipe(meta['category'], meta.get('res_scale', 1.0), meta.get('kind'))
    return _round_to_multiple(recipe['low_res'], 32)


# ----------------------------------------------------------------------------- reading files

def mask_pixels(values, path):
    """Boolean ``H x W``: the defect pixels of a mask's stored values (``decode_mask_values``):
    every nonzero pixel (0/255, 0/1, 16-bit or any other values), or, for a mask saved with lossy
    compression (``lossy_compression``: JPEG, also in a TIFF, or lossy WebP, which ring around edges), the pixels
    above half of its largest value."""
    if lossy_compression(path):
        return values > values.max(initial=0) / 2
    return values > 0


def read_mask(path):
    """Boolean ``H x W`` mask of the file at ``path`` (``mask_pixels``)."""
    return mask_pixels(decode_mask_values(path), path)


def read_id_masks(paths):
    """Boolean ``H x W`` union of the defect pixels (``mask_pixels``) of the masks at ``paths``
    (masks whose values are region or defect ids, e.g. VisA's and MVTec LOCO AD's); they must
    have one size."""
    masks = [read_mask(path) for path in paths]
    for path, mask in zip(paths[1:], masks[1:]):
        if mask.shape != masks[0].shape:
            raise ValueError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]} but {paths[0]} is "
                             f"{masks[0].shape[1]}x{masks[0].shape[0]}; the masks of an image must match")
    return np.any(np.stack(masks), axis=0)


def _load_item(image_path, mask_path, size, bits, transparent=None):
    """(image resized to ``size``, mask or None, the image's own (width, height)): the image as
    ``read_image(image_path, bits, transparent)`` reads it (16-bit images scaled to uint8 first),
    then resized, as new images are prepared."""
    image = read_image(image_path, bits, transparent)
    mask = None
    if mask_path is not None:
        mask = read_id_masks(mask_path) if isinstance(mask_path, tuple) else read_mask(mask_path)
        if mask.shape != image.shape[:2]:
            masks = ', '.join(map(str, mask_path)) if isinstance(mask_path, tuple) else mask_path
            mask_note = '' if isinstance(mask_path, tuple) else turned_note(mask_path)
            raise ValueError(f"mask {masks} is {mask.shape[1]}x{mask.shape[0]}{mask_note} but its image "
                             f"{image_path} is {image.shape[1]}x{image.shape[0]}{turned_note(image_path)}; "
                             f"they must match")
        mask = resize_mask(mask.astype(np.uint8), size)
    return resize(image, size), mask, (image.shape[1], image.shape[0])


STRETCH_NOTE_ASPECT = 2.0  # images this many times longer than wide (or the reverse) get a note: squares stretch them


def warn_stretched(image_paths, sizes, size):
    """Warn, with their count and the first path, about images whose sides (``sizes``: (width,
    height) each) differ by ``STRETCH_NOTE_ASPECT`` or more: resizing them to ``size`` x ``size``
    squares stretches them, and the patches and defects on them, along their short side."""
    stretched = [(path, (width, height)) for path, (width, height) in zip(image_paths, sizes)
                 if max(width, height) >= STRETCH_NOTE_ASPECT * min(width, height)]
    if stretched:
        path, (width, height) = stretched[0]
        warnings.warn(f"{len(stretched)} of {len(sizes)} images are at least {STRETCH_NOTE_ASPECT:g} times longer "
                      f"than wide (first: {path}, {width}x{height}); each is resized to a {size}x{size} square, "
                      f"which stretches it, and its defects, along its short side (the first "
                      f"{max(width, height) / min(width, height):.1f} times): cut such images into squares to keep "
                      f"their shapes")


def set_bit_depth(image_paths, pool):
    """One bit depth for the 16-bit images among ``image_paths`` (``high_bit_depth`` of their
    largest value; None when there is none): 10- to 14-bit data keeps its grey levels, and a dark
    image of a 16-bit set is not brightened as if it were of fewer bits."""
    largest = [value for value in pool.map(high_depth_maximum, image_paths) if value is not None]
    return high_bit_depth(np.array(largest)) if largest else None


def suggested_intensity_window(image_paths):
    """An intensity window [low, high] (the training commands' ``--intensity-range``) for the 16-bit images
    among ``image_paths``, None without one: from the lowest 1st to the highest 99th percentile of
    their values (``high_depth_percentiles``), widened by WINDOW_MARGIN of its width on each side,
    so that defects darker or brighter than the normal material keep their grey levels, within
    0..65535."""
    with reading_pool() as pool:
        found = [found for found in pool.map(high_depth_percentiles, image_paths) if found is not None]
    if not found:
        return None
    low, high = min(low for low, _ in found), max(high for _, high in found)
    margin = max(1.0, (high - low) * WINDOW_MARGIN)
    return [max(0, math.floor(low - margin)), min(2 ** 16 - 1, math.ceil(high + margin))]


def training_bit_depth(root_path, class_name, layout=None):
    """The bit depth that ``SelfSupMVTecDataset`` finds for the training images of ``class_name``
    (``set_bit_depth`` of all of them, held-out ones too; None without a 16-bit image)."""
    with reading_pool() as pool:
        return set_bit_depth(train_files(root_path, class_name, layout), pool)


def all_grey(image_paths):
    """Whether every image among ``image_paths`` is grey as ``read_image`` reads it (a grey mode
    by its header, else three identical channels once decoded)."""
    for path in image_paths:
        with opened_image(path) as image:
            grey_mode = image.mode in GREY_MODES
        if not grey_mode and read_image(path, transparent=[]).shape[2] != 1:  # (noted where they are loaded)
            return False
    return True


def reading_pool():
    """The threads that decode a set's images."""
    return ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) + 2))


class LoadedImages(NamedTuple):
    """What ``load_images`` returns."""
    images: list
    masks: list
    bit_depth: object
    sizes: list


def load_images(image_paths, size, mask_paths=None, channels=None, desc='loading images',
                bit_depth=None, stretch_note=True):
    """Decode and resize images (and optional masks) in parallel threads.

    A mask path is None, a path (``read_mask``) or a tuple of paths (``read_id_masks``). 16-bit
    images are scaled to uint8 from the range of ``bit_depth``-bit data (a model's, that of its
    training images), or from the intensity window that it gives as a pair [low, high]
    (``images.to_uint8``), then resized; ``bit_depth`` SET_BIT_DEPTH: one depth for the whole set
    (``set_bit_depth``; a training set's, which training stores as the model's ``bit_depth``);
    None: each image's own (``high_bit_depth``), as for a model trained on 8-bit images.
    Returns LoadedImages(images, masks, bit depth, sizes): images uint8 ``size x size x C`` with one
    C for all (``channels``, or 1 if every image is grayscale and 3 otherwise); masks uint8 ``size x
    size`` in {0, 1}, or None where ``mask_paths`` has None; the set's bit depth (for SET_BIT_DEPTH;
    None without a 16-bit image) or ``bit_depth``; each image's (width, height) as read.
    ``stretch_note``: ``warn_stretched`` about images far from square.
    """
    mask_paths = [None] * len(image_paths) if mask_paths is None else mask_paths
    with reading_pool() as pool:
        if bit_depth == SET_BIT_DEPTH:
            bit_depth = set_bit_depth(image_paths, pool)
        count, transparent = len(image_paths), []
        loaded = list(tqdm(pool.map(_load_item, image_paths, mask_paths, [size] * count,
                                    [bit_depth] * count, [transparent] * count),
                           total=count, desc=desc, disable=None, leave=False))
    if transparent:
        collected = set(transparent)
        first = next(path for path in image_paths if path in collected)  # in the order given
        warnings.warn(f"{len(transparent)} of {count} images are transparent everywhere (first: {first}): "
                      f"{TRANSPARENT_NOTE}")
    sizes = [image_size for _, _, image_size in loaded]
    if stretch_note:
        warn_stretched(image_paths, sizes, size)
    images = [image for image, _, _ in loaded]
    if channels is None:
        channels = 1 if all(image.shape[2] == 1 for image in images) else 3
    return LoadedImages([to_channels(image, channels) for image in images], [mask for _, mask, _ in loaded],
                        bit_depth, sizes)


# ----------------------------------------------------------------------------- datasets

class SelfSupImageDataset(Dataset):
    """In-memory images; train items are self-supervised samples, test items labelled images.

    ``train_size`` (None: measured by applying ``transform`` to a stored image) is the side of
    the training crops.

    train, self-sup on:  ds[i] -> (image tensor C x H x W, 0, label tensor 1 x H x W)
    train, self-sup off: ds[i] -> (transformed image tensor, 0, zeros 1 x H x W)
    train, with views:   ds[i] -> (V x C x H x W view tensors, 0, int64 class labels V), from
                         ``views(image, rng) -> (V uint8 images, V labels)`` (self-sup on)
    test:                ds[i] -> (image tensor at low_res, 0/1, mask tensor 1 x H x W in {0, 1})
    Attributes: ``images`` (uint8 H x W x C), ``labels`` (int array), ``masks`` (test: uint8
    H x W in {0, 1} per item; None for training), ``has_mask`` (bool array), ``in_channels``,
    ``low_res``, ``train_size``, ``uint8_tensors`` (False: image tensors are normalised float32,
    ``to_image_tensor``; True: uint8, for whoever normalises them later, e.g. the training loop on
    its device with ``transforms.normalize_images``). Subclasses find the files; this class holds
    the images and makes the items.
    """

    def __init__(self, images, is_train, transform, train_size=None, self_sup_args=None, seed=0,
                 labels=None, masks=None, has_mask=None, views=None):
        self.images = images
        self.is_train = is_train
        self.transform = transform
        if train_size is None:  # the side of what the transform makes of a stored image
            crop_shape = transform(np.zeros_like(images[0]), None, np.random.default_rng(0))[0].shape[:2]
            train_size = crop_shape[0]
        else:
            crop_shape = (train_size, train_size)
        self.train_size, self.crop_shape = train_size, tuple(crop_shape)
        self.in_channels = images[0].shape[2]
        self.low_res = images[0].shape[0]
        self.self_sup = is_train
        given = self_sup_args is not None and is_train and views is None  # else set before training, if at all
        self.self_sup_args = _checked_patch_args(self_sup_args or {}, self.crop_shape if given else None)
        self.views = views
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f'seed must be an integer of 0 or more, got {seed!r}')
        self.seed = seed
        self.epoch = 0
        self.uint8_tensors = False
        self.labels = np.zeros(len(images), int) if labels is None else np.asarray(labels, int)
        # test: uint8 {0, 1} mask per item (zeros for normal images and images without a mask)
        self.masks = None if is_train else [np.zeros(im.shape[:2], np.uint8) if m is None else m
                                            for im, m in zip(images, masks or [None] * len(images))]
        self.has_mask = np.ones(len(images), bool) if has_mask is None else np.asarray(has_mask, bool)

    def configure_self_sup(self, on=True, self_sup_args=None):
        """Switch self-supervised samples on/off; ``self_sup_args`` updates the patch_ex arguments."""
        self.self_sup = on
        self.self_sup_args = _checked_patch_args({**self.self_sup_args, **(self_sup_args or {})},
                                                 self.crop_shape if on and self.views is None else None)

    def set_epoch(self, epoch):
        """Select the epoch whose samples the items are (part of each item's seed)."""
        self.epoch = int(epoch)

    def item_rng(self, index):
        """The generator of item ``index`` in the current epoch."""
        return np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, index]))

    def image_tensor(self, image):
        """Tensor ``C x H x W`` of a uint8 image: normalised float32, or uint8 (``uint8_tensors``)."""
        return to_uint8_tensor(image) if self.uint8_tensors else to_image_tensor(image)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        index = range(len(self.images))[index]  # IndexError when out of range; ds[-1] is ds[n - 1]
        if not self.is_train:
            return (self.image_tensor(self.images[index]), int(self.labels[index]),
                    to_label_tensor(self.masks[index][:, :, None].astype(np.float32)))
        rng = self.item_rng(index)
        image, _ = self.transform(self.images[index].copy(), None, rng)
        if not self.self_sup:
            return self.image_tensor(image), 0, torch.zeros((1,) + image.shape[:2])
        if self.views is not None:
            views, classes = self.views(image, rng)
            return torch.stack([self.image_tensor(v) for v in views]), 0, torch.tensor(classes)
        args = dict(self.self_sup_args)
        if len(self.images) == 1:  # no other image to take patches from: the image itself
            if not PatchParams(**args).moves_patches:
                raise ValueError(f"{getattr(self, 'class_name', 'the dataset')}: one training image: its "
                                 f"patches would come from itself, and patches that are neither shifted nor "
                                 f"resized would change nothing; add images")
            args['same'] = True
        source = None
        if not args.get('same', False):
            other = int(rng.integers(len(self.images) - 1))
            other += other >= index
            source, _ = self.transform(self.images[other].copy(), None, rng)
        image, label = patch_ex(image, source, rng=rng, **args)
        return self.image_tensor(image), 0, to_label_tensor(label)


def _checked_patch_args(self_sup_args, crop_shape=None):
    """``self_sup_args`` as a dict, checked as ``patch_ex`` would check them (``SyntheticAnomaly``: a
    ValueError naming an unknown or invalid argument), here rather than at the first item, often
    inside a DataLoader worker; given the ``crop_shape`` of the training crops they will draw on, a
    warning where their blends are too small to show there (``blends_too_small``)."""
    anomaly = SyntheticAnomaly(**self_sup_args)
    message = crop_shape and blends_too_small(crop_shape, anomaly.params)
    if message:
        warnings.warn(f'training samples: {message}')
    return anomaly.kwargs


def checked_indices(indices, count, class_name):
    """``indices`` of training images (sorted ``train_files`` order) as a list of ints;
    ValueError naming the category for one that is not an integer in ``0 .. count - 1`` (a
    negative index or a boolean mask would pick other images than meant)."""
    indices = list(np.asarray(indices).ravel()) if isinstance(indices, np.ndarray) else list(indices)
    bad = [index for index in indices if isinstance(index, (bool, np.bool_))
           or not isinstance(index, (int, np.integer)) or not 0 <= index < count]
    if bad:
        raise ValueError(f"{class_name}: training image indices must be integers from 0 to {count - 1} "
                         f"({count} images), got {bad[:3]}")
    return [int(index) for index in indices]


def train_files(root_path, class_name, layout=None):
    """Sorted paths of the category's normal training images in ``layout`` (None: detected;
    MVTec AD: ``train/good``; see ``self_sup_data.layouts``)."""
    layout = detect_layout(root_path, class_name) if layout is None else layout
    return layout.train_files(root_path, class_name)


def unmasked_defects(class_name, layout, files, allow_missing):
    """(the defect images of ``files`` (a layout's ``test_files``) without a mask, the number of
    defect images); a FileNotFoundError naming the first unmasked one when there is one,
    ``layout.has_masks`` and not ``allow_missing``."""
    missing = [path for path, t, mask in zip(*files) if t != 'good' and mask is None]
    defects = sum(t != 'good' for t in files.defect_types)
    if missing and layout.has_masks and not allow_missing:
        raise FileNotFoundError(f"no mask for the defect image {missing[0]} ({len(missing)} of "
                                f"{defects} defect images of {class_name!r} have none; "
                                f"{layout.name} layout: {layout.expected}){_loco_note(missing[0])}"
                                f"{_mask_folder_note(missing[0]) if layout.name == 'mvtec' else ''}; to "
                                f"evaluate them at image level only, allow missing masks (--allow-missing-masks)")
    return missing, defects


def _category_dir(defect_image):
    """``<cat>`` of a defect image ``<cat>/test/<type>/<name>``; None for a path too short to have one."""
    image = Path(defect_image)
    return image.parents[2] if len(image.parents) >= 3 else None


def _loco_note(defect_image):
    """A note for a defect image ``<cat>/test/<type>/<name>`` of an MVTec LOCO AD category read as
    another layout (its defects_config.json missing): LOCO's masks of it are the folder
    ``<cat>/ground_truth/<type>/<name>/``; '' where there is no such folder, or the category has its
    defects_config.json (a LOCO category, whose layout names its own expected masks)."""
    image, category_dir = Path(defect_image), _category_dir(defect_image)
    if category_dir is None:
        return ''
    masks = category_dir / 'ground_truth' / image.parent.name / image.stem
    config = category_dir / 'defects_config.json'
    return (f"; {masks} is a folder of masks as in MVTec LOCO AD, whose {config} is missing"
            if masks.is_dir() and not config.is_file() else '')


def _mask_folder_note(defect_image):
    """A note for a defect image ``<cat>/test/<type>/<name>`` whose mask folder
    ``<cat>/ground_truth/<type>`` does not exist although ``ground_truth`` does: the folders that it
    holds (a misnamed one, ``cracks`` for ``crack``); '' otherwise."""
    image, category_dir = Path(defect_image), _category_dir(defect_image)
    if category_dir is None:
        return ''
    truth = category_dir / 'ground_truth'
    if not truth.is_dir() or (truth / image.parent.name).is_dir():
        return ''
    folders = sorted(p.name for p in truth.iterdir() if p.is_dir() and not p.name.startswith('.'))
    return f"; {truth / image.parent.name} does not exist ({truth} holds: {', '.join(folders) or 'no folders'})"


def check_test_set(root_path, class_name, layout=None, allow_missing_masks=False, bit_depth=None):
    """Check that ``class_name`` has a test set that can be evaluated: the errors of
    ``layout.test_files`` and ``unmasked_defects``, a ValueError when it lacks normal or defect
    images (AUROC needs both), and those of decoding every test image and mask (``load_images``
    at CHECK_SIZE pixels with the model's ``bit_depth``: an unreadable file, a mask of another size
    than its image, values beyond ``bit_depth`` bits); for MVTec
    LOCO AD, those of reading its defects_config.json and each mask's defect in it
    (``LocoLayout.defect_regions``), which AU-sPRO needs."""
    layout = detect_layout(root_path, class_name) if layout is None else layout
    files = layout.test_files(root_path, class_name)
    for lacking, present in (('normal', 'good' in files.defect_types),
                             ('defect', any(t != 'good' for t in files.defect_types))):
        if not present:
            raise ValueError(f"the test set of {class_name!r} has no {lacking} images "
                             f"({layout.name} layout: {layout.expected}); the evaluation needs "
                             f"both normal and defect images")
    unmasked_defects(class_name, layout, files, allow_missing_masks)
    load_images(files.paths, CHECK_SIZE, files.masks, desc=f'checking {class_name}', bit_depth=bit_depth,
                stretch_note=False)
    if isinstance(layout, LocoLayout):
        layout.defect_regions(root_path, class_name, [path for masks in files.masks for path in masks or ()],
                              CHECK_SIZE)


def _warn_defect_masks(class_name, paths, defect_types, masks, flagged, what, consequence):
    """Warn ``"<class_name>: <n> of <defects> defect images have <what> (first: <path>)<consequence>"``
    about the defect images whose mask (not None) is ``flagged(mask)``."""
    found = [path for path, t, mask in zip(paths, defect_types, masks)
             if t != 'good' and mask is not None and flagged(mask)]
    if found:
        defects = sum(t != 'good' for t in defect_types)
        warnings.warn(f"{class_name}: {len(found)} of {defects} defect images have {what} (first: {found[0]})"
                      f"{consequence}")


FAINT_FACTOR = 4  # a training image whose span is below the set's median by more than this factor is faint


def warn_faint_images(class_name, paths, images, bit_depth=None):
    """Warn about the training ``images`` (uint8, as read and resized; files ``paths``) whose
    grey-level span (``images.image_span``) is below the set's median span by more than the factor
    FAINT_FACTOR: nearly uniform as the network gets them, most often 16-bit files whose data has
    fewer bits than the others' (8-bit values saved as 16 bits), read with the set's ``bit_depth``
    (bits, or an intensity window [low, high]; None: 8-bit images)."""
    spans = np.array([image_span(image) for image in images])
    if spans.size < 2:
        return
    median = float(np.median(spans))
    faint = np.flatnonzero(spans < median / FAINT_FACTOR)
    if not faint.size:
        return
    cause = '' if bit_depth is None else (
        f"; 16-bit files are read {reading_words(bit_depth)}, so a 16-bit file whose data has fewer bits (8-bit "
        f"values saved as 16 bits, say) reads nearly black: save such images as 8-bit files, or scale their data to "
        f"the others' range")
    warnings.warn(f"{class_name}: {len(faint)} of {spans.size} training images have far less contrast than the others: "
                  f"their grey levels span at most {spans[faint].max()} of 0..255 as read, the median image's "
                  f"{median:g} (first: {paths[faint[0]]}, span {spans[faint[0]]}){cause}")


def warn_empty_masks(class_name, paths, defect_types, masks, side):
    """Warn, with their count and the first path, about defect images whose mask has no defect
    pixel at ``side`` pixels (none in the file, or a defect too small to survive the resize):
    their pixels count as normal in the pixel metrics, as in MVTec AD's evaluation."""
    _warn_defect_masks(class_name, paths, defect_types, masks, lambda mask: not mask.any(),
                       f"a mask without a defect pixel at {side} pixels",
                       "; their pixels count as normal in the pixel metrics")


INVERTED_MASK_FRACTION = 0.9  # a mask marking more of its image than this looks inverted (white background)


def warn_inverted_masks(class_name, paths, defect_types, masks, side):
    """Warn, with their count and the first path, about defect images whose mask marks more than
    ``INVERTED_MASK_FRACTION`` of the image as defect at ``side`` pixels: most likely a mask drawn
    as a dark defect on a white background, which would score the image's normal pixels as defect."""
    _warn_defect_masks(class_name, paths, defect_types, masks, lambda mask: mask.mean() > INVERTED_MASK_FRACTION,
                       f"a mask that marks more than {INVERTED_MASK_FRACTION:.0%} of the image as defect at "
                       f"{side} pixels",
                       "; if it is inverted, redraw it with the defect white (non-zero) on black: the pixel "
                       "metrics take its non-zero pixels as the defect")


def warn_masks_outside_crop(class_name, paths, defect_types, masks, side, crop):
    """Warn, with their count and the first path, about defect images whose mask's defect pixels all
    lie outside the central ``crop`` square of the ``side``-pixel test images that object models
    score (their map is 0 there): those defects count as missed in the pixel metrics."""
    box = central_box((side, side), crop)
    _warn_defect_masks(class_name, paths, defect_types, masks, lambda mask: mask.any() and not mask[box].any(),
                       f"all their mask's defect pixels outside the central {crop}-pixel square of the "
                       f"{side}-pixel test images that object models score",
                       ": their defects count as missed in the pixel metrics (--kind texture scores whole images)")


SOURCE_ASPECT_FACTOR = 1.1  # test images whose aspect ratios lie within this factor ...
SOURCE_SIDE_FACTOR = 1.2  # ... and whose longer sides lie within this factor have sizes alike
# what a test set's image sizes or compressions alone would tell defect images from normal ones by, an AUROC,
# from which on it is warned of: images of two sources
SOURCE_TELLING_AUROC = 0.75
SOURCE_SUPPORT = 0.01  # the share of a group of images (at least one) that must be alike an image's size to match it
ULP = 1e-9  # factors on the boundary (1200 against 1000 pixels) count as within, also after a logarithm's rounding


def _supported(sizes, groups):
    """Bool per (width, height) of ``sizes``: whether in some of ``groups`` (lists of sizes) at least
    SOURCE_SUPPORT of the images (at least one) are alike it, their aspect ratios within
    SOURCE_ASPECT_FACTOR and their longer sides within SOURCE_SIDE_FACTOR of its (so that a stray
    image of the other side does not match a whole source, and a small group can)."""
    sizes = np.asarray(sizes, float).reshape(-1, 2)
    queries, back = np.unique(sizes, axis=0, return_inverse=True)
    aspects, sides = np.log(queries[:, 0] / queries[:, 1]), np.log(queries.max(axis=1))
    matched = np.zeros(len(queries), bool)
    for group in groups:
        if not len(group):
            continue
        others, counts = np.unique(np.asarray(group, float).reshape(-1, 2), axis=0, return_counts=True)
        other_aspects, other_sides = np.log(others[:, 0] / others[:, 1]), np.log(others.max(axis=1))
        support = np.zeros(len(queries))
        chunk = max(1, 2 ** 22 // len(others))  # a chunk of sizes against all of the group at once
        for start in range(0, len(queries), chunk):
            alike = ((np.abs(aspects[start:start + chunk, None] - other_aspects[None])
                      <= math.log(SOURCE_ASPECT_FACTOR) + ULP)
                     & (np.abs(sides[start:start + chunk, None] - other_sides[None])
                        <= math.log(SOURCE_SIDE_FACTOR) + ULP))
            support[start:start + chunk] = alike.astype(float) @ counts
        matched |= support >= max(1.0, SOURCE_SUPPORT * counts.sum())
    return matched[back.reshape(-1)]


def separating_auroc(values, is_defect):
    """The AUROC with which the ``values`` (one hashable per image) alone tell the defect images
    (``is_defect``) from the normal ones: that of the best score knowing only the value, the share of
    defect images among the images of each value (ties counted half); 0.5 where they tell nothing."""
    counts = {}
    for value, defect in zip(values, is_defect):
        counts.setdefault(value, [0, 0])[bool(defect)] += 1
    normals, defects = sum(count[0] for count in counts.values()), sum(count[1] for count in counts.values())
    if not normals or not defects:
        return 0.5
    share = {value: count[1] / sum(count) for value, count in counts.items()}
    above = sum(counts[a][1] * counts[b][0] * (1.0 if share[a] > share[b] else 0.5 if share[a] == share[b] else 0.0)
                for a in counts for b in counts)
    return above / (normals * defects)


def _commonest_first(values):
    """[(value, count)] of the distinct ``values``, the commonest first (ties in the order of the values)."""
    return sorted(collections.Counter(values).items(), key=lambda item: (-item[1], item[0]))


def _listed(values):
    """'N value, M other value' of ``values``, the commonest first."""
    return ', '.join(f'{count} {value}' for value, count in _commonest_first(values))


def _commonest(sizes, most=3):
    """'WxH (N), ...' of the ``most`` commonest sizes of ``sizes``."""
    return ', '.join(f'{width}x{height} ({count})' for (width, height), count in _commonest_first(sizes)[:most])


def warn_sources_tell_defects(class_name, paths, defect_types, sizes, train_sizes=()):
    """Warn where the normal test images (``defect_types`` 'good') and the defect images look like
    two sources, which a model can tell apart whatever their defects, so that the figures may be
    wrong: at least half of the defect images of a size like too few normal test or training images'
    (``_supported``; ``sizes``: (width, height) each, as read; ``train_sizes``: those of the normal
    training images; alone that tells them apart with an AUROC of 0.75 or more),
    at least half of the normal test images of a size like too few defect or training images'
    (where ``train_sizes`` are given: normal test images of another source than the model's), or
    compressions (``lossy_compression``: JPEG, lossy WebP, lossless) that alone tell them apart
    with an AUROC of SOURCE_TELLING_AUROC or more (``separating_auroc``). Resized to one square,
    they differ in sharpness, stretch or compression."""
    is_defect = [kind != 'good' for kind in defect_types]
    if all(is_defect) or not any(is_defect):
        return
    advice = ("images of two sources, resized to one square, differ in sharpness, stretch or compression, which a "
              "model can score instead of their defects, so the figures may be wrong; test on normal and defect "
              "images of one source, {} and preparation")
    sizes, train_sizes = [tuple(size) for size in sizes], [tuple(size) for size in train_sizes]
    normal = [(path, size) for path, size, defect in zip(paths, sizes, is_defect) if not defect]
    defects = [(path, size) for path, size, defect in zip(paths, sizes, is_defect) if defect]
    normal_sizes, defect_sizes = [size for _, size in normal], [size for _, size in defects]
    checks = [('defect test images', defects, (normal_sizes, train_sizes), 'normal')]
    if train_sizes:
        checks.append(('normal test images', normal, (defect_sizes, train_sizes), 'defect or training'))
    for subject, items, groups, other_name in checks:
        unlike = [item for item, alike in zip(items, _supported([size for _, size in items], groups)) if not alike]
        if len(unlike) >= 2 * (SOURCE_TELLING_AUROC - 0.5) * len(items):  # a share f unlike: AUROC 0.5 + f / 2
            path, (width, height) = unlike[0]
            warnings.warn(f"{class_name}: {len(unlike)} of {len(items)} {subject} have a size like few or no "
                          f"{other_name} images' (first: {path}, {width}x{height}; the commonest {other_name} "
                          f"sizes: {_commonest([size for group in groups for size in group])}): "
                          + advice.format('size'))
            break
    compressions = [lossy_compression(path) or 'lossless' for path in paths]
    auroc = separating_auroc(compressions, is_defect)
    if auroc >= SOURCE_TELLING_AUROC:
        of_normal = [value for value, defect in zip(compressions, is_defect) if not defect]
        of_defects = [value for value, defect in zip(compressions, is_defect) if defect]
        warnings.warn(f"{class_name}: the compression of the test images alone tells defect images from normal ones "
                      f"with an AUROC of {auroc:.2f} (normal: {_listed(of_normal)}; defect: {_listed(of_defects)}): "
                      + advice.format('compression'))


def header_sizes(paths):
    """(width, height) of each readable image file of ``paths`` as viewers show it, from its header
    (``images.displayed_file_size``); unreadable files are left out."""
    sizes = []
    for path in paths:
        try:
            sizes.append(displayed_file_size(path))
        except ValueError:
            continue
    return sizes


def warn_repeated_images(class_name, paths, defect_types, train_paths):
    """Warn about test images (``paths``) with the bytes of a training image (``train_paths``; a
    model trained on them scores them as seen images) and about defect images with the bytes of a
    normal test image (``defect_types`` 'good': one image counted as normal and as defect)
    (``warn_copies``)."""
    normal = [path for path, kind in zip(paths, defect_types) if kind == 'good']
    defects = [path for path, kind in zip(paths, defect_types) if kind != 'good']
    digests = {}
    warn_copies(class_name, paths, train_paths, 'test images', 'training images',
                'a model trained on them (unless they were held out for validation) scores them as seen images',
                digests)
    warn_copies(class_name, defects, normal, 'defect images', 'normal test images',
                'each counts as normal and as defect', digests)


class SelfSupMVTecDataset(SelfSupImageDataset):
    """One category of a data folder: MVTec AD layout (see the module docstring) or another
    ``layout`` of ``self_sup_data.layouts`` (None: detected from the folder; ``.layout``).

    ``low_res`` and ``transform`` default to ``data_recipe(class_name, res_scale, kind)``
    (``low_res`` for training, ``test_res`` for testing). ``self_sup_args``: keyword arguments of
    ``patch_ex`` (plain types). Test items: ``.defect_types`` ('good' for normal), ``.paths``,
    ``.mask_paths`` (the layout's ``test_files`` masks: None, a path or a tuple of paths),
    ``.has_mask`` (False for a defect image without a mask file: image-level evaluation only).
    A defect image without a mask is a FileNotFoundError naming it when the layout has masks
    (``layout.has_masks``), unless ``allow_missing_masks``; such images are counted in a warning.
    ``views``: training items are views of each image instead (see ``SelfSupImageDataset``).
    ``exclude``: indices (in sorted file order) of training images to leave out (held out for
    validation, ``self_sup_data.validation.holdout_indices``); the set's bit depth and channels
    are those of all its training images all the same, so that a run with held-out images
    prepares its images as one without them. ``bit_depth``: of 16-bit images, or their intensity
    window (``load_images``): by default one depth for the set (a training set's), for a model's test
    set the model's (None: image by image); ``.bit_depth``: the one used (None: none for the set).
    ``channels``: 1 or 3 (a model's, for its test set; None: 1 if every image is grey, else 3).
    """

    def __init__(self, root_path, class_name, is_train=True, low_res=None, transform=None,
                 self_sup_args=None, seed=0, kind=None, res_scale=1.0, views=None, exclude=(),
                 layout=None, allow_missing_masks=False, bit_depth=SET_BIT_DEPTH, channels=None):
        layout = detect_layout(root_path, class_name) if layout is None else layout
        recipe = data_recipe(class_name, res_scale, kind)
        if low_res is None:
            low_res = recipe['low_res'] if is_train else recipe['test_res']
        if is_train:
            paths, defect_types, mask_paths = train_files(root_path, class_name, layout), None, None
            excluded = set(checked_indices(exclude, len(paths), class_name))
            if excluded and len(excluded) == len(paths):
                raise ValueError(f"{class_name}: exclude holds all {len(paths)} training images; none is "
                                 f"left to train on")
            if excluded:  # decided on every training file, as a run that holds none out decides
                if bit_depth == SET_BIT_DEPTH:
                    with reading_pool() as pool:
                        bit_depth = set_bit_depth(paths, pool)
                held_out = [path for index, path in enumerate(paths) if index in excluded]
                if channels is None and not all_grey(held_out):
                    channels = 3
            paths = [path for index, path in enumerate(paths) if index not in excluded]
        else:
            files = layout.test_files(root_path, class_name)
            paths, defect_types, mask_paths = files
            missing, defects = unmasked_defects(class_name, layout, files, allow_missing_masks)
            if missing:
                warnings.warn(f"{class_name}: {len(missing)} of {defects} defect images have no "
                              f"mask and are evaluated at image level only (left out of the pixel "
                              f"metrics)")
        images, masks, bit_depth, sizes = load_images(paths, low_res, mask_paths, channels=channels,
                                                      desc=f'loading {class_name}', bit_depth=bit_depth)
        train_size = None
        if transform is None:
            transform, train_size = recipe['transform'], recipe['train_size']
        labels = has_mask = None
        if not is_train:
            labels = [t != 'good' for t in defect_types]
            has_mask = [t == 'good' or m is not None for t, m in zip(defect_types, mask_paths)]
            warn_empty_masks(class_name, paths, defect_types, masks, low_res)
            try:
                with warnings.catch_warnings():  # the training folder's notes are training's to give
                    warnings.simplefilter('ignore')
                    trained = train_files(root_path, class_name, layout)
                    train_sizes = header_sizes(trained)
            except (OSError, ValueError):  # a test set without (readable) training images beside it
                trained, train_sizes = [], []
            warn_sources_tell_defects(class_name, paths, defect_types, sizes, train_sizes)
            warn_repeated_images(class_name, paths, defect_types, trained)
            warn_inverted_masks(class_name, paths, defect_types, masks, low_res)
            if category_kind(class_name, kind) == 'object':
                warn_masks_outside_crop(class_name, paths, defect_types, masks, low_res, recipe['train_size'])
        super().__init__(images, is_train, transform, train_size, self_sup_args, seed,
                         labels=labels, masks=masks, has_mask=has_mask, views=views)
        self.class_name = class_name
        self.layout = layout
        self.kind = category_kind(class_name, kind)
        self.paths = [str(p) for p in paths]
        self.defect_types = ['good'] * len(paths) if is_train else defect_types
        self.mask_paths = mask_paths
        self.bit_depth = bit_depth
        self.image_sizes = sizes


def load_validation_set(root_path, class_name, indices, seed, res_scale=1.0, kind=None,
                        channels=None, kinds=VALIDATION_KINDS, layout=None, bit_depth=None,
                        background=None, side=None):
    """Test-mode dataset of the training images ``indices`` (sorted ``train_files`` order of
    ``layout``, None: detected; held out from training) prepared as test images
    (at ``side``, default ``data_recipe(...)['test_res']``), each as it is and with a synthetic defect
    (``self_sup_data.validation.make_validation_set``, drawn by ``seed``; for objects inside the
    central crop that their models score, and with a ``background``, on the object).
    ``channels`` and ``bit_depth``: the training set's, so that the model gets what it was
    trained on. Held-out images with the bytes of an image trained on are warned of (``warn_copies``)."""
    files = train_files(root_path, class_name, layout)
    paths = [files[index] for index in checked_indices(indices, len(files), class_name)]
    held_out = set(paths)
    warn_copies(class_name, paths, [path for path in files if path not in held_out], 'held-out validation images',
                'images trained on', 'the model has seen them, and the validation score (or a threshold set on '
                'them) takes them for unseen normal images, which favours memorising')
    recipe = data_recipe(class_name, res_scale, kind)
    images = load_images(paths, side or recipe['test_res'], channels=channels,
                         desc=f'loading {class_name} validation', bit_depth=bit_depth,
                         stretch_note=False).images  # training images: noted when the training set is loaded
    crop = recipe['train_size'] if category_kind(class_name, kind) == 'object' else None
    images, labels, masks, defect_types = make_validation_set(images, seed, kinds,
                                                              names=[str(p) for p in paths], crop=crop,
                                                              background=background)
    dataset = SelfSupImageDataset(images, is_train=False, transform=None,
                                  train_size=recipe['train_size'], labels=labels, masks=masks)
    dataset.class_name, dataset.kind = class_name, category_kind(class_name, kind)
    dataset.defect_types = defect_types
    dataset.paths = [str(p) for p in paths] * 2
    return dataset
