import re

import numpy as np
import pytest
import torch

from self_sup_data.transforms import (CenterCrop, Compose, RandomCrop, RandomRotation,
                                      RandomVerticalFlip, Resize, denormalize, to_image_tensor,
                                      to_label_tensor)


def random_image(height=40, width=40, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def mask_of(image):
    """A mask that is a function of the image pixels: tells whether the pair stayed aligned."""
    return (image[:, :, :1] > 127).astype(np.float32)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("transform", [CenterCrop(24), RandomCrop(24), RandomVerticalFlip(1.0),
                                       Compose([RandomVerticalFlip(), RandomCrop(30), CenterCrop(20)])])
def test_image_and_mask_move_together(transform, channels):
    image = random_image(channels=channels)
    for seed in range(5):
        out, mask = transform(image, mask_of(image), np.random.default_rng(seed))
        assert out.dtype == np.uint8 and out.shape[2] == channels and out.flags.c_contiguous
        assert mask.dtype == np.float32 and mask.shape == out.shape[:2] + (1,)
        np.testing.assert_array_equal(mask, mask_of(out))


@pytest.mark.parametrize("transform", [Resize(17), RandomRotation(10), CenterCrop(9), RandomCrop(9),
                                       RandomVerticalFlip()])
def test_mask_none_passes_through(transform):
    image, mask = transform(random_image(channels=1), None, np.random.default_rng(0))
    assert mask is None and image.ndim == 3 and image.shape[2] == 1


def test_same_generator_state_gives_same_result():
    transform = Compose([RandomRotation(5), CenterCrop(34), RandomCrop(32), RandomVerticalFlip()])
    image = random_image()
    a = transform(image, None, np.random.default_rng(7))[0]
    b = transform(image, None, np.random.default_rng(7))[0]
    c = transform(image, None, np.random.default_rng(8))[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_center_crop_takes_the_centre():
    image = random_image(41, 39)
    out, _ = CenterCrop(21)(image, None, None)
    np.testing.assert_array_equal(out, image[10:31, 9:30])


def test_central_box_is_the_square_center_crop_takes():
    from self_sup_data.images import central_box
    image = random_image(41, 39)
    np.testing.assert_array_equal(image[central_box(image.shape, 21)], CenterCrop(21)(image, None, None)[0])
    np.testing.assert_array_equal(image[central_box(image.shape)], image)


def test_random_crop_is_a_window_and_covers_all_positions():
    image = np.arange(10 * 10, dtype=np.uint8).reshape(10, 10, 1)
    corners = set()
    for seed in range(200):
        out, _ = RandomCrop(8)(image, None, np.random.default_rng(seed))
        top, left = divmod(int(out[0, 0, 0]), 10)
        np.testing.assert_array_equal(out, image[top:top + 8, left:left + 8])
        corners.add((top, left))
    assert corners == {(t, l) for t in range(3) for l in range(3)}


def test_vertical_flip_probability():
    image = random_image()
    flipped = [not np.array_equal(RandomVerticalFlip()(image, None, np.random.default_rng(s))[0], image)
               for s in range(400)]
    assert 0.4 < np.mean(flipped) < 0.6
    np.testing.assert_array_equal(RandomVerticalFlip(1.0)(image, None, np.random.default_rng(0))[0], image[::-1])
    np.testing.assert_array_equal(RandomVerticalFlip(0.0)(image, None, np.random.default_rng(0))[0], image)


def test_rotation():
    image = random_image(channels=1)
    np.testing.assert_array_equal(RandomRotation(0)(image, None, np.random.default_rng(0))[0], image)
    mask = np.zeros((40, 40, 1), np.float32)
    mask[10:30, 15:25] = 1  # a vertical bar
    for seed in range(5):
        out, rotated = RandomRotation(30)(image, mask, np.random.default_rng(seed))
        assert out.shape == image.shape and rotated.shape == mask.shape
        assert set(np.unique(rotated)) <= {0.0, 1.0}
        assert abs(rotated.sum() - mask.sum()) <= 0.15 * mask.sum()
    # rotating a constant image leaves it constant (reflected borders, no black corners)
    flat = np.full((40, 40, 3), 90, np.uint8)
    np.testing.assert_array_equal(RandomRotation(45)(flat, None, np.random.default_rng(1))[0], flat)


@pytest.mark.parametrize("channels", [1, 3])
def test_resize(channels):
    image = random_image(64, 48, channels)
    out, mask = Resize(32)(image, mask_of(image), None)
    assert out.shape == (32, 32, channels) and mask.shape == (32, 32, 1)
    assert set(np.unique(mask)) <= {0.0, 1.0}
    assert Resize(80)(image, None, None)[0].shape == (80, 80, channels)
    step = np.zeros((256, 256, channels), np.uint8)  # a vertical edge, in the image and its mask
    step[:, 130:] = 255
    for side in (64, 224):
        out, mask = Resize(side)(step, (step[:, :, :1] > 0).astype(np.float32), None)
        image_edge = np.argmax(out[0, :, 0] >= 128)
        assert np.argmax(mask[0, :, 0] > 0) == image_edge  # the mask stays on its image


@pytest.mark.parametrize("shape", [(100, 1000), (1000, 100), (240, 1024)])
def test_an_image_that_shrinks_one_way_and_grows_the_other_is_averaged_not_aliased(shape):
    from self_sup_data.images import resize
    stripes = np.zeros(shape + (1,), np.uint8)  # 1-pixel stripes across the long side: grey
    if shape[1] > shape[0]:
        stripes[:, ::2] = 255
    else:
        stripes[::2, :] = 255
    out = resize(stripes, 256)
    assert out.shape == (256, 256, 1)
    assert np.abs(out.astype(int) - 127).max() <= 4  # OpenCV's area mode alone: values 2..253
    step = np.zeros(shape + (1,), np.uint8)  # a vertical edge stays centred
    step[:, shape[1] * 3 // 4:] = 255
    edge = np.argmax(resize(step, 256)[0, :, 0] >= 128)
    assert abs(edge - 256 * 3 / 4) <= 1


@pytest.mark.parametrize("transform", [CenterCrop(41), RandomCrop(41)])
def test_crop_larger_than_image_is_an_error(transform):
    with pytest.raises(ValueError, match="41"):
        transform(random_image(), None, np.random.default_rng(0))


@pytest.mark.parametrize("transform", [Resize, CenterCrop, RandomCrop])
@pytest.mark.parametrize("size", [0, -1, 1.9, 47.5, True, float("nan"), "64"])
def test_a_size_below_one_pixel_is_an_error_naming_the_transform(transform, size):
    with pytest.raises(ValueError, match=rf"{transform.__name__} size must be at least 1 pixel, a whole number, "
                                         rf"got {re.escape(repr(size))}"):
        transform(size)
    assert transform(64.0).size == 64 and transform(np.int64(8)).size == 8


@pytest.mark.parametrize("value", [-5, float("nan"), float("inf")])
def test_rotation_angles_and_flip_probabilities_out_of_range_are_errors(value):
    with pytest.raises(ValueError, match=r"RandomRotation max_degrees must be a finite angle of 0 or more, got "):
        RandomRotation(value)
    for p in (value, 5, 1.5):
        with pytest.raises(ValueError, match=r"RandomVerticalFlip p must be a probability in \[0, 1\], got "):
            RandomVerticalFlip(p)


@pytest.mark.parametrize("channels, mean, std", [
    (3, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    (1, [(0.485 + 0.456 + 0.406) / 3], [(0.229 + 0.224 + 0.225) / 3]),
])
def test_image_tensor_normalisation_and_inverse(channels, mean, std):
    image = random_image(8, 6, channels)
    tensor = to_image_tensor(image)
    assert tensor.dtype == torch.float32 and tensor.shape == (channels, 8, 6)
    expected = (image.astype(np.float64) / 255 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(tensor.numpy(), expected.transpose(2, 0, 1), atol=1e-5)
    np.testing.assert_array_equal(denormalize(tensor), image)


def test_image_tensor_rejects_wrong_input():
    with pytest.raises(ValueError, match="uint8"):
        to_image_tensor(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        to_image_tensor(np.zeros((4, 4, 2), np.uint8))


def test_label_tensor():
    label = np.random.default_rng(0).random((5, 7, 1)).astype(np.float32)
    tensor = to_label_tensor(label)
    assert tensor.dtype == torch.float32 and tensor.shape == (1, 5, 7)
    np.testing.assert_array_equal(tensor[0].numpy(), label[:, :, 0])
    with pytest.raises(ValueError, match="H x W x 1"):
        to_label_tensor(np.zeros((5, 7), np.float32))
