"""course_lib.precision.ranges (chapter 3): where activations leave FP16's range."""
from __future__ import annotations

import io

import matplotlib
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_lib.cnsd import build_cnsd, contracts, example_inputs, get_config
from course_lib.precision.ranges import FP16_MAX, RangeTable, plot_ranges, survey_ranges

matplotlib.use("Agg")


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


class Attention(nn.Module):
    """Scores -> masked softmax, with the mask value as a parameter (-inf, float32 min or -1e4)."""

    def __init__(self, mask_value: float, sdpa: bool = False):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.mask_value, self.sdpa = mask_value, sdpa

    def forward(self, x):
        q = self.proj(x)
        n = x.shape[1]
        mask = torch.full((n, n), self.mask_value).triu(1)
        if self.sdpa:
            return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        return (q @ q.transpose(-1, -2) * 8 ** -0.5 + mask).softmax(dim=-1) @ q


X = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))


def test_planted_overflow_is_found_by_name():
    net = nn.Sequential(nn.Linear(8, 8), Scale(1e5), nn.ReLU(), Scale(1e-5))
    table = survey_ranges(net, X)
    assert [(r.name, r.module_type, r.point) for r in table.rows] == [
        ("0", "Linear", "output"), ("1", "Scale", "output"), ("2", "ReLU", "output"), ("3", "Scale", "output")]
    assert [r.name for r in table.overflows] == ["1", "2"]
    assert table.rows[1].max_abs > FP16_MAX and table.rows[1].in_max_abs == pytest.approx(table.rows[0].max_abs)
    assert not table.rows[3].overflow and "OVERFLOW" in str(table) and "2 above 65504" in table.summary()


def test_underflow_and_execution_order():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.late, self.early = Scale(1e-6), nn.Linear(8, 8)     # defined in the other order

        def forward(self, x):
            return self.late(self.early(x) * 1e-3)

    table = survey_ranges(Net(), {"x": X})
    assert [r.name for r in table.rows] == ["early", "late"]
    assert [r.name for r in table.underflows] == ["late"] and table.rows[1].tiny_fraction == 1.0
    assert table.rows[0].tiny_fraction < 0.1 and not table.overflows


def test_norm_statistics_overflow_before_the_output_does():
    net = nn.Sequential(Scale(1000.0), nn.GroupNorm(2, 4), nn.LayerNorm(6))
    table = survey_ranges(net, torch.randn(1, 4, 6, generator=torch.Generator().manual_seed(0)))
    rows = {(r.name, r.point): r for r in table.rows}
    assert rows[("1", "norm x^2")].overflow and not rows[("1", "output")].overflow   # output is normalised
    assert not rows[("2", "norm x^2")].overflow and rows[("1", "output")].max_abs < 5
    assert [r.point for r in table.rows if r.name == "1"] == ["norm x^2", "output"]


@pytest.mark.parametrize("sdpa", [False, True])
def test_softmax_inputs_show_the_mask(sdpa):
    inf_rows = survey_ranges(Attention(float("-inf"), sdpa), X).rows
    min_rows = survey_ranges(Attention(torch.finfo(torch.float32).min, sdpa), X).rows
    ok_rows = survey_ranges(Attention(-1e4, sdpa), X).rows
    for rows, overflow in ((inf_rows, True), (min_rows, True), (ok_rows, False)):
        soft = [r for r in rows if r.point == "softmax input"]
        assert len(soft) == 1 and soft[0].name == "" and soft[0].module_type == "Attention"
        assert soft[0].overflow is overflow
    assert 1e4 <= [r for r in ok_rows if r.point == "softmax input"][0].max_abs < 1.1e4
    assert [r.point for r in survey_ranges(Attention(-1e4, sdpa), X, softmax_inputs=False).rows] == ["output"]


def test_tiny_clip_has_its_mask_in_range_and_no_overflow():
    config = get_config("tiny")
    clip = build_cnsd(config, seed=0).positional("clip")
    table = survey_ranges(clip, example_inputs(contracts(config, height=64, width=64)["clip"]))
    soft = [r for r in table.rows if r.point == "softmax input"]
    assert len(soft) == config.clip.num_hidden_layers and all(1e4 <= r.max_abs < FP16_MAX for r in soft)
    assert not table.overflows and table.title == "activation ranges of clip"
    assert sum(r.point == "norm x^2" for r in table.rows) == 2 * config.clip.num_hidden_layers + 1
    assert not clip._forward_hooks and not clip._forward_pre_hooks and not clip.model.text_model._forward_hooks
    top = table.top(3)
    assert isinstance(top, RangeTable) and len(top.rows) == 3 and top.rows[0].index < top.rows[-1].index


def test_hooks_are_removed_after_an_error_and_bad_arguments_raise():
    net = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(RuntimeError):
        survey_ranges(net, torch.randn(2, 3))                         # wrong width
    assert not net[0]._forward_hooks and not net[0]._forward_pre_hooks
    with pytest.raises(ValueError, match="inputs"):
        survey_ranges(net, "x")
    with pytest.raises(ValueError, match="nn.Module"):
        survey_ranges(lambda x: x, X)


def test_plot_is_fixed_size_log_scale_with_the_fp16_line_and_deterministic():
    import matplotlib.pyplot as plt

    table = survey_ranges(nn.Sequential(nn.Linear(8, 8), Scale(1e5), Scale(float("inf"))), X)
    fig = plot_ranges(table)
    ax = fig.axes[0]
    assert tuple(fig.get_size_inches()) == (10, 4) and ax.get_yscale() == "log"
    assert any(line.get_ydata()[0] == FP16_MAX for line in ax.get_lines())
    pngs = []
    for _ in range(2):
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        pngs.append(buf.getvalue())
    assert pngs[0] == pngs[1] and pngs[0][:4] == b"\x89PNG"
    plt.close(fig)
    fig2, ax2 = plt.subplots(figsize=(6, 3))
    assert plot_ranges(table, ax=ax2, title="mine") is fig2 and ax2.get_title() == "mine"
    plt.close(fig2)
