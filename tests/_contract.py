"""Checks of timm's model contract, shared by the family tests (after timm 1.0.31's tests/test_models.py).

Each helper builds the model through ``recurzoo.create_model`` (so zoo task models and timm-registered
families alike), asserts one part of the contract and says which in its message. Pass reduced
widths in ``kwargs``: the checks are meant to run in seconds.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import pytest
import torch

import recurzoo


def _tensors(model: torch.nn.Module):
    return [*model.named_parameters(), *model.named_buffers()]


def assert_factory_device_and_dtype(name: str, device: str = "meta", dtype=torch.float64, **kwargs: Any) -> None:
    """``create_model(device=..., dtype=...)`` puts every parameter and floating buffer there."""
    model = recurzoo.create_model(name, device=device, dtype=dtype, **kwargs)
    misplaced = [n for n, t in _tensors(model) if t.device != torch.device(device)]
    assert not misplaced, f"{name}: tensors not created on {device}: {misplaced[:5]}"
    wrong = [n for n, t in _tensors(model) if t.is_floating_point() and t.dtype != dtype]
    assert not wrong, f"{name}: floating tensors not created as {dtype}: {wrong[:5]}"


def assert_meta_init_gives_a_working_model(
    name: str, input_size: Sequence[int], init: Callable[[torch.nn.Module], None] = None, **kwargs: Any
) -> torch.nn.Module:
    """Built on ``meta``, then ``to_empty(cpu)`` and ``init_weights()``: every tensor finite, forward finite.

    Storage is poisoned with NaN first, so a tensor the initialisation forgets (a size-derived
    buffer, say) fails the check instead of passing on whatever memory held.
    """
    model = recurzoo.create_model(name, device="meta", dtype=torch.float64, **kwargs)
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for _, tensor in _tensors(model):
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))
    (init or (lambda m: m.init_weights()))(model)
    bad = [n for n, t in _tensors(model) if t.is_floating_point() and not torch.isfinite(t).all()]
    assert not bad, f"{name}: not initialised after to_empty + init_weights: {bad[:5]}"
    with torch.no_grad():
        output = model(torch.rand(1, *input_size, dtype=torch.float64))
    output = output[0] if isinstance(output, (list, tuple)) else output
    assert torch.isfinite(output).all(), f"{name}: non-finite output after meta init"
    return model


def assert_unknown_argument_raises(name: str, **kwargs: Any) -> None:
    """An argument the model does not take is a ``TypeError``, never silently ignored."""
    with pytest.raises(TypeError):
        recurzoo.create_model(name, device="meta", not_a_model_arg=1, **kwargs)


def assert_dtype_change_after_forward(
    model: torch.nn.Module, x: torch.Tensor, dtype=torch.bfloat16, max_relative_error: Optional[float] = None
) -> None:
    """A forward, then ``.to(dtype)``: the next output is in ``dtype`` (no stale float32 cache) and, with
    ``max_relative_error``, within that fraction of the float32 output's largest magnitude of it."""
    model.eval()
    with torch.no_grad():
        reference = model(x)
        model.to(dtype)
        output = model(x.to(dtype))
    if isinstance(output, (list, tuple)):
        reference, output = reference[0], output[0]
    assert output.dtype == dtype, f"output dtype {output.dtype} != {dtype} after .to({dtype})"
    if max_relative_error is not None:
        error = (output.float() - reference).abs().max()
        assert error < max_relative_error * reference.abs().max(), f"{dtype} output off by {error:.3g}"
    model.to(torch.float32)


def assert_fx_features_trace(name: str, x: torch.Tensor, **kwargs: Any) -> None:
    """``features_only`` with ``feature_cls='fx'`` (timm's ``FeatureGraphNet``) traces, gives one finite
    output per ``feature_info`` entry and back-propagates to every parameter it keeps."""
    traced = recurzoo.create_model(name, features_only=True, feature_cls="fx", **kwargs).train()
    outputs = traced(x)
    outputs = list(outputs.values()) if isinstance(outputs, dict) else list(outputs)
    assert len(outputs) == len(traced.feature_info.out_indices), f"{name}: one output per feature_info entry"
    assert all(torch.isfinite(output).all() for output in outputs), f"{name}: non-finite fx features"
    sum(output.float().mean() for output in outputs).backward()
    unused = [n for n, p in traced.named_parameters() if p.grad is None]
    assert not unused, f"{name}: no gradient through the fx graph for {unused[:5]}"


def assert_fx_features_match(traced: torch.nn.Module, x: torch.Tensor, expected: Sequence[torch.Tensor]) -> None:
    """A ``features_only`` fx graph gives, in eval mode, the eager model's feature maps ``expected`` of ``x``,
    and in training mode back-propagates to every parameter it keeps."""
    with torch.no_grad():
        features = traced.eval()(x)
    assert len(features) == len(expected)
    for feature, want in zip(features, expected):
        torch.testing.assert_close(feature, want)
    traced.train()
    sum(feature.mean() for feature in traced(x)).backward()
    assert all(parameter.grad is not None for parameter in traced.parameters())


def assert_torchvision_feature_extractor(model: torch.nn.Module, x: torch.Tensor) -> None:
    """torchvision's ``create_feature_extractor`` traces the whole model (with timm's leaf modules and
    autowrapped functions) and gives the eager output."""
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    model.eval()
    _, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    extractor = create_feature_extractor(model, return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs)
    with torch.no_grad():
        expected = model(x)
        actual = next(iter(extractor(x).values()))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def assert_grad_checkpointing_keeps_gradients(name: str, x: torch.Tensor, **kwargs: Any) -> None:
    """``set_grad_checkpointing()`` leaves the loss's gradients unchanged (``features_only`` when the model has it)."""
    grads = []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = recurzoo.create_model(name, **kwargs).train()
        model.set_grad_checkpointing(enabled)
        output = model(x)
        outputs = output if isinstance(output, (list, tuple)) else [output]
        sum(o.float().pow(2).mean() for o in outputs).backward()
        grads.append([p.grad for p in model.parameters() if p.grad is not None])
    assert grads[0] and len(grads[0]) == len(grads[1])
    for without, with_checkpoints in zip(*grads):
        torch.testing.assert_close(with_checkpoints, without, rtol=1e-4, atol=1e-6)


def assert_features_only_grad_checkpointing_keeps_gradients(
    name: str, x: torch.Tensor, out_indices: Sequence[int], **kwargs: Any
) -> None:
    """The ``features_only`` model of ``name`` at ``out_indices`` gets the same gradients, every parameter
    one, with and without ``set_grad_checkpointing`` (which timm's FeatureGetterNet leaves to the model)."""
    grads = []
    for enabled in (False, True):
        torch.manual_seed(0)  # the same weights, and the same randomness in training
        features = recurzoo.create_model(name, features_only=True, out_indices=out_indices, **kwargs)
        features.train().model.set_grad_checkpointing(enabled)
        sum(f.pow(2).mean() for f in features(x)).backward()
        grads.append([p.grad for p in features.parameters()])
    assert all(grad is not None for grad in grads[0] + grads[1])
    for without, with_checkpoints in zip(*grads):
        torch.testing.assert_close(with_checkpoints, without, rtol=1e-4, atol=1e-6)


def assert_fx_trains_the_whole_model(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """torchvision's ``create_feature_extractor`` traces the training graph to its last node, the backward
    pass reaches every parameter and the traced module holds all the model's parameters. Returns it."""
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    train_nodes, _ = get_graph_node_names(model.train(), tracer_kwargs=tracer_kwargs)
    traced = create_feature_extractor(model, return_nodes=[train_nodes[-1]], tracer_kwargs=tracer_kwargs)
    next(iter(traced(x).values())).mean().backward()
    assert not [name for name, parameter in traced.named_parameters() if parameter.grad is None]
    assert sum(p.numel() for p in traced.parameters()) == sum(p.numel() for p in model.parameters())
    return traced


def assert_parameter_groups_match(model: torch.nn.Module) -> None:
    """``group_matcher()`` splits the parameters into more than one group, and each ``no_weight_decay()``
    entry matches a parameter or names an optional one this configuration leaves unset (timm's rule)."""
    import fnmatch

    from timm.models import group_parameters

    groups = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    assert len(set(groups.values())) > 1, "group_matcher() puts all parameters in a single group"
    names = [name for name, _ in model.named_parameters()]
    for pattern in model.no_weight_decay():
        if any(fnmatch.fnmatch(name, pattern) for name in names):
            continue
        owner = model
        for attribute in pattern.split("."):
            owner = getattr(owner, attribute, None)
            if owner is None:
                break
        assert owner is None, f"no_weight_decay() entry {pattern!r} matches no parameter"


def assert_reset_classifier_keeps_the_pooling(model: torch.nn.Module, x: torch.Tensor) -> tuple:
    """``reset_classifier(5)`` without a pool type keeps the pooling (the pre-logits do not change) and
    gives 5 outputs. Returns the features and the pre-logits, for the family's own pooling checks."""
    with torch.no_grad():
        features = model.forward_features(x)
        expected = model.forward_head(features, pre_logits=True)
        model.reset_classifier(5)
        torch.testing.assert_close(model.forward_head(features, pre_logits=True), expected)
        assert model(x).shape == (x.shape[0], 5)
    return features, expected


def pre_logits_after_reset(model: torch.nn.Module, features: torch.Tensor, global_pool: str) -> torch.Tensor:
    """The pre-logits of ``features`` once ``reset_classifier(5, global_pool)`` changed the pooling."""
    with torch.no_grad():
        model.reset_classifier(5, global_pool)
        return model.forward_head(features, pre_logits=True)


def assert_reset_classifier_takes_the_parent_device_dtype_and_mode(model: torch.nn.Module) -> None:
    """A classifier that ``reset_classifier`` creates again (after removing it) lives on the model's device
    and dtype (moved here to meta float64) and in the model's train/eval mode."""
    model.to(device="meta", dtype=torch.float64)
    model.reset_classifier(0)
    model.reset_classifier(2)
    head = model.get_classifier()
    assert (head.weight.device.type, head.weight.dtype, head.training) == ("meta", torch.float64, model.training)


def assert_prune_intermediate_layers_contract(model: torch.nn.Module, x: torch.Tensor) -> None:
    """timm's ``test_prune_intermediate_layers_contract``: pruned and ``stop_early`` taps equal the full
    model's, pruning at the last tap without the head keeps the output, a model pruned without its norm
    ends at the tap, and every kept parameter gets a gradient."""
    import copy

    model.eval()
    last = len(model.feature_info) - 1
    with torch.no_grad():
        expected = model(x)
        taps = model.forward_intermediates(x, intermediates_only=True)
        pruned = copy.deepcopy(model)
        pruned.prune_intermediate_layers([last], prune_head=False)
        torch.testing.assert_close(pruned(x), expected, msg="prune_head=False at the last index changed the output")
    assert len(taps) == last + 1
    for i in range(last + 1):
        with torch.no_grad():
            selected = model.forward_intermediates(x, indices=[i], stop_early=True, intermediates_only=True)
            torch.testing.assert_close(selected[0], taps[i], msg=f"stop_early tap {i}")
            pruned = copy.deepcopy(model)
            take_indices = pruned.prune_intermediate_layers([i])
            selected = pruned.forward_intermediates(x, indices=take_indices, intermediates_only=True)
            torch.testing.assert_close(selected[0], taps[i], msg=f"pruned tap {i}")
            pruned = copy.deepcopy(model)
            take_indices = pruned.prune_intermediate_layers([i], prune_norm=True)
            features = pruned.forward_features(x)
            if i < last and features.ndim == 4:
                torch.testing.assert_close(features, taps[i], msg=f"pruned features {i}")
        pruned.train()
        selected = pruned.forward_intermediates(x, indices=take_indices, intermediates_only=True)
        sum(f.sum() for f in selected + [pruned.forward_features(x)]).backward()
        unused = [n for n, p in pruned.named_parameters() if p.requires_grad and p.grad is None]
        assert not unused, f"pruned to {i}, unused parameters: {unused[:5]}"
