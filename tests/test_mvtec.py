import re
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from self_sup_data import mvtec
from self_sup_data.images import central_box, read_image
from self_sup_data.mvtec import (CLASS_NAMES, OBJECTS, TEXTURES, SelfSupImageDataset, SelfSupMVTecDataset,
                                 category_kind, data_recipe, list_categories)
from self_sup_data.transforms import (CenterCrop, Compose, RandomCrop, RandomRotation,
                                      RandomVerticalFlip, denormalize)
from conftest import make_mvtec_category

SHARED_DATA = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
SMALL = dict(res_scale=0.25)  # custom categories are textures: train crops 64 from 66, test at 64
ARGS = dict(width_bounds_pct=((0.1, 0.3), (0.1, 0.3)), num_patches=2)


def identity(image, mask, rng):
    return image, mask


# ----------------------------------------------------------------------------- categories and recipes

def test_class_names():
    assert len(CLASS_NAMES) == 15 and sorted(OBJECTS + TEXTURES) == sorted(CLASS_NAMES)
    assert set(mvtec.UNALIGNED_OBJECTS) <= set(OBJECTS)


def test_category_kind():
    assert category_kind('screw') == 'object' and category_kind('wood') == 'texture'
    assert category_kind('magnetic_tile') == 'texture'
    assert category_kind('magnetic_tile', kind='object') == 'object'
    with pytest.raises(ValueError, match="kind"):
        category_kind('wood', kind='textures')


def test_list_categories(tmp_path):
    make_mvtec_category(tmp_path, 'b', n_train=1, defects={})
    (tmp_path / 'a' / 'test' / 'good').mkdir(parents=True)
    (tmp_path / 'not_a_category').mkdir()
    assert list_categories(tmp_path) == ['a', 'b']
    assert list_categories(tmp_path / 'missing') == []


def steps(recipe):
    return [repr(t) for t in recipe['transform'].transforms]


def test_paper_recipes():
    screw, cable, wood = data_recipe('screw'), data_recipe('cable'), data_recipe('wood')
    assert (screw['low_res'], screw['train_size'], screw['test_res']) == (256, 224, 256)
    assert steps(screw) == ['RandomRotation(5)', 'CenterCrop(230)', 'RandomCrop(224)']
    assert steps(cable) == ['CenterCrop(230)', 'RandomCrop(224)']
    assert (wood['low_res'], wood['train_size'], wood['test_res']) == (264, 256, 256)
    assert steps(wood) == ['RandomVerticalFlip(p=0.5)', 'RandomCrop(256)']
    assert steps(data_recipe('wood', kind='object')) == ['CenterCrop(230)', 'RandomCrop(224)']


@pytest.mark.parametrize('name', ['screw', 'cable', 'wood', 'custom'])
@pytest.mark.parametrize('res_scale', [0.25, 0.5, 0.75, 1.0, 2.0])
def test_scaled_recipes_keep_proportions(name, res_scale):
    recipe = data_recipe(name, res_scale)
    train_size, low_res = recipe['train_size'], recipe['low_res']
    assert train_size % 32 == 0
    # objects are tested at the scale they were trained at; whole textures at a multiple of 32
    assert recipe['test_res'] == low_res if name in OBJECTS else recipe['test_res'] % 32 == 0
    ratio = 256 / 224 if name in OBJECTS else 264 / 256
    assert abs(low_res / train_size - ratio) < 0.01
    image = np.zeros((low_res, low_res, 1), np.uint8)
    assert recipe['transform'](image, None, np.random.default_rng(0))[0].shape == (train_size, train_size, 1)
    assert data_recipe(name, 0.5)['train_size'] == 128
    with pytest.raises(ValueError, match="res_scale"):
        data_recipe(name, 0)


# ----------------------------------------------------------------------------- training items

@pytest.mark.parametrize('channels', [1, 3])
def test_train_items(tmp_path, channels):
    make_mvtec_category(tmp_path, 'cat', channels=channels)
    ds = SelfSupMVTecDataset(tmp_path, 'cat', self_sup_args=ARGS, **SMALL)
    assert len(ds) == 6 and ds.in_channels == channels and ds.class_name == 'cat'
    assert (ds.low_res, ds.train_size) == (66, 64)
    assert all(im.dtype == np.uint8 and im.shape == (66, 66, channels) for im in ds.images)
    labelled = 0
    for i in range(len(ds)):
        image, zero, label = ds[i]
        assert image.dtype == torch.float32 and image.shape == (channels, 64, 64)
        assert zero == 0
        assert label.dtype == torch.float32 and label.shape == (1, 64, 64)
        assert 0 <= label.min() and label.max() <= 1
        labelled += bool(label.max() > 0)
    assert labelled >= 4  # patch_ex rarely leaves an image unchanged


def test_self_sup_off_gives_the_transformed_image(tiny_mvtec):
    ds = SelfSupMVTecDataset(*tiny_mvtec, **SMALL)
    ds.configure_self_sup(on=False)
    image, _, label = ds[2]
    expected, _ = ds.transform(ds.images[2], None, ds.item_rng(2))
    np.testing.assert_array_equal(denormalize(image), expected)
    assert label.shape == (1, 64, 64) and not label.any()


def test_configure_self_sup_updates_arguments(tiny_mvtec):
    ds = SelfSupMVTecDataset(*tiny_mvtec, self_sup_args={'num_patches': 3}, **SMALL)
    ds.configure_self_sup(on=True, self_sup_args={'label_mode': 'continuous'})
    assert ds.self_sup and ds.self_sup_args == {'num_patches': 3, 'label_mode': 'continuous'}
    # bad arguments are named when the dataset is made, not at its first item (in a loader's worker)
    with pytest.raises(ValueError, match=r"unknown patch_ex arguments \['num_patch'\]"):
        SelfSupMVTecDataset(*tiny_mvtec, self_sup_args={'num_patch': 3}, **SMALL)
    with pytest.raises(ValueError, match='num_patches must'):
        ds.configure_self_sup(self_sup_args={'num_patches': 0})
    assert ds.self_sup_args == {'num_patches': 3, 'label_mode': 'continuous'}  # as they were
    with pytest.raises(ValueError, match='seed must be an integer of 0 or more, got -1'):
        SelfSupMVTecDataset(*tiny_mvtec, seed=-1, **SMALL)


def test_seamless_patches_too_small_for_the_training_crops_are_named_when_given(tiny_mvtec):
    small = dict(SMALL, res_scale=0.125)  # 32-pixel crops: default widths give 8-pixel blends
    with pytest.warns(UserWarning, match=r'training samples: width_bounds_pct .* 32 x 32 pixels'):
        SelfSupMVTecDataset(*tiny_mvtec, self_sup_args={'num_patches': 2}, **small)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        SelfSupMVTecDataset(*tiny_mvtec, **small)  # no arguments yet: set (and told) before training
        SelfSupMVTecDataset(*tiny_mvtec, is_train=False, self_sup_args={'num_patches': 2}, **small)  # no patches
        ds = SelfSupMVTecDataset(*tiny_mvtec, self_sup_args={'mode': 'swap'}, **small)
    with pytest.warns(UserWarning, match='width_bounds_pct'):
        ds.configure_self_sup(self_sup_args={'mode': 'mix'})


def test_the_size_check_of_training_patches_takes_non_square_crops():
    images = [np.zeros((40, 256, 1), np.uint8)] * 2
    args = {'width_bounds_pct': ((0.05, 0.4), (0.05, 0.2))}  # 16 x 51 pixels; 16 x 8 on a 40 x 40 crop
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        SelfSupImageDataset(images, True, lambda image, mask, rng: (image, mask), self_sup_args=args)


def recording_patch_ex(calls):
    def fake(dest, src, rng=None, **kwargs):
        calls.append((dest.copy(), None if src is None else src.copy(), kwargs))
        return dest, np.zeros(dest.shape[:2] + (1,), np.float32)
    return fake


def test_source_is_another_training_image(tiny_mvtec, monkeypatch):
    calls = []
    monkeypatch.setattr(mvtec, 'patch_ex', recording_patch_ex(calls))
    ds = SelfSupMVTecDataset(*tiny_mvtec, transform=identity, self_sup_args={'mode': 'swap'}, **SMALL)
    sources = []
    for epoch in range(20):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            ds[i]
            dest, src, kwargs = calls[-1]
            assert kwargs == {'mode': 'swap'}
            np.testing.assert_array_equal(dest, ds.images[i])
            matches = [j for j, im in enumerate(ds.images) if np.array_equal(src, im)]
            assert len(matches) == 1 and matches[0] != i
            sources.append(matches[0])
    assert set(sources) == set(range(len(ds)))


def test_same_image_source(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(mvtec, 'patch_ex', recording_patch_ex(calls))
    make_mvtec_category(tmp_path, 'one', n_train=1)
    SelfSupMVTecDataset(tmp_path, 'one', **SMALL)[0]
    assert calls[-1][1] is None and calls[-1][2] == {'same': True}
    SelfSupMVTecDataset(tmp_path, 'one', self_sup_args={'same': True}, **SMALL)[0]
    assert calls[-1][1] is None
    # patches that stay in place (FPI's) would change nothing on the image they come from
    fpi = dict(same=False, shift=False, resize=False)
    for unmoved in (fpi, dict(shift=False, cutpaste_patch_generation=True)):  # CutPaste's patches: never resized
        with pytest.raises(ValueError, match="one: one training image: its patches would come from itself"):
            SelfSupMVTecDataset(tmp_path, 'one', self_sup_args=unmoved, **SMALL)[0]


def test_excluded_and_validation_indices_are_checked(tmp_path):
    from self_sup_data.mvtec import load_validation_set
    make_mvtec_category(tmp_path, 'tiny', n_train=4)
    assert len(SelfSupMVTecDataset(tmp_path, 'tiny', exclude=np.array([3]), **SMALL)) == 3
    for bad in ([-1], [4], np.array([True, False, False, False]), [1.5]):
        for make in (lambda: SelfSupMVTecDataset(tmp_path, 'tiny', exclude=bad, **SMALL),
                     lambda: load_validation_set(tmp_path, 'tiny', bad, 0, res_scale=0.25)):
            with pytest.raises(ValueError, match=r"tiny: training image indices must be integers from 0 to 3"):
                make()
    with pytest.raises(ValueError, match='exclude holds all 4 training images'):
        SelfSupMVTecDataset(tmp_path, 'tiny', exclude=range(4), **SMALL)


def test_held_out_validation_images_that_are_copies_of_training_images_are_warned_of(tmp_path):
    """A copy of a training image held out for validation is an image the model has seen: the
    validation score would take it for an unseen normal image (and favour memorising)."""
    import shutil
    from self_sup_data.mvtec import load_validation_set
    train = make_mvtec_category(tmp_path, 'cat', n_train=6) / 'train' / 'good'
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        load_validation_set(tmp_path, 'cat', [1, 4], 0, res_scale=0.25)  # every image distinct
    shutil.copy(train / '000.png', train / '006.png')  # the copy sorts last: index 6
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        load_validation_set(tmp_path, 'cat', [1, 4], 0, res_scale=0.25)  # both copies trained on: no bias
    with pytest.warns(UserWarning, match=r"cat: 1 of 2 held-out validation images are copies of images trained on "
                                         r"\(first: .*train/good/006.png, the same bytes as .*train/good/000.png\): "
                                         r"the model has seen them"):
        load_validation_set(tmp_path, 'cat', [1, 6], 0, res_scale=0.25)


def batches(ds, num_workers):
    loader = DataLoader(ds, batch_size=3, num_workers=num_workers)
    return [torch.cat([x.flatten(1), y.flatten(1)], 1) for x, _, y in loader]


def test_same_samples_for_any_number_of_workers(tiny_mvtec):
    ds = SelfSupMVTecDataset(*tiny_mvtec, self_sup_args=ARGS, seed=5, **SMALL)
    serial = batches(ds, 0)
    parallel = batches(ds, 2)
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel))
    again = [ds[i] for i in range(len(ds))]
    assert all(torch.equal(again[i][0], serial[i // 3][i % 3, :64 * 64].view(1, 64, 64)) for i in range(len(ds)))
    ds.set_epoch(1)
    assert not torch.equal(ds[0][0], again[0][0])
    other_seed = SelfSupMVTecDataset(*tiny_mvtec, self_sup_args=ARGS, seed=6, **SMALL)
    assert not torch.equal(other_seed[0][0], again[0][0])


def test_paper_recipe_at_full_size(tiny_mvtec):
    ds = SelfSupMVTecDataset(*tiny_mvtec, kind='object', self_sup_args=ARGS)
    assert (ds.low_res, ds.train_size) == (256, 224)
    assert ds[0][0].shape == (1, 224, 224) and ds[0][2].shape == (1, 224, 224)


def test_custom_transform_sets_train_size(tiny_mvtec):
    transform = Compose([RandomRotation(3), CenterCrop(50), RandomCrop(32), RandomVerticalFlip()])
    ds = SelfSupMVTecDataset(*tiny_mvtec, low_res=60, transform=transform, self_sup_args=ARGS)
    assert (ds.low_res, ds.train_size) == (60, 32) and ds[1][0].shape == (1, 32, 32)


# ----------------------------------------------------------------------------- test items

@pytest.mark.parametrize('channels', [1, 3])
def test_test_items(tmp_path, channels):
    category = make_mvtec_category(tmp_path, 'cat', channels=channels, defects={'crack': 2, 'hole': 3})
    ds = SelfSupMVTecDataset(tmp_path, 'cat', is_train=False, **SMALL)
    assert len(ds) == 8 and ds.low_res == 64 and ds.in_channels == channels
    assert ds.defect_types == ['crack'] * 2 + ['good'] * 3 + ['hole'] * 3
    assert list(ds.labels) == [1, 1, 0, 0, 0, 1, 1, 1] and ds.has_mask.all()
    assert ds.paths[0] == str(category / 'test' / 'crack' / '000.png')
    for i in range(len(ds)):
        image, label, mask = ds[i]
        assert image.shape == (channels, 64, 64) and image.dtype == torch.float32
        assert isinstance(label, int) and label == ds.labels[i]
        assert mask.shape == (1, 64, 64) and mask.dtype == torch.float32
        if ds.defect_types[i] == 'good':
            assert not mask.any()
        else:
            stem = Path(ds.paths[i]).stem
            saved = np.asarray(Image.open(category / 'ground_truth' / ds.defect_types[i] / f'{stem}_mask.png'))
            np.testing.assert_array_equal(mask[0].numpy(), saved / 255)
            # the test image is the stored file, untransformed
            np.testing.assert_array_equal(denormalize(image), read_image(ds.paths[i]))


def test_test_masks_are_resized_with_their_images(tmp_path):
    make_mvtec_category(tmp_path, 'cat', defects={'crack': 2})
    ds = SelfSupMVTecDataset(tmp_path, 'cat', is_train=False, low_res=32)
    _, _, mask = ds[0]
    assert mask.shape == (1, 32, 32) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask.sum() == (32 // 4) ** 2


def test_defect_images_whose_masks_mark_nothing_are_counted_in_a_warning(tmp_path):
    make_mvtec_category(tmp_path, 'cat', defects={'crack': 2})
    blank = tmp_path / 'cat' / 'ground_truth' / 'crack' / '001_mask.png'
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(blank)
    with pytest.warns(UserWarning, match=r"cat: 1 of 2 defect images have a mask without a defect "
                                         r"pixel at 32 pixels \(first: .*001.png\)"):
        ds = SelfSupMVTecDataset(tmp_path, 'cat', is_train=False, low_res=32)
    assert ds.has_mask.all() and ds.masks[1].sum() == 0


def test_normal_and_defect_test_images_of_unlike_sizes_or_compression_are_warned_of(tmp_path):
    """Normal and defect images of two sources (at least half of the defect images of sizes like few
    or no normal images', test or training; compressions that tell them apart with an AUROC of 0.75):
    a model can tell them apart by their sharpness or compression once resized, whatever their
    defects. Compression is told by what a file holds, not its suffix."""
    make_mvtec_category(tmp_path, 'cat', defects={'crack': 2, 'hole': 2})
    test, truth = tmp_path / 'cat' / 'test', tmp_path / 'cat' / 'ground_truth'

    def resize(name, size, folder=test):
        for path in (folder / f'{name}.png', truth / f'{name}_mask.png'):
            if path.exists():
                Image.open(path).resize(size).save(path)

    def no_warning():
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            SelfSupMVTecDataset(tmp_path, 'cat', is_train=False, low_res=32)

    def warned(pattern):
        with pytest.warns(UserWarning, match=pattern):
            SelfSupMVTecDataset(tmp_path, 'cat', is_train=False, low_res=32)
    no_warning()  # one size
    for name, size in (('crack/000', (62, 60)), ('crack/001', (66, 64)), ('hole/000', (68, 70))):
        resize(name, size)
    no_warning()  # sizes of one source, image by image: alike within a factor 1.1 (aspect) and 1.2 (side)
    resize('crack/000', (48, 40))
    no_warning()  # one of four defect images of another size: under half
    resize('crack/001', (48, 48))
    warned(r"cat: 2 of 4 defect test images have a size like few or no normal images' \(first: .*crack/000.png, "
           r"48x40; the commonest normal sizes: 64x64 \(9\)\): images of two sources")
    resize('000', (48, 48), tmp_path / 'cat' / 'train' / 'good')
    no_warning()  # a training image of that size, one of six (over 1% of them): it counts as a normal image
    for name in ('crack/000', 'crack/001'):
        resize(name, (64, 64))
    for path in sorted((test / 'good').iterdir()):  # normal images stored as BMP: lossless as the PNGs
        Image.open(path).save(path.with_suffix('.bmp'))
        path.unlink()
    no_warning()
    good = sorted((test / 'good').iterdir())
    Image.open(good[0]).save(good[0].with_suffix('.jpeg'), quality=95)  # one of three normal images JPEG
    good[0].unlink()
    no_warning()  # an AUROC of 2/3
    Image.open(good[1]).save(good[1], format='JPEG', quality=95)  # a JPEG named .bmp: two of three
    warned(r"cat: the compression of the test images alone tells defect images from normal ones with an AUROC of "
           r"0.83 \(normal: 2 JPEG, 1 lossless; defect: 4 lossless\): images of two sources")
    for path in sorted((test / 'good').iterdir()):  # all lossless WebP again, the defect images half lossy WebP
        Image.open(path).save(path.with_suffix('.webp'), lossless=True)
        path.unlink()
    no_warning()
    for name in ('crack/000', 'hole/000'):
        image = Image.open(test / f'{name}.png')
        image.save(test / f'{name}.webp', quality=90)
        (test / f'{name}.png').unlink()
    warned(r"AUROC of 0.75 \(normal: 3 lossless; defect: 2 lossless, 2 lossy WebP\)")


def test_sizes_of_two_sources_are_told_from_one_source_of_varied_sizes():
    from self_sup_data.mvtec import warn_sources_tell_defects

    def messages(normal, defects, train):
        paths = [f'{index}.png' for index in range(len(normal) + len(defects))]
        with warnings.catch_warnings(record=True) as caught, mock.patch.object(mvtec, 'lossy_compression',
                                                                               lambda path: None):
            warnings.simplefilter('always')
            warn_sources_tell_defects('x', paths, ['good'] * len(normal) + ['crack'] * len(defects),
                                      normal + defects, train)
        return [str(warning.message) for warning in caught]
    square, small, wide = (64, 64), (48, 48), (80, 50)
    # defects of another size: one stray training image of their size does not match them all
    assert messages([square] * 20, [small] * 60, [square] * 200 + [small])[0].startswith(
        "x: 60 of 60 defect test images have a size like few or no normal images' (first: 20.png, 48x48; "
        "the commonest normal sizes: 64x64 (220), 48x48 (1))")
    assert messages([square] * 20, [small] * 60, [square] * 200 + [small] * 3) == []  # 1% of them: a source
    # each group judged on its own: a few normal test images of the defects' size, many training images of another
    assert messages([(512, 512)] * 10, [(512, 512)] * 100, [(1024, 1024)] * 1200) == []
    assert messages([(512, 512)] * 100, [(512, 512)] * 5, [(1024, 1024)] * 1000) == []
    assert messages([(1000, 1000)] * 10, [(1200, 1200), (1100, 1000)] * 10, []) == []  # factors 1.2 and 1.1 within
    # normal test images of another source than the training and defect images
    half_wide = [wide] * 10 + [square] * 10
    assert messages(half_wide, [square] * 30, [square] * 100)[0].startswith(
        "x: 10 of 20 normal test images have a size like few or no defect or training images' (first: 0.png, 80x50")
    assert messages(half_wide, [square] * 30, []) == []  # without training images: only the defects are judged
    rng = np.random.default_rng(0)
    for _ in range(20):  # one source of varied sizes: no warning
        side, aspect = np.exp(rng.uniform(np.log(500), np.log(2000), 140)), np.exp(rng.uniform(-0.3, 0.3, 140))
        sizes = [(int(s * min(a, 1)), int(s / max(a, 1))) for s, a in zip(side, aspect)]
        assert messages(sizes[:10], sizes[10:40], sizes[40:]) == []


def test_separating_auroc_is_that_of_the_best_score_knowing_only_the_value():
    from sklearn.metrics import roc_auc_score
    from self_sup_data.mvtec import separating_auroc
    values = ['png'] * 90 + ['jpeg'] * 10 + ['jpeg'] * 90 + ['png'] * 10  # each side mostly one, some of the other
    is_defect = [False] * 100 + [True] * 100
    assert separating_auroc(values, is_defect) == pytest.approx(0.9)
    rng = np.random.default_rng(0)
    for _ in range(20):
        values = rng.integers(0, 4, 60).tolist()
        is_defect = (rng.random(60) < 0.4).tolist()
        share = {value: np.mean([d for v, d in zip(values, is_defect) if v == value]) for value in set(values)}
        assert separating_auroc(values, is_defect) == pytest.approx(
            roc_auc_score(is_defect, [share[value] for value in values]))
    assert separating_auroc(['a'] * 5, [False, True] * 2 + [True]) == 0.5  # one value: nothing told
    assert separating_auroc(['a', 'b'], [False, False]) == 0.5  # one side only


def test_test_images_that_are_copies_of_training_or_normal_images_are_warned_of(tmp_path):
    import shutil
    category = make_mvtec_category(tmp_path, 'cat', defects={'crack': 2})
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        SelfSupMVTecDataset(tmp_path, 'cat', is_train=False, low_res=32)  # every image distinct
    shutil.copy(category / 'train' / 'good' / '004.png', category / 'test' / 'good' / 'copy.png')
    shutil.copy(category / 'test' / 'good' / '001.png', category / 'test' / 'crack' / 'copy.png')
    truth = category / 'ground_truth' / 'crack'
    shutil.copy(truth / '000_mask.png', truth / 'copy_mask.png')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        SelfSupMVTecDataset(tmp_path, 'cat', is_train=False, low_res=32)
    messages = [str(warning.message) for warning in caught]
    assert any(re.fullmatch(r"cat: 1 of 7 test images are copies of training images \(first: .*test/good/copy.png, "
                            r"the same bytes as .*train/good/004.png\): a model trained on them .*", message)
               for message in messages), messages
    assert any(re.fullmatch(r"cat: 1 of 3 defect images are copies of normal test images \(first: .*test/crack/"
                            r"copy.png, the same bytes as .*test/good/001.png\): each counts as normal and as defect.*",
                            message) for message in messages), messages
    (category / 'test' / 'good' / 'copy.png').unlink()  # a link to a training image: the worst copy
    (category / 'test' / 'good' / 'link.png').symlink_to(category / 'train' / 'good' / '002.png')
    with pytest.warns(UserWarning, match=r'1 of 7 test images are copies of training images \(first: .*link.png'):
        SelfSupMVTecDataset(tmp_path, 'cat', is_train=False, low_res=32)
    (category / 'test' / 'good' / 'link.png').unlink()
    shutil.rmtree(category / 'train')  # a test set without its training images: the test set's own check only
    with pytest.warns(UserWarning, match='1 of 3 defect images are copies'):
        SelfSupMVTecDataset(tmp_path, 'cat', is_train=False, low_res=32)


def test_masks_that_look_inverted_are_counted_in_a_warning(tmp_path):
    """A dark defect drawn on a white mask marks nearly the whole image as defect: the pixel metrics
    would score the image's normal pixels as the defect."""
    make_mvtec_category(tmp_path, 'cat', defects={'crack': 3})
    mask_file = tmp_path / 'cat' / 'ground_truth' / 'crack' / '002_mask.png'
    inverted = 255 - np.asarray(Image.open(mask_file))
    Image.fromarray(inverted).save(mask_file)
    with pytest.warns(UserWarning, match=r"cat: 1 of 3 defect images have a mask that marks more than 90% of the "
                                         r"image as defect at 32 pixels \(first: .*002.png\); if it is inverted"):
        ds = SelfSupMVTecDataset(tmp_path, 'cat', is_train=False, low_res=32)
    assert ds.masks[2].mean() == pytest.approx(1 - 1 / 16)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        large = np.zeros((64, 64), np.uint8)
        large[:, :56] = 255  # a large defect, 87.5% of the image: no warning
        Image.fromarray(large).save(mask_file)
        SelfSupMVTecDataset(tmp_path, 'cat', is_train=False, low_res=32)


def test_object_defects_wholly_outside_the_scored_crop_are_counted_in_a_warning(tmp_path):
    """Objects are scored on the central ``train_size`` square of their test images (64 of 73 pixels
    at res_scale 0.25): a defect outside it is missed whatever the model does."""
    make_mvtec_category(tmp_path, 'cat', defects={'crack': 3})
    edge = np.zeros((64, 64), np.uint8)
    edge[:3] = 255  # the top 3 of 64 stored rows: outside the central 64 of 73 test pixels
    Image.fromarray(edge).save(tmp_path / 'cat' / 'ground_truth' / 'crack' / '001_mask.png')
    with pytest.warns(UserWarning, match=r"cat: 1 of 3 defect images have all their mask's defect pixels outside the "
                                         r"central 64-pixel square of the 73-pixel test images that object models "
                                         r"score \(first: .*001.png\)"):
        ds = SelfSupMVTecDataset(tmp_path, 'cat', is_train=False, kind='object', **SMALL)
    assert ds.masks[1].any() and not ds.masks[1][central_box((73, 73), 64)].any()
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # a texture is scored whole: no warning
        SelfSupMVTecDataset(tmp_path, 'cat', is_train=False, **SMALL)


def test_masks_mark_their_nonzero_pixels_whatever_the_format(tmp_path):
    defect = np.zeros((32, 32), bool)
    defect[8:20, 4:16] = True
    for name, values in [('binary.png', defect * 255), ('ones.png', defect * 1),
                         ('ones16.png', (defect * 1).astype(np.uint16)),  # 16-bit 0/1: not rescaled
                         ('ids16.png', (defect * 4000).astype(np.uint16)),
                         ('colour.png', np.repeat((defect * 200)[:, :, None], 3, axis=2)),
                         ('lossy.jpg', defect * 255),  # JPEG rings around the edges
                         ('lossy.webp', defect * 255), ('jpeg_data.png', defect * 255),  # told by their data
                         ('lossless.webp', defect * np.where(np.arange(32) < 12, 200, 1)[:, None])]:  # ids 1, 200
        path = tmp_path / name
        image = Image.fromarray(values.astype(np.uint16 if values.dtype == np.uint16 else np.uint8))
        image.save(path, **{'lossy.webp': dict(quality=50), 'jpeg_data.png': dict(format='JPEG'),
                            'lossless.webp': dict(lossless=True)}.get(name, {}))
        if name in ('lossy.jpg', 'lossy.webp', 'jpeg_data.png'):
            assert (np.asarray(Image.open(path)) > 0).sum() > defect.sum()
        np.testing.assert_array_equal(mvtec.read_mask(path), defect, err_msg=name)
    np.testing.assert_array_equal(mvtec.read_id_masks((tmp_path / 'ones16.png', tmp_path / 'lossy.jpg')),
                                  defect)


def test_defect_without_masks_is_an_error_or_on_request_image_level_only(tmp_path):
    make_mvtec_category(tmp_path, 'cat', defects={'crack': 2}, with_masks=False)
    make_mvtec_category(tmp_path / 'other', 'cat', defects={'hole': 2})
    (tmp_path / 'other' / 'cat' / 'ground_truth' / 'hole' / '001_mask.png').unlink()
    with pytest.raises(FileNotFoundError, match=r"no mask for the defect image .*cat/test/crack/000.png "
                                                r"\(2 of 2 defect images of 'cat' have none"):
        SelfSupMVTecDataset(tmp_path, 'cat', is_train=False, **SMALL)
    with pytest.warns(UserWarning, match='cat: 2 of 2 defect images have no mask'):
        ds = SelfSupMVTecDataset(tmp_path, 'cat', is_train=False, allow_missing_masks=True, **SMALL)
    assert list(ds.has_mask) == [False, False, True, True, True]
    assert not ds[0][2].any() and ds[0][1] == 1
    with pytest.raises(FileNotFoundError, match='hole/001.png'):
        SelfSupMVTecDataset(tmp_path / 'other', 'cat', is_train=False, **SMALL)
    with pytest.warns(UserWarning, match='1 of 2'):
        partial = SelfSupMVTecDataset(tmp_path / 'other', 'cat', is_train=False,
                                      allow_missing_masks=True, **SMALL)
    assert list(partial.has_mask) == [True, True, True, True, False]


def test_masks_match_by_exact_name_and_any_nonzero_pixel_is_a_defect(tmp_path):
    category = make_mvtec_category(tmp_path, 'cat', defects={'crack': 2})
    crack, truth = category / 'test' / 'crack', category / 'ground_truth' / 'crack'
    (crack / '000.png').rename(crack / 'a[1].png')  # a glob pattern would match 'a1_mask.png'
    mask = np.asarray(Image.open(truth / '000_mask.png'))
    (truth / '000_mask.png').unlink()
    Image.fromarray(np.zeros_like(mask)).save(truth / 'a1_mask.png')
    Image.fromarray((mask > 0).astype(np.uint8) * 100).save(truth / 'a[1]_mask.png')  # value 100
    ds = SelfSupMVTecDataset(tmp_path, 'cat', is_train=False, **SMALL)
    index = [Path(p).name for p in ds.paths].index('a[1].png')
    assert ds.has_mask[index] and ds.masks[index].sum() == ds.masks[1 - index].sum() > 0


# ----------------------------------------------------------------------------- channels

def test_identical_rgb_channels_are_grayscale(tmp_path):
    make_mvtec_category(tmp_path, 'cat', n_train=3, channels=1)
    path = tmp_path / 'cat' / 'train' / 'good' / '000.png'
    gray = np.asarray(Image.open(path))
    Image.fromarray(np.stack([gray] * 3, axis=2)).save(path)
    assert read_image(path).shape == gray.shape + (1,)
    assert SelfSupMVTecDataset(tmp_path, 'cat', **SMALL).in_channels == 1


def test_one_colour_image_makes_the_category_rgb(tmp_path):
    make_mvtec_category(tmp_path, 'cat', n_train=3, channels=1)
    make_mvtec_category(tmp_path / 'rgb', 'cat', n_train=1, channels=3)
    (tmp_path / 'rgb' / 'cat' / 'train' / 'good' / '000.png').replace(tmp_path / 'cat' / 'train' / 'good' / '000.png')
    ds = SelfSupMVTecDataset(tmp_path, 'cat', **SMALL)
    assert ds.in_channels == 3 and all(im.shape[2] == 3 for im in ds.images)
    np.testing.assert_array_equal(ds.images[1][:, :, 0], ds.images[1][:, :, 2])  # gray image replicated


def test_rgba_and_palette_files(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, (8, 8, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / 'rgba.png')
    over_black = np.round(rgba[:, :, :3] * (rgba[:, :, 3:] / 255)).astype(np.uint8)  # composited as displayed
    np.testing.assert_array_equal(read_image(tmp_path / 'rgba.png'), over_black)
    Image.fromarray(rgba[:, :, :3]).convert('P').save(tmp_path / 'palette.png')
    assert read_image(tmp_path / 'palette.png').shape == (8, 8, 3)


# ----------------------------------------------------------------------------- errors

def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        SelfSupMVTecDataset(tmp_path / 'nowhere', 'cat')


def test_missing_category_lists_the_categories_found(tmp_path):
    make_mvtec_category(tmp_path, 'bottle', n_train=1, defects={})
    make_mvtec_category(tmp_path, 'wood', n_train=1, defects={})
    with pytest.raises(FileNotFoundError, match=r"'cable'.*\['bottle', 'wood'\]"):
        SelfSupMVTecDataset(tmp_path, 'cable')


def test_a_category_folder_given_as_the_data_folder_is_told_what_to_give(tmp_path):
    from self_sup_data.layouts import detect_layout
    category = make_mvtec_category(tmp_path, 'plain', n_train=1, defects={})
    hint = (f"{category} is itself a category folder: give the folder above it as the data folder and its "
            f"name as the category (-d {tmp_path} -n plain)")
    for args in ((category,), (category, 'plain')):
        with pytest.raises(FileNotFoundError) as error:
            detect_layout(*args)
        assert str(error.value).endswith(hint)
    loose = tmp_path / 'loose'  # images in train/ and test/, no MVTec layout: --format folder, not -n
    for split in ('train', 'test'):
        (loose / split).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(loose / split / 'a.png')
    for args in ((tmp_path, 'other'), (loose,)):
        with pytest.raises(FileNotFoundError) as error:
            detect_layout(*args)
        assert 'is itself a category folder' not in str(error.value)


def test_empty_train_folder(tmp_path):
    make_mvtec_category(tmp_path, 'cat', n_train=0)
    (tmp_path / 'cat' / 'train' / 'good').mkdir(parents=True)
    with pytest.raises(ValueError, match=r'train/good holds no images'):
        SelfSupMVTecDataset(tmp_path, 'cat')


def test_missing_train_or_test_folder(tmp_path):
    make_mvtec_category(tmp_path, 'cat', n_train=0)
    with pytest.raises(FileNotFoundError, match=r'train/good does not exist'):
        SelfSupMVTecDataset(tmp_path, 'cat')
    make_mvtec_category(tmp_path, 'train_only', n_test_good=0, defects={})
    with pytest.raises(FileNotFoundError, match=r'train_only/test does not exist'):
        SelfSupMVTecDataset(tmp_path, 'train_only', is_train=False)


def test_unreadable_image_names_the_file(tmp_path):
    make_mvtec_category(tmp_path, 'cat')
    bad = tmp_path / 'cat' / 'train' / 'good' / '003.png'
    bad.write_bytes(b'not a png')
    with pytest.raises(ValueError, match=f'cannot read image {bad}'):
        SelfSupMVTecDataset(tmp_path, 'cat', **SMALL)


@pytest.mark.parametrize('suffix', ['.png', '.jpg'])
def test_truncated_image_names_the_file(tmp_path, suffix):
    make_mvtec_category(tmp_path, 'cat')
    path = tmp_path / 'cat' / 'test' / 'good' / f'001{suffix}'
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ValueError, match=f'cannot read image {path}.*truncated'):
        SelfSupMVTecDataset(tmp_path, 'cat', is_train=False, **SMALL)


def test_mask_size_mismatch_names_both_files(tmp_path):
    category = make_mvtec_category(tmp_path, 'cat')
    mask_path = category / 'ground_truth' / 'crack' / '002_mask.png'
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(mask_path)
    image_path = category / 'test' / 'crack' / '002.png'
    with pytest.raises(ValueError, match=f'mask {mask_path} is 32x32 but its image {image_path} is 64x64'):
        SelfSupMVTecDataset(tmp_path, 'cat', is_train=False, **SMALL)


# ----------------------------------------------------------------------------- real data (optional)

MAGNETIC_TILE = SHARED_DATA / 'magnetic_tile'


@pytest.mark.skipif(not MAGNETIC_TILE.is_dir(), reason=f'real data not present: {MAGNETIC_TILE}')
@pytest.mark.slow
def test_magnetic_tile():
    root = MAGNETIC_TILE.parent
    assert 'magnetic_tile' in list_categories(root)
    train = SelfSupMVTecDataset(root, 'magnetic_tile', low_res=64, transform=RandomCrop(64))
    test = SelfSupMVTecDataset(root, 'magnetic_tile', is_train=False, low_res=64)
    assert len(train) == 712 and train.in_channels == 1
    assert len(test) == 632 and test.in_channels == 1
    assert test.labels.sum() == 392 and test.has_mask.all()
    # 4 'uneven' masks are empty in the data itself; at 64 px nearest-neighbour resizing loses 8 more
    assert sum(test.masks[i].any() for i in np.flatnonzero(test.labels)) >= 380


def test_index_range(tiny_mvtec):
    ds = SelfSupMVTecDataset(*tiny_mvtec, self_sup_args=ARGS, **SMALL)
    assert torch.equal(ds[-1][0], ds[len(ds) - 1][0])
    assert torch.equal(ds[np.int64(2)][2], ds[2][2])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_a_model_is_tested_at_its_stored_side_and_an_earlier_one_at_the_earlier_rule():
    from self_sup_data.mvtec import model_test_side
    meta = dict(category='screw', res_scale=0.5)
    assert data_recipe('screw', 0.5)['test_res'] == data_recipe('screw', 0.5)['low_res'] == 146
    assert model_test_side({**meta, 'test_res': 146}) == 146  # stored by training
    assert model_test_side(meta) == 160  # written before: 146 rounded to a multiple of 32
    assert model_test_side(dict(category='wood', res_scale=0.5)) == 128 == data_recipe('wood', 0.5)['test_res']
    assert model_test_side(dict(category='screw')) == 256  # the paper's scale either way


def test_images_far_from_square_are_counted_in_a_note_that_squares_stretch_them(tmp_path):
    strips = tmp_path / 'strips' / 'train' / 'good'
    strips.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((32, 96), 100, np.uint8)).save(strips / f'{i}.png')
    Image.fromarray(np.full((64, 96), 100, np.uint8)).save(strips / '3.png')  # 1.5: as VisA's, no note
    with pytest.warns(UserWarning, match=r"3 of 4 images are at least 2 times longer than wide \(first: .*0.png, "
                                         r"96x32\); each is resized to a 16x16 square, which stretches it, and its "
                                         r"defects, along its short side \(the first 3.0 times\)"):
        images, _, _, sizes = mvtec.load_images(sorted(strips.iterdir()), 16)
    assert all(image.shape == (16, 16, 1) for image in images) and sizes == [(96, 32)] * 3 + [(96, 64)]
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        mvtec.load_images(sorted(strips.iterdir())[3:], 16)
        mvtec.load_images(sorted(strips.iterdir()), 16, stretch_note=False)


def test_masks_stay_on_their_images_when_both_are_resized(tmp_path):
    """A defect drawn into the image and its mask: after resizing, the mask's centre lies where
    the image's bright square is (nearest neighbour at the corner of each footprint put it a
    third of a pixel down and right)."""
    from self_sup_data.mvtec import _load_item
    rng = np.random.default_rng(0)
    offsets = []
    for _ in range(20):
        image = np.zeros((1000, 1000), np.uint8)
        mask = np.zeros((1000, 1000), np.uint8)
        top, left, side = *rng.integers(50, 800, 2), int(rng.integers(20, 120))
        image[top:top + side, left:left + side] = 255
        mask[top:top + side, left:left + side] = 255
        Image.fromarray(image).save(tmp_path / 'image.png')
        Image.fromarray(mask).save(tmp_path / 'mask.png')
        small, small_mask, _ = _load_item(tmp_path / 'image.png', tmp_path / 'mask.png', 224, None)
        weights = small[:, :, 0].astype(float)
        rows, cols = np.indices(weights.shape)
        image_centre = np.array([(rows * weights).sum(), (cols * weights).sum()]) / weights.sum()
        mask_centre = np.argwhere(small_mask > 0).mean(axis=0)
        offsets.append(mask_centre - image_centre)
    assert np.abs(np.mean(offsets, axis=0)).max() < 0.1 and np.abs(offsets).max() < 0.5


def test_training_images_of_far_less_contrast_than_the_others_are_warned_of(tmp_path):
    make_mvtec_category(tmp_path, 'tiny', n_train=6, size=32)
    good = tmp_path / 'tiny' / 'train' / 'good'
    files = sorted(good.glob('*.png'))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        alike = SelfSupMVTecDataset(tmp_path, 'tiny', is_train=True, low_res=32)
        mvtec.warn_faint_images('tiny', alike.paths, alike.images, alike.bit_depth)  # alike: no warning
    for path in files:  # 12-bit data in 16-bit files, and one file of 8-bit values saved as 16 bits
        values = np.asarray(Image.open(path).convert('L')).astype(np.uint16)
        Image.fromarray(values if path == files[2] else values * 16).save(path)
    with pytest.warns(UserWarning, match=rf"tiny: 1 of 6 training images have far less contrast than the others: .*"
                                         rf"\(first: {re.escape(str(files[2]))}, span \d+\); 16-bit files are read "
                                         rf"as 12-bit data, so a 16-bit file whose data has fewer bits .* reads nearly "
                                         rf"black"):
        dataset = SelfSupMVTecDataset(tmp_path, 'tiny', is_train=True, low_res=32)
        mvtec.warn_faint_images('tiny', dataset.paths, dataset.images, dataset.bit_depth)
    assert dataset.bit_depth == 12
    mvtec.warn_faint_images('x', ['a'], [np.zeros((4, 4), np.uint8)])  # one image: nothing to compare with
