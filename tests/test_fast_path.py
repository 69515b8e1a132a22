"""The GPU fast path's switches (training/teacher/fast_path.py) at tiny size on a CPU: each one's teacher features
match the plain path's within its stated tolerance, and the trainer turns them on only where it should.

Tolerances: bf16 weights (under bf16 autocast) against the fp32 teacher, relative L2 < 5e-2 (the bf16 drift
tests/test_frozen_teacher.py allows autocast) and at most 1.5x the drift of bf16 autocast with fp32 weights (here
1.6% against 1.5%: what changes is that the norms, run in fp32 by autocast, see bf16-rounded affine weights); SDPA
against the explicit softmax(QK^T)V processor, fp32: rtol 1e-5, atol 1e-5; blocks compiled with the "eager" backend
against eager: torch's fp32 defaults (rtol 1.3e-6, atol 1e-5). The teacher is a 16-px UNet with the ADM-256
structure (scale-shift norms, resblock up/down, attention at stride 2), random weights: no Hub, no GPU.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from dreamteacher_models.recipes import DEFAULT_RECIPE, get_recipe
from tests.tiny import MEAN, STD, tiny_images
from training.pretrain import resolve_fast_path
from training.teacher import adm
from training.teacher.fast_path import GPU_FAST_PATH, PLAIN, FastPath, compile_blocks, set_attention
from training.teacher.frozen import FrozenTeacher

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMScheduler, UNet2DModel  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0  # noqa: E402

TINY_ADM = adm.ADMFlags(image_size=16, num_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                        attention_resolutions="8", num_head_channels=16, learn_sigma=True, resblock_updown=True,
                        use_scale_shift_norm=True)


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    """Random weights, the norms' affine ones too (a fresh GroupNorm's 1 and 0 are exact in bf16)."""
    torch.manual_seed(0)
    unet = UNet2DModel(**adm.diffusers_config(TINY_ADM))
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.add_(0.3 * torch.randn_like(module.weight))
                module.bias.add_(0.3 * torch.randn_like(module.bias))
    return unet.state_dict()


def make_teacher(weights, **kwargs) -> FrozenTeacher:
    unet = UNet2DModel(**adm.diffusers_config(TINY_ADM))
    unet.load_state_dict(weights)
    return FrozenTeacher(unet, DDPMScheduler(), 50, MEAN, STD, **kwargs)


def features(teacher: FrozenTeacher) -> dict[int, torch.Tensor]:
    return teacher(tiny_images(size=16)[1], torch.Generator().manual_seed(0))


def relative_error(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[s] - b[s]).norm() / b[s].norm()) for s in a)


def test_the_tiny_teacher_reads_its_taps_after_attention(weights):
    """The other tests would prove nothing about attention if no tap were downstream of an attention block."""
    teacher = make_teacher(weights)
    attention = [n for n, m in teacher.unet.named_modules() if isinstance(m, Attention)]
    assert attention and any(".attentions." in t.name for t in teacher.taps)


def test_bf16_weights_match_bf16_autocast_and_stay_within_the_bf16_drift(weights):
    fp32 = features(make_teacher(weights))
    autocast = features(make_teacher(weights, dtype=torch.bfloat16))
    teacher = make_teacher(weights, dtype=torch.bfloat16, fast_path=FastPath(weights_in_dtype=True))
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    cast = features(teacher)
    assert {f.dtype for f in cast.values()} == {torch.float32}
    assert relative_error(cast, autocast) > 0  # the norms' weights really are rounded
    assert relative_error(cast, fp32) < min(5e-2, 1.5 * relative_error(autocast, fp32))
    teacher.to("cpu")  # moving the teacher keeps its weights' dtype
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}


def test_bf16_weights_are_a_no_op_for_an_fp32_teacher(weights):
    teacher = make_teacher(weights, fast_path=FastPath(weights_in_dtype=True))
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}
    torch.testing.assert_close(features(teacher), features(make_teacher(weights)), rtol=0, atol=0)


def test_sdpa_and_the_explicit_attention_give_the_same_features(weights):
    sdpa = make_teacher(weights, fast_path=FastPath(attention="sdpa"))
    math = make_teacher(weights, fast_path=FastPath(attention="math"))
    for teacher, processor in ((sdpa, AttnProcessor2_0), (math, AttnProcessor)):
        assert {type(m.processor) for m in teacher.unet.modules() if isinstance(m, Attention)} == {processor}
    torch.testing.assert_close(features(sdpa), features(math), rtol=1e-5, atol=1e-5)


def test_set_attention_counts_the_modules_it_switched(weights):
    unet = make_teacher(weights).unet
    assert set_attention(unet, "math") == sum(isinstance(m, Attention) for m in unet.modules()) > 0


def test_compiled_blocks_give_the_eager_features_and_still_stop_after_the_last_tap(weights):
    from torch._dynamo.utils import counters

    eager = features(make_teacher(weights))
    graphs = counters["stats"]["unique_graphs"]
    teacher = make_teacher(weights, fast_path=FastPath(compile_backend="eager"))
    tail = []
    hook = teacher.unet.conv_out.register_forward_hook(lambda *a: tail.append(1))
    try:
        compiled = features(teacher)
    finally:
        hook.remove()
    assert counters["stats"]["unique_graphs"] > graphs  # dynamo captured the blocks: they did run compiled
    assert tail == []  # the tap hooks stayed eager: the early stop still skips the decoder's tail
    torch.testing.assert_close(compiled, eager)


def test_compile_blocks_leaves_a_block_with_a_tap_inside_it_eager(weights):
    unet = make_teacher(weights).unet
    inside, tapped = "up_blocks.1.resnets.0.conv1", "up_blocks.0.attentions.0"
    compiled = compile_blocks(unet, "eager", [inside, tapped])
    assert tapped in compiled  # its hook runs outside its forward
    assert "up_blocks.1.resnets.0" not in compiled and "up_blocks.1.resnets.1" in compiled
    assert torch._dynamo.config.recompile_limit >= 2 * len(compiled)


def test_fast_path_names_what_is_on_and_refuses_an_unknown_attention():
    assert PLAIN.describe() == "plain"
    assert GPU_FAST_PATH.describe() == "weights_in_dtype=True, compile_backend=inductor, attention=sdpa"
    with pytest.raises(ValueError, match="attention must be one of"):
        FastPath(attention="flash")


@pytest.mark.parametrize("recipe, device, given, on", [
    ("resnet50.dreamteacher_in1k", "cuda", None, True),  # the paper's recipes on a GPU: on by default
    ("convnext_base.dreamteacher_in1k", "cuda", None, True),
    ("resnet50.dreamteacher_in1k", "cpu", None, False),
    (DEFAULT_RECIPE, "cuda", None, False),  # the Fashion-MNIST recipe: off
    (DEFAULT_RECIPE, "cpu", None, False),  # the main job: unchanged
    ("resnet50.dreamteacher_in1k", "cuda", False, False),  # --no-fast-path
    (DEFAULT_RECIPE, "cpu", True, True),  # --fast-path
])
def test_the_trainer_turns_the_fast_path_on_for_the_paper_recipes_on_a_gpu(recipe, device, given, on):
    args = argparse.Namespace(fast_path=given, channels_last=False)
    resolve_fast_path(args, get_recipe(recipe), torch.device(device))
    assert (args.fast_path, args.channels_last) == (on, on)
