"""The repository is an installable package (pyproject.toml): the README's commands install it, so the
`im-backend` command exists beside `python -m backend`, and an app imports backend.client from anywhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


from conftest import REPO
from services import require


def _installed() -> None:
    # Asked from another directory: here, the repository's own mqtt_im_backend.egg-info (left by an editable
    # install into another venv) would answer for an interpreter that has not installed it.
    r = subprocess.run([sys.executable, "-c", "from importlib import metadata; metadata.distribution('mqtt-im-backend')"],
                       cwd="/", env=_clean_env(), capture_output=True, timeout=30)
    if r.returncode != 0:
        # Like a missing service: skipped with its reason here, a failure in CI, which runs the README's command.
        require(False, f"mqtt-im-backend is not installed in {sys.prefix} "
                       f"(the README's command does it: pip install -r requirements.txt -e .)")


def _clean_env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # an app's environment: no path pointing at the repository
    return env


def test_the_im_backend_command_runs(tmp_path):
    _installed()
    command = Path(sys.executable).parent / "im-backend"
    assert command.exists(), f"{command} missing: the console script of pyproject.toml was not installed"
    r = subprocess.run([str(command), "--help"], cwd=tmp_path, env=_clean_env(), capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: im-backend") and "serve" in r.stdout and "worker" in r.stdout
    r = subprocess.run([str(command)], cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "im-backend: error: choose a command" in r.stderr


def test_an_app_imports_the_client_from_any_directory(tmp_path):
    _installed()
    app = tmp_path / "app.py"
    app.write_text("from backend.client import IMClient\nimport backend\nprint(backend.__file__)\n")
    r = subprocess.run([sys.executable, str(app)], cwd=tmp_path, env=_clean_env(), capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).resolve().parent.parent == REPO  # the editable install points at this clone


def test_ci_runs_the_readme_test_command():
    """.ci/run is the README's command 2, which installs the package (so the tests above run there)."""
    readme = (REPO / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("python3 -m venv") and "pytest" in line)
    assert "-e ." in command
    assert command in (REPO / ".ci" / "run").read_text()
