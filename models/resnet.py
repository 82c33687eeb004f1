"""ResNet-18 encoder-decoder of NSA (Schlueter et al., arXiv 2109.15222), trained from scratch.

The network maps an image ``B x C_in x H x W`` to a pixel-wise anomaly map
``B x num_classes x H x W`` (H and W divisible by 32, or by 16 with ``pool=False``):

    encoder     ResNet-18 trunk: 7x7 stride-2 stem, optional 3x3 stride-2 max pool,
                four stages of two basic blocks (64, 128, 256, 512 channels; strides 1, 2, 2, 2)
    bottleneck  1x1 convolutions 512 -> 256 -> 128, each followed by BN and ReLU
    decoder     three residual up-blocks (x2 each) to 64, 32 and 16 channels,
                bilinear x2 upsampling when the stem pooled,
                a 7x7 stride-2 transposed convolution to ``num_classes`` channels
    activation  identity, sigmoid, relu or softmax over channels

By default the network differs from the paper's code in five details, all of this project's
choice: BN after each bottleneck convolution (the paper's: ReLU only), up-block shortcuts that
upsample with nearest neighbours before their 1x1 convolution (the paper's: a 1x1 transposed
convolution of stride 2, which fills one pixel in four and leaves the others 0), bilinear
upsampling with ``align_corners=False`` (the paper's: True), a bias in the last transposed
convolution (the paper's: none) and Kaiming initialisation of the transposed convolutions too (the
paper's: PyTorch's default for them). ``paper_network=True`` builds the paper's network exactly
(post-activation blocks only: the paper's pre-activation variant also differs in its stem, shortcuts,
bottleneck and decoder, where ``preact`` here changes only the encoder's blocks; and without dropout,
as the paper trained: ``dropout_rate`` here drops channels after each up-block, where the paper's
code drops elements inside every residual branch).

``standardize_input=True`` (either network; not the paper's) first standardises each input image
by its own statistics, ``(x - mean(x)) / std(x)`` over its channels and pixels, so that images of
one material taken brighter or with more contrast reach the layers alike (``standardize_images``).

``resnet18_classifier`` is the same encoder with CutPaste's projection head and a linear
classifier (the ``CutPaste-3way`` setting); ``build_model`` rebuilds either from its config.

The encoder downsamples by 32 with the max pool (16 without); the decoder upsamples by the same
factor, so the output has the input's height and width. Written without torchvision, in the
spirit of timm: small blocks composed by one constructor.
"""
import inspect
import numbers

from torch import nn
import torch.nn.functional as F

STAGE_CHANNELS = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)
DECODER_CHANNELS = (64, 32, 16)
FINAL_ACTIVATIONS = ('identity', 'sigmoid', 'relu', 'softmax')
SIZE_MULTIPLE = 32  # input sides must be multiples of this (half of it without the max pool)
# standardize_images divides by at least this: about one grey level of an 8-bit image in the
# network's input units (x / 255 less a mean, divided by a std of about 0.23)
MIN_INPUT_STD = 0.02


def conv3x3(in_channels, out_channels, stride=1):
    """3x3 convolution with padding 1 and no bias (a BN follows)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels, out_channels, stride=1):
    """1x1 convolution without bias (a BN follows)."""
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)).

    The shortcut is the identity, or a strided 1x1 convolution + BN when the shape changes.
    """

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(conv1x1(in_channels, out_channels, stride),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + shortcut)


class PreActBasicBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016, "Identity mappings"):
    conv(relu(bn(conv(relu(bn(x)))))) + shortcut(x).

    When the shape changes the shortcut is a strided 1x1 convolution of the pre-activated input
    relu(bn(x)), as in the paper; otherwise it is the identity on x.
    """

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = conv1x1(in_channels, out_channels, stride)

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(pre)
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


def standardize_images(x, min_std=MIN_INPUT_STD):
    """Each image of ``x`` (``B x C x H x W``) less its mean over channels and pixels, divided by
    its standard deviation there (at least ``min_std``), computed in float32 -> ``x``'s dtype."""
    x32 = x.float()
    centred = x32 - x32.mean(dim=(1, 2, 3), keepdim=True)
    std = centred.square().mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(min_std)
    return (centred / std).to(x.dtype)


class ResNetEncoder(nn.Module):
    """ResNet trunk without the classifier; ``forward`` returns the four stage feature maps.

    ``out_channels`` and ``reductions`` give each map's channels and its stride with respect to
    the input (4, 8, 16, 32 with the max pool; 2, 4, 8, 16 without). With ``preact`` the blocks
    are pre-activation blocks and a final BN + ReLU is applied to the last stage's output. With
    ``standardize_input`` each image is first standardised by its own statistics
    (``standardize_images``).
    """

    def __init__(self, in_channels=3, layers=(2, 2, 2, 2), pool=True, preact=False,
                 standardize_input=False):
        super().__init__()
        self.standardize_input = standardize_input
        block = PreActBasicBlock if preact else BasicBlock
        self.conv1 = nn.Conv2d(in_channels, STAGE_CHANNELS[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_CHANNELS[0])
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if pool else None
        stages, channels = [], STAGE_CHANNELS[0]
        for num_blocks, out_channels, stride in zip(layers, STAGE_CHANNELS, STAGE_STRIDES):
            blocks = [block(channels, out_channels, stride)]
            blocks += [block(out_channels, out_channels) for _ in range(num_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            channels = out_channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.final_norm = nn.BatchNorm2d(channels) if preact else None

        self.out_channels = STAGE_CHANNELS
        stem_reduction = 4 if pool else 2
        self.reductions = tuple(stem_reduction * 2 ** i for i in range(len(STAGE_CHANNELS)))

    def forward(self, x):
        if self.standardize_input:
            x = standardize_images(x)
        x = F.relu(self.bn1(self.conv1(x)))
        if self.maxpool is not None:
            x = self.maxpool(x)
        features = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            features.append(x)
        if self.final_norm is not None:
            features[-1] = F.relu(self.final_norm(features[-1]))
        return features


def conv_bn_relu_1x1(in_channels, out_channels):
    """1x1 convolution, BN, ReLU."""
    return nn.Sequential(conv1x1(in_channels, out_channels), nn.BatchNorm2d(out_channels),
                         nn.ReLU(inplace=True))


class UpBlock(nn.Module):
    """Residual x2 up-sampling block:
    relu(bn(conv3x3(relu(bn(tconv3x3_s2(x))))) + bn(shortcut(x))).

    The 3x3 transposed convolution (stride 2, padding 1, output padding 1) doubles H and W; the
    shortcut upsamples with nearest neighbours and matches the channels with a 1x1 convolution,
    or (``transposed_shortcut``, the paper's code) is a 1x1 transposed convolution of stride 2,
    which fills one pixel in four and leaves the others 0.
    """

    def __init__(self, in_channels, out_channels, transposed_shortcut=False):
        super().__init__()
        self.tconv = nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2, padding=1,
                                        output_padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        resample = ([nn.ConvTranspose2d(in_channels, out_channels, 1, stride=2, output_padding=1, bias=False)]
                    if transposed_shortcut else
                    [nn.Upsample(scale_factor=2, mode='nearest'), conv1x1(in_channels, out_channels)])
        self.shortcut = nn.Sequential(*resample, nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = F.relu(self.bn1(self.tconv(x)))
        out = self.bn2(self.conv(out))
        return F.relu(out + self.shortcut(x))


def make_final_activation(name):
    """The output non-linearity called ``name`` (softmax is taken over the channel axis)."""
    activations = {'identity': nn.Identity, 'sigmoid': nn.Sigmoid, 'relu': nn.ReLU,
                   'softmax': lambda: nn.Softmax(dim=1)}
    return activations[name]()


def init_resnet_parameters(model, transposed=True):
    """Standard ResNet initialisation: Kaiming normal (fan_out, ReLU) for convolutions, and for
    transposed ones unless ``transposed`` is False (the paper's code: they keep PyTorch's), with
    zero bias, weight 1 and bias 0 for BN (linear layers keep PyTorch's)."""
    kaiming = (nn.Conv2d, nn.ConvTranspose2d) if transposed else nn.Conv2d
    for m in model.modules():
        if isinstance(m, kaiming):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_bool(name, value):
    if not isinstance(value, (bool, numbers.Integral)) or value not in (0, 1):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


class ResNetEncDec(nn.Module):
    """ResNet-18 encoder, 1x1 bottleneck and residual up-sampling decoder (see module docstring).

    ``encoder`` returns the four stage feature maps; ``config`` holds the constructor arguments as
    plain values, so that ``build_model(model.config)`` rebuilds the same architecture.
    """

    def __init__(self, num_classes=1, in_channels=3, pool=True, preact=False,
                 final_activation='identity', dropout_rate=0.0, paper_network=False, standardize_input=False):
        super().__init__()
        num_classes = _check_int('num_classes', num_classes, 1)
        in_channels = _check_int('in_channels', in_channels, 1)
        pool = _check_bool('pool', pool)
        preact = _check_bool('preact', preact)
        standardize_input = _check_bool('standardize_input', standardize_input)
        paper_network = _check_bool('paper_network', paper_network)
        if paper_network and preact:
            raise ValueError("paper_network builds the paper's post-activation network; preact=True is "
                             "this project's pre-activation variant, which the paper's code does not have")
        if final_activation not in FINAL_ACTIVATIONS:
            raise ValueError(f"final_activation must be one of {FINAL_ACTIVATIONS}, "
                             f"got {final_activation!r}")
        if (isinstance(dropout_rate, bool) or not isinstance(dropout_rate, numbers.Real)
                or not 0 <= dropout_rate < 1):
            raise ValueError(f"dropout_rate must be a number in [0, 1), got {dropout_rate!r}")
        self.config = dict(num_classes=num_classes, in_channels=in_channels, pool=pool,
                           preact=preact, final_activation=final_activation,
                           dropout_rate=float(dropout_rate))
        if paper_network:  # only where set: the configs of earlier models stay as they were
            self.config['paper_network'] = True
        if standardize_input:  # the same
            self.config['standardize_input'] = True
        self.size_multiple = SIZE_MULTIPLE if pool else SIZE_MULTIPLE // 2

        self.encoder = ResNetEncoder(in_channels, pool=pool, preact=preact, standardize_input=standardize_input)
        if paper_network:
            self.bottleneck = nn.Sequential(conv1x1(STAGE_CHANNELS[-1], 256), nn.ReLU(inplace=True),
                                            conv1x1(256, 128), nn.ReLU(inplace=True))
        else:
            self.bottleneck = nn.Sequential(conv_bn_relu_1x1(STAGE_CHANNELS[-1], 256),
                                            conv_bn_relu_1x1(256, 128))
        decoder, channels = [], 128
        for out_channels in DECODER_CHANNELS:
            decoder.append(UpBlock(channels, out_channels, transposed_shortcut=paper_network))
            if dropout_rate > 0:
                decoder.append(nn.Dropout2d(dropout_rate))
            channels = out_channels
        if pool:
            decoder.append(nn.Upsample(scale_factor=2, mode='bilinear', align_corners=paper_network))
        decoder.append(nn.ConvTranspose2d(channels, num_classes, 7, stride=2, padding=3,
                                          output_padding=1, bias=not paper_network))
        self.decoder = nn.Sequential(*decoder)
        self.final_activation = make_final_activation(final_activation)
        self.reset_parameters()

    def reset_parameters(self):
        init_resnet_parameters(self, transposed=not self.config.get('paper_network', False))

    def logits(self, x):
        """The map before the final activation (what BCE trains on: the sigmoid's logits)."""
        height, width = x.shape[-2:]
        if height % self.size_multiple or width % self.size_multiple or not (height and width):
            raise ValueError(f"input height and width must be positive multiples of {self.size_multiple} "
                             f"(pool={self.config['pool']}), got {height}x{width}")
        x = self.encoder(x)[-1]
        return self.decoder(self.bottleneck(x))

    def forward(self, x):
        return self.final_activation(self.logits(x))


def resnet18_enc_dec(num_classes=1, in_channels=3, pool=True, preact=False,
                     final_activation='identity', dropout_rate=0.0, paper_network=False, standardize_input=False):
    """NSA's ResNet-18 encoder-decoder: B x in_channels x H x W -> B x num_classes x H x W
    (``paper_network``: the paper's code's layers exactly; ``standardize_input``: each image
    standardised first; see the module docstring)."""
    return ResNetEncDec(num_classes=num_classes, in_channels=in_channels, pool=pool,
                        preact=preact, final_activation=final_activation,
                        dropout_rate=dropout_rate, paper_network=paper_network,
                        standardize_input=standardize_input)


class ResNetClassifier(nn.Module):
    """CutPaste's classifier (Li et al. 2021): ResNet-18 encoder, global average pooling, an MLP
    projection head (linear, BN, ReLU for each of ``head_dims``: 512 -> 512 -> 128) and a linear
    layer to ``num_classes`` logits. Any input side works (the pooling removes the size).

    ``encoder`` returns the four stage feature maps (two-stage scoring uses them); ``config``
    holds the constructor arguments and ``arch='resnet18_classifier'`` for ``build_model``.
    """

    def __init__(self, num_classes=3, in_channels=3, pool=True, preact=False, head_dims=(512, 128),
                 standardize_input=False):
        super().__init__()
        num_classes = _check_int('num_classes', num_classes, 2)
        in_channels = _check_int('in_channels', in_channels, 1)
        head_dims = [_check_int('head_dims', dim, 1) for dim in head_dims]
        standardize_input = _check_bool('standardize_input', standardize_input)
        self.config = dict(arch='resnet18_classifier', num_classes=num_classes,
                           in_channels=in_channels, pool=_check_bool('pool', pool),
                           preact=_check_bool('preact', preact), head_dims=head_dims)
        if standardize_input:  # only where set, as in ResNetEncDec
            self.config['standardize_input'] = True
        self.encoder = ResNetEncoder(in_channels, pool=pool, preact=preact, standardize_input=standardize_input)
        layers, channels = [], STAGE_CHANNELS[-1]
        for dim in head_dims:
            layers += [nn.Linear(channels, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True)]
            channels = dim
        self.head = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)
        init_resnet_parameters(self)

    def forward(self, x):
        features = self.encoder(x)[-1].mean(dim=(2, 3))
        return self.classifier(self.head(features))


def resnet18_classifier(num_classes=3, in_channels=3, pool=True, preact=False, head_dims=(512, 128),
                        standardize_input=False):
    """CutPaste's ResNet-18 classifier: B x in_channels x H x W -> B x num_classes logits."""
    return ResNetClassifier(num_classes=num_classes, in_channels=in_channels, pool=pool,
                            preact=preact, head_dims=head_dims, standardize_input=standardize_input)


ARCHITECTURES = {'resnet18_enc_dec': resnet18_enc_dec, 'resnet18_classifier': resnet18_classifier}


def build_model(config):
    """Rebuild a freshly initialised model from ``model.config`` (e.g. stored in a checkpoint);
    ``config['arch']`` names the constructor (default: the encoder-decoder)."""
    config = dict(config)
    arch = config.pop('arch', 'resnet18_enc_dec')
    if arch not in ARCHITECTURES:
        raise KeyError(f"unknown model arch {arch!r}; valid: {sorted(ARCHITECTURES)}")
    valid = set(inspect.signature(ARCHITECTURES[arch]).parameters)
    unknown = set(config) - valid
    if unknown:
        raise KeyError(f"unknown model config keys {sorted(unknown)}; valid keys: {sorted(valid)}")
    return ARCHITECTURES[arch](**config)
