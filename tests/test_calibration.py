"""course_lib.precision.calibration (chapter 5): recording every sub-model's inputs during canny2image, and replaying them.

Tiny preset, 64x64 image, 2 DDIM steps, separate CFG: per run 2 ControlNet + 2 UNet calls per step.
"""
import json

import numpy as np
import pytest
import torch

from course_lib.precision.calibration import (CalibrationReader, CalibrationSet, RecordingBackend, capture_calibration,
                                    load_calibration)
from course_lib.cnsd import build_cnsd, contracts, get_config
from course_lib.pipeline.canny2image import Canny2Image
from course_lib.pipeline.sampler import make_ddim_schedule
from course_lib.cnsd.tokenizer import get_tokenizer

STEPS, SIZE = 2, 64




@pytest.fixture(scope="module")
def cnsd():
    return build_cnsd(get_config("tiny"), seed=0)


@pytest.fixture(scope="module")
def photos():
    yy, xx = np.mgrid[:SIZE, :SIZE]
    img = np.stack([xx * 3, yy * 3, np.full_like(xx, 60)], axis=-1).astype(np.uint8)
    img[(yy - 28) ** 2 + (xx - 30) ** 2 < 15 ** 2] = (240, 200, 40)
    return [img, np.ascontiguousarray(img[::-1])]


class Spy:
    """A backend that keeps a copy of every feed it is given (what the model really saw)."""

    def __init__(self, backend):
        self.backend, self.name = backend, backend.name
        self.input_names, self.output_names = backend.input_names, backend.output_names
        self.feeds = []

    def infer(self, feed):
        self.feeds.append({n: feed[n].detach().cpu().numpy().copy() for n in self.input_names})
        return self.backend.infer(feed)


@pytest.fixture(scope="module")
def captured(cnsd, photos, tmp_path_factory):
    pipe = Canny2Image.from_torch(cnsd, get_tokenizer(allow_fallback=True), progress=False)
    spies = {name: Spy(backend) for name, backend in pipe.backends.items()}
    pipe.backends.update(spies)
    out = tmp_path_factory.mktemp("calib") / "calib_data"
    calib = capture_calibration(pipe, photos, ["a bird"], out, seeds=[1, 2], image_resolution=SIZE,
                                ddim_steps=STEPS, progress=False)
    return pipe, spies, calib


def test_capture_records_steps_times_calls_with_the_contract_shapes(cnsd, captured):
    pipe, spies, calib = captured
    runs = 2
    counts = {m: len(calib.samples(m)) for m in calib.models}
    assert counts == {"clip": 2 * runs, "controlnet": STEPS * 2 * runs, "unet": STEPS * 2 * runs, "decoder": runs}
    table = contracts(cnsd.config, 1, SIZE, SIZE)
    for model in calib.models:
        assert calib.input_shapes(model) == {s.name: tuple(s.shape) for s in table[model].inputs}
    # the manifest says which run, step, timestep and call (0 = prompt, 1 = negative prompt) each sample is
    timesteps = make_ddim_schedule(STEPS).timesteps[::-1]                  # sampled from the largest down
    expected = [(run, step, timesteps[step], call) for run in range(runs) for step in range(STEPS) for call in (0, 1)]
    for model in ("controlnet", "unet"):
        assert [(e["run"], e["step"], e["timestep"], e["call"]) for e in calib.samples(model)] == expected
    assert [(e["run"], e["step"], e["call"]) for e in calib.samples("clip")] == [(0, None, 0), (0, None, 1),
                                                                                 (1, None, 0), (1, None, 1)]
    manifest = json.loads((calib.path / "manifest.json").read_text())
    assert [(r["prompt"], r["seed"], r["image"]) for r in manifest["runs"]] == [("a bird", 1, "image0"),
                                                                                 ("a bird", 2, "image1")]
    assert manifest["process"] == {"image_resolution": SIZE, "ddim_steps": STEPS} and manifest["guidance"] == "separate"
    assert manifest["step_stride"] == 1
    # the pipeline got its own backends back, and nothing temporary is left next to the folder
    assert pipe.backends["unet"] is spies["unet"] and not any(isinstance(b, RecordingBackend) for b in pipe.backends.values())
    assert [p.name for p in calib.path.parent.iterdir()] == ["calib_data"]


def test_reader_replays_exactly_what_each_model_saw(captured):
    _, spies, calib = captured
    for model in calib.models:
        reader = calib.reader(model)
        assert len(reader) == len(spies[model].feeds)
        replayed = [reader.get_next() for _ in range(len(reader))]
        assert reader.get_next() is None
        for seen, again in zip(spies[model].feeds, replayed):
            assert list(again) == list(seen)                               # contract order
            for name in seen:
                assert again[name].dtype == seen[name].dtype and np.array_equal(again[name], seen[name])
        reader.rewind()
        first = reader.get_next()
        assert all(np.array_equal(first[n], replayed[0][n]) for n in first)
    timestep = calib.reader("unet").get_next()["timestep"]
    assert timestep.dtype == np.int32 and timestep.shape == (1,)


def test_reader_selects_runs_and_stacks_for_modelopt(captured):
    _, _, calib = captured
    held_out = CalibrationReader(calib.path, "controlnet", runs=[1])
    assert len(held_out) == STEPS * 2 and {e["run"] for e in held_out.entries} == {1}
    stacked = held_out.as_arrays()
    assert stacked["x_noisy"].shape == (STEPS * 2, 4, SIZE // 8, SIZE // 8)
    assert stacked["timestep"].shape == (STEPS * 2,) and stacked["timestep"].dtype == np.int32
    assert np.array_equal(stacked["context"][1], held_out.load(1)["context"][0])
    spread = calib.reader("unet", limit=3)
    assert [e["file"] for e in spread.entries] == ["unet/000000.npz", "unet/000004.npz", "unet/000007.npz"]
    with pytest.raises(ValueError, match="no controlnet samples"):
        calib.reader("controlnet", runs=[5])
    with pytest.raises(ValueError, match="no calibration samples for 'yolo'"):
        calib.reader("yolo")


def test_capture_refuses_to_overwrite_and_leaves_nothing_behind_on_failure(cnsd, photos, captured, tmp_path):
    _, _, calib = captured
    pipe = Canny2Image.from_torch(cnsd, get_tokenizer(allow_fallback=True), progress=False)
    with pytest.raises(ValueError, match="already holds files"):
        capture_calibration(pipe, photos[:1], ["a bird"], calib.path, progress=False)
    with pytest.raises(ValueError, match="prompts: got 2 for 1 images"):
        capture_calibration(pipe, photos[:1], ["a", "b"], tmp_path / "x", progress=False)

    class Broken(Spy):
        def infer(self, feed):
            raise RuntimeError("boom")

    pipe.backends["unet"] = Broken(pipe.backends["unet"])
    with pytest.raises(RuntimeError, match="boom"):
        capture_calibration(pipe, photos[:1], ["a bird"], tmp_path / "calib", image_resolution=SIZE,
                            ddim_steps=STEPS, progress=False)
    assert list(tmp_path.iterdir()) == []                                  # no folder, no temporary one
    assert isinstance(pipe.backends["unet"], Broken)


def test_load_calibration_checks_the_folder(captured, tmp_path):
    _, _, calib = captured
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        load_calibration(tmp_path)
    again = load_calibration(calib.path)
    assert isinstance(again, CalibrationSet) and "controlnet" in str(again)
    broken = tmp_path / "broken"
    broken.mkdir()
    manifest = json.loads((calib.path / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FileNotFoundError, match="sample file"):
        load_calibration(broken)


def test_step_stride_keeps_every_kth_step(cnsd, photos, tmp_path):
    pipe = Canny2Image.from_torch(cnsd, get_tokenizer(allow_fallback=True), progress=False)
    calib = capture_calibration(pipe, photos[:1], ["a bird"], tmp_path / "calib", models=["controlnet", "clip"],
                                step_stride=2, image_resolution=SIZE, ddim_steps=4, progress=False)
    assert [(e["step"], e["call"]) for e in calib.samples("controlnet")] == [(0, 0), (0, 1), (2, 0), (2, 1)]
    assert len(calib.samples("clip")) == 2 and calib.models == ["clip", "controlnet"]
    assert "MiB" in str(calib)
    with pytest.raises(ValueError, match="step_stride 0"):
        capture_calibration(pipe, photos[:1], ["a bird"], tmp_path / "x", step_stride=0, progress=False)
