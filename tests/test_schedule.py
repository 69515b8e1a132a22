"""The learning-rate multiplier against its formula: linear warm-up, cosine to min_lr, held there after the end."""

import math

import pytest

from training.run.schedule import cosine_with_warmup


@pytest.mark.parametrize(("step", "expected"), [(0, 0.5), (1, 1.0), (2, 1.0), (6, 0.5), (10, 0.0), (12, 0.0)])
def test_warm_up_then_cosine_to_zero_by_default(step, expected):
    assert cosine_with_warmup(step, total_steps=10, warmup_steps=2) == pytest.approx(expected, abs=1e-12)


def test_cosine_ends_at_min_lr_and_stays_there():
    quarter = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))  # 2 of 8 decay steps done
    assert cosine_with_warmup(4, 10, 2, min_lr_ratio=0.1) == pytest.approx(quarter)
    assert cosine_with_warmup(10, 10, 2, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert cosine_with_warmup(50, 10, 2, min_lr_ratio=0.1) == pytest.approx(0.1)


def test_a_single_step_after_warm_up_reaches_the_end_of_the_cosine():
    assert cosine_with_warmup(2, total_steps=3, warmup_steps=2) == pytest.approx(1.0)
    assert cosine_with_warmup(3, total_steps=3, warmup_steps=2) == pytest.approx(0.0, abs=1e-12)
    assert cosine_with_warmup(5, total_steps=5, warmup_steps=5) == pytest.approx(1.0)  # no decay phase at all


def test_noise_seed_is_the_runs_seed_times_a_prime_plus_the_streams_index():
    from training.run.schedule import SEED_STRIDE, noise_seed

    assert SEED_STRIDE == 1_000_003  # checkpoints of earlier runs resume onto the same streams only with this value
    assert [noise_seed(5, stream) for stream in (0, 1, 7)] == [5_000_015, 5_000_016, 5_000_022]
    assert noise_seed(0, 3) == 3 and noise_seed(1, 0) != noise_seed(0, 1)
