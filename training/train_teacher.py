"""Train an in-domain diffusion teacher: a diffusers `UNet2DModel` DDPM on unlabeled images, with Accelerate.

Follows diffusers' examples/unconditional_image_generation/train_unconditional.py: DDPMScheduler (linear betas,
1000 steps), epsilon prediction, MSE; AdamW with warm-up + cosine/constant schedule; EMA weights (EMAModel);
checkpoints with ``accelerator.save_state`` (automatic naming, rotation) and ``--resume latest``; TensorBoard
scalars; a DDIM sample grid (EMA weights) at each checkpoint; at the end an atomic export of the EMA weights as a
diffusers folder (model_index.json, unet/, scheduler/, samples.png, README.md), optionally in fp16.

The UNet is attention-free (DownBlock2D/UpBlock2D only) with one level per entry of ``--block-out-channels``:
with 4 levels at 32 px its decoder levels sit at strides 8, 4, 2, 1; the distillation pairs them with the student's
levels by stride (training/distill/pairing.py).

Images are fed in [-1, 1] (the recipe's resize/crop/flip, then mean = std = 0.5), as DDPMs expect; a user of the
exported teacher must map its inputs to [-1, 1] too.

    accelerate launch training/train_teacher.py --max-steps 3000 --output-dir runs/teacher-fmnist

The flags shared with training/pretrain.py mean the same in both: `--batch-size` is the global batch (all processes x
gradient accumulation; `--per-device-batch-size` is the micro-batch), `--checkpoint-every` / `--keep-checkpoints`,
`--max-grad-norm`, `--resume` / `--allow-resume-mismatch`, `--threads`, `--seed`, `--set FIELD=VALUE` (recipe
fields), and mixed precision comes from `accelerate launch` / `accelerate config` unless `--mixed-precision` is given.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python training/train_teacher.py` puts training/, not the repo, on sys.path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from dreamteacher_models.recipes import DEFAULT_RECIPE, apply_overrides, get_recipe  # noqa: E402
from training.run import data  # noqa: E402
from training.run.cli import check_ranges  # noqa: E402
from training.run.guards import every_rank_has_images, stop_if_not_finite
from training.run.hardware import cpu_name, cpu_threads_per_process  # noqa: E402
from training.run.layout import (  # noqa: E402
    append_metrics,
    find_resume_checkpoint,
    refuse_foreign_folder,
    refuse_fresh_run_over_checkpoints,
    resume_checkpoint,
    save_checkpoint,
    start_run_folder,
    write_text_atomic,
)
from training.run.schedule import TrainState, noise_seed, plan_batches, set_peak_lr  # noqa: E402
from training.teacher.ddpm import (  # noqa: E402
    TEACHER_EXPORT_FILES,
    build_scheduler,
    build_unet,
    denoising_loss,
    export_teacher,
    sample_images,
    save_grid,
    training_cost,
)

logger = logging.getLogger("train_teacher")
DEFAULT_LR = 2e-4  # --lr unset: this on a fresh run, the run's own on a resume


def _int_list(s: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return vals


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--recipe", default=DEFAULT_RECIPE, help="recipe whose data config (source, resize, flip) is used")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a recipe field, repeatable (e.g. --set data.hflip=False)")
    p.add_argument("--data-dir", default=None, help="folder of IDX files or of images (imagefolder)")
    p.add_argument("--dataset", default=None, help="Hub dataset id (needs network); default: the recipe's data")
    p.add_argument("--split", default="train")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--block-out-channels", type=_int_list, default=(32, 64, 128, 128))
    p.add_argument("--layers-per-block", type=int, default=1)
    p.add_argument("--norm-num-groups", type=int, default=32, help="GroupNorm groups (divides every channel count)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="global batch: all processes x gradient accumulation (default 64)")
    p.add_argument("--per-device-batch-size", type=int,
                   help="micro-batch per process; gradients accumulate to reach the global batch (default: "
                        "global batch / processes, capped at 128)")
    p.add_argument("--max-steps", type=int, default=10_000, help="optimizer steps")
    p.add_argument("--lr", type=float,
                   help=f"peak learning rate (default {DEFAULT_LR}); given on --resume, the resumed schedule peaks at "
                        "it from there on (e.g. lower after a non-finite loss)")
    p.add_argument("--lr-scheduler", default="cosine", choices=["cosine", "constant"])
    p.add_argument("--lr-warmup-steps", type=int, default=200)
    p.add_argument("--adam-beta1", type=float, default=0.95)
    p.add_argument("--adam-beta2", type=float, default=0.999)
    p.add_argument("--weight-decay", type=float, default=1e-6)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--ema-max-decay", type=float, default=0.9999)
    p.add_argument("--ema-inv-gamma", type=float, default=1.0)
    p.add_argument("--ema-power", type=float, default=0.75)
    p.add_argument("--num-train-timesteps", type=int, default=1000)
    p.add_argument("--output-dir", default="runs/teacher", help="checkpoints/, logs/, samples/ go here")
    p.add_argument("--export-dir", default=None, help="final diffusers folder (default: OUTPUT_DIR/export)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between save_state checkpoints")
    p.add_argument("--checkpoint-every-minutes", type=float, default=None,
                   help="also checkpoint when this many minutes passed since the last checkpoint")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop (checkpoint, sample, export) after this much training wall time, even before --max-steps")
    p.add_argument("--keep-checkpoints", type=int, default=3, help="how many recent checkpoints to keep")
    p.add_argument("--sample-every", type=int, default=None,
                   help="steps between sample grids (default: at checkpoints)")
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps for the sample grid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp16-export", action="store_true", help="cast the exported UNet weights to fp16")
    p.add_argument("--init-from", default=None,
                   help="start from the UNet of this teacher folder (a train_teacher.py export) instead of random "
                        "weights: fresh optimizer, lr schedule and EMA; its UNet and noise schedule must match the "
                        "flags")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    p.add_argument("--allow-resume-mismatch", action="store_true",
                   help="resume even when the data, batch, process layout or seed differ from the checkpoint's")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process on CPU (default: every core of the machine shared among the "
                        "local processes; `accelerate launch` would otherwise leave one thread on a CPU machine)")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"],
                   help="override the mixed precision `accelerate launch` / `accelerate config` set (default: theirs)")
    p.add_argument("--hardware-note", default=None, help="machine description written into the export README")
    p.add_argument("--log-every", type=int, default=10)
    args = p.parse_args(argv)
    if args.resolution % 2 ** (len(args.block_out_channels) - 1):
        p.error(f"--resolution {args.resolution} must be divisible by 2**(levels-1) = "
                f"{2 ** (len(args.block_out_channels) - 1)} for --block-out-channels {args.block_out_channels}")
    if any(c % args.norm_num_groups for c in args.block_out_channels):
        p.error(f"--block-out-channels {args.block_out_channels} must all be divisible by --norm-num-groups "
                f"{args.norm_num_groups}")
    check_ranges(p, args, at_least_1=("max_steps", "batch_size", "per_device_batch_size", "checkpoint_every",
                                      "layers_per_block", "num_samples", "sample_steps", "log_every",
                                      "keep_checkpoints", "threads", "num_train_timesteps"),
                 at_least_0=("num_workers", "max_grad_norm", "lr_warmup_steps", "lr"))  # lr 0: weights stay put
    if args.sample_every is None:
        args.sample_every = args.checkpoint_every
    return args


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def check_init_from(folder: str, args: argparse.Namespace) -> None:
    """Refuse --init-from `folder` unless its UNet and noise schedule are the ones the flags describe, so the
    export's README, the checkpoints' facts and the student's tap table describe the weights actually trained.
    Reads the configs only: called before any data or model is loaded."""
    from diffusers import DDPMScheduler, UNet2DModel

    if not (Path(folder) / "unet" / "config.json").is_file():
        raise FileNotFoundError(f"--init-from {folder}: no unet/config.json there; expected a teacher folder "
                                "written by train_teacher.py (model_index.json, unet/, scheduler/)")
    pairs = [("UNet", UNet2DModel.load_config(folder, subfolder="unet"),
              build_unet(args.resolution, args.block_out_channels, args.layers_per_block,
                         norm_num_groups=args.norm_num_groups).config)]
    if (Path(folder) / "scheduler").is_dir():
        pairs.append(("noise schedule", DDPMScheduler.load_config(folder, subfolder="scheduler"),
                      build_scheduler(args.num_train_timesteps).config))
    differ = [f"{what} {k}: folder {_as_tuples(have[k])!r}, flags {_as_tuples(want[k])!r}"
              for what, have, want in pairs for k in sorted(set(have) & set(want))
              if not k.startswith("_") and _as_tuples(have[k]) != _as_tuples(want[k])]
    if differ:
        raise ValueError(f"--init-from {folder}: it is not the teacher the flags describe ({'; '.join(differ)}); "
                         "pass the folder's --resolution / --block-out-channels / --layers-per-block / "
                         "--norm-num-groups / --num-train-timesteps")


def _readme(args, argv, state: TrainState, final_loss: float | None, unet, peak_lr: float) -> str:
    cmd = f"accelerate launch --num_processes {_world_size()} training/train_teacher.py " + " ".join(
        shlex.quote(a) for a in argv)
    n_params = sum(p.numel() for p in unet.parameters())
    hw = args.hardware_note or f"{cpu_name()}, {os.cpu_count()} cores"
    loss = f"{final_loss:.4f}" if final_loss is not None else "n/a"
    prior = ""
    if args.init_from:
        cost = training_cost(args.init_from) or "unknown (the folder has no train_teacher.py README)"
        prior = f"| prior training | {cost} |\n"
    arch = (f"attention-free, block_out_channels {list(args.block_out_channels)}, layers_per_block "
            f"{args.layers_per_block}, {n_params / 1e6:.2f} M parameters")
    return f"""# DDPM teacher ({args.resolution}x{args.resolution}, diffusers UNet2DModel)

Unconditional DDPM trained by `training/train_teacher.py` (dreamteacher-models) as the frozen teacher of the
DreamTeacher recipe `{args.recipe}`. Weights are the EMA weights{' cast to fp16' if args.fp16_export else ''};
load with `UNet2DModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32)` or
`DDPMPipeline.from_pretrained(folder)`. Inputs are images in [-1, 1] (3 channels, grayscale replicated).

| | |
|---|---|
| command | `{cmd}` |
| UNet | {arch} |
| initialized from | {args.init_from or 'random weights'} |
{prior}| noise schedule | DDPM linear betas, {args.num_train_timesteps} steps, epsilon prediction, MSE |
| optimizer steps | {state.step} |
| batch size (global) | {args.batch_size} over {_world_size()} process(es) |
| images seen | {state.images_seen} |
| lr | {peak_lr:g} ({args.lr_scheduler}, {args.lr_warmup_steps} warm-up steps), AdamW |
| last logged loss | {loss} |
| skipped (unreadable) images | {state.skipped} |
| wall time | {state.wall_s / 60:.1f} min |
| machine | {hw}; torch {torch.__version__}, {torch.get_num_threads()} threads |

`samples.png`: {args.num_samples} DDIM samples ({args.sample_steps} steps, seed {args.seed}) from these weights.
"""


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def save_samples(accelerator, unet, ema, noise_scheduler, args, output_dir: Path, step: int) -> Path:
    """A DDIM sample grid of the EMA weights at `step` (main process): samples/step_N.png, samples/latest.png and
    TensorBoard's image panel."""
    model = accelerator.unwrap_model(unet)
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    images = sample_images(model, noise_scheduler, args.num_samples, args.sample_steps, args.seed)
    ema.restore(model.parameters())
    grid = output_dir / "samples" / f"step_{step:07d}.png"
    save_grid(images, grid)
    shutil.copyfile(grid, output_dir / "samples" / "latest.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("samples", images, step, dataformats="NHWC")
    return grid


def any_rank(accelerator, flag: bool) -> bool:
    """True on every rank when `flag` is true on any: time-based decisions are taken by all ranks together."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([int(flag)], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def time_is_up(args, accelerator, now: float, start: float, last_checkpoint: float) -> tuple[bool, bool]:
    """(--max-minutes reached, --checkpoint-every-minutes due), agreed by every rank."""
    timed_out = bool(args.max_minutes) and (now - start) / 60 >= args.max_minutes
    every = args.checkpoint_every_minutes
    checkpoint_due = bool(every) and (now - last_checkpoint) / 60 >= every
    if args.max_minutes or args.checkpoint_every_minutes:
        timed_out, checkpoint_due = any_rank(accelerator, timed_out), any_rank(accelerator, checkpoint_due)
    return timed_out, checkpoint_due


def main(argv: list[str] | None = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    output_dir = Path(args.output_dir)
    export_dir = Path(args.export_dir) if args.export_dir else output_dir / "export"
    # checked now, not after hours of training: the export replaces its folder whole
    refuse_foreign_folder(export_dir, TEACHER_EXPORT_FILES, "a previous teacher export (train_teacher.py)")
    resume_path = find_resume_checkpoint(args.resume, output_dir)
    if args.init_from and resume_path is None:  # a resume takes its weights from the checkpoint instead
        check_init_from(args.init_from, args)
    if resume_path is None:
        refuse_fresh_run_over_checkpoints(output_dir)
    project_config = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs"))
    # the process count must be known before gradient accumulation is fixed (as in pretrain.py)
    micro_batch, accumulation = plan_batches(args.batch_size, args.per_device_batch_size,
                                             Accelerator(mixed_precision=args.mixed_precision).num_processes)
    accelerator = Accelerator(
        gradient_accumulation_steps=accumulation,
        mixed_precision=args.mixed_precision,  # None: what `accelerate launch` / `accelerate config` set
        log_with="tensorboard",
        project_config=project_config,
    )
    set_seed(args.seed)
    if accelerator.device.type == "cpu":
        torch.set_num_threads(args.threads or cpu_threads_per_process())
    start_run_folder(accelerator, output_dir, resume_path is None, logger)
    if accelerator.is_main_process:
        write_text_atomic(output_dir / "args.json", json.dumps(
            {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()}, indent=2))

    # Data: the recipe's resize/crop/flip at --resolution, scaled to [-1, 1].
    recipe = apply_overrides(get_recipe(args.recipe), args.overrides)
    data_cfg = dataclasses.replace(recipe.data, input_size=(3, args.resolution, args.resolution))
    hf_ds = data.load_image_dataset(data.data_source(args.data_dir, args.dataset), args.split, recipe_data=data_cfg)
    transform = data.build_transform(data_cfg, train=True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    train_ds = data.ImageDataset(hf_ds, transform)
    if len(train_ds) < micro_batch:
        raise ValueError(f"the per-device batch {micro_batch} is larger than the dataset ({len(train_ds)} images)")
    loader = data.build_dataloader(train_ds, micro_batch, shuffle=True, seed=args.seed,
                                   num_workers=args.num_workers, drop_last=True)

    if args.init_from and resume_path is None:  # a resume loads the checkpoint's weights instead
        unet = UNet2DModel.from_pretrained(args.init_from, subfolder="unet", torch_dtype=torch.float32)
        logger.info("UNet initialized from %s", args.init_from)
    else:
        unet = build_unet(args.resolution, args.block_out_channels, args.layers_per_block,
                          norm_num_groups=args.norm_num_groups)
    noise_scheduler = build_scheduler(args.num_train_timesteps)
    ema = EMAModel(unet.parameters(), decay=args.ema_max_decay, use_ema_warmup=True, inv_gamma=args.ema_inv_gamma,
                   power=args.ema_power, model_cls=UNet2DModel, model_config=unet.config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=DEFAULT_LR if args.lr is None else args.lr,
                                  betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.weight_decay)
    sched_name = "constant_with_warmup" if args.lr_scheduler == "constant" else args.lr_scheduler
    lr_scheduler = get_scheduler(sched_name, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=args.max_steps)
    # The LR scheduler is not prepared: Accelerate would step it once per process per optimizer step (the cosine
    # would end at max_steps / processes). It is stepped by hand once per optimizer step, and checkpointed.
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    ema.to(accelerator.device)
    noise_gen = torch.Generator(device=accelerator.device)
    state = TrainState()
    accelerator.register_for_checkpointing(ema, lr_scheduler, state)
    facts = {"data": str(args.data_dir or args.dataset or recipe.data.name), "split": args.split,
             "images": len(train_ds), "batch_per_device": micro_batch, "processes": accelerator.num_processes,
             "accumulation": accumulation, "resolution": args.resolution, "seed": args.seed,
             "init_from": args.init_from, "max_steps": args.max_steps,
             "num_train_timesteps": args.num_train_timesteps}

    if resume_path is not None:
        resume_checkpoint(accelerator, resume_path, facts, args.allow_resume_mismatch, output_dir, state, logger)
        ema.to(accelerator.device)
        if args.lr is not None:
            set_peak_lr(lr_scheduler, args.lr)
            logger.info("--lr %g: the resumed schedule peaks at it from step %d on", args.lr, state.step)

    accelerator.init_trackers("train_teacher", config={
        k: (",".join(map(str, v)) if isinstance(v, tuple) else v) for k, v in vars(args).items()
        if isinstance(v, (int, float, str, bool, tuple))})

    # the last optimizer step of an epoch takes the micro-batches left over (Accelerate syncs at the loader's end)
    steps_per_epoch = math.ceil(len(loader) / accumulation)
    if steps_per_epoch < 1:
        raise ValueError(f"the dataset gives no batch of {micro_batch} per epoch ({len(train_ds)} images)")
    logger.info("%d images, %d steps/epoch, global batch %d, %d steps (%.2f epochs), UNet %.2f M params",
                len(train_ds), steps_per_epoch, args.batch_size, args.max_steps, args.max_steps / steps_per_epoch,
                sum(p.numel() for p in unet.parameters()) / 1e6)

    last_ckpt_time = time.time()
    progress = tqdm(total=args.max_steps, initial=state.step, disable=not accelerator.is_local_main_process,
                    desc="teacher", dynamic_ncols=True)
    t_start = time.time() - state.wall_s
    last_loss, last_grid = None, None
    unet.train()
    done = False
    while state.step < args.max_steps and not done:
        loader.set_epoch(state.epoch)
        active = loader
        if state.batch_in_epoch:
            active = accelerator.skip_first_batches(loader, state.batch_in_epoch)
            active.set_epoch(state.epoch)
        step_at_start, full_pass = state.step, state.batch_in_epoch == 0
        for batch in active:
            state.batch_in_epoch += 1
            n_skipped = int(batch["num_skipped"])
            state.skipped += n_skipped
            clean = batch["pixel_values"]
            if not every_rank_has_images(accelerator, clean.shape[0]):  # all ranks skip it together
                logger.warning("a micro-batch was skipped: every image of it was unreadable on at least one process")
                continue
            noise_gen.manual_seed(noise_seed(args.seed, state.micro_step * accelerator.num_processes
                                             + accelerator.process_index))
            state.micro_step += 1
            noise = torch.randn(clean.shape, generator=noise_gen, device=clean.device, dtype=clean.dtype)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],), generator=noise_gen,
                              device=clean.device)
            with accelerator.accumulate(unet):
                loss = denoising_loss(unet, noise_scheduler, clean, noise, t)
                stop_if_not_finite(accelerator, loss, step=state.step + 1, micro_step=state.micro_step,
                                   run_dir=output_dir)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state.images_seen += clean.shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            lr_scheduler.step()
            ema.step(unet.parameters())
            state.step += 1
            state.wall_s = time.time() - t_start
            last_loss = loss.detach().item()
            progress.update(1)
            if state.step % args.log_every == 0 or state.step == args.max_steps:
                logs = {"loss": last_loss, "lr": lr_scheduler.get_last_lr()[0], "ema_decay": ema.cur_decay_value,
                        "skipped_images": state.skipped, "epoch": state.step / steps_per_epoch}
                progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{logs['lr']:.2e}", skipped=state.skipped)
                accelerator.log(logs, step=state.step)
                if accelerator.is_main_process:  # the training curve as JSON lines, readable without TensorBoard
                    append_metrics(output_dir, {"step": state.step, "wall_s": round(state.wall_s, 1), **logs})
            now = time.time()
            timed_out, ckpt_due = time_is_up(args, accelerator, now, t_start, last_ckpt_time)
            if timed_out and state.step < args.max_steps:
                logger.info("--max-minutes %s reached at step %d: stopping", args.max_minutes, state.step)
            done = state.step >= args.max_steps or timed_out
            do_ckpt = state.step % args.checkpoint_every == 0 or done or ckpt_due
            if do_ckpt:
                last_ckpt_time = now
            do_sample = state.step % args.sample_every == 0 or do_ckpt
            if do_ckpt:  # all ranks; checkpoints/step_N, complete or absent, rotated to --keep-checkpoints
                save_checkpoint(accelerator, output_dir, state.step, args.keep_checkpoints, facts)
            if do_sample and accelerator.is_main_process:
                last_grid = save_samples(accelerator, unet, ema, noise_scheduler, args, output_dir, state.step)
            if done:
                break
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
        if full_pass and state.step == step_at_start and not done:  # a pass with no step would repeat forever
            raise ValueError(f"a pass over the data gave no training step: {len(train_ds)} images, batch "
                             f"{micro_batch} x {accumulation} accumulation, {state.skipped} "
                             "unreadable; add readable images or lower --batch-size / --per-device-batch-size")
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if last_grid is None:  # resumed at max_steps: nothing ran; sample the restored EMA for the export
            last_grid = save_samples(accelerator, unet, ema, noise_scheduler, args, output_dir, state.step)
        model = accelerator.unwrap_model(unet)
        export_teacher(model, ema, noise_scheduler, export_dir, args.fp16_export, last_grid,
                       _readme(args, argv, state, last_loss, model, lr_scheduler.base_lrs[0]))
        logger.info("exported EMA teacher to %s (%d steps, %.1f min)", export_dir, state.step, state.wall_s / 60)
    accelerator.end_training()
    return export_dir


if __name__ == "__main__":
    from training.run.cli import run

    run(main)
