"""Do the dense benchmark's backbones keep the classification lead? Linear probe and kNN on Fashion-MNIST at 64 px.

    python benchmarks/experiments/dense_classification.py --tag budget30min
    python benchmarks/experiments/dense_classification.py --tag budget30min --resume

Reads `<out-dir>/<tag>.json` (dense_fmnist_scenes.py's report) and runs training/evaluate.py's frozen protocols
(`linear`: its weight decay chosen on a 10% hold-out of the train features; `knn`: no choice) on each method's
backbone (and random init), Fashion-MNIST's 60,000 train / 10,000 test garments through the scene recipe's 64-px
eval transform: single garments, where the backbones were pretrained on scenes of 2-4 of them. The test split is
read once per row.

Output: `<out-dir>/<tag>_classification.json` and `.md` (test top-1 per method and protocol), rewritten after every
method; `--resume` keeps finished ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: put the repository root on sys.path
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
from typing import Any  # noqa: E402

from benchmarks.experiments.dense_fmnist_scenes import (  # noqa: E402
    DEFAULT_OUT_DIR,
    LABELS,
    load_dense_report,
    pretrained_backbone,
    scene_recipe,
)
from training.protocols.evaluation import EvalConfig, evaluate  # noqa: E402
from training.run.hardware import describe_machine  # noqa: E402
from training.run.layout import write_text_atomic  # noqa: E402

PROTOCOLS = ("linear", "knn")
DEFAULT_METHODS = ("random", "dreamteacher", "dreamteacher-mix", "simclr", "byol")

logger = logging.getLogger("dreamteacher.bench.dense_classification")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tag", default="budget30min", help="the dense_fmnist_scenes.py run to read (default budget30min)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated subset of {','.join(DEFAULT_METHODS)} (default: all of them)")
    p.add_argument("--max-train", type=int, help="a seeded random N of the train images (quick runs)")
    p.add_argument("--max-test", type=int, help="a seeded random N of the test images (quick runs)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: every core)")
    p.add_argument("--resume", action="store_true", help="keep the finished methods")
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.method_list if m not in DEFAULT_METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; allowed: {', '.join(DEFAULT_METHODS)}")
    return args


def render(report: dict[str, Any]) -> str:
    lines = [f"# Fashion-MNIST classification of the dense benchmark's backbones ({report['settings']['tag']})", "",
             f"Machine: {report['machine']}", "",
             "Test top-1 (%) of the frozen backbones at 64 px (the scene recipe's eval transform), "
             f"{report.get('train_images', '?')} train / {report.get('test_images', '?')} test garments.", "",
             "| method | linear probe | kNN |", "|---|---|---|"]
    for method, entry in report["entries"].items():  # evaluate()'s rows, in PROTOCOLS' order
        lines.append(f"| {LABELS[method]} | " + " | ".join(f"{row['top1']:.2f}" for row in entry["results"].values())
                     + " |")
    lines += ["", f"Settings: `{json.dumps(report['settings'])}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    out_dir = Path(args.out_dir)
    source = load_dense_report(out_dir, args.tag, args.method_list)
    settings = {"tag": args.tag, "protocols": list(PROTOCOLS), "max_train": args.max_train,
                "max_test": args.max_test, "threads": args.threads}
    json_path = out_dir / f"{args.tag}_classification.json"
    report: dict[str, Any] = {"settings": settings, "entries": {}}
    if args.resume and json_path.is_file():
        report = json.loads(json_path.read_text())
        if report["settings"] != settings:
            raise SystemExit(f"--resume: {json_path} was made with other settings: {report['settings']}")
    report["machine"] = describe_machine()
    recipe = scene_recipe()
    config = EvalConfig(protocols=PROTOCOLS, max_train=args.max_train, max_test=args.max_test, threads=args.threads,
                        progress=not args.no_progress)
    for method in args.method_list:
        if method in report["entries"]:
            continue
        logger.info("evaluating %s", method)
        entry = evaluate(pretrained_backbone(method, source, recipe), config, recipe=recipe)
        report["entries"][method] = entry
        report["train_images"] = entry["settings"]["train_images"]
        report["test_images"] = entry["settings"]["test_images"]
        write_text_atomic(json_path, json.dumps(report, indent=2) + "\n")
        write_text_atomic(out_dir / f"{args.tag}_classification.md", render(report))
    print(render(report), flush=True)
    return report


if __name__ == "__main__":
    from training.run.cli import run

    run(main)
