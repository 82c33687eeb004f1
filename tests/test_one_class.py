"""Two-stage detection: one-class models, encoder features, patch-level heatmaps."""
import warnings

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial.distance import pdist
from threadpoolctl import threadpool_limits

from conftest import make_mvtec_category

from experiments import one_class
from experiments.settings import trained_model_path
from experiments.one_class import (ONE_CLASS_MODELS, GaussianDensityEstimator, KernelDensityEstimator,
                                   OneClassSVMDetector, extract_features, l2_normalize, make_one_class,
                                   median_distance, two_stage_scores, upsample_scores)
from models.resnet import resnet18_enc_dec
from self_sup_data.mvtec import SelfSupMVTecDataset
from self_sup_data.self_sup_tasks import CutPaste3Way, color_jitter, cutpaste_scar


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """The tiny forward passes and matrices here run faster on one thread on a shared machine
    (torch's and the BLAS's threads otherwise compete for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ one-class models

COVARIANCE = np.array([[4.0, 1.5, 0.0], [1.5, 2.0, -0.5], [0.0, -0.5, 0.5]])
MEAN = np.array([1.0, -2.0, 0.5])


def gaussian_data(n, seed=0):
    return np.random.default_rng(seed).multivariate_normal(MEAN, COVARIANCE, size=n)


def points_at_mahalanobis_radius(radii, per_radius=8, seed=1):
    """Points at known Mahalanobis distances from MEAN (random directions in whitened space)."""
    directions = np.random.default_rng(seed).normal(size=(per_radius, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    factor = np.linalg.cholesky(COVARIANCE)
    points = np.concatenate([MEAN + (r * directions) @ factor.T for r in radii])
    return points, np.repeat(radii, per_radius)


def test_gde_score_is_the_squared_mahalanobis_distance():
    model = GaussianDensityEstimator().fit(gaussian_data(4000))
    points, radii = points_at_mahalanobis_radius([0.5, 1.0, 2.0, 4.0])
    scores = model.score(points)
    np.testing.assert_allclose(scores, radii ** 2, rtol=0.15)
    # farther in Mahalanobis distance scores higher, whatever the Euclidean distance
    for low, high in ((0.5, 1.0), (1.0, 2.0), (2.0, 4.0)):
        assert scores[radii == low].max() < scores[radii == high].min()


@pytest.mark.parametrize('name', list(ONE_CLASS_MODELS))
def test_outliers_rank_above_inliers(name):
    model = make_one_class(name).fit(gaussian_data(400))
    inliers, _ = points_at_mahalanobis_radius([0.25, 0.75], seed=2)
    outliers, _ = points_at_mahalanobis_radius([4.0, 6.0], seed=3)
    scores_in, scores_out = model.score(inliers), model.score(outliers)
    assert scores_in.dtype == np.float64 and scores_in.shape == (16,)
    assert scores_in.max() < scores_out.min()


def test_shrinkage_warns_when_fewer_samples_than_dimensions():
    features = np.random.default_rng(0).normal(size=(5, 20))
    with pytest.warns(UserWarning, match='5 normal samples for 20 feature dimensions.*shrinkage'):
        model = GaussianDensityEstimator().fit(features)
    assert np.isfinite(model.score(features)).all()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        GaussianDensityEstimator().fit(np.random.default_rng(0).normal(size=(30, 20)))


@pytest.mark.parametrize('rows', [[0, 1], [0, 1, 0, 1]])
def test_gde_of_two_vectors_shrinks_a_singular_covariance(rows):
    """Two samples (or two repeated): Ledoit-Wolf's shrinkage is 0 and its S has rank 1, by whose
    pseudo-inverse the training vectors scored above new ones; S is shrunk instead, and said so."""
    rng = np.random.default_rng(0)
    normal = l2_normalize(np.abs(rng.standard_normal((2, 64))))[rows]
    with pytest.warns(UserWarning, match=rf'covariance of the {len(rows)} normal samples \(64 feature dimensions\) '
                                         r'is singular \(two samples, or two vectors repeated as often\?\); '
                                         r'shrunk by 0.1'):
        model = GaussianDensityEstimator().fit(normal)
    mean = normal.mean(axis=0)
    covariance = 0.9 * np.cov(normal.T, bias=True) + 0.1 * np.trace(np.cov(normal.T, bias=True)) / 64 * np.eye(64)
    new = l2_normalize(np.abs(rng.standard_normal((5, 64))))
    expected = np.einsum('nd,de,ne->n', new - mean, np.linalg.inv(covariance), new - mean)
    assert model.score(new) == pytest.approx(expected)
    assert model.score(normal).max() < model.score(new).min()


def test_median_distance_is_the_median_of_pairwise_distances():
    features = np.random.default_rng(0).normal(size=(50, 7))
    assert median_distance(features) == pytest.approx(np.median(pdist(features)))
    assert median_distance(np.ones((4, 3))) == 1.0  # coinciding rows: a usable width
    repeated = np.concatenate([np.zeros((80, 7)), features[:20] * 0.01])  # most pairs coincide
    distinct = pdist(repeated)
    assert median_distance(repeated) == pytest.approx(np.median(distinct[distinct > 0]))
    # repeated vectors that are not 0: |a|^2 + |b|^2 - 2 a.b left rounding residues of about 1e-8 (on some
    # of these draws, which ones depending on the BLAS), the median of most pairs
    for seed in range(10):
        rng = np.random.default_rng(seed)
        for dimensions in (256, 512):
            vector = np.abs(rng.standard_normal(dimensions)).astype(np.float32)
            noisy = np.abs(vector + rng.normal(0, 0.3, (100, dimensions))).astype(np.float32)
            mostly_one = l2_normalize(np.concatenate([np.repeat(vector[None], 400, 0), noisy]))
            distinct = pdist(mostly_one)
            assert median_distance(mostly_one) == pytest.approx(np.median(distinct[distinct > 0]))


def test_bad_names_and_inputs_raise():
    with pytest.raises(ValueError, match="unknown one-class model 'svdd'; valid: gde, kde, ocsvm"):
        make_one_class('svdd')
    with pytest.raises(ValueError, match='N x D'):
        GaussianDensityEstimator().fit(np.zeros(10))
    with pytest.raises(ValueError, match='needs at least 2 samples to fit, got 1'):
        make_one_class('kde').fit(np.zeros((1, 3)))
    nan_rows = np.ones((6, 3))
    nan_rows[2, 1] = np.nan
    with pytest.raises(ValueError, match=r'the normal features \(one per normal training image\): 1 of 6 rows '
                                         r'hold NaN or infinite values'):
        one_class.fit_score('ocsvm', nan_rows, np.ones((2, 3)))
    with pytest.raises(ValueError, match=r'the normal features \(one per normal training image\): a one-class '
                                         r'model needs at least 2 samples to fit, got 1'):
        one_class.fit_score('gde', np.ones((1, 3)), np.ones((2, 3)))  # a category of one training image
    scaled = np.outer(np.arange(1, 51), np.ones(4) / 3)  # rows equal up to scale: equal once normalised
    rng = np.random.default_rng(0)
    rounded = (rng.random(64) * (1 + rng.integers(-1, 2, (50, 64)) * np.finfo(np.float32).eps)).astype(np.float32)
    for constant in (np.zeros((50, 4)), np.ones((50, 4)), scaled, rounded):  # no spread but rounding's
        for name, label in (('gde', 'GDE'), ('kde', 'KDE'), ('ocsvm', 'OC-SVM')):
            with pytest.raises(ValueError, match=f'^{label}: the normal features are all the same'):
                one_class.fit_score(name, constant, np.random.default_rng(0).normal(size=(5, 4)))
    varied = np.c_[np.full(20, 1e10), rng.standard_normal((20, 3))]  # one large constant dimension, three varying
    assert GaussianDensityEstimator().fit(varied).score(varied).shape == (20,)
    assert one_class.column_suffix('ocsvm') == '+OCSVM'
    for model, parameter in ((KernelDensityEstimator, 'bandwidth'), (OneClassSVMDetector, 'gamma')):
        for value in (0, -1.0):  # not taken for "choose from the data"
            with pytest.raises(ValueError, match=rf'{parameter} must be positive .*got {value}'):
                model(**{parameter: value})
    assert KernelDensityEstimator(bandwidth=0.5).fit(np.eye(3)).bandwidth_ == 0.5


def test_fit_score_normalises_the_features():
    normal = np.random.default_rng(0).normal(size=(40, 6)) + 3
    test = np.random.default_rng(1).normal(size=(5, 6))
    scores = one_class.fit_score('gde', normal, test)
    np.testing.assert_allclose(one_class.fit_score('gde', 10 * normal, 0.1 * test), scores)


# ------------------------------------------------------------------------------ features

class ImageSet(torch.utils.data.Dataset):
    """Items (image, label, mask) like a test set: random 1-channel images, every other one
    with a bright square (its mask)."""

    def __init__(self, n=4, size=64, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.images = [torch.rand(1, size, size, generator=generator) for _ in range(n)]
        self.labels = np.arange(n) % 2
        self.masks = [np.zeros((size, size), np.uint8) for _ in range(n)]
        for i in range(1, n, 2):
            self.images[i][:, 16:32, 16:32] = 3.0
            self.masks[i][16:32, 16:32] = 1
        self.has_mask = np.ones(n, bool)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i]), torch.from_numpy(self.masks[i])[None].float()


@pytest.fixture(scope='module')
def network():
    torch.manual_seed(0)
    return resnet18_enc_dec(in_channels=1).eval()


@pytest.mark.parametrize('layers, dims', [((4,), 512), ((1, 2, 3, 4), 64 + 128 + 256 + 512),
                                          ((2,), 128)])
def test_feature_shapes(network, layers, dims):
    pooled, patches = extract_features(network, ImageSet(n=3), layers=layers, batch_size=2)
    assert pooled.shape == (3, dims) and pooled.dtype == np.float32
    assert patches.shape == (3, 256, 4, 4)  # layer 3: stride 16 at 64 pixels
    cropped, cropped_patches = extract_features(network, ImageSet(n=3), layers=layers,
                                                patch_layer=4, crop_size=32)
    assert cropped.shape == (3, dims) and cropped_patches.shape == (3, 512, 1, 1)
    assert extract_features(network, ImageSet(n=3), patch_layer=None)[1] is None


def test_features_are_the_pooled_stage_maps_whatever_the_batch_size(network):
    data = ImageSet(n=3)
    pooled, patches = extract_features(network, data, layers=(3, 4), batch_size=1)
    batched, batched_patches = extract_features(network, data, layers=(3, 4), batch_size=3)
    np.testing.assert_allclose(pooled, batched, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        maps = network.encoder(torch.stack(data.images))
    expected = torch.cat([maps[2].mean(dim=(2, 3)), maps[3].mean(dim=(2, 3))], 1).numpy()
    np.testing.assert_allclose(pooled, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(patches, maps[2].numpy(), rtol=1e-4, atol=1e-5)


class NoEncoder(torch.nn.Module):
    def forward(self, x):
        return x


class FlatEncoder(torch.nn.Module):
    def encoder(self, x):
        return x.mean(dim=(2, 3))


@pytest.mark.parametrize('model, message', [(NoEncoder(), 'has no encoder'),
                                            (FlatEncoder(), 'must return 4 feature maps')])
def test_model_without_a_stage_encoder_raises_naming_it(model, message):
    with pytest.raises(ValueError, match=f'models/final_x.pt: .*{message}'):
        extract_features(model, ImageSet(n=2), source='models/final_x.pt')


def test_bad_layers_raise(network):
    with pytest.raises(ValueError, match='layers must be ResNet stages among 1-4'):
        extract_features(network, ImageSet(n=2), layers=(5,))


# ------------------------------------------------------------------------------ localisation

def test_upsampled_heatmap_has_the_image_size_and_peaks_at_the_hot_patch():
    scores = np.zeros((2, 4, 4))
    scores[1, 1, 2] = 10.0
    heatmaps = upsample_scores(scores, (64, 64))
    assert heatmaps.shape == (2, 64, 64) and heatmaps.dtype == np.float32
    np.testing.assert_allclose(heatmaps[0], 0)
    row, col = np.unravel_index(heatmaps[1].argmax(), (64, 64))
    assert 16 <= row < 32 and 32 <= col < 48  # inside the patch's 16-pixel cell
    assert one_class.smoothing_sigma(256) == 4.0 and one_class.smoothing_sigma(128) == 2.0


@pytest.mark.filterwarnings('ignore:GDE')  # fewer normal images than dimensions
@pytest.mark.parametrize('crop_size', [None, pytest.param(32, marks=pytest.mark.slow)])
def test_two_stage_heatmaps_have_the_image_size(network, crop_size):
    results = two_stage_scores(network, ImageSet(n=6, seed=1), ImageSet(n=4, seed=2),
                               names=['gde', 'ocsvm'], crop_size=crop_size, batch_size=4)
    assert list(results) == ['gde', 'ocsvm']
    for scores, heatmaps in results.values():
        assert scores.shape == (4,) and heatmaps.shape == (4, 64, 64)
        assert np.isfinite(heatmaps).all()
        if crop_size:  # outside the central crop: the lowest score
            assert (heatmaps[:, :16] == heatmaps.min()).all()
    if crop_size is None:
        with pytest.raises(ValueError, match='two_stage_scores needs a patch_layer'):
            two_stage_scores(network, ImageSet(n=6, seed=1), ImageSet(n=4, seed=2), patch_layer=None)


@pytest.mark.filterwarnings('ignore:GDE')
def test_evaluate_two_stage_reports_map_and_pooled_metrics(network):
    results = one_class.evaluate_two_stage(network, ImageSet(n=6, seed=1), ImageSet(n=4, seed=2),
                                           names=['gde'], batch_size=4)
    values, heatmaps = results['gde']
    assert set(values) == {'image_auroc_mean', 'image_auroc_max', 'image_ap_mean', 'image_ap_max',
                           'pixel_auroc', 'pixel_ap', 'au_pro', *one_class.POOLED_METRICS}
    assert all(0 <= v <= 1 for v in values.values())
    assert heatmaps.shape == (4, 64, 64)


# ------------------------------------------------------------------------------ CutPaste 3-way task

def smooth_image(size=64, channels=1, seed=0):
    noise = np.random.default_rng(seed).random((size // 8, size // 8, channels)).astype(np.float32)
    image = cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC).reshape(size, size, channels)
    return (40 + 170 * np.clip(image, 0, 1)).astype(np.uint8)


def changed_box(a, b):
    """(height, width) of the bounding box of the pixels where a and b differ."""
    rows, cols = np.nonzero((a != b).any(axis=-1))
    return np.ptp(rows) + 1, np.ptp(cols) + 1


@pytest.mark.parametrize('channels', [1, 3])
def test_scar_changes_only_a_thin_rotated_strip(channels):
    image = smooth_image(256, channels)
    rng = np.random.default_rng(0)
    for _ in range(20):
        scar, mask = cutpaste_scar(image, rng)
        assert scar.shape == image.shape and scar.dtype == np.uint8
        assert not ((scar != image).any(axis=-1) & ~mask).any()
        assert 2 <= mask.sum() <= 16 * 25 + 2 * (16 + 25)  # width 2-16, length 10-25 (rotated)
        rows, cols = np.nonzero(mask)
        assert max(np.ptp(rows), np.ptp(cols)) + 1 <= np.ceil(np.hypot(16, 25)) + 1


def test_scar_is_pasted_around_a_given_centre_inside_the_image():
    image = smooth_image(256, 1)
    rng = np.random.default_rng(1)
    for _ in range(10):
        scar, mask = cutpaste_scar(image, rng, centre=(128, 100))  # (x, y)
        rows, cols = np.nonzero(mask)
        assert abs((rows.min() + rows.max()) / 2 - 100) <= 1.5
        assert abs((cols.min() + cols.max()) / 2 - 128) <= 1.5
        assert not ((scar != image).any(axis=-1) & ~mask).any()
        _, corner = cutpaste_scar(image, rng, centre=(255, 0))  # moved inside, to the corner
        rows, cols = np.nonzero(corner)
        assert rows.min() <= 1 and cols.max() >= 254


def test_color_jitter_stays_within_its_strength():
    patch = np.full((8, 8, 1), 100, np.uint8)
    jittered = color_jitter(patch, np.random.default_rng(0), strength=0.1)
    assert 90 <= jittered.min() and jittered.max() <= 110
    assert np.array_equal(color_jitter(patch, np.random.default_rng(0), strength=0.0), patch)


@pytest.mark.parametrize('channels', [1, 3])
def test_three_way_views_and_labels(channels):
    image = smooth_image(64, channels)
    views, labels = CutPaste3Way()(image, np.random.default_rng(3))
    assert labels == [0, 1, 2] and len(views) == 3
    with pytest.raises(ValueError, match='same must be False where patches are neither shifted nor resized'):
        CutPaste3Way(dict(shift=False))  # its class-1 view would be the image itself
    # scar arguments are checked when the task is made, naming the argument
    for scar_args, message in (({'width': (5, 2)}, r'width must be \(low, high\)'),
                               ({'width': (-3, -1)}, 'width must'), ({'length': (float('nan'), 5)}, 'length must'),
                               ({'reference_side': 0}, 'reference_side must'), ({'max_degrees': -1}, 'max_degrees'),
                               ({'centre': (10.5, 3.2)}, 'centre must'), ({'jitter': 1.5}, 'jitter must'),
                               ({'widht': (2, 4)}, r"unknown cutpaste_scar arguments \['widht'\]")):
        with pytest.raises(ValueError, match=message):
            CutPaste3Way(scar_args=scar_args)
    with pytest.raises(ValueError, match='width must'):
        cutpaste_scar(image, np.random.default_rng(0), width=(0, 2))
    assert all(v.shape == image.shape and v.dtype == np.uint8 for v in views)
    assert views[0] is image or np.array_equal(views[0], image)
    height, width = changed_box(image, views[1])  # one pasted rectangle of at most 15 % area
    assert height * width <= 0.15 * 64 * 64 + 64
    height, width = changed_box(image, views[2])  # a scar: small at 64 pixels
    assert max(height, width) <= 10
    # a normal fraction (--normal-fraction) never leaves the CutPaste view normal
    three_way = CutPaste3Way(dict(normal_fraction=0.5))
    assert all(not np.array_equal(three_way(image, np.random.default_rng(seed))[0][1], image)
               for seed in range(40))


@pytest.mark.slow
def test_dataset_with_views_gives_three_labelled_views_per_image(tmp_path):
    make_mvtec_category(tmp_path, 'tiny', n_train=4)
    dataset = SelfSupMVTecDataset(tmp_path, 'tiny', res_scale=0.125, views=CutPaste3Way())
    images, target, labels = dataset[1]
    assert images.shape == (3, 1, 32, 32) and dataset.train_size == 32
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 2] and target == 0
    again, _, _ = dataset[1]
    torch.testing.assert_close(images, again)  # the item's rng: same views for the same item
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2)))
    assert batch[0].shape == (2, 3, 1, 32, 32) and batch[2].shape == (2, 3)


# ------------------------------------------------------------------------------ end to end

@pytest.mark.slow
def test_train_cutpaste_3way_and_evaluate_two_stage_columns(tiny_mvtec, tmp_path, capsys):
    import train_mvtec
    from experiments import mvtec_tasks
    from experiments.training import load_model
    from models.resnet import ResNetClassifier
    root, name = tiny_mvtec
    models = tmp_path / 'models'
    common = ['-d', str(root), '-o', str(models), '--epochs', '1', '--batch-size', '6',
              '--res-scale', '0.25', '--workers', '0', '--no-figures', '--device', 'cpu']
    capsys.readouterr()
    assert train_mvtec.main(['-s', 'CutPaste-3way-3'] + common + ['--evaluate']) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith('category'))
    assert header.endswith('AU-PRO  image AUROC (pooled features)')  # CutPaste's own image score
    assert train_mvtec.main(['-s', 'Shift-4'] + common) == 0
    path = trained_model_path(models, 'CutPaste-3way-3', name)
    model, meta = load_model(path)
    assert isinstance(model, ResNetClassifier) and meta['model_config']['arch'] == 'resnet18_classifier'
    assert meta['train_config']['loss'] == 'cross_entropy' and len(meta['epoch_losses']) == 1

    out = tmp_path / 'out'
    mvtec_tasks.main(['-m', str(models), '-d', str(root), '-o', str(out), '--one-class', 'gde',
                      'kde', 'ocsvm', '--device', 'cpu', '--batch-size', '8'])
    table = pd.read_csv(out / 'tables' / 'image_auroc_mean.csv', index_col=[0, 1])
    assert list(table.columns) == ['Shift', 'Shift+GDE', 'Shift+KDE', 'Shift+OCSVM',
                                   'CutPaste-3way+GDE', 'CutPaste-3way+KDE', 'CutPaste-3way+OCSVM']
    pooled = pd.read_csv(out / 'tables' / 'image_auroc_pooled.csv', index_col=[0, 1])
    assert pd.isna(pooled.loc[('texture', name), 'Shift'])  # the encoder-decoder's own maps
    assert 0 <= float(pooled.loc[('texture', name), 'CutPaste-3way+GDE']) <= 1
    results = pd.read_csv(out / 'results.csv')
    assert results[['pixel_auroc', 'au_pro']].notna().all().all()
    assert (out / 'figures' / f'{name}_CutPaste-3way+GDE.png').is_file()
