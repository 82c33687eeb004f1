"""The training-speed benchmark: its arguments and one tiny run."""
import re

import pytest

from bench import training


@pytest.mark.parametrize('argv, message', [
    (['--size', '100'], '--size must be a positive multiple of 32, got 100'),
    (['--size', '0'], '--size must be a positive multiple of 32, got 0'),
    (['--batch-size', '0'], '--batch-size must be positive, got 0')])
def test_bad_sizes_are_refused_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit):
        training.main(argv)
    assert message in capsys.readouterr().err


def test_a_tiny_run_prints_the_three_rates(capsys):
    training.main(['--size', '64', '--batch-size', '2', '--steps', '1', '--workers', '0'])
    out = capsys.readouterr().out
    assert 'at 64x64, batch 2' in out
    for name in ('model alone', 'data alone', 'full pipeline'):
        rate = re.search(rf'{name}\s+([0-9.]+)', out)
        assert rate and float(rate.group(1)) > 0, out


def test_bf16_run_says_so(capsys):
    training.main(['--size', '64', '--batch-size', '2', '--steps', '1', '--workers', '0', '--bf16'])
    out = capsys.readouterr().out
    assert 'bfloat16 autocast' in out and float(re.search(r'model alone\s+([0-9.]+)', out).group(1)) > 0
