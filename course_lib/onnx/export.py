"""Export one torch module to ONNX: exact tensor names, static or named dynamic axes, external data, atomically.

Chapter 1 introduces this module. Every model of the course (CLIP, ControlNet, UNet, VAE decoder, YOLOv5)
goes through :func:`export_onnx`; :func:`load_onnx_checked` is how a later stage opens the result.

Which exporter: torch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``). It needs no
package beyond torch and onnx, takes ``dynamic_axes`` by name (the course contract already names every
axis), keeps the inputs' dtypes (int32 ``timestep`` / ``input_ids``) and is the path that SD-1.5 UNets
have taken to TensorRT for years. torch 2.9+ marks it deprecated in favour of the ``torch.export``-based
exporter (``dynamo=True``), which needs the ``onnxscript`` package and builds a different graph; if a
later torch drops the TorchScript exporter, :func:`_torch_export` is the one place to change.

Files written for ``out/unet.onnx``::

    out/unet.onnx        the graph (and the weights, when the model stays under the threshold)
    out/unet.onnx.data   all weights in one file, when external data is used (models over 2 GB)
    out/unet.onnx.json   sidecar: names, shapes, dtypes, opset, versions, sha256 of unet.onnx, run id

Everything is written into a hidden temporary folder next to the target and moved into place with
``os.replace`` only when complete, so an interrupted export leaves nothing under the final names.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import torch

from course_lib.files import naming_target, sha256_file, temp_dir_beside
from course_lib.onnx.external_data import (EXTERNAL_DATA_THRESHOLD_BYTES, check_external_files,  # noqa: F401
                                           external_tensors, gather_weights, weight_bytes)

# protobuf cannot serialise a message over 2 GiB; stay a little below it (the graph itself needs room)


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape (ints, or axis names where dynamic) and numpy dtype name of one ONNX input/output."""
    name: str
    shape: tuple
    dtype: str


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote. Usable as a path (``os.fspath(result)`` is the .onnx file)."""
    path: Path
    data_path: Path | None       # the external-data file, or None when the weights are inside the .onnx
    sidecar_path: Path
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    opset: int
    seconds: float
    sha256: str

    @property
    def external_data(self) -> bool:
        return self.data_path is not None

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        size = self.path.stat().st_size + (self.data_path.stat().st_size if self.data_path else 0)
        extra = f" + {self.data_path.name}" if self.data_path else ""
        return f"{self.path}{extra}: {size / 2**20:.1f} MiB, opset {self.opset}, {self.seconds:.1f} s"


def dynamic_axes_from_names(axes, dynamic: Iterable[str]) -> dict[str, dict[int, str]]:
    """Chapter 1: torch's ``dynamic_axes`` from named axes, e.g. ``{"B"}`` or ``{"B", "H", "W", "h", "w"}``.

    ``axes`` is ``{tensor_name: ("B", "C", "h", "w"), ...}`` or an iterable of specs with ``.name`` and
    ``.axes`` (``course_lib.cnsd.contract.TensorSpec``). An axis ``"w/2"`` is dynamic when ``"w"`` is.
    Returns ``{tensor_name: {dim_index: axis_name}}``; raises ValueError for a name that matches no axis.
    """
    table = dict(axes) if isinstance(axes, Mapping) else {spec.name: tuple(spec.axes) for spec in axes}
    wanted = set(dynamic)
    result: dict[str, dict[int, str]] = {}
    used: set[str] = set()
    for name, names in table.items():
        dims = {i: axis for i, axis in enumerate(names) if axis.split("/")[0] in wanted}
        used.update(axis.split("/")[0] for axis in dims.values())
        if dims:
            result[name] = dims
    if wanted - used:
        raise ValueError(f"dynamic axes {sorted(wanted - used)} name no axis of {sorted(table)}")
    return result


def export_onnx(module: torch.nn.Module, example_inputs, path, *, output_names: Sequence[str],
                input_names: Sequence[str] | None = None, opset: int = 18,
                dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
                external_data: bool | str = "auto",
                external_data_threshold_bytes: int = EXTERNAL_DATA_THRESHOLD_BYTES,
                do_constant_folding: bool = True, progress: bool = True, run_id: str | None = None) -> ExportResult:
    """Chapter 1: export ``module`` to ``path`` (e.g. ``out/unet.onnx``) with exact input/output names.

    Args:
        module: the torch module; its forward takes the inputs positionally, in order.
        example_inputs: ``{name: tensor}`` in input order, or a tuple of tensors plus ``input_names``.
            Their shapes are the ONNX shapes (static unless named in ``dynamic_axes``), their dtypes
            the ONNX dtypes (an int32 tensor gives an int32 input).
        path: the ``.onnx`` file to write; missing parent folders are created.
        output_names: one name per output of ``forward``, in order.
        opset: ONNX opset (the course uses 18).
        dynamic_axes: ``{tensor_name: {dim: axis_name}}``, see :func:`dynamic_axes_from_names`;
            None exports static shapes (what the course's TensorRT engines use).
        external_data: True, False, or "auto": weights go to ``<path>.data`` when they exceed
            ``external_data_threshold_bytes`` (default just under protobuf's 2 GiB limit).
        do_constant_folding: let torch fold constant subgraphs (smaller graphs for TensorRT).
        progress: show a tqdm bar with the export's stages.
        run_id: recorded in the sidecar; the models of one folder share one (see
            :mod:`course_lib.onnx.folder`). Default: a fresh one for this file.
    Returns:
        :class:`ExportResult` (paths, tensor infos, sha256); the sidecar ``<path>.json`` holds the same.
    Raises:
        ValueError (bad argument or target), PermissionError (folder not writable), OSError naming
        ``path`` (e.g. a full disk; nothing is left under the final names).
    """
    from course_lib.progress import tqdm                          # a widget in JupyterLab, text elsewhere

    if not isinstance(module, torch.nn.Module):
        raise ValueError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    args, input_names = _inputs_and_names(example_inputs, input_names)
    output_names = list(output_names)
    if not output_names or len(set(output_names)) != len(output_names):
        raise ValueError(f"output_names {output_names}: expected one or more unique names")
    if external_data not in (True, False, "auto"):
        raise ValueError(f"external_data={external_data!r}: expected True, False or 'auto'")
    unknown = set(dynamic_axes or {}) - set(input_names) - set(output_names)
    if unknown:
        raise ValueError(f"dynamic_axes names {sorted(unknown)} are neither inputs nor outputs")
    path = _check_target(Path(path))
    if run_id is None:
        from course_lib.onnx.folder import new_run_id
        run_id = new_run_id()

    start = time.perf_counter()
    tmp = _make_temp_dir(path)
    bar = tqdm(total=3, desc=f"export {path.name}", disable=not progress, leave=True)
    try:
        bar.set_postfix_str("tracing + converting")
        tmp_onnx = tmp / path.name
        _torch_export(module, args, tmp_onnx, input_names, output_names, opset, dynamic_axes,
                      do_constant_folding)
        bar.update()

        # torch writes one file per weight next to a >2 GB model: gather everything into <name>.data
        bar.set_postfix_str("weights")
        model = onnx.load(str(tmp_onnx), load_external_data=False)
        _check_names(model, input_names, output_names)
        torch_external = any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)
        weights = weight_bytes(model, tmp)
        use_external = external_data is True or (external_data == "auto" and weights > external_data_threshold_bytes)
        if not use_external and torch_external:
            raise ValueError(f"{path.name}: {weights / 2**30:.2f} GiB of weights exceed protobuf's 2 GiB limit; "
                             "use external_data=True or 'auto'")
        data_name = path.name + ".data"
        if use_external:
            use_external = gather_weights(tmp_onnx, data_name)   # False when every tensor is < 1 KiB
        bar.update()

        bar.set_postfix_str("checking")
        onnx.checker.check_model(str(tmp_onnx))                   # by path: works with external data
        model = onnx.load(str(tmp_onnx), load_external_data=False)
        result = ExportResult(
            path=path, data_path=path.with_name(data_name) if use_external else None,
            sidecar_path=path.with_name(path.name + ".json"),
            inputs=tuple(_tensor_info(v) for v in model.graph.input),
            outputs=tuple(_tensor_info(v) for v in model.graph.output),
            opset=opset, seconds=round(time.perf_counter() - start, 3), sha256=sha256_file(tmp_onnx))
        tmp_json = tmp / result.sidecar_path.name
        tmp_json.write_text(json.dumps(_sidecar(result, dynamic_axes, run_id), indent=2) + "\n")
        _move_into_place(tmp, path, data_name if use_external else None, result.sidecar_path.name)
        bar.update()
        return result
    except OSError as e:                           # a full disk names unet.onnx, not the hidden folder
        raise naming_target(e, path, tmp) from None
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)


def load_onnx_checked(path, load_external_data: bool = True) -> onnx.ModelProto:
    """Chapter 1: open an exported ONNX model after ``onnx.checker`` (by path, so >2 GB models work).

    Also checks every tensor that keeps its data outside the .onnx (initializers, and tensors in node
    attributes such as Constant's): its file must be a plain relative path inside the model's folder,
    exist, and be long enough (a truncated ``.data`` file would otherwise only fail at inference).
    ``load_external_data=False`` returns the graph without the weights (cheap for the 3.4 GB UNet).
    Raises FileNotFoundError or ValueError (one line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError, ...  # noqa: BLE001
        raise ValueError(f"{path} is not a valid ONNX model (truncated or corrupt?): {_first_line(e)}") from None
    check_external_files(model, path)
    try:
        onnx.checker.check_model(str(path))
    except Exception as e:  # onnx ValidationError  # noqa: BLE001
        raise ValueError(f"{path} is not a valid ONNX model: {_first_line(e)}") from None
    if load_external_data:
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    return model


# --- helpers --------------------------------------------------------------------------------------------

def _inputs_and_names(example_inputs, input_names) -> tuple[tuple[torch.Tensor, ...], list[str]]:
    if isinstance(example_inputs, Mapping):
        names, args = list(example_inputs), tuple(example_inputs.values())
        if input_names is not None and list(input_names) != names:
            raise ValueError(f"input_names {list(input_names)} differ from the example_inputs keys {names}")
    elif isinstance(example_inputs, (tuple, list)):
        if input_names is None or len(input_names) != len(example_inputs):
            raise ValueError(f"{len(example_inputs)} example inputs given as a tuple: expected as many input_names, "
                             f"got {None if input_names is None else list(input_names)}")
        names, args = list(input_names), tuple(example_inputs)
    else:
        raise ValueError(f"example_inputs: expected a dict name -> tensor or a tuple of tensors, "
                         f"got {type(example_inputs).__name__}")
    for name, value in zip(names, args):
        if not isinstance(name, str) or not name:
            raise ValueError(f"input name {name!r}: expected a non-empty string")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"example input {name!r}: expected a torch.Tensor, got {type(value).__name__}")
    if len(set(names)) != len(names):
        raise ValueError(f"input names {names}: expected unique names")
    return args, names


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _check_target(path: Path) -> Path:
    if path.suffix != ".onnx":
        raise ValueError(f"{path}: expected a file name ending in .onnx")
    if path.is_dir():
        raise ValueError(f"{path} is a folder: expected the path of the .onnx file to write")
    for parent in [path.parent, *path.parent.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{parent} is a file: expected a folder to hold {path.name}")
            break
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"cannot create folder {path.parent}: {e.strerror}") from None
    return path


def _make_temp_dir(path: Path) -> Path:
    try:
        return temp_dir_beside(path)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise PermissionError(f"folder {path.parent} is not writable: {e.strerror}") from None
        raise


def _torch_export(module, args, f, input_names, output_names, opset, dynamic_axes, do_constant_folding):
    major_minor = tuple(int(p) for p in torch.__version__.split(".")[:2])
    extra = {"dynamo": False} if major_minor >= (2, 5) else {}      # torch < 2.5 has only this exporter
    dynamic_axes = {k: dict(v) for k, v in (dynamic_axes or {}).items()}
    with warnings.catch_warnings(), torch.no_grad():                 # no autograd graph while tracing
        # torch's deprecation notices are about this choice of exporter (see the module docstring)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        torch.onnx.export(module, args, str(f), input_names=input_names, output_names=output_names,
                          opset_version=opset, dynamic_axes=dynamic_axes or None,
                          do_constant_folding=do_constant_folding, **extra)


def _check_names(model: onnx.ModelProto, input_names, output_names) -> None:
    got_in = [v.name for v in model.graph.input]
    got_out = [v.name for v in model.graph.output]
    if got_out != list(output_names):
        raise ValueError(f"the module returned {len(got_out)} outputs {got_out}; expected {list(output_names)}")
    if got_in != list(input_names):   # torch drops an input that forward never uses
        raise ValueError(f"the ONNX inputs are {got_in}; expected {list(input_names)} (is an input unused?)")


def _tensor_info(value: onnx.ValueInfoProto) -> TensorInfo:
    t = value.type.tensor_type
    shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)
    return TensorInfo(value.name, shape, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name)


def _sidecar(result: ExportResult, dynamic_axes, run_id: str) -> dict:
    return {
        "run_id": run_id,
        "onnx": result.path.name,
        "external_data": result.data_path.name if result.data_path else None,
        "sha256": result.sha256,
        "inputs": [asdict(t) for t in result.inputs],
        "outputs": [asdict(t) for t in result.outputs],
        "dynamic_axes": {k: {str(d): n for d, n in v.items()} for k, v in (dynamic_axes or {}).items()},
        "opset": result.opset,
        "exporter": "torch.onnx.export(dynamo=False)",
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__},
        "seconds": result.seconds,
    }


def _move_into_place(tmp: Path, path: Path, data_name: str | None, sidecar_name: str) -> None:
    """Remove the old trio first, then move data, graph, sidecar: the .onnx never points at stale data."""
    old = [path.with_name(n) for n in (sidecar_name, path.name, path.name + ".data")]
    for stale in old:
        stale.unlink(missing_ok=True)
    if data_name:
        os.replace(tmp / data_name, path.with_name(data_name))
    os.replace(tmp / path.name, path)
    os.replace(tmp / sidecar_name, path.with_name(sidecar_name))
