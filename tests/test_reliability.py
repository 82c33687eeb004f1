"""Reliability of the training scripts: no finished or interrupted run is replaced unless asked,
resume refuses another run by name, out-of-range options and broken checkpoints end in one line."""
import os
import shutil

import pytest

import train_mvtec
from conftest import make_mvtec_category
from experiments.settings import trained_model_path
from experiments.training import last_checkpoint_path, load_model
from test_cli import run_error

ONE_EPOCH = ['--epochs', '1', '--batch-size', '3', '--res-scale', '0.25', '--workers', '0',
             '--no-figures', '--recipe', 'table']


@pytest.fixture
def trained(tmp_path):
    """(argv, path of the final model) of a one-epoch run of a tiny category."""
    make_mvtec_category(tmp_path / 'data', 'tiny')
    argv = ['-s', 'Shift-3', '-d', str(tmp_path / 'data'), '-o', str(tmp_path / 'out'), '-n', 'tiny']
    assert train_mvtec.main(argv + ONE_EPOCH) == 0
    return argv, trained_model_path(tmp_path / 'out', 'Shift-3', 'tiny')


def test_a_finished_model_is_replaced_only_with_force(trained, capsys):
    argv, path = trained
    before = path.read_bytes()
    message = run_error(train_mvtec.main, argv + ONE_EPOCH, capsys)
    assert str(path) in message and 'finished' in message and '--force' in message
    assert path.read_bytes() == before
    assert train_mvtec.main(argv + ONE_EPOCH + ['--force', '--lr', '0.01']) == 0
    assert load_model(path)[1]['train_config']['lr'] == 0.01


@pytest.mark.parametrize('change,expected', [
    (['--epochs', '2'], 'epochs: 1 vs 2'),
    (['--lr', '0.01'], 'lr: 0.001 vs 0.01'),
    (['--num-patches', '1'], 'self_sup_args'),
    (['--data'], 'data_dir'),
])
def test_resume_of_a_finished_or_interrupted_run_refuses_other_arguments(trained, tmp_path, capsys,
                                                                          change, expected):
    argv, path = trained
    if change == ['--data']:
        shutil.copytree(tmp_path / 'data', tmp_path / 'other')
        argv, change = [a.replace('data', 'other') for a in argv], []
    request = argv + ONE_EPOCH + change + ['--resume']  # the last value of an option counts
    before = path.read_bytes()
    message = run_error(train_mvtec.main, request, capsys)
    assert f'cannot resume the finished run {path}' in message and expected in message
    assert path.read_bytes() == before
    os.remove(path)  # an interrupted run: its last checkpoint only
    message = run_error(train_mvtec.main, request, capsys)
    assert 'cannot resume the interrupted run' in message and expected in message
    assert last_checkpoint_path(path.parent, 'tiny_shift_3').is_file()


def test_resume_of_the_same_run_skips_it(trained, capsys):
    argv, path = trained
    capsys.readouterr()
    assert train_mvtec.main(argv + ONE_EPOCH + ['--resume']) == 0
    assert 'skipping' in capsys.readouterr().out
