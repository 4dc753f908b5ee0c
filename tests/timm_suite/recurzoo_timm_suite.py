"""pytest plugin: run timm's own ``tests/test_models.py`` on the names this zoo adds to timm's registry.

Loaded with ``-p recurzoo_timm_suite`` (``make timm-suite`` puts this folder on ``PYTHONPATH``) while
pytest runs the file from the installed timm's source distribution. The names are computed, not
listed: every ``timm.list_models()`` entry whose builder lives in a ``recurzoo`` module. timm's test
file parametrises its per-model tests over all of timm's models; this plugin keeps the items of the
zoo's names and deselects:

* tests that name no model of the zoo (timm's own models, hand-picked by the file);
* TorchScript tests (the zoo does not promise scriptability);
* pretrained tests (they download weights).

timm runs its ``forward_intermediates`` and pruning contract tests only on the model modules of its
``FEAT_INTER_FILTERS`` list; every family of the zoo implements that interface, so its modules join
the list (``timm.list_models`` is wrapped to add them before the test file is collected).
"""

from __future__ import annotations

import functools
from typing import Any, List, Set

import pytest
import timm

import recurzoo  # noqa: F401  (registers the zoo's models in timm's registry)

_DESELECTED_WORDS = ("torchscript", "pretrained")


@functools.lru_cache(maxsize=1)
def zoo_model_names() -> Set[str]:
    """The names in timm's registry whose builder is defined by this zoo."""
    from timm.models import model_entrypoint

    return {name for name in timm.list_models() if model_entrypoint(name).__module__.startswith("recurzoo")}


def zoo_model_modules() -> Set[str]:
    """The model-module names timm's registry files the zoo's names under (``hornet``, ``sret``, ...)."""
    from timm.models import model_entrypoint

    # timm's registry files a model under the last part of its builder's module name
    return {model_entrypoint(name).__module__.rsplit(".", 1)[-1] for name in zoo_model_names()}


def _with_zoo_modules(list_models):
    """``timm.list_models`` that treats the zoo's modules as members of any multi-module filter
    containing timm's ``convnext`` (the ``FEAT_INTER_FILTERS`` list of models with forward_intermediates)."""

    @functools.wraps(list_models)
    def wrapped(*args: Any, module: Any = "", **kwargs: Any) -> List[str]:
        if isinstance(module, (list, tuple)) and "convnext" in module:
            module = [*module, *sorted(zoo_model_modules() - set(module))]
        return list_models(*args, module=module, **kwargs)

    return wrapped


timm.list_models = _with_zoo_modules(timm.list_models)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "timeout(seconds): timm's per-test limit (pytest-timeout, when installed)")


def _model_name(item: pytest.Item) -> str:
    """The architecture an item tests (``name.tag`` parameters count as ``name``), else ``""``."""
    callspec = getattr(item, "callspec", None)
    name = callspec.params.get("model_name", "") if callspec is not None else ""
    return name.split(".", 1)[0] if isinstance(name, str) else ""


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    names = zoo_model_names()
    kept, deselected = [], []
    for item in items:
        function = item.originalname if isinstance(item, pytest.Function) else item.name
        wanted = _model_name(item) in names and not any(word in function for word in _DESELECTED_WORDS)
        (kept if wanted else deselected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


def pytest_report_header(config: pytest.Config) -> str:
    return f"recurzoo timm suite: {len(zoo_model_names())} zoo models in timm's registry"
