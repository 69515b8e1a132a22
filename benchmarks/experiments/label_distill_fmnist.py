"""Label distillation on Fashion-MNIST with 1% of the labels: does mix-distillation beat feature distillation?

    python benchmarks/experiments/label_distill_fmnist.py                   # the recipe's length, full split
    python benchmarks/experiments/label_distill_fmnist.py --steps 40 --max-train 2000 --max-test 1000 --tag quick

With the same 600 labels (1%, class-balanced: the split `training/evaluate.py` fine-tunes on), it compares

* (a) supervised: random init fine-tuned on the labels;
* (b) feature-distilled: `training/pretrain.py` (the recipe), then fine-tuned on the labels;
* (c) mix-distilled: the same plus the interpreter's soft labels on every image (`--interpreter`), fine-tuned;
* (c') the mix-distilled student's own task head (pooled C5 -> linear), no fine-tune;
* (d) the interpreter itself: `training/train_interpreter.py` on the frozen teacher's features;
* (e) lightly SimCLR for the same number of steps (benchmarks/experiments/ssl_baselines.py), fine-tuned.

Fine-tuning is `training/evaluate.py`'s (fresh linear head, AdamW, 40 epochs of the 1% labels, hflip). Every
pretraining run has the same steps and batch (`--steps`, default the recipe's 187 of 128); one seed. Output: a
markdown table and JSON in `benchmarks/results/label_distill_fmnist/<tag>.*`, written after each method.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from dreamteacher_models.recipes import DEFAULT_RECIPE, get_recipe  # noqa: E402
from training.run.hardware import describe_machine  # noqa: E402

FRACTION = 0.01
ROWS = {"supervised": "(a) supervised from random init", "feature": "(b) feature-distilled, fine-tuned",
        "mix": "(c) mix-distilled, fine-tuned", "mix_head": "(c') mix-distilled student's own head",
        "interpreter": "(d) interpreter on teacher features", "simclr": "(e) SimCLR (lightly), fine-tuned"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=DEFAULT_RECIPE)
    p.add_argument("--teacher", help="teacher folder (default: the recipe's)")
    p.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default: the recipe's)")
    p.add_argument("--steps", type=int, help="pretraining steps for (b), (c), (e) (default: the recipe's length)")
    p.add_argument("--batch-size", type=int, help="pretraining batch (default: the recipe's)")
    p.add_argument("--interpreter-epochs", type=int, default=100)
    p.add_argument("--ft-epochs", type=int, default=40)
    p.add_argument("--max-train", type=int, help="evaluate with a seeded random N of the train images")
    p.add_argument("--max-test", type=int, help="evaluate on a seeded random N of the test images")
    p.add_argument("--methods", default=",".join(ROWS), help=f"subset of {','.join(ROWS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (default: every core)")
    p.add_argument("--tag", default="full")
    p.add_argument("--out-dir", default="benchmarks/results/label_distill_fmnist")
    p.add_argument("--work-dir", default="runs/bench_label_distill")
    return p.parse_args(argv)


def common_pretrain_argv(args, out: Path) -> list[str]:
    argv = ["--recipe", args.recipe, "--output-dir", str(out), "--seed", str(args.seed), "--num-workers", "0",
            "--checkpoint-every", "0", "--feature-images", "0", "--log-every", "10"]
    for flag, value in (("--teacher", args.teacher), ("--data-dir", args.data_dir), ("--max-steps", args.steps),
                        ("--batch-size", args.batch_size), ("--threads", args.threads)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def head_top1(run: Path, recipe, args, device: str) -> float:
    """Top-1 of the mix-distilled student's own class head on the test images."""
    import safetensors.torch

    from training.labels.task_head import ClassHead
    from training.protocols.evaluation import dataset_labels, load_split, subsample
    from training.run.backbones import load_backbone
    from training.run.data import ImageDataset, build_dataloader, build_transform

    backbone = load_backbone(None, checkpoint=run / "export", recipe=recipe).to(device)
    state = safetensors.torch.load_file(str(run / "task_head" / "task_head.safetensors"))
    head = ClassHead(state["linear.weight"].shape[1], state["linear.weight"].shape[0])
    head.load_state_dict(state)
    test = load_split(args.data_dir, "test", recipe)
    if args.max_test:
        test = test.select(subsample(len(test), args.max_test, args.seed))
    labels = torch.as_tensor(dataset_labels(test))
    loader = build_dataloader(ImageDataset(test, build_transform(recipe.data, train=False)), 256, shuffle=False,
                              drop_last=False)
    predictions = []
    with torch.no_grad():
        for batch in loader:
            features = backbone.forward_features(batch["pixel_values"].to(device))
            predictions.append(head([features], []).argmax(1).cpu())
    return round(100.0 * float((torch.cat(predictions) == labels).float().mean()), 2)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    from training import pretrain, train_interpreter
    from training.protocols.evaluation import EvalConfig, evaluate
    from training.run.backbones import load_backbone
    from training.run.hardware import cpu_threads_per_process

    torch.set_num_threads(args.threads or cpu_threads_per_process())
    recipe = get_recipe(args.recipe)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(ROWS))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {','.join(ROWS)}")
    work = Path(args.work_dir) / args.tag
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fine_tune = EvalConfig(protocols="finetune", fractions=[FRACTION], ft_epochs=[args.ft_epochs],
                           data_dir=args.data_dir, max_train=args.max_train, max_test=args.max_test, seed=args.seed,
                           device=device, progress=False)
    report: dict[str, Any] = {"settings": vars(args), "machine": describe_machine(), "results": {}}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def record(method: str, top1: float, **extra) -> None:
        report["results"][method] = {"top1": top1, **extra}
        rows = ["| method | top-1 on t10k |", "|---|---|"]
        rows += [f"| {ROWS[m]} | {r['top1']:.2f} |" for m, r in report["results"].items()]
        (out_dir / f"{args.tag}.md").write_text("\n".join(rows) + f"\n\n{report['machine']}\n")
        (out_dir / f"{args.tag}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")

    def finetuned(backbone) -> float:
        return next(iter(evaluate(backbone.eval(), fine_tune, recipe=recipe)["results"].values()))["top1"]

    interpreter_dir = work / "interpreter"
    if {"interpreter", "mix", "mix_head"} & set(methods):
        interpreter_argv = ["--recipe", args.recipe, "--output-dir", str(interpreter_dir), "--labels-fraction",
                            str(FRACTION), "--epochs", str(args.interpreter_epochs), "--seed", str(args.seed)]
        for flag, value in (("--teacher", args.teacher), ("--data-dir", args.data_dir), ("--max-val", args.max_test),
                            ("--threads", args.threads)):
            if value is not None:
                interpreter_argv += [flag, str(value)]
        train_interpreter.main(interpreter_argv)
        info = json.loads((interpreter_dir / "interpreter.json").read_text())
        if "interpreter" in methods:
            record("interpreter", round(info["validation"]["score"], 2), images=info["validation"]["images"])
    if "supervised" in methods:
        torch.manual_seed(args.seed)
        from training.run.backbones import build_backbone

        record("supervised", finetuned(build_backbone(recipe)))
    if "feature" in methods:
        run = pretrain.main(common_pretrain_argv(args, work / "feature"))
        record("feature", finetuned(load_backbone(None, checkpoint=run / "export", recipe=recipe)))
    if {"mix", "mix_head"} & set(methods):
        run = pretrain.main(common_pretrain_argv(args, work / "mix") + ["--interpreter", str(interpreter_dir),
                                                                          "--export-task-head"])
        if "mix" in methods:
            record("mix", finetuned(load_backbone(None, checkpoint=run / "export", recipe=recipe)))
        if "mix_head" in methods:
            record("mix_head", head_top1(run, recipe, args, device))
    if "simclr" in methods:
        from benchmarks.experiments.indomain_fmnist import fresh_backbone
        from benchmarks.experiments.ssl_baselines import train_ssl
        from training.run.data import load_image_dataset

        hf = load_image_dataset(args.data_dir, split="train", recipe_data=recipe.data)
        backbone = fresh_backbone(recipe, args.seed)
        steps = args.steps or max(1, round(recipe.optim.epochs * len(hf) / recipe.optim.batch_size))
        train_ssl("simclr", backbone, hf, steps=steps, batch_size=args.batch_size or recipe.optim.batch_size,
                  input_size=recipe.data.input_size[-1], mean=recipe.data.mean, std=recipe.data.std, seed=args.seed,
                  device=device, progress=False)
        record("simclr", finetuned(backbone), steps=steps)
    print((out_dir / f"{args.tag}.md").read_text())
    return report


if __name__ == "__main__":
    main()
