"""ONNX Runtime: one way to open a session and feed it, for parity checks and the pipeline. Chapter 1.

:func:`ort_session` opens a model (providers: CUDA where onnxruntime-gpu sees a GPU, else CPU; never
ORT's TensorRT EP); :func:`ort_feed` turns torch tensors or arrays into the numpy arrays the session
declares, by name, and refuses what does not fit; :func:`run_ort` runs a session on a feed.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

# ONNX Runtime providers tried by default, best first. ORT's TensorRT EP is left out on purpose: it builds
# TensorRT engines inside the session (minutes for the UNet); the course builds its own in chapter 2.
DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")

# ONNX Runtime's own log: errors only. Its warnings -- e.g. "can't constant fold Trilu node" for the FP16 CLIP
# (no FP16 CPU kernel for Trilu: it runs unfolded, harmless) -- go to C-level stderr in ANSI colours, which a
# notebook cannot capture or compare; what matters about a session the course checks and says itself.
ORT_LOG_SEVERITY = 3                 # 0 verbose, 1 info, 2 warning, 3 error, 4 fatal

# ONNX element types the course's models use -> numpy
ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32,
             "tensor(int64)": np.int64, "tensor(bool)": np.bool_, "tensor(double)": np.float64}


def default_providers() -> list[str]:
    """Chapter 2: the providers a session gets when none are named: those of :data:`DEFAULT_PROVIDERS`
    this onnxruntime build has (CUDA, then CPU)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in DEFAULT_PROVIDERS if p in available] or ["CPUExecutionProvider"]


def to_numpy(x) -> np.ndarray:
    """A torch tensor (any device) or array-like as a numpy array."""
    if hasattr(x, "detach"):                       # a torch tensor, on any device
        x = x.detach().cpu()
        return x.float().numpy() if str(x.dtype) == "torch.bfloat16" else x.numpy()
    return np.asarray(x)


def ort_session(path, providers: Sequence[str] | None = None):
    """Chapter 1: an ``onnxruntime.InferenceSession`` for ``path`` (external data is found next to it).

    ``providers=None`` takes those of :data:`DEFAULT_PROVIDERS` that are installed (CUDA, else CPU);
    naming a provider that is not installed is a ValueError. If ORT falls back from the first
    provider at run time (e.g. missing CUDA libraries), a warning says so. ORT logs errors only
    (:data:`ORT_LOG_SEVERITY`).
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} does not exist")
    available = ort.get_available_providers()
    if providers is None:
        providers = default_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise ValueError(f"ONNX Runtime providers {missing} are not installed here (available: {available})")
    try:
        options = ort.SessionOptions()
        options.log_severity_level = ORT_LOG_SEVERITY
        session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
    except Exception as e:  # onnxruntime's Fail, InvalidProtobuf, NoSuchFile, ... (not RuntimeError)  # noqa: BLE001
        if not _from_onnxruntime(e):
            raise
        from course_lib.onnx.export import load_onnx_checked

        load_onnx_checked(path, load_external_data=False)      # says what is wrong with the file, if it can
        raise ValueError(f"ONNX Runtime cannot open {path}: {_first_line(e)}") from None
    if providers and session.get_providers()[0] != providers[0]:
        warnings.warn(f"ONNX Runtime could not use {providers[0]} for {path.name}; "
                      f"running on {session.get_providers()[0]}", RuntimeWarning, stacklevel=2)
    return session


def _from_onnxruntime(e: BaseException) -> bool:
    return type(e).__module__.startswith("onnxruntime")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines() or [type(e).__name__])[0][:300]


def ort_feed(session, feed: Mapping) -> dict[str, np.ndarray]:
    """Torch tensors / arrays to numpy, checked against the model's input names, dtypes (no casts) and the
    sizes the model fixes (a ValueError naming the input)."""
    inputs = {i.name: i for i in session.get_inputs()}
    if set(feed) != set(inputs):
        raise ValueError(f"feed names {sorted(feed)} differ from the model inputs {sorted(inputs)}")
    out = {}
    for name, value in feed.items():
        array = np.ascontiguousarray(to_numpy(value))
        want = inputs[name].type                      # e.g. "tensor(int32)"
        got = f"tensor({ {'float32': 'float', 'float64': 'double'}.get(array.dtype.name, array.dtype.name) })"
        if got != want:
            raise ValueError(f"input {name!r}: got {array.dtype.name}, the model expects {want}")
        shape = tuple(d if isinstance(d, int) else None for d in (inputs[name].shape or []))
        if len(array.shape) != len(shape) or any(w is not None and w != g for w, g in zip(shape, array.shape)):
            shown = tuple("?" if w is None else w for w in shape)
            raise ValueError(f"input {name!r} has shape {array.shape}, the model expects {shown} "
                             "(export it at this size, or with dynamic axes)")
        out[name] = array
    return out


def run_session(session, output_names: Sequence[str], feed: Mapping[str, np.ndarray], what: str = "the model"):
    """``session.run`` with ONNX Runtime's own errors (a graph that loads but cannot run) as one ValueError
    naming ``what``; returns the list of outputs."""
    try:
        return session.run(list(output_names), dict(feed))
    except Exception as e:  # noqa: BLE001
        if not _from_onnxruntime(e):
            raise
        raise ValueError(f"ONNX Runtime failed running {what}: {_first_line(e)}") from None


def run_ort(session_or_path, feed: Mapping, output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Chapter 1: run an ONNX Runtime session (or a model path) on ``{input_name: tensor}``.

    Torch tensors are converted to numpy keeping their dtype (an int32 ``timestep`` stays int32; a
    dtype the model does not expect is a ValueError). Returns ``{output_name: numpy array}``.
    """
    session = ort_session(session_or_path) if isinstance(session_or_path, (str, os.PathLike)) else session_or_path
    names = list(output_names) if output_names else [o.name for o in session.get_outputs()]
    what = os.fspath(session_or_path) if isinstance(session_or_path, (str, os.PathLike)) else "the model"
    return dict(zip(names, run_session(session, names, ort_feed(session, feed), what)))
