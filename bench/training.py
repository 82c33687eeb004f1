"""Training speed in images per second (default 224 x 224, batch 16), on the CPU or a GPU.

Three figures side by side, each after warm-up steps (one on random batches; from the loader, one
per batch its workers prefetch, so that their start-up is not timed):
  data alone     self-supervised samples from the training loader, generated in --workers processes
  model alone    forward + backward + Adam step on random uint8 batches (the compute bound)
  full pipeline  both together, as ``experiments.training.train`` runs them
and the small-epoch check: the loader on a category of 60 images in batches of 16 (4 batches an
epoch) keeps at least 90% of its steady-state rate (one long epoch of the same images) across
epoch boundaries.

Data: the built-in demo category (60 training images, generated into a temporary folder; for the
timed loaders repeated ``batch // gcd(60, batch)`` times, so that every epoch is whole batches: no
batch is capped at an epoch's 60 images, and none is short at an epoch's end; at 16 and 64, 15
batches an epoch) at the texture recipe's
crops of --size pixels (a multiple of 32; 128 is the real-data benchmark's budget), with the
setting's generator arguments (default Shift-Intensity-M: Poisson blending with mixed gradients, the
most expensive one). Run from the repository root:

    python bench/training.py [--device cpu|cuda] [--steps 8] [--workers 2] [--size 224]
                             [--batch-size 16] [--setting Shift-Intensity-M] [--bf16] [--compile]

On the CPU torch runs 2 threads. --bf16 runs the forward passes in bfloat16 autocast
(``TrainConfig.bf16``; on CUDA it is on by default where supported), --compile compiles the step.
"""
import argparse
import copy
import dataclasses
import itertools
import math
import os
import tempfile
import time

import torch

from experiments import settings
from experiments.training import (TrainConfig, make_loader, resolve_device, seed_everything,
                                  step_module, to_training_device, train_step, use_bf16)
from models.resnet import resnet18_enc_dec
from self_sup_data.demo import make_demo_dataset
from self_sup_data.mvtec import SelfSupMVTecDataset

THREADS = 2
PREFETCH_FACTOR = 2  # batches each DataLoader worker makes ahead (PyTorch's default)
SMALL_BATCH, MIN_SMALL_EPOCH_RATIO = 16, 0.9


def images_per_second(batches, step, device, warmup=1):
    """Run ``step`` on each batch; images per second of those after the first ``warmup`` (waiting
    for the device at both ends)."""
    batches = iter(batches)
    for batch in itertools.islice(batches, warmup):
        step(batch)
    synchronize(device)
    count, started = 0, time.perf_counter()
    for batch in batches:
        step(batch)
        count += len(batch[0])
    synchronize(device)
    return count / (time.perf_counter() - started)


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def loader_warmup(workers):
    """Warm-up batches of a loader with ``workers`` processes: one per prefetch slot. The loader
    gives batches to its workers in turn and returns them in order, so after these every worker has
    started and made its share; timing earlier batches counts the workers' start-up (15 workers,
    30 timed steps and one warm-up step on a GPU: data alone 1531 images/s, the full pipeline 2781)."""
    return max(1, workers * PREFETCH_FACTOR)


def loader_batches(dataset, config, device, count):
    """The first ``count`` batches of the training loader (epochs one after another)."""
    epochs = -(-count * config.batch_size // len(dataset)) + 1
    loader = make_loader(dataset, dataclasses.replace(config, epochs=epochs), device)
    return itertools.islice(loader, count)


def repeated(dataset, count):
    """A copy of ``dataset`` whose training images are its own repeated ``count`` times."""
    copied = copy.copy(dataset)
    copied.images = dataset.images * count
    return copied


def small_epoch_ratio(dataset, config, device, steps):
    """(rate over epochs of the 60-image category in batches of 16, rate over one long epoch of
    the same images repeated, their ratio): data alone, ``steps`` timed batches each."""
    warmup = loader_warmup(config.workers)
    long = repeated(dataset, -(-(steps + warmup) * SMALL_BATCH // len(dataset.images)))
    config = dataclasses.replace(config, batch_size=SMALL_BATCH)
    rates = [images_per_second(loader_batches(data, config, device, steps + warmup),
                               lambda b: None, device, warmup) for data in (dataset, long)]
    return rates[0], rates[1], rates[0] / rates[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda' (default: cpu)")
    parser.add_argument('--steps', type=int, default=8, help='timed steps (default: 8)')
    parser.add_argument('--workers', type=int, default=2, help='DataLoader workers (default: 2)')
    parser.add_argument('--setting', default='Shift-Intensity-M')
    parser.add_argument('--size', type=int, default=224,
                        help='crop side, a multiple of 32 (default: 224)')
    parser.add_argument('--batch-size', type=int, default=16, help='default: 16')
    parser.add_argument('--bf16', action=argparse.BooleanOptionalAction,
                        help='forward passes in bfloat16 autocast (default: on CUDA where supported)')
    parser.add_argument('--compile', action='store_true', help='torch.compile the step')
    args = parser.parse_args(argv)
    size, batch_size = args.size, args.batch_size
    if size <= 0 or size % 32:
        parser.error(f'--size must be a positive multiple of 32, got {size}')
    if batch_size <= 0:
        parser.error(f'--batch-size must be positive, got {batch_size}')
    if args.steps <= 0:
        parser.error(f'--steps must be positive, got {args.steps}')
    if args.workers < 0:
        parser.error(f'--workers must be 0 or more, got {args.workers}')
    try:
        device = resolve_device(args.device)
        setting = settings.parse_setting(args.setting)
    except ValueError as error:
        parser.error(str(error))
    if setting.model != 'enc_dec':
        parser.error(f'--setting {args.setting}: this benchmark times the encoder-decoder on label maps; '
                     f'{args.setting} trains a {setting.model}')
    if device.type == 'cpu':
        torch.set_num_threads(THREADS)
    config = TrainConfig(epochs=1, batch_size=batch_size, workers=args.workers, bf16=args.bf16,
                         loss=setting.loss, compile=args.compile)

    with tempfile.TemporaryDirectory() as tmp:
        category_dir = make_demo_dataset(tmp)
        self_sup_args = settings.mvtec_self_sup_args(setting, category_dir.name)
        dataset = SelfSupMVTecDataset(category_dir.parent, category_dir.name,
                                      self_sup_args=self_sup_args, res_scale=size / 256)
        assert dataset.train_size == size, dataset.train_size
        seed_everything(0)
        model = to_training_device(
            resnet18_enc_dec(in_channels=dataset.in_channels, final_activation=setting.final_activation),
            device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        module = step_module(model, config, device, world_size=1)

        def step(batch):
            train_step(module, optimizer, setting.loss, batch[0], batch[2], device, args.bf16)

        shape = (batch_size, dataset.in_channels, size, size)
        random_batches = [(torch.randint(0, 256, shape, dtype=torch.uint8), None,
                           torch.rand(batch_size, 1, size, size)) for _ in range(args.steps + 1)]
        model_rate = images_per_second(random_batches, step, device)
        warmup = loader_warmup(args.workers)
        # epochs of whole batches (60 images: 240 in batches of 16, 960 in batches of 64): a short batch at an
        # epoch's end would time a new shape (with --compile a recompilation) that the model alone never sees
        timed = repeated(dataset, batch_size // math.gcd(len(dataset), batch_size))
        data_rate, pipeline_rate = (
            images_per_second(loader_batches(timed, config, device, args.steps + warmup),
                              batch_step, device, warmup)
            for batch_step in (lambda batch: None, step))
        small, steady, ratio = small_epoch_ratio(dataset, config, device, args.steps)

    precision = 'bfloat16 autocast' if use_bf16(args.bf16, device) else 'float32'
    where = (torch.cuda.get_device_name(device) if device.type == 'cuda'
             else f'CPU, {THREADS} threads')
    print(f'training images/s at {size}x{size}, batch {batch_size}, {where}, {precision}'
          f'{", compiled" if args.compile else ""}, {args.setting}, {dataset.in_channels}-channel '
          f'images ({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}):')
    print(f'  data alone     {data_rate:7.1f}  ({args.workers} workers)')
    print(f'  model alone    {model_rate:7.1f}')
    print(f'  full pipeline  {pipeline_rate:7.1f}  ({args.workers} workers + step; '
          f'{pipeline_rate / min(data_rate, model_rate):.2f} x the slower of the two)')
    print(f'small epochs: data alone, {len(dataset)} images in batches of {SMALL_BATCH}: '
          f'{small:.1f} images/s across epochs, {steady:.1f} in one long epoch: {ratio:.0%} '
          f'({"ok" if ratio >= MIN_SMALL_EPOCH_RATIO else "below"} the '
          f'{MIN_SMALL_EPOCH_RATIO:.0%} target)')


if __name__ == '__main__':
    main()
