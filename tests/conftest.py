"""Shared test settings: deterministic seeds and one intra-op thread per test process.

``make test`` runs two pytest workers (pytest-xdist) on the 2-core CI machine; with one thread each,
the small models of the suite do not pay for thread barriers on a core the other worker is using.
"""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test starts on one intra-op thread; a test that sets more does not pass them on."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(items):
    """Run the registry-wide tests model by model, so each model is built once and reused."""

    def model_key(item):
        callspec = getattr(item, "callspec", None)
        if item.module.__name__.endswith("test_models") and callspec and "name" in callspec.params:
            return (item.module.__name__, callspec.params["name"])
        return (item.module.__name__, "")

    order = {id(item): index for index, item in enumerate(items)}
    items.sort(key=lambda item: (item.fspath.strpath, model_key(item)[1], order[id(item)]))
