"""SimCLR and BYOL baselines built from the `lightly` library (its heads, losses, transforms and schedule).

Benchmark-only code (`pip install -e .[bench]`): used by benchmarks/experiments/indomain_fmnist.py to pretrain a timm
backbone
with a peer self-supervised method for a fixed number of steps, so it can be compared with DreamTeacher at the same
wall-clock budget. The models follow lightly's own examples (examples/pytorch/simclr.py, byol.py):

* SimCLR: backbone -> SimCLRProjectionHead(D, D, 128); NTXentLoss(temperature=0.5), the SimCLR paper's CIFAR value
  and lightly's default.
* BYOL: online backbone -> BYOLProjectionHead(D, 1024, 256) -> BYOLPredictionHead(256, 1024, 256); a momentum copy of
  backbone + projection (lightly.models.utils.deactivate_requires_grad / update_momentum); symmetric
  NegativeCosineSimilarity; momentum from lightly.utils.scheduler.cosine_schedule(step, total, 0.99, 1.0), per step
  (lightly's CIFAR-10 benchmark starts at 0.99; short runs need the faster-moving target).

Augmentations, at input_size 32 with settings for 32-px grayscale Fashion-MNIST: no Gaussian blur (it erases a 32-px
image), colour-jitter strength 0.5 (lightly's CIFAR setting; saturation/hue and random grayscale do nothing to a gray
image and are set to 0), random-resized-crop min scale 0.2 (the usual CIFAR-scale value; 0.08 leaves a few pixels of
a 28-px garment), horizontal flips, BYOL's solarisation on view 2 kept (p = 0.2), and the recipe's normalisation (not
ImageNet's). Two implementations draw them: `augment="tensor"` (the default: benchmarks/experiments/
ssl_tensor_views.py, batched tensor ops: on 2 CPU cores a batch of views costs under 1/25 of the PIL path's, the
whole step about 1/1.2, the network being most of it; benchmarks/results/ssl_views/) and `augment="lightly"` (lightly's
SimCLRTransform / BYOLTransform on PIL images, one image at a time in a DataLoader).

Optimiser: SGD, momentum 0.9, weight decay 5e-4, lr 0.06 x batch / 128 (lightly's CIFAR-10 benchmark settings for
both methods), linear warm-up over the first 10% of the steps (as the DreamTeacher recipe) then cosine decay to 0.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from benchmarks.experiments.ssl_tensor_views import ViewAugment, decode_images, two_view_batches

logger = logging.getLogger("dreamteacher.bench.ssl")

SSL_METHODS = ("simclr", "byol")
SGD_LR_PER_128 = 0.06
SGD_MOMENTUM = 0.9
SGD_WEIGHT_DECAY = 5e-4
WARMUP_FRACTION = 0.1
CJ_STRENGTH = 0.5
MIN_SCALE = 0.2
BYOL_MOMENTUM = (0.99, 1.0)
JITTER = {"simclr": 0.8, "byol": 0.4}  # lightly's cj_bright = cj_contrast defaults per method, times CJ_STRENGTH
SOLARIZE = {"simclr": (0.0, 0.0), "byol": (0.0, 0.2)}  # per view; BYOLView2Transform's solarization_prob
AUGMENTS = ("tensor", "lightly")
# What a tuning run may change per method (benchmarks/experiments/ssl_tuning.py), with the defaults stated above:
# lr_scale multiplies the SGD lr, momentum_base is the BYOL target's starting momentum (cosine to 1).
SETTINGS = {"simclr": {"temperature": 0.5, "lr_scale": 1.0},
            "byol": {"momentum_base": BYOL_MOMENTUM[0], "lr_scale": 1.0}}


def ssl_transform(method: str, input_size: int, mean, std) -> Callable:
    """lightly's two-view transform for `method` (PIL image -> [view_1, view_2]) with 32-px grayscale settings."""
    normalize = {"mean": list(mean), "std": list(std)}
    common = dict(input_size=input_size, cj_strength=CJ_STRENGTH, cj_sat=0.0, cj_hue=0.0, min_scale=MIN_SCALE,
                  random_gray_scale=0.0, gaussian_blur=0.0, normalize=normalize)
    if method == "simclr":
        from lightly.transforms import SimCLRTransform

        return SimCLRTransform(**common)
    if method == "byol":
        from lightly.transforms import BYOLTransform
        from lightly.transforms.byol_transform import BYOLView1Transform, BYOLView2Transform

        return BYOLTransform(view_1_transform=BYOLView1Transform(**common),
                             view_2_transform=BYOLView2Transform(**common))
    raise ValueError(f"unknown SSL method {method!r}; known: {', '.join(SSL_METHODS)}")


def tensor_views(method: str, input_size: int, mean, std) -> tuple[ViewAugment, ViewAugment]:
    """ssl_transform's two views as batched tensor augmentations (same crop scale, flips, jitter, solarisation)."""
    if method not in SSL_METHODS:
        raise ValueError(f"unknown SSL method {method!r}; known: {', '.join(SSL_METHODS)}")
    jitter = CJ_STRENGTH * JITTER[method]
    return tuple(ViewAugment(size=input_size, mean=tuple(mean), std=tuple(std), min_scale=MIN_SCALE,
                             brightness=jitter, contrast=jitter, solarize_prob=p) for p in SOLARIZE[method])


class TwoViewDataset(torch.utils.data.Dataset):
    """(view_1, view_2) of each image of a `datasets.Dataset` (column ``image``), converted to RGB first."""

    def __init__(self, hf_dataset, transform: Callable, image_key: str = "image"):
        self.ds, self.transform, self.image_key = hf_dataset, transform, image_key

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.ds[int(i)][self.image_key]
        views = self.transform(img if img.mode == "RGB" else img.convert("RGB"))
        return views[0], views[1]


class SimCLR(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, temperature: float = SETTINGS["simclr"]["temperature"]):
        super().__init__()
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(feature_dim, feature_dim, 128)
        self.criterion = NTXentLoss(temperature=temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x))

    def training_loss(self, x0: torch.Tensor, x1: torch.Tensor, step: int, total_steps: int) -> torch.Tensor:
        return self.criterion(self(x0), self(x1))


class BYOL(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, momentum_base: float = BYOL_MOMENTUM[0]):
        super().__init__()
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        self.backbone = backbone
        self.projection_head = BYOLProjectionHead(feature_dim, 1024, 256)
        self.prediction_head = BYOLPredictionHead(256, 1024, 256)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NegativeCosineSimilarity()
        self.momentum = (momentum_base, BYOL_MOMENTUM[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prediction_head(self.projection_head(self.backbone(x)))

    @torch.no_grad()
    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head_momentum(self.backbone_momentum(x)).detach()

    def training_loss(self, x0: torch.Tensor, x1: torch.Tensor, step: int, total_steps: int) -> torch.Tensor:
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        m = cosine_schedule(step, total_steps, *self.momentum)
        update_momentum(self.backbone, self.backbone_momentum, m=m)
        update_momentum(self.projection_head, self.projection_head_momentum, m=m)
        p0, p1 = self(x0), self(x1)
        z0, z1 = self.forward_momentum(x0), self.forward_momentum(x1)
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))


def ssl_settings(method: str, overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """`method`'s SETTINGS with `overrides` applied; an unknown method or setting is refused by name."""
    if method not in SETTINGS:
        raise ValueError(f"unknown SSL method {method!r}; known: {', '.join(SSL_METHODS)}")
    unknown = sorted(set(overrides or {}) - set(SETTINGS[method]))
    if unknown:
        raise ValueError(f"{method} has no setting {', '.join(map(repr, unknown))}; its settings: "
                         f"{', '.join(SETTINGS[method])}")
    settings = {**SETTINGS[method], **{k: float(v) for k, v in (overrides or {}).items()}}
    in_range = (settings["lr_scale"] > 0 and settings.get("temperature", 1.0) > 0
                and 0 <= settings.get("momentum_base", 0.0) < 1)
    if not in_range:
        raise ValueError(f"{method}: settings out of range {settings} (lr_scale and temperature > 0, "
                         "0 <= momentum_base < 1)")
    return settings


def build_ssl_model(method: str, backbone: nn.Module, overrides: Mapping[str, float] | None = None) -> nn.Module:
    settings = ssl_settings(method, overrides)
    feature_dim = int(backbone.num_features)
    if method == "simclr":
        return SimCLR(backbone, feature_dim, temperature=settings["temperature"])
    return BYOL(backbone, feature_dim, momentum_base=settings["momentum_base"])


def sgd_lr(batch_size: int) -> float:
    return SGD_LR_PER_128 * batch_size / 128


def two_view_stream(method: str, hf_dataset, augment: str, *, batch_size: int, input_size: int, mean, std,
                    seed: int = 0, num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (view_1, view_2) batches of `method`'s augmentations, drawn by `augment` (one of AUGMENTS)."""
    if augment == "tensor":
        return two_view_batches(decode_images(hf_dataset), tensor_views(method, input_size, mean, std), batch_size,
                                seed)
    if augment != "lightly":
        raise ValueError(f"unknown augment {augment!r}; known: {', '.join(AUGMENTS)}")
    dataset = TwoViewDataset(hf_dataset, ssl_transform(method, input_size, mean, std))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=num_workers, persistent_workers=num_workers > 0,
                                         generator=torch.Generator().manual_seed(seed))
    return (batch for _ in itertools.count() for batch in loader)


def save_ssl_checkpoint(path: Path, run: dict[str, Any], step: int, model: nn.Module, optimizer, scheduler,
                        step_s: list[float], loss: float) -> None:
    """The training state after `step` steps, written atomically (a kill leaves the previous checkpoint whole)."""
    from training.run.layout import atomic_file

    state = {"run": run, "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "step_s": step_s, "loss": loss}
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def load_ssl_checkpoint(path: Path, run: dict[str, Any], model: nn.Module, optimizer, scheduler
                        ) -> tuple[int, list[float], float]:
    """(steps done, their step times, last loss) of the checkpoint at `path`, its state put into model, optimizer and
    scheduler; refused, naming the differences, when it belongs to another run."""
    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only
    if state["run"] != run:
        diffs = [f"{k}: {state['run'].get(k)!r} there, {v!r} here" for k, v in run.items() if state["run"].get(k) != v]
        raise ValueError(f"checkpoint {path} is another run's ({'; '.join(diffs)}); delete it or use another folder")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["step"], list(state["step_s"]), state["loss"]


def train_ssl(
    method: str,
    backbone: nn.Module,
    hf_dataset,
    *,
    steps: int,
    batch_size: int,
    input_size: int,
    mean,
    std,
    seed: int = 0,
    num_workers: int = 0,
    augment: str = "tensor",
    overrides: Mapping[str, float] | None = None,
    device: str | torch.device = "cpu",
    desc: str | None = None,
    progress: bool = True,
    checkpoint: Path | None = None,
    checkpoint_every: int = 100,
) -> dict[str, Any]:
    """Pretrain `backbone` in place with `method` for exactly `steps` SGD steps of `batch_size` images (2 views each),
    the views drawn by `augment` ("tensor": batched, "lightly": lightly's PIL transforms in a DataLoader), with
    `overrides` of the method's SETTINGS. With `checkpoint` (tensor views only), the state is saved there every
    `checkpoint_every` steps and at the end, and a run that finds one continues from it: the same views, so the
    same weights as a run never stopped (one that finds the final state trains nothing).

    Returns {"steps", "images", "views", "train_s" (loop wall time: data + compute, summed over the sessions of a
    resumed run), "step_s" (each step's wall time, data loading included), "final_loss", "lr", "epochs", "augment",
    "settings"}.
    """
    from training.run.schedule import cosine_with_warmup

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if len(hf_dataset) < batch_size:
        raise ValueError(f"{method}: {len(hf_dataset)} images are fewer than one batch of {batch_size}")
    settings = ssl_settings(method, overrides)
    torch.manual_seed(seed)
    model = build_ssl_model(method, backbone, settings).to(device)
    batches = two_view_stream(method, hf_dataset, augment, batch_size=batch_size, input_size=input_size, mean=mean,
                              std=std, seed=seed, num_workers=num_workers)
    lr = sgd_lr(batch_size) * settings["lr_scale"]
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=SGD_MOMENTUM, weight_decay=SGD_WEIGHT_DECAY)
    warmup = int(round(WARMUP_FRACTION * steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, steps, warmup))
    model.train()
    step_s: list[float] = []
    loss_value = math.nan
    first = 0
    run = {"method": method, "steps": steps, "batch_size": batch_size, "seed": seed, "settings": settings,
           "images": len(hf_dataset), "input_size": input_size, "mean": list(mean), "std": list(std)}
    if checkpoint is not None:
        if augment != "tensor":
            raise ValueError(f"checkpoint: only tensor views resume exactly, not augment={augment!r}")
        if checkpoint.is_file():
            first, step_s, loss_value = load_ssl_checkpoint(checkpoint, run, model, optimizer, scheduler)
            for _ in range(first if first < steps else 0):  # the seeded views drawn again, untrained: the
                next(batches)                                 # stream continues where it stopped
    bar = tqdm(total=steps, initial=first, desc=desc or method, unit="step", disable=not progress, leave=False)
    last = time.perf_counter()
    for step in range(first, steps):
        x0, x1 = next(batches)
        loss = model.training_loss(x0.to(device), x1.to(device), step, steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"{method}: non-finite loss at step {step + 1}")
        now = time.perf_counter()
        step_s.append(now - last)
        last = now
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{batch_size / step_s[-1]:.0f}", refresh=False)
        if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            save_ssl_checkpoint(checkpoint, run, step + 1, model, optimizer, scheduler, step_s, loss_value)
            if not progress:  # the bar is off (logs to a file): say how far a long run has got
                logger.info("%s: step %d/%d saved, loss %.4f, %.2f s/step", desc or method, step + 1, steps,
                            loss_value, statistics.median(step_s[-checkpoint_every:]))
            last = time.perf_counter()  # the save is not the next step's time
    train_s = sum(step_s)
    bar.close()
    backbone.eval()
    return {"steps": steps, "images": steps * batch_size, "views": 2 * steps * batch_size, "train_s": train_s,
            "step_s": step_s, "final_loss": loss_value, "lr": lr, "epochs": steps * batch_size / len(hf_dataset),
            "augment": augment, "settings": settings}
