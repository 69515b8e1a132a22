"""Teacher taps (training/teacher/taps.py): default and named taps, ADM's output_blocks numbering, their strides and
channels known before a forward, the meta-device probe, the layout table.

Every model here is a tiny random one built from a config dict: no Hub, no GPU.
"""

from __future__ import annotations

import pytest
import torch

from tests.tiny import MEAN, STD, TINY_UNET, hooked_forward, teacher_config, tiny_images
from training.teacher.adm import adm_output_block_names
from training.teacher.build import build_teacher
from training.teacher.taps import (
    _first_tensor,
    default_tap_names,
    describe_taps,
    output_block_names,
    probe_taps,
    resolve_tap_names,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DModel  # noqa: E402


def test_default_taps_are_decoder_levels_before_their_upsamplers(teacher):
    assert [t.stride for t in teacher.taps] == [1, 2, 4, 8]  # finest first
    assert [t.channels for t in teacher.taps] == [8, 16, 16, 16]
    assert [t.name for t in teacher.taps] == [f"up_blocks.{i}.resnets.1" for i in (3, 2, 1, 0)]
    assert teacher.scheduler.config.num_train_timesteps == 500  # scheduler/ config was read

    # A hook on up_blocks[i] itself sees the output AFTER the upsampler: one level too fine. Not what we return.
    x01, images = tiny_images()
    after = hooked_forward(
        teacher.unet, [f"up_blocks.{i}" for i in range(4)], torch.randn(2, 3, 32, 32), torch.tensor([50])
    )
    feats = teacher(images)
    for i in range(3):
        tap = next(t for t in teacher.taps if t.name == f"up_blocks.{i}.resnets.1")
        block_stride = 32 // after[f"up_blocks.{i}"].shape[-1]
        assert block_stride == tap.stride // 2 != tap.stride
        assert feats[tap.stride].shape == (2, tap.channels, 32 // tap.stride, 32 // tap.stride)


def test_taps_known_before_forward_and_match_outputs(unet_dir):
    t = build_teacher(teacher_config(unet_dir), MEAN, STD)
    layout = [(tap.stride, tap.channels) for tap in t.taps]  # before any forward
    assert t.strides == (1, 2, 4, 8) and t.channels == (8, 16, 16, 16)
    feats = t(torch.zeros(1, 3, 64, 64))  # another size: strides hold, shapes follow
    assert [(s, f.shape[1]) for s, f in feats.items()] == layout
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(64 // s, 64 // s) for s, _ in layout]
    assert all(f.dtype == torch.float32 for f in feats.values())


def test_named_taps_post_upsample_mid_block_and_ordering(unet_dir):
    taps = ("mid_block", "up_blocks.0.upsamplers.0", "up_blocks.2.resnets.0")  # given coarse first
    t = build_teacher(teacher_config(unet_dir, taps=taps), MEAN, STD)
    assert [(x.name, x.stride, x.channels) for x in t.taps] == [
        ("up_blocks.2.resnets.0", 2, 16),
        ("up_blocks.0.upsamplers.0", 4, 16),  # after the upsampler: half the default level-0 stride (8)
        ("mid_block", 8, 16),
    ]
    assert list(t(tiny_images()[1])) == [2, 4, 8]
    # "output_blocks.K" is ADM's decoder numbering: 2 blocks per level here, so block 3 = level 1's last.
    t2 = build_teacher(teacher_config(unet_dir, taps=("output_blocks.3", "output_blocks.7")), MEAN, STD)
    assert [x.name for x in t2.taps] == ["up_blocks.3.resnets.1", "up_blocks.1.resnets.1"]


def test_bad_taps_raise_clear_errors(unet_dir):
    with pytest.raises(ValueError, match=r"unknown teacher tap 'up_blocks\.9\.resnets\.0'.*up_blocks\.0\.resnets\.1"):
        build_teacher(teacher_config(unet_dir, taps=("up_blocks.9.resnets.0",)), MEAN, STD)
    with pytest.raises(ValueError, match="distinct strides"):
        build_teacher(teacher_config(unet_dir, taps=("up_blocks.1.resnets.0", "up_blocks.1.resnets.1")), MEAN, STD)
    with pytest.raises(ValueError, match="not a .B, C, H, W. map"):
        build_teacher(teacher_config(unet_dir, taps=("time_embedding",)), MEAN, STD)
    with pytest.raises(ValueError, match=r"timestep 500 is outside"):
        build_teacher(teacher_config(unet_dir, timestep=500), MEAN, STD)


def test_adm256_default_taps_are_the_papers_output_blocks():
    """For the paper's 256x256 ADM (built on the meta device: no weights), default taps = output_blocks 2,5,8,11."""
    adm = pytest.importorskip("training.teacher.adm")
    with torch.device("meta"):
        unet = UNet2DModel(**adm.diffusers_config("256x256_diffusion_uncond"))
    paper = resolve_tap_names(unet, [f"output_blocks.{k}" for k in (2, 5, 8, 11)])
    assert paper == default_tap_names(unet)
    taps, order = probe_taps(unet, paper)
    assert [(t.stride, t.channels) for t in taps] == [(4, 512), (8, 512), (16, 1024), (32, 1024)]
    assert order[-1] == "up_blocks.3.resnets.2"


def test_probe_taps_runs_a_meta_copy_and_falls_back_to_the_real_unet(monkeypatch):
    unet = UNet2DModel(**TINY_UNET)
    calls = []
    unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape))
    names = default_tap_names(unet)
    taps, order = probe_taps(unet, names)
    assert calls == [] and [(t.stride, t.channels) for t in taps] == [(1, 8), (2, 16), (4, 16), (8, 16)]
    assert order == tuple(t.name for t in reversed(taps))  # the decoder runs coarse to fine

    def no_meta(*args, **kwargs):
        raise NotImplementedError("no meta kernel")

    monkeypatch.setattr(UNet2DModel, "from_config", no_meta)
    assert probe_taps(unet, names) == (taps, order)
    assert calls == [torch.Size([1, 3, 32, 32])]  # the real UNet, once, at batch 1 and the 4x4-coarsest size


def test_first_tensor_reads_a_tensor_a_tuple_or_a_sample_and_names_anything_else():
    x, y = torch.zeros(1), torch.ones(1)
    assert _first_tensor(x) is x
    assert _first_tensor((x, y)) is x and _first_tensor([y, x]) is y
    assert _first_tensor(type("Output", (), {"sample": y})()) is y
    for bad, name in (((), "tuple"), ([None, x], "list"), ({"sample": x}, "dict"), (None, "NoneType")):
        with pytest.raises(TypeError, match=rf"^cannot read a feature map from a module output of type {name}$"):
            _first_tensor(bad)


def test_describe_taps_table_for_a_non_square_size_that_does_not_fit(unet_dir):
    t = build_teacher(teacher_config(unet_dir, timestep=3), MEAN, STD)
    assert describe_taps(t, (16, 4)) == "\n".join([
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


@pytest.mark.parametrize("preset", ["256x256_diffusion_uncond", "64x64_diffusion", "lsun_bedroom"])
def test_the_numbering_read_off_a_converted_unet_is_the_converters_own(preset):
    """Teachers resolve "output_blocks.K" from the UNet's structure alone; for every converted ADM preset that equals
    training/teacher/adm.py's map from the flags (which records the taps in adm_flags.json)."""
    adm = pytest.importorskip("training.teacher.adm")
    with torch.device("meta"):
        unet = UNet2DModel(**adm.diffusers_config(preset))
    assert output_block_names(unet) == adm_output_block_names(preset)
