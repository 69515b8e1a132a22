"""Timing on a shared, noisy CPU: interleaved variants, medians, ratios, a matmul probe, machine facts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

PROBE_SIZE = 2048
SLOW_PROBE_GFLOPS = 250.0  # this host's fp32 matmul peak is ~360 GFLOP/s; below this it is in a slow spell


def matmul_gflops(size: int = PROBE_SIZE) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    a @ b
    return 2 * size**3 / (time.perf_counter() - start) / 1e9


def interleaved_medians(variants: dict[str, Callable[[], None]], rounds: int, warmup: int = 1
                        ) -> tuple[dict[str, float], list[float]]:
    """Run every variant once per round, A B C A B C ..., after `warmup` untimed rounds.

    Returns (median seconds per call for each variant, matmul probe GFLOP/s measured each round).
    """
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    probes = []
    for _ in range(rounds):
        probes.append(matmul_gflops())
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, probes


def probe_note(probes: list[float]) -> str:
    median = statistics.median(probes)
    slow = sum(p < SLOW_PROBE_GFLOPS for p in probes)
    note = f"matmul probe: median {median:.0f} GFLOP/s (min {min(probes):.0f}, max {max(probes):.0f})"
    if slow:
        note += f"; {slow}/{len(probes)} rounds in a slow spell (< {SLOW_PROBE_GFLOPS:.0f}): absolute numbers are low"
    return note
