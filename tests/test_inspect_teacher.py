"""training/inspect_teacher.py: the teacher's tap table for an image size, the student pairing, flags over a
recipe, and the exit codes for a bad command line or a missing teacher."""

from __future__ import annotations

import pytest

from dreamteacher_models.recipes import RECIPES
from training.inspect_teacher import main as inspect_main
from training.teacher.taps import describe_taps

pytest.importorskip("diffusers")


def test_describe_taps_and_cli(teacher, unet_dir, capsys):
    table = describe_taps(teacher, 32)
    assert "| up_blocks.0.resnets.1 | output_blocks.1 | 8 | 16 | (B, 16, 4, 4) |" in table
    assert inspect_main(["--kind", "unet", "--source", str(unet_dir), "--image-size", "32", "--taps", "mid_block"]) == 0
    out = capsys.readouterr().out
    assert "| mid_block | - | 8 | 16 | (B, 16, 4, 4) |" in out
    assert inspect_main(["--kind", "unet", "--source", "/no/such/dir/x"]) == 2
    assert "train_teacher.py" in capsys.readouterr().err


TAPS_TABLE = """
| tap | ADM alias | stride | channels | output shape |
|---|---|---|---|---|
| up_blocks.3.resnets.1 | output_blocks.7 | 1 | 8 | (B, 8, {0}, {0}) |
| up_blocks.2.resnets.1 | output_blocks.5 | 2 | 16 | (B, 16, {1}, {1}) |
| up_blocks.1.resnets.1 | output_blocks.3 | 4 | 16 | (B, 16, {2}, {2}) |
| up_blocks.0.resnets.1 | output_blocks.1 | 8 | 16 | (B, 16, {3}, {3}) |"""


def test_cli_prints_the_layout_every_flag_asks_for(unet_dir, capsys):
    argv = ["--kind", "unet", "--source", str(unet_dir)]
    assert inspect_main(argv) == 0
    assert capsys.readouterr().out == (
        f"teacher: kind=unet source={unet_dir} timestep=50 encoding=noise resolution=None\n"
        "images 32x32 are encoded at 32x32\n" + TAPS_TABLE.format(32, 16, 8, 4) + "\n")

    assert inspect_main([*argv, "--timestep", "7", "--encoding", "ddim", "--resolution", "64", "--image-size", "48",
                   "--student", "resnet18"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        f"teacher: kind=unet source={unet_dir} timestep=7 encoding=ddim resolution=64\n"
        "images 48x48 are encoded at 64x64; features are resampled to the images' grid\n"
        + TAPS_TABLE.format(48, 24, 12, 6) + "\n\n"
        "student resnet18 (levels at strides [2, 4, 8, 16, 32]) <- teacher taps, by stride (automatic pairing):\n")
    assert "| 8 | 8 | 16 | as is | 6x6 |" in out

    assert inspect_main([*argv, "--taps", "up_blocks.0.resnets.1", "--image-size", "16"]) == 0
    assert capsys.readouterr().out.endswith("| up_blocks.0.resnets.1 | output_blocks.1 | 8 | 16 | (B, 16, 2, 2) |\n")

    for bad in (["--kind", "unet"], ["--source", str(unet_dir)], [*argv, "--kind", "vae"],
                [*argv, "--encoding", "sde"], [*argv, "--timestep", "7.5"], [*argv, "--resolution", "x"]):
        with pytest.raises(SystemExit):
            inspect_main(bad)
    assert inspect_main(["--kind", "adm", "--source", str(unet_dir / "missing.pt")]) == 2
    assert "error: " in capsys.readouterr().err


def test_cli_takes_the_recipe_and_lets_flags_override_it(capsys):
    recipe = RECIPES["resnet18.dreamteacher_fmnist"]
    assert inspect_main(["--recipe", recipe.name, "--timestep", "9"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"teacher: kind={recipe.teacher.kind} source={recipe.teacher.source} timestep=9 ")
    assert f"student {recipe.arch} " in out and "(the recipe pairing)" in out
