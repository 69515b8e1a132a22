"""Images/s of the SimCLR / BYOL baselines with batched tensor views vs lightly's per-image PIL transforms.

    python benchmarks/speed/ssl_views.py                                   # Fashion-MNIST garments at 32 px
    python benchmarks/speed/ssl_views.py --data datasets/fmnist_scenes_11/unlabelled --size 64   # the dense scenes

For each method and view implementation (interleaved, medians over rounds): drawing one batch of two views alone,
and the whole training step as ssl_baselines.train_ssl runs it (views, forward of both views, loss, backward, SGD
step) on the recipe's resnet18. Source images/s = batch / seconds (each image gives two views). The DataLoader
of the PIL path runs on the main process (`--num-workers`, default 0), as the in-domain benchmark's baselines did.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402

import torch  # noqa: E402

from benchmarks.common import interleaved_medians, probe_note  # noqa: E402
from benchmarks.experiments.indomain_fmnist import fresh_backbone  # noqa: E402
from benchmarks.experiments.ssl_baselines import (  # noqa: E402
    AUGMENTS,
    SGD_MOMENTUM,
    SGD_WEIGHT_DECAY,
    SSL_METHODS,
    build_ssl_model,
    sgd_lr,
    two_view_stream,
)
from dreamteacher_models.recipes import DEFAULT_RECIPE, apply_overrides, get_recipe  # noqa: E402
from training.run.data import load_image_dataset  # noqa: E402
from training.run.hardware import describe_machine  # noqa: E402


def draw_views(batches: Iterator) -> Callable[[], None]:
    return lambda: next(batches)


def training_step(method: str, batches: Iterator, recipe) -> Callable[[], None]:
    """train_ssl's step on a fresh model of `method`: views, forward of both, loss, backward, SGD step."""
    model = build_ssl_model(method, fresh_backbone(recipe, 0)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=sgd_lr(recipe.optim.batch_size), momentum=SGD_MOMENTUM,
                                weight_decay=SGD_WEIGHT_DECAY)

    def step() -> None:
        x0, x1 = next(batches)
        loss = model.training_loss(x0, x1, 0, 100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="unlabelled images (default: the recipe's Fashion-MNIST train split)")
    p.add_argument("--size", type=int, default=32, help="view size in pixels (default 32)")
    p.add_argument("--images", type=int, default=4096, help="the first N images (default 4096)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers of the PIL path (default 0)")
    p.add_argument("--out", help="also write the table to this markdown file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = apply_overrides(get_recipe(DEFAULT_RECIPE), [f"data.input_size=(3,{args.size},{args.size})"])
    hf = load_image_dataset(args.data, split="train", recipe_data=recipe.data)
    hf = hf.select(range(min(args.images, len(hf))))
    data = recipe.data

    def stream(method: str, augment: str):
        return two_view_stream(method, hf, augment, batch_size=args.batch, input_size=args.size, mean=data.mean,
                               std=data.std, num_workers=args.num_workers)

    views = {f"{m}, {a}": draw_views(stream(m, a)) for m in SSL_METHODS for a in AUGMENTS}
    steps = {f"{m}, {a}": training_step(m, stream(m, a), recipe) for m in SSL_METHODS for a in AUGMENTS}
    view_s, probes = interleaved_medians(views, args.rounds)
    step_s, more = interleaved_medians(steps, args.rounds)
    lines = [f"# SSL baselines: tensor vs PIL views ({args.size} px, batch {args.batch}, {args.threads} threads)", "",
             f"Machine: {describe_machine()}; {probe_note(probes + more)}", "",
             f"Data: {args.data or data.name}, first {len(hf)} images; {args.rounds} interleaved rounds, medians.",
             "", "| method, views | views only: s/batch | images/s | full step: s | images/s | step vs PIL path |",
             "|---|---|---|---|---|---|"]
    for name in views:
        pil = step_s[f"{name.split(',')[0]}, lightly"]
        lines.append(f"| {name} | {view_s[name]:.3f} | {args.batch / view_s[name]:.0f} | {step_s[name]:.3f} | "
                     f"{args.batch / step_s[name]:.0f} | {pil / step_s[name]:.2f}x |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
