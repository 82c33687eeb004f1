"""The real-data benchmark: its helpers, and whole runs on a tiny category (the real run reads ../shared)."""
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from bench import real_data
from experiments import one_class
from experiments.mvtec_tasks import load_normal_set, load_test_set, read_model


def test_border_band_is_the_outer_fraction_of_each_side():
    band = real_data.border_band((10, 20), 0.1)
    assert band.shape == (10, 20) and band.dtype == bool
    assert band[0].all() and band[-1].all() and band[:, :2].all() and band[:, -2:].all()
    assert not band[1:-1, 2:-2].any()
    assert real_data.border_band((4, 4), 0.01)[0].all()  # at least one pixel wide


def test_pixel_auroc_by_region_scores_each_region_alone():
    rng = np.random.default_rng(0)
    n, size = 6, 20
    masks = (rng.random((n, size, size)) < 0.2).astype(np.uint8)
    masks[0] = 0  # a normal image
    in_band = real_data.border_band((size, size))
    # the map ranks defects perfectly in the band and backwards inside
    maps = np.where(in_band, masks, 1 - masks) + 0.1 * rng.random((n, size, size))
    has_mask = np.ones(n, bool)
    has_mask[1] = False  # a defective image without mask: left out
    maps[1] = 1 - maps[1]
    dataset = SimpleNamespace(masks=list(masks), has_mask=has_mask)

    result = real_data.pixel_auroc_by_region(dataset, maps)
    assert result['pixel_auroc_border'] == pytest.approx(1.0)
    assert result['pixel_auroc_inner'] == pytest.approx(0.0)
    rng_maps = rng.random((n, size, size))
    result = real_data.pixel_auroc_by_region(dataset, rng_maps)
    for name, region in (('border', in_band), ('inner', ~in_band)):
        expected = roc_auc_score(masks[has_mask][:, region].ravel(), rng_maps[has_mask][:, region].ravel())
        assert result[f'pixel_auroc_{name}'] == pytest.approx(expected)


def test_method_name_names_the_paste_fraction_when_the_generator_used_one():
    assert real_data.method_name('FPI', {'mode': 'uniform'}) == 'FPI'
    assert real_data.method_name('Shift-M', {'paste_fraction': None}) == 'NSA (binary, mixed gradients)'
    assert (real_data.method_name('Shift-Intensity-M', {'paste_fraction': [0.5, 1.0]})
            == 'NSA (logistic, mixed gradients), blend mixed with paste U(0.5, 1)')
    assert real_data.method_name('Shift-Intensity-M-7', {}) == 'NSA (logistic, mixed gradients), seed 7'
    assert real_data.method_name('FPI-Poisson-M-3', {}) == 'FPI-Poisson-M, seed 3'  # no table name


def test_benchmark_trains_and_tables_a_decoder_and_cutpaste_3way(tiny_mvtec, tmp_path):
    """End to end on a tiny category: CutPaste's classifier is scored by a Gaussian density, and
    only its row has the pooled image AUROC, equal to the one-class module's own evaluation."""
    root, name = tiny_mvtec
    out = tmp_path / 'bench'
    base = ['--data-dir', str(root), '--category', name, '--out', str(out), '--res-scale', '0.25',
            '--epochs', '1', '--batch-size', '2', '--workers', '0', '--device', 'cpu']
    assert real_data.main(base + ['--settings', 'CutPaste', 'CutPaste-3way', '--bf16']) == 0
    table = pd.read_csv(out / 'real_data.csv').set_index('setting')
    assert list(table.index) == ['CutPaste', 'CutPaste-3way']
    assert table.loc['CutPaste-3way', 'method'] == 'CutPaste (3-way classifier) + Gaussian density'
    assert np.isnan(table.loc['CutPaste', 'image AUROC (pooled)'])

    path = real_data.model_path(SimpleNamespace(out=str(out), category=name), 'CutPaste-3way')
    model, meta = read_model(path, 'cpu')
    assert meta['train_config']['bf16'] is True  # --bf16 reached the training script
    values, _ = one_class.evaluate_two_stage(model, load_normal_set(str(root), meta),
                                             load_test_set(str(root), meta), ['gde'])['gde']
    for column, metric in (('image AUROC (pooled)', 'image_auroc_pooled'),
                           ('image AUROC (mean)', 'image_auroc_mean'), ('pixel AUROC', 'pixel_auroc')):
        assert table.loc['CutPaste-3way', column] == pytest.approx(values[metric])

    # tabulating the decoder alone (nothing trained again) has no pooled column
    assert real_data.main(base + ['--settings', 'CutPaste', '--evaluate-only']) == 0
    assert 'image AUROC (pooled)' not in pd.read_csv(out / 'real_data.csv').columns
