"""course_lib.cnsd.fusion (chapter 4): fusing q/k/v after loading, keys, the pitfall, graph MatMul counts."""
from __future__ import annotations

import copy

import onnx
import pytest
import torch

from course_lib.cnsd import CNSD, build_cnsd, contracts, example_inputs, get_config, randomize_weights
from course_lib.cnsd.attention import CrossAttention, set_attention_backend
from course_lib.cnsd.checkpoint import checkpoint_state, load_checkpoint
from course_lib.cnsd.fusion import (
    FusedAttention, FusionReport, NaiveFusedAttention, attention_layer_counts, build_fused_in_init, fuse_qkv,
    time_attention, unfuse_qkv,
)
from course_lib.onnx.attention_census import count_attention_matmuls, expected_matmul_counts
from course_lib.onnx.export import export_onnx

TINY = get_config("tiny")


@pytest.fixture(scope="module")
def base():
    return build_cnsd(TINY, seed=0)


@pytest.fixture(scope="module")
def other():
    """Another set of weights: 'the checkpoint' (read only)."""
    return build_cnsd(TINY, seed=1)


@pytest.fixture(scope="module")
def other_weights(other):
    return other.state_dict()


@pytest.fixture
def model(base):
    return copy.deepcopy(base)


@torch.no_grad()
def outputs(cnsd, height=64, width=128):
    """ControlNet and UNet outputs on seeded example inputs (64x128: several tokens at every level)."""
    specs = contracts(TINY, 1, height, width)
    return {name: cnsd.positional(name)(*example_inputs(specs[name], seed=3).values())
            for name in ("controlnet", "unet")}


def assert_same(a, b, exact=False):
    for name in a:
        for x, y in zip(a[name], b[name]):
            if exact:
                assert torch.equal(x, y), name
            else:
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


def attention_layers(cnsd):
    return {path: m for path, m in cnsd.named_modules() if isinstance(m, CrossAttention)}


def test_fuse_then_unfuse_round_trip(model):
    before_out, before_state = outputs(model), {k: v.clone() for k, v in model.state_dict().items()}
    originals = attention_layers(model)

    report = fuse_qkv(model)
    assert report == FusionReport(23, 23, 0) and str(report) == "23 self-attention + 23 cross-attention layers"
    layers = attention_layers(model)
    assert all(type(m) is FusedAttention for m in layers.values())
    assert all(hasattr(m, "to_qkv") != hasattr(m, "to_kv") for m in layers.values())
    assert_same(before_out, outputs(model))                              # fp32 rounding at most
    assert list(model.state_dict()) == list(before_state)                # to_q/to_k/to_v keys, same order
    assert all(torch.equal(v, before_state[k]) for k, v in model.state_dict().items())

    assert fuse_qkv(model) == FusionReport(0, 0, 46)                     # already fused: nothing new
    assert unfuse_qkv(model) == FusionReport(23, 23, 0)
    restored = attention_layers(model)
    assert all(restored[p] is originals[p] and type(restored[p]) is CrossAttention for p in originals)
    assert_same(before_out, outputs(model), exact=True)
    assert all(torch.equal(v, before_state[k]) for k, v in model.state_dict().items())
    assert unfuse_qkv(model) == FusionReport(0, 0, 46)


def test_backend_and_mode_carry_over_and_a_copy_unfuses_on_its_own(model):
    fuse_qkv(model)
    assert set_attention_backend(model, "sdpa") == 46
    twin = copy.deepcopy(model)
    unfuse_qkv(model)
    assert {m.backend for m in attention_layers(model).values()} == {"sdpa"}
    assert sum(isinstance(m, FusedAttention) for m in twin.modules()) == 46       # the copy is still fused
    assert_same(outputs(model), outputs(twin))
    unfuse_qkv(twin)
    twin_q = twin.unet.middle_block[1].transformer_blocks[0].attn1.to_q.weight
    assert twin_q is not model.unet.middle_block[1].transformer_blocks[0].attn1.to_q.weight


def test_fused_weight_is_the_concatenation_and_not_saved(model):
    fuse_qkv(model)
    attn1 = model.unet.middle_block[1].transformer_blocks[0].attn1
    attn2 = model.unet.middle_block[1].transformer_blocks[0].attn2
    assert torch.equal(attn1.to_qkv.weight, torch.cat([attn1.to_q.weight, attn1.to_k.weight, attn1.to_v.weight]))
    assert torch.equal(attn2.to_kv.weight, torch.cat([attn2.to_k.weight, attn2.to_v.weight]))
    assert not any("to_qkv" in k or "to_kv" in k for k in model.state_dict())
    assert "not saved" in repr(attn1.to_qkv)


def test_self_or_cross_is_decided_by_the_layer_not_by_sizes(model):
    """tiny: at level 1 the cross-attention has context_dim == query_dim == 64; it must still fuse k, v only."""
    same_size = {p: m for p, m in attention_layers(model).items()
                 if not m.is_self_attention and m.to_k.in_features == m.to_q.in_features}
    assert len(same_size) == 7                                  # 2 ControlNet + 2 + 3 UNet layers at 64 channels
    x = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = {p: m(x, context) for p, m in same_size.items()}
    fuse_qkv(model)
    for path in same_size:
        layer = model.get_submodule(path)
        assert hasattr(layer, "to_kv") and not hasattr(layer, "to_qkv"), path
        with torch.no_grad():
            torch.testing.assert_close(layer(x, context), want[path], rtol=1e-5, atol=1e-6)


def test_strict_load_into_a_fused_model_refreshes_the_fused_weights(model, other, other_weights):
    fuse_qkv(model)
    model.load_state_dict(other_weights, strict=True)                     # same keys: strict works
    attn1 = model.controlnet.input_blocks[1][1].transformer_blocks[0].attn1
    prefix = "controlnet.input_blocks.1.1.transformer_blocks.0.attn1"
    loaded = [other_weights[f"{prefix}.{n}.weight"] for n in ("to_q", "to_k", "to_v")]
    assert torch.equal(attn1.to_qkv.weight, torch.cat(loaded))
    assert_same(outputs(other), outputs(model))


def test_load_checkpoint_into_a_fused_model(model, other, other_weights, tmp_path):
    path = tmp_path / "tiny_ckpt.pth"
    torch.save(checkpoint_state(other), path)
    fuse_qkv(model)
    report = load_checkpoint(path, model)
    assert report.loaded["controlnet"] == sum(k.startswith("controlnet.") for k in other_weights)
    assert_same(outputs(other), outputs(model))


def test_fuse_then_load_equals_load_then_fuse(base, other_weights):
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    fuse_qkv(a)
    a.load_state_dict(other_weights)
    b.load_state_dict(other_weights)
    fuse_qkv(b)
    fused_a = {p: m.fused.weight for p, m in attention_layers(a).items()}
    assert all(torch.equal(w, attention_layers(b)[p].fused.weight) for p, w in fused_a.items())
    assert_same(outputs(a), outputs(b), exact=True)


def test_in_place_weight_change_is_picked_up(model, base):
    fuse_qkv(model)
    randomize_weights(model, seed=5)                     # p.normal_() on every parameter, after fusing
    expected = randomize_weights(copy.deepcopy(base), seed=5)
    assert_same(outputs(expected), outputs(model))


def test_fusing_in_init_holds_random_weights_after_loading(other, other_weights):
    naive = build_fused_in_init(TINY, seed=0)
    assert sum(isinstance(m, NaiveFusedAttention) for m in naive.modules()) == 46
    naive.load_state_dict(other_weights, strict=True)     # the keys are unchanged, so loading "works"...
    attn1 = naive.unet.middle_block[1].transformer_blocks[0].attn1
    assert not torch.equal(attn1.to_qkv.weight, torch.cat([attn1.to_q.weight, attn1.to_k.weight, attn1.to_v.weight]))
    got, want = outputs(naive), outputs(other)        # ...but forward uses the stale random copy
    assert torch.equal(got["controlnet"][0], want["controlnet"][0])          # control0: before any attention
    assert not torch.allclose(got["controlnet"][-1], want["controlnet"][-1], rtol=1e-3, atol=1e-5)
    assert not torch.allclose(got["unet"][0], want["unet"][0], rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="NaiveFusedAttention: expected a CrossAttention"):
        fuse_qkv(naive)


def test_sd15_counts_on_meta():
    config = get_config("sd15")
    with torch.device("meta"):
        cnsd = CNSD(config)
    keys = list(cnsd.state_dict())
    assert fuse_qkv(cnsd) == FusionReport(23, 23)
    assert list(cnsd.state_dict()) == keys
    assert attention_layer_counts(config, "controlnet") == (7, 7) and attention_layer_counts(config, "unet") == (16, 16)
    assert expected_matmul_counts(config, "unet", fused=False) == {
        "self_layers": 16, "cross_layers": 16, "self_projection": 48, "cross_projection": 48,
        "attention": 64, "output": 32, "total": 192}
    assert expected_matmul_counts(config, "unet", fused=True)["total"] == 16 + 32 + 64 + 32
    with pytest.raises(ValueError, match="'decoder': expected 'controlnet' or 'unet'"):
        expected_matmul_counts(config, "decoder", fused=True)


def test_time_attention_leaves_the_model_as_it_came(model):
    timing = time_attention(model, "controlnet", height=64, width=64, repeats=2, warmup=0)
    assert timing.unfused_ms > 0 and timing.fused_ms > 0 and "controlnet 64x64" in str(timing)
    assert len(timing.unfused_samples) == len(timing.fused_samples) == 2
    assert not any(isinstance(m, FusedAttention) for m in model.modules())
    fuse_qkv(model)
    time_attention(model, "controlnet", height=64, width=64, repeats=1, warmup=0)
    assert sum(isinstance(m, FusedAttention) for m in model.modules()) == 46


# --- the exported graph -------------------------------------------------------------------------------------

def export_controlnet(tmp_path_factory, seed0: CNSD, fused: bool):
    """Tiny ControlNet (seed 0) at 64x64, exported once per test session (test_hw3 uses the same files)."""
    path = tmp_path_factory.getbasetemp() / "fusion_onnx" / f"controlnet_{'fused' if fused else 'unfused'}.onnx"
    if not path.is_file():
        cnsd = copy.deepcopy(seed0)                         # build_cnsd(TINY, seed=0)
        if fused:
            fuse_qkv(cnsd)
        spec = contracts(TINY, 1, 64, 64)["controlnet"]
        export_onnx(cnsd.positional("controlnet"), example_inputs(spec, 0), path, output_names=spec.output_names,
                    progress=False)
    return path


@pytest.fixture(scope="module")
def graphs(tmp_path_factory, base):
    return {fused: onnx.load(str(export_controlnet(tmp_path_factory, base, fused))) for fused in (False, True)}


@pytest.mark.slow
def test_exported_graphs_have_the_predicted_matmul_counts(graphs):
    unfused, fused = count_attention_matmuls(graphs[False]), count_attention_matmuls(graphs[True])
    assert unfused == expected_matmul_counts(TINY, "controlnet", fused=False)
    assert fused == expected_matmul_counts(TINY, "controlnet", fused=True)
    assert (unfused["self_projection"], fused["self_projection"]) == (21, 7)
    assert (unfused["cross_projection"], fused["cross_projection"]) == (21, 14)


@pytest.mark.slow
def test_fused_weights_are_initializers_not_copies(graphs):
    """The fused weight is one ordinary initializer: same bytes of weights as unfused, nothing embedded."""
    def weight_bytes(g):
        return sum(onnx.numpy_helper.to_array(t).nbytes for t in g.initializer)

    assert weight_bytes(graphs[True].graph) == weight_bytes(graphs[False].graph)
    initializers = {t.name for t in graphs[True].graph.initializer}
    qkv = [n for n in graphs[True].graph.node if n.op_type == "MatMul" and "/attn1/to_qkv/" in n.name]
    assert len(qkv) == 7 and all(n.input[1] in initializers for n in qkv)
    assert not [n for n in graphs[True].graph.node if "/attn1/to_q/" in n.name]


def test_count_attention_matmuls_needs_attention_layers(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 2])
    graph = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "x"], ["y"], name="/mm/MatMul")], "g", [x],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 2])])
    path = tmp_path / "plain.onnx"
    onnx.save(onnx.helper.make_model(graph), str(path))
    with pytest.raises(ValueError, match="no attention layers"):
        count_attention_matmuls(path)
