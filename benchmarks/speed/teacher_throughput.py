"""Teacher feature-extraction throughput: early stop vs full pass, fp32 vs bf16 autocast, channels_last.

    python benchmarks/speed/teacher_throughput.py                       # random small UNet, 32 and 64 px
    python benchmarks/speed/teacher_throughput.py --source teachers/ddpm-fashion-mnist-32 --sizes 32

The teacher is a small attention-free diffusers UNet2DModel (block_out_channels 32,64,128,128, layers_per_block 2;
random weights unless --source names a trained one), wrapped in training.teacher.frozen.FrozenTeacher. Variants run
interleaved (A B C ... A B C ...) in one process on the same images; each gets its own copy of the UNet. Reported:
median images/s, the median of per-round speed ratios against the fp32 full pass (robust to slow spells on a
shared host), and the relative L2 error of each variant's features against fp32 early stop for the same noise
(max over taps). A 2048x2048 fp32 matmul is timed every round; rounds where it ran below 60% of the run's best
are flagged. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python benchmarks/speed/teacher_throughput.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import matmul_gflops  # noqa: E402
from training.run.hardware import describe_machine  # noqa: E402
from training.teacher.build import build_teacher  # noqa: E402
from training.teacher.frozen import FrozenTeacher  # noqa: E402

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
SMALL_UNET = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64, 128, 128),
    layers_per_block=2,
    down_block_types=("DownBlock2D",) * 4,
    up_block_types=("UpBlock2D",) * 4,
)
VARIANTS = {  # name: FrozenTeacher options
    "fp32 full pass": dict(early_stop=False),
    "fp32 early stop": dict(),
    "bf16 autocast, early stop": dict(dtype=torch.bfloat16),
    "fp32 channels_last, early stop": dict(channels_last=True),
    "bf16 channels_last, early stop": dict(dtype=torch.bfloat16, channels_last=True),
}
BASELINE, REFERENCE = "fp32 full pass", "fp32 early stop"


def make_teachers(source: str | None, timestep: int) -> dict[str, FrozenTeacher]:
    from diffusers import DDPMScheduler, UNet2DModel

    if source:
        from dreamteacher_models.recipes import TeacherConfig

        base = build_teacher(TeacherConfig(kind="unet", source=source, timestep=timestep), MEAN, STD).unet
    else:
        torch.manual_seed(0)
        base = UNet2DModel(**SMALL_UNET)
    return {
        name: FrozenTeacher(copy.deepcopy(base), DDPMScheduler(), timestep, MEAN, STD, **opts)
        for name, opts in VARIANTS.items()
    }


def rel_error(a: dict, b: dict) -> float:
    return max(float((a[s] - b[s]).norm() / b[s].norm()) for s in b)


def bench_size(teachers, size: int, batch: int, rounds: int, max_seconds: float) -> tuple[list[dict], list[float]]:
    images = torch.randn(batch, 3, size, size)
    for t in teachers.values():  # warm-up (oneDNN primitive creation, autocast caches)
        t(images)
        t(images)
    times: dict[str, list[float]] = {name: [] for name in teachers}
    probes = []
    start = time.perf_counter()
    for r in range(rounds):
        probes.append(matmul_gflops())
        for name, t in teachers.items():  # interleaved: A B C ... each round
            t0 = time.perf_counter()
            t(images)
            times[name].append(time.perf_counter() - t0)
        if r >= 2 and time.perf_counter() - start > max_seconds:
            break
    ref = teachers[REFERENCE](images, torch.Generator().manual_seed(0))
    rows = []
    for name, t in teachers.items():
        feats = t(images, torch.Generator().manual_seed(0))
        ratios = [b / v for b, v in zip(times[BASELINE], times[name], strict=True)]
        rows.append(
            dict(
                size=size,
                variant=name,
                batch=batch,
                img_s=batch / statistics.median(times[name]),
                speedup=statistics.median(ratios),
                drift=rel_error(feats, ref),
                rounds=len(times[name]),
            )
        )
    return rows, probes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--max-seconds", type=float, default=60.0, help="per size; stops after >= 3 rounds")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--timestep", type=int, default=50)
    p.add_argument("--source", default=None, help="a trained diffusers UNet2DModel folder (default: random small UNet)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(describe_machine())
    print(f"teacher: {args.source or 'random UNet2DModel ' + str(SMALL_UNET['block_out_channels'])}, "
          f"layers_per_block {SMALL_UNET['layers_per_block']}, t={args.timestep}, batch {args.batch}")
    teachers = make_teachers(args.source, args.timestep)
    print("taps (stride x channels): " + ", ".join(f"{t.stride}x{t.channels}" for t in teachers[REFERENCE].taps))

    all_rows, all_probes = [], []
    for size in args.sizes:
        rows, probes = bench_size(teachers, size, args.batch, args.rounds, args.max_seconds)
        all_rows += rows
        all_probes += probes

    best = max(all_probes)
    slow = sum(g < 0.6 * best for g in all_probes)
    print()
    print("| size | variant | img/s (median) | speed vs fp32 full pass | feature rel. error vs fp32 | rounds |")
    print("|---|---|---|---|---|---|")
    for r in all_rows:
        print(f"| {r['size']} | {r['variant']} | {r['img_s']:.0f} | {r['speedup']:.2f}x | {r['drift']:.1e} | "
              f"{r['rounds']} |")
    print()
    print(f"matmul probe 2048^2 fp32: median {statistics.median(all_probes):.0f} GFLOP/s, "
          f"min {min(all_probes):.0f}, max {best:.0f} over {len(all_probes)} rounds; "
          f"{slow} round(s) below 60% of the best" + (" (SLOW SPELL: treat absolute img/s with care)" if slow else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
