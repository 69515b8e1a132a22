"""What the opt-in teacher-feature cache (training/distill/feature_cache.py) buys and what it changes.

    python benchmarks/speed/feature_cache.py                       # the Fashion-MNIST recipe and its committed teacher
    python benchmarks/speed/feature_cache.py --images 512 --batch 128 --rounds 7 --threads 2

Three measurements on the recipe's real teacher and Fashion-MNIST train images:

1. Flips: could the cache flip a stored map instead of encoding the mirror image? Per paired tap, the relative
   L2 distance between flip(teacher(x)) and teacher(flip(x)), each with its own noise draw, against the distance
   between two noise draws of teacher(x) (the stochastic encoding's own spread). A ratio near 1 would make the
   flipped map as good a target as a fresh encoding; measured far above 1, so the cache stores the mirror images'
   own encodings.
2. Build: images/s of writing the cache (one teacher pass per image, encoding and orientation) and its size.
3. Step: interleaved medians of the full distillation step online (teacher forward + student step) and with
   cached targets (memory-mapped lookup + student step), same batch, and the speed-up. Together with the build
   time this says after how many epochs the cache pays for itself: it pays when the run's epochs exceed about
   K x build-time-per-image / time-saved-per-image.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402

from benchmarks.common import interleaved_medians, probe_note  # noqa: E402
from dreamteacher_models.recipes import DEFAULT_RECIPE, get_recipe  # noqa: E402
from training.distill.distiller import build_distiller, distillation_loss  # noqa: E402
from training.distill.feature_cache import build_feature_cache, cache_key  # noqa: E402
from training.run.data import ImageDataset, build_transform, load_image_dataset  # noqa: E402
from training.run.hardware import describe_machine  # noqa: E402
from training.teacher.build import build_teacher  # noqa: E402
from training.teacher.sources import teacher_source  # noqa: E402


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=DEFAULT_RECIPE)
    p.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default: the recipe's)")
    p.add_argument("--images", type=int, default=512, help="train images cached and measured (default 512)")
    p.add_argument("--encodings", type=int, default=2, help="K encodings per image (default 2)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    recipe = get_recipe(args.recipe)
    teacher = build_teacher(recipe.teacher, recipe.data.mean, recipe.data.std, source=teacher_source(recipe))
    distiller, _ = build_distiller(recipe, dict(zip(teacher.strides, teacher.channels, strict=True)))
    teacher.keep_strides({pair.teacher_stride for pair in distiller.pairs})
    hf = load_image_dataset(args.data_dir, split="train", recipe_data=recipe.data)
    hf = hf.select(range(min(args.images, len(hf))))
    dataset = ImageDataset(hf, build_transform(recipe.data, train=True, hflip=False), return_index=True)
    images = torch.stack([dataset[i]["pixel_values"] for i in range(min(args.batch, len(dataset)))])

    # 1. flips against the encoding noise
    draws = [torch.Generator().manual_seed(s) for s in range(3)]
    plain_a, plain_b = teacher(images, generator=draws[0]), teacher(images, generator=draws[1])
    of_flipped = teacher(images.flip(-1), generator=draws[2])
    print(f"## teacher-feature cache: {recipe.name}, teacher {teacher.source}, t={teacher.timestep}\n")
    print(f"flip vs encoding noise ({len(images)} images; relative L2 distance):\n")
    print("| tap stride | flip(T(x)) vs T(flip x) | T(x) vs T(x), two noise draws | ratio |")
    print("|---|---|---|---|")
    for stride in sorted(plain_a):
        flip_err = relative_l2(plain_a[stride].flip(-1), of_flipped[stride])
        noise_err = relative_l2(plain_a[stride], plain_b[stride])
        print(f"| {stride} | {flip_err:.4f} | {noise_err:.4f} | {flip_err / noise_err:.2f} |")

    # 2. build
    tmp = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    try:
        key = cache_key(teacher, dataset, data_source="bench", encodings=args.encodings, flips=recipe.data.hflip,
                        seed=0)
        start = time.perf_counter()
        cache = build_feature_cache(tmp / "cache", teacher, dataset, key, batch_size=args.batch, progress=False)
        build_s = time.perf_counter() - start
        size = sum(f.stat().st_size for f in cache.folder.glob("*.npy"))
        passes = len(dataset) * args.encodings * cache.orientations
        print(f"\nbuild: {len(dataset)} images x {args.encodings} encodings x {cache.orientations} orientations in "
              f"{build_s:.1f} s ({passes / build_s:.0f} teacher passes/s); {size / passes / 1e3:.1f} kB per image, "
              f"encoding and orientation (60k images: {60_000 * size / passes / 1e9:.2f} GB each)")

        # 3. step, online vs cached
        opt = create_optimizer_v2(distiller, opt=recipe.optim.optimizer, lr=1e-4)
        indices = torch.arange(len(images))
        encodings = torch.zeros(len(images), dtype=torch.long)
        no_flips = torch.zeros(len(images), dtype=torch.bool)

        def step(targets):
            distillation_loss(distiller(images), targets, distiller.pairs, recipe.loss)["loss"].backward()
            opt.step()
            opt.zero_grad()

        medians, probes = interleaved_medians(
            {"online (teacher forward + step)": lambda: step(teacher(images)),
             "cached (lookup + step)": lambda: step(cache.lookup(indices, encodings, no_flips, "cpu"))},
            rounds=args.rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nstep at batch {len(images)}:\n")
    print("| variant | ms / batch | images/s |")
    print("|---|---|---|")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds * 1e3:.0f} | {len(images) / seconds:.0f} |")
    online, cached = medians.values()
    saved_per_image = (online - cached) / len(images)
    build_per_image = build_s / len(dataset)
    print(f"\nspeed-up of the step: {online / cached:.2f}x; the cache pays for itself after "
          f"{build_per_image / saved_per_image:.1f} epochs (K={args.encodings}, {cache.orientations} orientations)")
    print(f"{describe_machine()}; {args.rounds} interleaved rounds; {probe_note(probes)}")


if __name__ == "__main__":
    main()
