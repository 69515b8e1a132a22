"""Frozen teachers (training/teachers.py): tap strides/channels, encoding, freezing, early stop, loading errors.

Every model here is a tiny random one built from a config dict and saved to tmp_path: no Hub, no GPU.
"""

from __future__ import annotations

import dataclasses
import re
import sys

import pytest
import torch
from torch import nn

from dreamteacher_models.recipes import IMAGENET_MEAN, IMAGENET_STD, RECIPES, TeacherConfig
from training import teachers as T

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel  # noqa: E402

MEAN, STD = (0.2860,) * 3, (0.3530,) * 3  # the fmnist recipe's normalisation
TINY_UNET = dict(  # 4 attention-free levels at 32 px: decoder levels at strides 8, 4, 2, 1
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=1,
    norm_num_groups=4,
    down_block_types=("DownBlock2D",) * 4,
    up_block_types=("UpBlock2D",) * 4,
)


def _config(source, **kw) -> TeacherConfig:
    return TeacherConfig(**{"kind": "unet", "source": str(source), "timestep": 50, **kw})


def _images(n=2, size=32, seed=0, mean=MEAN, std=STD):
    """Images in [0, 1] and the same images in the student's normalisation."""
    x01 = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return x01, (x01 - m) / s


def _hooked_forward(unet, names, *args, **kwargs) -> dict[str, torch.Tensor]:
    """A full UNet forward with plain forward hooks on `names`: the reference the teacher must match."""
    modules = dict(unet.named_modules())
    out = {}
    handles = [
        modules[n].register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, T._first_tensor(o))) for n in names
    ]
    try:
        with torch.no_grad():
            unet(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return out


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    """A diffusers pipeline-layout folder: unet/ + scheduler/ (500 steps, to prove the config is read)."""
    d = tmp_path_factory.mktemp("ddpm")
    torch.manual_seed(0)
    UNet2DModel(**TINY_UNET).save_pretrained(d / "unet")
    DDPMScheduler(num_train_timesteps=500, beta_schedule="linear").save_pretrained(d / "scheduler")
    return d


@pytest.fixture(scope="module")
def teacher(unet_dir):
    return T.build_teacher(_config(unet_dir), MEAN, STD)


# ------------------------------------------------------------------------------------------------ tap layout


def test_default_taps_are_decoder_levels_before_their_upsamplers(teacher):
    assert [t.stride for t in teacher.taps] == [1, 2, 4, 8]  # finest first
    assert [t.channels for t in teacher.taps] == [8, 16, 16, 16]
    assert [t.name for t in teacher.taps] == [f"up_blocks.{i}.resnets.1" for i in (3, 2, 1, 0)]
    assert teacher.scheduler.config.num_train_timesteps == 500  # scheduler/ config was read

    # A hook on up_blocks[i] itself sees the output AFTER the upsampler: one level too fine. Not what we return.
    x01, images = _images()
    after = _hooked_forward(
        teacher.unet, [f"up_blocks.{i}" for i in range(4)], torch.randn(2, 3, 32, 32), torch.tensor([50])
    )
    feats = teacher(images)
    for i in range(3):
        tap = next(t for t in teacher.taps if t.name == f"up_blocks.{i}.resnets.1")
        block_stride = 32 // after[f"up_blocks.{i}"].shape[-1]
        assert block_stride == tap.stride // 2 != tap.stride
        assert feats[tap.stride].shape == (2, tap.channels, 32 // tap.stride, 32 // tap.stride)


def test_taps_known_before_forward_and_match_outputs(unet_dir):
    t = T.build_teacher(_config(unet_dir), MEAN, STD)
    layout = [(tap.stride, tap.channels) for tap in t.taps]  # before any forward
    assert t.strides == (1, 2, 4, 8) and t.channels == (8, 16, 16, 16)
    feats = t(torch.zeros(1, 3, 64, 64))  # another size: strides hold, shapes follow
    assert [(s, f.shape[1]) for s, f in feats.items()] == layout
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(64 // s, 64 // s) for s, _ in layout]
    assert all(f.dtype == torch.float32 for f in feats.values())


def test_named_taps_post_upsample_mid_block_and_ordering(unet_dir):
    taps = ("mid_block", "up_blocks.0.upsamplers.0", "up_blocks.2.resnets.0")  # given coarse first
    t = T.build_teacher(_config(unet_dir, taps=taps), MEAN, STD)
    assert [(x.name, x.stride, x.channels) for x in t.taps] == [
        ("up_blocks.2.resnets.0", 2, 16),
        ("up_blocks.0.upsamplers.0", 4, 16),  # after the upsampler: half the default level-0 stride (8)
        ("mid_block", 8, 16),
    ]
    assert list(t(_images()[1])) == [2, 4, 8]
    # "output_blocks.K" is ADM's decoder numbering: 2 blocks per level here, so block 3 = level 1's last.
    t2 = T.build_teacher(_config(unet_dir, taps=("output_blocks.3", "output_blocks.7")), MEAN, STD)
    assert [x.name for x in t2.taps] == ["up_blocks.3.resnets.1", "up_blocks.1.resnets.1"]


def test_bad_taps_raise_clear_errors(unet_dir):
    with pytest.raises(ValueError, match=r"unknown teacher tap 'up_blocks\.9\.resnets\.0'.*up_blocks\.0\.resnets\.1"):
        T.build_teacher(_config(unet_dir, taps=("up_blocks.9.resnets.0",)), MEAN, STD)
    with pytest.raises(ValueError, match="distinct strides"):
        T.build_teacher(_config(unet_dir, taps=("up_blocks.1.resnets.0", "up_blocks.1.resnets.1")), MEAN, STD)
    with pytest.raises(ValueError, match="not a .B, C, H, W. map"):
        T.build_teacher(_config(unet_dir, taps=("time_embedding",)), MEAN, STD)
    with pytest.raises(ValueError, match=r"timestep 500 is outside"):
        T.build_teacher(_config(unet_dir, timestep=500), MEAN, STD)


# ------------------------------------------------------------------------------------------------ encoding


def test_fresh_noise_every_call_and_seeded_generator_reproduces(teacher):
    _, images = _images()
    a, b = teacher(images), teacher(images)
    assert all(not torch.allclose(a[s], b[s]) for s in a)
    c = teacher(images, torch.Generator().manual_seed(7))
    d = teacher(images, torch.Generator().manual_seed(7))
    assert all(torch.equal(c[s], d[s]) for s in c)


def test_student_normalisation_equals_minus_one_one_input(teacher):
    """Images in the recipe's mean/std give the same features as [-1, 1] images noised and fed to the UNet."""
    x01, images = _images()
    feats = teacher(images, torch.Generator().manual_seed(3))
    x0 = 2 * x01 - 1
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    t = torch.full((2,), 50)
    ref = _hooked_forward(teacher.unet, [x.name for x in teacher.taps], teacher.scheduler.add_noise(x0, eps, t), t)
    for tap in teacher.taps:
        torch.testing.assert_close(feats[tap.stride], ref[tap.name], rtol=1e-5, atol=1e-5)


def test_one_channel_unet_sees_rgb_average():
    torch.manual_seed(0)
    unet = UNet2DModel(**{**TINY_UNET, "in_channels": 1, "out_channels": 1})
    t = T.FrozenTeacher(unet, DDPMScheduler(), 50, IMAGENET_MEAN, IMAGENET_STD)
    x01, images = _images(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    feats = t(images, torch.Generator().manual_seed(0))
    x0 = (2 * x01 - 1).mean(1, keepdim=True)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    tt = torch.full((2,), 50)
    ref = _hooked_forward(unet, [x.name for x in t.taps], t.scheduler.add_noise(x0, eps, tt), tt)
    for tap in t.taps:
        torch.testing.assert_close(feats[tap.stride], ref[tap.name], rtol=1e-5, atol=1e-5)


def test_early_stop_equals_full_pass_and_skips_the_tail(teacher):
    _, images = _images()
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


def test_ddim_encoding_is_deterministic_and_exact_for_an_oracle(unet_dir, monkeypatch):
    t = T.build_teacher(_config(unet_dir, encoding="ddim"), MEAN, STD, ddim_steps=3)
    _, images = _images()
    a = t(images, torch.Generator().manual_seed(0))
    b = t(images, torch.Generator().manual_seed(1))  # the generator plays no part
    assert all(torch.equal(a[s], b[s]) for s in a)
    # With a model that predicts the true eps, DDIM inversion lands exactly on add_noise(x0, eps, t).
    x0 = torch.randn(2, 3, 32, 32)
    eps = torch.randn(2, 3, 32, 32)
    monkeypatch.setattr(t, "_epsilon", lambda x, step: eps)
    torch.testing.assert_close(t.ddim_invert(x0), t.scheduler.add_noise(x0, eps, torch.tensor([50])))


def test_resolution_resizes_input_and_features_follow_the_input_grid(unet_dir):
    t = T.build_teacher(_config(unet_dir, resolution=64), MEAN, STD)
    assert t.run_size((32, 32)) == (64, 64)
    feats = t(_images()[1])
    assert {s: tuple(f.shape) for s, f in feats.items()} == {1: (2, 8, 32, 32), 2: (2, 16, 16, 16),
                                                             4: (2, 16, 8, 8), 8: (2, 16, 4, 4)}
    with pytest.raises(ValueError, match="not a multiple of 8"):
        T.build_teacher(_config(unet_dir), MEAN, STD)(torch.zeros(1, 3, 36, 36))


def test_bf16_autocast_and_channels_last_stay_close_to_fp32(unet_dir):
    _, images = _images()
    ref = T.build_teacher(_config(unet_dir), MEAN, STD)(images, torch.Generator().manual_seed(0))
    cl = T.build_teacher(_config(unet_dir), MEAN, STD, channels_last=True)(images, torch.Generator().manual_seed(0))
    bf = T.build_teacher(_config(unet_dir), MEAN, STD, dtype=torch.bfloat16)(images, torch.Generator().manual_seed(0))
    for s in ref:
        torch.testing.assert_close(cl[s], ref[s], rtol=1e-4, atol=1e-4)
        assert bf[s].dtype == torch.float32
        assert 0 < (bf[s] - ref[s]).norm() / ref[s].norm() < 0.05  # bf16 really on (not silently fp32), and close


# ------------------------------------------------------------------------------------------------ frozen


def test_frozen_no_grad_and_not_a_student_parameter(teacher):
    assert all(not p.requires_grad for p in teacher.parameters())
    student = nn.Conv2d(3, 8, 1)
    student.teacher = teacher  # a plain object: never registered as a submodule
    assert [n for n, _ in student.named_parameters()] == ["weight", "bias"]

    teacher.unet.train()  # someone flips it: the teacher still runs in eval mode
    _, images = _images()
    images.requires_grad_(True)
    feats = teacher(images)
    assert not teacher.unet.training
    assert all(not f.requires_grad and f.grad_fn is None for f in feats.values())
    loss = ((student(images) - feats[1]) ** 2).mean()
    loss.backward()
    assert images.grad is not None and student.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


# ------------------------------------------------------------------------------------------------ loading errors


def test_missing_sources_say_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the fmnist recipe's relative folder does not exist here
    fmnist = RECIPES["resnet18.dreamteacher_fmnist"].teacher
    with pytest.raises(FileNotFoundError, match=r"teachers/ddpm-fashion-mnist-32.*train_teacher\.py"):
        T.build_teacher(fmnist, MEAN, STD)  # a valid Hub id too: HF_HUB_OFFLINE makes it a cache miss
    with pytest.raises(FileNotFoundError, match=r"/no/such/dir/x.*not a valid Hugging Face Hub repo id"):
        T.build_teacher(fmnist, MEAN, STD, source="/no/such/dir/x")
    monkeypatch.setenv("DREAMTEACHER_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=r"adm:256x256_diffusion_uncond is not in the cache and HF_HUB_OFFLINE "
                                                r"is set: download https://\S+/256x256_diffusion_uncond\.pt to "
                                                + str(tmp_path / "cache" / "adm" / "256x256_diffusion_uncond.pt")):
        T.build_teacher(RECIPES["resnet50.dreamteacher_in1k"].teacher, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(FileNotFoundError, match=r"256x256_diffusion_uncond\.pt' \(adm\): no such checkpoint file\. To "
                                                r"get one: .*training\.adm"):
        T.build_teacher(RECIPES["resnet50.dreamteacher_in1k"].teacher, IMAGENET_MEAN, IMAGENET_STD,
                        source="256x256_diffusion_uncond.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no unet/config\.json or config\.json"):
        T.build_teacher(fmnist, MEAN, STD, source=str(tmp_path / "empty"))


def test_root_layout_and_default_scheduler(tmp_path):
    """A UNet saved at the folder root (like google/ddpm-cifar10-32) without a scheduler: linear 1000 steps."""
    UNet2DModel(**TINY_UNET).save_pretrained(tmp_path)
    t = T.build_teacher(_config(tmp_path), MEAN, STD)
    assert t.strides == (1, 2, 4, 8)
    assert t.scheduler.config.num_train_timesteps == 1000 and t.scheduler.config.beta_schedule == "linear"


def test_describe_taps_and_cli(teacher, unet_dir, capsys):
    table = T.describe_taps(teacher, 32)
    assert "| up_blocks.0.resnets.1 | output_blocks.1 | 8 | 16 | (B, 16, 4, 4) |" in table
    assert T.main(["--kind", "unet", "--source", str(unet_dir), "--image-size", "32", "--taps", "mid_block"]) == 0
    out = capsys.readouterr().out
    assert "| mid_block | - | 8 | 16 | (B, 16, 4, 4) |" in out
    assert T.main(["--kind", "unet", "--source", "/no/such/dir/x"]) == 2
    assert "train_teacher.py" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ ADM


def test_adm256_default_taps_are_the_papers_output_blocks():
    """For the paper's 256x256 ADM (built on the meta device: no weights), default taps = output_blocks 2,5,8,11."""
    adm = pytest.importorskip("training.adm")
    with torch.device("meta"):
        unet = UNet2DModel(**adm.diffusers_config("256x256_diffusion_uncond"))
    mapping = T.adm_output_block_names("256x256_diffusion_uncond")
    assert T.output_block_names(unet) == mapping  # structure-derived numbering agrees with adm.py's
    paper = T.resolve_tap_names(unet, [f"output_blocks.{k}" for k in (2, 5, 8, 11)], mapping)
    assert paper == T.default_tap_names(unet)
    taps, order = T.probe_taps(unet, paper)
    assert [(t.stride, t.channels) for t in taps] == [(4, 512), (8, 512), (16, 1024), (32, 1024)]
    assert order[-1] == "up_blocks.3.resnets.2"


@pytest.fixture(scope="module")
def tiny_adm(tmp_path_factory):
    """A random guided-diffusion UNetModel (OpenAI's code), its .pt, and its training/adm.py conversion folder."""
    adm = pytest.importorskip("training.adm")
    script_util = pytest.importorskip("guided_diffusion.script_util")
    flags = adm.ADMFlags(
        image_size=32, num_channels=32, num_res_blocks=1, channel_mult=(1, 1, 2, 2), attention_resolutions="4",
        num_head_channels=16, learn_sigma=True, resblock_updown=True, use_scale_shift_norm=True,
    )  # attention only at the 4x4 level: cheap
    torch.manual_seed(0)
    model = script_util.create_model(**flags.as_guided_diffusion_kwargs()).eval()
    d = tmp_path_factory.mktemp("adm")
    torch.save(model.state_dict(), d / "tiny_adm.pt")
    adm.convert_to_folder(model.state_dict(), flags, d / "converted")
    return adm, flags, model, d


def test_adm_teacher_matches_guided_diffusion_decoder_blocks(tiny_adm, monkeypatch):
    adm, flags, model, d = tiny_adm
    t = T.build_teacher(TeacherConfig(kind="adm", source=str(d / "converted"), timestep=150), MEAN, STD)
    assert [(x.name, x.stride, x.channels) for x in t.taps] == [
        ("up_blocks.3.resnets.1", 1, 32),
        ("up_blocks.2.resnets.1", 2, 32),
        ("up_blocks.1.resnets.1", 4, 64),
        ("up_blocks.0.attentions.1", 8, 64),  # the level with attention is read after its attention layer
    ]
    # ADM's own activations: output_blocks[K] (last block of each level), read before its trailing upsample layer.
    blocks = {1: model.output_blocks[1][-2], 3: model.output_blocks[3][-2], 5: model.output_blocks[5][-2],
              7: model.output_blocks[7]}
    by_alias = T.build_teacher(
        TeacherConfig(kind="adm", source=str(d / "converted"), timestep=150,
                      taps=tuple(f"output_blocks.{k}" for k in blocks)), MEAN, STD,
    )
    assert by_alias.taps == t.taps  # ADM's numbering, through the folder's adm_flags.json
    x01, images = _images()
    feats = t(images, torch.Generator().manual_seed(5))
    x0 = 2 * x01 - 1
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    steps = torch.full((2,), 150)
    ref = {}
    hs = [m.register_forward_hook(lambda m, i, o, k=k: ref.__setitem__(k, o)) for k, m in blocks.items()]
    with torch.no_grad():
        model(t.scheduler.add_noise(x0, eps, steps), steps)
    for h in hs:
        h.remove()
    for k, stride in zip((7, 5, 3, 1), (1, 2, 4, 8), strict=True):
        torch.testing.assert_close(feats[stride], ref[k], rtol=1e-4, atol=1e-4)

    # The .pt itself, converted on the fly with a preset, gives the same teacher.
    monkeypatch.setitem(adm.PRESETS, "tiny_test", flags)
    cfg = TeacherConfig(kind="adm", source=str(d / "tiny_adm.pt"), timestep=150, adm_preset="tiny_test")
    t_pt = T.build_teacher(cfg, MEAN, STD)
    assert t_pt.taps == t.taps
    again = t_pt(images, torch.Generator().manual_seed(5))
    assert all(torch.equal(again[s], feats[s]) for s in feats)
    with pytest.raises(ValueError, match="adm_preset"):
        T.build_teacher(dataclasses.replace(cfg, adm_preset=None), MEAN, STD)


# ------------------------------------------------------------------------------------------------ latent


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
    T.save_empty_prompt_embedding(d, torch.randn(1, 7, 8))
    return d


def test_latent_teacher_strides_are_image_relative_and_match_manual_pipeline(latent_dir):
    cfg = TeacherConfig(kind="latent", source=str(latent_dir), timestep=150)
    t = T.build_teacher(cfg, IMAGENET_MEAN, IMAGENET_STD)
    # latent strides 1 and 2, times the VAE's 8
    assert [(x.name, x.stride, x.channels) for x in t.taps] == [
        ("up_blocks.1.attentions.1", 8, 8),
        ("up_blocks.0.resnets.1", 16, 16),
    ]
    x01, images = _images(size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    feats = t(images, torch.Generator().manual_seed(2))
    assert {s: tuple(f.shape) for s, f in feats.items()} == {8: (2, 8, 4, 4), 16: (2, 16, 2, 2)}

    # by hand: VAE posterior mean x scaling_factor, noise in latent space, UNet on the stored empty prompt
    with torch.no_grad():
        z = t.vae.encode(2 * x01 - 1).latent_dist.mean * t.vae.config.scaling_factor
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(2))
    steps = torch.full((2,), 150)
    from safetensors.torch import load_file

    emb = load_file(str(latent_dir / T.EMPTY_PROMPT_FILE))[T.EMPTY_PROMPT_KEY].expand(2, -1, -1)
    ref = _hooked_forward(
        t.unet, [x.name for x in t.taps], t.scheduler.add_noise(z, eps, steps), steps, encoder_hidden_states=emb
    )
    for tap in t.taps:
        torch.testing.assert_close(feats[tap.stride], ref[tap.name], rtol=1e-5, atol=1e-5)
    # the wrong kind for this folder is named
    with pytest.raises(FileNotFoundError, match="holds a UNet2DConditionModel"):
        T.build_teacher(dataclasses.replace(cfg, kind="unet"), MEAN, STD)


class _Tokenizer:  # transformers' CLIPTokenizer, as the embedding helpers call it
    model_max_length = 5

    def __call__(self, texts, **kw):
        assert texts == [""] and kw["padding"] == "max_length" and kw["max_length"] == 5
        return type("Enc", (), {"input_ids": torch.tensor([[0, 1, 2, 2, 2]])})()


class _TextEncoder(nn.Module):  # returns (last_hidden_state,) like transformers' CLIPTextModel
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(3, 8)
        self.embed.weight.data = torch.arange(24.0).reshape(3, 8)

    def forward(self, ids):
        return (self.embed(ids),)


def test_empty_prompt_embedding_helpers(tmp_path):
    emb = T.compute_empty_prompt_embedding(_Tokenizer(), _TextEncoder())
    assert emb.shape == (1, 5, 8) and not emb.requires_grad
    torch.testing.assert_close(emb[0, :, 0], torch.tensor([0.0, 8.0, 16.0, 16.0, 16.0]))
    path = T.save_empty_prompt_embedding(tmp_path, emb)
    torch.testing.assert_close(T.load_empty_prompt_embedding(str(tmp_path)), emb)
    assert path.name == T.EMPTY_PROMPT_FILE


def test_the_text_encoder_computes_the_embedding_where_none_is_stored(tmp_path, monkeypatch):
    from types import SimpleNamespace

    loaded = []

    def loader(kind, make):
        def from_pretrained(where, subfolder):
            loaded.append((kind, where, subfolder))
            return make()

        return SimpleNamespace(from_pretrained=from_pretrained)

    transformers = SimpleNamespace(CLIPTokenizer=loader("tokenizer", _Tokenizer),
                                   CLIPTextModel=loader("text_encoder", _TextEncoder))
    monkeypatch.setitem(sys.modules, "transformers", transformers)
    expected = T.compute_empty_prompt_embedding(_Tokenizer(), _TextEncoder())
    folder = tmp_path / "sd"
    folder.mkdir()
    torch.testing.assert_close(T.load_empty_prompt_embedding(str(folder)), expected)
    assert loaded == [("tokenizer", str(folder), "tokenizer"), ("text_encoder", str(folder), "text_encoder")]
    assert not (folder / T.EMPTY_PROMPT_FILE).exists()  # loading computes, storing writes
    assert T.store_empty_prompt_embedding(str(folder)) == folder / T.EMPTY_PROMPT_FILE
    assert T.store_empty_prompt_embedding("someone/sd", tmp_path / "out") == tmp_path / "out" / T.EMPTY_PROMPT_FILE
    assert loaded[-2:] == [("tokenizer", "someone/sd", "tokenizer"), ("text_encoder", "someone/sd", "text_encoder")]
    for stored in (folder, tmp_path / "out"):
        torch.testing.assert_close(T.load_empty_prompt_embedding(str(stored)), expected)
    with pytest.raises(ValueError, match=r"^someone/sd is not a local folder: pass out_dir to store the embedding$"):
        T.store_empty_prompt_embedding("someone/sd")

    monkeypatch.setitem(sys.modules, "transformers", None)  # not installed
    with pytest.raises(ImportError, match=r"^computing the empty-prompt embedding needs `pip install transformers`$"):
        T.store_empty_prompt_embedding(str(folder))
    nothing = tmp_path / "nothing"
    with pytest.raises(FileNotFoundError, match=rf"^teacher source '{re.escape(str(nothing))}' \(latent\): no "
                                                rf"{T.EMPTY_PROMPT_FILE} and `transformers` is not installed to "
                                                rf"compute it; run `python -m training\.teachers "
                                                rf"--store-empty-prompt-embedding {re.escape(str(nothing))}`"):
        T.load_empty_prompt_embedding(str(nothing))


# ------------------------------------------------------------------------------------------------ bounds, resize, CLI


def test_timestep_and_ddim_step_bounds_are_inclusive_where_they_should_be():
    unet = UNet2DModel(**TINY_UNET)
    scheduler = DDPMScheduler(num_train_timesteps=500)
    for ok in (0, 499):
        assert T.FrozenTeacher(unet, scheduler, ok, MEAN, STD).timestep == ok
    for bad in (-1, 500):
        with pytest.raises(ValueError, match=rf"teacher timestep {bad} is outside the scheduler's range \[0, 499\]$"):
            T.FrozenTeacher(unet, scheduler, bad, MEAN, STD)
    assert T.FrozenTeacher(unet, scheduler, 9, MEAN, STD, encoding="ddim", ddim_steps=1).ddim_steps == 1
    with pytest.raises(ValueError, match="ddim_steps must be >= 1, got 0"):
        T.FrozenTeacher(unet, scheduler, 9, MEAN, STD, encoding="ddim", ddim_steps=0)


def test_a_set_resolution_resamples_like_a_manual_antialiased_pipeline(unet_dir):
    """Non-square 4x12 images encoded at 32x32: the image is resized up (bilinear, antialias, no corner alignment),
    and each tap resized back to the image's grid, never below one pixel."""
    t = T.build_teacher(_config(unet_dir, resolution=32), MEAN, STD)
    x01 = torch.rand(2, 3, 4, 12, generator=torch.Generator().manual_seed(5))
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    feats = t((x01 - m) / s, torch.Generator().manual_seed(1))
    assert {k: tuple(v.shape[-2:]) for k, v in feats.items()} == {1: (4, 12), 2: (2, 6), 4: (1, 3), 8: (1, 1)}

    def resize(x, size):
        return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)

    x0 = resize(2 * x01 - 1, (32, 32))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    steps = torch.full((2,), 50)
    ref = _hooked_forward(t.unet, [x.name for x in t.taps], t.scheduler.add_noise(x0, eps, steps), steps)
    for tap in t.taps:
        torch.testing.assert_close(feats[tap.stride], resize(ref[tap.name], feats[tap.stride].shape[-2:]),
                                   rtol=1e-5, atol=1e-5)


def test_describe_taps_table_for_a_non_square_size_that_does_not_fit(unet_dir):
    t = T.build_teacher(_config(unet_dir, timestep=3), MEAN, STD)
    assert T.describe_taps(t, (16, 4)) == "\n".join([
        f"teacher: kind=unet source={unet_dir} timestep=3 encoding=noise resolution=None",
        "images 16x4 are encoded at 16x4",
        "WARNING: 16x4 is not a multiple of 8: forward will fail",
        "",
        "| tap | ADM alias | stride | channels | output shape |",
        "|---|---|---|---|---|",
        "| up_blocks.3.resnets.1 | output_blocks.7 | 1 | 8 | (B, 8, 16, 4) |",
        "| up_blocks.2.resnets.1 | output_blocks.5 | 2 | 16 | (B, 16, 8, 2) |",
        "| up_blocks.1.resnets.1 | output_blocks.3 | 4 | 16 | (B, 16, 4, 1) |",
        "| up_blocks.0.resnets.1 | output_blocks.1 | 8 | 16 | (B, 16, 2, 1) |",
    ])


TAPS_TABLE = """
| tap | ADM alias | stride | channels | output shape |
|---|---|---|---|---|
| up_blocks.3.resnets.1 | output_blocks.7 | 1 | 8 | (B, 8, {0}, {0}) |
| up_blocks.2.resnets.1 | output_blocks.5 | 2 | 16 | (B, 16, {1}, {1}) |
| up_blocks.1.resnets.1 | output_blocks.3 | 4 | 16 | (B, 16, {2}, {2}) |
| up_blocks.0.resnets.1 | output_blocks.1 | 8 | 16 | (B, 16, {3}, {3}) |"""


def test_cli_prints_the_layout_every_flag_asks_for(unet_dir, capsys):
    argv = ["--kind", "unet", "--source", str(unet_dir)]
    assert T.main(argv) == 0
    assert capsys.readouterr().out == (
        f"teacher: kind=unet source={unet_dir} timestep=50 encoding=noise resolution=None\n"
        "images 32x32 are encoded at 32x32\n" + TAPS_TABLE.format(32, 16, 8, 4) + "\n")

    assert T.main([*argv, "--timestep", "7", "--encoding", "ddim", "--resolution", "64", "--image-size", "48",
                   "--student", "resnet18"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        f"teacher: kind=unet source={unet_dir} timestep=7 encoding=ddim resolution=64\n"
        "images 48x48 are encoded at 64x64; features are resampled to the images' grid\n"
        + TAPS_TABLE.format(48, 24, 12, 6) + "\n\n"
        "student resnet18 (levels at strides [2, 4, 8, 16, 32]) <- teacher taps, by stride (automatic pairing):\n")
    assert "| 8 | 8 | 16 | as is | 6x6 |" in out

    assert T.main([*argv, "--taps", "up_blocks.0.resnets.1", "--image-size", "16"]) == 0
    assert capsys.readouterr().out.endswith("| up_blocks.0.resnets.1 | output_blocks.1 | 8 | 16 | (B, 16, 2, 2) |\n")

    for bad in (["--kind", "unet"], ["--source", str(unet_dir)], [*argv, "--kind", "vae"],
                [*argv, "--encoding", "sde"], [*argv, "--timestep", "7.5"], [*argv, "--resolution", "x"]):
        with pytest.raises(SystemExit):
            T.main(bad)
    assert T.main(["--kind", "adm", "--source", str(unet_dir / "missing.pt")]) == 2
    assert "error: " in capsys.readouterr().err


def test_cli_takes_the_recipe_and_lets_flags_override_it(capsys):
    recipe = RECIPES["resnet18.dreamteacher_fmnist"]
    assert T.main(["--recipe", recipe.name, "--timestep", "9"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"teacher: kind={recipe.teacher.kind} source={recipe.teacher.source} timestep=9 ")
    assert f"student {recipe.arch} " in out and "(the recipe pairing)" in out


@pytest.mark.parametrize("offline", ["1", "TRUE", "yes", "0", None])
def test_a_hub_id_that_cannot_be_loaded_names_each_place_tried(monkeypatch, offline):
    def not_found(*args, subfolder=None, **kwargs):
        raise OSError(f"no {subfolder or 'root'} config in the repo\nsecond line of the error")

    monkeypatch.setattr(UNet2DModel, "load_config", not_found)  # no network either way
    if offline is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    note = " (HF_HUB_OFFLINE is set: only the local cache was searched)" if offline in ("1", "TRUE", "yes") else ""
    with pytest.raises(FileNotFoundError) as error:
        T.build_teacher(_config("someone/tiny-ddpm"), MEAN, STD)
    assert str(error.value) == (
        f"teacher source 'someone/tiny-ddpm' (unet): could not load a UNet2DModel{note}: unet: no unet config in the "
        f"repo; .: no root config in the repo. To get one: {T._how_to_get('unet')}")


def test_a_subfolder_holding_another_class_is_skipped_for_the_root(tmp_path):
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2).save_pretrained(tmp_path / "unet")
    UNet2DModel(**TINY_UNET).save_pretrained(tmp_path)  # the UNet sits at the root
    assert T.build_teacher(_config(tmp_path), MEAN, STD).strides == (1, 2, 4, 8)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"could not load a UNet2DModel: unet: holds a AutoencoderKL, not a "
                                                r"UNet2DModel\. To get one"):
        T.build_teacher(_config(tmp_path), MEAN, STD)


@pytest.mark.parametrize("source,is_hub", [
    ("google/ddpm-cifar10-32", True), ("ddpm-cifar10-32", True), ("a/b/c", False), ("./model", False),
    ("/abs/model", False), ("~/model", False), ("dir\\model", False), ("adm.pt", False), ("x.safetensors", False),
    ("bad repo id!", False),
])
def test_which_sources_count_as_hub_ids(source, is_hub):
    assert T._is_hub_id(source) is is_hub


def test_the_scheduler_config_is_read_from_scheduler_or_the_root_else_the_default(tmp_path, caplog):
    DDPMScheduler(num_train_timesteps=300, beta_schedule="squaredcos_cap_v2").save_pretrained(tmp_path / "a")
    assert T._load_scheduler(str(tmp_path / "a")).config.num_train_timesteps == 300  # the root
    DDPMScheduler(num_train_timesteps=200).save_pretrained(tmp_path / "a" / "scheduler")
    scheduler = T._load_scheduler(str(tmp_path / "a"))
    assert scheduler.config.num_train_timesteps == 200  # scheduler/ first
    (tmp_path / "b").mkdir()
    with caplog.at_level("INFO", logger=T.logger.name):
        default = T._load_scheduler(str(tmp_path / "b"))
    assert default.config.num_train_timesteps == 1000 and default.config.beta_schedule == "linear"
    assert f"no scheduler config in {tmp_path / 'b'}: using the linear 1000-step DDPM schedule" in caplog.messages


def test_probe_taps_runs_a_meta_copy_and_falls_back_to_the_real_unet(monkeypatch):
    unet = UNet2DModel(**TINY_UNET)
    calls = []
    unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape))
    names = T.default_tap_names(unet)
    taps, order = T.probe_taps(unet, names)
    assert calls == [] and [(t.stride, t.channels) for t in taps] == [(1, 8), (2, 16), (4, 16), (8, 16)]
    assert order == tuple(t.name for t in reversed(taps))  # the decoder runs coarse to fine

    def no_meta(*args, **kwargs):
        raise NotImplementedError("no meta kernel")

    monkeypatch.setattr(UNet2DModel, "from_config", no_meta)
    assert T.probe_taps(unet, names) == (taps, order)
    assert calls == [torch.Size([1, 3, 32, 32])]  # the real UNet, once, at batch 1 and the 4x4-coarsest size


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "epsilon+sigma"])
def test_every_prediction_type_converts_to_the_true_noise(monkeypatch, prediction_type):
    """_epsilon with an oracle UNet that predicts its target exactly (eps, v or x0; ADM's learn_sigma doubles the
    channels) returns the true noise."""
    scheduler = DDPMScheduler(num_train_timesteps=500, prediction_type=prediction_type.split("+")[0])
    t = T.FrozenTeacher(UNet2DModel(**TINY_UNET), scheduler, 50, MEAN, STD, encoding="ddim")
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
    t = T.build_teacher(_config(unet_dir, encoding="ddim"), MEAN, STD, ddim_steps=3)
    visited = []
    monkeypatch.setattr(t, "_epsilon", lambda x, step: visited.append(step) or torch.zeros_like(x))
    t.ddim_invert(torch.randn(1, 3, 8, 8))
    assert visited == [0, 17, 33]  # round(linspace(0, 50, 4)) without its end


def test_an_unknown_prediction_type_is_refused_by_ddim():
    scheduler = DDPMScheduler(num_train_timesteps=500)
    scheduler.register_to_config(prediction_type="flow")
    t = T.FrozenTeacher(UNet2DModel(**TINY_UNET), scheduler, 50, MEAN, STD, encoding="ddim")
    assert t.prediction_type == "flow"
    with pytest.raises(ValueError, match="DDIM inversion does not support prediction_type 'flow'"):
        t(torch.zeros(1, 3, 32, 32))


def test_the_empty_prompt_embedding_may_drop_its_batch_axis_but_must_fit_the_unet(latent_dir):
    unet = UNet2DConditionModel.from_pretrained(latent_dir / "unet")
    vae = AutoencoderKL.from_pretrained(latent_dir / "vae")
    scheduler = DDPMScheduler()
    emb = torch.randn(7, 8)
    for given in (emb, emb[None]):
        t = T.FrozenTeacher(unet, scheduler, 50, MEAN, STD, vae=vae, prompt_embedding=given, kind="latent")
        assert torch.equal(t.prompt_embedding, emb[None])
    for bad in (torch.randn(2, 7, 8), torch.randn(7, 9), torch.randn(1, 1, 7, 8)):
        shape = re.escape(str(tuple(bad.shape)))
        with pytest.raises(ValueError, match=rf"must be \(1, tokens, 8\) for this UNet, got {shape}$"):
            T.FrozenTeacher(unet, scheduler, 50, MEAN, STD, vae=vae, prompt_embedding=bad, kind="latent")
    assert all(not p.requires_grad for p in t.parameters())  # the VAE too, not only the UNet
    assert t.size_multiple == 2 * 8  # the UNet's one downsampling times the VAE's factor


def test_build_teacher_passes_every_setting_through(unet_dir):
    config = _config(unet_dir, encoding="ddim", resolution=64, timestep=20)
    t = T.build_teacher(config, MEAN, STD, device="cpu", ddim_steps=2, channels_last=True, early_stop=False,
                        taps=["up_blocks.1.resnets.1", "up_blocks.0.resnets.1"])
    assert (t.kind, t.source, t.timestep, t.encoding, t.ddim_steps, t.resolution) == \
        ("unet", str(unet_dir), 20, "ddim", 2, 64)
    assert (t.channels_last, t.early_stop, t.device) == (True, False, torch.device("cpu"))
    assert [tap.name for tap in t.taps] == ["up_blocks.1.resnets.1", "up_blocks.0.resnets.1"]
    assert T.build_teacher(_config(unet_dir, taps=("up_blocks.0.resnets.1",)), MEAN, STD).strides == (8,)
    default = T.build_teacher(_config(unet_dir), MEAN, STD)
    assert (default.channels_last, default.early_stop, default.dtype, default.ddim_steps) == \
        (False, True, None, T.DEFAULT_DDIM_STEPS)


def _write_adm_flags(folder, flags):
    """The adm_flags.json convert_to_folder writes, without converting a model."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adm_flags.json").write_text(json.dumps({"flags": dataclasses.asdict(flags)}))


def test_a_converted_folders_adm_numbering_comes_from_its_flags_then_the_recipes_preset(tmp_path):
    from training import adm

    small = dataclasses.replace(adm.PRESETS["256x256_diffusion_uncond"], num_res_blocks=1,
                                channel_mult=(1, 2), image_size=32)
    big = adm.PRESETS["256x256_diffusion_uncond"]
    _write_adm_flags(tmp_path / "root", small)
    _write_adm_flags(tmp_path / "nested" / "unet", small)
    (tmp_path / "bare").mkdir()
    for source in (tmp_path / "root", tmp_path / "nested"):  # the folder's own flags win over the recipe's preset
        assert T._adm_folder_output_blocks(str(source), "256x256_diffusion_uncond") == T.adm_output_block_names(small)
    assert len(T.adm_output_block_names(small)) == 2 * 2  # 2 levels x (1 res block + 1)
    assert T._adm_folder_output_blocks(str(tmp_path / "bare"), "256x256_diffusion_uncond") == \
        T.adm_output_block_names(big)
    assert T._adm_folder_output_blocks(str(tmp_path / "bare"), None) is None
    with pytest.raises(ValueError, match=r"adm_preset set to one of \[.*'256x256_diffusion_uncond'.*\], got 'nope'"):
        T._adm_folder_output_blocks(str(tmp_path / "bare"), "nope")
    with pytest.raises(ValueError, match=r"got None"):
        T._convert_adm(str(tmp_path / "x.pt"), None)


@pytest.mark.parametrize("preset, schedule", [("64x64_diffusion", "squaredcos_cap_v2"),
                                              ("256x256_diffusion_uncond", "linear"), ("lsun_cat", "linear")])
def test_an_adm_checkpoint_gets_the_noise_schedule_it_was_trained_with(preset, schedule, monkeypatch):
    from training import adm

    converted = {}
    monkeypatch.setattr(adm, "load_checkpoint", lambda source: {"read": source})
    monkeypatch.setattr(adm, "convert", lambda sd, flags: converted.update(sd=sd, flags=flags) or "unet")
    unet, scheduler, blocks = T._convert_adm("/ckpt.pt", preset)
    assert unet == "unet" and converted == {"sd": {"read": "/ckpt.pt"}, "flags": adm.PRESETS[preset]}
    assert scheduler.config.beta_schedule == schedule and scheduler.config.num_train_timesteps == 1000
    assert blocks == T.adm_output_block_names(adm.PRESETS[preset])


def test_every_constructor_and_input_error_names_the_bad_value(unet_dir, tmp_path):
    unet = UNet2DModel.from_pretrained(unet_dir / "unet")
    scheduler = DDPMScheduler.from_pretrained(unet_dir / "scheduler")

    def frozen(**kw):
        return T.FrozenTeacher(unet, scheduler, kw.pop("timestep", 50), kw.pop("mean", MEAN), kw.pop("std", STD), **kw)

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
        T.build_teacher(_config(not_a_folder), MEAN, STD)
    bad_kind = _config(unet_dir)
    object.__setattr__(bad_kind, "kind", "gan")  # past the recipe's own check, as a hand-built config could be
    with pytest.raises(ValueError, match=r"^unknown teacher kind 'gan'; choose one of 'unet', 'adm', 'latent'$"):
        T.build_teacher(bad_kind, MEAN, STD)


def test_first_tensor_reads_a_tensor_a_tuple_or_a_sample_and_names_anything_else():
    x, y = torch.zeros(1), torch.ones(1)
    assert T._first_tensor(x) is x
    assert T._first_tensor((x, y)) is x and T._first_tensor([y, x]) is y
    assert T._first_tensor(type("Output", (), {"sample": y})()) is y
    for bad, name in (((), "tuple"), ([None, x], "list"), ({"sample": x}, "dict"), (None, "NoneType")):
        with pytest.raises(TypeError, match=rf"^cannot read a feature map from a module output of type {name}$"):
            T._first_tensor(bad)


@pytest.mark.parametrize("encoding, resolution", [("noise", None), ("ddim", None), ("noise", 64)])
def test_every_tensor_the_teacher_makes_lives_on_its_device(unet_dir, latent_dir, encoding, resolution):
    """A teacher on the meta device (shapes only, no memory): a noise draw, timestep or normalisation left on the
    CPU, where the test machine cannot tell it from the GPU, makes the forward fail."""
    config = _config(unet_dir, encoding=encoding, resolution=resolution)
    teacher = T.build_teacher(config, MEAN, STD, device="meta", ddim_steps=2)
    out = teacher(_images()[1], generator=torch.Generator().manual_seed(0))
    assert {s: (f.device.type, f.dtype, tuple(f.shape)) for s, f in out.items()} == {
        t.stride: ("meta", torch.float32, (2, t.channels, 32 // t.stride, 32 // t.stride)) for t in teacher.taps}
    latent = T.build_teacher(dataclasses.replace(_config(latent_dir, kind="latent"), encoding=encoding), MEAN, STD,
                             device="meta", ddim_steps=2)
    assert {f.device.type for f in latent(_images(size=64)[1]).values()} == {"meta"}


def test_a_teacher_built_with_defaults_stops_after_its_last_tap(unet_dir):
    unet = UNet2DModel.from_pretrained(unet_dir / "unet")
    teacher = T.FrozenTeacher(unet, DDPMScheduler.from_pretrained(unet_dir / "scheduler"), 50, MEAN, STD)
    calls = []
    unet.conv_out.register_forward_hook(lambda *a: calls.append(1))
    teacher(_images()[1])
    assert calls == [] and teacher.early_stop  # the output conv, after every tap, never ran


@pytest.mark.parametrize("source, is_hub_id", [
    ("someone/sd-turbo", True), ("sd-turbo", True), ("./someone/sd", False), ("~/sd", False), ("/abs/sd", False),
    ("a/b/c", False), ("someone/model.safetensors", False), ("bad name/x", False)])
def test_what_counts_as_a_hub_repo_id(source, is_hub_id):
    assert T._is_hub_id(source) is is_hub_id


def test_a_vae_shift_factor_is_taken_off_the_latents(latent_dir):
    teacher = T.build_teacher(_config(latent_dir, kind="latent"), MEAN, STD)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        mean = teacher.vae.encode(x).latent_dist.mean
        teacher.vae.register_to_config(shift_factor=0.25)  # as SD3 / FLUX VAEs have
        torch.testing.assert_close(teacher._encode_latents(x), (mean - 0.25) * teacher.vae.config.scaling_factor)


def test_the_embedding_comes_from_the_hub_for_a_repo_id_and_a_home_path_is_expanded(tmp_path, monkeypatch):
    import huggingface_hub

    stored = T.save_empty_prompt_embedding(tmp_path / "download", torch.ones(1, 2, 8))
    downloads = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a: downloads.append(a) or str(stored))
    torch.testing.assert_close(T.load_empty_prompt_embedding("someone/sd"), torch.ones(1, 2, 8))
    assert downloads == [("someone/sd", T.EMPTY_PROMPT_FILE)]
    monkeypatch.setenv("HOME", str(tmp_path))
    T.save_empty_prompt_embedding(tmp_path / "sd", torch.zeros(1, 2, 8))
    torch.testing.assert_close(T.load_empty_prompt_embedding("~/sd"), torch.zeros(1, 2, 8))
