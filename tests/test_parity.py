"""Parity with the authors' code: every fixture captured from an official implementation.

Fixtures are ``*.pt`` files under ``tests/parity/fixtures`` (committed; written by
``tests/parity/generate.py`` from the authors' repositories), ``../shared/parity`` (beside the
repository) and every directory listed in ``RECURZOO_PARITY_DIRS`` (``os.pathsep``-separated). Each
one names the official constructor and its keyword arguments; the model is built from those through
``recurzoo.official.build``, loads the official ``state_dict`` through the family's
``checkpoint_filter_fn`` and must reproduce the official eval-mode output.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import List

import pytest
import torch

import recurzoo
from recurzoo import official

REPO_ROOT = Path(__file__).resolve().parents[1]
IN_REPO = REPO_ROOT / "tests" / "parity" / "fixtures"


def parity_dirs() -> List[Path]:
    dirs = [IN_REPO, REPO_ROOT.parent / "shared" / "parity"]
    dirs += [Path(d) for d in os.environ.get("RECURZOO_PARITY_DIRS", "").split(os.pathsep) if d]
    return [d for d in dirs if d.is_dir()]


def fixture_files() -> List[Path]:
    return sorted({path.resolve() for d in parity_dirs() for path in d.rglob("*.pt")})


def _fixture_id(path: Path) -> str:
    return f"{path.parent.name}-{path.stem}"


def _assert_close(ours, theirs, where: str = "output") -> None:
    if isinstance(theirs, (list, tuple)):
        assert isinstance(ours, (list, tuple)) and len(ours) == len(theirs), f"{where}: structure differs"
        for index, (a, b) in enumerate(zip(ours, theirs)):
            _assert_close(a, b, f"{where}[{index}]")
        return
    if isinstance(theirs, dict):
        for key in theirs:
            _assert_close(ours[key], theirs[key], f"{where}[{key!r}]")
        return
    assert ours.shape == theirs.shape, f"{where}: shape {tuple(ours.shape)} != official {tuple(theirs.shape)}"
    scale = max(1.0, theirs.abs().max().item())
    max_diff = (ours - theirs).abs().max().item()
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4 * scale), (
        f"{where}: max abs difference {max_diff:.3e} (official scale {scale:.3g})"
    )


FIXTURES = fixture_files()


def test_every_official_class_has_a_fixture_in_the_repository():
    """Each clone checks faithfulness: every official class reproduced here has a committed fixture."""
    found = {}
    for path in sorted(IN_REPO.rglob("*.pt")):
        fixture = torch.load(path, map_location="cpu", weights_only=True)
        found.setdefault(fixture["official"]["constructor"], []).append(path.stem)
    missing = sorted(set(official.registered_constructors()) - set(found))
    assert not missing, (
        f"no fixture under {IN_REPO} for {missing}: run `make parity-fixtures OFFICIAL_ROOT=...` "
        f"(tests/parity/generate.py)"
    )


@pytest.mark.parametrize("path", FIXTURES, ids=[_fixture_id(p) for p in FIXTURES])
def test_matches_official_implementation(path: Path):
    fixture = torch.load(path, map_location="cpu", weights_only=True)
    constructor = fixture["official"]["constructor"]
    assert constructor in official.registered_constructors(), f"no model reproduces the official {constructor!r}"
    assert fixture.get("mode", "eval") == "eval"
    kwargs = fixture["official"]["kwargs"]
    model = recurzoo.build_official(constructor, kwargs, fixture["state_dict"]).eval()
    with torch.no_grad():
        output = official.run(constructor, model, fixture["inputs"])
    _assert_close(output, fixture["output"])


@pytest.mark.parametrize("path", sorted(IN_REPO.rglob("*.pt")), ids=_fixture_id)
def test_fixture_output_depends_on_the_weights(path: Path):
    """A model with its own random weights misses the official output: the comparison can fail."""
    fixture = torch.load(path, map_location="cpu", weights_only=True)
    constructor = fixture["official"]["constructor"]
    model = recurzoo.build_official(constructor, fixture["official"]["kwargs"]).eval()
    with torch.no_grad():
        output = official.run(constructor, model, fixture["inputs"])
    with pytest.raises(AssertionError, match="max abs difference"):
        _assert_close(output, fixture["output"])


def _generator():
    spec = importlib.util.spec_from_file_location("parity_generate", REPO_ROOT / "tests" / "parity" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_fixtures_are_the_generators_cases_at_its_commits():
    generate = _generator()
    committed = {path.stem: path for path in IN_REPO.rglob("*.pt")}
    assert sorted(committed) == sorted(generate.CASES)
    folders = {"hornet": "HorNet", "sret": "SReT", "rgt": "RGT", "msrnet": "MSRNet"}
    for case, path in committed.items():
        fixture = torch.load(path, map_location="cpu", weights_only=True)
        repo, commit = generate.COMMITS[folders[fixture["family"]]]
        assert (fixture["case"], path.parent.name) == (case, fixture["family"])
        assert f"{repo}@{commit[:12]}" in fixture["notes"], f"{case}: not written from {repo}@{commit[:12]}"


@pytest.mark.skipif(
    not os.environ.get("RECURZOO_OFFICIAL_ROOT"), reason="set RECURZOO_OFFICIAL_ROOT to the authors' checkouts"
)
def test_generator_rewrites_the_committed_fixtures(tmp_path):
    """With the authors' code at hand, the generator reproduces every committed fixture."""
    generate = _generator()
    assert generate.main(["--official-root", os.environ["RECURZOO_OFFICIAL_ROOT"], "--out", str(tmp_path)]) == 0
    for path in sorted(IN_REPO.rglob("*.pt")):
        fresh = torch.load(tmp_path / path.parent.name / path.name, weights_only=True)
        committed = torch.load(path, weights_only=True)
        assert (
            fresh["official"] == committed["official"] and fresh["state_dict"].keys() == committed["state_dict"].keys()
        )
        for key, value in committed["state_dict"].items():
            assert torch.equal(fresh["state_dict"][key], value), f"{path.stem}: {key}"
        _assert_close(fresh["output"], committed["output"], f"{path.stem} output")
