"""The prepared GPU check: the real trainer, end to end, on the paper's recipes at full size, in a few minutes.

    python benchmarks/speed/gpu_check.py --out gpu_check/            # on one GPU: full size, bf16, channels_last
    python benchmarks/speed/gpu_check.py --size tiny --out /tmp/gc   # anywhere: the same path at toy size (CPU)

For resnet50.dreamteacher_in1k and convnext_base.dreamteacher_in1k it runs training/pretrain.py in-process on
synthetic images: a teacher with the ADM-256 architecture (training/teacher/adm.py's diffusers config of the
256x256_diffusion_uncond preset, random weights: the check needs no 2 GB download), `--max-steps` half-way with a
checkpoint, then `--resume latest` to the end, the export, and a `timm.create_model("local-dir:...")` load (on a GPU
the trainer takes its --fast-path for these recipes by default: training/teacher/fast_path.py). It prints
one row per recipe (images/s from the run's metrics.jsonl after the first logged step, peak GPU memory, wall time)
and writes the table to <out>/gpu_check.md. `--size tiny` swaps in a 64-px ADM-like teacher and toy students
(resnet18, convnext_atto) in fp32, which tests/test_gpu_check.py runs on the CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/speed/gpu_check.py` puts benchmarks/speed/, not the repo, first
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from training import pretrain  # noqa: E402
from training.run.hardware import describe_machine  # noqa: E402
from training.run.layout import write_text_atomic  # noqa: E402
from training.teacher import adm  # noqa: E402

RECIPES = ("resnet50.dreamteacher_in1k", "convnext_base.dreamteacher_in1k")
# toy size: a 64-px teacher with ADM-256's structure in miniature (6 levels, attention, scale-shift, resblock up/down)
TINY_TEACHER = adm.ADMFlags(image_size=64, num_channels=32, channel_mult=(1, 1, 1, 1, 1, 1), num_res_blocks=1,
                            attention_resolutions="4", num_head_channels=32, learn_sigma=True, resblock_updown=True,
                            use_scale_shift_norm=True)
SIZES = {
    "full": {"flags": adm.PRESETS["256x256_diffusion_uncond"], "pixels": 256, "images": 256, "batch": 64,
             "steps": 20, "precision": "bf16", "workers": 8, "arch": {}},
    "tiny": {"flags": TINY_TEACHER, "pixels": 64, "images": 16, "batch": 4, "steps": 4, "precision": "no", "workers": 0,
             "arch": {"resnet50.dreamteacher_in1k": "resnet18", "convnext_base.dreamteacher_in1k": "convnext_atto"}},
}


def make_teacher(flags: adm.ADMFlags, folder: Path) -> Path:
    """A diffusers UNet with the ADM architecture of `flags` and random weights, as a teacher folder."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    UNet2DModel(**adm.diffusers_config(flags)).save_pretrained(folder / "unet", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(folder / "scheduler")
    return folder


def make_images(folder: Path, n: int, pixels: int) -> Path:
    """`n` smooth random RGB images (an image folder with one class): what a loader decodes, not noise."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "synthetic").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(low).resize((pixels, pixels), Image.BICUBIC).save(folder / "synthetic" / f"{i:04d}.png")
    return folder


def run_recipe(recipe: str, size: dict, teacher: Path, data: Path, out: Path, threads: int | None) -> dict:
    """Half the steps, a checkpoint, a resume to the end, the export and its timm load; the row of the table."""
    run = out / recipe
    common = ["--recipe", recipe, "--teacher", str(teacher), "--data-dir", str(data), "--output-dir", str(run),
              "--batch-size", str(size["batch"]), "--per-device-batch-size", str(size["batch"]),
              "--mixed-precision", size["precision"], "--num-workers", str(size["workers"]), "--log-every", "1",
              "--feature-images", "0", "--set", "teacher.kind='unet'",
              "--set", f"data.input_size=(3,{size['pixels']},{size['pixels']})"]
    if recipe in size["arch"]:
        common += ["--set", f"arch={size['arch'][recipe]!r}", "--set", "zero_init_last=None"]
    if torch.cuda.is_available():
        common.append("--channels-last")
        torch.cuda.reset_peak_memory_stats()
    if threads:
        common += ["--threads", str(threads)]
    half = size["steps"] // 2
    start = time.perf_counter()
    pretrain.main([*common, "--max-steps", str(half), "--checkpoint-every", str(half), "--no-export"])
    # the first leg is a shorter run: resuming it to the full length is a length mismatch, allowed here on purpose
    pretrain.main([*common, "--max-steps", str(size["steps"]), "--resume", "latest", "--allow-resume-mismatch"])
    wall = time.perf_counter() - start
    import timm

    model = timm.create_model(f"local-dir:{run / 'export'}", pretrained=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    if steps != list(range(1, size["steps"] + 1)):
        raise RuntimeError(f"{recipe}: metrics.jsonl holds steps {steps}, not 1..{size['steps']} once each")
    rates = [r["images_per_s"] for r in rows if r["step"] not in (1, half + 1)]  # not the warm-up steps
    return {"recipe": recipe, "arch": type(model).__name__, "steps": size["steps"],
            "images_per_s": round(statistics.median(rates), 1),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else None,
            "wall_s": round(wall, 1)}


def table(rows: list[dict], size: str) -> str:
    lines = ["| recipe | model loaded | steps | images/s (median) | peak GPU memory (GiB) | wall (s) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['recipe']} | {r['arch']} | {r['steps']} | {r['images_per_s']} | {r['peak_gpu_gib'] or '-'} | "
              f"{r['wall_s']} |" for r in rows]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return "\n".join(lines) + f"\n\n--size {size} on {device}; {describe_machine()}\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--out", required=True, help="work folder: teacher, images, runs and gpu_check.md")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    p.add_argument("--threads", type=int, help="torch threads on a CPU (default: every core)")
    args = p.parse_args(argv)
    size = SIZES[args.size]
    out = Path(args.out)
    teacher = make_teacher(size["flags"], out / "teacher")
    data = make_images(out / "images", size["images"], size["pixels"])
    rows = [run_recipe(recipe, size, teacher, data, out / "runs", args.threads) for recipe in args.recipes]
    text = table(rows, args.size)
    write_text_atomic(out / "gpu_check.md", text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
