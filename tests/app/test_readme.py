"""The README's promises: its two set-up commands, CI calling the test command, and its example."""
from __future__ import annotations

import json
import re
import subprocess
import sys


def test_readme_gives_the_two_commands_and_ci_runs_the_test_one(repo_root):
    readme = (repo_root / "README.md").read_text()
    assert "make serve" in readme and "make test" in readme
    assert "not for clinical use" in readme.lower()
    ci = (repo_root / ".ci" / "run").read_text()
    assert re.search(r"^make test\b", ci, re.MULTILINE)
    makefile = (repo_root / "Makefile").read_text()
    assert re.search(r"^serve:", makefile, re.MULTILINE) and re.search(r"^test:", makefile, re.MULTILINE)


def test_readme_inspect_example_runs_on_a_bundled_study(repo_root):
    """`medreport inspect STUDY --json` as the README shows it, on the first bundled example."""
    study = sorted((repo_root / "examples" / "studies").iterdir())[0]
    out = subprocess.run([sys.executable, "-m", "app.cli", "inspect", str(study), "--json"], cwd=repo_root,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["shape"] == [64, 128, 128] and info["modality"] == "CT"
    assert info["hu_min"] < -500 < 0 < info["hu_max"]
