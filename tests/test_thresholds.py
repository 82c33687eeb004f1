"""Thresholds: from normal images only, stored with the model (atomically, loadable with
weights_only=True); the decision metrics by hand; the evaluation's threshold columns."""
import math
import re
import shlex
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_mvtec_category, save_checkpoint, save_untrained_model
from experiments import metrics, mvtec_tasks, thresholds
from experiments.checkpoints import NO_THRESHOLDS, read_meta, thresholds_sha256
from experiments.detector import Detector
from self_sup_data.images import read_image
from self_sup_data.layouts import contents_sha256, names_sha256
from self_sup_data.mvtec import train_files
from self_sup_data.validation import holdout_indices


def test_threshold_at_fpr_by_hand():
    scores = np.random.default_rng(0).permutation(np.arange(100.0))
    assert metrics.threshold_at_fpr(scores, 0.01) == 98.5  # one of 100 above it, halfway to it
    assert metrics.threshold_at_fpr(scores, 0.05) == 94.5
    assert metrics.threshold_at_fpr(scores, 0.29) == 70.5  # 29 of 100, though 0.29 * 100 is 28.999999999999996
    assert metrics.threshold_at_fpr(scores, 0) == 99.5  # none: as far above the largest
    assert metrics.threshold_at_fpr([3.0, 1.0, 2.0], 0.01) == 3.5  # too few images for one
    # one score, or the top two tied: above the largest by MIN_MARGIN of it (a backend's rounding of that
    # score, about 1e-7 of it, keeps its decision)
    assert metrics.threshold_at_fpr([0.25], 0.01) == 0.25 * (1 + metrics.MIN_MARGIN)
    tied = metrics.threshold_at_fpr(np.array([0.2006815, 0.2006815], np.float32), 0.01)
    assert tied == float(np.float32(np.float64(np.float32(0.2006815)) * (1 + metrics.MIN_MARGIN)))
    assert tied > float(np.float32(0.2006815)) * (1 + 1e-6)
    assert metrics.threshold_at_fpr([1.0, 0.5, 0.5, 0.5], 0.3) == 0.75  # ties below: not flagged
    rng = np.random.default_rng(1)
    for n, fpr in ((7, 0.2), (50, 0.01), (1000, 0.05), (333, 0.0)):
        distinct = rng.permutation(n).astype(np.float32) / n
        threshold = metrics.threshold_at_fpr(distinct, fpr)
        assert np.count_nonzero(distinct > threshold) == int(np.floor(fpr * n))
        assert np.abs(distinct - threshold).min() >= 0.5 / n - 1e-7  # none near it
    # float32 scores one float32 step apart: a float64 midpoint would round onto one of them
    low = np.float32(0.7)
    close = np.array([0.1] * 98 + [low, np.nextafter(low, np.float32(1))], np.float32)
    threshold = metrics.threshold_at_fpr(close, 0.01)
    assert np.count_nonzero(close > threshold) == np.count_nonzero(close.astype(np.float64) > threshold) == 1
    apart = np.array([0.1] * 98 + [low, np.float32(0.9)], np.float32)
    threshold = metrics.threshold_at_fpr(apart, 0.01)  # a float32 value, the float32 midpoint
    assert threshold == float(np.float32(threshold)) == float(np.float32((np.float64(low) + np.float32(0.9)) / 2))
    with pytest.raises(ValueError, match='fpr must be in'):
        metrics.threshold_at_fpr(scores, 1.0)
    with pytest.raises(ValueError, match='needs normal images'):
        metrics.threshold_at_fpr([], 0.01)


def test_best_f1_and_precision_recall_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.9])
    threshold, f1 = metrics.best_f1_threshold(labels, scores)
    # flagging the scores >= 0.4: 3 true positives, 1 false positive -> F1 = 6 / 7
    assert f1 == pytest.approx(6 / 7) and threshold == np.nextafter(0.4, 0)
    assert metrics.precision_recall_f1(labels, scores, threshold) == pytest.approx(
        dict(precision=0.75, recall=1.0, f1=6 / 7))
    assert metrics.precision_recall_f1(labels, scores, 0.95) == dict(precision=0, recall=0, f1=0)


@pytest.mark.parametrize('threshold', [float('nan'), float('inf'), -float('inf')])
def test_precision_recall_refuses_a_threshold_that_is_not_finite(threshold):
    # NaN would flag nothing (every comparison false) and report precision 0 as if it were a decision
    with pytest.raises(ValueError, match='threshold must be a finite number'):
        metrics.precision_recall_f1([0, 1], [0.2, 0.8], threshold)


def test_threshold_metrics_image_and_pixel_levels():
    maps = np.zeros((3, 4, 4), np.float32)
    maps[1, :2, :2] = 1.0  # image 1 anomalous, its defect predicted exactly
    maps[2, 0, 0] = 0.5
    masks = np.zeros_like(maps, dtype=np.uint8)
    masks[1, :2, :2] = 1
    labels = [0, 1, 0]
    values = metrics.threshold_metrics(labels, maps, masks, image_threshold=0.1,
                                       pixel_threshold=0.2)
    assert set(values) == set(metrics.THRESHOLD_METRICS)
    assert values['image_f1_best'] == 1 and values['pixel_f1_best'] == 1
    assert values['image_precision'] == 1 and values['image_recall'] == 1
    assert values['pixel_precision'] == pytest.approx(4 / 5) and values['pixel_recall'] == 1
    bare = metrics.threshold_metrics(labels, maps)
    assert math.isnan(bare['image_f1']) and math.isnan(bare['pixel_f1_best'])
    # the inputs are checked as the evaluation checks them
    marked = masks.copy()
    marked[0, 3, 3] = 1
    for bad, message in ((dict(masks=marked), 'masks of normal images'),
                         (dict(masks=masks * 255), 'masks must be binary'),
                         (dict(masks=np.zeros((3, 8, 8), np.uint8)), 'masks and maps must have the same shape'),
                         (dict(masks=masks, has_mask=[True, True]), 'has_mask must have shape'),
                         (dict(labels=[0, 1]), 'labels must have shape')):
        arguments = dict(labels=labels, maps=maps) | bad
        with pytest.raises(ValueError, match=message):
            metrics.threshold_metrics(**arguments)


@pytest.fixture
def held_out_model(tmp_path):
    """A category of 12 normal training images and an untrained model that held out 3 of them."""
    root = tmp_path / 'data'
    make_mvtec_category(root, 'tiny', n_train=12)
    fraction, seed = 0.25, 5
    held_out = holdout_indices(12, fraction, seed)
    assert len(held_out) == 3
    meta = dict(dataset='mvtec', setting='Shift', category='tiny', kind='texture', res_scale=0.25,
                train_size=64, seed=0, data_dir=str(root), held_out=len(held_out),
                validation_fraction=fraction, validation_seed=seed)
    return save_untrained_model(tmp_path / 'model.pt', meta), root, held_out


@pytest.mark.slow
class FixedMaps:
    """A detector whose maps are given (``Detector.maps``' shape), of an object with ``crop``."""

    def __init__(self, maps, crop):
        self.given, self.spec = maps, dict(crop=crop)

    def maps(self, images, flip_average=False, progress=False):
        return self.given


@pytest.mark.parametrize('crop', [None, 16])
def test_the_pixel_threshold_counts_the_pixels_the_model_scores(crop):
    maps = np.zeros((3, 20, 20), np.float32)  # an object's map: 0 outside the central crop it scores
    maps[:, 2:18, 2:18] = np.random.default_rng(0).random((3, 16, 16))
    calibrated = thresholds.calibrate(FixedMaps(maps, crop), [None] * 3, fpr=0.1)
    scored = maps if crop is None else maps[:, 2:18, 2:18]
    assert calibrated['pixel'] == metrics.threshold_at_fpr(scored, 0.1)
    flagged = (maps > calibrated['pixel']).sum() / scored.size
    assert flagged <= 0.1 and (crop is None or flagged > 0.1 * 0.9)  # not 0.1 of the whole map
    assert calibrated['image'] == metrics.threshold_at_fpr(maps.mean(axis=(1, 2), dtype=np.float64), 0.1)


def test_thresholds_come_from_held_out_normal_images_only(held_out_model, tmp_path, capsys):
    path, root, held_out = held_out_model
    original = torch.load(path, weights_only=True)
    calibrated = thresholds.main(['-m', str(path), '--batch-size', '4'])
    assert 'from 3 held-out normal training images' in capsys.readouterr().out
    checkpoint = torch.load(path, weights_only=True)  # still loadable with weights_only
    assert checkpoint['meta'].pop('thresholds') == calibrated
    assert checkpoint['meta'] == original['meta']
    assert all(torch.equal(checkpoint['model'][k], v) for k, v in original['model'].items())
    files = train_files(root, 'tiny')
    images = [read_image(files[index]) for index in held_out]
    maps = Detector.load(path).maps(images)
    assert calibrated['image'] == metrics.threshold_at_fpr(maps.mean(axis=(1, 2), dtype=np.float64), 0.01)
    assert calibrated['pixel'] == metrics.threshold_at_fpr(maps, 0.01)
    assert calibrated['source'] == 'held-out normal training images' and calibrated['images'] == 3
    shutil.rmtree(root / 'tiny' / 'test')  # no test image is needed, or read
    moved = tmp_path / 'moved'
    shutil.move(root, moved)
    again = thresholds.main(['-m', str(path), '-d', str(moved), '-o', str(tmp_path / 'copy.pt')])
    assert again == calibrated
    assert torch.load(tmp_path / 'copy.pt', weights_only=True)['meta']['thresholds'] == calibrated


def test_given_normal_images_that_the_model_was_trained_on_are_named(held_out_model, tmp_path):
    path, root, held_out = held_out_model
    files = train_files(root, 'tiny')
    unseen = tmp_path / 'unseen'
    unseen.mkdir()
    for index in held_out:
        shutil.copy(files[index], unseen / files[index].name)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # copies, and the images it held out: nothing to warn of
        thresholds.main(['-m', str(path), '-i', str(unseen), '-o', str(tmp_path / 'a.pt')])
        thresholds.main(['-m', str(path), '-i', *[str(files[index]) for index in held_out],
                         '-o', str(tmp_path / 'b.pt')])
    with pytest.warns(UserWarning, match=r"^9 of the 12 given normal images are images the model was trained on "
                                         r"\(or copies of them\), e.g. \[.*000.png'.*\]: their scores are lower"):
        thresholds.main(['-m', str(path), '-i', str(root / 'tiny' / 'train' / 'good'), '-o', str(tmp_path / 'c.pt')])
    trained_index = next(index for index in range(len(files)) if index not in held_out)
    shutil.copy(files[trained_index], unseen / 'copy of a trained image.png')  # the same bytes, elsewhere
    with pytest.warns(UserWarning, match=r"^1 of the 4 given normal images are images the model was trained on "
                                         r"\(or copies of them\), e.g. \[.*copy of a trained image.png'\]"):
        thresholds.main(['-m', str(path), '-i', str(unseen), '-o', str(tmp_path / 'd.pt')])
    shutil.copy(files[trained_index], files[held_out[0]])  # a held-out image that is a copy: the default source
    with pytest.warns(UserWarning, match=r"^1 of the 3 held-out normal training images are images the model was "
                                         r"trained on \(or copies of them\)"):
        thresholds.main(['-m', str(path), '-o', str(tmp_path / 'e.pt')])
    assert thresholds.training_images(dict(read_meta(path), data_dir=str(tmp_path / 'gone'))) == set()
    # a model trained on all its images: those of its recorded names, and none once images were added
    trained = dict(read_meta(path), held_out=0, train_files_sha256=names_sha256(files))
    assert thresholds.training_images(trained) == {file.resolve() for file in files}
    shutil.copy(files[0], files[0].with_name('100.png'))
    assert thresholds.training_images(trained) == set()
    chest = dict(dataset='chest_xray', data_dir=str(root), train_names=['tiny/train/good/' + files[0].name])
    assert thresholds.training_images(chest) == {files[0].resolve()}


def test_held_out_images_are_refused_when_the_training_images_were_renamed(tmp_path):
    """The held-out images are found again by index: with another file name in the folder the
    same count gives other images, some of them trained on."""
    root = tmp_path / 'data'
    make_mvtec_category(root, 'tiny', n_train=12)
    files = train_files(root, 'tiny')
    held_out = holdout_indices(12, 0.25, 5)
    trained = [file for index, file in enumerate(files) if index not in set(held_out)]
    meta = dict(dataset='mvtec', category='tiny', data_dir=str(root), held_out=3,
                validation_fraction=0.25, validation_seed=5, train_files_sha256=names_sha256(trained))
    found, source = thresholds.normal_image_files(meta)
    assert found == [files[index] for index in held_out] and source.startswith('held-out')
    files[0].rename(files[0].with_name('zzz.png'))
    with pytest.raises(ValueError, match="images of 'tiny' .* are not the ones the model was trained on"):
        thresholds.normal_image_files(meta)
    del meta['train_files_sha256']  # a model of an earlier version: found by index as before
    assert len(thresholds.normal_image_files(meta)[0]) == 3
    with pytest.raises(ValueError, match='trained on chest_xray images from a list.* with -i'):
        thresholds.normal_image_files(dict(meta, dataset='chest_xray'), data_dir=root)
    from self_sup_data.layouts import make_layout
    folder = dict(meta, layout=make_layout('folder', root / 'tiny' / 'train' / 'good').spec())
    with pytest.raises(ValueError, match=f'-d {root} is not read for a model of the folder format'):
        thresholds.normal_image_files(folder, data_dir=root)


@pytest.mark.slow
def test_thresholds_from_training_images_or_given_images(tiny_mvtec, tmp_path, capsys):
    root, name = tiny_mvtec
    path = save_checkpoint(tmp_path / 'models', 'Shift', name, 'texture')
    with pytest.raises(SystemExit):
        thresholds.main(['-m', str(path)])  # its meta names no data folder
    assert 'pass -d DATA_DIR' in capsys.readouterr().err
    from_dir = thresholds.main(['-m', str(path), '-d', str(root), '--fpr', '0.2'])
    assert from_dir['source'] == 'normal training images' and from_dir['images'] == 6
    assert capsys.readouterr().err == (  # 0.2 of 6 images allow one: no note on that
        "python -m experiments.thresholds: note: the model was trained on these images, and scores them lower than "
        "new normal images: the thresholds flag somewhat more than 0.2 of new ones; normal images it has not seen set "
        "them right (-i, or the images a model trained with --val-fraction holds out)\n")
    given = thresholds.main(['-m', str(path), '-i', str(root / name / 'train' / 'good'),
                             '--fpr', '0.2'])
    assert {k: v for k, v in given.items() if k != 'source'} == {
        k: v for k, v in from_dir.items() if k != 'source'}
    assert 'trained on these images' not in capsys.readouterr().err  # given images: a warning if trained on
    checkpoint = torch.load(path, weights_only=True)
    checkpoint['meta']['data_dir'] = str(root)  # as training records it
    torch.save(checkpoint, path)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        thresholds.warn_test_images(read_meta(path), sorted((root / name / 'train' / 'good').iterdir()))  # not tested
    (root / name / 'test' / 'stray.png').write_bytes(b'')  # a file the test folder's listing warns of: not here
    with pytest.warns(UserWarning) as caught:
        thresholds.main(['-m', str(path), '-i', str(root / name / 'test' / 'good')])
    assert [str(warning.message) for warning in caught if 'stray' in str(warning.message)] == []
    assert any(str(warning.message).startswith("3 of the 3 given normal images are normal test images of the model's "
                                               "data") for warning in caught)
    (root / name / 'test' / 'stray.png').unlink()
    odd = tmp_path / 'odd'  # images unlike the training images: noted as predict.py notes them
    odd.mkdir()
    Image.fromarray(np.full((40, 120), 9, np.uint8)).save(odd / 'flat_and_wide.png')
    checkpoint = torch.load(path, weights_only=True)
    checkpoint['meta'].update(train_image_shape=dict(aspect=[1.0, 1.0], long_side=[64, 64]), train_image_span=[80, 200])
    torch.save(checkpoint, path)
    with pytest.warns(UserWarning) as caught:
        thresholds.main(['-m', str(path), '-i', str(odd)])
    messages = [str(warning.message) for warning in caught]
    assert any(message.startswith('1 of 1 images have another aspect ratio') for message in messages)
    assert any(message.startswith('1 of 1 images have far less contrast') for message in messages)
    thresholds.main(['-m', str(path), '-d', str(root)])  # the default 0.01 of 6 images: none
    assert ("note: at FPR 0.01, 6 images allow none of them to be flagged: the image threshold lies above all "
            "their scores, and it flags new normal images at a rate of about 1/7, not 0.01; 100 images or more"
            in capsys.readouterr().err)
    # another folder of normal images in the layout: not the training images, so no note on them
    checkpoint = torch.load(path, weights_only=True)
    checkpoint['meta'].update(train_contents_sha256=contents_sha256(sorted((root / name / 'train' / 'good').iterdir())))
    torch.save(checkpoint, path)
    make_mvtec_category(tmp_path / 'new', name, seed=7)
    other = thresholds.main(['-m', str(path), '-d', str(tmp_path / 'new'), '--fpr', '0.2'])
    assert other['source'] == f"normal images of {tmp_path / 'new'}" and other['images'] == 6
    assert 'trained on these images' not in capsys.readouterr().err
    assert thresholds.main(['-m', str(path), '-d', str(root), '--fpr', '0.2'])['source'] == 'normal training images'
    assert 'trained on these images' in capsys.readouterr().err
    thresholds.main(['-m', str(path), '-d', str(root)])
    assert ("note: at FPR 0.01, 6 images allow none of them to be flagged: the image threshold lies above all "
            "their scores, and it flags new normal images at a rate of about 1/7, not 0.01; 100 images or more"
            in capsys.readouterr().err)
    exported = tmp_path / 'MODEL.ONNX'
    exported.write_bytes(b'an export, in any case')
    with pytest.raises(SystemExit):
        thresholds.main(['-m', str(exported), '-d', str(root)])
    assert 'calibrate the checkpoint (.pt), then export it' in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a checkpoint under an ONNX name would not load as one
        thresholds.main(['-m', str(path), '-d', str(root), '-o', str(tmp_path / 'calibrated.onnx')])
    assert '-o ' in capsys.readouterr().err and not (tmp_path / 'calibrated.onnx').exists()


@pytest.mark.slow
def test_a_failed_write_leaves_the_model_as_it_was(tiny_mvtec, tmp_path, monkeypatch):
    root, name = tiny_mvtec
    path = save_checkpoint(tmp_path / 'models', 'Shift', name, 'texture')
    before = path.read_bytes()

    def failing_save(obj, f):
        f.write(b'partial')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', failing_save)
    with pytest.raises(OSError, match='disk full'):
        thresholds.store_thresholds(path, dict(image=1.0, pixel=1.0))
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.mark.slow
def test_evaluation_reports_f1_optimal_and_stored_threshold_metrics(tiny_mvtec, tmp_path):
    root, name = tiny_mvtec
    path = save_checkpoint(tmp_path / 'models', 'Shift', name, 'texture')
    (record,) = mvtec_tasks.evaluate_checkpoints(tmp_path / 'models', root, batch_size=8)
    assert 0 < record['image_f1_best'] <= 1 and 0 < record['pixel_f1_best'] <= 1
    assert math.isnan(record['image_f1']) and math.isnan(record['pixel_precision'])
    assert record['thresholds_sha256'] == NO_THRESHOLDS
    stored = dict(image=record['image_threshold_best'], pixel=record['pixel_threshold_best'], flip_average=False)
    thresholds.store_thresholds(path, stored)
    (record,) = mvtec_tasks.evaluate_checkpoints(tmp_path / 'models', root, batch_size=8)
    assert record['thresholds_sha256'] == thresholds_sha256(stored)  # what its precision ... were computed at
    assert record['image_f1'] == pytest.approx(record['image_f1_best'])
    assert record['pixel_f1'] == pytest.approx(record['pixel_f1_best'])
    tables = mvtec_tasks.write_report([record], tmp_path / 'eval')
    assert {'image_auroc_mean', 'image_f1', 'pixel_f1_best'} <= set(tables)
    assert (tmp_path / 'eval' / 'tables' / 'pixel_recall.md').is_file()
    # thresholds calibrated on plain maps do not apply to flip-averaged ones
    with pytest.warns(UserWarning, match=r'final_.*\.pt: its thresholds were calibrated without flip '
                                         r'averaging and these maps are with it'):
        (flipped,) = mvtec_tasks.evaluate_checkpoints(tmp_path / 'models', root, batch_size=8,
                                                      flip_average=True)
    assert math.isnan(flipped['image_f1']) and math.isnan(flipped['pixel_recall'])
    assert 0 < flipped['image_f1_best'] <= 1


def test_exports_made_before_the_thresholds_are_named(held_out_model, tmp_path):
    """An export keeps the thresholds of its checkpoint when it was made: calibrating the checkpoint again
    in place names the exports at their default names, which would flag images by the earlier ones."""
    from experiments import export
    path, root, held_out = held_out_model
    exported = export.export(path, 'torchscript')
    assert exported == export.default_export_path(path, 'torchscript')
    onnx = export.default_export_path(path, 'onnx')
    onnx.write_bytes(b'an earlier ONNX export')  # only its name counts
    with pytest.warns(UserWarning) as caught:
        thresholds.main(['-m', str(path), '--batch-size', '4'])
    messages = sorted(str(warning.message) for warning in caught if 'was exported before' in str(warning.message))
    assert len(messages) == 2
    assert re.fullmatch(rf"{re.escape(str(onnx))} was exported before these thresholds were stored and does not "
                        rf"carry them \(predict\.py with it decides by those its model had then.*\); export the "
                        rf"model again, with the options it was exported with \(--dynamic-size \.\.\.\): "
                        rf"python -m experiments\.export -m {re.escape(shlex.quote(str(path)))} --format onnx",
                        messages[0])
    assert re.fullmatch(rf"{re.escape(str(exported))} was exported before these thresholds were stored and does "
                        rf"not carry them \(its spec holds those its model had then, or none\); export the model "
                        rf"again: python -m experiments\.export -m {re.escape(shlex.quote(str(path)))} "
                        rf"--format torchscript", messages[1])
    onnx.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # a copy written elsewhere has no export beside it
        thresholds.main(['-m', str(path), '--batch-size', '4', '-o', str(tmp_path / 'copy.pt')])


def test_a_model_calibrated_through_a_link_is_the_file_linked_to(held_out_model, tmp_path):
    """In place through a symbolic link: the linked model gains the thresholds, the link stays (writing
    the link's path replaced it with a calibrated copy and left the model as it was)."""
    from experiments import export
    path, root, held_out = held_out_model
    link = tmp_path / 'latest' / 'final.pt'
    link.parent.mkdir()
    link.symlink_to(path)
    exported = export.export(link, 'torchscript')  # beside the link
    with pytest.warns(UserWarning, match=rf"^{re.escape(str(exported))} was exported before these thresholds"):
        calibrated = thresholds.main(['-m', str(link), '--batch-size', '4'])
    assert link.is_symlink() and link.resolve() == path.resolve()
    assert read_meta(path)['thresholds'] == calibrated
    exported.unlink()
    again = thresholds.main(['-m', str(link), '--batch-size', '4', '--fpr', '0.2', '-o', str(link)])  # the same
    assert link.is_symlink() and read_meta(path)['thresholds'] == again != calibrated
    # -o naming a link to another model, or a link to itself, replaces the link and leaves what it names
    other = tmp_path / 'other.pt'
    shutil.copy(path, other)
    thresholds_of_other = read_meta(other)['thresholds']
    for name, points_to in (('to_other.pt', other), ('loop.pt', 'loop.pt')):
        written = tmp_path / name
        written.symlink_to(points_to)
        thresholds.main(['-m', str(link), '--batch-size', '4', '-o', str(written)])
        assert not written.is_symlink() and read_meta(written)['thresholds'] == calibrated
    assert read_meta(other)['thresholds'] == thresholds_of_other


def test_an_export_beside_both_a_link_and_its_model_is_named_once(held_out_model, tmp_path):
    from experiments import export
    path, root, held_out = held_out_model
    (tmp_path / 'deployed').mkdir()
    model = tmp_path / 'deployed' / 'model.pth'
    shutil.copy(path, model)
    link = tmp_path / 'deployed' / 'model.pt'
    link.symlink_to(model.name)  # relative, in the same folder: both give model.torchscript.pt
    exported = export.export(model, 'torchscript')
    with pytest.warns(UserWarning, match='exported before these thresholds') as caught:
        thresholds.main(['-m', str(link), '--batch-size', '4'])
    assert [str(w.message).split(' was ')[0] for w in caught if 'exported before' in str(w.message)] == [
        str(exported)]
