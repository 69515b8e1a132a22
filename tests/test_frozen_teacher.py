"""The frozen teacher (training/teacher/frozen.py): noise and DDIM encoding, the student's normalisation, early
stop, resolution, dtype and device, freezing, latent teachers, and every constructor and input error.

Every model here is a tiny random one built from a config dict and saved to tmp_path: no Hub, no GPU.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from torch import nn

from dreamteacher_models.recipes import IMAGENET_MEAN, IMAGENET_STD, TeacherConfig
from tests.tiny import MEAN, STD, TINY_UNET, hooked_forward, teacher_config, tiny_images
from training.teacher.build import build_teacher
from training.teacher.frozen import FrozenTeacher
from training.teacher.prompt import EMPTY_PROMPT_FILE, EMPTY_PROMPT_KEY, save_empty_prompt_embedding

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel  # noqa: E402

# ---------------------------------------------------------------------------------------- encoding


def test_fresh_noise_every_call_and_seeded_generator_reproduces(teacher):
    _, images = tiny_images()
    a, b = teacher(images), teacher(images)
    assert all(not torch.allclose(a[s], b[s]) for s in a)
    c = teacher(images, torch.Generator().manual_seed(7))
    d = teacher(images, torch.Generator().manual_seed(7))
    assert all(torch.equal(c[s], d[s]) for s in c)


def test_student_normalisation_equals_minus_one_one_input(teacher):
    """Images in the recipe's mean/std give the same features as [-1, 1] images noised and fed to the UNet."""
    x01, images = tiny_images()
    feats = teacher(images, torch.Generator().manual_seed(3))
    x0 = 2 * x01 - 1
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    t = torch.full((2,), 50)
    ref = hooked_forward(teacher.unet, [x.name for x in teacher.taps], teacher.scheduler.add_noise(x0, eps, t), t)
    for tap in teacher.taps:
        torch.testing.assert_close(feats[tap.stride], ref[tap.name], rtol=1e-5, atol=1e-5)


def test_one_channel_unet_sees_rgb_average():
    torch.manual_seed(0)
    unet = UNet2DModel(**{**TINY_UNET, "in_channels": 1, "out_channels": 1})
    t = FrozenTeacher(unet, DDPMScheduler(), 50, IMAGENET_MEAN, IMAGENET_STD)
    x01, images = tiny_images(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    feats = t(images, torch.Generator().manual_seed(0))
    x0 = (2 * x01 - 1).mean(1, keepdim=True)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    tt = torch.full((2,), 50)
    ref = hooked_forward(unet, [x.name for x in t.taps], t.scheduler.add_noise(x0, eps, tt), tt)
    for tap in t.taps:
        torch.testing.assert_close(feats[tap.stride], ref[tap.name], rtol=1e-5, atol=1e-5)


def test_early_stop_equals_full_pass_and_skips_the_tail(teacher):
    _, images = tiny_images()
    calls = []
    h = teacher.unet.conv_out.register_forward_hook(lambda *a: calls.append(1))
    try:
        early = teacher(images, torch.Generator().manual_seed(1))
        assert calls == []  # the output conv never ran
        teacher.early_stop = False
        full = teacher(images, torch.Generator().manual_seed(1))
        assert calls == [1]
    finally:
        teacher.early_stop = True
        h.remove()
    assert early.keys() == full.keys()
    assert all(torch.equal(early[s], full[s]) for s in early)


def test_a_teacher_built_with_defaults_stops_after_its_last_tap(unet_dir):
    unet = UNet2DModel.from_pretrained(unet_dir / "unet")
    teacher = FrozenTeacher(unet, DDPMScheduler.from_pretrained(unet_dir / "scheduler"), 50, MEAN, STD)
    calls = []
    unet.conv_out.register_forward_hook(lambda *a: calls.append(1))
    teacher(tiny_images()[1])
    assert calls == [] and teacher.early_stop  # the output conv, after every tap, never ran


def test_ddim_encoding_is_deterministic_and_exact_for_an_oracle(unet_dir, monkeypatch):
    t = build_teacher(teacher_config(unet_dir, encoding="ddim"), MEAN, STD, ddim_steps=3)
    _, images = tiny_images()
    a = t(images, torch.Generator().manual_seed(0))
    b = t(images, torch.Generator().manual_seed(1))  # the generator plays no part
    assert all(torch.equal(a[s], b[s]) for s in a)
    # With a model that predicts the true eps, DDIM inversion lands exactly on add_noise(x0, eps, t).
    x0 = torch.randn(2, 3, 32, 32)
    eps = torch.randn(2, 3, 32, 32)
    monkeypatch.setattr(t, "_epsilon", lambda x, step: eps)
    torch.testing.assert_close(t.ddim_invert(x0), t.scheduler.add_noise(x0, eps, torch.tensor([50])))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "epsilon+sigma"])
def test_every_prediction_type_converts_to_the_true_noise(monkeypatch, prediction_type):
    """_epsilon with an oracle UNet that predicts its target exactly (eps, v or x0; ADM's learn_sigma doubles the
    channels) returns the true noise."""
    scheduler = DDPMScheduler(num_train_timesteps=500, prediction_type=prediction_type.split("+")[0])
    t = FrozenTeacher(UNet2DModel(**TINY_UNET), scheduler, 50, MEAN, STD, encoding="ddim")
    x0, eps = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    a = float(scheduler.alphas_cumprod[30])
    xt = a**0.5 * x0 + (1 - a) ** 0.5 * eps
    target = {"v_prediction": a**0.5 * eps - (1 - a) ** 0.5 * x0, "sample": x0}.get(t.prediction_type, eps)
    if "sigma" in prediction_type:
        target = torch.cat([eps, torch.full_like(eps, 7.0)], 1)

    def oracle(x, steps):
        assert steps.dtype == torch.long and steps.tolist() == [30, 30]
        return target

    monkeypatch.setattr(t, "_unet", oracle)
    torch.testing.assert_close(t._epsilon(xt, 30), eps, rtol=1e-4, atol=1e-4)


def test_ddim_inversion_visits_equally_spaced_timesteps_from_zero(unet_dir, monkeypatch):
    t = build_teacher(teacher_config(unet_dir, encoding="ddim"), MEAN, STD, ddim_steps=3)
    visited = []
    monkeypatch.setattr(t, "_epsilon", lambda x, step: visited.append(step) or torch.zeros_like(x))
    t.ddim_invert(torch.randn(1, 3, 8, 8))
    assert visited == [0, 17, 33]  # round(linspace(0, 50, 4)) without its end


def test_an_unknown_prediction_type_is_refused_by_ddim():
    scheduler = DDPMScheduler(num_train_timesteps=500)
    scheduler.register_to_config(prediction_type="flow")
    t = FrozenTeacher(UNet2DModel(**TINY_UNET), scheduler, 50, MEAN, STD, encoding="ddim")
    assert t.prediction_type == "flow"
    with pytest.raises(ValueError, match="DDIM inversion does not support prediction_type 'flow'"):
        t(torch.zeros(1, 3, 32, 32))


# ----------------------------------------------------------------------- resolution, dtype, device


def test_resolution_resizes_input_and_features_follow_the_input_grid(unet_dir):
    t = build_teacher(teacher_config(unet_dir, resolution=64), MEAN, STD)
    assert t.run_size((32, 32)) == (64, 64)
    feats = t(tiny_images()[1])
    assert {s: tuple(f.shape) for s, f in feats.items()} == {1: (2, 8, 32, 32), 2: (2, 16, 16, 16),
                                                             4: (2, 16, 8, 8), 8: (2, 16, 4, 4)}
    with pytest.raises(ValueError, match="not a multiple of 8"):
        build_teacher(teacher_config(unet_dir), MEAN, STD)(torch.zeros(1, 3, 36, 36))


def test_a_set_resolution_resamples_like_a_manual_antialiased_pipeline(unet_dir):
    """Non-square 4x12 images encoded at 32x32: the image is resized up (bilinear, antialias, no corner alignment),
    and each tap resized back to the image's grid, never below one pixel."""
    t = build_teacher(teacher_config(unet_dir, resolution=32), MEAN, STD)
    x01 = torch.rand(2, 3, 4, 12, generator=torch.Generator().manual_seed(5))
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    feats = t((x01 - m) / s, torch.Generator().manual_seed(1))
    assert {k: tuple(v.shape[-2:]) for k, v in feats.items()} == {1: (4, 12), 2: (2, 6), 4: (1, 3), 8: (1, 1)}

    def resize(x, size):
        return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)

    x0 = resize(2 * x01 - 1, (32, 32))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    steps = torch.full((2,), 50)
    ref = hooked_forward(t.unet, [x.name for x in t.taps], t.scheduler.add_noise(x0, eps, steps), steps)
    for tap in t.taps:
        torch.testing.assert_close(feats[tap.stride], resize(ref[tap.name], feats[tap.stride].shape[-2:]),
                                   rtol=1e-5, atol=1e-5)


def test_bf16_autocast_and_channels_last_stay_close_to_fp32(unet_dir):
    _, images = tiny_images()
    config = teacher_config(unet_dir)
    ref = build_teacher(config, MEAN, STD)(images, torch.Generator().manual_seed(0))
    cl = build_teacher(config, MEAN, STD, channels_last=True)(images, torch.Generator().manual_seed(0))
    bf = build_teacher(config, MEAN, STD, dtype=torch.bfloat16)(images, torch.Generator().manual_seed(0))
    for s in ref:
        torch.testing.assert_close(cl[s], ref[s], rtol=1e-4, atol=1e-4)
        assert bf[s].dtype == torch.float32
        assert 0 < (bf[s] - ref[s]).norm() / ref[s].norm() < 0.05  # bf16 really on (not silently fp32), and close


@pytest.mark.parametrize("encoding, resolution", [("noise", None), ("ddim", None), ("noise", 64)])
def test_every_tensor_the_teacher_makes_lives_on_its_device(unet_dir, latent_dir, encoding, resolution):
    """A teacher on the meta device (shapes only, no memory): a noise draw, timestep or normalisation left on the
    CPU, where the test machine cannot tell it from the GPU, makes the forward fail."""
    config = teacher_config(unet_dir, encoding=encoding, resolution=resolution)
    teacher = build_teacher(config, MEAN, STD, device="meta", ddim_steps=2)
    out = teacher(tiny_images()[1], generator=torch.Generator().manual_seed(0))
    assert {s: (f.device.type, f.dtype, tuple(f.shape)) for s, f in out.items()} == {
        t.stride: ("meta", torch.float32, (2, t.channels, 32 // t.stride, 32 // t.stride)) for t in teacher.taps}
    latent = build_teacher(dataclasses.replace(teacher_config(latent_dir, kind="latent"), encoding=encoding), MEAN, STD,
                             device="meta", ddim_steps=2)
    assert {f.device.type for f in latent(tiny_images(size=64)[1]).values()} == {"meta"}


# ------------------------------------------------------------------------------------------ frozen


def test_frozen_no_grad_and_not_a_student_parameter(teacher):
    assert all(not p.requires_grad for p in teacher.parameters())
    student = nn.Conv2d(3, 8, 1)
    student.teacher = teacher  # a plain object: never registered as a submodule
    assert [n for n, _ in student.named_parameters()] == ["weight", "bias"]

    teacher.unet.train()  # someone flips it: the teacher still runs in eval mode
    _, images = tiny_images()
    images.requires_grad_(True)
    feats = teacher(images)
    assert not teacher.unet.training
    assert all(not f.requires_grad and f.grad_fn is None for f in feats.values())
    loss = ((student(images) - feats[1]) ** 2).mean()
    loss.backward()
    assert images.grad is not None and student.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


# ------------------------------------------------------------------------------- bounds and errors


def test_timestep_and_ddim_step_bounds_are_inclusive_where_they_should_be():
    unet = UNet2DModel(**TINY_UNET)
    scheduler = DDPMScheduler(num_train_timesteps=500)
    for ok in (0, 499):
        assert FrozenTeacher(unet, scheduler, ok, MEAN, STD).timestep == ok
    for bad in (-1, 500):
        with pytest.raises(ValueError, match=rf"teacher timestep {bad} is outside the scheduler's range \[0, 499\]$"):
            FrozenTeacher(unet, scheduler, bad, MEAN, STD)
    assert FrozenTeacher(unet, scheduler, 9, MEAN, STD, encoding="ddim", ddim_steps=1).ddim_steps == 1
    with pytest.raises(ValueError, match="ddim_steps must be >= 1, got 0"):
        FrozenTeacher(unet, scheduler, 9, MEAN, STD, encoding="ddim", ddim_steps=0)


def test_every_constructor_and_input_error_names_the_bad_value(unet_dir, tmp_path):
    unet = UNet2DModel.from_pretrained(unet_dir / "unet")
    scheduler = DDPMScheduler.from_pretrained(unet_dir / "scheduler")

    def frozen(**kw):
        return FrozenTeacher(unet, scheduler, kw.pop("timestep", 50), kw.pop("mean", MEAN), kw.pop("std", STD), **kw)

    with pytest.raises(ValueError, match=r"^unknown teacher encoding 'ddpm'; choose 'noise' \(the paper's\) or "
                                         r"'ddim'$"):
        frozen(encoding="ddpm")
    with pytest.raises(ValueError, match=r"^teacher dtype must be float32, bfloat16 or float16 \(autocast\), got "
                                         r"torch\.float64$"):
        frozen(dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^mean \(0\.5, 0\.5\) and std \(0\.5,\) must have the same length$"):
        frozen(mean=(0.5, 0.5), std=(0.5,))
    with pytest.raises(ValueError, match=r"^teacher timestep -1 is outside the scheduler's range \[0, 499\]$"):
        frozen(timestep=-1)
    assert frozen(timestep=0).timestep == 0 and frozen(timestep=499).timestep == 499  # both ends are allowed
    # ADM's block number and the module path it stands for are the same tap
    with pytest.raises(ValueError, match=r"^teacher taps \['output_blocks\.3', 'up_blocks\.1\.resnets\.1'\] name the "
                                         r"same module twice \(resolved: \['up_blocks\.1\.resnets\.1', "
                                         r"'up_blocks\.1\.resnets\.1'\]\)$"):
        frozen(taps=("output_blocks.3", "up_blocks.1.resnets.1"))
    # ResnetBlock2D applies its one SiLU module twice
    with pytest.raises(ValueError, match=r"^teacher tap 'up_blocks\.0\.resnets\.0\.nonlinearity' runs more than once "
                                         r"per UNet forward; pick another module$"):
        frozen(taps=("up_blocks.0.resnets.0.nonlinearity",))
    unet.unused = nn.Conv2d(3, 3, 1)  # a module the forward never calls
    try:
        with pytest.raises(ValueError, match=r"^teacher taps \['unused'\] never run in this UNet's forward$"):
            frozen(taps=("unused", "up_blocks.1.resnets.1"))
    finally:
        del unet.unused

    teacher = frozen()
    with pytest.raises(ValueError, match=r"^teacher expects images \(B, C, H, W\), got shape \(3, 32, 32\)$"):
        teacher(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match=r"^teacher got 2-channel images, but its normalisation \(mean, std\) has 3 "
                                         r"channels$"):
        teacher(torch.zeros(1, 2, 32, 32))
    one_mean = frozen(mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match=r"^teacher takes 3-channel images, got 2 channels$"):
        one_mean.to_model_range(torch.zeros(1, 2, 4, 4))
    gray = one_mean.to_model_range(torch.full((1, 1, 4, 4), 0.5))  # gray, repeated to RGB: 2 * (0.5 * 0.5 + 0.5) - 1
    torch.testing.assert_close(gray, torch.full((1, 3, 4, 4), 0.5), rtol=0, atol=0)

    not_a_folder = tmp_path / "unet.safetensors"
    not_a_folder.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=rf"^teacher source '{re.escape(str(not_a_folder))}' \(unet\): "
                                                rf"{re.escape(str(not_a_folder))} is a file, not a diffusers folder\. "
                                                r"To get one: "):
        build_teacher(teacher_config(not_a_folder), MEAN, STD)
    bad_kind = teacher_config(unet_dir)
    object.__setattr__(bad_kind, "kind", "gan")  # past the recipe's own check, as a hand-built config could be
    with pytest.raises(ValueError, match=r"^unknown teacher kind 'gan'; choose one of 'unet', 'adm', 'latent'$"):
        build_teacher(bad_kind, MEAN, STD)


# ------------------------------------------------------------------------------------------ latent


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory):
    """A tiny SD-style folder: unet/ (cross-attention), vae/ (factor 8), scheduler/, stored empty-prompt embedding."""
    d = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8, attention_head_dim=2,
    ).save_pretrained(d / "unet")
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    ).save_pretrained(d / "vae")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(d / "scheduler")
    save_empty_prompt_embedding(d, torch.randn(1, 7, 8))
    return d


def test_latent_teacher_strides_are_image_relative_and_match_manual_pipeline(latent_dir):
    cfg = TeacherConfig(kind="latent", source=str(latent_dir), timestep=150)
    t = build_teacher(cfg, IMAGENET_MEAN, IMAGENET_STD)
    # latent strides 1 and 2, times the VAE's 8
    assert [(x.name, x.stride, x.channels) for x in t.taps] == [
        ("up_blocks.1.attentions.1", 8, 8),
        ("up_blocks.0.resnets.1", 16, 16),
    ]
    x01, images = tiny_images(size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    feats = t(images, torch.Generator().manual_seed(2))
    assert {s: tuple(f.shape) for s, f in feats.items()} == {8: (2, 8, 4, 4), 16: (2, 16, 2, 2)}

    # by hand: VAE posterior mean x scaling_factor, noise in latent space, UNet on the stored empty prompt
    with torch.no_grad():
        z = t.vae.encode(2 * x01 - 1).latent_dist.mean * t.vae.config.scaling_factor
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(2))
    steps = torch.full((2,), 150)
    from safetensors.torch import load_file

    emb = load_file(str(latent_dir / EMPTY_PROMPT_FILE))[EMPTY_PROMPT_KEY].expand(2, -1, -1)
    ref = hooked_forward(
        t.unet, [x.name for x in t.taps], t.scheduler.add_noise(z, eps, steps), steps, encoder_hidden_states=emb
    )
    for tap in t.taps:
        torch.testing.assert_close(feats[tap.stride], ref[tap.name], rtol=1e-5, atol=1e-5)
    # the wrong kind for this folder is named
    with pytest.raises(FileNotFoundError, match="holds a UNet2DConditionModel"):
        build_teacher(dataclasses.replace(cfg, kind="unet"), MEAN, STD)


def test_the_empty_prompt_embedding_may_drop_its_batch_axis_but_must_fit_the_unet(latent_dir):
    unet = UNet2DConditionModel.from_pretrained(latent_dir / "unet")
    vae = AutoencoderKL.from_pretrained(latent_dir / "vae")
    scheduler = DDPMScheduler()
    emb = torch.randn(7, 8)
    for given in (emb, emb[None]):
        t = FrozenTeacher(unet, scheduler, 50, MEAN, STD, vae=vae, prompt_embedding=given, kind="latent")
        assert torch.equal(t.prompt_embedding, emb[None])
    for bad in (torch.randn(2, 7, 8), torch.randn(7, 9), torch.randn(1, 1, 7, 8)):
        shape = re.escape(str(tuple(bad.shape)))
        with pytest.raises(ValueError, match=rf"must be \(1, tokens, 8\) for this UNet, got {shape}$"):
            FrozenTeacher(unet, scheduler, 50, MEAN, STD, vae=vae, prompt_embedding=bad, kind="latent")
    assert all(not p.requires_grad for p in t.parameters())  # the VAE too, not only the UNet
    assert t.size_multiple == 2 * 8  # the UNet's one downsampling times the VAE's factor


def test_a_vae_shift_factor_is_taken_off_the_latents(latent_dir):
    teacher = build_teacher(teacher_config(latent_dir, kind="latent"), MEAN, STD)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        mean = teacher.vae.encode(x).latent_dist.mean
        teacher.vae.register_to_config(shift_factor=0.25)  # as SD3 / FLUX VAEs have
        torch.testing.assert_close(teacher._encode_latents(x), (mean - 0.25) * teacher.vae.config.scaling_factor)
