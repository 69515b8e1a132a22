"""scripts/python.sh: which Python the README's two commands install into and run with."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def _chosen(folder: Path, path: str, **env) -> subprocess.CompletedProcess:
    (folder / "scripts").mkdir(exist_ok=True)
    shutil.copy(REPO / "scripts" / "python.sh", folder / "scripts" / "python.sh")
    environment = {"PATH": path, "HOME": str(folder), **env}
    return subprocess.run(["/bin/bash", "-c", "set -euo pipefail; source scripts/python.sh; echo \"PY=$PY\""],
                          cwd=folder, env=environment, capture_output=True, text=True, timeout=120)


def _externally_managed(python: str) -> bool:
    """PEP 668: pip refuses `python` when its stdlib holds the marker and it is not a virtual environment's."""
    code = ("import os, sys, sysconfig; print(sys.prefix == sys.base_prefix and "
            "os.path.exists(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')))")
    return subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.strip() == "True"


def test_an_active_virtual_environment_is_used(tmp_path):
    venv = tmp_path / "env"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    result = _chosen(tmp_path, SYSTEM_PATH, VIRTUAL_ENV=str(venv))
    assert result.stdout.strip() == f"PY={venv / 'bin' / 'python'}", result.stderr


def test_a_python_that_pip_may_install_into_is_used_as_it_is(tmp_path):
    """The Python running the tests is one pip installs into (a venv's, or one the OS does not manage)."""
    if _externally_managed(sys.executable):
        pytest.skip("the Python running the tests is managed by the system")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # a link would lose a venv
    (bin_dir / "python").chmod(0o755)
    result = _chosen(tmp_path, f"{bin_dir}:{SYSTEM_PATH}")
    assert result.stdout.strip() == f"PY={bin_dir / 'python'}", result.stderr
    assert not (tmp_path / ".venv").exists()


@pytest.mark.skipif(not Path("/usr/bin/python3").exists() or not _externally_managed("/usr/bin/python3"),
                    reason="no system Python managed by the OS (PEP 668) here")
def test_with_only_the_system_python_a_project_venv_is_made_and_then_reused(tmp_path):
    """A stock Debian machine: no `python`, and pip refuses the system python3. The scripts say so and make .venv."""
    first = _chosen(tmp_path, SYSTEM_PATH)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "PY=.venv/bin/python"
    assert "managed by the system (PEP 668), so packages go into a project virtual environment: .venv" in first.stderr
    assert subprocess.run([str(tmp_path / ".venv" / "bin" / "python"), "-m", "pip", "--version"],
                          capture_output=True).returncode == 0
    again = _chosen(tmp_path, SYSTEM_PATH)
    assert again.stdout.strip() == "PY=.venv/bin/python" and again.stderr == ""  # reused, said once
