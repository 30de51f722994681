"""The benchmarks stay runnable: each module of ``benchmarks/`` imports against the package as it is now.

They run by hand, not in the suite, so a moved module would otherwise break them unseen.
"""

from __future__ import annotations

import importlib

import pytest

from tests.harness import ROOT

MODULES = sorted(path.stem for path in (ROOT / "benchmarks").glob("*.py") if path.stem != "__init__")


@pytest.mark.parametrize("name", MODULES)
def test_the_benchmark_imports(name):
    module = importlib.import_module(f"benchmarks.{name}")
    assert module.__doc__, f"benchmarks/{name}.py says what it measures and how to run it"
