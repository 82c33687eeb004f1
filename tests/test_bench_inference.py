"""bench/inference.py's timing (the runners themselves are tested with predict.py and the export)."""
import pytest

from bench import inference


def test_rate_is_the_batch_over_the_median_call_after_warm_up(monkeypatch):
    """A process's first calls are slow: they are warm-up (at least three, for at least a second), and the
    figure is the batch over the median of the timed calls, not their total."""
    clock, durations, calls = [0.0], iter([2.0, 0.1, 0.1, 0.1, 0.3, 0.2]), []
    monkeypatch.setattr(inference.time, 'perf_counter', lambda: clock[0])

    def run(batch):
        calls.append(len(batch))
        clock[0] += next(durations)
    assert inference.images_per_second(run, [0] * 4, repeats=3) == pytest.approx(4 / 0.2)
    assert calls == [4] * 6
    clock[0], durations, calls[:] = 0.0, iter([0.3] * 4 + [0.5] * 2), []  # three calls: 0.9 s, one more
    assert inference.images_per_second(run, [0], repeats=2) == pytest.approx(1 / 0.5)
    assert len(calls) == 6
