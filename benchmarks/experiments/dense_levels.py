"""Which pyramid level carries the dense semantics: the frozen per-pixel linear probe on one level at a time.

    python benchmarks/experiments/dense_levels.py --tag budget30min          # after dense_fmnist_scenes.py's run
    python benchmarks/experiments/dense_levels.py --tag budget30min --resume # continue an interrupted run

Reads `<out-dir>/<tag>.json` (dense_fmnist_scenes.py's report: the pretrained backbones and the protocol's
settings) and scores, for each method and each stride (C2..C5 = 4, 8, 16, 32; the teacher's taps at 4 and 8), the
frozen protocol of that report on that level alone: the same steps, validation carve, label subsets and test scenes,
so a level's row is comparable with the all-levels row of `<tag>.md`. Its question is the one issue 24 asks: which
levels does distillation teach, and where does a baseline's advantage sit.

Output: `<out-dir>/<tag>_levels.json` and `<tag>_levels.md` (test mIoU per method and stride x label count, mean of
seeds and each value), rewritten after every entry; `--resume` keeps finished entries.
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
import statistics  # noqa: E402
from dataclasses import replace  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from benchmarks.experiments.dense_fmnist_scenes import (  # noqa: E402
    DEFAULT_OUT_DIR,
    LABELS,
    METHODS,
    TEACHER_STRIDES,
    load_dense_report,
    pyramid_maker,
    scene_recipe,
)
from training.labels.dense_masks import num_classes_of  # noqa: E402
from training.protocols.dense_evaluation import DenseEvalConfig, evaluate_segmentation, label_counts  # noqa: E402
from training.protocols.segmentation import PYRAMID_STRIDES  # noqa: E402
from training.run.hardware import describe_machine  # noqa: E402
from training.run.layout import write_text_atomic  # noqa: E402

DEFAULT_METHODS = ("random", "teacher", "dreamteacher", "dreamteacher-mix", "simclr", "byol")

logger = logging.getLogger("dreamteacher.bench.dense_levels")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tag", default="budget30min", help="the dense_fmnist_scenes.py run to read (default budget30min)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (default {','.join(DEFAULT_METHODS)})")
    p.add_argument("--seeds", default="0,1", help="evaluation seeds (default 0,1)")
    p.add_argument("--labels", type=label_counts, default=[20, None], help="label counts (default 20,all)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: every core)")
    p.add_argument("--resume", action="store_true", help="keep the finished entries")
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.method_list if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; allowed: {', '.join(METHODS)}")
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    return args


def strides_of(method: str) -> tuple[int, ...]:
    return TEACHER_STRIDES if method == "teacher" else PYRAMID_STRIDES


def format_table(report: dict[str, Any]) -> str:
    """Test mIoU per method (rows) and stride x label count (columns): mean of seeds (each value)."""
    entries = report["entries"]
    columns = [(s, str(c)) for s in PYRAMID_STRIDES for c in report["settings"]["labels"]]
    lines = ["| method | " + " | ".join(f"stride {s}, {k} labels" for s, k in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for method in METHODS:
        if not any(k.startswith(f"{method}:") for k in entries):
            continue
        cells = []
        for stride, key in columns:
            values = [e["results"]["frozen"][key]["miou"] for k, e in sorted(entries.items())
                      if k.startswith(f"{method}:s{stride}:") and key in e["results"]["frozen"]]
            cells.append("-" if not values else f"{statistics.mean(values):.1f} ("
                         + ", ".join(f"{v:.1f}" for v in values) + ")")
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(report: dict[str, Any]) -> str:
    return "\n".join([
        f"# Dense prediction on Fashion-MNIST scenes, one level at a time ({report['settings']['tag']})", "",
        f"Machine: {report['machine']}", "",
        "Frozen per-pixel linear probe on a single pyramid level, test mIoU (%), mean of evaluation seeds (each "
        f"seed's value); {report.get('test_images', '?')} test scenes. The all-levels row of each method is in "
        f"`{report['settings']['tag']}.md`.", "", format_table(report), "",
        f"Settings: `{json.dumps(report['settings'])}`", ""])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    source = load_dense_report(out_dir, args.tag, args.method_list)
    s = source["settings"]
    settings = {"tag": args.tag, "labels": [c or "all" for c in args.labels], "steps": s["steps"],
                "eval_every": s["eval_every"], "val_images": s["val_images"], "max_test": s["max_test"],
                "threads": args.threads, "data": s["data"]}
    json_path = out_dir / f"{args.tag}_levels.json"
    report: dict[str, Any] = {"settings": settings, "entries": {}}
    if args.resume and json_path.is_file():
        report = json.loads(json_path.read_text())
        if report["settings"] != settings:
            raise SystemExit(f"--resume: {json_path} was made with other settings: {report['settings']}")
    report["machine"] = describe_machine()

    def save() -> None:
        write_text_atomic(json_path, json.dumps(report, indent=2) + "\n")
        write_text_atomic(out_dir / f"{args.tag}_levels.md", render(report))

    recipe = scene_recipe()
    base = DenseEvalConfig(data_dir=s["data"], num_classes=num_classes_of(Path(s["data"]), None), labels=args.labels,
                           protocols=("frozen",), val_images=s["val_images"], max_test=s["max_test"],
                           progress=not args.no_progress)
    for seed in args.seed_list:
        for method in args.method_list:
            for stride in strides_of(method):
                key = f"{method}:s{stride}:{seed}"
                if key in report["entries"]:
                    continue
                config = replace(base, seed=seed, frozen=replace(base.frozen, steps=s["steps"],
                                                                 eval_every=s["eval_every"]))
                logger.info("evaluating %s", key)
                entry = evaluate_segmentation(pyramid_maker(method, source, recipe, strides=(stride,)), recipe,
                                              config, model_name=f"{LABELS[method]}, stride {stride}")
                report["entries"][key] = entry
                report["test_images"] = entry["settings"]["test_images"]
                save()
    print(format_table(report), flush=True)
    return report


if __name__ == "__main__":
    from training.run.cli import run

    run(main)
