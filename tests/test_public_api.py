"""The public surface: a small root, Literal names, and the 0.1 spellings behind a warning."""

from __future__ import annotations

import typing
import warnings

import pytest

import ewc_jax

CORE = {
    "fisher_diagonal",
    "consolidate",
    "penalty",
    "empty_state",
    "EWCState",
    "add_ewc_penalty",
    "AddEWCPenaltyState",
    "set_ewc_state",
    "checks_enabled",
    "Estimator",
    "ConsolidationMode",
    "Precision",
}
MOVED = {
    "kfac_fisher": "kfac",
    "KFACFisher": "kfac",
    "KFACState": "kfac",
    "KroneckerFactors": "kfac",
    "KroneckerTerms": "kfac",
    "merge_kronecker_terms": "kfac",
    "KFAC_ESTIMATORS": "kfac",
    "mas_importance": "importance",
    "si_path_integral": "importance",
    "si_importance": "importance",
    "SIState": "importance",
}


def test_the_root_is_the_core_and_its_submodules():
    assert set(ewc_jax.__all__) == CORE | {"kfac", "importance", "evidence"}
    public = {name for name in vars(ewc_jax) if not name.startswith("_")}
    # ewc_jax.io (Orbax, the `files` extra) is imported on its own: once it is, it is an
    # attribute of the package too (tests/test_state_file.py checks that `import ewc_jax` skips it).
    assert public - {"io"} == set(ewc_jax.__all__)
    assert ewc_jax.__version__ == "0.2.0"


def test_names_are_literal_types():
    assert typing.get_args(ewc_jax.Estimator) == (
        "exact",
        "sampled",
        "empirical",
        "argmax",
        "batched",
    )
    assert typing.get_args(ewc_jax.ConsolidationMode) == ("separate", "online")
    assert typing.get_args(ewc_jax.kfac.KFACEstimator) == ewc_jax.kfac.KFAC_ESTIMATORS
    assert set(ewc_jax.kfac.KFAC_ESTIMATORS) < set(typing.get_args(ewc_jax.Estimator))


@pytest.mark.parametrize("name", sorted(MOVED))
def test_a_moved_name_still_resolves_with_a_warning_naming_the_new_one(name):
    new = f"ewc_jax.{MOVED[name]}.{name}"
    with pytest.warns(DeprecationWarning, match=rf"ewc_jax\.{name} is deprecated.*use {new}\."):
        old = getattr(ewc_jax, name)
    assert old is getattr(getattr(ewc_jax, MOVED[name]), name)


@pytest.mark.parametrize(
    ("name", "literal"),
    [("ESTIMATORS", ewc_jax.Estimator), ("CONSOLIDATION_MODES", ewc_jax.ConsolidationMode)],
)
def test_the_old_tuples_still_resolve_with_a_warning(name, literal):
    with pytest.warns(DeprecationWarning, match="typing.get_args"):
        assert getattr(ewc_jax, name) == typing.get_args(literal)


def test_an_unknown_name_is_an_attribute_error_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match="no attribute 'fisher'"):
            ewc_jax.fisher  # noqa: B018


def test_fast_is_gone():
    with pytest.raises(TypeError, match="fast"):
        ewc_jax.fisher_diagonal(lambda p, x: x, {}, None, fast=True)  # type: ignore[call-arg]
