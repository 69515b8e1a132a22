"""The label-distillation interpreter: shapes for each tap layout and class count, clear errors, and it learns."""

from __future__ import annotations

import pytest
import torch

from training.labels.interpreter import DenseInterpreter, PooledInterpreter, interpreter_loss

LAYOUTS = {
    "fmnist (strides 4, 8)": {4: 16, 8: 32},
    "adm-256 (strides 4..32)": {4: 32, 8: 64, 16: 64, 32: 128},
    "one tap": {8: 32},
}


def _features(channels, batch=2, size=32, gen=None):
    return {s: torch.randn(batch, c, size // s, size // s, generator=gen) for s, c in channels.items()}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("num_classes", [2, 10, 34])
def test_shapes_for_each_tap_layout_and_class_count(layout, num_classes):
    channels = LAYOUTS[layout]
    features = _features(channels)
    dense = DenseInterpreter(channels, num_classes, width=32, groups=8)
    finest = min(channels)
    assert dense(features).shape == (2, num_classes, 32 // finest, 32 // finest)
    assert PooledInterpreter(channels, num_classes)(features).shape == (2, num_classes)


def test_wrong_taps_and_settings_are_clear_errors():
    dense = DenseInterpreter({4: 16, 8: 32}, 5, width=32, groups=8)
    with pytest.raises(ValueError, match=r"built for taps at strides \[4, 8\], got strides \[8\]"):
        dense({8: torch.randn(1, 32, 4, 4)})
    with pytest.raises(ValueError, match=r"stride-8 tap should be \(B, 32, H, W\)"):
        dense({4: torch.randn(1, 16, 8, 8), 8: torch.randn(1, 31, 4, 4)})
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        PooledInterpreter({4: 16}, 1)
    with pytest.raises(ValueError, match="divisible by the GroupNorm groups"):
        DenseInterpreter({4: 16}, 3, width=30, groups=8)
    with pytest.raises(ValueError, match=r"need masks \(B, H, W\)"):
        interpreter_loss(torch.randn(2, 3, 4, 4), torch.zeros(2, dtype=torch.long))


def test_dense_loss_is_ce_plus_3_dice_at_the_masks_size():
    logits = torch.randn(2, 3, 4, 4)
    masks = torch.randint(0, 3, (2, 16, 16))
    out = interpreter_loss(logits, masks)
    assert set(out) == {"loss", "ce", "dice"}
    torch.testing.assert_close(out["loss"], out["ce"] + 3.0 * out["dice"])


@pytest.mark.parametrize("kind", ["dense", "pooled"])
def test_the_interpreter_learns_a_task_its_features_carry(kind):
    """Class = which of 3 channels is bright where the object is: a few steps of AdamW must fit it."""
    gen = torch.Generator().manual_seed(0)
    channels = {4: 8, 8: 8}
    n = 24
    labels = torch.randint(0, 3, (n,), generator=gen)
    masks = torch.zeros(n, 32, 32, dtype=torch.long)
    masks[:, 8:24, 8:24] = labels[:, None, None]  # background 0, object labelled 0..2 -> use 1 + label
    masks[:, 8:24, 8:24] += 1
    features = _features(channels, batch=n, gen=gen)
    for stride, fmap in features.items():
        lo, hi = 8 // stride, 24 // stride
        fmap[torch.arange(n), labels, lo:hi, lo:hi] += 4.0
    torch.manual_seed(0)
    model = (DenseInterpreter(channels, 4, width=32, groups=8) if kind == "dense"
             else PooledInterpreter(channels, 3))
    target = masks if kind == "dense" else labels

    def eval_loss() -> float:  # without dropout, so before and after are comparable
        model.eval()
        with torch.no_grad():
            value = interpreter_loss(model(features), target)["loss"].item()
        model.train()
        return value

    first = eval_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=0.05, betas=(0.9, 0.95))
    for _ in range(60):
        loss = interpreter_loss(model(features), target)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    last = eval_loss()
    model.eval()
    with torch.no_grad():
        logits = model(features)
    if kind == "dense":
        logits = torch.nn.functional.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)
    accuracy = (logits.argmax(1) == target).float().mean().item()
    assert last < 0.5 * first and accuracy > 0.9, (first, last, accuracy)
