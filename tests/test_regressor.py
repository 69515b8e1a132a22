"""Student taps (C2..C5 by stride) and the UperNet-like feature regressor."""

import pytest
import timm
import torch

from training.regressor import FeatureRegressor, build_student, pyramid_taps, select_pyramid_indices, student_pyramid

TEACHER_CHANNELS = (8, 8, 16, 16)  # stand-in for ADM's (512, 512, 1024, 1024), finest first


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "convnext_atto", "efficientnet_b0", "regnetx_002"])
def test_student_taps_strides_4_to_32_and_regressor_shapes(arch):
    student = build_student(arch).eval()
    indices, channels = pyramid_taps(student, arch)
    assert [student.feature_info[i]["reduction"] for i in indices] == [4, 8, 16, 32]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = student_pyramid(student, x, indices)
    assert [f.shape[1] for f in feats] == list(channels)
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]
    assert set(student.state_dict()) == set(timm.create_model(arch, num_classes=0).state_dict())  # timm's keys

    regressor = FeatureRegressor(channels, TEACHER_CHANNELS, width=16).eval()
    with torch.no_grad():
        preds = regressor(feats)
    assert [tuple(p.shape) for p in preds] == [
        (2, c, s, s) for c, s in zip(TEACHER_CHANNELS, (16, 8, 4, 2), strict=True)
    ]


def test_target_sizes_resize_to_teacher_maps():
    feats = [torch.randn(2, c, s, s) for c, s in zip((4, 6, 8, 10), (8, 4, 2, 1), strict=True)]
    regressor = FeatureRegressor((4, 6, 8, 10), TEACHER_CHANNELS, width=8)
    sizes = [(16, 16), (8, 8), (8, 8), (4, 6)]  # teacher at 2x, 2x, 4x and a non-square map
    preds = regressor(feats, target_sizes=sizes)
    assert [tuple(p.shape[-2:]) for p in preds] == sizes
    assert [p.shape[1] for p in preds] == list(TEACHER_CHANNELS)


def test_gradients_reach_every_regressor_parameter_with_1x1_c5():
    student = build_student("resnet18")
    indices, channels = pyramid_taps(student)
    feats = student_pyramid(student, torch.randn(2, 3, 32, 32), indices)
    assert tuple(feats[-1].shape[-2:]) == (1, 1)  # PPM pools a 1x1 map to 6x6
    regressor = FeatureRegressor(channels, TEACHER_CHANNELS, width=8)
    preds = regressor(feats, target_sizes=[(16, 16), (8, 8), (4, 4), (2, 2)])
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
        build_student("vit_tiny_patch16_224", img_size=32)


def test_regressor_rejects_wrong_inputs():
    with pytest.raises(ValueError, match="4 levels"):
        FeatureRegressor((4, 6, 8), TEACHER_CHANNELS)
    regressor = FeatureRegressor((4, 6, 8, 10), TEACHER_CHANNELS, width=8)
    with pytest.raises(ValueError, match=r"channels \(4, 6, 8, 10\)"):
        regressor([torch.randn(2, 5, 4, 4)] * 4)
