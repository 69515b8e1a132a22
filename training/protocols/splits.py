"""Which labelled images a classification evaluation scores on: the test split (reporting), or a validation split
carved from train (choosing: ablations, teacher probes, tuning), so a choice never reads the test split.

The validation carve is fixed: class-balanced (the same fraction of every class), drawn once with VALIDATION_SEED,
the same for every run, tool and evaluation seed. Its images never enter the fitting pool.
"""

from __future__ import annotations

import numpy as np

SPLITS = ("test", "validation")
VALIDATION_FRACTION = 1 / 6  # Fashion-MNIST: 10,000 of the 60,000 train images (1,000 per class)
VALIDATION_SEED = 0


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown evaluation split {split!r}; allowed: {', '.join(SPLITS)} (validation is carved "
                         "from train, for choosing settings; test is for reporting)")
    return split


def carve_validation_split(labels: np.ndarray, fraction: float = VALIDATION_FRACTION, seed: int = VALIDATION_SEED
                           ) -> tuple[np.ndarray, np.ndarray]:
    """(fitting indices, validation indices) of a labelled train split, both sorted: round(fraction x n_c) images of
    each class c go to validation, drawn with a fixed seed."""
    if not 0 < fraction < 1:
        raise ValueError(f"the validation fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    held = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        take = int(round(fraction * len(members)))
        if take >= len(members):
            raise ValueError(f"class {label} has {len(members)} image(s): too few to hold {take} out for validation")
        held.append(rng.permutation(members)[:take])
    val = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(labels)), val), val
