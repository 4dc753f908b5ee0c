"""Offline fast-fail of ``recurzoo.create_model(name, pretrained=True)`` for timm's models: within seconds,
naming the file, the cache it belongs in and the option that takes a local file. Nothing is downloaded:
the network probe is replaced, and the Hugging Face cache is a temporary folder."""

from __future__ import annotations

import socket
import time

import pytest
import timm
import torch

import recurzoo
from recurzoo import checkpoint
from recurzoo.checkpoint import CheckpointError
from recurzoo.registry import UnknownModelError

TIMM_MODEL = "test_resnet.r160_in1k"  # timm's own tiny test model, weights on the Hugging Face hub
FAST = 10.0  # seconds


@pytest.fixture
def offline(monkeypatch):
    """No host answers (the probe says so at once); counts the probes."""
    probes = []
    monkeypatch.setattr(checkpoint, "_reachable", lambda url, timeout: probes.append(url) or False)
    return probes


def _create_timed(*args, **kwargs):
    start = time.perf_counter()
    try:
        return recurzoo.create_model(*args, **kwargs)
    finally:
        assert time.perf_counter() - start < FAST


def _assert_same_weights(model, source):
    loaded = model.state_dict()
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded[key], value)


def test_hub_weights_offline_fail_fast_naming_file_cache_and_local_option(offline, tmp_path):
    with pytest.raises(CheckpointError) as caught:
        _create_timed(TIMM_MODEL, pretrained=True, cache_dir=str(tmp_path))
    message = str(caught.value)
    assert "model.safetensors of timm/test_resnet.r160_in1k" in message and "out of reach" in message
    assert str(tmp_path / "models--timm--test_resnet.r160_in1k") in message  # the cache folder to fill
    assert "resolve/main/model.safetensors" in message and "pretrained_cfg_overlay=dict(file=" in message
    assert offline == ["https://huggingface.co"]


@pytest.mark.parametrize("family", ["hornet", "sret"])
def test_every_url_weight_of_the_zoo_has_its_own_cache_file_name(family):
    # Tsinghua Cloud URLs end in "/?dl=1", Google Drive ones in ".../uc": without a file name of its own
    # timm would cache every tag to the same path.
    urls = [timm.models.get_pretrained_cfg(name).url for name in timm.list_pretrained(f"{family}_*")]
    assert urls and all(isinstance(url, tuple) and url[1].endswith(".pth") for url in urls)
    assert len({file_name for _, file_name in urls}) == len(urls)


@pytest.mark.parametrize("name", ["hornet_tiny_7x7", "sret_tiny.distill_in1k"])
def test_zoo_url_weights_offline_fail_fast_naming_cache_and_local_option(offline, monkeypatch, name):
    monkeypatch.setenv("TORCH_HOME", "/nonexistent-cache")
    architecture = name.split(".")[0]
    with pytest.raises(
        ValueError, match=rf"{architecture}.*out of reach.*nonexistent-cache.*pretrained_cfg_overlay=dict\(file="
    ):
        _create_timed(name, pretrained=True)


def test_hub_offline_mode_is_named(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE is set"):
        _create_timed(TIMM_MODEL, pretrained=True, cache_dir=str(tmp_path))


def test_weights_in_the_hub_cache_load_offline(monkeypatch, offline, tmp_path):
    from huggingface_hub import constants
    from safetensors.torch import save_file

    source = timm.create_model(TIMM_MODEL)
    snapshot = tmp_path / "models--timm--test_resnet.r160_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "models--timm--test_resnet.r160_in1k" / "refs").mkdir()
    (tmp_path / "models--timm--test_resnet.r160_in1k" / "refs" / "main").write_text("0" * 40)
    save_file({key: value.contiguous() for key, value in source.state_dict().items()}, snapshot / "model.safetensors")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the hub library reads its cache only
    model = _create_timed(TIMM_MODEL, pretrained=True, cache_dir=str(tmp_path))
    _assert_same_weights(model, source)
    assert offline == []  # cached: no probe


def test_url_weights_offline_name_timms_cache_file(offline, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    overlay = dict(hf_hub_id=None, url="https://weights.example/releases/resnet_a1.pth")
    with pytest.raises(CheckpointError) as caught:
        _create_timed(TIMM_MODEL, pretrained=True, pretrained_cfg_overlay=overlay)
    assert "weights.example/releases/resnet_a1.pth is out of reach" in str(caught.value)
    assert str(tmp_path / "hub" / "checkpoints" / "resnet_a1.pth") in str(caught.value)


def test_a_cfg_without_weights_is_an_error_not_random_weights(offline):
    with pytest.raises(CheckpointError, match="no published weights for this tag"):
        _create_timed(TIMM_MODEL, pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id=None, url=None))


def test_a_missing_local_file_is_named(offline, tmp_path):
    with pytest.raises(CheckpointError, match=r"missing.pth: no such checkpoint file"):
        _create_timed(TIMM_MODEL, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "missing.pth")))


def test_a_local_file_loads_without_network(offline, tmp_path):
    source = timm.create_model(TIMM_MODEL)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    model = _create_timed(TIMM_MODEL, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "weights.pth")))
    _assert_same_weights(model, source)
    assert offline == []


def test_hub_model_names_offline_fail_fast(offline, tmp_path):
    with pytest.raises(CheckpointError, match=r"config.json of timm/test_resnet.r160_in1k.*local-dir:"):
        _create_timed(f"hf-hub:timm/{TIMM_MODEL}", cache_dir=str(tmp_path))


def test_unknown_tag_of_a_timm_model_names_the_known_ones():
    with pytest.raises(UnknownModelError, match=r"test_resnet.bogus: no such pretrained tag \(known: test_resnet.r160"):
        recurzoo.create_model("test_resnet.bogus")


def test_probe_is_bounded_even_when_the_name_lookup_hangs(monkeypatch):
    def hanging_lookup(*args, **kwargs):
        time.sleep(3)
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", hanging_lookup)
    start = time.perf_counter()
    assert not checkpoint._reachable("https://huggingface.co/x", timeout=0.2)
    assert time.perf_counter() - start < 1.0


def test_probe_connects_to_the_proxy_when_one_is_set(monkeypatch):
    seen = []
    monkeypatch.setenv("https_proxy", "http://proxy.internal:3128")
    monkeypatch.setenv("no_proxy", "")
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout: seen.append(address) or _Closing())
    assert checkpoint._reachable("https://huggingface.co/x", timeout=1.0)
    assert seen == [("proxy.internal", 3128)]


class _Closing:
    def close(self):
        pass
