"""What the committed teacher's training would cost on this CPU: its measured step time here x the images it saw.

    python benchmarks/speed/teacher_training_cost.py --out benchmarks/results/teacher_cost/cpu.md

The teacher (teachers/ddpm-fashion-mnist-32) was trained on a GPU in three stages; its README lists each stage's
steps x batch. This script builds the same UNet (its config.json, fresh weights), times `--steps` optimizer steps of
training/train_teacher.py's objective (DDPM denoising MSE, AdamW, fp32: this CPU has no fast bf16 unless it says
so) at the stages' batch sizes, and multiplies the median seconds per image by the images of each stage. The result
is the CPU-equivalent of the teacher's training: the compute a user without a GPU would spend before distilling.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from benchmarks.common import matmul_gflops  # noqa: E402
from training.run.hardware import describe_machine  # noqa: E402
from training.teacher.ddpm import build_scheduler, denoising_loss  # noqa: E402

TEACHER = Path("teachers/ddpm-fashion-mnist-32")
STAGE_ROW = re.compile(r"^\| (\d+) \| .*? \| ([\d,]+) x (\d+) \| ([\d.]+) \|", re.M)


def stages(readme: Path) -> list[tuple[int, int, int]]:
    """(stage, steps, batch) of each row of the teacher README's stage table."""
    rows = [(int(s), int(steps.replace(",", "")), int(batch)) for s, steps, batch, _ in STAGE_ROW.findall(
        readme.read_text())]
    if not rows:
        raise ValueError(f"{readme} has no stage table (| stage | what | steps x batch | epochs | ...)")
    return rows


def seconds_per_image(unet, batch: int, steps: int, size: int) -> float:
    """Median seconds per image of `steps` training steps at `batch` (the first, warm-up, step left out)."""
    scheduler = build_scheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    times = []
    for _ in range(steps + 1):
        clean = torch.rand(batch, 3, size, size) * 2 - 1
        t = torch.randint(0, 1000, (batch,))
        start = time.perf_counter()
        loss = denoising_loss(unet, scheduler, clean, torch.randn_like(clean), t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) / batch


def main(argv: list[str] | None = None) -> str:
    from diffusers import UNet2DModel

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=str(TEACHER), help=f"teacher folder (default {TEACHER})")
    p.add_argument("--steps", type=int, default=5, help="timed steps per batch size (default 5)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="also write the table to this markdown file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = Path(args.teacher)
    config = UNet2DModel.load_config(folder / "unet")
    size = int(config["sample_size"])
    plan = stages(folder / "README.md")
    probe = matmul_gflops()
    per_image = {}
    for batch in sorted({b for _, _, b in plan}):
        torch.manual_seed(0)
        per_image[batch] = seconds_per_image(UNet2DModel.from_config(config).train(), batch, args.steps, size)
    lines = [f"# The teacher's training on this CPU ({folder})", "",
             f"Machine: {describe_machine()}; fp32 matmul probe {probe:.0f} GFLOP/s; {args.threads} threads; "
             f"{args.steps} timed steps per batch size (median).", "",
             "| stage | steps x batch | images | s/image here | CPU hours |", "|---|---|---|---|---|"]
    total = 0.0
    for stage, steps, batch in plan:
        hours = steps * batch * per_image[batch] / 3600
        total += hours
        lines.append(f"| {stage} | {steps:,} x {batch} | {steps * batch:,} | {per_image[batch]:.4f} | {hours:.1f} |")
    lines += [f"| all | | {sum(s * b for _, s, b in plan):,} | | **{total:.1f}** |", ""]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table)
    return table


if __name__ == "__main__":
    main()
