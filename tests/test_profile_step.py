"""benchmarks/speed/profile_step.py at toy size on a CPU: the plain path and the trainer's fast path (compiled with
the "eager" backend) are timed, profiled and tabled; the GPU idle arithmetic on made-up kernel intervals."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from benchmarks.speed import profile_step


def test_tiny_profile_times_and_profiles_the_plain_and_the_fast_path(tmp_path):
    text = profile_step.main(["--tiny", "--out", str(tmp_path), "--steps", "1", "--profile-steps", "1", "--top", "3",
                              "--variants", "fast path", "--traces"])
    assert (tmp_path / "profile_step.md").read_text() == text
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in text.splitlines()
            if line.startswith(("| plain |", "| fast path |"))}
    assert rows.keys() == {"plain", "fast path"}
    for cells in rows.values():
        assert cells[1] == "4" and float(cells[4]) > 0  # batch, images/s
        assert float(cells[7]) < 1e-4  # fp32 at toy size: the switches change no feature beyond rounding
    assert text.count("top 3 by self CPU time") == 4  # teacher forward and full step, per variant
    assert "aten::" in text and "FLOPs per image (plain path, torch's counter): teacher " in text
    assert sorted(p.name for p in tmp_path.glob("*.json")) == [
        "fast_path_step.json", "fast_path_teacher.json", "plain_step.json", "plain_teacher.json"]


def test_an_unknown_variant_is_refused_naming_the_choices(tmp_path, capsys):
    with pytest.raises(SystemExit):
        profile_step.main(["--tiny", "--out", str(tmp_path), "--variants", "turbo"])
    assert "unknown variants ['turbo']" in capsys.readouterr().err


def test_busy_time_counts_overlapping_kernels_once():
    def kernel(start, end):
        return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end))

    # 0-10 and 5-12 overlap (12 busy), 20-25 alone (5), 21-22 inside it (0 more): 17 of the window 0-25
    assert profile_step.busy_us([kernel(20, 25), kernel(0, 10), kernel(5, 12), kernel(21, 22)]) == 17


@pytest.mark.parametrize("name, kind", [
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32", "matmul/conv"),  # cuDNN convolution
    ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NTN", "matmul/conv"),  # cuBLAS on Hopper
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>", "matmul/conv"),
    ("triton_poi_fused_convolution_silu_0", "other"),  # a convolution's fused epilogue, not the convolution
    ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float>", "other"),  # GroupNorm statistics
    ("aten::_slow_conv2d_forward", "matmul/conv"),  # on a CPU the ops are the kernels
])
def test_kernels_are_sorted_into_compute_and_memory_bound_by_name(name, kind):
    assert profile_step.kernel_kind(name) == kind
