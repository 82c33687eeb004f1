"""The training loop: Adam with cosine decay, atomic checkpoints, resume, progress and figures.

Generic: ``train`` fits any model that maps ``B x C x H x W`` images to ``B x 1 x H x W`` maps
to any Dataset whose items are ``(image, target, label_map)``; it knows nothing of MVTec or of
setting keys (the scripts wire those in and pass what is needed to rebuild the run as ``meta``).
A classifier (loss 'cross_entropy', ``B x K`` logits) trains on items ``(views, target, classes)``
of V views ``V x C x H x W`` with V class labels each: a batch of B items is B V samples.

Schedule: Adam (lr ``config.lr``), learning rate decayed per epoch with a cosine from ``lr`` to
``min_lr`` over ``config.epochs`` epochs (``CosineAnnealingLR`` stepped once per epoch, as in the
paper's code). With ``config.swa_epochs = S > 0`` (stochastic weight averaging, Izmailov et al.
2018; not in the paper), the cosine reaches ``swa_lr`` after ``epochs - S`` epochs, the learning
rate then stays at ``swa_lr``, the weights at the end of each of the last S epochs are averaged,
and the final model is that average with its batch-norm statistics recomputed on one more epoch
of training samples (``recompute_batch_norm``). The loss, computed in float32 outside autocast, is
BCE between the sigmoid of the model's logits and the label map (``binary_cross_entropy_with_logits``
on ``model.logits(x)``, the map before the model's final sigmoid: exact where the sigmoid of a
bfloat16 forward pass would round to 0 or 1 and stop the gradient), MSE between the model's output
and the label map, or the cross-entropy of a classifier's logits and the class labels. Model and images are channels_last (faster convolutions on the CPU too); the forward
pass runs in bfloat16 autocast on CUDA, and on the CPU when ``config.bf16`` is True (see
``use_bf16``).

Files of a run ``name`` in ``run_dir``:

    last_<name>.pt    checkpoint (model, optimiser, scheduler, epoch, RNG state, meta; with SWA
                      the running average), written every ``checkpoint_every`` epochs;
                      ``resume=True`` continues from it
    final_<name>.pt   the trained model (with SWA: the averaged one) and its meta (``load_model``)
    <name>_samples_epoch<E>.png, <name>_loss.png   example predictions (maps only), the loss curve

Every file is written to a temporary name and renamed. A resumed run ends in the same state as an
uninterrupted one: the data order depends only on (seed, epoch) (``EpochSampler``), each item's
randomness only on (seed, epoch, index) (the dataset's ``set_epoch``, called in the worker that
reads the item), and the checkpoint restores torch's RNG state (dropout).
"""
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from experiments.atomic import save_torch_atomic, write_text_atomic
from experiments.plotting import plot_loss_curve, plot_sample_grid, plot_validation_curve
from models.resnet import build_model
from self_sup_data.transforms import denormalize

# loss -> function of (the training module's float32 output, target); BCE takes logits (``Logits``)
LOSS_FUNCTIONS = {'bce': F.binary_cross_entropy_with_logits, 'mse': F.mse_loss,
                  'cross_entropy': F.cross_entropy}
# TrainConfig fields that do not change what is learnt; a resumed run may change them.
RUNTIME_FIELDS = ('workers', 'device', 'bf16', 'checkpoint_every', 'figure_every', 'figures',
                  'progress')
NUM_FIGURE_SAMPLES = 4
SELECTIONS = ('last', 'best')
# meta entries that record what a run measured, not what it is
RESUMED_FIELDS = ('epoch_losses', 'train_time_s', 'validation', 'best_epoch')  # carried over on resume
RESULT_FIELDS = ('train_config',) + RESUMED_FIELDS


@dataclass
class TrainConfig:
    """Plain values that define a training run (the command lines override them).

    device None: CUDA when available, else CPU. figure_every None: a quarter of the epochs.
    bf16: forward pass in bfloat16 autocast; None: on CUDA only, True: on the CPU too, False: never.
    swa_epochs: average the weights of this many last epochs, trained at the constant ``swa_lr``
    (0: no averaging; see the module docstring).
    select: the final model is the weights after the 'last' epoch or those with the 'best'
    validation score (needs a validator; see ``train``).
    """
    epochs: int
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-6
    loss: str = 'bce'
    seed: int = 0
    workers: int = 0
    device: str | None = None
    bf16: bool | None = None
    checkpoint_every: int = 1
    figure_every: int | None = None
    figures: bool = True
    progress: bool = True
    swa_epochs: int = 0
    swa_lr: float = 1e-4
    select: str = 'last'

    def __post_init__(self):
        if self.loss not in LOSS_FUNCTIONS:
            raise ValueError(f"loss must be one of {list(LOSS_FUNCTIONS)}, got {self.loss!r}")
        for name in ('epochs', 'batch_size', 'checkpoint_every'):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers!r}")
        if not 0 <= self.swa_epochs < self.epochs:
            raise ValueError(f"swa_epochs must be >= 0 and less than epochs ({self.epochs}), "
                             f"got {self.swa_epochs!r}")
        if not self.swa_lr > 0:
            raise ValueError(f"swa_lr must be positive, got {self.swa_lr!r}")
        if self.select not in SELECTIONS:
            raise ValueError(f"select must be one of {SELECTIONS}, got {self.select!r}")
        if self.select == 'best' and self.swa_epochs:
            raise ValueError("select 'best' keeps one validated checkpoint; it does not combine "
                             "with weight averaging (swa_epochs)")


def seed_everything(seed):
    """Seed Python's, numpy's and torch's global generators (model initialisation, dropout)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name=None):
    """torch.device for ``name``; None or 'auto': CUDA when available, else CPU."""
    if name in (None, 'auto'):
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    device = torch.device(name)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use 'cpu'")
    return device


def use_bf16(bf16, device):
    """Whether the forward pass on ``device`` runs in bfloat16 autocast (``TrainConfig.bf16``).

    On by default on CUDA only: on a CPU, bfloat16 is fast only where it has bfloat16 instructions
    (AVX512-BF16, AMX; 1.3-1.6x the training images per second of NSA's model at 128 px, 2x at
    224 px, on an AVX512-BF16 CPU: ``bench/training.py --bf16``) and emulated, slower than
    float32, elsewhere.
    """
    return device.type == 'cuda' if bf16 is None else bool(bf16)


def epoch_seed(seed, epoch):
    """A 32-bit seed derived from (seed, epoch) (numpy SeedSequence)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` for every index, in an order shuffled by (seed, epoch).

    The sampler lives in the main process, so ``set_epoch`` reaches persistent workers through
    the keys it yields (see ``EpochDataset``).
    """

    def __init__(self, size, seed):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        for index in torch.randperm(self.size, generator=generator).tolist():
            yield self.epoch, index


class EpochDataset(Dataset):
    """Reads ``(epoch, index)`` keys: sets the wrapped dataset's epoch, then returns its item."""

    def __init__(self, dataset):
        self.dataset, self.epoch = dataset, None

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        if epoch != self.epoch and hasattr(self.dataset, 'set_epoch'):
            self.dataset.set_epoch(epoch)
        self.epoch = epoch
        return self.dataset[index]


def make_loader(dataset, config, device):
    """DataLoader over ``dataset`` with an ``EpochSampler``; persistent workers when workers > 0."""
    return DataLoader(EpochDataset(dataset), batch_size=config.batch_size,
                      sampler=EpochSampler(len(dataset), config.seed),
                      num_workers=config.workers, persistent_workers=config.workers > 0,
                      pin_memory=device.type == 'cuda',
                      generator=torch.Generator().manual_seed(config.seed))


def final_model_path(run_dir, name):
    """Path of the trained model of run ``name``."""
    return Path(run_dir) / f'final_{name}.pt'


def last_checkpoint_path(run_dir, name):
    """Path of the checkpoint that ``resume`` continues from."""
    return Path(run_dir) / f'last_{name}.pt'


def best_model_path(run_dir, name):
    """Path of the validated model with the best validation score so far."""
    return Path(run_dir) / f'best_{name}.pt'


def rng_state():
    """torch's CPU and CUDA generator states (the data side uses per-item generators)."""
    return dict(torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _cpu_state_dict(module):
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def _check_resumable(path, saved_meta, meta):
    """ValueError when the checkpoint at ``path`` belongs to a different run than ``meta``."""
    defaults = asdict(TrainConfig(epochs=1))  # fields added since the checkpoint was written

    def learnt(m):
        config = {k: v for k, v in {**defaults, **m['train_config']}.items()
                  if k not in RUNTIME_FIELDS}
        rest = {k: v for k, v in m.items() if k not in RESULT_FIELDS}
        return {**rest, **config}
    saved, current = learnt(saved_meta), learnt(meta)
    differing = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if differing:
        details = ', '.join(f'{k}: {saved.get(k)!r} vs {current.get(k)!r}' for k in differing)
        raise ValueError(f"cannot resume from {path}: it was written by a different run "
                         f"(checkpoint vs now: {details}); start without resume or use another "
                         f"output folder")


def save_sample_figure(images, labels, preds, path):
    """Figure of the first NUM_FIGURE_SAMPLES (blended image, label, prediction) of a batch."""
    n = min(NUM_FIGURE_SAMPLES, len(images))
    plot_sample_grid([denormalize(image) for image in images[:n].float().cpu()],
                     [label[0].float().cpu().numpy() for label in labels[:n]],
                     [pred[0].float().cpu().numpy() for pred in preds[:n]], path)


def save_loss_figure(losses, path):
    """Figure of the mean loss of each epoch."""
    plot_loss_curve(losses, path)


def to_training_device(model, device):
    """Move ``model`` to ``device`` in the layout ``train_step`` feeds it (channels_last)."""
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    return model.to(device, memory_format=torch.channels_last)


def model_input(images, device):
    """A batch as the model takes it: multi-view batches (B x V x C x H x W) flattened to B V
    samples, on ``device``, channels_last (faster convolutions on CPU and GPU alike)."""
    if images.dim() == 5:
        images = images.flatten(0, 1)
    return images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


class Logits(nn.Module):
    """``model`` without its final sigmoid: ``model.logits(x)``, the input of BCE with logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.logits(x)


def training_module(model, loss):
    """The module whose output ``LOSS_FUNCTIONS[loss]`` takes: ``Logits(model)`` for 'bce' (a
    model trained with BCE has a sigmoid as its final activation and a ``logits`` method),
    ``model`` itself otherwise."""
    if loss != 'bce':
        return model
    if not callable(getattr(model, 'logits', None)):
        raise ValueError(f"loss 'bce' trains on logits: {type(model).__name__} has no logits "
                         "method (the map before its final sigmoid)")
    activation = getattr(model, 'config', {}).get('final_activation', 'sigmoid')
    if activation != 'sigmoid':
        raise ValueError(f"loss 'bce' needs a model whose final activation is 'sigmoid', "
                         f"got {activation!r}")
    return Logits(model)


def train_step(module, optimizer, loss, images, labels, device, bf16=None):
    """One optimisation step on a batch -> (images, labels on device, predictions, loss tensor).

    ``module``: ``training_module(model, loss)``. Multi-view batches (images B x V x C x H x W,
    labels B x V) are flattened to B V samples (``model_input``); the forward pass runs in bfloat16
    autocast where ``use_bf16(bf16, device)``, the loss ``LOSS_FUNCTIONS[loss]`` in float32 outside
    it. The predictions are the model's outputs (for 'bce' the sigmoid of the logits); the loss
    stays on the device (reading it would wait for the step).
    """
    if images.dim() == 5:
        labels = labels.flatten(0, 1)
    images = model_input(images, device)
    labels = labels.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(bf16, device)):
        outputs = module(images)
    value = LOSS_FUNCTIONS[loss](outputs.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    value.backward()
    optimizer.step()
    preds = torch.sigmoid(outputs.detach()) if loss == 'bce' else outputs.detach()
    return images, labels, preds, value.detach()


def recompute_batch_norm(model, loader, device, bf16=None):
    """Reset the batch-norm running statistics of ``model`` and set them to their plain average
    over one pass through ``loader`` (training mode, no gradients): the statistics that belong to
    averaged weights. ``torch.optim.swa_utils.update_bn`` on the batches in ``model_input``'s
    layout, in the training step's autocast."""
    batches = (model_input(images, device) for images, _, _ in loader)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(bf16, device)):
        torch.optim.swa_utils.update_bn(batches, model)


def train(model, dataset, config, run_dir, name, meta=None, resume=False, validator=None):
    """Train ``model`` to predict the label maps of ``dataset``; return the final meta.

    ``meta`` (plain types) describes the run for whoever loads the model (setting, category, data
    arguments ...); ``train`` adds ``model_config`` (``model.config``), ``train_config``,
    ``epoch_losses`` (mean loss of each epoch) and ``train_time_s`` (seconds spent in training
    epochs, summed over resumed parts; figures, validation and checkpoint writes excluded).
    ``resume`` continues from the run's last checkpoint when there is one.

    ``validator`` (``experiments.validation.Validator``): after the epochs it says are due, the
    model is scored on the validation set; the scores go to ``meta['validation']`` (one dict per
    validation with its ``epoch``) and ``<name>_validation.csv``, a figure of the curve to
    ``<name>_validation.png``, and the model with the best score so far to ``best_<name>.pt``
    (``meta['best_epoch']``). With ``config.select == 'best'`` the final model is that one.
    """
    if len(dataset) == 0:
        raise ValueError(f"run {name!r}: the training dataset is empty")
    if config.select == 'best' and validator is None:
        raise ValueError(f"run {name!r}: select 'best' needs a validation set")
    device = resolve_device(config.device)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    last_path = last_checkpoint_path(run_dir, name)
    to_training_device(model, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    cosine_epochs = config.epochs - config.swa_epochs
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=cosine_epochs,
        eta_min=config.swa_lr if config.swa_epochs else config.min_lr)
    averaged = torch.optim.swa_utils.AveragedModel(model) if config.swa_epochs else None
    meta = {**(meta or {}), 'model_config': dict(model.config), 'train_config': asdict(config),
            'epoch_losses': [], 'train_time_s': 0.0}
    if validator is not None:
        meta.update(validation=[], best_epoch=None)
    start_epoch = 0
    if resume and last_path.exists():
        # mapped to the CPU: set_rng_state needs CPU tensors; load_state_dict moves the rest
        checkpoint = torch.load(last_path, map_location='cpu', weights_only=True)
        _check_resumable(last_path, checkpoint['meta'], meta)
        model.load_state_dict(checkpoint['model'])
        optimizer.load_state_dict(checkpoint['optimizer'])
        scheduler.load_state_dict(checkpoint['scheduler'])
        if averaged is not None:
            averaged.load_state_dict(checkpoint['averaged'])
        set_rng_state(checkpoint['rng'])
        meta.update({k: checkpoint['meta'][k] for k in RESUMED_FIELDS if k in meta})
        start_epoch = checkpoint['epoch']

    loader = make_loader(dataset, config, device)
    module = training_module(model, config.loss)
    figure_every = config.figure_every or max(1, config.epochs // 4)
    epochs = tqdm(range(start_epoch, config.epochs), initial=start_epoch, total=config.epochs,
                  desc=name, unit='epoch', disable=not config.progress)
    for epoch in epochs:
        started = time.perf_counter()
        loader.sampler.set_epoch(epoch)
        model.train()
        loss_sum, count = 0.0, 0
        batches = tqdm(loader, desc=f'epoch {epoch + 1}', unit='batch', leave=False,
                       disable=not config.progress)
        for images, _, labels in batches:
            images, labels, preds, loss = train_step(module, optimizer, config.loss,
                                                     images, labels, device, config.bf16)
            loss_sum += loss.item() * len(images)
            count += len(images)
            batches.set_postfix(loss=f'{loss_sum / count:.4f}')
        if epoch < cosine_epochs:
            scheduler.step()  # then constant at swa_lr
        else:
            averaged.update_parameters(model)
        meta['epoch_losses'].append(loss_sum / count)
        meta['train_time_s'] += time.perf_counter() - started
        epochs.set_postfix(loss=f'{loss_sum / count:.4f}', lr=f'{scheduler.get_last_lr()[0]:.2e}')

        done = epoch + 1
        if validator is not None and validator.due(done, config.epochs):
            validate(model, validator, meta, done, run_dir, name, config.figures)
            model.train()
        if (config.figures and preds.dim() == 4  # example predictions: maps only
                and (epoch == 0 or done % figure_every == 0 or done == config.epochs)):
            save_sample_figure(images, labels, preds,
                               run_dir / f'{name}_samples_epoch{done:04d}.png')
        if done % config.checkpoint_every == 0 or done == config.epochs:
            averaged_state = {} if averaged is None else dict(averaged=averaged.state_dict())
            save_torch_atomic(dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                             scheduler=scheduler.state_dict(), epoch=done, rng=rng_state(),
                             meta=meta, **averaged_state), last_path)

    final_model = model
    if config.select == 'best':
        best = torch.load(best_model_path(run_dir, name), map_location=device, weights_only=True)
        model.load_state_dict(best['model'])
    if averaged is not None:
        started = time.perf_counter()
        loader.sampler.set_epoch(config.epochs)  # samples of one more epoch
        recompute_batch_norm(averaged.module, loader, device, config.bf16)
        meta['train_time_s'] += time.perf_counter() - started
        final_model = averaged.module
    save_torch_atomic(dict(model=_cpu_state_dict(final_model), meta=meta),
                final_model_path(run_dir, name))
    if config.figures:
        save_loss_figure(meta['epoch_losses'], run_dir / f'{name}_loss.png')
    return meta


def validate(model, validator, meta, epoch, run_dir, name, figures=True):
    """Score ``model`` after ``epoch`` with ``validator``; record the scores in ``meta`` and in
    ``<name>_validation.csv``, write the model to ``best_<name>.pt`` when its score is the best so
    far, and the curve's figure."""
    scores = validator(model)
    best = max((entry['score'] for entry in meta['validation']), default=-np.inf)
    meta['validation'].append({'epoch': epoch, **scores})
    if scores['score'] > best:
        meta['best_epoch'] = epoch
        save_torch_atomic(dict(model=_cpu_state_dict(model), meta=meta),
                          best_model_path(run_dir, name))
    columns = list(meta['validation'][0])
    write_text_atomic(run_dir / f'{name}_validation.csv', '\n'.join(
        [','.join(columns)] + [','.join(f'{entry[c]:.6g}' for c in columns)
                               for entry in meta['validation']]) + '\n')
    if figures:
        plot_validation_curve(meta['validation'], run_dir / f'{name}_validation.png')


def load_model(path, device='cpu'):
    """Rebuild the model of a checkpoint (final or last) -> (model in eval mode on device, meta)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model checkpoint at {path}")
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    model = build_model(checkpoint['meta']['model_config'])
    model.load_state_dict(checkpoint['model'])
    return model.to(device).eval(), checkpoint['meta']
