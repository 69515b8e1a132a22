"""Kill -9 both trainers at random moments, resume each time, and check that nothing was lost.

    python benchmarks/tools/fault_injection.py                    # both trainers, every kill site, 2 random points each
    python benchmarks/tools/fault_injection.py --trainer pretrain --points 3 --seed 1

Each trainer runs on a tiny fixture (tests/tiny.py: a random 4-level UNet teacher, 32 generated Fashion-MNIST-like
images, 6 steps, a checkpoint every step, 2 kept) once straight through, then again as a chain of runs in one
folder, each started with `--resume latest` and each SIGKILLed (the signal a job scheduler or the OOM killer sends:
no cleanup runs) at a random call of one kill site (a new chain starts when one has no step left to kill in):

* training step     inside the loss of a random micro-batch
* checkpoint write  inside `accelerator.save_state`, after the model and optimizer files, before the rest
* checkpoint rename inside the rename of a finished checkpoint to step_N, between moving the old one aside and
                    putting the new one in place
* rotation          while deleting a rotated-out checkpoint (one of its files gone)
* metrics line      half-way through writing a line of metrics.jsonl
* export            while writing the exported weights

A last resume runs each chain to the end. Checked: every killed run died from the signal (exit -9) or finished before
reaching the site, every resume completed, the final weights equal the straight run's bit for bit, and files lost
is 0 (a user's file in the run folder, every step's metrics line once, complete checkpoints, a complete export, no
temporary folder left). Prints one table row per trainer, then the bad inputs tried (unknown recipe, mistyped --set
values, missing teacher or data, unreadable or too few images, folders holding a user's files, ...) and the
one-line error each got. `tests/test_fault_injection.py` runs the same harness
with fewer points; in a child process (`--child`), this module installs the kill and runs the trainer.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

REPO = Path(__file__).resolve().parents[2]  # benchmarks/<kind>/ -> the repository root
TRAINERS = ("pretrain", "teacher")
SITES = ("training step", "checkpoint write", "checkpoint rename", "rotation", "metrics line", "export")
STEPS = 6
USER_FILE = "notes.txt"


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------------------
# The child: install one kill, run the trainer


def install_kill(trainer: str, site: str, at: int) -> None:
    """Make the `at`-th call of `site` SIGKILL this process (after doing part of its work, for the torn sites)."""
    import shutil

    import accelerate.accelerator

    import training.run.layout as layout

    calls = {"n": 0}

    def due() -> bool:
        calls["n"] += 1
        return calls["n"] == at

    def wrap(owner, name, before=None):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if due():
                if before is not None:
                    before(*args, **kwargs)
                die()
            return real(*args, **kwargs)

        setattr(owner, name, wrapper)

    if site == "training step":
        if trainer == "pretrain":
            import training.pretrain as module

            wrap(module, "distillation_loss")
        else:
            import training.train_teacher as module

            wrap(module.F, "mse_loss")
    elif site == "checkpoint write":
        wrap(accelerate.accelerator, "save_custom_state")
    elif site == "checkpoint rename":
        real_replace = layout.replace_dir

        def replace_dir(new, target):
            if Path(target).parent.name == layout.CHECKPOINTS_DIR and due():
                if target.exists():  # the old step_N moved aside, the new one not yet in place
                    old = target.with_name(f".{target.name}.old")
                    shutil.rmtree(old, ignore_errors=True)
                    target.rename(old)
                die()
            return real_replace(new, target)

        layout.replace_dir = replace_dir
    elif site == "rotation":
        real_rmtree = shutil.rmtree

        def rmtree(path, *args, **kwargs):
            path = Path(path)
            if path.name.startswith(".deleting_step_") and due():
                next(p for p in path.iterdir() if p.is_file()).unlink()
                die()
            return real_rmtree(path, *args, **kwargs)

        layout.shutil.rmtree = rmtree
    elif site == "metrics line":
        def half_line(run_dir, row):
            with open(Path(run_dir) / layout.METRICS_FILENAME, "a") as f:
                f.write(json.dumps(dict(row))[:15])
                f.flush()

        import training.pretrain as pretrain_module
        import training.train_teacher as teacher_module

        wrap(pretrain_module if trainer == "pretrain" else teacher_module, "append_metrics", before=half_line)
    elif site == "export":
        if trainer == "pretrain":
            import timm.models

            def half_weights(model, folder, **kwargs):
                Path(folder, "model.safetensors").write_bytes(b"\0" * 100)

            wrap(timm.models, "save_for_hf", before=half_weights)
        else:
            import diffusers

            wrap(diffusers.DDPMPipeline, "save_pretrained")
    else:
        raise ValueError(f"unknown kill site {site!r}; known: {', '.join(SITES)}")


def child_main(argv: list[str]) -> None:
    trainer, site, at, *trainer_argv = argv
    if site != "none":
        install_kill(trainer, site, int(at))
    if trainer == "pretrain":
        from training import pretrain

        pretrain.main(trainer_argv)
    else:
        from training import train_teacher

        train_teacher.main(trainer_argv)


# ---------------------------------------------------------------------------------------------------------------
# The parent: fixtures, runs, checks


def trainer_argv(trainer: str, run: Path, teacher: Path, data: Path) -> list[str]:
    if trainer == "pretrain":
        return ["--teacher", str(teacher), "--data-dir", str(data), "--output-dir", str(run), "--threads", "1",
                "--batch-size", "8", "--per-device-batch-size", "4", "--num-workers", "0", "--max-steps", str(STEPS),
                "--checkpoint-every", "1", "--keep-checkpoints", "2", "--log-every", "1", "--feature-images", "0",
                "--set", "regressor_width=16"]
    return ["--data-dir", str(data), "--output-dir", str(run), "--threads", "1", "--max-steps", str(STEPS),
            "--checkpoint-every", "1", "--keep-checkpoints", "2", "--log-every", "1",
            "--block-out-channels", "8,8,16,16", "--norm-num-groups", "4", "--batch-size", "24",
            "--per-device-batch-size", "8", "--lr-warmup-steps", "1", "--num-samples", "2",
            "--sample-steps", "2", "--sample-every", "1000"]


def run_child(trainer: str, site: str, at: int, argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "benchmarks.tools.fault_injection", "--child", trainer, site, str(at),
                           *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def final_weights(trainer: str, run: Path) -> dict:
    import safetensors.torch

    if trainer == "pretrain":
        return safetensors.torch.load_file(run / "export" / "model.safetensors")
    return safetensors.torch.load_file(run / "export" / "unet" / "diffusion_pytorch_model.safetensors")


def lost_files(trainer: str, run: Path) -> list[str]:
    """What a complete, uninterrupted run would have that this one lacks (or holds torn)."""
    from training.run.layout import METRICS_FILENAME, checkpoint_dirs

    lost = []
    if not (run / USER_FILE).is_file():
        lost.append(USER_FILE)
    rows = []
    for line in (run / METRICS_FILENAME).read_text().splitlines():
        try:
            rows.append(json.loads(line)["step"])
        except json.JSONDecodeError:
            lost.append(f"{METRICS_FILENAME}: torn line {line[:30]!r}")
    if rows != list(range(1, STEPS + 1)):
        lost.append(f"{METRICS_FILENAME}: steps {rows}")
    checkpoints = checkpoint_dirs(run)
    if not checkpoints or checkpoints[-1].name != f"step_{STEPS}":
        lost.append(f"checkpoint step_{STEPS}")
    for ckpt in checkpoints:
        if not {"model.safetensors", "run.json"} <= {p.name for p in ckpt.iterdir()}:
            lost.append(f"incomplete {ckpt.name}")
    leftovers = [p.name for p in run.rglob(".*") if p.name.startswith((".tmp", ".step", ".export", ".deleting"))]
    lost += [f"leftover {name}" for name in leftovers]
    export = run / "export"
    if trainer == "pretrain":
        from training.run.checksums import sha256_file

        sums = (export / "SHA256SUMS").read_text().split()
        if sums[0] != sha256_file(export / sums[1]):
            lost.append("export: checksum mismatch")
    elif not (export / "unet" / "diffusion_pytorch_model.safetensors").is_file():
        lost.append("export: no weights")
    return lost


@dataclass
class Report:
    trainer: str
    kills_tried: int = 0
    kills_landed: int = 0
    resumes_completed: int = 0
    weights_equal: bool = False
    lost: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)


def kill_plan(sites: list[str], points: int, rng: random.Random) -> list[str]:
    """The sites to kill at, `points` times each, in a seeded random order; export kills last (an export only
    happens at the end of a run, after which the other sites have little left to hit)."""
    plan = [site for site in sites if site != "export" for _ in range(points)]
    rng.shuffle(plan)
    return plan + ["export"] * (points if "export" in sites else 0)


def steps_left(run: Path) -> int:
    from training.run.layout import latest_checkpoint

    latest = latest_checkpoint(run)
    return STEPS - (int(latest.name[5:]) if latest else 0)


def run_trainer(trainer: str, sites: list[str], points: int, seed: int, work: Path) -> Report:
    """The straight run, then chains of killed-and-resumed runs: a chain's folder is resumed after every kill;
    a new chain starts when the current one has finished training and the next kill needs steps left."""
    from tests.tiny import make_tiny_teacher, write_fashion_mnist

    teacher = make_tiny_teacher(work / "teacher")
    data = write_fashion_mnist(work / "data", n=32)
    report = Report(trainer)
    straight = work / f"{trainer}_straight"
    done = run_child(trainer, "none", 0, trainer_argv(trainer, straight, teacher, data))
    if done.returncode:
        raise RuntimeError(f"the uninterrupted {trainer} run failed:\n{done.stderr[-3000:]}")
    reference = final_weights(trainer, straight)

    chains: list[Path] = []

    def new_chain() -> Path:
        run = work / f"{trainer}_killed_{len(chains)}"
        run.mkdir()
        (run / USER_FILE).write_text("a user's file: must survive everything")
        chains.append(run)
        return run

    run = new_chain()
    rng = random.Random(seed)
    for site in kill_plan(sites, points, rng):
        if site != "export" and steps_left(run) == 0:
            run = new_chain()
        # every site is called at least once per step left (export: once per run), so the kill always lands
        at = rng.randint(1, max(1, steps_left(run))) if site != "export" else 1
        report.kills_tried += 1
        argv = [*trainer_argv(trainer, run, teacher, data), "--resume", "latest"]
        result = run_child(trainer, site, at, argv)
        if result.returncode == -signal.SIGKILL:
            report.kills_landed += 1
            report.log.append(f"killed at {site} #{at}")
        elif result.returncode == 0:
            report.resumes_completed += 1
            report.log.append(f"{site} #{at} not reached: the run completed")
        else:
            raise RuntimeError(f"{trainer}: a resume after the kills so far failed (exit {result.returncode}) "
                               f"at {site} #{at}:\n{result.stderr[-3000:]}")
    report.weights_equal = True
    for run in chains:
        result = run_child(trainer, "none", 0, [*trainer_argv(trainer, run, teacher, data), "--resume", "latest"])
        if result.returncode:
            raise RuntimeError(f"{trainer}: the final resume of {run.name} failed:\n{result.stderr[-3000:]}")
        report.resumes_completed += 1
        weights = final_weights(trainer, run)
        report.weights_equal &= weights.keys() == reference.keys() and all(
            bool((weights[k] == reference[k]).all()) for k in reference)
        report.lost += [f"{run.name}: {item}" for item in lost_files(trainer, run)]
    report.log.append(f"{len(chains)} chain(s) of resumed runs")
    return report


def bad_inputs(work: Path) -> list[tuple[str, str]]:
    """(what was tried, the one-line error a user gets) for bad inputs to the trainers, export and publish; a bad
    input that is accepted, or an error that is not a user error (a bug's traceback), is reported as such."""
    from hub.export import main as export_main
    from hub.publish import publish
    from tests.tiny import make_tiny_teacher, write_fashion_mnist, write_image_folder
    from training import pretrain, train_teacher
    from training.run.cli import USER_ERRORS

    teacher = make_tiny_teacher(work / "teacher")
    data = write_fashion_mnist(work / "data", n=32)
    broken = write_image_folder(work / "broken", n=0, corrupt=8)
    empty = work / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images")
    import safetensors.torch
    import timm

    student = work / "student.safetensors"
    safetensors.torch.save_file(timm.create_model("resnet18", num_classes=0).state_dict(), str(student))
    users = work / "users_folder"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    base = ["--teacher", str(teacher), "--data-dir", str(data), "--threads", "1", "--num-workers", "0",
            "--batch-size", "8", "--feature-images", "0", "--no-export", "--max-steps", "1"]
    cases = [
        ("pretrain: unknown recipe", pretrain.main, ["--recipe", "resnet51.dreamteacher_in1k"]),
        ("pretrain: --set a bool field to 'no'", pretrain.main, [*base, "--set", "data.hflip=no"]),
        ("pretrain: --set an int field to 50.7", pretrain.main, [*base, "--set", "teacher.timestep=50.7"]),
        ("pretrain: --set an unknown field", pretrain.main, [*base, "--set", "teacher.timestamp=10"]),
        ("pretrain: missing teacher", pretrain.main, [*base, "--teacher", str(work / "no-teacher")]),
        ("pretrain: relative --data-dir that does not exist", pretrain.main, [*base, "--data-dir", "my_images"]),
        ("pretrain: image folder without images", pretrain.main, [*base, "--data-dir", str(empty)]),
        ("pretrain: every image unreadable", pretrain.main, [*base, "--data-dir", str(broken)]),
        ("pretrain: fewer images than a micro-batch", pretrain.main, [*base, "--limit-images", "3"]),
        ("pretrain: micro-batch not dividing the batch", pretrain.main, [*base, "--per-device-batch-size", "3"]),
        ("pretrain: --resume a folder that is no checkpoint", pretrain.main, [*base, "--resume", str(empty)]),
        ("teacher: --resolution not divisible by the UNet's downsampling", train_teacher.main,
         ["--data-dir", str(data), "--resolution", "30"]),
        ("teacher: --export-dir holding a user's file", train_teacher.main,
         ["--data-dir", str(data), "--output-dir", str(work / "t"), "--export-dir", str(users)]),
        ("export: --out holding a user's file", export_main,
         ["--checkpoint", str(student), "--recipe", "resnet18.dreamteacher_fmnist",
          "--out", str(users)]),
        ("publish: a folder that is no export", lambda argv: publish(*argv), [str(users)]),
    ]
    results = []
    for what, main, argv in cases:
        try:
            main(argv)
            results.append((what, "ACCEPTED (no error)"))
        except USER_ERRORS as e:
            results.append((what, f"{type(e).__name__}: {str(e).splitlines()[0]}"))
        except SystemExit as e:  # argparse's own one-line errors
            results.append((what, f"argparse error, exit status {e.code}"))
        except Exception as e:  # noqa: BLE001 - a bug: reported, not hidden
            results.append((what, f"NOT A USER ERROR {type(e).__name__}: {e}"))
    return results


def format_table(reports: list[Report]) -> str:
    lines = ["| trainer | kills tried | kills landed | resumes completed | final weights equal | files lost |",
             "|---|---|---|---|---|---|"]
    for r in reports:
        lines.append(f"| {r.trainer} | {r.kills_tried} | {r.kills_landed} | {r.resumes_completed} | "
                     f"{'yes' if r.weights_equal else 'no'} | {len(r.lost)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Report]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child_main(argv[1:])
        return []
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trainer", choices=[*TRAINERS, "both"], default="both")
    p.add_argument("--sites", default=",".join(SITES), help=f"comma-separated subset of: {', '.join(SITES)}")
    p.add_argument("--points", type=int, default=2, help="random kill points per site (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bad-inputs", action="store_true", help="skip the bad-input table")
    args = p.parse_args(argv)
    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    bad = [s for s in sites if s not in SITES]
    if bad:
        p.error(f"unknown kill site(s) {bad}; known: {', '.join(SITES)}")
    reports = []
    with tempfile.TemporaryDirectory(prefix="fault-injection-") as tmp:
        for trainer in TRAINERS if args.trainer == "both" else (args.trainer,):
            work = Path(tmp) / trainer
            work.mkdir()
            reports.append(run_trainer(trainer, sites, args.points, args.seed, work))
        print(format_table(reports))
        for r in reports:
            print(f"\n{r.trainer}: " + "; ".join(r.log))
            if r.lost:
                print(f"{r.trainer} lost: " + "; ".join(r.lost))
        if not args.no_bad_inputs:
            (Path(tmp) / "bad").mkdir()
            print("\n| bad input | error |\n|---|---|")
            for what, error in bad_inputs(Path(tmp) / "bad"):
                print(f"| {what} | {error.replace('|', '/')} |")
    return reports


if __name__ == "__main__":
    main()
