import re
import subprocess
import sys
import warnings
from io import StringIO
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from experiments import settings, training
from self_sup_data import chest_xray
from self_sup_data.chest_xray import (SelfSupChestXRay, build_file_lists, chest_recipe, read_file_list,
                                      read_table, write_file_lists)

NIH = Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'nih_chestxray'
NIH_TABLE = NIH / 'Data_Entry_2017_v2020.csv.gz'
ARGS = dict(width_bounds_pct=((0.1, 0.3), (0.1, 0.3)))
BBOX_HEADER = 'Image Index,Finding Label,Bbox [x,y,w,h],,,\n'  # as in NIH's BBox_List_2017.csv


@pytest.fixture
def xrays(tmp_path):
    """data_dir with 4 normal and 3 anomalous images (gray, RGB-gray, RGBA, sizes 160 and 200)."""
    rng = np.random.default_rng(0)
    names = [f'{i:08d}_000.png' for i in range(7)]
    for i, name in enumerate(names):
        gray = rng.integers(0, 256, (160 + 40 * (i % 2),) * 2, dtype=np.uint8)
        image = [gray, np.stack([gray] * 3, 2), np.dstack([gray] * 3 + [np.full_like(gray, 255)])][i % 3]
        Image.fromarray(image).save(tmp_path / name)
    (tmp_path / 'normal.txt').write_text('\n'.join(names[:4]) + '\n\n')
    (tmp_path / 'anomalous.txt').write_text('\n'.join(names[4:]) + '\n')
    return tmp_path, names


def test_recipe_sizes():
    assert chest_recipe(256)['train_size'] == 224
    assert [repr(t) for t in chest_recipe(256)['transform'].transforms] == [
        'RandomRotation(3)', 'CenterCrop(230)', 'RandomCrop(224)']
    assert chest_recipe(512)['train_size'] == 448 and chest_recipe(128)['train_size'] == 96
    with pytest.raises(ValueError, match='res=32'):
        chest_recipe(32)


def test_read_file_list(tmp_path):
    (tmp_path / 'list.txt').write_text('a.png\n\n  b.png \n')
    assert read_file_list(tmp_path / 'list.txt') == ['a.png', 'b.png']
    assert read_file_list(str(tmp_path / 'list.txt')) == ['a.png', 'b.png']
    assert read_file_list(['c.png']) == ['c.png']
    assert read_file_list(['./c.png', 'd//e.png', 'd/../f.png']) == ['c.png', 'd/e.png', 'f.png']  # one name each
    (tmp_path / 'bom.txt').write_text('a.png\r\nb.png\r\n', encoding='utf-8-sig')  # as Windows editors save
    assert read_file_list(tmp_path / 'bom.txt') == ['a.png', 'b.png']
    with pytest.raises(FileNotFoundError, match='missing.txt'):
        read_file_list(tmp_path / 'missing.txt')
    (tmp_path / 'utf16.txt').write_text('a.png\n', encoding='utf-16')
    with pytest.raises(ValueError, match=r'file list .*utf16.txt is not UTF-8 text'):
        read_file_list(tmp_path / 'utf16.txt')


def test_train_items(xrays):
    data_dir, _ = xrays
    ds = SelfSupChestXRay(data_dir, data_dir / 'normal.txt', data_dir / 'anomalous.txt', res=128,
                          self_sup_args=ARGS)
    assert len(ds) == 4 and ds.in_channels == 1 and (ds.low_res, ds.train_size) == (128, 96)
    assert all(im.shape == (128, 128, 1) and im.dtype == np.uint8 for im in ds.images)
    for i in range(len(ds)):
        image, zero, label = ds[i]
        assert image.shape == (1, 96, 96) and image.dtype == torch.float32 and zero == 0
        assert label.shape == (1, 96, 96) and 0 <= label.min() and label.max() <= 1


@pytest.mark.slow
def test_same_samples_for_any_number_of_workers(xrays):
    data_dir, _ = xrays
    ds = SelfSupChestXRay(data_dir, data_dir / 'normal.txt', res=128, self_sup_args=ARGS, seed=3)
    serial, parallel = (list(DataLoader(ds, batch_size=2, num_workers=n)) for n in (0, 2))
    for (x0, _, y0), (x2, _, y2) in zip(serial, parallel):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)


def write_boxes(path, rows):
    path.write_text(BBOX_HEADER + ''.join(f'{n},{label},{x},{y},{w},{h},,,\n' for n, label, x, y, w, h in rows))


def test_test_items_with_box_masks(xrays):
    data_dir, names = xrays
    write_boxes(data_dir / 'boxes.csv', [(names[4], 'Mass', 256.0, 512.0, 128.0, 64.0),
                                         (names[4], 'Nodule', 800, 800, 8, 8),
                                         (names[5], 'Effusion', 0, 1000, 1024, 24),
                                         (names[0], 'Mass', 0, 0, 100, 100)])  # a normal image: ignored
    ds = SelfSupChestXRay(data_dir, data_dir / 'normal.txt', data_dir / 'anomalous.txt',
                          bbox_csv=data_dir / 'boxes.csv', is_train=False, res=128)
    assert len(ds) == 7 and list(ds.labels) == [0, 0, 0, 0, 1, 1, 1]
    assert list(ds.has_mask) == [True] * 6 + [False]
    assert ds.defect_types == ['good'] * 4 + ['anomaly'] * 3
    assert ds.paths == [str(data_dir / n) for n in names]
    expected = np.zeros((128, 128), np.float32)
    expected[64:72, 32:48] = 1   # (256, 512, 128, 64) / 8
    expected[100:101, 100:101] = 1  # an 8-pixel box becomes one pixel
    image, label, mask = ds[4]
    assert image.shape == (1, 128, 128) and label == 1
    np.testing.assert_array_equal(mask[0].numpy(), expected)
    expected[:] = 0
    expected[125:128, :] = 1
    np.testing.assert_array_equal(ds[5][2][0].numpy(), expected)
    assert not ds[0][2].any() and not ds[6][2].any()


def test_weight_averaging_longer_than_the_default_epochs_is_refused_before_anything_is_written(tmp_path):
    import train_chest_xray
    Image.fromarray(np.full((64, 64), 100, np.uint8)).save(tmp_path / 'a.png')
    (tmp_path / 'normal.txt').write_text('a.png\n')
    argv = ['-s', 'Shift', '-d', str(tmp_path), '-l', str(tmp_path / 'normal.txt'), '-o', str(tmp_path / 'out')]
    epochs = settings.training_epochs(settings.chest_xray_params())
    with pytest.raises(ValueError, match=rf"^--swa-epochs must be less than the {epochs} epochs that category "
                                         rf"'chest_xray' trains for without --epochs, got {epochs}; pass --epochs$"):
        train_chest_xray.plan(train_chest_xray.parse_args(argv + ['--swa-epochs', str(epochs)]))
    assert not (tmp_path / 'out').exists()
    longer = ['--swa-epochs', str(epochs), '--epochs', str(epochs + 1)]
    train_chest_xray.plan(train_chest_xray.parse_args(argv + longer))


def test_16_bit_x_rays_are_read_with_the_training_sets_bit_depth(tmp_path):
    import train_chest_xray
    from experiments.chest_xray_tasks import load_test_set
    names = ['bright.png', 'dark.png']
    Image.fromarray(np.full((64, 64), 60000, np.uint16)).save(tmp_path / names[0])
    Image.fromarray(np.full((64, 64), 3000, np.uint16)).save(tmp_path / names[1])  # a dark exposure
    (tmp_path / 'normal.txt').write_text('\n'.join(names) + '\n')
    args = train_chest_xray.parse_args(['-s', 'Shift', '-d', str(tmp_path), '-l', str(tmp_path / 'normal.txt'),
                                        '-o', str(tmp_path / 'out'), '--res', '64'])
    setting, params, _ = train_chest_xray.plan(args)
    with pytest.warns(UserWarning, match=r"the training images span only 0 grey levels \(1st to 99th percentile, "
                                         r"median over the images; their 16-bit values read as 8 bits from the "
                                         r"16-bit range 0..65535\)"):  # each image is flat
        dataset, _, _, meta, _ = train_chest_xray.prepare_run(args, setting, params)
    assert meta['bit_depth'] == dataset.bit_depth == 16
    (tmp_path / 'anomalous.txt').write_text('dark.png\n')
    test = load_test_set(tmp_path, ['bright.png'], tmp_path / 'anomalous.txt', res=64,
                         bit_depth=meta['bit_depth'])
    assert test.images[-1].max() == round(3000 * 255 / 65535)  # as dark as in training
    assert load_test_set(tmp_path, ['bright.png'], tmp_path / 'anomalous.txt',
                         res=64).images[-1].max() == round(3000 * 255 / 4095)  # image by image


def narrow_16_bit_xrays(folder, count=4, seed=0):
    """16-bit X-rays whose values lie within 29800..30200 (a sliver of the 16-bit range), listed in
    ``folder/normal.txt`` -> their names."""
    rng = np.random.default_rng(seed)
    names = [f'{i:08d}_000.png' for i in range(count)]
    for name in names:
        Image.fromarray((29800 + rng.integers(0, 400, (64, 64))).astype(np.uint16)).save(folder / name)
    (folder / 'normal.txt').write_text('\n'.join(names) + '\n')
    return names


def test_narrow_16_bit_x_rays_get_a_window_suggested_and_train_and_evaluate_with_it(tmp_path, capsys):
    import train_chest_xray
    from conftest import save_untrained_model
    from experiments import prediction
    from experiments.chest_xray_tasks import evaluate_checkpoints, load_test_set
    names = narrow_16_bit_xrays(tmp_path)
    argv = ['-s', 'Shift', '-d', str(tmp_path), '-l', str(tmp_path / 'normal.txt'), '-o', str(tmp_path / 'out'),
            '--res', '64']
    args = train_chest_xray.parse_args(argv)
    setting, params, _ = train_chest_xray.plan(args)
    with pytest.warns(UserWarning) as caught:
        train_chest_xray.prepare_run(args, setting, params)
    window = re.search(r"train with --intensity-range (\d+) (\d+) \(their 16-bit values' 1st to 99th percentile",
                       str(caught[0].message))
    assert window and 29700 <= int(window[1]) < 29810 and 30190 < int(window[2]) <= 30300
    args = train_chest_xray.parse_args(argv + ['--intensity-range', window[1], window[2]])
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # spread wide enough: no warning
        dataset, _, _, meta, _ = train_chest_xray.prepare_run(args, setting, params)
    assert meta['bit_depth'] == dataset.bit_depth == [int(window[1]), int(window[2])]
    low, high = meta['bit_depth']
    # a model with the window is evaluated on test images read with it (not refused per row)
    Image.fromarray(np.full((64, 64), 30150, np.uint16)).save(tmp_path / 'bright.png')
    (tmp_path / 'anomalous.txt').write_text('bright.png\n')
    model_dir = tmp_path / 'models'
    save_untrained_model(model_dir / 'shift' / 'chest_xray' / 'final_chest_xray_shift_1.pt',
                         dict(dataset='chest_xray', setting='Shift-1', category='chest_xray', res=64, seed=1,
                              bit_depth=meta['bit_depth'], train_names=names[2:]))
    (tmp_path / 'test.txt').write_text('\n'.join(names[:2]) + '\n')
    [record] = evaluate_checkpoints(model_dir, tmp_path, tmp_path / 'test.txt', tmp_path / 'anomalous.txt')
    assert 'error' not in record or pd.isna(record['error'])
    model, _ = training.load_model(record['checkpoint'])
    test_set = load_test_set(tmp_path, tmp_path / 'test.txt', tmp_path / 'anomalous.txt', res=64,
                             bit_depth=meta['bit_depth'])
    assert test_set.images[-1].min() == round((30150 - low) * 255 / (high - low))  # the window's reading
    np.testing.assert_array_equal(test_set.images[0], dataset.images[0])  # as in training
    assert record['image_auroc_mean'] == prediction.evaluate(model, test_set, crop_size=32)['image_auroc_mean']


def test_bit_depth_options_of_chest_x_rays(xrays, capsys):
    import train_chest_xray
    data_dir, _ = xrays
    argv = ['-s', 'Shift', '-d', str(data_dir), '-l', str(data_dir / 'normal.txt'), '-o', str(data_dir / 'out'),
            '--res', '64']
    args = train_chest_xray.parse_args(argv + ['--bit-depth', '12'])
    setting, params, _ = train_chest_xray.plan(args)
    with pytest.warns(UserWarning, match=r"^category 'chest_xray': --bit-depth 12 applies to 16-bit image files, "
                                         r"and none of its training images is one"):
        train_chest_xray.prepare_run(args, setting, params)
    for wrong, message in ((['--intensity-range', '200', '100'], 'LOW must be below HIGH, got 200 100'),
                           (['--bit-depth', '7'], 'an integer from 8 to 16'),
                           (['--bit-depth', '12', '--intensity-range', '1', '2'], 'not allowed with argument')):
        with pytest.raises(SystemExit):
            train_chest_xray.parse_args(argv + wrong)
        assert message in capsys.readouterr().err


def test_test_items_without_boxes_are_image_level(xrays):
    data_dir, names = xrays
    ds = SelfSupChestXRay(data_dir, names[:2], names[2:], is_train=False, res=64)
    assert list(ds.has_mask) == [True, True] + [False] * 5 and ds[3][2].shape == (1, 64, 64)
    for name in names[2:]:  # the anomalous X-rays of another source (size)
        Image.open(data_dir / name).resize((40, 48)).save(data_dir / name)
    with pytest.warns(UserWarning, match=r"chest_xray: 5 of 5 defect test images have a size like few or no normal "
                                         r"images' \(first: .*, 40x48"):
        SelfSupChestXRay(data_dir, names[:2], names[2:], is_train=False, res=64)


def test_errors(xrays):
    data_dir, names = xrays
    with pytest.raises(FileNotFoundError, match=r"1 of 2 images of the normal list are missing .*nope.png"):
        SelfSupChestXRay(data_dir, [names[0], 'nope.png'])
    with pytest.raises(ValueError, match='the normal list is empty'):
        SelfSupChestXRay(data_dir, [])
    (data_dir / 'empty.txt').write_text('\n')
    with pytest.raises(ValueError, match=f'the normal list {data_dir / "empty.txt"} is empty'):
        SelfSupChestXRay(data_dir, data_dir / 'empty.txt')
    with pytest.raises(ValueError, match=f'the anomalous list {data_dir / "empty.txt"} is empty; testing'):
        SelfSupChestXRay(data_dir, data_dir / 'normal.txt', data_dir / 'empty.txt', is_train=False)
    with pytest.raises(ValueError, match=r"1 images are in both the normal list .*normal.txt and the "
                                         r"anomalous list, e.g. \['00000003_000.png'\]"):
        SelfSupChestXRay(data_dir, data_dir / 'normal.txt', names[3:], is_train=False)
    with pytest.raises(ValueError, match=r"the anomalous list names 1 images more than once, e.g. "
                                         rf"\['{names[4]}'\]; each test image is scored once"):
        SelfSupChestXRay(data_dir, names[:2], names[3:] + [names[4]], is_train=False)
    with pytest.raises(ValueError, match=r"the normal list names 2 images more than once, e.g. "
                                         rf"\['{names[0]}', '{names[1]}'\]; each training image is listed once"):
        SelfSupChestXRay(data_dir, names[:3] + names[:2])  # two lists pasted together
    absolute = str(data_dir / names[1])  # one image under two names: scored (or trained on) twice
    with pytest.raises(ValueError, match=rf"the normal list: the names '{names[1]}' and '{re.escape(absolute)}' are "
                                         rf"one image \({re.escape(absolute)}\); each image is listed once"):
        SelfSupChestXRay(data_dir, names[:3] + [absolute])
    with pytest.raises(ValueError, match=r"the normal list and the anomalous list: the names '.*' and '.*' are one "
                                         r"image"):
        SelfSupChestXRay(data_dir, names[:3], [absolute], is_train=False)
    (data_dir / 'again').symlink_to(data_dir)  # a link to the data folder: another name of each image
    with pytest.raises(ValueError, match=rf"^the normal list: the names '{names[1]}' and 'again/{names[1]}' are one "
                                         r"image"):
        SelfSupChestXRay(data_dir, names[:3] + [f'again/{names[1]}'], names[4:], is_train=False)
    with pytest.raises(ValueError, match=rf"file list {re.escape(str(data_dir))} is a folder; give a text file of "
                                         r"image names, one per line"):
        SelfSupChestXRay(data_dir, data_dir)
    (data_dir / 'trailing.csv').write_text('Image Index,Finding Label,Bbox [x,y,w,h]\n'
                                           f'{names[4]},Mass,256,512,128,64,\n')  # rows end in a comma
    boxed = SelfSupChestXRay(data_dir, names[:2], names[4:], bbox_csv=data_dir / 'trailing.csv',
                             is_train=False, res=128)
    assert int(boxed.masks[2].sum()) == 16 * 8
    with pytest.raises(ValueError, match=r"box table .*boxes.csv: 2 rows .* on lines \[2, 4\]"):
        write_boxes(data_dir / 'boxes.csv', [(names[4], 'Mass', 'abc', 1, 2, 3), (names[5], 'Mass', 1, 2, 3, 4),
                                             (names[6], 'Mass', 1, 2, '', 4)])
        SelfSupChestXRay(data_dir, names[:2], names[4:], bbox_csv=data_dir / 'boxes.csv', is_train=False)
    # boxes whose masks would be empty
    for x, y, w, h, line in ((1024, 0, 10, 10, 2), (-20, 0, 10, 10, 2), (0, 0, 0, 10, 2), (5, 5, 10, -3, 2)):
        write_boxes(data_dir / 'boxes.csv', [(names[4], 'Mass', x, y, w, h), (names[5], 'Mass', 1, 2, 3, 4)])
        with pytest.raises(ValueError, match=rf"boxes.csv: 1 boxes without a positive width and height inside the "
                                             rf"1024 x 1024 frame .* on lines \[{line}\]"):
            SelfSupChestXRay(data_dir, names[:2], names[4:], bbox_csv=data_dir / 'boxes.csv', is_train=False)
    (data_dir / 'empty.csv').write_text('')
    (data_dir / 'image.csv').write_bytes(b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe')
    for table in ('empty.csv', 'image.csv'):
        with pytest.raises(ValueError, match=rf"cannot read box table .*{table}: .*expected NIH's BBox_List_2017.csv"):
            SelfSupChestXRay(data_dir, names[:2], names[2:], bbox_csv=data_dir / table, is_train=False)
    # a test image named two ways is one image
    with pytest.raises(ValueError, match=r"1 images are in both the normal list and the anomalous list"):
        SelfSupChestXRay(data_dir, names[:2], [f'./{names[1]}', names[4]], is_train=False)
    (data_dir / 'bad.csv').write_text('Image Index,Label\n')
    with pytest.raises(KeyError, match=r"bad.csv lacks columns \['Finding Label'"):
        SelfSupChestXRay(data_dir, names[:2], names[2:], bbox_csv=data_dir / 'bad.csv', is_train=False)


@pytest.mark.skipif(not (NIH / 'images').is_dir(), reason=f'real images not present: {NIH / "images"}')
def test_real_images():
    names = sorted(p.name for p in (NIH / 'images').glob('*.png'))
    ds = SelfSupChestXRay(NIH / 'images', names[:5], names[5:], is_train=False, res=128)
    assert len(ds) == len(names) and ds.in_channels == 1
    assert all(im.shape == (128, 128, 1) for im in ds.images)
    assert all(20 < im.mean() < 235 and im.std() > 10 for im in ds.images)  # real content, not blank


# ----------------------------------------------------------------------------- list builder

def synthetic_table(n_patients=40, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for patient in range(1, n_patients + 1):
        gender, age = rng.choice(['M', 'F']), int(rng.integers(5, 90))
        for follow_up in range(int(rng.integers(1, 6))):
            finding = rng.choice(['No Finding', 'No Finding', 'Mass', 'Effusion|Mass'])
            rows.append({'Image Index': f'{patient:08d}_{follow_up:03d}.png', 'Finding Labels': finding,
                         'Follow-up #': follow_up, 'Patient ID': patient, 'Patient Age': age + follow_up // 3,
                         'Patient Gender': gender, 'View Position': rng.choice(['PA', 'AP'])})
    return pd.DataFrame(rows)


def check_lists(table, lists, n_normal, n_anom):
    rows = table.set_index('Image Index')
    patients = {name: rows.loc[lists[name], 'Patient ID'] for name in lists}
    assert not set(patients['norm_train']) & (set(patients['norm_test']) | set(patients['anom_test']))
    assert (rows.loc[lists['norm_train'] + lists['norm_test'], 'Finding Labels'] == 'No Finding').all()
    assert (rows.loc[lists['anom_test'], 'Finding Labels'] != 'No Finding').all()
    assert len(lists['norm_test']) == n_normal and len(lists['anom_test']) == n_anom
    assert all(lists[name] == sorted(lists[name]) for name in lists)


def test_build_file_lists():
    table = synthetic_table()
    lists = build_file_lists(table, gender='M', min_age=18, view='PA', n_test_normal=5, n_test_anom=4)
    check_lists(table, lists, 5, 4)
    chosen = table.set_index('Image Index').loc[sum(lists.values(), [])]
    assert (chosen['Patient Gender'] == 'M').all() and (chosen['Patient Age'] >= 18).all()
    assert (chosen['View Position'] == 'PA').all()
    eligible = table[(table['Patient Gender'] == 'M') & (table['Patient Age'] >= 18) & (table['View Position'] == 'PA')
                     & (table['Finding Labels'] == 'No Finding')]
    assert 0 < len(lists['norm_train']) <= len(eligible) - 5
    assert build_file_lists(table, gender='M', n_test_normal=5, n_test_anom=4) == lists
    assert build_file_lists(table, gender='M', n_test_normal=5, n_test_anom=4, seed=1) != lists
    everyone = build_file_lists(table, gender=None, min_age=None, view=None, n_test_normal=10, n_test_anom=10)
    check_lists(table, everyone, 10, 10)


def test_build_file_lists_problems(tmp_path, capsys):
    table = synthetic_table()
    with pytest.warns(UserWarning, match='anom_test'):
        build_file_lists(table, n_test_normal=1, n_test_anom=10_000)
    with pytest.raises(ValueError, match="no 'No Finding' images"):
        build_file_lists(table, min_age=200)
    # test patients that take every normal patient leave nothing to train on: refused, lists kept
    lists = tmp_path / 'lists'
    table.to_csv(tmp_path / 'table.csv', index=False)
    chest_xray.main(['--csv', str(tmp_path / 'table.csv'), '--out', str(lists), '--n-test-normal', '5'])
    earlier = {path.name: path.read_text() for path in lists.iterdir()}
    assert earlier['norm_train.txt']
    with pytest.raises(SystemExit):
        chest_xray.main(['--csv', str(tmp_path / 'table.csv'), '--out', str(lists), '--n-test-normal', '100000'])
    assert 'no image is left for training; ask for fewer test images' in capsys.readouterr().err
    assert {path.name: path.read_text() for path in lists.iterdir()} == earlier
    with pytest.raises(KeyError, match='Patient Gender'):
        read_table(StringIO('Image Index,Finding Labels\na.png,No Finding\n'))


def test_label_tables_with_blank_labels_repeated_images_or_trailing_commas(tmp_path):
    """A blank label would make an image anomalous, a repeated image could be in train and test;
    rows that end in a comma must not shift the columns."""
    table = synthetic_table()
    blank = table.copy()
    blank.loc[3, 'Finding Labels'] = ' '
    blank.loc[5, 'Image Index'] = None
    with pytest.raises(ValueError, match=r"2 rows without a value in one of .* on lines \[5, 7\]"):
        read_table(StringIO(blank.to_csv(index=False)))
    twice = pd.concat([table, table.iloc[[2]]])
    with pytest.raises(ValueError, match=rf"images listed more than once, e.g. \['{table['Image Index'][2]}'\]"):
        read_table(StringIO(twice.to_csv(index=False)))
    text = table.to_csv(index=False).replace('\n', ',\n').replace(',\n', '\n', 1)  # rows end in a comma
    read = read_table(StringIO(text))
    assert (read['Patient Age'] == table['Patient Age']).all() and (read['Image Index'] == table['Image Index']).all()
    spaced = table.assign(**{'Finding Labels': table['Finding Labels'] + ' '})
    lists = build_file_lists(read_table(StringIO(spaced.to_csv(index=False))), n_test_normal=5, n_test_anom=4)
    assert lists == build_file_lists(read_table(StringIO(table.to_csv(index=False))), n_test_normal=5, n_test_anom=4)


def test_patient_ids_that_mix_numbers_and_text_are_named(monkeypatch):
    """pandas reads a long table in chunks, each typed on its own, so that one text ID among
    numbers gave a column of both, and the patient split failed with a TypeError."""
    table = synthetic_table()
    mixed = table.astype({'Patient ID': object})
    mixed.loc[5:, 'Patient ID'] = mixed['Patient ID'][5:].astype(str)  # a chunk read as text, its numbers too
    mixed.loc[7, 'Patient ID'] = 'P30000'
    monkeypatch.setattr(chest_xray.pd, 'read_csv', lambda *args, **kwargs: mixed.copy())
    with pytest.raises(ValueError, match=r"'Patient ID' mixes numbers and text, e.g. \['P30000'\] on lines \[9\]"):
        read_table('table.csv')
    mixed.loc[5, 'Patient ID'] = '-5.5'  # a number too, though not an unsigned integer
    with pytest.raises(ValueError, match=r"e.g. \['P30000'\] on lines \[9\]"):
        read_table('table.csv')
    text = table.assign(**{'Patient ID': 'P' + table['Patient ID'].astype(str)})  # all text: split as usual
    monkeypatch.setattr(chest_xray.pd, 'read_csv', lambda *args, **kwargs: text.copy())
    check_lists(text, build_file_lists(read_table('table.csv'), n_test_normal=5, n_test_anom=4), 5, 4)


def test_lists_into_a_file_are_refused_naming_it(tmp_path):
    (tmp_path / 'lists').write_text('not a folder')
    with pytest.raises(NotADirectoryError, match=r'lists is a file, not a folder to write the file lists into'):
        write_file_lists({'norm_train': ['a.png']}, tmp_path / 'lists')


def test_a_truncated_or_broken_compressed_table_is_named(tmp_path):
    import gzip
    whole = gzip.compress(synthetic_table().to_csv(index=False).encode())
    (tmp_path / 'cut.csv.gz').write_bytes(whole[:len(whole) // 2])
    (tmp_path / 'not.csv.gz').write_bytes(b'not gzip at all')
    for name in ('cut.csv.gz', 'not.csv.gz'):
        with pytest.raises(ValueError, match=f'cannot read label table .*{name}'):
            read_table(tmp_path / name)


def test_ages_written_with_units_are_read_as_years_and_others_named():
    table = synthetic_table()
    written = table.assign(**{'Patient Age': [f'{age:03d}Y' for age in table['Patient Age']]})
    written.loc[0, 'Patient Age'] = '006M'
    text = StringIO(written.to_csv(index=False))
    ages = read_table(text)['Patient Age']
    assert ages[0] == 0.5 and (ages[1:] == table['Patient Age'][1:]).all()
    written.loc[1, 'Patient Age'] = 'unknown'
    with pytest.raises(ValueError, match=r"'Patient Age' must be years .* got 'unknown' \(line 3\) \(1 rows\)$"):
        read_table(StringIO(written.to_csv(index=False)))
    written.loc[4, 'Patient Age'] = None  # a blank cell
    with pytest.raises(ValueError, match=r"got 'unknown' \(line 3\), '' \(line 6\) \(2 rows; '': a blank cell\)"):
        read_table(StringIO(written.to_csv(index=False)))


def test_command_line(tmp_path, capsys):
    table = synthetic_table()
    table.to_csv(tmp_path / 'Data_Entry_2017.csv.gz', index=False)
    chest_xray.main(['--csv', str(tmp_path / 'Data_Entry_2017.csv.gz'), '--out', str(tmp_path / 'lists'),
                     '--gender', 'F', '--n-test-normal', '4', '--n-test-anom', '3', '--seed', '2'])
    written = {name: read_file_list(tmp_path / 'lists' / f'{name}.txt') for name in chest_xray.LIST_NAMES}
    assert written == build_file_lists(table, gender='F', n_test_normal=4, n_test_anom=3, seed=2)
    assert sorted(p.name for p in (tmp_path / 'lists').iterdir()) == ['anom_test.txt', 'norm_test.txt',
                                                                     'norm_train.txt']
    assert f"norm_test: 4, anom_test: 3 -> {tmp_path / 'lists'}" in capsys.readouterr().out


def test_command_line_prints_a_warning_as_one_line(tmp_path):
    synthetic_table().to_csv(tmp_path / 'table.csv', index=False)
    done = subprocess.run([sys.executable, '-m', 'self_sup_data.chest_xray', '--csv', str(tmp_path / 'table.csv'),
                           '--out', str(tmp_path / 'lists'), '--n-test-normal', '2', '--n-test-anom', '10000'],
                          capture_output=True, text=True, check=True)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and re.fullmatch(
        r'python -m self_sup_data.chest_xray: warning: only \d+ images for anom_test \(asked for 10000\)', lines[0])


def test_lists_that_cannot_all_be_written_leave_the_earlier_lists(tmp_path, monkeypatch):
    earlier = dict(norm_train=['a.png'], norm_test=['b.png'], anom_test=['c.png'])
    chest_xray.write_file_lists(earlier, tmp_path)
    write_text = Path.write_text

    def disk_full_at_the_third(path, text):
        if path.name.startswith('.anom_test'):
            raise OSError(28, 'No space left on device')
        return write_text(path, text)
    monkeypatch.setattr(Path, 'write_text', disk_full_at_the_third)
    with pytest.raises(OSError, match='No space left'):
        chest_xray.write_file_lists(dict(norm_train=['d.png'], norm_test=['e.png'], anom_test=['f.png']), tmp_path)
    assert {name: read_file_list(tmp_path / f'{name}.txt') for name in earlier} == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ['anom_test.txt', 'norm_test.txt', 'norm_train.txt']


@pytest.mark.skipif(not NIH_TABLE.is_file(), reason=f'real label table not present: {NIH_TABLE}')
@pytest.mark.slow
def test_real_table():
    table = read_table(NIH_TABLE)
    assert len(table) == 112_120
    lists = build_file_lists(table, gender='F', n_test_normal=250, n_test_anom=120)
    check_lists(table, lists, 250, 120)
    assert len(lists['norm_train']) > 10_000


def test_a_model_is_not_tested_on_its_training_images(tmp_path):
    from experiments.chest_xray_tasks import check_not_trained_on
    from self_sup_data.layouts import names_sha256
    names = ['a/00000001_000.png', '00000002_000.png']
    (tmp_path / 'train.txt').write_text('\n'.join(names) + '\n')
    meta = dict(normal_list=str(tmp_path / 'train.txt'), data_dir=str(tmp_path / 'data'), train_names=names,
                normal_list_sha256=names_sha256(names))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        check_not_trained_on(meta, tmp_path / 'data', ['00000003_000.png', '00000004_000.png'])
        check_not_trained_on(meta, tmp_path / 'data', ['b/x.png'])  # the same folder, other names
    with pytest.raises(ValueError, match=r"1 test images are training images of this model \(its list .*train.txt\), "
                                         r"e.g. \['a/./00000001_000.png'\]"):
        check_not_trained_on(meta, tmp_path / 'data', ['a/./00000001_000.png', '00000004_000.png'])
    # an NIH name is one image wherever it lies (a copied or moved data folder); other names in another
    # folder are other images
    with pytest.raises(ValueError, match=r"1 test images are training images .* e.g. \['c/00000002_000.png'\]"):
        check_not_trained_on(meta, tmp_path / 'copy', ['c/00000002_000.png', '00000005_000.png'])
    meta_other = dict(meta, train_names=['a/x.png'])
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        check_not_trained_on(meta_other, tmp_path / 'test', ['a/x.png'])
    with pytest.warns(UserWarning, match=r"1 test images are of patients that this model was trained on .*"
                                         r"e.g. \['00000002_001.png'\]"):
        check_not_trained_on(meta, tmp_path / 'test', ['00000002_001.png', '00000005_000.png'])
    with pytest.warns(UserWarning, match=r"2 test images are of patients .* e.g. \['00000001_003.png', "
                                         r"'b/00000002_001.png'\]: follow-up images"):
        check_not_trained_on(meta, tmp_path / 'data', ['b/00000002_001.png', '00000001_003.png', '00000007_000.png'])
    # the list is what the training stored: rewriting the list file since changes nothing
    (tmp_path / 'train.txt').write_text('00000009_000.png\n')
    with pytest.raises(ValueError, match='1 test images are training images'):
        check_not_trained_on(meta, tmp_path / 'data', ['00000002_000.png'])
    # a model that stored no names: its list where unchanged, else a warning that nothing is checked
    older = {k: v for k, v in meta.items() if k != 'train_names'}
    (tmp_path / 'train.txt').write_text('\n'.join(names) + '\n')
    with pytest.raises(ValueError, match='1 test images are training images'):
        check_not_trained_on(older, tmp_path / 'data', ['00000002_000.png'])
    for change in ('00000009_000.png\n', None):
        if change is None:
            (tmp_path / 'train.txt').unlink()
        else:
            (tmp_path / 'train.txt').write_text(change)
        with pytest.warns(UserWarning, match=r"cannot check that m.pt was not trained on test images: its "
                                             r"training list .*train.txt is gone or changed since training"):
            check_not_trained_on(older, tmp_path / 'data', ['00000002_000.png'], 'm.pt')
