"""course_lib.homework.check_hw3 (chapter 4): homework 3's named checks pass a right fusion and name what is wrong in others."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from course_lib.cnsd import CNSD, build_cnsd, get_config
from course_lib.cnsd.attention import CrossAttention
from course_lib.cnsd.contract import contracts, example_inputs
from course_lib.cnsd.fusion import FusedAttention, FusedLinear, build_fused_in_init, fuse_qkv
from course_lib.onnx.export import export_onnx
from course_lib.homework.check_hw3 import HW3Result, check_hw3

TINY = get_config("tiny")
MODEL_CHECKS = ["state_dict_keys", "fused_layer_count", "fused_weights", "outputs"]


@pytest.fixture(scope="module")
def loaded():
    """The unfused model with 'the checkpoint' loaded (seed 1 weights)."""
    return build_cnsd(TINY, seed=1)


@pytest.fixture(scope="module")
def seed0():
    return build_cnsd(TINY, seed=0)


@pytest.fixture
def fused(loaded):
    model = copy.deepcopy(loaded)
    fuse_qkv(model)
    return model


def failed(result: HW3Result) -> set[str]:
    return {c.name for c in result.failed}


def test_a_right_fusion_passes_every_check(fused, loaded):
    result = check_hw3(fused)
    assert [c.name for c in result.checks] == MODEL_CHECKS and result.passed, str(result)
    assert result["fused_layer_count"].message == \
        "23/23 self-attention layers have to_qkv, 23/23 cross-attention layers have to_kv"
    assert check_hw3(fused, loaded).passed                      # with the reference given explicitly
    text = str(result)
    assert text.startswith("HW3 check of CNSD 'tiny': PASSED") and text.count("[PASS]") == 4
    with pytest.raises(KeyError, match="no check named 'speed'"):
        result["speed"]


def test_fusing_in_init_fails_the_weights_and_the_outputs(loaded):
    naive = build_fused_in_init(TINY, seed=0)
    naive.load_state_dict(loaded.state_dict())                 # strict, and it "works"
    for result in (check_hw3(naive), check_hw3(naive, loaded)):
        assert failed(result) == {"fused_weights", "outputs"}, str(result)
        assert "fused before the checkpoint was loaded" in result["fused_weights"].message
        assert "FAILED (2 of 4 checks)" in str(result)


def test_a_wrong_order_fails_exactly_the_weight_check(fused):
    """In the middle block a 64x64 image has one token: softmax over one key hides swapped q and k, the
    outputs stay equal, and only the weight check can see the wrong order."""
    attn1 = fused.unet.middle_block[1].transformer_blocks[0].attn1
    attn1.to_qkv.weight = torch.cat([attn1.to_k.weight, attn1.to_q.weight, attn1.to_v.weight]).detach()
    result = check_hw3(fused)
    assert failed(result) == {"fused_weights"}, str(result)
    assert "rows hold [to_k, to_q, to_v], expected [to_q, to_k, to_v]: wrong concatenation order" in \
        result["fused_weights"].message
    assert "1 of 46 fused weights are wrong, first: unet.middle_block.1.transformer_blocks.0.attn1.to_qkv" in \
        result["fused_weights"].message


def test_a_wrong_order_where_tokens_interact_also_fails_the_outputs(fused):
    attn2 = fused.controlnet.input_blocks[1][1].transformer_blocks[0].attn2
    attn2.to_kv.weight = torch.cat([attn2.to_v.weight, attn2.to_k.weight]).detach()
    assert failed(check_hw3(fused)) == {"fused_weights", "outputs"}


class SizeRuleAttention(CrossAttention):
    """A wrong homework: 'context_dim == query_dim means self-attention', so q, k, v all come from x."""

    def __init__(self, layer: CrossAttention):
        nn.Module.__init__(self)
        self.is_self_attention, self.backend = False, layer.backend
        self.heads, self.dim_head, self.scale = layer.heads, layer.dim_head, layer.scale
        self.to_q, self.to_k, self.to_v, self.to_out = layer.to_q, layer.to_k, layer.to_v, layer.to_out
        weight = torch.cat([layer.to_q.weight, layer.to_k.weight, layer.to_v.weight]).detach()
        self.to_qkv = FusedLinear(weight, ("to_q", "to_k", "to_v"))

    def project(self, x, context):
        return self.to_qkv(x).chunk(3, dim=-1)


def test_deciding_self_or_cross_by_sizes_fails_the_layer_count(fused):
    path = "controlnet.input_blocks.4.1.transformer_blocks.0.attn2"   # level 1: context_dim == query_dim == 64
    parent, _, name = path.rpartition(".")
    layer = fused.get_submodule(path)
    setattr(fused.get_submodule(parent), name, SizeRuleAttention(layer._original[0]))
    result = check_hw3(fused)
    assert "fused_layer_count" in failed(result) and "outputs" in failed(result), str(result)
    message = result["fused_layer_count"].message
    assert message.startswith("23/23 self-attention layers have to_qkv, 22/23 cross-attention layers have to_kv")
    assert f"cross-attention layer {path!r} needs to_kv" in message and "not by sizes" in message


def test_an_unfused_model_fails_the_count_and_weights_only(loaded):
    result = check_hw3(loaded)
    assert failed(result) == {"fused_layer_count", "fused_weights"}, str(result)
    assert "0/23 self-attention layers have to_qkv" in result["fused_layer_count"].message


def test_saving_the_fused_weight_changes_the_keys(fused, loaded):
    for m in fused.modules():
        if isinstance(m, FusedAttention):
            m.fused._non_persistent_buffers_set.discard("weight")   # a fused weight that is saved
    result = check_hw3(fused)
    assert result["state_dict_keys"].message.startswith("46 extra (e.g. 'controlnet.input_blocks.1.1.")
    assert failed(result) == {"state_dict_keys", "fused_weights", "outputs"}   # no reference from those keys
    assert "not run" in result["outputs"].message
    assert failed(check_hw3(fused, loaded)) == {"state_dict_keys"}


def test_bad_arguments(seed0):
    with pytest.raises(ValueError, match="needs the torch CNSD"):
        check_hw3("controlnet.onnx")
    with pytest.raises(ValueError, match="expected a CNSD"):
        check_hw3(nn.Linear(2, 2))
    with pytest.raises(FileNotFoundError):
        check_hw3("missing.onnx", seed0)


# --- ONNX files (shared with test_fusion.py within one session) -------------------------------------------

def export_controlnet(tmp_path_factory, seed0: CNSD, fused: bool):
    """Tiny ControlNet (seed 0) at 64x64, exported once per test session (as in test_fusion.py)."""
    path = tmp_path_factory.getbasetemp() / "fusion_onnx" / f"controlnet_{'fused' if fused else 'unfused'}.onnx"
    if not path.is_file():
        cnsd = copy.deepcopy(seed0)                         # build_cnsd(TINY, seed=0)
        if fused:
            fuse_qkv(cnsd)
        spec = contracts(TINY, 1, 64, 64)["controlnet"]
        export_onnx(cnsd.positional("controlnet"), example_inputs(spec, 0), path, output_names=spec.output_names,
                    progress=False)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("is_fused", [True, False])
def test_onnx_files(tmp_path_factory, seed0, loaded, is_fused):
    path = export_controlnet(tmp_path_factory, seed0, is_fused)
    result = check_hw3(path, seed0)
    assert [c.name for c in result.checks] == ["matmul_count", "onnx_outputs"]
    assert result["onnx_outputs"].passed, str(result)          # fused or not, the same function
    assert result["matmul_count"].passed is is_fused, str(result)
    if not is_fused:
        assert "self_projection 21 (expected 7)" in result["matmul_count"].message
    other = check_hw3(path, loaded)                              # not the weights that were exported
    assert not other["onnx_outputs"].passed
