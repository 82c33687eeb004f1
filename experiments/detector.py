"""A trained model on new images: ``Detector.load(path)`` of a checkpoint (.pt) or an exported
ONNX file (.onnx), then ``scores, maps = detector.predict(images)``.

    detector = Detector.load('final_tile_shift_intensity_m.pt')   # or 'tile.onnx'
    images = [detector.read(path) for path in paths]
    scores, maps = detector.predict(images)
    anomalous = scores['mean'] > detector.threshold                # after calibration
    notes = detector.shape_notes(paths, [image.shape for image in images])  # unlike its training images
    notes += detector.contrast_notes(paths, images)                # ... and in contrast
    scores, maps, masks = detector.predict(images, masks=True)     # and defect pixels

Images are uint8 arrays ``H x W``, ``H x W x 1`` or ``H x W x 3`` of any size; they are prepared
as the evaluation prepares test images and each map is returned at its image's own size
(``experiments.inference``). An ONNX file runs through ONNX Runtime, and this module then never
imports torch: a deployment needs numpy, SciPy, OpenCV, Pillow, tqdm and onnxruntime.
"""
import json
import warnings
from pathlib import Path

import numpy as np

from experiments import inference
from self_sup_data.images import read_image

SPEC_KEY = 'nsa_spec'  # the ONNX metadata entry that holds the spec (JSON)
MODEL_SUFFIXES = ('.pt', '.onnx')
SPEC_KEYS = ('side', 'crop', 'size_multiple', 'channels', 'flip_average_error')  # what inference reads


class NonFiniteMapError(ValueError):
    """The model gave a map with NaN or infinite values (a diverged or damaged model)."""


class OnnxRunner:
    """An exported model (``experiments.export``) as ``run(batch uint8 N x C x H x W) -> float32
    N x H x W`` through ONNX Runtime's CPU provider (``threads``: its intra-op threads; None: ONNX
    Runtime's default); ``spec`` from the file's metadata."""

    def __init__(self, path, threads=None):
        import onnxruntime  # only the ONNX path needs it
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(str(path), options,
                                                        providers=['CPUExecutionProvider'])
        except Exception as error:  # ONNX Runtime raises its own exception types
            raise ValueError(f'cannot read ONNX model {path}: {error}') from error
        metadata = self.session.get_modelmeta().custom_metadata_map
        if SPEC_KEY not in metadata:
            raise ValueError(f'ONNX model {path} has no {SPEC_KEY!r} metadata; export it with '
                             'python -m experiments.export')
        self.spec = json.loads(metadata[SPEC_KEY])
        missing = [key for key in SPEC_KEYS if key not in self.spec]
        if missing:
            raise ValueError(f'ONNX model {path} has no {missing} in its {SPEC_KEY!r} metadata (an export of '
                             'an earlier version?); export it again with python -m experiments.export')
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch):
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch)})[0][:, 0]


def image_list(images):
    """``images`` (an iterable of images) as a list; ValueError for a single array, whose rows
    would pass for images."""
    if isinstance(images, np.ndarray):
        raise ValueError(f'images must be a list of images, got one array of shape {images.shape}; '
                         f'pass [image] for one image')
    return list(images)


class Detector:
    """Anomaly maps, image scores and decisions of one trained model (see the module docstring).

    ``run(batch uint8 N x C x H x W) -> float32 N x H x W`` is the network, ``spec`` its image
    preparation and thresholds (``experiments.inference``), ``source`` its file (for messages).
    """

    def __init__(self, run, spec, source, batch_size=16):
        self.run, self.spec, self.source = run, spec, source
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f'batch size must be a positive integer, got {batch_size!r}')

    @classmethod
    def load(cls, path, device='cpu', batch_size=16, bf16=False):
        """The Detector of a checkpoint of the training scripts (.pt, run by PyTorch on
        ``device``, in bfloat16 autocast with ``bf16``) or of an exported model (.onnx, run by
        ONNX Runtime on the CPU). FileNotFoundError naming a missing file, ValueError naming an
        unreadable one or a model without anomaly maps. A warning where ``bf16`` meets thresholds,
        which were calibrated on float32 maps."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f'no model at {path}; expected a checkpoint of the training '
                                    'scripts (final_*.pt) or an exported model (.onnx)')
        if path.suffix.lower() == '.onnx':
            if str(device) != 'cpu' or bf16:
                raise ValueError(f'{path}: ONNX models run on the CPU in float32 here; '
                                 f'got device {device!r}, bf16 {bf16!r}')
            run = OnnxRunner(path)
            return cls(run, run.spec, str(path), batch_size)
        from experiments.torch_model import load_checkpoint  # PyTorch only for checkpoints
        run, spec = load_checkpoint(path, device, bf16)
        if bf16 and spec.get('thresholds'):
            warnings.warn(f'{path}: its thresholds were calibrated on float32 maps, and bfloat16 maps differ from '
                          f'them by up to about 1e-3: a score or pixel that close to a threshold may be decided '
                          f'otherwise')
        return cls(run, spec, str(path), batch_size)

    @property
    def thresholds(self):
        """The calibrated thresholds (``experiments.thresholds``), or None."""
        return self.spec.get('thresholds')

    @property
    def threshold(self):
        """Image threshold: an image is anomalous when ``scores['mean']`` is above it (None
        before calibration)."""
        return None if self.thresholds is None else self.thresholds['image']

    @property
    def pixel_threshold(self):
        """Pixel threshold: a pixel is anomalous when its map value is above it (None before
        calibration)."""
        return None if self.thresholds is None else self.thresholds['pixel']

    def read(self, path):
        """The image file at ``path`` as this model reads it (``self_sup_data.images.read_image``):
        16-bit images scaled from the bit depth of its training images, or from its intensity window
        (``spec['bit_depth']``; image by image for models trained on 8-bit images)."""
        return read_image(path, self.spec.get('bit_depth'))

    def shape_notes(self, names, shapes):
        """Notes (strings) on the images, of ``shapes`` as read and named by ``names``, whose
        aspect ratio or size is unlike the model's training images (``inference.shape_notes``)."""
        return inference.shape_notes(self.spec, names, shapes)

    def contrast_notes(self, names, images):
        """A note (a list of one string, or none) on ``images`` (uint8 arrays, named by ``names``)
        of far less contrast than the model's training images as the network gets them
        (``inference.contrast_notes``)."""
        spans = [inference.prepared_span(inference.as_image(image, str(name)), self.spec)
                 for name, image in zip(names, images)]
        return inference.contrast_notes(self.spec, names, spans)

    def check_flip_average(self):
        """ValueError when flip averaging does not apply to this model (objects)."""
        inference.check_flip_average(self.spec, self.source)

    def maps(self, images, flip_average=False, progress=False):
        """Anomaly maps at the model's resolution (float32 ``N x side x side``), as the
        evaluation computes them (``inference.model_maps``)."""
        if flip_average:
            self.check_flip_average()
        images = [inference.as_image(image, f'image {index}')
                  for index, image in enumerate(image_list(images))]
        maps = inference.model_maps(self.run, images, self.spec, self.batch_size, flip_average,
                                    progress)
        bad = np.flatnonzero(~np.isfinite(maps).all(axis=tuple(range(1, np.ndim(maps)))))
        if bad.size:
            raise NonFiniteMapError(f'the model {self.source} gave NaN or infinite values in the maps of '
                                    f'{bad.size} of {len(maps)} images (image {bad[0]} first): it has '
                                    f'diverged or is damaged, and cannot score them')
        return maps

    def predict(self, images, flip_average=False, progress=False, masks=False):
        """(scores, maps) of ``images``: scores {'mean', 'max'} (float arrays; the mean of each
        map is the image score of the paper and of ``threshold``) from the maps at the model's
        resolution, and each map (float32) resized to its image's height and width.
        ``flip_average``: see ``inference.model_maps`` (textures only). ``masks``: also each
        image's defect mask, (scores, maps, masks): the pixels above ``pixel_threshold`` in the map
        at the model's resolution, where the threshold was calibrated, resized to the image's height
        and width (``inference.mask_to_image_size``; the resized map is smoother, and fewer of its
        pixels lie above the threshold than it was calibrated to flag); ValueError before
        calibration, and for thresholds calibrated with another ``flip_average`` (which
        ``warn_flip_average_mismatch`` warns of without masks)."""
        if masks and self.pixel_threshold is None:
            raise ValueError(f'{self.source} has no pixel threshold to make masks with: calibrate it first '
                             f'(python -m experiments.thresholds)')
        if masks and inference.flip_average_mismatch(self.thresholds, flip_average):
            raise ValueError(f'{self.source}: its pixel threshold was calibrated '
                             f'{inference.with_or_without(not flip_average)} flip averaging, and masks of maps '
                             f'{inference.with_or_without(flip_average)} it would not flag what it was '
                             f'calibrated to; calibrate it the same way')
        images = image_list(images)
        inference.warn_flip_average_mismatch(self.thresholds, flip_average, self.source)
        maps = self.maps(images, flip_average, progress)
        shapes = [np.shape(image) for image in images]
        sized = [inference.to_image_size(map_, shape) for map_, shape in zip(maps, shapes)]
        if not masks:
            return inference.image_scores(maps), sized
        return inference.image_scores(maps), sized, [
            inference.mask_to_image_size(map_ > self.pixel_threshold, shape) for map_, shape in zip(maps, shapes)]
