"""Student levels (by stride, stem included where timm has one) and the UperNet-like feature regressor."""

import pytest
import timm
import torch

from training.distill.regressor import (
    FeatureRegressor,
    select_pyramid_indices,
    student_levels,
    student_pyramid,
)
from training.run.backbones import build_backbone

TEACHER_CHANNELS = (8, 8, 16, 16)  # stand-in for ADM's (512, 512, 1024, 1024), finest first


@pytest.mark.parametrize(("arch", "stem"), [("resnet18", True), ("resnet50", True), ("convnext_atto", False),
                                            ("efficientnet_b0", True), ("regnetx_002", True)])
def test_student_levels_by_stride_and_regressor_shapes(arch, stem):
    student = build_backbone(arch).eval()
    levels = student_levels(student, arch)
    assert sorted(levels) == ([2] if stem else []) + [4, 8, 16, 32]
    assert all(student.feature_info[i]["reduction"] == s for s, (i, _) in levels.items())
    c2_c5 = [levels[s] for s in (4, 8, 16, 32)]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = student_pyramid(student, x, [i for i, _ in c2_c5])
    assert [f.shape[1] for f in feats] == [c for _, c in c2_c5]
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]
    assert set(student.state_dict()) == set(timm.create_model(arch, num_classes=0).state_dict())  # timm's keys

    regressor = FeatureRegressor([c for _, c in c2_c5], TEACHER_CHANNELS, width=16).eval()
    with torch.no_grad():
        preds = regressor(feats)
    assert [tuple(p.shape) for p in preds] == [
        (2, c, s, s) for c, s in zip(TEACHER_CHANNELS, (16, 8, 4, 2), strict=True)
    ]


def test_levels_without_a_target_carry_the_top_down_path_only():
    feats = [torch.randn(2, c, s, s) for c, s in zip((4, 6, 8, 10), (8, 4, 2, 1), strict=True)]
    regressor = FeatureRegressor((4, 6, 8, 10), (8, 8, 0, 0), width=8)
    preds = regressor(feats)
    assert [tuple(p.shape) for p in preds] == [(2, 8, 8, 8), (2, 8, 4, 4)]
    assert set(regressor.head) == {"0", "1"} and set(regressor.fpn_out) == {"0", "1"}
    sum(p.square().mean() for p in preds).backward()
    # the unpaired C4/C5 still shape the predictions: their lateral conv and the PPM get gradients
    assert regressor.lateral[2][0].weight.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in regressor.ppm.parameters())


def test_top_down_path_carries_coarse_context_into_the_finest_prediction():
    """Changing only C5 changes the C2 prediction: the FPN's top-down path is really there."""
    torch.manual_seed(0)
    regressor = FeatureRegressor((4, 6, 8, 10), TEACHER_CHANNELS, width=8).eval()
    feats = [torch.randn(2, c, s, s) for c, s in zip((4, 6, 8, 10), (8, 4, 2, 1), strict=True)]
    with torch.no_grad():
        before = regressor(feats)[0]
        after = regressor([*feats[:3], feats[3] + 1.0])[0]
    assert not torch.allclose(before, after)


def test_gradients_reach_every_regressor_parameter_with_1x1_c5():
    student = build_backbone("resnet18")
    levels = student_levels(student)
    feats = student_pyramid(student, torch.randn(2, 3, 32, 32), [levels[s][0] for s in (4, 8, 16, 32)])
    assert tuple(feats[-1].shape[-2:]) == (1, 1)  # PPM pools a 1x1 map to 6x6
    regressor = FeatureRegressor([levels[s][1] for s in (4, 8, 16, 32)], TEACHER_CHANNELS, width=8)
    preds = regressor(feats)
    sum(p.square().mean() for p in preds).backward()
    missing = [n for n, p in regressor.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


def test_select_pyramid_indices_picks_by_stride():
    assert select_pyramid_indices([2, 4, 8, 16, 32]) == (1, 2, 3, 4)  # resnet
    assert select_pyramid_indices([4, 8, 16, 32]) == (0, 1, 2, 3)  # convnext
    assert select_pyramid_indices([2, 4, 4, 8, 16, 32, 32]) == (2, 3, 4, 6)  # deepest tap of a repeated stride


def test_arch_without_pyramid_is_rejected_with_its_reductions():
    with pytest.raises(ValueError, match=r"toy.*stride\(s\) \[16, 32\].*\[2, 4, 8\]"):
        select_pyramid_indices([2, 4, 8], arch="toy")
    with pytest.raises(ValueError, match=r"vit_tiny_patch16_224.*\[16, 16, 16"):
        student_levels(build_backbone("vit_tiny_patch16_224", img_size=32), "vit_tiny_patch16_224")


def test_regressor_rejects_wrong_inputs():
    with pytest.raises(ValueError, match="one out_channels entry"):
        FeatureRegressor((4, 6, 8), TEACHER_CHANNELS)
    with pytest.raises(ValueError, match="no level has a target"):
        FeatureRegressor((4, 6), (0, 0))
    regressor = FeatureRegressor((4, 6, 8, 10), TEACHER_CHANNELS, width=8)
    with pytest.raises(ValueError, match=r"channels \(4, 6, 8, 10\)"):
        regressor([torch.randn(2, 5, 4, 4)] * 4)


def test_fpn_adds_the_bilinearly_upsampled_coarser_map_to_each_lateral():
    """The forward pass equals UperNet's wiring written out with the regressor's own blocks: PPM on C5, then for
    each finer level lateral(C_i) + upsample(merged_{i+1}) (bilinear, align_corners=False), then the level's
    output conv and its head; the coarsest level's head reads the PPM output directly."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    regressor = FeatureRegressor((4, 6, 8, 10), TEACHER_CHANNELS, width=8).eval()
    feats = [torch.randn(2, c, s, s) for c, s in zip((4, 6, 8, 10), (16, 8, 4, 2), strict=True)]
    with torch.no_grad():
        merged = [regressor.ppm(feats[3])]
        for i in (2, 1, 0):
            x = regressor.lateral[i](feats[i])
            merged.insert(0, x + F.interpolate(merged[0], size=x.shape[-2:], mode="bilinear", align_corners=False))
        expected = [regressor.head[str(i)](regressor.fpn_out[str(i)](merged[i])) for i in (0, 1, 2)]
        expected.append(regressor.head["3"](merged[3]))
        for got, want in zip(regressor(feats), expected, strict=True):
            torch.testing.assert_close(got, want)


def test_pyramid_pooling_pools_each_branch_to_its_bin_and_the_width_defaults_to_the_papers_256():
    regressor = FeatureRegressor((4, 6, 8, 10), TEACHER_CHANNELS)
    x = torch.randn(2, 10, 12, 12)
    assert [tuple(stage(x).shape[-2:]) for stage in regressor.ppm.stages] == [(1, 1), (2, 2), (3, 3), (6, 6)]
    assert regressor.ppm(x).shape == (2, 256, 12, 12)


def test_build_backbone_passes_timm_arguments_on(monkeypatch):
    calls = []
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **kw: calls.append((a, kw)) or real(a[0]))
    build_backbone("resnet18", zero_init_last=False)
    assert calls == [(("resnet18",), {"pretrained": False, "num_classes": 0, "zero_init_last": False})]


def test_a_model_without_timm_feature_info_is_rejected_by_name():
    class OnlyIntermediates(torch.nn.Module):
        def forward_intermediates(self, x):
            return [x]

    with pytest.raises(ValueError, match="^toy has no forward_intermediates/feature_info"):
        student_levels(OnlyIntermediates(), "toy")
    resnet = timm.create_model("resnet18", num_classes=0)
    resnet.feature_info = [dict(reduction=r, num_chs=8) for r in (2, 4, 8)]
    with pytest.raises(ValueError, match=r"^toy has no feature level at stride\(s\) \[16, 32\]"):
        student_levels(resnet, "toy")


def test_in_training_the_lateral_blocks_normalise_so_a_levels_scale_does_not_matter():
    """Each conv is followed by BatchNorm: in train mode the predictions ignore a positive scale of each level that
    enters through a lateral conv (C5 enters the PPM's fusion conv raw, beside its pooled branches)."""
    torch.manual_seed(0)
    regressor = FeatureRegressor((4, 6, 8, 10), TEACHER_CHANNELS, width=8).train()
    feats = [torch.randn(4, c, s, s) for c, s in zip((4, 6, 8, 10), (8, 4, 2, 2), strict=True)]
    scaled = [f * k for f, k in zip(feats, (30.0, 0.1, 7.0, 1.0), strict=True)]
    with torch.no_grad():
        for a, b in zip(regressor(feats), regressor(scaled), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_regressor_without_top_down_reads_each_level_from_itself_alone():
    import torch

    from training.distill.regressor import FeatureRegressor

    reg = FeatureRegressor([8, 16], [5, 6], width=4, top_down=False).eval()
    fine, coarse = torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)
    out = reg([fine, coarse])
    assert [tuple(o.shape) for o in out] == [(2, 5, 8, 8), (2, 6, 4, 4)]
    changed = reg([fine, torch.randn(2, 16, 4, 4)])
    assert torch.equal(out[0], changed[0])  # the fine prediction does not see the coarse level
    assert not hasattr(reg, "ppm")
    with pytest.raises(ValueError, match="every level needs a target"):
        FeatureRegressor([8, 16], [5, 0], top_down=False)


def test_recipe_without_top_down_builds_a_distiller_of_its_paired_levels():
    from dataclasses import replace

    from dreamteacher_models.recipes import get_recipe
    from training.distill.distiller import build_distiller

    recipe = replace(get_recipe("resnet18.dreamteacher_fmnist"), regressor_top_down=False, pairs=((4, 4), (8, 8)))
    distiller, _ = build_distiller(recipe, {4: 6, 8: 7})
    preds = distiller(__import__("torch").randn(2, 3, 32, 32))
    assert [tuple(p.shape) for p in preds] == [(2, 6, 8, 8), (2, 7, 4, 4)]
    assert len(distiller.indices) == 2  # C4 and C5 unpaired: not read, so nothing of theirs trains
    assert not any(p.requires_grad for n, p in distiller.student.named_parameters() if n.startswith("layer4"))
