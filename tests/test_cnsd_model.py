"""The four CNSD sub-models: contract shapes, real (non-zero, input-dependent) outputs, sizes, bad input."""
import pytest
import torch

from course_lib.cnsd import CONTROL_NAMES, CNSD, build_cnsd, contracts, example_inputs, get_config
from course_lib.cnsd.attention import CrossAttention, set_attention_backend

H, W = 64, 128  # non-square on purpose


@pytest.fixture(scope="module")
def tiny():
    return build_cnsd(get_config("tiny"), seed=0)


@pytest.fixture(scope="module")
def sd15_meta():
    with torch.device("meta"):
        return CNSD(get_config("sd15"))


def run(model, name, feed):
    with torch.no_grad():
        return model.positional(name)(*feed.values())


def test_outputs_follow_the_contract(tiny):
    for name, contract in contracts(tiny.config, 2, H, W).items():
        outs = run(tiny, name, example_inputs(contract, seed=1))
        assert [tuple(o.shape) for o in outs] == [s.shape for s in contract.outputs], name
        assert all(o.dtype == torch.float32 and torch.isfinite(o).all() for o in outs), name


def test_random_weights_give_nonzero_input_dependent_outputs(tiny):
    for name, contract in contracts(tiny.config, 1, H, W).items():
        a = run(tiny, name, example_inputs(contract, seed=1))
        b = run(tiny, name, example_inputs(contract, seed=2))
        for oa, ob, spec in zip(a, b, contract.outputs):
            assert 0.05 < oa.std().item() < 20, f"{name}.{spec.name} std {oa.std().item():.3g}"
            assert (oa - ob).abs().max() > 1e-3, f"{name}.{spec.name} ignores its inputs"


def test_original_init_outputs_exactly_zero():
    """The trap chapter 1 warns about: zero_module'd layers make every parity check pass trivially."""
    model = build_cnsd(get_config("tiny"), seed=None)
    c = contracts(model.config, 1, H, W)
    controls = run(model, "controlnet", example_inputs(c["controlnet"]))
    assert all(torch.count_nonzero(t) == 0 for t in controls)
    latent = run(model, "unet", example_inputs(c["unet"]))[0]
    assert torch.count_nonzero(latent) == 0


def test_seeds_are_deterministic_and_distinct():
    a, b, c = (build_cnsd(get_config("tiny"), seed=s).state_dict() for s in (3, 3, 4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["unet.out.2.weight"], c["unet.out.2.weight"])
    assert all(torch.count_nonzero(v) > 0 for k, v in a.items() if "position_ids" not in k)


def test_controls_are_used_and_not_mutated(tiny):
    c = contracts(tiny.config, 1, H, W)
    feed = example_inputs(c["unet"], seed=5)
    controls = [feed[n] for n in CONTROL_NAMES]
    before = [t.clone() for t in controls]
    with torch.no_grad():
        with_controls = tiny.unet(feed["x_noisy"], feed["timestep"], feed["context"], controls)
        without = tiny.unet(feed["x_noisy"], feed["timestep"], feed["context"], None)
    assert len(controls) == 13 and all(torch.equal(x, y) for x, y in zip(controls, before))
    assert (with_controls - without).abs().max() > 1e-3


def test_sdpa_backend_matches_math(tiny):
    feed = example_inputs(contracts(tiny.config, 1, H, W)["controlnet"], seed=7)
    reference = run(tiny, "controlnet", feed)
    try:
        assert set_attention_backend(tiny, "sdpa") == 2 * 7 + 2 * 16
        fast = run(tiny, "controlnet", feed)
    finally:
        set_attention_backend(tiny, "math")
    assert all(torch.allclose(r, f, rtol=1e-4, atol=1e-5) for r, f in zip(reference, fast))


def test_sd15_sizes(sd15_meta):
    counts = sd15_meta.parameter_counts()
    assert round(counts["unet"] / 1e6, 1) == 859.5
    assert round(counts["controlnet"] / 1e6, 1) == 361.3
    assert round(counts["decoder"] / 1e6, 1) == 49.5
    assert round(counts["clip"] / 1e6, 1) == 123.1
    attn = [m for m in sd15_meta.modules() if isinstance(m, CrossAttention)]
    assert sum(m.is_self_attention for m in attn) == 23 and sum(not m.is_self_attention for m in attn) == 23


def test_cross_attention_is_known_by_construction_not_by_size(tiny):
    # in tiny, level 1 has 64 channels == context_dim 64: a size test would call attn2 self-attention
    block = tiny.unet.input_blocks[4][1].transformer_blocks[0]
    assert block.attn2.to_k.in_features == block.attn2.to_q.in_features == 64
    assert block.attn1.is_self_attention and not block.attn2.is_self_attention


@pytest.mark.parametrize("name, bad, message", [
    ("controlnet", {"hint": torch.zeros(1, 3, 32, 32)}, "hint"),
    ("clip", {"input_ids": torch.zeros(1, 77)}, "input_ids"),
    ("decoder", {"latent": torch.zeros(1, 3, 8, 16)}, "latent"),
])
def test_bad_inputs_name_the_tensor(tiny, name, bad, message):
    feed = example_inputs(contracts(tiny.config, 1, H, W)[name])
    feed.update(bad)
    with pytest.raises(ValueError, match=message):
        run(tiny, name, feed)


def test_wrong_number_of_controls(tiny):
    feed = example_inputs(contracts(tiny.config, 1, H, W)["unet"])
    with pytest.raises(ValueError, match="13"):
        tiny.unet(feed["x_noisy"], feed["timestep"], feed["context"], [feed["control0"]] * 12)


def test_bad_image_size_and_preset():
    with pytest.raises(ValueError, match="multiples of 64"):
        contracts(get_config("tiny"), 1, 250, 384)
    with pytest.raises(ValueError, match="unknown config"):
        get_config("sd21")
