"""Reliability: no finished or interrupted run is replaced unless asked and resume refuses another
run by name; out-of-range options, broken checkpoints and bad tables end in one line before
anything is written; an evaluation fails row by row; masks, 16-bit images, batch norm's last
batch, checksums and killed saves."""
import contextlib
import math
import os
import re
import shutil
import socket
import sys
import time
import warnings
import zlib
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import train_chest_xray
import train_mvtec
from conftest import make_chest_test_set, make_mvtec_category, save_checkpoint
from experiments import checkpoints, chest_xray_tasks, mvtec_tasks, settings, tables, training
from experiments.checkpoints import read_meta, read_model
from experiments.atomic import write_text_atomic
from experiments.thresholds import store_thresholds
from experiments.settings import trained_model_path
from experiments.training import (TrainConfig, final_model_path, last_checkpoint_path, load_model,
                                  make_loader, model_checkpoint, train, weights_checksum)
from models.resnet import resnet18_enc_dec
from self_sup_data import chest_xray
from self_sup_data.images import (decode, decode_values, high_depth_maximum, image_files, is_high_depth_file,
                                  lossy_compression, read_image)
from self_sup_data.self_sup_tasks import check_object_pixels
from test_chest_xray import synthetic_table
from test_cli import run_error
from test_training import CrashAtEpoch, SquaresDataset, TinyNet

ONE_EPOCH = ['--epochs', '1', '--batch-size', '3', '--res-scale', '0.25', '--workers', '0',
             '--no-figures', '--recipe', 'table']


def as_second_torchrun_process(patch):
    """Make this process torchrun's second (RANK 1 of WORLD_SIZE 2) for ``patch`` (a MonkeyPatch),
    training alone as its process group would (the batch of a step is its own, its rank 0 writes)."""
    from experiments import cli
    patch.setenv('RANK', '1')
    patch.setenv('WORLD_SIZE', '2')
    patch.setattr(training, 'init_distributed', lambda device: (0, 1))
    patch.setattr(cli, 'launched_processes', lambda: 1)


def killed_in_epoch(monkeypatch, epoch, command):
    """Run ``command()``, killed (KeyboardInterrupt) as its training starts epoch ``epoch`` (1-based)."""
    from self_sup_data.mvtec import SelfSupImageDataset
    set_epoch = SelfSupImageDataset.set_epoch

    def killed(self, index):
        if index == epoch - 1:
            raise KeyboardInterrupt
        set_epoch(self, index)
    with monkeypatch.context() as patch:
        patch.setattr(SelfSupImageDataset, 'set_epoch', killed)
        with pytest.raises(KeyboardInterrupt):
            command()


@pytest.fixture
def trained(tmp_path):
    """(argv, path of the final model) of a one-epoch run of a tiny category."""
    make_mvtec_category(tmp_path / 'data', 'tiny')
    argv = ['-s', 'Shift-3', '-d', str(tmp_path / 'data'), '-o', str(tmp_path / 'out'), '-n', 'tiny']
    assert train_mvtec.main(argv + ONE_EPOCH) == 0
    return argv, trained_model_path(tmp_path / 'out', 'Shift-3', 'tiny')


@pytest.mark.slow
def test_a_finished_model_is_replaced_only_with_force(trained, capsys):
    argv, path = trained
    before = path.read_bytes()
    message = run_error(train_mvtec.main, argv + ONE_EPOCH, capsys)
    assert str(path) in message and 'finished' in message and '--force' in message
    assert path.read_bytes() == before
    assert train_mvtec.main(argv + ONE_EPOCH + ['--force', '--lr', '0.01']) == 0
    assert load_model(path)[1]['train_config']['lr'] == 0.01


@pytest.mark.slow
def test_force_replaces_a_run_whose_checkpoint_cannot_be_read(trained, capsys):
    argv, path = trained
    broken = last_checkpoint_path(path.parent, 'tiny_shift_3')
    broken.write_bytes(broken.read_bytes()[:1000])
    for retry in ([], ['--resume']):  # refused, naming the file and what to do
        message = run_error(train_mvtec.main, argv + ONE_EPOCH + retry, capsys)
        assert f'cannot read checkpoint {broken}' in message and '--force trains the run again' in message
    assert train_mvtec.main(argv + ONE_EPOCH + ['--force']) == 0
    assert load_model(path)[1]['train_config']['epochs'] == 1


@pytest.mark.slow
def test_a_damaged_final_model_is_written_again_from_the_runs_checkpoint_by_resume(trained, capsys):
    argv, path = trained
    model, meta = load_model(path)
    weights = {key: value.clone() for key, value in model.state_dict().items()}
    path.write_bytes(path.read_bytes()[:1000])
    last = last_checkpoint_path(path.parent, 'tiny_shift_3')
    with pytest.warns(UserWarning, match=rf"cannot read checkpoint {re.escape(str(path))}.*; the run's checkpoint "
                                         rf"{re.escape(str(last))} is readable: --resume writes the final model again"):
        message = run_error(train_mvtec.main, argv + ONE_EPOCH, capsys)  # without --resume: refused, as interrupted
    assert f'{last} holds an interrupted run; pass --resume to continue it' in message
    with pytest.warns(UserWarning, match='--resume writes the final model again'):
        assert train_mvtec.main(argv + ONE_EPOCH + ['--resume']) == 0
    model, again = load_model(path)  # the run's weights, not a run trained again
    assert all(torch.equal(value, weights[key]) for key, value in model.state_dict().items())
    assert again['epoch_losses'] == meta['epoch_losses'] and again['weights_sha256'] == meta['weights_sha256']


@pytest.mark.slow
@pytest.mark.parametrize('interrupted', [None, 'in epoch 1', 'in epoch 3', 'before its final model',
                                         'after its final model', 'with its clock ahead'])
def test_a_force_run_leaves_no_file_of_the_run_it_replaced(tmp_path, monkeypatch, capsys, interrupted):
    make_mvtec_category(tmp_path / 'data', 'tiny', n_train=12)
    argv = ['-s', 'Shift-3', '-d', str(tmp_path / 'data'), '-o', str(tmp_path / 'out'), '-n', 'tiny',
            '--batch-size', '3', '--res-scale', '0.25', '--workers', '0', '--recipe', 'table']
    assert train_mvtec.main(argv + ['--epochs', '2', '--val-fraction', '0.1', '--select', 'best']) == 0
    path = trained_model_path(tmp_path / 'out', 'Shift-3', 'tiny')
    best_epoch = load_model(path)[1]['best_epoch']
    assert (f"tiny_shift_3: trained on 11 images (1 held out for validation); model in {path} (the weights of epoch "
            f"{best_epoch}, the best validation score)\n") in capsys.readouterr().out
    earlier = {p.name for p in path.parent.iterdir()}
    assert {'best_tiny_shift_3.pt', 'tiny_shift_3_validation.csv', 'tiny_shift_3_validation.png',
            'tiny_shift_3_samples_epoch0002.png'} <= earlier
    other = path.parent / 'tiny_shift_3_notes.txt'  # not a file the training writes: kept
    other.write_text('mine')
    for export in ('final_tiny_shift_3.onnx', 'final_tiny_shift_3.torchscript.pt', 'best_tiny_shift_3.onnx'):
        (path.parent / export).write_bytes(b'an export of the replaced model')  # at its default name: removed
    again = argv + ['--epochs', '3', '--checkpoint-every', '1']
    if interrupted in ('in epoch 1', 'in epoch 3'):  # then resumed: the run still replaces the earlier one
        # (in epoch 1: before any checkpoint of its epochs, never taken for the replaced run's end)
        killed_in_epoch(monkeypatch, int(interrupted[-1]), lambda: train_mvtec.main(again + ['--force']))
        # the replaced run's final model and its exports stay; its other files went at the start, so
        # that none sits beside this run's, and its evaluation says whose model it is
        left = {p.name for p in path.parent.iterdir()}
        assert {'final_tiny_shift_3.pt', 'final_tiny_shift_3.onnx', 'final_tiny_shift_3.torchscript.pt'} <= left
        assert not left & {'best_tiny_shift_3.pt', 'best_tiny_shift_3.onnx', 'tiny_shift_3_validation.csv',
                           'tiny_shift_3_validation.png'}
        assert ('tiny_shift_3_samples_epoch0002.png' in left) == (interrupted == 'in epoch 3')  # the new run's
        assert read_meta(path)['train_config']['epochs'] == 2
        replacing = (f"{re.escape(str(path))} is the model of an earlier run that an interrupted --force run "
                     f"\\(last_tiny_shift_3.pt\\) is replacing")
        evaluation = ['-m', str(tmp_path / 'out'), '-d', str(tmp_path / 'data'), '-o', str(tmp_path / 'eval'),
                      '--no-figures']
        capsys.readouterr()
        mvtec_tasks.main(evaluation)
        assert re.search(f"warning: {replacing}", capsys.readouterr().err)
        with pytest.raises(SystemExit):  # a model left out of the evaluation: not named
            mvtec_tasks.main(evaluation + ['-s', 'Shift-Intensity'])
        assert 'is replacing' not in capsys.readouterr().err
        assert train_mvtec.main(again + ['--resume']) == 0
    elif interrupted == 'before its final model':  # every epoch checkpointed: resumed, not skipped
        remove = training.remove_earlier_run_files

        def interrupted_at_the_end(*args, keep_final_model=False):
            if not keep_final_model:
                raise KeyboardInterrupt
            remove(*args, keep_final_model=keep_final_model)
        with monkeypatch.context() as patch:
            patch.setattr(training, 'remove_earlier_run_files', interrupted_at_the_end)
            with pytest.raises(KeyboardInterrupt):
                train_mvtec.main(again + ['--force'])
        assert train_mvtec.main(again + ['--resume']) == 0
    elif interrupted == 'with its clock ahead':  # ages are read on the file system's clock
        real_time_ns = time.time_ns
        with monkeypatch.context() as patch:
            patch.setattr(time, 'time_ns', lambda: real_time_ns() + 120 * 10**9)
            assert train_mvtec.main(again + ['--force', '--val-fraction', '0.1']) == 0
        assert {'best_tiny_shift_3.pt', 'tiny_shift_3_validation.csv'} <= {p.name for p in path.parent.iterdir()}
        for written in ('best_tiny_shift_3.pt', 'tiny_shift_3_validation.csv', 'tiny_shift_3_validation.png'):
            (path.parent / written).unlink()  # this run's own, as the comparison below leaves them out
    elif interrupted:  # killed as its final model is written: a resume skips the finished run
        save = training.save_torch_atomic

        def killed_after_the_final_model(checkpoint, destination):
            save(checkpoint, destination)
            if destination == path:
                raise KeyboardInterrupt
        with monkeypatch.context() as patch:
            patch.setattr(training, 'save_torch_atomic', killed_after_the_final_model)
            with pytest.raises(KeyboardInterrupt):
                train_mvtec.main(again + ['--force'])
        assert train_mvtec.main(again + ['--resume']) == 0
    else:
        assert train_mvtec.main(again + ['--force']) == 0
    assert {p.name for p in path.parent.iterdir()} == {
        'final_tiny_shift_3.pt', 'last_tiny_shift_3.pt', 'tiny_shift_3_loss.png', '.tiny_shift_3.lock',
        'tiny_shift_3_notes.txt'} | {f'tiny_shift_3_samples_epoch000{epoch}.png' for epoch in (1, 2, 3)}
    assert load_model(path)[1]['train_config']['epochs'] == 3


@pytest.mark.parametrize('change,expected', [
    (['--epochs', '2'], 'epochs: 1 vs 2'),
    (['--lr', '0.01'], 'lr: 0.001 vs 0.01'),
    (['--num-patches', '1'], 'self_sup_args.num_patches: '),  # the entry, not the whole dict
    (['--data'], 'data_dir'),
])
@pytest.mark.slow
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


@pytest.mark.slow
def test_a_resume_that_skips_or_refuses_a_calibrated_run_does_not_print_its_recipe(tmp_path, capsys):
    """The calibration runs to compare the run's arguments; its report is printed when the run trains."""
    make_mvtec_category(tmp_path / 'data', 'tiny')
    argv = ['-s', 'Shift-Intensity', '-d', str(tmp_path / 'data'), '-o', str(tmp_path / 'out'), '-n', 'tiny'] + \
        ONE_EPOCH + ['--recipe', 'auto']
    capsys.readouterr()
    assert train_mvtec.main(argv) == 0
    assert 'recipe auto: logistic label' in capsys.readouterr().out
    assert train_mvtec.main(argv + ['--resume']) == 0
    out = capsys.readouterr().out
    assert 'exists, skipping it' in out and 'recipe auto' not in out
    with pytest.raises(SystemExit):
        train_mvtec.main(argv + ['--resume', '--epochs', '2'])
    out, err = capsys.readouterr()
    assert 'cannot resume the finished run' in err and 'epochs: 1 vs 2' in err and 'recipe auto' not in out


@pytest.mark.slow
def test_resume_of_a_run_whose_training_folder_changed_is_refused(trained, tmp_path, capsys):
    argv, path = trained
    shutil.copy(tmp_path / 'data' / 'tiny' / 'train' / 'good' / '000.png',
                tmp_path / 'data' / 'tiny' / 'train' / 'good' / 'added.png')
    message = run_error(train_mvtec.main, argv + ONE_EPOCH + ['--resume'], capsys)
    assert 'other arguments' in message and 'train_files_sha256' in message


@pytest.mark.slow
def test_resume_of_a_run_whose_training_images_were_replaced_under_their_names_is_refused(trained, tmp_path,
                                                                                       capsys):
    """A dataset converted or downloaded again: the same file names, other images."""
    argv, path = trained
    image = tmp_path / 'data' / 'tiny' / 'train' / 'good' / '000.png'
    cv2.imwrite(str(image), 255 - cv2.imread(str(image), cv2.IMREAD_UNCHANGED))
    message = run_error(train_mvtec.main, argv + ONE_EPOCH + ['--resume'], capsys)
    assert 'other arguments' in message and 'train_contents_sha256' in message
    assert 'train_files_sha256' not in message


@pytest.mark.slow
def test_resume_of_the_same_run_skips_it(trained, capsys):
    argv, path = trained
    store_thresholds(path, dict(image=0.5, pixel=0.5, flip_average=False))  # calibrated later
    capsys.readouterr()
    assert train_mvtec.main(argv + ONE_EPOCH + ['--resume']) == 0
    assert 'skipping' in capsys.readouterr().out


@pytest.mark.slow
def test_a_finished_category_is_refused_before_any_other_trains(trained, tmp_path, capsys):
    argv, path = trained
    make_mvtec_category(tmp_path / 'data', 'aaa')  # trained first, in name order
    everything = [a for a in argv if a not in ('-n', 'tiny')]
    message = run_error(train_mvtec.main, everything + ONE_EPOCH, capsys)
    assert f'{path} holds a finished run' in message
    assert not list((tmp_path / 'out').rglob('*aaa*'))


@pytest.mark.slow
def test_an_interrupted_run_with_other_arguments_beside_a_finished_one_is_resumed(trained, tmp_path):
    argv, path = trained
    other = tmp_path / 'other'  # the checkpoint of a --force run with another lr, as if killed
    assert train_mvtec.main([a.replace(str(tmp_path / 'out'), str(other)) for a in argv]
                            + ONE_EPOCH + ['--lr', '0.01']) == 0
    name = 'tiny_shift_3'
    shutil.copy(last_checkpoint_path(next(other.rglob(f'final_{name}.pt')).parent, name),
                last_checkpoint_path(path.parent, name))
    assert train_mvtec.main(argv + ONE_EPOCH + ['--lr', '0.01', '--resume']) == 0
    assert load_model(path)[1]['train_config']['lr'] == 0.01


@pytest.mark.slow
def test_an_interrupted_force_run_with_the_same_arguments_is_resumed_not_skipped(tmp_path, capsys,
                                                                                   monkeypatch):
    from experiments.cli import found_run
    make_mvtec_category(tmp_path / 'data', 'tiny')
    argv = (['-s', 'Shift-3', '-d', str(tmp_path / 'data'), '-o', str(tmp_path / 'out'), '-n', 'tiny']
            + ONE_EPOCH[2:] + ['--epochs', '2', '--checkpoint-every', '1'])
    assert train_mvtec.main(argv) == 0
    run_dir, name = trained_model_path(tmp_path / 'out', 'Shift-3', 'tiny').parent, 'tiny_shift_3'
    assert found_run(run_dir, name)[1] == 'finished'
    # retrained with --force (the data changed, say), killed in its second epoch
    killed_in_epoch(monkeypatch, 2, lambda: train_mvtec.main(argv + ['--force']))
    assert found_run(run_dir, name) == (last_checkpoint_path(run_dir, name), 'interrupted')
    capsys.readouterr()
    assert train_mvtec.main(argv + ['--resume']) == 0
    assert 'skipping' not in capsys.readouterr().out
    assert found_run(run_dir, name)[1] == 'finished'
    assert len(torch.load(last_checkpoint_path(run_dir, name), weights_only=True)['meta']['epoch_losses']) == 2


BAD_OPTIONS = [
    (['--epochs', '0'], '--epochs must be a positive integer, got 0'),
    (['--batch-size', '0'], '--batch-size must be a positive integer, got 0'),
    (['--figure-every', '0'], '--figure-every must be a positive integer, got 0'),
    (['--checkpoint-every', '0'], '--checkpoint-every'),
    (['--lr', '-1'], '--lr must be a positive number, got -1'),
    (['--lr', 'nan'], '--lr must be a positive number, got nan'),
    (['--lr', 'inf'], '--lr'),
    (['--swa-lr', '0'], '--swa-lr'),
    (['--workers', '-1'], '--workers'),
    (['--device', 'gpu'], "unknown device 'gpu'"),
    (['-s', 'Shift-' + str(10**23)], 'seed 100000000000000000000000 is too large'),
]


def test_a_default_batch_size_that_the_torchrun_processes_cannot_share_is_refused_first(tiny_mvtec, tmp_path,
                                                                                    capsys, monkeypatch):
    """Three processes: the demo's default batch of 8 and the data's of 64 do not divide by 3; refused
    before the demo data is written or a recipe calibrated."""
    root, _ = tiny_mvtec
    monkeypatch.setenv('WORLD_SIZE', '3')
    message = run_error(train_mvtec.main, ['-s', 'Shift', '-o', str(tmp_path / 'demo')], capsys)
    assert message.endswith("the default batch size 8 does not divide by the 3 processes of this torchrun run "
                            "(each takes an equal share of a step's images): pass a --batch-size that does")
    assert not (tmp_path / 'demo').exists()
    message = run_error(train_mvtec.main, ['-s', 'Shift', '-d', str(root), '-o', str(tmp_path / 'out')], capsys)
    assert 'the default batch size 64 does not divide by the 3 processes' in message


@pytest.mark.parametrize('argv,expected', BAD_OPTIONS + [
    (['--res-scale', '5'], '--res-scale must be in (0, 4], got 5'),
    (['--res-scale', 'inf'], '--res-scale'),
    (['--res-scale', 'nan'], '--res-scale'),
    (['-s', 'CutPaste-3way', '--loss', 'bce-bf16'],
     "--loss bce-bf16: the setting trains with loss 'cross_entropy'"),
    (['--batch-size', '7'], "--batch-size must divide by the 2 processes of this torchrun run (each takes an "
                            "equal share of a step's images), got 7"),
])
def test_mvtec_out_of_range_options_are_refused_by_name_before_anything_is_written(
        tiny_mvtec, tmp_path, capsys, monkeypatch, argv, expected):
    root, _ = tiny_mvtec
    if argv == ['--batch-size', '7']:
        monkeypatch.setenv('WORLD_SIZE', '2')  # a process of a two-process torchrun run
    out = tmp_path / 'out'
    message = run_error(train_mvtec.main, ['-s', 'Shift', '-d', str(root), '-o', str(out)] + argv,
                        capsys)
    assert expected in message
    assert not out.exists()
    message = run_error(train_mvtec.main, ['-s', 'Shift', '-o', str(out)] + argv, capsys)  # demo
    assert expected in message
    assert not out.exists()


@pytest.mark.parametrize('argv,expected', BAD_OPTIONS + [
    (['--res', '32'], '--res must be from 64 to 1024'),
    (['--res', '5000'], '--res must be from 64 to 1024'),
])
def test_chest_xray_out_of_range_options_are_refused_by_name_before_anything_is_written(
        tmp_path, capsys, argv, expected):
    (tmp_path / 'images').mkdir()
    Image.fromarray(np.full((64, 64), 100, np.uint8)).save(tmp_path / 'images' / 'a.png')
    (tmp_path / 'list.txt').write_text('a.png\n')
    out = tmp_path / 'out'
    message = run_error(train_chest_xray.main, ['-s', 'Shift', '-d', str(tmp_path / 'images'),
                                                '-l', str(tmp_path / 'list.txt'), '-o', str(out)]
                        + argv, capsys)
    assert expected in message
    assert not out.exists()


@pytest.mark.parametrize('main', [train_mvtec.main, train_chest_xray.main])
def test_an_output_folder_that_is_a_file_is_refused(tiny_mvtec, tmp_path, capsys, main):
    root, _ = tiny_mvtec
    (tmp_path / 'list.txt').write_text('train/good/000.png\n')
    blocker = tmp_path / 'file.txt'
    blocker.write_text('not a folder')
    message = run_error(main, ['-s', 'Shift', '-d', str(root / 'tiny'), '-l', str(tmp_path / 'list.txt'),
                               '-o', str(blocker)] if main is train_chest_xray.main else
                        ['-s', 'Shift', '-d', str(root), '-o', str(blocker)], capsys)
    assert 'cannot write to output folder' in message and str(blocker) in message
    assert blocker.read_text() == 'not a folder'


@pytest.mark.parametrize('content,argv,expected', [
    ('', [], 'cannot read label table'),
    ('Image Index,Finding Labels\na.png,No Finding\n', [], "lacks columns ['Patient ID'"),
    (None, [], 'table.csv'),
    ('nih', ['--n-test-normal', '-5'], '--n-test-normal) must be 0 or more, got -5'),
    ('nih', ['--n-test-anom', '-1'], '--n-test-anom'),
])
def test_list_builder_errors_are_one_line_and_write_nothing(tmp_path, capsys, content, argv,
                                                            expected):
    """content: of the label table (None: no such file; 'nih': a valid table)."""
    csv = tmp_path / 'table.csv'
    if content == 'nih':
        synthetic_table().to_csv(csv, index=False)
    elif content is not None:
        csv.write_text(content)
    message = run_error(chest_xray.main, ['--csv', str(csv), '--out', str(tmp_path / 'lists')] + argv,
                        capsys)
    assert expected in message and message.startswith(chest_xray.PROG)
    assert not (tmp_path / 'lists').exists()


class Hostile:
    """Pickles as a call of a global function: what a checkpoint that runs code on load holds."""

    def __reduce__(self):
        return os.getcwd, ()


@pytest.mark.parametrize('content,expected', [
    (b'version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 45000000\n',
     'it is a Git LFS pointer, not the file it points to; fetch the file (git lfs pull)'),
    (b'junk', "it is not a PyTorch checkpoint (it starts with b'junk')"),  # torch: struct.error
    (b'<!DOCTYPE html>\n<html><body>Sign in</body></html>', "not a PyTorch checkpoint (it starts with b'<!DOCTYPE"),
    (b'\x89PNG\r\n\x1a\n' + bytes(64), "not a PyTorch checkpoint (it starts with b'\\x89PNG"),
    (None, 'holds objects other than tensors and plain values, and loading it could run code; refused'),
])
def test_a_file_that_is_no_checkpoint_is_named_for_what_it_is(tmp_path, content, expected):
    path = tmp_path / 'final_tiny_shift.pt'  # a download that went wrong, or a pickle that runs code
    path.write_bytes(content) if content is not None else torch.save(dict(meta=Hostile()), path)
    for read in (read_meta, lambda path: read_model(path, 'cpu')):
        with pytest.raises(ValueError) as error:
            read(path)
        message = str(error.value)
        assert message.startswith(f'cannot read checkpoint {path}: ') and expected in message


def test_a_checkpoint_whose_contents_do_not_fit_says_what_is_wrong(tmp_path):
    """A bare state_dict (no meta) and weights that do not fit the network their meta describes
    are named for what they are, with the mismatch, not as a truncated file."""
    path = save_checkpoint(tmp_path, 'Shift', 'tiny', 'texture')
    checkpoint = torch.load(path, weights_only=True)
    bare = tmp_path / 'bare.pt'
    torch.save(checkpoint['model'], bare)
    with pytest.raises(ValueError, match=r"it has no 'meta' entry; give a model that the training "
                                         r"scripts wrote .*a bare state_dict has no meta"):
        read_model(bare, 'cpu')
    checkpoint['meta']['model_config'] = dict(checkpoint['meta']['model_config'], in_channels=3)
    misfit = tmp_path / 'misfit.pt'
    torch.save(checkpoint, misfit)
    with pytest.raises(ValueError) as error:
        read_model(misfit, 'cpu')
    message = str(error.value)
    assert message.startswith(f'cannot read checkpoint {misfit}: its weights do not fit the network '
                              'that its meta describes (')
    assert 'size mismatch' in message and 'truncated' not in message
    checkpoint['meta']['model_config'] = dict(checkpoint['meta']['model_config'], attention=True)
    newer = tmp_path / 'newer.pt'  # written by a version with an option this one lacks
    torch.save(checkpoint, newer)
    with pytest.raises(ValueError, match=r"its meta describes a network that this version cannot build "
                                         r"\(unknown model config keys \['attention'\]"):
        read_model(newer, 'cpu')
    # torch's unpickler raises KeyError on some damaged files: not a missing entry, nor another version
    message = str(checkpoints._read_error(path, KeyError(237)))
    assert message.endswith('(truncated or not a checkpoint?)') and 'version' not in message


@pytest.mark.parametrize('damage,expected', [
    (lambda path: path.write_bytes(path.read_bytes()[:5000]), 'truncated or not a checkpoint'),
    (lambda path: path.write_bytes(b''), 'truncated or not a checkpoint'),
    (lambda path: torch.save(dict(meta=Hostile()), path), 'could run code; refused'),
    (lambda path: torch.save(dict(meta=[1, 2]), path), 'has no meta dict'),
    (lambda path: torch.save(dict(meta=dict(setting='Shift-3')), path), 'other arguments'),
])
@pytest.mark.slow
def test_resume_from_a_broken_last_checkpoint_is_one_line(trained, capsys, damage, expected):
    argv, path = trained
    os.remove(path)
    last = last_checkpoint_path(path.parent, 'tiny_shift_3')
    damage(last)
    message = run_error(train_mvtec.main, argv + ONE_EPOCH + ['--resume'], capsys)
    assert str(last) in message and expected in message


def nan_weights(path):
    """Make the model at ``path`` output NaN."""
    checkpoint = torch.load(path, weights_only=True)
    checkpoint['model'] = {k: v.float().fill_(math.nan) if v.is_floating_point() else v
                           for k, v in checkpoint['model'].items()}
    torch.save(checkpoint, path)


@pytest.mark.slow
def test_mvtec_evaluation_fails_row_by_row_and_writes_everything_else(tmp_path, capsys):
    data, models, out = tmp_path / 'data', tmp_path / 'models', tmp_path / 'out'
    make_mvtec_category(data, 'fine', n_train=1)
    make_mvtec_category(data, 'normal_only', n_train=1, defects={})
    make_mvtec_category(data, 'colour', n_train=1, channels=3)
    save_checkpoint(models, 'Shift-1', 'fine', 'texture', seed=1)
    save_checkpoint(models, 'Shift-1', 'normal_only', 'texture', seed=1)
    save_checkpoint(models, 'Shift-1', 'colour', 'texture', seed=1)  # a grey model
    nan_weights(save_checkpoint(models, 'Shift-2', 'fine', 'texture', seed=2))
    broken = save_checkpoint(models, 'FPI-1', 'fine', 'texture', seed=1)
    broken.write_bytes(broken.read_bytes()[:1000])
    with pytest.raises(SystemExit) as exit_info:
        mvtec_tasks.main(['-m', str(models), '-d', str(data), '-o', str(out), '--no-figures',
                          '--device', 'cpu'])
    assert exit_info.value.code == 1
    results = pd.read_csv(out / 'results.csv').set_index(['category', 'setting', 'seed'])
    assert len(results) == 5 and (out / 'tables' / 'image_auroc_mean.md').is_file()
    assert results.loc[('fine', 'Shift', 1), 'image_auroc_mean'] > 0
    assert pd.isna(results.loc[('fine', 'Shift', 1), 'error'])
    reasons = {key: results.loc[key, 'error'] for key in [
        ('normal_only', 'Shift', 1), ('colour', 'Shift', 1), ('fine', 'Shift', 2), ('fine', 'FPI', 1)]}
    assert 'both classes' in reasons[('normal_only', 'Shift', 1)]
    assert '1-channel images' in reasons[('colour', 'Shift', 1)]
    assert 'NaN' in reasons[('fine', 'Shift', 2)]
    assert f'cannot read checkpoint {broken}' in reasons[('fine', 'FPI', 1)]
    assert all(math.isnan(results.loc[key, 'image_auroc_mean']) for key in reasons)
    last = capsys.readouterr().err.strip().splitlines()[-5:]
    assert last[0].startswith('error: 4 of 5 results failed')
    assert all(line.startswith('failed: ') for line in last[1:])
    assert any(str(broken) in line and 'cannot read checkpoint' in line for line in last)


@pytest.mark.slow
def test_chest_xray_evaluation_fails_row_by_row(tmp_path, capsys):
    model_dir, data_dir, normal, anomalous, _ = make_chest_test_set(tmp_path)
    nan_weights(next(model_dir.rglob('final_chest_xray_shift_2.pt')))
    out = tmp_path / 'out'
    with pytest.raises(SystemExit) as exit_info:
        chest_xray_tasks.main(['-m', str(model_dir), '-d', str(data_dir), '-o', str(out),
                               '-l', str(normal), str(anomalous), '--no-figures', '--device', 'cpu'])
    assert exit_info.value.code == 1
    results = pd.read_csv(out / 'results.csv').set_index('seed')
    assert results.loc[1, 'image_auroc_mean'] >= 0 and 'NaN' in results.loc[2, 'error']
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith('failed: anomalous Shift seed 2')


@pytest.mark.slow
def test_evaluation_names_a_missing_mask_and_says_why_pixel_metrics_are_undefined(tmp_path,
                                                                                  capsys):
    data, models = tmp_path / 'data', tmp_path / 'models'
    make_mvtec_category(data, 'unmasked', n_train=1, with_masks=False)
    category = make_mvtec_category(data, 'blank', n_train=1)
    for mask in (category / 'ground_truth' / 'crack').iterdir():
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(mask)
    for name in ('unmasked', 'blank'):
        save_checkpoint(models, 'Shift-1', name, 'texture', seed=1)
    records = {r['category']: r for r in mvtec_tasks.evaluate_checkpoints(models, data)}
    assert 'no mask for the defect image' in records['unmasked']['error']
    assert 'unmasked/test/crack/000.png' in records['unmasked']['error']
    assert records['blank']['undefined'] == ('pixel metrics: the masks of the defect images mark '
                                             'no defect pixel')
    assert math.isnan(records['blank']['pixel_auroc']) and records['blank']['image_auroc_mean'] >= 0
    out = tmp_path / 'out'
    mvtec_tasks.main(['-m', str(models), '-d', str(data), '-o', str(out), '--no-figures',
                      '--allow-missing-masks', '--device', 'cpu'])
    err = capsys.readouterr().err
    assert 'warning: unmasked: 3 of 3 defect images have no mask' in err
    assert 'note: unmasked: pixel metrics: no defect image has a mask' in err
    assert 'note: blank: pixel metrics: the masks of the defect images mark no defect pixel' in err
    assert 'undefined' in pd.read_csv(out / 'results.csv').columns


class PooledBatchNormNet(torch.nn.Module):
    """Batch norm over 1 x 1 features, as NSA's encoder has at 32-pixel crops."""

    def __init__(self):
        super().__init__()
        self.config = {}
        self.layers = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1),
                                          torch.nn.AdaptiveAvgPool2d(1), torch.nn.BatchNorm2d(4),
                                          torch.nn.Conv2d(4, 1, 1))

    def logits(self, x):
        return self.layers(x).expand(-1, -1, *x.shape[-2:])

    def forward(self, x):
        return torch.sigmoid(self.logits(x))


@pytest.mark.slow
def test_a_last_batch_of_one_image_is_dropped_so_batch_norm_trains_and_resumes(tmp_path):
    config = TrainConfig(epochs=3, batch_size=4, figures=False, progress=False)
    with pytest.raises(KeyboardInterrupt):  # interrupted after one epoch of 5 images
        train(PooledBatchNormNet(), CrashAtEpoch(1, n=5), config, tmp_path, 'toy')
    meta = train(PooledBatchNormNet(), SquaresDataset(n=5), config, tmp_path, 'toy', resume=True)
    assert len(meta['epoch_losses']) == 3
    sizes = [len(batch) for batch in make_loader(SquaresDataset(n=5), config, torch.device('cpu')).batch_sampler]
    assert sizes == [4] * 3  # the fifth image of each epoch dropped
    sizes = [len(batch) for batch in make_loader(SquaresDataset(n=6), config, torch.device('cpu')).batch_sampler]
    assert sizes == [4, 2] * 3  # 4 + 2 kept


def test_every_rank_drops_its_last_batch_of_one_together():
    """10 images, batches of 8 over two processes (4 each): each rank's 5 keys end in a batch of
    one, which batch norm (per process on the CPU) cannot train; one process has a last batch of 2."""
    from experiments.training import EpochBatchSampler
    ranks = [list(EpochBatchSampler(10, 4, seed=0, epochs=2, rank=rank, world_size=2))
             for rank in (0, 1)]
    assert [[len(batch) for batch in batches] for batches in ranks] == [[4, 4], [4, 4]]
    for epoch in (0, 1):  # the ranks' keys of an epoch are distinct
        keys = [key for batches in ranks for batch in batches for key in batch if key[0] == epoch]
        assert len(set(keys)) == 8
    # synchronised batch norm (CUDA) sees the ranks' batches together: nothing is dropped
    synced = EpochBatchSampler(10, 4, seed=0, epochs=1, rank=0, world_size=2, per_process_norm=False)
    assert [len(batch) for batch in synced] == [4, 1]
    assert [len(b) for b in EpochBatchSampler(9, 4, seed=0, epochs=1, per_process_norm=False)] == [4, 4]


@pytest.mark.parametrize('argv,expected', [
    (['--num-patches', '1000000'], '--num-patches: num_patches must be an integer from 1 to 32'),
    (['--logistic', '0', '3'], '--logistic: intensity_logistic_params must be (k, x0) with k > 0'),
    (['--logistic', '-2', '3'], '--logistic'),
    (['--resize-bounds', '0.0001', '1000'], '--resize-bounds: resize_bounds must be (low, high) '
                                            'with 0.1 <= low <= high <= 10'),
])
def test_absurd_generator_parameters_are_refused_before_anything_is_written(
        tiny_mvtec, tmp_path, capsys, argv, expected):
    root, _ = tiny_mvtec
    out = tmp_path / 'out'
    message = run_error(train_mvtec.main, ['-s', 'Shift-Intensity', '-d', str(root), '-o', str(out)]
                        + argv, capsys)
    assert expected in message
    assert not out.exists()


@pytest.mark.parametrize('key,argv,expected', [
    ('Shift', ['--search-epochs', '3'], '--search-epochs 3 applies to --recipe search only'),
    ('Shift', ['--no-figures', '--figure-every', '1'], '--figure-every 1 with --no-figures'),
])
def test_options_of_the_loop_that_would_be_ignored_are_refused(tiny_mvtec, tmp_path, capsys, key, argv, expected):
    root, _ = tiny_mvtec
    out = tmp_path / 'out'
    message = run_error(train_mvtec.main, ['-s', key, '-d', str(root), '-o', str(out)] + argv, capsys)
    assert expected in message
    assert not out.exists()


@pytest.mark.parametrize('key,argv,expected', [
    ('Shift', ['--logistic', '1', '3'], '--logistic does not apply to Shift, whose task does not use it: ignored'),
    ('FPI', ['--gamma', '2', '0.03', '0.05'], '--gamma does not apply to FPI'),
    ('FPI', ['--resize-bounds', '0.5', '2'], '--resize-bounds does not apply to FPI'),
    ('FPI-Poisson', ['--clip-at-border'], '--clip-at-border does not apply to FPI-Poisson'),
    ('CutPaste', ['--paste-fraction', '0.5', '1'], '--paste-fraction does not apply to CutPaste'),
    ('Shift', ['--single-patch', '--num-patches', '8'], '--num-patches with --single-patch: one patch'),
    ('Shift', ['--no-mask', '--background', '0', '20'], "--no-mask turns off the object mask that --background sets: "
     "ignored for training (where a validation set is held out, its synthetic defects still lie on the object that "
     "--background finds)"),
    ('Shift', ['--min-object-pct', '0.5'], "--min-object-pct applies to an object mask, and 'tiny' has no background"),
    ('CutPaste-3way', ['--num-patches', '3'], '--num-patches does not apply to CutPaste-3way'),
    ('CutPaste-3way', ['--normal-fraction', '0.5'], '--normal-fraction does not apply to CutPaste-3way'),
    ('CutPaste-3way', ['--ellipse'], "--ellipse does not apply to CutPaste-3way, whose patches are CutPaste's"),
    ('Shift-Intensity', ['--cutpaste-patch-gen', '--width-bounds', '0.1', '0.2', '0.1', '0.2'],
     '--width-bounds does not apply to Shift-Intensity with --cutpaste-patch-gen'),
    ('Shift-Intensity', ['--cutpaste-patch-gen', '--gamma', '2', '0.03', '0.05'], '--gamma does not apply'),
    ('Shift-Intensity', ['--cutpaste-patch-gen', '--background', '0', '20'], '--background does not apply'),
])
def test_options_the_task_ignores_are_named_in_a_warning(tiny_mvtec, tmp_path, capsys, key, argv, expected):
    """Warnings, not errors: a run trained with such an option by an earlier version is resumed
    with the same command."""
    root, _ = tiny_mvtec
    capsys.readouterr()
    train_mvtec.plan(train_mvtec.parse_args(['-s', key, '-d', str(root), '-o', str(tmp_path / 'out')] + argv))
    warnings_printed = [line for line in capsys.readouterr().err.splitlines() if 'warning' in line]
    assert len(warnings_printed) == 1 and warnings_printed[0].startswith('train_mvtec.py: warning: ')
    assert expected in warnings_printed[0]
    capsys.readouterr()
    train_mvtec.plan(train_mvtec.parse_args(['-s', key, '-d', str(root), '-o', str(tmp_path / 'out')]))
    assert 'warning' not in capsys.readouterr().err
    train_mvtec.plan(train_mvtec.parse_args(['-s', 'FPI', '-d', str(root), '-o', str(tmp_path / 'out'),
                                             '--no-clip-at-border']))  # what FPI does anyway
    assert 'warning' not in capsys.readouterr().err


@pytest.mark.parametrize('recipe', ['table', 'auto'])
def test_a_background_that_leaves_no_object_pixel_is_an_error(tiny_mvtec, tmp_path, capsys,
                                                              monkeypatch, recipe):
    """Named with the category and where the background came from, before calibration (which
    would otherwise blame the images for changing nothing)."""
    root, name = tiny_mvtec
    argv = ['-s', 'Shift', '-d', str(root), '-o', str(tmp_path / 'out'), '--recipe', recipe]
    message = run_error(train_mvtec.main, argv + ['--background', '128', '300'], capsys)
    assert f"category {name!r}, --background: " in message
    assert 'leaves no object pixel in 6 of 6 images' in message and f'{name}/train/good/' in message
    assert not list((tmp_path / 'out').rglob('*.pt'))
    monkeypatch.setitem(settings.CATEGORY_PARAMS, name, dict(background=[(64, 64), (192, 64)]))
    message = run_error(train_mvtec.main, argv, capsys)
    assert f"category {name!r}, the background of its entry in CATEGORY_PARAMS" in message
    assert 'leaves no object pixel in 6 of 6 images' in message
    images = [np.full((64, 64, 1), 100, np.uint8), np.full((64, 64, 1), 200, np.uint8)]
    check_object_pixels(images, (0, 20), ['a.png', 'b.png'])  # both are objects
    with pytest.raises(ValueError, match=r'in 1 of 2 images, e.g. a.png'):
        check_object_pixels(images, (100, 20), ['a.png', 'b.png'])


@pytest.mark.parametrize('from_flag', [True, False])
def test_a_background_that_leaves_no_object_pixel_in_a_held_out_image_is_an_error(tmp_path, capsys,
                                                                                  monkeypatch, from_flag):
    """Held-out images are training images too: the same error, before anything is calibrated."""
    root = tmp_path / 'data'
    make_mvtec_category(root, 'plates', n_train=12, size=64)
    args = train_mvtec.parse_args(['-s', 'Shift', '-d', str(root), '-o', str(tmp_path / 'out'), '--select', 'best'])
    [held_out] = train_mvtec.held_out_images(args, root, 'plates', 'auto')[2]
    blank = sorted((root / 'plates' / 'train' / 'good').iterdir())[held_out]
    Image.fromarray(np.full((64, 64), 250, np.uint8)).save(blank)
    argv = ['-s', 'Shift', '-d', str(root), '-o', str(tmp_path / 'out'), '--select', 'best', '--epochs', '1',
            '--res-scale', '0.5', '--workers', '0']
    if from_flag:
        argv += ['--background', '250', '30']
    else:
        monkeypatch.setitem(settings.CATEGORY_PARAMS, 'plates', dict(background=(250, 30)))
    message = run_error(train_mvtec.main, argv, capsys)
    source = '--background' if from_flag else 'the background of its entry in CATEGORY_PARAMS'
    assert message.startswith(f"train_mvtec.py: error: category 'plates', {source}")
    assert f'held-out validation image {blank}: background (250' in message
    assert 'recipe auto' not in capsys.readouterr().out  # found before the recipe is calibrated
    assert not list((tmp_path / 'out').rglob('*.pt'))


def test_one_training_image_is_said_or_refused_where_the_task_needs_another(tmp_path, capsys):
    root = tmp_path / 'data'
    make_mvtec_category(root, 'one', n_train=1, size=64)
    make_mvtec_category(root, 'ten', n_train=10, size=64)
    for key in ('Shift', 'FPI', 'CutPaste-3way'):
        args = train_mvtec.parse_args(['-s', key, '-d', str(root), '-o', str(tmp_path / 'out'), '--recipe', 'table',
                                       '--res-scale', '0.5'])
        setting, _, _, _ = train_mvtec.plan(args)
        if key == 'Shift':  # patches from the image itself, shifted and resized: said
            train_mvtec.prepare_run(args, setting, root, 'one')
            assert ("one: note: one training image: its patches come from the image itself, where Shift takes "
                    "them from another image") in capsys.readouterr().out
        elif key == 'FPI':  # FPI's patches stay in place: nothing would change
            with pytest.raises(ValueError, match='one: one training image: its patches would come from itself'):
                train_mvtec.prepare_run(args, setting, root, 'one')
        else:  # a classifier is scored by a one-class model of the normal images' features: not of one
            with pytest.raises(ValueError, match=r"'one': one training image: CutPaste-3way is scored by a one-class "
                                                 r"model .* needs two or more"):
                train_mvtec.prepare_run(args, setting, root, 'one')
    # a validation set that leaves one image to train on is refused by its option
    args = train_mvtec.parse_args(['-s', 'Shift', '-d', str(root), '-o', str(tmp_path / 'out'), '--recipe', 'table',
                                   '--val-fraction', '0.9'])
    setting, _, _, _ = train_mvtec.plan(args)
    with pytest.raises(ValueError, match="--val-fraction 0.9 holds out 9 of the 10 training images of 'ten' and "
                                         "leaves 1 to train on; hold out fewer"):
        train_mvtec.prepare_run(args, setting, root, 'ten')
    # a validation set of fewer images than defect kinds is said to be coarse
    args = train_mvtec.parse_args(['-s', 'Shift', '-d', str(root), '-o', str(tmp_path / 'out'), '--recipe', 'table',
                                   '--val-fraction', '0.2', '--res-scale', '0.5'])
    capsys.readouterr()
    train_mvtec.prepare_run(args, setting, root, 'ten')
    assert ("ten: note: the validation set holds 2 held-out images, with defects of 2 of the 5 kinds "
            "(scar, blob): its score is coarse (its image AUROC, a third of it, compares 2 normal with 2 "
            "defective images), and even distant scores may be ties") in capsys.readouterr().out
    args.val_fraction = 0.1
    train_mvtec.prepare_run(args, setting, root, 'ten')
    assert ("ten: note: the validation set holds 1 held-out image, with defects of 1 of the 5 kinds "
            "(scar): its score is coarse (its image AUROC, a third of it, compares 1 normal with 1 defective "
            "image, and is 0, 0.5 or 1), and even distant scores may be ties") in capsys.readouterr().out
    params = train_mvtec.prepare_run(args, setting, root, 'ten')[3]['category_params']
    assert 'the validation set holds 1 held-out image' in capsys.readouterr().out
    train_mvtec.prepare_run(args, setting, root, 'ten', params)  # a --recipe search candidate: noted once, before
    assert 'the validation set holds' not in capsys.readouterr().out


@pytest.mark.parametrize('background,from_flag,noted', [
    ((0.1, 0.05), True, True),     # a brightness on the scale 0-1: no grey level is background
    ((400, 100), False, True),     # above 255 by more than its threshold
    ((0, 20), True, False),        # the dark corner of the images is background
])
def test_a_background_that_masks_nothing_is_noted(capsys, background, from_flag, noted):
    images = [np.full((32, 32, 1), 120, np.uint8) for _ in range(3)]
    images[1][:16, :16] = 5
    dataset = SimpleNamespace(images=images, paths=['a.png', 'b.png', 'c.png'])
    train_mvtec.check_background('plates', background, from_flag, dataset)
    out = capsys.readouterr().out
    assert ('marks no part of any training image as background' in out) == noted
    if noted:
        assert out.startswith("train_mvtec.py: plates: note: ")
        assert ('--background' if from_flag else 'CATEGORY_PARAMS') in out


def test_a_single_image_category_at_small_crops_stops_with_a_one_line_error(tmp_path, capsys):
    make_mvtec_category(tmp_path / 'data', 'one', n_train=1, size=256)
    out = tmp_path / 'out'
    message = run_error(train_mvtec.main, ['-s', 'Shift', '-d', str(tmp_path / 'data'), '-o', str(out),
                                           '--recipe', 'table', '--epochs', '1', '--res-scale', '0.125',
                                           '--workers', '0', '--no-figures'], capsys)
    assert "run 'one_shift': a batch of one image cannot be trained" in message
    assert '--batch-size' in message and '--res-scale' in message
    assert not list(out.rglob('*.pt'))
    # the chest X-ray script names its own option
    (tmp_path / 'one.txt').write_text('one/train/good/000.png\n')
    message = run_error(train_chest_xray.main, ['-s', 'Shift', '-d', str(tmp_path / 'data'), '-l',
                                                str(tmp_path / 'one.txt'), '-o', str(out), '--res', '64',
                                                '--epochs', '1', '--workers', '0', '--no-figures'], capsys)
    assert 'a batch of one image cannot be trained' in message and 'larger crops (--res)' in message


@pytest.mark.slow
def test_a_changed_weight_fails_the_checksum_on_load(tmp_path):
    model = resnet18_enc_dec(in_channels=1)
    path = tmp_path / 'final_toy.pt'
    torch.save(model_checkpoint(model, dict(model_config=model.config)), path)
    checkpoint = torch.load(path, weights_only=True)
    assert len(checkpoint['meta']['weights_sha256']) == 64
    load_model(path)  # intact
    checkpoint['model']['encoder.conv1.weight'].view(torch.int32)[0, 0, 0, 0] ^= 1  # one flipped bit
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=f'checkpoint {path}: its weights do not match the checksum'):
        load_model(path)


@pytest.mark.slow
def test_training_writes_the_checksum_of_the_final_weights(tmp_path):
    config = TrainConfig(epochs=1, batch_size=4, figures=False, progress=False)
    train(TinyNet(), SquaresDataset(n=4), config, tmp_path, 'toy')
    checkpoint = torch.load(final_model_path(tmp_path, 'toy'), weights_only=True)
    assert checkpoint['meta']['weights_sha256'] == weights_checksum(checkpoint['model'])


@pytest.mark.slow
def test_the_temporary_file_of_a_killed_save_is_removed_on_the_next_run(trained, capsys):
    argv, path = trained
    stale = path.parent / f'.{path.name}.k1ll3d.tmp'
    stale.write_bytes(b'half a checkpoint')
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as patch:  # another process of a torchrun launch leaves it to the first
        as_second_torchrun_process(patch)
        assert train_mvtec.main(argv + ONE_EPOCH + ['--resume']) == 0
    assert stale.exists()
    assert train_mvtec.main(argv + ONE_EPOCH + ['--resume']) == 0
    assert not stale.exists() and f'removed {stale}' in capsys.readouterr().out
    assert path.is_file()


def test_12_bit_data_in_a_16_bit_png_keeps_its_grey_levels(tmp_path):
    ramp = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)  # 12-bit data
    Image.fromarray(ramp).save(tmp_path / 'ramp.png')
    decoded = decode(tmp_path / 'ramp.png')
    assert decoded.dtype == np.uint8 and decoded.max() == 255 and len(np.unique(decoded)) == 256
    full = (ramp.astype(np.uint32) * 16).astype(np.uint16)  # 16-bit data: the full range
    Image.fromarray(full).save(tmp_path / 'full.png')
    assert decode(tmp_path / 'full.png').max() == 255


@pytest.mark.parametrize('suffix,alpha', [('.png', False), ('.tif', False), ('.png', True)])
def test_colour_images_of_16_bits_a_channel_keep_their_low_bits(tmp_path, suffix, alpha):
    rgb = np.zeros((8, 8, 3 + alpha), np.uint16)
    rgb[..., :3] = (2000, 4000, 100)  # 12-bit data, red, green, blue
    rgb[..., 3:] = 65535
    path = tmp_path / f'rgb16{suffix}'
    assert cv2.imwrite(str(path), rgb[..., [2, 1, 0, 3][:3 + alpha]])  # OpenCV writes BGR(A)
    values = decode_values(path)
    assert values.dtype == np.uint16 and values.shape == (8, 8, 3)
    np.testing.assert_array_equal(values[0, 0], (2000, 4000, 100))
    np.testing.assert_array_equal(read_image(path)[0, 0], np.round(np.array((2000, 4000, 100)) * 255 / 4095))
    truncated = tmp_path / f'cut{suffix}'
    truncated.write_bytes(path.read_bytes()[:60])
    with pytest.raises(ValueError, match=f'cannot read image {truncated}'):
        decode_values(truncated)


@pytest.mark.parametrize('magic,maxval', [(b'P6', 65535), (b'P5', 4095), (b'P2', 4095), (b'P3', 65535)])
def test_pgm_and_ppm_files_of_more_than_8_bits_keep_their_values(tmp_path, magic, maxval):
    """PGM/PPM of a maxval above 255, binary and plain: their values as stored, as a 16-bit PNG of the
    same data gives them (Pillow reads 16-bit PPM as 8-bit, and scales a PGM of maxval 4095 to 65535)."""
    data = np.array([[0, 1000, 2000, 3000, 4095]], np.uint16)  # 12-bit data
    colour = magic in (b'P3', b'P6')
    values = np.repeat(data[..., None], 3, axis=2) * np.array([1, 2, 3], np.uint16) // 3 if colour else data
    header = magic + b'\n# a comment\n5 1\n' + str(maxval).encode() + b'\n'
    body = (values.astype('>u2').tobytes() if magic in (b'P5', b'P6')
            else ' '.join(map(str, values.ravel().tolist())).encode() + b'\n')
    path = tmp_path / ('deep.ppm' if colour else 'deep.pgm')
    path.write_bytes(header + body)
    png = tmp_path / 'deep.png'
    assert cv2.imwrite(str(png), values[..., ::-1] if colour else values)
    np.testing.assert_array_equal(decode_values(path), values)
    assert is_high_depth_file(path) and high_depth_maximum(path) == values.max()
    for bits in (None, 12, (1000, 3000)):
        np.testing.assert_array_equal(read_image(path, bits), read_image(png, bits))
    truncated = tmp_path / ('cut.ppm' if colour else 'cut.pgm')
    truncated.write_bytes(header + body[:len(body) // 2])
    with pytest.raises(ValueError, match=f'cannot read image {truncated}: truncated'):
        decode_values(truncated)
    eight_bit = tmp_path / 'eight.pgm'
    eight_bit.write_bytes(b'P5\n5 1\n255\n' + bytes([0, 10, 20, 30, 40]))
    assert not is_high_depth_file(eight_bit) and decode_values(eight_bit).tolist() == [[0, 10, 20, 30, 40]]


def test_deeper_tiffs_whose_zero_is_white_are_inverted_and_planar_ones_refused(tmp_path):
    tifffile = pytest.importorskip('tifffile')
    ramp = np.tile(np.arange(0, 256, 32, dtype=np.uint16) * 257, (4, 1))
    tifffile.imwrite(tmp_path / 'white16.tif', ramp, photometric='miniswhite')
    tifffile.imwrite(tmp_path / 'black16.tif', ramp, photometric='minisblack')
    tifffile.imwrite(tmp_path / 'white8.tif', (ramp // 257).astype(np.uint8), photometric='miniswhite')
    np.testing.assert_array_equal(decode_values(tmp_path / 'white16.tif'), 65535 - ramp)  # as displayed
    np.testing.assert_array_equal(decode_values(tmp_path / 'black16.tif'), ramp)
    np.testing.assert_array_equal(read_image(tmp_path / 'white16.tif')[..., 0],
                                  read_image(tmp_path / 'white8.tif')[..., 0])  # as Pillow reads 8 bits
    planar = np.stack([ramp, ramp // 2, ramp // 4])  # channels first: stored plane by plane
    tifffile.imwrite(tmp_path / 'planar16.tif', planar, photometric='rgb', planarconfig='separate')
    with pytest.raises(ValueError, match=f'^cannot read image {tmp_path / "planar16.tif"}: a TIFF .*plane by plane'):
        read_image(tmp_path / 'planar16.tif')


def test_held_out_images_count_for_the_training_sets_bit_depth_and_channels(tmp_path):
    """A run that holds out validation images prepares its images as one that does not (the
    search's candidates and its final run, trained on all images, alike)."""
    from self_sup_data.mvtec import SelfSupMVTecDataset
    make_mvtec_category(tmp_path, 'deep', n_train=6)
    for path in (tmp_path / 'deep' / 'train' / 'good').glob('*.png'):  # 12-bit data, 16-bit files
        values = np.asarray(Image.open(path).convert('L')).astype(np.uint16) * 16
        Image.fromarray(values).save(path)
    loud = tmp_path / 'deep' / 'train' / 'good' / '003.png'  # the one image above 4095: 14-bit data
    values = np.asarray(Image.open(loud)).copy()
    values[0, 0] = 5000
    Image.fromarray(values).save(loud)
    every, held = (SelfSupMVTecDataset(tmp_path, 'deep', res_scale=0.25, exclude=exclude) for exclude in ([], [3]))
    assert every.bit_depth == held.bit_depth == 14 and len(held) == 5
    np.testing.assert_array_equal(held.images[0], every.images[0])
    make_mvtec_category(tmp_path, 'mixed', n_train=6)  # grey, but one colour image
    colour = tmp_path / 'mixed' / 'train' / 'good' / '002.png'
    tinted = np.asarray(Image.open(colour).convert('RGB')).copy()
    tinted[:, :, 0] //= 2
    Image.fromarray(tinted).save(colour)
    every, held = (SelfSupMVTecDataset(tmp_path, 'mixed', res_scale=0.25, exclude=exclude) for exclude in ([], [2]))
    assert every.in_channels == held.in_channels == 3


def test_16_bit_images_are_scaled_by_the_bit_depth_of_the_training_set(tmp_path):
    from self_sup_data.mvtec import SET_BIT_DEPTH, load_images
    from experiments.torch_model import model_spec
    for name, value in (('bright', 60000), ('dark', 3000)):  # one exposure of a 16-bit camera is dark
        Image.fromarray(np.full((16, 16), value, np.uint16)).save(tmp_path / f'{name}.png')
    assert decode(tmp_path / 'dark.png').max() == round(3000 * 255 / 4095)  # alone: read as 12-bit data
    both = [tmp_path / 'bright.png', tmp_path / 'dark.png']
    images, _, bits, _ = load_images(both, 8, bit_depth=SET_BIT_DEPTH)  # a training set
    assert bits == 16 and images[1].max() == round(3000 * 255 / 65535)  # as dark as it is
    images, _, bits, _ = load_images(both, 8)  # image by image (a model trained on 8-bit images)
    assert bits is None and images[1].max() == round(3000 * 255 / 4095)
    images, _, bits, _ = load_images([tmp_path / 'dark.png'], 8, bit_depth=16)  # a 16-bit model's test image
    assert bits == 16 and images[0].max() == round(3000 * 255 / 65535)
    assert load_images([tmp_path / 'dark.png'], 8, bit_depth=SET_BIT_DEPTH)[2] == 12
    assert load_images([tmp_path / 'dark.png'], 8, bit_depth=16)[2] == 16
    Image.fromarray(np.full((16, 16), 90, np.uint8)).save(tmp_path / 'eight.png')
    assert load_images([tmp_path / 'eight.png'], 8, bit_depth=SET_BIT_DEPTH)[2] is None

    # training stores the depth; the evaluation and new images use it
    data = tmp_path / 'data'
    make_mvtec_category(data, 'tiny', n_train=4)
    for path in (data / 'tiny').rglob('*.png'):
        if 'ground_truth' not in path.parts:
            values = np.asarray(Image.open(path).convert('L')).astype(np.uint16) * 257  # full 16-bit
            Image.fromarray(values).save(path)
    args = train_mvtec.parse_args(['-s', 'Shift', '-d', str(data), '-o', str(tmp_path / 'out'), '-n', 'tiny',
                                   '--recipe', 'table', '--res-scale', '0.25'])
    setting, _, _, _ = train_mvtec.plan(args)
    dataset, model, _, meta, _ = train_mvtec.prepare_run(args, setting, data, 'tiny')
    assert meta['bit_depth'] == dataset.bit_depth == 16
    test = mvtec_tasks.load_test_set(data, meta)
    assert test.bit_depth == 16
    assert model_spec({**meta, 'model_config': dict(in_channels=1)})['bit_depth'] == 16
    from experiments.detector import Detector
    assert Detector(None, dict(bit_depth=16), 'model').read(tmp_path / 'dark.png').max() == 12
    assert Detector(None, dict(bit_depth=None), 'model').read(tmp_path / 'dark.png').max() == 187


def test_float_images_and_decompression_bombs_are_errors_naming_the_file(tmp_path, monkeypatch):
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / 'float.tif')
    with pytest.raises(ValueError, match=r'cannot read image .*float.tif: F images .* not supported'):
        decode(tmp_path / 'float.tif')
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / 'large.png')
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 100)  # errors above twice the limit
    with pytest.raises(ValueError, match=r'cannot read image .*large.png: .*MAX_IMAGE_PIXELS'):
        decode(tmp_path / 'large.png')


def test_a_file_whose_name_holds_glob_characters_is_that_file(tmp_path):
    for name in ('scan[1].png', 'scan1.png'):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / name)
    assert image_files([tmp_path / 'scan[1].png']) == [tmp_path / 'scan[1].png']
    assert image_files([str(tmp_path / 'scan[1].png')]) == [tmp_path / 'scan[1].png']
    assert image_files([str(tmp_path / 'scan[0-9].png')]) == [tmp_path / 'scan1.png']


def test_image_inputs_recursive_patterns_and_paths_that_do_not_exist(tmp_path):
    for name in ('top.png', 'sub/one.png', 'sub/deep/two.png'):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / name)
    assert image_files([tmp_path]) == [tmp_path / 'top.png']  # a folder: not its subfolders
    assert image_files([str(tmp_path / '**' / '*.png')]) == [
        tmp_path / 'sub' / 'deep' / 'two.png', tmp_path / 'sub' / 'one.png', tmp_path / 'top.png']
    with pytest.raises(ValueError, match=f'input {tmp_path / "tpo.png"} does not exist'):
        image_files([tmp_path / 'top.png', tmp_path / 'tpo.png'])
    with pytest.warns(UserWarning, match=r"^the inputs name 3 files, 1 of them again \(a folder and a pattern of "
                                         r"it\?\): each file is read once, 2 in all$"):
        # a file named again, also by another spelling of its path: read once, where first named
        assert image_files([str(tmp_path / 'sub' / '*.png'), tmp_path, tmp_path / 'sub' / '..' / 'sub' / 'one.png']) \
            == [tmp_path / 'sub' / 'one.png', tmp_path / 'top.png']
    (tmp_path / 'sub' / 'link.png').symlink_to(tmp_path / 'sub' / 'one.png')  # a link is a file of its own
    assert image_files([tmp_path / 'sub']) == [tmp_path / 'sub' / 'link.png', tmp_path / 'sub' / 'one.png']
    (tmp_path / 'top.png').unlink()
    with pytest.raises(ValueError, match='subfolders are not read'):
        image_files([tmp_path])  # holds only a folder


def seed_meta(seed, recipe='table', epochs=100, num_patches=4, category='tiles'):
    """The meta of a run of Shift-Intensity-M with ``seed``; a calibrated recipe's category
    parameters differ by seed."""
    calibrated = recipe != 'table'
    params = dict(num_patches=num_patches, intensity_logistic_params=(
        (0.5 + seed / 10, 3.0) if calibrated else (1, 3)))
    key = 'Shift-Intensity-M' + (f'-{seed}' if seed else '')
    return dict(setting=key, category=category, seed=seed, recipe=recipe, res_scale=0.5,
                category_params=params, self_sup_args=dict(params),
                calibration=dict(params=params) if calibrated else None,
                train_config=asdict(TrainConfig(epochs=epochs, seed=seed)),
                epoch_losses=[0.1 * seed], weights_sha256=str(seed))


@pytest.mark.parametrize('recipe', ['table', 'auto'])
def test_tables_warn_when_the_seeds_they_merge_were_trained_differently(recipe, recwarn):
    models = [(f'final_{seed}.pt', seed_meta(seed, recipe)) for seed in (0, 1, 2)]
    other_category = [('other.pt', seed_meta(1, recipe, epochs=30, category='plates'))]
    checkpoints.warn_unlike_seeds(models + other_category)
    assert not recwarn.list  # seeds, calibrations, losses and checksums differ by seed

    models[2] = ('final_2.pt', seed_meta(2, recipe, epochs=30))
    with pytest.warns(UserWarning, match=r"tiles Shift-Intensity-M: the seeds merged in the tables "
                                         r"were trained differently \(against final_0.pt: "
                                         r"final_2.pt: epochs: 100 vs 30\)"):
        checkpoints.warn_unlike_seeds(models)


def test_two_models_of_one_seed_are_refused_before_any_evaluation():
    models = [(f'run/final_{seed}.pt', seed_meta(seed)) for seed in (0, 1)]
    checkpoints.check_one_model_per_seed(models + [('other.pt', seed_meta(1, category='plates'))])
    copy = ('backup/final_1.pt', seed_meta(1))  # a copy of the model folder inside it
    with pytest.raises(ValueError, match=r"two models of category 'tiles', setting 'Shift-Intensity-M', seed 1: "
                                         r"run/final_1.pt and backup/final_1.pt; keep one model per seed"):
        checkpoints.check_one_model_per_seed(models + [copy])
    # an unreadable checkpoint counts by its path's key: no seed there is the default seed, 0
    unreadable = ('backup/final_0.pt', dict(setting='Shift-Intensity-M', category='tiles', error='cannot read'))
    assert checkpoints.model_seed(unreadable[1]) == 0
    with pytest.raises(ValueError, match='seed 0: run/final_0.pt and backup/final_0.pt'):
        checkpoints.check_one_model_per_seed(models + [unreadable])


def test_seeds_differ_not_by_where_their_data_lay_nor_by_fields_an_earlier_version_lacks():
    moved, earlier = seed_meta(1), seed_meta(2)
    moved.update(data_dir='/mnt/elsewhere', layout=dict(format='mvtec'))
    for name in ('train_config', 'recipe', 'res_scale'):
        del earlier[name]
    assert checkpoints.seed_differences({**seed_meta(0), 'data_dir': '/data'}, moved) == []
    # a chest training list of the same names at another path (its names are compared by their digest)
    assert checkpoints.seed_differences({**seed_meta(0), 'normal_list': '/l1/norm_train.txt'},
                                        {**seed_meta(1), 'normal_list': '/l2/norm_train.txt'}) == []
    assert checkpoints.seed_differences(seed_meta(0), earlier) == []
    # --recipe search: each seed trains the epochs of the recipe it chose
    searched = [seed_meta(seed, 'search', epochs=epochs) for seed, epochs in ((0, 320), (1, 560))]
    searched[1]['category_params'] = {**searched[1]['category_params'], 'epochs': 560}
    assert checkpoints.seed_differences(*searched) == []
    assert checkpoints.seed_differences(seed_meta(0, epochs=320), seed_meta(1, epochs=560)) == [
        'epochs: 320 vs 560']
    # seeds trained by another number of processes (torchrun): a note, where both metas record it
    assert checkpoints.seed_differences({**seed_meta(0), 'world_size': 1}, {**seed_meta(1), 'world_size': 2}) == [
        'world_size: 1 vs 2']
    assert checkpoints.seed_differences({**seed_meta(0), 'world_size': 2}, {**seed_meta(1), 'world_size': 2}) == []
    assert checkpoints.seed_differences({**seed_meta(0), 'world_size': 2}, seed_meta(1)) == []


def test_calibrated_seeds_differ_by_the_generator_arguments_that_no_calibration_sets():
    single = seed_meta(1, 'auto')
    single['self_sup_args'] = {**single['self_sup_args'], 'shift': False}
    assert checkpoints.seed_differences(seed_meta(0, 'auto'), seed_meta(2, 'auto')) == []
    assert checkpoints.seed_differences(seed_meta(0, 'auto'), single) == [
        'self_sup_args.shift: absent vs False']


def test_calibrated_seeds_differ_by_the_parameters_their_command_lines_fixed():
    """A calibrated parameter set by a flag on one seed (or to other values) is another
    recipe, though the calibrated values themselves differ by seed."""
    fixed = [{**seed_meta(seed, 'auto'), 'param_overrides': overrides} for seed, overrides in
             ((0, dict(num_patches=2, background=(0, 20))), (1, dict(num_patches=12, background=(0, 20))),
              (2, dict(background=(0, 20))), (3, dict(num_patches=2, background=(0, 20))))]
    assert checkpoints.seed_differences(fixed[0], fixed[3]) == []
    assert checkpoints.seed_differences(fixed[0], fixed[1]) == ['param_overrides.num_patches: 2 vs 12']
    assert checkpoints.seed_differences(fixed[0], fixed[2]) == ['param_overrides.num_patches: 2 vs absent']
    assert checkpoints.seed_differences(fixed[0], seed_meta(4, 'auto')) == []  # an earlier version's
    # a table recipe compares the values the flags gave, not which flags gave them
    table = [{**seed_meta(seed), 'param_overrides': overrides}
             for seed, overrides in ((0, dict(num_patches=4)), (1, {}))]
    assert checkpoints.seed_differences(*table) == []


def test_the_epochs_between_validations_are_part_of_a_run():
    """--select best chooses among the validated epochs: another --val-every is another run, and
    so is a run without validation; a checkpoint of an earlier version without the field is not."""
    model, config = resnet18_enc_dec(in_channels=1), TrainConfig(epochs=4)

    class Every:
        def __init__(self, every):
            self.every = every
    one, two = (training.run_meta(model, config, dict(seed=0), Every(n)) for n in (1, 2))
    assert one['validation_every'] == 1
    assert training.run_differences(one, two) == ['validation_every: 1 vs 2']
    assert training.run_differences(one, training.run_meta(model, config, dict(seed=0))) == [
        'validation_every: 1 vs absent']
    earlier = {k: v for k, v in one.items() if k != 'validation_every'}
    assert training.run_differences(earlier, two) == []
    # the command line's category parameters say how values were chosen, not what is learnt
    assert training.run_differences({**one, 'param_overrides': dict(num_patches=4)}, one) == []
    # the training images' shapes describe the data, which its digests pin down, however they are rounded
    shapes = [dict(one, train_image_shape=dict(aspect=[aspect] * 2, long_side=[1600] * 2))
              for aspect in (1.4545, 1.45455)]
    assert training.run_differences(*shapes) == []
    # ... and so do their grey-level spans, which runs written before they were recorded lack
    assert training.run_differences(one, dict(one, train_image_span=[3, 200])) == []
    assert training.run_differences(dict(one, train_image_span=[4, 190]), dict(one, train_image_span=[3, 200])) == []
    # the folder format's test folders are not trained on; its normal folder is
    folder = dict(format='folder', normal='/n', abnormal=None, mask_dir=None, held_out_sha256='ab')
    tested = dict(one, layout=dict(folder, abnormal='/a', mask_dir='/m'))
    assert training.run_differences(dict(one, layout=folder), tested) == []
    assert training.run_differences(tested, dict(tested, layout=dict(folder, normal='/other'))) == [
        "layout.normal: '/n' vs '/other'"]
    # the averaging's learning rate is learnt with averaging only
    other_rate = dict(one, train_config=dict(one['train_config'], swa_lr=0.5))
    assert training.run_differences(one, other_rate) == []
    averaging = dict(one, train_config=dict(one['train_config'], swa_epochs=2))
    assert training.run_differences(averaging, dict(averaging, train_config=dict(
        averaging['train_config'], swa_lr=0.5))) == [f"swa_lr: {TrainConfig.swa_lr!r} vs 0.5"]
    # the validation set's fraction and seed change nothing where no image was held out (a category too
    # small: an earlier version stored the fraction asked for, this one 0)
    small = dict(one, held_out=0, validation_fraction=0.1, validation_seed=0)
    assert training.run_differences(small, dict(small, validation_fraction=0.0, validation_seed=3)) == []
    held = dict(small, held_out=2)
    assert training.run_differences(held, dict(held, validation_fraction=0.2)) == ['validation_fraction: 0.1 vs 0.2']
    # ... but the seed does where a --recipe search held out the images its candidates were chosen on,
    # whichever run is given first (one of older code records no search_budget)
    searched = dict(small, recipe_search={'auto': dict(score=0.5, params={})}, search_budget=dict(epochs=1))
    older = {k: v for k, v in searched.items() if k != 'search_budget'}
    other_seed = dict(searched, validation_seed=1)
    unsearched_other_seed = {k: v for k, v in other_seed.items() if k not in ('recipe_search', 'search_budget')}
    for first, second in ((searched, other_seed), (older, other_seed), (other_seed, older),
                          (searched, unsearched_other_seed), (unsearched_other_seed, searched)):
        assert f"validation_seed: {first['validation_seed']} vs {second['validation_seed']}" in (
            training.run_differences(first, second))
    assert training.run_differences(searched, dict(searched, validation_fraction=0.0)) == []


def test_a_table_recipe_changed_between_seeds_is_named():
    models = [('a.pt', seed_meta(0)), ('b.pt', seed_meta(1, num_patches=8))]
    with pytest.warns(UserWarning, match='category_params.num_patches: 4 vs 8'):
        checkpoints.warn_unlike_seeds(models)
    models = [('a.pt', seed_meta(0)), ('b.pt', seed_meta(1, recipe='auto'))]
    with pytest.warns(UserWarning, match="recipe: 'table' vs 'auto'"):
        checkpoints.warn_unlike_seeds(models)


def test_a_jpeg_is_read_turned_by_its_exif_orientation_as_viewers_show_it(tmp_path):
    from self_sup_data.images import displayed_file_size
    shown = np.zeros((20, 30, 3), np.uint8)
    shown[2:6, 20:28] = 250  # a defect in the top right corner, as the viewer shows it
    stored = np.ascontiguousarray(np.rot90(shown, 1))  # a camera's sideways pixels ...
    exif = Image.new('RGB', (1, 1)).getexif()
    exif[0x0112] = 6  # ... with the tag that turns them upright (90 degrees clockwise)
    Image.fromarray(stored).save(tmp_path / 'photo.jpg', exif=exif.tobytes(), quality=100)
    read = read_image(tmp_path / 'photo.jpg')
    assert read.shape[:2] == (20, 30) and read[2:6, 20:28].mean() > 200 and read[10:, :15].mean() < 20
    assert displayed_file_size(tmp_path / 'photo.jpg') == (30, 20)
    # the sizes as read, and a model's summary of its training images for predict.py
    from self_sup_data.images import image_shape_summary
    from self_sup_data.mvtec import load_images
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / 'square.png')
    sizes = load_images([tmp_path / 'photo.jpg', tmp_path / 'square.png'], 8).sizes
    assert sizes == [(30, 20), (20, 20)]
    assert image_shape_summary(sizes) == dict(aspect=[1.0, 1.5], long_side=[20, 30])
    # a mask drawn on the stored pixels: the error says that the image was turned
    from self_sup_data.images import turned_note
    from self_sup_data.mvtec import _load_item
    Image.fromarray(np.zeros((30, 20), np.uint8)).save(tmp_path / 'photo_mask.png')
    with pytest.raises(ValueError, match=r'photo_mask.png is 20x30 but its image .*photo.jpg is 30x20 \(turned '
                                         r'by its EXIF orientation 6, as viewers show it; stored 20x30\); they must '
                                         r'match'):
        _load_item(tmp_path / 'photo.jpg', tmp_path / 'photo_mask.png', 16, None)
    assert turned_note(tmp_path / 'photo_mask.png') == ''


@pytest.mark.parametrize('orientation', [3, 6])
def test_a_tiff_with_an_orientation_tag_is_refused_not_read_turned_or_scrambled(tmp_path, orientation):
    """Pillow decodes such TIFFs turned (3) or with their pixels scrambled (6), while a mask of
    another format stays as stored."""
    from self_sup_data.images import decode_mask_values
    tags = Image.new('L', (1, 1)).getexif()
    tags[0x0112] = orientation
    Image.fromarray(np.arange(24, dtype=np.uint8).reshape(4, 6)).save(tmp_path / 'scan.tif', exif=tags.tobytes())
    for read in (read_image, decode_mask_values):
        with pytest.raises(ValueError, match=rf'cannot read image .*scan.tif: a TIFF with orientation tag '
                                             rf'{orientation}, which Pillow decodes turned or mirrored'):
            read(tmp_path / 'scan.tif')
    tags[0x0112] = 0  # out of the standard's range, as some software writes it: read as stored
    Image.fromarray(np.arange(24, dtype=np.uint8).reshape(4, 6)).save(tmp_path / 'plain.tif', exif=tags.tobytes())
    assert read_image(tmp_path / 'plain.tif')[..., 0].tolist() == np.arange(24).reshape(4, 6).tolist()


def test_transparent_mask_pixels_are_no_defect(tmp_path):
    from self_sup_data.images import decode_mask_values
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = 255  # white under transparency, as an editor's layer may hold
    rgba[4:8, 4:8, 3] = 255  # the drawn defect: opaque
    Image.fromarray(rgba).save(tmp_path / 'layer.png')
    la = np.zeros((16, 16, 2), np.uint8)
    la[4:8, 4:8] = (200, 255)
    Image.fromarray(la, 'LA').save(tmp_path / 'strokes.png')
    keyed = np.zeros((16, 16), np.uint16)
    keyed[4:8, 4:8] = 65535
    keyed[0, :] = 1000  # a grey value marked transparent (the PNG's tRNS key): no defect
    Image.fromarray(keyed).save(tmp_path / 'keyed.png', transparency=1000)
    black = np.zeros((16, 16, 4), np.uint8)
    black[4:8, 4:8, 3] = 255  # black strokes on a transparent layer (an editor's default brush): the alpha
    Image.fromarray(black).save(tmp_path / 'black_layer.png')
    Image.fromarray(black[..., 2:], 'LA').save(tmp_path / 'black_strokes.png')
    for name in ('layer.png', 'strokes.png', 'keyed.png', 'black_layer.png', 'black_strokes.png'):
        assert (decode_mask_values(tmp_path / name) > 0).sum() == 16
    opaque_black = np.zeros((16, 16, 4), np.uint8)
    opaque_black[..., 3] = 255  # opaque everywhere and black: no defect
    Image.fromarray(opaque_black).save(tmp_path / 'no_defect.png')
    opaque_black[0, :2, 3] = 0  # black, a few pixels transparent: still no defect, not the alpha
    Image.fromarray(opaque_black).save(tmp_path / 'no_defect_with_holes.png')
    two_colours = black.copy()
    two_colours[:, 12:] = (255, 255, 255, 255)  # a drawn white defect beside opaque black: by colour
    Image.fromarray(two_colours).save(tmp_path / 'two_colours.png')
    for name in ('no_defect.png', 'no_defect_with_holes.png'):
        assert (decode_mask_values(tmp_path / name) > 0).sum() == 0
    # black strokes whose hidden pixels are white, resized with the colours blended: grey edges
    layer = np.full((32, 32, 4), 255, np.uint8)
    layer[..., 3] = 0
    disc = cv2.circle(np.zeros((32, 32), np.uint8), (16, 16), 6, 1, -1).astype(bool)
    layer[disc] = (0, 0, 0, 255)
    resized = cv2.resize(layer, (24, 24), interpolation=cv2.INTER_LINEAR)
    assert 0 < resized[..., 0][resized[..., 3] > 0].max() < 255  # grey edges
    cv2.imwrite(str(tmp_path / 'resized.png'), resized)
    assert ((decode_mask_values(tmp_path / 'resized.png') > 0) == (resized[..., 3] > 0)).all()
    assert (decode_mask_values(tmp_path / 'two_colours.png') > 0).sum() == 64


def test_transparent_image_pixels_are_read_over_black_as_displayed(tmp_path):
    """A cut-out's transparent pixels hide leftovers (here noise) that would be trained on and
    scored; they are read as black, half-transparent ones at half their value, opaque ones as they
    are, and an image opaque everywhere exactly as without its alpha channel."""
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    grey = colour[..., 0]
    alpha = np.full((12, 20), 255, np.uint8)
    alpha[:, :6], alpha[:, 6:8] = 0, 128
    Image.fromarray(np.dstack([colour, alpha]), 'RGBA').save(tmp_path / 'rgba.png')
    Image.fromarray(np.dstack([grey, alpha]), 'LA').save(tmp_path / 'la.png')
    Image.fromarray(np.dstack([colour, np.full_like(alpha, 255)]), 'RGBA').save(tmp_path / 'opaque.png')
    deep = np.dstack([colour.astype(np.uint16) * 257, alpha.astype(np.uint16) * 257])  # 16 bits a channel
    assert cv2.imwrite(str(tmp_path / 'rgba16.png'), deep[..., [2, 1, 0, 3]])
    keyed = grey.copy()
    keyed[:, :6] = 7
    Image.fromarray(keyed).save(tmp_path / 'keyed.png', transparency=7)  # a grey value keyed transparent
    for name, expected in (('rgba.png', colour), ('la.png', grey[..., None]), ('rgba16.png', colour)):
        read = read_image(tmp_path / name)
        assert read.shape == expected.shape and read.dtype == np.uint8
        assert read[:, :6].max() == 0
        np.testing.assert_allclose(read[:, 6:8], expected[:, 6:8] * (128 / 255), atol=1)
        np.testing.assert_array_equal(read[:, 8:], expected[:, 8:])
    keyed_read = read_image(tmp_path / 'keyed.png')
    assert keyed_read[:, :6].max() == 0 and np.array_equal(keyed_read[:, 6:, 0], grey[:, 6:])
    np.testing.assert_array_equal(read_image(tmp_path / 'opaque.png'), colour)
    # bright leftovers under full transparency set neither the bit depth nor a refusal of 12-bit data
    hidden = np.zeros((12, 20, 4), np.uint16)
    hidden[..., :3], hidden[..., 3] = 4000, 65535
    hidden[:, :6] = (65535, 65535, 65535, 0)
    assert cv2.imwrite(str(tmp_path / 'hidden.png'), hidden)
    assert high_depth_maximum(tmp_path / 'hidden.png') == 4000
    assert read_image(tmp_path / 'hidden.png', bits=12)[:, 6:].min() == round(4000 * 255 / 4095)
    # colour stored premultiplied (a TIFF's associated alpha) is already over black, at 8 bits as at 16
    tifffile = pytest.importorskip('tifffile')
    premultiplied = np.dstack([colour * (alpha[..., None] / 255), alpha]).round().astype(np.uint8)
    tifffile.imwrite(tmp_path / 'pre8.tif', premultiplied, photometric='rgb', extrasamples=[1])
    tifffile.imwrite(tmp_path / 'pre16.tif', premultiplied.astype(np.uint16) * 257, photometric='rgb',
                     extrasamples=[1])
    for name in ('pre8.tif', 'pre16.tif'):
        np.testing.assert_allclose(read_image(tmp_path / name), premultiplied[..., :3], atol=2)
    grey_premultiplied = np.dstack([premultiplied[..., 0], alpha])  # Pillow's mode La
    tifffile.imwrite(tmp_path / 'la8.tif', grey_premultiplied, photometric='minisblack', extrasamples=[1])
    np.testing.assert_allclose(read_image(tmp_path / 'la8.tif')[..., 0], premultiplied[..., 0], atol=2)
    # a 16-bit colour key (which OpenCV turns into an alpha channel) is not read, as for masks
    keyed16 = colour.astype(np.uint16) * 257
    keyed16[:, :6] = 4000
    assert cv2.imwrite(str(tmp_path / 'keyed16.png'), keyed16[..., ::-1])
    png = (tmp_path / 'keyed16.png').read_bytes()
    trns = b'tRNS' + (4000).to_bytes(2, 'big') * 3
    chunk = len(trns[4:]).to_bytes(4, 'big') + trns + zlib.crc32(trns).to_bytes(4, 'big')
    at = png.index(b'IDAT') - 4  # the key goes before the image data
    (tmp_path / 'keyed16.png').write_bytes(png[:at] + chunk + png[at:])
    assert read_image(tmp_path / 'keyed16.png')[:, :6].min() == round(4000 * 255 / 65535)


def test_lossy_compression_is_told_by_what_a_file_holds_not_its_suffix(tmp_path):
    rng = np.random.default_rng(2)
    colour = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    opaque = np.dstack([colour, np.full((16, 24), 255, np.uint8)])
    for name, array, options, expected in (
            ('plain.png', colour, {}, None), ('photo.jpg', colour, {}, 'JPEG'),
            ('misnamed.png', colour, dict(format='JPEG'), 'JPEG'),
            ('jpeg.tif', colour, dict(compression='jpeg'), 'JPEG'),
            ('lzw.tif', colour, dict(compression='tiff_lzw'), None),
            ('plain.bmp', colour, {}, None), ('lossy.webp', colour, dict(quality=80), 'lossy WebP'),
            ('lossless.webp', colour, dict(lossless=True), None),
            ('alpha.webp', opaque, dict(quality=80), 'lossy WebP'),  # an extended WebP (VP8X, ALPH, VP8)
            ('alpha_lossless.webp', opaque, dict(lossless=True), None)):
        Image.fromarray(array).save(tmp_path / name, **options)
        assert lossy_compression(tmp_path / name) == expected, name
    frames = [Image.fromarray(colour), Image.fromarray(255 - colour)]  # an animation: VP8 inside ANMF frames
    frames[0].save(tmp_path / 'animated.webp', save_all=True, append_images=frames[1:], quality=80)
    frames[0].save(tmp_path / 'animated_lossless.webp', save_all=True, append_images=frames[1:], lossless=True)
    assert lossy_compression(tmp_path / 'animated.webp') == 'lossy WebP'
    assert lossy_compression(tmp_path / 'animated_lossless.webp') is None
    trailing = tmp_path / 'trailing.webp'  # bytes after the RIFF's own size are not chunks
    trailing.write_bytes((tmp_path / 'lossless.webp').read_bytes() + b'VP8 \x04\x00\x00\x00abcd')
    assert lossy_compression(trailing) is None
    (tmp_path / 'broken.webp').write_bytes((tmp_path / 'lossy.webp').read_bytes()[:20])
    with pytest.raises(ValueError, match='cannot read image .*broken.webp'):
        lossy_compression(tmp_path / 'broken.webp')


def test_image_transparent_everywhere_is_read_as_stored_with_a_warning(tmp_path):
    """An alpha channel zeroed on export hides the whole image: its colour is read as stored (not as
    an all-black image that would be trained on or scored silently), with a warning naming the file;
    one opaque pixel makes it a cut-out again, read over black."""
    rng = np.random.default_rng(1)
    colour = rng.integers(1, 256, (10, 14, 3), dtype=np.uint8)
    clear = np.zeros((10, 14), np.uint8)
    Image.fromarray(np.dstack([colour, clear]), 'RGBA').save(tmp_path / 'clear.png')
    Image.fromarray(np.dstack([colour[..., 0], clear]), 'LA').save(tmp_path / 'clear_grey.png')
    deep = np.dstack([colour.astype(np.uint16) * 257, clear.astype(np.uint16)])
    assert cv2.imwrite(str(tmp_path / 'clear16.png'), deep[..., [2, 1, 0, 3]])
    keyed = np.full((10, 14), 7, np.uint8)
    Image.fromarray(keyed).save(tmp_path / 'keyed.png', transparency=7)  # every pixel the transparent key
    for name, expected in (('clear.png', colour), ('clear_grey.png', colour[..., :1]), ('clear16.png', colour),
                           ('keyed.png', keyed[..., None])):
        with pytest.warns(UserWarning, match=f'{name} is transparent everywhere: nothing shows; the colour is '
                                             f'read as stored'):
            np.testing.assert_array_equal(read_image(tmp_path / name), expected)
    from self_sup_data.mvtec import SET_BIT_DEPTH, load_images
    names = ['clear.png', 'clear16.png', 'clear_grey.png', 'keyed.png']
    with warnings.catch_warnings(record=True) as caught:  # a set of them: one warning that counts them
        warnings.simplefilter('always')
        loaded = load_images([tmp_path / name for name in names], 8, bit_depth=SET_BIT_DEPTH)
    assert [str(warning.message) for warning in caught] == [
        f"4 of 4 images are transparent everywhere (first: {tmp_path / 'clear.png'}): nothing shows; the "
        f"colour is read as stored, transparency ignored (hidden values too); save such images without "
        f"transparency if that is right"]
    assert loaded.images[0].max() > 0
    clear[0, 0] = 255
    Image.fromarray(np.dstack([colour, clear]), 'RGBA').save(tmp_path / 'cut_out.png')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        read = read_image(tmp_path / 'cut_out.png')
    assert read[0, 0].tolist() == colour[0, 0].tolist() and read.reshape(-1, 3)[1:].max() == 0


def test_signed_or_32_bit_integer_images_are_refused_and_extra_pages_warned(tmp_path):
    import tifffile
    tifffile.imwrite(tmp_path / 'signed.tif', np.linspace(-1000, 1000, 64).reshape(8, 8).astype(np.int16))
    tifffile.imwrite(tmp_path / 'wide.tif', np.full((8, 8), 100_000, np.int32))
    for name in ('signed.tif', 'wide.tif'):
        with pytest.raises(ValueError, match=f'cannot read image .*{name}: integer values from .* are not'):
            decode_values(tmp_path / name)
    pages = [Image.fromarray(np.full((8, 8), value, np.uint8)) for value in (10, 200)]
    pages[0].save(tmp_path / 'pages.tif', save_all=True, append_images=pages[1:])
    with pytest.warns(UserWarning, match='holds 2 pages; only the first is read'):
        assert decode_values(tmp_path / 'pages.tif').max() == 10
    photo = [Image.fromarray(np.full((8, 8, 3), value, np.uint8)) for value in (90, 30)]
    photo[0].save(tmp_path / 'camera.jpg', format='MPO', save_all=True, append_images=photo[1:])
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # a camera JPEG with its preview (MPO): no warning
        assert abs(int(decode_values(tmp_path / 'camera.jpg').mean()) - 90) <= 2


def test_hidden_files_and_folders_beside_images_are_not_images(tmp_path):
    from self_sup_data.images import folder_images
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / 'a.png')
    (tmp_path / '._a.png').write_bytes(b'\x00\x05\x16\x07 a macOS resource fork')
    (tmp_path / 'exported.png').mkdir()  # a folder named like an image
    assert image_files([tmp_path]) == folder_images(tmp_path) == [tmp_path / 'a.png']


def test_malformed_files_that_pillow_opens_are_errors_naming_the_file(tmp_path):
    """A TIFF whose first directory claims 215 entries instead of 9 (one changed byte): Pillow
    opens it and raises TypeError('Missing dimensions') on reading its frames."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (128, 128), dtype=np.uint8)).save(tmp_path / 'scan.tif')
    data = bytearray((tmp_path / 'scan.tif').read_bytes())
    data[8] = 0xd7
    (tmp_path / 'scan.tif').write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # Pillow's own about the broken directory
        with pytest.raises(ValueError, match=f"cannot read image {tmp_path / 'scan.tif'}: Missing dimensions"):
            read_image(tmp_path / 'scan.tif')


def test_values_beyond_the_models_bit_depth_are_an_error_not_white(tmp_path):
    Image.fromarray(np.full((8, 8), 5000, np.uint16)).save(tmp_path / 'deep.png')
    assert read_image(tmp_path / 'deep.png', bits=16).max() == round(5000 * 255 / 65535)
    with pytest.raises(ValueError, match=r"image .*deep.png has values up to 5000, beyond the 12-bit range "
                                         r"\(0..4095\) that it is read with, the model's bit_depth .*--bit-depth"):
        read_image(tmp_path / 'deep.png', bits=12)


@pytest.mark.parametrize('bits', [8, 10, 12, 14, 16])
def test_16_bit_files_keep_every_grey_level_of_their_data(tmp_path, bits):
    """Data of 8 to 16 bits saved in 16-bit files (8-bit images converted by a tool, 10-, 12- and 14-bit
    sensors) is scaled from its own range: a ramp over the whole range keeps all 256 grey levels."""
    top = 2 ** bits - 1
    ramp = np.linspace(0, top, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    Image.fromarray(ramp).save(tmp_path / 'ramp.png')
    read = read_image(tmp_path / 'ramp.png')
    expected = np.round(ramp.astype(np.float64) * 255 / top).astype(np.uint8)
    np.testing.assert_array_equal(read[..., 0], expected)
    assert np.unique(read).size == 256


@pytest.mark.slow
def test_a_test_image_beyond_the_training_images_bit_depth_stops_the_run_before_training(tmp_path, capsys):
    """--evaluate checks the test set with the bit depth that the training images give the model, and
    --bit-depth sets that depth (a camera's, where the normal images are dark)."""
    data = tmp_path / 'data'
    make_mvtec_category(data, 'deep', n_train=4)
    for path in (data / 'deep').rglob('*.png'):  # 12-bit data in 16-bit files
        if 'ground_truth' not in path.parts:
            Image.fromarray(np.asarray(Image.open(path).convert('L')).astype(np.uint16) * 16).save(path)
    bright = next((data / 'deep' / 'test' / 'good').glob('*.png'))
    Image.fromarray(np.full((32, 32), 20000, np.uint16)).save(bright)  # a 16-bit exposure among 12-bit ones
    argv = ['-s', 'Shift', '-d', str(data), '-o', str(tmp_path / 'out'), '-n', 'deep', '--evaluate'] + ONE_EPOCH
    message = run_error(train_mvtec.main, argv, capsys)
    assert f'image {bright} has values up to 20000, beyond the 12-bit range' in message
    assert not (tmp_path / 'out').exists() or not list((tmp_path / 'out').rglob('*.pt'))  # nothing trained
    assert train_mvtec.main(argv + ['--bit-depth', '16']) == 0
    assert read_meta(trained_model_path(tmp_path / 'out', 'Shift', 'deep'))['bit_depth'] == 16
    for wrong in ('7', '17', 'twelve'):
        with pytest.raises(SystemExit):
            train_mvtec.parse_args(argv + ['--bit-depth', wrong])
        assert "--bit-depth: an integer from 8 to 16 (bits of the data)" in capsys.readouterr().err


def test_an_intensity_window_maps_its_values_onto_0_to_255_and_saturates_outside(tmp_path):
    from self_sup_data.images import intensity_window, to_uint8
    assert intensity_window(12) == (0, 4095) and intensity_window([29700, 30300]) == (29700, 30300)
    values = np.arange(29000, 31000, 7, dtype=np.uint16).reshape(2, -1)
    Image.fromarray(values).save(tmp_path / 'deep.png')
    expected = np.clip(np.round((values.astype(np.float64) - 29700) * 255 / 600), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(read_image(tmp_path / 'deep.png', bits=[29700, 30300])[..., 0], expected)
    np.testing.assert_array_equal(to_uint8(values, (29700, 30300)), expected)
    assert read_image(tmp_path / 'deep.png', bits=[0, 65535]).max() == round(30996 * 255 / 65535)  # no error
    np.testing.assert_array_equal(to_uint8(values, 16), to_uint8(values, [0, 65535]))  # bits: a window from 0
    every = np.arange(2 ** 16)  # exact as the formula: 55348 in 54711..56181 is 110.5, rounded half to even
    for window in ([54711, 56181], [3, 9], [0, 65535], [1000, 1001]):
        exact = np.clip(np.round((every - window[0]) * 255 / (window[1] - window[0])), 0, 255)
        np.testing.assert_array_equal(to_uint8(every, window), exact)
    assert to_uint8(np.array([55348]), [54711, 56181])[0] == 110


def test_the_suggested_intensity_window_spans_the_normal_values_with_a_margin(tmp_path):
    from self_sup_data.mvtec import suggested_intensity_window
    rng = np.random.default_rng(0)
    low_image = (30000 + rng.integers(0, 101, (32, 32))).astype(np.uint16)  # 30000..30100
    high_image = (30200 + rng.integers(0, 101, (32, 32))).astype(np.uint16)  # 30200..30300
    Image.fromarray(low_image).save(tmp_path / 'a.png')
    Image.fromarray(high_image).save(tmp_path / 'b.png')
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / 'eight.png')  # 8-bit: not read for it
    low, high = np.percentile(low_image, 1), np.percentile(high_image, 99)
    margin = (high - low) / 4
    assert suggested_intensity_window([tmp_path / name for name in ('a.png', 'b.png', 'eight.png')]) == [
        math.floor(low - margin), math.ceil(high + margin)]
    assert suggested_intensity_window([tmp_path / 'eight.png']) is None
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(tmp_path / 'white.png')  # within 0..65535
    assert suggested_intensity_window([tmp_path / 'white.png']) == [65534, 65535]


@pytest.mark.slow
def test_an_intensity_window_trains_on_16_bit_data_that_uses_a_sliver_of_its_range(tmp_path, capsys):
    """Every image of a category in 16-bit files with values 29800..30200: training warns and suggests a
    window from the training images; --intensity-range trains with it, stores it, and its test images
    and new images are read with it."""
    from experiments.detector import Detector
    data = tmp_path / 'data'
    make_mvtec_category(data, 'flat', n_train=4)
    for path in (data / 'flat').rglob('*.png'):
        if 'ground_truth' not in path.parts:
            values = np.asarray(Image.open(path).convert('L')).astype(np.float64)
            Image.fromarray((29800 + values * 400 / 255).round().astype(np.uint16)).save(path)
    argv = ['-s', 'Shift-Intensity-M', '-d', str(data), '-o', str(tmp_path / 'out'), '-n', 'flat'] + ONE_EPOCH
    args = train_mvtec.parse_args(argv)
    with pytest.warns(UserWarning) as caught:
        train_mvtec.prepare_run(args, train_mvtec.plan(args)[0], data, 'flat')
    message = next(str(w.message) for w in caught if 'grey level' in str(w.message))
    window = re.search(r"train with --intensity-range (\d+) (\d+) \(their 16-bit values' 1st to 99th percentile, "
                       r"widened by 25% of that range on each side\), which the model keeps for its test and new "
                       r"images, or stretch", message).groups()
    low, high = int(window[0]), int(window[1])
    assert 29600 < low < 29900 and 30100 < high < 30400
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)  # no contrast warning with the window
        assert train_mvtec.main(argv + ['--intensity-range', window[0], window[1], '--evaluate']) == 0
    assert 'image AUROC' in capsys.readouterr().out
    model = trained_model_path(tmp_path / 'out', 'Shift-Intensity-M', 'flat')
    assert read_meta(model)['bit_depth'] == [low, high]
    test_image = next((data / 'flat' / 'test' / 'crack').glob('*.png'))
    np.testing.assert_array_equal(Detector.load(model).read(test_image),
                                  read_image(test_image, bits=[low, high]))
    assert np.ptp(read_image(test_image, bits=[low, high])) > 100  # a window-wide spread, not a level or two
    message = run_error(train_mvtec.main, argv + ['--intensity-range', '29000', '31000', '--resume'], capsys)
    assert f"bit_depth: [{low}, {high}] vs [29000, 31000]" in message
    assert f"--intensity-range {low} {high} reads its images as it did" in message
    eight_bit = tmp_path / 'eight'  # the same images in 8-bit files: the window changes nothing, and says so
    make_mvtec_category(eight_bit, 'flat', n_train=4)
    args = train_mvtec.parse_args(['-s', 'Shift', '-d', str(eight_bit), '-o', str(tmp_path / 'out8'), '-n', 'flat',
                                   '--intensity-range', '100', '200'] + ONE_EPOCH)
    with pytest.warns(UserWarning, match=r"^category 'flat': --intensity-range 100 200 applies to 16-bit image files, "
                                         r"and none of its training images is one: they are read as they are"):
        dataset = train_mvtec.prepare_run(args, train_mvtec.plan(args)[0], eight_bit, 'flat')[0]
    from self_sup_data.mvtec import load_images
    np.testing.assert_array_equal(dataset.images[0], load_images(dataset.paths[:1], dataset.images[0].shape[0])[0][0])
    for wrong, said in ((['30000', '30000'], 'LOW must be below HIGH, got 30000 30000'),
                        (['1', '65536'], 'an integer from 0 to 65535'), (['-1', '5'], "a 16-bit value), got '-1'"),
                        (['1', '5', '--bit-depth', '12'], 'not allowed with argument')):
        with pytest.raises(SystemExit):
            train_mvtec.parse_args(argv + ['--intensity-range'] + wrong)
        assert said in capsys.readouterr().err


def test_the_grey_level_spread_and_the_warning_of_a_flat_material():
    from self_sup_data.recipe import LOW_CONTRAST, grey_level_spread, low_contrast_message
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)  # percentiles 2.55 and 252.45
    flat = 100 + (ramp % 4)  # 100..103
    assert grey_level_spread([ramp, ramp, flat]) == pytest.approx(249.9)
    assert grey_level_spread([flat]) == pytest.approx(np.percentile(flat, 99) - np.percentile(flat, 1))
    assert low_contrast_message([ramp], 'wood') is None
    green = np.zeros((16, 16, 3), np.uint8) + (30, 120, 40) + (ramp % 2)  # a flat colour: 1 level a channel
    assert grey_level_spread([green]) == 1 and low_contrast_message([green], 'wood') is not None
    assert low_contrast_message([flat, flat, ramp], 'wood') is not None  # the median image decides
    message = low_contrast_message([flat], 'wood', bit_depth=16)
    assert message.startswith("category 'wood': the training images span only 3 grey levels (1st to 99th "
                              "percentile, median over the images; their 16-bit values read as 8 bits from "
                              "the 16-bit range 0..65535): ")
    assert 'stretch the images' in message and 'bit' not in low_contrast_message([flat], 'wood')
    assert "; 16-bit files among them read as 8 bits from the 12-bit range 0..4095)" in low_contrast_message(
        [flat], 'wood', bit_depth=12, depth_given=True)  # --bit-depth: perhaps of 8-bit files
    assert "; their 16-bit values read as 8 bits from the window 29700..30300): " in low_contrast_message(
        [flat], 'wood', bit_depth=[29700, 30300])
    assert "; 16-bit files among them read as 8 bits from the window 100..200): " in low_contrast_message(
        [flat], 'wood', bit_depth=[100, 200], depth_given=True)  # --intensity-range: perhaps of 8-bit files
    suggested = low_contrast_message([flat], 'wood', bit_depth=16, window=[29700, 30300])
    assert suggested.endswith("; train with --intensity-range 29700 30300 (their 16-bit values' 1st to 99th "
                              "percentile, widened by 25% of that range on each side), which the model keeps for "
                              "its test and new images, or stretch the images' contrast to a wider range before "
                              "training, by one fixed mapping for training, test and new images alike")
    halves = np.where(ramp < 128, 0, LOW_CONTRAST).astype(np.uint8)  # spans LOW_CONTRAST levels exactly
    assert low_contrast_message([halves], 'wood') is None and low_contrast_message([halves - (halves > 0)], 'wood')


def test_training_images_too_flat_for_the_labels_are_warned_of_and_stop_the_calibration(tmp_path, capsys):
    """16-bit data that uses a sliver of its range (values 29800..30200 of a 16-bit sensor) spans a
    level or two once read as 8 bits: training warns, naming the category and the 16-bit reading,
    before anything else, and the calibration's error says that the images are nearly uniform
    instead of only asking whether they are blank."""
    data = tmp_path / 'data'
    make_mvtec_category(data, 'flat', n_train=4)
    rng = np.random.default_rng(0)
    for path in (data / 'flat' / 'train' / 'good').glob('*.png'):
        Image.fromarray((29800 + rng.integers(0, 400, (64, 64))).astype(np.uint16)).save(path)
    argv = ['-s', 'Shift-Intensity-M', '-d', str(data), '-o', str(tmp_path / 'out'), '-n', 'flat'] + ONE_EPOCH
    with pytest.warns(UserWarning, match=r"^category 'flat': the training images span only 1 grey level \(1st "
                                         r"to 99th .*; their 16-bit values read as 8 bits from the 16-bit range"):
        message = run_error(train_mvtec.main, argv + ['--recipe', 'auto'], capsys)
    assert re.search(r"category 'flat': none of \d+ synthetic anomalies changed the training images: are they "
                     r"blank or nearly uniform \(they span 1 grey level, 1st to 99th percentile", message)
    args = train_mvtec.parse_args(argv)  # the table recipe: trains (on labels of 0) without calibrating
    setting = train_mvtec.plan(args)[0]
    with pytest.warns(UserWarning, match="category 'flat': the training images span only 1 grey level"):
        train_mvtec.prepare_run(args, setting, data, 'flat')
    params = settings.category_params('flat', None, {})
    with warnings.catch_warnings(record=True) as caught:  # a --recipe search candidate's: said once before
        warnings.simplefilter('always')
        train_mvtec.prepare_run(args, setting, data, 'flat', params)
    assert not [w for w in caught if 'grey level' in str(w.message)]
    assert not (tmp_path / 'out').exists() or not list((tmp_path / 'out').rglob('*.pt'))


def test_a_key_with_the_default_seed_is_refused_beside_the_key_without_one(tmp_path, capsys):
    make_mvtec_category(tmp_path / 'data', 'tiny')
    base = ['-d', str(tmp_path / 'data'), '-o', str(tmp_path / 'out'), '-n', 'tiny'] + ONE_EPOCH
    assert train_mvtec.main(['-s', 'Shift'] + base) == 0
    for extra in ([], ['--force'], ['--resume']):  # the same seed 0 under another name, never
        message = run_error(train_mvtec.main, ['-s', 'Shift-0'] + base + extra, capsys)
        assert 'is a run of Shift, which trains seed 0 as Shift-0 does; use -s Shift' in message
    assert not list((tmp_path / 'out').rglob('final_tiny_shift_0.pt'))
    twin = trained_model_path(tmp_path / 'out', 'Shift', 'tiny')
    twin.write_bytes(twin.read_bytes()[:1000])  # damaged: still the twin's, named as such
    message = run_error(train_mvtec.main, ['-s', 'Shift-0'] + base + ['--force'], capsys)
    assert f'{twin} is a run of Shift, which trains seed 0' in message and 'cannot read' not in message
    assert train_mvtec.main(['-s', 'Shift-1'] + base) == 0  # another seed is another run


def test_any_file_that_is_not_a_checkpoint_is_an_error_naming_it(tmp_path):
    from experiments.checkpoints import read_meta, read_model
    rng = np.random.default_rng(0)
    (tmp_path / 'text.pt').write_bytes(b'an ONNX export, as far as the name says')
    paths = [tmp_path / 'text.pt']
    for i in range(40):
        paths.append(tmp_path / f'file{i}.pt')
        start = (b'', b'\x80\x02', b'PK\x03\x04')[i % 3]  # plain, a pickle's start, a zip's start
        paths[-1].write_bytes(start + rng.integers(0, 256, int(rng.integers(1, 3000)), dtype=np.uint8).tobytes())
    for path in paths:
        for read in (read_meta, lambda path: read_model(path, 'cpu')):
            with pytest.raises(ValueError, match=f'checkpoint {path}'):
                read(path)


@pytest.mark.slow
def test_a_category_that_fails_does_not_stop_the_others(tmp_path, capsys, monkeypatch):
    """-c all: a category with a broken training image fails with its error, the categories after
    it still train and --evaluate covers them; the last line names the failed one, status 1."""
    for name in ('a', 'b', 'c'):
        make_mvtec_category(tmp_path / 'data', name, n_train=4)
    broken = tmp_path / 'data' / 'b' / 'train' / 'good' / '000.png'
    broken.write_bytes(broken.read_bytes()[:60])
    out = tmp_path / 'out'
    with contextlib.redirect_stderr(sys.stdout):  # one log, in order
        status = train_mvtec.main(['-s', 'Shift', '-d', str(tmp_path / 'data'), '-c', 'all', '-o', str(out),
                                   '--evaluate'] + ONE_EPOCH)
    log = capsys.readouterr().out
    assert status == 1 and f'cannot read image {broken}' in log and 'evaluation tables in' in log
    assert log.strip().splitlines()[-1] == 'train_mvtec.py: error: 1 of 3 categories failed (their errors are above): b'
    assert sorted(p.parent.name for p in out.rglob('final_*.pt')) == ['a', 'c']
    assert sorted(pd.read_csv(out / 'eval' / 'results.csv')['category']) == ['a', 'c']

    def unwritable(*args):  # an evaluation that stops on an input error: the line still comes last
        raise OSError(f"cannot write {out / 'eval' / 'results.csv'}: disk full")
    monkeypatch.setattr(train_mvtec, 'evaluate_trained', unwritable)
    with contextlib.redirect_stderr(sys.stdout), pytest.raises(SystemExit):
        train_mvtec.main(['-s', 'Shift', '-d', str(tmp_path / 'data'), '-c', 'all', '-o', str(out),
                          '--evaluate', '--resume'] + ONE_EPOCH)
    log = capsys.readouterr().out
    assert 'disk full' in log
    assert log.strip().splitlines()[-1] == 'train_mvtec.py: error: 1 of 3 categories failed (their errors are above): b'


def test_under_torchrun_a_failing_category_stops_the_run(tmp_path, capsys, monkeypatch):
    """The first process alone writes and validates, so its failure would leave the others
    waiting in the next category's collectives: every process stops."""
    for name in ('a', 'b'):
        make_mvtec_category(tmp_path / 'data', name, n_train=4)
    broken = tmp_path / 'data' / 'a' / 'train' / 'good' / '000.png'
    broken.write_bytes(broken.read_bytes()[:60])
    monkeypatch.setenv('WORLD_SIZE', '2')
    message = run_error(train_mvtec.main, ['-s', 'Shift', '-d', str(tmp_path / 'data'), '-c', 'all',
                                           '-o', str(tmp_path / 'out')] + ONE_EPOCH + ['--batch-size', '4'],
                        capsys)  # a batch the two processes share
    assert f'cannot read image {broken}' in message and not list((tmp_path / 'out').rglob('*.pt'))


@contextlib.contextmanager
def lock_held_by_another_process(run_dir, name):
    """Inside: a child process holds the lock of the run ``name`` in ``run_dir``; yields its pid."""
    import signal
    import subprocess
    code = ('import sys, time; from experiments.run_lock import run_lock\n'
            'with run_lock(sys.argv[1], sys.argv[2]):\n    print("locked", flush=True); time.sleep(60)\n')
    child = subprocess.Popen([sys.executable, '-c', code, str(run_dir), name], stdout=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        assert child.stdout.readline() == 'locked\n'
        yield child.pid
    finally:
        child.send_signal(signal.SIGKILL)  # killed: the system releases its lock
        child.wait()
        child.stdout.close()


def test_a_run_lock_is_held_by_one_process_and_released_when_it_ends(tmp_path):
    from experiments.run_lock import RunInProgressError, lock_path, refuse_run_in_progress, run_lock
    runs = tmp_path / 'runs'
    refuse_run_in_progress(runs, 'tiny_shift')  # no lock file: nothing to refuse, nothing created
    assert not runs.exists()
    with lock_held_by_another_process(runs, 'tiny_shift') as pid:
        holder = f'process {pid} on {socket.gethostname()}'
        for check in (lambda: refuse_run_in_progress(runs, 'tiny_shift'),
                      lambda: run_lock(runs, 'tiny_shift').__enter__()):
            with pytest.raises(RunInProgressError, match=f'the run tiny_shift in .*runs is being trained by {holder}'):
                check()
        with run_lock(runs, 'tiny_shift_1'):  # another seed of the setting: another run
            pass
    with run_lock(runs, 'tiny_shift'):  # released by the killed process
        with run_lock(runs, 'tiny_shift'):  # held by this process: reentrant
            refuse_run_in_progress(runs, 'tiny_shift')
        assert lock_path(runs, 'tiny_shift').read_text() == f'process {os.getpid()} on {socket.gethostname()}\n'
    assert lock_path(runs, 'tiny_shift').read_text() == ''  # the file stays, naming no holder


def test_a_killed_holders_lock_is_released_while_its_forked_workers_live_on(tmp_path):
    """A run's DataLoader workers are forked from the process that holds its lock: they close their
    copies, so that the lock is free as soon as its holder is killed, not once its workers notice."""
    import signal
    import subprocess
    from experiments.run_lock import RunInProgressError, refuse_run_in_progress, run_lock
    code = ('import os, sys, time; from experiments.run_lock import run_lock\n'
            'with run_lock(sys.argv[1], "tiny_shift"):\n'
            '    worker = os.fork()\n'
            '    if worker == 0:\n        print(os.getpid(), flush=True); time.sleep(30); os._exit(0)\n'
            '    time.sleep(60)\n')  # the worker prints once it runs, its fork's handlers done
    holder = subprocess.Popen([sys.executable, '-c', code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    worker = int(holder.stdout.readline())
    try:
        with pytest.raises(RunInProgressError):
            refuse_run_in_progress(tmp_path, 'tiny_shift')
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        os.kill(worker, 0)  # the worker still lives
        with run_lock(tmp_path, 'tiny_shift'):
            pass
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)


def test_a_lock_taken_for_an_instant_by_a_check_is_waited_for(tmp_path):
    """A check (refuse_run_in_progress) holds the lock for an instant and names no holder: a run
    starting then waits for it instead of being refused, and a check that meets a run starting waits
    for its name."""
    import subprocess
    from experiments.run_lock import run_lock
    code = ('import fcntl, sys, time\nf = open(sys.argv[1], "a+")\nfcntl.flock(f.fileno(), fcntl.LOCK_EX)\n'
            'print("locked", flush=True)\ntime.sleep(0.3)\n')  # as a check does, for longer
    (tmp_path / 'runs').mkdir()
    child = subprocess.Popen([sys.executable, '-c', code, str(tmp_path / 'runs' / '.tiny_shift.lock')],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == 'locked\n'
        started = time.monotonic()
        with run_lock(tmp_path / 'runs', 'tiny_shift'):
            assert 0.1 < time.monotonic() - started < 1.0
    finally:
        child.wait()
        child.stdout.close()


EVALUATION_WRITE = """
import os, sys, time
from experiments import tables
from experiments.cli import write_evaluation
out, category = sys.argv[1], sys.argv[2]

def merge(records):  # reads the earlier results, takes its time, writes them with its own
    earlier = tables.read_results(f'{out}/results.csv') if os.path.isfile(f'{out}/results.csv') else []
    print('writing', flush=True)
    time.sleep(0.5)
    return tables.write_results(earlier + records, f'{out}/results.csv')
print('ready', flush=True)
sys.stdin.readline()  # both at once
write_evaluation([dict(category=category, kind='texture', setting='Shift', seed=0, image_auroc_mean=0.5,
                       checkpoint=f'{category}.pt')], out, None, merge)
"""


def test_evaluations_ending_at_once_in_one_folder_keep_each_others_results(tmp_path):
    """Two evaluations that merge their results with a folder's earlier ones (train_mvtec.py --evaluate,
    the chest X-ray evaluation) write them in turn: the second reads the first's, and says it waits."""
    import subprocess
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    children = [subprocess.Popen([sys.executable, '-c', EVALUATION_WRITE, str(tmp_path / 'eval'), category],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=repo)
                for category in ('a', 'b')]
    assert [child.stdout.readline() for child in children] == ['ready\n'] * 2
    for child in children:
        child.stdin.write('go\n')
        child.stdin.flush()
    outputs = [child.communicate(timeout=60)[0] for child in children]
    assert [child.returncode for child in children] == [0, 0]
    results = tables.read_results(tmp_path / 'eval' / 'results.csv')
    assert sorted(record['category'] for record in results) == ['a', 'b']
    waited = f'waiting for another evaluation that writes its results into {tmp_path / "eval"}\n'
    assert sorted(output.count(waited) for output in outputs) == [0, 1]


def evaluate_beside_earlier_results(tmp_path, monkeypatch, capsys, earlier):
    """train_mvtec.evaluate_trained of 'Shift' on 'tiny', whose evaluation gives one result (seed 0, every
    metric 0.5, scored on the test set 'this test set'), into OUT/eval that holds the results ``earlier``
    -> (what it printed, the (category, setting) of the results written)."""
    records = [dict(category='tiny', kind='texture', setting='Shift', seed=0, checkpoint=str(tmp_path / 'tiny.pt'),
                    flip_average=False, test_set_sha256='this test set', **dict.fromkeys(mvtec_tasks.METRICS, 0.5))]
    eval_dir = tmp_path / 'out' / 'eval'
    eval_dir.mkdir(parents=True)
    tables.write_results(earlier, eval_dir / 'results.csv')
    monkeypatch.setattr(train_mvtec, 'evaluate_checkpoints', lambda *args, **kwargs: records)
    args = SimpleNamespace(no_figures=True, device='cpu', allow_missing_masks=False, format=None, normal=None,
                           abnormal=None, mask_dir=None)
    capsys.readouterr()
    assert train_mvtec.evaluate_trained(args, settings.parse_setting('Shift'), tmp_path, ['tiny'],
                                        tmp_path / 'out') == []
    return capsys.readouterr().out, sorted((record['category'], record['setting'])
                                           for record in tables.read_results(eval_dir / 'results.csv'))


def test_training_evaluation_leaves_out_earlier_results_of_another_test_set_of_the_category(tmp_path, monkeypatch,
                                                                                            capsys):
    """Results of a category scored on another test set than this evaluation's (another data folder,
    test images added or removed) would compare unlike figures in one table: they are left out with a
    note; results of categories that this evaluation does not score are kept."""
    figures = dict.fromkeys(mvtec_tasks.METRICS, 0.5)
    earlier = []
    for category, setting, digest in (('tiny', 'FPI', 'other images'), ('tiny', 'CutPaste', 'this test set'),
                                      ('tiny', 'Shift-Intensity', None), ('plates', 'FPI', 'its own')):
        model = tmp_path / f'{category}_{setting}.pt'
        model.write_bytes(b'a model')
        earlier.append(dict(category=category, kind='texture', setting=setting, seed=0, checkpoint=str(model),
                            flip_average=False, **figures, **({} if digest is None else dict(test_set_sha256=digest))))
    printed, written = evaluate_beside_earlier_results(tmp_path, monkeypatch, capsys, earlier)
    assert ("note: 2 earlier results left out of the tables: they were scored on another test set of their category "
            f"than this evaluation's (other images, defect types or masks), or before the results recorded their test "
            f"set, e.g. {tmp_path / 'tiny_FPI.pt'}") in printed
    assert written == [('plates', 'FPI'), ('tiny', 'CutPaste'), ('tiny', 'Shift')]


def test_training_evaluation_keeps_failed_results_and_leaves_out_unrecorded_thresholds(tmp_path, monkeypatch,
                                                                                        capsys):
    """A failed result scored no test set: it stays. A result of a model's own maps written before
    results recorded the thresholds of their precision, recall and F1 is left out where its model stores
    thresholds now (they may be others), kept where it stores none; a two-stage result does not use them."""
    from conftest import save_untrained_model
    figures = dict.fromkeys(mvtec_tasks.METRICS, 0.5)
    earlier = []
    for setting, thresholds, more in (('FPI', False, dict(error='ValueError: NaN maps')),
                                      ('CutPaste', True, {}), ('Shift-Intensity', False, {}),
                                      ('Shift-Intensity+GDE', True, {})):
        model = save_untrained_model(tmp_path / f'{setting}.pt', dict(setting=setting.split('+')[0]), checksum=True)
        if thresholds:
            store_thresholds(model, dict(image=0.1, pixel=0.2, fpr=0.01, flip_average=False, images=3))
        earlier.append(dict(category='tiny', kind='texture', setting=setting, seed=0, checkpoint=str(model),
                            weights_sha256=read_meta(model)['weights_sha256'], flip_average=False, **figures,
                            **({} if 'error' in more else dict(test_set_sha256='this test set')), **more))
    printed, written = evaluate_beside_earlier_results(tmp_path, monkeypatch, capsys, earlier)
    assert ("note: 1 earlier results left out of the tables: they were evaluated before the results recorded the "
            f"thresholds of their precision, recall and F1, and their models store thresholds now, e.g. "
            f"{tmp_path / 'CutPaste.pt'}") in printed
    assert 'another test set' not in printed
    assert written == [('tiny', 'FPI'), ('tiny', 'Shift'), ('tiny', 'Shift-Intensity'), ('tiny', 'Shift-Intensity+GDE')]


def test_a_failed_evaluation_warns_of_kept_results_at_thresholds_that_were_not_recorded(tmp_path, capsys):
    """Where every result fails and the earlier tables stay, a result of a model's own maps written before
    results recorded their thresholds, whose model stores thresholds now, is among those warned of."""
    from conftest import save_untrained_model
    model = save_untrained_model(tmp_path / 'shift.pt', dict(setting='Shift'), checksum=True)
    store_thresholds(model, dict(image=0.1, pixel=0.2, fpr=0.01, flip_average=False, images=3))
    figures = dict.fromkeys(mvtec_tasks.METRICS, 0.5)
    tables.write_results([dict(category='tiny', kind='texture', setting='Shift', seed=0, checkpoint=str(model),
                               weights_sha256=read_meta(model)['weights_sha256'], flip_average=False, **figures)],
                         tmp_path / 'results.csv')
    train_mvtec.warn_replaced_results(tmp_path, lambda record: True)
    assert f"still show 1 results of models gone, trained again or given other thresholds since they were " \
           f"evaluated, e.g. {model}" in capsys.readouterr().err


def test_test_set_digest_follows_the_images_their_defect_types_and_masks_not_the_folder(tmp_path):
    def test_set(root, types=('good', 'crack', 'crack'), masks=(None, 'm1.png', ('a.png', 'b.png'))):
        paths = []
        for index, defect_type in enumerate(types):
            path = root / defect_type / f'{index:03d}.png'
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                path.write_bytes(b'image' * (index + 1))
            paths.append(str(path))
        for name in ('m1.png', 'a.png', 'b.png'):
            (root / name).write_bytes(b'mask')
        mask_paths = [None if m is None else root / m if isinstance(m, str) else tuple(root / n for n in m)
                      for m in masks]
        return SimpleNamespace(paths=paths, defect_types=list(types), mask_paths=mask_paths)
    first = mvtec_tasks.test_set_sha256(test_set(tmp_path / 'a'))
    assert mvtec_tasks.test_set_sha256(test_set(tmp_path / 'moved')) == first  # another folder, the same set
    assert mvtec_tasks.test_set_sha256(test_set(tmp_path / 'b', types=('good', 'crack', 'hole'))) != first
    assert mvtec_tasks.test_set_sha256(test_set(tmp_path / 'c', masks=(None, 'm1.png', ('a.png',)))) != first
    assert mvtec_tasks.test_set_sha256(test_set(tmp_path / 'd', types=('good', 'crack', 'crack', 'good'),
                                                masks=(None, 'm1.png', ('a.png', 'b.png'), None))) != first
    replaced = test_set(tmp_path / 'e')
    Path(replaced.paths[1]).write_bytes(b'another image of another size')
    assert mvtec_tasks.test_set_sha256(replaced) != first


def test_training_evaluation_reads_the_earlier_results_while_it_holds_their_lock(tmp_path, monkeypatch):
    """train_mvtec.py --evaluate merges its results with the earlier ones in OUT/eval: it reads them only
    once it holds the folder's results lock, so that none written meanwhile is lost."""
    from experiments import run_lock
    eval_dir = tmp_path / 'out' / 'eval'
    (tmp_path / 'other.pt').write_bytes(b'a model')
    figures = dict.fromkeys(mvtec_tasks.METRICS, 0.5)
    earlier = dict(category='other', kind='texture', setting='FPI', seed=0, checkpoint=str(tmp_path / 'other.pt'),
                   flip_average=False, **figures)
    eval_dir.mkdir(parents=True)
    tables.write_results([earlier], eval_dir / 'results.csv')
    records = [dict(category='tiny', kind='texture', setting='Shift', seed=0, checkpoint=str(tmp_path / 'tiny.pt'),
                    flip_average=False, **figures)]
    monkeypatch.setattr(train_mvtec, 'evaluate_checkpoints', lambda *args, **kwargs: records)
    held_when_read = []
    read = train_mvtec.earlier_results

    def earlier_results(*args):
        held_when_read.append(os.path.abspath(eval_dir / run_lock.RESULTS_LOCK) in run_lock._held)
        return read(*args)
    monkeypatch.setattr(train_mvtec, 'earlier_results', earlier_results)
    args = SimpleNamespace(no_figures=True, device='cpu', allow_missing_masks=False, format=None, normal=None,
                           abnormal=None, mask_dir=None)
    assert train_mvtec.evaluate_trained(args, settings.parse_setting('Shift'), tmp_path, ['tiny'],
                                        tmp_path / 'out') == []
    assert held_when_read == [True]
    assert sorted(record['category'] for record in tables.read_results(eval_dir / 'results.csv')) == ['other', 'tiny']


def test_training_evaluation_keeps_another_seeds_result_written_while_it_ran(tmp_path, monkeypatch):
    """Two seeds trained at once into one folder, each with --evaluate: the evaluation that found seed
    1 only keeps the seed-2 result that the other wrote meanwhile (its model is there as it was), and
    replaces its own seed's earlier result, that of a seed whose model is gone, and that of a model in
    another folder (merged by an evaluation into this one's folder), which its rows never hold."""
    out, eval_dir = tmp_path / 'out', tmp_path / 'out' / 'eval'
    eval_dir.mkdir(parents=True)
    figures = dict.fromkeys(mvtec_tasks.METRICS, 0.5)
    for checkpoint in (out / 'seed1.pt', out / 'seed2.pt', tmp_path / 'other' / 'seed4.pt'):
        checkpoint.parent.mkdir(exist_ok=True)
        checkpoint.write_bytes(b'a model')

    def result(seed, value, checkpoint=None):
        return dict(category='tiny', kind='texture', setting='Shift', seed=seed, flip_average=False,
                    checkpoint=str(checkpoint or out / f'seed{seed}.pt'), **{**figures, 'image_auroc_mean': value})
    tables.write_results([result(1, 0.1), result(2, 0.2), result(3, 0.3, out / 'gone.pt'),
                          result(4, 0.4, tmp_path / 'other' / 'seed4.pt')], eval_dir / 'results.csv')
    monkeypatch.setattr(train_mvtec, 'evaluate_checkpoints', lambda *args, **kwargs: [result(1, 0.9)])
    args = SimpleNamespace(no_figures=True, device='cpu', allow_missing_masks=False, format=None, normal=None,
                           abnormal=None, mask_dir=None)
    assert train_mvtec.evaluate_trained(args, settings.parse_setting('Shift'), tmp_path, ['tiny'], out) == []
    kept = {record['seed']: record['image_auroc_mean'] for record in tables.read_results(eval_dir / 'results.csv')}
    assert kept == {1: 0.9, 2: 0.2}


def test_ctrl_c_while_the_results_are_written_comes_once_they_all_are(tmp_path):
    """An interrupt (SIGINT, as Ctrl-C sends it) that arrives while results.csv and its tables are
    written waits for the last of them, then stops the command; the handler is restored."""
    import signal
    from experiments.cli import write_evaluation
    handler = signal.getsignal(signal.SIGINT)

    def report(records):
        write_text_atomic(tmp_path / 'results.csv', 'new')
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # delivered here, were it not held
        write_text_atomic(tmp_path / 'table.md', 'new')
        return 'written'
    with pytest.raises(KeyboardInterrupt):
        write_evaluation([dict(category='a', setting='Shift', seed=0, checkpoint='a.pt')], tmp_path, None, report)
    assert (tmp_path / 'results.csv').read_text() == (tmp_path / 'table.md').read_text() == 'new'
    assert signal.getsignal(signal.SIGINT) is handler
    assert write_evaluation([dict(category='a', setting='Shift', seed=0, checkpoint='a.pt')], tmp_path, None,
                            lambda records: 'written') == 'written'  # nothing held is delivered later


def test_ctrl_c_held_while_a_write_fails_still_stops_the_command(tmp_path):
    import signal
    from experiments.atomic import signals_held
    with pytest.raises(KeyboardInterrupt) as stopped:
        with signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            raise OSError('disk full')
    assert isinstance(stopped.value.__context__, OSError)  # the write's failure, chained


def test_kill_and_ctrl_c_held_together_end_the_process():
    """SIGTERM and SIGINT both held: the SIGTERM is delivered (the process ends), not lost behind the
    KeyboardInterrupt."""
    import signal
    import subprocess
    code = ('import os, signal, time\nfrom experiments.atomic import signals_held\ntry:\n'
            '    with signals_held():\n        os.kill(os.getpid(), signal.SIGINT)\n'
            '        os.kill(os.getpid(), signal.SIGTERM)\n        time.sleep(0.05)\n'
            'except KeyboardInterrupt:\n    print("went on")\n')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == -signal.SIGTERM and 'went on' not in result.stdout


@pytest.mark.slow
def test_a_torchrun_process_other_than_the_first_does_not_refuse_its_own_launchs_lock(tmp_path, monkeypatch):
    make_mvtec_category(tmp_path / 'data', 'tiny', n_train=4)
    run_dir = settings.parse_setting('Shift').run_dir(tmp_path / 'out', 'tiny')
    as_second_torchrun_process(monkeypatch)  # the first holds the run's lock
    with lock_held_by_another_process(run_dir, 'tiny_shift'):
        assert train_mvtec.main(['-s', 'Shift', '-d', str(tmp_path / 'data'), '-o', str(tmp_path / 'out'),
                                 '-n', 'tiny'] + ONE_EPOCH) == 0


def test_a_run_folder_that_cannot_hold_a_lock_is_not_locked(tmp_path, monkeypatch):
    import errno
    from experiments import run_lock as locks
    (tmp_path / 'a file').write_text('not a folder')
    with locks.run_lock(tmp_path / 'a file' / 'runs', 'tiny_shift'):  # cannot be written: nothing to guard
        pass
    with locks.results_lock(tmp_path / 'a file' / 'eval'):
        pass

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, 'No locks available')
    monkeypatch.setattr(locks.fcntl, 'flock', no_locks)
    with pytest.warns(UserWarning, match=r'cannot lock .*tiny_shift.lock \(No locks available\): a second command'):
        with locks.run_lock(tmp_path / 'runs', 'tiny_shift'):
            pass
    with locks.results_lock(tmp_path / 'eval'):  # not locked, and nothing said: the results are still written
        pass
    locks.refuse_run_in_progress(tmp_path / 'runs', 'tiny_shift')


@pytest.mark.slow
def test_a_second_command_on_a_run_in_training_stops_before_touching_it(tmp_path, capsys):
    """Two commands on one run (the same output folder, setting and category), the second started
    while the first trains: the second stops with an error naming the first (not as a refusal of an
    interrupted run when the first has written a checkpoint, and for --recipe search before its
    candidates), and the first's files are left as they are."""
    make_mvtec_category(tmp_path / 'data', 'tiny', n_train=12)
    argv = ['-s', 'Shift', '-d', str(tmp_path / 'data'), '-o', str(tmp_path / 'out'), '-n', 'tiny'] + ONE_EPOCH
    run_dir = settings.parse_setting('Shift').run_dir(tmp_path / 'out', 'tiny')
    run_dir.mkdir(parents=True)
    written = {'tiny_shift_samples_epoch0001.png': b'a figure of the running process',
               'last_tiny_shift.pt': b'its checkpoint, being written'}
    for name, content in written.items():
        (run_dir / name).write_bytes(content)
    with lock_held_by_another_process(run_dir, 'tiny_shift') as pid:
        for extra in ([], ['--force'], ['--resume'], ['--recipe', 'search', '--force']):
            message = run_error(train_mvtec.main, argv + extra, capsys)
            assert f'the run tiny_shift in {run_dir} is being trained by process {pid} on' in message
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(['.tiny_shift.lock', *written])  # no search folder
    assert all((run_dir / name).read_bytes() == content for name, content in written.items())
    assert train_mvtec.main(argv + ['--force']) == 0  # once it has ended
    twin = settings.parse_setting('Shift-0').run_dir(tmp_path / 'out', 'tiny')
    with lock_held_by_another_process(twin, 'tiny_shift_0') as pid:  # -s Shift-0 trains seed 0 too
        message = run_error(train_mvtec.main, argv + ['--force'], capsys)
        assert f'the run tiny_shift_0 in {twin} is being trained by process {pid} on' in message


def test_a_resume_refused_for_another_bit_depth_names_the_option_that_keeps_the_run():
    from experiments.cli import other_run_message
    message = other_run_message('final.pt', 'finished', ['bit_depth: 12 vs 10', 'lr: 0.001 vs 0.01'],
                                {'bit_depth': 12})
    assert '(then vs now: bit_depth: 12 vs 10; lr: 0.001 vs 0.01); --bit-depth 12 reads its images as it did; ' \
        'pass --force' in message
    assert '--bit-depth' not in other_run_message('final.pt', 'finished', ['bit_depth: absent vs 16'], {})


def test_a_resume_refused_for_another_input_standardisation_names_the_option_that_keeps_the_run():
    from experiments.cli import other_run_message
    differing = ['model_config.standardize_input: absent vs True']
    message = other_run_message('last.pt', 'interrupted', differing, {'model_config': {'pool': True}})
    assert '; --no-standardize-input trains its network as it did; pass --force' in message
    message = other_run_message('last.pt', 'interrupted', ['model_config.standardize_input: True vs absent'],
                                {'model_config': {'standardize_input': True}})
    assert '; --standardize-input trains its network as it did; pass --force' in message
    assert 'standardize' not in other_run_message('last.pt', 'finished', ['lr: 0.001 vs 0.01'], {})


def test_a_resume_refused_for_other_calibration_measurements_says_that_no_option_restores_them():
    from experiments.cli import other_run_message
    message = other_run_message('final.pt', 'finished', ['calibration.border_texture_ratio: 1.0 vs 1.08'], {})
    assert ('(then vs now: calibration.border_texture_ratio: 1.0 vs 1.08); only the recipe calibration\'s '
            "measurements differ (its training images or the calibration's code changed since), which no option "
            'restores; pass --force') in message
    assert 'measurements differ' not in other_run_message('final.pt', 'finished', ['lr: 0.001 vs 0.01'], {})
    # an option that calibration keeps (--num-patches) changes its measurements too: the option is the cause
    option = ['calibration.effective_fraction: 0.98 vs 0.99', 'calibration.params.num_patches: 5 vs 3',
              'category_params.num_patches: 5 vs 3']
    assert 'measurements differ' not in other_run_message('final.pt', 'finished', option, {})
