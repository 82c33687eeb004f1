"""NIH ChestX-ray14: datasets from file lists, and a list builder over the NIH label table.

Images are read from ``data_dir`` by the names in list files (one file name per line, relative
to ``data_dir``), converted to one channel and resized once to ``res x res``. Training items are
NSA's self-supervised samples (as for MVTec, see ``self_sup_data.mvtec``) after the paper's
augmentation: rotation by up to 3 degrees, centre crop ``230/256 * res``, random crop
``train_size`` (224 at res 256). Test items are ``(image, 0 normal / 1 anomalous, mask)``;
masks come from NIH's ``BBox_List_2017.csv`` (boxes drawn as filled rectangles), where given.

List builder (normal = 'No Finding'; every other label is anomalous)::

    python -m self_sup_data.chest_xray --csv Data_Entry_2017.csv[.gz] --out DIR \
        [--gender M|F] [--min-age 18] [--view PA|AP|any] [--n-test-normal 300] [--n-test-anom 150] [--seed 0]

writes ``DIR/norm_train.txt``, ``DIR/norm_test.txt`` and ``DIR/anom_test.txt``. The split is by
patient: test patients are drawn at random until both test lists are full, and no image of a
test patient is used for training (NIH patients have many follow-up images; an image split
would put near-duplicates of training images into the test set). The paper's hand-curated lists
cannot be reproduced by a rule over the table; pass them to the training script instead.
"""
import argparse
import math
import os
import posixpath
import warnings
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from self_sup_data.mvtec import SET_BIT_DEPTH, SelfSupImageDataset, load_images, warn_sources_tell_defects
from self_sup_data.transforms import CenterCrop, Compose, RandomCrop, RandomRotation

NORMAL_FINDING = 'No Finding'
TABLE_COLUMNS = ('Image Index', 'Finding Labels', 'Patient ID', 'Patient Age', 'Patient Gender',
                 'View Position')
BBOX_COLUMNS = ('Image Index', 'Finding Label', 'Bbox [x', 'y', 'w', 'h]')
BBOX_IMAGE_SIDE = 1024  # NIH boxes are in the coordinates of the distributed 1024 x 1024 images
LIST_NAMES = ('norm_train', 'norm_test', 'anom_test')
PROG = 'python -m self_sup_data.chest_xray'


def chest_recipe(res=256):
    """The paper's training augmentation at image side ``res`` -> dict(train_size, transform).

    Rotation up to 3 degrees, centre crop ``round(res * 230/256)``, random crop ``train_size`` =
    the largest multiple of 32 not above ``res * 224/256`` (224 at 256, 448 at 512, 96 at 128).
    """
    train_size = max(32, 32 * math.floor(res * 224 / 256 / 32))
    crop = int(res * 230 / 256 + 0.5)
    if train_size > crop:
        raise ValueError(f"res={res} is too small for a {train_size}-pixel training crop; use res >= 64")
    return dict(train_size=train_size,
                transform=Compose([RandomRotation(3), CenterCrop(crop), RandomCrop(train_size)]))


def read_file_list(file_list):
    """Names from a list file (one per line, blank lines skipped), or a given sequence of names,
    normalised (``./a.png`` and ``a.png`` are one name; ``posixpath.normpath``)."""
    if isinstance(file_list, (str, os.PathLike)):
        path = Path(file_list)
        if path.is_dir():
            raise ValueError(f"file list {path} is a folder; give a text file of image names, one per line")
        if not path.is_file():
            raise FileNotFoundError(f"file list {path} does not exist")
        try:
            text = path.read_text(encoding='utf-8-sig')  # a byte-order mark is not a name's
        except UnicodeDecodeError as error:
            raise ValueError(f"file list {path} is not UTF-8 text ({error.reason} at byte "
                             f"{error.start}); write one image name per line") from None
        return [posixpath.normpath(line.strip()) for line in text.splitlines() if line.strip()]
    return [posixpath.normpath(str(name)) for name in file_list]


def list_label(file_list, what):
    """How errors name a list: ``'the normal list norm_test.txt'``, or ``'the normal list'`` for
    names given directly."""
    path = f' {file_list}' if isinstance(file_list, (str, os.PathLike)) else ''
    return f'the {what} list{path}'


def _existing_paths(data_dir, names, label):
    if not names:
        raise ValueError(f"{label} is empty")
    paths = [Path(data_dir) / name for name in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} images of {label} are missing from "
                                f"{data_dir}, e.g. {missing[:3]}")
    return paths


def check_listed_once(names, label, why):
    """ValueError naming the list ``label`` and a few of its ``names`` listed more than once, with
    ``why`` a name may appear once only."""
    twice = sorted(name for name, count in Counter(names).items() if count > 1)
    if twice:
        raise ValueError(f"{label} names {len(twice)} images more than once, e.g. {twice[:3]}; {why}")


def check_one_file_each(paths, names, labels):
    """ValueError naming the lists where two of ``names`` are one image file (``paths``: where each
    lies, in the data folder; an absolute name and a relative one, or a name through a link), whose
    image would count twice; ``labels``: the list each name is from."""
    seen = {}
    for path, name, label in zip(paths, names, labels):
        key = os.path.realpath(path)  # through links too
        if key in seen:
            (first, first_label) = seen[key]
            where = label if first_label == label else f'{first_label} and {label}'
            raise ValueError(f"{where}: the names {first!r} and {name!r} are one image ({key}); "
                             f"each image is listed once")
        seen[key] = name, label


def listed_paths(data_dir, normal, anomalous, normal_label='the normal list',
                 anomalous_label='the anomalous list'):
    """The paths in ``data_dir`` of the ``normal`` and then the ``anomalous`` names (none: training);
    FileNotFoundError naming the list of missing images, ValueError where two names are one image
    (``check_one_file_each``)."""
    paths = _existing_paths(data_dir, normal, normal_label) + (
        _existing_paths(data_dir, anomalous, anomalous_label) if anomalous else [])
    check_one_file_each(paths, normal + anomalous,
                        [normal_label] * len(normal) + [anomalous_label] * len(anomalous))
    return paths


def check_test_lists(normal, anomalous, normal_label='the normal list',
                     anomalous_label='the anomalous list'):
    """ValueError for an empty list of test names, a name listed twice in one list (its image
    would be scored twice), or names in both (an image labelled normal and anomalous), naming the
    lists."""
    for names, label in ((normal, normal_label), (anomalous, anomalous_label)):
        if not names:
            raise ValueError(f"{label} is empty; testing needs normal and anomalous images")
        check_listed_once(names, label, 'each test image is scored once')
    both = sorted(set(normal) & set(anomalous))
    if both:
        raise ValueError(f"{len(both)} images are in both {normal_label} and {anomalous_label}, "
                         f"e.g. {both[:3]}; an image is either normal or anomalous")


def _check_columns(table, required, source):
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise KeyError(f"{source} lacks columns {missing}; expected {list(required)}, "
                       f"found {list(table.columns)}")


def _bad_rows(flags):
    """The CSV line numbers (header line 1) of the rows where ``flags`` is true, a few of them."""
    return [int(i) + 2 for i in np.flatnonzero(np.asarray(flags))[:5]]


def read_bbox_table(bbox_csv):
    """NIH ``BBox_List_2017.csv`` -> DataFrame with columns image, label, x, y, w, h (numbers);
    ValueError naming the file for a file that is not such a table, and the lines of boxes that are
    not numbers, not of positive width and height, or outside the 1024-pixel frame (their masks
    would be empty)."""
    try:
        table = pd.read_csv(bbox_csv, index_col=False)  # rows ending in a comma do not shift the columns
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, OSError) as error:
        raise ValueError(f"cannot read box table {bbox_csv}: {str(error).strip().splitlines()[0]}; "
                         f"expected NIH's BBox_List_2017.csv, with columns {list(BBOX_COLUMNS)}") from None
    _check_columns(table, BBOX_COLUMNS, bbox_csv)
    table = table[list(BBOX_COLUMNS)]
    table.columns = ['image', 'label', 'x', 'y', 'w', 'h']
    for column in ('x', 'y', 'w', 'h'):
        table[column] = pd.to_numeric(table[column], errors='coerce')
    bad = table[['x', 'y', 'w', 'h']].isna().any(axis=1) | table['image'].isna()
    if bad.any():
        raise ValueError(f"box table {bbox_csv}: {int(bad.sum())} rows without an image name or "
                         f"with boxes that are not numbers, on lines {_bad_rows(bad)}")
    empty = ((table['w'] <= 0) | (table['h'] <= 0) | (table['x'] >= BBOX_IMAGE_SIDE) | (table['y'] >= BBOX_IMAGE_SIDE)
             | (table['x'] + table['w'] <= 0) | (table['y'] + table['h'] <= 0))
    if empty.any():
        raise ValueError(f"box table {bbox_csv}: {int(empty.sum())} boxes without a positive width and height "
                         f"inside the {BBOX_IMAGE_SIDE} x {BBOX_IMAGE_SIDE} frame of NIH's images, on lines "
                         f"{_bad_rows(empty)}")
    return table


def box_masks(boxes, names, size):
    """uint8 ``size x size`` masks (1 inside any box of the image), for the names that have boxes.

    ``boxes``: DataFrame (image, x, y, w, h) in 1024-pixel coordinates, matched by file name.
    """
    scale = size / BBOX_IMAGE_SIDE
    by_image = {name: rows for name, rows in boxes.groupby('image')}
    masks = {}
    for name in names:
        rows = by_image.get(Path(name).name)
        if rows is None:
            continue
        mask = np.zeros((size, size), np.uint8)
        for x, y, w, h in rows[['x', 'y', 'w', 'h']].to_numpy(float):  # each inside the frame (read_bbox_table)
            top, left = max(0, math.floor(y * scale)), max(0, math.floor(x * scale))
            bottom, right = math.ceil((y + h) * scale), math.ceil((x + w) * scale)
            mask[top:max(top + 1, bottom), left:max(left + 1, right)] = 1  # at least one pixel
        masks[name] = mask
    return masks


class SelfSupChestXRay(SelfSupImageDataset):
    """Single-channel chest X-rays from file lists.

    data_dir: folder the names are relative to. normal_files / anom_files: list file paths or
    sequences of names; training uses the normal images only. bbox_csv: NIH's
    ``BBox_List_2017.csv`` for test masks; anomalous images without a box (or without bbox_csv)
    have ``has_mask`` False (image-level evaluation only). res: image side after resizing.
    transform: training transform (default ``chest_recipe(res)``). self_sup_args: ``patch_ex``
    keyword arguments. Items and seeding as ``SelfSupImageDataset``; ``.paths``,
    ``.defect_types`` ('good' / 'anomaly') and ``.has_mask`` describe the test items.
    ``bit_depth``: of 16-bit images, as for ``SelfSupMVTecDataset`` (``.bit_depth``).
    """

    def __init__(self, data_dir, normal_files, anom_files=None, bbox_csv=None, is_train=True, res=256,
                 transform=None, self_sup_args=None, seed=0, bit_depth=SET_BIT_DEPTH):
        normal = read_file_list(normal_files)
        anomalous = [] if is_train or anom_files is None else read_file_list(anom_files)
        labels = list_label(normal_files, 'normal'), list_label(anom_files, 'anomalous')
        if is_train:  # a repeat would weight its image twice, as a second copy of the data would
            check_listed_once(normal, labels[0], 'each training image is listed once')
        else:
            check_test_lists(normal, anomalous, *labels)
        names = normal + anomalous
        paths = listed_paths(data_dir, normal, anomalous, *labels)
        images, _, bit_depth, sizes = load_images(paths, res, channels=1, desc='loading chest X-rays',
                                                  bit_depth=bit_depth)
        train_size = None
        if transform is None:
            recipe = chest_recipe(res)
            transform, train_size = recipe['transform'], recipe['train_size']
        masks = [None] * len(names)
        has_mask = [True] * len(normal) + [False] * len(anomalous)
        if not is_train and bbox_csv is not None:
            boxed = box_masks(read_bbox_table(bbox_csv), anomalous, res)
            for i, name in enumerate(anomalous, start=len(normal)):
                masks[i] = boxed.get(name)
                has_mask[i] = name in boxed
        super().__init__(images, is_train, transform, train_size, self_sup_args, seed,
                         labels=[0] * len(normal) + [1] * len(anomalous), masks=masks, has_mask=has_mask)
        self.paths = [str(p) for p in paths]
        self.defect_types = ['good'] * len(normal) + ['anomaly'] * len(anomalous)
        self.bit_depth = bit_depth
        self.image_sizes = sizes
        if not is_train:
            warn_sources_tell_defects('chest_xray', self.paths, self.defect_types, sizes)


# ----------------------------------------------------------------------------- list builder

AGE_UNITS = {'Y': 1, 'M': 12, 'D': 365}  # ages written '058Y', '003M', '010D': units per year


def ages_in_years(ages, csv):
    """``Patient Age`` as years (float): numbers as they are, and the ``NNNY``/``NNNM``/``NNND``
    strings of some versions of the table converted; ValueError naming ``csv``, and a few values
    that are neither with their lines (``ages``: the column in the table's order)."""
    numbers = pd.to_numeric(ages, errors='coerce')
    written = ages[numbers.isna()].astype(str).str.extract(r'^\s*(\d+)\s*([YMD])\s*$')
    numbers = numbers.astype(float)
    numbers[numbers.isna()] = written[0].astype(float) / written[1].map(AGE_UNITS)
    bad = ages[numbers.isna()]
    if len(bad):
        values = bad.head(3).fillna('').tolist()
        shown = ', '.join(f"{value!r} (line {line})" for value, line in zip(values, _bad_rows(numbers.isna())))
        blank = "; '': a blank cell" if '' in values else ''
        raise ValueError(f"label table {csv}: 'Patient Age' must be years (58) or '058Y', '003M', "
                         f"'010D'; got {shown}{' ...' * (len(bad) > 3)} ({len(bad)} rows{blank})")
    return numbers


def read_table(csv):
    """NIH ``Data_Entry_2017.csv`` (also ``.csv.gz``) -> DataFrame, checked for the needed columns
    (ValueError for an empty or unparsable file, rows without an image name, labels, patient or
    view, patient IDs that mix numbers and text, images listed twice, or unreadable ages, naming the
    lines; KeyError naming missing columns), with ``Patient Age`` in years (``ages_in_years``)."""
    try:
        table = pd.read_csv(csv, index_col=False)  # rows ending in a comma do not shift the columns
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, EOFError, OSError,
            zlib.error) as error:  # also a truncated or broken .gz
        raise ValueError(f"cannot read label table {csv}: {str(error).strip().splitlines()[0]}; "
                         f"expected a CSV with columns {list(TABLE_COLUMNS)}") from None
    _check_columns(table, TABLE_COLUMNS, csv)
    needed = ['Image Index', 'Finding Labels', 'Patient ID', 'View Position']
    blank = table[needed].isna().any(axis=1) | (table[needed].astype(str).apply(
        lambda column: column.str.strip()) == '').any(axis=1)
    if blank.any():
        raise ValueError(f"label table {csv}: {int(blank.sum())} rows without a value in one of "
                         f"{needed}, on lines {_bad_rows(blank)}; an image without its labels "
                         f"cannot be called normal or anomalous")
    table['Finding Labels'] = table['Finding Labels'].astype(str).str.strip()
    is_text = table['Patient ID'].map(lambda value: isinstance(value, str))
    if is_text.any() and not is_text.all():  # pandas reads a long table in chunks, each typed on its own:
        odd = is_text & pd.to_numeric(table['Patient ID'], errors='coerce').isna()  # numbers read as text too
        raise ValueError(f"label table {csv}: 'Patient ID' mixes numbers and text, e.g. "
                         f"{table['Patient ID'][odd].head(3).tolist()} on lines {_bad_rows(odd)} among "
                         f"numbers; patients are split by their ID, so write every ID alike")
    repeated = table['Image Index'].duplicated(keep=False)
    if repeated.any():
        raise ValueError(f"label table {csv}: images listed more than once, e.g. "
                         f"{sorted(set(table['Image Index'][repeated]))[:3]} (lines "
                         f"{_bad_rows(repeated)}); keep one row per image")
    table['Patient Age'] = ages_in_years(table['Patient Age'], csv)
    return table


def build_file_lists(table, gender=None, min_age=18, view='PA', n_test_normal=300, n_test_anom=150, seed=0):
    """Split the rows that pass the filters into normal train, normal test and anomalous test lists.

    Filters: ``Patient Gender == gender`` ('M'/'F'; None: both), ``Patient Age >= min_age``
    (None: any), ``View Position == view`` ('PA'/'AP'; None: any). Normal means
    ``Finding Labels == 'No Finding'``. Patients, in an order shuffled with ``seed``, become test
    patients while they can fill a test list that is not yet full; their images fill the test
    lists (up to ``n_test_normal`` / ``n_test_anom``, the rest is left out), and the normal images
    of all other patients form the training list (ValueError when that is empty). Returns {name:
    sorted list of file names}.
    """
    for name, value in (('n_test_normal', n_test_normal), ('n_test_anom', n_test_anom)):
        if value < 0:
            raise ValueError(f"{name} (--{name.replace('_', '-')}) must be 0 or more, got {value}")
    rows = table
    if gender is not None:
        rows = rows[rows['Patient Gender'] == gender]
    if min_age is not None:
        rows = rows[rows['Patient Age'] >= min_age]
    if view is not None:
        rows = rows[rows['View Position'] == view]
    is_normal = rows['Finding Labels'] == NORMAL_FINDING
    if not is_normal.any():
        raise ValueError(f"no '{NORMAL_FINDING}' images pass the filters gender={gender!r}, "
                         f"min_age={min_age!r}, view={view!r}")
    normal_by_patient = rows[is_normal].groupby('Patient ID')['Image Index'].apply(sorted).to_dict()
    anom_by_patient = rows[~is_normal].groupby('Patient ID')['Image Index'].apply(sorted).to_dict()
    rng = np.random.default_rng(seed)
    test_normal, test_anom, test_patients = [], [], set()
    for patient in rng.permutation(np.sort(rows['Patient ID'].unique())):
        needs_normal = len(test_normal) < n_test_normal and patient in normal_by_patient
        needs_anom = len(test_anom) < n_test_anom and patient in anom_by_patient
        if needs_normal or needs_anom:
            test_patients.add(patient)
            test_normal += normal_by_patient.get(patient, [])
            test_anom += anom_by_patient.get(patient, [])
    lists = dict(norm_train=sorted(name for patient, names in normal_by_patient.items()
                                   if patient not in test_patients for name in names),
                 norm_test=sorted(test_normal[:n_test_normal]),
                 anom_test=sorted(test_anom[:n_test_anom]))
    if not lists['norm_train']:
        raise ValueError(f"the test patients take every one of the {len(normal_by_patient)} patients with "
                         f"'{NORMAL_FINDING}' images that pass the filters gender={gender!r}, min_age={min_age!r}, "
                         f"view={view!r}: no image is left for training; ask for fewer test images "
                         f"(--n-test-normal, --n-test-anom) or widen the filters")
    for name, wanted in (('norm_test', n_test_normal), ('anom_test', n_test_anom)):
        if len(lists[name]) < wanted:
            warnings.warn(f"only {len(lists[name])} images for {name} (asked for {wanted})")
    return lists


def write_file_lists(lists, out_dir):
    """Write ``out_dir/<name>.txt`` for each list (one name per line): every list to a temporary
    file first, then each renamed into place, so that a failed write (a full disk) leaves the
    earlier lists as they were rather than a new training list beside old test lists, whose
    patients it may share."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} is a file, not a folder to write the file lists into")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    try:
        for name, names in lists.items():
            written[out_dir / f'{name}.txt'] = tmp = out_dir / f'.{name}.txt.tmp'
            tmp.write_text(''.join(f'{n}\n' for n in names))
    except OSError:
        for tmp in written.values():
            tmp.unlink(missing_ok=True)
        raise
    for path, tmp in written.items():
        os.replace(tmp, path)


def main(argv=None):
    """Run the list builder's command line; bad input ends with a one-line error and exit status 1."""
    parser = argparse.ArgumentParser(prog=PROG, description="Write normal/anomalous train/test file lists from "
                                                 "NIH ChestX-ray14's label table (split by patient).")
    from experiments.arguments import one_line_warnings, path_argument  # here: the data side needs no training code
    parser.add_argument('--csv', type=path_argument, required=True, help="Data_Entry_2017.csv (or .csv.gz)")
    parser.add_argument('--out', type=path_argument, required=True,
                        help="folder for norm_train.txt, norm_test.txt, anom_test.txt")
    parser.add_argument('--gender', choices=['M', 'F'], default=None, help="default: both")
    parser.add_argument('--min-age', type=int, default=18)
    parser.add_argument('--view', choices=['PA', 'AP', 'any'], default='PA')
    parser.add_argument('--n-test-normal', type=int, default=300)
    parser.add_argument('--n-test-anom', type=int, default=150)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"--seed must be 0 or more, got {args.seed}")
    from experiments.cli import exit_on_input_error
    with exit_on_input_error(PROG), one_line_warnings(PROG):
        lists = build_file_lists(read_table(args.csv), gender=args.gender, min_age=args.min_age,
                                 view=None if args.view == 'any' else args.view,
                                 n_test_normal=args.n_test_normal, n_test_anom=args.n_test_anom,
                                 seed=args.seed)
        write_file_lists(lists, args.out)
    print(', '.join(f'{name}: {len(lists[name])}' for name in LIST_NAMES) + f' -> {args.out}')


if __name__ == '__main__':
    main()
