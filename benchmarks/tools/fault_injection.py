"""Kill -9 every trainer at random moments (or fill the disk under it), resume each time, check that nothing was lost.

    python benchmarks/tools/fault_injection.py                    # every trainer and kill site, 2 random points each
    python benchmarks/tools/fault_injection.py --trainer pretrain --points 3 --seed 1
    python benchmarks/tools/fault_injection.py --full-disk        # also fill a small tmpfs at every writer (root)

Each trainer runs on a tiny fixture (tests/tiny.py: a random 4-level UNet teacher, 32 generated Fashion-MNIST-like
images, 6 steps, a checkpoint every step) once straight through, then again as a chain of runs in one folder, each
started with `--resume latest` (plainly, as a fresh start, while the folder holds no checkpoint) and each SIGKILLed
(the signal a job scheduler or the OOM killer sends: no cleanup runs) at a random call of one kill site (a new chain
starts when one has no step left to kill in). The trainers: `pretrain` (distillation), `teacher` (train_teacher.py),
`interpreter` (train_interpreter.py, the dense task, one checkpoint kept) and `pretrain-cache` (distillation with
a teacher-feature cache, killed while building it). The sites:

* training step     inside the loss of a random micro-batch
* checkpoint write  inside `accelerator.save_state`, after the model and optimizer files, before the rest
* checkpoint rename between a finished checkpoint's save and its rename to step_N
* moved aside       inside the real `replace_dir`, after the existing folder (step_N re-saved by a resume of a finished
                    run, or the export) was moved aside and before the new one took its name
* rotation          while deleting a rotated-out checkpoint (one of its files gone)
* metrics line      half-way through writing a line of metrics.jsonl
* early kill        on a new chain, at the first metrics line (or step) before any checkpoint; restarted fresh
* export            while writing the exported weights
* cache build       while the feature cache is being encoded

A last resume runs each chain to the end. Checked: every killed run died from the signal (exit -9) or finished before
reaching the site, every resume completed, the final weights equal the straight run's bit for bit, and files lost
is 0 (a user's file in the run folder, every step's metrics line once, complete checkpoints, a complete export whose
SHA256SUMS match every file, weights included, no temporary folder left).

With `--full-disk` (root, to mount a tmpfs), each writer (checkpoint, metrics line, export, cache) instead finds the
disk full: the chain's folder is on a small tmpfs that the child fills up right before the writer runs. Checked: the
run stops with the one-line "the disk is full" error, and after the filler is removed the resumed chain ends bit-exact
with nothing lost. Prints a table per trainer and per site, then the bad inputs tried (unknown recipe, mistyped --set
values, missing or corrupt teacher, unreadable or too few images, folders holding a user's files, ...) and the
one-line error each got. `tests/test_fault_injection.py` runs the same harness with fewer points; in a child process
(`--child`), this module installs the kill and runs the trainer.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

REPO = Path(__file__).resolve().parents[2]  # benchmarks/<kind>/ -> the repository root
SITES = ("training step", "checkpoint write", "checkpoint rename", "moved aside", "rotation", "metrics line",
         "early kill", "export", "cache build")
TRAINER_SITES = {
    "pretrain": SITES[:-1],
    "teacher": SITES[:-1],
    "interpreter": ("training step", "checkpoint write", "checkpoint rename", "rotation", "early kill", "export"),
    "pretrain-cache": ("cache build",),
    "pretrain-2proc": ("training step", "checkpoint write", "checkpoint rename", "rotation", "metrics line", "export"),
}
TRAINERS = tuple(TRAINER_SITES)
FULL_DISK_SITES = {"pretrain": ("checkpoint write", "metrics line", "export"),
                   "teacher": ("checkpoint write", "metrics line", "export"),
                   "interpreter": ("checkpoint write", "export"),
                   "pretrain-cache": ("cache build",), "pretrain-2proc": ()}
END_OF_RUN_SITES = ("export", "moved aside")  # they land only where a run ends
STEPS = 6
USER_FILE = "notes.txt"
FILL_ENV = "FAULT_INJECTION_FILL"  # the child fills the disk through this file instead of dying
TMPFS_SIZE = "1g"


def die() -> None:
    filler = os.environ.get(FILL_ENV)
    if filler:
        fill_disk(Path(filler))
    else:
        os.kill(os.getpid(), signal.SIGKILL)


def fill_disk(filler: Path) -> None:
    """Write zeros to `filler` until the file system is full: the writer that runs next finds no space."""
    chunk = b"\0" * (1 << 20)
    with open(filler, "ab", buffering=0) as f:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    f.write(chunk[:size])
            except OSError:
                continue


# ---------------------------------------------------------------------------------------------------------------
# The child: install one kill, run the trainer


def install_kill(trainer: str, site: str, at: int) -> None:
    """Make the `at`-th call of `site` SIGKILL this process (after doing part of its work, for the torn sites), or,
    with FILL_ENV set, fill the disk right before it runs."""
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

    if site == "training step" or (site == "early kill" and trainer == "interpreter"):
        if trainer == "interpreter":
            import training.train_interpreter as module

            wrap(module, "interpreter_loss")
        elif trainer.startswith("pretrain"):
            import training.pretrain as module

            wrap(module, "distillation_loss")
        else:
            import training.teacher.ddpm as module  # the denoising loss: torch's mse_loss, once per micro-batch

            wrap(module.F, "mse_loss")
    elif site == "checkpoint write":
        wrap(accelerate.accelerator, "save_custom_state")
    elif site == "checkpoint rename":
        real_replace = layout.replace_dir

        def replace_dir(new, target):
            if Path(target).parent.name == layout.CHECKPOINTS_DIR and due():
                die()
            return real_replace(new, target)

        layout.replace_dir = replace_dir
    elif site == "moved aside":
        real_rename = Path.rename

        def rename(self, target):
            moved = real_rename(self, target)
            if Path(target) == layout.moved_aside(self) and due():  # the old folder aside, the new not in place
                die()
            return moved

        Path.rename = rename
    elif site == "rotation":
        real_rmtree = shutil.rmtree

        def rmtree(path, *args, **kwargs):
            path = Path(path)
            if path.name.startswith(".deleting_step_") and due():
                next(p for p in path.iterdir() if p.is_file()).unlink()
                die()
            return real_rmtree(path, *args, **kwargs)

        layout.shutil.rmtree = rmtree
    elif site in ("metrics line", "early kill"):
        def half_line(run_dir, row):
            with open(Path(run_dir) / layout.METRICS_FILENAME, "a") as f:
                f.write(json.dumps(dict(row))[:15])
                f.flush()

        import training.pretrain as pretrain_module
        import training.train_teacher as teacher_module

        wrap(pretrain_module if trainer.startswith("pretrain") else teacher_module, "append_metrics", before=half_line)
    elif site == "export":
        if trainer == "interpreter":
            import safetensors.torch

            def half_file(tensors, path, *args, **kwargs):
                Path(path).write_bytes(b"\0" * 100)

            wrap(safetensors.torch, "save_file", before=half_file)
        elif trainer.startswith("pretrain"):
            import timm.models

            def half_weights(model, folder, **kwargs):
                Path(folder, "model.safetensors").write_bytes(b"\0" * 100)

            wrap(timm.models, "save_for_hf", before=half_weights)
        else:
            import diffusers

            def half_pipeline(pipeline, folder, *args, **kwargs):  # the UNet's weights half written, then the kill
                weights = Path(folder, "unet", "diffusion_pytorch_model.safetensors")
                weights.parent.mkdir(parents=True, exist_ok=True)
                weights.write_bytes(b"\0" * 100)

            wrap(diffusers.DDPMPipeline, "save_pretrained", before=half_pipeline)
    elif site == "cache build":
        import training.distill.feature_cache as cache

        wrap(cache, "encoding_generator")
    else:
        raise ValueError(f"unknown kill site {site!r}; known: {', '.join(SITES)}")


def child_main(argv: list[str]) -> None:
    trainer, site, at, *trainer_argv = argv
    if site != "none":
        install_kill(trainer, site, int(at))
    if trainer.startswith("pretrain"):
        from training import pretrain as module
    elif trainer == "interpreter":
        from training import train_interpreter as module
    else:
        from training import train_teacher as module
    from training.run.cli import run

    run(lambda: module.main(trainer_argv), prog=f"{trainer} (fault injection)")


# ---------------------------------------------------------------------------------------------------------------
# The parent: fixtures, runs, checks


def trainer_argv(trainer: str, run: Path, teacher: Path, data: Path) -> list[str]:
    if trainer.startswith("pretrain"):
        cache = ["--feature-cache", str(run / "cache"), "--cache-encodings", "1"] if trainer == "pretrain-cache" else []
        return ["--teacher", str(teacher), "--data-dir", str(data), "--output-dir", str(run), "--threads", "1",
                "--batch-size", "8", "--per-device-batch-size", "4", "--num-workers", "0", "--max-steps", str(STEPS),
                "--checkpoint-every", "1", "--keep-checkpoints", "2", "--log-every", "1", "--feature-images", "0",
                "--set", "regressor_width=16", *cache]
    if trainer == "interpreter":  # 4 labelled images, a batch of 4: one step per epoch, a checkpoint per epoch
        return ["--teacher", str(teacher), "--data-dir", str(data), "--output-dir", str(run), "--threads", "1",
                "--task", "fmnist-masks", "--labels", "4", "--batch-size", "4", "--epochs", str(STEPS),
                "--width", "32", "--max-val", "8", "--validate-every", "3"]
    return ["--data-dir", str(data), "--output-dir", str(run), "--threads", "1", "--max-steps", str(STEPS),
            "--checkpoint-every", "1", "--keep-checkpoints", "2", "--log-every", "1",
            "--block-out-channels", "8,8,16,16", "--norm-num-groups", "4", "--batch-size", "24",
            "--per-device-batch-size", "8", "--lr-warmup-steps", "1", "--num-samples", "2",
            "--sample-steps", "2", "--sample-every", "1000"]


def run_child(trainer: str, site: str, at: int, argv: list[str], filler: Path | None = None
              ) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop(FILL_ENV, None)
    if filler is not None:
        env[FILL_ENV] = str(filler)
    launcher = [sys.executable]
    if trainer == "pretrain-2proc":  # two CPU processes (gloo), as `accelerate launch` starts them
        env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
        launcher += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                     "--mixed_precision", "no", "--dynamo_backend", "no"]
    return subprocess.run([*launcher, "-m", "benchmarks.tools.fault_injection", "--child", trainer, site, str(at),
                           *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def final_weights(trainer: str, run: Path) -> dict:
    import safetensors.torch

    if trainer.startswith("pretrain"):
        return safetensors.torch.load_file(run / "export" / "model.safetensors")
    if trainer == "interpreter":
        return safetensors.torch.load_file(run / "interpreter.safetensors")
    return safetensors.torch.load_file(run / "export" / "unet" / "diffusion_pytorch_model.safetensors")


def lost_files(trainer: str, run: Path) -> list[str]:
    """What a complete, uninterrupted run would have that this one lacks (or holds torn)."""
    from training.run.layout import METRICS_FILENAME, checkpoint_dirs

    lost = []
    if not (run / USER_FILE).is_file():
        lost.append(USER_FILE)
    if trainer != "interpreter":
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
    leftovers = [p.name for p in run.rglob(".*")
                 if p.name.startswith((".tmp", ".step", ".export", ".deleting")) or ".partial-" in p.name]
    lost += [f"leftover {name}" for name in leftovers]
    if trainer.startswith("pretrain"):
        from training.run.checksums import read_checksums, sha256_file

        export = run / "export"
        sums = read_checksums(export)
        if "model.safetensors" not in sums:
            lost.append("export: SHA256SUMS lists no weights")
        lost += [f"export: {name} does not match SHA256SUMS" for name, digest in sums.items()
                 if sha256_file(export / name) != digest]
        if trainer == "pretrain-cache" and not (run / "cache" / "cache.json").is_file():
            lost.append("feature cache: not complete")
    elif trainer == "interpreter":
        if not (run / "interpreter.json").is_file():
            lost.append("interpreter.json")
    elif not (run / "export" / "unet" / "diffusion_pytorch_model.safetensors").is_file():
        lost.append("export: no weights")
    return lost


@dataclass
class Report:
    trainer: str
    mode: str = "kill"  # or "full disk"
    kills_tried: int = 0
    kills_landed: int = 0
    resumes_completed: int = 0
    weights_equal: bool = False
    lost: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    sites: dict[str, list[int]] = field(default_factory=dict)  # site: [tried, landed]


def kill_plan(sites: list[str], points: int, rng: random.Random) -> list[str]:
    """The sites to kill at, `points` times each, in a seeded random order; the end-of-run sites last (an export
    only happens at the end of a run, after which the other sites have little left to hit)."""
    plan = [site for site in sites if site not in END_OF_RUN_SITES for _ in range(points)]
    rng.shuffle(plan)
    return plan + [site for site in END_OF_RUN_SITES if site in sites for _ in range(points)]


def steps_left(run: Path) -> int:
    from training.run.layout import latest_checkpoint

    latest = latest_checkpoint(run)
    return STEPS - (int(latest.name[5:]) if latest else 0)


def resume_argv(argv: list[str], run: Path) -> list[str]:
    """As a user restarts a killed job: `--resume latest` once the folder holds a checkpoint, plainly before."""
    from training.run.layout import latest_checkpoint

    return [*argv, "--resume", "latest"] if latest_checkpoint(run) else argv


def landed(result: subprocess.CompletedProcess, full_disk: bool) -> bool:
    if full_disk:
        return result.returncode == 2 and "the disk is full" in result.stderr
    if result.returncode and "Signal 9 (SIGKILL)" in result.stderr:  # a rank killed: the launcher stops the others
        return True
    return result.returncode == -signal.SIGKILL


def finished(trainer: str, run: Path) -> bool:
    done = run / ("interpreter.json" if trainer == "interpreter" else "export")
    return steps_left(run) == 0 and done.exists()


def run_trainer(trainer: str, sites: list[str], points: int, seed: int, work: Path, chains_dir: Path | None = None,
                full_disk: bool = False) -> Report:
    """The straight run, then chains of killed-and-resumed runs: a chain's folder is resumed after every kill;
    a new chain starts when the current one has finished training and the next kill needs steps left (or, for an
    early kill, any checkpoint). With `full_disk`, the chains live in `chains_dir` (a small file system) and each
    "kill" fills it up instead; the filler is removed before the next run."""
    from tests.tiny import make_tiny_teacher, write_fashion_mnist

    teacher = make_tiny_teacher(work / "teacher")
    data = write_fashion_mnist(work / "data", n=32)
    write_fashion_mnist(data, n=16, seed=1, split="test")  # the interpreter validates on it
    report = Report(trainer, "full disk" if full_disk else "kill")
    straight = work / f"{trainer}_straight"
    done = run_child(trainer, "none", 0, trainer_argv(trainer, straight, teacher, data))
    if done.returncode:
        raise RuntimeError(f"the uninterrupted {trainer} run failed:\n{done.stderr[-3000:]}")
    reference = final_weights(trainer, straight)
    chains_dir = chains_dir or work
    filler = chains_dir / "filler" if full_disk else None

    chains: list[Path] = []

    def new_chain() -> Path:
        run = chains_dir / f"{trainer}_killed_{len(chains)}"
        run.mkdir()
        (run / USER_FILE).write_text("a user's file: must survive everything")
        chains.append(run)
        return run

    def run_to_end(run: Path) -> None:
        result = run_child(trainer, "none", 0, resume_argv(trainer_argv(trainer, run, teacher, data), run))
        if result.returncode:
            raise RuntimeError(f"{trainer}: a resume of {run.name} failed:\n{result.stderr[-3000:]}")
        report.resumes_completed += 1

    run = new_chain()
    rng = random.Random(seed)
    for site in kill_plan(sites, points, rng):
        if site == "early kill" and steps_left(run) < STEPS:
            run = new_chain()
        elif site in END_OF_RUN_SITES and site != "export" and not finished(trainer, run):
            run_to_end(run)  # "moved aside" needs a finished run to resume: its step_N or export is replaced
            report.log.append(f"{run.name} run to its end first")
        elif site not in END_OF_RUN_SITES and site != "cache build" and steps_left(run) == 0:
            run = new_chain()
        # every site is called at least once per step left (export, moved aside: once per run), so a kill lands
        at = 1 if site in (*END_OF_RUN_SITES, "early kill") else rng.randint(1, max(1, steps_left(run)))
        if site == "cache build":  # 32 images: one batch, encoded plain and flipped; the maps are made at the first
            at = 1 if full_disk else rng.randint(1, 2)
        report.kills_tried += 1
        tried = report.sites.setdefault(site, [0, 0])
        tried[0] += 1
        result = run_child(trainer, site, at, resume_argv(trainer_argv(trainer, run, teacher, data), run), filler)
        if filler is not None:
            filler.unlink(missing_ok=True)
        if landed(result, full_disk):
            report.kills_landed += 1
            tried[1] += 1
            report.log.append(f"{'disk full' if full_disk else 'killed'} at {site} #{at}")
        elif result.returncode == 0:
            report.resumes_completed += 1
            report.log.append(f"{site} #{at} not reached: the run completed")
        else:
            raise RuntimeError(f"{trainer}: a run after the kills so far failed (exit {result.returncode}) "
                               f"at {site} #{at}:\n{result.stderr[-3000:]}")
        if full_disk and landed(result, full_disk):
            error = next(line for line in reversed(result.stderr.splitlines()) if "the disk is full" in line)
            report.log.append(f"the error: {error[:200]}")
    report.weights_equal = True
    for run in chains:
        run_to_end(run)
        weights = final_weights(trainer, run)
        report.weights_equal &= weights.keys() == reference.keys() and all(
            bool((weights[k] == reference[k]).all()) for k in reference)
        report.lost += [f"{run.name}: {item}" for item in lost_files(trainer, run)]
    report.log.append(f"{len(chains)} chain(s) of resumed runs")
    return report


@contextlib.contextmanager
def small_file_system(folder: Path) -> Iterator[str | None]:
    """Mount a `TMPFS_SIZE` tmpfs at `folder` for the full-disk runs; yields None, or why it could not."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode:
        yield f"cannot mount a tmpfs ({mounted.stderr.strip() or mounted.returncode}): run as root"
        return
    try:
        yield None
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def bad_inputs(work: Path) -> list[tuple[str, str]]:
    """(what was tried, the one-line error a user gets) for bad inputs to the trainers, export and publish; a bad
    input that is accepted, or an error that is not a user error (a bug's traceback), is reported as such."""
    from hub.export import main as export_main
    from hub.publish import publish
    from tests.tiny import make_tiny_teacher, write_fashion_mnist, write_image_folder
    from training import pretrain, train_interpreter, train_teacher
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
    corrupt_teacher = work / "corrupt_teacher"
    shutil.copytree(teacher, corrupt_teacher)
    for weights in corrupt_teacher.rglob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:200])  # cut short, as an interrupted download leaves it
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
        ("pretrain: --log-every 0", pretrain.main, [*base, "--log-every", "0"]),
        ("pretrain: --lr 0", pretrain.main, [*base, "--lr", "0"]),
        ("pretrain: --max-steps -5", pretrain.main, [*base, "--max-steps", "-5"]),
        ("pretrain: a teacher whose weights file is cut short", pretrain.main,
         [*base, "--teacher", str(corrupt_teacher)]),
        ("pretrain: an image size the teacher cannot divide", pretrain.main,
         [*base, "--set", "data.input_size=(3,30,30)"]),
        ("interpreter: --resume a folder that is no checkpoint", train_interpreter.main,
         ["--teacher", str(teacher), "--data-dir", str(data), "--resume", str(empty)]),
        ("teacher: --resolution not divisible by the UNet's downsampling", train_teacher.main,
         ["--data-dir", str(data), "--resolution", "30"]),
        ("teacher: --export-dir holding a user's file", train_teacher.main,
         ["--data-dir", str(data), "--output-dir", str(work / "t"), "--export-dir", str(users)]),
        ("export: --out holding a user's file", export_main,
         ["--checkpoint", str(student), "--recipe", "resnet18.dreamteacher_fmnist",
          "--out", str(users)]),
        ("export: --out . (the current folder)", export_main,
         ["--checkpoint", str(student), "--recipe", "resnet18.dreamteacher_fmnist", "--out", "."]),
        ("publish: a folder that is no export", lambda argv: publish(*argv), [str(users)]),
    ]
    results = []
    for what, main, argv in cases:
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                main(argv)
            results.append((what, "ACCEPTED (no error)"))
        except USER_ERRORS as e:
            results.append((what, f"{type(e).__name__}: {str(e).splitlines()[0]}"))
        except SystemExit as e:  # argparse's own one-line errors
            last = (stderr.getvalue().strip().splitlines() or [""])[-1]
            results.append((what, f"exit status {e.code}: {last}"))
        except Exception as e:  # noqa: BLE001 - a bug: reported, not hidden
            results.append((what, f"NOT A USER ERROR {type(e).__name__}: {e}"))
    return results


def format_table(reports: list[Report]) -> str:
    lines = ["| trainer | fault | kills tried | kills landed | resumes completed | final weights equal | files lost |",
             "|---|---|---|---|---|---|---|"]
    for r in reports:
        lines.append(f"| {r.trainer} | {r.mode} | {r.kills_tried} | {r.kills_landed} | {r.resumes_completed} | "
                     f"{'yes' if r.weights_equal else 'no'} | {len(r.lost)} |")
    return "\n".join(lines)


def format_sites(reports: list[Report]) -> str:
    lines = ["| trainer | fault | site | tried | landed |", "|---|---|---|---|---|"]
    for r in reports:
        lines += [f"| {r.trainer} | {r.mode} | {site} | {tried} | {hit} |" for site, (tried, hit) in r.sites.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Report]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child_main(argv[1:])
        return []
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trainer", choices=[*TRAINERS, "all"], default="all")
    p.add_argument("--sites", help=f"comma-separated subset of: {', '.join(SITES)} (default: each trainer's all)")
    p.add_argument("--points", type=int, default=2, help="random kill points per site (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--full-disk", action="store_true", help="also fill a small tmpfs at every writer (needs root)")
    p.add_argument("--no-bad-inputs", action="store_true", help="skip the bad-input table")
    args = p.parse_args(argv)
    wanted = [s.strip() for s in args.sites.split(",") if s.strip()] if args.sites else list(SITES)
    bad = [s for s in wanted if s not in SITES]
    if bad:
        p.error(f"unknown kill site(s) {bad}; known: {', '.join(SITES)}")
    reports = []
    with tempfile.TemporaryDirectory(prefix="fault-injection-") as tmp:
        for trainer in TRAINERS if args.trainer == "all" else (args.trainer,):
            sites = [s for s in TRAINER_SITES[trainer] if s in wanted]
            if sites and args.points:
                work = Path(tmp) / trainer
                work.mkdir()
                reports.append(run_trainer(trainer, sites, args.points, args.seed, work))
            disk_sites = [s for s in FULL_DISK_SITES[trainer] if s in wanted]
            if args.full_disk and disk_sites:
                work = Path(tmp) / f"{trainer}_full_disk"
                work.mkdir()
                with small_file_system(work / "small_fs") as why_not:
                    if why_not:
                        print(f"full disk skipped: {why_not}")
                    else:
                        reports.append(run_trainer(trainer, disk_sites, 1, args.seed, work,
                                                   chains_dir=work / "small_fs", full_disk=True))
        print(format_table(reports))
        print("\n" + format_sites(reports))
        for r in reports:
            print(f"\n{r.trainer} ({r.mode}): " + "; ".join(r.log))
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
