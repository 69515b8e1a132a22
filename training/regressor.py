"""Student backbone taps (C2..C5) and the UperNet-like feature regressor that maps them onto the teacher's levels."""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

PYRAMID_STRIDES = (4, 8, 16, 32)  # C2..C5


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


def build_student(arch: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """The whole headless timm model (num_classes=0): its state dict keeps timm's own key names, so the
    exported backbone needs no key mapping. Its C2..C5 are read with `student_pyramid`."""
    model = timm.create_model(arch, pretrained=pretrained, num_classes=0, **kwargs)
    pyramid_taps(model, arch)  # fail now, not at the first step, when the pyramid is missing
    return model


def pyramid_taps(model: nn.Module, arch: str = "model") -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(feature_info indices, channels) of C2..C5 (strides 4, 8, 16, 32), picked by reduction so any CNN family
    works (resnet's index 0 is stride 2, convnext's is stride 4)."""
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "feature_info"):
        raise ValueError(f"{arch} has no forward_intermediates/feature_info in timm; pick a timm CNN backbone")
    indices = select_pyramid_indices([info["reduction"] for info in model.feature_info], arch)
    return indices, tuple(model.feature_info[i]["num_chs"] for i in indices)


def student_pyramid(model: nn.Module, images: Tensor, indices: Sequence[int]) -> list[Tensor]:
    """C2..C5 of a timm model, finest first: (B, 3, H, W) -> [(B, C_i, H/s_i, W/s_i)] for s_i = 4, 8, 16, 32."""
    return model.forward_intermediates(images, indices=list(indices), intermediates_only=True)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
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
            nn.Sequential(nn.AdaptiveAvgPool2d(b), _conv_bn_relu(in_channels, width, 1)) for b in bins
        )
        self.bottleneck = _conv_bn_relu(in_channels + len(bins) * width, width, 3)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [_resize(stage(x), size) for stage in self.stages]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class FeatureRegressor(nn.Module):
    """UperNet-like regressor from student levels C2..C5 to the teacher's four matched levels (finest first).

    PPM on C5 gives the top of an FPN top-down path (lateral 1x1 conv+BN+ReLU on C2..C4, upsample+add, 3x3
    conv+BN+ReLU per level; as in UperNet the PPM's own 3x3 fusion conv is C5's output conv), then a 1x1 conv per
    level to the teacher's channel count. After pretraining the regressor is discarded.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: Sequence[int],
        width: int = 256,
        ppm_bins: Sequence[int] = (1, 2, 3, 6),
    ):
        super().__init__()
        if len(in_channels) != 4 or len(out_channels) != 4:
            raise ValueError(
                f"FeatureRegressor needs 4 levels (C2..C5), got in_channels={list(in_channels)}, "
                f"out_channels={list(out_channels)}"
            )
        self.in_channels = tuple(in_channels)
        self.out_channels = tuple(out_channels)
        self.ppm = PyramidPooling(in_channels[-1], width, ppm_bins)
        self.lateral = nn.ModuleList(_conv_bn_relu(c, width, 1) for c in in_channels[:-1])
        self.fpn_out = nn.ModuleList(_conv_bn_relu(width, width, 3) for _ in in_channels[:-1])
        self.head = nn.ModuleList(nn.Conv2d(width, c, 1) for c in out_channels)

    def forward(
        self, features: Sequence[Tensor], target_sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[Tensor]:
        """features: 4 maps (B, in_channels[i], H_i, W_i), finest first.

        Returns 4 maps (B, out_channels[i], H_i, W_i), finest first; with `target_sizes` each is bilinearly
        resized to target_sizes[i] (the teacher map's H, W, which may sit at another stride or input size).
        """
        channels = tuple(f.shape[1] for f in features)
        if channels != self.in_channels:
            raise ValueError(f"expected 4 feature maps with channels {self.in_channels}, got channels {channels}")
        if target_sizes is not None and len(target_sizes) != 4:
            raise ValueError(f"target_sizes needs one (H, W) per level (4), got {list(target_sizes)}")

        # Top-down: coarsest (PPM on C5) first, each finer lateral adds the upsampled coarser map.
        merged = [self.ppm(features[-1])]
        for lateral, f in zip(reversed(self.lateral), reversed(features[:-1]), strict=True):
            x = lateral(f)
            merged.append(x + _resize(merged[-1], x.shape[-2:]))
        merged.reverse()  # finest first
        outs = [conv(x) for conv, x in zip(self.fpn_out, merged[:-1], strict=True)] + [merged[-1]]

        preds = [head(x) for head, x in zip(self.head, outs, strict=True)]
        if target_sizes is not None:
            preds = [_resize(p, size) for p, size in zip(preds, target_sizes, strict=True)]
        return preds
