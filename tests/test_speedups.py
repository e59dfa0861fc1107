"""course_lib.pipeline.speedups (chapter 3): the ladder's variants are backends + an eps strategy for the one
Canny2Image, and keep canny2image's result, on the tiny model.

CPU tests run a 64x64 image for a few DDIM steps; the CUDA-graph and fp16 paths are marked gpu.
"""
import numpy as np
import pytest
import torch

from course_lib.backends import GraphedBackend, TorchBackend
from course_lib.cnsd.tokenizer import byte_level_tokenizer
from course_lib.cnsd.unet import GroupNorm32
from course_lib.pipeline.canny2image import Canny2Image
from course_lib.pipeline.eps import GraphedEps, GuidedEps, HintOnce, ReuseEps
from course_lib.pipeline.loopgraph import LoopGraphEps
from course_lib.pipeline.speedups import (
    COMPILE_MAX_MODE, HOPPER_LADDER, LADDER, Switches, eps_strategy, form_name, make_pipeline, model_for, to_half,
    torch_backends,
)
from course_lib.score import max_pixel_diff, psnr

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")




@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def reference(cnsd, tokenizer, photo):
    """The original pipeline's image at 4 steps (fp32, separate guidance)."""
    return Canny2Image.from_torch(cnsd, tokenizer, progress=False).process(photo, "a bird", image_resolution=64,
                                                                           ddim_steps=4)[0]


def variant(cnsd, tokenizer, photo, name, steps=4, device="cpu", **kwargs):
    s = Switches.from_name(name)
    pipe = make_pipeline(cnsd, tokenizer, s, device, **kwargs)
    return pipe, pipe.process(photo, "a bird", image_resolution=64, ddim_steps=s.steps or steps)[0]


def test_variant_names_round_trip_and_reject_typos():
    for name in LADDER + ("fp16-batched-graph-sdpa-hint-once-reuse-eps4-steps10-cache-text", "fp32-batched-reuse-eps3"):
        assert Switches.from_name(name).name == name
    s = Switches.from_name("fp16-batched-graph-sdpa-hint-once-compile-reuse-eps")
    assert (s.dtype, s.guidance, s.cuda_graph, s.attention, s.hint_once, s.compile, s.reuse_every) == \
        ("fp16", "batched", True, "sdpa", True, True, 4)
    assert Switches().name == "fp32-separate" and not Switches().needs_cuda
    with pytest.raises(ValueError, match="unknown part 'grpah'"):
        Switches.from_name("fp16-batched-grpah")
    with pytest.raises(ValueError, match="dtype"):
        Switches(dtype="int8")
    with pytest.raises(ValueError, match="reuse_every"):
        Switches(reuse_every=1)


def test_hopper_switch_names_round_trip_and_validate():
    names = HOPPER_LADDER + ("fp16-batched-graph-sdpa-hint-once-compile-max-cl-loop-graph",
                             "fp16-batched-graph-sdpa-hint-once-compile-cl-loop-graph-fp8-reuse-eps4-steps8-cache-text",
                             "fp32-batched-cl", "fp16-batched-loop-graph")
    for name in names:
        assert Switches.from_name(name).name == name
    s = Switches.from_name("fp16-batched-graph-sdpa-hint-once-compile-max-cl-loop-graph-fp8")
    assert (s.compile, s.compile_max, s.channels_last, s.loop_graph, s.fp8, s.cuda_graph) == (True,) * 6
    assert s.compile_mode == COMPILE_MAX_MODE == "max-autotune-no-cudagraphs"
    assert Switches.from_name("fp16-batched-compile").compile_mode == "default" and Switches().compile_mode is None
    assert Switches.from_name("cl-fp32-batched").name == "fp32-batched-cl"                  # any order in, one out
    assert not Switches.from_name("fp32-batched-cl").needs_cuda                              # cl runs on a CPU
    assert Switches.from_name("fp16-batched-loop-graph").needs_cuda and Switches.from_name("fp16-batched-fp8").needs_cuda
    assert [form_name(Switches.from_name(n)) for n in ("fp32-separate", "fp16-batched-cl", names[1])] == \
        ["fp32", "fp16-cl", "fp16-cl"]
    with pytest.raises(ValueError, match="compile_max needs compile=True"):
        Switches(compile_max=True)
    with pytest.raises(ValueError, match="fp8 needs dtype='fp16'"):
        Switches.from_name("fp32-batched-fp8")
    with pytest.raises(ValueError, match="unknown part 'max'"):
        Switches.from_name("fp16-batched-max")


def test_model_for_makes_each_form_once_from_the_one_before(cnsd):
    models = {"fp32": cnsd}
    half = model_for("fp16-batched", models)
    assert model_for("fp16-batched-graph", models) is half and half is not cnsd
    cl = model_for("fp16-batched-cl", models)
    assert sorted(models) == ["fp16", "fp16-cl", "fp32"] and cl.unet.input_blocks[0][0].weight.dtype == torch.float16
    with pytest.raises(ValueError, match="expected at least 'fp32'"):
        model_for("fp16-batched", {})


def test_each_switch_is_a_backend_or_an_eps_strategy(cnsd):
    eps = eps_strategy("fp16-batched-graph-sdpa-hint-once-reuse-eps4", cnsd)
    assert isinstance(eps, ReuseEps) and isinstance(eps.inner, GraphedEps) and isinstance(eps.inner.inner, HintOnce)
    assert eps.guidance == "batched" and eps.every == 4
    assert repr(eps_strategy("fp32-separate")) == "GuidedEps('separate')"
    with pytest.raises(ValueError, match="hint once needs a ControlNet that takes the hint block's output"):
        eps_strategy("fp32-batched-hint-once")
    backends = torch_backends(cnsd, Switches.from_name("fp32-batched-graph"))
    assert isinstance(backends["clip"], GraphedBackend) and isinstance(backends["decoder"], GraphedBackend)
    assert isinstance(backends["unet"], TorchBackend)                      # the step is graphed as a whole
    loop = eps_strategy("fp16-batched-graph-sdpa-hint-once-compile-max-loop-graph", cnsd)
    assert isinstance(loop, LoopGraphEps) and isinstance(loop.inner, HintOnce)      # the loop graph replaces "graph"
    compiled = torch_backends(cnsd, Switches.from_name("fp16-batched-compile-max"))["unet"].module
    assert type(compiled).__name__ == "OptimizedModule"                               # lazy: nothing compiles here


def test_to_half_runs_groupnorm32_in_fp32_and_leaves_the_original(cnsd):
    half = to_half(cnsd)
    norm = next(m for m in half.modules() if isinstance(m, GroupNorm32))
    assert norm.weight.dtype == torch.float16 and half.unet.input_blocks[0][0].weight.dtype == torch.float16
    x = torch.randn(1, norm.num_channels, 4, 4).half()
    reference = torch.nn.functional.group_norm(x.float(), norm.num_groups, norm.weight.float(), norm.bias.float(), norm.eps)
    assert norm(x).dtype == torch.float16 and torch.allclose(norm(x).float(), reference.half().float())
    assert all(p.dtype == torch.float32 for p in cnsd.parameters())


def test_default_switches_reproduce_the_original_pipeline(cnsd, tokenizer, photo, reference):
    pipe, image = variant(cnsd, tokenizer, photo, "fp32-separate", time_stages=True)
    assert np.array_equal(image, reference)
    assert type(pipe) is Canny2Image and repr(pipe.eps) == "GuidedEps('separate')"
    assert len(pipe.last_timings.steps) == 4 and pipe.last_timings.total > 0
    assert pipe.last_edge_map.shape == (64, 64, 3) and pipe.last_seed == 2946901


def test_batched_sdpa_and_hint_once_stay_within_one_pixel_level(cnsd, tokenizer, photo, reference):
    for name in ("fp32-batched", "fp32-batched-sdpa", "fp32-separate-hint-once", "fp32-batched-sdpa-hint-once"):
        _, image = variant(cnsd, tokenizer, photo, name)
        assert max_pixel_diff(image, reference) <= 1, name


def test_eps_reuse_and_fewer_steps_change_the_image_a_bounded_amount(cnsd, tokenizer, photo, reference):
    _, full = variant(cnsd, tokenizer, photo, "fp32-batched", steps=8)
    pipe, reused = variant(cnsd, tokenizer, photo, "fp32-batched-reuse-eps2", steps=8)
    assert pipe.eps.reused == 2 and not np.array_equal(full, reused) and psnr(reused, full) > 25
    pipe, two = variant(cnsd, tokenizer, photo, "fp32-separate-steps2", time_stages=True)
    assert len(pipe.last_timings.steps) == 2 and not np.array_equal(two, reference)


def test_cache_text_encodes_each_prompt_once(cnsd, photo):
    calls = []
    tokenizer = byte_level_tokenizer()

    def counting(texts):
        calls.append(list(texts))
        return tokenizer(texts)
    pipe = make_pipeline(cnsd, counting, "fp32-batched-cache-text", "cpu")
    for _ in range(2):
        pipe.process(photo, "a bird", image_resolution=64, ddim_steps=1)
    assert len(calls) == 2                                      # prompt and negative prompt, once


def test_bad_combinations_raise_one_clear_error(cnsd, tokenizer):
    with pytest.raises(ValueError, match="graph needs a CUDA GPU, got device cpu"):
        make_pipeline(cnsd, tokenizer, "fp32-batched-graph", "cpu")
    with pytest.raises(ValueError, match="loop-graph needs a CUDA GPU, got device cpu"):
        make_pipeline(cnsd, tokenizer, "fp32-batched-loop-graph", "cpu")
    with pytest.raises(ValueError, match="to_half"):
        make_pipeline(cnsd, tokenizer, "fp16-batched", "cpu")


@pytest.mark.gpu
@needs_gpu
def test_cuda_graph_step_matches_eager_on_gpu(cnsd, tokenizer, photo):
    model = to_half(cnsd).cuda()
    _, eager = variant(model, tokenizer, photo, "fp16-batched-sdpa", device="cuda")
    pipe = make_pipeline(model, tokenizer, "fp16-batched-graph-sdpa-hint-once", "cuda")
    graphed, again = (pipe.process(photo, "a bird", image_resolution=64, ddim_steps=4)[0] for _ in range(2))
    assert max_pixel_diff(graphed, eager) <= 1 and np.array_equal(graphed, again)
    assert pipe.eps.graph.graphs and pipe.eps.graph.failed is None      # the step really was captured
    assert isinstance(pipe.eps, GraphedEps) and isinstance(pipe.eps.inner, GuidedEps)
