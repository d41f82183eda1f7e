"""Tests of the research tooling (the shapes-world recipe, table makers, probes, the bundle).

They carry the `research` marker and run in the default suite: several guard the bundled model
(`test_bundled_model.py`). Select or skip them with `-m research` / `-m 'not research'`.
"""

import os

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if str(item.fspath).startswith(_HERE):
            item.add_marker(pytest.mark.research)
