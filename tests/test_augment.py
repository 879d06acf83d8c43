"""Pair augmentation: flips move images, masks and keypoints together; swaps, photometric
changes and their options."""

from __future__ import annotations

import numpy as np
import pytest

from data_modules.augment import (
    AugmentConfig,
    PairAugmenter,
    View,
    flip_view,
    hflip_points,
)
from guided_flow.errors import ConfigError

OFF = {"hflip_p": 0.0, "swap_p": 0.0, "jitter_p": 0.0, "blur_p": 0.0}


def marked_view(height: int = 12, width: int = 17, seed: int = 0) -> View:
    """A random image whose keypoints sit on pixels painted in distinct pure colours, and a mask
    that marks those pixels."""
    rng = np.random.default_rng(seed)
    image = rng.integers(60, 200, size=(height, width, 3), dtype=np.uint8)
    points = np.array([[0, 0], [16, 3], [5, 11], [9, 6]], dtype=np.float64)
    mask = np.zeros((height, width), dtype=np.uint8)
    for number, (x, y) in enumerate(points.astype(int)):
        image[y, x] = (255, 10 * number, 0)
        mask[y, x] = number + 1
    return View(image, mask, points)


def test_flip_moves_image_mask_and_keypoints_together():
    view = marked_view()
    flipped = flip_view(view)
    assert np.array_equal(flipped.image, view.image[:, ::-1])
    assert np.array_equal(flipped.mask, view.mask[:, ::-1])
    for number, (x, y) in enumerate(flipped.keypoints):
        assert x == int(x) and y == int(y)
        assert tuple(flipped.image[int(y), int(x)]) == (255, 10 * number, 0)
        assert flipped.mask[int(y), int(x)] == number + 1
    # sub-pixel keypoints follow the pixel-centre convention: x -> W - 1 - x
    subpixel = View(view.image, keypoints=np.array([[2.25, 3.5], [16.0, 0.0]]))
    expected = hflip_points(subpixel.keypoints, view.image.shape[1])
    assert np.allclose(flip_view(subpixel).keypoints, expected)
    assert expected.tolist() == [[13.75, 3.5], [0.0, 0.0]]
    assert np.array_equal(flip_view(flip_view(view)).keypoints, view.keypoints)


def test_the_flip_column_is_honoured_and_combines_with_the_random_flip():
    source, target = marked_view(seed=1), marked_view(seed=2)
    rng = np.random.default_rng(0)
    same = PairAugmenter(AugmentConfig(**OFF))
    out_source, out_target, applied = same(source, target, False, rng)
    assert not applied.flipped and not applied.swapped
    assert out_source.image is source.image and out_target.mask is target.mask
    out_source, out_target, applied = same(source, target, True, rng)
    assert applied.flipped
    assert np.array_equal(out_source.image, source.image[:, ::-1])
    assert np.array_equal(out_target.mask, target.mask[:, ::-1])
    always = PairAugmenter(AugmentConfig(**{**OFF, "hflip_p": 1.0}))
    assert not always(source, target, True, rng)[2].flipped  # the random flip undoes the column
    assert always(source, target, False, rng)[2].flipped


def test_swap_exchanges_the_views():
    source, target = marked_view(seed=1), marked_view(seed=2)
    swap = PairAugmenter(AugmentConfig(**{**OFF, "swap_p": 1.0}))
    out_source, out_target, applied = swap(source, target, False, np.random.default_rng(0))
    assert applied.swapped and out_source is target and out_target is source


def test_photometric_changes_touch_images_only_and_repeat_with_the_generator():
    source, target = marked_view(seed=1), marked_view(seed=2)
    jitter = PairAugmenter(AugmentConfig(**{**OFF, "jitter_p": 1.0, "blur_p": 1.0}))
    first = jitter(source, target, False, np.random.default_rng(5))
    again = jitter(source, target, False, np.random.default_rng(5))
    other = jitter(source, target, False, np.random.default_rng(6))
    assert not np.array_equal(first[0].image, source.image)
    assert np.array_equal(first[0].image, again[0].image)
    assert np.array_equal(first[1].image, again[1].image)
    assert not np.array_equal(first[0].image, other[0].image)
    assert first[0].image.dtype == np.uint8 and first[0].image.shape == source.image.shape
    assert first[0].mask is source.mask and first[0].keypoints is source.keypoints


@pytest.mark.parametrize(
    "option, value", [("hflip_p", 1.5), ("swap_p", -0.1), ("hue", 0.7), ("blur_sigma", 0.01)]
)
def test_options_out_of_range_are_named(option, value):
    with pytest.raises(ConfigError, match=option):
        AugmentConfig(**{option: value})
