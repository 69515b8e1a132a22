"""Downstream evaluation of any timm backbone: linear probe, kNN, and fine-tuning with 1% / 10% of the labels.

    python training/evaluate.py --model resnet18 --random-init                      # a random-init baseline
    python training/evaluate.py --checkpoint runs/resnet18.dreamteacher_fmnist        # a training run (recipe.json)
    python training/evaluate.py --model local-dir:runs/resnet18.dreamteacher_fmnist/export --out results.json
    python training/evaluate.py --model resnet18.dreamteacher_fmnist                  # registered name (published)
    python training/evaluate.py --model hf-hub:dreamteacher/resnet18.dreamteacher_fmnist --protocols linear,knn

Protocols (all on a labeled dataset: by default Fashion-MNIST train to fit, t10k to report top-1 in percent; with
`--split validation`, a fixed class-balanced sixth of train is scored instead and the rest fits, so a choice made
on the numbers never reads the test split):

* ``linear``: global-average-pooled features of the frozen backbone (eval mode, no_grad, computed once for train and
  test), standardised with the train mean/std, then a multinomial logistic regression fitted full-batch with L-BFGS;
  its L2 weight decay is picked from a small grid on a seeded 10% hold-out of the train features (the search fits at
  most 10k of them), then the probe is refitted on all of them.
* ``knn``: the InstDisc / DINO weighted kNN on the same cached features: cosine similarity, the k=20 nearest train
  features vote for their class with weight exp(sim / 0.07).
* ``finetune``: the whole backbone plus a fresh linear head, trained on a class-balanced subset of the train labels
  (1% and 10%, chosen with the seed) with AdamW, linear warm-up + cosine decay, horizontal flips; test top-1.

Images go through the recipe's eval transform (`build_transform(recipe.data, train=False)`; the fine-tune adds the
flip). The recipe is `--recipe`, else the one a run / export folder carries (recipe.json), else the model name's
own recipe when it is a DreamTeacher checkpoint, else the default (resnet18.dreamteacher_fmnist, 32 px).

Output: a markdown table (protocol, metric, value) on stdout and, with `--out`, a JSON file
``{"model", "results": {protocol: {"top1": ...}}, "settings", "details", "machine", "seconds"}`` whose ``results``
is what ``python -m hub.export --results`` renders into the model card. Given the seed and the thread count,
every number is reproducible.

`--max-train` / `--max-test` subsample (seeded) for quick runs. The protocols are training/protocols/.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python training/evaluate.py` puts training/, not the repo root, on sys.path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import logging
from typing import Any

from dreamteacher_models.recipes import DEFAULT_RECIPE
from training.protocols.classification import DEFAULT_WEIGHT_DECAYS, check_fraction
from training.protocols.evaluation import (
    DEFAULT_FRACTIONS,
    DEFAULT_FT_EPOCHS,
    PROTOCOLS,
    EvalConfig,
    evaluate,
    format_table,
    parse_protocols,
    per_fraction,
)
from training.protocols.splits import SPLITS
from training.run.layout import write_report


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", help="timm name: registered (resnet18.dreamteacher_fmnist), local-dir:PATH, "
                                   "hf-hub:ID, or a plain architecture with --random-init")
    m.add_argument("--random-init", action="store_true", help="random weights (pretrained=False): the baseline")
    m.add_argument("--checkpoint", help="a training run dir, checkpoint dir or .safetensors file (student weights)")
    m.add_argument("--recipe", help="recipe for the eval transform (default: the run's/export's recipe.json, the "
                                    f"model name's recipe, else {DEFAULT_RECIPE})")
    d = p.add_argument_group("data")
    d.add_argument("--data-dir", help="folder of labeled images (IDX files, or imagefolder with train/ and test/); "
                                      "default: the recipe's dataset (Fashion-MNIST: the Debian folder)")
    d.add_argument("--split", choices=SPLITS, default="test",
                   help="score on the test split (default: reporting) or on a validation carve of train (1/6, "
                        "class-balanced, fixed; fitting uses the rest): for choosing settings without reading test")
    d.add_argument("--max-train", type=int, help="use a seeded random N of the train images (quick runs)")
    d.add_argument("--max-test", type=int, help="use a seeded random N of the test images (quick runs)")
    d.add_argument("--batch-size", type=int, default=256, help="feature extraction / test batch size (default 256)")
    d.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default 0)")
    e = p.add_argument_group("protocols")
    e.add_argument("--protocols", default=",".join(PROTOCOLS), help=f"comma-separated subset of {','.join(PROTOCOLS)}")
    e.add_argument("--k", type=int, default=20, help="kNN neighbours (default 20)")
    e.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature (default 0.07)")
    e.add_argument("--probe-wd", type=_floats, default=list(DEFAULT_WEIGHT_DECAYS),
                   help="linear-probe L2 weight decays to choose from on a 10%% hold-out (default "
                        f"{','.join(f'{w:g}' for w in DEFAULT_WEIGHT_DECAYS)})")
    e.add_argument("--probe-iters", type=int, default=100, help="L-BFGS iterations per probe fit (default 100)")
    e.add_argument("--ft-fractions", type=_floats, default=list(DEFAULT_FRACTIONS),
                   help="label fractions in (0, 1] to fine-tune with (default 0.01,0.1)")
    e.add_argument("--ft-epochs", type=_ints, default=list(DEFAULT_FT_EPOCHS),
                   help="fine-tune epochs, one value or one per fraction (default 40,8)")
    e.add_argument("--ft-batch-size", type=int, default=64, help="fine-tune batch size (default 64)")
    e.add_argument("--ft-lr", type=float, default=1e-3, help="fine-tune AdamW peak lr (default 1e-3)")
    e.add_argument("--ft-weight-decay", type=float, default=0.05, help="fine-tune AdamW weight decay (default 0.05)")
    e.add_argument("--ft-warmup", type=float, default=0.05, help="fraction of fine-tune steps warming up (0.05)")
    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, default=0, help="seed for subsets, splits, init and order (default 0)")
    r.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    r.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    r.add_argument("--out", help="write the JSON report here (e.g. results.json, for hub.export --results)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if not args.model and not args.checkpoint:
        p.error("pass --model NAME or --checkpoint RUN_DIR")
    try:
        parse_protocols(args.protocols)
        if "finetune" in parse_protocols(args.protocols):
            for f in args.ft_fractions:
                check_fraction(f)
            per_fraction(args.ft_epochs, args.ft_fractions, "--ft-epochs")
    except ValueError as err:
        p.error(str(err))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = EvalConfig(
        protocols=args.protocols, data_dir=args.data_dir, max_train=args.max_train, max_test=args.max_test,
        seed=args.seed, threads=args.threads, device=args.device, batch_size=args.batch_size,
        num_workers=args.num_workers, k=args.k, temperature=args.temperature, probe_weight_decays=args.probe_wd,
        probe_max_iter=args.probe_iters, fractions=args.ft_fractions, ft_epochs=args.ft_epochs,
        ft_batch_size=args.ft_batch_size, ft_lr=args.ft_lr, ft_weight_decay=args.ft_weight_decay,
        ft_warmup=args.ft_warmup, split=args.split, progress=not args.no_progress,
    )
    report = evaluate(args.model, config, random_init=args.random_init, checkpoint=args.checkpoint,
                      recipe=args.recipe)
    print(f"\n{report['model']} ({report['settings']['weights']}), {report['settings']['train_images']} train / "
          f"{report['settings']['test_images']} {args.split} images, {report['machine']['threads']} threads, "
          f"{report['seconds']['total']:.0f} s\n")
    print(format_table(report))
    if args.out:
        print(f"\nwrote {write_report(args.out, report)}")
    return report


if __name__ == "__main__":
    from training.run.cli import run

    run(main)
