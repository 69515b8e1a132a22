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
    recipe_fields,
    recipe_from_dict,
)
from hub.export import export_for_hub
from training.data import (
    ImageDataset,
    StreamingImageDataset,
    build_dataloader,
    build_transform,
    data_source,
    load_image_dataset,
    split_streaming,
)
from training.distiller import build_distiller, distillation_loss
from training.feature_cache import FeatureCache, cache_key, open_or_build_feature_cache
from training.hardware import cpu_threads_per_process
from training.label_distill import build_task_head, label_distillation_loss, load_interpreter, save_task_head
from training.pairing import describe_pairs
from training.regressor import student_levels
from training.run_layout import (
    RESOLVED_RECIPE_FILENAME,
    append_metrics,
    check_resume_facts,
    cut_metrics_to_step,
    find_resume_checkpoint,
    latest_checkpoint,
    refuse_fresh_run_over_checkpoints,
    remove_leftovers,
    save_checkpoint,
    write_text_atomic,
)
from training.schedule import TrainState, cosine_with_warmup
from training.teachers import build_teacher, describe_taps

logger = logging.getLogger("dreamteacher.pretrain")
REPO_ROOT = Path(__file__).resolve().parent.parent


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
    teacher.add_argument("--interpreter", metavar="DIR",
                         help="mix-distillation: the interpreter folder from training/train_interpreter.py (sets "
                              "recipe.label_distill.interpreter); the student gets a task head learning its soft "
                              "labels (training/label_distill.py)")
    teacher.add_argument("--feature-cache", metavar="DIR",
                         help="opt-in: read the teacher's features from a cache of K encodings per image at DIR, "
                              "built there first when missing (training/feature_cache.py: a deviation from the "
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
    return p.parse_args(argv)


def resolve_recipe(args: argparse.Namespace) -> Recipe:
    """The recipe plus command-line overrides: what this run trains and what recipe.json records."""
    recipe = get_recipe(args.recipe)
    overrides = list(args.overrides)
    for flag, field in (("teacher", "teacher.source"), ("batch_size", "optim.batch_size"), ("lr", "optim.lr"),
                        ("epochs", "optim.epochs"), ("interpreter", "label_distill.interpreter")):
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
        hf = split_streaming(hf, seed=args.seed, rank=accelerator.process_index, world_size=accelerator.num_processes)
        if args.limit_images:
            hf = hf.take(args.limit_images)
        augment_seed = args.seed * 1_000_003 + accelerator.process_index  # each rank flips its own images
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


def teacher_source(recipe: Recipe) -> str:
    """The recipe's teacher source; a relative folder missing from the working directory is looked up in the repo
    (the committed in-domain teachers live there), so the default runs from any directory."""
    source = Path(recipe.teacher.source)
    in_repo = REPO_ROOT / source
    if not source.is_absolute() and not source.exists() and in_repo.exists():
        return str(in_repo)
    return recipe.teacher.source


def epoch_batches(accelerator, loader, epoch: int, skip: int, streaming: bool):
    """This rank's micro-batches of `epoch` on its device, after the first `skip` (already trained on before a
    resume): the same batches in the same order as an uninterrupted run, streamed or not."""
    (loader if hasattr(loader, "set_epoch") else loader.dataset).set_epoch(epoch)
    for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
        yield send_to_device(batch, accelerator.device) if streaming else batch  # a stream is not prepared


def plan_batches(args, recipe: Recipe, num_processes: int) -> tuple[int, int]:
    """(per-device micro-batch, gradient accumulation steps) that reach the recipe's global batch exactly."""
    global_batch = recipe.optim.batch_size
    micro = args.per_device_batch_size or max(1, min(global_batch // num_processes, 128))
    accumulation, rest = divmod(global_batch, micro * num_processes)
    if rest or accumulation < 1:
        raise ValueError(
            f"global batch {global_batch} is not a multiple of per-device batch {micro} x {num_processes} processes; "
            f"choose --per-device-batch-size dividing {global_batch // num_processes}"
        )
    return micro, accumulation


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    recipe = resolve_recipe(args)
    output_dir = Path(args.output_dir or f"runs/{recipe.name}")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    # -- accelerator: devices, processes, precision, trackers
    # the process count must be known before gradient accumulation is fixed (PartialState() alone misreads
    # ACCELERATE_USE_CPU multi-process launches as one process; tests/test_pretrain.py checks 2-process runs)
    micro_batch, accumulation = plan_batches(args, recipe, Accelerator().num_processes)
    accelerator = Accelerator(
        gradient_accumulation_steps=accumulation,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    set_seed(args.seed, device_specific=True)
    if accelerator.device.type == "cpu":
        torch.set_num_threads(args.threads or cpu_threads_per_process())

    # -- the frozen teacher (never prepared) and the trainable student + regressor, levels paired by stride
    teacher_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        args.teacher_dtype or accelerator.mixed_precision)
    teacher = build_teacher(recipe.teacher, recipe.data.mean, recipe.data.std, source=teacher_source(recipe),
                            device=accelerator.device, dtype=teacher_dtype, channels_last=args.channels_last)
    model, pairing_notes = build_distiller(recipe, dict(zip(teacher.strides, teacher.channels, strict=True)))
    pairs = model.pairs
    recipe = dataclasses.replace(recipe, pairs=tuple((p.student_stride, p.teacher_stride) for p in pairs))
    teacher.keep_strides({p.teacher_stride for p in pairs})  # an unpaired level is never computed
    interpreter = interpreter_info = None
    if recipe.label_distill.interpreter:  # mix-distillation: a frozen interpreter, a task head on the student
        interpreter, interpreter_info = load_interpreter(recipe.label_distill.interpreter, teacher)
        c5_channels = max(student_levels(model.student, recipe.arch).items())[1][1]
        model.task_head = build_task_head(interpreter_info, c5_channels, [p.teacher_channels for p in pairs])
    if accelerator.is_main_process:
        logger.info("teacher taps:\n%s", describe_taps(teacher, recipe.data.input_size[1:]))
        logger.info("student levels <- teacher taps, by stride:\n%s\n%s",
                    describe_pairs(pairs, recipe.data.input_size[-1]), "\n".join(pairing_notes))
        logger.info("%d torch threads per process on %s", torch.get_num_threads(), accelerator.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(model, opt=recipe.optim.optimizer, lr=recipe.optim.lr,
                                    weight_decay=recipe.optim.weight_decay, betas=recipe.optim.betas)

    resume_from = find_resume_checkpoint(args.resume, output_dir)
    if resume_from is None:
        refuse_fresh_run_over_checkpoints(output_dir)
    saved = output_dir / RESOLVED_RECIPE_FILENAME
    if resume_from is not None and saved.is_file() and recipe_from_dict(json.loads(saved.read_text())) != recipe:
        raise ValueError(f"--resume: {saved} differs from this run's recipe; resume with the same recipe/overrides")
    accelerator.wait_for_everyone()  # every rank has read recipe.json before the main process rewrites it
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(output_dir)
        write_text_atomic(saved, json.dumps(recipe.to_dict(), indent=2) + "\n")
        write_text_atomic(output_dir / "args.json", json.dumps(vars(args), indent=2) + "\n")

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
             "processes": accelerator.num_processes, "accumulation": accumulation, "seed": args.seed}
    steps_per_epoch = num_images // recipe.optim.batch_size if num_images else None
    if args.max_steps:
        total_steps = args.max_steps
    elif steps_per_epoch:
        total_steps = max(1, round(recipe.optim.epochs * steps_per_epoch))
    else:
        raise ValueError("the dataset size is unknown (streaming): pass --max-steps or --limit-images")
    warmup_steps = round(total_steps * recipe.optim.warmup_epochs / recipe.optim.epochs) if recipe.optim.epochs else 0
    min_lr_ratio = recipe.optim.min_lr / recipe.optim.lr
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, total_steps, warmup_steps, min_lr_ratio))

    # The scheduler is stepped by hand once per optimizer step (Accelerate would step a prepared one per process).
    model, optimizer, loader = prepare_for_training(accelerator, model, optimizer, loader, args.streaming)
    state = TrainState()
    accelerator.register_for_checkpointing(lr_scheduler, state)
    if resume_from is not None:
        check_resume_facts(resume_from, facts, args.allow_resume_mismatch)
        accelerator.load_state(str(resume_from))
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", resume_from, state.step, state.epoch,
                    state.batch_in_epoch)
        if accelerator.is_main_process and cut_metrics_to_step(output_dir, state.step):
            logger.info("metrics.jsonl cut back to step %d (lines after it, or torn by the kill, dropped)",
                        state.step)
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
    window = {"images": 0, "teacher_s": 0.0, "student_s": 0.0, "start": time.perf_counter()}
    noise = torch.Generator(device=accelerator.device)
    step_losses: dict[str, torch.Tensor] = {}
    micro_in_step = 0
    while state.step < total_steps:
        full_epoch, usable = state.batch_in_epoch == 0, 0
        for batch in epoch_batches(accelerator, loader, state.epoch, state.batch_in_epoch, args.streaming):
            state.batch_in_epoch += 1
            state.skipped += int(batch["num_skipped"])
            images = batch["pixel_values"]
            if images.shape[0] == 0:  # vanishingly rare; under DDP the other ranks would wait at the next sync
                logger.warning("a whole micro-batch of unreadable images was skipped")
                continue
            usable += images.shape[0]
            # fresh noise every call, reproducible from (seed, rank, micro-step) so a resumed run draws the same
            noise.manual_seed(args.seed * 1_000_003 + state.micro_step * accelerator.num_processes
                              + accelerator.process_index)
            state.micro_step += 1
            t0 = time.perf_counter()
            images, teacher_maps = teacher_targets(teacher, cache, batch, images, recipe.data.hflip, noise)
            t1 = time.perf_counter()
            if fixed_images is None:
                fixed_images = images[: args.feature_images].clone()
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with accelerator.accumulate(model):
                if interpreter is None:
                    losses = distillation_loss(model(images), teacher_maps, pairs, recipe.loss)
                else:
                    predictions, logits = model(images, with_logits=True)
                    losses = distillation_loss(predictions, teacher_maps, pairs, recipe.loss)
                    with torch.no_grad():
                        soft_labels = interpreter(teacher_maps)
                    losses["ld"] = label_distillation_loss(logits, soft_labels, recipe.label_distill.temperature)
                    losses["loss"] = losses["loss"] + recipe.label_distill.weight * losses["ld"]
                # every micro-batch, on every rank, before its gradient can reach the weights
                finite = torch.isfinite(losses["loss"].detach()).float().reshape(1)
                if not accelerator.gather(finite).all():
                    last = latest_checkpoint(output_dir)
                    raise FloatingPointError(
                        f"non-finite loss at step {state.step + 1} (micro-batch {state.micro_step}); stopped before "
                        f"the optimizer step, without saving. Last checkpoint (finite weights): {last or 'none'}. "
                        f"Lower the learning rate (--lr) or run in fp32 (--mixed_precision no), then "
                        f"--resume {last or 'latest'}")
                accelerator.backward(losses["loss"])
                if accelerator.sync_gradients and recipe.optim.grad_clip:
                    accelerator.clip_grad_norm_(model.parameters(), recipe.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            window["teacher_s"] += t1 - t0
            window["student_s"] += time.perf_counter() - t1
            window["images"] += images.shape[0] * accelerator.num_processes
            micro_in_step += 1
            for key, value in losses.items():  # summed over the step's micro-batches, averaged when logged
                if "/" not in key:
                    step_losses[key] = step_losses.get(key, 0.0) + value.detach()

            if not accelerator.sync_gradients:
                continue
            lr_scheduler.step()
            state.step += 1
            # the mean over every micro-batch of the step on every rank: the same figure for any process layout
            gathered = {k: accelerator.gather(v / micro_in_step).mean().item() for k, v in step_losses.items()}
            step_losses, micro_in_step = {}, 0
            elapsed = time.perf_counter() - window["start"]
            images_per_s = window["images"] / max(elapsed, 1e-9)
            progress.update(1)
            progress.set_postfix(loss=f"{gathered['loss']:.4f}", img_s=f"{images_per_s:.0f}")
            if state.step % args.log_every == 0 or state.step == total_steps:
                scalars = {**{f"loss/{k}": v for k, v in gathered.items()},
                           "lr": lr_scheduler.get_last_lr()[0], "images_per_s": images_per_s,
                           "time/teacher_s": window["teacher_s"], "time/student_s": window["student_s"],
                           "data/skipped_images": state.skipped}
                accelerator.log(scalars, step=state.step)
                if accelerator.is_main_process:  # the same scalars as JSON lines, readable without TensorBoard
                    append_metrics(output_dir, {"step": state.step, **scalars})
                window = {"images": 0, "teacher_s": 0.0, "student_s": 0.0, "start": time.perf_counter()}
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
    if not args.no_export and accelerator.is_main_process:
        student = accelerator.unwrap_model(model).student
        export = export_for_hub(student.state_dict(), output_dir / "export", recipe=recipe)
        logger.info("exported the student to %s: timm.create_model('local-dir:%s', pretrained=True)", export, export)
    if args.export_task_head and interpreter is not None and accelerator.is_main_process:
        head = save_task_head(accelerator.unwrap_model(model).task_head, interpreter_info, output_dir / "task_head")
        logger.info("task head written to %s", head)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # closes the trackers and the process group: last
    return output_dir


def save_feature_picture(accelerator, teacher, model, images, checkpoint: Path, seed: int) -> None:
    """teacher vs regressed-student features (PCA to RGB) for a few fixed images, beside the checkpoint."""
    if images is None or not len(images) or not accelerator.is_main_process:
        return
    from training.pairing import pooled_targets
    from training.visualize import save_feature_comparison

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
    from training.cli import run

    run(main)
