"""Training speed in images per second (default 224 x 224, batch 16) on the CPU with 2 threads.

Three figures, each after one warm-up step:
  model alone    forward + backward + Adam step on random tensors (the compute bound)
  data alone     self-supervised samples from the DataLoader, generated in --workers processes
  full pipeline  both together, as ``experiments.training.train`` runs them

Data: the built-in demo category (generated into a temporary folder) at the texture recipe's
crops of --size pixels (a multiple of 32; 128 is the real-data benchmark's budget), with the
setting's generator arguments (default Shift-Intensity-M: Poisson blending with mixed gradients,
the most expensive one). Run from the repository root:

    python bench/training.py [--steps 8] [--workers 2] [--setting Shift-Intensity-M] [--size 224]
                             [--batch-size 16] [--bf16]

--bf16 runs the forward passes in bfloat16 autocast (``TrainConfig.bf16``).
"""
import argparse
import os
import tempfile
import time

import torch

from experiments import settings
from experiments.training import (TrainConfig, make_loader, seed_everything, to_training_device,
                                  train_step, training_module)
from models.resnet import resnet18_enc_dec
from self_sup_data.demo import make_demo_dataset
from self_sup_data.mvtec import SelfSupMVTecDataset

THREADS = 2


def images_per_second(batches, step):
    """Run ``step`` on each batch after the first (warm-up); images per second of the timed ones."""
    batches = iter(batches)
    step(next(batches))
    count, started = 0, time.perf_counter()
    for batch in batches:
        step(batch)
        count += len(batch[0])
    return count / (time.perf_counter() - started)


def loader_batches(loader, count):
    """The first ``count`` batches of the loader's epochs 0, 1, 2, ..."""
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            yield batch
            count -= 1
            if count == 0:
                return
        epoch += 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--steps', type=int, default=8, help='timed steps (default: 8)')
    parser.add_argument('--workers', type=int, default=2, help='DataLoader workers (default: 2)')
    parser.add_argument('--setting', default='Shift-Intensity-M')
    parser.add_argument('--size', type=int, default=224,
                        help='crop side, a multiple of 32 (default: 224)')
    parser.add_argument('--batch-size', type=int, default=16, help='default: 16')
    parser.add_argument('--bf16', action='store_true', help='forward passes in bfloat16 autocast')
    args = parser.parse_args(argv)
    size, batch_size = args.size, args.batch_size
    if size <= 0 or size % 32:
        parser.error(f'--size must be a positive multiple of 32, got {size}')
    if batch_size <= 0:
        parser.error(f'--batch-size must be positive, got {batch_size}')
    torch.set_num_threads(THREADS)
    device = torch.device('cpu')
    setting = settings.parse_setting(args.setting)

    with tempfile.TemporaryDirectory() as tmp:
        category_dir = make_demo_dataset(tmp)
        self_sup_args = settings.mvtec_self_sup_args(setting, category_dir.name)
        dataset = SelfSupMVTecDataset(category_dir.parent, category_dir.name,
                                      self_sup_args=self_sup_args, res_scale=size / 256)
        assert dataset.train_size == size, dataset.train_size
        seed_everything(0)
        model = to_training_device(
            resnet18_enc_dec(in_channels=dataset.in_channels, final_activation='sigmoid'), device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        module = training_module(model, setting.loss)

        def step(batch):
            train_step(module, optimizer, setting.loss, batch[0], batch[2], device, args.bf16)

        shape = (batch_size, dataset.in_channels, size, size)
        random_batches = [(torch.randn(shape), None, torch.rand(batch_size, 1, size, size))
                          for _ in range(args.steps + 1)]
        model_rate = images_per_second(random_batches, step)

        config = TrainConfig(epochs=1, batch_size=batch_size, workers=args.workers)
        data_rate = images_per_second(loader_batches(make_loader(dataset, config, device), args.steps + 1),
                                      lambda batch: None)
        pipeline_rate = images_per_second(
            loader_batches(make_loader(dataset, config, device), args.steps + 1), step)

    precision = 'bfloat16 autocast' if args.bf16 else 'float32'
    print(f'training images/s at {size}x{size}, batch {batch_size}, CPU, {THREADS} threads, '
          f'{precision}, {args.setting}, {dataset.in_channels}-channel images ({os.cpu_count()} CPUs, '
          f'load average {os.getloadavg()[0]:.1f}):')
    print(f'  model alone    {model_rate:7.1f}')
    print(f'  data alone     {data_rate:7.1f}  ({args.workers} workers)')
    print(f'  full pipeline  {pipeline_rate:7.1f}  ({args.workers} workers + step)')


if __name__ == '__main__':
    main()
