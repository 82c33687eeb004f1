"""Evaluation on MVTec-layout data: predict anomaly maps, score them, tabulate, plot.

Prediction follows the paper. Test images are resized to the category's test side
(``data_recipe(...)['test_res']``, 256 pixels at ``res_scale=1``) and then

- objects: the central ``train_size x train_size`` square (224 at ``res_scale=1``, the size the
  model was trained on) is predicted and the map is padded back to the full size with zeros;
- textures: the whole image is predicted. The network needs sides that are multiples of 32, so
  an image of another size is reflect-padded at its bottom and right up to the next multiple of
  32 and the map is cropped back to the image.

The image score is the mean (the paper) or the maximum (MVTec AD's protocol) of the map; see
``experiments.metrics.evaluate_maps`` for the metrics.

    python -m experiments.mvtec_tasks -m MODEL_DIR -d DATA_DIR -o OUT_DIR [-s SETTING ...] [-n CATEGORY ...]
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from experiments import metrics

SIDE_MULTIPLE = 32  # the encoder-decoder downsamples by 32


def test_crop_size(dataset):
    """Side of the central crop the paper predicts on: ``dataset.train_size`` for objects, else None."""
    return dataset.train_size if getattr(dataset, 'kind', None) == 'object' else None


def predict_batch(model, images, crop_size=None):
    """Anomaly maps ``B x H x W`` of images ``B x C x H x W`` (see the module docstring).

    ``crop_size``: predict the central ``crop_size`` square and pad the map with zeros (objects);
    None: predict the whole image, reflect-padded to a multiple of 32 (textures).
    """
    height, width = images.shape[-2:]
    if crop_size is not None:
        if crop_size > min(height, width):
            raise ValueError(f'crop size {crop_size} is larger than the test images ({height}x{width})')
        top, left = (height - crop_size) // 2, (width - crop_size) // 2
        crop = model(images[..., top:top + crop_size, left:left + crop_size])
        maps = crop.new_zeros(crop.shape[:2] + (height, width))
        maps[..., top:top + crop_size, left:left + crop_size] = crop
    else:
        pad_bottom, pad_right = -height % SIDE_MULTIPLE, -width % SIDE_MULTIPLE
        padded = F.pad(images, (0, pad_right, 0, pad_bottom), mode='reflect') if pad_bottom or pad_right else images
        maps = model(padded)[..., :height, :width]
    return maps[:, 0]


def predict(model, dataset, batch_size=32, device='cpu', crop_size='auto'):
    """Predict every test item of ``dataset`` (items ``(image, label, mask)``).

    ``crop_size``: 'auto' -> ``test_crop_size(dataset)``; None or an int as in ``predict_batch``.
    Returns (maps float32 N x H x W, labels int N, masks uint8 N x H x W), in dataset order.
    """
    if crop_size == 'auto':
        crop_size = test_crop_size(dataset)
    device = torch.device(device)
    model.eval()
    maps, labels, masks = [], [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    with torch.no_grad():
        for images, batch_labels, batch_masks in tqdm(loader, desc='predicting', leave=False, disable=None):
            maps.append(predict_batch(model, images.to(device), crop_size).float().cpu().numpy())
            labels.append(np.asarray(batch_labels))
            masks.append(batch_masks[:, 0].numpy().astype(np.uint8))
    return np.concatenate(maps).astype(np.float32), np.concatenate(labels), np.concatenate(masks)


def predict_maps(model, dataset, batch_size=32, device='cpu', crop_size='auto'):
    """Anomaly maps (float32 N x H x W) of the test items of ``dataset`` (see ``predict``)."""
    return predict(model, dataset, batch_size, device, crop_size)[0]


def evaluate(model, dataset, batch_size=32, device='cpu', crop_size='auto', return_maps=False):
    """Metrics of ``model`` on the test set ``dataset`` (``metrics.evaluate_maps``).

    Image AUROC/AP with the mean and the max of the map as image score, pixel AUROC/AP and
    AU-PRO; the pixel metrics are NaN when no defective image has a mask
    (``dataset.has_mask``). With ``return_maps`` returns (metrics, maps).
    """
    maps, labels, masks = predict(model, dataset, batch_size, device, crop_size)
    results = metrics.evaluate_maps(labels, maps, masks, has_mask=getattr(dataset, 'has_mask', None))
    return (results, maps) if return_maps else results
