"""Fixtures of the preference-loss tests."""

import pytest


@pytest.fixture(scope="module")
def trl_available():
    pytest.importorskip("trl")
    import trl

    if not trl.__version__.startswith("1.16"):
        pytest.skip(f"the TRL oracle harness targets trl 1.16, found {trl.__version__}")
