"""Shared fixtures and helpers: tiny categories in the MVTec AD folder layout, written into tmp
dirs, untrained models saved as the training scripts save theirs, and a chest X-ray test set."""
import gc
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import settings as hypothesis_settings
from PIL import Image

from experiments import atomic
from experiments.atomic import save_torch_atomic
from experiments.settings import parse_setting, trained_model_path
from experiments.training import model_checkpoint
from models.resnet import resnet18_enc_dec
from self_sup_data import recipe

CALIBRATION_SAMPLES = 60

# No per-example time limit: speed is measured by the benchmarks, and a limit fails property tests
# at random on a loaded machine.
hypothesis_settings.register_profile('no_deadline', deadline=None)
hypothesis_settings.load_profile('no_deadline')


if os.environ.get('PYTEST_XDIST_WORKER'):  # pytest -n N: N workers share the cores
    torch.set_num_threads(1)
    os.environ['OMP_NUM_THREADS'] = '1'  # and so do the processes that the tests start


def pytest_collection_finish(session):
    """Hide what the imports and the collection made (torch, scikit-learn, pandas...: some
    300,000 objects) from the garbage collector, whose full collections during the tests and at
    the interpreter's exit would walk them again and again."""
    gc.freeze()


@pytest.fixture(autouse=True)
def fewer_calibration_samples(monkeypatch):
    """Calibrations draw CALIBRATION_SAMPLES synthetic anomalies instead of recipe.NUM_SAMPLES:
    the suite trains dozens of tiny models of categories without a table entry, each calibrated
    first (2.5 s at 300 samples on a 2-core CPU). Child processes calibrate as users do."""
    monkeypatch.setattr(recipe, 'NUM_SAMPLES', CALIBRATION_SAMPLES)


@pytest.fixture(autouse=True)
def same_torch_threads():
    """Each test starts with the worker's thread count: the benchmarks' ``main`` sets its own,
    and a later test that compares maps with a child process's would differ in the last bit."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_disk_flush(monkeypatch):
    """``write_atomic`` skips ``os.fsync`` (its order of steps is tested in test_atomic.py): the
    suite writes some 2,000 files, and flushing each to disk cost it about 25 s of waiting."""
    monkeypatch.setattr(atomic.os, 'fsync', lambda fd: None)


def _smooth_texture(rng, size, channels):
    """A random, smooth uint8 image (each channel different for RGB)."""
    noise = rng.random((size // 4, size // 4, channels)).astype(np.float32)
    image = cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC).reshape(size, size, channels)
    return np.clip(40 + 170 * image, 0, 255).astype(np.uint8)


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[:, :, 0] if array.ndim == 3 and array.shape[2] == 1 else array).save(path)


def make_mvtec_category(root, name, n_train=6, n_test_good=3, defects=None, size=64, channels=1,
                        with_masks=True, seed=0):
    """Write ``root/name`` in MVTec AD layout and return its path.

    Normal images are smooth random textures (``channels`` 1: grayscale PNG, 3: RGB PNG).
    Each defect image has a bright square (random position, side size/4); with ``with_masks``
    its mask ``ground_truth/<defect>/<NNN>_mask.png`` (0/255) marks exactly that square.
    ``defects``: {defect type: number of images}, default {'crack': 3}.
    """
    defects = {'crack': 3} if defects is None else defects
    rng = np.random.default_rng(seed)
    category = Path(root) / name
    for i in range(n_train):
        _save(category / 'train' / 'good' / f'{i:03d}.png', _smooth_texture(rng, size, channels))
    for i in range(n_test_good):
        _save(category / 'test' / 'good' / f'{i:03d}.png', _smooth_texture(rng, size, channels))
    side = size // 4
    for defect, count in defects.items():
        for i in range(count):
            image = _smooth_texture(rng, size, channels)
            top, left = rng.integers(0, size - side, 2)
            image[top:top + side, left:left + side] = 250
            mask = np.zeros((size, size), np.uint8)
            mask[top:top + side, left:left + side] = 255
            _save(category / 'test' / defect / f'{i:03d}.png', image)
            if with_masks:
                _save(category / 'ground_truth' / defect / f'{i:03d}_mask.png', mask)
    return category


@pytest.fixture
def tiny_mvtec(tmp_path):
    """(root, name) of a tiny grayscale category: 6 train, 3 test good, 3 'crack' with masks, 64 px."""
    make_mvtec_category(tmp_path, 'tiny')
    return tmp_path, 'tiny'


def save_untrained_model(path, meta, seed=0, final_activation='sigmoid', checksum=False):
    """A freshly initialised grayscale encoder-decoder (torch seed ``seed``) saved at ``path`` the
    way training saves its final model, with ``meta`` and its ``model_config`` (and, with
    ``checksum``, its weights' ``weights_sha256``, as training records it); returns the path."""
    torch.manual_seed(seed)
    model = resnet18_enc_dec(in_channels=1, final_activation=final_activation)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    meta = dict(meta, model_config=model.config)
    save_torch_atomic(model_checkpoint(model, meta) if checksum else dict(model=model.state_dict(), meta=meta), path)
    return Path(path)


RES_SCALE = 0.25  # 64-pixel textures (train and test side 64) for the checkpoints of save_checkpoint


def save_checkpoint(model_dir, key, category, kind, seed=0):
    """A freshly initialised model saved the way training saves its final model."""
    setting = parse_setting(key)
    meta = dict(dataset='mvtec', setting=key, category=category, kind=kind, res_scale=RES_SCALE,
                train_size=64, seed=seed)
    return save_untrained_model(trained_model_path(model_dir, setting, category), meta, seed,
                                setting.final_activation)


def make_chest_test_set(root, seeds=(1, 2)):
    """A 64-pixel chest X-ray test set and models of 'Shift' under ``root``:
    returns (model_dir, data_dir, normal list, anomalous list, bbox csv)."""
    root = Path(root)
    rng = np.random.default_rng(0)
    names = {'normal': [f'n{i}.png' for i in range(4)], 'anomalous': [f'a{i}.png' for i in range(3)]}
    for name in names['normal'] + names['anomalous']:
        image = rng.integers(60, 120, (64, 64), dtype=np.uint8)
        if name.startswith('a'):
            image[16:32, 16:32] = 250
        Image.fromarray(image).save(root / name)
    for kind, listed in names.items():
        (root / f'{kind}.txt').write_text('\n'.join(listed) + '\n')
    # boxes in NIH's 1024-pixel coordinates for two of the three anomalous images
    pd.DataFrame({'Image Index': ['a0.png', 'a1.png'], 'Finding Label': ['Mass', 'Nodule'],
                  'Bbox [x': [256, 256], 'y': [256, 256], 'w': [256, 256], 'h]': [256, 256]}
                 ).to_csv(root / 'boxes.csv', index=False)
    for seed in seeds:
        meta = dict(dataset='chest_xray', setting=f'Shift-{seed}', category='chest_xray', res=64,
                    seed=seed)
        save_untrained_model(root / 'models' / 'shift' / 'chest_xray' / f'final_chest_xray_shift_{seed}.pt',
                             meta, seed)
    return root / 'models', root, root / 'normal.txt', root / 'anomalous.txt', root / 'boxes.csv'
