"""Folder layouts: tiny fixtures in each layout, read through the same dataset class."""
import json
import math
import re
import shutil
import warnings
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from self_sup_data.layouts import (FOLDER_CATEGORY, FolderLayout, LocoLayout, MVTecLayout, DefectFolders,
                                   contents_sha256, detect_layout, layout_for_model, layout_from_spec, make_layout)
from self_sup_data.mvtec import SelfSupMVTecDataset
from conftest import make_mvtec_category, save_checkpoint

SIZE = 32


def _png(path, value=100, mask_box=None, mask_value=255, size=(SIZE, SIZE)):
    """A flat image (value) or, with mask_box (top, left, side), a mask of mask_value there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full(size, value, np.uint8)
    if mask_box is not None:
        top, left, side = mask_box
        array[:] = 0
        array[top:top + side, left:left + side] = mask_value
    Image.fromarray(array).save(path)
    return path


def _mask_pixels(dataset, i):
    return int(dataset.masks[i].sum())


def make_visa(root, category='pcb1'):
    """VisA: 4 normal train, 2 normal test, 2 anomalous test (masks with region ids 1 and 2)."""
    rows = ['object,split,label,image,mask']
    for i in range(6):
        image = f'{category}/Data/Images/Normal/{i:04d}.JPG'
        _png(root / image, value=90 + i)
        rows.append(f"{category},{'train' if i < 4 else 'test'},normal,{image},")
    for i, side in enumerate((4, 8)):
        image, mask = f'{category}/Data/Images/Anomaly/{i:03d}.JPG', f'{category}/Data/Masks/Anomaly/{i:03d}.png'
        _png(root / image, value=200)
        _png(root / mask, mask_box=(2, 2, side), mask_value=i + 1)
        rows.append(f'{category},test,anomaly,{image},{mask}')
    (root / 'split_csv').mkdir(parents=True, exist_ok=True)
    (root / 'split_csv' / '1cls.csv').write_text('\n'.join(rows) + '\n')


def make_loco(root, category='juice_bottle'):
    """LOCO: 3 train, 2 good test, 1 logical (two defect PNGs), 1 structural (one defect PNG)."""
    cat = root / category
    (cat / 'validation' / 'good').mkdir(parents=True)
    _png(cat / 'validation' / 'good' / '000.png')
    for i in range(3):
        _png(cat / 'train' / 'good' / f'{i:03d}.png', value=80 + i)
    for i in range(2):
        _png(cat / 'test' / 'good' / f'{i:03d}.png')
    _png(cat / 'test' / 'logical_anomalies' / '000.png', value=150)
    _png(cat / 'ground_truth' / 'logical_anomalies' / '000' / '000.png', mask_box=(0, 0, 4), mask_value=255)
    _png(cat / 'ground_truth' / 'logical_anomalies' / '000' / '001.png', mask_box=(10, 10, 2), mask_value=20)
    _png(cat / 'test' / 'structural_anomalies' / '000.png', value=160)
    _png(cat / 'ground_truth' / 'structural_anomalies' / '000' / '000.png', mask_box=(5, 5, 3), mask_value=255)
    (cat / 'defects_config.json').write_text(json.dumps([
        {'defect_name': 'missing_label', 'pixel_value': 255, 'saturation_threshold': 0.5, 'relative_saturation': True},
        {'defect_name': 'extra_thing', 'pixel_value': 20, 'saturation_threshold': 3, 'relative_saturation': False}]))


def make_ad2(root, category='vial'):
    """AD 2: 3 train, 1 validation, 2 good and 2 bad public test images (one bad without mask)."""
    cat = root / category
    for i in range(3):
        _png(cat / 'train' / 'good' / f'{i:03d}_regular.png', value=80 + i)
    _png(cat / 'validation' / 'good' / '000_regular.png')
    for i in range(2):
        _png(cat / 'test_public' / 'good' / f'{i:03d}_regular.png')
        _png(cat / 'test_public' / 'bad' / f'{i:03d}_regular.png', value=200)
    _png(cat / 'test_public' / 'ground_truth' / 'bad' / '000_regular_mask.png', mask_box=(1, 1, 5))


def test_mvtec_is_detected_and_recorded(tmp_path):
    make_mvtec_category(tmp_path, 'tiny', size=SIZE)
    assert detect_layout(tmp_path).name == detect_layout(tmp_path, 'tiny').name == 'mvtec'
    test = SelfSupMVTecDataset(tmp_path, 'tiny', is_train=False, low_res=SIZE)
    assert test.layout.spec() == {'format': 'mvtec'}
    assert test.defect_types == ['crack'] * 3 + ['good'] * 3 and test.has_mask.all()


def test_visa(tmp_path):
    make_visa(tmp_path)
    assert detect_layout(tmp_path, 'pcb1').name == 'visa'
    train = SelfSupMVTecDataset(tmp_path, 'pcb1', low_res=SIZE, transform=lambda i, m, r: (i, m))
    assert len(train) == 4
    assert [p.split('/')[-1] for p in train.paths] == ['0000.JPG', '0001.JPG', '0002.JPG', '0003.JPG']
    test = SelfSupMVTecDataset(tmp_path, 'pcb1', is_train=False, low_res=SIZE)
    assert test.defect_types == ['good', 'good', 'anomaly', 'anomaly'] and list(test.labels) == [0, 0, 1, 1]
    # region-id masks (values 1 and 2) are read as their nonzero pixels, paired by the CSV row
    assert [_mask_pixels(test, i) for i in range(4)] == [0, 0, 16, 64] and test.has_mask.all()
    # the split file saved by a spreadsheet as UTF-8 with a byte-order mark: the same rows
    csv_path = tmp_path / 'split_csv' / '1cls.csv'
    csv_path.write_bytes(b'\xef\xbb\xbf' + csv_path.read_bytes())
    assert SelfSupMVTecDataset(tmp_path, 'pcb1', low_res=SIZE, transform=lambda i, m, r: (i, m)).paths == train.paths


def test_visa_errors_name_the_file(tmp_path):
    make_visa(tmp_path)
    (tmp_path / 'pcb1' / 'Data' / 'Masks' / 'Anomaly' / '001.png').unlink()
    with pytest.raises(FileNotFoundError, match=r"mask 'pcb1/Data/Masks/Anomaly/001.png' of .*is not a file"):
        SelfSupMVTecDataset(tmp_path, 'pcb1', is_train=False, low_res=SIZE)
    csv_path = tmp_path / 'split_csv' / '1cls.csv'
    rows = csv_path.read_text()
    csv_path.write_text(rows.replace('pcb1,train,normal,pcb1/Data/Images/Normal/0001.JPG',
                                     'pcb1,train,anomaly,pcb1/Data/Images/Normal/0001.JPG'))
    with pytest.raises(ValueError, match=r"the train image '.*0001.JPG' has the label 'anomaly'; VisA's "
                                         r"train split labels its images 'normal'"):
        SelfSupMVTecDataset(tmp_path, 'pcb1', low_res=SIZE)
    csv_path.write_text(rows.replace('pcb1,test,anomaly', 'pcb1,test,Anomaly'))
    with pytest.raises(ValueError, match=r"the test image .* has the label 'Anomaly'"):
        SelfSupMVTecDataset(tmp_path, 'pcb1', is_train=False, low_res=SIZE)
    first_train = 'pcb1,train,normal,pcb1/Data/Images/Normal/0000.JPG,'
    for repeated, splits in ((first_train, "'train' and 'train'"),  # counted twice
                             (first_train.replace(',train,', ',test,'), "'train' and 'test'")):  # leaked
        csv_path.write_text(rows + repeated + '\n')
        for is_train in (True, False):
            with pytest.raises(ValueError, match=rf"1cls.csv lists the pcb1 image '.*0000.JPG' twice "
                                                 rf"\(splits {splits}\)"):
                SelfSupMVTecDataset(tmp_path, 'pcb1', is_train=is_train, low_res=SIZE)
    csv_path.write_bytes(rows.encode() + 'pcb1,train,normal,pcb1/Data/Images/Normal/caf\xe9.JPG,\n'.encode('latin-1'))
    with pytest.raises(ValueError, match=r"cannot read .*split_csv/1cls.csv: 'utf-8' codec can't decode"):
        SelfSupMVTecDataset(tmp_path, 'pcb1', low_res=SIZE)
    csv_path.unlink()
    with pytest.raises(FileNotFoundError, match=r'split_csv/1cls.csv does not exist'):
        SelfSupMVTecDataset(tmp_path, 'pcb1', low_res=SIZE)


def test_loco(tmp_path):
    make_loco(tmp_path)
    assert detect_layout(tmp_path, 'juice_bottle').name == 'loco'
    train = SelfSupMVTecDataset(tmp_path, 'juice_bottle', low_res=SIZE)
    assert len(train) == 3 and all('/train/good/' in p for p in train.paths)
    test = SelfSupMVTecDataset(tmp_path, 'juice_bottle', is_train=False, low_res=SIZE)
    assert test.defect_types == ['good', 'good', 'logical_anomalies', 'structural_anomalies']
    # the logical anomaly's mask is the union of its two defect PNGs (one of pixel value 20)
    assert [_mask_pixels(test, i) for i in range(4)] == [0, 0, 16 + 4, 9]
    assert LocoLayout().defects(tmp_path, 'juice_bottle') == {255: ('missing_label', 0.5, True),
                                                             20: ('extra_thing', 3.0, False)}


def test_loco_masks_of_any_suffix_case_and_no_hidden_files(tmp_path):
    make_loco(tmp_path)
    folder = tmp_path / 'juice_bottle' / 'ground_truth' / 'structural_anomalies' / '000'
    _png(folder / '001.PNG', mask_box=(20, 20, 2), mask_value=255)  # counted
    (folder / '._000.png').write_bytes(b'a macOS resource fork')  # not an image: left out
    test = SelfSupMVTecDataset(tmp_path, 'juice_bottle', is_train=False, low_res=SIZE)
    assert [_mask_pixels(test, i) for i in range(4)] == [0, 0, 16 + 4, 9 + 4]


def test_a_loco_image_without_masks_is_named_without_blaming_its_config(tmp_path):
    from self_sup_data.mvtec import check_test_set
    make_loco(tmp_path)
    folder = tmp_path / 'juice_bottle' / 'ground_truth' / 'structural_anomalies' / '000'
    shutil.rmtree(folder)
    folder.mkdir()  # its masks' folder, empty
    with pytest.raises(FileNotFoundError, match=r"no mask for the defect image .*000.png") as error:
        check_test_set(tmp_path, 'juice_bottle')
    assert 'is missing' not in str(error.value)  # the folder of masks is there, and so is the config
    mask = _png(folder / '000.png', mask_box=(1, 1, 2), size=(SIZE // 2, SIZE // 2))  # of another size
    with pytest.raises(ValueError, match=rf"^mask {re.escape(str(mask))} is {SIZE // 2}x{SIZE // 2} but its image "):
        check_test_set(tmp_path, 'juice_bottle')
    mask.unlink()
    (tmp_path / 'juice_bottle' / 'defects_config.json').unlink()  # read as MVTec AD: the note says why
    with pytest.raises(FileNotFoundError, match=r"is a folder of masks as in MVTec LOCO AD, whose "
                                                r".*defects_config.json is missing"):
        check_test_set(tmp_path, 'juice_bottle')


def test_images_in_subfolders_of_an_image_folder_are_counted_in_a_warning(tmp_path):
    make_mvtec_category(tmp_path, 'tiles', n_train=3)
    defect = tmp_path / 'tiles' / 'test' / 'crack'
    _png(defect / 'sorted' / 'z.png')
    _png(defect / '.thumbnails' / 'y.png')  # hidden: not counted
    with pytest.warns(UserWarning, match=r"crack: 1 image in its subfolders left out \(first: sorted/z.png\): a "
                                         r"folder's images are the files directly in it"):
        test = SelfSupMVTecDataset(tmp_path, 'tiles', is_train=False, low_res=SIZE)
    assert not any('sorted' in path for path in test.paths)
    from self_sup_data.images import _listed
    assert _listed(tmp_path / 'gone') == []  # a subfolder that cannot be listed is passed over
    empty = tmp_path / 'only_subfolders'
    _png(empty / 'a' / 'x.png')
    with pytest.raises(ValueError, match=r"only_subfolders holds no images \(.*; its subfolders are not read\)"):
        make_layout('folder', empty).train_files(None, FOLDER_CATEGORY)


def test_links_to_missing_images_are_counted_in_a_warning(tmp_path):
    make_mvtec_category(tmp_path, 'tiles', n_train=3)
    good = tmp_path / 'tiles' / 'train' / 'good'
    (good / 'zzz.png').symlink_to(tmp_path / 'moved' / 'zzz.png')
    (good / 'notes.txt').symlink_to(tmp_path / 'moved' / 'notes.txt')  # not an image name: not counted
    with pytest.warns(UserWarning, match=r"good: 1 link that leads to no file left out \(first: zzz.png -> "
                                         r".*moved.zzz.png\)"):
        files = MVTecLayout().train_files(tmp_path, 'tiles')
    assert len(files) == 3


def test_images_directly_in_the_test_folder_are_counted_in_a_warning(tmp_path):
    make_mvtec_category(tmp_path, 'tiles', n_train=3)
    _png(tmp_path / 'tiles' / 'test' / 'loose.png')
    _png(tmp_path / 'tiles' / 'test' / '._loose.png')  # hidden: not counted
    with pytest.warns(UserWarning, match=r"test: 1 image directly in it left out \(first: loose.png\): a test image "
                                         r"belongs in the sub-folder of its type"):
        test = SelfSupMVTecDataset(tmp_path, 'tiles', is_train=False, low_res=SIZE)
    assert not any(path.endswith('loose.png') for path in test.paths) and len(test.paths) == 6


@pytest.mark.parametrize('name', ['Good', 'normal', 'OK', 'defect_free', 'Defect-Free', 'defect free', 'No_Defects',
                                  'non-defective', 'non-defect', 'NODefect_images', 'ok_front', 'MT_Free', 'Negative',
                                  'no_anomaly', 'good images'])
def test_a_normal_folder_named_other_than_good_is_refused_not_scored_as_a_defect_type(tmp_path, name):
    make_mvtec_category(tmp_path, 'tiles', n_train=3)
    test = tmp_path / 'tiles' / 'test'
    (test / 'good').rename(test / name)
    with pytest.raises(ValueError, match=rf"test/{name}: normal test images belong in .*test/good \(this name, in "
                                         r"lower case\); .* would be scored as defects"):
        SelfSupMVTecDataset(tmp_path, 'tiles', is_train=False, low_res=SIZE, allow_missing_masks=True)


def test_hidden_folders_in_a_test_folder_are_no_defect_type(tmp_path):
    make_mvtec_category(tmp_path, 'tiles', n_train=3)
    hidden = tmp_path / 'tiles' / 'test' / '.thumbnails'
    _png(hidden / '000.png')
    test = SelfSupMVTecDataset(tmp_path, 'tiles', is_train=False, low_res=SIZE)
    assert '.thumbnails' not in test.defect_types and not any('.thumbnails' in p for p in test.paths)


def test_webp_and_netpbm_images_are_read_and_other_image_formats_counted_in_a_warning(tmp_path):
    category = make_mvtec_category(tmp_path, 'tiles', n_train=3)
    train, defect = category / 'train' / 'good', category / 'test' / 'crack'
    texture = np.asarray(Image.open(train / '000.png'))
    Image.fromarray(texture).save(train / '100.webp', lossless=True)
    cv2.imwrite(str(train / '101.pgm'), texture.astype(np.uint16) * 257)  # a 16-bit PGM: full range
    Image.fromarray(texture).save(train / '102.gif')  # read by no layout: counted
    Image.fromarray(texture).save(defect / '100.gif')
    (train / 'notes.txt').write_text('not an image: left out silently')
    with pytest.warns(UserWarning, match=r'good: 1 file of another image format left out \(first: 102.gif\): '
                                         r"a folder's images are its .png, .*; convert them to one of these"):
        dataset = SelfSupMVTecDataset(tmp_path, 'tiles', low_res=SIZE)
    assert [p.rsplit('/', 1)[1] for p in dataset.paths] == ['000.png', '001.png', '002.png', '100.webp', '101.pgm']
    for index in (3, 4):  # the same image as 000.png, losslessly: the same training image
        np.testing.assert_array_equal(dataset.images[index], dataset.images[0])
    with pytest.warns(UserWarning, match=r'crack: 1 file of another image format left out \(first: 100.gif\)'):
        test = SelfSupMVTecDataset(tmp_path, 'tiles', is_train=False, low_res=SIZE)
    assert not any(p.endswith('.gif') for p in test.paths)


def test_two_defect_images_of_one_stem_are_refused_as_their_masks_are_found_by_it(tmp_path):
    category = make_mvtec_category(tmp_path, 'tiles', n_train=3)
    Image.open(category / 'test' / 'crack' / '000.png').save(category / 'test' / 'crack' / '000.jpg')
    with pytest.raises(ValueError, match=r'defect images .*crack/000.jpg and .*crack/000.png have the same stem'):
        SelfSupMVTecDataset(tmp_path, 'tiles', is_train=False, low_res=SIZE)
    (category / 'test' / 'crack' / '000.jpg').rename(category / 'test' / 'good' / '100.jpg')
    Image.open(category / 'test' / 'good' / '000.png').save(category / 'test' / 'good' / '000.jpg')
    assert len(SelfSupMVTecDataset(tmp_path, 'tiles', is_train=False, low_res=SIZE)) == 8  # normal ones need no mask


def test_masks_that_match_no_image_are_counted_in_a_warning(tmp_path):
    category = make_mvtec_category(tmp_path, 'tiles', n_train=3)
    truth = category / 'ground_truth' / 'crack'
    (truth / '001_mask.png').rename(truth / '001.png')  # named as its image, without _mask
    Image.open(truth / '002_mask.png').save(truth / '017_mask.png')  # an image removed, its mask kept
    with pytest.warns(UserWarning, match=r"tiles: 2 of the masks in ground_truth/crack match no image of test/crack "
                                         r"\(first: .*crack/001.png\); a mask is named <image name>_mask.png"):
        files = MVTecLayout().test_files(tmp_path, 'tiles')
    assert [(p.name, m and m.name) for p, m, t in zip(files.paths, files.masks, files.defect_types) if t == 'crack'] \
        == [('000.png', '000_mask.png'), ('001.png', None), ('002.png', '002_mask.png')]


def test_a_missing_mask_names_the_folders_that_ground_truth_holds_where_its_own_is_missing(tmp_path):
    make_mvtec_category(tmp_path, 'tiles', n_train=3)
    truth = tmp_path / 'tiles' / 'ground_truth'
    (truth / 'crack').rename(truth / 'cracks')  # a misnamed mask folder
    with pytest.raises(FileNotFoundError, match=r"no mask for the defect image .*000.png .*; .*ground_truth.crack "
                                                r"does not exist \(.*ground_truth holds: cracks\); to evaluate"):
        SelfSupMVTecDataset(tmp_path, 'tiles', is_train=False, low_res=SIZE)
    (truth / 'cracks').rename(truth / 'crack')
    next((truth / 'crack').iterdir()).unlink()  # the folder is there, a mask missing: no such note
    with pytest.raises(FileNotFoundError, match='no mask for the defect image') as error:
        SelfSupMVTecDataset(tmp_path, 'tiles', is_train=False, low_res=SIZE)
    assert 'does not exist' not in str(error.value)


def test_ad2(tmp_path):
    make_ad2(tmp_path)
    assert detect_layout(tmp_path, 'vial').name == 'ad2'
    train = SelfSupMVTecDataset(tmp_path, 'vial', low_res=SIZE)
    assert len(train) == 3
    with pytest.raises(FileNotFoundError, match='no mask for the defect image'):
        SelfSupMVTecDataset(tmp_path, 'vial', is_train=False, low_res=SIZE)
    _png(tmp_path / 'vial' / 'test_public' / 'ground_truth' / 'stray.png')  # a stray image: no defect type
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        test = SelfSupMVTecDataset(tmp_path, 'vial', is_train=False, low_res=SIZE,
                                   allow_missing_masks=True)
    assert [str(w.message).split(': ', 1)[1] for w in caught] == [
        '1 of 2 defect images have no mask and are evaluated at image level only (left out of the pixel metrics)']
    assert test.defect_types == ['bad', 'bad', 'good', 'good'] and list(test.labels) == [1, 1, 0, 0]
    assert list(test.has_mask) == [True, False, True, True] and _mask_pixels(test, 0) == 25


def test_masks_match_their_images_in_either_unicode_normal_form_and_any_suffix_case(tmp_path):
    composed, decomposed = 'd\u00e9faut', 'de\u0301faut'  # 'défaut' as typed, and as macOS may store it
    make_mvtec_category(tmp_path, 'tiles', n_train=3, defects={'crack': 1})
    crack = tmp_path / 'tiles' / 'test' / 'crack'
    (crack / '000.png').rename(crack / f'{composed}.png')
    truth = tmp_path / 'tiles' / 'ground_truth' / 'crack'
    (truth / '000_mask.png').rename(truth / f'{decomposed}_mask.png')
    test = SelfSupMVTecDataset(tmp_path, 'tiles', is_train=False, low_res=SIZE)
    assert test.has_mask.all() and test.masks[test.defect_types.index('crack')].any()
    make_ad2(tmp_path)  # AD 2: its masks with another suffix case too
    bad = tmp_path / 'vial' / 'test_public' / 'bad'
    (bad / '001_regular.png').rename(bad / f'{decomposed}.png')
    _png(tmp_path / 'vial' / 'test_public' / 'ground_truth' / 'bad' / f'{composed}_mask.PNG', mask_box=(2, 2, 4))
    test = SelfSupMVTecDataset(tmp_path, 'vial', is_train=False, low_res=SIZE)
    assert test.has_mask.all() and sorted(int(mask.sum()) for mask in test.masks[:2]) == [16, 25]
    folder = tmp_path / 'folder'
    for i in range(5):
        _png(folder / 'ok' / f'{i}.png', value=80 + i)
    _png(folder / 'ng' / f'{composed}.png', value=200)
    _png(folder / 'masks' / f'{decomposed}.png', mask_box=(0, 0, 3))
    layout = make_layout('folder', folder / 'ok', folder / 'ng', folder / 'masks')
    assert layout.test_files().masks[-1] == folder / 'masks' / f'{decomposed}.png'


def test_identical_files_reads_each_file_once_and_finds_copies_and_links(tmp_path, monkeypatch):
    from self_sup_data import layouts
    others = []
    for i in range(30):  # files of one byte size, as BMPs of one image size are
        others.append(tmp_path / f'train{i}.bin')
        others[-1].write_bytes(bytes([i]) * 64)
    paths = [tmp_path / f'test{i}.bin' for i in range(10)]
    for i, path in enumerate(paths):
        path.write_bytes(bytes([100 + i]) * 64)
    paths[3].write_bytes(bytes([7]) * 64)  # a copy of train7
    paths[5].unlink()
    paths[5].symlink_to(others[9])  # a link to train9
    reads = []
    feed = layouts._feed_file
    monkeypatch.setattr(layouts, '_feed_file', lambda digest, path, *rest, **kw: reads.append(path) or feed(
        digest, path, *rest, **kw))
    digests = {}
    assert layouts.identical_files(paths, others, digests) == [(paths[3], others[7]), (paths[5], others[9])]
    assert len(reads) == len(set(reads)) == 39  # each distinct file once (the link is its target)
    assert layouts.identical_files(paths, others, digests) == [(paths[3], others[7]), (paths[5], others[9])]
    assert len(reads) == 39  # a shared cache reads nothing again


def test_a_copy_check_that_cannot_read_a_file_is_left_out_with_a_warning(tmp_path, monkeypatch):
    from self_sup_data import layouts
    make_mvtec_category(tmp_path, 'tiles', n_train=3)

    def unreadable(*args, **kwargs):
        raise PermissionError('permission denied')
    monkeypatch.setattr(layouts.os.path, 'getsize', lambda path: 1)  # every file of one size: all are read
    monkeypatch.setattr(layouts, '_feed_file', unreadable)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        test = SelfSupMVTecDataset(tmp_path, 'tiles', is_train=False, low_res=SIZE)
    assert [str(warning.message) for warning in caught] == [
        'tiles: test images not compared with training images (permission denied)',
        'tiles: defect images not compared with normal test images (permission denied)']
    assert len(test.paths) == 6


def test_folder_layout_pairs_masks_by_stem(tmp_path):
    for i in range(10):
        _png(tmp_path / 'ok' / f'normal {i}.jpg', value=80 + i)
    _png(tmp_path / 'ng' / 'scratch.a.png', value=200)
    _png(tmp_path / 'ng' / 'dent.bmp', value=210)
    _png(tmp_path / 'ng' / 'stain.png', value=220)
    _png(tmp_path / 'masks' / 'scratch.a.png', mask_box=(0, 0, 3))
    _png(tmp_path / 'masks' / 'dent.png', mask_box=(0, 0, 6))
    layout = make_layout('folder', tmp_path / 'ok', tmp_path / 'ng', tmp_path / 'masks')
    train = SelfSupMVTecDataset(None, FOLDER_CATEGORY, low_res=SIZE, layout=layout)
    with pytest.warns(UserWarning, match='1 of 3 defect images have no mask'):  # stain.png
        test = SelfSupMVTecDataset(None, FOLDER_CATEGORY, is_train=False, low_res=SIZE,
                                   layout=layout, allow_missing_masks=True)
    assert len(train) == 8 and test.defect_types == ['good'] * 2 + ['anomaly'] * 3
    assert not set(train.paths) & set(test.paths)  # held-out normal images are not trained on
    assert [p.split('/')[-1] for p in test.paths[2:]] == ['dent.bmp', 'scratch.a.png', 'stain.png']
    assert [_mask_pixels(test, i) for i in range(2, 5)] == [36, 9, 0]
    assert list(test.has_mask) == [True, True, True, True, False]
    assert layout_from_spec(layout.spec()).spec() == layout.spec()
    assert SelfSupMVTecDataset(None, 'x', low_res=SIZE, layout=layout).paths == train.paths  # fixed split


def test_folder_layout_refuses_two_anomalous_images_that_one_mask_would_stand_for(tmp_path):
    for i in range(10):
        _png(tmp_path / 'ok' / f'{i}.png', value=80 + i)
    _png(tmp_path / 'ng' / '001.jpg', value=200)
    _png(tmp_path / 'ng' / '001.bmp', value=210)
    _png(tmp_path / 'masks' / '001.png', mask_box=(0, 0, 3))
    layout = make_layout('folder', tmp_path / 'ok', tmp_path / 'ng', tmp_path / 'masks')
    with pytest.raises(ValueError, match=r'anomalous images .*001.bmp and .*001.jpg have the same stem'):
        layout.test_files()
    assert len(make_layout('folder', tmp_path / 'ok', tmp_path / 'ng').test_files().paths) == 4  # no masks


def test_folder_layout_errors(tmp_path):
    for i in range(3):
        _png(tmp_path / 'ok' / f'{i}.png')
    _png(tmp_path / 'ng' / 'a.png')
    _png(tmp_path / 'masks' / 'b.png', mask_box=(0, 0, 3))
    with pytest.raises(ValueError, match=r"match no image of .*ng by name: \['b'\]; each mask there must be named as "
                                         r"an anomalous image \(abc.png for abc.jpg\): move the others out"):
        FolderLayout(tmp_path / 'ok', tmp_path / 'ng', tmp_path / 'masks').test_files()
    _png(tmp_path / 'masks' / 'a.png', mask_box=(0, 0, 3))
    _png(tmp_path / 'masks' / 'a.bmp', mask_box=(0, 0, 3))
    with pytest.raises(ValueError, match='have the same stem'):
        FolderLayout(tmp_path / 'ok', tmp_path / 'ng', tmp_path / 'masks').test_files()
    with pytest.raises(ValueError, match='needs a folder of anomalous images'):
        FolderLayout(tmp_path / 'ok').test_files()
    (tmp_path / 'masks' / 'a.bmp').unlink()
    _png(tmp_path / 'ng' / 'a_mask.png', mask_box=(0, 0, 3))  # masks kept beside their images
    for role, masks in (('anomalous', tmp_path / 'ng'), ('normal', tmp_path / 'ok' / '.')):
        with pytest.raises(ValueError, match=rf"mask folder .* is the {role} image folder: its images "
                                             r"would be their own masks"):
            FolderLayout(tmp_path / 'ok', tmp_path / 'ng', masks).test_files()
    with pytest.raises(FileNotFoundError, match='nowhere does not exist'):
        FolderLayout(tmp_path / 'nowhere').train_files()
    with pytest.raises(ValueError, match='--format folder needs --normal'):
        make_layout('folder')
    with pytest.raises(ValueError, match='belong to --format folder'):
        make_layout('mvtec', normal=tmp_path)
    with pytest.raises(ValueError, match="unknown format 'coco'"):
        make_layout('coco')


def test_a_folder_in_no_layout_says_what_was_expected_and_found(tmp_path):
    (tmp_path / 'widgets' / 'images').mkdir(parents=True)
    _png(tmp_path / 'widgets' / 'images' / 'a.png')
    with pytest.raises(FileNotFoundError) as error:
        SelfSupMVTecDataset(tmp_path, 'widgets')
    message = str(error.value)
    assert "category 'widgets' not found" in message and "categories found: none" in message
    for name, expected in [('mvtec', 'ground_truth/<type>/<name>_mask.png'), ('visa', 'split_csv/1cls.csv'),
                           ('loco', 'defects_config.json'), ('ad2', 'test_public/{good,bad}'),
                           ('folder', '--normal DIR')]:
        assert name in message and expected in message
    assert 'widgets holds: images/' in message


def test_a_root_with_categories_of_two_layouts_trains_each_in_its_own(tmp_path):
    import train_mvtec
    make_loco(tmp_path)
    make_mvtec_category(tmp_path, 'tiny')

    def selected(*argv):
        args = train_mvtec.parse_args(['-s', 'Shift', '-d', str(tmp_path), '-o', str(tmp_path / 'o'), *argv])
        return train_mvtec.select_categories(args, tmp_path)
    assert selected() == ['juice_bottle', 'tiny']
    assert selected('-n', 'tiny') == ['tiny']
    assert selected('-n', 'tiny/') == selected('-n', 'tiny//') == ['tiny']  # as a shell completes a folder
    assert selected('--format', 'loco') == ['juice_bottle']
    with pytest.raises(FileNotFoundError, match=r"'tiny' not found .*\(loco layout: .*categories found: juice_bottle"):
        selected('--format', 'loco', '-n', 'tiny')


def test_explicit_layout_reports_its_own_categories(tmp_path):
    make_loco(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'juice_bottle' not found .*ad2 categories found: none"):
        SelfSupMVTecDataset(tmp_path, 'juice_bottle', layout=make_layout('ad2'))


@pytest.mark.slow
def test_folder_format_trains_and_evaluates_from_the_meta(tmp_path):
    import train_mvtec
    from experiments import mvtec_tasks
    from experiments.settings import trained_model_path
    from experiments.training import load_model
    make_mvtec_category(tmp_path / 'data', 'tiny', n_train=8, size=64)
    category = tmp_path / 'data' / 'tiny'
    folder_args = ['--format', 'folder', '--normal', str(category / 'train' / 'good'),
                   '--abnormal', str(category / 'test' / 'crack'), '--mask-dir', str(tmp_path / 'masks')]
    (tmp_path / 'masks').mkdir()
    for mask in (category / 'ground_truth' / 'crack').iterdir():  # 000_mask.png -> 000.png
        mask.rename(tmp_path / 'masks' / mask.name.replace('_mask', ''))
    assert train_mvtec.main(['-s', 'Shift-Intensity-3', '-o', str(tmp_path / 'models'), '-n', 'widgets',
                             '--epochs', '1', '--batch-size', '3', '--res-scale', '0.25', '--workers', '0',
                             '--no-figures', '--evaluate'] + folder_args) == 0
    assert (tmp_path / 'models' / 'eval' / 'results.csv').is_file()  # test set checked, evaluated
    _, meta = load_model(trained_model_path(tmp_path / 'models', 'Shift-Intensity-3', 'widgets'))
    assert meta['layout']['format'] == 'folder' and meta['layout']['mask_dir'] == str(tmp_path / 'masks')
    assert meta['data_dir'] is None
    records = mvtec_tasks.evaluate_checkpoints(tmp_path / 'models', None)  # the layout comes from the meta
    assert [(r['category'], r['seed']) for r in records] == [('widgets', 3)]
    assert 0 <= records[0]['au_pro'] <= 1  # masks were found by stem
    # thresholds from the normal training images that the folder format kept for training
    from experiments import thresholds
    from self_sup_data.layouts import layout_from_spec
    files, source = thresholds.normal_image_files(meta)
    assert files == layout_from_spec(meta['layout']).train_files() and len(files) < 8
    assert source == 'normal training images'
    with pytest.warns(UserWarning, match=r"2 of the 8 given normal images are normal test images of the model's data, "
                                         r"e.g. .*: the evaluation's precision and recall at these thresholds would"):
        thresholds.warn_test_images(meta, sorted((category / 'train' / 'good').iterdir()))  # the whole --normal
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        thresholds.warn_test_images(meta, files)  # the images trained on: none of the test fifth
    _png(files[0], value=7)  # an image replaced under its name: other normal images than those trained on
    assert thresholds.normal_image_files(meta)[1] == f"normal images of {meta['layout']['normal']}"
    # one more normal image moves the held-out fifth: the evaluation refuses the changed folder
    _png(category / 'train' / 'good' / 'new.png')
    (record,) = mvtec_tasks.evaluate_checkpoints(tmp_path / 'models', None)
    assert 'are not those the model was trained with' in record['error']
    # ... and so does an evaluation that names the folders on its command line
    flags = make_layout('folder', category / 'train' / 'good', category / 'test' / 'crack', tmp_path / 'masks')
    (record,) = mvtec_tasks.evaluate_checkpoints(tmp_path / 'models', None, layout=flags)
    assert 'are not those the model was trained with' in record['error']


@pytest.mark.slow
def test_a_folder_model_trained_on_normal_images_alone_is_evaluated_on_defect_folders_given_later(tmp_path):
    import train_mvtec
    from experiments import mvtec_tasks
    make_mvtec_category(tmp_path / 'data', 'tiny', n_train=8, size=64)
    category = tmp_path / 'data' / 'tiny'
    (tmp_path / 'masks').mkdir()
    for mask in (category / 'ground_truth' / 'crack').iterdir():  # 000_mask.png -> 000.png
        mask.rename(tmp_path / 'masks' / mask.name.replace('_mask', ''))
    assert train_mvtec.main(['-s', 'Shift-3', '-o', str(tmp_path / 'models'), '-n', 'widgets', '--epochs', '1',
                             '--batch-size', '3', '--res-scale', '0.25', '--workers', '0', '--no-figures',
                             '--format', 'folder', '--normal', str(category / 'train' / 'good')]) == 0
    # the defect images found later: --abnormal and --mask-dir alone, the normal folder the model's own
    mvtec_tasks.main(['-m', str(tmp_path / 'models'), '-o', str(tmp_path / 'eval'), '--no-figures',
                      '--abnormal', str(category / 'test' / 'crack'), '--mask-dir', str(tmp_path / 'masks')])
    (record,) = pd.read_csv(tmp_path / 'eval' / 'results.csv').to_dict('records')
    assert record['category'] == 'widgets' and 0 <= record['au_pro'] <= 1  # scored with masks
    with pytest.raises(ValueError, match=r"--abnormal and --mask-dir without --format folder are the test folders of "
                                         r"models of the folder format; this model's data are in the mvtec layout"):
        layout_for_model(DefectFolders(category / 'test' / 'crack'), MVTecLayout().spec())
    layout = layout_for_model(DefectFolders(None, tmp_path / 'other_masks'),  # masks alone: the model's images
                              dict(format='folder', normal='/n', abnormal='/a', mask_dir='/m', held_out_sha256='h'))
    assert (layout.normal, layout.abnormal, layout.mask_dir) == (Path('/n'), Path('/a'), tmp_path / 'other_masks')


def test_evaluation_without_data_dir_needs_the_folder_format(tmp_path):
    from self_sup_data.layouts import MVTecLayout
    with pytest.raises(FileNotFoundError, match=r'no data root folder given \(-d DATA_DIR\)'):
        MVTecLayout().train_files(None, 'tiny')
    # the evaluation says so once, before any work, naming a model (not once per model, as failures)
    from experiments import mvtec_tasks
    folder_model = ('f/final_w.pt', dict(layout=dict(format='folder', normal='/n', abnormal=None), data_dir=None))
    mvtec_model = ('m/final_tiny.pt', dict(layout=MVTecLayout().spec(), data_dir='/data'))
    mvtec_tasks.check_data_dir_needless([folder_model], None)
    mvtec_tasks.check_data_dir_needless([folder_model], DefectFolders('/a'))  # its test folders given alone
    with pytest.raises(FileNotFoundError, match=r'no data root folder given'):
        mvtec_tasks.check_data_dir_needless([mvtec_model], DefectFolders('/a'))
    unreadable = ('f/final_w_1.pt', dict(setting='Shift-1', category='w', error='cannot read'))  # fails as its row
    mvtec_tasks.check_data_dir_needless([folder_model, unreadable], None)
    with pytest.raises(FileNotFoundError, match=r'no data root folder given \(-d DATA_DIR\): 2 of the 3 models .* '
                                                r'e.g. m/final_tiny.pt \(trained on /data\)'):
        mvtec_tasks.check_data_dir_needless([mvtec_model, folder_model, ('o/final_old.pt', {})], None)


def test_an_mvtec_image_with_two_masks_is_refused_naming_both(tmp_path):
    make_mvtec_category(tmp_path, 'tiny', size=SIZE)
    masks = tmp_path / 'tiny' / 'ground_truth' / 'crack'
    Image.open(masks / '000_mask.png').save(masks / '000_mask.bmp')  # an older copy in another format
    with pytest.raises(ValueError, match=r"test/crack/000.png has 2 masks: .*000_mask.bmp, .*000_mask.png; "
                                         r"keep one"):
        SelfSupMVTecDataset(tmp_path, 'tiny', is_train=False, low_res=SIZE)
    (masks / '000_mask.png').unlink()  # a mask of another image format than its image's is found
    assert SelfSupMVTecDataset(tmp_path, 'tiny', is_train=False, low_res=SIZE).has_mask.all()


def test_a_loco_pixel_value_listed_twice_is_refused(tmp_path):
    make_loco(tmp_path)
    config = tmp_path / 'juice_bottle' / 'defects_config.json'
    entries = json.loads(config.read_text())
    config.write_text(json.dumps(entries + [dict(entries[0], defect_name='other_defect')]))
    with pytest.raises(ValueError, match=r"defects_config.json lists the pixel values \[255\] more than once"):
        LocoLayout().defects(tmp_path, 'juice_bottle')


def test_loco_defect_regions_carry_their_saturation(tmp_path):
    make_loco(tmp_path)
    loco = LocoLayout()
    masks = loco.test_files(tmp_path, 'juice_bottle').masks[2]  # the logical anomaly, two PNGs
    regions = loco.defect_regions(tmp_path, 'juice_bottle', masks, size=SIZE // 2)
    # 4x4 defect of value 255 (relative 0.5) -> 2x2 at half size, saturated at 2 pixels;
    # 2x2 defect of value 20 (absolute 3 pixels at 32 px) -> 1 pixel, saturated at 3/4 pixel at 16 px
    assert [(int(m.sum()), s) for m, s in regions] == [(4, 2.0), (1, 0.75)]
    assert loco.defect_regions(tmp_path, 'juice_bottle', masks, size=SIZE)[1][1] == 3  # 3 of its 4 pixels at 32 px
    rgb = [np.repeat(np.asarray(Image.open(path))[:, :, None], 3, axis=2) for path in masks]
    for path, values in zip(masks, rgb):  # a mask saved again in colour: the same regions
        Image.fromarray(values).save(path)
    assert [(int(m.sum()), s) for m, s in loco.defect_regions(tmp_path, 'juice_bottle', masks,
                                                             size=SIZE // 2)] == [(4, 2.0), (1, 0.75)]
    _png(masks[1], mask_box=(0, 0, 2), mask_value=7)
    with pytest.raises(ValueError, match=r'should hold one pixel value of \[20, 255\].*found \[7\]'):
        loco.defect_regions(tmp_path, 'juice_bottle', masks, size=SIZE)


def test_the_test_set_check_before_training_reads_the_loco_defects(tmp_path):
    from self_sup_data.mvtec import check_test_set
    make_loco(tmp_path)
    check_test_set(tmp_path, 'juice_bottle')
    mask = tmp_path / 'juice_bottle' / 'ground_truth' / 'structural_anomalies' / '000' / '000.png'
    _png(mask, mask_box=(5, 5, 3), mask_value=7)  # not a defect of defects_config.json: no AU-sPRO
    with pytest.raises(ValueError, match=rf'mask {mask} should hold one pixel value of \[20, 255\]'):
        check_test_set(tmp_path, 'juice_bottle')


def test_a_loco_category_without_its_defects_config_is_named_as_such(tmp_path):
    from self_sup_data.mvtec import check_test_set
    make_loco(tmp_path)
    config = tmp_path / 'juice_bottle' / 'defects_config.json'
    config.unlink()  # a partial copy: read as MVTec AD, whose masks are <name>_mask.png files
    with pytest.raises(FileNotFoundError, match=rf"no mask for the defect image .*000.png .*is a folder of "
                                                rf"masks as in MVTec LOCO AD, whose {config} is missing"):
        check_test_set(tmp_path, 'juice_bottle')


def _loco_model(tmp_path):
    """(data, models): the LOCO fixture and an untrained model of it that records its layout."""
    from conftest import RES_SCALE, save_untrained_model
    from experiments.settings import parse_setting, trained_model_path
    data, models = tmp_path / 'data', tmp_path / 'models'
    make_loco(data)
    meta = dict(dataset='mvtec', setting='Shift-1', category='juice_bottle', kind='texture',
                res_scale=RES_SCALE, seed=1, layout=LocoLayout().spec())
    save_untrained_model(trained_model_path(models, parse_setting('Shift-1'), 'juice_bottle'), meta, seed=1)
    return data, models


@pytest.mark.slow
def test_loco_evaluation_reports_au_spro_of_all_logical_and_structural_anomalies(tmp_path):
    from experiments import metrics, mvtec_tasks
    from experiments.prediction import predict_maps
    from experiments.training import load_model
    data, models = _loco_model(tmp_path)
    make_mvtec_category(data, 'tiny')  # beside it, an MVTec AD model (layout detected)
    save_checkpoint(models, 'Shift-1', 'tiny', 'texture', seed=1)
    records = {r['category']: r for r in mvtec_tasks.evaluate_checkpoints(models, data)}
    loco, mvtec = records['juice_bottle'], records['tiny']
    model, meta = load_model(loco['checkpoint'])
    maps = predict_maps(model, mvtec_tasks.load_test_set(data, meta))  # the evaluation's maps
    side = maps.shape[-1]
    assert side == 64  # the 32-pixel images at the model's test side
    files = LocoLayout().test_files(data, 'juice_bottle')  # good, good, logical (2 PNGs), structural
    logical, structural = (LocoLayout().defect_regions(data, 'juice_bottle', files.masks[i], side)
                           for i in (2, 3))

    def au_spro(images, regions, owners):
        return metrics.au_spro(maps[images], [m for m, _ in regions], owners, [s for _, s in regions])
    assert loco['au_spro'] == au_spro([0, 1, 2, 3], logical + structural, [2, 2, 3])
    assert loco['au_spro_logical'] == au_spro([0, 1, 2], logical, [2, 2])
    assert loco['au_spro_structural'] == au_spro([0, 1, 3], structural, [2])
    assert 0 <= loco['au_spro'] <= 1 and 'error' not in loco
    assert not set(mvtec_tasks.SPRO_METRICS) & set(mvtec)  # other layouts have no AU-sPRO ...
    assert list(mvtec_tasks.write_report([mvtec], tmp_path / 'mvtec')) == list(
        mvtec_tasks.METRICS + metrics.THRESHOLD_METRICS)  # ... nor its tables
    mvtec_tasks.write_report(list(records.values()), tmp_path / 'out')
    results = pd.read_csv(tmp_path / 'out' / 'results.csv').set_index('category')
    for name in mvtec_tasks.SPRO_METRICS:
        assert results.loc['juice_bottle', name] == pytest.approx(loco[name])
        assert math.isnan(results.loc['tiny', name])
        assert (tmp_path / 'out' / 'tables' / f'{name}.md').is_file()


@pytest.mark.slow
def test_a_loco_mask_of_an_unknown_defect_fails_its_rows_naming_the_file(tmp_path):
    from experiments import mvtec_tasks
    data, models = _loco_model(tmp_path)
    mask = data / 'juice_bottle' / 'ground_truth' / 'structural_anomalies' / '000' / '000.png'
    _png(mask, mask_box=(5, 5, 3), mask_value=7)
    [record] = mvtec_tasks.evaluate_checkpoints(models, data)
    assert f'mask {mask} should hold one pixel value of [20, 255]' in record['error']
    assert math.isnan(record['image_auroc_mean'])


@pytest.mark.slow
def test_a_test_set_that_fails_to_load_fails_only_its_own_rows(tmp_path):
    from experiments import mvtec_tasks
    data, models = _loco_model(tmp_path)
    (data / 'juice_bottle' / 'defects_config.json').rename(data / 'juice_bottle' / 'moved.json')
    make_mvtec_category(data, 'tiny')  # evaluated after the LOCO model, whose category is gone
    save_checkpoint(models, 'Shift-1', 'tiny', 'texture', seed=1)
    records = {r['category']: r for r in mvtec_tasks.evaluate_checkpoints(models, data)}
    assert "category 'juice_bottle' not found" in records['juice_bottle']['error']
    assert 'error' not in records['tiny'] and records['tiny']['image_auroc_mean'] >= 0


def test_loco_defects_without_a_pixel_at_the_test_side_are_left_out_with_a_warning(tmp_path):
    from experiments.mvtec_tasks import loco_defects
    make_loco(tmp_path)
    _png(tmp_path / 'juice_bottle' / 'ground_truth' / 'logical_anomalies' / '000' / '001.png',
         mask_box=(10, 10, 1), mask_value=20)  # one even pixel: gone at half the side
    test = SelfSupMVTecDataset(tmp_path, 'juice_bottle', is_train=False, low_res=SIZE // 2)
    with pytest.warns(UserWarning, match='juice_bottle: 1 of 3 defects have no pixel at 16 pixels'):
        masks, saturation, image = loco_defects(tmp_path, test)
    assert masks.shape == (2, SIZE // 2, SIZE // 2) and list(image) == [2, 3]
    # relative 0.5 of the 4x4 at (0, 0) -> 2x2 and of the 3x3 at (5, 5) -> 2x2 (rows and columns
    # 5 and 7: the centres of the half-side pixels' footprints)
    assert list(saturation) == [2.0, 2.0]


def test_ad2_private_maps_are_written_in_the_server_layout(tmp_path):
    from experiments.ad2_submission import write_ad2_maps
    from self_sup_data.layouts import AD2Layout
    make_ad2(tmp_path / 'data')
    for i in range(2):
        _png(tmp_path / 'data' / 'vial' / 'test_private' / f'{i:03d}_regular.png', size=(20, 30))
    images = AD2Layout().private_files(tmp_path / 'data', 'vial', 'test_private')
    maps = np.zeros((2, 8, 8), np.float32)
    maps[1, :4] = 1.0
    maps[1, 5, 5] = 0.6  # a faint spot that the bilinearly resized map holds above 0.5 on fewer pixels
    written = write_ad2_maps(tmp_path / 'out', 'vial', 'test_private', images, maps, threshold=0.5)
    assert [(t.relative_to(tmp_path / 'out').as_posix(), p.relative_to(tmp_path / 'out').as_posix())
            for t, p in written][1] == ('anomaly_images/vial/test_private/001_regular.tiff',
                                        'anomaly_images_thresholded/vial/test_private/001_regular.png')
    tiff, png = tifffile.imread(written[1][0]), np.asarray(Image.open(written[1][1]))
    # as MVTec's submission checker reads them: float16 single-channel maps, 0/255 masks
    assert tiff.dtype == np.float16 and tiff.shape == (20, 30) and tiff[0, 0] == 1.0 and tiff[-1, -1] == 0.0
    assert png.shape == (20, 30) and set(np.unique(png)) == {0, 255}
    # the mask is the threshold's decision at the model's resolution, each map pixel's on its footprint
    np.testing.assert_array_equal(png > 0, cv2.resize(np.uint8(maps[1] > 0.5), (30, 20),
                                                      interpolation=cv2.INTER_NEAREST_EXACT) > 0)
    assert not list((tmp_path / 'out').rglob('.*.tmp'))
    before = {path: path.read_bytes() for path in (tmp_path / 'out').rglob('*') if path.is_file()}
    images[1].write_bytes(b'not an image')  # unreadable: nothing of the new maps is written
    with pytest.raises(ValueError, match=r'cannot read image .*001_regular.png'):
        write_ad2_maps(tmp_path / 'out', 'vial', 'test_private', images, maps + 0.25, threshold=0.5)
    assert {path: path.read_bytes() for path in (tmp_path / 'out').rglob('*') if path.is_file()} == before
    images[1].write_bytes(images[0].read_bytes())
    nan_map = maps.copy()
    nan_map[1, 0, 0] = np.nan
    for threshold, bad_maps, message in ((None, maps, 'threshold must be a finite number, got None'),
                                         (float('nan'), maps, 'threshold must be a finite number, got nan'),
                                         ('0.5', maps, "threshold must be a finite number, got '0.5'"),
                                         (0.5, nan_map, rf'the map of {images[1]} holds NaN'),
                                         (0.5, maps * 7e4, rf'the map of {images[1]} reaches 70000.2, beyond '
                                                           r'the float16 TIFF\'s range \(65504\); rescale')):
        with pytest.raises(ValueError, match=message):  # refused before the first file is written
            write_ad2_maps(tmp_path / 'out', 'vial', 'test_private', images, bad_maps + 0.25, threshold)
        assert {path: path.read_bytes() for path in (tmp_path / 'out').rglob('*') if path.is_file()} == before
    # a map is filed by category, split and name alone: images of another split, or two of one name
    mixed = tmp_path / 'data' / 'vial' / 'test_private_mixed' / '000_mixed.png'
    _png(mixed, size=(20, 30))
    same_name = images[0].with_suffix('.jpg')
    same_name.write_bytes(images[0].read_bytes())
    for paths, message in (([images[0], mixed], rf'{mixed} is not an image of vial/test_private'),
                           ([images[0], same_name], r"images of vial/test_private share the names \['000_regular'\]")):
        with pytest.raises(ValueError, match=message):
            write_ad2_maps(tmp_path / 'out', 'vial', 'test_private', paths, maps, 0.5)
    with pytest.raises(ValueError, match=r'maps must be one N x H x W array .*shapes \[\(8, 8\), \(4, 4\)\]'):
        write_ad2_maps(tmp_path / 'out', 'vial', 'test_private', images, [maps[0], maps[1][:4, :4]], 0.5)
    assert {path: path.read_bytes() for path in (tmp_path / 'out').rglob('*') if path.is_file()} == before
    with pytest.raises(ValueError, match="split must be one of"):
        AD2Layout().private_files(tmp_path / 'data', 'vial', 'test_public')


def test_held_out_validation_images_come_from_the_layouts_training_files(tmp_path):
    from self_sup_data.mvtec import load_validation_set, train_files
    rng = np.random.default_rng(0)
    for i in range(10):
        path = tmp_path / 'ok' / f'{i:02d}.jpg'
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)).save(path)
    layout = FolderLayout(tmp_path / 'ok')
    files = train_files(None, 'parts', layout)
    assert files == layout.train_files() and len(files) == 8  # a fifth of the normal images tests
    train = SelfSupMVTecDataset(None, 'parts', low_res=SIZE, exclude=[0, 3], layout=layout)
    assert train.paths == [str(p) for i, p in enumerate(files) if i not in (0, 3)]
    validation = load_validation_set(None, 'parts', [0, 3], seed=0, res_scale=0.125, layout=layout)
    assert validation.paths == [str(files[0]), str(files[3])] * 2
    assert list(validation.labels) == [0, 0, 1, 1]


def test_format_flags_and_data_root_must_agree(tmp_path, capsys):
    import train_mvtec
    from test_cli import run_error
    make_mvtec_category(tmp_path / 'data', 'tiny', n_train=4)
    normal = str(tmp_path / 'data' / 'tiny' / 'train' / 'good')
    base = ['-s', 'Shift', '-o', str(tmp_path / 'out')]
    message = run_error(train_mvtec.main, base + ['-d', str(tmp_path / 'data'), '--format', 'folder',
                                                  '--normal', normal], capsys)
    assert '-d DATA_DIR is not read with --format folder' in message
    message = run_error(train_mvtec.main, base + ['--format', 'visa'], capsys)
    assert '--format visa reads a data root: pass -d DATA_DIR' in message
    folder = ['--format', 'folder', '--normal', normal, '--epochs', '1']
    message = run_error(train_mvtec.main, base + folder + ['--abnormal', normal], capsys)
    assert f"4 images are both normal ({normal}) and anomalous ({normal})" in message
    for flags, expected in (
            (['--abnormal', str(tmp_path / 'none')], f"{tmp_path / 'none'} does not exist"),
            (['--mask-dir', normal], 'needs a folder of anomalous images for testing (--abnormal DIR)')):
        message = run_error(train_mvtec.main, base + folder + flags, capsys)  # without --evaluate too
        assert expected in message
    for name in ('lot/7', '..', '.'):  # the name of the models' files: no folder, never outside -o
        message = run_error(train_mvtec.main, base + ['--format', 'folder', '--normal', normal, '-n', name],
                            capsys)
        assert f"-n {name!r}: with --format folder the name of the category is a file name" in message
    # a broken image among the normal images held out for testing: refused now, not at the evaluation
    held_out = FolderLayout(normal).normal_test_files()[0]
    held_out.write_bytes(held_out.read_bytes()[:40])
    message = run_error(train_mvtec.main, base + ['--format', 'folder', '--normal', normal], capsys)
    assert (f"cannot read image {held_out}" in message and message.endswith(
        "it is among the normal images held out for testing, which training does not read and an evaluation later "
        "would fail on: fix it now, or replace it (removing it moves the held-out fifth)"))
    assert not (tmp_path / 'out').exists()  # no demo data written


def test_contents_digest_follows_names_and_bytes_not_folders_or_order(tmp_path):
    """``contents_sha256``: the same files listed in another order or moved to another folder give the
    same digest; a file's bytes replaced under its name, or two files' contents swapped, another;
    an unreadable file is an OSError naming it."""
    for folder in ('a', 'b'):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / '1.png').write_bytes(b'one')
        (tmp_path / folder / '2.png').write_bytes(b'two')
    first = contents_sha256([tmp_path / 'a' / '1.png', tmp_path / 'a' / '2.png'])
    assert contents_sha256([tmp_path / 'b' / '2.png', tmp_path / 'b' / '1.png']) == first
    (tmp_path / 'b' / '1.png').write_bytes(b'two')
    (tmp_path / 'b' / '2.png').write_bytes(b'one')
    assert contents_sha256([tmp_path / 'b' / '1.png', tmp_path / 'b' / '2.png']) != first
    (tmp_path / 'b' / '1.png').write_bytes(b'one')
    (tmp_path / 'b' / '2.png').write_bytes(b'twO')
    assert contents_sha256([tmp_path / 'b' / '1.png', tmp_path / 'b' / '2.png']) != first
    with pytest.raises(OSError, match='3.png'):
        contents_sha256([tmp_path / 'a' / '3.png'])
