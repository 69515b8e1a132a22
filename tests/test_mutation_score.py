"""benchmarks/tools/mutation_score.py: which surviving mutants count as changing only argparse's printed text, and
whether its module table, test selections and equivalent-mutant names still match the repository's layout."""

from __future__ import annotations

import ast
import textwrap

import pytest

from benchmarks.tools import mutation_score
from benchmarks.tools.mutation_score import (
    EQUIVALENT,
    MODULES,
    REPO,
    changes_cli_text_only,
    first_pass_patterns,
    pytest_selection,
    sample_probe_pattern,
    wilson_interval,
)

MUTANTS = textwrap.dedent('''
    def x_parse_args__mutmut_orig(argv):
        p = argparse.ArgumentParser(description="Export a run", formatter_class=Raw)
        p.add_argument("--out", default="export", metavar="DIR", help="folder (default export)")
        return p.parse_args(argv)

    def x_parse_args__mutmut_1(argv):
        p = argparse.ArgumentParser(description="XXExport a runXX", formatter_class=Raw)
        p.add_argument("--out", default="export", metavar="DIR", help="folder (default export)")
        return p.parse_args(argv)

    def x_parse_args__mutmut_2(argv):
        p = argparse.ArgumentParser(description="Export a run", formatter_class=Raw)
        p.add_argument("--out", default="export", metavar="XXDIRXX", help=None)
        return p.parse_args(argv)

    def x_parse_args__mutmut_5(argv):
        p = argparse.ArgumentParser()
        p.add_argument("--out", default="export", help="folder (default export)")
        return p.parse_args(argv)

    def x_parse_args__mutmut_3(argv):
        p = argparse.ArgumentParser(description="Export a run", formatter_class=Raw)
        p.add_argument("--out", default="XXexportXX", metavar="DIR", help="folder (default export)")
        return p.parse_args(argv)

    def x_parse_args__mutmut_4(argv):
        p = argparse.ArgumentParser(description="Export a run", formatter_class=Raw)
        p.add_argument("--out", default="export", metavar="DIR", help="folder (default export)", required=True)
        return p.parse_args(argv)

    def x_defaults__mutmut_orig(p):
        p.add_argument("--resume", default=None, help="a folder")
        p.add_argument("--seed", type=int, default=0)

    def x_defaults__mutmut_1(p):
        p.add_argument("--resume", help="a folder")
        p.add_argument("--seed", type=int, default=0)

    def x_defaults__mutmut_2(p):
        p.add_argument("--resume", default=None, help="a folder")
        p.add_argument("--seed", type=int)

    def x_groups__mutmut_orig(p):
        data = p.add_argument_group("data")
        data.add_argument("--data-dir")

    def x_groups__mutmut_1(p):
        data = p.add_argument_group("DATA")
        data.add_argument("--data-dir")

    def x_groups__mutmut_2(p):
        data = p.add_argument_group("data")
        data.add_argument("--DATA-DIR")

    class Runner:
        def xǁRunnerǁrun__mutmut_orig(self):
            return self.go(help="text")

        def xǁRunnerǁrun__mutmut_1(self):
            return self.go(help="XXtextXX")

        def xǁRunnerǁrun__mutmut_2(self):
            return self.stop(help="text")
''')


def test_only_printed_text_changes_count_as_equivalent(tmp_path):
    (tmp_path / "mutants" / "hub").mkdir(parents=True)
    (tmp_path / "mutants" / "hub" / "export.py").write_text(MUTANTS)
    (tmp_path / "mutants" / "pkg").mkdir()
    (tmp_path / "mutants" / "pkg" / "__init__.py").write_text(MUTANTS)

    def cli_only(name: str) -> bool:
        return changes_cli_text_only(tmp_path, name)

    assert cli_only("hub.export.x_parse_args__mutmut_1")  # description
    assert cli_only("hub.export.x_parse_args__mutmut_2")  # metavar and help
    assert cli_only("hub.export.x_parse_args__mutmut_5")  # description, formatter_class and metavar dropped
    assert cli_only("pkg.x_parse_args__mutmut_1")  # a package's __init__
    assert cli_only("hub.export.xǁRunnerǁrun__mutmut_1")  # a method
    assert not cli_only("hub.export.x_parse_args__mutmut_3")  # a default is behaviour
    assert not cli_only("hub.export.x_parse_args__mutmut_4")  # so is required=True
    assert not cli_only("hub.export.xǁRunnerǁrun__mutmut_2")  # a different call
    assert not cli_only("hub.export.x_parse_args__mutmut_99")  # unknown mutant: not assumed harmless
    assert cli_only("hub.export.x_groups__mutmut_1")  # an argument group's title
    assert cli_only("hub.export.x_defaults__mutmut_1")  # default=None dropped: argparse's own default
    assert not cli_only("hub.export.x_defaults__mutmut_2")  # default=0 dropped: None now
    assert not cli_only("hub.export.x_groups__mutmut_2")  # an option's name is behaviour


def test_the_first_pass_takes_every_function_that_passes_no_argparse_text(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "cli.py").write_text(textwrap.dedent('''
        def parse_args(argv):
            p = argparse.ArgumentParser()
            p.add_argument("--out", help="folder")
            return p.parse_args(argv)

        def train(steps):
            return [step for step in range(steps)]

        class Trainer:
            def run(self):
                return train(2)

            def parser(self):
                return argparse.ArgumentParser(description="a trainer")
    '''))
    assert first_pass_patterns(tmp_path, "pkg/cli.py") == ["pkg.cli.x_train__mutmut_*",
                                                           "pkg.cli.xǁTrainerǁrun__mutmut_*"]
    assert first_pass_patterns(tmp_path, "pkg") == []  # a package's first pass takes everything
    # a sampled run's first pass tests each function's first mutant only (the first function may have none)
    assert sample_probe_pattern("pkg/cli.py") == "pkg.cli.*__mutmut_1"
    assert sample_probe_pattern("pkg") == "pkg.*__mutmut_1"


def test_a_sampled_score_comes_with_its_wilson_interval():
    low, high = wilson_interval(270, 300)  # 90% of 300 sampled mutants killed
    assert round(low, 2) == 86.08 and round(high, 2) == 92.91
    assert wilson_interval(10, 10)[1] == 100.0 and wilson_interval(0, 0) == (0.0, 100.0)


def test_repo_is_the_repository_root():
    assert (REPO / "pyproject.toml").is_file() and (REPO / "benchmarks" / "tools" / "mutation_score.py").is_file()


def test_every_module_exists_and_matches_pyproject_only_mutate():
    tomllib = pytest.importorskip("tomllib")
    only_mutate = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mutmut"]["only_mutate"]
    for module in MODULES:
        assert (REPO / module).is_file() or (REPO / module / "__init__.py").is_file(), module
    assert sorted(only_mutate) == sorted(f"{m}/*" if (REPO / m).is_dir() else m for m in MODULES)


def test_every_test_selection_matches_files():
    for module in MODULES:
        selection = pytest_selection(module)
        files = [a.partition("::")[0] for i, a in enumerate(selection)
                 if a != "--deselect" and (i == 0 or selection[i - 1] != "--deselect")]
        assert files and all((REPO / f).is_file() for f in files), (module, selection)


def test_a_glob_selection_expands_and_a_stale_one_stops_the_tool(tmp_path, monkeypatch):
    (tmp_path / "tests").mkdir()
    for name in ("test_teacher_taps.py", "test_teacher_sources.py", "test_other.py"):
        (tmp_path / "tests" / name).write_text("")
    monkeypatch.setattr(mutation_score, "MODULES", {
        "a.py": ["tests/test_teacher_*.py", "tests/test_teacher_taps.py", "tests/test_other.py::test_x"],
        "b.py": ["tests/test_teachers.py"], "c.py": ["tests/test_gone_*.py"]})
    monkeypatch.setattr(mutation_score, "SCRIPT_TESTS", {"a.py": ["tests/test_other.py::test_script"]})
    assert pytest_selection("a.py", tmp_path) == [
        "tests/test_teacher_sources.py", "tests/test_teacher_taps.py", "tests/test_other.py::test_x",
        "--deselect", "tests/test_other.py::test_script"]
    for stale in ("b.py", "c.py"):
        with pytest.raises(SystemExit, match="matches no file"):
            pytest_selection(stale, tmp_path)


def _defined_functions(path) -> set[str]:
    """mutmut's mangled names of a module's top-level functions and methods: x_f, xǁClassǁmethod."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(f"x_{node.name}")
        elif isinstance(node, ast.ClassDef):
            names |= {f"xǁ{node.name}ǁ{f.name}" for f in node.body
                      if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return names


def test_every_equivalent_mutant_names_a_mutated_module_and_an_existing_function():
    dotted = {m.removesuffix(".py").replace("/", "."): m for m in MODULES}
    for name in EQUIVALENT:
        module, _, function = name.rpartition(".")
        function = function.rpartition("__mutmut_")[0]
        package = next((d for d in dotted if module == d or (not dotted[d].endswith(".py")
                                                            and module.startswith(d + "."))), None)
        assert package is not None, f"{name}: its module is not one MODULES mutates"
        path = REPO / (module.replace(".", "/") + ".py")
        assert path.is_file(), f"{name}: no {path.relative_to(REPO)}"
        assert function in _defined_functions(path), f"{name}: no {function} in {path.relative_to(REPO)}"
