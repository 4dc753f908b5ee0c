"""Hub folders from the authors' checkpoints: ``recurzoo convert`` writes, loads back and checks them.

Each family converts a checkpoint in the official layout (a parity fixture's ``state_dict``, saved as the
authors' scripts save it) into a timm Hub folder at a reduced width, loads it back with ``local-dir:``
(``timm.create_model`` for timm models, ``recurzoo.create_model`` for task models) and compares outputs
with the official checkpoint loaded through the family's filter.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import timm
import torch
import yaml

import recurzoo
from recurzoo.cli import main as cli_main
from recurzoo.export import hub

FIXTURES = Path(__file__).resolve().parent / "parity" / "fixtures"
SRET_STRUCTURE = dict(
    num_shared_blocks=(1, 2, 1), recursions=(2, 2, 2), num_groups=(4, 3, 1), recursive_num_groups=(2, 3, 1)
)

# family: (fixture under tests/parity/fixtures/<family>/, zoo name with tag, architecture arguments of the
# fixture's width, how the authors save it)
CASES = {
    "hornet": (
        "hornet_gf_tiny",
        "hornet_tiny_gf.in1k",
        dict(dims=(4, 8, 16, 32), depths=(1, 1, 2, 1), num_classes=10),
        "model",
    ),
    "sret": (
        "sret_slices_tiny",
        "sret_tiny.in1k",
        dict(embed_dims=(8, 16, 32), num_heads=(2, 4, 8), img_size=48, num_classes=10, **SRET_STRUCTURE),
        "model",
    ),
    "rgt": (
        "rgt_x2_tiny",
        "rgt_small_x2",
        dict(embed_dim=64, depths=(2, 1), num_heads=2, split_size=(2, 4)),
        "params_ema",
    ),
}


def _fixture(family: str) -> dict:
    path = FIXTURES / family / f"{CASES[family][0]}.pt"
    assert path.is_file(), f"{path} is missing: run `make parity-fixtures OFFICIAL_ROOT=...`"
    return torch.load(path, weights_only=True)


def _official_file(tmp_path: Path, family: str) -> Path:
    case, _, _, wrapper = CASES[family]
    path = tmp_path / "downloads" / f"{case}.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({wrapper: _fixture(family)["state_dict"]}, path)
    return path


@pytest.mark.parametrize("family", sorted(CASES))
def test_converted_folder_loads_back_to_the_official_outputs(tmp_path, family):
    _, name, kwargs, _ = CASES[family]
    checkpoint = _official_file(tmp_path, family)
    result = hub.convert(name, checkpoint, tmp_path / "hub", model_kwargs=kwargs)
    folder = Path(result.folder)
    assert result.ok and result.max_abs_diff == 0.0
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == name.split(".")[0]

    factory = timm.create_model if recurzoo.model_task(name) == "classification" else recurzoo.create_model
    reloaded = factory(f"local-dir:{folder}", pretrained=True).eval()
    official = recurzoo.create_model(
        name,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(checkpoint), num_classes=kwargs.get("num_classes")),
        **kwargs,
    ).eval()
    x = hub._example_input(official)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), official(x), rtol=0, atol=0)
    fresh = recurzoo.create_model(name, **kwargs).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(x), official(x)), "the comparison would not notice unloaded weights"


def test_converted_folder_and_files_get_the_users_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        result = hub.convert(
            "hornet_tiny_gf.in1k", _official_file(tmp_path, "hornet"), tmp_path / "hub", model_kwargs=CASES["hornet"][2]
        )
    finally:
        os.umask(previous)
    folder = Path(result.folder)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in [folder, *folder.iterdir()]}
    assert modes == {"hornet_tiny_gf.in1k": 0o750, "README.md": 0o640, "config.json": 0o640, "model.safetensors": 0o640}


def test_card_metadata_block_is_valid_for_the_hub(tmp_path):
    result = hub.convert(
        "hornet_tiny_gf.in1k", _official_file(tmp_path, "hornet"), tmp_path / "hub", model_kwargs=CASES["hornet"][2]
    )
    text = (Path(result.folder) / "README.md").read_text()
    assert text.startswith("---\n")
    metadata = yaml.safe_load(text.split("---\n")[1])
    assert metadata["library_name"] == "timm" and metadata["license"] == "mit"
    assert metadata["pipeline_tag"] == "image-classification"
    assert "arxiv:2207.14284" in metadata["tags"] and "imagenet-1k" in metadata["datasets"]
    (entry,) = metadata["model-index"]
    assert entry["name"] == "hornet_tiny_gf.in1k"
    (metric,) = entry["results"][0]["metrics"]
    assert metric["type"] == "accuracy" and metric["value"] == 83.0  # the authors' published top-1


def test_cli_refuses_an_existing_folder_and_converts_a_download_folder(tmp_path, capsys):
    checkpoint = _official_file(tmp_path, "sret")
    args = ["convert", "sret_tiny", str(checkpoint), "--tag", "in1k", "--out", str(tmp_path / "hub"), "--model-kwargs"]
    args += ["embed_dims=(8,16,32)", "num_heads=(2,4,8)", "img_size=48", "num_classes=10"]
    args += [f"{key}={value}".replace(" ", "") for key, value in SRET_STRUCTURE.items()]
    assert cli_main(args) == 0
    assert cli_main(args) == 2
    assert "exists already (pass --overwrite" in capsys.readouterr().err
    assert cli_main(["convert", "sret_tiny", str(tmp_path / "absent.pth"), "--out", str(tmp_path / "x")]) == 2


def test_cli_refuses_a_push_it_cannot_make_before_converting_and_a_download_folder_with_nothing_to_convert(
    tmp_path, capsys
):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    torch.save({"w": torch.zeros(3)}, downloads / "mystery.pth")
    base = ["convert", "--all", str(downloads), "--out", str(tmp_path / "hub")]
    cases = [
        (["convert", "sret_tiny", "weights.pth", "--out", str(tmp_path / "hub"), "--push", "a/b/c"], "ORG/NAME"),
        ([*base, "--push", "someone/model"], "--push takes one conversion"),
        (base, f"--all {downloads}: converted nothing (1 file(s) tried"),
    ]
    for argv, message in cases:
        assert cli_main(argv) == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "hub").exists() or not any((tmp_path / "hub").iterdir())


def test_download_folder_files_are_matched_to_their_models_by_name(tmp_path):
    from recurzoo.checkpoint import cached_weights_path

    cfg = recurzoo.registry.pretrained_cfgs("hornet_tiny_7x7")["hornet_tiny_7x7.in1k"]
    path = tmp_path / cached_weights_path(cfg).name
    path.write_bytes(b"")
    assert hub.find_model_for(path) == "hornet_tiny_7x7.in1k"
    unknown = tmp_path / "mystery.pth"
    torch.save({"w": torch.zeros(3)}, unknown)
    with pytest.raises(ValueError, match="no zoo model fits"):
        hub.find_model_for(unknown, candidates=["hornet_tiny_7x7"])


def test_push_without_network_fails_fast_and_names_the_folder(tmp_path, monkeypatch):
    from recurzoo import checkpoint

    result = hub.convert(
        "hornet_tiny_gf.in1k", _official_file(tmp_path, "hornet"), tmp_path / "hub", model_kwargs=CASES["hornet"][2]
    )
    monkeypatch.setattr(checkpoint, "_reachable", lambda url, timeout: False)
    with pytest.raises(ValueError, match="out of reach; the folder .* is ready to upload later"):
        hub.push(result.folder, "someone/hornet")
