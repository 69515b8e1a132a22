"""The frozen teacher: encode images to x_t, run ONE UNet pass at t, return stride-matched feature maps.

The paper's encoding (arXiv:2307.07487, Sec. 3): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with FRESH eps on
every call (`DDPMScheduler.add_noise`), then a single UNet forward at t; the features are read from the decoder.
`teacher.taps` is ordered finest first (smallest stride first); `teacher(images)` returns {stride: (B, C, H/stride,
W/stride)} float32, detached, for images of size H x W. The UNet is stopped right after the last tap fires (the
decoder tail and the output conv are never run).

The teacher is a plain object holding frozen modules, not an `nn.Module`: it cannot be registered as a submodule
of a student by accident, never shows up in a student's `parameters()`, and must not be given to
`accelerator.prepare`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.teacher.fast_path import PLAIN, FastPath, compile_blocks, set_attention
from training.teacher.taps import _first_tensor, _StopForward, probe_taps, resolve_tap_names

DEFAULT_DDIM_STEPS = 10


class FrozenTeacher:
    """A frozen diffusion UNet (+ VAE for latent teachers) that turns images into multi-scale feature maps.

    Call it as `teacher(images, generator=None) -> {stride: (B, C, H/stride, W/stride)}`. `images` are in the
    student's normalisation (`mean`, `std`); they are mapped to [-1, 1] (RGB averaged for 1-channel UNets/VAEs),
    resized to `resolution` if set (bilinear, antialiased; features are resampled back to the input's grid so the
    strides keep their meaning), encoded to x_t (fresh noise, or DDIM inversion with encoding="ddim"), and ONE UNet
    pass at `timestep` is run up to the last tap. fp32 by default; `dtype` (bf16/fp16) runs the networks under
    autocast; outputs are always float32 and detached. `fast_path` (training/teacher/fast_path.py) turns on the
    GPU speed switches: weights stored in `dtype`, compiled blocks, the attention processor.
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
        fast_path: FastPath = PLAIN,
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
        self.fast_path = fast_path
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

        self._names = resolve_tap_names(unet, taps)
        prompt_shape = None if self.prompt_embedding is None else tuple(self.prompt_embedding.shape)
        self.taps, self._run_order = probe_taps(unet, self._names, self.latent_factor, prompt_shape)
        self._last_tap = self._run_order[-1]
        self._store: dict[str, Tensor] | None = None  # hooks record only while this is a dict
        self._stop_after: str | None = None
        modules = dict(unet.named_modules())
        self._hooks = {n: modules[n].register_forward_hook(self._make_hook(n)) for n in self._names}
        if fast_path.attention:
            set_attention(unet, fast_path.attention)
        if fast_path.compile_backend:
            compile_blocks(unet, fast_path.compile_backend, self._names)
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
            if self.fast_path.weights_in_dtype and self.dtype:  # torch's own `to`: diffusers' warns on any dtype
                nn.Module.to(net, self.dtype)
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
            self.check_image_size(in_size)
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

    def check_image_size(self, size: Sequence[int]) -> None:
        """A ValueError when images of `size` (H, W) reach the UNet at a size its downsampling does not divide:
        the trainers call it before training, so the error comes at start-up, not at the first step."""
        run_h, run_w = self.run_size(size)
        if run_h % self.size_multiple or run_w % self.size_multiple:
            raise ValueError(
                f"teacher input {run_h}x{run_w} is not a multiple of {self.size_multiple} (the teacher's total "
                f"downsampling); choose an image size (data.input_size) or a teacher.resolution that is"
            )

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
