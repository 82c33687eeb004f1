"""The training loop: Adam with cosine decay, atomic checkpoints, resume, progress and figures.

Generic: ``train`` fits any model that maps ``B x C x H x W`` images to ``B x 1 x H x W`` maps
to any Dataset whose items are ``(image, target, label_map)``; it knows nothing of MVTec or of
setting keys (the scripts wire those in and pass what is needed to rebuild the run as ``meta``).
A classifier (loss 'cross_entropy', ``B x K`` logits) trains on items ``(views, target, classes)``
of V views ``V x C x H x W`` with V class labels each: a batch of B items is B V samples.

Schedule: Adam (lr ``config.lr``), learning rate decayed per epoch with a cosine from ``lr`` to
``min_lr`` (``lr`` itself where that is lower) over ``config.epochs`` epochs (``CosineAnnealingLR``
stepped once per epoch, as in the paper's code). With ``config.swa_epochs = S > 0`` (stochastic
weight averaging, Izmailov et al. 2018; not in the paper), the cosine reaches ``swa_lr`` after
``epochs - S`` epochs, the learning rate then stays at ``swa_lr``, the weights at the end of each
of the last S epochs are averaged, and the final model is that average with its batch-norm
statistics recomputed on one more epoch of training samples (``recompute_batch_norm``; in several
processes, each on its share, then averaged: ``average_batch_norm_statistics``). The loss,
computed in float32 outside autocast, is BCE between the sigmoid of the model's logits and the
label map (``binary_cross_entropy_with_logits`` on ``model.logits(x)``, the map before the model's
final sigmoid: exact where the sigmoid of a bfloat16 forward pass would round to 0 or 1 and stop
the gradient); MSE between the model's output and the label map; or the cross-entropy of a
classifier's logits and the class labels. Loss 'bce-bf16' is the BCE of that rounded sigmoid
(``bce_of_bfloat16_sigmoid``), the loss of this project's earlier bfloat16 training, kept to
reproduce models trained with it; loss 'focal' weighs each pixel's BCE by its squared error
(``focal_bce_with_logits``). Model and images are channels_last (faster convolutions on the
CPU too); the forward pass runs in bfloat16 autocast on CUDA, and on the CPU when ``config.bf16``
is True (see ``use_bf16``).

Files of a run ``name`` in ``run_dir``:

    last_<name>.pt    checkpoint (model, optimiser, scheduler, epoch, RNG state, meta; with SWA
                      the running average; with a validation set the best validated weights;
                      the weights' checksums), written every ``checkpoint_minutes`` (and every
                      ``checkpoint_every`` epochs when set) and after the last epoch, and as a
                      run that replaces another starts; ``resume=True`` continues from it
    final_<name>.pt   the trained model (with SWA: the averaged one) and its meta, without
                      optimiser state (``load_model``); written last, so that a run that has it
                      has every other file too (and a replaced run's files removed)
    best_<name>.pt    with a validation set: the best validated model so far (see ``train``)
    <name>_samples_epoch<E>.png, <name>_loss.png   example predictions (maps only), the loss curve
                      (written with each ``last_<name>.pt``)
    <name>_validation.csv, <name>_validation.png   with a validation set: its scores, their curve

and the exports of its models that ``experiments.export`` writes at their default names
(``final_<name>.onnx``, ``final_<name>.torchscript.pt``): a run that replaces it removes them.

Every file is written to a temporary name and renamed. A resumed run ends in the same state as an
uninterrupted one: the data order depends only on (seed, epoch) (``EpochBatchSampler``), each
item's randomness only on (seed, epoch, index) (the dataset's ``set_epoch``, called in the worker
that reads the item), and the checkpoint restores torch's RNG state (dropout). One loader pass
covers all the epochs, so its workers prepare the next epoch's batches while an epoch ends
(figures, validation, checkpoint); they send uint8 images, normalised on the device. The loss is
summed on the device and read once per epoch. Under torchrun the processes share each epoch
(see ``train``).
"""
import copy
import functools
import hashlib
import itertools
import math
import os
import random
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from experiments.atomic import save_torch_atomic, write_text_atomic
from experiments.plotting import plot_loss_curve, plot_sample_grid, plot_validation_curve
from experiments.validation import describe_scores
from models.resnet import build_model
from self_sup_data.transforms import denormalize, normalize_images


def bce_of_bfloat16_sigmoid(logits, target):
    """BCE of the sigmoid map computed in bfloat16: the loss of this project's earlier bfloat16
    training, whose model applied its sigmoid inside the autocast forward pass (the BCE itself is
    computed in float32). The rounded sigmoid is exactly 1 above a logit of about 6.2, so such
    pixels get no gradient whatever their target: confident positives are not pushed further,
    and confident false positives are not corrected."""
    return F.binary_cross_entropy(torch.sigmoid(logits.bfloat16()).float(), target)


FOCAL_GAMMA = 2.0


def focal_bce_with_logits(logits, target, gamma=FOCAL_GAMMA):
    """Focal BCE for soft targets (the quality focal loss of Li et al. 2020, the focal loss of
    Lin et al. 2017 where the target is 0 or 1): mean over pixels of |y - p|^gamma BCE(p, y), with
    p = sigmoid(logits) and y the label map. Pixels the model already predicts well weigh little,
    so the many easy background pixels do not drown the few anomalous ones."""
    weight = (target - torch.sigmoid(logits)).abs().pow(gamma)
    return (weight * F.binary_cross_entropy_with_logits(logits, target, reduction='none')).mean()


# loss -> function of (the training module's float32 output, target); the BCE losses take logits
# (``Logits``)
LOSS_FUNCTIONS = {'bce': F.binary_cross_entropy_with_logits, 'bce-bf16': bce_of_bfloat16_sigmoid,
                  'focal': focal_bce_with_logits, 'mse': F.mse_loss, 'cross_entropy': F.cross_entropy}
LOGIT_LOSSES = ('bce', 'bce-bf16', 'focal')
# meta entries that say where a run's data lies, which may differ between the machines of a torchrun
# launch (``without_locations``), and those of its layout (the folder format's folders)
LOCATION_FIELDS = ('data_dir', 'normal_list')
LAYOUT_LOCATION_FIELDS = ('normal', 'abnormal', 'mask_dir')
# TrainConfig fields that do not change what is learnt; a resumed run may change them.
RUNTIME_FIELDS = ('workers', 'device', 'bf16', 'checkpoint_every', 'checkpoint_minutes',
                  'figure_every', 'figures', 'progress', 'compile')
NUM_FIGURE_SAMPLES = 4
BATCH_NORM_MESSAGE = 'Expected more than 1 value per channel'  # batch norm's error on one value
SELECTIONS = ('last', 'best')
# meta entries that the training scripts added later: a checkpoint written without one is not
# another run for it (its run drew validation defects anywhere and, for objects, at another side,
# which a resume does not redo for the epochs it keeps)
LATER_META_FIELDS = ('validation_background', 'test_res', 'normal_list_sha256', 'train_files_sha256',
                     'validation_every', 'normal_list_order_sha256', 'search_calibration', 'search_budget',
                     'train_contents_sha256')
# the validation set's settings, which change nothing where no image was held out (a category too small),
# but for the seed of the images that a --recipe search held out to choose the recipe (its final run trains
# on all of them; the fraction is in its search_budget)
UNUSED_VALIDATION_FIELDS = ('validation_fraction', 'validation_seed')
# entries of a layout's spec that name test images only (the folder format's): never trained on
TEST_ONLY_LAYOUT_FIELDS = ('abnormal', 'mask_dir')
RESUMED_FIELDS = ('epoch_losses', 'epoch_bf16', 'train_time_s', 'validation', 'best_epoch')  # carried over on resume
# meta entries that record what a run measured, not what it is (thresholds: calibrated later; the
# training images' shapes and grey-level spans, which their digests pin down), and how its values
# were chosen (the category parameters set on the command line: what is learnt is the parameters
# they gave)
RESULT_FIELDS = ('train_config', 'weights_sha256', 'world_size', 'thresholds',
                 'param_overrides', 'train_image_shape', 'train_image_span') + RESUMED_FIELDS
# meta entries that list a run's data in full, for the evaluation's checks; a run is told from
# another by their digests (normal_list_sha256)
LISTING_FIELDS = ('train_names',)


class RunError(ValueError):
    """An error of a run's inputs that ``train`` finds once it has started (a diverged loss, a
    world size that does not fit the run or its checkpoint): the command lines print it as one
    line, as they do errors found before training."""


@dataclass
class TrainConfig:
    """Plain values that define a training run (the command lines override them).

    device None: CUDA when available, else CPU. figure_every None: a quarter of the epochs.
    progress: progress bars; without them, one line (epoch, loss, learning rate, seconds) is
    printed after the first epoch, every tenth of the epochs and the last; each validation
    prints its scores either way.
    bf16: forward pass in bfloat16 autocast; None: on CUDA devices that support it, True: on the
    CPU too, False: never. The resume checkpoint is written after every ``checkpoint_every``
    epochs (None: no epoch cadence), whenever ``checkpoint_minutes`` have passed since the last
    one (0: after every epoch), and after the last epoch. compile: ``torch.compile`` the step's
    module. swa_epochs: average the weights of this many last epochs, trained at the constant
    ``swa_lr`` (0: no averaging; see the module docstring). select: the final model is the weights
    after the 'last' epoch or those with the 'best' validation score (needs a validator; see
    ``train``).
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
    checkpoint_every: int | None = None
    checkpoint_minutes: float = 10.0
    figure_every: int | None = None
    figures: bool = True
    progress: bool = True
    compile: bool = False
    swa_epochs: int = 0
    swa_lr: float = 1e-4
    select: str = 'last'

    def __post_init__(self):
        if self.loss not in LOSS_FUNCTIONS:
            raise ValueError(f"loss must be one of {list(LOSS_FUNCTIONS)}, got {self.loss!r}")
        for name in ('epochs', 'batch_size', 'checkpoint_every', 'figure_every'):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ('lr', 'min_lr', 'swa_lr'):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        if not self.checkpoint_minutes >= 0:
            raise ValueError(f"checkpoint_minutes must be >= 0, got {self.checkpoint_minutes!r}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers!r}")
        if not 0 <= self.swa_epochs < self.epochs:
            raise ValueError(f"swa_epochs must be >= 0 and less than epochs ({self.epochs}), "
                             f"got {self.swa_epochs!r}")
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
    """torch.device for ``name``; None or 'auto': CUDA when available, else CPU. In a torchrun
    process, 'cuda' without an index is the process's GPU (``LOCAL_RANK``); one with an index is
    refused where torchrun launches several processes on the machine (``LOCAL_WORLD_SIZE``)."""
    if name in (None, 'auto'):
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type not in ('cpu', 'cuda') or (device.type == 'cpu' and device.index is not None):
        raise ValueError(f"device {name!r}: this project runs on 'cpu', 'cuda' or 'cuda:N'")
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use 'cpu'")
    if device.type == 'cuda' and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} requested but there are {torch.cuda.device_count()} CUDA "
                         f"devices (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    local_processes = int(os.environ.get('LOCAL_WORLD_SIZE', 1)) if is_distributed() else 1
    if device.type == 'cuda' and device.index is not None and local_processes > 1:
        raise ValueError(f"device {name!r}: the {local_processes} processes that torchrun launches on this "
                         f"machine would all train on that one GPU; give 'cuda', and each process trains on "
                         f"the GPU of its LOCAL_RANK")
    if device.type == 'cuda' and device.index is None and 'LOCAL_RANK' in os.environ:
        device = torch.device('cuda', int(os.environ['LOCAL_RANK']))
    return device


def use_bf16(bf16, device):
    """Whether the forward pass on ``device`` runs in bfloat16 autocast (``TrainConfig.bf16``).

    By default on CUDA devices with bfloat16 support only: on a CPU, bfloat16 is fast only where it
    has bfloat16 instructions (AVX512-BF16, AMX; 1.3-1.6x the training images per second of NSA's
    model at 128 px, 2x at 224 px, on an AVX512-BF16 CPU: ``bench/training.py --bf16``) and
    emulated elsewhere (``cpu_has_bf16``): 1.0 training images per second at 128 px against 13.9 in
    float32 on a 2-core AVX2 CPU.
    """
    if bf16 is None:
        return device.type == 'cuda' and torch.cuda.is_bf16_supported()
    return bool(bf16)


def cpu_has_bf16(cpuinfo='/proc/cpuinfo'):
    """Whether this CPU lists bfloat16 instructions among the flags of ``cpuinfo`` (x86
    ``avx512_bf16`` or ``amx_bf16``, Arm ``bf16``); None where the file cannot be read (not Linux):
    unknown."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    flags = {word for line in text.splitlines() if line.lower().startswith(('flags', 'features'))
             for word in line.split(':', 1)[-1].split()}
    return bool(flags & {'avx512_bf16', 'amx_bf16', 'bf16'})


def launched_processes():
    """The number of processes of this torchrun launch (``WORLD_SIZE``; 1 outside torchrun)."""
    return int(os.environ.get('WORLD_SIZE', 1))


def is_distributed():
    """Whether this process is one of several of a torchrun launch (``launched_processes`` > 1)."""
    return launched_processes() > 1


def is_first_process():
    """Whether this process is rank 0 of a torchrun launch (``RANK``), or the only process (a
    ``RANK`` left in the environment without ``WORLD_SIZE`` > 1 counts for nothing, as in
    ``init_distributed``): the one that writes a run's files and reports."""
    return not is_distributed() or int(os.environ.get('RANK', 0)) == 0


# how gloo's collectives end where another process has exited ("... Connection closed by peer [host]:port. ...")
PEER_GONE = re.compile(r'Connection closed by peer( \[[^\]]*\]:\d+)?')


def peer_gone(error):
    """gloo's words (``PEER_GONE``) where ``error``, raised in a process of a torchrun launch,
    reports that another process of the run closed its connection (it exited: on an error of its
    own, or killed), else None."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    match = PEER_GONE.search(str(error))
    return match and match[0].strip()


def stops_in_one_line_with_its_peers(function):
    """Decorate ``train`` so that a process whose collective fails because another process of the
    run exited (``peer_gone``) ends with a one-line RunError saying so, not with the backend's
    traceback below the other process's error."""
    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except RuntimeError as error:
            words = peer_gone(error)
            if not words:
                raise
            raise RunError(f"process {dist.get_rank()} of {dist.get_world_size()} stopped: another process of the "
                           f"run exited ({words}); its error, if it printed one, says why; once that is fixed, "
                           f"--resume continues from the run's last checkpoint") from error
    return wrapped


def init_distributed(device):
    """Join the process group of a torchrun launch (``WORLD_SIZE`` > 1 in the environment) ->
    (rank, world size); (0, 1) outside torchrun. Backend NCCL on CUDA, gloo on the CPU. RunError
    where the environment lacks the rest of what torchrun sets (``RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT``)."""
    if not is_distributed():
        return 0, 1
    if not dist.is_initialized():
        missing = [name for name in ('RANK', 'MASTER_ADDR', 'MASTER_PORT') if name not in os.environ]
        if missing:
            raise RunError(f"WORLD_SIZE is {launched_processes()} but {', '.join(missing)} "
                           f"{'is' if len(missing) == 1 else 'are'} not set: launch the processes with "
                           f"torchrun (which sets them), or unset WORLD_SIZE to train in one process")
        if device.type == 'cuda':
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return dist.get_rank(), dist.get_world_size()


def epoch_seed(seed, epoch):
    """A 32-bit seed derived from (seed, epoch) (numpy SeedSequence)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class EpochBatchSampler(Sampler):
    """Batches of ``(epoch, index)`` keys for epochs ``start_epoch`` .. ``epochs - 1`` as one
    stream: a loader's workers go on into the next epoch while the last one ends.

    Epoch e visits the indices in the order of ``torch.randperm`` with a generator seeded by
    (seed, e) (``epoch_seed``), in batches of ``batch_size``, the last one smaller; no batch spans
    two epochs. A last batch of one is dropped (a different index each epoch) where batch norm
    sees it alone (``per_process_norm``: one process, or processes whose batch norm is not
    synchronised, on the CPU): it cannot normalise one image whose features are 1 x 1 (a 32-pixel
    crop at the encoder's end). With ``world_size`` W > 1 (distributed training) the order is
    padded to a multiple of W with its own first indices and rank r takes its positions r, r + W,
    r + 2 W, ...: the ranks' i-th batches together are the i-th batch of W ``batch_size`` of a
    single process (every rank has as many keys, so all of them drop a last batch of one
    together, where they do).
    The keys reach the dataset through ``EpochDataset``.
    """

    def __init__(self, size, batch_size, seed, epochs, start_epoch=0, rank=0, world_size=1,
                 per_process_norm=True):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.epochs, self.start_epoch = epochs, start_epoch
        self.rank, self.world_size = rank, world_size
        self.per_process_norm = per_process_norm or world_size == 1
        self.keys_per_epoch = self.kept(math.ceil(size / world_size))
        self.batches_per_epoch = math.ceil(self.keys_per_epoch / batch_size)

    def kept(self, count):
        """How many of an epoch's ``count`` keys (this rank's) are read: all, less a last batch of
        one that batch norm would see alone."""
        alone = self.per_process_norm and count > 1 and count % self.batch_size == 1
        return count - 1 if alone else count

    def epoch_keys(self, epoch):
        """This rank's keys of ``epoch``, in order."""
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        order = torch.randperm(self.size, generator=generator).tolist()
        padded = list(itertools.islice(itertools.cycle(order),
                                       math.ceil(self.size / self.world_size) * self.world_size))
        return [(epoch, index) for index in padded[self.rank::self.world_size]][:self.keys_per_epoch]

    def __iter__(self):
        for epoch in range(self.start_epoch, self.epochs):
            keys = self.epoch_keys(epoch)
            for start in range(0, len(keys), self.batch_size):
                yield keys[start:start + self.batch_size]

    def __len__(self):
        return (self.epochs - self.start_epoch) * self.batches_per_epoch


class EpochDataset(Dataset):
    """Reads ``(epoch, index)`` keys: sets the wrapped dataset's epoch, then returns its item.

    A dataset with ``uint8_tensors`` (``self_sup_data.mvtec.SelfSupImageDataset``) is read through
    a shallow copy that gives uint8 images (``model_input`` normalises them on the device)."""

    def __init__(self, dataset):
        if hasattr(dataset, 'uint8_tensors'):
            dataset = copy.copy(dataset)
            dataset.uint8_tensors = True
        self.dataset, self.epoch = dataset, None

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        if epoch != self.epoch and hasattr(self.dataset, 'set_epoch'):
            self.dataset.set_epoch(epoch)
        self.epoch = epoch
        return self.dataset[index]


class OneOpenCVThreadLoader(DataLoader):
    """A DataLoader whose worker processes run OpenCV on one thread each (the workers are the
    parallelism): set in this process while its iterator starts them, then restored. (Set in a
    forked worker instead, after this process used OpenCV's thread pool, the call can hang.)"""

    def __iter__(self):
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            return super().__iter__()
        finally:
            cv2.setNumThreads(threads)


def shut_down_workers(batches):
    """Stop the worker processes of the DataLoader iterator ``batches`` (if it has any). An
    iterator not run to its end keeps them until the garbage collector frees it, which may happen
    in a process forked later (the next run's DataLoader worker), where it fails with 'can only
    test a child process'."""
    shutdown = getattr(batches, '_shutdown_workers', None)  # DataLoader's multi-process iterator
    if shutdown is not None:
        shutdown()


def make_loader(dataset, config, device, start_epoch=0, epochs=None, rank=0, world_size=1):
    """DataLoader over ``dataset`` for epochs ``start_epoch`` .. ``epochs - 1`` (default
    ``config.epochs``) in one pass (``EpochBatchSampler``; per rank ``config.batch_size / world_size``
    items a batch), read in ``config.workers`` processes."""
    sampler = EpochBatchSampler(len(dataset), config.batch_size // world_size, config.seed,
                                config.epochs if epochs is None else epochs, start_epoch, rank,
                                world_size, per_process_norm=device.type != 'cuda')  # SyncBatchNorm
    return OneOpenCVThreadLoader(EpochDataset(dataset), batch_sampler=sampler,
                                 num_workers=config.workers, pin_memory=device.type == 'cuda',
                                 generator=torch.Generator().manual_seed(config.seed))


RUN_FILE_ENDINGS = re.compile(r'validation\.csv|validation\.png|loss\.png|samples_epoch\d+\.png')
TORCHSCRIPT_SUFFIX = '.torchscript.pt'  # an export (experiments.export) beside its model, not a checkpoint
EXPORT_SUFFIXES = ('.onnx', TORCHSCRIPT_SUFFIX)  # a model's exports at their default name: <stem><suffix>


def is_run_file(filename, name):
    """Whether ``filename`` is one of the files that ``train`` writes for the run ``name`` (see the
    module docstring), not one of another run whose name starts alike (``tiny_shift_1`` beside
    ``tiny_shift``: the seeds of a setting share a folder). The exports of its models at their
    default names (``final_<name>.onnx``, ``final_<name>.torchscript.pt``, ...) count as its files,
    so that a run that replaces it removes them too."""
    models = (f'final_{name}', f'last_{name}', f'best_{name}')
    if filename in [stem + suffix for stem in models for suffix in ('.pt',) + EXPORT_SUFFIXES]:
        return True
    prefix = f'{name}_'
    return filename.startswith(prefix) and RUN_FILE_ENDINGS.fullmatch(filename[len(prefix):]) is not None


def file_system_time_ns(folder):
    """The time now as the file system of ``folder`` stamps a file written there (a temporary
    file's mtime, in ns): the clock that the files' ages there are compared with, which may not be
    this process's (a shared folder of another machine)."""
    with tempfile.TemporaryFile(dir=folder) as file:
        return os.fstat(file.fileno()).st_mtime_ns


def replaced_final_model(run_dir, name):
    """Whether the final model of the run ``name`` in ``run_dir`` is the one of an earlier run that
    a run from scratch is replacing (``--force``) and has not replaced yet: written before the
    replacing run's start, which its resume checkpoint records (``run_started_ns``)."""
    final, last = final_model_path(run_dir, name), last_checkpoint_path(run_dir, name)
    if not (final.is_file() and last.is_file()):
        return False
    started = torch.load(last, map_location='cpu', weights_only=True, mmap=True).get('run_started_ns')
    return started is not None and final.stat().st_mtime_ns < started


def remove_earlier_run_files(run_dir, name, since_ns, keep_final_model=False):
    """Remove the files of the run ``name`` in ``run_dir`` (``is_run_file``) last written before
    ``since_ns`` (``file_system_time_ns`` at the run's start): an earlier run's, which a run from
    scratch replaces; with ``keep_final_model`` all but its final model and that model's exports
    (``final_<name>.*``), which stay until the replacing run's final model is written."""
    for path in Path(run_dir).iterdir():
        if (is_run_file(path.name, name) and path.is_file() and path.stat().st_mtime_ns < since_ns
                and not (keep_final_model and path.name.startswith(f'final_{name}'))):
            path.unlink()
            print(f"{name}: removed {path.name}, a file of the run this one "
                  f"{'replaces' if keep_final_model else 'replaced'}")


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


def _cpu_state_dict(module, copy=False):
    """The module's weights as contiguous CPU tensors; with ``copy``, never the module's own."""
    return {k: v.detach().to('cpu', copy=copy).contiguous() for k, v in module.state_dict().items()}


def weights_checksum(state_dict):
    """SHA-256 (hex) of a state dict: the name, dtype, shape and bytes of each tensor, by name."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f'{name}:{tensor.dtype}:{tuple(tensor.shape)}'.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_checkpoint(model, meta):
    """What a final or best model file holds: the weights (on the CPU) and ``meta`` with their
    ``weights_sha256`` (``weights_checksum``), which ``load_model`` verifies."""
    return state_checkpoint(_cpu_state_dict(model), meta)


def state_checkpoint(state, meta):
    """``model_checkpoint`` of a state dict (CPU tensors)."""
    return dict(model=state, meta={**meta, 'weights_sha256': weights_checksum(state)})


def run_meta(model, config, meta=None, validator=None):
    """The meta ``train`` starts a run with: ``meta`` with the model's ``model_config``, the
    ``train_config`` and, with a ``validator``, the epochs between validations
    (``validation_every``: the epochs that --select best chooses from)."""
    every = {} if validator is None else {'validation_every': validator.every}
    return {**(meta or {}), 'model_config': dict(model.config), 'train_config': asdict(config),
            **every}


def run_differences(saved_meta, meta):
    """What makes the run of ``saved_meta`` (a checkpoint's) another run than that of ``meta``:
    ['key: saved vs now', ...] for each entry that changes what is learnt (the data, generator,
    model and ``TrainConfig`` values; runtime fields, results, listings (by their digests),
    ``swa_lr`` without ``swa_epochs``, the validation set's fraction and seed where no image was held
    out (its seed counts where either run's recipe came from a --recipe search, whose candidates were
    validated on the images it draws), and the folder format's test folders are ignored); [] for the
    same run."""
    defaults = asdict(TrainConfig(epochs=1))  # fields added since the checkpoint was written
    searched = any(m.get('recipe_search') for m in (saved_meta, meta))
    unused = ('validation_fraction',) if searched else UNUSED_VALIDATION_FIELDS

    def learnt(m):
        config = {k: v for k, v in {**defaults, **m.get('train_config', {})}.items()
                  if k not in RUNTIME_FIELDS}
        if not config.get('swa_epochs'):
            config.pop('swa_lr', None)  # no averaging: its learning rate is never used
        rest = {k: v for k, v in m.items() if k not in RESULT_FIELDS + LISTING_FIELDS
                and not (k in LATER_META_FIELDS and k not in saved_meta)
                and not (k in unused and not m.get('held_out'))}
        if isinstance(rest.get('layout'), dict):
            rest['layout'] = {k: v for k, v in rest['layout'].items() if k not in TEST_ONLY_LAYOUT_FIELDS}
        return {**rest, **config}
    return dict_differences(learnt(saved_meta), learnt(meta))


SHOWN_LENGTH = 80  # characters of a dict against another value that dict_differences shows


def dict_differences(a, b, prefix=''):
    """['key: a's value vs b's', ...] for each key whose values differ (a missing key counts as
    None and reads 'absent'), sorted; where both values are dicts, their differing entries as
    'key.entry: ...'; a dict against another value (a whole calibration report against none) is
    cut to SHOWN_LENGTH characters."""
    def shown(d, k):
        text = repr(d[k]) if k in d else 'absent'
        if isinstance(d.get(k), dict) and len(text) > SHOWN_LENGTH:
            return text[:SHOWN_LENGTH - 4] + ' ...'
        return text
    lines = []
    for k in sorted(a.keys() | b.keys(), key=str):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            lines += dict_differences(a[k], b[k], f'{prefix}{k}.')
        elif a.get(k) != b.get(k):
            lines.append(f'{prefix}{k}: {shown(a, k)} vs {shown(b, k)}')
    return lines


def _check_checksums(path, checkpoint):
    """RunError naming the resume checkpoint ``path`` when its weights (or best model's) do not
    match the checksums it was written with (checkpoints written before they had any: none)."""
    for state, checksum in (('model', 'model_sha256'), ('best_model', 'best_model_sha256')):
        if checksum in checkpoint and weights_checksum(checkpoint[state]) != checkpoint[checksum]:
            raise RunError(f"the resume checkpoint {path} is damaged: its {state.replace('_', ' ')} weights "
                           f"do not match their checksum; --force trains the run again from the start")


def _check_resumable(path, saved_meta, meta):
    """ValueError when the checkpoint at ``path`` belongs to a different run than ``meta``."""
    saved_world, world = saved_meta.get('world_size', 1), meta['world_size']
    if saved_world != world:
        raise RunError(f"cannot resume from {path}: it was trained with world_size {saved_world}, "
                       f"this run has world_size {world}; resume with {saved_world} processes")
    differing = run_differences(saved_meta, meta)
    if differing:
        raise RunError(f"cannot resume from {path}: it was written by a different run "
                       f"(checkpoint vs now: {', '.join(differing)}); start without resume or "
                       f"use another output folder")


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
    samples, on ``device``, uint8 images normalised there (``normalize_images``), channels_last
    (faster convolutions on CPU and GPU alike)."""
    if images.dim() == 5:
        images = images.flatten(0, 1)
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = normalize_images(images)
    return images.contiguous(memory_format=torch.channels_last)


class Logits(nn.Module):
    """``model`` without its final sigmoid: ``model.logits(x)``, the input of BCE with logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.logits(x)


def training_module(model, loss):
    """The module whose output ``LOSS_FUNCTIONS[loss]`` takes: ``Logits(model)`` for the BCE
    losses (``LOGIT_LOSSES``; a model trained with BCE has a sigmoid as its final activation and
    a ``logits`` method), ``model`` itself otherwise."""
    if loss not in LOGIT_LOSSES:
        return model
    if not callable(getattr(model, 'logits', None)):
        raise ValueError(f"loss {loss!r} trains on logits: {type(model).__name__} has no logits "
                         "method (the map before its final sigmoid)")
    activation = getattr(model, 'config', {}).get('final_activation', 'sigmoid')
    if activation != 'sigmoid':
        raise ValueError(f"loss {loss!r} needs a model whose final activation is 'sigmoid', "
                         f"got {activation!r}")
    return Logits(model)


def train_step(module, optimizer, loss, images, labels, device, bf16=None):
    """One optimisation step on a batch -> (images, labels on device, predictions, loss tensor).

    ``module``: ``training_module(model, loss)`` (or its distributed or compiled wrapper).
    Multi-view batches (images B x V x C x H x W, labels B x V) are flattened to B V samples
    (``model_input``); the forward pass runs in bfloat16 autocast where ``use_bf16(bf16, device)``,
    the loss ``LOSS_FUNCTIONS[loss]`` in float32 outside it. The predictions are the model's
    outputs (for the BCE losses the sigmoid of the logits); the loss stays on the device (reading
    it would wait for the step).
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
    preds = torch.sigmoid(outputs.detach()) if loss in LOGIT_LOSSES else outputs.detach()
    return images, labels, preds, value.detach()


def recompute_batch_norm(model, batches, device, bf16=None):
    """Reset the batch-norm running statistics of ``model`` and set them to their plain average
    over ``batches`` of a loader (training mode, no gradients): the statistics that belong to
    averaged weights. ``torch.optim.swa_utils.update_bn`` on the batches in ``model_input``'s
    layout, in the training step's autocast."""
    inputs = (model_input(images, device) for images, _, _ in batches)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(bf16, device)):
        torch.optim.swa_utils.update_bn(inputs, model)


def average_batch_norm_statistics(model, world_size):
    """Average the batch-norm running statistics of ``model`` over the ``world_size`` processes of
    a distributed run (all-reduce): each recomputed them on its share of an epoch
    (``recompute_batch_norm``), and every process's model then holds their mean over all the
    processes' batches (synchronised batch norm on CUDA has given each the same already)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            for statistics in (module.running_mean, module.running_var):
                dist.all_reduce(statistics)
                statistics.div_(world_size)


def step_module(model, config, device, world_size):
    """The module ``train_step`` calls: ``training_module``, in ``DistributedDataParallel`` when
    ``world_size`` > 1, compiled (``torch.compile``) with ``config.compile``."""
    module = training_module(model, config.loss)
    if world_size > 1:
        module = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == 'cuda' else None)
    return torch.compile(module) if config.compile else module


def first_every_last(done, every, epochs):
    """Whether something due after the first epoch, every ``every`` epochs and the last is due
    after epoch ``done`` (1-based) of ``epochs``."""
    return done == 1 or done % every == 0 or done == epochs


def epoch_mean(loss_sum, count, world_size):
    """The mean loss of an epoch from this rank's (sum, count) tensors, summed over the ranks:
    the one read of the device per epoch."""
    totals = torch.stack([loss_sum, count])
    if world_size > 1:
        dist.all_reduce(totals)
    loss_sum, count = totals.tolist()
    return loss_sum / count


def crop_option(meta):
    """The training script's option that sets the size of a run's crops (``meta`` its meta)."""
    return '--res' if meta.get('dataset') == 'chest_xray' else '--res-scale'


def without_locations(meta):
    """``meta`` without where its data lies (LOCATION_FIELDS, and the folders of its layout,
    LAYOUT_LOCATION_FIELDS), which may differ between the machines of a torchrun launch; what the
    data is stays (its file names and contents' digests)."""
    bare = {**meta, **dict.fromkeys(LOCATION_FIELDS)}
    if isinstance(meta.get('layout'), dict):
        bare['layout'] = {**meta['layout'], **dict.fromkeys(LAYOUT_LOCATION_FIELDS)}
    return bare


def process_differences(first, other):
    """What differs between the runs that two processes of a torchrun launch would train, each
    ``(training images, meta, bfloat16 autocast)``: the number of training images (their steps per
    epoch would differ, and the run hang at a collective), the autocast of the forward pass (the run
    records process 0's), and the data, recipe or arguments (``run_differences`` of the metas
    ``without_locations``)."""
    (first_size, first_meta, first_bf16), (other_size, other_meta, other_bf16) = first, other
    differing = run_differences(without_locations(first_meta), without_locations(other_meta))
    if other_bf16 != first_bf16:
        differing.insert(0, f'bfloat16 autocast: {first_bf16} vs {other_bf16} (--bf16, or the devices '
                            f'differ in bfloat16 support)')
    if other_size != first_size:
        differing.insert(0, f'training images: {first_size} vs {other_size}')
    return differing


def check_processes_agree(name, meta, size, bf16, world_size):
    """RunError, in every process, when the processes of a torchrun run would train other runs
    (``process_differences`` of each process's ``(size, meta, bf16)`` against process 0's)."""
    runs = [None] * world_size
    dist.all_gather_object(runs, (size, meta, bf16))
    for rank, other in enumerate(runs[1:], start=1):
        differing = process_differences(runs[0], other)
        if differing:
            raise RunError(f"run {name!r}: process {rank} would train another run than process 0 "
                           f"({'; '.join(differing[:3])}); every process needs the same data and arguments")


@stops_in_one_line_with_its_peers
def train(model, dataset, config, run_dir, name, meta=None, resume=False, validator=None):
    """Train ``model`` to predict the label maps of ``dataset``; return the final meta.

    ``meta`` (plain types) describes the run for whoever loads the model (setting, category, data
    arguments ...); ``train`` adds ``model_config`` (``model.config``), ``train_config``,
    ``world_size``, ``epoch_losses`` (mean loss of each epoch) and ``train_time_s`` (seconds spent
    in training epochs, summed over resumed parts; figures, validation and checkpoint writes
    excluded). ``resume`` continues from the run's last checkpoint when there is one (written by
    as many processes: a different ``world_size`` is refused).

    Distributed (launched by torchrun, ``init_distributed``): each process trains on its share of
    each epoch (``EpochBatchSampler``, ``config.batch_size / world_size`` items a step) with the
    gradients averaged over the processes (``DistributedDataParallel``; batch norm synchronised on
    CUDA); rank 0 alone validates and writes files.

    ``validator`` (``experiments.validation.Validator``): after the epochs it says are due, the
    model is scored on the validation set; the scores go to ``meta['validation']`` (one dict per
    validation with its ``epoch``) and ``<name>_validation.csv``, a figure of the curve to
    ``<name>_validation.png``, and the model with the best score so far to ``best_<name>.pt``
    (``meta['best_epoch']``). With ``config.select == 'best'`` the final model is that one. The
    resume checkpoint holds those weights and their meta too, so that a resumed run's best model
    is one of the epochs it resumed with (``best_<name>.pt`` is written again from them on
    resume, as it was written at its epoch), never one of an interrupted run's lost epochs.

    A run that starts from its first epoch where files of the run ``name`` are (``is_run_file``: a
    ``--force`` run) replaces that earlier run: it writes its resume checkpoint at once, with its
    start's time on the file system's clock (``file_system_time_ns``), so that an interruption
    before its next one is never taken for the earlier run's end (``replaced_final_model``), and
    removes the earlier run's files but its final model (an earlier best model, validation curve or
    sample figures) at once, so that none of them is taken for this run's, even after an
    interruption; once its final model is written, even after an interruption and a resume, it
    removes the rest of them (the earlier final model and its exports). The resume checkpoint holds
    the SHA-256 of its weights (``weights_checksum``), checked on resume: damaged weights are an
    error, not a model.
    """
    if len(dataset) == 0:
        raise ValueError(f"run {name!r}: the training dataset is empty")
    if config.select == 'best' and validator is None:
        raise ValueError(f"run {name!r}: select 'best' needs a validation set")
    device = resolve_device(config.device)
    rank, world_size = init_distributed(device)
    if config.batch_size % world_size:
        raise RunError(f"batch_size {config.batch_size} is not divisible by the world size "
                       f"{world_size}")
    writer = rank == 0
    run_dir = Path(run_dir)
    if writer:
        run_dir.mkdir(parents=True, exist_ok=True)
    last_path = last_checkpoint_path(run_dir, name)
    if world_size > 1 and device.type == 'cuda':
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    to_training_device(model, device)
    module = step_module(model, config, device, world_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    cosine_epochs = config.epochs - config.swa_epochs
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(  # down to min_lr, never up to it
        optimizer, T_max=cosine_epochs,
        eta_min=config.swa_lr if config.swa_epochs else min(config.min_lr, config.lr))
    averaged = torch.optim.swa_utils.AveragedModel(model) if config.swa_epochs else None
    autocast = use_bf16(config.bf16, device)
    meta = {**run_meta(model, config, meta, validator), 'world_size': world_size, 'epoch_losses': [],
            'epoch_bf16': [], 'train_time_s': 0.0}
    if validator is not None:
        meta.update(validation=[], best_epoch=None)
    start_epoch, best_state, best_meta, run_started_ns = 0, None, None, None

    def save_resume_checkpoint(epoch):
        """The resume checkpoint after ``epoch`` epochs (with its weights' checksums)."""
        extra = {} if averaged is None else dict(averaged=averaged.state_dict())
        if run_started_ns is not None:
            extra['run_started_ns'] = run_started_ns
        if best_state is not None:
            extra.update(best_model=best_state, best_meta=best_meta,
                         best_model_sha256=weights_checksum(best_state))
        state = model.state_dict()
        save_torch_atomic(dict(model=state, model_sha256=weights_checksum(state),
                               optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                               epoch=epoch, rng=rng_state(), meta=meta, **extra), last_path)

    if resume and last_path.exists():
        # mapped to the CPU: set_rng_state needs CPU tensors; load_state_dict moves the rest
        checkpoint = torch.load(last_path, map_location='cpu', weights_only=True)
        _check_resumable(last_path, checkpoint['meta'], meta)
        _check_checksums(last_path, checkpoint)
        model.load_state_dict(checkpoint['model'])
        optimizer.load_state_dict(checkpoint['optimizer'])
        scheduler.load_state_dict(checkpoint['scheduler'])
        if averaged is not None:
            averaged.load_state_dict(checkpoint['averaged'])
        set_rng_state(checkpoint['rng'])
        meta.update({k: checkpoint['meta'][k] for k in RESUMED_FIELDS if k in meta and k in checkpoint['meta']})
        start_epoch = checkpoint['epoch']
        if 'epoch_bf16' not in checkpoint['meta']:  # written before it was recorded
            meta['epoch_bf16'] = [None] * start_epoch
        if writer and any(earlier is not None and earlier != autocast for earlier in meta['epoch_bf16']):
            print(f"{name}: note: resumed with bfloat16 autocast {'on' if autocast else 'off'}, which "
                  f"was {'off' if autocast else 'on'} in earlier epochs (the device or --bf16 changed): "
                  f"the weights will differ from an uninterrupted run's (the meta's epoch_bf16 records "
                  f"each epoch's)")
        best_state = checkpoint.get('best_model')  # None: none validated yet, or an older checkpoint
        best_meta = checkpoint.get('best_meta', meta)  # as written at its epoch (older: the resumed)
        run_started_ns = checkpoint.get('run_started_ns')  # None: a run that replaced none
        if best_state is not None and writer:
            save_torch_atomic(state_checkpoint(best_state, best_meta), best_model_path(run_dir, name))
    elif writer and any(is_run_file(path.name, name) for path in run_dir.iterdir()):
        run_started_ns = file_system_time_ns(run_dir)  # replacing an earlier run: its start, recorded now
        save_resume_checkpoint(0)
        # its best model, validation curve and figures go now, so that none sits beside this run's;
        # its final model stays until this run's is written
        remove_earlier_run_files(run_dir, name, run_started_ns, keep_final_model=True)
    if world_size > 1:
        starts = [None] * world_size
        dist.all_gather_object(starts, start_epoch)
        if len(set(starts)) > 1:
            raise RunError(f"run {name!r}: the processes start at different epochs {starts} "
                           f"(by rank; from {last_path}); they need one shared output folder")
        check_processes_agree(name, meta, len(dataset), autocast, world_size)

    # one pass over every epoch left (and the one that recomputes the averaged batch norm);
    # none left (resumed from the final epoch's checkpoint): no worker is started
    loader = make_loader(dataset, config, device, start_epoch, config.epochs + bool(averaged),
                         rank, world_size)
    steps = loader.batch_sampler.batches_per_epoch
    batches = iter(loader) if len(loader.batch_sampler) else iter(())
    try:
        figure_every = config.figure_every or max(1, config.epochs // 4)
        progress = config.progress and writer
        log_every = max(1, config.epochs // 10)  # one line per tenth of the run without bars
        epochs = tqdm(range(start_epoch, config.epochs), initial=start_epoch, total=config.epochs,
                      desc=name, unit='epoch', disable=not progress)
        last_write = time.monotonic()
        for epoch in epochs:
            started = time.perf_counter()
            epoch_lr = optimizer.param_groups[0]['lr']  # the epoch's (the scheduler steps after it)
            model.train()
            loss_sum = torch.zeros((), device=device)
            count = torch.zeros((), device=device)
            for _ in tqdm(range(steps), desc=f'epoch {epoch + 1}', unit='batch', leave=False,
                          disable=not progress):
                images, _, labels = next(batches)
                try:
                    images, labels, preds, loss = train_step(module, optimizer, config.loss,
                                                             images, labels, device, config.bf16)
                except (ValueError, RuntimeError) as error:  # batch norm's, on a batch of one image
                    if len(images) > 1 or (not isinstance(error, ValueError)  # under torch.compile
                                           and BATCH_NORM_MESSAGE not in str(error)):
                        raise
                    raise RunError(
                        f"run {name!r}: a batch of one image cannot be trained ({error}): batch norm "
                        f"needs two values per channel, and crops under 64 pixels leave one at the "
                        f"encoder's end; train with at least two images per batch and process (more "
                        f"training images, --batch-size) or larger crops ({crop_option(meta)})") from error
                loss_sum += loss * len(images)
                count += len(images)
            meta['epoch_losses'].append(epoch_mean(loss_sum, count, world_size))
            meta['epoch_bf16'].append(autocast)
            if not math.isfinite(meta['epoch_losses'][-1]):  # before anything is written with it
                raise RunError(f"run {name!r}: the loss of epoch {epoch + 1} is {meta['epoch_losses'][-1]} "
                               f"(learning rate {epoch_lr:.3g}): training "
                               f"diverged; try a lower learning rate (--lr); the last checkpoint is kept")
            if epoch < cosine_epochs:
                scheduler.step()  # then constant at swa_lr
            else:
                averaged.update_parameters(model)
            seconds = time.perf_counter() - started
            meta['train_time_s'] += seconds
            epochs.set_postfix(loss=f"{meta['epoch_losses'][-1]:.4f}", lr=f'{epoch_lr:.2e}')
            if not writer:
                continue

            done = epoch + 1
            if not progress and first_every_last(done, log_every, config.epochs):
                print(f"{name}: epoch {done}/{config.epochs}, loss {meta['epoch_losses'][-1]:.4f}, "
                      f"lr {epoch_lr:.2e}, {seconds:.1f} s", flush=True)
            if validator is not None and validator.due(done, config.epochs):
                if validate(model, validator, meta, done, run_dir, name, config.figures):
                    best_state, best_meta = _cpu_state_dict(model, copy=True), copy.deepcopy(meta)
                tqdm.write(f"{name}: epoch {done}/{config.epochs}, "
                           f"{describe_scores(meta['validation'][-1])}")
                model.train()
            if (config.figures and preds.dim() == 4  # example predictions: maps only
                    and first_every_last(done, figure_every, config.epochs)):
                save_sample_figure(images, labels, preds,
                                   run_dir / f'{name}_samples_epoch{done:04d}.png')
            if (done == config.epochs
                    or (config.checkpoint_every and done % config.checkpoint_every == 0)
                    or time.monotonic() - last_write >= 60 * config.checkpoint_minutes):
                save_resume_checkpoint(done)
                if config.figures:  # with each checkpoint, so that a run still going has its curve
                    save_loss_figure(meta['epoch_losses'], run_dir / f'{name}_loss.png')
                last_write = time.monotonic()

        final_model = model
        if averaged is not None:
            started = time.perf_counter()
            recompute_batch_norm(averaged.module, itertools.islice(batches, steps), device,
                                 config.bf16)  # on the samples of one more epoch
            if world_size > 1:  # each process's share of it
                average_batch_norm_statistics(averaged.module, world_size)
            meta['train_time_s'] += time.perf_counter() - started
            final_model = averaged.module
    finally:  # the workers now, not at garbage collection (maybe in a process forked later)
        shut_down_workers(batches)
    if writer:
        if config.select == 'best':
            if best_state is None:  # resumed from a checkpoint of an earlier version
                best_state = torch.load(best_model_path(run_dir, name), map_location=device,
                                        weights_only=True)['model']
            model.load_state_dict(best_state)
        if run_started_ns is not None:
            remove_earlier_run_files(run_dir, name, run_started_ns)
        # last: a run with a final model is finished (a resume skips it), its other files written
        save_torch_atomic(model_checkpoint(final_model, meta), final_model_path(run_dir, name))
    if world_size > 1:  # every rank returns rank 0's meta (validation), once its files exist
        shared = [meta]
        dist.broadcast_object_list(shared, src=0)
        meta = shared[0]
    return meta


def validate(model, validator, meta, epoch, run_dir, name, figures=True):
    """Score ``model`` after ``epoch`` with ``validator``; record the scores in ``meta`` and in
    ``<name>_validation.csv``, write the model to ``best_<name>.pt`` when its score is the best so
    far, and the curve's figure -> whether the score is the best so far."""
    scores = validator(model)
    best = max((entry['score'] for entry in meta['validation']), default=-np.inf)
    meta['validation'].append({'epoch': epoch, **scores})
    if scores['score'] > best:
        meta['best_epoch'] = epoch
        save_torch_atomic(model_checkpoint(model, meta), best_model_path(run_dir, name))
    columns = list(meta['validation'][0])
    write_text_atomic(run_dir / f'{name}_validation.csv', '\n'.join(
        [','.join(columns)] + [','.join(f'{entry[c]:.6g}' for c in columns)
                               for entry in meta['validation']]) + '\n')
    if figures:
        plot_validation_curve(meta['validation'], run_dir / f'{name}_validation.png')
    return scores['score'] > best


def load_model(path, device='cpu'):
    """Rebuild the model of a checkpoint (final or last) -> (model in eval mode on device, meta).
    ValueError when the weights do not match the checksum in the meta (``model_checkpoint``), or
    when its meta names an architecture or option that this version's ``build_model`` lacks."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model checkpoint at {path}")
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    expected = checkpoint['meta'].get('weights_sha256')
    if expected is not None and weights_checksum(checkpoint['model']) != expected:
        raise ValueError(f"checkpoint {path}: its weights do not match the checksum in its meta; "
                         f"the file is damaged")
    config = checkpoint['meta']['model_config']
    try:
        model = build_model(config)
    except KeyError as error:  # an architecture or option of another version
        raise ValueError(f"cannot read checkpoint {path}: its meta describes a network that this version "
                         f"cannot build ({error.args[0] if error.args else error})") from None
    model.load_state_dict(checkpoint['model'])
    return model.to(device).eval(), checkpoint['meta']
