"""Properties of the DreamTeacher losses that break if a reduction, a norm axis or a sign is wrong."""

import math

import pytest
import torch

from training.distill.losses import (
    attention_map,
    attention_transfer_loss,
    feature_distillation_loss,
    feature_mse_loss,
    layer_norm_features,
)
from training.labels.losses import dice_loss, soft_cross_entropy_loss


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def _affine_per_sample(t, gen):
    """A positive scale and a shift per sample, (B, 1, 1, 1) each."""
    b = t.shape[0]
    return t * (torch.rand(b, 1, 1, 1, generator=gen) * 5 + 0.1) + torch.randn(b, 1, 1, 1, generator=gen) * 3


def test_layer_norm_axes(gen):
    f = torch.randn(2, 3, 4, 5, generator=gen) * 7 + 2
    chw = layer_norm_features(f, "chw")
    assert torch.allclose(chw.mean(dim=(1, 2, 3)), torch.zeros(2), atol=1e-5)
    assert torch.allclose(chw.var(dim=(1, 2, 3), unbiased=False), torch.ones(2), atol=1e-4)
    c = layer_norm_features(f, "c")
    assert torch.allclose(c.mean(dim=1), torch.zeros(2, 4, 5), atol=1e-5)
    assert torch.allclose(c.var(dim=1, unbiased=False), torch.ones(2, 4, 5), atol=1e-3)
    with pytest.raises(ValueError, match=r"'hw'.*\['c', 'chw'\]"):
        layer_norm_features(f, "hw")
    assert torch.equal(layer_norm_features(f), chw)  # per sample over (C, H, W) unless told otherwise


def test_layer_norm_of_a_constant_map_is_zero_not_nan():
    assert torch.equal(layer_norm_features(torch.full((1, 2, 3, 3), 4.0)), torch.zeros(1, 2, 3, 3))


@pytest.mark.parametrize("axes", ["chw", "c"])
def test_mse_zero_at_layer_normed_teacher(gen, axes):
    teacher = torch.randn(2, 6, 4, 4, generator=gen) * 10 + 5
    assert feature_mse_loss(layer_norm_features(teacher, axes), teacher, axes) < 1e-10
    assert feature_mse_loss(teacher, teacher, axes) > 1.0


def test_mse_invariant_to_per_sample_affine_teacher(gen):
    student, teacher = torch.randn(2, 2, 6, 4, 4, generator=gen)
    base = feature_mse_loss(student, teacher)
    assert torch.allclose(feature_mse_loss(student, _affine_per_sample(teacher, gen)), base, rtol=1e-4)


def test_mse_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"^feature_mse_loss: .*\(2, 6, 4, 4\).*\(2, 6, 8, 8\)"):
        feature_mse_loss(torch.zeros(2, 6, 4, 4), torch.zeros(2, 6, 8, 8))


def test_attention_map_is_unit_norm_energy(gen):
    f = torch.randn(2, 5, 3, 4, generator=gen)
    q = attention_map(f)
    assert q.shape == (2, 12)
    assert torch.allclose(q.norm(dim=1), torch.ones(2))
    assert torch.allclose(q, torch.nn.functional.normalize(f.square().sum(1).flatten(1), dim=1))


def test_attention_transfer_hand_computed():
    # sample 0: Q_s = [25, 0] -> [1, 0]; Q_t = [4, 4] -> [1, 1]/sqrt2; ||diff||_2 = sqrt(2 - sqrt2). sample 1: equal.
    student = torch.tensor([[[[3.0, 0.0]], [[4.0, 0.0]]], [[[1.0, 1.0]], [[0.0, 0.0]]]])  # (2, 2, 1, 2)
    teacher = torch.tensor([[[[2.0, -2.0]]], [[[5.0, 5.0]]]])  # (2, 1, 1, 2): channel counts may differ
    expected = math.sqrt(2 - math.sqrt(2)) / 2  # p-norm per sample, mean over the batch
    assert attention_transfer_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)


def test_attention_transfer_zero_for_same_map_and_scale_invariant(gen):
    s, t = torch.randn(2, 2, 4, 4, 4, generator=gen)
    s.requires_grad_(True)
    zero = attention_transfer_loss(s, s.detach().clone())
    zero.backward()
    assert zero.item() < 1e-6 and torch.isfinite(s.grad).all()
    base = attention_transfer_loss(s, t)
    scale = torch.rand(2, 1, 1, 1, generator=gen) * 5 + 0.1
    assert torch.allclose(attention_transfer_loss(s * scale, t), base, rtol=1e-4)
    assert torch.allclose(attention_transfer_loss(s, t * scale), base, rtol=1e-4)
    assert 0 < base <= math.sqrt(2)
    with pytest.raises(ValueError, match=r"\(2, 4, 4, 4\).*\(2, 4, 2, 2\)"):
        attention_transfer_loss(s, t[..., :2, :2])


def test_feature_distillation_keys_and_total(gen):
    shapes = [(2, 4, 8, 8), (2, 8, 4, 4)]
    students = [torch.randn(*sh, generator=gen, requires_grad=True) for sh in shapes]
    teachers = [torch.randn(*sh, generator=gen) * 4 + 1 for sh in shapes]
    out = feature_distillation_loss(students, teachers)
    assert set(out) == {"loss", "mse", "at", "mse/level0", "mse/level1", "at/level0", "at/level1"}
    assert torch.allclose(out["loss"], out["mse"] + 10 * out["at"])
    assert torch.allclose(out["mse"], (out["mse/level0"] + out["mse/level1"]) / 2)
    assert torch.allclose(out["at"], (out["at/level0"] + out["at/level1"]) / 2)
    assert torch.allclose(out["mse/level1"], feature_mse_loss(students[1], teachers[1]))
    assert torch.allclose(out["at/level0"], attention_transfer_loss(students[0], teachers[0]))
    weighted = feature_distillation_loss(students, teachers, at_weight=2.0, mse_weight=0.5)
    assert torch.allclose(weighted["loss"], 0.5 * out["mse"] + 2.0 * out["at"])
    out["loss"].backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in students)


def test_feature_distillation_invariant_to_teacher_scale(gen):
    students = [torch.randn(2, 4, 8, 8, generator=gen)]
    teachers = [torch.randn(2, 4, 8, 8, generator=gen)]
    scaled = [teachers[0] * (torch.rand(2, 1, 1, 1, generator=gen) * 5 + 0.1)]
    a, b = feature_distillation_loss(students, teachers), feature_distillation_loss(students, scaled)
    assert all(torch.allclose(a[k], b[k], rtol=1e-4) for k in a)
    with pytest.raises(ValueError, match="1 and 2"):
        feature_distillation_loss(students, teachers * 2)


def test_soft_cross_entropy_minimised_at_teacher(gen):
    teacher = torch.randn(2, 5, 3, 3, generator=gen) * 3
    student = teacher.clone().requires_grad_(True)
    loss = soft_cross_entropy_loss(student, teacher, temperature=4.0)
    loss.backward()
    assert student.grad.abs().max() < 1e-6
    p_t = torch.softmax(teacher / 4.0, dim=1)
    entropy = -(p_t * p_t.log()).sum(1).mean()
    assert loss.item() == pytest.approx(16 * entropy.item(), rel=1e-5)  # scaled by T^2
    perturbed = teacher + torch.randn(2, 5, 3, 3, generator=gen)
    assert soft_cross_entropy_loss(perturbed, teacher) > loss


def test_dice_perfect_wrong_and_ignored():
    target = torch.tensor([[[0, 1], [2, 255]]])  # (1, 2, 2), one ignored pixel
    logits = torch.nn.functional.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2).float() * 100
    logits[0, :, 1, 1] = torch.tensor([0.0, 0.0, 100.0])  # ignored pixel predicted as a class: must not count
    assert dice_loss(logits, target, ignore_index=255).item() == pytest.approx(0.0, abs=1e-6)
    wrong = logits.roll(1, dims=1)
    assert dice_loss(wrong, target, ignore_index=255) > 0.5
    with pytest.raises(ValueError, match=r"\[0, 3\).*255"):
        dice_loss(logits, target)


def test_a_1x1_level_has_no_attention_transfer_term(gen):
    """A single position's attention is always 1: the AT term would be a constant, so it is left out and the AT mean
    runs over the other levels."""
    students = [torch.randn(2, 4, 4, 4, generator=gen), torch.randn(2, 4, 1, 1, generator=gen)]
    teachers = [torch.randn(2, 4, 4, 4, generator=gen), torch.randn(2, 4, 1, 1, generator=gen)]
    out = feature_distillation_loss(students, teachers)
    assert "at/level1" not in out and "mse/level1" in out
    assert torch.equal(out["at"], out["at/level0"])
    only_1x1 = feature_distillation_loss(students[1:], teachers[1:])
    assert only_1x1["at"] == 0 and torch.equal(only_1x1["loss"], only_1x1["mse"])


def test_the_recipes_loss_settings_reach_the_loss(gen):
    """distillation_loss passes the recipe's norm_axes and weights on: each one changes the result."""
    from dreamteacher_models.recipes import LossConfig
    from training.distill.pairing import LevelPair

    pairs = [LevelPair(student_stride=4, teacher_stride=4, teacher_channels=3)]
    predictions = [torch.randn(2, 3, 4, 4, generator=gen)]
    teacher = {4: torch.randn(2, 3, 4, 4, generator=gen) * torch.linspace(0.5, 2, 4)}  # a per-pixel scale

    def total(**kw):
        from training.distill.distiller import distillation_loss

        return distillation_loss(predictions, teacher, pairs, LossConfig(**kw))["loss"].item()

    base = total()
    assert total(norm_axes="c") != pytest.approx(base)
    assert total(at_weight=0.0) != pytest.approx(base)
    assert total(mse_weight=2.0) != pytest.approx(base)


def test_attention_transfer_at_p4_uses_p_for_the_map_and_the_norm(gen):
    student, teacher = torch.randn(2, 2, 3, 4, 4, generator=gen)

    def q(f):
        q = f.abs().pow(4).sum(1).flatten(1)
        return q / q.norm(dim=1, keepdim=True)

    expected = (q(student) - q(teacher)).abs().pow(4).sum(1).pow(0.25).mean()
    assert attention_transfer_loss(student, teacher, p=4).item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_two_pixel_level_has_an_attention_transfer_term(gen):
    students, teachers = [torch.randn(2, 4, 1, 2, generator=gen)], [torch.randn(2, 4, 1, 2, generator=gen)]
    out = feature_distillation_loss(students, teachers)
    assert out["at"] > 0 and torch.equal(out["at"], out["at/level0"])


@pytest.mark.parametrize("shape", [(3, 5), (3, 5, 7)])
def test_soft_cross_entropy_equals_the_reference_formula_on_any_layout(gen, shape):
    """Classes on dim 1 for (B, K) and (B, K, N) too; the default temperature is the paper's 4."""
    student, teacher = torch.randn(2, *shape, generator=gen) * 3
    for temperature in (None, 2.0):
        t = 4.0 if temperature is None else temperature
        reference = -(torch.softmax(teacher / t, 1) * torch.log_softmax(student / t, 1)).sum(1).mean() * t * t
        kwargs = {} if temperature is None else {"temperature": temperature}
        assert soft_cross_entropy_loss(student, teacher, **kwargs).item() == pytest.approx(reference.item(), rel=1e-5)
    with pytest.raises(ValueError, match="^soft_cross_entropy_loss: "):
        soft_cross_entropy_loss(student, teacher[:1])


def test_dice_counts_classes_absent_from_the_target_and_checks_shapes_and_ids():
    target = torch.tensor([[[0, 1], [1, 0]]])  # 4 classes, only 0 and 1 present
    perfect = torch.nn.functional.one_hot(target, 4).permute(0, 3, 1, 2).float() * 100
    assert dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 4\).*\[0, 4\]"):
        dice_loss(perfect, torch.tensor([[[0, 1], [4, 0]]]))
    with pytest.raises(ValueError, match="must be \\(B, K, H, W\\)"):
        dice_loss(perfect, target[:, :1])  # 4-D logits, but a target of another size
