"""Optimization profiles from ONNX inputs and from the CNSD contract (chapter 2), on CPU."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from course_lib.cnsd.config import get_config
from course_lib.cnsd.contract import contracts
from course_lib.trt.profiles import (
    axis_size, axis_sizes, check_profile, dims_from_contract, dynamic_profile, onnx_input_dims,
    profile_from_json, profile_table, profile_to_json, shapes_at, static_profile,
)


def _controlish_onnx(path, external=False):
    """x (B,4,h,w) + hint (B,3,H,W) -> y (B,4,h/2,w/2): named dynamic axes, fixed channels."""
    x = helper.make_tensor_value_info("x_noisy", TensorProto.FLOAT, ["B", 4, "h", "w"])
    hint = helper.make_tensor_value_info("hint", TensorProto.FLOAT, ["B", 3, "H", "W"])
    t = helper.make_tensor_value_info("timestep", TensorProto.INT32, ["B"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    weight = numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x_noisy", "w"], ["c"], strides=[2, 2]),
             helper.make_node("Identity", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x, hint, t], [y], initializer=[weight])
    graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 4, 1, 1]))  # old-style
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="weights.bin", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


def test_onnx_input_dims_reads_names_and_skips_weights(tmp_path):
    path = _controlish_onnx(tmp_path / "m.onnx", external=True)
    (tmp_path / "weights.bin").unlink()  # the graph alone is enough
    assert onnx_input_dims(path) == {"x_noisy": ("B", 4, "h", "w"), "hint": ("B", 3, "H", "W"), "timestep": ("B",)}
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        onnx_input_dims(tmp_path / "missing.onnx")


def test_axis_sizes_and_derived_axes():
    sizes = axis_sizes(2, 256, 384)
    assert sizes == {"B": 2, "H": 256, "W": 384, "h": 32, "w": 48}
    assert [axis_size(a, sizes) for a in ("h/2", "w/4", "h/8", "w/8", "C", "x/2")] == [16, 12, 4, 6, None, None]
    with pytest.raises(ValueError, match="multiples of 64"):
        axis_sizes(1, 250, 384)
    with pytest.raises(ValueError, match="batch 0"):
        axis_sizes(0, 256, 384)


def test_static_profile_from_onnx(tmp_path):
    dims = onnx_input_dims(_controlish_onnx(tmp_path / "m.onnx"))
    profile = static_profile(shapes_at(dims, 1, 256, 384), dims)
    assert profile["x_noisy"] == ((1, 4, 32, 48),) * 3
    assert profile["hint"] == ((1, 3, 256, 384),) * 3
    assert profile["timestep"] == ((1,),) * 3
    assert "(static)" in profile_table(profile)
    assert profile_from_json(profile_to_json(profile)) == profile


def test_dynamic_profile_ranges(tmp_path):
    dims = onnx_input_dims(_controlish_onnx(tmp_path / "m.onnx"))
    profile = dynamic_profile(dims, (1, 256, 256), (2, 256, 384), (4, 512, 512))
    assert profile["x_noisy"] == ((1, 4, 32, 32), (2, 4, 32, 48), (4, 4, 64, 64))
    assert profile["hint"] == ((1, 3, 256, 256), (2, 3, 256, 384), (4, 3, 512, 512))
    assert profile["timestep"] == ((1,), (2,), (4,))
    with pytest.raises(ValueError, match="min_size"):
        dynamic_profile(dims, (1, 512, 256), (1, 256, 384), (4, 512, 512))


def test_contract_dims_give_the_control_shapes():
    contract = contracts(get_config("tiny"))["unet"]
    dims = dims_from_contract(contract)
    assert dims["context"][1:] == (77, get_config("tiny").clip.hidden_size)  # T and C stay fixed
    static = static_profile(shapes_at(dims, 1, 256, 384))
    assert {n: s[0] for n, s in static.items()} == {t.name: t.shape for t in contract.inputs}
    big = contracts(get_config("tiny"), batch=2, height=512, width=512)["unet"]
    profile = dynamic_profile(dims, (1, 256, 256), (1, 256, 384), (2, 512, 512))
    assert {n: s[2] for n, s in profile.items()} == {t.name: t.shape for t in big.inputs}


def test_errors_name_the_tensor(tmp_path):
    dims = onnx_input_dims(_controlish_onnx(tmp_path / "m.onnx"))
    good = static_profile(shapes_at(dims))
    with pytest.raises(ValueError, match="'hint'.*fixed at 3"):
        check_profile({**good, "hint": ((1, 4, 256, 384),) * 3}, dims)
    with pytest.raises(ValueError, match="'latent'.*does not have"):
        check_profile({**good, "latent": ((1, 4, 32, 48),) * 3}, dims)
    with pytest.raises(ValueError, match="'timestep' has dynamic dims"):
        check_profile({k: v for k, v in good.items() if k != "timestep"}, dims)
    with pytest.raises(ValueError, match="'x_noisy'.*rank"):
        check_profile({**good, "x_noisy": ((1, 4, 32),) * 3}, dims)
    with pytest.raises(ValueError, match="'x_noisy'.*min <= opt <= max"):
        check_profile({"x_noisy": ((2, 4, 32, 48), (1, 4, 32, 48), (2, 4, 32, 48))})
    with pytest.raises(ValueError, match="'x_noisy'.*positive"):
        check_profile({"x_noisy": ((0, 4, 32, 48),) * 3})
    with pytest.raises(ValueError, match="'x_noisy' dimension 0 is 'batch'"):
        shapes_at({"x_noisy": ("batch", 4, "h", "w")})
