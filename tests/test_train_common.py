"""The shared training mechanics: checkpoints, resume, schedules, argument parsing, plots."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from recurzoo.plots import plot_curves, save_heatmap
from recurzoo.train import arguments, loops, resume, run
from recurzoo.train.distributed import DistributedContext


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
    assert (
        capsys.readouterr().err
        == f"train: error: argument --model-kwargs: expected KEY=VALUE with a Python name as KEY, received {item!r}\n"
    )


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


# ---------------------------------------------------------------------------- the step-based skeleton


class _NoisyRange(torch.utils.data.Dataset):
    """Ten samples with fresh noise at every draw: resuming must restore the random streams."""

    def __len__(self):
        return 10

    def __getitem__(self, index):
        return torch.full((4,), float(index)) + torch.randn(4), torch.tensor(float(index % 3))


class _ToyTraining(loops.StepTraining):
    """A StepTraining as the scripts build one: BatchNorm, dropout, a schedule, 2 updates an epoch."""

    def __init__(self, args):
        super().__init__(args, DistributedContext(), "toy")
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1)
        )
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=3, gamma=0.5)

    def run(self, total):
        loader = torch.utils.data.DataLoader(_NoisyRange(), batch_size=4, shuffle=True, drop_last=True)
        path, state = self.load_resume(("model", "optimizer", "scheduler", "step", "history"))
        start_step, resume_rng = 0, None
        if state is not None:
            self.model.load_state_dict(state["model"])
            start_step, self.history = state["step"], list(state["history"])
            resume_rng = self.restore_optimization(state, start_step)
        self.model.train()
        self.train_steps(loader, start_step, total, save_every=2, resume_rng=resume_rng)
        return self.history

    def training_loss(self, batch, step):
        inputs, targets = batch
        return torch.nn.functional.mse_loss(self.model(inputs).squeeze(-1), targets), {}

    def checkpoint_state(self, updates):
        return dict(super().checkpoint_state(updates), model=self.model.state_dict(), history=self.history)


def _toy_args(output, **overrides):
    values = dict(output=str(output), seed=0, resume=None, no_progress=True, fail_at_step=None, fail_mode="sigkill")
    return argparse.Namespace(**dict(values, **overrides))


@pytest.mark.parametrize("stop, fail_at, kept", [("sigterm", 4, 4), ("nan", 5, 4)])
def test_step_training_stopped_and_resumed_repeats_the_uninterrupted_losses(tmp_path, stop, fail_at, kept):
    once = _ToyTraining(_toy_args(tmp_path / "once")).run(total=7)
    stopped = tmp_path / "stopped"
    error = run.TrainingInterrupted if stop == "sigterm" else run.NonFiniteLossError
    with pytest.raises(error):
        _ToyTraining(_toy_args(stopped, fail_at_step=fail_at, fail_mode=stop)).run(total=7)
    assert resume.load_checkpoint(str(stopped / "last.pt"))["step"] == kept
    if stop == "nan":
        assert f"the last good checkpoint is {stopped / 'last.pt'}" in (stopped / "log.txt").read_text()
    again = _ToyTraining(_toy_args(stopped, resume="auto")).run(total=7)
    assert len(once) == 7 and again == once  # steps 5 to 7 computed again, to the bit
    final, reference = (resume.load_checkpoint(str(path / "last.pt")) for path in (stopped, tmp_path / "once"))
    for key, value in reference["model"].items():  # BatchNorm statistics included
        assert torch.equal(final["model"][key], value), key
