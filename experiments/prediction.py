"""Prediction of anomaly maps on test sets, and their metrics: the same for every dataset.

Prediction follows the paper. Test images come at the category's test side
(``data_recipe(...)['test_res']``, 256 pixels at ``res_scale=1``) and then

- objects (and chest X-rays, ``chest_xray_tasks.scored_crop``): the central ``train_size x
  train_size`` square (224 at ``res_scale=1``, the size the model was trained on) is predicted and
  the map is padded back to the full size with zeros;
- textures: the whole image is predicted. The network needs sides that are
  multiples of ``models.resnet.SIZE_MULTIPLE`` (32), so an image of another size is reflect-padded
  at its bottom and right up to the next multiple and the map is cropped back to the image.

The image score is the mean (the paper) or the maximum (MVTec AD's protocol) of the map; see
``experiments.metrics.evaluate_maps`` for the metrics.

Flip averaging (``flip_average``, textures only; not in the paper): the map is the mean of the
image's map and the map of its vertical flip, flipped back. The texture training recipe draws that
flip (``data_recipe``), so both views are images of the kind the model was trained on; the objects'
recipe has no flip, and a flipped object would be an image it never saw.

Two-stage variants (``evaluate_variants``, see ``experiments.one_class``): a one-class model
fitted to the encoder features of normal training images scores each test image and, from the
patch-level features, each pixel.
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from experiments import metrics, one_class
from models.resnet import SIZE_MULTIPLE
from self_sup_data.images import central_box
from self_sup_data.mvtec import category_kind


def check_flip_average(category, kind, variants, source):
    """ValueError naming ``source`` (a checkpoint, a setting, a test set) when flip averaging does
    not apply to it: an object category (``category_kind(category, kind)``), whose training recipe
    does not flip, or two-stage variants among ``variants`` (see ``checkpoints.result_variants``)."""
    if category_kind(category, kind) == 'object':
        raise ValueError(f'flip averaging is for textures: {source} is of the object category '
                         f'{category!r}, whose training recipe does not flip its images')
    two_stage = [variant for variant in variants if variant is not None]
    if two_stage:
        raise ValueError(f'flip averaging applies to the maps of the encoder-decoder, not to the '
                         f'two-stage variants {two_stage} of {source}')


def paper_crop_size(dataset):
    """Side of the central crop the paper predicts on: ``dataset.train_size`` for objects, else None."""
    return dataset.train_size if getattr(dataset, 'kind', None) == 'object' else None


def predict_batch(model, images, crop_size=None, flip_average=False):
    """Anomaly maps ``B x H x W`` of images ``B x C x H x W`` (see the module docstring).

    ``crop_size``: predict the central ``crop_size`` square and pad the map with zeros (objects);
    None: predict the whole image, reflect-padded to a multiple of ``SIZE_MULTIPLE`` (textures).
    ``flip_average``: the mean of the map and the flipped-back map of the vertically flipped images.
    """
    maps = _predict_view(model, images, crop_size)
    if flip_average:
        maps = (maps + _predict_view(model, images.flip(-2), crop_size).flip(-2)) / 2
    return maps


def _predict_view(model, images, crop_size):
    """``predict_batch`` of one view of the images."""
    height, width = images.shape[-2:]
    if crop_size is not None:
        crop = model(one_class.center_crop(images, crop_size))
        maps = crop.new_zeros(crop.shape[:2] + (height, width))
        maps[(...,) + central_box((height, width), crop_size)] = crop
    else:
        pad_bottom, pad_right = -height % SIZE_MULTIPLE, -width % SIZE_MULTIPLE
        if pad_bottom or pad_right:
            images = F.pad(images, (0, pad_right, 0, pad_bottom), mode='reflect')
        maps = model(images)[..., :height, :width]
    return maps[:, 0]


def predict(model, dataset, batch_size=32, device='cpu', crop_size='auto', flip_average=False):
    """Predict every test item of ``dataset`` (items ``(image, label, mask)``).

    ``crop_size``: 'auto' -> ``paper_crop_size(dataset)``; None or an int as in ``predict_batch``.
    ``flip_average``: average each map with that of the vertical flip (textures only: ValueError
    for an object category, whose training recipe does not flip).
    Returns (maps float32 N x H x W, labels int N, masks uint8 N x H x W), in dataset order.
    """
    if flip_average:
        check_flip_average(getattr(dataset, 'class_name', None), getattr(dataset, 'kind', None),
                           [None], 'the test set')
    if crop_size == 'auto':
        crop_size = paper_crop_size(dataset)
    device = torch.device(device)
    model.eval()
    maps, labels, masks = [], [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    with torch.no_grad():
        for images, batch_labels, batch_masks in tqdm(loader, 'predicting', leave=False, disable=None):
            maps.append(predict_batch(model, images.to(device), crop_size, flip_average)
                        .float().cpu().numpy())
            labels.append(np.asarray(batch_labels))
            masks.append(batch_masks[:, 0].numpy().astype(np.uint8))
    return np.concatenate(maps).astype(np.float32), np.concatenate(labels), np.concatenate(masks)


def predict_maps(model, dataset, batch_size=32, device='cpu', crop_size='auto', flip_average=False):
    """Anomaly maps (float32 N x H x W) of the test items of ``dataset`` (see ``predict``)."""
    return predict(model, dataset, batch_size, device, crop_size, flip_average)[0]


def evaluate(model, dataset, batch_size=32, device='cpu', crop_size='auto', return_maps=False,
             flip_average=False):
    """Metrics of ``model`` on the test set ``dataset`` (``metrics.evaluate_maps``).

    Image AUROC/AP with the mean and the max of the map as image score, pixel AUROC/AP and
    AU-PRO; the pixel metrics are NaN when no defective image has a mask
    (``dataset.has_mask``). With ``return_maps`` returns (metrics, maps). ``flip_average`` as in
    ``predict``.
    """
    maps, labels, masks = predict(model, dataset, batch_size, device, crop_size, flip_average)
    results = metrics.evaluate_maps(labels, maps, masks, has_mask=getattr(dataset, 'has_mask', None))
    return (results, maps) if return_maps else results


def evaluate_variants(model, dataset, variants, normal_set, batch_size=32, device='cpu',
                      crop_size='auto', source='model', flip_average=False, errors=None):
    """{variant: (metrics, maps)} of ``model`` on the test set ``dataset`` for each of ``variants``
    (see ``result_variants``): None scores the model's own maps (``evaluate``), a one-class name
    the two-stage model fitted to the normal images ``normal_set()`` (a callable, called only when
    a two-stage variant needs it; see ``one_class.evaluate_two_stage``). ``crop_size`` as in
    ``predict``, for both kinds of variant; ``flip_average`` (``predict``) for the model's own maps
    only: ValueError with a two-stage variant. ``errors``: as in ``one_class.two_stage_scores``, for
    the two-stage variants."""
    if flip_average:
        check_flip_average(getattr(dataset, 'class_name', None), getattr(dataset, 'kind', None),
                           variants, source)
    if crop_size == 'auto':
        crop_size = paper_crop_size(dataset)
    results = {}
    if None in variants:
        results[None] = evaluate(model, dataset, batch_size, device, crop_size, return_maps=True,
                                 flip_average=flip_average)
    two_stage = [variant for variant in variants if variant is not None]
    if two_stage:
        results.update(one_class.evaluate_two_stage(
            model, normal_set(), dataset, two_stage, crop_size=crop_size, batch_size=batch_size,
            device=device, source=source, errors=errors))
    return results


def undefined_note(dataset):
    """{'undefined': 'pixel metrics: <reason>'} when the pixel metrics of ``dataset`` are undefined
    (``metrics.undefined_pixel_metrics``), else {}: recorded with the results."""
    reason = metrics.undefined_pixel_metrics(dataset.labels, np.stack(dataset.masks), dataset.has_mask)
    return {} if reason is None else dict(undefined=f'pixel metrics: {reason}')
