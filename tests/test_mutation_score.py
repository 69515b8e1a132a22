"""benchmarks/mutation_score.py: which surviving mutants count as changing only argparse's printed text."""

from __future__ import annotations

import textwrap

from benchmarks.mutation_score import changes_cli_text_only, first_pass_patterns, wilson_interval

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


def test_a_sampled_score_comes_with_its_wilson_interval():
    low, high = wilson_interval(270, 300)  # 90% of 300 sampled mutants killed
    assert round(low, 2) == 86.08 and round(high, 2) == 92.91
    assert wilson_interval(10, 10)[1] == 100.0 and wilson_interval(0, 0) == (0.0, 100.0)
