"""Teacher taps paired with student levels by stride (training/distill/pairing.py), through the real timm students."""

import dataclasses

import pytest
import torch

from dreamteacher_models.recipes import get_recipe
from training.distill.distiller import build_distiller, distillation_loss
from training.distill.pairing import LevelPair, pair_levels, pooled_targets
from training.distill.regressor import student_levels
from training.run.backbones import build_backbone

ADM256 = {4: 512, 8: 512, 16: 1024, 32: 1024}  # ADM-256 output blocks 11/8/5/2: stride -> channels
FMNIST_UNET = {1: 32, 2: 64, 4: 128, 8: 128}  # the committed 4-level 32-px teacher
SD_LIKE = {8: 320, 16: 640, 32: 1280, 64: 1280}  # latent UNet levels x the VAE's 8


def _strides(arch):
    return sorted(student_levels(build_backbone(arch), arch))


def _pairs(pairs):
    return [(p.student_stride, p.teacher_stride) for p in pairs]


@pytest.mark.parametrize("recipe", ["resnet50.dreamteacher_in1k", "convnext_base.dreamteacher_in1k"])
def test_imagenet_recipes_keep_the_papers_pairing(recipe):
    """ADM-256 decoder levels at strides 4..32 feed C2..C5 one to one, declared or automatic, nothing pooled."""
    r = get_recipe(recipe)
    strides = _strides(r.arch)
    declared, notes = pair_levels(strides, ADM256, r.pairs)
    automatic, auto_notes = pair_levels(strides, ADM256)
    assert _pairs(declared) == _pairs(automatic) == [(4, 4), (8, 8), (16, 16), (32, 32)]
    assert [p.teacher_channels for p in declared] == [512, 512, 1024, 1024]
    assert all(p.pool_factor == 1 for p in declared) and not notes and not auto_notes


def test_small_unet_and_resnet18_never_distil_the_noise_predicting_level():
    pairs, notes = pair_levels(_strides("resnet18"), FMNIST_UNET)
    assert _pairs(pairs) == [(2, 2), (4, 4), (8, 8)]  # the stride-2 stem level takes the stride-2 tap
    assert len(notes) == 1 and "stride 1 dropped" in notes[0]
    # convnext has no stride-2 level: the stride-2 tap is then finer than every level, and C2 has its own tap
    pairs, notes = pair_levels(_strides("convnext_atto"), FMNIST_UNET)
    assert _pairs(pairs) == [(4, 4), (8, 8)] and len(notes) == 2
    # a teacher finer than every student level feeds the finest level, area-pooled
    pairs, _ = pair_levels(_strides("convnext_atto"), {2: 64, 8: 128})
    assert _pairs(pairs) == [(4, 2), (8, 8)] and pairs[0].pool_factor == 2


def test_latent_teacher_levels_align_by_stride_not_order():
    pairs, notes = pair_levels(_strides("resnet50"), SD_LIKE)
    assert _pairs(pairs) == [(8, 8), (16, 16), (32, 32)]  # order-matching would have put stride 8 on C2
    assert len(notes) == 1 and "stride 64 dropped" in notes[0]


def test_declared_pairs_pool_a_teacher_level_onto_coarser_student_levels():
    pairs, notes = pair_levels(_strides("resnet18"), FMNIST_UNET, ((4, 4), (8, 8), (16, 8), (32, 8)))
    assert [p.pool_factor for p in pairs] == [1, 1, 2, 4]
    assert any("stride 1" in n for n in notes) and any("stride 2" in n for n in notes)
    with pytest.raises(ValueError, match=r"pair \(4, 8\).*never upsampled"):
        pair_levels([4, 8, 16, 32], FMNIST_UNET, ((4, 8),))
    with pytest.raises(ValueError, match=r"no level at stride 2; its levels are at strides \[4, 8, 16, 32\]"):
        pair_levels([4, 8, 16, 32], FMNIST_UNET, ((2, 2),))
    with pytest.raises(ValueError, match="one student level two targets"):
        pair_levels([4, 8, 16, 32], FMNIST_UNET, ((4, 4), (4, 2)))


def test_pooled_targets_are_area_means_on_the_student_grid():
    maps = {2: torch.arange(64.0).reshape(1, 1, 8, 8), 8: torch.randn(1, 3, 2, 2)}
    pairs = [LevelPair(4, 2, 1), LevelPair(8, 8, 3), LevelPair(16, 8, 3)]
    fine, same, coarse = pooled_targets(maps, pairs, [(4, 4), (2, 2), (1, 1)])
    assert torch.equal(fine[0, 0, 0, 0], maps[2][0, 0, :2, :2].mean())
    assert same is maps[8]
    assert torch.allclose(coarse, maps[8].mean(dim=(2, 3), keepdim=True))


def test_distiller_predicts_on_the_student_grid_and_1x1_levels_get_no_at_term():
    recipe = get_recipe("resnet18.dreamteacher_fmnist")
    recipe = dataclasses.replace(recipe, regressor_width=16, ppm_bins=(1,), pairs=((4, 4), (8, 8), (16, 8), (32, 8)))
    model, _ = build_distiller(recipe, FMNIST_UNET)
    images = torch.randn(2, 3, 32, 32)
    predictions = model(images)
    assert [tuple(p.shape) for p in predictions] == [(2, 128, 8, 8), (2, 128, 4, 4), (2, 128, 2, 2), (2, 128, 1, 1)]
    # no regressor map is larger than the finest paired level: the stem (stride 2, 16x16) is not even read
    assert model.indices == (1, 2, 3, 4)
    teacher_maps = {4: torch.randn(2, 128, 8, 8), 8: torch.randn(2, 128, 4, 4)}
    losses = distillation_loss(predictions, teacher_maps, model.pairs, recipe.loss)
    assert {"at/level0", "at/level1", "at/level2"} <= set(losses) and "at/level3" not in losses
    assert torch.allclose(losses["at"], (losses["at/level0"] + losses["at/level1"] + losses["at/level2"]) / 3)
    losses["loss"].backward()
    # every parameter is reached (DDP would stall on an unused one); the regressor's all learn at once (the
    # student's residual branches start at zero: timm zero-initialises each block's last BN gamma)
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad.abs().sum() > 0 for p in model.regressor.parameters())


def test_the_recipes_regressor_width_bins_and_unpaired_levels_shape_the_distiller():
    recipe = dataclasses.replace(get_recipe("resnet18.dreamteacher_fmnist"), regressor_width=12, ppm_bins=(1, 3),
                                 pairs=((4, 4), (16, 8)))
    model, _ = build_distiller(recipe, FMNIST_UNET)
    assert len(model.regressor.ppm.stages) == 2 and model.regressor.ppm.bottleneck[0].out_channels == 12
    assert set(model.regressor.head) == {"0", "2"}  # C3 and C5 carry the top-down path only, with no head
    assert [tuple(p.shape) for p in model(torch.randn(2, 3, 32, 32))] == [(2, 128, 8, 8), (2, 128, 2, 2)]
    with pytest.raises(ValueError, match=r"^this distiller has no task head: set recipe\.label_distill\.interpreter$"):
        model(torch.randn(2, 3, 32, 32), with_logits=True)


@pytest.mark.parametrize(("zero_init_last", "gamma"), [(True, 0.0), (False, 1.0), (None, 0.0)])
def test_the_recipes_zero_init_last_reaches_the_student(zero_init_last, gamma):
    """resnet's last BN gamma of every block: 0 with zero_init_last, 1 without; None keeps timm's default (0)."""
    recipe = dataclasses.replace(get_recipe("resnet18.dreamteacher_fmnist"), zero_init_last=zero_init_last)
    student = build_backbone(recipe)
    assert all(block.bn2.weight.eq(gamma).all() for block in student.layer1)


@pytest.mark.parametrize("name", ["resnet18.dreamteacher_fmnist", "resnet50.dreamteacher_in1k",
                                  "convnext_base.dreamteacher_in1k"])
def test_every_trainable_parameter_of_each_recipes_student_gets_a_gradient(name):
    """DDP stops a run at its second step when a trainable parameter got no gradient ("expected to have finished
    reduction"): what the pyramid read never reaches (a ConvNeXt's head.norm) must be frozen, nothing else."""
    recipe = dataclasses.replace(get_recipe(name), regressor_width=8)
    model, notes = build_distiller(recipe, {s: 4 for s in (4, 8, 16, 32)})
    sum(p.sum() for p in model(torch.randn(2, 3, 64, 64))).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == (["student.head.norm.bias", "student.head.norm.weight"] if "convnext" in name else [])
    assert any("frozen at their init: head.norm.weight, head.norm.bias" in n for n in notes) == ("convnext" in name)
