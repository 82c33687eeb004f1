"""Two-stage anomaly detection: a trained network's encoder features and a one-class model.

Stage one is any network trained by this project (NSA's encoder-decoder, or the CutPaste
classifier of the ``CutPaste-3way`` setting); stage two fits a classic one-class model to the
encoder features of *normal* training images only (Sohn et al., "Learning and Evaluating
Representations for Deep One-class Classification", ICLR 2021; Li et al., "CutPaste", CVPR 2021).

Features (``extract_features``): ``model.encoder(x)`` gives the four ResNet stage maps (layers
1-4); an image's feature vector is the global average of the last stage's map, optionally
concatenated with earlier stages' averages (``layers``). Feature vectors are L2-normalised
before fitting and scoring (as in CutPaste's Gaussian density code), which also makes the
kernel-width rule below independent of the network's feature scale.

One-class models (scikit-learn; each scores samples so that higher = more anomalous):

    gde    GaussianDensityEstimator: mean mu and Ledoit-Wolf shrinkage covariance S;
           score = (x - mu)^T S^-1 (x - mu), the squared Mahalanobis distance
    kde    KernelDensityEstimator: Gaussian kernel density with bandwidth h;
           score = -log p(x)
    ocsvm  OneClassSVMDetector: RBF one-class SVM, gamma = 1 / (2 h^2), nu = 0.1 (at most about
           10 % of the normal samples outside the support); score = -decision_function(x)

scikit-learn is imported by each model's ``fit``, not here: training imports this module (through
the evaluation), and scikit-learn's import would add about 2 s to every start of a training script.

The kernel width h (KDE and OC-SVM) follows the median heuristic: the median Euclidean distance
between pairs of (up to ``MEDIAN_SAMPLES``) fitting vectors.

Localisation (patch level, as CutPaste): the same kind of model is fitted to the vectors of the
encoder's spatial map of ``patch_layer`` (each location is the feature of an image patch; up to
``max_patch_vectors`` locations of the normal images, sampled at random), scores every location
of a test image, and the score map is upsampled bilinearly to the image (or its central crop)
and smoothed with a Gaussian of ``SMOOTHING_SIGMA_AT_256 * side / 256`` pixels (CutPaste's
sigma of 4 pixels at 256 pixels). For objects (``crop_size``) the map of the central crop is
padded with the lowest score of the test set, as the encoder-decoder's maps are padded with 0.
"""
import warnings

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from experiments import metrics
from self_sup_data.images import central_box

NUM_STAGES = 4  # model.encoder returns the maps of ResNet layers 1-4
DEFAULT_LAYERS = (4,)
DEFAULT_PATCH_LAYER = 3  # stride 16: 16 x 16 locations at 256 pixels
MAX_PATCH_VECTORS = 4096  # patch vectors of the normal images that a patch-level model is fitted to
MEDIAN_SAMPLES = 1000  # vectors whose pairwise distances give the median-heuristic kernel width
OCSVM_NU = 0.1
SMOOTHING_SIGMA_AT_256 = 4.0  # pixels of the Gaussian that smooths a heatmap, at a 256-pixel side
SINGULAR_SHRINKAGE = 0.1  # GDE's shrinkage where Ledoit-Wolf's leaves S singular (two samples, or repeated ones)
SINGULAR_RATIO = 1e-10  # smallest / largest eigenvalue of a covariance at or below which it counts as singular
SAME_FEATURES = 1e-6  # relative spread (some float32 roundings) below which a feature counts as constant
POOLED_METRICS = ('image_auroc_pooled', 'image_ap_pooled')  # image score: the pooled features' score


# ------------------------------------------------------------------------------ one-class models

def _as_features(features, name='features', min_samples=1):
    """``features`` as a float64 N x D array; ValueError naming ``name`` and what is wrong."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f'{name} must be an N x D array, got shape {features.shape}')
    if len(features) < min_samples:
        raise ValueError(f'{name}: a one-class model needs at least {min_samples} samples to fit, '
                         f'got {len(features)}')
    if not np.isfinite(features).all():
        rows = int((~np.isfinite(features)).any(axis=1).sum())
        raise ValueError(f'{name}: {rows} of {len(features)} rows hold NaN or infinite values '
                         '(a model whose outputs are not finite?)')
    return features


def _check_spread(features, model):
    """ValueError naming the one-class ``model`` where the normal ``features`` (N x D) are all the same
    (up to rounding: the spread of each dimension at most SAME_FEATURES of its largest magnitude): a
    density fitted to them would score every test image alike, or by rounding noise."""
    scale = np.maximum(np.abs(features).max(axis=0), np.finfo(np.float64).tiny)
    if (np.ptp(features, axis=0) <= SAME_FEATURES * scale).all():
        raise ValueError(f'{model}: the normal features are all the same (zero variance): there is no '
                         'density to fit (a model whose encoder outputs the same features for every image?)')


class GaussianDensityEstimator:
    """Gaussian density estimation (GDE): N(mu, S) with the Ledoit-Wolf shrinkage covariance S.

    ``score(x)`` is the squared Mahalanobis distance ``(x - mu)^T S^-1 (x - mu)``, i.e. the
    negative log-density up to constants. With fewer samples than dimensions the sample
    covariance is singular; the shrinkage towards a scaled identity keeps S invertible, and a
    warning says so. Where the Ledoit-Wolf shrinkage is 0 all the same (two samples, or two vectors
    repeated as often: each centred sample's outer product is then the sample covariance), S would be
    singular and scores would measure one direction only: S is then shrunk by SINGULAR_SHRINKAGE,
    with a warning.
    """

    def fit(self, features):
        from sklearn.covariance import LedoitWolf, ShrunkCovariance
        features = _as_features(features, min_samples=2)
        _check_spread(features, 'GDE')
        self.estimator_ = LedoitWolf().fit(features)
        n, d = features.shape
        eigenvalues = np.linalg.eigvalsh(self.estimator_.covariance_)
        if eigenvalues[0] <= SINGULAR_RATIO * eigenvalues[-1]:
            warnings.warn(f'GDE: the Ledoit-Wolf covariance of the {n} normal samples ({d} feature dimensions) '
                          f'is singular (two samples, or two vectors repeated as often?); shrunk by '
                          f'{SINGULAR_SHRINKAGE} towards a scaled identity instead')
            self.estimator_ = ShrunkCovariance(shrinkage=SINGULAR_SHRINKAGE).fit(features)
        elif n < d:
            warnings.warn(f'GDE: {n} normal samples for {d} feature dimensions: the sample '
                          'covariance is singular, the Ledoit-Wolf shrinkage '
                          f'({self.estimator_.shrinkage_:.2f}) makes it invertible')
        return self

    def score(self, features):
        return self.estimator_.mahalanobis(_as_features(features))


def median_distance(features, max_samples=MEDIAN_SAMPLES, seed=0):
    """Median Euclidean distance between pairs of rows that differ (of at most ``max_samples``
    rows, drawn at random); the median heuristic for a kernel width. Positive (1 if all rows
    coincide). The distances are those of the differences (``pdist``), exactly 0 for repeated
    rows: |a|^2 + |b|^2 - 2 a.b would leave rounding residues that count as pairs that differ."""
    from scipy.spatial.distance import pdist
    features = _as_features(features, min_samples=2)
    if len(features) > max_samples:
        rows = np.random.default_rng(seed).choice(len(features), max_samples, replace=False)
        features = features[rows]
    pairs = pdist(features)
    pairs = pairs[pairs > 0]
    return float(np.median(pairs)) if len(pairs) else 1.0


def _positive_or_none(value, name):
    """``value`` (None: chosen from the data); ValueError naming ``name`` when it is not positive."""
    if value is not None and not value > 0:
        raise ValueError(f'{name} must be positive (or None: the median heuristic), got {value!r}')
    return value


class KernelDensityEstimator:
    """Gaussian kernel density estimation; ``score(x) = -log p(x)``.

    ``bandwidth`` None: the median heuristic (``median_distance`` of the fitting vectors).
    """

    def __init__(self, bandwidth=None):
        self.bandwidth = _positive_or_none(bandwidth, 'bandwidth')

    def fit(self, features):
        from sklearn.neighbors import KernelDensity
        features = _as_features(features, min_samples=2)
        _check_spread(features, 'KDE')
        self.bandwidth_ = median_distance(features) if self.bandwidth is None else self.bandwidth
        self.estimator_ = KernelDensity(kernel='gaussian', bandwidth=self.bandwidth_).fit(features)
        return self

    def score(self, features):
        return -self.estimator_.score_samples(_as_features(features))


class OneClassSVMDetector:
    """One-class SVM with an RBF kernel ``exp(-gamma |x - y|^2)``; ``score(x) = -decision_function(x)``.

    ``gamma`` None: ``1 / (2 h^2)`` with h the median heuristic (``median_distance``); ``nu``
    bounds the fraction of normal samples outside the support.
    """

    def __init__(self, nu=OCSVM_NU, gamma=None):
        self.nu, self.gamma = nu, _positive_or_none(gamma, 'gamma')

    def fit(self, features):
        from sklearn.svm import OneClassSVM
        features = _as_features(features, min_samples=2)
        _check_spread(features, 'OC-SVM')
        self.gamma_ = 1 / (2 * median_distance(features) ** 2) if self.gamma is None else self.gamma
        self.estimator_ = OneClassSVM(kernel='rbf', nu=self.nu, gamma=self.gamma_).fit(features)
        return self

    def score(self, features):
        return -self.estimator_.decision_function(_as_features(features))


ONE_CLASS_MODELS = {'gde': GaussianDensityEstimator, 'kde': KernelDensityEstimator,
                    'ocsvm': OneClassSVMDetector}


def make_one_class(name):
    """A new one-class model of kind ``name`` ('gde', 'kde' or 'ocsvm')."""
    if name not in ONE_CLASS_MODELS:
        raise ValueError(f'unknown one-class model {name!r}; valid: {", ".join(ONE_CLASS_MODELS)}')
    return ONE_CLASS_MODELS[name]()


def column_suffix(name):
    """The suffix of a two-stage variant's table column, e.g. '+GDE' for 'gde'."""
    make_one_class(name)  # validates
    return '+' + name.upper()


def l2_normalize(features):
    """Rows scaled to unit Euclidean norm (zero rows stay zero)."""
    features = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(features, axis=-1, keepdims=True)
    return features / np.maximum(norms, np.finfo(np.float64).tiny)


def fit_score(name, normal_features, test_features):
    """Fit a one-class model ``name`` to the L2-normalised ``normal_features`` (N x D) and return
    the scores (float64) of the L2-normalised ``test_features`` (M x D), higher = more anomalous."""
    normal = _as_features(normal_features, 'the normal features (one per normal training image)', min_samples=2)
    model = make_one_class(name).fit(l2_normalize(normal))
    return model.score(l2_normalize(_as_features(test_features, 'the test features')))


# ------------------------------------------------------------------------------ features

def encoder_maps(model, images, source='model'):
    """``model.encoder(images)``: the four stage maps ``B x C_l x h_l x w_l``; ValueError naming
    ``source`` when the model has no encoder that returns them."""
    encoder = getattr(model, 'encoder', None)
    if not callable(encoder):
        raise ValueError(f'{source}: the model ({type(model).__name__}) has no encoder; two-stage '
                         f'scoring needs model.encoder(x) -> the {NUM_STAGES} stage feature maps')
    maps = encoder(images)
    if (not isinstance(maps, (list, tuple)) or len(maps) != NUM_STAGES
            or not all(torch.is_tensor(m) and m.dim() == 4 and len(m) == len(images) for m in maps)):
        got = ([tuple(m.shape) if torch.is_tensor(m) else type(m).__name__ for m in maps]
               if isinstance(maps, (list, tuple)) else type(maps).__name__)
        raise ValueError(f'{source}: model.encoder must return {NUM_STAGES} feature maps '
                         f'B x C x h x w (ResNet layers 1-4), got {got}')
    return maps


def _check_layers(layers, patch_layer):
    valid = range(1, NUM_STAGES + 1)
    if not layers or any(layer not in valid for layer in layers):
        raise ValueError(f'layers must be ResNet stages among 1-{NUM_STAGES}, got {layers!r}')
    if patch_layer is not None and patch_layer not in valid:
        raise ValueError(f'patch_layer must be one of 1-{NUM_STAGES} or None, got {patch_layer!r}')


def center_crop(images, size=None):
    """The central ``size x size`` square of images ``B x C x H x W`` (None: the images)."""
    if size is None:
        return images
    height, width = images.shape[-2:]
    if size > min(height, width):
        raise ValueError(f'crop size {size} is larger than the images ({height}x{width})')
    return images[(...,) + central_box((height, width), size)]


def extract_features(model, dataset, layers=DEFAULT_LAYERS, patch_layer=DEFAULT_PATCH_LAYER,
                     crop_size=None, batch_size=32, device='cpu', source='model'):
    """Encoder features of every item of ``dataset`` (items whose first element is an image
    tensor C x H x W), in batches, without gradients, the model in eval mode.

    crop_size: use the central ``crop_size`` square of each image (objects, as the evaluation of
    the encoder-decoder). Returns (pooled, patches): pooled float32 N x D, the global averages
    of the maps of ``layers`` (ResNet stages 1-4) concatenated in that order; patches float32
    N x C x h x w, the map of ``patch_layer`` (None when ``patch_layer`` is None).
    """
    _check_layers(layers, patch_layer)
    device = torch.device(device)
    model.eval()
    pooled, patches = [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    with torch.no_grad():
        for batch in tqdm(loader, 'encoder features', leave=False, disable=None):
            images = center_crop(batch[0].to(device), crop_size)
            maps = encoder_maps(model, images, source)
            pooled.append(torch.cat([maps[layer - 1].float().mean(dim=(2, 3)) for layer in layers],
                                    dim=1).cpu().numpy())
            if patch_layer is not None:
                patches.append(maps[patch_layer - 1].float().cpu().numpy())
    return np.concatenate(pooled), np.concatenate(patches) if patch_layer is not None else None


# ------------------------------------------------------------------------------ localisation

def patch_vectors(maps):
    """Feature maps N x C x h x w -> one C-vector per location, (N h w) x C (image-major order)."""
    return np.ascontiguousarray(np.moveaxis(np.asarray(maps), 1, -1).reshape(-1, maps.shape[1]))


def smoothing_sigma(side):
    """Pixels of the Gaussian that smooths a heatmap of ``side`` pixels (4 at 256, CutPaste)."""
    return SMOOTHING_SIGMA_AT_256 * side / 256


def upsample_scores(scores, size):
    """Patch scores N x h x w -> heatmaps float32 N x H x W: bilinear upsampling to
    ``size = (H, W)``, then Gaussian smoothing with ``smoothing_sigma(max(H, W))``."""
    scores = torch.as_tensor(np.asarray(scores, dtype=np.float32))[:, None]
    upsampled = F.interpolate(scores, size=tuple(size), mode='bilinear', align_corners=False)
    sigma = smoothing_sigma(max(size))
    return np.stack([cv2.GaussianBlur(m, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT)
                     for m in upsampled[:, 0].numpy()]).astype(np.float32)


def pad_to(heatmaps, size):
    """Heatmaps N x h x w of a central crop placed in maps N x H x W, padded with their minimum."""
    heatmaps = np.asarray(heatmaps, dtype=np.float32)
    height, width = size
    full = np.full((len(heatmaps), height, width), heatmaps.min(), dtype=np.float32)
    top, left = (height - heatmaps.shape[1]) // 2, (width - heatmaps.shape[2]) // 2
    full[:, top:top + heatmaps.shape[1], left:left + heatmaps.shape[2]] = heatmaps
    return full


def sample_rows(vectors, max_rows, seed=0):
    """At most ``max_rows`` rows of ``vectors``, drawn at random without replacement (seeded)."""
    if len(vectors) <= max_rows:
        return vectors
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), max_rows, replace=False))
    return vectors[rows]


# ------------------------------------------------------------------------------ two stages

def two_stage_scores(model, normal_set, test_set, names=('gde',), layers=DEFAULT_LAYERS,
                     patch_layer=DEFAULT_PATCH_LAYER, crop_size=None, batch_size=32, device='cpu',
                     max_patch_vectors=MAX_PATCH_VECTORS, seed=0, source='model', errors=None):
    """Fit the one-class models ``names`` to the encoder features of ``normal_set`` (normal
    images, preprocessed as the test images) and score the items of ``test_set``.

    Returns {name: (image_scores float64 N, heatmaps float32 N x H x W)}: the image score is the
    model's score of the pooled features; the heatmap comes from the patch-level model (see the
    module docstring), at the test images' size H x W. ``source`` names the model in errors.
    ``errors``: None (a one-class model that cannot be fitted raises its ValueError), or a dict that
    receives {name: ValueError} of those models, which the result leaves out (the others are scored
    on the same features).
    """
    names = list(dict.fromkeys(names))
    for name in names:
        make_one_class(name)  # validates before any work
    if patch_layer is None:
        raise ValueError('two_stage_scores needs a patch_layer (the ResNet stage its heatmaps come from), '
                         'got None; extract_features(..., patch_layer=None) gives the pooled features alone')
    features = dict(layers=layers, patch_layer=patch_layer, crop_size=crop_size,
                    batch_size=batch_size, device=device, source=source)
    normal_pooled, normal_patches = extract_features(model, normal_set, **features)
    test_pooled, test_patches = extract_features(model, test_set, **features)
    fit_vectors = sample_rows(patch_vectors(normal_patches), max_patch_vectors, seed)
    test_vectors = patch_vectors(test_patches)
    image_size = tuple(test_set[0][0].shape[-2:])
    crop = image_size if crop_size is None else (crop_size, crop_size)
    results = {}
    for name in names:
        try:
            image_scores = fit_score(name, normal_pooled, test_pooled)
            patch_scores = fit_score(name, fit_vectors, test_vectors).reshape(
                (len(test_patches),) + test_patches.shape[2:])
        except ValueError as error:
            if errors is None:
                raise
            errors[name] = error
            continue
        results[name] = (image_scores, pad_to(upsample_scores(patch_scores, crop), image_size))
    return results


def evaluate_two_stage(model, normal_set, test_set, names=('gde',), **kwargs):
    """Metrics of the two-stage variants ``names`` of ``model`` on ``test_set`` (with ``labels``,
    ``masks`` and ``has_mask`` as ``SelfSupMVTecDataset``) -> {name: (metrics, heatmaps)}.

    The metrics are those of ``metrics.evaluate_maps`` on the patch-level heatmaps (image scores
    the heatmap's mean and max) and ``image_auroc_pooled``/``image_ap_pooled`` with the
    one-class score of the pooled features as the image score. ``kwargs``: see
    ``two_stage_scores``.
    """
    labels = np.asarray(test_set.labels)
    masks = np.stack(test_set.masks)
    results = {}
    for name, (scores, heatmaps) in two_stage_scores(model, normal_set, test_set, names,
                                                     **kwargs).items():
        values = metrics.evaluate_maps(labels, heatmaps, masks, has_mask=test_set.has_mask)
        values.update(image_auroc_pooled=metrics.image_auroc(labels, scores),
                      image_ap_pooled=metrics.image_ap(labels, scores))
        results[name] = (values, heatmaps)
    return results
