"""The ``ca`` command run the way an admin runs it, as a subprocess, and what it leaves on disk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def ca_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any CA_* variable the developer may have set, plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if key not in ("CA_DIR", "CA_PASSPHRASE", "CA_DB")}
    env.update(extra)
    return env


def run_ca(
    *args: str | Path,
    ca_dir: Path | None = None,
    db: str | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """``python -m ca ARGS`` in ``cwd``, on the state directory ``ca_dir`` (as $CA_DIR) and the index ``db``
    (as $CA_DB) if given.

    The environment is ``env``, by default ``ca_env()``. With ``check``, a non-zero exit fails the test
    with ca's stderr; a test about a refusal passes ``check=False`` and asserts on the result itself.
    """
    env = dict(env if env is not None else ca_env())
    if ca_dir is not None:
        env["CA_DIR"] = str(ca_dir)
    if db is not None:
        env["CA_DB"] = db
    result = subprocess.run(
        [sys.executable, "-m", "ca", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )
    if check and result.returncode != 0:
        raise AssertionError(f"ca {' '.join(map(str, args))} failed ({result.returncode}): {result.stderr}")
    return result


def start_ca(*args: str | Path, cwd: Path) -> subprocess.Popen[str]:
    """``python -m ca ARGS`` in ``cwd``, running in the background with its output piped; the caller waits."""
    return subprocess.Popen(
        [sys.executable, "-m", "ca", *map(str, args)],
        cwd=cwd, env=ca_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def issue(ca_dir: Path, out: Path, spiffe_id: str, *extra: str, db: str | None = None) -> Path:
    """`ca issue SPIFFE_ID --out OUT EXTRA...` on ``ca_dir`` (index ``db`` if given); returns the directory ``out``."""
    run_ca("issue", spiffe_id, "--out", out, *extra, ca_dir=ca_dir, db=db)
    return out


def assert_one_line_error(result: subprocess.CompletedProcess[str], exit_code: int) -> str:
    """The contract's error shape: the exit code, one line on stderr starting 'ca: ', no traceback."""
    assert result.returncode == exit_code, result.stderr
    assert result.stderr.startswith("ca: "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr.strip()


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def mode_of(path: Path) -> int:
    return path.stat().st_mode & 0o777
