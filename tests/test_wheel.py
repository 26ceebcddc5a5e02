"""The wheel: built from the repository, installed into a new virtualenv, runs the README example.

The wheel must hold the library only (``ewc_jax`` with its ``py.typed`` marker), no top-level
``experiments`` package, and build without setuptools warnings. Offline and fast: the new
virtualenv gets its dependencies (jax, flax, optax, ...) from this interpreter's site-packages
through a ``.pth`` path line, which adds that directory to ``sys.path`` without running the
``.pth`` files in it (so the editable install of this repository stays out), and the wheel is
installed with ``--no-deps``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EXAMPLE_MARKER = "<!-- README example: tests/test_wheel.py runs it -->"
IGNORED = shutil.ignore_patterns(
    ".git", ".venv", "runs", "build", "dist", "_build", "_autosummary", "*.egg-info",
    "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis",
)  # fmt: skip


def readme_example() -> str:
    """The README's Python blocks that follow the example marker, in order, as one program."""
    text = README.read_text()
    blocks = re.findall(re.escape(EXAMPLE_MARKER) + r"\s*```python\n(.*?)```", text, re.DOTALL)
    assert blocks, f"no ```python block after {EXAMPLE_MARKER!r} in README.md"
    return "\n".join(blocks)


def test_readme_example_is_marked_and_short():
    example = readme_example()
    first = example.split("\n\n\n")[0]
    assert "import ewc_jax" in example
    assert len(README.read_text().splitlines()) <= 160
    assert len(first.splitlines()) <= 25


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_wheel_installs_in_a_new_virtualenv_and_runs_the_readme_example(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=IGNORED)
    dist = tmp_path / "dist"
    built = _run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(source)],
        cwd=tmp_path,
    )
    build_log = built.stdout + built.stderr
    assert "Deprecat" not in build_log, build_log  # e.g. a `license` table: SPDX string wanted
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")
    assert sdist.stat().st_size > 0

    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    top_level = {name for name in top_level if not name.endswith(".dist-info")}
    assert top_level == {"ewc_jax"}, f"the wheel holds {sorted(top_level)}"
    assert "ewc_jax/py.typed" in names
    entry_points = [name for name in names if name.endswith("entry_points.txt")]
    assert not entry_points, "the wheel declares entry points (a console script)"

    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    env_site = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            cwd=tmp_path,
        ).stdout.strip()
    )
    # The dependencies, not this repository: a path line does not run the editable finder.
    here = sysconfig.get_paths()
    (env_site / "dependencies.pth").write_text(f"{here['purelib']}\n{here['platlib']}\n")
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
         "--quiet", str(wheel)],
        cwd=tmp_path,
    )  # fmt: skip

    workdir = tmp_path / "elsewhere"  # outside the repository: nothing importable from the cwd
    workdir.mkdir()
    probe = (
        "import importlib.metadata, importlib.util, json, pathlib, ewc_jax;"
        "print(json.dumps({'file': ewc_jax.__file__, 'version': ewc_jax.__version__,"
        "'dist_version': importlib.metadata.version('ewc-jax'),"
        "'experiments': importlib.util.find_spec('experiments') is not None,"
        "'typed': (pathlib.Path(ewc_jax.__file__).parent / 'py.typed').is_file()}))"
    )
    found = json.loads(_run([str(python), "-c", probe], cwd=workdir).stdout)
    assert Path(found["file"]).resolve().is_relative_to(env.resolve()), found
    assert found["dist_version"] == found["version"]
    assert not found["experiments"], "a top-level `experiments` package is importable"
    assert found["typed"]

    (workdir / "example.py").write_text(readme_example())
    _run([str(python), "example.py"], cwd=workdir)
