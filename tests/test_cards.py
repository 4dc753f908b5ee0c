"""The committed model cards are exactly what the generator writes from the registry."""

from __future__ import annotations

from pathlib import Path

import pytest

import recurzoo
from recurzoo.export.cards import DEFAULT_OUT, family_models, family_name, render_card

FAMILIES = list(recurzoo.backbones.FAMILY_MODULES)

# Families whose full-size counts take minutes (task models on large inputs, several passes per
# image): the check recounts these variants and compares everything else in the card verbatim.
ROWS_CHECKED = {
    "camouflage": ["msrnet_hornet_tiny_7x7"],
    "rgt": ["rgt", "rgt_small_x2"],
}


def _without_rows_except(text: str, keep: list[str], models: list[str]) -> str:
    dropped = {f"| `{name}` |" for name in models if name not in keep}
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith(tuple(dropped)))


@pytest.mark.parametrize("module_name", FAMILIES, ids=[family_name(m) for m in FAMILIES])
def test_committed_card_is_up_to_date(module_name):
    path = Path(DEFAULT_OUT) / f"{family_name(module_name)}.md"
    assert path.exists(), f"{path} is missing: run python -m recurzoo.export.cards"
    committed = path.read_text()
    keep = ROWS_CHECKED.get(family_name(module_name))
    if keep is not None:
        models = family_models(module_name)
        assert set(keep) <= set(models)
        assert all(f"| `{name}` |" in committed for name in models), f"{path} misses variants"
        committed = _without_rows_except(committed, keep, models)
    assert committed == render_card(module_name, only=keep), f"{path} is stale: run python -m recurzoo.export.cards"


def test_hornet_card_lists_every_variant_with_its_figures():
    text = render_card("recurzoo.backbones.hornet")
    for name in recurzoo.list_models("hornet_*"):
        assert f"| `{name}` |" in text
    assert "| `hornet_tiny_7x7` | 22.41 | 3.99 | 3x224x224 | 4/8/16/32 |" in text
