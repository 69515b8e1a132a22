"""benchmarks/speed/gpu_check.py, the prepared GPU check, at toy size on the CPU: the same path end to end."""

from benchmarks.speed import gpu_check


def test_the_gpu_check_runs_both_recipes_through_a_resume_to_a_loadable_export(tmp_path):
    rows = gpu_check.main(["--size", "tiny", "--out", str(tmp_path), "--threads", "1"])
    assert [(r["recipe"], r["arch"], r["steps"]) for r in rows] == [
        ("resnet50.dreamteacher_in1k", "ResNet", 4), ("convnext_base.dreamteacher_in1k", "ConvNeXt", 4)]
    assert all(r["images_per_s"] > 0 and r["peak_gpu_gib"] is None for r in rows)
    for recipe in gpu_check.RECIPES:  # half-way checkpoint, then the resumed run's own
        assert sorted(p.name for p in (tmp_path / "runs" / recipe / "checkpoints").iterdir()) == ["step_2", "step_4"]
    report = (tmp_path / "gpu_check.md").read_text()
    assert report.startswith("| recipe | model loaded | steps | images/s (median) | peak GPU memory (GiB) |")
    assert "--size tiny on CPU" in report
