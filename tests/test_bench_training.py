"""The training-speed benchmark: its arguments and one tiny run; the GPU checks' script."""
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from bench import training
from conftest import make_mvtec_category

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize('argv, message', [
    (['--size', '100'], '--size must be a positive multiple of 32, got 100'),
    (['--size', '0'], '--size must be a positive multiple of 32, got 0'),
    (['--batch-size', '0'], '--batch-size must be positive, got 0'),
    (['--steps', '0'], '--steps must be positive, got 0'),
    (['--workers', '-1'], '--workers must be 0 or more, got -1'),
    (['--setting', 'Shift-Wobble'], "unknown setting key 'Shift-Wobble'"),
    (['--setting', 'CutPaste-3way'], 'CutPaste-3way trains a classifier')]
    + ([] if torch.cuda.is_available() else
       [(['--device', 'cuda'], "device 'cuda' requested but CUDA is not available")]))
def test_bad_sizes_are_refused_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit):
        training.main(argv)
    assert message in capsys.readouterr().err


def test_warm_up_batches_are_stepped_but_not_timed(monkeypatch):
    clock = iter([10.0, 13.0])  # the timer's reads before and after the timed batches
    monkeypatch.setattr(training.time, 'perf_counter', lambda: next(clock))
    stepped = []
    batches = [(torch.zeros(size, 1),) for size in (1, 2, 3, 4, 5)]
    rate = training.images_per_second(batches, lambda batch: stepped.append(len(batch[0])),
                                      torch.device('cpu'), warmup=2)
    assert stepped == [1, 2, 3, 4, 5]
    assert rate == (3 + 4 + 5) / 3.0


@pytest.mark.parametrize('workers, warmup', [(0, 1), (1, 2), (15, 30)])
def test_a_loader_warms_up_for_one_batch_per_prefetch_slot(workers, warmup):
    assert training.loader_warmup(workers) == warmup


@pytest.mark.slow
@pytest.mark.parametrize('bf16', [False, True])
def test_a_tiny_run_times_real_steps_and_prints_three_positive_rates(bf16, capsys, monkeypatch):
    steps = []

    def counted_step(module, optimizer, loss, images, labels, device, bf16=None):
        steps.append((tuple(images.shape), bf16))
        return train_step(module, optimizer, loss, images, labels, device, bf16)
    train_step = training.train_step
    monkeypatch.setattr(training, 'train_step', counted_step)
    training.main(['--size', '64', '--batch-size', '2', '--steps', '1', '--workers', '0']
                  + (['--bf16'] if bf16 else []))
    out = capsys.readouterr().out
    # two steps (warm-up and timed) on random tensors, two on the loader's samples, all at 64 px
    assert steps == [((2, 1, 64, 64), True if bf16 else None)] * 4  # None: the device default
    assert re.search(r'at 64x64, batch 2, CPU, \d+ threads, ' + ('bfloat16 autocast' if bf16 else 'float32'),
                     out), out
    for name in ('model alone', 'data alone', 'full pipeline'):
        rate = re.search(rf'^  {name}\s+([0-9.]+)', out, re.MULTILINE)
        assert rate and float(rate.group(1)) > 0, out
    assert re.search(r'^small epochs: data alone, 60 images in batches of 16: [0-9.]+ images/s '
                     r'across epochs, [0-9.]+ in one long epoch: \d+% ', out, re.MULTILINE), out


@pytest.mark.slow
@pytest.mark.parametrize('batch_size, steps', [(64, 1), (16, 6)])
def test_every_timed_batch_has_the_batch_size(monkeypatch, batch_size, steps):
    """Not 60 (the demo category) for a batch of 64, nor a short batch of 12 at the end of an epoch of
    60 images in batches of 16: a shape the model alone never sees (with --compile, a recompilation)."""
    sizes = []
    monkeypatch.setattr(training, 'train_step',
                        lambda module, optimizer, loss, images, *rest: sizes.append(len(images)))
    training.main(['--size', '32', '--batch-size', str(batch_size), '--steps', str(steps), '--workers', '0'])
    assert sizes == [batch_size] * 2 * (steps + 1)  # model alone and full pipeline, warm-up and timed steps


@pytest.mark.slow
def test_the_gpu_check_script_runs_on_the_cpu_with_small_knobs(tmp_path):
    make_mvtec_category(tmp_path / 'data', 'magnetic_tile')
    out = tmp_path / 'out'
    knobs = dict(DEVICE='cpu', EPOCHS='1', STEPS='1', WORKERS='1', SIZE='64', BATCH='4',
                 RES_SCALE='0.25')
    result = subprocess.run(['bash', 'bench/gpu_check.sh', str(tmp_path / 'data'), str(out)],
                            cwd=REPO, env={**os.environ, **knobs}, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    speed = (out / 'training_speed.txt').read_text()
    assert re.search(r'at 64x64, batch 4, CPU.*\n  data alone .*\n  model alone .*\n  full pipeline',
                     speed), speed
    assert 'torchrun: skipped (one GPU' in result.stdout  # no GPU here
    first_lines = f'torch {torch.__version__}, CUDA None, 0 GPU(s)\n== 1. '  # the count is not printed
    assert result.stdout.startswith(first_lines), result.stdout
    log = (out / 'magnetic_tile.txt').read_text()
    assert re.search(r'magnetic_tile_shift_intensity_m: epoch 1/1, loss [0-9.]+', log), log
    assert 'image AUROC' in log and re.search(r'wall time \d+ s', log), log
    assert list((out / 'magnetic_tile').rglob('final_magnetic_tile_shift_intensity_m.pt'))
    again = subprocess.run(['bash', 'bench/gpu_check.sh', str(tmp_path / 'data'), str(out)],  # same OUT
                           cwd=REPO, env={**os.environ, **knobs}, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert 'epoch 1/1' in (out / 'magnetic_tile.txt').read_text()  # trained again, not refused

    # on a machine without CUDA the script stops at once unless DEVICE=cpu
    result = subprocess.run(['bash', 'bench/gpu_check.sh', '', str(tmp_path / 'no_gpu')],
                            cwd=REPO, env={**os.environ, 'DEVICE': 'cuda'}, capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    assert f'no CUDA device (torch {torch.__version__}, CUDA None); DEVICE=cpu' in result.stderr
    assert '== 1.' not in result.stdout
