"""bench/validation_vs_test.py: validation and test scores of trained models and their rank correlation."""
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import train_mvtec
from conftest import make_mvtec_category
from experiments.checkpoints import read_model
from experiments.mvtec_tasks import load_test_set
from experiments.prediction import evaluate

REPO = Path(__file__).resolve().parents[1]
FAST = ['--epochs', '1', '--batch-size', '4', '--res-scale', '0.25', '--workers', '0',
        '--no-figures', '--checkpoint-every', '100']


def load_bench():
    spec = importlib.util.spec_from_file_location('validation_vs_test',
                                                  REPO / 'bench' / 'validation_vs_test.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_epochs_column_is_that_of_the_weights_and_a_missing_folder_is_named(tmp_path, capsys):
    bench = load_bench()
    last = dict(train_config=dict(epochs=5), best_epoch=2)
    chosen = dict(train_config=dict(epochs=5, select='best'), best_epoch=2)
    assert bench.weights_epoch(last) == 5 and bench.weights_epoch(last, best_file=True) == 2
    assert bench.weights_epoch(chosen) == 2  # --select best: the final model holds the best epoch's weights
    typo = tmp_path / 'modles'
    assert bench.main(['--data-dir', str(tmp_path), '--category', 'plates', '--models', str(typo)]) == 1
    assert capsys.readouterr().err == f'error: model folder {typo} does not exist\n' and not typo.exists()


@pytest.mark.slow
def test_scores_every_validated_model_and_correlates_them(tmp_path, capsys):
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
    assert list(scores['held_out']) == [1, 1, 1] and list(scores['epochs']) == [1, 1, 1]
    # one epoch: each run's best model has its final model's weights and is not counted twice
    assert len(list(models.rglob('best_*.pt'))) == 3
    assert bench.main(['--data-dir', str(data), '--category', 'plates', '--models', str(models),
                       '--out', str(tmp_path / 'best'), '--best']) == 0
    assert len(pd.read_csv(tmp_path / 'best' / 'scores.csv')) == 3
    assert capsys.readouterr().err.count(': the weights of ') == 3
    # flip-averaged maps on both sets (textures): the test figures are the evaluation's with --flip-average
    # (by default into a folder of their own, beside the plain maps' default one, and saying so)
    assert bench.main(['--data-dir', str(data), '--category', 'plates', '--models', str(models),
                       '--flip-average']) == 0
    flipped = pd.read_csv(models / 'correlation_flip_average' / 'scores.csv').set_index('model')
    assert flipped['flip_average'].all() and not scores['flip_average'].any()
    assert 'flip-averaged maps' in (models / 'correlation_flip_average' / 'correlation.md').read_text()
    assert 'plain maps' in (tmp_path / 'out' / 'correlation.md').read_text()
    plain = scores.set_index('model').loc[flipped.index]
    assert not np.allclose(flipped['val_pixel_auroc'], plain['val_pixel_auroc'])
    for name, row in flipped.iterrows():
        model, meta = read_model(models / name, 'cpu')
        expected = evaluate(model, load_test_set(str(data), meta), flip_average=True)
        assert row['test_pixel_auroc'] == pytest.approx(expected['pixel_auroc'])
    # a model validated on other held-out images is not ranked with the others
    train_mvtec.main(['-s', 'Shift-Intensity', '-d', str(data), '-o', str(models), '--val-fraction', '0.4']
                     + FAST)
    [other] = models.rglob('final_plates_shift_intensity.pt')
    assert bench.main(['--data-dir', str(data), '--category', 'plates', '--models', str(models),
                       '--out', str(tmp_path / 'mixed')]) == 1
    assert 'was validated on another validation set than' in capsys.readouterr().err
    assert not (tmp_path / 'mixed' / 'scores.csv').exists()
    other.unlink()
    # the same number of training images under other names: the held-out ones cannot be found again
    (data / 'plates' / 'train' / 'good' / '000.png').rename(data / 'plates' / 'train' / 'good' / 'zzz.png')
    assert bench.main(['--data-dir', str(data), '--category', 'plates', '--models', str(models),
                       '--out', str(tmp_path / 'renamed')]) == 1
    assert "are not the ones the model was trained on" in capsys.readouterr().err
