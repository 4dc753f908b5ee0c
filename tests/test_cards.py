"""The committed model cards are exactly what the generator writes from the registry."""

from __future__ import annotations

from pathlib import Path

import pytest

import recurzoo
from recurzoo.export.cards import DEFAULT_OUT, ZOO_FIGURES, family_models, render_card

FAMILIES = recurzoo.registry.list_families()

# Families whose full-size counts take minutes (task models on large inputs, several passes per
# image): the check recounts these variants and compares everything else in the card verbatim.
ROWS_CHECKED = {
    "camouflage": ["msrnet_hornet_tiny_7x7"],
    "rgt": ["rgt", "rgt_small_x2"],
}


def _without_rows_except(text: str, keep: list[str], models: list[str]) -> str:
    dropped = {f"| `{name}` |" for name in models if name not in keep}
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith(tuple(dropped)))


@pytest.mark.parametrize("family", FAMILIES)
def test_committed_card_is_up_to_date(family):
    path = Path(DEFAULT_OUT) / f"{family}.md"
    assert path.exists(), f"{path} is missing: run python -m recurzoo.export.cards"
    committed = path.read_text()
    keep = ROWS_CHECKED.get(family)
    if keep is not None:
        models = family_models(family)
        assert set(keep) <= set(models)
        assert all(f"| `{name}` |" in committed for name in models), f"{path} misses variants"
        committed = _without_rows_except(committed, keep, models)
    assert committed == render_card(family, only=keep), f"{path} is stale: run python -m recurzoo.export.cards"


def test_hornet_card_lists_every_variant_with_its_figures():
    text = render_card("hornet")
    for name in recurzoo.list_models("hornet_*"):
        assert f"| `{name}` |" in text
    assert "| `hornet_tiny_7x7` | 22.41 | 3.99 | 3x224x224 | 4/8/16/32 |" in text


def test_demo_figures_are_the_cards_figures():
    """``recurzoo demo`` prints the packaged zoo.csv: every row must be its model's row in the (checked) card."""
    import csv

    with ZOO_FIGURES.open(newline="") as handle:
        rows = {row["model"]: row for row in csv.DictReader(handle)}
    assert set(rows) == set(recurzoo.list_models())
    for family in FAMILIES:
        card = (Path(DEFAULT_OUT) / f"{family}.md").read_text()
        for name in family_models(family):
            row = rows[name]
            assert row["family"] == family and row["task"] == recurzoo.model_task(name)
            expected = (
                f"| `{name}` | {row['params_m']} | {row['gflops']} | {row['input_size']} | {row['strides']} | "
                f"{row['unrolled_params_m']} |"
            )
            assert expected in card, f"{ZOO_FIGURES} row of {name} differs from {family}.md: run make cards"


def test_demo_runs_each_family_at_a_size_within_its_flop_budget():
    """The demo's forward passes shrink a card's input so that its fvcore FLOPs fall near ``DEMO_GFLOPS``."""
    import csv

    from recurzoo.apps import DEMO_GFLOPS, demo_input_size

    with ZOO_FIGURES.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        _, height, width = (int(side) for side in row["input_size"].split("x"))
        stride = max(int(s) for s in row["strides"].split("/"))
        demo_height, demo_width = demo_input_size(row)
        assert demo_height % stride == 0 and demo_width % stride == 0, row["model"]
        assert demo_height <= height and demo_width <= width, row["model"]
        budget_side = max(2 * stride, (DEMO_GFLOPS / float(row["gflops"])) ** 0.5 * height)
        assert demo_height <= budget_side or demo_height == height, row["model"]
    msrnet = next(row for row in rows if row["model"] == "msrnet_hornet_tiny_7x7")
    assert demo_input_size(msrnet) == (96, 96)
