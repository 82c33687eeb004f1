"""Anomaly maps of new images with numpy only: the evaluation's image preparation, batching, and
the maps taken back to each image's own pixels. No torch here, so that an exported (ONNX) model
runs without it; the network itself is a function ``run(batch) -> maps`` given by the caller
(``experiments.detector``).

How a model's images are prepared is its *spec*, a dict of plain values (built from a
checkpoint's meta by ``experiments.torch_model.model_spec``, stored in exported files):

    side                every image is resized to ``side x side`` (the category's test side)
    crop                objects and chest X-rays: the side of the central square that is
                        predicted (the map is zero outside it); None for textures, which are
                        predicted whole
    size_multiple       textures: reflect-padded at the bottom and right up to a multiple of it
    channels            1 or 3: images of the other kind are converted (``to_channels``: colour
                        -> luminance, grey -> three equal channels)
    flip_average_error  None where flip averaging applies (textures), else the reason it does not
    thresholds          None, or the calibrated thresholds (``experiments.thresholds``)
    bit_depth           how 16-bit image files are read (``self_sup_data.images.to_uint8``): None,
                        each image from its own bit depth; bits; or an intensity window [low, high]
    train_image_shape   the training images' aspect ratios and longer sides
                        (``self_sup_data.images.image_shape_summary``), which ``shape_notes``
                        compares new images with; None for models trained before it was recorded
    train_image_span    [least, greatest] grey-level span of the training images as resized for
                        training (``self_sup_data.images.image_span_summary``), which
                        ``contrast_notes`` compares new images with (``prepared_span``); None for
                        models trained before it was recorded

This is ``experiments.prediction`` on uint8 images instead of normalised tensors: cropping,
reflect padding and flips commute with the per-pixel normalisation, which the network input
does itself (``experiments.torch_model.ImageInputModel``), so the maps are the evaluation's.
"""
import numbers
import warnings

import cv2
import numpy as np
from tqdm import tqdm

from experiments import metrics
from self_sup_data.images import central_box, image_span, reading_words, resize, resize_to, to_channels


def as_image(image, name='image'):
    """``image`` as uint8 ``H x W x C`` (C = 1 or 3; ``H x W`` is grey); ValueError naming
    ``name`` for another type or channel count, or an empty image."""
    image = np.asarray(image)
    shape = image.shape
    if image.ndim == 2:
        image = image[:, :, None]
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f'{name} must be a uint8 array H x W, H x W x 1 or H x W x 3 '
                         f'(grey or RGB), got {image.dtype} of shape {shape}')
    if image.size == 0:
        raise ValueError(f'{name} is empty (shape {shape})')
    return image


def prepare(image, spec):
    """The image as the evaluation loads it: resized to ``spec['side']`` (``resize``), then
    converted to ``spec['channels']`` -> uint8 ``side x side x channels``."""
    return to_channels(resize(as_image(image), spec['side']), spec['channels'])


def network_input(image, spec):
    """The network's input for a prepared image: its central ``spec['crop']`` square (objects,
    chest X-rays),
    or the image reflect-padded at the bottom and right to multiples of ``spec['size_multiple']``
    (textures) -> uint8 ``C x H x W``."""
    height, width = image.shape[:2]
    if spec['crop'] is not None:
        image = image[central_box((height, width), spec['crop'])]
    else:
        multiple = spec['size_multiple']
        image = np.pad(image, ((0, -height % multiple), (0, -width % multiple), (0, 0)),
                       mode='reflect')
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def map_from_output(output, spec):
    """Inverse of ``network_input`` for a map ``H x W`` of the network: zero outside the crop
    (objects, chest X-rays) or cropped to the prepared image (textures) -> float32 ``side x side``."""
    side = spec['side']
    if spec['crop'] is None:
        return output[:side, :side]
    top = left = (side - spec['crop']) // 2
    full = np.zeros((side, side), output.dtype)
    full[top:top + spec['crop'], left:left + spec['crop']] = output
    return full


def check_flip_average(spec, source):
    """ValueError naming ``source`` when flip averaging does not apply to its model."""
    if spec['flip_average_error'] is not None:
        raise ValueError(f'--flip-average does not apply to {source}: {spec["flip_average_error"]}')


def flip_average_mismatch(thresholds, flip_average):
    """Whether ``thresholds`` (``experiments.thresholds``; None: none) were calibrated on maps of
    another flip averaging than maps made with ``flip_average``."""
    return (thresholds or {}).get('flip_average', flip_average) != flip_average


def with_or_without(flag):
    """'with' or 'without', for messages about flip averaging."""
    return 'with' if flag else 'without'


def warn_flip_average_mismatch(thresholds, flip_average, source, consequence=''):
    """Warn, naming ``source``, when ``thresholds`` were calibrated on maps of another flip
    averaging (``flip_average_mismatch``), adding ``consequence`` to the message -> whether they
    were."""
    mismatch = flip_average_mismatch(thresholds, flip_average)
    if mismatch:
        warnings.warn(f'{source}: its thresholds were calibrated {with_or_without(not flip_average)} '
                      f'flip averaging and these maps are {with_or_without(flip_average)} it{consequence}')
    return mismatch


ASPECT_TOLERANCE = 1.1  # aspect ratios within this factor of the training images' range count as theirs
SCALE_TOLERANCE = 1.5  # ... and longer sides within this factor of theirs
LARGER = {True: 'larger', False: 'smaller'}


def _unlike(sizes, measure, bounds, tolerance):
    """The (name, width, height) items of ``sizes`` whose ``measure(width, height)`` lies outside
    ``bounds`` [low, high] widened by the factor ``tolerance``."""
    low, high = bounds
    return [item for item in sizes if not low / tolerance <= measure(*item[1:]) <= high * tolerance]


def _span(bounds, form):
    """'low' or 'low to high' of ``bounds``, each formatted by ``form`` (one where both read alike)."""
    low, high = (format(bound, form) for bound in bounds)
    return low if low == high else f'{low} to {high}'


def shape_notes(spec, names, shapes):
    """Notes (strings) on the images whose ``shapes`` ((H, W, ...) each, named by ``names``) are
    unlike the model's training images (``spec['train_image_shape']``; none for a model without
    it): an aspect ratio (width / height) outside the training images' range widened by
    ASPECT_TOLERANCE, and a longer side outside theirs widened by SCALE_TOLERANCE. Every image is
    resized to the model's square as the training images were, so the former are stretched
    otherwise than the network learnt, and the latter reach it at another scale unless they show
    the training images' field of view."""
    trained = spec.get('train_image_shape')
    if not trained:
        return []
    sizes = [(name, shape[1], shape[0]) for name, shape in zip(names, shapes)]
    side, notes = spec['side'], []
    stretched = _unlike(sizes, lambda width, height: width / height, trained['aspect'], ASPECT_TOLERANCE)
    if stretched:
        name, width, height = stretched[0]
        notes.append(f"{len(stretched)} of {len(sizes)} images have another aspect ratio (width / height) than the "
                     f"model's training images ({_span(trained['aspect'], '.2f')}; first: {name}, {width}x{height}, "
                     f"{width / height:.2f}): each is resized to the model's {side}x{side} square as they were, which "
                     f"stretches it and its defects otherwise than the network learnt; crop such images to the "
                     f"training images' shape first")
    rescaled = _unlike(sizes, max, trained['long_side'], SCALE_TOLERANCE)
    if rescaled:
        name, width, height = rescaled[0]
        larger = {max(item[1:]) > trained['long_side'][1] for item in rescaled}
        which = ' or '.join(LARGER[flag] for flag in (True, False) if flag in larger)
        notes.append(f"{len(rescaled)} of {len(sizes)} images are {which} than the "
                     f"model's training images (longer side {_span(trained['long_side'], 'd')} pixels; first: "
                     f"{name}, {width}x{height}): each is resized to the model's {side}x{side} square as they were, so "
                     f"unless they show the training images' field of view, their texture and defects reach the "
                     f"network at another scale than it learnt; crop or resize them to the training images' scale "
                     f"first")
    return notes


CONTRAST_TOLERANCE = 4  # a new image whose span is below the training images' least by more than this factor


def prepared_span(image, spec):
    """The grey-level span (``self_sup_data.images.image_span``) of ``image`` as the network gets
    it (``prepare``: resized to the model's side, in its channels), as the training images' span
    was measured (``spec['train_image_span']``)."""
    return image_span(prepare(image, spec))


def contrast_notes(spec, names, spans):
    """A note (a list of one string, or none) on the images, of grey-level ``spans``
    (``prepared_span`` each) and named by ``names``, whose span is below the least of the model's
    training images (``spec['train_image_span']``; none for a model without it) by more than the
    factor CONTRAST_TOLERANCE: images nearly uniform as the network gets them, most often 16-bit
    files read with a bit depth that is not their data's (``spec['bit_depth']``, that of the
    training images), whose values then fill a sliver of 0..255."""
    trained = spec.get('train_image_span')
    if not trained:
        return []
    faint = [(name, span) for name, span in zip(names, spans) if span < trained[0] / CONTRAST_TOLERANCE]
    if not faint:
        return []
    name, span = faint[0]
    depth = spec.get('bit_depth')
    cause = '' if depth is None else (
        f"; the model reads 16-bit files as its training images were read ({reading_words(depth)}), so a 16-bit file "
        f"whose data has fewer bits (8-bit values saved as 16 bits, say) reads nearly black"
        f"{'' if isinstance(depth, numbers.Integral) else ', and data outside the window black or white'}: save "
        f"such images as 8-bit files, or scale their data to the training images' range")
    return [f"{len(faint)} of {len(spans)} images have far less contrast than the model's training images: "
            f"their grey levels span at most {max(span for _, span in faint)} of 0..255 as the network gets them, "
            f"the training images' at least {trained[0]} (first: {name}, {span}); the network scores such images "
            f"unlike any it learnt{cause}"]


def _view_maps(run, images, spec):
    """Maps (float32 ``N x side x side``) of prepared images ``N x side x side x C``."""
    batch = np.stack([network_input(image, spec) for image in images])
    return np.stack([map_from_output(output, spec) for output in run(batch)]).astype(np.float32)


def model_maps(run, images, spec, batch_size=16, flip_average=False, progress=False):
    """Anomaly maps (float32 ``N x side x side``) of ``images`` (any sizes, uint8 ``H x W [x C]``)
    at the model's resolution, as ``experiments.prediction.predict`` computes them. ``run(batch
    uint8 N x C x H x W) -> float32 N x H x W`` is the network; ``flip_average``: the mean of each
    map and the flipped-back map of the vertically flipped image (``check_flip_average``)."""
    if flip_average:
        check_flip_average(spec, 'this model')
    prepared = [prepare(image, spec) for image in images]
    maps = []
    starts = range(0, len(prepared), batch_size)
    for start in tqdm(starts, 'predicting', disable=None if progress else True, leave=False):
        chunk = prepared[start:start + batch_size]
        chunk_maps = _view_maps(run, chunk, spec)
        if flip_average:
            flipped = _view_maps(run, [image[::-1] for image in chunk], spec)[:, ::-1]
            chunk_maps = (chunk_maps + flipped) / 2
        maps.append(chunk_maps)
    side = spec['side']
    return np.concatenate(maps) if maps else np.zeros((0, side, side), np.float32)


def image_scores(maps):
    """{'mean': ..., 'max': ...}: the image scores (float arrays) of maps at the model's
    resolution, as the evaluation computes them (``metrics.image_scores``)."""
    return {reduction: metrics.image_scores(maps, reduction) for reduction in ('mean', 'max')}


def to_image_size(map_, shape):
    """A map at the model's resolution resized to an image's ``(H, W)`` (``resize_to``: area
    averaging where a side shrinks, so that no pixel of the map is skipped; bilinear where it
    grows) -> float32."""
    return resize_to(map_.astype(np.float32), tuple(shape[:2]))


def mask_to_image_size(mask, shape):
    """A boolean mask at the model's resolution resized to an image's ``(H, W)`` by nearest
    neighbour at the centre of each pixel's footprint (``cv2.INTER_NEAREST_EXACT``, centred as
    ``to_image_size``): each pixel takes the decision of the model's pixel it lies on."""
    return resize_to(np.asarray(mask, np.uint8), tuple(shape[:2]), cv2.INTER_NEAREST_EXACT).astype(bool)
