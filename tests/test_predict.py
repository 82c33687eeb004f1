"""Using a model on new images: the Detector reproduces the evaluation's maps, predict.py writes
its files, bad inputs give named errors and lose nothing already written."""
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import predict
from conftest import make_mvtec_category, save_checkpoint, save_untrained_model
from experiments import inference
from experiments.detector import Detector, NonFiniteMapError
from experiments.mvtec_tasks import load_test_set
from experiments.prediction import predict_maps
from experiments.thresholds import store_thresholds
from experiments.training import load_model
from self_sup_data.images import image_span, image_span_summary, read_image, resize
from test_reliability import nan_weights

ROOT = Path(__file__).resolve().parents[1]


def object_checkpoint(path, category):
    """An untrained object model at res_scale 0.5: test side 160, central crop 128."""
    meta = dict(dataset='mvtec', setting='Shift', category=category, kind='object', res_scale=0.5,
                train_size=128, seed=0)
    return save_untrained_model(path, meta)


@pytest.fixture
def category(tmp_path):
    """(data root, category name) of a tiny grey category (6 train, 3 good, 3 defective)."""
    make_mvtec_category(tmp_path / 'data', 'tiny')
    return tmp_path / 'data', 'tiny'


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['texture', 'object'])
def test_detector_reproduces_the_evaluation_maps_exactly(category, tmp_path, kind):
    root, name = category
    path = (save_checkpoint(tmp_path / 'models', 'Shift', name, 'texture') if kind == 'texture'
            else object_checkpoint(tmp_path / 'object.pt', name))
    model, meta = load_model(path)
    dataset = load_test_set(root, meta)
    expected = predict_maps(model, dataset, batch_size=4)
    detector = Detector.load(path, batch_size=4)
    images = [read_image(p) for p in dataset.paths]
    np.testing.assert_array_equal(detector.maps(images), expected)
    scores, maps = detector.predict(images)
    np.testing.assert_array_equal(scores['mean'], expected.mean(axis=(1, 2), dtype=np.float64))
    assert [m.shape for m in maps] == [(64, 64)] * len(images)
    np.testing.assert_array_equal(maps[0], inference.to_image_size(expected[0], (64, 64)))
    if kind == 'object':  # zero outside the central 128-pixel crop of the 160-pixel image
        assert (expected[:, :16] == 0).all() and (expected[:, 16:144, 16:144] > 0).all()


@pytest.mark.slow
# a model trained on 8-bit images, on 16-bit ones, or with an intensity window (--intensity-range)
@pytest.mark.parametrize('bit_depth', [None, 16, [100, 4000]])
def test_detector_reads_16_bit_images_as_the_evaluation_does(tmp_path, bit_depth):
    root, name = tmp_path / 'data', 'tiny'
    make_mvtec_category(root, name, size=100)  # resized for the model: scaled to 8 bits first, both
    files = sorted((root / name / 'test').rglob('*.png'))
    for path in files:
        values = np.asarray(Image.open(path).convert('L')).astype(np.uint16)
        # full-range 16-bit data, and one dark exposure whose values stay below 4096
        Image.fromarray(values * 15 + 3 if path == files[0] else values * 257 + 100).save(path)
    darkest = int(np.asarray(Image.open(files[0])).max())
    path = save_checkpoint(tmp_path / 'models', 'Shift', name, 'texture')
    checkpoint = torch.load(path, weights_only=True)
    checkpoint['meta']['bit_depth'] = bit_depth
    torch.save(checkpoint, path)
    model, meta = load_model(path)
    dataset = load_test_set(root, meta)
    detector = Detector.load(path, batch_size=4)
    images = [detector.read(p) for p in dataset.paths]
    np.testing.assert_array_equal(detector.maps(images), predict_maps(model, dataset, batch_size=4))
    dark = images[[Path(p) for p in dataset.paths].index(files[0])].max()
    # the dark exposure: as 12-bit data image by image, as dark as it is with the model's 16 bits, and
    # from the model's window
    low, high = (0, 4095) if bit_depth is None else (0, 65535) if bit_depth == 16 else bit_depth
    assert dark == round(255 * (darkest - low) / (high - low))


@pytest.mark.slow
def test_texture_flip_average_matches_the_evaluation_and_objects_refuse_it(category, tmp_path):
    root, name = category
    path = save_checkpoint(tmp_path / 'models', 'Shift', name, 'texture')
    model, meta = load_model(path)
    dataset = load_test_set(root, meta)
    expected = predict_maps(model, dataset, batch_size=8, flip_average=True)
    images = [read_image(p) for p in dataset.paths]
    np.testing.assert_array_equal(Detector.load(path, batch_size=8).maps(images, True), expected)
    detector = Detector.load(object_checkpoint(tmp_path / 'object.pt', name))
    with pytest.raises(ValueError, match='flip averaging is for textures'):
        detector.predict(images[:1], flip_average=True)


def test_chest_x_ray_models_refuse_flip_averaging():
    from experiments.torch_model import model_spec
    meta = dict(dataset='chest_xray', setting='Shift', category='chest_xray', res=64,
                model_config=dict(in_channels=1))
    assert 'chest X-rays, whose training recipe does not flip' in model_spec(meta)['flip_average_error']
    # scored on the central square of the training crops' side, as the evaluation scores them
    assert (model_spec(meta)['side'], model_spec(meta)['crop']) == (64, 32)
    assert model_spec(dict(meta, res=256, train_size=224))['crop'] == 224
    assert model_spec(dict(meta, res=256))['crop'] == 224  # a model that did not store it
    texture = dict(dataset='mvtec', setting='Shift', category='tiny', kind='texture', res_scale=0.5,
                   model_config=dict(in_channels=1))
    assert model_spec(texture)['flip_average_error'] is None


def test_channels_are_converted_and_bad_arrays_named(category, tmp_path):
    root, name = category
    detector = Detector.load(save_checkpoint(tmp_path / 'models', 'Shift', name, 'texture'))
    grey = read_image(next((root / name / 'test' / 'good').iterdir()))
    colour = np.repeat(grey, 3, axis=2)  # the same picture as RGB: luminance gives it back
    scores, maps = detector.predict([grey[:, :, 0], colour, grey])
    np.testing.assert_array_equal(maps[0], maps[2])
    np.testing.assert_array_equal(maps[1], maps[2])
    with pytest.raises(ValueError, match=r'image 1 must be a uint8 array .* got uint8 of shape \(8, 8, 4\)'):
        detector.predict([grey, np.zeros((8, 8, 4), np.uint8)])
    with pytest.raises(ValueError, match=r'image 0 must be a uint8 array .* got float32 of shape \(50, 40\)'):
        detector.predict([np.zeros((50, 40), np.float32)])  # the shape as given
    for empty in (np.zeros((0, 40), np.uint8), np.zeros((0, 0, 1), np.uint8)):
        with pytest.raises(ValueError, match=r'image 1 is empty \(shape \(0, '):
            detector.predict([grey, empty])
    for one_array in (colour, grey[:, :, 0]):  # its rows would pass for grey images
        for method in (detector.predict, detector.maps):
            with pytest.raises(ValueError, match=r'a list of images, got one array of shape .*pass \[image\]'):
                method(one_array)


def test_masks_are_the_calibrated_decisions_at_the_models_resolution(category, tmp_path):
    root, name = category
    path = save_checkpoint(tmp_path / 'models', 'Shift', name, 'texture')
    image = read_image(next((root / name / 'test' / 'crack').iterdir()))
    with pytest.raises(ValueError, match='has no pixel threshold to make masks with: calibrate it first'):
        Detector.load(path).predict([image], masks=True)
    side = Detector.load(path).spec['side']
    image = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)[:, :, None]
    model_map = Detector.load(path).maps([image])[0]
    threshold = float(np.quantile(model_map, 0.9))
    store_thresholds(path, dict(image=0.5, pixel=threshold, fpr=0.1, flip_average=False, images=1, source='test'))
    big = np.repeat(np.repeat(image, 3, axis=0), 3, axis=1)  # each pixel thrice: the network sees the same image
    scores, maps, masks = Detector.load(path).predict([image, big], masks=True)
    assert [mask.shape for mask in masks] == [(side, side), (3 * side, 3 * side)] and masks[1].dtype == bool
    np.testing.assert_array_equal(masks[0], model_map > threshold)
    # each model pixel decides its 3 x 3 pixels: the share of flagged pixels is the calibrated one
    np.testing.assert_array_equal(masks[1], np.repeat(np.repeat(model_map > threshold, 3, axis=0), 3, axis=1))
    assert maps[1].shape == (3 * side, 3 * side)
    # thresholds of plain maps make no masks of flip-averaged ones
    with pytest.raises(ValueError, match='its pixel threshold was calibrated without flip averaging, and masks of '
                                         'maps with it would not flag'):
        Detector.load(path).predict([image], flip_average=True, masks=True)


def test_maps_shrink_to_small_images_by_area_averaging_and_grow_bilinearly():
    map_ = np.zeros((64, 64), np.float32)
    map_[10, 10] = 1  # a hot spot that bilinear sampling at 8 x 8 skips
    small = inference.to_image_size(map_, (8, 8, 3))
    np.testing.assert_allclose(small, map_.reshape(8, 8, 8, 8).mean(axis=(1, 3)), atol=1e-7)
    assert small[1, 1] == pytest.approx(1 / 64)
    rng = np.random.default_rng(0)
    map_ = rng.random((16, 16), dtype=np.float32)
    grown = inference.to_image_size(map_, (40, 24))
    assert grown.dtype == np.float32 and grown.shape == (40, 24)
    np.testing.assert_array_equal(grown, cv2.resize(map_, (24, 40), interpolation=cv2.INTER_LINEAR))
    # one side shrinks (area averages of row pairs), the other grows (bilinear)
    mixed = inference.to_image_size(map_, (8, 32))
    np.testing.assert_allclose(mixed, cv2.resize(map_.reshape(8, 2, 16).mean(axis=1), (32, 8),
                                                 interpolation=cv2.INTER_LINEAR), atol=1e-6)
    np.testing.assert_array_equal(inference.to_image_size(map_, (16, 16)), map_)


@pytest.fixture
def inputs(category, tmp_path):
    """A folder with a test image, a colour non-square JPEG and an unreadable file."""
    root, name = category
    folder = tmp_path / 'inputs'
    folder.mkdir()
    (folder / 'a.png').write_bytes((root / name / 'test' / 'crack' / '000.png').read_bytes())
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (50, 90, 3), dtype=np.uint8)).save(folder / 'b.jpg')
    (folder / 'broken.png').write_bytes(b'not an image')
    return folder


@pytest.fixture
def calibrated(category, tmp_path):
    root, name = category
    path = save_checkpoint(tmp_path / 'models', 'Shift', name, 'texture')
    store_thresholds(path, dict(image=0.5, pixel=0.7, fpr=0.01, flip_average=False, images=6,
                                source='test'))
    return path


@pytest.mark.slow
def test_predict_writes_scores_maps_overlays_masks_and_errors(calibrated, inputs, tmp_path, capsys):
    out = tmp_path / 'out'
    status = predict.main(['-m', str(calibrated), '-i', str(inputs), '-o', str(out),
                           '--batch-size', '2'])
    assert status == 1  # one unreadable file
    scores = pd.read_csv(out / 'scores.csv')
    assert list(scores.columns) == list(predict.SCORE_COLUMNS)
    assert list(scores['output']) == ['a', 'b'] and scores['anomalous'].dtype == bool
    errors = pd.read_csv(out / 'errors.csv')
    assert list(errors['file']) == [str(inputs / 'broken.png')]
    assert 'cannot read image' in errors['error'][0]
    detector = Detector.load(calibrated)
    images = [read_image(inputs / 'a.png'), read_image(inputs / 'b.jpg')]
    expected_scores, expected_maps = detector.predict(images)
    for name, image, expected, mean in zip('ab', images, expected_maps, expected_scores['mean']):
        map_ = np.load(out / 'maps' / f'{name}.npy')
        assert map_.dtype == np.float32 and map_.shape == image.shape[:2]
        np.testing.assert_array_equal(map_, expected)
        mask = read_image(out / 'masks' / f'{name}.png')[:, :, 0]
        model_mask = (detector.maps([image])[0] > detector.pixel_threshold).astype(np.uint8)
        np.testing.assert_array_equal(mask > 0, cv2.resize(model_mask, image.shape[1::-1],
                                                           interpolation=cv2.INTER_NEAREST_EXACT) > 0)
        assert read_image(out / 'overlays' / f'{name}.png').shape == image.shape[:2] + (3,)
        row = scores.set_index('output').loc[name]
        assert row['score_mean'] == pytest.approx(mean, rel=1e-5)
        assert row['anomalous'] == (mean > detector.threshold)
    assert '2 images predicted, 1 unreadable' in capsys.readouterr().out


def test_images_unlike_the_training_images_are_noted_by_aspect_ratio_and_size():
    spec = dict(side=64, train_image_shape=dict(aspect=[1.0, 1.0], long_side=[64, 64]))
    assert inference.shape_notes(spec, ['a', 'b', 'c'], [(64, 64, 1), (60, 64), (90, 90, 3)]) == []  # within 1.1, 1.5
    wide, small = inference.shape_notes(spec, ['a', 'wide', 'small', 'long'],
                                        [(64, 64), (50, 90, 3), (30, 30), (64, 150)])
    assert wide.startswith("2 of 4 images have another aspect ratio (width / height) than the model's training "
                           "images (1.00; first: wide, 90x50, 1.80): each is resized to the model's 64x64 square")
    assert small.startswith("2 of 4 images are larger or smaller than the model's training images (longer side 64 "
                            "pixels; first: small, 30x30)")
    assert inference.shape_notes(spec, ['big'], [(200, 200)])[0].startswith('1 of 1 images are larger than')
    assert inference.shape_notes(spec, ['big', 'small'], [(200, 200), (9, 9)])[0].startswith(
        '2 of 2 images are larger or smaller than')
    ranged = dict(side=64, train_image_shape=dict(aspect=[0.5, 2.0], long_side=[64, 128]))
    assert inference.shape_notes(ranged, ['tall', 'big'], [(128, 64), (180, 180)]) == []
    assert '(0.50 to 2.00; first: wider' in inference.shape_notes(ranged, ['wider'], [(40, 100)])[0]
    assert inference.shape_notes(dict(side=64, train_image_shape=None), ['x'], [(10, 500)]) == []  # older models


def test_predict_notes_images_unlike_the_models_training_images(calibrated, inputs, tmp_path):
    detector = Detector.load(calibrated)
    detector.spec['train_image_shape'] = dict(aspect=[1.0, 1.0], long_side=[64, 64])
    files = [inputs / 'a.png', inputs / 'b.jpg']
    (tmp_path / 'out').mkdir()
    first = re.escape(str(files[1]))
    with pytest.warns(UserWarning, match=rf"1 of 2 images have another aspect ratio .*first: {first}, 90x50, 1.80\)"):
        errors, notes = predict.predict_files(detector, files, tmp_path / 'out')
    assert len(pd.read_csv(tmp_path / 'out' / 'scores.csv')) == 2 and errors == [] and len(notes) == 1
    notes = (tmp_path / 'out' / 'shape_notes.txt').read_text(encoding='utf-8').splitlines()  # beside the scores
    assert len(notes) == 1 and notes[0].startswith('1 of 2 images have another aspect ratio')
    assert str(files[1]) in notes[0]
    (tmp_path / 'other').mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        predict.predict_files(detector, files[:1], tmp_path / 'other')  # like the training images: no notes
    assert not (tmp_path / 'other' / 'shape_notes.txt').exists()


def test_images_of_far_less_contrast_than_the_training_images_are_noted():
    assert image_span(np.array([[3, 7], [5, 250]], np.uint8)) == 247
    assert image_span(np.full((4, 4, 3), 9, np.uint8)) == 0 and image_span(np.zeros((0, 4), np.uint8)) == 0
    assert image_span(np.array([[[200, 0, 0], [200, 0, 0]], [[190, 0, 30], [200, 0, 0]]], np.uint8)) == 30  # by channel
    assert image_span_summary([np.array([[0, 200]], np.uint8), np.array([[10, 90]], np.uint8)]) == [80, 200]
    spec = dict(side=64, train_image_span=[100, 255])
    assert inference.contrast_notes(spec, ['a', 'b'], [25, 255]) == []  # a quarter of the least span is enough
    note, = inference.contrast_notes(spec, ['a', 'flat', 'dim', 'c'], [200, 0, 24, 25])
    assert note == ("2 of 4 images have far less contrast than the model's training images: their grey levels span at "
                    "most 24 of 0..255 as the network gets them, the training images' at least 100 (first: flat, 0); "
                    "the network scores such images unlike any it learnt")  # 8-bit training images: no depth to blame
    note, = inference.contrast_notes(dict(spec, bit_depth=16), ['x'], [1])
    assert note.endswith("it learnt; the model reads 16-bit files as its training images were read (as 16-bit data), "
                         "so a 16-bit file whose data has fewer bits (8-bit values saved as 16 bits, say) reads "
                         "nearly black: save such images as 8-bit files, or scale their data to the training images' "
                         "range")
    note, = inference.contrast_notes(dict(spec, bit_depth=[100, 4000]), ['x'], [1])
    assert ("(with the intensity window 100..4000), so a 16-bit file whose data has fewer bits (8-bit values saved as "
            "16 bits, say) reads nearly black, and data outside the window black or white: save") in note
    assert inference.contrast_notes(dict(side=64, train_image_span=None), ['x'], [0]) == []  # older models


def test_contrast_is_measured_as_the_network_gets_the_image():
    grey = dict(side=32, channels=1, train_image_span=[100, 255])
    red = np.zeros((64, 64, 3), np.uint8)
    red[..., 0] = 200  # a span of 200 between its channels, none in the luminance a grey model gets
    assert image_span(red) == 0 and inference.prepared_span(red, grey) == 0
    red[:32, :, 0] = 0  # half black: its luminance spans 60 grey levels
    assert inference.prepared_span(red, grey) == 60 and inference.prepared_span(red, dict(grey, channels=3)) == 200
    noise = np.random.default_rng(0).integers(60, 190, (256, 256), dtype=np.uint8)
    assert image_span(noise) == 129 and inference.prepared_span(noise, grey) < 60  # resized as the training images


def test_predict_notes_a_16_bit_file_of_8_bit_values_read_with_the_models_16_bits(calibrated, inputs, tmp_path):
    detector = Detector.load(calibrated)
    detector.spec.update(bit_depth=16, train_image_span=[100, 255])
    eight_bit = read_image(inputs / 'a.png')[:, :, 0]
    assert inference.prepared_span(eight_bit, detector.spec) >= 100  # as an 8-bit file it is like the training images
    Image.fromarray(eight_bit.astype(np.uint16)).save(inputs / 'sixteen.png')  # its 8-bit values in a 16-bit file
    files = [inputs / 'a.png', inputs / 'sixteen.png']
    images = [detector.read(file) for file in files]
    assert image_span(images[1]) <= 1  # 0..255 of 0..65535: nearly black
    note, = detector.contrast_notes(files, images)  # the Python API's note
    assert note == inference.contrast_notes(detector.spec, files, [1000, image_span(images[1])])[0]
    (tmp_path / 'out').mkdir()
    first = re.escape(f'first: {files[1]}, ')
    with pytest.warns(UserWarning, match=rf"^1 of 2 images have far less contrast .*{first}.*as 16-bit data"):
        errors, notes = predict.predict_files(detector, files, tmp_path / 'out')
    assert errors == [] and len(pd.read_csv(tmp_path / 'out' / 'scores.csv')) == 2
    assert (tmp_path / 'out' / 'shape_notes.txt').read_text(encoding='utf-8').splitlines() == notes
    assert len(notes) == 1 and notes[0].startswith('1 of 2 images have far less contrast')


def test_bfloat16_maps_are_warned_of_beside_float32_thresholds(calibrated):
    with pytest.warns(UserWarning, match='its thresholds were calibrated on float32 maps, and bfloat16 maps'):
        Detector.load(calibrated, bf16=True)


@pytest.mark.slow
def test_thresholds_calibrated_on_other_maps_give_no_decisions_and_no_masks(calibrated, inputs, tmp_path):
    out = tmp_path / 'out'  # thresholds of plain maps, maps flip-averaged: as the evaluation, no decisions
    with pytest.warns(UserWarning, match='calibrated without flip averaging and these maps are with it: '
                                         'no decisions and no masks'):
        predict.main(['-m', str(calibrated), '-i', str(inputs), '-o', str(out), '--flip-average'])
    scores = pd.read_csv(out / 'scores.csv')
    assert list(scores['output']) == ['a', 'b'] and scores['anomalous'].isna().all()
    assert sorted(p.name for p in (out / 'maps').iterdir()) == ['a.npy', 'b.npy']
    assert not (out / 'masks').exists() or not any((out / 'masks').iterdir())


@pytest.mark.slow
def test_predict_stops_with_named_errors_and_keeps_earlier_output(calibrated, inputs, tmp_path,
                                                                  capsys):
    out = tmp_path / 'out'
    empty = tmp_path / 'empty'
    empty.mkdir()
    cases = [(['-m', str(calibrated), '-i', str(empty)], f'folder {empty} holds no images'),
             (['-m', str(tmp_path / 'missing.pt'), '-i', str(inputs)], 'no model at'),
             (['-m', str(inputs / 'broken.png'), '-i', str(inputs)], 'cannot read checkpoint'),
             (['-m', str(calibrated), '-i', str(tmp_path / '*.tif')], 'matches no files'),
             (['-m', str(calibrated), '-i', str(inputs), '--device', 'gpu'], "unknown device 'gpu'")]
    for argv, message in cases:
        assert predict.main(argv + ['-o', str(out)]) == predict.STOPPED_STATUS
        assert message in capsys.readouterr().err
        assert not out.exists()
    (tmp_path / 'afile').write_text('mine')
    for target in (tmp_path / 'afile', tmp_path / 'afile' / 'out'):  # a file where OUT_DIR or a folder above it goes
        assert predict.main(['-m', str(calibrated), '-i', str(inputs), '-o', str(target)]) == predict.STOPPED_STATUS
        assert (f"cannot prepare output folder {target}: {tmp_path / 'afile'} is a file, not a folder"
                in capsys.readouterr().err)
    (out / 'masks').mkdir(parents=True)
    (out / 'masks' / 'ground_truth.png').write_bytes(b'the user\'s own')  # kept by --overwrite
    assert predict.main(['-m', str(calibrated), '-i', str(inputs / 'a.png'), '-o', str(out)]) == 0
    written = {p: p.read_bytes() for p in out.rglob('*') if p.is_file()}
    assert predict.main(['-m', str(calibrated), '-i', str(inputs), '-o', str(out)]) == predict.STOPPED_STATUS
    assert 'earlier run' in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob('*') if p.is_file()} == written
    # --overwrite replaces the earlier run: nothing of a.png is left
    assert predict.main(['-m', str(calibrated), '-i', str(inputs / 'b.jpg'), '-o', str(out),
                         '--overwrite']) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob('*') if p.is_file()) == [
        'errors.csv', 'maps/b.npy', 'masks/b.png', 'masks/ground_truth.png', 'overlays/b.png',
        'scores.csv']
    assert list(pd.read_csv(out / 'scores.csv')['output']) == ['b']


def test_output_names_are_distinct_and_leave_the_users_own_files_in_out_dir(tmp_path):
    (tmp_path / 'maps').mkdir()
    (tmp_path / 'maps' / 'a.npy').write_bytes(b'mine')  # a file of the user's: not replaced
    (tmp_path / 'overlays').mkdir()
    (tmp_path / 'overlays' / 'b.png').write_bytes(b'mine')  # one output of a name is enough
    (tmp_path / 'masks').mkdir()
    (tmp_path / 'masks' / 'c.png').symlink_to(tmp_path / 'nowhere.png')  # a link of the user's, even broken
    files = [Path('x/a.png'), Path('y/a.jpg'), Path('b.png'), Path('c.png'), Path('z/c.tif')]
    assert predict.output_names(files, tmp_path) == ['a-2', 'a-3', 'b-2', 'c-2', 'c-3']
    assert predict.output_names(files, tmp_path / 'new') == ['a', 'a-2', 'b', 'c', 'c-2']
    (tmp_path / 'maps' / 'a.npy').unlink()  # a folder that cannot be looked into: free, its writes fail later
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(predict.os.path, 'lexists', lambda path: False)
        assert predict.output_names(files[:1], tmp_path) == ['a']


def test_file_names_that_are_not_utf8_get_printable_outputs(calibrated, tmp_path):
    """A file name whose bytes are not UTF-8 (from a Latin-1 archive) is predicted like any other:
    its output name and its scores.csv row write those bytes as \\xNN."""
    folder = tmp_path / 'latin1'
    folder.mkdir()
    image = np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8)
    Image.fromarray(image).save(folder / 'ok.png')
    raw = os.fsencode(folder) + b'/caf\xe9.png'
    with open(raw, 'wb') as file:
        file.write((folder / 'ok.png').read_bytes())
    assert predict.printable(os.fsdecode(raw)) == str(folder / 'caf\\xe9.png')
    assert predict.printable('plain \u00e9') == 'plain \u00e9'
    out = tmp_path / 'out'
    assert predict.main(['-m', str(calibrated), '-i', str(folder), '-o', str(out)]) == 0
    scores = pd.read_csv(out / 'scores.csv')
    assert list(scores['output']) == ['caf\\xe9', 'ok']
    assert list(scores['file']) == [str(folder / 'caf\\xe9.png'), str(folder / 'ok.png')]
    np.testing.assert_array_equal(np.load(out / 'maps' / 'caf\\xe9.npy'), np.load(out / 'maps' / 'ok.npy'))


def test_an_earlier_runs_outputs_under_the_inputs_are_not_read_as_inputs(calibrated, tmp_path, capsys):
    """An input pattern over a folder above OUT_DIR finds the earlier run's overlays and masks: --overwrite
    leaves them out with a warning and predicts the images alone again; the user's own images in those
    folders are inputs like any other."""
    data = tmp_path / 'images'
    data.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8)).save(data / 'a.png')
    pattern, out = str(data / '**' / '*.png'), data / 'out'
    assert predict.main(['-m', str(calibrated), '-i', pattern, '-o', str(out)]) == 0
    assert (out / 'overlays' / 'a.png').exists() and (out / 'masks' / 'a.png').exists()
    (out / 'masks' / 'mine.png').write_bytes((data / 'a.png').read_bytes())  # the user's, in masks/
    capsys.readouterr()
    assert predict.main(['-m', str(calibrated), '-i', pattern, '-o', str(out), '--overwrite']) == 0
    assert '2 of the input files are outputs of the earlier run in' in capsys.readouterr().err
    assert list(pd.read_csv(out / 'scores.csv')['output']) == ['a', 'mine-2']  # masks/mine.png is the user's
    assert (out / 'masks' / 'mine.png').read_bytes() == (data / 'a.png').read_bytes()
    assert pd.read_csv(out / 'errors.csv').empty
    with pytest.raises(predict.StopRun, match='the inputs hold only the outputs of the earlier run'):
        predict.without_earlier_outputs([out / 'masks' / 'a.png'], out)


def test_overwrite_deletes_only_what_the_earlier_run_lists(tmp_path):
    for folder, suffix in (('maps', '.npy'), ('overlays', '.png'), ('masks', '.png')):
        (tmp_path / folder).mkdir()
        for name in ('a', 'mine'):
            (tmp_path / folder / f'{name}{suffix}').write_bytes(b'x')
    (tmp_path / 'evil.npy').write_bytes(b'x')
    (tmp_path / 'scores.csv').write_text('file,output,score_mean,score_max,anomalous\n'
                                         'in/a.png,a,0.1,0.2,\nin/x.png,../evil,0.1,0.2,\n')
    (tmp_path / 'errors.csv').write_text('file,error\n')
    (tmp_path / 'shape_notes.txt').write_text('1 of 2 images have another aspect ratio ...\n')
    predict.remove_earlier_run(tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob('*') if p.is_file()) == [
        'evil.npy', 'maps/mine.npy', 'masks/mine.png', 'overlays/mine.png']


def test_overwrite_keeps_a_scores_csv_that_is_not_this_commands(tmp_path):
    (tmp_path / 'scores.csv').write_text('image,label\nfoo.png,1\n')
    with pytest.raises(ValueError, match=r"scores.csv is not the scores of an earlier run of this command "
                                         r"\(columns \['image', 'label'\]"):
        predict.remove_earlier_run(tmp_path)
    assert (tmp_path / 'scores.csv').read_text() == 'image,label\nfoo.png,1\n'


def test_overwrite_also_deletes_the_outputs_of_a_killed_runs_last_batch(tmp_path):
    """A run killed while writing a batch leaves outputs that scores.csv does not list yet;
    .pending names them, and the next run treats it as an earlier run."""
    for folder, suffix in (('maps', '.npy'), ('overlays', '.png')):
        (tmp_path / folder).mkdir()
        for name in ('a', 'b', 'mine'):
            (tmp_path / folder / f'{name}{suffix}').write_bytes(b'x')
    (tmp_path / 'scores.csv').write_text('file,output,score_mean,score_max,anomalous\nin/a.png,a,0.1,0.2,\n')
    (tmp_path / predict.PENDING).write_text('b\n../mine\n')
    (tmp_path / 'maps' / '.b.npy.abcd1234.tmp').write_bytes(b'a killed write')
    (tmp_path / '.scores.csv.abcd1234.tmp').write_bytes(b'a killed write')
    for name in ('.notes.txt.abcd1234.tmp', 'maps/.mine.npy.v1.tmp'):
        (tmp_path / name).write_bytes(b'the user\'s, perhaps')
    predict.remove_earlier_run(tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob('*') if p.is_file()) == [
        '.notes.txt.abcd1234.tmp', 'maps/.mine.npy.v1.tmp', 'maps/mine.npy', 'overlays/mine.png']


def test_an_earlier_run_that_cannot_be_read_is_an_error_naming_it(tmp_path):
    (tmp_path / 'scores.csv').write_bytes('file,output\nin/\u00e9.png,\u00e9\n'.encode('latin-1'))
    with pytest.raises(ValueError, match=r"cannot read the earlier run's .*scores.csv"):
        predict.remove_earlier_run(tmp_path)
    assert (tmp_path / 'scores.csv').exists()


@pytest.mark.slow
def test_a_model_giving_nan_maps_stops_predict_naming_it(calibrated, inputs, tmp_path, capsys):
    nan_weights(calibrated)
    with pytest.raises(NonFiniteMapError, match=rf'the model {calibrated} gave NaN or infinite values '
                                                r'in the maps of 1 of 1 images \(image 0 first\)'):
        Detector.load(calibrated).maps([read_image(inputs / 'a.png')])
    out = tmp_path / 'out'
    status = predict.main(['-m', str(calibrated), '-i', str(inputs), '-o', str(out)])
    assert status == predict.STOPPED_STATUS
    error = capsys.readouterr().err
    assert error.startswith(f'predict.py: error: the model {calibrated} gave NaN or infinite values')
    assert 'Traceback' not in error and not (out / 'scores.csv').exists()


@pytest.mark.slow
def test_outputs_that_cannot_be_written_are_errors_of_their_image_and_the_run_goes_on(
        calibrated, inputs, tmp_path, monkeypatch, capsys):
    long_name = '検査画像' * 20 + '.png'  # 244 bytes: valid, with room for '.npy' but not for more
    (inputs / long_name).write_bytes((inputs / 'a.png').read_bytes())
    original = predict.write_png

    def failing_write_png(path, image):
        if path.parent.name == 'overlays' and path.stem == 'b':
            raise OSError(28, 'No space left on device')
        return original(path, image)
    monkeypatch.setattr(predict, 'write_png', failing_write_png)
    out = tmp_path / 'out'
    assert predict.main(['-m', str(calibrated), '-i', str(inputs), '-o', str(out)]) == 2
    assert list(pd.read_csv(out / 'scores.csv')['output']) == ['a', '検査画像' * 20]
    errors = pd.read_csv(out / 'errors.csv').set_index('file')['error']
    assert errors[str(inputs / 'b.jpg')].startswith('cannot write its outputs: [Errno 28]')
    assert not (out / 'maps' / 'b.npy').exists()  # written before the overlay failed: removed
    assert (out / 'maps' / ('検査画像' * 20 + '.npy')).is_file() and not (out / predict.PENDING).exists()
    # a run killed while writing a batch leaves .pending: it is an earlier run
    (out / 'scores.csv').unlink()
    (out / predict.PENDING).write_text('a\n')
    capsys.readouterr()
    assert predict.main(['-m', str(calibrated), '-i', str(inputs), '-o', str(out)]) == predict.STOPPED_STATUS
    assert 'earlier run (.pending)' in capsys.readouterr().err
    # a file of the whole run that cannot be written stops it in one line
    shutil.rmtree(out)
    monkeypatch.setattr(predict, 'write_png', original)
    (out / 'errors.csv').mkdir(parents=True)
    assert predict.main(['-m', str(calibrated), '-i', str(inputs), '-o', str(out)]) == predict.STOPPED_STATUS
    error = capsys.readouterr().err
    assert error.startswith(f'predict.py: error: [Errno 21] cannot write {out / "errors.csv"}')
    assert 'Traceback' not in error
    assert f'the batches before it are in {out / "scores.csv"}' in error


@pytest.mark.slow
def test_an_interrupted_run_keeps_the_batches_written(calibrated, inputs, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'out'
    calls = []

    def failing_predict(self, images, flip_average=False, **options):
        calls.append(len(images))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, images, flip_average, **options)
    original = Detector.predict
    monkeypatch.setattr(Detector, 'predict', failing_predict)
    assert predict.main(['-m', str(calibrated), '-i', str(inputs / 'a.png'), str(inputs / 'b.jpg'),
                         '-o', str(out), '--batch-size', '1']) == predict.INTERRUPTED_STATUS
    err = capsys.readouterr().err  # one line, no traceback
    assert err.count('\n') == 1 and err.startswith('predict.py: interrupted; the batches before it are in ')
    assert '.pending' not in err  # stopped before it wrote one
    assert list(pd.read_csv(out / 'scores.csv')['output']) == ['a']
    assert sorted(p.name for p in (out / 'maps').iterdir()) == ['a.npy']  # no temporary files


@pytest.mark.slow
def test_a_ctrl_c_as_a_batch_enters_scores_csv_leaves_no_pending_batch_listed_there(calibrated, inputs, tmp_path,
                                                                                    monkeypatch, capsys):
    """.pending names the batch being written until scores.csv lists it: a Ctrl-C that comes just after
    scores.csv is written waits until .pending is gone, or the next run would call the batch unfinished."""
    original = predict.write_csv

    def interrupted_write_csv(path, columns, rows):
        original(path, columns, rows)
        if path.name == 'scores.csv':
            signal.raise_signal(signal.SIGINT)
    monkeypatch.setattr(predict, 'write_csv', interrupted_write_csv)
    out = tmp_path / 'out'
    assert predict.main(['-m', str(calibrated), '-i', str(inputs / 'a.png'), str(inputs / 'b.jpg'),
                         '-o', str(out), '--batch-size', '1']) == predict.INTERRUPTED_STATUS
    assert '.pending' not in capsys.readouterr().err
    assert list(pd.read_csv(out / 'scores.csv')['output']) == ['a'] and not (out / predict.PENDING).exists()


@pytest.mark.slow
def test_end_to_end_on_a_trained_model(category, tmp_path):
    import train_mvtec
    from test_cli import FAST
    root, name = category
    train_mvtec.main(['-s', 'Shift', '-d', str(root), '-n', name, '-o', str(tmp_path / 'm')] + FAST)
    path = next((tmp_path / 'm').rglob('final_*.pt'))
    model, meta = load_model(path)
    assert meta['train_image_shape'] == dict(aspect=[1.0, 1.0], long_side=[64, 64])
    spans = [image_span(resize(read_image(file), meta['low_res']))  # as read and resized for training
             for file in sorted((root / name / 'train' / 'good').glob('*.png'))]
    assert len(spans) == 6 and meta['train_image_span'] == [min(spans), max(spans)]
    dataset = load_test_set(root, meta)
    out = tmp_path / 'out'
    result = subprocess.run([sys.executable, str(ROOT / 'predict.py'), '-m', str(path), '-i',
                             str(root / name / 'test' / '*' / '*.png'), '-o', str(out),
                             '--batch-size', '32'], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert 'training images' not in result.stderr  # the test images are shaped as the training images
    expected = predict_maps(model, dataset, batch_size=32)
    names = pd.read_csv(out / 'scores.csv')['output']
    assert len(names) == len(dataset.paths)
    for map_, file in zip(expected, dataset.paths):
        row = pd.read_csv(out / 'scores.csv').set_index('file').loc[file]
        np.testing.assert_array_equal(np.load(out / 'maps' / f"{row['output']}.npy"), map_)


def test_bfloat16_inference_applies_the_sigmoid_to_float32_logits():
    """Under bfloat16 autocast only the network runs in bfloat16: a bfloat16 sigmoid would round
    every value above about 0.998 to 1, collapsing the most anomalous pixels onto a few values."""
    import torch
    from experiments.torch_model import TorchRunner
    from models.resnet import resnet18_enc_dec
    from self_sup_data.transforms import normalization
    torch.manual_seed(0)
    model = resnet18_enc_dec(in_channels=3, final_activation='sigmoid').eval()
    with torch.no_grad():
        model.decoder[-1].bias.fill_(4)  # confident maps: most values near 1
    batch = np.random.default_rng(0).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in normalization(3))
    with torch.no_grad(), torch.autocast('cpu', torch.bfloat16):
        logits = model.logits((torch.from_numpy(batch).float() / 255 - mean) / std)
    expected = torch.sigmoid(logits.float())[:, 0].numpy()
    maps = TorchRunner(model, 3, bf16=True)(batch)
    np.testing.assert_allclose(maps, expected, rtol=0, atol=1e-6)
    assert len(np.unique(maps[maps > 0.99])) > 100
