"""The test files collect wherever they are copied, as scripts/gpu_acceptance.sh runs them:
tests/ and pyproject.toml in a work folder, sdrun installed, and possibly a package named
`tests` elsewhere on the path (some wheels install one into site-packages)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def test_a_foreign_tests_package_on_the_path_does_not_shadow_ours(tmp_path):
    foreign = tmp_path / "site" / "tests"
    foreign.mkdir(parents=True)
    (foreign / "__init__.py").write_text("# a wheel's own test package: no conftest here\n")
    work = tmp_path / "work"
    shutil.copytree(HERE, work / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(HERE.parent / "pyproject.toml", work)
    # The files the acceptance run collects (their tests are skipped here, without a GPU).
    files = ["tests/test_cuda.py", "tests/test_cuda_speed.py"]
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
                       cwd=work, env={**os.environ, "PYTHONPATH": str(foreign.parent)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "tests/test_cuda.py::test_resume_after_an_interruption_reproduces_the_uninterrupted_run" in r.stdout
    assert "tests/test_cuda_speed.py::test_fused_sgd_matches_foreach_on_cuda" in r.stdout
