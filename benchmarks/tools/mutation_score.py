"""Mutation score of the core modules: how many small planted bugs (mutmut's mutants) the test suite catches.

For each module, mutmut runs in a scratch copy of the repository with only that module mutated and only the test
files that exercise it selected, so a module takes minutes, not the hours of one `mutmut run` over everything.
Prints a table (killed, survived, equivalent, score = killed / (killed + survived), equivalents excluded) and the
surviving mutants not judged equivalent; `mutmut show <name>` in the scratch copy (its path is printed) shows one.
Equivalent: listed in EQUIVALENT below by name with a reason, or found by comparing ASTs to change only what
argparse prints (a help, description, epilog, metavar or formatter_class argument), which no behaviour shows.

    python benchmarks/tools/mutation_score.py                               # every module below
    python benchmarks/tools/mutation_score.py training/distill/losses.py    # one module
    python benchmarks/tools/mutation_score.py training/pretrain.py --scratch /tmp/mut-pretrain
        # resumable: rerun it after a stop and mutmut goes on where it was
    python benchmarks/tools/mutation_score.py training/pretrain.py --sample 300   # an estimate, with its 95% interval
    python benchmarks/tools/mutation_score.py training/pretrain.py --scratch /tmp/mut-pretrain --retest
        # the survivors again, against the tests written from them

A module's test files may be given as globs (tests/test_teacher_*.py); each must match a file when the tool starts.

Needs `pip install -e .[dev]` (mutmut). Not part of CI: slow, and its mutant names move when the code changes.
"""

from __future__ import annotations

import argparse
import ast
import copy
import functools
import glob
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # benchmarks/tools/ -> the repository root

# module -> the test files that exercise it (mutmut then picks, per mutant, the tests that reach its function).
# An entry may be a glob (tests/test_teacher_*.py), expanded against the repository when the tool starts; every
# entry must match a file, so a renamed or split test file stops the tool at once instead of an hour in.
TEACHER_TESTS = "tests/test_teacher_*.py"  # the tests of training/teacher/ (taps, sources, prompt, ...)
MODULES = {
    "training/distill/losses.py": ["tests/test_losses.py", "tests/test_pairing.py"],
    "training/labels/losses.py": ["tests/test_losses.py", "tests/test_label_distill.py", "tests/test_interpreter.py"],
    "training/run/schedule.py": ["tests/test_schedule.py",
                                 "tests/test_train_teacher.py::test_resume_continues_exactly"],
    "training/distill/pairing.py": ["tests/test_pairing.py"],
    "training/distill/regressor.py": ["tests/test_regressor.py", "tests/test_pairing.py"],
    "training/distill/distiller.py": ["tests/test_pairing.py", "tests/test_losses.py", "tests/test_label_distill.py",
                                      "tests/test_feature_cache.py"],
    "training/run/backbones.py": ["tests/test_export.py", "tests/test_regressor.py", "tests/test_pairing.py",
                                  "tests/test_evaluate.py"],
    "training/run/checksums.py": ["tests/test_export.py", "tests/test_adm_fetch.py"],
    "dreamteacher_models": ["tests/test_recipes.py", "tests/test_timm_registry.py"],
    "hub/export.py": ["tests/test_export.py"],
    "training/teacher/taps.py": ["tests/test_teacher_taps.py", "tests/test_inspect_teacher.py"],
    "training/teacher/frozen.py": ["tests/test_frozen_teacher.py", TEACHER_TESTS],
    "training/teacher/sources.py": ["tests/test_teacher_sources.py"],
    "training/teacher/prompt.py": ["tests/test_teacher_prompt.py", "tests/test_frozen_teacher.py"],
    "training/teacher/build.py": [TEACHER_TESTS, "tests/test_frozen_teacher.py"],
    "training/inspect_teacher.py": ["tests/test_inspect_teacher.py"],
    "training/pretrain.py": ["tests/test_pretrain.py", "tests/test_feature_cache.py", "tests/test_label_distill.py"],
    "training/train_teacher.py": ["tests/test_train_teacher.py"],
    "training/teacher/ddpm.py": ["tests/test_train_teacher.py"],
}
# tests that run a module as a script in a subprocess: mutmut's mutated copy cannot run outside mutmut
SCRIPT_TESTS = {
    "training/train_teacher.py": ["tests/test_train_teacher.py::test_script_entry_point_imports_from_any_cwd"],
    "training/pretrain.py": [f"tests/test_pretrain.py::{t}" for t in (
        "test_documented_accelerate_launch_command_runs", "test_process_layouts_1x1_1x2_2x1_train_the_same_steps",
        "test_command_line_user_errors_are_one_line_with_status_2")] + [
        "tests/test_feature_cache.py::test_a_killed_writer_leaves_no_cache_that_passes_as_complete"],
    # training/evaluate.py, run as a script, imports training/run/backbones.py
    "training/run/backbones.py": [
        "tests/test_evaluate.py::test_cli_script_runs_all_protocols_and_writes_the_results_json"],
}


def pytest_selection(module: str, root: Path = REPO) -> list[str]:
    """pytest's arguments for `module`: its MODULES entries with globs expanded (sorted, each file once), then a
    `--deselect` for each of its SCRIPT_TESTS. Exits naming the entry when one matches no test file in `root`."""
    files: list[str] = []
    for entry in MODULES[module]:
        path, sep, test = entry.partition("::")
        if glob.has_magic(path):
            if sep:
                raise SystemExit(f"{module}: {entry!r}: a glob cannot name a test inside its files")
            matches = sorted(p.relative_to(root).as_posix() for p in root.glob(path) if p.is_file())
        else:
            matches = [entry] if (root / path).is_file() else []
        if not matches:
            raise SystemExit(f"{module}: test selection {entry!r} matches no file under {root} (renamed or split? "
                             "update MODULES in benchmarks/tools/mutation_score.py)")
        files += [m for m in matches if m not in files]
    return files + [a for t in SCRIPT_TESTS.get(module, []) for a in ("--deselect", t)]


# Mutants judged equivalent (no input the code can receive tells them apart), by name, with the reason.
# A name holds only while its function's body is unchanged: a mutant's number counts the mutants before it in the
# function (on lines the selected tests cover), so an edit before it, or a change in what the tests cover, shifts it.
# Moved with the code in the package split (checked by generating both versions' mutants): the functions kept their
# bodies, save renamed callees; training.inspect_teacher.main lost one mutant at `dataclasses.replace(base,
# **overrides)` (was `_replace(base, overrides)`), hence 167 and 205 (were 168 and 206 in training.teachers).
EQUIVALENT = {
    "training.distill.losses.x_attention_map__mutmut_9": "F.normalize's p=None is the 2-norm",
    "training.distill.losses.x_attention_map__mutmut_12": "F.normalize's default p is 2",
    "training.distill.losses.x_attention_map__mutmut_13": "F.normalize's default dim is 1",
    "training.distill.losses.x_feature_distillation_loss__mutmut_14":
        "zip strict: the level counts are checked just before",
    "training.distill.losses.x_feature_distillation_loss__mutmut_17":
        "zip strict: the level counts are checked just before",
    "training.distill.losses.x_feature_distillation_loss__mutmut_18":
        "zip strict: the level counts are checked just before",
    "training.distill.losses.x_feature_distillation_loss__mutmut_26":
        "shape[+2:] == shape[-2:] for the (B, C, H, W) maps",
    "training.labels.losses.x_dice_loss__mutmut_29": "ignored pixels' label is masked out of both sums",
    "training.labels.losses.x_dice_loss__mutmut_44": "softmax's implicit dim is 1 for 4-D logits",
    "training.labels.losses.x_dice_loss__mutmut_46": "softmax's implicit dim is 1 for 4-D logits",
    "training.distill.regressor.x_select_pyramid_indices__mutmut_1": "the default arch name in a message",
    "training.distill.regressor.x_select_pyramid_indices__mutmut_2": "the default arch name in a message",
    "training.distill.regressor.x_student_levels__mutmut_1": "the default arch name in a message",
    "training.distill.regressor.x_student_levels__mutmut_2": "the default arch name in a message",
    "training.distill.regressor.x_student_levels__mutmut_32":
        "the second lookup cannot fail: its strides are all present",
    "training.distill.regressor.x_student_levels__mutmut_41": "zip strict: one index per stride by construction",
    "training.distill.regressor.x_student_levels__mutmut_44": "zip strict: one index per stride by construction",
    "training.distill.regressor.x_student_levels__mutmut_45": "zip strict: one index per stride by construction",
    "training.distill.regressor.x_conv_bn_relu__mutmut_11": "Conv2d(bias=None) has no bias, as bias=False",
    "training.distill.regressor.x_conv_bn_relu__mutmut_16": "a conv bias before BatchNorm is cancelled by its mean",
    "training.distill.regressor.x_conv_bn_relu__mutmut_19": "a conv bias before BatchNorm is cancelled by its mean",
    "training.distill.regressor.x_conv_bn_relu__mutmut_18":
        "kernel_size // 3 == kernel_size // 2 for the 1 and 3 used",
    "training.distill.regressor.x_conv_bn_relu__mutmut_21": "ReLU in place or not: same values",
    "training.distill.regressor.x_conv_bn_relu__mutmut_22": "ReLU in place or not: same values",
    "training.distill.regressor.x_resize_to__mutmut_2": "shape[+2:] == shape[-2:] for 4-D maps",
    "training.distill.regressor.x_resize_to__mutmut_3": "resizing to the same size is the identity (only slower)",
    "training.distill.regressor.x_resize_to__mutmut_9": "align_corners=None means False",
    "training.distill.regressor.x_resize_to__mutmut_13": "align_corners defaults to False",
    "training.distill.regressor.xǁPyramidPoolingǁforward__mutmut_2": "shape[+2:] == shape[-2:] for 4-D maps",
    "training.distill.regressor.xǁFeatureRegressorǁforward__mutmut_12": "zip strict: one lateral per finer level",
    "training.distill.regressor.xǁFeatureRegressorǁforward__mutmut_15": "zip strict: one lateral per finer level",
    "training.distill.regressor.xǁFeatureRegressorǁforward__mutmut_20": "zip strict: one lateral per finer level",
    "training.distill.regressor.xǁFeatureRegressorǁforward__mutmut_31": "shape[+2:] == shape[-2:] for 4-D maps",
    "training.distill.distiller.x_build_distiller__mutmut_5":
        "build_backbone (timm) already refused a bad arch by name",
    "training.distill.distiller.x_build_distiller__mutmut_7":
        "build_backbone (timm) already refused a bad arch by name",
    "training.distill.distiller.x_build_distiller__mutmut_31": "None and 0 both mean 'no target' (falsy)",
    "training.distill.distiller.x_build_distiller__mutmut_33": "None and 0 both mean 'no target' (falsy)",
    "training.distill.distiller.x_distillation_loss__mutmut_8": "shape[+2:] == shape[-2:] for 4-D maps",
    "dreamteacher_models._timm_registry.x_pretrained_cfg_for__mutmut_6": "every timm architecture has a default cfg",
    "dreamteacher_models._timm_registry.x_register_recipes__mutmut_22": "getattr default None or False: both falsy",
    "dreamteacher_models.recipes.x__build__mutmut_32": "_tuples leaves a non-list unchanged",
    "dreamteacher_models.recipes.x__checked__mutmut_11": "no recipe field is a Union without None",
    "dreamteacher_models.recipes.x__checked__mutmut_16": "an inner error's field name is never shown",
    "dreamteacher_models.recipes.x__checked__mutmut_44": "zip strict: the tuple length is checked just before",
    "dreamteacher_models.recipes.x__checked__mutmut_47": "zip strict: the tuple length is checked just before",
    "dreamteacher_models.recipes.x__checked__mutmut_48": "zip strict: the tuple length is checked just before",
    "hub.export.x_export_for_hub__mutmut_48": "/ 1e6 or / 1000001: the same parameter count at one decimal",
    "training.run.checksums.x_write_checksums__mutmut_3":
        "an export holds no subfolder, and SHA256SUMS is written after the list",
    "training.run.checksums.x_read_checksums__mutmut_21": "lstrip('XX*XX') differs only for names starting with X",
    "dreamteacher_models._timm_registry.x_hub_offline__mutmut_8": "any non-truthy default reads as online",
    "hub.export.x_main__mutmut_46": "--results-note default None or '': the card tests it for truth only",
    "hub.export.x_main__mutmut_49": "--results-note default None or '': the card tests it for truth only",
    "training.pretrain.x_main__mutmut_551": "every distiller parameter gets a gradient each step (the FPN's top-down "
                                            "path starts at C5): zeroed or dropped gradients step alike",
    "training.pretrain.x_main__mutmut_620": "timm's two parameter groups (with and without weight decay) share one lr",
    "training.pretrain.x_open_feature_cache__mutmut_17": "'' and None are both falsy: the cache is opened either way",
    "training.teacher.ddpm.x_denoising_loss__mutmut_24": "diffusers' output object indexes like its tuple: [0] is "
                                                          ".sample either way",
    "training.teacher.ddpm.x_save_grid__mutmut_42": "a NEAREST resize by 1 is the identity",
    "training.train_teacher.x_main__mutmut_417": "tqdm's dynamic_ncols: how wide the bar is drawn",
    "training.train_teacher.x_main__mutmut_421": "None and False are both falsy",
    "training.train_teacher.x_main__mutmut_477": "torch.randint(0, n, ...) and torch.randint(n, ...) are one op",
    "training.train_teacher.x_main__mutmut_514": "every UNet parameter gets a gradient each step: zeroed or dropped "
                                                 "gradients step alike",
    "training.teacher.frozen.xǁFrozenTeacherǁforward__mutmut_49": "torch.full with an int fill value is int64 already",
    "training.teacher.frozen.xǁFrozenTeacherǁforward__mutmut_109": "align_corners defaults to False",
    "training.teacher.frozen.xǁFrozenTeacherǁ_encode_latents__mutmut_9": "every diffusers AutoencoderKL config has "
                                                                    "shift_factor (None unless set)",
    "training.teacher.build.x__convert_adm__mutmut_19": "DDPMScheduler's default num_train_timesteps is 1000",
    "training.inspect_teacher.x_main__mutmut_109": "input_size[1] == input_size[-1]: every recipe's images are square",
    "training.inspect_teacher.x_main__mutmut_167": "the CLI prints shapes, which the normalisation does not change",
    "training.inspect_teacher.x_main__mutmut_205": "zip strict: one channel count per stride by construction",
    "training.teacher.sources.x__is_hub_id__mutmut_5": "validate_repo_id refuses a leading '.' too",
    "training.teacher.sources.x__is_hub_id__mutmut_12": "validate_repo_id refuses more than one '/' too",
    "training.teacher.sources.x__is_hub_id__mutmut_14": "validate_repo_id refuses more than one '/' too",
}
for _n in (26, 27, 28, 31, 32, 33):  # fields timm's own default leaves None already
    EQUIVALENT[f"dreamteacher_models._timm_registry.x_pretrained_cfg_for__mutmut_{_n}"] = \
        "resets a field that timm's default already leaves None"
for _n in (28, 30, 43):
    EQUIVALENT[f"dreamteacher_models.recipes.x__describe__mutmut_{_n}"] = "no recipe field has a type outside the map"


CLI_TEXT_KEYWORDS = {"help", "description", "epilog", "metavar", "formatter_class"}  # what argparse only prints


def _code_without_cli_text(function: ast.AST) -> str:
    """The function's AST without its name, without any help / description / epilog / metavar / formatter_class
    argument, without the titles of argument groups (`add_argument_group("data")`), and without an
    `add_argument(..., default=None)`, which is argparse's own default."""
    function = copy.deepcopy(function)
    function.name = ""
    for node in ast.walk(function):
        if isinstance(node, ast.Call):
            method = node.func.attr if isinstance(node.func, ast.Attribute) else None
            node.keywords = [k for k in node.keywords if k.arg not in CLI_TEXT_KEYWORDS | {"title"} and not (
                method == "add_argument" and k.arg == "default" and isinstance(k.value, ast.Constant)
                and k.value.value is None)]
            if method == "add_argument_group":
                node.args = []
    return ast.dump(function)


@functools.lru_cache(maxsize=4)
def _functions(path: Path) -> dict[str, ast.AST]:
    """{name: def} of a mutants file (parsed once: it holds every mutant of the module)."""
    return {node.name: node for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def changes_cli_text_only(root: Path, name: str) -> bool:
    """Whether mutant `name` (e.g. hub.export.x_parse_args__mutmut_24) differs from its original function only in
    text argparse prints: then it changes `--help`, not behaviour, and counts as equivalent."""
    module, _, function = name.rpartition(".")
    path = root / "mutants" / (module.replace(".", "/") + ".py")
    if not path.is_file():
        path = path.with_suffix("") / "__init__.py"
    functions = _functions(path)
    original = functions.get(function.rpartition("__mutmut_")[0] + "__mutmut_orig")
    return function in functions and original is not None and \
        _code_without_cli_text(functions[function]) == _code_without_cli_text(original)


def scratch_copy(module: str, tests: list[str], root: Path | None = None) -> Path:
    """The repository's tracked and untracked (not ignored) files, with mutmut told to mutate `module` only, in
    `root` (default: a new temporary folder). A `root` that already holds a copy is kept as it is, results and
    all, so that mutmut resumes the run it holds."""
    if root is not None and (root / "pyproject.toml").is_file():
        print(f"resuming the mutation run in {root} (its copy of the code is kept, not refreshed)", flush=True)
        return root
    if root is None:
        root = Path(tempfile.mkdtemp(prefix="dreamteacher-mutation-"))
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    only = f"{module}/*" if (REPO / module).is_dir() else module
    text = (root / "pyproject.toml").read_text()
    text, replaced = re.subn(r"only_mutate = \[.*?\]", f'only_mutate = ["{only}"]', text, flags=re.S)
    selection = ", ".join(f'"{t}"' for t in tests)
    selection_line = f"pytest_add_cli_args_test_selection = [{selection}]"
    text, added = re.subn(r"^\[tool\.mutmut\][ \t]*$", f"[tool.mutmut]\n{selection_line}", text, flags=re.M)
    if (replaced, added) != (1, 1):  # a silently unchanged config would mutate everything
        raise SystemExit("pyproject.toml needs one [tool.mutmut] table with one only_mutate list")
    (root / "pyproject.toml").write_text(text)
    return root


def first_pass_patterns(root: Path, module: str) -> list[str]:
    """mutmut name patterns for the functions of a one-file `module` that pass no argparse text (help, metavar, ...).

    The first `mutmut run` takes only these: it still generates every mutant of the module, so the mutants of the
    command-line builders can then be sorted by `changes_cli_text_only` and only the others run. Run as they are,
    each help-text mutant survives, and a survivor runs every test that parses arguments. [] for a package: its
    first run takes everything."""
    if not module.endswith(".py"):
        return []
    dotted = module.removesuffix(".py").replace("/", ".")

    def passes_cli_text(function: ast.AST) -> bool:
        return any(isinstance(n, ast.Call) and any(k.arg in CLI_TEXT_KEYWORDS for k in n.keywords)
                   for n in ast.walk(function))

    patterns = []
    for node in ast.parse((root / module).read_text()).body:
        functions = [(f"x_{node.name}", node)] if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else \
            [(f"xǁ{node.name}ǁ{f.name}", f) for f in node.body
             if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))] if isinstance(node, ast.ClassDef) else []
        patterns += [f"{dotted}.{name}__mutmut_*" for name, f in functions if not passes_cli_text(f)]
    return patterns


def sample_probe_pattern(module: str) -> str:
    """The mutmut name pattern of a sampled run's first pass: each function's first mutant in `module` (a file or a
    package), which any module with mutants matches."""
    return module.removesuffix(".py").replace("/", ".") + ".*__mutmut_1"


def refresh_tests(root: Path) -> None:
    """Copy the repository's tests over a resumed run's (its code stays as it was mutated), for `--retest`."""
    for test in (REPO / "tests").glob("*.py"):
        shutil.copy2(test, root / "tests" / test.name)


def run_module(module: str, tests: list[str], children: int, scratch: Path | None = None,
               sample: int | None = None, retest: bool = False) -> dict:
    root = scratch_copy(module, tests, scratch)
    if retest:
        refresh_tests(root)
    start = time.time()
    # One thread: mutmut forks each mutant's child from the process where its stats and clean runs ran the tests,
    # and a torch thread pool started there deadlocks the forked child's first parallel op.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = root / "mutmut-run.log"  # its progress, to follow a long run with `tail -f`

    def mutmut_run(*names: str) -> None:
        with log.open("a") as out:
            run = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(children), *names],
                                 cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
        if run.returncode != 0:  # e.g. the unmutated tests fail: no score means anything
            raise SystemExit(f"mutmut run failed for {module} (scratch copy {root}):\n{log.read_text()[-4000:]}")

    def statuses() -> dict[str, str]:
        results = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=root, env=env,
                                 capture_output=True, text=True, check=True).stdout
        return dict(re.findall(r"^\s*(\S+): (.+)$", results, flags=re.M))

    if not (root / "mutants").is_dir():
        patterns = first_pass_patterns(root, module)
        # a sample is drawn from every mutant, so this pass generates them all but tests only the first of each
        # function (a pattern must match some mutant: the first function may have none, e.g. a bare property)
        mutmut_run(*([sample_probe_pattern(module)] if sample else patterns))
    status = statuses()
    population = len(status)
    if sample:  # a seeded uniform sample of all the mutants: the same ones on every resume
        status = {n: status[n] for n in sorted(random.Random(0).sample(sorted(status), min(sample, population)))}
    # mutants that change only argparse's text are equivalent and never run
    candidates = [n for n in status if not changes_cli_text_only(root, n)]
    # what is left; with `retest`, also the survivors, against the tests written since
    pending = [n for n in candidates if status[n] == "not checked"
               or (retest and status[n] in ("survived", "no tests") and n not in EQUIVALENT)]
    if pending:
        mutmut_run(*pending)
    status = {n: s for n, s in statuses().items() if n in status}
    killed = sum(s in ("killed", "timeout") for s in status.values())
    unkilled = [n for n, s in status.items() if s in ("survived", "no tests", "not checked")]
    cli_text = [n for n in unkilled if n not in EQUIVALENT and changes_cli_text_only(root, n)]
    equivalent = [n for n in unkilled if n in EQUIVALENT or n in cli_text]
    real = [n for n in unkilled if n not in equivalent and status[n] != "not checked"]
    unchecked = len(unkilled) - len(equivalent) - len(real)  # should be 0: a run stopped early
    counted = {"killed", "timeout", "survived", "no tests"}
    other = {s: sum(v == s for v in status.values()) for s in sorted(set(status.values()) - counted)
             if s != "not checked"}
    if unchecked:
        other["not checked"] = unchecked
    score = 100.0 * killed / max(1, killed + len(real))
    if not real and scratch is None:
        shutil.rmtree(root, ignore_errors=True)  # nothing to inspect there
    return dict(module=module, mutants=len(status), killed=killed, survived=len(real), equivalent=len(equivalent),
                cli_text=len(cli_text), sampled_from=population if sample else None,
                interval=wilson_interval(killed, killed + len(real)),
                score=score, seconds=time.time() - start, survivors=real, scratch=root, other=other)


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion, in percent: how far a sampled score may be from the full one."""
    if trials == 0:
        return 0.0, 100.0
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * ((p * (1 - p) + z * z / (4 * trials)) / trials) ** 0.5 / (1 + z * z / trials)
    return 100.0 * (centre - half), 100.0 * (centre + half)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help=f"modules to mutate (default: all of {', '.join(MODULES)})")
    parser.add_argument("--children", type=int, default=os.cpu_count() or 1, help="mutants tested in parallel")
    parser.add_argument("--scratch", type=Path, help="with one module: run in this folder, and if it already holds "
                        "a run, resume it (default: a new temporary folder)")
    parser.add_argument("--sample", type=int, help="test a seeded uniform sample of this many mutants per module, "
                        "for modules whose tests are slow integration runs")
    parser.add_argument("--retest", action="store_true", help="with --scratch: rerun the survivors of the run it "
                        "holds against the repository's current tests (written from them since)")
    args = parser.parse_args(argv)
    if args.retest and args.scratch is None:
        parser.error("--retest needs the --scratch folder of an earlier run")
    if args.scratch is not None and len(args.modules) != 1:
        parser.error(f"--scratch {args.scratch} needs exactly one module, got {len(args.modules)}")
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {unknown}; allowed: {', '.join(MODULES)}")
    selections = {m: pytest_selection(m) for m in (args.modules or MODULES)}  # all checked before the first run
    rows = [run_module(m, tests, args.children, args.scratch, args.sample, args.retest)
            for m, tests in selections.items()]
    print("| module | mutants | killed | survived | equivalent (of which --help text) | score | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['module']} | {r['mutants']} | {r['killed']} | {r['survived']} | {r['equivalent']} "
              f"({r['cli_text']}) | {r['score']:.1f}% | {r['seconds']:.0f} |")
    for r in rows:
        if r["sampled_from"]:
            low, high = r["interval"]
            print(f"\n{r['module']}: a seeded sample of {r['mutants']} of its {r['sampled_from']} mutants; the full "
                  f"score lies in [{low:.1f}%, {high:.1f}%] with 95% confidence")
        if r["other"]:  # suspicious, segfault (an OOM kill), not checked, skipped: neither killed nor survived
            print(f"\n{r['module']}: also {r['other']}")
        if r["survivors"]:
            print(f"\n{r['module']}: {len(r['survivors'])} surviving (see `mutmut show NAME` in {r['scratch']}):")
            print("\n".join(f"  {n}" for n in r["survivors"]))


if __name__ == "__main__":
    main()
