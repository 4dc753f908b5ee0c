"""Checkpoints: nothing in a file can run code, bad files fail clearly, weights round-trip."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

import recurzoo  # noqa: F401
from recurzoo.checkpoint import load_weights, read_checkpoint, read_state_dict, save_weights

sys.path.insert(0, os.path.dirname(__file__))
from _parity import in_repo_fixture  # noqa: E402
from _train_data import write_code_running_checkpoints  # noqa: E402

SMALL = dict(dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), num_classes=5)


def test_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "code_ran"
    for candidate in write_code_running_checkpoints(str(tmp_path), str(marker)):  # legacy pickle and zip
        for read in (read_state_dict, read_checkpoint):
            with pytest.raises(ValueError, match="refused to load"):
                read(candidate)
    assert not marker.exists()


def test_use_ema_false_takes_the_plain_weights_of_a_training_checkpoint(tmp_path):
    path = tmp_path / "train.pth"
    torch.save(dict(state_dict=dict(w=torch.zeros(2)), state_dict_ema=dict(w=torch.ones(2)), epoch=3), path)
    assert torch.equal(read_state_dict(path)["w"], torch.ones(2))
    assert torch.equal(read_state_dict(path, use_ema=False)["w"], torch.zeros(2))
    assert read_checkpoint(path)["epoch"] == 3


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file_gives_a_clear_error(tmp_path, suffix):
    model = recurzoo.create_model("hornet_tiny_7x7", **SMALL)
    path = save_weights(model, tmp_path / "w.safetensors") if suffix == ".safetensors" else tmp_path / "w.pth"
    if suffix == ".pth":
        torch.save(model.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_state_dict(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="no such checkpoint file"):
        read_state_dict(tmp_path / "absent.pth")


def test_checkpoint_of_another_architecture_lists_keys_and_shapes_in_one_message(tmp_path):
    source = recurzoo.create_model("hornet_tiny_7x7", **SMALL)
    path = tmp_path / "other.pth"
    torch.save(source.state_dict(), path)
    target = recurzoo.create_model("hornet_tiny_gf", dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), num_classes=7)
    with pytest.raises(ValueError) as error:
        load_weights(target, path)
    message = str(error.value)
    assert "hornet_tiny_gf" in message and "missing keys" in message and "unexpected keys" in message
    assert "head.fc.weight (5, 128) vs (7, 128)" in message
    assert len(message.splitlines()) == 1


def test_safetensors_round_trip_writes_config_beside_weights(tmp_path):
    model = recurzoo.create_model("hornet_tiny_gf", **SMALL).eval()
    path = save_weights(model, tmp_path / "model", config=dict(epochs=3))
    assert path.suffix == ".safetensors"
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["architecture"] == "hornet_tiny_gf" and record["config"] == {"epochs": 3}
    clone = load_weights(recurzoo.create_model("hornet_tiny_gf", **SMALL).eval(), path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))


def test_official_layout_is_converted_by_the_family_filter(tmp_path):
    """A file in the authors' layout (the committed HorNet fixture, wrapped as their training saves it)
    loads through the family's filter and computes the authors' output."""
    fixture = in_repo_fixture("hornet", "hornet_7x7_tiny")
    kwargs = fixture["official"]["kwargs"]
    path = tmp_path / "official.pth"
    torch.save({"model": fixture["state_dict"]}, path)
    dims = [kwargs["base_dim"] * 2**i for i in range(4)]
    model = recurzoo.create_model(
        "hornet_tiny_7x7", num_classes=kwargs["num_classes"], depths=kwargs["depths"], dims=dims
    )
    load_weights(model, path)
    with torch.no_grad():
        output = model.eval()(fixture["inputs"]["x"])
    torch.testing.assert_close(output, fixture["output"], rtol=1e-4, atol=1e-4)
