"""Optimization profiles: which input shapes a TensorRT plan accepts. Introduced in chapter 2.

A profile gives every input of a model three shapes, ``(min, opt, max)``. TensorRT builds kernels
that work for any shape in that box and tunes them for ``opt``. The course builds *static* plans
(min = opt = max, the fastest); chapter 2 also shows *dynamic* ones (a batch range, several image
sizes). Everything here is plain Python on ``{input_name: (min, opt, max)}`` dictionaries, so it runs
without TensorRT.

The dimension names are the contract's (``course_lib.cnsd.contract``): ``B`` batch, ``H``/``W`` image
height/width, ``h``/``w`` latent height/width (``H/8``, ``W/8``), ``h/2`` … ``w/8`` the smaller
control residuals, and fixed ones such as ``C`` (channels) and ``T`` (77 tokens).
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # {input name: (min, opt, max)}
Dims = tuple[int | str, ...]                       # a fixed size, or a dynamic axis name ("?" if unnamed)

DYNAMIC_AXES = ("B", "H", "W", "h", "w")           # the axes a dynamic profile may vary
_AXIS = re.compile(r"^([A-Za-z_]+)(?:/(\d+))?$")   # "h", "h/2", "w/8"


def onnx_input_dims(onnx_path: str | Path) -> dict[str, Dims]:
    """Chapter 2: the inputs of an ONNX file as ``{name: dims}``, reading the graph only.

    Fixed dimensions are ints, dynamic ones their ``dim_param`` name (``"B"``, ``"h/2"``) or ``"?"``
    when unnamed. External weight files are not opened (``load_external_data=False``).
    """
    import onnx

    path = Path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file {path} not found: export it first (chapter 1)")
    model = onnx.load(str(path), load_external_data=False)
    weights = {init.name for init in model.graph.initializer}
    dims: dict[str, Dims] = {}
    for value in model.graph.input:
        if value.name in weights:        # old exporters list weights as graph inputs too
            continue
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            raise ValueError(f"ONNX input {value.name!r} of {path} has no shape: export it with a shape")
        dims[value.name] = tuple(
            int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
            for d in tensor_type.shape.dim
        )
    return dims


def axis_sizes(batch: int, height: int, width: int) -> dict[str, int]:
    """Chapter 2: the sizes of the named axes for one batch and one image size (pixels, H x W)."""
    if batch < 1:
        raise ValueError(f"batch {batch}: expected a positive integer")
    if height <= 0 or width <= 0 or height % 64 or width % 64:
        raise ValueError(f"image size {height}x{width}: expected positive multiples of 64 (e.g. 256x384)")
    return {"B": batch, "H": height, "W": width, "h": height // 8, "w": width // 8}


def axis_size(axis: str, sizes: Mapping[str, int]) -> int | None:
    """The size of one named axis (``"h/2"`` is half the latent height, rounded up); None if unknown."""
    match = _AXIS.match(axis)
    if not match or match.group(1) not in sizes:
        return None
    size, divisor = sizes[match.group(1)], int(match.group(2) or 1)
    if divisor < 1:
        return None
    return -(-size // divisor)  # ceil, like the stride-2 convolutions


def shapes_at(inputs: Mapping[str, Dims], batch: int = 1, height: int = 256, width: int = 384) -> dict[str, Shape]:
    """Chapter 2: concrete input shapes at one batch and image size, e.g. for a static profile."""
    sizes = axis_sizes(batch, height, width)
    return {name: _resolve(name, dims, sizes) for name, dims in inputs.items()}


def static_profile(shapes: Mapping[str, Sequence[int]], inputs: Mapping[str, Dims] | None = None) -> Profile:
    """Chapter 2: the course's static profile, min = opt = max = the given shape of each input.

    ``inputs`` (from :func:`onnx_input_dims`) lets the shapes be checked against the model first.
    """
    profile = {name: (tuple(shape),) * 3 for name, shape in shapes.items()}
    check_profile(profile, inputs)
    return profile  # type: ignore[return-value]


def dynamic_profile(inputs: Mapping[str, Dims], min_size: tuple[int, int, int] = (1, 256, 256),
                    opt_size: tuple[int, int, int] = (1, 256, 384),
                    max_size: tuple[int, int, int] = (4, 512, 512)) -> Profile:
    """Chapter 2: a dynamic profile over batch and image size.

    Each size is ``(batch, height, width)`` in pixels, heights and widths multiples of 64, and
    ``min_size <= opt_size <= max_size`` component-wise. Named axes follow (``h`` = H/8, ``h/2`` …);
    fixed dimensions stay as they are. ``inputs`` comes from :func:`onnx_input_dims` or
    :func:`dims_from_contract`.
    """
    for what, low, high in (("min", min_size, opt_size), ("opt", opt_size, max_size)):
        if any(a > b for a, b in zip(low, high)):
            nxt = "opt" if what == "min" else "max"
            raise ValueError(f"{what}_size {tuple(low)} is larger than {nxt}_size {tuple(high)} "
                             f"somewhere: expected (batch, height, width) with min <= opt <= max")
    sizes = [axis_sizes(*s) for s in (min_size, opt_size, max_size)]
    profile = {name: tuple(_resolve(name, dims, s) for s in sizes) for name, dims in inputs.items()}
    check_profile(profile, inputs)  # type: ignore[arg-type]
    return profile  # type: ignore[return-value]


def dims_from_contract(contract, dynamic: Sequence[str] = DYNAMIC_AXES) -> dict[str, Dims]:
    """Chapter 2: a contract's inputs as dims, the ``dynamic`` axes by name and the others fixed.

    ``contract`` is a ``course_lib.cnsd.contract.ModelContract`` (anything with ``.inputs`` of
    ``TensorSpec(name, shape, dtype, axes)``).
    """
    out: dict[str, Dims] = {}
    for spec in contract.inputs:
        out[spec.name] = tuple(axis if _base(axis) in dynamic else size for axis, size in zip(spec.axes, spec.shape))
    return out


def check_profile(profile: Mapping[str, Sequence[Sequence[int]]], inputs: Mapping[str, Dims] | None = None) -> None:
    """Chapter 2: raise ValueError (naming the input) unless the profile is usable for the model.

    Checks: three shapes per input, same rank, positive ints, ``min <= opt <= max``; with ``inputs``:
    every name is a model input, every dynamic input has a profile, fixed dims match.
    """
    for name, shapes in profile.items():
        if len(shapes) != 3:
            raise ValueError(f"profile for input {name!r}: expected (min, opt, max), got {len(shapes)} shapes")
        mn, opt, mx = (tuple(s) for s in shapes)
        if not (len(mn) == len(opt) == len(mx)):
            raise ValueError(f"profile for input {name!r}: min/opt/max have different ranks {mn}, {opt}, {mx}")
        for shape in (mn, opt, mx):
            if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
                raise ValueError(f"profile for input {name!r}: shape {shape} must be positive integers")
        if any(a > b for a, b in zip(mn, opt)) or any(a > b for a, b in zip(opt, mx)):
            raise ValueError(f"profile for input {name!r}: expected min <= opt <= max, got {mn}, {opt}, {mx}")
    if inputs is None:
        return
    unknown = [n for n in profile if n not in inputs]
    if unknown:
        raise ValueError(f"profile names input {unknown[0]!r}, which the model does not have: "
                         f"its inputs are {', '.join(inputs)}")
    for name, dims in inputs.items():
        if name not in profile:
            if not all(isinstance(d, int) and d > 0 for d in dims):
                raise ValueError(f"input {name!r} has dynamic dims {tuple(dims)} but no profile: "
                                 f"give it (min, opt, max)")
            continue
        for shape in profile[name]:
            if len(shape) != len(dims):
                raise ValueError(f"profile for input {name!r}: shape {tuple(shape)} has rank {len(shape)}, "
                                 f"the model's input has rank {len(dims)} {tuple(dims)}")
            for i, (want, got) in enumerate(zip(dims, shape)):
                if isinstance(want, int) and want > 0 and want != got:
                    raise ValueError(f"profile for input {name!r}: dimension {i} is fixed at {want} in the "
                                     f"model, the profile says {got} (shape {tuple(shape)})")


def profile_table(profile: Mapping[str, Sequence[Sequence[int]]]) -> str:
    """Chapter 2: a profile as a small text table (one input a line)."""
    width = max((len(n) for n in profile), default=5)
    lines = [f"{'input':<{width}}  min / opt / max"]
    for name, (mn, opt, mx) in profile.items():
        same = tuple(mn) == tuple(opt) == tuple(mx)
        shapes = f"{tuple(mn)} (static)" if same else f"{tuple(mn)} / {tuple(opt)} / {tuple(mx)}"
        lines.append(f"{name:<{width}}  {shapes}")
    return "\n".join(lines)


def profile_to_json(profile: Mapping[str, Sequence[Sequence[int]]]) -> dict[str, list[list[int]]]:
    """A profile as JSON-friendly lists (for the plan's sidecar)."""
    return {name: [list(map(int, s)) for s in shapes] for name, shapes in profile.items()}


def profile_from_json(data: Mapping[str, Sequence[Sequence[int]]]) -> Profile:
    """The inverse of :func:`profile_to_json`."""
    return {name: tuple(tuple(int(d) for d in s) for s in shapes) for name, shapes in data.items()}  # type: ignore[misc]


def _base(axis: str) -> str | None:
    match = _AXIS.match(axis)
    return match.group(1) if match else None


def _resolve(name: str, dims: Dims, sizes: Mapping[str, int]) -> Shape:
    shape = []
    for i, dim in enumerate(dims):
        if isinstance(dim, int) and dim > 0:
            shape.append(dim)
            continue
        size = axis_size(dim, sizes) if isinstance(dim, str) else None
        if size is None:
            raise ValueError(f"input {name!r} dimension {i} is {dim!r}: expected a fixed size or one of the "
                             f"axes {', '.join(DYNAMIC_AXES)} (or h/N, w/N); give its shapes explicitly")
        shape.append(size)
    return tuple(shape)
