"""The container recipe (no Docker engine runs here): what it copies exists, every package the
project installs is copied, and the served command names the shipped model and examples by
absolute path (a non-editable install cannot find them relative to the code)."""
from __future__ import annotations

import json
import re
import tomllib

from ._model import REPO


def _instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)
            if not m.group(0).lstrip().startswith("#")]


def test_dockerfile_copies_what_the_package_needs_and_serves_the_demo_model():
    ins = _instructions()
    assert ins[0][0] == "FROM" and "slim" in ins[0][1]
    copied = {a.split()[0] for op, a in ins if op == "COPY"}
    for src in copied:
        assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for pkg in (p.rstrip("*") for p in packages):
        assert pkg in copied, f"package {pkg} is installed by pyproject but not copied into the image"
    assert {"models", "examples"} <= copied
    cmd = json.loads(next(a for op, a in ins if op == "CMD"))
    assert cmd[:2] == ["medreport", "serve"] and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    model, examples = cmd[cmd.index("--model") + 1], cmd[cmd.index("--examples") + 1]
    workdir = next(a for op, a in ins if op == "WORKDIR")
    assert model == f"{workdir}/models/demo" and examples == f"{workdir}/examples"
    assert (REPO / "models" / "demo" / "model.safetensors").is_file()
    assert any(op == "USER" and a != "root" for op, a in ins)  # not served as root
