"""The generic training loop: learning, resume = uninterrupted, checkpoints, sampling, atomic writes."""

import copy
import gc
import math
import multiprocessing
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from experiments import cli, training
from experiments.training import (EpochBatchSampler, EpochDataset, TrainConfig, epoch_seed,
                                  final_model_path, last_checkpoint_path, load_model, make_loader,
                                  seed_everything, to_training_device, train)
from models.resnet import resnet18_enc_dec
from self_sup_data.mvtec import SelfSupMVTecDataset

SIZE = 64


class SquaresDataset(torch.utils.data.Dataset):
    """Gray noise with a bright square whose place depends on (seed, epoch, index); label = square."""

    def __init__(self, n=8, seed=0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image = rng.normal(0, 0.1, (3, SIZE, SIZE)).astype(np.float32)
        label = np.zeros((1, SIZE, SIZE), np.float32)
        top, left = rng.integers(0, SIZE - 16, 2)
        image[:, top:top + 16, left:left + 16] += 1.5
        label[:, top:top + 16, left:left + 16] = 1
        return torch.from_numpy(image), 0, torch.from_numpy(label)


class CrashAtEpoch(SquaresDataset):
    """Raises when asked for items of ``crash_epoch`` (an interrupted run)."""

    def __init__(self, crash_epoch, **kwargs):
        super().__init__(**kwargs)
        self.crash_epoch = crash_epoch

    def set_epoch(self, epoch):
        if epoch == self.crash_epoch:
            raise KeyboardInterrupt
        super().set_epoch(epoch)


class TinyNet(torch.nn.Module):
    """Two convolutions and a sigmoid: the loop is generic, and this keeps the tests fast."""

    def __init__(self, channels=8):
        super().__init__()
        self.config = dict(channels=channels)
        self.layers = torch.nn.Sequential(torch.nn.Conv2d(3, channels, 3, padding=1),
                                          torch.nn.ReLU(), torch.nn.Conv2d(channels, 1, 1))

    def logits(self, x):
        return self.layers(x)

    def forward(self, x):
        return torch.sigmoid(self.logits(x))


class ConstantLogit(torch.nn.Module):
    """A map of one learnt logit everywhere (a confidently wrong pixel when the target is 0)."""

    def __init__(self, logit):
        super().__init__()
        self.logit = torch.nn.Parameter(torch.tensor(float(logit)))

    def logits(self, x):
        return self.logit.expand(len(x), 1, *x.shape[2:]) * torch.ones_like(x[:, :1])

    def forward(self, x):
        return torch.sigmoid(self.logits(x))


class TinyBatchNormNet(TinyNet):
    """TinyNet with a batch norm after its first convolution (weight averaging recomputes it)."""

    def __init__(self, channels=4):
        super().__init__(channels)
        self.layers.insert(1, torch.nn.BatchNorm2d(channels))


class ViewsDataset(SquaresDataset):
    """Multi-view items: each image as it is (class 0) and with a bright square (class 1)."""

    def __getitem__(self, index):
        image, _, label = super().__getitem__(index)
        plain = image - 1.5 * label
        return torch.stack([plain, image]), 0, torch.tensor([0, 1])


class TinyClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = dict()
        self.layers = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                          torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten(),
                                          torch.nn.Linear(4, 2))

    def forward(self, x):
        return self.layers(x)


class PlainSGD:
    """``p <- p - lr * grad``: the optimiser of the training-step tests. A ``torch.optim``
    optimiser imports ``torch._dynamo`` when it is made (~2.5 s on the CPU), which the quick test
    loop leaves to the training runs marked slow."""

    def __init__(self, params, lr):
        self.params, self.lr = list(params), lr

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        for p in self.params:
            if p.grad is not None:
                p -= self.lr * p.grad


def fresh_model(seed=0):
    seed_everything(seed)
    return TinyNet()


def config(**kwargs):
    defaults = dict(epochs=2, batch_size=4, seed=0, figures=False, progress=False,
                    checkpoint_every=1)
    return TrainConfig(**{**defaults, **kwargs})


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_training_lowers_the_loss_and_reports_it_without_progress_bars(tmp_path, capsys):
    meta = train(fresh_model(), SquaresDataset(n=8), config(epochs=3), tmp_path, 'toy',
                 meta=dict(category='squares'))
    losses = meta['epoch_losses']
    assert len(losses) == 3 and losses[-1] < losses[0]
    lines = capsys.readouterr().out.splitlines()  # one line per tenth of the run, at least each epoch
    # each epoch's learning rate, the cosine's from 1e-3 at epoch 1 (not the next epoch's)
    rates = [1e-6 + (1e-3 - 1e-6) * (1 + math.cos(math.pi * e / 3)) / 2 for e in range(3)]
    assert [line.split(', ')[:3] for line in lines] == [
        [f'toy: epoch {e + 1}/3', f'loss {loss:.4f}', f'lr {rate:.2e}'] for e, (loss, rate) in enumerate(
            zip(losses, rates))]
    assert meta['train_time_s'] > 0 and meta['category'] == 'squares'
    assert final_model_path(tmp_path, 'toy').is_file()
    assert last_checkpoint_path(tmp_path, 'toy').is_file()
    # an initial rate below min_lr stays constant: the cosine never rises to min_lr
    train(fresh_model(), SquaresDataset(n=8), config(epochs=3, lr=1e-8), tmp_path / 'low', 'toy')
    assert [line.split(', ')[2] for line in capsys.readouterr().out.splitlines()] == ['lr 1.00e-08'] * 3


@pytest.mark.slow
def test_resume_ends_in_the_same_state_as_an_uninterrupted_run(tmp_path):
    whole, parts = tmp_path / 'whole', tmp_path / 'parts'
    meta = train(fresh_model(), SquaresDataset(), config(), whole, 'toy')
    with pytest.raises(KeyboardInterrupt):
        train(fresh_model(), CrashAtEpoch(1), config(), parts, 'toy')
    assert not final_model_path(parts, 'toy').exists()
    assert torch.load(last_checkpoint_path(parts, 'toy'), weights_only=True)['epoch'] == 1
    resumed = train(fresh_model(seed=1), SquaresDataset(), config(), parts, 'toy', resume=True)

    assert resumed['epoch_losses'] == meta['epoch_losses']
    a = torch.load(last_checkpoint_path(whole, 'toy'), weights_only=True)
    b = torch.load(last_checkpoint_path(parts, 'toy'), weights_only=True)
    assert_same_state(a['model'], b['model'])
    assert a['scheduler'] == b['scheduler']
    for state_a, state_b in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert_same_state(state_a, state_b)
    final_a = torch.load(final_model_path(whole, 'toy'), weights_only=True)['model']
    assert_same_state(final_a, torch.load(final_model_path(parts, 'toy'), weights_only=True)['model'])


@pytest.mark.slow
def test_resume_from_the_final_epoch_writes_the_model_without_reading_a_batch(tmp_path,
                                                                               monkeypatch):
    """A run killed while writing its final model resumes from the final epoch's checkpoint: the
    model is written from it, and no loader is iterated (its workers would start for nothing)."""
    meta = train(fresh_model(), SquaresDataset(), config(), tmp_path, 'toy')
    expected = torch.load(final_model_path(tmp_path, 'toy'), weights_only=True)['model']
    final_model_path(tmp_path, 'toy').unlink()

    def no_batches(self):
        raise AssertionError('a loader was iterated')
    monkeypatch.setattr(training.OneOpenCVThreadLoader, '__iter__', no_batches)
    resumed = train(fresh_model(seed=1), SquaresDataset(), config(), tmp_path, 'toy', resume=True)

    assert resumed['epoch_losses'] == meta['epoch_losses']
    assert_same_state(torch.load(final_model_path(tmp_path, 'toy'), weights_only=True)['model'],
                      expected)


@pytest.mark.parametrize('bf16, device, supported, expected', [
    (None, 'cpu', True, False), (None, 'cuda', True, True), (None, 'cuda', False, False),
    (True, 'cpu', False, True), (False, 'cuda', True, False)])
def test_bf16_is_on_for_cuda_devices_that_support_it_and_on_the_cpu_on_request(
        bf16, device, supported, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda: supported)
    assert training.use_bf16(bf16, torch.device(device)) is expected


def test_bf16_step_runs_the_forward_pass_in_bfloat16_and_the_loss_in_float32():
    cpu = torch.device('cpu')
    images, _, labels = next(iter(DataLoader(SquaresDataset(n=4), batch_size=4)))
    for bf16, dtype in ((None, torch.float32), (True, torch.bfloat16)):
        model = to_training_device(fresh_model(), cpu)
        optimizer = PlainSGD(model.parameters(), lr=1e-3)
        before = [p.detach().clone() for p in model.parameters()]
        module = training.training_module(model, 'bce')
        _, _, preds, loss = training.train_step(module, optimizer, 'bce', images, labels, cpu, bf16)
        loss = loss.item()
        assert preds.dtype == dtype and np.isfinite(loss)
        assert all(p.dtype == torch.float32 for p in model.parameters())  # float32 master weights
        assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # the loss is of the logits in float32; the predictions are their sigmoid in bfloat16
    expected = torch.nn.functional.binary_cross_entropy(preds.float(), labels).item()
    assert loss == pytest.approx(expected, rel=1e-2)


@pytest.mark.parametrize('bf16', [None, True])
def test_bce_trains_on_logits_so_a_confident_wrong_pixel_keeps_its_gradient(bf16):
    """At logit 10 and target 0 the BCE gradient is sigmoid(10) - 0 ~ 1, also with a bfloat16
    forward pass (whose sigmoid would round to 1.0 and give a gradient of 0)."""
    cpu = torch.device('cpu')
    model = ConstantLogit(10)
    optimizer = PlainSGD(model.parameters(), lr=0)
    images, labels = torch.zeros(2, 3, 8, 8), torch.zeros(2, 1, 8, 8)
    _, _, preds, loss = training.train_step(training.training_module(model, 'bce'), optimizer,
                                            'bce', images, labels, cpu, bf16)
    assert model.logit.grad.item() == pytest.approx(torch.sigmoid(torch.tensor(10.)).item(), rel=1e-3)
    assert loss.item() == pytest.approx(10 + np.log1p(np.exp(-10)), rel=1e-3)
    torch.testing.assert_close(preds, torch.sigmoid(torch.full_like(preds, 10.)))


@pytest.mark.parametrize('logit, grad_zero', [(-3.0, False), (2.0, False), (5.0, False),
                                              (7.0, True), (10.0, True)])
@pytest.mark.parametrize('target', [0.0, 0.3, 1.0])
def test_bce_of_the_bfloat16_sigmoid_is_the_earlier_loss_without_gradient_where_it_rounds_to_1(
        logit, grad_zero, target):
    """'bce-bf16' is the float32 BCE of the sigmoid computed in bfloat16, as the earlier bfloat16
    training took it from the model's output: an independent computation (torch's BCE of a
    bfloat16 sigmoid) gives the same loss and gradient; the gradient is 0 above a logit of ~6.2
    whatever the target, and within bfloat16 rounding of the exact BCE's below."""
    logits, expected_logits = (torch.full((1, 1, 2, 2), logit, requires_grad=True) for _ in range(2))
    labels = torch.full((1, 1, 2, 2), target)
    loss = training.LOSS_FUNCTIONS['bce-bf16'](logits, labels)
    loss.backward()
    expected = torch.nn.functional.binary_cross_entropy(
        torch.sigmoid(expected_logits.to(torch.bfloat16)).float(), labels)
    expected.backward()
    assert loss.item() == expected.item()
    assert torch.equal(logits.grad, expected_logits.grad)
    exact = torch.sigmoid(torch.tensor(logit)) - target  # the exact BCE's gradient, per pixel
    if grad_zero:
        assert (logits.grad == 0).all()
    else:
        torch.testing.assert_close(logits.grad, torch.full_like(logits, exact.item() / 4),
                                   rtol=0.02, atol=1e-3)  # s rounded by up to 2e-3


@pytest.mark.parametrize('target', [0.0, 0.3, 1.0])
def test_focal_loss_is_the_bce_weighted_by_the_squared_error_of_each_pixel(target):
    """'focal': mean of |y - p|^2 BCE(p, y) (independent computation in numpy), with p the
    sigmoid of the logits; for a target of 0 or 1 that is Lin et al.'s focal loss, (1 - p_t)^2
    (-log p_t); the gradient keeps the sign of the exact BCE's and vanishes where p = y."""
    logits = torch.tensor([[[[-4.0, -0.8473], [0.5, 6.0]]]], requires_grad=True)  # -0.8473: p = 0.3
    labels = torch.full_like(logits, target)
    loss = training.LOSS_FUNCTIONS['focal'](logits, labels)
    loss.backward()
    x = logits.detach().double().numpy()
    p = 1 / (1 + np.exp(-x))
    bce = -(target * np.log(p) + (1 - target) * np.log(1 - p))
    assert loss.item() == pytest.approx(float(np.mean(np.abs(target - p) ** 2 * bce)), rel=1e-5)
    if target in (0.0, 1.0):
        p_t = p if target == 1 else 1 - p
        assert loss.item() == pytest.approx(float(np.mean((1 - p_t) ** 2 * -np.log(p_t))), rel=1e-5)
    grad = logits.grad.double().numpy()
    exact = p - target  # the BCE's gradient, per pixel
    moving = np.abs(exact) > 1e-3
    assert (np.sign(grad[moving]) == np.sign(exact[moving])).all()
    assert np.abs(grad[~moving]).max(initial=0) < 1e-6


def test_focal_loss_weighs_well_predicted_pixels_less_than_bce():
    """Against the exact BCE, the focal loss shifts the gradient to the poorly predicted pixels:
    a well-predicted background pixel's gradient shrinks far more than a missed anomaly's."""
    logits = torch.tensor([[[[-5.0, -5.0]]]], requires_grad=True)  # background right, anomaly missed
    labels = torch.tensor([[[[0.0, 1.0]]]])
    training.LOSS_FUNCTIONS['focal'](logits, labels).backward()
    focal = logits.grad.clone()
    logits.grad = None
    training.LOSS_FUNCTIONS['bce'](logits, labels).backward()
    ratio = (focal / logits.grad).abs()
    assert ratio[0, 0, 0, 0] < 1e-3 < 0.9 < ratio[0, 0, 0, 1]


def test_focal_loss_trains_on_the_logits_and_predicts_the_sigmoid_map():
    """--loss focal (``cli.training_loss``) replaces a BCE setting's loss; its training step takes
    the model's logits and returns the sigmoid map, as BCE's does, and the step learns."""
    assert cli.training_loss(SimpleNamespace(loss='focal'), 'bce') == 'focal'
    cpu = torch.device('cpu')
    torch.manual_seed(0)
    model = resnet18_enc_dec(final_activation='sigmoid')
    module = training.training_module(model, 'focal')
    assert isinstance(module, training.Logits)
    images, labels = torch.rand(2, 3, 32, 32), (torch.rand(2, 1, 32, 32) > 0.7).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    _, _, preds, first = training.train_step(module, optimizer, 'focal', images, labels, cpu)
    assert preds.min() >= 0 and preds.max() <= 1
    for _ in range(5):
        _, _, _, last = training.train_step(module, optimizer, 'focal', images, labels, cpu)
    assert last.item() < first.item()


def test_the_earlier_loss_is_reproduced_on_a_bfloat16_training_step():
    """The earlier bfloat16 training step took the BCE of the model's output (its sigmoid computed
    inside autocast); train_step with 'bce-bf16' gives the same loss and gradients."""
    cpu = torch.device('cpu')
    torch.manual_seed(0)
    model = resnet18_enc_dec(final_activation='sigmoid')
    earlier = copy.deepcopy(model)
    images, labels = torch.rand(2, 3, 32, 32), (torch.rand(2, 1, 32, 32) > 0.7).float()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        outputs = earlier(training.model_input(images, cpu))  # channels_last, as train_step's
    expected = torch.nn.functional.binary_cross_entropy(outputs.float(), labels)
    expected.backward()
    optimizer = PlainSGD(model.parameters(), lr=0)
    _, _, preds, loss = training.train_step(training.training_module(model, 'bce-bf16'), optimizer,
                                            'bce-bf16', images, labels, cpu, bf16=True)
    assert loss.item() == expected.item()
    torch.testing.assert_close(preds, outputs.detach())
    for (name, a), b in zip(model.named_parameters(), earlier.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_bce_needs_a_sigmoid_model_with_logits():
    with pytest.raises(ValueError, match='TinyClassifier has no logits method'):
        training.training_module(TinyClassifier(), 'bce')
    with pytest.raises(ValueError, match="final activation is 'sigmoid', got 'relu'"):
        training.training_module(resnet18_enc_dec(final_activation='relu'), 'bce')
    model = TinyClassifier()
    assert training.training_module(model, 'cross_entropy') is model


def test_a_diverged_loss_stops_the_run_before_anything_is_written(tmp_path, capsys):
    from experiments.cli import train_unless_finished
    model = TinyNet()
    with torch.no_grad():
        model.layers[2].bias.fill_(float('nan'))
    config = TrainConfig(epochs=2, batch_size=4, figures=False, progress=False, checkpoint_minutes=0)
    with pytest.raises(training.RunError, match=r"run 'toy': the loss of epoch 1 is nan \(learning "
                                                r"rate 0.001\): training diverged"):
        training.train(model, SquaresDataset(n=4), config, tmp_path, 'toy')
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit) as stop:  # the command lines print it as one line
        train_unless_finished('prog', tmp_path, 'toy',
                              lambda: (SquaresDataset(n=4), model, config, {}, None))
    assert stop.value.code == 1
    assert capsys.readouterr().err.startswith("prog: error: run 'toy': the loss of epoch 1 is nan")


@pytest.mark.slow
def test_bf16_training_lowers_the_loss_and_may_change_on_resume(tmp_path, capsys):
    """bf16 is a runtime field: a run interrupted in float32 may go on in bfloat16 (on another
    device, say), with a note, and the meta records each epoch's precision."""
    with pytest.raises(KeyboardInterrupt):
        train(fresh_model(), CrashAtEpoch(1), config(epochs=3), tmp_path, 'toy')
    capsys.readouterr()
    meta = train(fresh_model(), SquaresDataset(), config(epochs=3, bf16=True), tmp_path, 'toy',
                 resume=True)
    assert meta['train_config']['bf16'] is True and meta['epoch_bf16'] == [False, True, True]
    assert ("toy: note: resumed with bfloat16 autocast on, which was off in earlier epochs"
            in capsys.readouterr().out)
    losses = meta['epoch_losses']
    assert len(losses) == 3 and losses[-1] < losses[0]
    whole = train(fresh_model(), SquaresDataset(), config(epochs=2), tmp_path / 'whole', 'toy')
    assert whole['epoch_bf16'] == [False, False] and 'note' not in capsys.readouterr().out


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train(fresh_model(), CrashAtEpoch(1), config(), tmp_path, 'toy', meta=dict(category='a'))
    with pytest.raises(ValueError, match="category: 'a' vs 'b'"):
        train(fresh_model(), SquaresDataset(), config(), tmp_path, 'toy', meta=dict(category='b'),
              resume=True)
    with pytest.raises(ValueError, match='epochs: 2 vs 3'):
        train(fresh_model(), SquaresDataset(), config(epochs=3), tmp_path, 'toy',
              meta=dict(category='a'), resume=True)


def test_meta_entries_added_later_do_not_make_an_earlier_checkpoint_another_run():
    earlier = dict(category='a', train_config=dict(epochs=2))  # written before this entry
    now = {**earlier, 'validation_background': [0, 20], 'search_calibration': dict(auto=dict(samples=300))}
    assert training.run_differences(earlier, now) == []
    assert training.run_differences({**earlier, 'search_calibration': None}, now) == [
        'search_calibration: None vs {\'auto\': {\'samples\': 300}}']
    # an absent bit depth is that of 8-bit images: another run than one of 16-bit images
    assert training.run_differences(earlier, {**now, 'bit_depth': 16}) == ['bit_depth: absent vs 16']
    # a run validated on an earlier definition of the validation set (no version) is another run:
    # its validation curve does not compare with the scores a resume would add; without one, the same
    assert training.run_differences({**earlier, 'held_out': 7}, {**now, 'held_out': 7, 'validation_version': 2}) == [
        'validation_version: absent vs 2']
    assert training.run_differences(earlier, {**now, 'validation_version': None}) == []


def test_differences_name_the_nested_entries_that_differ():
    saved = dict(epochs=2, args=dict(patches=4, label=(1, 3), sizes=dict(low=0.1)), gone=None)
    now = dict(epochs=2, args=dict(patches=8, label=(1, 3), sizes=dict(low=0.2), new=True),
               added='x')
    assert training.dict_differences(saved, now) == [
        "added: absent vs 'x'", 'args.new: absent vs True', 'args.patches: 4 vs 8',
        'args.sizes.low: 0.1 vs 0.2']  # a missing entry equals None ('gone')
    assert training.dict_differences(dict(args=dict(a=1)), dict(args=None)) == [
        "args: {'a': 1} vs None"]
    assert training.dict_differences(saved, saved) == []
    report = {f'measure_{i}': i / 7 for i in range(20)}  # a calibration report against none: cut short
    line, = training.dict_differences(dict(calibration=report), dict(calibration=None))
    shown = repr(report)[:training.SHOWN_LENGTH - 4] + ' ...'
    assert line == f'calibration: {shown} vs None' and len(shown) == training.SHOWN_LENGTH
    long_paths = ['/data/' + 'x' * 90 + end for end in ('a', 'b')]  # differing at the end: shown whole
    assert training.dict_differences(dict(data_dir=long_paths[0]), dict(data_dir=long_paths[1])) == [
        f'data_dir: {long_paths[0]!r} vs {long_paths[1]!r}']


@pytest.mark.slow
def test_checkpoints_load_with_weights_only_and_rebuild_the_model(tmp_path):
    seed_everything(0)
    model = resnet18_enc_dec(final_activation='relu')
    meta = train(model, SquaresDataset(n=4), config(epochs=1, loss='mse'), tmp_path, 'toy',
                 meta=dict(setting='Shift', self_sup_args=dict(width_bounds_pct=((0.1, 0.2),) * 2)))
    for path in (final_model_path(tmp_path, 'toy'), last_checkpoint_path(tmp_path, 'toy')):
        loaded, loaded_meta = load_model(path)
        assert not loaded.training
        assert loaded_meta['model_config'] == model.config
        assert loaded_meta['epoch_losses'] == meta['epoch_losses']
        assert loaded_meta['train_config']['loss'] == 'mse'
        assert loaded_meta['self_sup_args']['width_bounds_pct'] == ((0.1, 0.2),) * 2
        assert_same_state(loaded.state_dict(), model.state_dict())
        x = torch.randn(2, 3, SIZE, SIZE)
        with torch.no_grad():  # in the layout it was trained in: the same maps exactly
            assert torch.equal(to_training_device(loaded, torch.device('cpu'))(x), model.eval()(x))
    with pytest.raises(FileNotFoundError, match='missing.pt'):
        load_model(tmp_path / 'missing.pt')


@pytest.mark.slow
def test_classifier_trains_on_multi_view_items(tmp_path):
    seed_everything(0)
    meta = train(TinyClassifier(), ViewsDataset(n=8), config(epochs=4, loss='cross_entropy', lr=1e-2,
                                                             figures=True), tmp_path, 'views')
    losses = meta['epoch_losses']
    assert len(losses) == 4 and losses[-1] < losses[0]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert 'views_loss.png' in names and not any('samples' in name for name in names)


@pytest.mark.slow
def test_figures_are_written(tmp_path):
    pytest.importorskip('experiments.plotting')
    train(fresh_model(), SquaresDataset(n=4), config(epochs=2, figures=True, figure_every=1),
          tmp_path, 'toy')
    names = sorted(p.name for p in tmp_path.iterdir())
    assert 'toy_loss.png' in names
    assert {'toy_samples_epoch0001.png', 'toy_samples_epoch0002.png'} <= set(names)


@pytest.mark.slow
def test_loss_figure_is_written_with_each_checkpoint(tmp_path, monkeypatch):
    """A run still going (or stopped) has the loss curve of its last checkpoint."""
    drawn = []
    plot = training.plot_loss_curve
    monkeypatch.setattr(training, 'plot_loss_curve', lambda losses, path: (
        drawn.append((len(losses), (tmp_path / 'last_toy.pt').is_file(), (tmp_path / 'final_toy.pt').is_file())),
        plot(losses, path))[1])
    train(fresh_model(), SquaresDataset(n=4), config(epochs=3, figures=True, checkpoint_every=1), tmp_path, 'toy')
    assert drawn == [(1, True, False), (2, True, False), (3, True, False)]
    assert (tmp_path / 'toy_loss.png').is_file()


def test_sampler_order_depends_only_on_seed_and_epoch():
    def order(seed, epoch):
        return [key for batch in EpochBatchSampler(10, 4, seed, epoch + 1, epoch) for key in batch]
    assert order(3, 1) == order(3, 1)
    assert sorted(index for _, index in order(3, 1)) == list(range(10))
    assert {epoch for epoch, _ in order(3, 1)} == {1}
    assert order(3, 1) != order(3, 2) and order(3, 1) != order(4, 1)


def per_epoch_batches(size, batch_size, seed, epochs):
    """The batches of keys of a new loader per epoch over the epoch's randperm (the order before
    one loader pass covered all the epochs)."""
    batches = []
    for epoch in range(epochs):
        generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        order = torch.randperm(size, generator=generator).tolist()
        batches += [[(epoch, i) for i in order[start:start + batch_size]]
                    for start in range(0, size, batch_size)]
    return batches


def test_one_pass_draws_the_per_epoch_batches_and_resumes_mid_way():
    sampler = EpochBatchSampler(10, 4, seed=7, epochs=3)
    assert list(sampler) == per_epoch_batches(10, 4, 7, 3) and len(sampler) == 9
    assert sampler.batches_per_epoch == 3
    assert list(EpochBatchSampler(10, 4, seed=7, epochs=3, start_epoch=2)) == list(sampler)[6:]


@pytest.mark.parametrize('size, world_size', [(12, 2), (10, 2), (11, 2), (7, 3), (2, 4)])
def test_ranks_take_disjoint_padded_shares_that_make_up_the_single_process_batches(size,
                                                                                   world_size):
    shares = [list(EpochBatchSampler(size, 2, 5, 2, rank=r, world_size=world_size))
              for r in range(world_size)]
    single = list(EpochBatchSampler(size, 2 * world_size, 5, 2))
    assert all(len(share) == len(shares[0]) for share in shares)
    per_rank = -(-size // world_size)  # padded to equal size
    dropped = per_rank > 1 and per_rank % 2 == 1  # each rank's last batch of one
    for epoch in range(2):
        keys = [[k for batch in share for k in batch if k[0] == epoch] for share in shares]
        assert all(len(k) == per_rank - dropped for k in keys)
        if not dropped:
            assert {i for k in keys for _, i in k} == set(range(size))
        if size % world_size == 0:  # no padding: disjoint
            assert len({i for k in keys for _, i in k}) == sum(len(k) for k in keys)
    if size % world_size == 0 and not dropped:
        padded = [sorted(sum((share[i] for share in shares), [])) for i in range(len(single))]
        assert padded == [sorted(batch) for batch in single]


@pytest.mark.slow
def test_loader_gives_the_datasets_items_bit_identical_with_uint8_images_in_workers(tiny_mvtec):
    """Batches of the one-pass loader with workers, uint8 images normalised on the device, are
    the items of today's per-epoch order read from the dataset directly, bit for bit."""
    dataset = SelfSupMVTecDataset(*tiny_mvtec, seed=3, res_scale=0.25,
                                  self_sup_args=dict(width_bounds_pct=((0.1, 0.3), (0.1, 0.3))))
    cpu = torch.device('cpu')
    loader = make_loader(dataset, config(epochs=2, batch_size=3, workers=2, seed=3), cpu)
    expected = per_epoch_batches(len(dataset), 3, 3, 2)
    batches = list(loader)
    assert len(batches) == len(expected)
    for (images, _, labels), keys in zip(batches, expected):
        assert images.dtype == torch.uint8
        for image, label, (epoch, index) in zip(training.model_input(images, cpu), labels, keys):
            dataset.set_epoch(epoch)
            item = dataset[index]
            assert torch.equal(image, item[0]) and torch.equal(label, item[2])
    assert dataset.uint8_tensors is False  # the loader reads a copy


@pytest.mark.slow
def test_checkpoints_every_minutes_every_epochs_and_after_the_last_epoch(tmp_path, monkeypatch):
    written = []
    save = training.save_torch_atomic
    monkeypatch.setattr(training, 'save_torch_atomic', lambda obj, path: (
        written.append((path.name, obj.get('epoch'), 'optimizer' in obj)), save(obj, path))[1])

    def run(run_dir='run', **kwargs):
        written.clear()
        train(fresh_model(), SquaresDataset(n=4), config(epochs=5, **kwargs), tmp_path / run_dir,
              'toy')
        return [(name, epoch) for name, epoch, _ in written]
    assert run(checkpoint_every=None) == [('last_toy.pt', 5), ('final_toy.pt', None)]
    assert [name for name, _, optimizer in written if optimizer] == ['last_toy.pt']
    assert run('every 2', checkpoint_every=2) == [('last_toy.pt', 2), ('last_toy.pt', 4), ('last_toy.pt', 5),
                                                  ('final_toy.pt', None)]
    assert run('every minute', checkpoint_every=None, checkpoint_minutes=0) == (
        [('last_toy.pt', e) for e in range(1, 6)] + [('final_toy.pt', None)])
    # a run from scratch where another run's files are: its start is checkpointed first
    assert run('every 2', checkpoint_every=2) == [('last_toy.pt', 0), ('last_toy.pt', 2), ('last_toy.pt', 4),
                                                  ('last_toy.pt', 5), ('final_toy.pt', None)]


@pytest.mark.slow
def test_resume_with_another_world_size_is_refused_by_name(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train(fresh_model(), CrashAtEpoch(1), config(), tmp_path, 'toy')
    path = last_checkpoint_path(tmp_path, 'toy')
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint['meta']['world_size'] == 1
    checkpoint['meta']['world_size'] = 2
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match='trained with world_size 2, this run has world_size 1'):
        train(fresh_model(), SquaresDataset(), config(), tmp_path, 'toy', resume=True)
    del checkpoint['meta']['world_size']  # written before the field: one process
    torch.save(checkpoint, path)
    assert len(train(fresh_model(), SquaresDataset(), config(), tmp_path, 'toy',
                     resume=True)['epoch_losses']) == 2


class EpochEcho(torch.utils.data.Dataset):
    """Item = (epoch, index) as seen by the process that reads it."""

    def __init__(self):
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return 6

    def __getitem__(self, index):
        return torch.tensor([self.epoch, index]), 0, torch.zeros(1)


def test_workers_see_every_epoch():
    def items(workers):
        loader = make_loader(EpochEcho(), config(epochs=3, workers=workers, batch_size=2),
                             torch.device('cpu'))
        return torch.cat([batch[0] for batch in loader]).tolist()
    single = items(0)
    assert [e for e, _ in single] == [0] * 6 + [1] * 6 + [2] * 6
    assert items(2) == single


def test_training_stops_its_loader_workers_when_it_returns_or_fails(tmp_path):
    """The loader's workers stop when ``train`` returns or raises, not when the garbage collector
    frees its iterator (a reference cycle keeps it): that may happen in a process forked later,
    such as the next run's DataLoader worker (--recipe search's candidates), which then fails."""
    gc.collect()
    gc.disable()
    try:
        training.train(TinyNet(), SquaresDataset(n=8), config(epochs=2, workers=1), tmp_path, 'done')
        assert multiprocessing.active_children() == []
        diverging = TinyNet()
        with torch.no_grad():
            diverging.layers[2].bias.fill_(float('nan'))
        with pytest.raises(training.RunError, match='training diverged'):
            training.train(diverging, SquaresDataset(n=8), config(epochs=2, workers=1), tmp_path, 'diverged')
        assert multiprocessing.active_children() == []
    finally:
        gc.enable()


class OpenCVThreads(EpochEcho):
    def __getitem__(self, index):
        return torch.tensor(cv2.getNumThreads()), 0, torch.zeros(1)


def test_loader_workers_run_opencv_on_one_thread_and_the_main_process_keeps_its_own():
    threads = cv2.getNumThreads()
    loader = make_loader(OpenCVThreads(), config(epochs=1, workers=2, batch_size=2),
                         torch.device('cpu'))
    assert torch.cat([batch[0] for batch in loader]).tolist() == [1] * 6
    assert cv2.getNumThreads() == threads


def test_epoch_dataset_sets_the_epoch_once_per_epoch():
    calls = []
    dataset = EpochEcho()
    dataset.set_epoch = calls.append
    wrapped = EpochDataset(dataset)
    loader = DataLoader(wrapped, batch_sampler=EpochBatchSampler(6, 2, 0, epochs=2))
    list(loader)
    assert calls == [0, 1]


@pytest.mark.slow
def test_swa_model_is_the_average_of_the_last_epochs_with_batch_norm_of_the_average(tmp_path):
    """epochs 4, swa_epochs 2: the cosine reaches swa_lr after 2 epochs; the final model's
    parameters are the mean of those after epochs 3 and 4, its batch-norm statistics those of the
    averaged convolution on the samples of one more epoch (index 4); resume ends in the same
    state."""
    swa = config(epochs=4, swa_epochs=2, lr=1e-2, swa_lr=3e-3)

    def model():
        seed_everything(0)
        return TinyBatchNormNet()
    with pytest.raises(KeyboardInterrupt):
        train(model(), CrashAtEpoch(3), swa, tmp_path / 'parts', 'toy')
    after_3 = torch.load(last_checkpoint_path(tmp_path / 'parts', 'toy'), weights_only=True)
    assert after_3['optimizer']['param_groups'][0]['lr'] == pytest.approx(3e-3)
    train(model(), SquaresDataset(), swa, tmp_path / 'whole', 'toy')
    after_4 = torch.load(last_checkpoint_path(tmp_path / 'whole', 'toy'), weights_only=True)
    final = torch.load(final_model_path(tmp_path / 'whole', 'toy'), weights_only=True)['model']

    for name, _ in TinyBatchNormNet().named_parameters():
        expected = (after_3['model'][name] + after_4['model'][name]) / 2
        torch.testing.assert_close(final[name], expected, rtol=0, atol=1e-6)
        assert not torch.allclose(final[name], after_4['model'][name])
    data = SquaresDataset()
    data.set_epoch(4)
    images = torch.stack([data[i][0] for i in range(len(data))])
    conv = torch.nn.functional.conv2d(images, final['layers.0.weight'], final['layers.0.bias'],
                                      padding=1)
    torch.testing.assert_close(final['layers.1.running_mean'], conv.mean(dim=(0, 2, 3)),
                               rtol=1e-4, atol=1e-5)
    assert not torch.allclose(final['layers.1.running_mean'],
                              after_4['model']['layers.1.running_mean'])

    train(model(), SquaresDataset(), swa, tmp_path / 'parts', 'toy', resume=True)
    resumed = torch.load(final_model_path(tmp_path / 'parts', 'toy'), weights_only=True)['model']
    assert_same_state(resumed, final)


@pytest.mark.slow
def test_resume_accepts_a_checkpoint_written_before_the_swa_fields(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train(fresh_model(), CrashAtEpoch(1), config(), tmp_path, 'toy')
    path = last_checkpoint_path(tmp_path, 'toy')
    checkpoint = torch.load(path, weights_only=True)
    for field in ('swa_epochs', 'swa_lr'):
        del checkpoint['meta']['train_config'][field]
    del checkpoint['meta']['epoch_bf16']  # nor the per-epoch autocast
    torch.save(checkpoint, path)
    meta = train(fresh_model(), SquaresDataset(), config(), tmp_path, 'toy', resume=True)
    assert len(meta['epoch_losses']) == 2
    assert meta['epoch_bf16'] == [None, False]  # the resumed epoch's is not known
    with pytest.raises(ValueError, match='swa_epochs: 0 vs 1'):
        train(fresh_model(), SquaresDataset(), config(epochs=3, swa_epochs=1), tmp_path, 'toy',
              resume=True)


def test_config_validation():
    with pytest.raises(ValueError, match='loss'):
        TrainConfig(epochs=1, loss='l1')
    with pytest.raises(ValueError, match='epochs'):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match='swa_epochs .*less than epochs \\(3\\), got 3'):
        TrainConfig(epochs=3, swa_epochs=3)
    with pytest.raises(ValueError, match='swa_lr'):
        TrainConfig(epochs=3, swa_epochs=1, swa_lr=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='CUDA'):
            training.resolve_device('cuda')
    for name in ('mps', 'xpu', 'meta'):  # devices torch knows, which the project does not run on
        with pytest.raises(ValueError, match=f"device '{name}': this project runs on 'cpu', 'cuda'"):
            training.resolve_device(name)
    with pytest.raises(ValueError, match=r"device 'cuda:99' requested but (there are \d+ CUDA|CUDA is not)"):
        training.resolve_device('cuda:99')


def test_a_gpu_index_is_refused_where_torchrun_launches_several_processes_on_the_machine(monkeypatch):
    """'cuda:0' in a launch of two processes per machine would put both on GPU 0; 'cuda' gives each the
    GPU of its LOCAL_RANK, and one process per machine may name its GPU."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setenv('WORLD_SIZE', '4')
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')
    monkeypatch.setenv('LOCAL_RANK', '1')
    with pytest.raises(ValueError, match=r"device 'cuda:0': the 2 processes that torchrun launches on this "
                                         r"machine would all train on that one GPU; give 'cuda'"):
        training.resolve_device('cuda:0')
    assert training.resolve_device('cuda') == torch.device('cuda', 1)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '1')  # one process on each of four machines
    assert training.resolve_device('cuda:1') == torch.device('cuda', 1)


def test_a_world_size_without_the_rest_of_torchruns_environment_is_one_line(monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '2')
    for name in ('RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('MASTER_PORT', '29500')
    with pytest.raises(training.RunError, match='WORLD_SIZE is 2 but RANK, MASTER_ADDR are not set: launch the '
                                                'processes with torchrun'):
        training.init_distributed(torch.device('cpu'))


def test_processes_differ_by_their_data_and_arguments_not_by_where_the_data_lies():
    """The runs of two torchrun processes (training images, meta, autocast): the data's folders may
    differ between machines; its size, the arguments and the autocast may not."""
    def run(size=8, bf16=False, root='/machine0', **meta):
        layout = dict(format='folder', normal=f'{root}/good', abnormal=f'{root}/bad', mask_dir=None,
                      held_out_sha256='abc')
        return size, dict(dict(data_dir=f'{root}/data', normal_list=f'{root}/list.txt', layout=layout,
                               train_files_sha256='f', epochs=3), **meta), bf16
    assert training.process_differences(run(), run(root='/machine1')) == []
    assert training.process_differences(run(), run(size=7)) == ['training images: 8 vs 7']
    assert training.process_differences(run(), run(bf16=True)) == [
        'bfloat16 autocast: False vs True (--bf16, or the devices differ in bfloat16 support)']
    assert training.process_differences(run(), run(train_files_sha256='g', root='/machine1')) == [
        "train_files_sha256: 'f' vs 'g'"]
    assert training.without_locations(run()[1])['layout'] == dict(
        format='folder', normal=None, abnormal=None, mask_dir=None, held_out_sha256='abc')


@pytest.mark.slow
def test_compiled_step_learns_what_the_eager_step_learns(tmp_path):
    """torch.compile (about a minute and a half to compile on 2 CPU cores)."""
    eager = train(fresh_model(), SquaresDataset(), config(), tmp_path / 'eager', 'toy')
    compiled = train(fresh_model(), SquaresDataset(), config(compile=True), tmp_path / 'compiled',
                     'toy')
    assert compiled['epoch_losses'] == pytest.approx(eager['epoch_losses'], rel=1e-4)
    a = torch.load(final_model_path(tmp_path / 'eager', 'toy'), weights_only=True)['model']
    b = torch.load(final_model_path(tmp_path / 'compiled', 'toy'), weights_only=True)['model']
    assert a.keys() == b.keys()  # the compiled wrapper leaves the saved names alone
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize('message,named', [
    (f'TorchRuntimeError: RuntimeError when making fake tensor call: {training.BATCH_NORM_MESSAGE} '
     'when training, got input size torch.Size([1, 512, 1, 1])', True),  # batch norm under torch.compile
    ('CUDA out of memory', False),  # any other error: as it is
])
def test_batch_norms_error_under_compile_is_named_as_without_it(tmp_path, monkeypatch, message, named):
    def failing_step(*args, **kwargs):
        raise RuntimeError(message)
    monkeypatch.setattr(training, 'train_step', failing_step)
    with pytest.raises(training.RunError if named else RuntimeError) as error:
        train(fresh_model(), SquaresDataset(n=1), config(epochs=1, batch_size=1), tmp_path, 'toy')
    assert ("a batch of one image cannot be trained" in str(error.value)) == named
