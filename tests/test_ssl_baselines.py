"""The SimCLR / BYOL baselines: their stated configuration, and batched tensor views that draw lightly's
augmentations."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("lightly")

from benchmarks.experiments.ssl_baselines import (  # noqa: E402
    CJ_STRENGTH,
    MIN_SCALE,
    SETTINGS,
    build_ssl_model,
    sgd_lr,
    ssl_settings,
    ssl_transform,
    tensor_views,
    train_ssl,
)
from benchmarks.experiments.ssl_tensor_views import (  # noqa: E402
    ViewAugment,
    crop_fractions,
    decode_images,
    two_view_batches,
)

MEAN, STD = (0.3, 0.3, 0.3), (0.4, 0.4, 0.4)


def identity_view(size: int = 8, **changes) -> ViewAugment:
    settings = dict(size=size, mean=MEAN, std=STD, min_scale=1.0, brightness=0.0, contrast=0.0, cj_prob=0.0,
                    hflip_prob=0.0)
    return ViewAugment(**{**settings, **changes})


def normalised(images: torch.Tensor) -> torch.Tensor:
    x = images.float().div(255).expand(-1, 3, -1, -1)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def gray_batch(n: int = 6, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def lightly_parts(view_transform) -> dict[str, object]:
    """The named steps of one lightly view transform (its torchvision Compose)."""
    return {type(t).__name__: t for t in view_transform.transform.transforms}


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_tensor_views_draw_the_augmentations_of_lightlys_transforms(method):
    lightly_views = ssl_transform(method, 32, MEAN, STD).transforms
    for ours, theirs in zip(tensor_views(method, 32, MEAN, STD), lightly_views, strict=True):
        parts = lightly_parts(theirs)
        crop, jitter = parts["RandomResizedCrop"], parts["RandomApply"]
        assert crop.size == (ours.size, ours.size) and crop.scale == (ours.min_scale, 1.0)
        assert crop.ratio == pytest.approx((3 / 4, 4 / 3))
        assert parts["RandomHorizontalFlip"].p == ours.hflip_prob and parts["RandomVerticalFlip"].p == 0
        assert jitter.p == ours.cj_prob
        assert jitter.transforms[0].brightness == pytest.approx((1 - ours.brightness, 1 + ours.brightness))
        assert jitter.transforms[0].contrast == pytest.approx((1 - ours.contrast, 1 + ours.contrast))
        assert jitter.transforms[0].saturation is None and jitter.transforms[0].hue is None
        assert parts["RandomGrayscale"].p == 0 and parts["GaussianBlur"].prob == 0
        assert getattr(parts.get("RandomSolarization"), "prob", 0.0) == ours.solarize_prob
        assert list(parts["Normalize"].mean) == list(ours.mean) and list(parts["Normalize"].std) == list(ours.std)
    assert [v.solarize_prob for v in tensor_views(method, 32, MEAN, STD)] == ([0, 0.2] if method == "byol" else [0, 0])


def tiny_backbone() -> torch.nn.Module:
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 16))
    backbone.num_features = 16
    return backbone


def test_baselines_keep_their_stated_heads_losses_and_schedule():
    simclr = build_ssl_model("simclr", tiny_backbone())
    assert simclr.criterion.temperature == 0.5
    assert [m.out_features for m in simclr.projection_head.modules() if isinstance(m, torch.nn.Linear)] == [16, 128]
    byol = build_ssl_model("byol", tiny_backbone())
    assert not any(p.requires_grad for p in byol.backbone_momentum.parameters())
    assert not any(p.requires_grad for p in byol.projection_head_momentum.parameters())
    assert [m.out_features for m in byol.prediction_head.modules() if isinstance(m, torch.nn.Linear)] == [1024, 256]
    assert sgd_lr(128) == pytest.approx(0.06) and sgd_lr(256) == pytest.approx(0.12)
    assert CJ_STRENGTH == 0.5 and MIN_SCALE == 0.2
    with pytest.raises(ValueError, match="unknown SSL method 'moco'"):
        tensor_views("moco", 32, MEAN, STD)


def test_a_whole_image_view_is_the_normalised_image():
    images = gray_batch()
    out = identity_view()(images, torch.Generator().manual_seed(0))
    assert out.shape == (6, 3, 8, 8)
    torch.testing.assert_close(out, normalised(images), atol=1e-5, rtol=0)


def test_a_flipped_view_is_the_mirrored_image():
    images = gray_batch()
    out = identity_view(hflip_prob=1.0)(images, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, normalised(images).flip(-1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("aspect", [1.0, 0.5])
def test_crops_keep_torchvisions_area_and_aspect_ranges(aspect):
    w, h = crop_fractions(4000, 0.2, aspect, torch.Generator().manual_seed(0))
    assert bool(((w <= 1) & (h <= 1)).all())
    area = w * h
    assert float(area.min()) >= 0.2 - 1e-6 and float(area.max()) <= 1 + 1e-6
    ratio = w / (h * aspect)  # the crop's width / height in pixels
    whole = (w == 1) & (h == 1)  # the fallback after 10 misses
    assert float(ratio[~whole].min()) >= 3 / 4 - 1e-5 and float(ratio[~whole].max()) <= 4 / 3 + 1e-5
    from torchvision.transforms import RandomResizedCrop

    image = torch.zeros(1, round(64 * aspect), 64)
    torchvision_area = [h * w / (image.shape[1] * 64)
                        for _, _, h, w in (RandomResizedCrop.get_params(image, (0.2, 1.0), (3 / 4, 4 / 3))
                                           for _ in range(4000))]
    assert float(area.mean()) == pytest.approx(np.mean(torchvision_area), abs=0.02)  # its rejection bias too


def test_brightness_scales_each_image_by_one_factor_in_range():
    images = torch.full((64, 1, 4, 4), 100, dtype=torch.uint8)
    view = identity_view(size=4, brightness=0.4, cj_prob=1.0)
    x = view(images, torch.Generator().manual_seed(0)) * STD[0] + MEAN[0]
    factors = x[:, 0].flatten(1) / (100 / 255)
    assert torch.allclose(factors, factors[:, :1], atol=1e-5)
    assert float(factors.min()) >= 0.6 - 1e-5 and float(factors.max()) <= 1.4 + 1e-5
    assert float(factors.std()) > 0.1


def test_contrast_keeps_the_mean_and_scales_the_spread():
    images = torch.tensor([[80, 120], [140, 180]], dtype=torch.uint8).view(1, 1, 2, 2).repeat(32, 1, 1, 1)
    view = identity_view(size=2, contrast=0.4, cj_prob=1.0)
    x = view(images, torch.Generator().manual_seed(0)) * STD[0] + MEAN[0]
    assert torch.allclose(x.mean(dim=(1, 2, 3)), torch.full((32,), 130 / 255), atol=1e-5)
    spread = x[:, 0].flatten(1).std(dim=1) / (images[0].float() / 255).std()
    assert float(spread.min()) >= 0.6 - 1e-4 and float(spread.max()) <= 1.4 + 1e-4


def test_solarisation_inverts_values_from_128_up():
    images = torch.tensor([0, 127, 128, 255], dtype=torch.uint8).view(1, 1, 2, 2)
    x = identity_view(size=2, solarize_prob=1.0)(images, torch.Generator().manual_seed(0)) * STD[0] + MEAN[0]
    torch.testing.assert_close(x[0, 0].flatten(), torch.tensor([0, 127, 127, 0]) / 255, atol=1e-5, rtol=0)


def test_tensor_views_match_lightlys_pixel_statistics():
    """Same garment, many views: the tensor path's mean and spread of pixel values agree with lightly's PIL path."""
    yy, xx = np.mgrid[0:28, 0:28]
    garment = (((yy - 14) ** 2 + (xx - 10) ** 2 < 60) * 200 + 20).astype(np.uint8)
    image = Image.fromarray(garment, mode="L")
    lightly_views = torch.stack([ssl_transform("byol", 32, MEAN, STD)(image.convert("RGB"))[1] for _ in range(400)])
    torch.manual_seed(0)
    ours = tensor_views("byol", 32, MEAN, STD)[1](torch.from_numpy(garment)[None, None].repeat(400, 1, 1, 1),
                                                   torch.Generator().manual_seed(0))
    assert ours.shape == lightly_views.shape
    assert abs(float(ours.mean() - lightly_views.mean())) < 0.05
    assert abs(float(ours.std() - lightly_views.std())) < 0.05
    left, right = ours[..., :16].mean(), ours[..., 16:].mean()  # the garment sits left: flips even it out
    assert abs(float(left - right)) < 0.15


class TinySet:
    """A `datasets.Dataset` stand-in: gray PIL images under "image"."""

    def __init__(self, n: int, size: int = 8):
        self.images = [Image.fromarray(np.full((size, size), i, dtype=np.uint8), mode="L") for i in range(n)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Image.Image]:
        return {"image": self.images[i]}


def test_batches_are_seeded_and_cover_each_image_once_per_epoch():
    images = decode_images(TinySet(10))
    assert images.shape == (10, 1, 8, 8) and images.dtype == torch.uint8
    views = (identity_view(), identity_view())
    first = two_view_batches(images, views, 3, seed=0)
    seen = torch.cat([next(first)[0] for _ in range(3)])  # 3 batches of 3 per epoch of 10 (the last dropped)
    values = torch.round((seen[:, 0, 0, 0] * STD[0] + MEAN[0]) * 255).long()
    assert len(set(values.tolist())) == 9
    again = two_view_batches(images, views, 3, seed=0)
    second = two_view_batches(images, views, 3, seed=1)
    a, b, c = next(two_view_batches(images, views, 3, seed=0)), next(again), next(second)
    torch.testing.assert_close(a[0], b[0])
    assert not torch.equal(a[0], c[0])
    with pytest.raises(ValueError, match="10 images are fewer than one batch of 16"):
        next(two_view_batches(images, views, 16, seed=0))


@pytest.mark.parametrize("augment", ["tensor", "lightly"])
def test_train_ssl_runs_with_either_view_implementation(augment):
    import timm

    backbone = timm.create_model("resnet18", num_classes=0, pretrained=False)
    out = train_ssl("simclr", backbone, TinySet(8, size=28), steps=2, batch_size=4, input_size=16, mean=MEAN, std=STD,
                    augment=augment, progress=False)
    assert out["augment"] == augment and out["steps"] == 2 and math.isfinite(out["final_loss"])
    with pytest.raises(ValueError, match="unknown augment 'kornia'"):
        train_ssl("simclr", backbone, TinySet(8), steps=1, batch_size=4, input_size=16, mean=MEAN, std=STD,
                  augment="kornia")


def test_tuned_settings_reach_the_loss_the_target_momentum_and_the_lr():
    assert build_ssl_model("simclr", tiny_backbone(), {"temperature": 0.2}).criterion.temperature == 0.2
    byol = build_ssl_model("byol", tiny_backbone(), {"momentum_base": 0.9})
    assert byol.momentum == (0.9, 1.0)
    assert build_ssl_model("byol", tiny_backbone()).momentum == (0.99, 1.0)
    import timm

    backbone = timm.create_model("resnet18", num_classes=0, pretrained=False)
    out = train_ssl("simclr", backbone, TinySet(8, size=28), steps=1, batch_size=4, input_size=16, mean=MEAN,
                    std=STD, overrides={"lr_scale": 2, "temperature": 0.1}, progress=False)
    assert out["lr"] == pytest.approx(2 * sgd_lr(4))
    assert out["settings"] == {"temperature": 0.1, "lr_scale": 2.0}
    assert ssl_settings("byol") == SETTINGS["byol"] == {"momentum_base": 0.99, "lr_scale": 1.0}


def test_an_unknown_or_out_of_range_setting_is_refused_by_name():
    with pytest.raises(ValueError, match="byol has no setting 'temperature'; its settings: momentum_base, lr_scale"):
        ssl_settings("byol", {"temperature": 0.2})
    with pytest.raises(ValueError, match="out of range"):
        ssl_settings("byol", {"momentum_base": 1.0})
    with pytest.raises(ValueError, match="out of range"):
        ssl_settings("simclr", {"temperature": 0})
    with pytest.raises(ValueError, match="unknown SSL method 'moco'"):
        ssl_settings("moco")


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_a_run_killed_midway_resumes_from_its_checkpoint_to_the_same_weights(tmp_path, monkeypatch, caplog,
                                                                               method):
    """The seeded views are drawn again up to the checkpoint, the model (BYOL's momentum target in it), optimiser and
    schedule restored: stopped at step 5 and resumed from step 4, the weights and last loss equal a run never
    stopped."""
    data = TinySet(8)
    data.images = [Image.fromarray(a[0].numpy(), mode="L") for a in gray_batch(8)]
    kwargs = dict(steps=6, batch_size=4, input_size=2, mean=MEAN, std=STD, progress=False)
    torch.manual_seed(0)
    straight_model = tiny_backbone()
    straight = train_ssl(method, straight_model, data, **kwargs)

    checkpoint = tmp_path / "training_state.pt"
    caplog.set_level("INFO", logger="dreamteacher.bench.ssl")
    real_step, calls = torch.optim.SGD.step, []

    def killed_at_step_5(self, *args, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_step(self, *args, **kw)

    monkeypatch.setattr(torch.optim.SGD, "step", killed_at_step_5)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        train_ssl(method, tiny_backbone(), data, checkpoint=checkpoint, checkpoint_every=2, **kwargs)
    assert torch.load(checkpoint, weights_only=True)["step"] == 4
    assert f"{method}: step 4/6 saved" in caplog.text  # without a bar, each save is logged
    monkeypatch.setattr(torch.optim.SGD, "step", real_step)
    torch.manual_seed(0)
    resumed_model = tiny_backbone()
    resumed = train_ssl(method, resumed_model, data, checkpoint=checkpoint, checkpoint_every=2, **kwargs)
    for (name, a), b in zip(straight_model.state_dict().items(), resumed_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert resumed["final_loss"] == straight["final_loss"] and len(resumed["step_s"]) == 6
    assert torch.load(checkpoint, weights_only=True)["step"] == 6  # the final state too: a resume retrains nothing
    monkeypatch.setattr(torch.optim.SGD, "step", killed_at_step_5)
    calls.clear()
    again = train_ssl(method, tiny_backbone(), data, checkpoint=checkpoint, checkpoint_every=2, **kwargs)
    assert calls == [] and again["final_loss"] == straight["final_loss"]
    monkeypatch.setattr(torch.optim.SGD, "step", real_step)

    with pytest.raises(ValueError, match=r"another run's \(steps: 6 there, 7 here\)"):
        train_ssl(method, tiny_backbone(), data, checkpoint=checkpoint, **{**kwargs, "steps": 7})
    with pytest.raises(ValueError, match="only tensor views resume exactly"):
        train_ssl(method, tiny_backbone(), data, checkpoint=checkpoint, augment="lightly", **kwargs)
