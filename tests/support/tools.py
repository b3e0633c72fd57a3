"""External tools the tests drive (hadolint, checkov, kubernetes-validate, sslyze).

They are not in the project's venv: `make test` installs them into the venv of their own, .venv-tools
(their pins conflict with ours: checkov's packaging<24, sslyze's older cryptography), and puts its bin/
on PATH. A missing tool fails its test: it is a broken set-up, not a reason to skip.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS_BIN = ROOT / ".venv-tools" / "bin"


def tool(name: str) -> str:
    """The tool's executable: on PATH, else in the repository's .venv-tools (when pytest runs without make)."""
    found = shutil.which(name) or shutil.which(name, path=str(TOOLS_BIN))
    if found is None:
        pytest.fail(f"{name} is not installed: `make test` installs it into .venv-tools and puts that on PATH")
    return found


def tool_python(name: str) -> str:
    """The interpreter of the venv that holds the Python tool ``name``, to run a script against its library."""
    python = Path(tool(name)).with_name("python")
    if not python.is_file():
        pytest.fail(f"{tool(name)} has no python beside it; install {name} into a venv (make test does)")
    return str(python)
