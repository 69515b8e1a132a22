"""Feature taps of a diffusers UNet: which modules a teacher reads, at what stride, with how many channels.

- A `Tap` names a module of the diffusers UNet (e.g. "up_blocks.0.attentions.2"); its output is the feature map.
  `stride` is relative to the IMAGE the teacher is given (for latent teachers: latent stride x the VAE factor 8).
- Default taps: the coarsest min(4, levels) decoder levels, each read BEFORE its upsampler, i.e. the output of the
  level's last attention (when it has attentions) or else its last resnet. A forward hook on `up_blocks[i]` itself
  would see the output after the upsampler, one level too fine. For the guided-diffusion ImageNet-256 ADM these
  are exactly ADM's output_blocks 2, 5, 8, 11 (the paper's one-indexed "3, 6, 9, 12") at strides 32/16/8/4 with
  1024/1024/512/512 channels.
- Taps may also be named "output_blocks.K" (ADM's 0-indexed decoder numbering): it names block K's activation
  before its upsample layer (for blocks without one, exactly ADM's output_blocks[K] output). Read a level after
  its upsampler with "up_blocks.i.upsamplers.0".
- Strides and channels are known before any forward: a shape-only dry run of a copy of the UNet on the meta device.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from training.teacher.frozen import FrozenTeacher

logger = logging.getLogger(__name__)

DEFAULT_NUM_LEVELS = 4  # the student's C2..C5

_OUTPUT_BLOCK = re.compile(r"^output_blocks\.(\d+)$")
_LISTED_TAP = re.compile(
    r"^(conv_in|mid_block|mid_block\.(resnets|attentions)\.\d+"
    r"|(down_blocks|up_blocks)\.\d+\.(resnets|attentions|upsamplers|downsamplers)\.\d+)$"
)


@dataclass(frozen=True)
class Tap:
    """One feature map the teacher returns: the module it is read from, its stride (w.r.t. the image), channels."""

    name: str  # module path inside the UNet, e.g. "up_blocks.0.resnets.2"
    stride: int
    channels: int


class _StopForward(Exception):
    """Raised by the last tap's hook to skip the rest of the UNet."""


# ----------------------------------------------------------------------------------------------- tap naming


def default_tap_names(unet: nn.Module, num_levels: int = DEFAULT_NUM_LEVELS) -> tuple[str, ...]:
    """The coarsest `num_levels` decoder levels, each read before its upsampler (coarsest first)."""
    names = []
    for i, block in enumerate(list(unet.up_blocks)[:num_levels]):
        attentions = getattr(block, "attentions", None)
        if attentions is not None and len(attentions) > 0 and attentions[-1] is not None:
            names.append(f"up_blocks.{i}.attentions.{len(attentions) - 1}")
        else:
            names.append(f"up_blocks.{i}.resnets.{len(block.resnets) - 1}")
    return tuple(names)


def output_block_names(unet: nn.Module) -> dict[int, str]:
    """ADM's decoder numbering: output_blocks index K -> the diffusers module holding K's pre-upsample activation.

    ADM's decoder has num_res_blocks + 1 blocks per level (coarsest level first), each a ResBlock, then an
    AttentionBlock at attention resolutions, then (last block of every level but the finest) an upsample layer.
    diffusers' up_blocks[i] holds the same resnets[j] / attentions[j] / upsamplers[0].
    """
    names, k = {}, 0
    for i, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            has_attn = attentions is not None and j < len(attentions) and attentions[j] is not None
            names[k] = f"up_blocks.{i}.{'attentions' if has_attn else 'resnets'}.{j}"
            k += 1
    return names



def listed_tap_names(unet: nn.Module) -> list[str]:
    """The tap names worth listing in an error: block-level resnets/attentions/samplers, mid block, ADM aliases."""
    names = [n for n, _ in unet.named_modules() if _LISTED_TAP.match(n)]
    names += [f"output_blocks.{k}" for k in output_block_names(unet)]
    return names


def resolve_tap_names(unet: nn.Module, taps: Sequence[str]) -> tuple[str, ...]:
    """Module paths for `taps` (() = the default taps). Unknown names raise a ValueError listing valid ones.

    "output_blocks.K" is translated with `output_block_names(unet)`, ADM's numbering read off the UNet's structure
    (for a converted ADM it equals training/teacher/adm.py's map from the flags: tests/test_teacher_taps.py).
    """
    if not taps:
        return default_tap_names(unet)
    modules = dict(unet.named_modules())
    adm_names = output_block_names(unet)
    resolved = []
    for tap in taps:
        m = _OUTPUT_BLOCK.match(tap)
        if m and int(m.group(1)) in adm_names:
            resolved.append(adm_names[int(m.group(1))])
        elif tap in modules and tap != "":
            resolved.append(tap)
        else:
            raise ValueError(
                f"unknown teacher tap {tap!r} for this {type(unet).__name__}; valid names include: "
                f"{', '.join(listed_tap_names(unet))} (any module path of the UNet is accepted)"
            )
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"teacher taps {list(taps)} name the same module twice (resolved: {resolved})")
    return tuple(resolved)


def _first_tensor(output) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    sample = getattr(output, "sample", None)  # Transformer2DModelOutput
    if isinstance(sample, Tensor):
        return sample
    raise TypeError(f"cannot read a feature map from a module output of type {type(output).__name__}")


# ----------------------------------------------------------------------------------------------- tap layout


class _TapError(ValueError):
    """A tap that cannot be read (raised during the shape probe)."""


def probe_taps(
    unet: nn.Module, names: Sequence[str], latent_factor: int = 1, prompt_shape: tuple[int, ...] | None = None
) -> tuple[tuple[Tap, ...], tuple[str, ...]]:
    """(taps finest first, the tap names in the order they run) from a shape-only forward.

    The forward runs on a copy of the UNet built on the meta device (no memory, no compute); should an op lack a
    meta kernel, the real UNet is probed at batch 1. Strides are image-relative (x `latent_factor`).
    """
    down = sum(1 for b in unet.down_blocks if getattr(b, "downsamplers", None) is not None)
    size = 2**down * 4  # (latent) input size whose coarsest map is 4x4
    try:
        with torch.device("meta"):
            clone = type(unet).from_config(unet.config)
        shapes, order = _dry_run(clone, names, torch.device("meta"), size, prompt_shape)
    except _TapError:
        raise
    except Exception as e:  # an op without a meta kernel
        logger.debug("meta-device tap probe failed (%s); probing the real UNet", e)
        device = next(unet.parameters()).device
        shapes, order = _dry_run(unet, names, device, size, prompt_shape)
    taps = []
    for name in names:
        c, h = shapes[name][1], shapes[name][2]
        if size % h:
            raise ValueError(f"teacher tap {name!r} has height {h} for a {size}-px input: not an integer stride")
        taps.append(Tap(name=name, stride=size // h * latent_factor, channels=c))
    taps.sort(key=lambda t: t.stride)
    strides = [t.stride for t in taps]
    if len(set(strides)) != len(strides):
        raise ValueError(
            f"teacher taps must sit at distinct strides (features are keyed by stride), got "
            f"{[(t.name, t.stride) for t in taps]}"
        )
    return tuple(taps), tuple(order)


def _dry_run(unet, names, device, size, prompt_shape) -> tuple[dict[str, tuple], list[str]]:
    modules = dict(unet.named_modules())
    shapes: dict[str, tuple] = {}
    order: list[str] = []

    def make(name):
        def hook(module, args, output):
            out = _first_tensor(output)
            if name in shapes:
                raise _TapError(f"teacher tap {name!r} runs more than once per UNet forward; pick another module")
            if out.ndim != 4:
                raise _TapError(f"teacher tap {name!r} outputs shape {tuple(out.shape)}, not a (B, C, H, W) map")
            shapes[name] = tuple(out.shape)
            order.append(name)

        return hook

    handles = [modules[n].register_forward_hook(make(n)) for n in names]
    try:
        x = torch.zeros(1, unet.config.in_channels, size, size, device=device)
        t = torch.zeros(1, dtype=torch.long, device=device)
        kwargs = {} if prompt_shape is None else {"encoder_hidden_states": torch.zeros(prompt_shape, device=device)}
        with torch.no_grad():
            unet(x, t, return_dict=False, **kwargs)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in shapes]
    if missing:
        raise _TapError(f"teacher taps {missing} never run in this UNet's forward")
    return shapes, order


def describe_taps(teacher: FrozenTeacher, image_size: int | Sequence[int]) -> str:
    """A markdown table of the teacher's taps for images of `image_size`: name, ADM alias, stride, channels, shape."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
    run_h, run_w = teacher.run_size((h, w))
    aliases = {name: f"output_blocks.{k}" for k, name in output_block_names(teacher.unet).items()}
    lines = [
        f"teacher: kind={teacher.kind} source={teacher.source} timestep={teacher.timestep} "
        f"encoding={teacher.encoding} resolution={teacher.resolution}",
        f"images {h}x{w} are encoded at {run_h}x{run_w}"
        + ("; features are resampled to the images' grid" if (run_h, run_w) != (h, w) else ""),
    ]
    if run_h % teacher.size_multiple or run_w % teacher.size_multiple:
        lines.append(f"WARNING: {run_h}x{run_w} is not a multiple of {teacher.size_multiple}: forward will fail")
    lines += ["", "| tap | ADM alias | stride | channels | output shape |", "|---|---|---|---|---|"]
    for tap in teacher.taps:
        shape = f"(B, {tap.channels}, {max(1, h // tap.stride)}, {max(1, w // tap.stride)})"
        lines.append(f"| {tap.name} | {aliases.get(tap.name, '-')} | {tap.stride} | {tap.channels} | {shape} |")
    return "\n".join(lines)
