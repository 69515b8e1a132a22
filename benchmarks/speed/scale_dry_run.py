"""The ImageNet recipes at full size, for a few steps on synthetic images: per-image cost of each part, peak memory.

    python benchmarks/speed/scale_dry_run.py --device cuda --batch 64 --bf16 --channels-last   # one GPU
    python benchmarks/speed/scale_dry_run.py --device cpu --batch 1 --steps 2 --students resnet50  # shapes, CPU figure

The teacher is the paper's ADM-256 (`256x256_diffusion_uncond` architecture from training/teacher/adm.py's preset,
random
weights unless `--adm-checkpoint` names OpenAI's .pt), tapped as the recipe says (output blocks 3/6/9/12 at
strides 32/16/8/4, t = 150); the students are the recipes' resnet50 and convnext_base with their FPN + PPM
regressor, LAMB, and the trainer's own loss (training/distill/distiller.py `distillation_loss`). Printed per student:
milliseconds per image of the teacher forward (stopped after its last tap, and run to the end), the student alone
(forward + backward + step), and the full distillation step; the teacher's share of the full step; peak memory;
and, from torch's FLOP counter, the achieved TFLOP/s of the full step against `--peak-tflops` (the chip's dense bf16
peak; default for H100/H200: 989).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse  # noqa: E402
import contextlib  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402

from dreamteacher_models.recipes import get_recipe  # noqa: E402
from training.distill.distiller import build_distiller, distillation_loss  # noqa: E402
from training.run.hardware import cpu_name  # noqa: E402

PRESET = "256x256_diffusion_uncond"
DENSE_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def build_adm_teacher(recipe, device, dtype, channels_last, checkpoint=None):
    from diffusers import DDPMScheduler, UNet2DModel

    from training.teacher import adm
    from training.teacher.frozen import FrozenTeacher

    unet = adm.convert(adm.load_checkpoint(checkpoint), PRESET) if checkpoint else \
        UNet2DModel(**adm.diffusers_config(PRESET))
    return FrozenTeacher(unet, DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear"),
                         recipe.teacher.timestep, recipe.data.mean, recipe.data.std, taps=recipe.teacher.taps,
                         device=device, dtype=dtype,
                         channels_last=channels_last, kind="adm", source=checkpoint or "random ADM-256")


def timed(fn, steps: int, device) -> float:
    """Median seconds of `fn` over `steps` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def flops_of(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def measure(arch: str, args, device, peak: float | None) -> str:
    """One table row: the recipe `<arch>.dreamteacher_in1k` at full size."""
    dtype = torch.bfloat16 if args.bf16 else None
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    recipe = get_recipe(f"{arch}.dreamteacher_in1k")
    teacher = build_adm_teacher(recipe, device, dtype, args.channels_last, args.adm_checkpoint)
    model, _ = build_distiller(recipe, dict(zip(teacher.strides, teacher.channels, strict=True)))
    teacher.keep_strides({pair.teacher_stride for pair in model.pairs})
    model = model.to(device, memory_format=fmt)
    opt = create_optimizer_v2(model, opt=recipe.optim.optimizer, lr=1e-4, weight_decay=0.05)
    images = torch.randn(args.batch, *recipe.data.input_size, device=device).contiguous(memory_format=fmt)

    def teacher_fwd(early_stop: bool):
        teacher.early_stop = early_stop
        teacher(images)
        teacher.early_stop = True

    def student_step():
        with autocast():
            loss = model.student(images).float().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def full_step():
        maps = teacher(images)
        with autocast():
            losses = distillation_loss(model(images), maps, model.pairs, recipe.loss)
        losses["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_early = timed(lambda: teacher_fwd(True), args.steps, device)
    t_full = timed(lambda: teacher_fwd(False), args.steps, device)
    t_student = timed(student_step, args.steps, device)
    t_step = timed(full_step, args.steps, device)
    memory = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else "-"
    tflops = flops_of(full_step) / t_step / 1e12
    achieved = f"{tflops:.1f}" + (f" ({100 * tflops / peak:.0f}% of {peak:.0f})" if peak else "")
    per = 1e3 / args.batch
    return (f"| {arch} | {t_early * per:.1f} ms | {t_full * per:.1f} ms | {t_student * per:.1f} ms | "
            f"{t_step * per:.1f} ms | {100 * t_early / t_step:.0f}% | {args.batch / t_step:.1f} | {memory} | "
            f"{achieved} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--students", default="resnet50,convnext_base", help="comma-separated recipe archs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="timed calls per variant (after one warm-up)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for teacher and student (as --mixed_precision)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--adm-checkpoint", help="OpenAI's 256x256_diffusion_uncond.pt (default: random weights)")
    p.add_argument("--peak-tflops", type=float, help="the chip's dense bf16 peak (default: by GPU name)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.batch < 2:
        p.error("--batch must be >= 2 (the PPM's 1x1 bin has a BatchNorm)")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = args.peak_tflops or next((v for k, v in DENSE_BF16_TFLOPS.items() if gpu and k in gpu), None)

    print(f"## full-size dry run: ADM-256 teacher ({PRESET}), 256 px, batch {args.batch}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}{', channels_last' if args.channels_last else ''}\n")
    print("| student | teacher fwd, early stop | teacher fwd, full | student fwd+bwd+step | full step | "
          "teacher share | images/s | peak memory | achieved TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for arch in args.students.split(","):
        print(measure(arch, args, device, peak))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\nms are per image (median of {args.steps} calls); device: {gpu or cpu_name()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")


if __name__ == "__main__":
    main()
