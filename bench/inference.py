"""Prediction speed in images per second: PyTorch eager (float32), PyTorch in bfloat16 autocast
and ONNX Runtime (float32), at batch 1 and 16, side by side, on the CPU with 2 threads.

The network of ``predict.py``: NSA's encoder-decoder with the normalisation and the sigmoid
(``experiments.torch_model.ImageInputModel``), randomly initialised (speed does not depend on the
weights), on uint8 batches of --size pixels (default 256, the test side at full resolution) with
--channels channels, exported to ONNX as ``experiments.export`` does. Each figure is the batch over
the median time of --repeats calls, after warm-up calls (``images_per_second``). bfloat16 is fast
only on CPUs with bfloat16 instructions (AVX512-BF16, AMX) and is left out elsewhere. Run from the
repository root:

    python bench/inference.py [--size 256] [--channels 3] [--batch-sizes 1 16] [--repeats 5]
"""
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from experiments.atomic import write_atomic
from experiments.detector import OnnxRunner
from experiments.export import onnx_bytes
from experiments.torch_model import TorchRunner
from experiments.training import cpu_has_bf16
from models.resnet import SIZE_MULTIPLE, resnet18_enc_dec

THREADS = 2
WARMUP_CALLS, WARMUP_SECONDS = 3, 1.0


def images_per_second(run, batch, repeats):
    """Images per second of ``run(batch)``: the batch over the median time of ``repeats`` calls, after
    warm-up calls (at least WARMUP_CALLS, for at least WARMUP_SECONDS: a process's first calls of a
    network are up to tens of times slower than later ones)."""
    started, calls = time.perf_counter(), 0
    while calls < WARMUP_CALLS or time.perf_counter() - started < WARMUP_SECONDS:
        run(batch)
        calls += 1
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - start)
    return len(batch) / float(np.median(times))


def runners(channels, size, folder):
    """{name: run} of the three ways to run the same randomly initialised network."""
    torch.manual_seed(0)
    model = resnet18_enc_dec(in_channels=channels, final_activation='sigmoid').eval()
    found = dict(eager=TorchRunner(model, channels))
    if cpu_has_bf16():  # the runners run on the CPU
        found['bf16 autocast'] = TorchRunner(model, channels, bf16=True)
    spec = dict(side=size, crop=None, size_multiple=SIZE_MULTIPLE, channels=channels,
                flip_average_error=None, thresholds=None)
    path = write_atomic(Path(folder) / 'model.onnx',
                        lambda f: f.write(onnx_bytes(found['eager'].module, spec)))
    found['ONNX Runtime'] = OnnxRunner(path, threads=THREADS)
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--size', type=int, default=256, help='image side (multiple of 32)')
    parser.add_argument('--channels', type=int, choices=(1, 3), default=3)
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 16])
    parser.add_argument('--repeats', type=int, default=5, help='timed calls per figure')
    args = parser.parse_args(argv)
    if args.size < SIZE_MULTIPLE or args.size % SIZE_MULTIPLE:
        parser.error(f'--size must be a positive multiple of {SIZE_MULTIPLE}, got {args.size}')
    if min(args.batch_sizes) < 1 or args.repeats < 1:
        parser.error('--batch-sizes and --repeats must be positive')
    torch.set_num_threads(THREADS)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        found = runners(args.channels, args.size, folder)
        print(f'images per second at {args.size} px, {args.channels} channels, {THREADS} threads '
              f'({torch.backends.cpu.get_cpu_capability()} CPU)')
        print(f"{'batch':>6}" + ''.join(f'{name:>16}' for name in found))
        rates = {}
        for batch_size in args.batch_sizes:
            batch = rng.integers(0, 256, (batch_size, args.channels, args.size, args.size),
                                 dtype=np.uint8)
            rates[batch_size] = {name: images_per_second(run, batch, args.repeats)
                                 for name, run in found.items()}
            print(f'{batch_size:>6}' + ''.join(f'{rate:>16.2f}' for rate in
                                              rates[batch_size].values()), flush=True)
    return rates


if __name__ == '__main__':
    main()
