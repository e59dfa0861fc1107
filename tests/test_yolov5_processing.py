"""Chapter 6: letterbox, PreProcessor, PostProcessor (incl. the two fixed course bugs), NMS, drawing."""
import numpy as np
import pytest
import torch

from course_lib.yolov5 import Detections, Letterbox, PostProcessor, PreProcessor, box_iou, draw_boxes, letterbox, nms


def raw_output(rows, nc, total=50):
    """A hand-built output0 (1, total, 5 + nc): given rows first, the rest background (obj 0.01)."""
    out = np.zeros((1, total, 5 + nc), np.float32)
    out[0, :, :4] = [10, 10, 4, 4]
    out[0, :, 4] = 0.01
    for i, (cx, cy, w, h, obj, cls, p) in enumerate(rows):
        out[0, i, :5] = [cx, cy, w, h, obj]
        out[0, i, 5 + cls] = p
    return out


def test_letterbox_geometry_landscape():
    image = np.full((480, 640, 3), 7, np.uint8)                 # h=480, w=640
    boxed, box = letterbox(image, 1120)
    assert box == Letterbox(scale=1.75, pad=(0, 140), image_shape=(480, 640), input_shape=(1120, 1120))
    assert boxed.shape == (1120, 1120, 3)
    assert (boxed[:140] == 114).all() and (boxed[140 + 840:] == 114).all()
    assert (boxed[140:980] == 7).all()


def test_letterbox_odd_padding_portrait():
    boxed, box = letterbox(np.zeros((333, 100, 3), np.uint8), (320, 256))   # h=333, w=100 -> 320 x 96
    assert box.scale == pytest.approx(320 / 333) and box.pad == (80, 0)
    assert (boxed[:, 80:176] == 0).all() and (boxed[:, :80] == 114).all() and (boxed[:, 176:] == 114).all()


@pytest.mark.parametrize("order, channel", [("bgr", 2), ("rgb", 0)])
def test_preprocessor_channels_and_layout(order, channel):
    image = np.zeros((60, 80, 3), np.uint8)
    image[..., 0] = 255                                          # the first channel of what we pass in
    images, box = PreProcessor(64, channel_order=order)(image)
    assert images.shape == (1, 3, 64, 64) and images.dtype == torch.float32 and images.is_contiguous()
    top = box.pad[1]
    inside = images[0, :, top + 5, 10]
    assert inside[channel] == 1.0 and inside.sum() == 1.0     # RGB for the model either way
    assert torch.allclose(images[0, :, 0, 0], torch.full((3,), 114 / 255))


def test_preprocessor_errors():
    with pytest.raises(ValueError, match="multiples of 32"):
        PreProcessor(1000)
    with pytest.raises(ValueError, match="channel_order"):
        PreProcessor(640, channel_order="bgra")
    with pytest.raises(ValueError, match=r"uint8 image of shape \(H, W, 3\)"):
        PreProcessor(640)(np.zeros((10, 10), np.uint8))


def test_postprocessor_maps_boxes_back_on_a_non_square_image():
    """480x640 image in a 640 input: scale 1, 80 px of padding on top. The old course code divided y by
    640/480 instead of removing the padding, which puts this box 80 px (then rescaled) off."""
    _, box = letterbox(np.zeros((480, 640, 3), np.uint8), 640)
    out = raw_output([(320, 320, 100, 50, 0.95, 2, 0.98),       # centre (320, 240) in the image
                      (620, 100, 80, 80, 0.97, 0, 0.99)], nc=9)  # reaches past the right edge and the padding
    dets = PostProcessor(conf_threshold=0.9)(out, box)
    assert dets.classes.tolist() == [0, 2]
    np.testing.assert_allclose(dets.scores, [0.97 * 0.99, 0.95 * 0.98], rtol=1e-6)
    np.testing.assert_allclose(dets.boxes[1], [270, 215, 370, 265])
    np.testing.assert_allclose(dets.boxes[0], [580, 0, 640, 60])     # clipped to the 640x480 image

    _, box2 = letterbox(np.zeros((480, 960, 3), np.uint8), 640)      # scale 2/3, pad top 160
    dets2 = PostProcessor(conf_threshold=0.9)(raw_output([(320, 320, 100, 50, 0.95, 2, 0.98)], nc=9), box2)
    assert box2.pad == (0, 160)
    np.testing.assert_allclose(dets2.boxes[0], [405, 202.5, 555, 277.5], rtol=1e-6)


def test_nc_comes_from_the_last_axis():
    """nc = output.shape[-1] - 5, whatever the number of rows (the course took it from the wrong axis)."""
    for nc, total in [(3, 12), (9, 14), (80, 7)]:
        dets = PostProcessor(0.5)(raw_output([(50, 50, 20, 20, 0.9, nc - 1, 0.9)], nc=nc, total=total))
        assert dets.classes.tolist() == [nc - 1]
    with pytest.raises(ValueError, match=r"5 \+ nc"):
        PostProcessor()(np.zeros((1, 10, 5), np.float32))
    with pytest.raises(ValueError, match="one image"):
        PostProcessor()(np.zeros((2, 10, 14), np.float32))


def test_thresholds_use_obj_times_class():
    out = raw_output([(50, 50, 20, 20, 0.95, 1, 0.5),            # obj high, obj*cls 0.475: dropped
                      (150, 50, 20, 20, 0.5, 1, 1.0),             # obj too low: dropped
                      (250, 50, 20, 20, 0.96, 4, 0.99)], nc=9)    # kept
    dets = PostProcessor(conf_threshold=0.9)(torch.from_numpy(out))
    assert len(dets) == 1 and dets.classes.tolist() == [4]
    assert len(PostProcessor(conf_threshold=0.4)(out)) == 3


def test_nms_class_aware_and_agnostic():
    rows = [(100, 100, 50, 50, 0.99, 0, 0.99),
            (104, 102, 50, 50, 0.98, 0, 0.99),                   # same object, same class: suppressed
            (102, 100, 50, 50, 0.97, 5, 0.99),                   # same place, other class: kept unless agnostic
            (300, 300, 50, 50, 0.96, 0, 0.99)]                   # elsewhere: always kept
    out = raw_output(rows, nc=9)
    aware = PostProcessor(0.5)(out)
    assert sorted(aware.classes.tolist()) == [0, 0, 5] and len(aware) == 3
    agnostic = PostProcessor(0.5, agnostic=True)(out)
    assert agnostic.classes.tolist() == [0, 0]
    np.testing.assert_allclose(agnostic.boxes[:, 0], [75, 275])
    assert len(PostProcessor(0.5, max_det=2)(out)) == 2


def test_nms_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 200, (300, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 60, (300, 2))], axis=1).astype(np.float32)
    scores = rng.uniform(0, 1, 300).astype(np.float32)
    expected, alive = [], list(np.argsort(-scores))
    while alive:
        best = alive.pop(0)
        expected.append(best)
        alive = [j for j in alive if box_iou(boxes[[best]], boxes[[j]])[0, 0] <= 0.5]
    assert nms(boxes, scores, 0.5).tolist() == expected
    assert nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32)).tolist() == []


def test_box_iou_known_values():
    a = np.array([[0, 0, 10, 10]], np.float32)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], np.float32)
    np.testing.assert_allclose(box_iou(a, b)[0], [1.0, 50 / 150, 0.0])


def test_draw_boxes_returns_a_new_image():
    image = np.zeros((100, 120, 3), np.uint8)
    dets = Detections(np.array([[10, 20, 60, 80]], np.float32), np.array([0.93], np.float32), np.array([3]))
    drawn = draw_boxes(image, dets, names=[f"c{i}" for i in range(9)])
    assert drawn.shape == image.shape and drawn.dtype == np.uint8
    assert image.max() == 0 and drawn[50, 10].any() and not drawn[50, 30].any()
    assert dets.rows(names=[f"c{i}" for i in range(9)])[0].split()[:2] == ["c3", "0.930"]


def test_image_to_boxes_with_the_model():
    """PreProcessor -> YOLOv5 -> PostProcessor -> draw_boxes on a non-square image: boxes land inside it."""
    from course_lib.yolov5 import YOLOv5, yolov5_preset
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (150, 250, 3), dtype=np.uint8)
    images, box = PreProcessor(256)(image)
    with torch.no_grad():
        output = YOLOv5(yolov5_preset("n", nc=9, img_size=256), seed=0)(images)
    dets = PostProcessor(conf_threshold=0.05)(output, box)
    assert len(dets) > 0
    assert (dets.boxes[:, [0, 2]] <= 250).all() and (dets.boxes[:, [1, 3]] <= 150).all() and (dets.boxes >= 0).all()
    assert (dets.classes < 9).all() and (np.diff(dets.scores) <= 0).all()
    assert draw_boxes(image, dets).shape == image.shape
