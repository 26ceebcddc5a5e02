"""The docs: the site builds offline with warnings as errors, and stays in step with the code.

``make docs`` and this test run the same ``sphinx-build -W --keep-going -n``: a docstring that does
not parse, a cross-reference to a name that does not exist, a missing page in a toctree or an
image that is not there fails it. The other tests catch what Sphinx cannot see: a public name
without an API page, and a test that the README or a docs page cites but that no longer exists.
"""

from __future__ import annotations
import __future__

import importlib
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PUBLIC_MODULES = (
    "ewc_jax",
    "ewc_jax.kfac",
    "ewc_jax.importance",
    "ewc_jax.evidence",
    "ewc_jax.io",
)
DOC_FILES = [ROOT / "README.md", *sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)]


def _public_names(module_name: str) -> set[str]:
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    return {
        name
        for name in names
        if not isinstance(getattr(module, name), types.ModuleType | __future__._Feature)
    }


def _api_page_entries() -> dict[str, set[str]]:
    """The names each ``autosummary`` block of docs/api.md lists, by its ``currentmodule``."""
    text = (DOCS / "api.md").read_text()
    entries: dict[str, set[str]] = {}
    for module, block in re.findall(
        r"\.\. currentmodule:: (\S+)\s+\.\. autosummary::\n((?:   .*\n|\n)+)", text
    ):
        names = [line.strip() for line in block.splitlines() if line.strip()]
        entries.setdefault(module, set()).update(n for n in names if not n.startswith(":"))
    return entries


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_name_has_an_api_page(module_name):
    listed = _api_page_entries().get(module_name, set())
    public = _public_names(module_name)
    assert listed == public, (
        f"docs/api.md lists for {module_name}: missing {sorted(public - listed)}, "
        f"not public {sorted(listed - public)}"
    )


def _cited_tests() -> list[tuple[Path, str, str | None]]:
    cited = []
    for path in DOC_FILES:
        for file, test in re.findall(r"(tests/[\w/]+\.py)(?:::(\w+))?", path.read_text()):
            cited.append((path, file, test or None))
    return cited


def test_the_tests_the_docs_cite_exist():
    cited = _cited_tests()
    assert len(cited) >= 10  # the parse found the citations
    missing = []
    for path, file, test in cited:
        source = ROOT / file
        if not source.is_file():
            missing.append(f"{path.relative_to(ROOT)}: {file}")
        elif test and not re.search(rf"^((async )?def {test}\(|class {test}\b|{test}\s*[:=])",
                                    source.read_text(), re.MULTILINE):  # fmt: skip
            missing.append(f"{path.relative_to(ROOT)}: {file}::{test}")
    assert not missing, "cited but not there:\n" + "\n".join(missing)


def test_readme_links_point_at_files_that_exist():
    links = re.findall(r"\]\(((?!https?://|#)[^)\s]+)\)", (ROOT / "README.md").read_text())
    assert links
    missing = [link for link in links if not (ROOT / link.split("#")[0]).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_docs_name_no_console_script():
    # The wheel has none (experiments run from a clone: `python -m experiments.main`).
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "[project.scripts]" not in pyproject
    mentions = [p.relative_to(ROOT) for p in DOC_FILES if "ewc-jax-experiment" in p.read_text()]
    assert not mentions, f"these name the removed `ewc-jax-experiment` script: {mentions}"


@pytest.mark.slow
def test_docs_build_offline_with_warnings_as_errors(tmp_path):
    pytest.importorskip("myst_nb", reason="needs the `docs` extra (make test installs it)")
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-20000:]
    html = tmp_path / "html"
    for name in set().union(*map(_public_names, PUBLIC_MODULES)):
        pages = list((html / "_autosummary").glob(f"ewc_jax*.{name}.html"))
        assert pages, f"no API page for {name}"
    tutorial = (html / "tutorial.html").read_text()
    assert tutorial.count("<img") >= 5  # the stored outputs' figures are shown
