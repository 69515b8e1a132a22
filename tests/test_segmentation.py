"""The segmentation protocols (training/protocols/segmentation.py, dense_evaluation.py, evaluate_segmentation.py)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import timm
import torch
from torch import nn

from training import evaluate_segmentation as cli
from training.labels.dense_masks import IGNORE_ID
from training.protocols.dense_evaluation import carve_validation, label_counts, labelled_subset
from training.protocols.scenes import SceneSpec, write_scenes
from training.protocols.segmentation import (
    FPNHead,
    LinearPixelHead,
    Pyramid,
    SegmentationConfig,
    confusion_matrix,
    iou_scores,
    score,
    train_segmentation,
)

COLOURS = torch.eye(3)  # class c is painted in pure channel c


class Pixels(nn.Module):
    """A fixed 'backbone': the image itself as its one level. Records the batch sizes it is called with."""

    channels = (3,)

    def __init__(self):
        super().__init__()
        self.calls: list[int] = []

    def forward(self, images):
        self.calls.append(len(images))
        return [images]


def block_scenes(n: int, shuffled: bool, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """32x32 images of 4x4 blocks of 8 px, each block one class painted in its colour; masks the classes (or, when
    `shuffled`, classes drawn independently of the image)."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        blocks = torch.randint(0, 3, (4, 4), generator=g)
        image = COLOURS[blocks].permute(2, 0, 1).repeat_interleave(8, 1).repeat_interleave(8, 2)
        labels = torch.randint(0, 3, (4, 4), generator=g) if shuffled else blocks
        items.append((image, labels.repeat_interleave(8, 0).repeat_interleave(8, 1)))
    return items


def _fit(shuffled: bool) -> float:
    torch.manual_seed(0)
    pyramid, head = Pixels(), LinearPixelHead((3,), 3)
    train, val = block_scenes(24, shuffled), block_scenes(8, shuffled, seed=1)
    config = SegmentationConfig(mode="frozen", steps=150, batch_size=8, lr=0.05, eval_every=50)
    loader = torch.utils.data.DataLoader(val, batch_size=8)
    train_segmentation(pyramid, head, train, loader, 3, config, "cpu", progress=False)
    test = torch.utils.data.DataLoader(block_scenes(8, shuffled, seed=2), batch_size=8)
    return iou_scores(score(pyramid, head, test, 3, "cpu"))[0]


def test_frozen_protocol_separates_linearly_separable_pixels_exactly():
    assert _fit(shuffled=False) == pytest.approx(100.0)


def test_frozen_protocol_is_near_chance_when_masks_ignore_the_image():
    assert _fit(shuffled=True) < 45  # 3 balanced classes at random: about 20% IoU each


def test_features_are_computed_per_batch_never_for_the_whole_set():
    pyramid, head = Pixels(), LinearPixelHead((3,), 3)
    train, val = block_scenes(40, False), block_scenes(12, False, seed=1)
    config = SegmentationConfig(mode="frozen", steps=6, batch_size=4, eval_every=3)
    train_segmentation(pyramid, head, train, torch.utils.data.DataLoader(val, batch_size=5), 3, config, "cpu",
                       progress=False)
    # 6 training batches of 4, then 2 validations of 12 images in batches of at most 5: bounded by the batch
    assert max(pyramid.calls) == 5
    assert pyramid.calls == [4, 4, 4, 5, 5, 2, 4, 4, 4, 5, 5, 2]


def test_best_validation_state_is_kept():
    pyramid, head = Pixels(), LinearPixelHead((3,), 3)
    config = SegmentationConfig(mode="frozen", steps=20, batch_size=8, lr=0.05, eval_every=5)
    val = torch.utils.data.DataLoader(block_scenes(8, False, seed=1), batch_size=8)
    fit = train_segmentation(pyramid, head, block_scenes(16, False), val, 3, config, "cpu", progress=False)
    assert [s for s, _ in fit["history"]] == [5, 10, 15, 20]
    assert fit["val_miou"] == max(v for _, v in fit["history"])
    best_step = max(fit["history"], key=lambda h: h[1])[0]
    assert fit["best_step"] == best_step
    assert iou_scores(score(pyramid, head, val, 3, "cpu"))[0] == pytest.approx(fit["val_miou"], abs=0.01)


def test_confusion_leaves_out_the_ignore_id_and_iou_is_per_class():
    target = torch.tensor([[0, 0, 1, IGNORE_ID]])
    pred = torch.tensor([[0, 1, 1, 0]])
    conf = confusion_matrix(pred, target, 3)
    assert conf.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]
    miou, per_class = iou_scores(conf)
    assert per_class == [pytest.approx(50.0), pytest.approx(50.0), None]  # class 2: in neither, left out
    assert miou == pytest.approx(50.0)


def test_pyramid_reads_c2_to_c5_of_a_timm_cnn_and_the_heads_predict_on_the_stride_4_grid():
    pyramid = Pyramid(timm.create_model("resnet18", num_classes=0), "resnet18")
    levels = pyramid(torch.randn(2, 3, 64, 64))
    assert pyramid.channels == (64, 128, 256, 512)
    assert [tuple(f.shape[-2:]) for f in levels] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert LinearPixelHead(pyramid.channels, 5)(levels).shape == (2, 5, 16, 16)
    assert FPNHead(pyramid.channels, 5)(levels).shape == (2, 5, 16, 16)


def test_finetune_trains_the_backbone_and_frozen_does_not():
    torch.manual_seed(0)
    data = [(torch.randn(3, 32, 32), torch.randint(0, 2, (32, 32))) for _ in range(4)]
    val = torch.utils.data.DataLoader(data, batch_size=4)
    for mode, head_cls in (("frozen", LinearPixelHead), ("finetune", FPNHead)):
        pyramid = Pyramid(timm.create_model("resnet18", num_classes=0))
        before = {k: v.clone() for k, v in pyramid.state_dict().items()}
        config = SegmentationConfig(mode=mode, steps=2, batch_size=4, eval_every=2)
        train_segmentation(pyramid, head_cls(pyramid.channels, 2), data, val, 2, config, "cpu", progress=False)
        changed = any(not torch.equal(before[k], v) for k, v in pyramid.state_dict().items())
        assert changed == (mode == "finetune"), mode


def test_validation_carve_is_fixed_and_disjoint_and_label_sets_nest():
    pool, val = carve_validation(100, 20)
    assert set(pool).isdisjoint(val) and len(pool) + len(val) == 100
    assert np.array_equal(val, carve_validation(100, 20)[1])
    small, large = labelled_subset(pool, 5, seed=3), labelled_subset(pool, 50, seed=3)
    assert set(small) <= set(large) and set(large) <= set(pool)
    assert not np.array_equal(labelled_subset(pool, 5, seed=4), small)
    with pytest.raises(ValueError, match="--labels 81"):
        labelled_subset(pool, 81, seed=0)
    with pytest.raises(ValueError, match="validation needs"):
        carve_validation(3, 3)


def test_label_counts_parse_all_and_refuse_garbage():
    assert label_counts("20, 200,all") == [20, 200, None]
    for bad in ("", "0", "ten"):
        with pytest.raises(argparse.ArgumentTypeError):
            label_counts(bad)


@pytest.fixture(scope="module")
def tiny_scenes(tmp_path_factory):
    rng = np.random.default_rng(0)
    garments = (rng.integers(0, 256, (30, 28, 28)).astype(np.uint8), rng.integers(0, 10, 30))
    root = tmp_path_factory.mktemp("scenes") / "tiny_scenes"
    write_scenes(root, SceneSpec(size=32, train=12, test=4, unlabelled=0), garments, garments, progress=False)
    return root


def test_the_command_writes_a_report_with_per_class_iou_and_a_picture(tiny_scenes, tmp_path):
    out, pictures = tmp_path / "seg.json", tmp_path / "pictures"
    report = cli.main(["--model", "resnet18", "--random-init", "--data-dir", str(tiny_scenes), "--labels", "2,all",
                       "--val-images", "3", "--steps", "2", "--eval-every", "1", "--batch-size", "2",
                       "--protocols", "frozen", "--out", str(out), "--pictures", str(pictures), "--no-progress"])
    saved = json.loads(out.read_text())
    assert saved["results"] == report["results"]
    rows = saved["results"]["frozen"]
    assert [rows["2"]["labelled_images"], rows["all"]["labelled_images"]] == [2, 9]  # 12 train - 3 validation
    assert len(rows["2"]["per_class_iou"]) == 11  # from the card: background + 10
    assert saved["settings"]["val_images"] == 3 and saved["settings"]["test_images"] == 4
    assert (pictures / "frozen_2.png").is_file() and (pictures / "frozen_all.png").is_file()


def test_the_command_refuses_bad_flags(tiny_scenes):
    with pytest.raises(SystemExit):
        cli.parse_args(["--model", "resnet18", "--data-dir", str(tiny_scenes), "--protocols", "linear"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--model", "resnet18", "--data-dir", str(tiny_scenes), "--steps", "0"])


def test_trainers_refuse_a_benchmark_folder_their_recipe_teacher_was_not_trained_for(tmp_path):
    from training import pretrain, train_interpreter
    from training.teacher.domain import check_teacher_domain, data_domain

    ffhq = tmp_path / "ffhq_34"
    ffhq.mkdir()
    with pytest.raises(ValueError, match="holds ffhq images.*trained on fashion-mnist.*--teacher"):
        train_interpreter.main(["--task", "masks", "--data-dir", str(ffhq), "--output-dir", str(tmp_path / "i")])
    with pytest.raises(ValueError, match="holds ffhq images"):
        pretrain.main(["--data-dir", str(ffhq), "--output-dir", str(tmp_path / "p")])
    from dreamteacher_models.recipes import apply_overrides, get_recipe

    own = get_recipe("resnet18.dreamteacher_fmnist")
    check_teacher_domain(apply_overrides(own, ["teacher.source='runs/my-ffhq-teacher'"]), ffhq)  # chosen: trusted
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    (scenes / "card.json").write_text('{"domain": "fashion-mnist", "num_classes": 11}')
    assert data_domain(scenes) == "fashion-mnist"
    check_teacher_domain(own, scenes)  # its own domain: no error
