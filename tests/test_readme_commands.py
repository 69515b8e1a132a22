"""The README-commands timer reads its figures from the two commands' output."""

from benchmarks.tools.readme_commands import logged_seconds, minutes, pytest_summary

PRETRAIN = """\
2026-12-07 08:00:01,123 dreamteacher.pretrain INFO 2 torch threads per process on cpu
2026-12-07 08:00:05,001 dreamteacher.pretrain INFO resnet18: 187 steps of 128 images (128 x 1 processes x 1)
step 50/187 ...
2026-12-07 08:04:33,900 dreamteacher.pretrain INFO exported the student to runs/x/export: timm.create_model(...)
"""


def test_distillation_time_runs_from_the_steps_line_to_the_export_line():
    assert logged_seconds(PRETRAIN, "steps of", "exported the student") == 268.0
    assert logged_seconds(PRETRAIN, "steps of", "never logged") is None
    assert minutes(268.0) == "4 min 28 s" and minutes(None) == "?"


def test_pytest_summary_reads_the_last_summary_line():
    output = "tests/a.py ....\n===== 3 failed, 480 passed, 5 skipped, 2 deselected in 348.21s (0:05:48) =====\n"
    assert pytest_summary(output) == {"failed": 3, "passed": 480, "skipped": 5, "deselected": 2, "pytest_s": 348.21}
    assert pytest_summary("no tests ran") == {}


def test_the_table_names_the_commands_times_counts_and_export():
    from benchmarks.tools import readme_commands

    report = {"tag": "t", "commit": "abc", "machine": "2-core CPU", "environment": "Python on PATH",
              "pretrain": {"wall_s": 300.0, "status": 0, "export_sha256": "ff00", "distill_s": 241.0,
                           "threads_line": "2 torch threads per process on cpu"},
              "tests": {"wall_s": 360.0, "status": 0, "passed": 531, "pytest_s": 318.1}}
    table = readme_commands.render(report)
    assert "| `bash scripts/pretrain.sh` | 5 min 0 s | distillation 4 min 1 s, 2 torch threads" in table
    assert "| `bash scripts/test.sh` | 6 min 0 s | pytest 5 min 18 s: 531 passed | 0 |" in table
    assert "SHA-256 `ff00`" in table and "Commit abc; machine: 2-core CPU" in table
