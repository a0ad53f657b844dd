"""The ``>>>`` examples in the public docstrings run, and give what they show."""

import doctest
import importlib

import pytest

MODULES = [
    "persample.errors",
    "persample.contract",
    "persample.explain",
    "persample.custom_rules",
    "persample._torch_compat",
    "persample.repair",
    "persample.demo",
    "persample.api",
    "persample.check",
    "persample.stats",
    "persample.tracker",
    "persample._grad_writer",
    "persample._step_plan",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no >>> example"
    assert result.failed == 0
