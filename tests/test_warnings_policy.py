"""The warning policy in pyproject.toml: a deprecation attributed to vlft's own code fails the test that triggers it,
one raised inside another library is only reported. A warning is attributed to the module that called `warn`'s
caller (`stacklevel`), so a deprecated library API called from vlft counts as vlft's."""

import warnings

import pytest


def _warn_from(module: str, category: type[Warning]) -> None:
    scope = {"__name__": module}
    exec("import warnings\ndef f(category):\n    warnings.warn('deprecated', category)\n", scope)
    scope["f"](category)


@pytest.mark.parametrize("module", ["vlft.export", "vlft_recipe_sft"])
@pytest.mark.parametrize("category", [DeprecationWarning, PendingDeprecationWarning, FutureWarning])
def test_deprecations_from_vlft_are_errors(module, category):
    with pytest.raises(category):
        _warn_from(module, category)


def test_deprecations_from_other_libraries_are_reported(pytestconfig):
    for option in pytestconfig.getoption("pythonwarnings") or []:  # `-W error::DeprecationWarning` decides otherwise
        fields = option.split(":") + [""] * 4
        if fields[2] in ("DeprecationWarning", "Warning") and not fields[3]:
            pytest.skip(f"-W {option} on the command line sets every deprecation's action")
    with warnings.catch_warnings(record=True) as caught:  # the filters pytest set up for this test stay in force
        _warn_from("transformers.modeling_utils", DeprecationWarning)
    assert [w.category for w in caught] == [DeprecationWarning]
