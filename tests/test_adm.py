"""training/teacher/adm.py: ADM (guided-diffusion) -> diffusers UNet2DModel, proven equal against OpenAI's own code.

Tiny random ADMs (32 px, width 32) are built with guided_diffusion.script_util.create_model, every weight is
re-drawn (ADM zero-inits its output convs and proj_out, which would hide mapping errors), and the converted model
must reproduce the output and every decoder block's activation (before its upsample) in eval mode: in float32 up
to rounding, and in float64 to 1e-10 (so the maths is the same, not just close).
"""

import dataclasses
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from training import convert_adm
from training.teacher.adm import (
    PRESETS,
    ADMFlags,
    adm_level_taps,
    adm_output_block_info,
    adm_output_block_to_diffusers,
    check_convertible,
    convert,
    convert_to_folder,
    diffusers_config,
    load_checkpoint,
    read_adm_flags,
)

with warnings.catch_warnings():  # guided_diffusion uses the deprecated torch.cuda.amp.custom_fwd decorator
    warnings.simplefilter("ignore", FutureWarning)
    pytest.importorskip("guided_diffusion", reason="OpenAI's ADM code: pip install 'dreamteacher-models[test]'")
    from guided_diffusion import nn as gd_nn
    from guided_diffusion import unet as gd_unet
    from guided_diffusion.script_util import create_model

REPO = Path(__file__).resolve().parents[1]
# float32: the two models differ by float32 rounding only, up to ~4e-5 of a tensor's max |value| here (sharp
# random attention amplifies it); a wrong mapping differs by ~30% of it. The float64 run pins the maths to 1e-10.
FP32_TOL = 1e-4  # of max |reference|

TINY = dict(image_size=32, num_channels=32)
VARIANTS = {
    # ADM-256's structure in miniature: resnet up/down, scale-shift norm, 6 outputs, fixed head width,
    # attention at two resolutions (16 and 8) with different widths (32 and 64 channels: 2 and 4 heads)
    "updown-scaleshift-sigma-headch": ADMFlags(
        **TINY,
        channel_mult=(1, 1, 2),
        num_res_blocks=2,
        attention_resolutions="16,8",
        num_head_channels=16,
        learn_sigma=True,
        resblock_updown=True,
        use_scale_shift_norm=True,
    ),
    # strided-conv down / nearest+conv up, additive time embedding, 3 outputs, num_heads (2 heads, legacy qkv order)
    "conv-resample-additive-numheads": ADMFlags(
        **TINY,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions="16,8",
        num_heads=2,
        learn_sigma=False,
        resblock_updown=False,
        use_scale_shift_norm=False,
    ),
    # class-conditional, new qkv order (several heads, so the order matters), as in the 64x64 model
    "classcond-neworder": ADMFlags(
        **TINY,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions="16",
        num_head_channels=16,
        class_cond=True,
        learn_sigma=True,
        resblock_updown=True,
        use_scale_shift_norm=True,
        use_new_attention_order=True,
        dropout=0.1,
    ),
}


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Re-draw every parameter (ADM zero-inits out.2, out_layers.3 and proj_out); qkv x2 for peaky attention."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                scale = (2.0 if "qkv" in name else 1.0) / p[0].numel() ** 0.5
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            elif name.endswith("weight"):  # GroupNorm gains
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def _adm(flags: ADMFlags, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model(**flags.as_guided_diffusion_kwargs()).eval()
    _randomize(model, seed)
    return model


def _inputs(flags: ADMFlags):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, flags.image_size, flags.image_size, generator=g)
    t = torch.tensor([7, 850])
    y = torch.tensor([3, 998]) if flags.class_cond else None
    return x, t, y


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.shape == want.shape and bool((got - want).abs().max() <= FP32_TOL * want.abs().max())


def _run_with_taps(ref, unet, flags, dtype):
    """Outputs of both models plus, per ADM output block, its activation before the upsample and the activation
    of the diffusers module the mapping names for it."""
    got_adm, got_diff, infos, handles = {}, {}, [], []
    for i, block in enumerate(ref.output_blocks):
        info = adm_output_block_info(i, flags)
        infos.append(info)
        last = block[-1]
        ends_with_upsample = isinstance(last, gd_unet.Upsample) or (isinstance(last, gd_unet.ResBlock) and last.updown)
        assert info.upsamples == ends_with_upsample, i
        src = block[-2] if ends_with_upsample else block
        handles.append(src.register_forward_hook(lambda m, a, out, i=i: got_adm.__setitem__(i, out)))
        handles.append(
            unet.get_submodule(info.module).register_forward_hook(lambda m, a, out, i=i: got_diff.__setitem__(i, out))
        )
    x, t, y = _inputs(flags)
    try:
        with torch.no_grad():
            want = ref(x.to(dtype), t, y=y)
            got = unet(x.to(dtype), t, class_labels=y).sample
    finally:
        for h in handles:
            h.remove()
    assert want.dtype == got.dtype == dtype
    assert len(got_adm) == len(got_diff) == len(ref.output_blocks)
    return want, got, infos, got_adm, got_diff


def _adm_in_float64(monkeypatch, ref):
    """Make OpenAI's ADM compute in float64: it hard-codes float32 in GroupNorm32, the softmax of the attention
    scores and the input cast. (The sinusoid stays float32 in both models, as in their own code.)"""

    def attention(self, qkv, legacy):
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        if legacy:
            q, k, v = qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)
        else:
            q, k, v = (z.reshape(bs * self.n_heads, ch, length) for z in qkv.chunk(3, dim=1))
        w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / ch**0.5, dim=-1)
        return torch.einsum("bts,bcs->bct", w, v).reshape(bs, -1, length)

    monkeypatch.setattr(gd_nn.GroupNorm32, "forward", torch.nn.GroupNorm.forward)
    monkeypatch.setattr(gd_unet.QKVAttentionLegacy, "forward", lambda self, qkv: attention(self, qkv, True))
    monkeypatch.setattr(gd_unet.QKVAttention, "forward", lambda self, qkv: attention(self, qkv, False))
    emb = gd_unet.timestep_embedding
    monkeypatch.setattr(gd_unet, "timestep_embedding", lambda *a, **k: emb(*a, **k).double())
    ref.double()
    ref.dtype = torch.float64


@pytest.mark.parametrize("name", list(VARIANTS))
def test_converted_model_equals_adm_output_and_every_decoder_block(name, monkeypatch):
    flags = VARIANTS[name]
    ref = _adm(flags)
    unet = convert(ref.state_dict(), flags)
    assert not unet.training and all(p.dtype == torch.float32 for p in unet.parameters())

    # float32, as used: equal up to float32 rounding (ADM's own float32 attention softmax included)
    want, got, infos, acts_adm, acts_diff = _run_with_taps(ref, unet, flags, torch.float32)
    assert got.shape == (2, 6 if flags.learn_sigma else 3, flags.image_size, flags.image_size)
    assert want.abs().max() > 0.5  # the randomized model really computes something
    assert _close(got, want), (got - want).abs().max()
    for i, info in enumerate(infos):
        a, d = acts_adm[i], acts_diff[i]
        side = flags.image_size // info.stride
        assert a.shape == (2, info.channels, side, side), (i, a.shape, info)
        assert _close(d, a), (i, info.module, (d - a).abs().max())

    # float64: the same maths to 1e-10, so no small systematic difference (an eps, a scale) hides in the fp32 noise
    _adm_in_float64(monkeypatch, ref)
    unet.double()
    want, got, infos, acts_adm, acts_diff = _run_with_taps(ref, unet, flags, torch.float64)
    assert torch.allclose(got, want, rtol=0, atol=1e-10), (got - want).abs().max()
    for i in range(len(infos)):
        assert torch.allclose(acts_diff[i], acts_adm[i], rtol=0, atol=1e-10), (i, infos[i].module)


def test_attention_order_and_time_embedding_are_really_tested():
    """The equality above would fail if the qkv layout or the sin/cos order were mapped wrong."""
    flags = VARIANTS["classcond-neworder"]
    ref = _adm(flags)
    x, t, y = _inputs(flags)
    wrong_order = convert(ref.state_dict(), dataclasses.replace(flags, use_new_attention_order=False))
    wrong_time = convert(ref.state_dict(), flags)
    wrong_time.time_proj.flip_sin_to_cos = False
    with torch.no_grad():
        want = ref(x, t, y=y)
        for wrong in (wrong_order, wrong_time):
            assert (wrong(x, t, class_labels=y).sample - want).abs().max() > 1e-2


def test_paper_teacher_taps_and_full_size_presets_convert():
    flags = PRESETS["256x256_diffusion_uncond"]
    assert (flags.image_size, flags.num_channels, flags.num_res_blocks, flags.num_head_channels) == (256, 256, 2, 64)
    assert flags.attention_resolutions == (32, 16, 8)
    assert flags.learn_sigma and flags.resblock_updown and flags.use_scale_shift_norm and not flags.class_cond
    taps = adm_level_taps(flags)  # strides 32, 16, 8, 4 = the paper's output blocks 3, 6, 9, 12
    assert [(t.adm_index, t.module, t.stride, t.channels) for t in taps] == [
        (2, "up_blocks.0.attentions.2", 32, 1024),
        (5, "up_blocks.1.attentions.2", 16, 1024),
        (8, "up_blocks.2.attentions.2", 8, 512),
        (11, "up_blocks.3.resnets.2", 4, 512),
    ]
    assert all(t.upsamples for t in taps)
    assert adm_output_block_to_diffusers(0, flags) == "up_blocks.0.attentions.0"
    assert adm_output_block_to_diffusers(17, flags) == "up_blocks.5.resnets.2"
    assert not adm_output_block_info(17, flags).upsamples
    with pytest.raises(ValueError, match="0..17"):
        adm_output_block_to_diffusers(18, flags)
    with pytest.raises(ValueError, match="stride 64 is not"):
        adm_level_taps(PRESETS["64x64_diffusion"], strides=(2, 64))

    # every key consumed and every shape matched at full size, for free: a meta-device ADM state dict
    for name in ("256x256_diffusion_uncond", "64x64_diffusion", "256x256_diffusion"):
        fl = PRESETS[name]
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            ref = create_model(**fl.as_guided_diffusion_kwargs())
        unet = convert(ref.state_dict(), fl)
        n = sum(p.numel() for p in unet.parameters())
        assert n == sum(p.numel() for p in ref.parameters())
        if name == "256x256_diffusion_uncond":
            assert n == 552_814_086
    cfg = diffusers_config(flags)
    assert cfg["out_channels"] == 6 and cfg["resnet_time_scale_shift"] == "scale_shift"
    assert cfg["attention_head_dim"] == 64 and cfg["flip_sin_to_cos"] and cfg["freq_shift"] == 0


def test_flags_normalise_and_round_trip():
    a = ADMFlags(channel_mult="1,2,2", attention_resolutions="16,8", image_size=32)
    b = ADMFlags(channel_mult=(1, 2, 2), attention_resolutions=(16, 8), image_size=32)
    assert a == b and hash(a) == hash(b)
    assert a.as_guided_diffusion_kwargs()["channel_mult"] == "1,2,2"
    assert a.as_guided_diffusion_kwargs()["attention_resolutions"] == "16,8"
    assert ADMFlags(**json.loads(json.dumps(a.to_json_dict()))) == a
    assert PRESETS["256x256_diffusion_uncond"].resolved_channel_mult() == (1, 1, 2, 2, 4, 4)
    with pytest.raises(ValueError, match="attention_resolutions"):
        ADMFlags(attention_resolutions="32,x")
    with pytest.raises(ValueError, match="learn_sigma"):
        ADMFlags(learn_sigma="yes")


# --- errors -----------------------------------------------------------------------------------------------------

SMALL = ADMFlags(
    **TINY,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions="16",
    num_head_channels=32,
    learn_sigma=True,
    resblock_updown=True,
)


@pytest.fixture(scope="module")
def small_sd():
    return _adm(SMALL, seed=3).state_dict()


@pytest.mark.parametrize(
    "change, flag",
    [
        (dict(num_channels=64), "num_channels"),
        (dict(learn_sigma=False), "learn_sigma"),
        (dict(class_cond=True), "class_cond"),
        (dict(num_res_blocks=2), "num_res_blocks"),
        (dict(channel_mult=(1, 2, 2)), "channel_mult"),
        (dict(resblock_updown=False), "resblock_updown"),
        (dict(use_scale_shift_norm=False), "use_scale_shift_norm"),
        (dict(attention_resolutions="8"), "attention_resolutions"),
    ],
)
def test_flag_checkpoint_mismatch_is_a_clear_error(small_sd, change, flag):
    with pytest.raises(ValueError, match=flag):
        convert(small_sd, dataclasses.replace(SMALL, **change))


def test_checkpoint_key_and_shape_problems_are_clear_errors(small_sd):
    extra = dict(small_sd, **{"extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="not used by these flags: extra.weight"):
        convert(extra, SMALL)
    bad = dict(small_sd)
    bad["middle_block.1.qkv.weight"] = torch.zeros(3 * 64, 32, 1)
    with pytest.raises(
        ValueError, match=r"middle_block.1.qkv.weight: checkpoint \(192, 32, 1\) vs flags \(192, 64, 1\)"
    ):
        convert(bad, SMALL)
    missing = {k: v for k, v in small_sd.items() if k != "output_blocks.0.0.out_layers.3.bias"}
    with pytest.raises(ValueError, match="missing from the checkpoint: output_blocks.0.0.out_layers.3.bias"):
        convert(missing, SMALL)
    with pytest.raises(ValueError, match="input_blocks.0.0.weight"):
        convert({"module." + k: v for k, v in small_sd.items()}, SMALL)


@pytest.mark.parametrize(
    "flags, flag",
    [
        # the 128x128 ImageNet model: num_heads=4 over widths 512/768/1024 -> three head widths
        (ADMFlags(image_size=128, num_channels=256, num_heads=4, attention_resolutions="32,16,8"), "num_heads"),
        (
            ADMFlags(**TINY, channel_mult=(1, 2), num_heads=2, num_heads_upsample=4, attention_resolutions="16"),
            "num_heads_upsample",
        ),
        # the 512x512 model: channel_mult starts at 0.5
        (
            ADMFlags(image_size=512, num_channels=256, num_head_channels=64, attention_resolutions="32,16,8"),
            "channel_mult",
        ),
        (ADMFlags(**TINY), "channel_mult"),  # no guided-diffusion default channel_mult for 32 px
        (ADMFlags(image_size=32, num_channels=48, channel_mult=(1, 2)), "divisible by 32"),
    ],
)
def test_unrepresentable_flags_are_refused(flags, flag):
    with pytest.raises(ValueError, match=flag):
        check_convertible(flags)
    with pytest.raises(ValueError, match=flag):
        convert({}, flags)


def test_missing_checkpoint_names_the_path(tmp_path):
    path = tmp_path / "nope" / "256x256_diffusion_uncond.pt"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match=str(path).replace("\\", "\\\\")):
        convert_to_folder(path, SMALL, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_load_checkpoint_pt_and_safetensors(tmp_path, small_sd):
    from safetensors.torch import save_file

    torch.save(small_sd, tmp_path / "m.pt")
    save_file({k: v.contiguous() for k, v in small_sd.items()}, tmp_path / "m.safetensors")
    for f in ("m.pt", "m.safetensors"):
        sd = load_checkpoint(tmp_path / f)
        assert sd.keys() == small_sd.keys() and all(torch.equal(sd[k], small_sd[k]) for k in sd)
    torch.save({"model": small_sd, "step": 3}, tmp_path / "wrapped.pt")
    with pytest.raises(ValueError, match="not a flat state dict"):
        load_checkpoint(tmp_path / "wrapped.pt")


# --- folder output, atomicity, CLI ------------------------------------------------------------------------------


def test_convert_to_folder_is_atomic(tmp_path, small_sd, monkeypatch):
    from diffusers import UNet2DModel

    out = tmp_path / "teacher"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="teacher"):
        convert_to_folder(small_sd, SMALL, out)
    assert (out / "keep.txt").read_text() == "old"

    def crash(self, save_directory, **kwargs):
        Path(save_directory, "config.json").write_text("{half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(UNet2DModel, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_to_folder(small_sd, SMALL, out, overwrite=True)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_to_folder(small_sd, SMALL, tmp_path / "fresh")
    assert sorted(os.listdir(tmp_path)) == ["teacher"]  # no temp dirs, no half-written folder
    assert os.listdir(out) == ["keep.txt"]
    monkeypatch.undo()

    convert_to_folder(small_sd, SMALL, out, overwrite=True)
    assert sorted(os.listdir(out)) == ["adm_flags.json", "config.json", "diffusion_pytorch_model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["teacher"]
    assert read_adm_flags(out) == SMALL


def test_cli_round_trip_loads_with_from_pretrained(tmp_path):
    """The documented command, with guided-diffusion README-style flags pasted in, on a tiny checkpoint."""
    from diffusers import UNet2DModel

    flags = VARIANTS["updown-scaleshift-sigma-headch"]
    ref = _adm(flags, seed=5)
    ckpt = tmp_path / "tiny_adm.pt"
    torch.save(ref.state_dict(), ckpt)
    out = tmp_path / "converted"
    cmd = [
        sys.executable,
        "training/convert_adm.py",
        "--checkpoint",
        str(ckpt),
        "--out",
        str(out),
        "--image_size",
        "32",
        "--num_channels",
        "32",
        "--channel_mult",
        "1,1,2",
        "--num_res_blocks",
        "2",
        "--attention_resolutions",
        "16,8",
        "--num_head_channels",
        "16",
        "--learn_sigma",
        "True",
        "--resblock_updown",
        "True",
        "--use-scale-shift-norm",
        "True",
        "--class_cond",
        "False",
        "--diffusion_steps",
        "1000",
        "--noise_schedule",
        "linear",
        "--use_fp16",
        "True",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "parameters" in proc.stdout and "up_blocks.0.attentions.2" in proc.stdout  # stride-8 tap listed

    unet = UNet2DModel.from_pretrained(out).eval()
    assert read_adm_flags(out) == dataclasses.replace(flags, use_fp16=True)
    x, t, y = _inputs(flags)
    with torch.no_grad():
        assert _close(unet(x, t).sample, ref(x, t))


def test_cli_help_preset_and_errors(tmp_path, capsys, small_sd):
    with pytest.raises(SystemExit) as e:
        convert_adm.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(ADMFlags):
        assert f"--{f.name.replace('_', '-')}" in text
    assert "256x256_diffusion_uncond" in text

    ckpt = tmp_path / "small.pt"
    torch.save(small_sd, ckpt)
    # the paper preset against a checkpoint of another shape: exit 2 with the flag named, nothing written
    assert (
        convert_adm.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "o"), "--preset",
                          "256x256_diffusion_uncond"]) == 2
    )
    assert "num_channels" in capsys.readouterr().err
    assert (
        convert_adm.main(
            ["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o"), "--preset", "64x64_diffusion"]
        )
        == 2
    )
    assert "missing.pt" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # preset + explicit overrides
    args = convert_adm._parser().parse_args(
        ["--preset", "256x256_diffusion_uncond", "--class-cond", "True", "--dropout", "0.1"]
    )
    assert convert_adm.flags_from_args(args) == dataclasses.replace(
        PRESETS["256x256_diffusion_uncond"], class_cond=True, dropout=0.1
    )
