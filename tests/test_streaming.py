"""Streaming under 2 CPU processes: each rank reads a disjoint part of the stream, together they read it all, and a
mid-epoch resume continues each rank's stream without repeats."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.tiny import write_image_folder

REPO = Path(__file__).resolve().parent.parent

RANK_SCRIPT = textwrap.dedent("""
    import hashlib, json, sys
    from accelerate import Accelerator
    import training.pretrain as pretrain
    from training.run.data import build_dataloader

    data_dir, out, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    args = pretrain.parse_args(["--data-dir", data_dir, "--streaming", "--num-workers", str(workers)])
    recipe = pretrain.recipe_from_args(args)
    accelerator = Accelerator()

    def epoch(skip=0, stop=None):  # the images of epoch 1 as the trainer reads them, from a fresh loader
        dataset, _ = pretrain.build_data(args, recipe, accelerator)
        loader = build_dataloader(dataset, 2, num_workers=workers, drop_last=False)
        _, _, loader = pretrain.prepare_for_training(accelerator, None, None, loader, args.streaming)
        seen = []
        for i, batch in enumerate(pretrain.epoch_batches(accelerator, loader, 1, skip, args.streaming)):
            if i == stop:
                break
            seen += [hashlib.sha256(image.numpy().tobytes()).hexdigest() for image in batch["pixel_values"]]
        return seen

    # a whole epoch, and the same epoch stopped after one micro-batch then resumed in a new loader
    result = {"epoch": epoch(), "before": epoch(stop=1), "after": epoch(skip=1)}
    with open(f"{out}.{accelerator.process_index}", "w") as f:
        json.dump(result, f)
""")


def write_parquet_shards(folder, shards: int = 4, per_shard: int = 3, size: int = 36):
    """The Hub's ImageNet layout in miniature: data/train-0000i-of-0000n.parquet with image bytes and labels."""
    import io

    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "data").mkdir(parents=True)
    for shard in range(shards):
        images = []
        for _ in range(per_shard):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="JPEG")
            images.append({"bytes": buffer.getvalue(), "path": None})
        ds = datasets.Dataset.from_dict({"image": images, "label": list(range(per_shard))},
                                        features=datasets.Features({"image": datasets.Image(),
                                                                    "label": datasets.Value("int64")}))
        ds.to_parquet(str(folder / "data" / f"train-{shard:05d}-of-{shards:05d}.parquet"))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize(("layout", "workers"), [("image folder", 0), ("parquet shards", 2)])
def test_two_ranks_stream_disjoint_halves_that_cover_the_data(tmp_path, layout, workers):
    data = (write_image_folder(tmp_path / "images", n=12) if layout == "image folder"
            else write_parquet_shards(tmp_path / "imagenet"))
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
                             str(data), str(tmp_path / "seen"), str(workers)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"seen.{r}").read_text()) for r in (0, 1)]
    rank0, rank1 = (r["epoch"] for r in ranks)
    assert len(rank0) == len(rank1) == 6  # half each, not a quarter (sharded once, not twice)
    assert not set(rank0) & set(rank1)
    assert len(set(rank0) | set(rank1)) == 12
    for r in ranks:  # a mid-epoch resume goes on where the stream stopped, flipped alike: no repeat, no gap
        assert len(r["before"]) == 2 and r["before"] + r["after"] == r["epoch"]


@pytest.mark.parametrize("shards, world_size, warned", [(4, 2, False), (3, 2, True)])
def test_the_sharding_mode_is_logged_and_reading_everything_on_every_rank_is_warned(caplog, shards, world_size,
                                                                                   warned):
    import datasets

    from training.run.data import split_streaming

    stream = datasets.Dataset.from_dict({"x": list(range(12))}).to_iterable_dataset(num_shards=shards)
    with caplog.at_level("INFO", logger="training.run.data"):
        mine = split_streaming(stream, seed=0, buffer_size=4, rank=0, world_size=world_size)
        split_streaming(stream, seed=0, buffer_size=4, rank=1, world_size=world_size)  # only rank 0 says it
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    infos = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    if warned:
        assert warnings == [f"streaming: {shards} shards are not a multiple of {world_size} ranks, so every rank reads "
                            f"the whole stream and keeps every {world_size}-th example ({world_size}x the reading); a "
                            f"dataset with a multiple of {world_size} shards lets each rank read only its own"]
    else:
        assert not warnings and infos == [f"streaming: {shards} shards over {world_size} ranks, each rank reads its "
                                          f"own {shards // world_size}"]
    assert len(list(mine)) == 12 // world_size  # either way a rank keeps its share, no example twice


def test_a_corrupt_streamed_image_is_skipped_and_the_rest_of_the_stream_still_comes(caplog):
    """`datasets` decodes inside its iterator, where an error ends the stream: the images are decoded one by one
    under the dataset's own guard instead, so six examples with the third corrupt give five images and one skip."""
    import io

    import datasets
    import numpy as np
    from PIL import Image

    from training.run.data import StreamingImageDataset

    def png(value):
        buffer = io.BytesIO()
        Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    images = [png(10 * i) for i in range(6)]
    images[2] = {"bytes": b"not a png", "path": None}
    stream = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
    first_pixel = StreamingImageDataset(stream.to_iterable_dataset(), lambda image: np.asarray(image)[0, 0, 0])
    with caplog.at_level("WARNING", logger="training.run.data"):
        items = list(first_pixel)
    assert [None if item is None else int(item["pixel_values"]) for item in items] == [0, 10, None, 30, 40, 50]
    assert "skipping unreadable streamed image 2: UnidentifiedImageError" in caplog.text


def test_a_reader_failure_mid_stream_stops_with_a_clear_error_instead_of_shortening_the_epoch():
    """A generator that raised is finished: yielding on would silently drop the rest of the worker's epoch."""
    import datasets

    from training.run.data import StreamingImageDataset, StreamReadError

    def rows():
        for i in range(6):
            if i == 3:
                raise ConnectionError("Server Disconnected")
            yield {"x": i}

    stream = StreamingImageDataset(datasets.IterableDataset.from_generator(rows), lambda x: x, image_key="x")
    seen = []
    with pytest.raises(StreamReadError, match=r"^streaming: reading example 3 of this worker's stream failed with "
                                               r"ConnectionError: Server Disconnected\. .*STREAMING_READ_MAX_RETRIES "
                                               r"= \d+\).*--resume"):
        for item in stream:
            seen.append(item["pixel_values"])
    assert seen == [0, 1, 2]
