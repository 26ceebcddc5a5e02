"""Sphinx configuration for the ewc_jax documentation (Sphinx + MyST-NB, as JAX, Flax and Optax).

Builds offline: no intersphinx, no notebook execution (the tutorial's stored outputs are shown;
``tests/test_notebook.py`` executes it), MathJax is loaded by the reader's browser. Build with
``make docs``, which runs ``sphinx-build -W --keep-going -n`` (warnings are errors, nitpicky).
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a fresh clone builds without installing the package

import ewc_jax  # noqa: E402

project = "ewc_jax"
author = "ewc_jax authors"
copyright = "ewc_jax authors"
release = ewc_jax.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build", "**.ipynb_checkpoints", "tutorial.py", "README.md"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}

# MyST: $...$ math in Markdown pages, ``:::`` fences, heading anchors for cross-page links.
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
# The tutorial is stored executed; executing it again is tests/test_notebook.py's job.
nb_execution_mode = "off"

# API reference: one page per public name, generated from the docstrings (Google style).
autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
# Signatures show the aliases as written (the modules use `from __future__ import annotations`),
# not their expansions (`ArrayLike` is a union of nine types, `Params` is `Any`).
autodoc_type_aliases = {
    name: name
    for name in (
        "PyTree", "Params", "ApplyFn", "Where", "Estimator", "ConsolidationMode", "Method",
        "KFACEstimator", "jax.typing.ArrayLike", "jax.typing.DTypeLike", "ArrayLike", "DTypeLike",
    )
}  # fmt: skip
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # NamedTuple fields: documented once, by autodoc

# Nitpicky for our own names; the types of other packages have no pages here (no intersphinx,
# which needs the network), so references into them are left unresolved on purpose.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jaxlib|optax|flax|numpy|np|jnp|equinox|eqx|chex)(\..*)?"),
    (r"py:.*", r"(typing|collections\.abc|contextlib|types|enum|os|pathlib)\..*"),
    (r"py:.*", r"(Array|ArrayLike|DTypeLike|Any|Callable|Sequence|Mapping|Literal|Self)"),
    # Private aliases that the signatures show by name; each argument's docstring says what it is.
    (r"py:.*", r"(PyTree|Params|ApplyFn|Where|Method|PrecisionT|Curvature)"),
    (r"py:.*", r"(NoneType|None|int|float|bool|str|tuple|dict|list|object|Iterator)"),
    # Private modules and functions have no pages: a docstring that names one shows it as code.
    (r"py:.*", r"(ewc_jax\.)?_.*"),
]

html_theme = "furo"
html_title = f"ewc_jax {release}"
templates_path = ["_templates"]
html_static_path: list[str] = []
html_show_sourcelink = False

# Docstrings inside the private modules name their neighbours briefly (:func:`consolidate`,
# :class:`KFACState`); the pages document them under their public names. Resolve such a short
# name against the public namespaces, in order, before nitpicky mode calls it missing.
PUBLIC_NAMESPACES = ("ewc_jax", "ewc_jax.kfac", "ewc_jax.importance", "ewc_jax.evidence")


def _resolve_public_name(app, env, node, contnode):
    if node.get("refdomain") != "py" or node["reftarget"].startswith("ewc_jax."):
        return None
    domain = env.get_domain("py")
    for namespace in PUBLIC_NAMESPACES:
        retry = node.deepcopy()
        retry["reftarget"] = f"{namespace}.{node['reftarget']}"
        resolved = domain.resolve_xref(
            env, node["refdoc"], app.builder, node["reftype"], retry["reftarget"], retry, contnode
        )
        if resolved is not None:
            return resolved
    return None


# The tutorial links to ../BENCHMARKS.md (right on GitHub); on the site that file is the page
# `benchmarks`, which includes it.
def _link_repository_files_to_pages(app, doctree):
    from sphinx import addnodes

    for node in doctree.findall(addnodes.pending_xref):
        if node.get("reftype") == "myst" and str(node.get("reftarget", "")).endswith("BENCHMARKS"):
            node["reftarget"] = "benchmarks"


# A NamedTuple's fields are listed once, under "Variables", from the Google-style docstring;
# autodoc would list them again as "Alias for field number 0".
def _skip_namedtuple_fields(app, what, name, obj, skip, options):
    doc = getattr(obj, "__doc__", None) or ""
    return True if what == "class" and doc.startswith("Alias for field number") else None


# Sphinx 9 prints an alias inside a union (`Params | None`) as `TypeAliasForwardRef('Params') |
# None` (sphinx-doc/sphinx#14004); print the alias's name.
_FORWARD_REF = re.compile(r"TypeAliasForwardRef\('([^']+)'\)")


def _plain_alias_names(app, what, name, obj, options, signature, return_annotation):
    def plain(text):
        return _FORWARD_REF.sub(r"\1", text) if text else text

    return plain(signature), plain(return_annotation)


def setup(app):
    app.connect("autodoc-process-signature", _plain_alias_names)
    app.connect("autodoc-skip-member", _skip_namedtuple_fields)
    app.connect("missing-reference", _resolve_public_name)
    app.connect("doctree-read", _link_repository_files_to_pages)
