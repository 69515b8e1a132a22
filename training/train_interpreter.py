"""Train the label-distillation interpreter on the frozen teacher's features, from a few labeled images.

    python training/train_interpreter.py                                   # Fashion-MNIST classes, 1% of the labels
    python training/train_interpreter.py --task fmnist-masks --labels 40   # foreground masks of 40 images
    accelerate launch training/train_interpreter.py --recipe resnet18.dreamteacher_fmnist --epochs 100

The teacher is the recipe's (its taps paired with the student, at the recipe's timestep), frozen; the interpreter
(training/labels/interpreter.py) reads its features. Tasks on this machine's data:

* `classes`: Fashion-MNIST's 10 classes, a class-balanced `--labels-fraction` of the train split (1% = 600 images,
  the split `training/evaluate.py` fine-tunes on); `PooledInterpreter`; validated by top-1 on t10k.
* `fmnist-masks`: dense foreground/background masks derived from the images themselves (a pixel is foreground when
  its gray value exceeds `--mask-threshold`; no such labels ship with Fashion-MNIST), the first `--labels` train
  images; `DenseInterpreter`, CE + 3 Dice; validated by mean IoU on t10k.
* `masks`: a label-efficient segmentation benchmark folder (DDPM-seg / DatasetGAN layout,
  training/labels/dense_masks.py: images + `.npy` class masks in real/train and real/test), the first `--labels`
  train images, `--num-classes` (read from the folder's name for ffhq_34, celeba_19, bedroom_28, cat_15, horse_21);
  ignore id 255.

Features are computed batch by batch with a fresh stochastic encoding each time (the same augmentation the
student's targets get), never held for the whole set, so memory stays at one batch whatever the labeled set's
size (measured with `--report-memory`). The paper's optimiser: AdamW lr 4e-3, wd 0.05, betas (0.9, 0.95), 100
epochs, horizontal flips (images and masks together). Output: `<output-dir>/interpreter.safetensors` and
`interpreter.json` (task, classes, taps, timestep, teacher, validation score), written atomically; checkpoints
each epoch under `checkpoints/step_N` resume with `--resume latest`.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import resource  # noqa: E402

import numpy as np  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import ProjectConfiguration, set_seed  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from dreamteacher_models.recipes import DEFAULT_RECIPE, apply_overrides, get_recipe  # noqa: E402
from training.distill.distiller import build_distiller  # noqa: E402
from training.labels.dense_masks import IGNORE_ID, MaskedImages, num_classes_of, split_folder  # noqa: E402
from training.labels.interpreter import (  # noqa: E402
    INTERPRETER_INFO,
    INTERPRETER_WEIGHTS,
    DenseInterpreter,
    PooledInterpreter,
    interpreter_loss,
)
from training.protocols.classification import balanced_subset  # noqa: E402
from training.protocols.evaluation import dataset_labels  # noqa: E402
from training.run.data import build_transform, data_source, load_image_dataset  # noqa: E402
from training.run.guards import stop_if_not_finite  # noqa: E402
from training.run.hardware import cpu_threads_per_process  # noqa: E402
from training.run.layout import (  # noqa: E402
    atomic_file,
    find_resume_checkpoint,
    refuse_fresh_run_over_checkpoints,
    resume_checkpoint,
    save_checkpoint,
    start_run_folder,
    write_text_atomic,
)
from training.run.schedule import TrainState, cosine_with_warmup, noise_seed, set_peak_lr  # noqa: E402
from training.teacher.build import build_teacher  # noqa: E402
from training.teacher.domain import check_teacher_domain
from training.teacher.sources import teacher_source  # noqa: E402

logger = logging.getLogger("dreamteacher.train_interpreter")
TASKS = ("classes", "fmnist-masks", "masks")
DEFAULT_LR = 4e-3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"whose teacher, taps and data (default {DEFAULT_RECIPE})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--teacher", help="teacher folder (default: the recipe's)")
    p.add_argument("--task", choices=TASKS, default="classes")
    p.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default: the recipe's); for --task masks the "
                                      "benchmark folder")
    p.add_argument("--num-classes", type=int, help="--task masks: classes (default: from the folder's name)")
    p.add_argument("--labels-fraction", type=float, default=0.01, help="classes: balanced fraction labeled (0.01)")
    p.add_argument("--labels", type=int, default=40, help="fmnist-masks: labeled images (default 40)")
    p.add_argument("--mask-threshold", type=float, default=0.2, help="fmnist-masks: foreground gray level (0-1)")
    p.add_argument("--max-val", type=int, help="validate on the first N test images (default: all)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--validate-every", type=int, default=10,
                   help="epochs between validations (default 10; the last epoch is always validated). The score "
                        "is progress information: no checkpoint is chosen by it")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {DEFAULT_LR}; given on --resume, the "
                   "resumed schedule peaks at it from there on)")
    p.add_argument("--width", type=int, default=256, help="dense interpreter width (default 256, the paper's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads on CPU (default: every core)")
    p.add_argument("--output-dir", default="runs/interpreter")
    p.add_argument("--resume", help="'latest' or a checkpoint folder")
    p.add_argument("--allow-resume-mismatch", action="store_true",
                   help="resume even when the task, labels, batch, epochs, seed or process count differ")
    p.add_argument("--report-memory", action="store_true", help="log the peak resident memory at the end")
    args = p.parse_args(argv)
    if min(args.epochs, args.batch_size, args.labels, args.validate_every) < 1:
        p.error("--epochs, --batch-size, --labels and --validate-every must be >= 1")
    return args


class JointFlip(torch.utils.data.Dataset):
    """(image, target) pairs of `dataset`, both mirrored (a mask's width too) on a coin per (seed, epoch, index),
    so a resumed epoch flips the same images."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        pixels, target = self.dataset[i]
        coin = torch.Generator().manual_seed(hash((self.seed, self.epoch, i)) & 0xFFFF_FFFF)
        if torch.rand((), generator=coin) < 0.5:
            pixels = pixels.flip(-1)
            target = target.flip(-1) if target.ndim else target
        return pixels, target


class LabeledImages(torch.utils.data.Dataset):
    """Fashion-MNIST (image, target) pairs: a class index, or a foreground mask derived from the image."""

    def __init__(self, hf, indices, transform, task: str, threshold: float):
        self.hf, self.indices, self.transform = hf, list(indices), transform
        self.task, self.threshold = task, threshold
        self.labels = dataset_labels(hf) if task == "classes" else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        image = self.hf[index]["image"]
        pixels = self.transform(image.convert("RGB"))
        if self.task == "classes":
            target = torch.tensor(int(self.labels[index]))
        else:  # the gray image at the input size: foreground where brighter than the threshold
            size = (pixels.shape[-1], pixels.shape[-2])  # PIL: (width, height)
            gray = np.asarray(image.convert("L").resize(size), dtype=np.float32) / 255.0
            target = torch.from_numpy(gray > self.threshold).long()
        return pixels, target


def build_interpreter(task: str, teacher, width: int, num_classes: int) -> torch.nn.Module:
    channels = dict(zip(teacher.strides, teacher.channels, strict=True))
    if task == "classes":
        return PooledInterpreter(channels, num_classes)
    return DenseInterpreter(channels, num_classes, width=width)


def labeled_sets(args, recipe) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset, int]:
    """(labeled train set, validation set, classes) for the task."""
    transform = build_transform(recipe.data, train=False)
    if args.task == "masks":
        if not args.data_dir:
            raise ValueError("--task masks needs --data-dir, a benchmark folder with real/train and real/test")
        classes = num_classes_of(args.data_dir, args.num_classes)
        size = tuple(recipe.data.input_size[1:])
        train = MaskedImages(split_folder(args.data_dir, "train"), classes, transform, size, limit=args.labels)
        val = MaskedImages(split_folder(args.data_dir, "test"), classes, transform, size, limit=args.max_val)
        return train, val, classes
    source = data_source(args.data_dir)
    train_hf = load_image_dataset(source, "train", recipe_data=recipe.data)
    test_hf = load_image_dataset(source, "test", recipe_data=recipe.data)
    if args.task == "classes":
        labeled = balanced_subset(dataset_labels(train_hf), args.labels_fraction, seed=args.seed)
    else:
        labeled = np.arange(min(args.labels, len(train_hf)))
    val_indices = range(min(args.max_val or len(test_hf), len(test_hf)))
    return (LabeledImages(train_hf, labeled, transform, args.task, args.mask_threshold),
            LabeledImages(test_hf, val_indices, transform, args.task, args.mask_threshold),
            10 if args.task == "classes" else 2)


@torch.no_grad()
def validate(interpreter, teacher, loader, task: str, device, seed: int, num_classes: int) -> float:
    """top-1 (%) for classes, mean IoU (%) over the classes present for masks (the ignore id left out)."""
    interpreter.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    correct = total = 0
    inter, union = torch.zeros(num_classes), torch.zeros(num_classes)
    for images, targets in loader:
        logits = interpreter(teacher(images.to(device), generator=generator)).cpu()
        if task == "classes":
            correct += int((logits.argmax(1) == targets).sum())
            total += len(targets)
        else:
            logits = torch.nn.functional.interpolate(logits, size=targets.shape[-2:], mode="bilinear",
                                                     align_corners=False)
            pred, valid = logits.argmax(1), targets != IGNORE_ID
            for c in range(num_classes):
                inter[c] += ((pred == c) & (targets == c) & valid).sum()
                union[c] += (((pred == c) & valid) | (targets == c)).sum()
    interpreter.train()
    if task == "classes":
        return 100.0 * correct / max(total, 1)
    present = union > 0
    return float(100.0 * (inter[present] / union[present]).mean()) if present.any() else 0.0


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    output_dir = Path(args.output_dir)
    recipe = apply_overrides(get_recipe(args.recipe), args.overrides
                             + ([f"teacher.source={args.teacher!r}"] if args.teacher else []))
    check_teacher_domain(recipe, args.data_dir)
    accelerator = Accelerator(project_config=ProjectConfiguration(project_dir=str(output_dir)))
    set_seed(args.seed)
    if accelerator.device.type == "cpu":
        torch.set_num_threads(args.threads or cpu_threads_per_process())
    resume_from = find_resume_checkpoint(args.resume, output_dir)
    if resume_from is None:
        refuse_fresh_run_over_checkpoints(output_dir)
    start_run_folder(accelerator, output_dir, resume_from is None, logger)

    teacher = build_teacher(recipe.teacher, recipe.data.mean, recipe.data.std, source=teacher_source(recipe),
                            device=accelerator.device)
    teacher.check_image_size(recipe.data.input_size[1:])
    distiller, _ = build_distiller(recipe, dict(zip(teacher.strides, teacher.channels, strict=True)))
    teacher.keep_strides({pair.teacher_stride for pair in distiller.pairs})  # the taps the student distils
    del distiller

    labeled_set, val_set, num_classes = labeled_sets(args, recipe)
    train_set = JointFlip(labeled_set, args.seed) if recipe.data.hflip else labeled_set
    loader = torch.utils.data.DataLoader(train_set, batch_size=min(args.batch_size, len(train_set)), shuffle=True,
                                         generator=torch.Generator().manual_seed(args.seed), drop_last=True)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=256)
    interpreter = build_interpreter(args.task, teacher, args.width, num_classes)
    peak_lr = DEFAULT_LR if args.lr is None else args.lr
    optimizer = torch.optim.AdamW(interpreter.parameters(), lr=peak_lr, weight_decay=0.05, betas=(0.9, 0.95))
    total_steps = args.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, total_steps, 0))
    interpreter, optimizer = accelerator.prepare(interpreter, optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)
    facts = {"task": args.task, "labeled": len(train_set), "batch": loader.batch_size, "seed": args.seed,
             "processes": accelerator.num_processes, "epochs": args.epochs}
    if resume_from is not None:
        resume_checkpoint(accelerator, resume_from, facts, args.allow_resume_mismatch, output_dir, state, logger)
        if args.lr is not None:
            set_peak_lr(scheduler, args.lr)
            logger.info("--lr %g: the resumed schedule peaks at it from step %d on", args.lr, state.step)
    logger.info("%s: %d labeled images, %d epochs of %d steps, teacher taps %s at t=%d", args.task, len(train_set),
                args.epochs, len(loader), list(teacher.strides), teacher.timestep)

    noise = torch.Generator(device=accelerator.device)
    progress = tqdm(total=args.epochs, initial=state.epoch, desc="interpreter",
                    disable=not accelerator.is_local_main_process)
    score = None
    while state.epoch < args.epochs:
        if isinstance(train_set, JointFlip):
            train_set.epoch = state.epoch
        loader.generator.manual_seed(noise_seed(args.seed, state.epoch))
        for images, targets in loader:
            noise.manual_seed(noise_seed(args.seed, state.micro_step))
            state.micro_step += 1
            features = teacher(images.to(accelerator.device), generator=noise)  # this batch's only
            losses = interpreter_loss(interpreter(features), targets.to(accelerator.device), ignore_index=IGNORE_ID
                                      if args.task != "classes" else None)
            stop_if_not_finite(accelerator, losses["loss"], step=state.step + 1, micro_step=state.micro_step,
                               run_dir=output_dir)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(losses["loss"])
            optimizer.step()
            scheduler.step()
            state.step += 1
        state.epoch += 1
        if state.epoch % args.validate_every == 0 or state.epoch == args.epochs:
            score = validate(interpreter, teacher, val_loader, args.task, accelerator.device, args.seed, num_classes)
        progress.update(1)
        progress.set_postfix(loss=f"{losses['loss'].item():.3f}", val="-" if score is None else f"{score:.2f}")
        save_checkpoint(accelerator, output_dir, state.step, keep=1, facts=facts)

    if accelerator.is_main_process:
        model = accelerator.unwrap_model(interpreter)
        with atomic_file(output_dir / INTERPRETER_WEIGHTS) as tmp:
            safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        info = {"task": args.task, "num_classes": model.num_classes, "labeled_images": len(train_set),
                "taps": {str(s): c for s, c in model.channels.items()}, "timestep": teacher.timestep,
                "teacher": teacher.source, "recipe": recipe.name, "epochs": args.epochs,
                "peak_lr": scheduler.base_lrs[0],
                "validation": {"metric": "top-1" if args.task == "classes" else "mIoU", "score": score,
                               "images": len(val_set)}}
        if args.report_memory:
            info["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            logger.info("peak resident memory: %.0f MB", info["peak_rss_mb"])
        write_text_atomic(output_dir / INTERPRETER_INFO, json.dumps(info, indent=2) + "\n")
        logger.info("interpreter: %s %.2f on %d test images; %s", info["validation"]["metric"], score or 0.0,
                    len(val_set), output_dir / INTERPRETER_WEIGHTS)
    accelerator.end_training()
    return output_dir


if __name__ == "__main__":
    from training.run.cli import run

    run(main)
