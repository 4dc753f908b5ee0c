"""The committed model cards are exactly what the generator writes from the registry."""
from __future__ import annotations

from pathlib import Path

import pytest

import recurzoo
from recurzoo.export.cards import DEFAULT_OUT, family_name, render_card

FAMILIES = list(recurzoo.backbones.FAMILY_MODULES)


@pytest.mark.parametrize("module_name", FAMILIES, ids=[family_name(m) for m in FAMILIES])
def test_committed_card_is_up_to_date(module_name):
    path = Path(DEFAULT_OUT) / f"{family_name(module_name)}.md"
    assert path.exists(), f"{path} is missing: run python -m recurzoo.export.cards"
    assert path.read_text() == render_card(module_name), f"{path} is stale: run python -m recurzoo.export.cards"


def test_hornet_card_lists_every_variant_with_its_figures():
    text = render_card("recurzoo.backbones.hornet")
    for name in recurzoo.list_models("hornet_*"):
        assert f"| `{name}` |" in text
    assert "| `hornet_tiny_7x7` | 22.41 | 3.99 | 3x224x224 | 4/8/16/32 |" in text
