"""DreamTeacher feature distillation: a frozen diffusion teacher's multi-scale features regressed by a timm student.

    accelerate launch training/pretrain.py                                   # the default: Fashion-MNIST, in minutes
    accelerate launch training/pretrain.py --recipe resnet50.dreamteacher_in1k --data-dir /data/imagenet/train \\
        --teacher teachers/adm-256-uncond --output-dir runs/r50
    accelerate launch training/pretrain.py --resume latest --output-dir runs/r50  # continue a killed run exactly

Everything not given on the command line comes from the recipe (dreamteacher_models/recipes.py); any recipe field
can be overridden with `--set field=value` (e.g. `--set teacher.timestep=250 --set loss.at_weight=5`). The resolved
recipe is written to <output-dir>/recipe.json. Checkpoints are `accelerator.save_state` folders written to a
temporary name and renamed to checkpoints/step_N when complete, so a kill at any moment leaves the last one usable.
At the end the student is exported with hub/export.py into <output-dir>/export, loadable with
`timm.create_model("local-dir:<output-dir>/export", pretrained=True)`.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch training/pretrain.py` puts training/, not the repo, on sys.path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import dataclasses
import json
import logging
import time

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, send_to_device, set_seed
from timm.optim import create_optimizer_v2
from tqdm.auto import tqdm

from dreamteacher_models.recipes import (
    DEFAULT_RECIPE,
    Recipe,
    apply_overrides,
    get_recipe,
    list_recipes,
    recipe_fields,
    recipe_from_dict,
)
from hub.export import export_for_hub
from training.distill.distiller import build_distiller, distillation_loss
from training.distill.feature_cache import FeatureCache, cache_key, open_or_build_feature_cache, teacher_fingerprint
from training.distill.pairing import describe_pairs
from training.distill.regressor import student_levels
from training.labels.task_head import build_task_head, label_distillation_loss, load_interpreter, save_task_head
from training.run.cli import check_ranges
from training.run.data import (
    SHUFFLE_BUFFER,
    ImageDataset,
    StreamingImageDataset,
    build_dataloader,
    build_transform,
    data_source,
    load_image_dataset,
    split_streaming,
)
from training.run.guards import every_rank_has_images, stop_if_not_finite
from training.run.hardware import cpu_threads_per_process
from training.run.layout import (
    CHECKPOINTS_DIR,
    RESOLVED_RECIPE_FILENAME,
    append_metrics,
    find_resume_checkpoint,
    refuse_fresh_run_over_checkpoints,
    resume_checkpoint,
    save_checkpoint,
    start_run_folder,
    write_text_atomic,
)
from training.run.schedule import TrainState, cosine_with_warmup, noise_seed, plan_batches, set_peak_lr
from training.run.shared_disk import check_shared_folder
from training.teacher.build import build_teacher
from training.teacher.domain import check_teacher_domain
from training.teacher.fast_path import GPU_FAST_PATH, PLAIN
from training.teacher.sources import teacher_source
from training.teacher.taps import describe_taps

logger = logging.getLogger("dreamteacher.pretrain")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"checkpoint recipe to train (default: {DEFAULT_RECIPE})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a recipe field, repeatable; fields: " + ", ".join(recipe_fields()))
    p.add_argument("--output-dir", help="run folder (default: runs/<recipe>)")
    data = p.add_argument_group("data")
    data.add_argument("--data-dir", help="a folder of images (imagefolder) or of Fashion-MNIST IDX files")
    data.add_argument("--dataset", help="a Hub dataset id (default: the recipe's, when no local copy is found)")
    data.add_argument("--streaming", action="store_true", help="stream the Hub dataset instead of downloading it")
    data.add_argument("--shuffle-buffer", type=int, default=SHUFFLE_BUFFER,
                      help=f"--streaming: examples held per DataLoader worker for shuffling (default "
                           f"{SHUFFLE_BUFFER:,}; ImageNet JPEGs: about 1.1 GB a worker, lower it when memory is short)")
    data.add_argument("--limit-images", type=int, help="train on the first N images only (quick runs, tests)")
    data.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per process")
    data.add_argument("--threads", type=int,
                      help="torch threads per process on CPU (default: every core of the machine shared among the "
                           "local processes; `accelerate launch` would otherwise leave one thread on a CPU machine)")
    teacher = p.add_argument_group("teacher")
    teacher.add_argument("--teacher", help="teacher folder / Hub id / ADM .pt / adm:PRESET, e.g. "
                         "adm:256x256_diffusion_uncond (default: the recipe's teacher.source)")
    teacher.add_argument("--teacher-dtype", choices=["fp32", "bf16", "fp16"],
                         help="teacher autocast dtype (default: bf16/fp16 when --mixed_precision says so, else fp32)")
    teacher.add_argument("--channels-last", action="store_true", help="channels_last memory format (GPU speed-up)")
    teacher.add_argument("--fast-path", action=argparse.BooleanOptionalAction,
                         help="the GPU fast path: the teacher's weights in its bf16/fp16 dtype, its blocks compiled "
                              "with torch.compile, SDPA attention (training/teacher/fast_path.py), and channels_last "
                              "(default: on for the paper's ImageNet recipes on a GPU, off otherwise)")
    teacher.add_argument("--interpreter", metavar="DIR",
                         help="mix-distillation: the interpreter folder from training/train_interpreter.py (sets "
                              "recipe.label_distill.interpreter); the student gets a task head learning its soft "
                              "labels (training/labels/task_head.py)")
    teacher.add_argument("--feature-cache", metavar="DIR",
                         help="opt-in: read the teacher's features from a cache of K encodings per image at DIR, "
                              "built there first when missing (training/distill/feature_cache.py: a deviation from the "
                              "paper's online encoding, for multi-epoch runs on small datasets)")
    teacher.add_argument("--cache-encodings", type=int, default=2,
                         help="K, the stochastic encodings cached per image (default 2)")
    run = p.add_argument_group("schedule (defaults from the recipe)")
    run.add_argument("--epochs", type=float, help="training length in epochs")
    run.add_argument("--max-steps", type=int, help="training length in optimizer steps (overrides --epochs)")
    run.add_argument("--batch-size", type=int, help="global batch size (the recipe's optim.batch_size)")
    run.add_argument("--per-device-batch-size", type=int,
                     help="micro-batch per process; gradients accumulate to reach the global batch (default: "
                          "global batch / processes, capped at 128)")
    run.add_argument("--lr", type=float, help="peak learning rate (the recipe's optim.lr)")
    run.add_argument("--max-grad-norm", type=float,
                     help="clip the gradient norm to this (the recipe's optim.grad_clip; 0: no clipping)")
    run.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"],
                     help="override the mixed precision `accelerate launch` / `accelerate config` set "
                          "(default: theirs)")
    run.add_argument("--seed", type=int, default=0)
    ckpt = p.add_argument_group("checkpoints and logging")
    ckpt.add_argument("--checkpoint-every", type=int, default=500, help="save a checkpoint every N steps (0: end only)")
    ckpt.add_argument("--keep-checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
    ckpt.add_argument("--resume", help="'latest' (newest checkpoint in --output-dir, or a fresh start) or a path")
    ckpt.add_argument("--allow-resume-mismatch", action="store_true",
                      help="resume even when the data, batch, process layout or seed differ from the checkpoint's")
    ckpt.add_argument("--log-every", type=int, default=10, help="log scalars to TensorBoard every N steps")
    ckpt.add_argument("--feature-images", type=int, default=4,
                      help="with each checkpoint save a PNG of teacher vs student features for N fixed images (0: off)")
    ckpt.add_argument("--no-export", action="store_true", help="skip exporting the student at the end")
    ckpt.add_argument("--export-task-head", action="store_true",
                      help="with --interpreter: also write the student's task head to <output-dir>/task_head")
    args = p.parse_args(argv)
    check_ranges(p, args, at_least_1=("max_steps", "batch_size", "per_device_batch_size", "log_every",
                                      "keep_checkpoints", "cache_encodings", "threads", "shuffle_buffer"),
                 at_least_0=("checkpoint_every", "feature_images", "num_workers", "limit_images", "max_grad_norm",
                             "epochs"),  # --epochs 0: a recipe of steps only (with --max-steps)
                 positive=("lr",))  # the schedule's floor is min_lr / lr
    return args


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The recipe plus command-line overrides: what this run trains and what recipe.json records."""
    recipe = get_recipe(args.recipe)
    overrides = list(args.overrides)
    for flag, field in (("teacher", "teacher.source"), ("batch_size", "optim.batch_size"), ("lr", "optim.lr"),
                        ("max_grad_norm", "optim.grad_clip"), ("epochs", "optim.epochs"),
                        ("interpreter", "label_distill.interpreter")):
        if getattr(args, flag) is not None:
            overrides.append(f"{field}={getattr(args, flag)!r}")
    return apply_overrides(recipe, overrides)


def build_data(args, recipe: Recipe, accelerator: Accelerator):
    """(dataset, images per epoch or None) with the recipe's training transform; bad images are skipped, counted.
    With a feature cache, items carry their index and are not flipped (the trainer flips batch and targets)."""
    cached = bool(args.feature_cache)
    if cached and args.streaming:
        raise ValueError("--feature-cache needs indexed data; it cannot be used with --streaming")
    transform = build_transform(recipe.data, train=True, hflip=False if cached else None)
    source = data_source(args.data_dir, args.dataset)
    hf = load_image_dataset(source, split="train", recipe_data=recipe.data, streaming=args.streaming)
    if args.streaming:
        hf = split_streaming(hf, seed=args.seed, buffer_size=args.shuffle_buffer, rank=accelerator.process_index,
                             world_size=accelerator.num_processes)
        if args.limit_images:
            hf = hf.take(args.limit_images)
        augment_seed = noise_seed(args.seed, accelerator.process_index)  # each rank flips its own images
        return StreamingImageDataset(hf, transform, seed=augment_seed), args.limit_images or recipe.data.num_images
    if args.limit_images:
        hf = hf.select(range(min(args.limit_images, len(hf))))
    return ImageDataset(hf, transform, return_index=cached), len(hf)


def prepare_for_training(accelerator: Accelerator, model, optimizer, loader, streaming: bool):
    """`accelerator.prepare` the model, optimizer and loader; a streaming loader is left as it is: its stream is
    already split across ranks by `split_streaming` (each rank reads its own shards), and Accelerate would shard
    it a second time (IterableDatasetShard: each rank keeping 1/N of its 1/N). The trainer moves its batches."""
    if streaming:
        model, optimizer = accelerator.prepare(model, optimizer)
        return model, optimizer, loader
    return accelerator.prepare(model, optimizer, loader)


def open_feature_cache(args, recipe: Recipe, teacher, dataset, accelerator: Accelerator) -> FeatureCache:
    """The run's teacher-feature cache, built by the main process when missing while the others wait."""
    key = cache_key(teacher, dataset, data_source=str(args.data_dir or args.dataset or recipe.data.name),
                    encodings=args.cache_encodings, flips=recipe.data.hflip, seed=args.seed)
    check_shared_folder(accelerator, Path(args.feature_cache), "the feature cache (--feature-cache)")
    cache = None
    if accelerator.is_main_process:
        cache = open_or_build_feature_cache(args.feature_cache, teacher, dataset, key, build=True,
                                            progress=accelerator.is_local_main_process)
    accelerator.wait_for_everyone()
    return cache or FeatureCache(args.feature_cache, key)


def teacher_targets(teacher, cache: FeatureCache | None, batch: dict, images: torch.Tensor, hflip: bool,
                    noise: torch.Generator) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """(the images the student sees, the teacher's maps for them): a fresh stochastic encoding online, or with a
    cache one of each image's K cached encodings, of its mirror image where the trainer flips it."""
    if cache is None:
        return images, teacher(images, generator=noise)
    b = images.shape[0]
    flips = torch.rand(b, generator=noise, device=noise.device) < 0.5 if hflip else \
        torch.zeros(b, dtype=torch.bool, device=noise.device)
    flips = flips.to(images.device)
    images = torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)
    encodings = torch.randint(cache.encodings, (b,), generator=noise, device=noise.device)
    return images, cache.lookup(batch["indices"], encodings, flips, images.device)



def epoch_batches(accelerator, loader, epoch: int, skip: int, streaming: bool):
    """This rank's micro-batches of `epoch` on its device, after the first `skip` (already trained on before a
    resume): the same batches in the same order as an uninterrupted run, streamed or not."""
    (loader if hasattr(loader, "set_epoch") else loader.dataset).set_epoch(epoch)
    for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
        yield send_to_device(batch, accelerator.device) if streaming else batch  # a stream is not prepared



def build_accelerator(args, recipe: Recipe, output_dir: Path) -> tuple[Accelerator, int, int]:
    """(the Accelerator, per-device micro-batch, accumulation steps), seeded, with every CPU core in use."""
    # the process count must be known before gradient accumulation is fixed (PartialState() alone misreads
    # ACCELERATE_USE_CPU multi-process launches as one process; tests/test_pretrain.py checks 2-process runs)
    micro_batch, accumulation = plan_batches(recipe.optim.batch_size, args.per_device_batch_size,
                                             Accelerator(mixed_precision=args.mixed_precision).num_processes)
    accelerator = Accelerator(
        gradient_accumulation_steps=accumulation,
        mixed_precision=args.mixed_precision,  # None: what `accelerate launch` / `accelerate config` set
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    set_seed(args.seed, device_specific=True)
    if accelerator.device.type == "cpu":
        torch.set_num_threads(args.threads or cpu_threads_per_process())
    return accelerator, micro_batch, accumulation


def resolve_fast_path(args, recipe: Recipe, device: torch.device) -> None:
    """Settle args.fast_path (unset: on for the paper's ImageNet recipes on a GPU); on, it brings channels_last.
    Settled before args.json is written, so the run folder records what ran."""
    if args.fast_path is None:
        args.fast_path = device.type == "cuda" and recipe.name in list_recipes("*.dreamteacher_in1k")
    args.channels_last = args.channels_last or args.fast_path


def build_models(args, recipe: Recipe, accelerator: Accelerator):
    """(teacher, distiller, recipe with its stride pairs, interpreter, interpreter info): the frozen teacher (never
    prepared) and the trainable student + regressor, levels paired by stride; with label distillation, the frozen
    interpreter and a task head on the student."""
    teacher_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        args.teacher_dtype or accelerator.mixed_precision)
    fast_path = PLAIN
    if args.fast_path:  # an fp32 teacher keeps fp32 weights: the fast path changes how it runs, not its precision
        fast_path = dataclasses.replace(GPU_FAST_PATH, weights_in_dtype=teacher_dtype is not None)
    teacher = build_teacher(recipe.teacher, recipe.data.mean, recipe.data.std, source=teacher_source(recipe),
                            device=accelerator.device, dtype=teacher_dtype, channels_last=args.channels_last,
                            fast_path=fast_path)
    model, pairing_notes = build_distiller(recipe, dict(zip(teacher.strides, teacher.channels, strict=True)))
    pairs = model.pairs
    recipe = dataclasses.replace(recipe, pairs=tuple((p.student_stride, p.teacher_stride) for p in pairs))
    teacher.keep_strides({p.teacher_stride for p in pairs})  # an unpaired level is never computed
    interpreter = interpreter_info = None
    if recipe.label_distill.interpreter:  # mix-distillation: a frozen interpreter, a task head on the student
        interpreter, interpreter_info = load_interpreter(recipe.label_distill.interpreter, teacher)
        c5_channels = max(student_levels(model.student, recipe.arch).items())[1][1]
        model.task_head = build_task_head(interpreter_info, c5_channels, [p.teacher_channels for p in pairs])
    teacher.check_image_size(recipe.data.input_size[1:])
    if accelerator.is_main_process:
        logger.info("teacher taps:\n%s", describe_taps(teacher, recipe.data.input_size[1:]))
        logger.info("student levels <- teacher taps, by stride:\n%s\n%s",
                    describe_pairs(pairs, recipe.data.input_size[-1]), "\n".join(pairing_notes))
        logger.info("%d torch threads per process on %s", torch.get_num_threads(), accelerator.device)
        logger.info("fast path %s: teacher %s%s", "on" if args.fast_path else "off", teacher.fast_path.describe(),
                    ", channels_last" if args.channels_last else "")
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return teacher, model, recipe, interpreter, interpreter_info


def open_run_folder(args, recipe: Recipe, output_dir: Path, accelerator: Accelerator) -> tuple[Path | None, Recipe]:
    """(the checkpoint to resume from or None for a fresh run, the recipe this run trains); refuses a fresh run over
    old checkpoints and a resume with another recipe, then writes recipe.json and args.json."""
    resume_from = find_resume_checkpoint(args.resume, output_dir)
    if resume_from is None:
        refuse_fresh_run_over_checkpoints(output_dir)
    saved = output_dir / RESOLVED_RECIPE_FILENAME
    if resume_from is not None:
        recipe = check_resume_recipe(resume_from, output_dir, recipe, lr_given=args.lr is not None)
    accelerator.wait_for_everyone()  # every rank has read recipe.json before the main process rewrites it
    start_run_folder(accelerator, output_dir, resume_from is None, logger)
    if accelerator.is_main_process:
        write_text_atomic(saved, json.dumps(recipe.to_dict(), indent=2) + "\n")
        write_text_atomic(output_dir / "args.json", json.dumps(vars(args), indent=2) + "\n")
    return resume_from, recipe


def check_resume_recipe(checkpoint: Path, output_dir: Path, recipe: Recipe, lr_given: bool) -> Recipe:
    """The recipe a resume trains: refused, naming the fields, when it differs from the one the checkpoint's run
    was trained with (the recipe.json beside its checkpoints/, also when resuming into another --output-dir). The
    peak lr is the documented exception: given with --lr on resume it is the new one (lowering it after a
    non-finite loss), else the run's own is kept."""
    run_of_checkpoint = checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS_DIR else output_dir
    saved = run_of_checkpoint / RESOLVED_RECIPE_FILENAME
    if not saved.is_file():
        return recipe
    then = recipe_from_dict(json.loads(saved.read_text()))
    if lr_given:
        then = dataclasses.replace(then, optim=dataclasses.replace(then.optim, lr=recipe.optim.lr))
    else:
        recipe = dataclasses.replace(recipe, optim=dataclasses.replace(recipe.optim, lr=then.optim.lr))
    if then == recipe:
        return recipe
    old, new = _flat(then.to_dict()), _flat(recipe.to_dict())
    diffs = [f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in sorted(set(old) | set(new))
             if old.get(k) != new.get(k)]
    raise ValueError(f"--resume {checkpoint}: its run's recipe ({saved}) differs from this run's "
                     f"({'; '.join(diffs)}); resume with the same recipe and overrides (only --lr may change)")


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def training_length(args, recipe: Recipe, num_images: int | None) -> tuple[int, int]:
    """(optimizer steps, warm-up steps): --max-steps, else the recipe's epochs over the data."""
    steps_per_epoch = num_images // recipe.optim.batch_size if num_images else None
    if args.max_steps:
        total_steps = args.max_steps
    elif steps_per_epoch:
        total_steps = max(1, round(recipe.optim.epochs * steps_per_epoch))
    else:
        raise ValueError("the dataset size is unknown (streaming): pass --max-steps or --limit-images")
    warmup_steps = round(total_steps * recipe.optim.warmup_epochs / recipe.optim.epochs) if recipe.optim.epochs else 0
    return total_steps, warmup_steps



def micro_batch_losses(model, images: torch.Tensor, teacher_maps: dict, pairs, recipe: Recipe, interpreter
                       ) -> dict[str, torch.Tensor]:
    """The recipe's loss terms for one micro-batch: L_feat, plus the label-distillation term when an interpreter
    is given (mix-distillation: the student's task head learns the interpreter's soft labels)."""
    if interpreter is None:
        return distillation_loss(model(images), teacher_maps, pairs, recipe.loss)
    predictions, logits = model(images, with_logits=True)
    losses = distillation_loss(predictions, teacher_maps, pairs, recipe.loss)
    with torch.no_grad():
        soft_labels = interpreter(teacher_maps)
    losses["ld"] = label_distillation_loss(logits, soft_labels, recipe.label_distill.temperature)
    losses["loss"] = losses["loss"] + recipe.label_distill.weight * losses["ld"]
    return losses


class StepMeter:
    """What the loop logs: the step's losses summed over its micro-batches (averaged over them and every rank when
    the step ends), and since the last log the images seen and the time spent in the teacher and the student."""

    def __init__(self) -> None:
        self.losses: dict[str, torch.Tensor] = {}
        self.micro_batches = 0
        self.reset_window()

    def reset_window(self) -> None:
        self.images, self.teacher_s, self.student_s, self.start = 0, 0.0, 0.0, time.perf_counter()

    def add(self, losses: dict[str, torch.Tensor], images: int, teacher_s: float, student_s: float) -> None:
        self.teacher_s += teacher_s
        self.student_s += student_s
        self.images += images
        self.micro_batches += 1
        for key, value in losses.items():  # per-level terms ("mse/level0") are not logged
            if "/" not in key:
                self.losses[key] = self.losses.get(key, 0.0) + value.detach()

    def end_step(self, accelerator: Accelerator) -> dict[str, float]:
        """The mean of each loss over every micro-batch of the step on every rank: the same for any layout."""
        gathered = {k: accelerator.gather(v / self.micro_batches).mean().item() for k, v in self.losses.items()}
        self.losses, self.micro_batches = {}, 0
        return gathered

    def images_per_s(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)

    def scalars(self, losses: dict[str, float], lr: float, images_per_s: float, skipped: int) -> dict[str, float]:
        return {**{f"loss/{k}": v for k, v in losses.items()}, "lr": lr, "images_per_s": images_per_s,
                "time/teacher_s": self.teacher_s, "time/student_s": self.student_s, "data/skipped_images": skipped}


def export_results(args, accelerator: Accelerator, model, recipe: Recipe, output_dir: Path,
                   interpreter_info: dict | None) -> None:
    """The student in timm's format in <output-dir>/export and, when asked, the task head (main process only)."""
    if not accelerator.is_main_process:
        return
    if not args.no_export:
        student = accelerator.unwrap_model(model).student
        export = export_for_hub(student.state_dict(), output_dir / "export", recipe=recipe)
        logger.info("exported the student to %s: timm.create_model('local-dir:%s', pretrained=True)", export, export)
    if args.export_task_head and interpreter_info is not None:
        head = save_task_head(accelerator.unwrap_model(model).task_head, interpreter_info, output_dir / "task_head")
        logger.info("task head written to %s", head)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    recipe = recipe_from_args(args)
    output_dir = Path(args.output_dir or f"runs/{recipe.name}")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    check_teacher_domain(recipe, args.data_dir)

    accelerator, micro_batch, accumulation = build_accelerator(args, recipe, output_dir)
    resolve_fast_path(args, recipe, accelerator.device)
    teacher, model, recipe, interpreter, interpreter_info = build_models(args, recipe, accelerator)
    pairs = model.pairs
    optimizer = create_optimizer_v2(model, opt=recipe.optim.optimizer, lr=recipe.optim.lr,
                                    weight_decay=recipe.optim.weight_decay, betas=recipe.optim.betas)
    resume_from, recipe = open_run_folder(args, recipe, output_dir, accelerator)

    # -- data and schedule length
    dataset, num_images = build_data(args, recipe, accelerator)
    if num_images is not None and num_images < micro_batch * accelerator.num_processes:
        raise ValueError(f"{num_images} training images are fewer than one micro-batch of {micro_batch} x "
                         f"{accelerator.num_processes} processes; add images, or lower --batch-size / "
                         f"--per-device-batch-size")
    cache = open_feature_cache(args, recipe, teacher, dataset, accelerator) if args.feature_cache else None
    if cache is not None and accelerator.is_main_process:
        logger.info("teacher features from the cache %s (%d encodings x %d orientations per image)", cache.folder,
                    cache.encodings, cache.orientations)
    loader = build_dataloader(dataset, micro_batch, shuffle=True, seed=args.seed, num_workers=args.num_workers)
    facts = {"data": str(args.data_dir or args.dataset or recipe.data.name), "images": num_images,
             "limit_images": args.limit_images, "global_batch": recipe.optim.batch_size, "micro_batch": micro_batch,
             "processes": accelerator.num_processes, "accumulation": accumulation, "seed": args.seed,
             "teacher_sha256": teacher_fingerprint(teacher)}
    total_steps, warmup_steps = training_length(args, recipe, num_images)
    facts["steps"] = total_steps  # the schedule's length: another one would bend the cosine mid-run
    min_lr_ratio = recipe.optim.min_lr / recipe.optim.lr
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, total_steps, warmup_steps, min_lr_ratio))

    # The scheduler is stepped by hand once per optimizer step (Accelerate would step a prepared one per process).
    model, optimizer, loader = prepare_for_training(accelerator, model, optimizer, loader, args.streaming)
    state = TrainState()
    accelerator.register_for_checkpointing(lr_scheduler, state)
    if resume_from is not None:
        resume_checkpoint(accelerator, resume_from, facts, args.allow_resume_mismatch, output_dir, state, logger)
        if args.lr is not None:
            set_peak_lr(lr_scheduler, args.lr)
            logger.info("--lr %g: the resumed schedule peaks at it from step %d on", args.lr, state.step)
    accelerator.init_trackers("pretrain", config={"recipe": recipe.name, "total_steps": total_steps,
                                                  "micro_batch": micro_batch, "accumulation": accumulation,
                                                  "processes": accelerator.num_processes})
    if accelerator.is_main_process:
        logger.info("%s: %d steps of %d images (%d x %d processes x %d accumulation), %s images/epoch, warm-up %d",
                    recipe.name, total_steps, recipe.optim.batch_size, micro_batch, accelerator.num_processes,
                    accumulation, num_images, warmup_steps)

    # -- the loop: one optimizer step per `accumulation` micro-batches
    fixed_images = None
    progress = tqdm(total=total_steps, initial=state.step, desc="distill",
                    disable=not accelerator.is_local_main_process)
    meter = StepMeter()
    noise = torch.Generator(device=accelerator.device)
    while state.step < total_steps:
        full_epoch, usable = state.batch_in_epoch == 0, 0
        for batch in epoch_batches(accelerator, loader, state.epoch, state.batch_in_epoch, args.streaming):
            state.batch_in_epoch += 1
            state.skipped += int(batch["num_skipped"])
            images = batch["pixel_values"]
            if not every_rank_has_images(accelerator, images.shape[0]):  # all ranks skip it together
                logger.warning("a micro-batch was skipped: every image of it was unreadable on at least one process")
                continue
            usable += images.shape[0]
            # fresh noise every call, reproducible from (seed, rank, micro-step) so a resumed run draws the same
            noise.manual_seed(noise_seed(args.seed, state.micro_step * accelerator.num_processes
                                         + accelerator.process_index))
            state.micro_step += 1
            t0 = time.perf_counter()
            images, teacher_maps = teacher_targets(teacher, cache, batch, images, recipe.data.hflip, noise)
            t1 = time.perf_counter()
            if fixed_images is None:
                fixed_images = images[: args.feature_images].clone()
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with accelerator.accumulate(model):
                losses = micro_batch_losses(model, images, teacher_maps, pairs, recipe, interpreter)
                stop_if_not_finite(accelerator, losses["loss"], step=state.step + 1, micro_step=state.micro_step,
                                   run_dir=output_dir)
                accelerator.backward(losses["loss"])
                if accelerator.sync_gradients and recipe.optim.grad_clip:
                    accelerator.clip_grad_norm_(model.parameters(), recipe.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            meter.add(losses, images.shape[0] * accelerator.num_processes, t1 - t0, time.perf_counter() - t1)
            if not accelerator.sync_gradients:
                continue
            lr_scheduler.step()
            state.step += 1
            step_losses = meter.end_step(accelerator)
            images_per_s = meter.images_per_s()
            progress.update(1)
            progress.set_postfix(loss=f"{step_losses['loss']:.4f}", img_s=f"{images_per_s:.0f}")
            if state.step % args.log_every == 0 or state.step == total_steps:
                scalars = meter.scalars(step_losses, lr_scheduler.get_last_lr()[0], images_per_s, state.skipped)
                accelerator.log(scalars, step=state.step)
                if accelerator.is_main_process:  # the same scalars as JSON lines, readable without TensorBoard
                    append_metrics(output_dir, {"step": state.step, **scalars})
                meter.reset_window()
            if args.checkpoint_every and state.step % args.checkpoint_every == 0 and state.step < total_steps:
                checkpoint = save_checkpoint(accelerator, output_dir, state.step, args.keep_checkpoints, facts)
                save_feature_picture(accelerator, teacher, model, fixed_images, checkpoint, args.seed)
            if state.step >= total_steps:
                break
        else:
            if full_epoch and not usable:  # an epoch without one usable micro-batch would loop forever
                raise ValueError(
                    f"a whole pass over the data gave no usable micro-batch: {num_images} images, micro-batch "
                    f"{micro_batch} x {accelerator.num_processes} processes (incomplete batches are dropped), "
                    f"{state.skipped} unreadable; add images or lower --per-device-batch-size")
            state.epoch += 1
            state.batch_in_epoch = 0
    progress.close()

    checkpoint = save_checkpoint(accelerator, output_dir, state.step, args.keep_checkpoints, facts)
    save_feature_picture(accelerator, teacher, model, fixed_images, checkpoint, args.seed)
    if state.skipped and accelerator.is_main_process:
        logger.warning("%d unreadable images were skipped on the main process (see warnings above)", state.skipped)
    export_results(args, accelerator, model, recipe, output_dir, interpreter_info)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # closes the trackers and the process group: last
    return output_dir


def save_feature_picture(accelerator, teacher, model, images, checkpoint: Path, seed: int) -> None:
    """teacher vs regressed-student features (PCA to RGB) for a few fixed images, beside the checkpoint."""
    if images is None or not len(images) or not accelerator.is_main_process:
        return
    from training.distill.pairing import pooled_targets
    from training.distill.pictures import save_feature_comparison

    generator = torch.Generator(device=accelerator.device).manual_seed(seed)
    teacher_maps = teacher(images, generator=generator)
    distiller = accelerator.unwrap_model(model)
    was_training = distiller.training
    distiller.eval()
    with torch.no_grad():
        predictions = distiller(images)
    distiller.train(was_training)
    targets = pooled_targets(teacher_maps, distiller.pairs, [p.shape[-2:] for p in predictions])
    save_feature_comparison(images, targets, predictions, [p.student_stride for p in distiller.pairs],
                            checkpoint / "features.png", mean=teacher.mean, std=teacher.std)


if __name__ == "__main__":
    from training.run.cli import run

    run(main)
