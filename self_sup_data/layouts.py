"""Dataset folder layouts: where a category's training images, test images and masks are.

A layout answers, for a root folder and a category name:

    categories(root)            the categories it finds in ``root``
    train_files(root, category) the normal training images, sorted
    test_files(root, category)  LabelledFiles(paths, defect_types, masks), 'good' for normal images
    spec()                      a plain dict that ``layout_from_spec`` turns back into the layout
                                (kept in a trained model's meta so that evaluation reads the same)

A test image's mask is None (a normal image, or a defect image without a mask), a path (any
nonzero pixel is a defect, see ``mvtec.read_mask``), or a tuple of paths whose nonzero pixels
together are the defect (masks whose pixel values are region or defect ids). Mask files are
matched by name (``[`` and ``]`` in a name are plain characters); in the mvtec, ad2 and folder
formats the same letters in either Unicode normal form match (``stem_key``), as macOS may store
them decomposed. ``has_masks`` says whether
the layout gives each defect image a mask (all but the folder layout without a mask folder): then
a missing mask is an error unless asked otherwise (``mvtec.SelfSupMVTecDataset``).

Formats (``--format`` of the command lines; ``detect_layout`` recognises all but ``folder``):

    mvtec   MVTec AD:  <cat>/train/good/*, <cat>/test/<type>/*, <cat>/ground_truth/<type>/<name>_mask.*
    visa    VisA:      split_csv/1cls.csv (object,split,label,image,mask; paths relative to the
                       root), images in <cat>/Data/Images/{Normal,Anomaly}, masks (region ids) in
                       <cat>/Data/Masks/Anomaly; defect type 'anomaly'
    loco    MVTec LOCO AD: <cat>/defects_config.json, <cat>/train/good/*,
                       <cat>/test/{good,logical_anomalies,structural_anomalies}/NNN.png,
                       <cat>/ground_truth/<type>/NNN/000.png, 001.png ... (one PNG per defect)
    ad2     MVTec AD 2: <cat>/train/good/*, <cat>/test_public/{good,bad}/*,
                       <cat>/test_public/ground_truth/bad/<name>_mask.*
    folder  any names: a folder of normal images, a folder of anomalous images, optionally a
            folder of their masks matched by file stem (``abc.jpg`` <- ``abc.png``); a fixed
            fifth of the normal images (``random.Random(0)`` over the sorted paths) is held out
            for testing, the rest trains

``validation/good`` (LOCO, AD 2) is not used: training takes ``train/good`` only (and holds its
validation images out of ``train_files``, see ``mvtec.load_validation_set``).
"""
import csv
import hashlib
import json
import os
import random
import unicodedata
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

from self_sup_data.images import IMAGE_SUFFIXES, decode_mask_values, folder_images, is_image_name, resize_mask

FOLDER_CATEGORY = 'custom'
MASK_SUFFIX = '_mask'  # MVTec AD: ground_truth/<type>/<image stem>_mask.png
NORMAL_TEST_FRACTION = 0.2
AD2_PRIVATE_SPLITS = ('test_private', 'test_private_mixed')


class LabelledFiles(NamedTuple):
    paths: list
    defect_types: list
    masks: list


def _subfolders(folder):
    """The subfolders of ``folder``, sorted; hidden ones (``.thumbnails``, ``.Trash-1000``) left out."""
    if not Path(folder).is_dir():
        return []
    return sorted(p for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith('.'))


def _images_in(folder, what):
    """Sorted images of ``folder``; errors name the folder and ``what`` it should hold."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist; {what}")
    files = folder_images(folder)
    if not files:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}; its subfolders are not read); "
                         f"{what}")
    return files


def _root_dir(root):
    """``root`` as a Path; FileNotFoundError when it is None or not a folder."""
    if root is None:
        raise FileNotFoundError("no data root folder given (-d DATA_DIR); only --format folder works without one")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root folder {root} does not exist; it should hold one folder per "
                                f"category (e.g. {root / 'bottle' / 'train' / 'good'})")
    return root


def _category_dir(layout, root, category):
    root = _root_dir(root)
    found = layout.categories(root)
    if category not in found:
        raise FileNotFoundError(f"category {category!r} not found in {root} (expected {layout.expected}); "
                                f"{layout.name} categories found: {found or 'none'}")
    return root / category


def stem_key(stem):
    """A file stem as masks are matched by: in Unicode normal form NFC, so that a name stored
    decomposed (NFD: ``e`` and a combining accent, as macOS may write it) matches the same name
    stored composed."""
    return unicodedata.normalize('NFC', stem)


def _images_by_stem(images, what):
    """{stem (``stem_key``): path} of the image paths ``images``; ValueError naming two ``what``
    images with the same stem (``000.png`` and ``000.jpg``), which masks are matched by: one mask
    would stand for both, or for the wrong one."""
    by_stem = {}
    for path in images:
        key = stem_key(path.stem)
        if key in by_stem:
            raise ValueError(f"{what} images {by_stem[key]} and {path} have the same stem, by which their masks "
                             f"are found; rename one")
        by_stem[key] = path
    return by_stem


def _masks_by_stem(folder):
    """{image stem (``stem_key``): [its masks]} of the mask files ``<image stem>_mask.<any image
    suffix>`` in ``folder`` (none where it does not exist); the masks of other names under None."""
    by_stem = {}
    for mask in folder_images(folder) if folder.is_dir() else []:
        stem = stem_key(mask.stem[:-len(MASK_SUFFIX)]) if mask.stem.endswith(MASK_SUFFIX) else None
        by_stem.setdefault(stem, []).append(mask)
    return by_stem


def _single_mask(path, masks_by_stem):
    """The mask of the test image ``path`` in ``masks_by_stem`` (``_masks_by_stem``), None without
    one; ValueError where it has several (``000_mask.png`` and ``000_mask.tif``)."""
    candidates = masks_by_stem.get(stem_key(path.stem), [])
    if len(candidates) > 1:
        raise ValueError(f"{path} has {len(candidates)} masks: {', '.join(str(mask) for mask in candidates)}; "
                         f"keep one")
    return candidates[0] if candidates else None


# names of a test folder that would hold normal images in another dataset's convention, as ``folder_name_key``
# gives them (AITEX's NODefect_images, Kaggle casting's ok_front, magnetic tile's MT_Free, crack sets' Negative ...);
# only 'good' is read as normal
NORMAL_FOLDER_NAMES = {'good', 'normal', 'normals', 'ok', 'okfront', 'nominal', 'defectfree', 'nodefect', 'nodefects',
                       'nondefect', 'nondefects', 'nondefective', 'notdefective', 'noanomaly', 'noanomalies',
                       'anomalyfree', 'flawless', 'negative', 'mtfree'}
FOLDER_NAME_ENDINGS = ('images', 'image', 'samples')  # left out of a key: 'NODefect_images' is 'nodefect'


def folder_name_key(name):
    """A folder name as ``NORMAL_FOLDER_NAMES`` holds it: case-folded, letters and digits only,
    without a FOLDER_NAME_ENDING (``Defect-Free``, ``defect free`` and ``defect_free_images`` ->
    ``defectfree``)."""
    key = ''.join(character for character in name.casefold() if character.isalnum())
    for ending in FOLDER_NAME_ENDINGS:
        if key.endswith(ending) and len(key) > len(ending):
            return key[:-len(ending)]
    return key


def _typed_test_files(test_dir, mask_of, what, masks_dir=None):
    """Images of the sub-folders of ``test_dir`` (type = folder name; not ``masks_dir``, the name of
    a sub-folder that holds the masks) and ``mask_of(type, path)``; the errors of ``_images_by_stem``
    for the defect images of each folder, and a ValueError for a folder named as normal images other
    than ``good`` (``Good``, ``normal``, ``ok``: ``NORMAL_FOLDER_NAMES``), whose images would be scored
    as defects; a warning counts the images directly in ``test_dir``, which have no type and are
    left out."""
    if not Path(test_dir).is_dir():
        raise FileNotFoundError(f"{test_dir} does not exist; {what}")
    loose = sorted(p.name for p in Path(test_dir).iterdir() if p.is_file() and is_image_name(p))
    if loose:
        warnings.warn(f"{test_dir}: {len(loose)} image{'s' * (len(loose) != 1)} directly in it left out (first: "
                      f"{loose[0]}): a test image belongs in the sub-folder of its type ({what})")
    paths, defect_types, masks = [], [], []
    for type_dir in (folder for folder in _subfolders(test_dir) if folder.name != masks_dir):
        # a normal folder of another name: its images would be scored as defects
        if folder_name_key(type_dir.name) in NORMAL_FOLDER_NAMES and type_dir.name != 'good':
            raise ValueError(f"{type_dir}: normal test images belong in {type_dir.with_name('good')} (this name, in "
                             f"lower case); other folders of {test_dir} hold defect types, so its images would "
                             f"be scored as defects")
        images = folder_images(type_dir)
        if type_dir.name != 'good':
            _images_by_stem(images, 'defect')
        for path in images:
            paths.append(path)
            defect_types.append(type_dir.name)
            masks.append(None if type_dir.name == 'good' else mask_of(type_dir.name, path))
    if not paths:
        raise ValueError(f"{test_dir} holds no images in its sub-folders; {what}")
    return LabelledFiles(paths, defect_types, masks)


class CategoryLayout:
    """A layout with one folder per category; normal training images in ``<cat>/train/good``."""
    name = expected = None
    has_masks = True

    def train_files(self, root, category):
        folder = _category_dir(self, root, category) / 'train' / 'good'
        return _images_in(folder, 'training needs normal images there')

    def spec(self):
        return {'format': self.name}


class MVTecLayout(CategoryLayout):
    name = 'mvtec'
    expected = '<cat>/train/good/*.png, <cat>/test/<type>/*.png, <cat>/ground_truth/<type>/<name>_mask.png'

    def categories(self, root):
        """Folders of ``root`` that hold ``train/good`` or ``test``."""
        return [p.name for p in _subfolders(root) if (p / 'train' / 'good').is_dir() or (p / 'test').is_dir()]

    def test_files(self, root, category):
        """The test images and their masks (``ground_truth/<type>/<stem>_mask.<any image suffix>``; each
        mask folder listed once); a warning counts the masks of a folder that match no image."""
        category_dir = _category_dir(self, root, category)
        masks_by_type = {}

        def mask_of(defect_type, path):
            if defect_type not in masks_by_type:
                masks_by_type[defect_type] = _masks_by_stem(category_dir / 'ground_truth' / defect_type)
            return _single_mask(path, masks_by_type[defect_type])
        files = _typed_test_files(category_dir / 'test', mask_of, 'testing needs test/good and test/<defect> folders')
        for defect_type, by_stem in masks_by_type.items():
            stems = {stem_key(path.stem) for path, t in zip(files.paths, files.defect_types) if t == defect_type}
            unmatched = sorted(str(mask) for stem, masks in by_stem.items() if stem not in stems for mask in masks)
            if unmatched:
                warnings.warn(f"{category}: {len(unmatched)} of the masks in ground_truth/{defect_type} match no image "
                              f"of test/{defect_type} (first: {unmatched[0]}); a mask is named <image name>_mask.png")
        return files


class LocoLayout(CategoryLayout):
    """MVTec LOCO AD; ``defects(root, category)`` reads ``defects_config.json`` (for sPRO)."""
    name = 'loco'
    expected = ('<cat>/defects_config.json, <cat>/train/good/*.png, '
                '<cat>/test/{good,logical_anomalies,structural_anomalies}/NNN.png, '
                '<cat>/ground_truth/<type>/NNN/000.png')

    def categories(self, root):
        return [p.name for p in _subfolders(root) if (p / 'defects_config.json').is_file()]

    def test_files(self, root, category):
        category_dir = _category_dir(self, root, category)

        def mask_of(defect_type, path):  # all PNGs of ground_truth/<type>/<stem>/, or None
            folder = category_dir / 'ground_truth' / defect_type / path.stem
            masks = tuple(p for p in folder_images(folder) if p.suffix.lower() == '.png') \
                if folder.is_dir() else ()
            return masks or None
        return _typed_test_files(category_dir / 'test', mask_of,
                                 'testing needs test/good, test/logical_anomalies and '
                                 'test/structural_anomalies folders')

    def defects(self, root, category):
        """{pixel value: (defect name, saturation threshold, relative)} from defects_config.json."""
        path = _category_dir(self, root, category) / 'defects_config.json'
        try:
            entries = json.loads(path.read_text())
            defects = {int(e['pixel_value']): (e['defect_name'], float(e['saturation_threshold']),
                                               bool(e['relative_saturation'])) for e in entries}
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"cannot read {path}: {error!r}; it should be a list of "
                             "{defect_name, pixel_value, saturation_threshold, relative_saturation}") from error
        if len(defects) < len(entries):
            values = [int(e['pixel_value']) for e in entries]
            repeated = sorted({value for value in values if values.count(value) > 1})
            raise ValueError(f"{path} lists the pixel values {repeated} more than once; each value "
                             f"names one defect")
        return defects

    def defect_regions(self, root, category, mask_paths, size):
        """The defects of test images for ``metrics.au_spro``: [(bool size x size mask, saturation
        in pixels)], one per mask PNG of ``mask_paths`` (one image's ``test_files`` tuple, or the
        PNGs of several images). The PNG's pixel value names its entry in defects_config.json; a
        relative threshold is a fraction of the defect's area, an absolute one a pixel count at
        the PNG's resolution, rescaled to ``size`` and capped at the area."""
        defects = self.defects(root, category)
        regions = []
        for path in mask_paths:
            mask = decode_mask_values(path)
            values = np.unique(mask[mask > 0])
            if len(values) != 1 or int(values[0]) not in defects:
                raise ValueError(f"mask {path} should hold one pixel value of {sorted(defects)} "
                                 f"(defects_config.json), found {values.tolist()}")
            _, threshold, relative = defects[int(values[0])]
            resized = resize_mask(mask > 0, size)
            area = np.count_nonzero(resized)
            scaled = threshold * area if relative else threshold * size * size / mask.size
            regions.append((resized, min(scaled, area)))
        return regions


class AD2Layout(CategoryLayout):
    name = 'ad2'
    expected = ('<cat>/train/good/*.png, <cat>/test_public/{good,bad}/*.png, '
                '<cat>/test_public/ground_truth/bad/<name>_mask.png')

    def categories(self, root):
        return [p.name for p in _subfolders(root) if (p / 'test_public').is_dir()]

    def test_files(self, root, category):
        test_dir = _category_dir(self, root, category) / 'test_public'
        masks_by_type = {}

        def mask_of(defect_type, path):
            if defect_type not in masks_by_type:
                masks_by_type[defect_type] = _masks_by_stem(test_dir / 'ground_truth' / defect_type)
            return _single_mask(path, masks_by_type[defect_type])
        return _typed_test_files(test_dir, mask_of, 'testing needs test_public/good and test_public/bad',
                                 masks_dir='ground_truth')

    def private_files(self, root, category, split):
        """The unlabelled images of ``<cat>/<split>`` (test_private or test_private_mixed), sorted."""
        if split not in AD2_PRIVATE_SPLITS:
            raise ValueError(f"split must be one of {AD2_PRIVATE_SPLITS}, got {split!r}")
        return _images_in(_category_dir(self, root, category) / split,
                          "MVTec AD 2's evaluation server scores the maps of these images")


class VisALayout(CategoryLayout):
    name = 'visa'
    split_csv = Path('split_csv') / '1cls.csv'
    expected = ('split_csv/1cls.csv (object,split,label,image,mask), <cat>/Data/Images/{Normal,Anomaly}/*, '
                '<cat>/Data/Masks/Anomaly/*.png')

    def categories(self, root):
        return [p.name for p in _subfolders(root) if (p / 'Data' / 'Images').is_dir()]

    def _rows(self, root, category, split):
        """The CSV rows of ``category`` and ``split`` with their files checked."""
        _category_dir(self, root, category)
        path = Path(root) / self.split_csv
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; VisA's split file lists each image "
                                    "(columns object,split,label,image,mask)")
        try:
            with open(path, newline='', encoding='utf-8-sig') as file:  # a byte-order mark is no column's
                reader = csv.DictReader(file)
                missing = {'object', 'split', 'label', 'image', 'mask'} - set(reader.fieldnames or [])
                if missing:
                    raise ValueError(f"{path} lacks the columns {sorted(missing)}; VisA's split file has "
                                     "object,split,label,image,mask")
                category_rows = [row for row in reader if row['object'] == category]
        except (UnicodeDecodeError, csv.Error) as error:
            raise ValueError(f"cannot read {path}: {error}; VisA's split file is UTF-8 CSV") from error
        listed = {}
        for row in category_rows:  # an image in two rows: trained on and tested, or counted twice
            image = os.path.normpath(row['image'])
            if image in listed:
                raise ValueError(f"{path} lists the {category} image {row['image']!r} twice (splits "
                                 f"{listed[image]!r} and {row['split']!r}); list each image once")
            listed[image] = row['split']
        rows = [row for row in category_rows if row['split'] == split]
        if not rows:
            raise ValueError(f"{path} has no rows with object={category!r} and split={split!r}")
        for row in rows:
            labels = ('normal',) if split == 'train' else ('normal', 'anomaly')
            if row['label'] not in labels:
                raise ValueError(f"{path}: the {split} image {row['image']!r} has the label "
                                 f"{row['label']!r}; VisA's {split} split labels its images "
                                 f"{' or '.join(map(repr, labels))}")
            for column in ('image', 'mask') if row['label'] == 'anomaly' else ('image',):
                if not row[column] or not (Path(root) / row[column]).is_file():
                    raise FileNotFoundError(f"{path}: the {column} {row[column]!r} of {row['image']!r} "
                                            f"is not a file under {root}")
        return rows

    def train_files(self, root, category):
        return sorted(Path(root) / row['image'] for row in self._rows(root, category, 'train'))

    def test_files(self, root, category):
        rows = sorted(self._rows(root, category, 'test'), key=lambda row: (row['label'] != 'normal', row['image']))
        return LabelledFiles([Path(root) / row['image'] for row in rows],
                         ['good' if row['label'] == 'normal' else 'anomaly' for row in rows],
                         [None if row['label'] == 'normal' else (Path(root) / row['mask'],) for row in rows])


class FolderLayout:
    """Normal and anomalous images from two folders, masks (optional) matched by stem."""
    name = 'folder'

    def __init__(self, normal, abnormal=None, mask_dir=None, held_out_sha256=None):
        self.normal = Path(normal)
        self.abnormal = None if abnormal is None else Path(abnormal)
        self.mask_dir = None if mask_dir is None else Path(mask_dir)
        self.held_out_sha256 = held_out_sha256  # of a trained model's normal test fifth (spec)
        self.expected = (f'normal images in {self.normal}, anomalous images in {self.abnormal}, '
                         f'masks named as the anomalous images in {self.mask_dir}')
        self.has_masks = self.mask_dir is not None

    def categories(self, root=None):
        return [FOLDER_CATEGORY]

    def _normal_split(self):
        """(train, test) normal images: a fixed shuffle of the sorted paths, the first fifth tests.
        With ``held_out_sha256`` (a trained model's layout), a ValueError when the test fifth is no
        longer the one the model held out (the folder changed: the shuffle moves every image)."""
        files = _images_in(self.normal, 'the folder layout needs normal images there')
        if len(files) < 2:
            raise ValueError(f"{self.normal} holds one image; the folder layout needs at least two normal "
                             "images (a fifth of them is held out for testing)")
        shuffled = list(files)
        random.Random(0).shuffle(shuffled)
        n_test = max(1, round(NORMAL_TEST_FRACTION * len(files)))
        train, test = sorted(shuffled[n_test:]), sorted(shuffled[:n_test])
        if self.held_out_sha256 is not None and names_sha256(test) != self.held_out_sha256:
            raise ValueError(f"the normal images in {self.normal} ({len(files)} now) are not those the "
                             f"model was trained with: their held-out test fifth would be another set, "
                             f"with images the model trained on; evaluate on the folder as it was")
        return train, test

    def train_files(self, root=None, category=None):
        return self._normal_split()[0]

    def _masks(self, abnormal):
        """{image path: mask path} for the masks of ``mask_dir`` whose stem is an image's stem."""
        if self.mask_dir is None:
            return {}
        masks = _images_in(self.mask_dir, 'it should hold the masks of the anomalous images, named as they are')
        by_stem = {}
        for mask in masks:
            key = stem_key(mask.stem)
            if key in by_stem:
                raise ValueError(f"masks {by_stem[key]} and {mask} have the same stem; "
                                 "keep one mask per anomalous image")
            by_stem[key] = mask
        seen = _images_by_stem(abnormal, 'anomalous')
        unmatched = sorted(set(by_stem) - set(seen))
        if unmatched:
            raise ValueError(f"masks in {self.mask_dir} match no image of {self.abnormal} by name: "
                             f"{unmatched[:5]}; each mask there must be named as an anomalous image (abc.png for "
                             f"abc.jpg): move the others out")
        return {path: by_stem.get(stem_key(path.stem)) for path in abnormal}

    def normal_test_files(self):
        """The normal images held out for testing (the fixed fifth of ``_normal_split``)."""
        return self._normal_split()[1]

    def test_files(self, root=None, category=None):
        if self.abnormal is None:
            raise ValueError("the folder layout needs a folder of anomalous images for testing (--abnormal DIR)")
        abnormal = _images_in(self.abnormal, 'the folder layout tests on the anomalous images there')
        train, normal = self._normal_split()
        both = sorted({path.resolve() for path in train + normal} & {path.resolve() for path in abnormal})
        if both:
            raise ValueError(f"{len(both)} images are both normal ({self.normal}) and anomalous "
                             f"({self.abnormal}), e.g. {[str(path) for path in both[:3]]}; an image is "
                             f"either normal or anomalous")
        for role, folder in (('normal', self.normal), ('anomalous', self.abnormal)):
            if self.mask_dir is not None and self.mask_dir.resolve() == folder.resolve():
                raise ValueError(f"the mask folder {self.mask_dir} is the {role} image folder: its images "
                                 f"would be their own masks; keep the masks in a folder of their own")
        masks = self._masks(abnormal)
        return LabelledFiles(normal + abnormal, ['good'] * len(normal) + ['anomaly'] * len(abnormal),
                         [None] * len(normal) + [masks.get(path) for path in abnormal])

    def spec(self):
        return {'format': self.name, 'normal': str(self.normal.resolve()),
                'abnormal': self.abnormal and str(self.abnormal.resolve()),
                'mask_dir': self.mask_dir and str(self.mask_dir.resolve()),
                'held_out_sha256': names_sha256(self._normal_split()[1])}


def names_sha256(paths):
    """SHA-256 (hex) of the sorted file names of ``paths`` (not their folders: data may move)."""
    return hashlib.sha256('\n'.join(sorted(Path(path).name for path in paths)).encode()).hexdigest()


def contents_sha256(paths, chunk_bytes=1 << 20):
    """SHA-256 (hex) of the files at ``paths``, each its name and its bytes, in the order of their
    sorted names (not their folders: data may move): images replaced under the same names (a dataset
    converted or downloaded again) change it. OSError naming a file that cannot be read."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda path: (Path(path).name, str(path))):
        name = os.fsencode(Path(path).name)
        digest.update(len(name).to_bytes(8, 'little') + name)
        _feed_file(digest, path, chunk_bytes, with_size=True)
    return digest.hexdigest()


def _feed_file(digest, path, chunk_bytes=1 << 20, with_size=False):
    """Update ``digest`` with the bytes of the file at ``path`` (after its size in 8 bytes, with
    ``with_size``), chunk by chunk -> ``digest``."""
    with open(path, 'rb') as file:
        if with_size:
            digest.update(os.fstat(file.fileno()).st_size.to_bytes(8, 'little'))
        while chunk := file.read(chunk_bytes):
            digest.update(chunk)
    return digest


def identical_files(paths, others, digests=None):
    """[(path, other)] for each of ``paths`` whose bytes a file of ``others`` has (the first such
    other; a link to it too). Files are compared by size, then by SHA-256: only files of a size in
    common are read, each once (``digests``: {real path: digest}, a cache that calls may share)."""
    digests = {} if digests is None else digests

    def digest(path):
        real = os.path.realpath(path)
        if real not in digests:
            digests[real] = _feed_file(hashlib.sha256(), real).hexdigest()
        return digests[real]
    by_size = {}
    for other in others:
        by_size.setdefault(os.path.getsize(other), []).append(other)
    first_of, hashed, pairs = {}, set(), []  # (size, digest) -> the first other of that content
    for path in paths:
        size = os.path.getsize(path)
        if size not in by_size:
            continue
        if size not in hashed:  # the others of this size, once
            hashed.add(size)
            for other in by_size[size]:
                first_of.setdefault((size, digest(other)), other)
        match = first_of.get((size, digest(path)))
        if match is not None:
            pairs.append((path, match))
    return pairs


def warn_copies(prefix, files, others, subject, source, consequence, digests=None):
    """Warn, with their count and the first pair, about the ``files`` with the bytes of a file of
    ``others`` (``identical_files``; ``digests``: its cache), the message starting with ``prefix``
    (a category, a test set, a model) and naming them ``subject`` and ``source``; a file that cannot
    be read leaves the check out with a warning."""
    try:
        repeated = identical_files(files, others, digests)
    except OSError as error:  # a file that cannot be read: the check is left out, not the evaluation
        warnings.warn(f"{prefix}: {subject} not compared with {source} ({error})")
        return
    if repeated:
        warnings.warn(f"{prefix}: {len(repeated)} of {len(files)} {subject} are copies of {source} (first: "
                      f"{repeated[0][0]}, the same bytes as {repeated[0][1]}): {consequence}, so the figures are "
                      f"biased; keep each image in one place")


LAYOUTS = {layout.name: layout for layout in (VisALayout(), LocoLayout(), AD2Layout(), MVTecLayout())}
FORMATS = tuple(LAYOUTS) + ('folder',)


def _listing(folder, limit=12):
    if not Path(folder).is_dir():
        return f"{folder} does not exist"
    entries = sorted(p.name + ('/' if p.is_dir() else '') for p in Path(folder).iterdir())
    more = f" ... ({len(entries)} entries)" if len(entries) > limit else ''
    return f"{folder} holds: {', '.join(entries[:limit]) or 'nothing'}{more}"


def detect_layout(root, category=None):
    """The layout of ``root`` (and of ``category`` in it, if given): the first of visa, loco, ad2,
    mvtec that finds the category (or, without one, any category). FileNotFoundError otherwise,
    saying what each layout expected and what the folder holds."""
    root = _root_dir(root)
    for layout in LAYOUTS.values():
        found = layout.categories(root)
        if (category in found) if category is not None else found:
            return layout
    every = sorted({c for layout in LAYOUTS.values() for c in layout.categories(root)})
    what = f"category {category!r} not found in {root}" if category else f"no category found in {root}"
    expected = '; '.join(f"{name}: {layout.expected}" for name, layout in LAYOUTS.items())
    found_here = _listing(root / category) if category and (root / category).is_dir() else _listing(root)
    raise FileNotFoundError(f"{what} in any layout; categories found: {every or 'none'}; expected "
                            f"({expected}; folder: --format folder --normal DIR --abnormal DIR "
                            f"[--mask-dir DIR]); found: {found_here}{_category_folder_hint(root)}")


def _category_folder_hint(root):
    """Where the data folder ``root`` is itself a category folder (a common slip: the category's
    path given as the data folder), what to give instead; else ''."""
    if not root.name:  # the file system's root
        return ''
    parent = root.parent
    listed = [name for name, layout in LAYOUTS.items() if root.name in layout.categories(parent)]
    if listed and (listed != ['mvtec'] or (root / 'train' / 'good').is_dir()):  # not any folder with test/
        return (f"; {root} is itself a category folder: give the folder above it as the data folder and "
                f"its name as the category (-d {parent} -n {root.name})")
    return ''


def make_layout(format, normal=None, abnormal=None, mask_dir=None, held_out_sha256=None):
    """The layout of a ``--format`` name (None: detect it later); ``folder`` needs ``normal``
    (``held_out_sha256``: from a trained model's spec)."""
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; valid: {', '.join(FORMATS)}")
    if format == 'folder':
        if normal is None:
            raise ValueError("--format folder needs --normal DIR (and --abnormal DIR for testing)")
        return FolderLayout(normal, abnormal, mask_dir, held_out_sha256)
    if normal is not None or abnormal is not None or mask_dir is not None:
        raise ValueError("--normal, --abnormal and --mask-dir belong to --format folder")
    return None if format is None else LAYOUTS[format]


def layout_from_spec(spec):
    """The layout that ``Layout.spec()`` describes; None (detect) for None (older models)."""
    if spec is None:
        return None
    spec = dict(spec)
    return make_layout(spec.pop('format'), **spec)


class DefectFolders:
    """The test folders of models of the folder format, given to an evaluation without
    ``--format folder --normal``: ``abnormal`` (None: each model's own) and ``mask_dir`` (None: the
    model's own where ``abnormal`` is its own too, else no masks), with each model's own normal
    folder (``layout_for_model``), e.g. defect images found after training."""

    def __init__(self, abnormal=None, mask_dir=None):
        self.abnormal, self.mask_dir = abnormal, mask_dir


def layout_for_model(layout, spec):
    """The layout in which a trained model's data are read: ``layout`` (given on the command line)
    or else the one of the model's ``spec`` (None: detect). A folder layout given for a model of
    the folder format gets the model's ``held_out_sha256``, so that a changed normal folder is
    refused however the folders are named; ``DefectFolders`` get the model's normal folder (a
    ValueError for a model of another format)."""
    if layout is None:
        return layout_from_spec(spec)
    if isinstance(layout, DefectFolders):
        if not spec or spec.get('format') != 'folder':
            layout_name = (spec or {}).get('format', 'detected')
            raise ValueError(f"--abnormal and --mask-dir without --format folder are the test folders of models of "
                             f"the folder format; this model's data are in the {layout_name} layout of its data "
                             f"folder (-d)")
        return FolderLayout(spec['normal'], layout.abnormal or spec.get('abnormal'),
                            layout.mask_dir or (None if layout.abnormal else spec.get('mask_dir')),
                            spec.get('held_out_sha256'))
    if isinstance(layout, FolderLayout) and spec and spec.get('format') == 'folder':
        return FolderLayout(layout.normal, layout.abnormal, layout.mask_dir, spec.get('held_out_sha256'))
    return layout

