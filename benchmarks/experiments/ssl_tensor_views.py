"""SimCLR / BYOL views as batched tensor ops: the augmentations of lightly's SimCLRTransform and BYOLTransform (the
settings of ssl_baselines.ssl_transform) applied to a whole batch at once, so the baselines run at the speed of
their network instead of waiting on a per-image PIL pipeline on the main process.

The unlabelled images are decoded once into one uint8 tensor (the benchmark sets are small: 60,000 28-px garments or
20,000 64-px scenes); each step gathers a batch and draws two views:

* random resized crop (scale U(min_scale, 1) of the area, aspect ratio log-uniform in [3/4, 4/3], torchvision's
  rejection rule, whole image after 10 misses) and horizontal flip (p = 0.5) as one affine grid per image, resampled
  bilinearly to `size` (crop corners are continuous, not rounded to whole pixels as torchvision does);
* colour jitter with probability cj_prob: brightness and contrast factors U(1 - s, 1 + s), applied in a random
  order per image as torchvision's ColorJitter does (saturation and hue are 0 in our settings: the images are gray);
* solarisation (values >= 128/255 inverted, PIL's rule) with probability solarize_prob;
* the recipe's normalisation, gray images repeated to 3 channels.

The random draws come from one seeded torch.Generator, so a seed gives the same views on every run.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
CROP_TRIES = 10  # torchvision's RandomResizedCrop draws up to 10 crops before falling back
SOLARIZE_THRESHOLD = 128 / 255
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


@dataclass(frozen=True)
class ViewAugment:
    """One view's augmentation: uint8 (B, C, H, W) images -> normalised float (B, 3, size, size)."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    min_scale: float
    brightness: float
    contrast: float
    cj_prob: float = 0.8
    hflip_prob: float = 0.5
    solarize_prob: float = 0.0

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = images.float().div_(255)
        x = self.crop_and_flip(x, generator)
        x = self.color_jitter(x, generator)
        if self.solarize_prob > 0:
            hit = draw(len(x), generator) < self.solarize_prob
            x = torch.where(hit[:, None, None, None] & (x >= SOLARIZE_THRESHOLD), 1 - x, x)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1)
        return ((x - mean) / std).contiguous()

    def crop_and_flip(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, height, width = x.shape
        w, h = crop_fractions(n, self.min_scale, height / width, generator)
        left = draw(n, generator) * (1 - w)  # the crop's top-left corner, as a fraction of the image side
        top = draw(n, generator) * (1 - h)
        flip = torch.where(draw(n, generator) < self.hflip_prob, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = w * flip  # output x in [-1, 1] -> input x: the crop's centre +- its half width
        theta[:, 0, 2] = 2 * (left + w / 2) - 1
        theta[:, 1, 1] = h
        theta[:, 1, 2] = 2 * (top + h / 2) - 1
        grid = F.affine_grid(theta, [n, x.shape[1], self.size, self.size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def color_jitter(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = len(x)
        applied = (draw(n, generator) < self.cj_prob).view(-1, 1, 1, 1)
        b = 1 + self.brightness * (2 * draw(n, generator) - 1)
        c = 1 + self.contrast * (2 * draw(n, generator) - 1)
        brightness_first = (draw(n, generator) < 0.5).view(-1, 1, 1, 1)
        a = adjust_contrast(adjust_brightness(x, b), c)
        z = adjust_brightness(adjust_contrast(x, c), b)
        return torch.where(applied, torch.where(brightness_first, a, z), x)


def draw(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator)


def crop_fractions(n: int, min_scale: float, aspect: float, generator: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Width and height of n random-resized crops as fractions of the image's (`aspect` = height / width);
    a crop that misses CROP_TRIES times is the whole image."""
    w, h = torch.ones(n), torch.ones(n)
    pending = torch.ones(n, dtype=torch.bool)
    for _ in range(CROP_TRIES):
        area = min_scale + (1 - min_scale) * draw(n, generator)
        ratio = torch.exp(LOG_RATIO[0] + (LOG_RATIO[1] - LOG_RATIO[0]) * draw(n, generator))
        cw = torch.sqrt(area * ratio * aspect)  # area fraction * (H * W) = (cw * W) * (ch * H)
        ch = torch.sqrt(area / ratio / aspect)
        ok = pending & (cw <= 1) & (ch <= 1)
        w, h = torch.where(ok, cw, w), torch.where(ok, ch, h)
        pending &= ~ok
    return w, h


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * factor.view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    gray = x if x.shape[1] == 1 else (x * torch.tensor(GRAY_WEIGHTS).view(1, 3, 1, 1)).sum(1, keepdim=True)
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * mean).clamp_(0, 1)


def decode_images(hf_dataset, image_key: str = "image") -> torch.Tensor:
    """Every image of a `datasets.Dataset` as one uint8 (N, C, H, W) tensor: 1 channel if all are gray, else RGB."""
    images = [hf_dataset[i][image_key] for i in range(len(hf_dataset))]
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise ValueError(f"batched views need images of one size; the dataset has {sorted(sizes)[:5]}")
    gray = all(im.mode == "L" for im in images)
    arrays = [np.asarray(im if gray or im.mode == "RGB" else im.convert("RGB")) for im in images]
    stacked = torch.from_numpy(np.stack(arrays))
    return stacked[:, None] if gray else stacked.permute(0, 3, 1, 2).contiguous()


def two_view_batches(images: torch.Tensor, views: tuple[ViewAugment, ViewAugment], batch_size: int, seed: int
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (view_1, view_2) batches: a seeded shuffle per epoch, the last partial batch dropped."""
    if len(images) < batch_size:
        raise ValueError(f"{len(images)} images are fewer than one batch of {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            batch = images[order[start:start + batch_size]]
            yield views[0](batch, generator), views[1](batch, generator)
