"""course_lib.precision.smoothquant (chapter 5): same function, narrower per-channel activation ranges."""
import copy

import pytest
import torch
from torch import nn

from course_lib.cnsd import build_cnsd, contracts, example_inputs, get_config
from course_lib.precision.smoothquant import (activation_channel_max, outlier_ratio, plot_channel_ranges,
                                    smooth_layernorm_linears, smooth_transformer_blocks, smoothing_scales)




@pytest.fixture(scope="module")
def controlnet():
    """The tiny ControlNet with three LayerNorm channels made 20x larger (the outliers of real SD models)."""
    torch.manual_seed(0)
    net = build_cnsd(get_config("tiny"), seed=0).positional("controlnet")
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight[:3] *= 20
    contract = contracts(get_config("tiny"), 1, 64, 64)["controlnet"]
    feeds = [{k: v.numpy() for k, v in example_inputs(contract, seed=s).items()} for s in range(2)]
    return net, feeds


def test_smoothing_keeps_the_function_and_shrinks_the_outliers(controlnet):
    net, feeds = controlnet
    before = activation_channel_max(net, feeds)
    smoothed = copy.deepcopy(net)
    scales = smooth_transformer_blocks(smoothed, before, alpha=0.5)
    assert len(scales) == 7 * 3                                   # 7 blocks x (attn1, attn2, ff)
    args = [torch.as_tensor(v) for v in feeds[0].values()]
    with torch.no_grad():
        ref, out = net(*args), smoothed(*args)
    for a, b in zip(ref, out):
        assert (a - b).abs().max() <= 1e-4 * a.abs().max()        # fp32 rounding, not a new function
    after = activation_channel_max(smoothed, feeds)
    for name, s in scales.items():
        assert outlier_ratio(after[name]) < 0.5 * outlier_ratio(before[name])
        assert torch.allclose(after[name], before[name] / s, rtol=1e-3)  # exactly what was folded into the norm
    untouched = [n for n in before if n.endswith(("attn2.to_k", "to_out.0", "ff.net.2"))]
    assert untouched and all((after[n] - before[n]).abs().max() <= 1e-3 * before[n].max() for n in untouched)


def test_smoothing_scales_formula_and_arguments():
    act = torch.tensor([4.0, 1.0, 9.0])
    w = torch.tensor([[1.0, -1.0, 0.5], [0.5, 0.25, -4.0]])    # column max |W|: 1, 1, 4
    assert torch.allclose(smoothing_scales(act, [w], alpha=0.5), torch.tensor([2.0, 1.0, 1.5]))
    assert torch.allclose(smoothing_scales(act, [w], alpha=1.0), act)
    with pytest.raises(ValueError, match="alpha"):
        smoothing_scales(act, [w], alpha=1.5)
    norm, lin = nn.LayerNorm(3), nn.Linear(3, 2)
    with pytest.raises(ValueError, match="share 4 channels"):
        smooth_layernorm_linears(norm, [lin], torch.ones(4))


def test_missing_statistics_and_bad_arguments(controlnet):
    net, feeds = controlnet
    with pytest.raises(ValueError, match="no activation statistics"):
        smooth_transformer_blocks(copy.deepcopy(net), {})
    with pytest.raises(ValueError, match="branches"):
        smooth_transformer_blocks(copy.deepcopy(net), {}, branches=["attn3"])
    with pytest.raises(ValueError, match="no BasicTransformerBlock"):
        smooth_transformer_blocks(nn.Sequential(nn.Linear(2, 2)), {})
    with pytest.raises(ValueError, match="not Linear layers"):
        activation_channel_max(net, feeds, layers=["model.time_embed"])
    with pytest.raises(ValueError, match="no inputs"):
        activation_channel_max(net, [])


def test_plot_channel_ranges():
    import matplotlib.pyplot as plt

    fig = plot_channel_ranges(torch.tensor([20.0, 1.0, 1.2]), torch.tensor([4.0, 1.5, 1.4]), "block")
    assert tuple(fig.get_size_inches()) == (10, 3.5) and len(fig.axes) == 2
    assert "max/median 16.7" in fig.axes[0].get_legend().get_texts()[0].get_text()
    plt.close(fig)
