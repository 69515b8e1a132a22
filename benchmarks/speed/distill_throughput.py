"""Images/s of a full DreamTeacher distillation step vs its parts, at the same batch and resolution.

    python benchmarks/speed/distill_throughput.py             # fmnist recipe shapes, a random 4-level UNet teacher
    python benchmarks/speed/distill_throughput.py --teacher teachers/ddpm-fashion-mnist-32 --batch 64 --rounds 10

Variants (interleaved A B C D per round, medians): the student's bare forward+backward+step; the teacher's
feature extraction; teacher + student step (the irreducible work); the full step as training/pretrain.py runs it
(teacher, student, regressor, losses, optimizer; only the paired teacher taps); the same under bf16 autocast where
the CPU has native bf16; and lightly's SimCLR step on the same backbone and batch (two views per image). Figures of
merit: the regressor + losses overhead over teacher + student (target: under 15%) and DreamTeacher's source
images/s against SimCLR's (target: at least 0.75x).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402

from benchmarks.common import interleaved_medians, probe_note  # noqa: E402
from dreamteacher_models.recipes import DEFAULT_RECIPE, apply_overrides, get_recipe  # noqa: E402
from training.distill.distiller import build_distiller, distillation_loss  # noqa: E402
from training.run.backbones import build_backbone  # noqa: E402
from training.run.hardware import describe_machine, native_bf16_cpu  # noqa: E402
from training.teacher.build import build_teacher  # noqa: E402

BENCH_UNET = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64, 128, 128),
                  layers_per_block=1, down_block_types=("DownBlock2D",) * 4, up_block_types=("UpBlock2D",) * 4)


def random_teacher_folder() -> str:
    from diffusers import DDPMScheduler, UNet2DModel

    folder = Path(tempfile.mkdtemp(prefix="bench-teacher-"))
    UNet2DModel(**BENCH_UNET).save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    return str(folder)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=DEFAULT_RECIPE)
    p.add_argument("--teacher", help="teacher folder (default: a random attention-free UNet, 32,64,128,128)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-simclr", action="store_true", help="skip the lightly SimCLR reference step")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a recipe field (as training/pretrain.py --set), e.g. --set 'pairs=((4,4),(8,8))'")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    recipe = apply_overrides(get_recipe(args.recipe),
                             [f"teacher.source={args.teacher or random_teacher_folder()!r}", *args.overrides])
    teacher = build_teacher(recipe.teacher, recipe.data.mean, recipe.data.std)
    distiller, _ = build_distiller(recipe, dict(zip(teacher.strides, teacher.channels, strict=True)))
    teacher.keep_strides({p.teacher_stride for p in distiller.pairs})  # as the trainer: unpaired taps not computed
    images = torch.randn(args.batch, *recipe.data.input_size)

    bare = build_backbone(recipe.arch)
    bare_opt = create_optimizer_v2(bare, opt=recipe.optim.optimizer, lr=1e-4)
    opt = create_optimizer_v2(distiller, opt=recipe.optim.optimizer, lr=1e-4)

    def student_step():
        bare(images).mean().backward()
        bare_opt.step()
        bare_opt.zero_grad()

    def teacher_only():
        teacher(images)

    def teacher_and_student():
        teacher(images)
        student_step()

    def full_step():
        distillation_loss(distiller(images), teacher(images), distiller.pairs, recipe.loss)["loss"].backward()
        opt.step()
        opt.zero_grad()

    variants = {"student fwd+bwd+step": student_step, "teacher features": teacher_only,
                "teacher + student": teacher_and_student, "full distillation step": full_step}
    if not args.no_simclr:  # the peer at the same backbone, batch and threads: two views per source image
        from benchmarks.experiments.ssl_baselines import build_ssl_model, sgd_lr

        simclr = build_ssl_model("simclr", build_backbone(recipe.arch))
        simclr_opt = torch.optim.SGD(simclr.parameters(), lr=sgd_lr(args.batch), momentum=0.9)
        views = (images, images.flip(-1))

        def simclr_step():
            simclr.training_loss(*views, 0, 1).backward()
            simclr_opt.step()
            simclr_opt.zero_grad()

        variants["lightly SimCLR step (2 views, same batch)"] = simclr_step
    drift = None
    if native_bf16_cpu():  # what `accelerate launch --mixed_precision bf16` runs: student and teacher autocast
        teacher_bf16 = build_teacher(recipe.teacher, recipe.data.mean, recipe.data.std, dtype=torch.bfloat16)
        teacher_bf16.keep_strides(teacher.strides)

        def full_step_bf16():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                losses = distillation_loss(distiller(images), teacher_bf16(images), distiller.pairs, recipe.loss)
            losses["loss"].backward()
            opt.step()
            opt.zero_grad()

        variants["full distillation step, bf16 autocast"] = full_step_bf16
        same = [torch.Generator().manual_seed(0) for _ in range(2)]
        exact, low = teacher(images, generator=same[0]), teacher_bf16(images, generator=same[1])
        drift = {s: ((low[s] - exact[s]).norm() / exact[s].norm()).item() for s in exact}
    medians, probes = interleaved_medians(variants, rounds=args.rounds)
    res = recipe.data.input_size[1]
    pairs = ", ".join(f"C@{p.student_stride}<-T@{p.teacher_stride}" for p in distiller.pairs)
    print(f"## distillation throughput: {recipe.name}, {res}x{res}, batch {args.batch}; pairs {pairs}; regressor "
          f"width {recipe.regressor_width}, PPM bins {recipe.ppm_bins}\n")
    print("| variant | ms / batch | images/s | x teacher + student |")
    print("|---|---|---|---|")
    base = medians["teacher + student"]
    for name, seconds in medians.items():
        print(f"| {name} | {seconds * 1e3:.0f} | {args.batch / seconds:.0f} | {seconds / base:.2f} |")
    share = medians["teacher features"] / medians["full distillation step"]
    simclr_s = medians.get("lightly SimCLR step (2 views, same batch)")
    if simclr_s:
        print(f"DreamTeacher / SimCLR source images per second: {simclr_s / medians['full distillation step']:.2f}x "
              "(compute only: both get ready-made batches)")
    overhead = medians["full distillation step"] / base - 1
    print(f"\nregressor + losses overhead over teacher + student: {100 * overhead:.1f}%; "
          f"teacher share of the full step: {100 * share:.0f}%")
    if drift:
        print("bf16 teacher feature drift (relative L2 error vs fp32, same noise): "
              + ", ".join(f"stride {s}: {100 * d:.2f}%" for s, d in drift.items()))
    print(f"{describe_machine()}; {args.rounds} interleaved rounds; {probe_note(probes)}")


if __name__ == "__main__":
    main()
