"""The oneDNN fused linear path of CPU inference: same numbers as the plain layers, taken only where it may be."""

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from recurzoo.backbones._helpers import FusedGeluMlp, apply_linear, apply_linear_act, fused_linear

FUSED_OP = "mkldnn::_linear_pointwise"


def _ran_fused(fn) -> bool:
    """Whether calling ``fn`` ran oneDNN's fused linear kernel."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any(event.key == FUSED_OP for event in prof.key_averages())


def _mlp() -> FusedGeluMlp:
    torch.manual_seed(0)
    return FusedGeluMlp(16, 48).eval()


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_linear_matches_linear_then_gelu_on_a_strided_input(gelu, with_bias):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 5).permute(0, 2, 3, 1)  # a channels-last view, not contiguous as (B, H, W, C)
    weight, bias = torch.randn(12, 8), torch.randn(12) if with_bias else None
    expected = F.linear(x, weight, bias)
    expected = F.gelu(expected) if gelu else expected
    with torch.inference_mode():
        assert _ran_fused(lambda: fused_linear(x, weight, bias, gelu=gelu))
        torch.testing.assert_close(fused_linear(x, weight, bias, gelu=gelu), expected, rtol=1e-5, atol=1e-5)


def test_mlp_inference_runs_fused_and_matches_timm_mlp():
    mlp, x = _mlp(), torch.randn(3, 7, 16)
    reference = timm.layers.Mlp(16, 48).eval()
    reference.load_state_dict(mlp.state_dict())
    with torch.no_grad():
        assert _ran_fused(lambda: mlp(x))
        torch.testing.assert_close(mlp(x), reference(x), rtol=1e-5, atol=1e-5)


def test_training_takes_the_autograd_path_with_the_same_gradients():
    mlp, x = _mlp(), torch.randn(3, 7, 16, requires_grad=True)
    reference = timm.layers.Mlp(16, 48)
    reference.load_state_dict(mlp.state_dict())
    assert not _ran_fused(lambda: mlp(x).sum().backward())
    x_grad = x.grad.clone()
    x.grad = None
    reference(x).sum().backward()
    torch.testing.assert_close(x_grad, x.grad)
    torch.testing.assert_close(mlp.fc1.weight.grad, reference.fc1.weight.grad)


def test_a_hook_on_a_layer_still_fires_and_sees_the_layer_output():
    mlp, x, seen = _mlp(), torch.randn(2, 4, 16), []
    mlp.fc1.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad():
        out = mlp(x)
    assert seen == [torch.Size([2, 4, 48])]  # fc1 ran as a module call (fc2, unhooked, may still fuse)
    torch.testing.assert_close(out, mlp.fc2(F.gelu(mlp.fc1(x))), rtol=1e-5, atol=1e-5)


def test_a_replaced_layer_or_activation_is_called_not_bypassed():
    mlp, x = _mlp(), torch.randn(2, 4, 16)
    mlp.act = nn.GELU(approximate="tanh")
    expected = mlp.fc2(F.gelu(mlp.fc1(x), approximate="tanh"))
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), expected)
        identity = nn.Identity()
        assert apply_linear(identity, x) is x


def test_flop_counter_sees_the_linears_it_knows():
    mlp, x = _mlp(), torch.randn(2, 4, 16)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        mlp(x)
    assert counter.get_total_flops() == 2 * (2 * 4) * 16 * 48 * 2


def test_switching_onednn_off_takes_the_plain_path():
    mlp, x = _mlp(), torch.randn(2, 4, 16)
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        assert not _ran_fused(lambda: mlp(x))


@pytest.mark.parametrize("approximate,fused", [("none", True), ("tanh", False)])
def test_linear_then_act_fuses_only_the_exact_gelu_and_computes_either(approximate, fused):
    torch.manual_seed(0)
    layer, act, x = nn.Linear(16, 48).eval(), nn.GELU(approximate=approximate), torch.randn(2, 4, 16)
    with torch.no_grad():
        torch.testing.assert_close(apply_linear_act(layer, act, x), act(layer(x)))
        assert _ran_fused(lambda: apply_linear_act(layer, act, x)) == fused
        layer.register_forward_hook(lambda module, args, out: None)
        assert not _ran_fused(lambda: apply_linear_act(layer, act, x))


def test_functorch_gradients_match_autograd():
    mlp, x = _mlp(), torch.randn(2, 4, 16)
    with torch.no_grad():  # torch.func.grad records its own graph even here
        functorch_grad = torch.func.grad(lambda t: mlp(t).sum())(x)
    leaf = x.clone().requires_grad_()
    mlp(leaf).sum().backward()
    torch.testing.assert_close(functorch_grad, leaf.grad)


def test_autocast_keeps_its_lower_precision_linears():
    mlp, x = _mlp(), torch.randn(2, 4, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _ran_fused(lambda: mlp(x))
        assert mlp(x).dtype == torch.bfloat16
