"""Student backbone levels (every stride of timm's feature_info: the stride-2 stem, C2..C5) and the UperNet-like
feature regressor that maps them onto the teacher taps they are paired with (training/distill/pairing.py)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PYRAMID_STRIDES = (4, 8, 16, 32)  # C2..C5: the levels every student must have


def select_pyramid_indices(
    reductions: Sequence[int], arch: str = "model", strides: Sequence[int] = PYRAMID_STRIDES
) -> tuple[int, ...]:
    """Indices into a timm feature_info (its reductions, in order) of the levels at `strides`.

    Where several taps share a stride, the last (deepest) one is the stage output and is taken.
    """
    last_at: dict[int, int] = {r: i for i, r in enumerate(reductions)}
    missing = [s for s in strides if s not in last_at]
    if missing:
        raise ValueError(
            f"{arch} has no feature level at stride(s) {missing}: available reductions are {list(reductions)}, "
            f"a student needs one level at each of strides {list(strides)}"
        )
    return tuple(last_at[s] for s in strides)



def feature_reductions(model: nn.Module, arch: str = "model") -> list[int]:
    """The reduction (stride) of each level of a timm CNN's feature_info; a clear error for a model without one."""
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "feature_info"):
        raise ValueError(f"{arch} has no forward_intermediates/feature_info in timm; pick a timm CNN backbone")
    return [info["reduction"] for info in model.feature_info]


def student_levels(model: nn.Module, arch: str = "model") -> dict[int, tuple[int, int]]:
    """{stride: (feature_info index, channels)} of every level the student offers: C2..C5 (strides 4, 8, 16, 32,
    required) plus the stride-2 stem level where timm's feature_info has one (resnet, efficientnet; not convnext).
    Levels are picked by reduction, so any CNN family works."""
    reductions = feature_reductions(model, arch)
    select_pyramid_indices(reductions, arch)  # C2..C5 must exist
    strides = sorted({r for r in reductions if r in (2, *PYRAMID_STRIDES)})
    indices = select_pyramid_indices(reductions, arch, strides)
    return {s: (i, model.feature_info[i]["num_chs"]) for s, i in zip(strides, indices, strict=True)}


def freeze_unreached(model: nn.Module, indices: Sequence[int]) -> list[str]:
    """Freeze the parameters that reading the levels at `indices` never reaches (a ConvNeXt's head.norm, an
    EfficientNet's conv_head and bn2) and return their names. They keep their init and stay in the state dict (the
    export is timm's whole headless model), but DDP needs every trainable parameter to get a gradient each step.
    Found by one backward through a copy on the meta device: no memory, no arithmetic, no random numbers."""
    probe = copy.deepcopy(model).to("meta").eval()
    outputs = student_pyramid(probe, torch.zeros(1, 3, 64, 64, device="meta"), indices)
    sum(o.sum() for o in outputs).backward()
    unreached = [name for name, p in probe.named_parameters() if p.requires_grad and p.grad is None]
    for name in unreached:
        model.get_parameter(name).requires_grad_(False)
    return unreached


def student_pyramid(model: nn.Module, images: Tensor, indices: Sequence[int]) -> list[Tensor]:
    """The timm model's feature maps at `indices`, in order: (B, 3, H, W) -> [(B, C_i, H/s_i, W/s_i)]."""
    return model.forward_intermediates(images, indices=list(indices), intermediates_only=True)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def resize_to(x: Tensor, size: Sequence[int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class PyramidPooling(nn.Module):
    """PSPNet pyramid pooling: pooled context at each bin size, concatenated with the input, fused to `width`.

    (B, C, H, W) -> (B, width, H, W). Works for any H, W (a 1x1 map pooled to 6x6 is replicated). Note: in
    training mode the 1x1 bin's BatchNorm sees one value per channel per sample, so it needs batch size > 1.
    """

    def __init__(self, in_channels: int, width: int, bins: Sequence[int]):
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), conv_bn_relu(in_channels, width, 1)) for b in bins
        )
        self.bottleneck = conv_bn_relu(in_channels + len(bins) * width, width, 3)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [resize_to(stage(x), size) for stage in self.stages]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class FeatureRegressor(nn.Module):
    """UperNet-like regressor from student levels (finest first, each twice the stride of the one before) to the
    teacher taps paired with some of them.

    PPM on the coarsest level gives the top of an FPN top-down path (lateral 1x1 conv+BN+ReLU on every finer level,
    upsample+add, then a 3x3 conv+BN+ReLU output conv on each level that has a target; as in UperNet the PPM's own
    3x3 fusion conv is the coarsest level's output conv), then a 1x1 head per paired level to the teacher's channel
    count. Predictions stay on the student's grid: the targets are pooled to it (training/distill/pairing.py), so no
    map is ever larger than the finest level given. After pretraining the regressor is discarded.

    `out_channels[i]` is the teacher channel count level i regresses, or 0 for a level without a target (it still
    carries the top-down path, so a coarse unpaired level still learns through the finer levels' losses).

    With `top_down=False` there is no PPM and no top-down path: each paired level is regressed from itself alone
    (3x3 conv+BN+ReLU, then the 1x1 head), so a fine level's target cannot be read off the coarse levels and the
    student's own fine levels must carry it. Every level then needs a target.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: Sequence[int],
        width: int = 256,
        ppm_bins: Sequence[int] = (1, 2, 3, 6),
        top_down: bool = True,
    ):
        super().__init__()
        if len(in_channels) != len(out_channels) or not in_channels:
            raise ValueError(f"FeatureRegressor needs one out_channels entry (0 = no target) per student level, got "
                             f"in_channels={list(in_channels)}, out_channels={list(out_channels)}")
        if not any(out_channels):
            raise ValueError(f"FeatureRegressor: no level has a target (out_channels={list(out_channels)})")
        self.in_channels = tuple(in_channels)
        self.top_down = top_down
        if not top_down:
            if not all(out_channels):
                raise ValueError(f"FeatureRegressor without top-down path: every level needs a target, got "
                                 f"out_channels={list(out_channels)}")
            self.own = nn.ModuleList(conv_bn_relu(c, width, 3) for c in in_channels)
            self.head = nn.ModuleDict({str(i): nn.Conv2d(width, c, 1) for i, c in enumerate(out_channels)})
            return
        self.ppm = PyramidPooling(in_channels[-1], width, ppm_bins)
        self.lateral = nn.ModuleList(conv_bn_relu(c, width, 1) for c in in_channels[:-1])
        # output convs only where a head reads them (unused parameters would stall DDP)
        self.fpn_out = nn.ModuleDict({str(i): conv_bn_relu(width, width, 3)
                                      for i, c in enumerate(out_channels[:-1]) if c})
        self.head = nn.ModuleDict({str(i): nn.Conv2d(width, c, 1) for i, c in enumerate(out_channels) if c})

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """features: one map (B, in_channels[i], H_i, W_i) per level, finest first.

        Returns one prediction (B, out_channels[i], H_i, W_i) per level with a target, finest first.
        """
        channels = tuple(f.shape[1] for f in features)
        if channels != self.in_channels:
            raise ValueError(f"expected {len(self.in_channels)} feature maps with channels {self.in_channels}, got "
                             f"channels {channels}")
        if not self.top_down:
            return [self.head[str(i)](own(f)) for i, (own, f) in enumerate(zip(self.own, features, strict=True))]

        # Top-down: coarsest (PPM) first, each finer lateral adds the upsampled coarser map.
        merged = [self.ppm(features[-1])]
        for lateral, f in zip(reversed(self.lateral), reversed(features[:-1]), strict=True):
            x = lateral(f)
            merged.append(x + resize_to(merged[-1], x.shape[-2:]))
        merged.reverse()  # finest first
        preds = []
        for key, head in self.head.items():  # paired levels, finest first
            x = merged[int(key)]
            preds.append(head(self.fpn_out[key](x) if key in self.fpn_out else x))  # the coarsest: PPM output as is
        return preds
