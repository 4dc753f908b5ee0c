"""The shared training mechanics: checkpoints, resume, schedules, argument parsing, plots."""

from __future__ import annotations

import os

import pytest
import torch

from recurzoo.plots import plot_curves, save_heatmap
from recurzoo.train import arguments, resume


class _NotATensor:
    pass


def test_checkpoint_round_trip_is_atomic_and_weights_only(tmp_path):
    path = tmp_path / "ckpt" / "last.pt"
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    resume.save_checkpoint(
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
    state = resume.load_checkpoint(str(path))
    assert state["step"] == 7 and state["args"]["phases"] == [6, 6]
    torch.testing.assert_close(state["model"]["weight"], model.weight.detach())
    restored = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    restored.load_state_dict(state["optimizer"])

    resume.save_checkpoint(str(path), dict(code=_NotATensor()))
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        resume.load_checkpoint(str(path))


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    resume.save_checkpoint(str(path), dict(step=1))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        resume.save_checkpoint(str(path), dict(step=2, bad=Unpicklable()))
    assert resume.load_checkpoint(str(path))["step"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


def test_resolve_resume(tmp_path):
    assert resume.resolve_resume(None, str(tmp_path)) is None
    assert resume.resolve_resume("auto", str(tmp_path)) is None
    (tmp_path / "last.pt").write_bytes(b"")
    assert resume.resolve_resume("auto", str(tmp_path)) == str(tmp_path / "last.pt")
    with pytest.raises(FileNotFoundError):
        resume.resolve_resume(str(tmp_path / "missing.pt"), str(tmp_path))


def test_distillation_schedule_is_timm_cosine_with_a_linear_warm_up_by_update():
    from timm.scheduler import CosineLRScheduler

    from recurzoo.train.distill_recurrent import cosine_schedule

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = cosine_schedule(optimizer, total_steps=10, warmup_steps=2, min_ratio=0.1)
    assert isinstance(scheduler, CosineLRScheduler)
    rates = []
    for update in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step_update(update + 1)
    assert rates[:3] == pytest.approx([0.5, 0.75, 1.0])  # from 1/warm-up of the rate to the rate
    assert rates[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(7 / 8 * torch.pi)).item()))
    assert all(a > b for a, b in zip(rates[2:], rates[3:]))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)  # the floor, after the last update


def _kwargs_parser():
    parser = arguments.ArgumentParser(prog="train")
    parser.add_argument("--model-kwargs", nargs="*", default={}, action=arguments.ParseKwargs)
    return parser


def test_kwargs_flag_reads_literals_and_strings_into_a_dict():
    args = _kwargs_parser().parse_args(
        ["--model-kwargs", "depth=4", "img_size=(32, 32)", "act_layer=gelu", "flag=True", "path=/tmp/a=b"]
    )
    assert args.model_kwargs == dict(depth=4, img_size=(32, 32), act_layer="gelu", flag=True, path="/tmp/a=b")
    assert _kwargs_parser().parse_args([]).model_kwargs == {}


@pytest.mark.parametrize("item", ["depth", "=4"])
def test_kwargs_item_without_a_key_is_a_one_line_parser_error(item, capsys):
    with pytest.raises(SystemExit) as exited:
        _kwargs_parser().parse_args(["--model-kwargs", item])
    assert exited.value.code == 2
    assert capsys.readouterr().err == f"train: error: argument --model-kwargs: expected KEY=VALUE, received {item!r}\n"


@pytest.mark.parametrize("value", ["['dims=(8, 16)', 'act_layer=gelu']", "{dims: [8, 16], act_layer: gelu}"])
def test_config_gives_kwargs_as_key_value_strings_or_a_mapping(tmp_path, value):
    config = tmp_path / "recipe.yaml"
    config.write_text(f"model_kwargs: {value}\n")
    args = arguments.parse_args_with_config(_kwargs_parser(), ["--config", str(config)])
    assert dict(args.model_kwargs, dims=tuple(args.model_kwargs["dims"])) == dict(dims=(8, 16), act_layer="gelu")


def test_plots_are_png(tmp_path):
    pytest.importorskip("matplotlib")
    plot_curves({"loss": [1.0, 0.5, 0.25]}, str(tmp_path / "loss.png"), log_y=True)
    save_heatmap([[1.0, 0.5], [0.5, 1.0]], str(tmp_path / "map.png"), lines=[1])
    for name in ("loss.png", "map.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
