import pytest
import torch
import torch.nn.functional as F

from models.resnet import MIN_INPUT_STD, build_model, resnet18_classifier, resnet18_enc_dec, standardize_images

# torchvision's resnet18 has 11,689,512 parameters; without its fc layer (512*1000 + 1000)
# the trunk (stem, BN, four stages) has 11,176,512.
TORCHVISION_RESNET18_TRUNK_PARAMS = 11_176_512


def num_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """These tensors are tiny: one thread avoids oversubscribing a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


# (in_channels, pool, preact): two variants that between them take each value stay in the quick
# loop (-m "not slow"); the other six run in the full suite
QUICK_VARIANTS = {(3, True, False), (1, False, True)}
MODEL_VARIANTS = [pytest.param(dict(in_channels=c, pool=pool, preact=preact),
                               marks=() if (c, pool, preact) in QUICK_VARIANTS else pytest.mark.slow,
                               id=f'{c}-{pool}-{preact}')
                  for c in (1, 3) for pool in (True, False) for preact in (False, True)]


class ModelsByVariant(dict):
    """Builds the model of an (in_channels, pool, preact) key on first use."""

    def __missing__(self, key):
        torch.manual_seed(0)
        in_channels, pool, preact = key
        self[key] = resnet18_enc_dec(num_classes=2, in_channels=in_channels, pool=pool,
                                     preact=preact).eval()
        return self[key]


@pytest.fixture(scope='module')
def models():
    """One model per (in_channels, pool, preact), built when first asked for and shared by the
    shape tests."""
    return ModelsByVariant()


@pytest.mark.parametrize('variant', MODEL_VARIANTS)
def test_output_has_input_size(models, variant):
    model = models[tuple(variant.values())]
    for size in [(64, 64), (64, 96)]:
        with torch.no_grad():
            out = model(torch.randn(1, variant['in_channels'], *size))
        assert out.shape == (1, 2, *size)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize('size', [(96, 96), (128, 128), (96, 160)])
def test_output_has_input_size_larger(models, size):
    with torch.no_grad():
        assert models[(3, True, False)](torch.randn(1, 3, *size)).shape == (1, 2, *size)


@pytest.mark.parametrize('variant', MODEL_VARIANTS)
def test_encoder_returns_four_stage_maps(models, variant):
    encoder = models[tuple(variant.values())].encoder
    reductions = (4, 8, 16, 32) if variant['pool'] else (2, 4, 8, 16)
    height, width = 64, 96
    with torch.no_grad():
        features = encoder(torch.randn(1, variant['in_channels'], height, width))
    assert isinstance(features, list) and len(features) == 4
    assert encoder.reductions == reductions
    assert encoder.out_channels == (64, 128, 256, 512)
    for feature, channels, r in zip(features, (64, 128, 256, 512), reductions):
        assert feature.shape == (1, channels, height // r, width // r)


def test_encoder_has_torchvision_resnet18_parameter_count():
    assert num_params(resnet18_enc_dec().encoder) == TORCHVISION_RESNET18_TRUNK_PARAMS
    # one input channel instead of three removes 2 * 64 * 7 * 7 stem weights
    assert (num_params(resnet18_enc_dec(in_channels=1).encoder)
            == TORCHVISION_RESNET18_TRUNK_PARAMS - 2 * 64 * 7 * 7)


@pytest.mark.slow
def test_no_pool_accepts_multiples_of_16():
    model = resnet18_enc_dec(pool=False)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 80)).shape == (1, 1, 48, 80)


@pytest.mark.parametrize('pool, size', [(True, (48, 64)), (False, (64, 40)), (True, (0, 32)), (False, (16, 0))])
def test_size_not_divisible_raises(pool, size):
    model = resnet18_enc_dec(pool=pool)
    with pytest.raises(ValueError, match='multiples of'):
        model(torch.randn(1, 3, *size))


@pytest.mark.slow
def test_final_activations():
    x = torch.randn(1, 3, 32, 32)
    state = resnet18_enc_dec(num_classes=3).state_dict()
    outputs = {}
    for name in ('identity', 'sigmoid', 'relu', 'softmax'):
        model = resnet18_enc_dec(num_classes=3, final_activation=name)
        model.load_state_dict(state)
        with torch.no_grad():
            outputs[name] = model.eval()(x)
    logits = outputs['identity']
    assert (logits < 0).any() and (logits > 0).any()
    assert ((outputs['sigmoid'] > 0) & (outputs['sigmoid'] < 1)).all()
    torch.testing.assert_close(outputs['sigmoid'], torch.sigmoid(logits))
    assert (outputs['relu'] >= 0).all()
    torch.testing.assert_close(outputs['relu'], F.relu(logits))
    torch.testing.assert_close(outputs['softmax'].sum(dim=1), torch.ones(1, 32, 32))
    torch.testing.assert_close(outputs['softmax'], torch.softmax(logits, dim=1))


@pytest.mark.parametrize('kwargs, argument', [
    (dict(final_activation='tanh'), 'final_activation'),
    (dict(in_channels=0), 'in_channels'),
    (dict(in_channels=2.5), 'in_channels'),
    (dict(num_classes=0), 'num_classes'),
    (dict(dropout_rate=1.0), 'dropout_rate'),
    (dict(dropout_rate=-0.1), 'dropout_rate'),
    (dict(pool='yes'), 'pool'),
    (dict(preact=None), 'preact'),
    (dict(standardize_input='yes'), 'standardize_input'),
])
def test_invalid_arguments_raise(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        resnet18_enc_dec(**kwargs)


def test_any_positive_in_channels_allowed():
    model = resnet18_enc_dec(in_channels=4)
    with torch.no_grad():
        assert model(torch.randn(1, 4, 64, 64)).shape == (1, 1, 64, 64)


@pytest.mark.slow
def test_dropout_only_in_training():
    model = resnet18_enc_dec(dropout_rate=0.5)
    assert any(isinstance(m, torch.nn.Dropout2d) for m in model.modules())
    assert not any(isinstance(m, torch.nn.Dropout2d) for m in resnet18_enc_dec().modules())
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))


@pytest.mark.parametrize('kwargs', [
    dict(),
    dict(num_classes=2, in_channels=1, pool=False, preact=True, final_activation='sigmoid',
         dropout_rate=0.25),
    dict(paper_network=True, in_channels=1),
    dict(standardize_input=True, in_channels=1),
])
@pytest.mark.slow
def test_build_model_from_config_rebuilds_architecture(kwargs):
    model = resnet18_enc_dec(**kwargs)
    config = model.config
    assert all(type(v) in (int, float, bool, str) for v in config.values())
    rebuilt = build_model(config)
    assert rebuilt.config == config
    state, rebuilt_state = model.state_dict(), rebuilt.state_dict()
    assert list(state) == list(rebuilt_state)
    assert all(state[k].shape == rebuilt_state[k].shape for k in state)
    rebuilt.load_state_dict(state)
    x = torch.randn(1, config['in_channels'], 64, 64)
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), rebuilt(x))


@pytest.mark.slow
def test_build_model_rejects_unknown_keys():
    with pytest.raises(KeyError, match='unknown_key'):
        build_model(dict(resnet18_enc_dec().config, unknown_key=1))


@pytest.mark.slow
def test_classifier_gives_logits_and_rebuilds_from_its_config():
    model = resnet18_classifier(num_classes=3, in_channels=1).eval()
    heads = [m for m in model.head if isinstance(m, torch.nn.Linear)] + [model.classifier]
    assert [(m.in_features, m.out_features) for m in heads] == [(512, 512), (512, 128), (128, 3)]
    x = torch.randn(2, 1, 48, 48)  # any side: the features are pooled
    assert model(x).shape == (2, 3)
    assert [m.shape[1] for m in model.encoder(x)] == [64, 128, 256, 512]
    config = model.config
    assert config['arch'] == 'resnet18_classifier'
    rebuilt = build_model(config).eval()
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), rebuilt(x))
    with pytest.raises(KeyError, match="unknown model arch 'vit'"):
        build_model(dict(config, arch='vit'))


def test_paper_network_has_the_paper_codes_layers():
    """The paper's code's ResNetEncDec (ResNet-18, uplayers [1, 1, 1]): 11,497,712 parameters for
    three input channels; no BN in the bottleneck, 1x1 stride-2 transposed shortcuts that fill one
    pixel in four, bilinear upsampling with align_corners, no bias in the last transposed
    convolution, PyTorch's own initialisation of the transposed ones."""
    torch.manual_seed(0)
    paper, ours = resnet18_enc_dec(paper_network=True), resnet18_enc_dec()
    assert sum(p.numel() for p in paper.parameters()) == 11_497_712
    assert sum(p.numel() for p in ours.parameters()) == 11_497_712 + 2 * (256 + 128) + 1  # BN, bias
    assert 'paper_network' not in ours.config and paper.config['paper_network'] is True
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in paper.bottleneck)
    block = paper.decoder[0]
    tconv = block.shortcut[0]
    assert isinstance(tconv, torch.nn.ConvTranspose2d) and tconv.stride == (2, 2) and tconv.kernel_size == (1, 1)
    with torch.no_grad():
        resampled = tconv(torch.randn(1, 128, 4, 4))
    assert resampled.shape[-2:] == (8, 8) and resampled[..., 0::2, 0::2].all()
    assert not resampled[..., 1::2, :].any() and not resampled[..., :, 1::2].any()
    upsample, last = paper.decoder[-2], paper.decoder[-1]
    assert upsample.align_corners is True and last.bias is None and ours.decoder[-1].bias is not None
    # PyTorch's default (kaiming uniform, a=sqrt(5)): bound 1 / sqrt(fan_in), far below Kaiming normal's
    bound = 1 / (last.weight.shape[1] * 7 * 7) ** 0.5
    assert last.weight.abs().max() <= bound
    with pytest.raises(ValueError, match="paper_network builds the paper's post-activation network"):
        resnet18_enc_dec(paper_network=True, preact=True)


def test_initialisation_is_standard_resnet():
    model = resnet18_enc_dec()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert (m.weight == 1).all() and (m.bias == 0).all()
    stem = model.encoder.conv1.weight  # kaiming normal, fan_out: std = sqrt(2 / (64 * 7 * 7))
    assert abs(stem.std().item() - (2 / (64 * 49)) ** 0.5) < 0.1 * (2 / (64 * 49)) ** 0.5


@pytest.mark.slow
def test_few_adam_steps_lower_bce_on_one_32px_batch():
    model = resnet18_enc_dec(in_channels=3, final_activation='sigmoid')
    images = torch.randn(2, 3, 32, 32)
    labels = torch.zeros(2, 1, 32, 32)
    labels[:, :, 8:20, 12:24] = 1.0
    images[:, :, 8:20, 12:24] += 2.0
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = F.binary_cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_the_map_is_the_sigmoid_of_the_logits_and_the_state_is_unchanged():
    """Training takes ``logits``; the model's output (prediction, export) stays the probability,
    and a checkpoint's state dict has the same entries as before the method existed."""
    torch.manual_seed(0)
    model = resnet18_enc_dec(final_activation='sigmoid').eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch.sigmoid(model.logits(x)), rtol=0, atol=0)
    assert not any('final_activation' in key for key in model.state_dict())


def test_standardize_images_gives_each_image_zero_mean_and_unit_std():
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.1])[:, None, None, None] + 7
    x[2] = 0.25  # a constant image: its std is below MIN_INPUT_STD
    y = standardize_images(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    flat = x[:2].reshape(2, -1).numpy()
    expected = (flat - flat.mean(1, keepdims=True)) / flat.std(1, keepdims=True)  # numpy: population std
    # computed in float32
    torch.testing.assert_close(y[:2].reshape(2, -1), torch.from_numpy(expected), atol=1e-5, rtol=1e-5)
    assert torch.equal(y[2], torch.zeros_like(y[2]))
    nearly_flat = torch.full((1, 1, 4, 4), 3.0)
    nearly_flat[0, 0, 0, 0] += 4 * MIN_INPUT_STD  # std 0.97 MIN_INPUT_STD: divided by MIN_INPUT_STD
    assert standardize_images(nearly_flat).abs().max().item() == pytest.approx(4 * 15 / 16, rel=1e-5)


@pytest.mark.parametrize('build', [
    lambda: resnet18_enc_dec(in_channels=3, standardize_input=True),
    pytest.param(lambda: resnet18_classifier(in_channels=3, standardize_input=True), marks=pytest.mark.slow),
])
def test_standardized_input_makes_maps_blind_to_each_images_brightness_and_contrast(build):
    model = build().eval()
    assert model.config['standardize_input'] is True
    x = torch.randn(2, 3, 64, 64)
    brighter = x * torch.tensor([3.0, 0.5])[:, None, None, None] + torch.tensor([2.0, -1.0])[:, None, None, None]
    with torch.no_grad():
        torch.testing.assert_close(model(brighter), model(x), atol=1e-4, rtol=1e-4)
        plain = build_model({k: v for k, v in model.config.items() if k != 'standardize_input'}).eval()
        plain.load_state_dict(model.state_dict())  # the same weights: only the input's standardisation differs
        assert not torch.allclose(plain(brighter), plain(x), atol=1e-2)
        torch.testing.assert_close(plain(standardize_images(x)), model(x))
    assert 'standardize_input' not in resnet18_enc_dec().config  # earlier models' configs as they were
