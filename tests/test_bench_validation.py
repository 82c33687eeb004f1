"""bench/validation_vs_test.py: validation and test scores of trained models and their rank correlation."""
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import train_mvtec
from conftest import make_mvtec_category

REPO = Path(__file__).resolve().parents[1]
FAST = ['--epochs', '1', '--batch-size', '4', '--res-scale', '0.25', '--workers', '0',
        '--no-figures', '--checkpoint-every', '100']


def load_bench():
    spec = importlib.util.spec_from_file_location('validation_vs_test',
                                                  REPO / 'bench' / 'validation_vs_test.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_scores_every_validated_model_and_correlates_them(tmp_path):
    data, models = tmp_path / 'data', tmp_path / 'models'
    make_mvtec_category(data, 'plates', n_train=12)
    for key in ('Shift-Intensity-M', 'CutPaste', 'FPI'):
        train_mvtec.main(['-s', key, '-d', str(data), '-o', str(models), '--val-fraction', '0.1']
                         + FAST)
    train_mvtec.main(['-s', 'Shift', '-d', str(data), '-o', str(models)] + FAST)  # all images
    bench = load_bench()
    assert bench.main(['--data-dir', str(data), '--category', 'plates', '--models', str(models),
                       '--out', str(tmp_path / 'out')]) == 0
    scores = pd.read_csv(tmp_path / 'out' / 'scores.csv')
    assert sorted(scores['setting']) == ['CutPaste', 'FPI', 'Shift-Intensity-M']  # Shift saw them
    table = pd.read_csv(tmp_path / 'out' / 'correlation.csv').set_index('validation')
    ranks = scores.rank()
    for name in bench.TEST_METRICS:  # Spearman's rho: Pearson's correlation of the ranks
        expected = np.corrcoef(ranks['val_score'], ranks[f'test_{name}'])[0, 1]
        assert table.loc['val_score', f'rho {name}'] == pytest.approx(expected, nan_ok=True)
    # one held-out image of 12: one defect, of the first kind, also correlated on its own
    assert [c for c in scores if c.startswith('val_image_auroc_')] == ['val_image_auroc_mean',
                                                                      'val_image_auroc_scar']
    assert list(table.index) == list(bench.VALIDATION_COLUMNS) + ['val_image_auroc_scar']
    assert (tmp_path / 'out' / 'correlation.md').is_file()
