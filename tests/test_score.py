"""The course score (chapter 2): pdFactor, score, PSNR, max diff, PD's dependency message, the folder table."""
from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch

from course_lib.env import MissingDependency, has_module
from course_lib.score import (
    FID_WEIGHTS_FILE, check_fid_weights, course_score, max_pixel_diff, pd_factor, perceptual_distance, psnr,
    pd_unavailable, score_folder, score_table,
)


@pytest.mark.parametrize("pd, expected", [
    (0.0, 1.0),         # 1 - 0.1*0
    (2.0, 0.8),         # 1 - 0.1*2
    (3.999, 0.6001),    # just below 4: 1 - 0.3999
    (4.0, 0.6),         # second piece starts: 0.6 - 0.0125*0
    (6.0, 0.575),       # 0.6 - 0.0125*2
    (7.999, 0.5500125), # just below 8: 0.6 - 0.0125*3.999
    (8.0, 0.55),        # third piece starts: 0.55 - 0.1375*0
    (10.0, 0.275),      # 0.55 - 0.1375*2
    (12.0, 0.0),        # 0.55 - 0.1375*4 = 0
    (-0.001, 0.0),      # just below 0
    (12.001, 0.0),      # just above 12
    (float("nan"), 0.0),
])
def test_pd_factor_at_the_breakpoints(pd, expected):
    assert pd_factor(pd) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("edge", [4.0, 8.0, 12.0])
def test_pd_factor_is_continuous(edge):
    eps = 1e-9
    assert pd_factor(edge - eps) == pytest.approx(pd_factor(edge), abs=1e-7)


def test_course_score():
    assert course_score(0.0, 700.0) == pytest.approx(10.0)     # 1.0 * 7000 / 700
    assert course_score(4.0, 1000.0) == pytest.approx(4.2)     # 0.6 * 7000 / 1000
    assert course_score(13.0, 100.0) == 0.0
    with pytest.raises(ValueError, match="latency 0"):
        course_score(1.0, 0)


def test_psnr_and_max_diff_of_known_arrays():
    a = np.zeros((4, 4, 3), np.uint8)
    assert psnr(a, a) == math.inf and max_pixel_diff(a, a) == 0
    assert psnr(a, a + 1) == pytest.approx(10 * math.log10(255 ** 2))        # MSE 1: 48.13 dB
    assert psnr(a, np.full_like(a, 255)) == pytest.approx(0.0)               # MSE 255^2
    assert max_pixel_diff(np.full_like(a, 255), a) == 255 and max_pixel_diff(a, np.full_like(a, 255)) == 255
    half = a.copy()
    half[:2] = 10                                                            # MSE = 100 / 2
    assert psnr(a, half) == pytest.approx(10 * math.log10(255 ** 2 / 50))
    with pytest.raises(ValueError, match="different shapes"):
        psnr(a, np.zeros((4, 5, 3), np.uint8))


@pytest.mark.skipif(has_module("pytorch_fid"), reason="pytorch_fid is installed here")
def test_pd_without_pytorch_fid_says_what_to_install():
    img = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(MissingDependency) as info:
        perceptual_distance(img, img)
    assert "pytorch-fid" in str(info.value) and "\n" not in str(info.value)


def test_missing_fid_weights_are_never_downloaded(tmp_path):
    with pytest.raises(MissingDependency, match=FID_WEIGHTS_FILE):
        check_fid_weights(tmp_path / FID_WEIGHTS_FILE)
    (tmp_path / FID_WEIGHTS_FILE).write_bytes(b"x")
    assert check_fid_weights(tmp_path / FID_WEIGHTS_FILE).name == FID_WEIGHTS_FILE


def _write_images(folder, values):
    folder.mkdir()
    for name, value in values.items():
        cv2.imwrite(str(folder / name), np.full((64, 64, 3), value, np.uint8))


def test_score_folder_without_pd(tmp_path):
    _write_images(tmp_path / "new", {"bird_0.png": 10, "bird_1.png": 20})
    _write_images(tmp_path / "ref", {"bird_0.png": 10, "bird_1.png": 21})
    (tmp_path / "new" / "latencies.json").write_text(json.dumps({"bird_0.png": 700.0}))
    rows = score_folder(tmp_path / "new", tmp_path / "ref", with_pd=False)
    assert [(r.name, r.latency_ms, r.max_diff, r.pd, r.score) for r in rows] == [
        ("bird_0.png", 700.0, 0, None, None), ("bird_1.png", None, 1, None, None)]
    assert rows[0].psnr_db == math.inf and rows[1].psnr_db == pytest.approx(48.13, abs=0.01)
    table = score_table(rows)
    assert "bird_1.png" in table and table.splitlines()[-1].startswith("2 images; mean latency 700.0 ms")
    header, *body = table.splitlines()[:3]          # columns aligned: a missing value is a right-aligned "-"
    assert {len(line) for line in body} == {len(header)} and body[1].split()[1] == "-"
    assert "not shown" not in table
    assert score_table(rows, pd_note="why").splitlines()[-2] == "PD and score not shown: why"
    if not has_module("pytorch_fid"):
        assert score_folder(tmp_path / "new", tmp_path / "ref")[0].pd is None   # PD skipped quietly
        assert "pytorch" in pd_unavailable()                                    # the one line saying why
        with pytest.raises(MissingDependency):
            score_folder(tmp_path / "new", tmp_path / "ref", with_pd=True)


def test_score_folder_errors(tmp_path):
    _write_images(tmp_path / "new", {"bird_0.png": 10})
    (tmp_path / "ref").mkdir()
    with pytest.raises(FileNotFoundError, match="bird_0.png"):
        score_folder(tmp_path / "new", tmp_path / "ref", with_pd=False)
    with pytest.raises(FileNotFoundError, match="no images"):
        score_folder(tmp_path / "ref", tmp_path / "new", with_pd=False)


@pytest.mark.gpu
@pytest.mark.skipif(not (has_module("pytorch_fid") and torch.cuda.is_available()),
                    reason="needs pytorch-fid (with its weights) and a CUDA GPU")
def test_pd_of_an_image_with_itself_is_zero_and_grows_with_noise():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (256, 384, 3), dtype=np.uint8)
    noisy = np.clip(img.astype(int) + rng.integers(-40, 41, img.shape), 0, 255).astype(np.uint8)
    assert perceptual_distance(img, img) == pytest.approx(0.0, abs=1e-4)
    assert perceptual_distance(img, noisy) > 0.1
