"""Where a teacher comes from (training/teacher/sources.py, training/teacher/build.py): folder layouts, Hub ids,
loading errors that say how to get a teacher, the scheduler config, build_teacher's settings, ADM checkpoints and
converted folders.

Every model here is a tiny random one built from a config dict and saved to tmp_path: no Hub, no GPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dreamteacher_models.recipes import IMAGENET_MEAN, IMAGENET_STD, RECIPES, TeacherConfig
from tests.tiny import MEAN, STD, TINY_UNET, teacher_config, tiny_images
from training.teacher.build import _convert_adm, build_teacher
from training.teacher.frozen import DEFAULT_DDIM_STEPS
from training.teacher.sources import _how_to_get, _is_hub_id, _load_scheduler
from training.teacher.sources import logger as sources_logger

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel  # noqa: E402

# ----------------------------------------------------------------------------- folders and the Hub


def test_root_layout_and_default_scheduler(tmp_path):
    """A UNet saved at the folder root (like google/ddpm-cifar10-32) without a scheduler: linear 1000 steps."""
    UNet2DModel(**TINY_UNET).save_pretrained(tmp_path)
    t = build_teacher(teacher_config(tmp_path), MEAN, STD)
    assert t.strides == (1, 2, 4, 8)
    assert t.scheduler.config.num_train_timesteps == 1000 and t.scheduler.config.beta_schedule == "linear"


def test_a_subfolder_holding_another_class_is_skipped_for_the_root(tmp_path):
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2).save_pretrained(tmp_path / "unet")
    UNet2DModel(**TINY_UNET).save_pretrained(tmp_path)  # the UNet sits at the root
    assert build_teacher(teacher_config(tmp_path), MEAN, STD).strides == (1, 2, 4, 8)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"could not load a UNet2DModel: unet: holds a AutoencoderKL, not a "
                                                r"UNet2DModel\. To get one"):
        build_teacher(teacher_config(tmp_path), MEAN, STD)


@pytest.mark.parametrize("source,is_hub", [
    ("google/ddpm-cifar10-32", True), ("ddpm-cifar10-32", True), ("a/b/c", False), ("./model", False),
    ("/abs/model", False), ("~/model", False), ("dir\\model", False), ("adm.pt", False), ("x.safetensors", False),
    ("bad repo id!", False), ("someone/sd-turbo", True), ("sd-turbo", True), ("./someone/sd", False), ("~/sd", False),
    ("/abs/sd", False), ("someone/model.safetensors", False), ("bad name/x", False),
])
def test_which_sources_count_as_hub_ids(source, is_hub):
    assert _is_hub_id(source) is is_hub


def test_the_scheduler_config_is_read_from_scheduler_or_the_root_else_the_default(tmp_path, caplog):
    DDPMScheduler(num_train_timesteps=300, beta_schedule="squaredcos_cap_v2").save_pretrained(tmp_path / "a")
    assert _load_scheduler(str(tmp_path / "a")).config.num_train_timesteps == 300  # the root
    DDPMScheduler(num_train_timesteps=200).save_pretrained(tmp_path / "a" / "scheduler")
    scheduler = _load_scheduler(str(tmp_path / "a"))
    assert scheduler.config.num_train_timesteps == 200  # scheduler/ first
    (tmp_path / "b").mkdir()
    with caplog.at_level("INFO", logger=sources_logger.name):
        default = _load_scheduler(str(tmp_path / "b"))
    assert default.config.num_train_timesteps == 1000 and default.config.beta_schedule == "linear"
    assert f"no scheduler config in {tmp_path / 'b'}: using the linear 1000-step DDPM schedule" in caplog.messages


# ---------------------------------------------------------------------------------- loading errors


def test_missing_sources_say_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the fmnist recipe's relative folder does not exist here
    fmnist = RECIPES["resnet18.dreamteacher_fmnist"].teacher
    with pytest.raises(FileNotFoundError, match=r"teachers/ddpm-fashion-mnist-32.*train_teacher\.py"):
        build_teacher(fmnist, MEAN, STD)  # a valid Hub id too: HF_HUB_OFFLINE makes it a cache miss
    with pytest.raises(FileNotFoundError, match=r"/no/such/dir/x.*not a valid Hugging Face Hub repo id"):
        build_teacher(fmnist, MEAN, STD, source="/no/such/dir/x")
    monkeypatch.setenv("DREAMTEACHER_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=r"adm:256x256_diffusion_uncond is not in the cache and HF_HUB_OFFLINE "
                                                r"is set: download https://\S+/256x256_diffusion_uncond\.pt to "
                                                + str(tmp_path / "cache" / "adm" / "256x256_diffusion_uncond.pt")):
        build_teacher(RECIPES["resnet50.dreamteacher_in1k"].teacher, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(FileNotFoundError, match=r"256x256_diffusion_uncond\.pt' \(adm\): no such checkpoint file\. To "
                                                r"get one: .*`python training/convert_adm\.py --checkpoint "):
        build_teacher(RECIPES["resnet50.dreamteacher_in1k"].teacher, IMAGENET_MEAN, IMAGENET_STD,
                        source="256x256_diffusion_uncond.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no unet/config\.json or config\.json"):
        build_teacher(fmnist, MEAN, STD, source=str(tmp_path / "empty"))


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
        build_teacher(teacher_config("someone/tiny-ddpm"), MEAN, STD)
    assert str(error.value) == (
        f"teacher source 'someone/tiny-ddpm' (unet): could not load a UNet2DModel{note}: unet: no unet config in the "
        f"repo; .: no root config in the repo. To get one: {_how_to_get('unet')}")


# ----------------------------------------------------------------------------------- build_teacher


def test_build_teacher_passes_every_setting_through(unet_dir):
    config = teacher_config(unet_dir, encoding="ddim", resolution=64, timestep=20)
    t = build_teacher(config, MEAN, STD, device="cpu", ddim_steps=2, channels_last=True, early_stop=False,
                        taps=["up_blocks.1.resnets.1", "up_blocks.0.resnets.1"])
    assert (t.kind, t.source, t.timestep, t.encoding, t.ddim_steps, t.resolution) == \
        ("unet", str(unet_dir), 20, "ddim", 2, 64)
    assert (t.channels_last, t.early_stop, t.device) == (True, False, torch.device("cpu"))
    assert [tap.name for tap in t.taps] == ["up_blocks.1.resnets.1", "up_blocks.0.resnets.1"]
    assert build_teacher(teacher_config(unet_dir, taps=("up_blocks.0.resnets.1",)), MEAN, STD).strides == (8,)
    default = build_teacher(teacher_config(unet_dir), MEAN, STD)
    assert (default.channels_last, default.early_stop, default.dtype, default.ddim_steps) == \
        (False, True, None, DEFAULT_DDIM_STEPS)


# --------------------------------------------------------------------------------------------- ADM


@pytest.fixture(scope="module")
def tiny_adm(tmp_path_factory):
    """A random guided-diffusion UNetModel (OpenAI's code), its .pt, and its training/teacher/adm.py conversion
    folder."""
    adm = pytest.importorskip("training.teacher.adm")
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
    t = build_teacher(TeacherConfig(kind="adm", source=str(d / "converted"), timestep=150), MEAN, STD)
    assert [(x.name, x.stride, x.channels) for x in t.taps] == [
        ("up_blocks.3.resnets.1", 1, 32),
        ("up_blocks.2.resnets.1", 2, 32),
        ("up_blocks.1.resnets.1", 4, 64),
        ("up_blocks.0.attentions.1", 8, 64),  # the level with attention is read after its attention layer
    ]
    # ADM's own activations: output_blocks[K] (last block of each level), read before its trailing upsample layer.
    blocks = {1: model.output_blocks[1][-2], 3: model.output_blocks[3][-2], 5: model.output_blocks[5][-2],
              7: model.output_blocks[7]}
    by_alias = build_teacher(
        TeacherConfig(kind="adm", source=str(d / "converted"), timestep=150,
                      taps=tuple(f"output_blocks.{k}" for k in blocks)), MEAN, STD,
    )
    assert by_alias.taps == t.taps  # ADM's numbering, through the folder's adm_flags.json
    x01, images = tiny_images()
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
    t_pt = build_teacher(cfg, MEAN, STD)
    assert t_pt.taps == t.taps
    again = t_pt(images, torch.Generator().manual_seed(5))
    assert all(torch.equal(again[s], feats[s]) for s in feats)
    with pytest.raises(ValueError, match="adm_preset"):
        build_teacher(dataclasses.replace(cfg, adm_preset=None), MEAN, STD)


def _write_adm_flags(folder, flags):
    """The adm_flags.json convert_to_folder writes, without converting a model."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adm_flags.json").write_text(json.dumps({"flags": dataclasses.asdict(flags)}))


def test_an_adm_checkpoint_needs_a_known_preset(tmp_path):
    with pytest.raises(ValueError, match=r"adm_preset set to one of \[.*'256x256_diffusion_uncond'.*\], got 'nope'"):
        _convert_adm(str(tmp_path / "x.pt"), "nope")
    with pytest.raises(ValueError, match=r"got None"):
        _convert_adm(str(tmp_path / "x.pt"), None)


@pytest.mark.parametrize("preset, schedule", [("64x64_diffusion", "squaredcos_cap_v2"),
                                              ("256x256_diffusion_uncond", "linear"), ("lsun_cat", "linear")])
def test_an_adm_checkpoint_gets_the_noise_schedule_it_was_trained_with(preset, schedule, monkeypatch):
    from training.teacher import adm

    converted = {}
    monkeypatch.setattr(adm, "load_checkpoint", lambda source: {"read": source})
    monkeypatch.setattr(adm, "convert", lambda sd, flags: converted.update(sd=sd, flags=flags) or "unet")
    unet, scheduler = _convert_adm("/ckpt.pt", preset)
    assert unet == "unet" and converted == {"sd": {"read": "/ckpt.pt"}, "flags": adm.PRESETS[preset]}
    assert scheduler.config.beta_schedule == schedule and scheduler.config.num_train_timesteps == 1000


def test_a_teacher_whose_weights_are_corrupt_is_a_one_line_error(unet_dir, tmp_path):
    import shutil

    broken = tmp_path / "teacher"
    shutil.copytree(unet_dir, broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match="has a config but its weights cannot be read"):
        build_teacher(teacher_config(broken), MEAN, STD)
