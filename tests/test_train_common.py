"""The shared training mechanics: checkpoints, resume, schedules, argument parsing, plots."""

from __future__ import annotations

import os

import pytest
import torch

from recurzoo.plots import plot_curves, save_heatmap
from recurzoo.train import common


class _NotATensor:
    pass


def test_checkpoint_round_trip_is_atomic_and_weights_only(tmp_path):
    path = tmp_path / "ckpt" / "last.pt"
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    common.save_checkpoint(
        str(path),
        dict(
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            step=7,
            history=[0.5, 0.25],
            args=dict(lr=1e-3, phases=[6, 6], resume=None),
        ),
    )
    assert os.listdir(path.parent) == ["last.pt"]  # no temporary file left behind
    state = common.load_checkpoint(str(path))
    assert state["step"] == 7 and state["args"]["phases"] == [6, 6]
    torch.testing.assert_close(state["model"]["weight"], model.weight.detach())
    restored = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    restored.load_state_dict(state["optimizer"])

    common.save_checkpoint(str(path), dict(code=_NotATensor()))
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        common.load_checkpoint(str(path))


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    common.save_checkpoint(str(path), dict(step=1))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        common.save_checkpoint(str(path), dict(step=2, bad=Unpicklable()))
    assert common.load_checkpoint(str(path))["step"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


def test_resolve_resume(tmp_path):
    assert common.resolve_resume(None, str(tmp_path)) is None
    assert common.resolve_resume("auto", str(tmp_path)) is None
    (tmp_path / "last.pt").write_bytes(b"")
    assert common.resolve_resume("auto", str(tmp_path)) == str(tmp_path / "last.pt")
    with pytest.raises(FileNotFoundError):
        common.resolve_resume(str(tmp_path / "missing.pt"), str(tmp_path))


def test_cosine_schedule_warms_up_then_decays_to_min_ratio():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = common.cosine_schedule(optimizer, total_steps=10, warmup_steps=2, min_ratio=0.1)
    rates = []
    for _ in range(10):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert rates[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(7 / 8 * torch.pi)).item()))
    assert all(a >= b for a, b in zip(rates[1:], rates[2:]))


def test_parse_kwargs_reads_literals_and_strings():
    assert common.parse_kwargs(["depth=4", "img_size=(32, 32)", "act_layer=gelu", "flag=True"]) == dict(
        depth=4, img_size=(32, 32), act_layer="gelu", flag=True
    )
    with pytest.raises(ValueError, match="KEY=VALUE"):
        common.parse_kwargs(["depth"])


def test_infinite_batches_cycles_epochs():
    batches = common.infinite_batches([1, 2])
    assert [next(batches) for _ in range(5)] == [1, 2, 1, 2, 1]
    with pytest.raises(ValueError, match="no batches"):
        next(common.infinite_batches([]))


def test_plots_are_png(tmp_path):
    pytest.importorskip("matplotlib")
    plot_curves({"loss": [1.0, 0.5, 0.25]}, str(tmp_path / "loss.png"), log_y=True)
    save_heatmap([[1.0, 0.5], [0.5, 1.0]], str(tmp_path / "map.png"), lines=[1])
    for name in ("loss.png", "map.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
