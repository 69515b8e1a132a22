"""Convert an OpenAI guided-diffusion (ADM) checkpoint into a diffusers ``UNet2DModel``, exactly.

DreamTeacher's main teacher is ADM (``256x256_diffusion_uncond.pt``, Dhariwal & Nichol 2021). Its checkpoints do
not load in diffusers (diffusers issue 1197), so this module rebuilds the same network from diffusers parts and
maps every weight. ``tests/test_adm.py`` proves, against OpenAI's own ``guided_diffusion`` code, that the converted
model gives the same output and the same decoder activations (fp32, eval mode) for every variant of the flags below.

Usage::

    python training/convert_adm.py --checkpoint 256x256_diffusion_uncond.pt --out teachers/adm256 \\
        --preset 256x256_diffusion_uncond
    # or the guided-diffusion README flags themselves (dash or underscore spelling):
    python training/convert_adm.py --checkpoint model.pt --out DIR --image_size 256 --num_channels 256 \\
        --num_res_blocks 2 --attention_resolutions 32,16,8 --num_head_channels 64 --learn_sigma True \\
        --resblock_updown True --use_scale_shift_norm True

    from training.teacher.adm import PRESETS, convert, load_checkpoint
    unet = convert(load_checkpoint("256x256_diffusion_uncond.pt"), PRESETS["256x256_diffusion_uncond"])
    eps_and_var = unet(x_t, t).sample          # == guided_diffusion UNetModel(x_t, t)

What is exact and what is refused
---------------------------------
* Supported exactly: resblock_updown on/off, use_scale_shift_norm on/off, learn_sigma (out_channels 6 = eps and
  the variance interpolation v, as in ADM; diffusers pipelines expect 3, slice ``[:, :3]``), class_cond
  (``num_class_embeds=1000``; pass ``class_labels=y``), num_head_channels, num_heads (when it gives one head width
  for every attention layer), use_new_attention_order True and False (both qkv layouts are re-split exactly),
  dropout (kept in the config; inactive in eval mode), use_fp16 (ignored: the converted weights are float32).
* Refused with a ``ValueError`` naming the flag: a first ``channel_mult`` other than 1 (the 512x512 model: diffusers
  sizes the sinusoidal time embedding by the first level's width, ADM by num_channels), ``num_heads`` /
  ``num_heads_upsample`` that give different head widths in different layers (the 128x128 model: diffusers has
  one ``attention_head_dim`` for the whole UNet), level widths not divisible by 32 (GroupNorm(32)), and an
  ``image_size`` without a default channel_mult when ``channel_mult=""``. Super-resolution models (6 input
  channels) are refused from the checkpoint shapes.
* Checked against the checkpoint: num_channels (``input_blocks.0.0.weight``), learn_sigma (``out.2.weight``),
  class_cond (``label_emb.weight``), the number of input/output blocks (num_res_blocks x channel_mult),
  resblock_updown, use_scale_shift_norm, attention_resolutions, then every key and every shape. Every checkpoint
  key must be consumed and every diffusers parameter filled (strict).
* NOT checkable from the weights: ``num_heads`` / ``num_head_channels`` and ``use_new_attention_order`` do not
  change any tensor shape. Wrong values there give a model with the right shapes and wrong outputs, so take them
  from the README flags of the checkpoint you convert (the presets below carry them).
* The timestep embedding is ADM's cos-then-sin sinusoid: ``flip_sin_to_cos=True, freq_shift=0`` (verified by the
  equality test). ADM's timestep is the raw index 0..999 (``rescale_timesteps=False`` for all released models).
  The noise schedule (linear for the 256 models, cosine for 64x64) is a diffusion setting, not part of the UNet:
  configure the teacher's scheduler for it.

ADM output_blocks -> diffusers module names (feature taps)
----------------------------------------------------------
ADM's decoder ``output_blocks`` is a flat list; diffusers groups it by level. With L = len(channel_mult) levels and
R = num_res_blocks, ADM has R+1 output blocks per level, deepest level first, and the LAST block of every level but
the shallowest ends with an upsampling layer (a ResBlock(up=True) when resblock_updown, else an Upsample conv).
diffusers puts that upsampler in ``up_blocks[b].upsamplers[0]``, outside the resnets/attentions, so::

    ADM output_blocks[i] (0-based), before its upsample == diffusers up_blocks[b].attentions[k]  (level has attention)
                                                        == diffusers up_blocks[b].resnets[k]     (otherwise)
    with b = i // (R + 1), k = i % (R + 1); level = L - 1 - b; stride (input px per feature px) = 2 ** level.

A forward hook on that diffusers module returns a plain tensor. (A hook on ``up_blocks[b]`` itself would see the
output AFTER the upsampler: one level too fine.) For the paper teacher (256x256_diffusion_uncond: L=6, R=2,
attention at strides 32,16,8) the paper's output blocks 3, 6, 9, 12 (1-indexed) are::

    paper block | ADM output_blocks[i] | diffusers module        | stride | channels | feature size at 256 px
    3           | 2                    | up_blocks.0.attentions.2 | 32     | 1024     | 8x8
    6           | 5                    | up_blocks.1.attentions.2 | 16     | 1024     | 16x16
    9           | 8                    | up_blocks.2.attentions.2 | 8      | 512      | 32x32
    12          | 11                   | up_blocks.3.resnets.2    | 4      | 512      | 64x64

``adm_output_block_to_diffusers(i, flags)`` gives the module name for any block and any flags,
``adm_output_block_info(i, flags)`` adds stride and channels, and ``adm_level_taps(flags, strides=(32, 16, 8, 4))``
gives the stride-matched taps (the last block of each decoder level, before its upsample) used by DreamTeacher.
Running only the decoder up to the last tap is the teacher's business (training/teacher/frozen.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # diffusers is imported lazily: `import training.teacher.adm` stays cheap
    from diffusers import UNet2DModel

__all__ = [
    "ADMFlags",
    "ADMTap",
    "PRESETS",
    "NUM_CLASSES",
    "adm_level_taps",
    "adm_output_block_info",
    "adm_output_block_names",
    "adm_output_block_to_diffusers",
    "check_convertible",
    "convert",
    "convert_to_folder",
    "diffusers_config",
    "load_checkpoint",
    "read_adm_flags",
]

NUM_CLASSES = 1000  # guided_diffusion.script_util.NUM_CLASSES: every class_cond model is ImageNet-1k
FLAGS_FILE = "adm_flags.json"  # written beside config.json by convert_to_folder
_GROUPS = 32  # guided_diffusion.nn.normalization is GroupNorm(32, C), eps 1e-5
_EPS = 1e-5

# guided_diffusion.script_util.create_model: channel_mult="" means this, per image size
_DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}


def _parse_ints(value: Any, name: str) -> tuple[int, ...]:
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, Sequence):
        parts = list(value)
    else:
        raise ValueError(f"{name} must be a comma-separated string like '32,16,8' or a tuple of ints, got {value!r}")
    try:
        out = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must contain integers, got {value!r}") from None
    if any(v <= 0 for v in out):
        raise ValueError(f"{name} must contain positive integers, got {value!r}")
    return out


def _parse_mult(value: Any) -> str | tuple[float | int, ...]:
    if value == "" or value is None or (isinstance(value, Sequence) and not isinstance(value, str) and not value):
        return ""
    parts = [p.strip() for p in value.split(",") if p.strip()] if isinstance(value, str) else list(value)
    out: list[float | int] = []
    for p in parts:
        try:
            f = float(p)
        except (TypeError, ValueError):
            raise ValueError(f"channel_mult must be '' or numbers like '1,1,2,2,4,4', got {value!r}") from None
        if f <= 0:
            raise ValueError(f"channel_mult must be positive, got {value!r}")
        out.append(int(f) if f.is_integer() else f)
    return tuple(out)


@dataclass(frozen=True)
class ADMFlags:
    """guided-diffusion model flags (``script_util.create_model``); defaults = ``model_and_diffusion_defaults()``.

    ``channel_mult``: "" (guided-diffusion's default for ``image_size``), a string "1,2,2" or a tuple.
    ``attention_resolutions``: feature-map sizes with attention, "32,16,8" or a tuple of ints (resolutions, as in
    guided-diffusion; attention sits where ``image_size // res`` equals the level's downsampling factor).
    ``num_head_channels`` -1 means "use num_heads"; ``num_heads_upsample`` -1 means "= num_heads".
    Strings are normalised to tuples, so equal flags compare equal and hash equal.
    """

    image_size: int = 64
    num_channels: int = 128
    num_res_blocks: int = 2
    channel_mult: str | tuple[float | int, ...] = ""
    attention_resolutions: str | tuple[int, ...] = "16,8"
    num_head_channels: int = -1
    num_heads: int = 4
    num_heads_upsample: int = -1
    learn_sigma: bool = False
    class_cond: bool = False
    resblock_updown: bool = False
    use_scale_shift_norm: bool = True
    use_new_attention_order: bool = False
    dropout: float = 0.0
    use_fp16: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", _parse_mult(self.channel_mult))
        object.__setattr__(
            self, "attention_resolutions", _parse_ints(self.attention_resolutions, "attention_resolutions")
        )
        for name in ("image_size", "num_channels", "num_res_blocks", "num_heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("num_head_channels", "num_heads_upsample"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or (v <= 0 and v != -1):
                raise ValueError(f"{name} must be a positive int or -1 (unused), got {v!r}")
        for name in (
            "learn_sigma",
            "class_cond",
            "resblock_updown",
            "use_scale_shift_norm",
            "use_new_attention_order",
            "use_fp16",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not (0.0 <= float(self.dropout) < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    # --- derived architecture -------------------------------------------------------------------------------
    def resolved_channel_mult(self) -> tuple[float | int, ...]:
        if self.channel_mult == "":
            if self.image_size not in _DEFAULT_CHANNEL_MULT:
                raise ValueError(
                    f"channel_mult='' has no guided-diffusion default for image_size={self.image_size}: "
                    f"defaults exist for image_size in {sorted(_DEFAULT_CHANNEL_MULT)}; pass channel_mult explicitly"
                )
            return _DEFAULT_CHANNEL_MULT[self.image_size]
        return self.channel_mult  # type: ignore[return-value]

    def level_channels(self) -> tuple[int, ...]:
        """Width of each encoder level (``int(mult * num_channels)``), shallowest first."""
        return tuple(int(m * self.num_channels) for m in self.resolved_channel_mult())

    def attention_levels(self) -> tuple[bool, ...]:
        """Per level (shallowest first): does it have attention (``2**level in image_size // res``)."""
        ds = {self.image_size // r for r in self.attention_resolutions}
        return tuple((2**level) in ds for level in range(len(self.resolved_channel_mult())))

    def as_guided_diffusion_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``guided_diffusion.script_util.create_model`` (strings where it wants strings)."""
        mult = self.channel_mult
        return dict(
            image_size=self.image_size,
            num_channels=self.num_channels,
            num_res_blocks=self.num_res_blocks,
            channel_mult="" if mult == "" else ",".join(str(m) for m in mult),
            learn_sigma=self.learn_sigma,
            class_cond=self.class_cond,
            attention_resolutions=",".join(str(r) for r in self.attention_resolutions),
            num_heads=self.num_heads,
            num_head_channels=self.num_head_channels,
            num_heads_upsample=self.num_heads_upsample,
            use_scale_shift_norm=self.use_scale_shift_norm,
            dropout=self.dropout,
            resblock_updown=self.resblock_updown,
            use_fp16=self.use_fp16,
            use_new_attention_order=self.use_new_attention_order,
        )

    def to_json_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channel_mult"] = "" if self.channel_mult == "" else list(self.channel_mult)
        d["attention_resolutions"] = list(self.attention_resolutions)
        return d


_ADM256 = dict(
    image_size=256,
    num_channels=256,
    num_res_blocks=2,
    attention_resolutions="32,16,8",
    num_head_channels=64,
    learn_sigma=True,
    resblock_updown=True,
    use_scale_shift_norm=True,
    use_fp16=True,
)

#: Model flags from the guided-diffusion README, by checkpoint file stem. The 128x128 (num_heads=4: head widths
#: 128/192/256 differ per level) and 512x512 (channel_mult starts at 0.5) models cannot be represented by
#: diffusers' UNet2DModel and are deliberately absent: ``convert`` refuses their flags with a ValueError.
PRESETS: dict[str, ADMFlags] = {
    # the DreamTeacher paper's teacher
    "256x256_diffusion_uncond": ADMFlags(**_ADM256, class_cond=False),
    "256x256_diffusion": ADMFlags(**_ADM256, class_cond=True),
    "64x64_diffusion": ADMFlags(
        image_size=64,
        num_channels=192,
        num_res_blocks=3,
        attention_resolutions="32,16,8",
        num_head_channels=64,
        learn_sigma=True,
        class_cond=True,
        resblock_updown=True,
        use_scale_shift_norm=True,
        use_new_attention_order=True,
        dropout=0.1,
        use_fp16=True,
    ),  # note: trained with the cosine noise schedule
    "lsun_bedroom": ADMFlags(**_ADM256, dropout=0.1),
    "lsun_cat": ADMFlags(**_ADM256, dropout=0.1),
    "lsun_horse": ADMFlags(**_ADM256, dropout=0.1),
    "lsun_horse_nodropout": ADMFlags(**_ADM256, dropout=0.0),
}


def _as_flags(flags: ADMFlags | str) -> ADMFlags:
    if isinstance(flags, ADMFlags):
        return flags
    if isinstance(flags, str):
        if flags not in PRESETS:
            raise ValueError(f"unknown ADM preset {flags!r}; presets: {', '.join(sorted(PRESETS))}")
        return PRESETS[flags]
    raise TypeError(f"flags must be an ADMFlags or a preset name, got {type(flags).__name__}")


# --- flags -> diffusers config --------------------------------------------------------------------------------


def _attention_head_dim(flags: ADMFlags) -> int:
    """The single head width every attention layer must share (diffusers has one ``attention_head_dim``)."""
    chans = flags.level_channels()
    attn = flags.attention_levels()
    layers: list[tuple[str, int, int]] = []  # (where, channels, heads)
    heads_up = flags.num_heads if flags.num_heads_upsample == -1 else flags.num_heads_upsample
    for level, (c, a) in enumerate(zip(chans, attn, strict=True)):
        if a:
            layers.append((f"encoder level {level}", c, flags.num_heads))
    layers.append(("middle block", chans[-1], flags.num_heads))
    for level, (c, a) in enumerate(zip(chans, attn, strict=True)):
        if a:
            layers.append((f"decoder level {level}", c, heads_up))
    if flags.num_head_channels != -1:
        bad = [(w, c) for w, c, _ in layers if c % flags.num_head_channels]
        if bad:
            raise ValueError(
                f"num_head_channels={flags.num_head_channels} does not divide the attention width of "
                f"{', '.join(f'{w} ({c} channels)' for w, c in bad)}: guided-diffusion itself cannot build this model"
            )
        return flags.num_head_channels
    bad = [(w, c, h) for w, c, h in layers if c % h]
    if bad:
        raise ValueError(
            "num_heads/num_heads_upsample must divide every attention width; "
            + ", ".join(f"{w}: {c} channels, {h} heads" for w, c, h in bad)
        )
    dims = {c // h for _, c, h in layers}
    if len(dims) != 1:
        detail = ", ".join(f"{w}: {c}/{h}={c // h}" for w, c, h in layers)
        raise ValueError(
            f"num_heads={flags.num_heads}, num_heads_upsample={flags.num_heads_upsample} give different attention "
            f"head widths per layer ({detail}); diffusers' UNet2DModel has ONE attention_head_dim for all layers, "
            "so this model cannot be represented exactly. Allowed: num_head_channels > 0 (a fixed head width, as in "
            "the 64x64 and 256x256 models), or num_heads/num_heads_upsample that give one head width everywhere"
        )
    return dims.pop()


def check_convertible(flags: ADMFlags | str) -> None:
    """Raise ``ValueError`` (naming the flag and what is allowed) if diffusers cannot represent these flags exactly."""
    flags = _as_flags(flags)
    mult = flags.resolved_channel_mult()
    chans = flags.level_channels()
    if chans[0] != flags.num_channels:
        raise ValueError(
            f"channel_mult={tuple(mult)} starts with {mult[0]}: ADM's timestep embedding is sized by num_channels "
            f"({flags.num_channels}) but diffusers' UNet2DModel sizes it by the first level's width ({chans[0]}), so "
            "this model cannot be represented exactly. Allowed: channel_mult whose first entry is 1"
        )
    bad = [c for c in chans if c % _GROUPS]
    if bad:
        raise ValueError(
            f"num_channels={flags.num_channels} x channel_mult={tuple(mult)} gives level widths {chans}; every width "
            f"must be divisible by {_GROUPS} (ADM normalises with GroupNorm({_GROUPS}, C))"
        )
    _attention_head_dim(flags)


def diffusers_config(flags: ADMFlags | str) -> dict[str, Any]:
    """The ``UNet2DModel`` config that reproduces the ADM described by ``flags`` (after ``check_convertible``)."""
    flags = _as_flags(flags)
    check_convertible(flags)
    chans = flags.level_channels()
    attn = flags.attention_levels()
    plain_down, plain_up = (
        ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if flags.resblock_updown else ("DownBlock2D", "UpBlock2D")
    )
    down = tuple("AttnDownBlock2D" if a else plain_down for a in attn)
    up = tuple("AttnUpBlock2D" if a else plain_up for a in reversed(attn))
    resample = "resnet" if flags.resblock_updown else "conv"
    return dict(
        sample_size=flags.image_size,
        in_channels=3,
        out_channels=6 if flags.learn_sigma else 3,
        center_input_sample=False,
        time_embedding_type="positional",
        flip_sin_to_cos=True,  # ADM: cat([cos, sin])
        freq_shift=0,  # ADM: exp(-log(10000) * i / half)
        down_block_types=down,
        mid_block_type="UNetMidBlock2D",
        up_block_types=up,
        block_out_channels=chans,
        layers_per_block=flags.num_res_blocks,
        mid_block_scale_factor=1,
        downsample_padding=1,
        downsample_type=resample,
        upsample_type=resample,
        dropout=float(flags.dropout),
        act_fn="silu",
        attention_head_dim=_attention_head_dim(flags),
        norm_num_groups=_GROUPS,
        attn_norm_num_groups=_GROUPS,  # else diffusers drops the mid-block attention GroupNorm with scale_shift
        norm_eps=_EPS,
        resnet_time_scale_shift="scale_shift" if flags.use_scale_shift_norm else "default",
        add_attention=True,
        class_embed_type=None,
        num_class_embeds=NUM_CLASSES if flags.class_cond else None,
    )


# --- decoder taps -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ADMTap:
    """ADM ``output_blocks[adm_index]`` before its upsample, as a diffusers module."""

    adm_index: int  # 0-based index into ADM's output_blocks (the paper's block numbers are this + 1)
    module: str  # diffusers module name: a forward hook on it returns this activation
    stride: int  # input pixels per feature pixel
    channels: int
    upsamples: bool  # ADM's block ends with an upsample (the activation here is taken before it)


def adm_output_block_info(index: int, flags: ADMFlags | str) -> ADMTap:
    """Which diffusers module produces ADM's ``output_blocks[index]`` activation (before any upsample in it)."""
    flags = _as_flags(flags)
    chans = flags.level_channels()
    attn = flags.attention_levels()
    per_level = flags.num_res_blocks + 1
    n = len(chans) * per_level
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
        raise ValueError(
            f"output block index {index!r} out of range: this ADM has {n} output_blocks, 0-based indices 0..{n - 1} "
            "(the paper's 1-indexed block k is index k-1)"
        )
    b, k = divmod(index, per_level)
    level = len(chans) - 1 - b
    kind = "attentions" if attn[level] else "resnets"
    return ADMTap(
        adm_index=index,
        module=f"up_blocks.{b}.{kind}.{k}",
        stride=2**level,
        channels=chans[level],
        upsamples=level > 0 and k == flags.num_res_blocks,
    )


def adm_output_block_to_diffusers(index: int, flags: ADMFlags | str) -> str:
    """diffusers module name whose output equals ADM ``output_blocks[index]`` before its upsample (0-based index).

    E.g. for ``PRESETS["256x256_diffusion_uncond"]``: 2 -> "up_blocks.0.attentions.2", 11 -> "up_blocks.3.resnets.2".
    """
    return adm_output_block_info(index, flags).module


def adm_output_block_names(flags) -> dict[int, str]:
    """output_blocks index -> diffusers module for ADM `flags` (an ADMFlags or preset name), for every decoder block."""
    flags = _as_flags(flags)
    n = len(flags.level_channels()) * (flags.num_res_blocks + 1)
    return {k: adm_output_block_to_diffusers(k, flags) for k in range(n)}


def adm_level_taps(flags: ADMFlags | str, strides: Sequence[int] = (32, 16, 8, 4)) -> list[ADMTap]:
    """The stride-matched decoder taps: for each stride, the last output block of that decoder level, read before
    its upsample. For the 256x256 ADM and strides (32, 16, 8, 4) these are the paper's blocks 3, 6, 9, 12."""
    flags = _as_flags(flags)
    n_levels = len(flags.level_channels())
    available = [2**level for level in range(n_levels)]
    taps = []
    for s in strides:
        if s not in available:
            raise ValueError(f"stride {s!r} is not a decoder level of this ADM; available strides: {available[::-1]}")
        level = int(math.log2(s))
        b = n_levels - 1 - level
        taps.append(adm_output_block_info(b * (flags.num_res_blocks + 1) + flags.num_res_blocks, flags))
    return taps


# --- weight mapping ---------------------------------------------------------------------------------------------

_RESBLOCK = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _module_pairs(flags: ADMFlags) -> list[tuple[str, str, str]]:
    """(diffusers module, ADM module, kind) with kind in plain/resblock/attention, walking ADM's construction."""
    chans = flags.level_channels()
    attn = flags.attention_levels()
    n_levels, nrb = len(chans), flags.num_res_blocks
    pairs: list[tuple[str, str, str]] = [
        ("time_embedding.linear_1", "time_embed.0", "plain"),
        ("time_embedding.linear_2", "time_embed.2", "plain"),
        ("conv_in", "input_blocks.0.0", "plain"),
    ]
    if flags.class_cond:
        pairs.append(("class_embedding", "label_emb", "plain"))
    idx = 1
    for level in range(n_levels):
        for r in range(nrb):
            pairs.append((f"down_blocks.{level}.resnets.{r}", f"input_blocks.{idx}.0", "resblock"))
            if attn[level]:
                pairs.append((f"down_blocks.{level}.attentions.{r}", f"input_blocks.{idx}.1", "attention"))
            idx += 1
        if level != n_levels - 1:
            if flags.resblock_updown:
                pairs.append((f"down_blocks.{level}.downsamplers.0", f"input_blocks.{idx}.0", "resblock"))
            else:
                pairs.append((f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{idx}.0.op", "plain"))
            idx += 1
    pairs += [
        ("mid_block.resnets.0", "middle_block.0", "resblock"),
        ("mid_block.attentions.0", "middle_block.1", "attention"),
        ("mid_block.resnets.1", "middle_block.2", "resblock"),
    ]
    idx = 0
    for b, level in enumerate(reversed(range(n_levels))):
        for k in range(nrb + 1):
            pairs.append((f"up_blocks.{b}.resnets.{k}", f"output_blocks.{idx}.0", "resblock"))
            j = 1
            if attn[level]:
                pairs.append((f"up_blocks.{b}.attentions.{k}", f"output_blocks.{idx}.1", "attention"))
                j = 2
            if level > 0 and k == nrb:
                if flags.resblock_updown:
                    pairs.append((f"up_blocks.{b}.upsamplers.0", f"output_blocks.{idx}.{j}", "resblock"))
                else:
                    pairs.append((f"up_blocks.{b}.upsamplers.0.conv", f"output_blocks.{idx}.{j}.conv", "plain"))
            idx += 1
    pairs += [("conv_norm_out", "out.0", "plain"), ("conv_out", "out.2", "plain")]
    return pairs


def _key_plan(flags: ADMFlags, target_shapes: Mapping[str, torch.Size], head_dim: int):
    """For every diffusers parameter: (ADM key, how to extract it, expected ADM shape)."""
    modules: dict[str, tuple[str, str]] = {}  # diffusers module -> (ADM module, transform)
    for dmod, amod, kind in _module_pairs(flags):
        if kind == "plain":
            modules[dmod] = (amod, "copy")
        elif kind == "resblock":
            for dsub, asub in _RESBLOCK.items():
                modules[f"{dmod}.{dsub}"] = (f"{amod}.{asub}", "copy")
        else:
            modules[f"{dmod}.group_norm"] = (f"{amod}.norm", "copy")
            modules[f"{dmod}.to_out.0"] = (f"{amod}.proj_out", "conv1d")
            for i, name in enumerate(("to_q", "to_k", "to_v")):
                modules[f"{dmod}.{name}"] = (f"{amod}.qkv", f"qkv{i}")
    plan: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    for dkey, shape in target_shapes.items():
        dmod, _, pname = dkey.rpartition(".")
        if dmod not in modules:
            raise RuntimeError(f"internal error: diffusers parameter {dkey} has no ADM counterpart (report a bug)")
        amod, how = modules[dmod]
        shape = tuple(shape)
        if how == "conv1d":
            adm_shape = shape + (1,) if pname == "weight" else shape
        elif how.startswith("qkv"):
            adm_shape = (3 * shape[0],) + tuple(shape[1:]) + ((1,) if pname == "weight" else ())
        else:
            adm_shape = shape
        plan[dkey] = (f"{amod}.{pname}", how, adm_shape)
    return plan


def _extract(t: torch.Tensor, how: str, pname: str, head_dim: int, new_order: bool) -> torch.Tensor:
    if how == "copy":
        return t
    if how == "conv1d":
        return t[..., 0] if pname == "weight" else t
    i = int(how[-1])  # 0 q, 1 k, 2 v
    width = t.shape[0] // 3
    heads = width // head_dim
    tail = t.shape[1:]  # (C, 1) for weight, () for bias
    if new_order:  # QKVAttention: qkv.chunk(3), then heads
        part = t.reshape(3, width, *tail)[i]
    else:  # QKVAttentionLegacy: heads first, then q|k|v inside each head
        part = t.reshape(heads, 3, head_dim, *tail)[:, i].reshape(width, *tail)
    return part[..., 0] if pname == "weight" else part


def _fmt(keys: Sequence[str], limit: int = 6) -> str:
    keys = list(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _check_against_checkpoint(sd: Mapping[str, torch.Tensor], flags: ADMFlags) -> None:
    """Targeted flag-vs-shape checks with messages in terms of the flags (before any model is built)."""
    if "input_blocks.0.0.weight" not in sd:
        prefixes = sorted({k.split(".", 1)[0] for k in sd})[:8]
        hint = ""
        if any(p in ("module", "model", "state_dict", "ema") for p in prefixes):
            hint = " (keys are nested or prefixed: pass the inner state dict without the prefix)"
        raise ValueError(
            "not a guided-diffusion UNetModel state dict: no 'input_blocks.0.0.weight'; top-level key prefixes: "
            f"{prefixes}{hint}"
        )
    w = sd["input_blocks.0.0.weight"]
    if w.ndim != 4:
        raise ValueError(
            f"input_blocks.0.0.weight has shape {tuple(w.shape)}: only 2-D (image) ADM UNets are supported"
        )
    if w.shape[1] != 3:
        raise ValueError(
            f"the checkpoint takes {w.shape[1]} input channels (input_blocks.0.0.weight {tuple(w.shape)}); only the "
            "3-channel guided-diffusion UNetModel is supported (super-resolution models take 6)"
        )
    if w.shape[0] != flags.level_channels()[0]:
        raise ValueError(
            f"num_channels={flags.num_channels} (x channel_mult[0]={flags.resolved_channel_mult()[0]}) does not match "
            f"the checkpoint: input_blocks.0.0.weight has {w.shape[0]} output channels"
        )
    out = sd.get("out.2.weight")
    if out is not None and out.shape[0] != (6 if flags.learn_sigma else 3):
        want = out.shape[0] == 6
        raise ValueError(
            f"learn_sigma={flags.learn_sigma} does not match the checkpoint: out.2.weight has {out.shape[0]} output "
            f"channels ({'6 = learn_sigma=True' if want else '3 = learn_sigma=False' if out.shape[0] == 3 else '?'})"
        )
    has_label = "label_emb.weight" in sd
    if has_label != flags.class_cond:
        raise ValueError(
            f"class_cond={flags.class_cond} does not match the checkpoint, which "
            f"{'has' if has_label else 'has no'} label_emb.weight"
        )
    if has_label and sd["label_emb.weight"].shape[0] != NUM_CLASSES:
        raise ValueError(
            f"label_emb.weight has {sd['label_emb.weight'].shape[0]} classes; class_cond=True means guided-diffusion's "
            f"{NUM_CLASSES} ImageNet classes"
        )

    def count(prefix: str) -> int:
        return len({k.split(".")[1] for k in sd if k.startswith(prefix + ".")})

    n_levels, nrb = len(flags.level_channels()), flags.num_res_blocks
    n_in, n_out = count("input_blocks"), count("output_blocks")
    want_in, want_out = 1 + n_levels * nrb + (n_levels - 1), n_levels * (nrb + 1)
    if (n_in, n_out) != (want_in, want_out):
        raise ValueError(
            f"num_res_blocks={nrb} and channel_mult={tuple(flags.resolved_channel_mult())} ({n_levels} levels) imply "
            f"{want_in} input_blocks and {want_out} output_blocks; the checkpoint has {n_in} and {n_out}"
        )
    down_idx = 1 + nrb  # first downsampling block
    if n_levels > 1:
        is_res = f"input_blocks.{down_idx}.0.in_layers.0.weight" in sd
        if is_res != flags.resblock_updown:
            raise ValueError(
                f"resblock_updown={flags.resblock_updown} does not match the checkpoint: input_blocks.{down_idx} is "
                f"{'a ResBlock(down=True)' if is_res else 'a strided conv'} (resblock_updown={is_res})"
            )
    emb = sd.get("input_blocks.1.0.emb_layers.1.weight")
    if emb is not None:
        ss = emb.shape[0] == 2 * flags.level_channels()[0]
        if ss != flags.use_scale_shift_norm:
            raise ValueError(
                f"use_scale_shift_norm={flags.use_scale_shift_norm} does not match the checkpoint: "
                f"input_blocks.1.0.emb_layers.1.weight has {emb.shape[0]} outputs for {flags.level_channels()[0]} "
                f"channels (use_scale_shift_norm={ss})"
            )
    have = []
    idx = 1
    for level in range(n_levels):
        have.append(f"input_blocks.{idx}.1.qkv.weight" in sd)
        idx += nrb + (1 if level != n_levels - 1 else 0)
    want = list(flags.attention_levels())
    if have != want:
        res = lambda flags_: [flags.image_size // 2**lv for lv, a in enumerate(flags_) if a]  # noqa: E731
        raise ValueError(
            f"attention_resolutions={','.join(map(str, flags.attention_resolutions))} (image_size={flags.image_size}) "
            f"puts attention at resolutions {res(want)}, the checkpoint has it at {res(have)}"
        )


def convert(state_dict: Mapping[str, torch.Tensor], flags: ADMFlags | str) -> UNet2DModel:
    """Build the diffusers ``UNet2DModel`` equal to the ADM ``UNetModel(flags)`` holding ``state_dict``.

    Float32, eval mode, on CPU; a state dict of meta tensors gives a meta model (a free full-size shape check).
    Raises ``ValueError`` when flags and checkpoint disagree (naming the flag) or when diffusers cannot represent
    the flags exactly. Every checkpoint key is consumed, every parameter filled; the weights are copies.
    """
    from diffusers import UNet2DModel

    flags = _as_flags(flags)
    config = diffusers_config(flags)  # raises on unrepresentable flags
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"state_dict values must be tensors; not tensors: {_fmt(bad)}")
    _check_against_checkpoint(state_dict, flags)

    with torch.device("meta"):  # no random init of ~550M parameters; weights are assigned below
        unet = UNet2DModel(**config)
    target = unet.state_dict()
    head_dim = config["attention_head_dim"]
    plan = _key_plan(flags, {k: v.shape for k, v in target.items()}, head_dim)

    used = {adm_key for adm_key, _, _ in plan.values()}
    expected_shapes = {adm_key: shape for adm_key, _, shape in plan.values()}
    missing = sorted(k for k in used if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in used)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs flags {expected_shapes[k]}"
        for k in used
        if k in state_dict and tuple(state_dict[k].shape) != expected_shapes[k]
    )
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"shape mismatches: {_fmt(mismatched)}")
        if missing:
            parts.append(f"missing from the checkpoint: {_fmt(missing)}")
        if unexpected:
            parts.append(f"not used by these flags: {_fmt(unexpected)}")
        raise ValueError(
            "the checkpoint does not match the flags (check channel_mult, attention_resolutions, num_res_blocks, "
            "resblock_updown, use_scale_shift_norm against the checkpoint's README flags); " + "; ".join(parts)
        )

    new_sd = {}
    for dkey, (adm_key, how, _) in plan.items():
        t = _extract(state_dict[adm_key], how, dkey.rpartition(".")[2], head_dim, flags.use_new_attention_order)
        t = t.to(dtype=torch.float32, copy=True).contiguous()  # own storage: no aliasing, safetensors-friendly
        if tuple(t.shape) != tuple(target[dkey].shape):
            raise RuntimeError(f"internal error: {dkey} got {tuple(t.shape)}, wants {tuple(target[dkey].shape)}")
        new_sd[dkey] = t
    unet.load_state_dict(new_sd, strict=True, assign=True)
    on_meta = [n for n, p in [*unet.named_parameters(), *unet.named_buffers()] if p.is_meta]
    if on_meta and not any(v.is_meta for v in state_dict.values()):  # a meta state dict gives a meta (shape) model
        raise RuntimeError(f"internal error: tensors left unassigned: {_fmt(on_meta)}")
    return unet.eval()


# --- files ------------------------------------------------------------------------------------------------------


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load an ADM checkpoint (``.pt`` via ``torch.load(weights_only=True)``, or ``.safetensors``) onto the CPU."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"ADM checkpoint not found: {str(p)!r}"
            + (" (a directory, expected a .pt or .safetensors file)" if p.is_dir() else "")
            + "; download e.g. https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt"
        )
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p), device="cpu")
    sd = torch.load(str(p), map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping):
        raise ValueError(f"{str(p)!r} holds a {type(sd).__name__}, expected a state dict (name -> tensor)")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(
            f"{str(p)!r} is not a flat state dict: non-tensor entries {_fmt([str(b) for b in bad])}; "
            "extract the UNet's state dict first"
        )
    return dict(sd)


def _read_conversion_meta(folder: str | os.PathLike) -> dict | None:
    """The adm_flags.json ``convert_to_folder`` wrote into `folder` (None if there is none)."""
    f = Path(folder) / FLAGS_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def read_adm_flags(folder: str | os.PathLike) -> ADMFlags | None:
    """The ADMFlags a folder written by ``convert_to_folder`` came from (None if it has no adm_flags.json)."""
    meta = _read_conversion_meta(folder)
    return None if meta is None else ADMFlags(**meta["flags"])


def read_source_sha256(folder: str | os.PathLike) -> str | None:
    """The SHA-256 of the checkpoint a ``convert_to_folder`` folder was converted from, where it was recorded."""
    meta = _read_conversion_meta(folder)
    return None if meta is None else meta.get("source_sha256")


def convert_to_folder(
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
    flags: ADMFlags | str,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    source_sha256: str | None = None,
) -> UNet2DModel:
    """Convert and ``save_pretrained(out_dir, safe_serialization=True)`` atomically (temp dir beside, then rename).

    Also writes ``adm_flags.json`` (the source flags, the stride 32/16/8/4 taps when present, and the source
    checkpoint's SHA-256 when given). A crash leaves ``out_dir`` as it was; an existing ``out_dir`` is replaced only
    with ``overwrite=True``.
    """
    flags = _as_flags(flags)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output folder {str(out)!r} already exists; pass overwrite=True (--overwrite)")
    check_convertible(flags)  # fail before reading a 2 GB file
    src = None
    if isinstance(checkpoint, Mapping):
        sd = checkpoint
    else:
        src = str(checkpoint)
        sd = load_checkpoint(checkpoint)
    unet = convert(sd, flags)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = None
    try:
        unet.save_pretrained(str(tmp), safe_serialization=True)
        n_levels = len(flags.level_channels())
        strides = [s for s in (32, 16, 8, 4) if s < 2**n_levels]
        meta = {
            "source_checkpoint": os.path.basename(src) if src else None,
            "source_sha256": source_sha256,
            "flags": flags.to_json_dict(),
            "taps": [dataclasses.asdict(t) for t in adm_level_taps(flags, strides)],
            "note": "converted by training/teacher/adm.py; taps = ADM output_blocks[adm_index] before its upsample",
        }
        (tmp / FLAGS_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            if not overwrite:
                raise FileExistsError(f"output folder {str(out)!r} appeared while converting; nothing overwritten")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / out.name).exists() and not out.exists():
            os.replace(old / out.name, out)  # put the previous folder back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return unet
