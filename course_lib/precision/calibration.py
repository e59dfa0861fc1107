"""Calibration data for INT8: the inputs each sub-model really sees during canny2image, recorded and replayed.

Chapter 5 introduces this module. INT8 needs a range for every activation it quantizes, and ranges are
only as good as the inputs they were measured on. The course recorded them from real runs (one
``calib_data/ControlNet/<i>.npz`` per call); here the same thing is done without touching the pipeline:

1. :class:`RecordingBackend` wraps any backend: each ``infer(feed)`` is handed to a writer, then
   forwarded unchanged. :func:`capture_calibration` puts one around each sub-model of a
   :class:`~course_lib.pipeline.canny2image.Canny2Image` for the duration of some ``process()`` calls.
2. Every call becomes one ``.npz`` (keys = the contract's input names) and one manifest entry saying
   which run (image, prompt, seed), which DDIM step (and timestep) and which call of that step it was
   (with ``guidance="separate"``: call 0 is the prompt, call 1 the negative prompt)::

       calib_data/manifest.json            runs, per-model input shapes, one entry per sample
       calib_data/controlnet/000000.npz    x_noisy, hint, timestep, context
       calib_data/unet/000000.npz          x_noisy, timestep, context, control0 .. control12
       calib_data/clip/000000.npz          input_ids
       calib_data/decoder/000000.npz       latent

   The folder is written under a temporary name and moved into place when complete.
3. :class:`CalibrationReader` replays one model's samples: it is an ONNX Runtime
   ``CalibrationDataReader`` (``get_next`` / ``rewind``) for ``quantize_static``, and
   :meth:`CalibrationReader.as_arrays` stacks them into the ``{input name: array}`` dict that ModelOpt's
   ``calibration_data`` takes. ``runs=`` selects samples by run, so some runs can be held out for
   measuring accuracy (:func:`course_lib.precision.int8.int8_accuracy`).

At 20 steps with separate CFG one image gives 40 ControlNet and 40 UNet samples, 2 CLIP and 1 decoder.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from course_lib.files import temp_dir_beside
from course_lib.onnx.session import to_numpy as _to_numpy

MANIFEST = "manifest.json"
FORMAT = "course_lib.precision.calibration/1"


class CalibrationWriter:
    """Chapter 5: writes recorded feeds into a calibration folder (a temporary one until :meth:`close`).

    ``begin_run(**info)`` starts a run (image, prompt, seed ...); ``add(model, feed)`` writes one sample and
    works out its DDIM step from the ``timestep`` input (a new timestep = the next step); ``close()``
    writes the manifest, moves the folder into place and returns the :class:`CalibrationSet`.
    ``step_stride`` k keeps the calls of every k-th DDIM step only (0, k, 2k, ...): at sd15 size one UNet
    sample is ~10 MB (13 controls), so 20 images x 20 steps x 2 calls would be 8 GB.
    """

    def __init__(self, out_dir: str | os.PathLike, overwrite: bool = False, info: Mapping | None = None,
                 step_stride: int = 1):
        if not isinstance(step_stride, int) or step_stride < 1:
            raise ValueError(f"step_stride {step_stride!r}: expected a positive integer (1 records every step)")
        self.step_stride = step_stride
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ValueError(f"{self.out_dir} is a file: expected a folder for calibration data")
        if self.out_dir.is_dir() and any(self.out_dir.iterdir()) and not overwrite:
            raise ValueError(f"{self.out_dir} already holds files: pass overwrite=True to replace it")
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.overwrite = overwrite
        self.tmp = temp_dir_beside(self.out_dir)
        self.info = dict(info or {})
        self.runs: list[dict] = []
        self.inputs: dict[str, dict[str, dict]] = {}
        self.samples: dict[str, list[dict]] = {}
        self._position: dict[str, tuple] = {}                      # model -> (step, timestep, call)

    def begin_run(self, **info) -> int:
        """Start a new run (one ``process()`` call); ``info`` goes into the manifest. Returns its index."""
        self.runs.append({"run": len(self.runs), **info})
        self._position.clear()
        return len(self.runs) - 1

    def add(self, model: str, feed: Mapping) -> dict | None:
        """Write one call's feed of ``model`` (``{input name: tensor or array}``); returns its manifest entry
        (None for a DDIM step that ``step_stride`` skips)."""
        if not self.runs:
            raise ValueError("CalibrationWriter.add before begin_run: expected a run to record into")
        arrays = {name: np.ascontiguousarray(_to_numpy(value)) for name, value in feed.items()}
        specs = {name: {"shape": list(a.shape), "dtype": a.dtype.name} for name, a in arrays.items()}
        known = self.inputs.setdefault(model, specs)
        if known != specs:
            raise ValueError(f"calibration capture: {model} inputs changed from {known} to {specs}; "
                             "expected one image size and num_samples per capture")
        timestep = int(arrays["timestep"].reshape(-1)[0]) if "timestep" in arrays else None
        last = self._position.get(model)                            # (step, timestep, call) of the last call
        if timestep is None:                                          # clip, decoder: not part of a step
            step, call = None, 0 if last is None else last[2] + 1
        elif last is None or timestep != last[1]:                     # a new timestep: the next DDIM step
            step, call = 0 if last is None else last[0] + 1, 0
        else:                                                         # same step, next call (cond, uncond)
            step, call = last[0], last[2] + 1
        self._position[model] = (step, timestep, call)
        if step is not None and step % self.step_stride:
            return None                                               # a step that is not kept
        samples = self.samples.setdefault(model, [])
        entry = {"file": f"{model}/{len(samples):06d}.npz", "run": len(self.runs) - 1, "step": step,
                 "timestep": timestep, "call": call}
        (self.tmp / model).mkdir(exist_ok=True)
        with open(self.tmp / entry["file"], "wb") as f:
            np.savez(f, **arrays)
        samples.append(entry)
        return entry

    def close(self) -> "CalibrationSet":
        """Write ``manifest.json``, move the folder to ``out_dir`` and return the loaded set."""
        manifest = {"format": FORMAT, **self.info, "runs": self.runs,
                    "models": {m: {"inputs": self.inputs[m], "count": len(self.samples[m])} for m in self.samples},
                    "samples": self.samples}
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        old = None
        if self.out_dir.is_dir() and any(self.out_dir.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.old-", dir=self.out_dir.parent))
            os.replace(self.out_dir, old / self.out_dir.name)
        os.replace(self.tmp, self.out_dir)                            # an empty target folder is replaced
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return load_calibration(self.out_dir)

    def abort(self) -> None:
        """Drop everything written so far (the final folder is left as it was)."""
        shutil.rmtree(self.tmp, ignore_errors=True)


class RecordingBackend:
    """Chapter 5: a backend that hands each feed to ``writer.add(name, feed)``, then runs the wrapped one.

    It has the wrapped backend's ``name``, ``input_names`` and ``output_names``, so a pipeline cannot tell
    the difference; outputs are the wrapped backend's, untouched.
    """

    def __init__(self, backend, writer: CalibrationWriter, name: str | None = None):
        self.backend, self.writer = backend, writer
        self.name = name or backend.name
        self.input_names = list(backend.input_names)
        self.output_names = list(backend.output_names)

    def infer(self, feed):
        self.writer.add(self.name, {n: feed[n] for n in self.input_names if n in feed})
        return self.backend.infer(feed)

    def __repr__(self) -> str:
        return f"RecordingBackend({self.backend!r})"


def capture_calibration(pipe, images: Sequence, prompts: Sequence[str], out_dir: str | os.PathLike, *,
                        seeds: Sequence[int] = (2946901,), models: Sequence[str] | None = None,
                        step_stride: int = 1, overwrite: bool = False, progress: bool = True,
                        **process_kwargs) -> "CalibrationSet":
    """Chapter 5: run ``pipe.process`` once per (image, prompt, seed) and record every sub-model's inputs.

    Args:
        pipe: a :class:`~course_lib.pipeline.canny2image.Canny2Image` (any backends: torch, ONNX Runtime, TensorRT).
        images: uint8 HxWx3 arrays or image files; one run per image.
        prompts, seeds: one per image, or a single one used for every image.
        out_dir: the calibration folder to write (e.g. ``calib_data``).
        models: which sub-models to record (default: all four the pipeline has).
        step_stride: record ControlNet / UNet calls of every ``step_stride``-th DDIM step only.
        overwrite: replace an existing non-empty ``out_dir``.
        process_kwargs: passed to ``process()`` (e.g. ``ddim_steps=20, image_resolution=256``).
    Returns the :class:`CalibrationSet` as loaded back from disk. The pipeline is left as it was.
    """
    from course_lib.progress import tqdm

    images, n = list(images), len(images)
    prompts, seeds = list(prompts), list(seeds)
    for what, values in (("prompts", prompts), ("seeds", seeds)):
        if n == 0 or len(values) not in (1, n):
            raise ValueError(f"{what}: got {len(values)} for {n} images; expected 1 or one per image")
    models = list(pipe.backends if models is None else models)
    unknown = [m for m in models if m not in pipe.backends]
    if unknown:
        raise ValueError(f"models {unknown}: expected some of the pipeline's {list(pipe.backends)}")
    info = {"created_by": "course_lib.precision.calibration.capture_calibration", "guidance": pipe.guidance,
            "process": {k: v for k, v in process_kwargs.items() if isinstance(v, (int, float, str, bool))}}
    info["step_stride"] = step_stride
    writer = CalibrationWriter(out_dir, overwrite=overwrite, info=info, step_stride=step_stride)
    original = dict(pipe.backends)
    try:
        pipe.backends.update({m: RecordingBackend(original[m], writer, name=m) for m in models})
        for i in tqdm(range(n), desc="calibration runs", disable=not progress):
            image, prompt, seed = images[i], prompts[i % len(prompts)], int(seeds[i % len(seeds)])
            if isinstance(image, (str, os.PathLike)):
                from course_lib.samples import read_image
                name, image = Path(image).name, read_image(image)
            else:
                name = f"image{i}"
            writer.begin_run(image=name, prompt=prompt, seed=seed)
            pipe.process(image, prompt, seed=seed, **process_kwargs)
    except BaseException:
        writer.abort()
        raise
    finally:
        pipe.backends.clear()
        pipe.backends.update(original)
    return writer.close()


@dataclass(frozen=True)
class CalibrationSet:
    """Chapter 5: a calibration folder as read from its manifest (see :func:`load_calibration`)."""
    path: Path
    manifest: dict

    @property
    def runs(self) -> list[dict]:
        return self.manifest["runs"]

    @property
    def models(self) -> list[str]:
        return list(self.manifest["models"])

    def samples(self, model: str, runs: Sequence[int] | None = None) -> list[dict]:
        """Manifest entries of ``model`` (optionally only those of some runs), in recording order."""
        if model not in self.manifest["samples"]:
            raise ValueError(f"no calibration samples for {model!r} in {self.path}: expected one of {self.models}")
        entries = self.manifest["samples"][model]
        return entries if runs is None else [e for e in entries if e["run"] in set(runs)]

    def input_shapes(self, model: str) -> dict[str, tuple[int, ...]]:
        return {n: tuple(s["shape"]) for n, s in self.manifest["models"][model]["inputs"].items()}

    def reader(self, model: str, runs: Sequence[int] | None = None, limit: int | None = None) -> "CalibrationReader":
        """A :class:`CalibrationReader` over ``model``'s samples (of ``runs``; at most ``limit``, evenly spread)."""
        return CalibrationReader(self, model, runs=runs, limit=limit)

    def __str__(self) -> str:
        size = sum(f.stat().st_size for f in self.path.rglob("*.npz"))
        lines = [f"{self.path}: {len(self.runs)} run(s), {size / 2**20:.1f} MiB"]
        for m in self.models:
            shapes = ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in self.input_shapes(m).items())
            lines.append(f"  {m:<10} {self.manifest['models'][m]['count']:>5} samples  {shapes}")
        return "\n".join(lines)


def load_calibration(path: str | os.PathLike) -> CalibrationSet:
    """Chapter 5: open a calibration folder written by :func:`capture_calibration` (checks the manifest)."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: expected a folder written by capture_calibration")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    missing = [e["file"] for entries in manifest["samples"].values() for e in entries if not (path / e["file"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: {len(missing)} sample file(s) listed in the manifest are missing, "
                                f"e.g. {missing[0]}")
    return CalibrationSet(path, manifest)


class CalibrationReader(CalibrationDataReader):
    """Chapter 5: replay one model's recorded inputs, one sample per :meth:`get_next`.

    Args:
        calib: a :class:`CalibrationSet` or the folder's path.
        model: "clip", "controlnet", "unet" or "decoder".
        runs: only the samples of these runs (e.g. all but the last, to hold one out).
        limit: at most this many samples, spread evenly over the selection (over all steps).
    ``get_next()`` returns ``{input name: np.ndarray}`` in recording order, then None; ``rewind()`` starts
    again. Files are read lazily, one per call. ``len(reader)`` is the number of samples.
    """

    def __init__(self, calib: CalibrationSet | str | os.PathLike, model: str,
                 runs: Sequence[int] | None = None, limit: int | None = None):
        self.calib = calib if isinstance(calib, CalibrationSet) else load_calibration(calib)
        self.model = model
        entries = self.calib.samples(model, runs)
        if limit is not None and 0 < limit < len(entries):
            entries = [entries[int(i)] for i in np.linspace(0, len(entries) - 1, limit).round()]
        if not entries:
            raise ValueError(f"no {model} samples in {self.calib.path} for runs {runs}: expected at least one")
        self.entries = entries
        self.input_names = list(self.calib.manifest["models"][model]["inputs"])
        self._next = 0

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, index: int) -> dict[str, np.ndarray]:
        """Sample ``index`` of this reader as ``{input name: array}``."""
        with np.load(self.calib.path / self.entries[index]["file"]) as data:
            return {name: data[name] for name in self.input_names}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.entries):
            return None
        self._next += 1
        return self.load(self._next - 1)

    def rewind(self) -> None:
        self._next = 0

    def set_range(self, start_index: int, end_index: int) -> None:
        """Restrict to samples ``start_index .. end_index - 1`` (ONNX Runtime's batched calibration)."""
        self.entries = self.entries[start_index:end_index]
        self.rewind()

    def feeds(self) -> Iterator[dict[str, np.ndarray]]:
        """Every sample in order (a fresh pass, independent of get_next)."""
        return (self.load(i) for i in range(len(self.entries)))

    def as_arrays(self) -> dict[str, np.ndarray]:
        """All samples stacked along the batch axis: ModelOpt's ``calibration_data`` dict."""
        stacked: dict[str, list[np.ndarray]] = {n: [] for n in self.input_names}
        for feed in self.feeds():
            for name, array in feed.items():
                stacked[name].append(array)
        return {name: np.concatenate(arrays, axis=0) for name, arrays in stacked.items()}

    def __repr__(self) -> str:
        return f"CalibrationReader({str(self.calib.path)!r}, {self.model!r}, {len(self)} samples)"


__all__ = ["CalibrationReader", "CalibrationSet", "CalibrationWriter", "RecordingBackend", "capture_calibration",
           "load_calibration"]
