"""course_lib.pipeline.hint: HWC3, resize_image, canny_hint (chapter 1)."""
import cv2
import numpy as np
import pytest
import torch

from course_lib.pipeline.hint import HWC3, canny_hint, hwc3, resize_image


def square_image(h=64, w=96, channels=3):
    """Black image with a white square: its Canny edges are the square's outline."""
    img = np.zeros((h, w, channels), np.uint8)
    img[16:48, 24:56] = 255
    return img


def test_hwc3_grey_rgb_rgba():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = hwc3(grey)
    assert out.shape == (3, 4, 3) and all((out[..., c] == grey).all() for c in range(3))
    assert hwc3(grey[..., None]).shape == (3, 4, 3)
    rgb = square_image()
    assert hwc3(rgb) is rgb and HWC3 is hwc3
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = 100
    rgba[0, 0, 3] = 255          # opaque -> the colour
    rgba[0, 1, 3] = 0            # transparent -> white
    out = hwc3(rgba)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert (out[0, 0] == 100).all() and (out[0, 1] == 255).all()


@pytest.mark.parametrize("bad, word", [
    (np.zeros((8, 8, 3), np.float32), "uint8"),
    (np.zeros((8, 8, 2), np.uint8), "shape"),
    (np.zeros((1, 8, 8, 3), np.uint8), "shape"),
    (np.zeros((0, 8, 3), np.uint8), "empty"),
    ([[0, 1], [2, 3]], "numpy"),
])
def test_bad_images_raise_one_line(bad, word):
    for fn in (hwc3, lambda x: resize_image(x, 256), canny_hint):
        with pytest.raises(ValueError, match=word) as info:
            fn(bad)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("hw, resolution, expected, interpolation", [
    ((256, 384), 256, (256, 384), cv2.INTER_AREA),       # the course's birds: unchanged size
    ((100, 150), 256, (256, 384), cv2.INTER_LANCZOS4),   # k = 2.56, enlarged
    ((512, 768), 256, (256, 384), cv2.INTER_AREA),       # halved
    ((300, 500), 256, (256, 448), cv2.INTER_AREA),       # 500 * 256/300 = 426.7 -> 7 * 64
    ((64, 64), 64, (64, 64), cv2.INTER_AREA),
])
def test_resize_image_sizes_and_interpolation(hw, resolution, expected, interpolation):
    img = (np.random.default_rng(0).random((*hw, 3)) * 255).astype(np.uint8)
    out = resize_image(img, resolution)
    assert out.shape == (*expected, 3) and out.dtype == np.uint8
    ref = cv2.resize(img, (expected[1], expected[0]), interpolation=interpolation)
    assert np.array_equal(out, ref)


def test_resize_image_bad_resolution():
    with pytest.raises(ValueError, match="image_resolution"):
        resize_image(square_image(), 32)


def test_canny_hint_edges_and_tensor():
    img = square_image()
    edge_map, hint = canny_hint(img, 100, 200)
    assert edge_map.shape == (64, 96, 3) and edge_map.dtype == np.uint8
    assert set(np.unique(edge_map)) == {0, 255}
    assert (edge_map[..., 0] == edge_map[..., 2]).all()
    assert np.array_equal(edge_map[..., 0], cv2.Canny(img, 100, 200))
    assert np.nonzero(edge_map[32, :, 0])[0].tolist() == [23, 55]          # the square's left and right sides
    assert hint.shape == (1, 3, 64, 96) and hint.dtype == torch.float32
    assert torch.equal(hint[0].permute(1, 2, 0), torch.from_numpy(edge_map).float() / 255)


def test_canny_hint_grey_input_and_threshold_order():
    edge_map, _ = canny_hint(square_image(channels=1))
    assert edge_map.shape == (64, 96, 3)
    with pytest.raises(ValueError, match="low <= high"):
        canny_hint(square_image(), 200, 100)
    with pytest.raises(ValueError, match="low <= high"):
        canny_hint(square_image(), -1, 100)
