"""course_lib.profiling (chapter 3): kernels by class -- the classifier on real kernel names from H100 profiles of
eager, cuDNN, cuBLAS, FlashAttention and inductor code, the per-call sums, and a CPU profile end to end."""
import pytest
import torch

from course_lib.profiling import KERNEL_CLASSES, kernel_class, kernel_table, profile_kernels, summarize_kernels

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = {
    "sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64": "convolution",
    "void cudnn::engines_precompiled::nchwToNhwcKernel<__half, __half, float, false, true>": "layout (NCHW<->NHWC)",
    "nvjet_hsh_128x256_64x4_1x2_h_bz_coopA_NTT": "gemm/matmul",
    "sm90_xmma_gemm_e4m3e4m3_e4m3f32_f32_tn_n_tilesize128x128x128": "gemm/matmul",
    "ampere_fp16_s16816gemm_fp16_128x128_ldg8_f2f_stages_32x5_nn": "gemm/matmul",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>": "attention",
    "fmha_cutlassF_f16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel)": "attention",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3": "attention",
    "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float>(long, float, float const*)": "normalization",
    "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::Half, float, true>": "normalization",
    "triton_red_fused__to_copy_add_native_group_norm_silu_3": "normalization",
    "triton_per_fused__softmax_7": "attention",
    "triton_poi_fused_convolution_silu_2": "elementwise/other",
    "triton_tem_fused_convolution_0": "convolution",
    "triton_tem_fused__scaled_mm_3": "gemm/matmul",
    "void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel>": "elementwise/other",
    "memcpy Memcpy HtoD (Pageable -> Device)": "memcpy",
    "aten::mkldnn_convolution": "convolution",
    "aten::addmm": "gemm/matmul",
    "aten::copy_": "memcpy",
}


@pytest.mark.parametrize("name,cls", NAMES.items())
def test_kernel_class(name, cls):
    assert kernel_class(name) == cls and cls in KERNEL_CLASSES


def test_summarize_kernels_is_per_call():
    kernels = [("aten::addmm", 100.0), ("triton_poi_fused_add_0", 10.0)] * 2 + [("memcpy Memset (Device)", 5.0)]
    s = summarize_kernels(kernels, calls=2, wall_ms=0.2)
    assert s["kernels"] == 2.5 and s["gpu_ms"] == pytest.approx(0.1125) and s["gpu_busy"] == pytest.approx(0.5625)
    assert s["classes"]["gemm/matmul"] == pytest.approx({"count": 1.0, "ms": 0.1, "share": 0.1 / 0.1125})
    assert s["top"][0] == {"name": "aten::addmm", "class": "gemm/matmul", "count": 1.0, "ms": pytest.approx(0.1)}


def test_profile_on_the_cpu_classifies_aten_operators():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(4, 8), torch.nn.SiLU(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 16))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        p = profile_kernels(lambda: model(x), "cpu", iters=2)
    assert p["device"].startswith("cpu") and p["calls"] == 2 and p["kernels"] > 3
    for cls in ("convolution", "normalization", "gemm/matmul"):
        assert p["classes"][cls]["count"] >= 1, cls
    table = kernel_table({"eager": p})
    assert table.splitlines()[0] == "| kernel class | eager ms | count |" and "| all kernels |" in table
