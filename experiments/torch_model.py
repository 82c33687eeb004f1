"""The PyTorch side of using a trained model on new images: the network as a function of raw
0..255 image batches (normalisation and the final activation inside, as exported), and the spec
of its image preparation (``experiments.inference``) from a checkpoint's meta."""
import numpy as np
import torch
from torch import nn

from experiments.checkpoints import read_model
from experiments.prediction import check_flip_average
from models.resnet import SIZE_MULTIPLE
from experiments.chest_xray_tasks import DEFAULT_RES as CHEST_RES, scored_crop
from self_sup_data.mvtec import category_kind, data_recipe, model_test_side
from self_sup_data.transforms import normalization


class ImageInputModel(nn.Module):
    """``model`` applied to images ``N x C x H x W`` of values 0..255 (uint8 or float): divided
    by 255 and normalised as training normalises (``self_sup_data.transforms.to_image_tensor``),
    then the model, whose final activation (the sigmoid of NSA's settings) gives the map; the
    activation is applied to float32 logits, also under bfloat16 autocast (a bfloat16 sigmoid
    rounds everything above about 0.998 to 1)."""

    def __init__(self, model, channels):
        super().__init__()
        self.model = model
        mean, std = normalization(channels)
        self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer('std', torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images):
        x = images.float().div(255)
        return self.model.final_activation(self.model.logits((x - self.mean) / self.std).float())


def model_spec(meta):
    """The preparation spec (``experiments.inference``) of a checkpoint's meta: MVTec-layout
    models as ``experiments.mvtec_tasks`` evaluates them, chest X-ray models at their side
    ``res``, on the central crop ``chest_xray_tasks.scored_crop``."""
    config = meta['model_config']
    if config.get('arch', 'resnet18_enc_dec') != 'resnet18_enc_dec':
        raise ValueError(f"a {config['arch']} model (setting {meta.get('setting')!r}) makes no "
                         'anomaly maps; use a model of an encoder-decoder setting')
    category, kind = meta.get('category'), meta.get('kind')
    if meta.get('dataset', 'mvtec') == 'chest_xray':
        side, crop = meta.get('res', CHEST_RES), scored_crop(meta)
    else:
        recipe = data_recipe(category, meta.get('res_scale', 1.0), kind)
        side = model_test_side(meta)
        crop = meta.get('train_size', recipe['train_size'])
        crop = crop if category_kind(category, kind) == 'object' else None
    try:
        if meta.get('dataset') == 'chest_xray':
            raise ValueError('flip averaging is for textures: this model is of chest X-rays, whose '
                             'training recipe does not flip its images')
        check_flip_average(category, kind, [None], 'this model')
        flip_error = None
    except ValueError as error:
        flip_error = str(error)
    return dict(side=int(side), crop=crop, size_multiple=SIZE_MULTIPLE,
                channels=int(config['in_channels']), flip_average_error=flip_error,
                category=category, setting=meta.get('setting'),
                thresholds=meta.get('thresholds'), bit_depth=meta.get('bit_depth'),
                train_image_shape=meta.get('train_image_shape'), train_image_span=meta.get('train_image_span'))


class TorchRunner:
    """The network of a checkpoint as ``run(batch uint8 N x C x H x W numpy) -> float32 N x H x
    W`` (``experiments.inference``), on ``device``, optionally in bfloat16 autocast."""

    def __init__(self, model, channels, device='cpu', bf16=False):
        self.device = torch.device(device)
        self.module = ImageInputModel(model, channels).to(self.device).eval()
        self.bf16 = bf16

    def __call__(self, batch):
        with torch.no_grad(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
            maps = self.module(torch.from_numpy(np.ascontiguousarray(batch)).to(self.device))
        return maps[:, 0].float().cpu().numpy()


def load_checkpoint(path, device='cpu', bf16=False):
    """(TorchRunner, spec) of a checkpoint file; ValueError naming a missing or unreadable file
    or a model without maps."""
    model, meta = read_model(path, device)
    spec = model_spec(meta)
    return TorchRunner(model, spec['channels'], device, bf16), spec
