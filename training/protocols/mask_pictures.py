"""A picture of segmentation results: for a few test images, the image, the true mask and the predicted mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from training.labels.dense_masks import IGNORE_ID
from training.run.layout import atomic_file


def palette(num_classes: int) -> np.ndarray:
    """(num_classes + 1, 3) uint8 colours: class 0 black, the others spread over the hue circle, ignore white."""
    import colorsys

    colours = [(0, 0, 0)] + [tuple(int(255 * v) for v in colorsys.hsv_to_rgb(i / max(1, num_classes - 1), 0.8, 1.0))
                             for i in range(num_classes - 1)]
    return np.asarray([*colours, (255, 255, 255)], dtype=np.uint8)


@torch.no_grad()
def save_mask_picture(pyramid: nn.Module, head: nn.Module, dataset, path: Path, device, count: int = 6,
                      scale: int = 2) -> None:
    """Rows of (image, truth, prediction) for the first `count` images of `dataset` ((tensor, mask) pairs, a
    `MaskedImages` or a Subset of one), each `scale` times enlarged, written atomically to `path` (PNG)."""
    from training.protocols.segmentation import pixel_logits

    base = getattr(dataset, "dataset", dataset)
    colours = palette(base.num_classes)
    pyramid.eval()
    head.eval()
    rows = []
    for i in range(min(count, len(dataset))):
        image, mask = dataset[i]
        index = dataset.indices[i] if hasattr(dataset, "indices") else i
        raw = np.asarray(base.read(index)[0].resize(mask.shape[::-1]))
        pred = pixel_logits(pyramid, head, image[None].to(device), True, mask.shape).argmax(1)[0].cpu().numpy()
        truth = np.where(mask.numpy() == IGNORE_ID, len(colours) - 1, mask.numpy())
        rows.append(np.concatenate([raw, colours[truth], colours[pred]], axis=1))
    grid = np.concatenate(rows, axis=0).repeat(scale, 0).repeat(scale, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
