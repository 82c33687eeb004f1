"""The training-speed benchmark: its arguments and one tiny run."""
import re

import pytest
import torch

from bench import training


@pytest.mark.parametrize('argv, message', [
    (['--size', '100'], '--size must be a positive multiple of 32, got 100'),
    (['--size', '0'], '--size must be a positive multiple of 32, got 0'),
    (['--batch-size', '0'], '--batch-size must be positive, got 0')]
    + ([] if torch.cuda.is_available() else
       [(['--device', 'cuda'], "device 'cuda' requested but CUDA is not available")]))
def test_bad_sizes_are_refused_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit):
        training.main(argv)
    assert message in capsys.readouterr().err


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
