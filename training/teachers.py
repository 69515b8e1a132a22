"""Frozen diffusion teachers: encode images to x_t, run ONE UNet pass at t, return stride-matched feature maps.

The paper's encoding (arXiv:2307.07487, Sec. 3): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with FRESH eps on
every call (`DDPMScheduler.add_noise`), then a single UNet forward at t; the features are read from the decoder.

Tap conventions (the things a trainer relies on):
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
- `teacher.taps` is ordered finest first (smallest stride first) and is known before any forward (computed by a
  shape-only dry run of a copy of the UNet on the meta device); `teacher(images)` returns {stride: (B, C, H/stride,
  W/stride)} float32, detached, for images of size H x W.
- The UNet is stopped right after the last tap fires (the decoder tail and the output conv are never run).

The teacher is a plain object holding frozen modules, not an `nn.Module`: it cannot be registered as a submodule
of a student by accident, never shows up in a student's `parameters()`, and must not be given to
`accelerator.prepare`. CLI: `python -m training.teachers --kind unet --source DIR --image-size 32` prints the
tap layout.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if __package__ in (None, ""):  # `python training/teachers.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreamteacher_models.recipes import TeacherConfig, get_recipe  # noqa: E402
from training.adm_fetch import is_adm_name, resolve_adm_name  # noqa: E402

logger = logging.getLogger(__name__)

EMPTY_PROMPT_FILE = "empty_prompt_embedding.safetensors"  # stored next to unet/ and vae/ in a latent teacher folder
EMPTY_PROMPT_KEY = "embedding"
DEFAULT_NUM_LEVELS = 4  # the student's C2..C5
DEFAULT_DDIM_STEPS = 10
WEIGHT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")  # single-file checkpoints (ADM)

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


def adm_output_block_names(flags) -> dict[int, str]:
    """training/adm.py's own output_blocks -> module mapping for ADM `flags` (an ADMFlags or preset name)."""
    from training import adm

    flags = adm.PRESETS[flags] if isinstance(flags, str) else flags
    n = len(flags.level_channels()) * (flags.num_res_blocks + 1)
    return {k: adm.adm_output_block_to_diffusers(k, flags) for k in range(n)}


def listed_tap_names(unet: nn.Module) -> list[str]:
    """The tap names worth listing in an error: block-level resnets/attentions/samplers, mid block, ADM aliases."""
    names = [n for n, _ in unet.named_modules() if _LISTED_TAP.match(n)]
    names += [f"output_blocks.{k}" for k in output_block_names(unet)]
    return names


def resolve_tap_names(
    unet: nn.Module, taps: Sequence[str], output_blocks: dict[int, str] | None = None
) -> tuple[str, ...]:
    """Module paths for `taps` (() = the default taps). Unknown names raise a ValueError listing valid ones.

    "output_blocks.K" is translated with `output_blocks` (training/adm.py's mapping for ADM teachers) or else
    `output_block_names(unet)`, which derives the same numbering from the UNet's structure.
    """
    if not taps:
        return default_tap_names(unet)
    modules = dict(unet.named_modules())
    adm_names = output_blocks if output_blocks is not None else output_block_names(unet)
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



# ----------------------------------------------------------------------------------------------- the teacher


class FrozenTeacher:
    """A frozen diffusion UNet (+ VAE for latent teachers) that turns images into multi-scale feature maps.

    Call it as `teacher(images, generator=None) -> {stride: (B, C, H/stride, W/stride)}`. `images` are in the
    student's normalisation (`mean`, `std`); they are mapped to [-1, 1] (RGB averaged for 1-channel UNets/VAEs),
    resized to `resolution` if set (bilinear, antialiased; features are resampled back to the input's grid so the
    strides keep their meaning), encoded to x_t (fresh noise, or DDIM inversion with encoding="ddim"), and ONE UNet
    pass at `timestep` is run up to the last tap. fp32 by default; `dtype` (bf16/fp16) runs the networks under
    autocast; outputs are always float32 and detached.
    """

    def __init__(
        self,
        unet: nn.Module,
        scheduler,
        timestep: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        taps: Sequence[str] = (),
        vae: nn.Module | None = None,
        prompt_embedding: Tensor | None = None,
        encoding: str = "noise",
        ddim_steps: int = DEFAULT_DDIM_STEPS,
        resolution: int | tuple[int, int] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        channels_last: bool = False,
        early_stop: bool = True,
        output_blocks: dict[int, str] | None = None,
        kind: str = "unet",
        source: str | None = None,
    ):
        num_train = int(scheduler.config.num_train_timesteps)
        if not 0 <= int(timestep) < num_train:
            raise ValueError(f"teacher timestep {timestep} is outside the scheduler's range [0, {num_train - 1}]")
        if encoding not in ("noise", "ddim"):
            raise ValueError(f"unknown teacher encoding {encoding!r}; choose 'noise' (the paper's) or 'ddim'")
        if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"teacher dtype must be float32, bfloat16 or float16 (autocast), got {dtype}")
        if ddim_steps < 1:
            raise ValueError(f"ddim_steps must be >= 1, got {ddim_steps}")
        is_latent = vae is not None
        if is_latent and prompt_embedding is None:
            raise ValueError("a latent teacher needs the empty-prompt embedding (see load_empty_prompt_embedding)")
        if is_latent and getattr(unet.config, "addition_embed_type", None):
            raise ValueError(
                f"latent teachers support Stable Diffusion 1.x/2.x UNets; this UNet needs added conditioning "
                f"({unet.config.addition_embed_type!r}, e.g. SDXL)"
            )

        self.kind, self.source = kind, source
        self.timestep = int(timestep)
        self.encoding, self.ddim_steps = encoding, int(ddim_steps)
        self.resolution = resolution
        self.device = torch.device(device)
        self.dtype = None if dtype == torch.float32 else dtype
        self.channels_last = channels_last
        self.early_stop = early_stop
        self.scheduler = scheduler
        self.prediction_type = getattr(scheduler.config, "prediction_type", "epsilon")
        self.unet, self.vae = unet, vae
        self.prompt_embedding = None
        if prompt_embedding is not None:
            emb = prompt_embedding if prompt_embedding.ndim == 3 else prompt_embedding.unsqueeze(0)
            want = unet.config.cross_attention_dim
            if emb.ndim != 3 or emb.shape[0] != 1 or emb.shape[-1] != want:
                raise ValueError(
                    f"empty-prompt embedding must be (1, tokens, {want}) for this UNet, "
                    f"got {tuple(prompt_embedding.shape)}"
                )
            self.prompt_embedding = emb.detach().float()

        # Image-space geometry: the UNet's total downsampling, times the VAE's for latent teachers.
        self.latent_factor = 2 ** (len(vae.config.block_out_channels) - 1) if is_latent else 1
        down = sum(1 for b in unet.down_blocks if getattr(b, "downsamplers", None) is not None)
        self.size_multiple = 2**down * self.latent_factor
        self.in_channels = int(vae.config.in_channels if is_latent else unet.config.in_channels)

        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        if mean_t.shape != std_t.shape:
            raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} must have the same length")
        self.mean, self.std = mean_t, std_t

        for net in self.nets:
            net.requires_grad_(False)
            net.eval()

        self._names = resolve_tap_names(unet, taps, output_blocks)
        prompt_shape = None if self.prompt_embedding is None else tuple(self.prompt_embedding.shape)
        self.taps, self._run_order = probe_taps(unet, self._names, self.latent_factor, prompt_shape)
        self._last_tap = self._run_order[-1]
        self._store: dict[str, Tensor] | None = None  # hooks record only while this is a dict
        self._stop_after: str | None = None
        modules = dict(unet.named_modules())
        self._hooks = {n: modules[n].register_forward_hook(self._make_hook(n)) for n in self._names}
        self.to(self.device)

    # -- bookkeeping

    @property
    def nets(self) -> tuple[nn.Module, ...]:
        return (self.unet,) if self.vae is None else (self.unet, self.vae)

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(t.stride for t in self.taps)

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(t.channels for t in self.taps)

    def parameters(self) -> Iterator[nn.Parameter]:
        for net in self.nets:
            yield from net.parameters()

    def to(self, device: str | torch.device) -> FrozenTeacher:
        self.device = torch.device(device)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for net in self.nets:
            net.to(self.device, memory_format=fmt)
        self.mean, self.std = self.mean.to(self.device), self.std.to(self.device)
        if self.prompt_embedding is not None:
            self.prompt_embedding = self.prompt_embedding.to(self.device)
        return self

    def keep_strides(self, strides: Sequence[int]) -> FrozenTeacher:
        """Compute only the taps at `strides` (those paired with the student): the others' hooks are removed and
        the UNet stops after the last kept tap, so an unused fine level costs nothing."""
        missing = sorted(set(strides) - set(self.strides))
        if missing:
            raise ValueError(f"teacher has no tap at stride(s) {missing}; its taps are at strides {list(self.strides)}")
        for tap in self.taps:
            if tap.stride not in strides:
                self._hooks.pop(tap.name).remove()
        self.taps = tuple(t for t in self.taps if t.stride in strides)
        self._names = tuple(t.name for t in self.taps)
        self._last_tap = [n for n in self._run_order if n in self._names][-1]
        return self

    def __repr__(self) -> str:
        taps = ", ".join(f"{t.name}@{t.stride}x{t.channels}" for t in self.taps)
        return (
            f"FrozenTeacher(kind={self.kind!r}, source={self.source!r}, timestep={self.timestep}, "
            f"encoding={self.encoding!r}, resolution={self.resolution}, taps=[{taps}])"
        )

    def _make_hook(self, name: str):
        def hook(module, args, output):
            if self._store is None:  # not extracting (e.g. a DDIM-inversion pass, or someone else's forward)
                return
            self._store[name] = _first_tensor(output)
            if name == self._stop_after:
                raise _StopForward

        return hook

    # -- forward

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> dict[int, Tensor]:
        return self.forward(images, generator)

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> dict[int, Tensor]:
        """images (B, C, H, W) in the student's normalisation -> {stride: (B, C_tap, H/stride, W/stride)} float32."""
        if images.ndim != 4:
            raise ValueError(f"teacher expects images (B, C, H, W), got shape {tuple(images.shape)}")
        for net in self.nets:  # stay frozen even if someone called .train() on the modules
            if net.training:
                net.eval()
        with torch.no_grad():
            x = self.to_model_range(images.detach().to(self.device, torch.float32))
            in_size = tuple(x.shape[-2:])
            run_size = self.run_size(in_size)
            if run_size != in_size:
                x = F.interpolate(x, size=run_size, mode="bilinear", align_corners=False, antialias=True)
            if run_size[0] % self.size_multiple or run_size[1] % self.size_multiple:
                raise ValueError(
                    f"teacher input {run_size[0]}x{run_size[1]} is not a multiple of {self.size_multiple} (the "
                    f"teacher's total downsampling); crop/resize the images or set TeacherConfig.resolution"
                )
            x0 = self._encode_latents(x) if self.vae is not None else x
            t = torch.full((x0.shape[0],), self.timestep, dtype=torch.long, device=self.device)
            if self.encoding == "noise":
                eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
                xt = self.scheduler.add_noise(x0, eps, t)
            else:
                xt = self.ddim_invert(x0)
            feats = self._tap_forward(xt, t)
            out = {}
            for tap in self.taps:
                f = feats[tap.name].float()
                if run_size != in_size:
                    size = (max(1, in_size[0] // tap.stride), max(1, in_size[1] // tap.stride))
                    f = F.interpolate(f, size=size, mode="bilinear", align_corners=False, antialias=True)
                out[tap.stride] = f.detach()
        return out

    def to_model_range(self, images: Tensor) -> Tensor:
        """Student normalisation -> [-1, 1], with the channel count the UNet (or VAE) takes."""
        if self.mean.shape[1] not in (1, images.shape[1]):
            raise ValueError(f"teacher got {images.shape[1]}-channel images, but its normalisation (mean, std) has "
                             f"{self.mean.shape[1]} channels")
        x = 2 * (images * self.std + self.mean) - 1
        c = x.shape[1]
        if c == self.in_channels:
            return x
        if self.in_channels == 1:
            return x.mean(dim=1, keepdim=True)
        if c == 1:
            return x.expand(-1, self.in_channels, -1, -1)
        raise ValueError(f"teacher takes {self.in_channels}-channel images, got {c} channels")

    def run_size(self, size: Sequence[int]) -> tuple[int, int]:
        """The size the teacher encodes an image of `size` (H, W) at."""
        if self.resolution is None:
            return (int(size[0]), int(size[1]))
        if isinstance(self.resolution, int):
            return (self.resolution, self.resolution)
        return (int(self.resolution[0]), int(self.resolution[1]))

    def _autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _encode_latents(self, x: Tensor) -> Tensor:
        """VAE posterior MEAN (no sampling noise: the only randomness is the diffusion eps), scaled like SD."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            z = self.vae.encode(x).latent_dist.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((z.float() - shift) * self.vae.config.scaling_factor).contiguous()

    def _unet(self, x: Tensor, t: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        kwargs = {}
        if self.prompt_embedding is not None:
            kwargs["encoder_hidden_states"] = self.prompt_embedding.expand(x.shape[0], -1, -1)
        with self._autocast():
            return self.unet(x, t, return_dict=False, **kwargs)[0]

    def _tap_forward(self, xt: Tensor, t: Tensor) -> dict[str, Tensor]:
        self._store = {}
        self._stop_after = self._last_tap if self.early_stop else None
        try:
            try:
                self._unet(xt, t)
            except _StopForward:
                pass
            return self._store
        finally:
            self._store, self._stop_after = None, None

    def _epsilon(self, x: Tensor, t: int) -> Tensor:
        """The UNet's noise prediction at integer timestep t (first half of the channels for learn_sigma models)."""
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        out = self._unet(x, tt).float()
        if out.shape[1] == 2 * x.shape[1]:  # ADM learn_sigma: (eps, variance)
            out = out[:, : x.shape[1]]
        a = float(self.scheduler.alphas_cumprod[t])
        if self.prediction_type == "epsilon":
            return out
        if self.prediction_type == "v_prediction":
            return math.sqrt(a) * out + math.sqrt(1 - a) * x
        if self.prediction_type == "sample":
            return (x - math.sqrt(a) * out) / math.sqrt(1 - a)
        raise ValueError(f"DDIM inversion does not support prediction_type {self.prediction_type!r}")

    def ddim_invert(self, x0: Tensor) -> Tensor:
        """Deterministic DDIM inversion of x0 to the teacher's timestep in `ddim_steps` equal steps.

        Timesteps 0 = s_0 < s_1 < ... < s_n = t; each step predicts eps at s_i and moves along the DDIM (eta = 0)
        trajectory: x0_hat = (x - sqrt(1 - abar_i) eps) / sqrt(abar_i), x_{i+1} = sqrt(abar_{i+1}) x0_hat +
        sqrt(1 - abar_{i+1}) eps. The first step starts from the clean image with abar = 1 (as diffusers'
        DDIMInverseScheduler with set_alpha_to_one), so a model that predicted the true eps would land exactly on
        add_noise(x0, eps, t). No randomness: the same images give the same x_t. (The paper found DDIM inversion
        worse than noise encoding on BDD; it is here for that ablation.)
        """
        steps = torch.linspace(0, self.timestep, self.ddim_steps + 1).round().long().unique().tolist()
        abar = self.scheduler.alphas_cumprod
        x = x0
        for i, (cur, nxt) in enumerate(zip(steps[:-1], steps[1:], strict=True)):
            a_cur, a_nxt = (1.0 if i == 0 else float(abar[cur])), float(abar[nxt])  # x0 is clean: abar = 1
            eps = self._epsilon(x, cur)
            x0_hat = (x - math.sqrt(1 - a_cur) * eps) / math.sqrt(a_cur)
            x = math.sqrt(a_nxt) * x0_hat + math.sqrt(1 - a_nxt) * eps
        return x


# ----------------------------------------------------------------------------------------------- loading


def _is_hub_id(source: str) -> bool:
    if source.endswith(WEIGHT_SUFFIXES) or source.startswith((".", "/", "~")) or "\\" in source:
        return False
    if source.count("/") > 1:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def _how_to_get(kind: str) -> str:
    if kind == "adm":
        return (
            "name it (e.g. adm:256x256_diffusion_uncond: downloaded, checked and converted once), or download "
            "OpenAI's guided-diffusion checkpoint (e.g. 256x256_diffusion_uncond.pt from "
            "github.com/openai/guided-diffusion) and convert it: `python -m training.adm --checkpoint "
            "256x256_diffusion_uncond.pt --out DIR --preset 256x256_diffusion_uncond`, then pass DIR (or pass the .pt "
            "itself to convert it on the fly with the recipe's adm_preset)"
        )
    if kind == "latent":
        return (
            "pass a Stable Diffusion 1.x/2.x pipeline folder (unet/, vae/, scheduler/, and either text_encoder/ + "
            "tokenizer/ or empty_prompt_embedding.safetensors) or its Hub id (e.g. CompVis/stable-diffusion-v1-4; "
            "needs the network or a populated Hugging Face cache)"
        )
    return (
        "pass a diffusers UNet2DModel folder (config.json + weights, or a pipeline folder with unet/) or a Hub id "
        "such as google/ddpm-cifar10-32; train the Fashion-MNIST teacher with `python training/train_teacher.py "
        "--max-steps 3000 --output-dir runs/teacher-fmnist --export-dir teachers/ddpm-fashion-mnist-32` "
        "(see its --help)"
    )


def _missing(kind: str, source: str, why: str) -> FileNotFoundError:
    return FileNotFoundError(f"teacher source {source!r} ({kind}): {why}. To get one: {_how_to_get(kind)}")


def _subfolders(source: str, component: str, kind: str) -> list[str | None]:
    """Where a component's config.json may sit: <source>/<component>/ (pipeline layout) or <source>/ itself."""
    path = Path(source).expanduser()
    if path.is_dir():
        found = [sub for sub in (component, None) if (path / (sub or "") / "config.json").is_file()]
        if not found:
            raise _missing(kind, source, f"no {component}/config.json or config.json in the folder {path}")
        return found
    if path.exists():
        raise _missing(kind, source, f"{path} is a file, not a diffusers folder")
    if not _is_hub_id(source):
        raise _missing(kind, source, "no such local path, and it is not a valid Hugging Face Hub repo id")
    return [component, None]


def _load_component(cls, source: str, component: str, kind: str, root_ok: bool = True):
    path = Path(source).expanduser()
    where = str(path) if path.exists() else source
    candidates = _subfolders(source, component, kind)
    if not root_ok:
        candidates = [c for c in candidates if c is not None] or [component]
    errors = []
    for sub in candidates:
        try:
            config = cls.load_config(where, subfolder=sub)
        except OSError as e:
            errors.append(f"{sub or '.'}: {str(e).splitlines()[0]}")
            continue
        found = config.get("_class_name")
        if found and found != cls.__name__:
            errors.append(f"{sub or '.'}: holds a {found}, not a {cls.__name__}")
            continue
        return cls.from_pretrained(where, subfolder=sub)
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    note = " (HF_HUB_OFFLINE is set: only the local cache was searched)" if offline and not path.exists() else ""
    raise _missing(kind, source, f"could not load a {cls.__name__}{note}: {'; '.join(errors)}")


def _default_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")  # betas 1e-4 .. 0.02, as DDPM/ADM


def _load_scheduler(source: str):
    """DDPMScheduler from the folder's scheduler config (scheduler/ or root), else the linear 1000-step default."""
    from diffusers import DDPMScheduler

    path = Path(source).expanduser()
    where = str(path) if path.exists() else source
    for sub, fname in (("scheduler", "scheduler_config.json"), (None, "scheduler_config.json")):
        if path.exists() and not (path / (sub or "") / fname).is_file():
            continue
        try:
            config = DDPMScheduler.load_config(where, subfolder=sub)
        except OSError:
            continue
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        return DDPMScheduler.from_config(config)
    logger.info("no scheduler config in %s: using the linear 1000-step DDPM schedule", source)
    return _default_scheduler()


_ADM_COSINE_PRESETS = ("64x64_diffusion",)  # trained with the cosine schedule; the 256 models use linear


def _adm_flags(preset: str | None):
    from training import adm

    if preset is None or preset not in adm.PRESETS:
        raise ValueError(f"an ADM checkpoint needs adm_preset set to one of {sorted(adm.PRESETS)}, got {preset!r}")
    return adm.PRESETS[preset]


def _convert_adm(source: str, preset: str | None):
    """(UNet2DModel, scheduler, output_blocks mapping) from a guided-diffusion .pt/.safetensors via training/adm.py."""
    from diffusers import DDPMScheduler

    from training import adm

    flags = _adm_flags(preset)
    unet = adm.convert(adm.load_checkpoint(source), flags)
    schedule = "squaredcos_cap_v2" if preset in _ADM_COSINE_PRESETS else "linear"  # = ADM's cosine schedule
    return unet, DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule), adm_output_block_names(flags)


def _adm_folder_output_blocks(source: str, preset: str | None) -> dict[int, str] | None:
    """ADM numbering for a converted folder: from its adm_flags.json, else the recipe's preset, else None."""
    from training import adm

    path = Path(source).expanduser()
    flags = None
    for folder in (path, path / "unet"):
        if folder.is_dir():
            flags = flags or adm.read_adm_flags(folder)
    if flags is None and preset is not None:
        flags = _adm_flags(preset)
    return None if flags is None else adm_output_block_names(flags)


# -- empty-prompt embedding for latent teachers


def compute_empty_prompt_embedding(tokenizer, text_encoder) -> Tensor:
    """The text encoder's last hidden state for the empty prompt, (1, tokens, dim), as SD pipelines compute it."""
    ids = tokenizer(
        [""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return text_encoder(ids.to(next(text_encoder.parameters()).device))[0].detach().float().cpu()


def save_empty_prompt_embedding(folder: str | os.PathLike, embedding: Tensor) -> Path:
    """Write `embedding` to <folder>/empty_prompt_embedding.safetensors atomically."""
    from safetensors.torch import save_file

    out = Path(folder) / EMPTY_PROMPT_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file({EMPTY_PROMPT_KEY: embedding.detach().float().cpu().contiguous()}, str(tmp))
    os.replace(tmp, out)
    return out


def store_empty_prompt_embedding(source: str, out_dir: str | os.PathLike | None = None) -> Path:
    """Compute the empty-prompt embedding with the pipeline's text encoder (needs `transformers`) and store it.

    Written to `out_dir` (default: the local `source` folder) so training never needs the text encoder.
    """
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as e:
        raise ImportError("computing the empty-prompt embedding needs `pip install transformers`") from e
    path = Path(source).expanduser()
    where = str(path) if path.exists() else source
    tokenizer = CLIPTokenizer.from_pretrained(where, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(where, subfolder="text_encoder")
    if out_dir is None:
        if not path.is_dir():
            raise ValueError(f"{source} is not a local folder: pass out_dir to store the embedding")
        out_dir = path
    return save_empty_prompt_embedding(out_dir, compute_empty_prompt_embedding(tokenizer, text_encoder))


def load_empty_prompt_embedding(source: str) -> Tensor:
    """The stored empty-prompt embedding of a latent teacher, else computed with its text encoder."""
    from safetensors.torch import load_file

    path = Path(source).expanduser()
    file = path / EMPTY_PROMPT_FILE
    if not file.is_file() and not path.exists():
        try:
            from huggingface_hub import hf_hub_download

            file = Path(hf_hub_download(source, EMPTY_PROMPT_FILE))
        except Exception:  # any Hub miss: fall through to the text encoder
            pass
    if file.is_file():
        return load_file(str(file))[EMPTY_PROMPT_KEY]
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError:
        raise _missing(
            "latent",
            source,
            f"no {EMPTY_PROMPT_FILE} and `transformers` is not installed to compute it; run "
            f"`python -m training.teachers --store-empty-prompt-embedding {source}` where transformers is installed",
        ) from None
    where = str(path) if path.exists() else source
    tokenizer = CLIPTokenizer.from_pretrained(where, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(where, subfolder="text_encoder")
    return compute_empty_prompt_embedding(tokenizer, text_encoder)


def build_teacher(
    config: TeacherConfig,
    mean: Sequence[float],
    std: Sequence[float],
    source: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    *,
    taps: Sequence[str] | None = None,
    ddim_steps: int = DEFAULT_DDIM_STEPS,
    early_stop: bool = True,
) -> FrozenTeacher:
    """The frozen teacher a `TeacherConfig` declares. `source` overrides config.source, `taps` config.taps.

    kind "unet": a diffusers UNet2DModel folder (root or unet/) or Hub id; "adm": the same for a folder written by
    `python -m training.adm`, or a guided-diffusion .pt converted on the fly with config.adm_preset; "latent": a
    Stable Diffusion 1.x/2.x pipeline (UNet2DConditionModel + AutoencoderKL + empty-prompt embedding).
    Missing sources raise FileNotFoundError saying how to get one.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel

    src = str(source if source is not None else config.source)
    kind = config.kind
    if is_adm_name(src):  # OpenAI's checkpoint by name: fetched, checked and converted once into the cache
        src, kind = resolve_adm_name(src), "adm"
    vae = prompt = output_blocks = None
    if kind in ("unet", "adm"):
        if kind == "adm" and src.endswith(WEIGHT_SUFFIXES):
            if not Path(src).expanduser().is_file():
                raise _missing(kind, src, "no such checkpoint file")
            unet, scheduler, output_blocks = _convert_adm(str(Path(src).expanduser()), config.adm_preset)
        else:
            unet = _load_component(UNet2DModel, src, "unet", kind)
            scheduler = _load_scheduler(src)
            if kind == "adm":
                output_blocks = _adm_folder_output_blocks(src, config.adm_preset)
    elif kind == "latent":
        unet = _load_component(UNet2DConditionModel, src, "unet", kind, root_ok=False)
        vae = _load_component(AutoencoderKL, src, "vae", kind, root_ok=False)
        prompt = load_empty_prompt_embedding(src)
        scheduler = _load_scheduler(src)
    else:
        raise ValueError(f"unknown teacher kind {kind!r}; choose one of 'unet', 'adm', 'latent'")
    return FrozenTeacher(
        unet,
        scheduler,
        config.timestep,
        mean,
        std,
        taps=config.taps if taps is None else taps,
        vae=vae,
        prompt_embedding=prompt,
        encoding=config.encoding,
        ddim_steps=ddim_steps,
        resolution=config.resolution,
        device=device,
        dtype=dtype,
        channels_last=channels_last,
        early_stop=early_stop,
        output_blocks=output_blocks,
        kind=kind,
        source=src,
    )


# ----------------------------------------------------------------------------------------------- report + CLI


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Print a frozen teacher's feature-tap layout and, with a student, which tap feeds which level.")
    parser.add_argument("--recipe", help="take the teacher config from this recipe (flags below override it)")
    parser.add_argument("--kind", choices=("unet", "adm", "latent"))
    parser.add_argument("--source", help="diffusers folder, Hub id, or (adm) guided-diffusion .pt")
    parser.add_argument("--timestep", type=int)
    parser.add_argument("--taps", nargs="*", help="module names (default: decoder levels before their upsamplers)")
    parser.add_argument("--adm-preset")
    parser.add_argument("--encoding", choices=("noise", "ddim"))
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--image-size", type=int, help="image size to report shapes for (default: the recipe's)")
    parser.add_argument("--student", help="timm architecture to pair the taps with (default: the recipe's arch)")
    parser.add_argument(
        "--store-empty-prompt-embedding", metavar="DIR",
        help="compute the empty-prompt embedding of the SD pipeline in DIR and store it there, then exit",
    )
    args = parser.parse_args(argv)

    if args.store_empty_prompt_embedding:
        print(store_empty_prompt_embedding(args.store_empty_prompt_embedding))
        return 0
    base, image_size, pairs = None, args.image_size, ()
    if args.recipe:
        recipe = get_recipe(args.recipe)
        base, image_size, pairs = recipe.teacher, image_size or recipe.data.input_size[-1], recipe.pairs
    student = args.student or (recipe.arch if args.recipe else None)
    if base is None and (args.kind is None or args.source is None):
        parser.error("give --recipe, or --kind and --source")
    overrides = {
        k: v
        for k, v in dict(
            kind=args.kind, source=args.source, timestep=args.timestep, adm_preset=args.adm_preset,
            encoding=args.encoding, resolution=args.resolution, taps=tuple(args.taps) if args.taps else None,
        ).items()
        if v is not None
    }
    config = TeacherConfig(**{"timestep": 50, **overrides}) if base is None else _replace(base, overrides)
    try:
        teacher = build_teacher(config, mean=(0.5,) * 3, std=(0.5,) * 3)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    image_size = image_size or teacher.size_multiple * 4
    print(describe_taps(teacher, image_size))
    if student:
        from training.pairing import describe_pairs, pair_levels
        from training.regressor import build_student, student_levels

        levels = student_levels(build_student(student), student)
        paired, notes = pair_levels(levels, dict(zip(teacher.strides, teacher.channels, strict=True)), pairs)
        print(f"\nstudent {student} (levels at strides {sorted(levels)}) <- teacher taps, by stride "
              f"({'the recipe' if pairs else 'automatic'} pairing):\n")
        print("\n".join([describe_pairs(paired, image_size), *notes]))
    return 0


def _replace(config: TeacherConfig, overrides: dict) -> TeacherConfig:
    import dataclasses

    return dataclasses.replace(config, **overrides)


if __name__ == "__main__":
    from training.cli import run

    sys.exit(run(main))
