"""Write the Fashion-MNIST scenes benchmark: real garments composed into scenes with exact per-pixel masks.

    python training/make_scenes.py                                   # datasets/fmnist_scenes_11, 64 px, seed 0
    python training/make_scenes.py --out /tmp/scenes --train 200 --test 100 --unlabelled 0   # a small copy

The folder has the DDPM-seg layout (real/train, real/test: .png + .npy class masks) that
training/evaluate_segmentation.py and `train_interpreter.py --task masks` read, plus unlabelled/ scenes to pretrain
on and a card (card.md, card.json). What a scene is: training/protocols/scenes.py. Deterministic: the same flags
give the same bytes, and a killed run completes the folder when started again.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import logging  # noqa: E402
import shlex  # noqa: E402

from training.protocols.scenes import SceneSpec, write_scenes  # noqa: E402
from training.run.data import MISSING_DATA_HELP, find_fashion_mnist, read_idx_split  # noqa: E402

DEFAULT_OUT = "datasets/fmnist_scenes_11"
logger = logging.getLogger("dreamteacher.scenes")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = SceneSpec()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT, help=f"benchmark folder (default {DEFAULT_OUT})")
    p.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default: the Debian folder)")
    p.add_argument("--size", type=int, default=d.size, help=f"scene side in pixels (default {d.size})")
    p.add_argument("--min-garments", type=int, default=d.min_garments)
    p.add_argument("--max-garments", type=int, default=d.max_garments)
    p.add_argument("--threshold", type=float, default=d.threshold,
                   help=f"gray level (0-1) above which a garment pixel is pasted and labelled (default {d.threshold})")
    p.add_argument("--train", type=int, default=d.train, help=f"labelled train scenes (default {d.train})")
    p.add_argument("--test", type=int, default=d.test, help=f"labelled test scenes (default {d.test})")
    p.add_argument("--unlabelled", type=int, default=d.unlabelled,
                   help=f"unlabelled scenes to pretrain on (default {d.unlabelled})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    spec = SceneSpec(size=args.size, min_garments=args.min_garments, max_garments=args.max_garments,
                     threshold=args.threshold, train=args.train, test=args.test, unlabelled=args.unlabelled,
                     seed=args.seed)
    spec.check()
    folder = find_fashion_mnist(args.data_dir)
    if folder is None:
        raise FileNotFoundError(f"no Fashion-MNIST IDX files found: {MISSING_DATA_HELP}")
    train, test = read_idx_split(folder, "train"), read_idx_split(folder, "test")
    for split, (_, labels) in (("train", train), ("test", test)):
        if labels is None:
            raise FileNotFoundError(f"{folder} has no {split} label file; scenes need the garments' classes")
    command = "python training/make_scenes.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    card = write_scenes(args.out, spec, train, test, command=command.strip(), progress=not args.no_progress)
    logger.info("wrote %s: %d train, %d test, %d unlabelled scenes, %d classes", args.out, spec.train, spec.test,
                spec.unlabelled, card["num_classes"])
    return card


if __name__ == "__main__":
    from training.run.cli import run

    run(main)
