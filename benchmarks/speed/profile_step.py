"""Where the full-size distillation step spends its time, and what each fast-path switch changes (issue 27).

    python benchmarks/speed/profile_step.py --out profile/          # one GPU: ADM-256 + resnet50, 256 px, batch 64
    python benchmarks/speed/profile_step.py --tiny --out /tmp/prof  # anywhere: the same code at toy size (CPU)

The step is scale_dry_run.py's: the teacher (ADM-256 architecture of `256x256_diffusion_uncond`, random weights,
stopped after its last tap, as the trainer always runs it) encodes a batch of synthetic 256-px images, and the
recipe's student + regressor (resnet50.dreamteacher_in1k) take a forward, the trainer's loss, a backward and a LAMB
step, under bf16 autocast. Each variant switches ONE thing on against the plain path, in the same process on the
same images (training/teacher/fast_path.py), except "fast path": everything the trainer's --fast-path turns on.
Compiling variants come last; a variant out of memory gives a row saying so:

    plain                 fp32 weights under autocast, diffusers' default attention processor, eager, contiguous
    channels_last         teacher, student and images in channels_last
    teacher bf16 weights  the teacher's weights stored in bf16, not only cast per op by autocast
    math attention        the explicit softmax(QK^T)V processor instead of SDPA: what SDPA is worth
    teacher compiled      torch.compile of the teacher's blocks (--compile-backend, default inductor)
    student compiled      torch.compile of the student + regressor (forward and backward)
    fast path             the trainer's --fast-path: bf16 weights, compiled teacher, SDPA, channels_last
    fast path batch N     the same at --large-batch N (only when given)

Per variant: ms per image of the teacher forward and of the full step (median of --steps timed calls after a
warm-up, which also compiles), images/s, MFU (the step's FLOPs, counted once on the plain path with torch's FLOP
counter, since the switches change how and not what is computed, over the time and the chip's dense bf16 peak),
the teacher's feature drift against an fp32 teacher for the same noise (max over taps of the relative L2 error),
peak memory, and from a torch.profiler trace of --profile-steps calls: the fraction of the traced window the GPU
sat idle, the host's time per call (self CPU time of every op, synchronisation excluded), and kernel launches per
call. Then the top kernels by self device time (the top ops by self CPU time on a CPU) of the teacher forward and
of the full step, each marked matmul/conv (compute-bound) or other (mostly memory-bound). Writes
<out>/profile_step.md and, with --traces, a Chrome/Perfetto trace per variant and part.

--tiny swaps in gpu_check.py's 64-px ADM-like teacher and a resnet18 student at batch 4, in fp32, with the "eager"
compile backend (dynamo's capture without code generation), so tests/test_profile_step.py runs it on a CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
from collections import defaultdict  # noqa: E402

import torch  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402

from benchmarks.speed.gpu_check import TINY_TEACHER  # noqa: E402
from benchmarks.speed.scale_dry_run import DENSE_BF16_TFLOPS, flops_of, timed  # noqa: E402
from dreamteacher_models.recipes import get_recipe  # noqa: E402
from training.distill.distiller import build_distiller, distillation_loss  # noqa: E402
from training.run.hardware import describe_machine  # noqa: E402
from training.run.layout import write_text_atomic  # noqa: E402
from training.teacher import adm  # noqa: E402
from training.teacher.fast_path import GPU_FAST_PATH, PLAIN, FastPath  # noqa: E402
from training.teacher.frozen import FrozenTeacher  # noqa: E402

RECIPE = "resnet50.dreamteacher_in1k"
SIZES = {
    "full": {"flags": adm.PRESETS["256x256_diffusion_uncond"], "pixels": 256, "batch": 64, "arch": None,
             "backend": "inductor", "precision": "bf16"},
    "tiny": {"flags": TINY_TEACHER, "pixels": 64, "batch": 4, "arch": "resnet18", "backend": "eager",
             "precision": "fp32"},
}
# name parts of matmul/convolution/attention kernels (cuBLAS, cuDNN, CUTLASS, flash, inductor's templates, ATen ops)
COMPUTE_KERNELS = ("gemm", "conv", "xmma", "cutlass", "cudnn", "nvjet", "flash", "fmha", "triton_tem", "addmm", "bmm")
MEMORY_KERNELS = ("triton_poi", "triton_per", "triton_red")  # inductor's pointwise and reduction kernels


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    fast_path: FastPath = PLAIN
    channels_last: bool = False
    compile_student: bool = False
    batch: int | None = None  # None: --batch


def variants(backend: str, large_batch: int | None) -> list[Variant]:
    """The plain path, each switch alone, and everything the trainer's --fast-path turns on."""
    fast = dataclasses.replace(GPU_FAST_PATH, compile_backend=backend)
    out = [Variant("plain"), Variant("channels_last", channels_last=True),
           Variant("teacher bf16 weights", FastPath(weights_in_dtype=True)),
           Variant("math attention", FastPath(attention="math")),
           Variant("teacher compiled", FastPath(compile_backend=backend)),
           Variant("student compiled", compile_student=True),
           Variant("fast path", fast, channels_last=True)]
    if large_batch:
        out.append(Variant(f"fast path batch {large_batch}", fast, channels_last=True, batch=large_batch))
    return out


class Bench:
    """One process's fixed parts: the recipe, the random teacher UNet every variant copies, images, the reference."""

    def __init__(self, args, size: dict, device: torch.device, backend: str):
        from diffusers import DDPMScheduler, UNet2DModel

        recipe = get_recipe(RECIPE)
        if size["arch"]:
            recipe = dataclasses.replace(recipe, arch=size["arch"], zero_init_last=None)
        self.recipe = dataclasses.replace(
            recipe, data=dataclasses.replace(recipe.data, input_size=(3, size["pixels"], size["pixels"])))
        self.args, self.device, self.backend = args, device, backend
        self.dtype = torch.bfloat16 if args.precision == "bf16" else None
        torch.manual_seed(0)
        with device:  # random init on the device: seconds, not minutes, for 553M parameters
            self.unet = UNet2DModel(**adm.diffusers_config(size["flags"]))
        self.scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        self.processor = type(next(m.processor for m in self.unet.modules() if hasattr(m, "processor"))).__name__
        self.reference = {}  # batch -> fp32 teacher features for the fixed noise

    def teacher(self, variant: Variant, dtype=None) -> FrozenTeacher:
        return FrozenTeacher(copy.deepcopy(self.unet), self.scheduler, self.recipe.teacher.timestep,
                             self.recipe.data.mean, self.recipe.data.std, taps=self.recipe.teacher.taps,
                             device=self.device, dtype=dtype, channels_last=variant.channels_last,
                             fast_path=variant.fast_path, kind="adm", source="random ADM")

    def images(self, batch: int) -> torch.Tensor:
        generator = torch.Generator(self.device).manual_seed(1)
        return torch.randn(batch, *self.recipe.data.input_size, generator=generator, device=self.device)

    def features(self, teacher: FrozenTeacher, images: torch.Tensor) -> dict[int, torch.Tensor]:
        return teacher(images, generator=torch.Generator(self.device).manual_seed(2))

    def drift(self, teacher: FrozenTeacher, images: torch.Tensor) -> float:
        """Max over taps of the relative L2 error of `teacher`'s features against the fp32 teacher's."""
        batch = images.shape[0]
        if batch not in self.reference:
            self.reference[batch] = self.features(self.teacher(Variant("fp32 reference")), images)
        ref, got = self.reference[batch], self.features(teacher, images)
        return max(float((got[s] - ref[s]).norm() / ref[s].norm()) for s in got)


def profile(fn, steps: int, device: torch.device, trace: Path | None) -> dict:
    """torch.profiler over `steps` calls of `fn` (already warm): idle fraction, host time, launches, top kernels."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if trace:
        prof.export_chrome_trace(str(trace))
    events = [e for e in prof.events() if not e.is_async]
    kernels = [e for e in events if e.device_type != DeviceType.CPU]
    cpu_ops = [e for e in events if e.device_type == DeviceType.CPU and "Synchronize" not in e.name]
    top: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in kernels or cpu_ops:  # on a CPU the ops are the kernels
        top[e.name][0] += e.time_range.elapsed_us() if kernels else e.self_cpu_time_total
        top[e.name][1] += 1
    idle = None
    if kernels:
        window = (min(e.time_range.start for e in events), max(e.time_range.end for e in events))
        idle = 1 - busy_us(kernels) / max(window[1] - window[0], 1)
    return {"idle": idle, "host_ms": sum(e.self_cpu_time_total for e in cpu_ops) / steps / 1e3,
            "launches": len(kernels) / steps, "top": top, "steps": steps, "on_device": bool(kernels)}


def busy_us(kernels) -> float:
    """Microseconds in which at least one kernel ran (overlapping kernels counted once)."""
    busy, end = 0.0, float("-inf")
    for start, stop in sorted((e.time_range.start, e.time_range.end) for e in kernels):
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy


def kernel_kind(name: str) -> str:
    """"matmul/conv" (compute-bound) or "other" (mostly memory-bound), from a kernel's or op's name."""
    lowered = name.lower()
    if lowered.startswith(MEMORY_KERNELS):  # their names list the ops they fuse: "triton_poi_fused_convolution_0"
        return "other"
    return "matmul/conv" if any(part in lowered for part in COMPUTE_KERNELS) else "other"


def top_table(title: str, prof: dict, rows: int) -> str:
    unit = "self device time" if prof["on_device"] else "self CPU time"
    total = sum(t for t, _ in prof["top"].values()) or 1.0
    lines = [f"#### {title}: top {rows} by {unit}", "",
             f"| kernel | {unit} per call (ms) | share | count per call | kind |", "|---|---|---|---|---|"]
    ranked = sorted(prof["top"].items(), key=lambda kv: -kv[1][0])[:rows]
    for name, (us, count) in ranked:
        short = name if len(name) <= 90 else name[:87] + "..."
        lines.append(f"| `{short}` | {us / prof['steps'] / 1e3:.2f} | {100 * us / total:.0f}% | "
                     f"{count / prof['steps']:.0f} | {kernel_kind(name)} |")
    return "\n".join(lines) + "\n"


def measure(bench: Bench, variant: Variant, flops: dict, peak: float | None, out: Path) -> tuple[str, list[str]]:
    """(the summary row, the two top-kernel tables) of `variant`."""
    args, device, recipe = bench.args, bench.device, bench.recipe
    batch = variant.batch or args.batch
    fmt = torch.channels_last if variant.channels_last else torch.contiguous_format
    autocast = (lambda: torch.autocast(device.type, dtype=bench.dtype)) if bench.dtype else contextlib.nullcontext
    teacher = bench.teacher(variant, bench.dtype)
    torch.manual_seed(0)
    model, _ = build_distiller(recipe, dict(zip(teacher.strides, teacher.channels, strict=True)))
    teacher.keep_strides({pair.teacher_stride for pair in model.pairs})
    model = model.to(device, memory_format=fmt)
    opt = create_optimizer_v2(model, opt=recipe.optim.optimizer, lr=1e-4, weight_decay=0.05)
    run_model = torch.compile(model, backend=bench.backend) if variant.compile_student else model
    images = bench.images(batch).contiguous(memory_format=fmt)

    def teacher_fwd():
        teacher(images)

    def full_step():
        maps = teacher(images)
        with autocast():
            losses = distillation_loss(run_model(images), maps, model.pairs, recipe.loss)
        losses["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if not flops:  # the plain path comes first: its FLOPs are every variant's
        flops.update(teacher=flops_of(teacher_fwd) / args.batch, step=flops_of(full_step) / args.batch)
    t_teacher = timed(teacher_fwd, args.steps, device) / batch
    t_step = timed(full_step, args.steps, device) / batch
    memory = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}" if device.type == "cuda" else "-"
    drift = bench.drift(teacher, images)
    slug = variant.name.replace(" ", "_")
    traces = {part: out / f"{slug}_{part}.json" if args.traces else None for part in ("teacher", "step")}
    prof_teacher = profile(teacher_fwd, args.profile_steps, device, traces["teacher"])
    prof_step = profile(full_step, args.profile_steps, device, traces["step"])

    def mfu(flop: float, seconds: float) -> str:
        return f"{100 * flop / seconds / 1e12 / peak:.1f}%" if peak else "-"

    def idle(prof: dict) -> str:
        return "-" if prof["idle"] is None else f"{100 * prof['idle']:.0f}%"

    row = (f"| {variant.name} | {batch} | {1e3 * t_teacher:.2f} | {1e3 * t_step:.2f} | {1 / t_step:.1f} | "
           f"{mfu(flops['teacher'], t_teacher)} | {mfu(flops['step'], t_step)} | {drift:.4f} | "
           f"{idle(prof_teacher)} / {idle(prof_step)} | {prof_teacher['host_ms']:.1f} / {prof_step['host_ms']:.1f} | "
           f"{prof_teacher['launches']:.0f} / {prof_step['launches']:.0f} | {memory} |")
    tables = [top_table(f"{variant.name}, teacher forward", prof_teacher, args.top),
              top_table(f"{variant.name}, full step", prof_step, args.top)]
    return row, tables


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for profile_step.md (and the traces)")
    p.add_argument("--tiny", action="store_true", help="toy size: 64-px ADM-like teacher, resnet18, batch 4, CPU-fast")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, help="micro-batch (default 64; --tiny 4)")
    p.add_argument("--large-batch", type=int, help="also run the fast path at this batch (memory allowing)")
    p.add_argument("--precision", choices=["bf16", "fp32"],
                   help="autocast dtype (default bf16; --tiny fp32: bf16 convolutions crawl on many CPUs)")
    p.add_argument("--compile-backend", help="torch.compile backend (default inductor; --tiny eager)")
    p.add_argument("--variants", help="comma-separated variant names to run (default: all; plain always runs first)")
    p.add_argument("--steps", type=int, default=5, help="timed calls per part and variant (after one warm-up)")
    p.add_argument("--profile-steps", type=int, default=3, help="calls per profiler trace")
    p.add_argument("--top", type=int, default=12, help="rows of each top-kernel table")
    p.add_argument("--traces", action="store_true", help="also write a Chrome/Perfetto trace per variant and part")
    p.add_argument("--peak-tflops", type=float, help="the chip's dense bf16 peak (default: by GPU name)")
    args = p.parse_args(argv)
    size = SIZES["tiny" if args.tiny else "full"]
    args.batch = args.batch or size["batch"]
    args.precision = args.precision or size["precision"]
    if args.batch < 2:
        p.error("--batch must be >= 2 (the PPM's 1x1 bin has a BatchNorm)")
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = args.peak_tflops or next((v for k, v in DENSE_BF16_TFLOPS.items() if gpu and k in gpu), None)

    backend = args.compile_backend or size["backend"]
    chosen = variants(backend, args.large_batch)
    if args.variants:
        wanted = {"plain", *args.variants.split(",")}
        unknown = wanted - {v.name for v in chosen}
        if unknown:
            p.error(f"unknown variants {sorted(unknown)}; choose from {[v.name for v in chosen]}")
        chosen = [v for v in chosen if v.name in wanted]

    bench = Bench(args, size, device, backend)
    flops: dict[str, float] = {}
    rows, tables = [], []
    for variant in chosen:
        try:
            row, variant_tables = measure(bench, variant, flops, peak, out)
        except torch.OutOfMemoryError:
            row, variant_tables = f"| {variant.name} | {variant.batch or args.batch} | out of memory |", []
        rows.append(row)
        tables += variant_tables
        print(row, flush=True)
        # written after every variant: a run cut short by a time limit leaves what it measured
        text = report(args, bench, rows, tables, flops, peak, gpu)
        write_text_atomic(out / "profile_step.md", text)
        torch._dynamo.reset()  # each variant compiles its own modules; drop the last one's
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("\n" + text)
    return text


def report(args, bench: Bench, rows: list[str], tables: list[str], flops: dict, peak: float | None,
           gpu: str | None) -> str:
    pixels = bench.recipe.data.input_size[-1]
    return "\n".join([
        f"## profile_step: {bench.recipe.name}, ADM teacher "
        f"({'tiny' if args.tiny else '256x256_diffusion_uncond'} architecture, random weights), {pixels} px, "
        f"{args.precision}, compile backend {bench.backend}",
        "",
        "| variant | batch | teacher fwd ms/image | full step ms/image | images/s | teacher MFU | step MFU | "
        "feature drift vs fp32 | GPU idle (teacher / step) | host ms per call (teacher / step) | "
        "launches per call (teacher / step) | peak memory (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"FLOPs per image (plain path, torch's counter): teacher {flops.get('teacher', 0) / 1e9:.1f} G, full step "
        f"{flops.get('step', 0) / 1e9:.1f} G; MFU against {peak or '-'} TFLOP/s (dense bf16 peak). Plain path's "
        f"attention processor: {bench.processor}. Device: {gpu or 'CPU'}; {describe_machine()}.",
        "",
        *tables,
    ])


if __name__ == "__main__":
    main()
