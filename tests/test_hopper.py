"""course_lib.pipeline.hopper (chapter 3, issue 19): the channels-last and FP8 model forms.

On the CPU: channels-last gives the contiguous model's outputs; FP8Linear's arithmetic (torch._scaled_mm has a
CPU kernel); the refusal of fp8 where no FP8 tensor cores exist. The sd15 FP8 layers are run on the meta device,
whose torch._scaled_mm checks are CUDA's (row-major x, column-major weight, sizes multiples of 16).
"""
import pytest
import torch

from course_lib.backends import TorchBackend, stores_channels_last
from course_lib.cnsd import contracts, example_inputs, get_config
from course_lib.cnsd.attention import set_attention_backend
from course_lib.cnsd.model import CNSD
from course_lib.cnsd.tokenizer import byte_level_tokenizer
from course_lib.pipeline.hopper import (
    E4M3_MAX, FP8Linear, fp8_layer_names, fp8_unsupported, has_fp8, swap_fp8_linears, to_channels_last, to_fp8,
)
from course_lib.pipeline.speedups import make_pipeline, model_for, to_half
from course_lib.score import max_pixel_diff

pytestmark = pytest.mark.usefixtures("one_thread")


def test_channels_last_form_keeps_the_original_and_every_output(cnsd):
    cl = to_channels_last(cnsd)
    assert stores_channels_last(cl) and not stores_channels_last(cnsd)
    conv = cl.unet.input_blocks[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    table = contracts(cnsd.config, height=64, width=64)
    for name in ("controlnet", "unet", "decoder"):
        feed = example_inputs(table[name], seed=3)
        want = TorchBackend(cnsd.positional(name), table[name]).infer(feed)
        got = TorchBackend(cl.positional(name), table[name]).infer(feed)
        for key in want:
            assert torch.allclose(got[key], want[key], rtol=1e-4, atol=1e-5), (name, key)


def test_torch_backend_gives_a_channels_last_module_channels_last_inputs(cnsd):
    cl = to_channels_last(cnsd)
    table = contracts(cnsd.config, height=64, width=64)
    seen = []
    hook = cl.unet.input_blocks[0][0].register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    try:
        backend = TorchBackend(cl.positional("unet"), table["unet"])
        backend.infer(example_inputs(table["unet"], seed=0))
    finally:
        hook.remove()
    assert backend.channels_last and seen == [True]
    assert not TorchBackend(cnsd.positional("unet"), table["unet"]).channels_last


def test_cl_pipeline_gives_the_same_image(cnsd, photo):
    tok = byte_level_tokenizer()
    models = {"fp32": cnsd}
    images = [make_pipeline(model_for(name, models), tok, name, "cpu").process(photo, "a bird", image_resolution=64,
                                                                               ddim_steps=4)[0]
              for name in ("fp32-batched-sdpa-hint-once", "fp32-batched-sdpa-hint-once-cl")]
    assert max_pixel_diff(*images) <= 1
    assert sorted(models) == ["fp32", "fp32-cl"] and stores_channels_last(models["fp32-cl"])
    with pytest.raises(ValueError, match="asks for cl, the model lacks it: pass model_for"):
        make_pipeline(cnsd, tok, "fp32-batched-cl", "cpu")
    with pytest.raises(ValueError, match="does not ask for cl, the model has it"):
        make_pipeline(models["fp32-cl"], tok, "fp32-batched", "cpu")


def test_fp8_linear_matches_the_linear_to_fp8_rounding():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    fp8 = FP8Linear(linear)
    assert fp8.weight_fp8.dtype == torch.float8_e4m3fn and fp8.weight_scale.dtype == torch.float32
    assert fp8.weight_scale.ndim == 0 and fp8.bias is linear.bias
    assert "weight_fp8" in dict(fp8.named_buffers()) and "weight_fp8" not in dict(fp8.named_parameters())
    assert float(fp8.weight_fp8.float().abs().max()) == E4M3_MAX                 # the scale uses the whole range
    x = torch.randn(2, 10, 64)
    with torch.no_grad():
        want, got = linear(x), fp8(x)
    assert got.shape == want.shape and got.dtype == x.dtype
    assert 0 < ((got - want).norm() / want.norm()).item() < 0.08                 # e4m3: 3 mantissa bits
    with pytest.raises(ValueError, match="multiples of 16"):
        FP8Linear(torch.nn.Linear(64, 40))


def test_fp8_layers_of_sd15_are_the_large_transformer_linears():
    with torch.device("meta"):
        model = CNSD(get_config("sd15"))
    names = fp8_layer_names(model)
    assert len(names) == 174 and all(".transformer_blocks." in n for n in names)
    assert "unet.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj" in names          # 320 -> 2560
    assert "unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q" not in names         # 320 x 320 < 640 x 640
    assert "unet.input_blocks.4.1.transformer_blocks.0.attn2.to_k" in names             # 768 -> 640
    assert not any("time_embed" in n or "emb_layers" in n or n.startswith("clip") for n in names)


def test_fp8_sd15_passes_scaled_mm_cuda_checks_on_meta_tensors():
    """Meta tensors run _scaled_mm's CUDA shape, stride and dtype checks: the whole fp16 channels-last sd15
    ControlNet + UNet with its 174 FP8 layers goes through them as it would on a Hopper GPU."""
    with torch.device("meta"):
        model = CNSD(get_config("sd15")).half().to(memory_format=torch.channels_last)
    assert len(swap_fp8_linears(model)) == 174 and has_fp8(model)
    set_attention_backend(model, "sdpa")
    with torch.device("meta"):
        x = torch.empty(2, 4, 32, 48, dtype=torch.float16, memory_format=torch.channels_last)
        t = torch.full((2,), 951, dtype=torch.int32)
        context = torch.empty(2, 77, 768, dtype=torch.float16)
        hint = torch.empty(2, 3, 256, 384, dtype=torch.float16, memory_format=torch.channels_last)
    with torch.inference_mode():
        eps = model.unet(x, t, context, model.controlnet(x, hint, t, context))
    assert eps.shape == (2, 4, 32, 48) and eps.dtype == torch.float16
    w8 = torch.empty(640, 320, dtype=torch.float8_e4m3fn, device="meta")
    x8, one = torch.empty(64, 320, dtype=torch.float8_e4m3fn, device="meta"), torch.empty((), device="meta")
    with pytest.raises(RuntimeError, match="col_major"):                           # the checks are really on
        torch._scaled_mm(x8, w8, scale_a=one, scale_b=one, out_dtype=torch.float16)


def test_fp8_is_refused_without_fp8_tensor_cores(cnsd):
    assert "compute capability >= 8.9" in fp8_unsupported("cpu")
    half = to_half(cnsd)
    with pytest.raises(ValueError, match=r"fp8 needs a CUDA GPU of compute capability >= 8.9 \(Ada, Hopper\)"):
        to_fp8(half)
    with pytest.raises(ValueError, match="fp8 needs a CUDA GPU, got device cpu"):
        make_pipeline(half, byte_level_tokenizer(), "fp16-batched-fp8", "cpu")
    with pytest.raises(ValueError, match="fp8 needs dtype='fp16'"):
        model_for("fp32-batched-fp8", {"fp32": cnsd})
    assert not has_fp8(half)
