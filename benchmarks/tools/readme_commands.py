"""Time the README's two commands from a fresh clone and commit the figures the README quotes.

    python benchmarks/tools/readme_commands.py --tag pyenv_amd_epyc           # the Python on PATH
    python benchmarks/tools/readme_commands.py --tag debian_amd_epyc --debian # as a stock Debian user: only the
                                                                              # system directories on PATH

Clones this repository's HEAD (committed files only) into a temporary folder, then runs, one after the other,
`bash scripts/pretrain.sh` and `bash scripts/test.sh` there, each timed by wall clock, set-up included. From their
output it reads the distillation time (the trainer's log, from its "steps of" line to "exported the student"), the
torch threads, the tests passed / failed / skipped and pytest's own time, and hashes the exported weights. Writes
`<out-dir>/<tag>.json` and `.md` with the commit and the machine; the two logs and a copy of the export go to
`runs/readme_commands/<tag>/`, where training/evaluate.py can score the main job's backbone.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import datetime  # noqa: E402
from typing import Any  # noqa: E402

from training.run.hardware import describe_machine  # noqa: E402
from training.run.layout import write_text_atomic  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEBIAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
EXPORT = Path("runs/resnet18.dreamteacher_fmnist/export/model.safetensors")
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ ")


def run_timed(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[float, int, str]:
    """(wall seconds, exit status, output) of `command`, its output also written to `log`."""
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    log.write_text(proc.stdout)
    return wall, proc.returncode, proc.stdout


def logged_seconds(output: str, first: str, last: str) -> float | None:
    """Seconds between the first log line containing `first` and the last containing `last` (logging's asctime)."""
    stamps = {}
    for line in output.splitlines():
        match = LOG_TIME.match(line)
        for key in (first, last):
            if match and key in line and (key == last or key not in stamps):
                stamps[key] = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")
    if first not in stamps or last not in stamps:
        return None
    return (stamps[last] - stamps[first]).total_seconds()


def pytest_summary(output: str) -> dict[str, Any]:
    """passed / failed / skipped / deselected counts and pytest's seconds, from its last summary line."""
    lines = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed)", line) and " in " in line]
    if not lines:
        return {}
    line = lines[-1]
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", line)}
    seconds = re.search(r" in ([\d.]+)s", line)
    return {**counts, "pytest_s": float(seconds.group(1)) if seconds else None}


def minutes(seconds: float | None) -> str:
    return "?" if seconds is None else f"{int(seconds // 60)} min {round(seconds % 60):d} s"


def render(report: dict[str, Any]) -> str:
    pre, tests = report["pretrain"], report["tests"]
    counts = ", ".join(f"{v} {k}" for k, v in tests.items() if k not in ("pytest_s", "wall_s", "status"))
    return "\n".join([
        f"# The README's two commands from a fresh clone ({report['tag']})", "",
        f"Commit {report['commit']}; machine: {report['machine']}; {report['environment']}.", "",
        "| command | wall (set-up included) | of which | exit status |", "|---|---|---|---|",
        f"| `bash scripts/pretrain.sh` | {minutes(pre['wall_s'])} | distillation {minutes(pre['distill_s'])}, "
        f"{pre['threads_line'] or '?'} | {pre['status']} |",
        f"| `bash scripts/test.sh` | {minutes(tests['wall_s'])} | pytest {minutes(tests.get('pytest_s'))}: {counts} | "
        f"{tests['status']} |", "",
        f"Exported weights: `{EXPORT}` SHA-256 `{pre['export_sha256']}`.", ""])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tag", required=True, help="name of the results files")
    p.add_argument("--debian", action="store_true",
                   help=f"run with an empty environment and PATH={DEBIAN_PATH} (a stock Debian user: no `python`)")
    p.add_argument("--out-dir", default="benchmarks/results/readme_commands")
    args = p.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    out_dir = Path(args.out_dir)
    logs = Path("runs/readme_commands") / args.tag
    logs.mkdir(parents=True, exist_ok=True)
    if args.debian:
        env = {"PATH": DEBIAN_PATH, "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
        environment = f"stock Debian environment (only PATH={DEBIAN_PATH})"
    else:
        env = dict(os.environ)
        environment = f"Python on PATH ({sys.executable}, {sys.version.split()[0]})"
    with tempfile.TemporaryDirectory(prefix="readme-commands-") as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(clone)], check=True)
        pre_wall, pre_status, pre_out = run_timed(["bash", "scripts/pretrain.sh"], clone, env, logs / "pretrain.log")
        export = clone / EXPORT
        sha = hashlib.sha256(export.read_bytes()).hexdigest() if export.is_file() else None
        if export.is_file():  # kept for scoring: the main job's own results file is made from it
            shutil.copytree(export.parent, logs / "export", dirs_exist_ok=True)
        test_wall, test_status, test_out = run_timed(["bash", "scripts/test.sh"], clone, env, logs / "test.log")
    threads = re.search(r"\d+ torch threads per process on \w+", pre_out)
    report = {
        "tag": args.tag, "commit": commit, "machine": describe_machine(), "environment": environment,
        "pretrain": {"wall_s": round(pre_wall, 1), "status": pre_status, "export_sha256": sha,
                     "distill_s": logged_seconds(pre_out, "steps of", "exported the student"),
                     "threads_line": threads.group(0) if threads else None},
        "tests": {"wall_s": round(test_wall, 1), "status": test_status, **pytest_summary(test_out)},
    }
    write_text_atomic(out_dir / f"{args.tag}.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out_dir / f"{args.tag}.md", render(report))
    print(render(report))
    return report


if __name__ == "__main__":
    main()
