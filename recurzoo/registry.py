"""The zoo's models by name: one factory for every zoo and timm model, and the zoo's task models.

The classification families (HorNet, SReT, the recurrent ViT, the RGT body) are timm models:
``import recurzoo`` puts them in timm's registry, and they meet timm's whole model contract. The
task models, super-resolution (``rgt[_small]_x{2,3,4}``) and camouflaged-object detection
(``msrnet_*``), return images and masks rather than class scores, so they are registered here
instead, with the same ergonomics: ``@register_task_model(task, family)`` on a builder, default
cfgs made with timm's ``generate_default_cfgs``, ``name.tag`` names.

:func:`create_model` builds any of them, and any timm model, by name; :func:`list_models` lists the
zoo, optionally by task or family.
"""

from __future__ import annotations

import fnmatch
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Union

from torch import nn

__all__ = [
    "TASKS",
    "UnknownModelError",
    "register_task_model",
    "register_family_module",
    "create_model",
    "list_models",
    "list_families",
    "is_model",
    "is_task_model",
    "model_task",
    "model_family",
    "get_pretrained_cfg",
    "pretrained_cfgs",
    "model_builder",
    "split_model_name",
]

TASKS = ("classification", "sr", "cod")


class UnknownModelError(ValueError):
    """A model name that neither the zoo nor timm registers."""


@dataclass(frozen=True)
class _TaskModel:
    name: str
    task: str
    family: str
    builder: Callable[..., nn.Module]
    default_cfg: Any  # timm's DefaultCfg: the pretrained tags of this model


_TASK_MODELS: Dict[str, _TaskModel] = {}
# timm module names (the last part of a family module's name, as timm keys them) -> family name.
_FAMILY_MODULES: Dict[str, str] = {}
_FAMILIES: List[str] = []  # every family, in registration order (the order of the README and the demo)


def _add_family(family: str) -> None:
    if family not in _FAMILIES:
        _FAMILIES.append(family)


def register_family_module(module_name: str, family: Optional[str] = None) -> None:
    """Declare that the ``@register_model`` functions of ``module_name`` (a timm registry module) are zoo models."""
    family = family or module_name.rsplit(".", 1)[-1]
    _FAMILY_MODULES[module_name.rsplit(".", 1)[-1]] = family
    _add_family(family)


def register_task_model(task: str, family: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``fn(pretrained=False, **kwargs)`` as the task model named ``fn.__name__``.

    As with timm's ``register_model``, the defining module holds ``default_cfgs`` (from
    ``generate_default_cfgs``) with an entry for the name.
    """
    if task not in TASKS:
        raise ValueError(f"register_task_model: task must be one of {TASKS}, received {task!r}")

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = fn.__name__
        if name in _TASK_MODELS:
            raise ValueError(f"register_task_model: {name!r} is registered twice")
        default_cfgs = getattr(sys.modules[fn.__module__], "default_cfgs", {})
        if name not in default_cfgs:
            raise ValueError(f"register_task_model: {fn.__module__}.default_cfgs has no entry for {name!r}")
        _TASK_MODELS[name] = _TaskModel(name, task, family, fn, default_cfgs[name])
        _add_family(family)
        return fn

    return decorator


def split_model_name(model_name: str) -> tuple:
    """``'hornet_tiny_7x7.in1k'`` -> ``('hornet_tiny_7x7', 'in1k')`` (timm's ``name.tag`` convention)."""
    from timm.models import split_model_name_tag

    return split_model_name_tag(model_name)


def is_task_model(model_name: str) -> bool:
    """True for a zoo task model (``name`` or ``name.tag``)."""
    return split_model_name(model_name)[0] in _TASK_MODELS


def is_model(model_name: str) -> bool:
    """True when :func:`create_model` can build ``model_name`` (a zoo task model or any timm model)."""
    import timm

    name = split_model_name(model_name)[0]
    return name in _TASK_MODELS or timm.is_model(name)


def get_pretrained_cfg(model_name: str) -> Any:
    """The ``PretrainedCfg`` of a task model's tag (its default tag without one); None for other names."""
    name, tag = split_model_name(model_name)
    entry = _TASK_MODELS.get(name)
    if entry is None:
        return None
    tag = tag or entry.default_cfg.tags[0]
    if tag not in entry.default_cfg.cfgs:
        tags = ", ".join(f"{name}.{known}" if known else name for known in entry.default_cfg.tags)
        raise UnknownModelError(f"{model_name}: no such pretrained tag (known: {tags})")
    return entry.default_cfg.cfgs[tag]


def pretrained_cfgs(model_name: str) -> Dict[str, Any]:
    """``{'name.tag': PretrainedCfg}`` of every tag of a task model or a timm model that points at weights."""
    import timm
    from timm.models import get_pretrained_cfg as timm_pretrained_cfg

    name = split_model_name(model_name)[0]
    if name in _TASK_MODELS:
        cfgs = {f"{name}.{tag}" if tag else name: cfg for tag, cfg in _TASK_MODELS[name].default_cfg.cfgs.items()}
    else:
        cfgs = {full_name: timm_pretrained_cfg(full_name) for full_name in timm.list_pretrained(f"{name}.*")}
    return {key: cfg for key, cfg in cfgs.items() if cfg is not None and (cfg.url or cfg.hf_hub_id or cfg.file)}


def model_builder(model_name: str) -> Callable[..., nn.Module]:
    """The registered builder of a zoo task model or a timm model."""
    import timm.models

    name = split_model_name(model_name)[0]
    if name in _TASK_MODELS:
        return _TASK_MODELS[name].builder
    if timm.models.is_model(name):
        return timm.models.model_entrypoint(name)
    raise UnknownModelError(_unknown_message(model_name))


def model_task(model_name: str) -> Optional[str]:
    """``'sr'``, ``'cod'`` or ``'classification'`` for a zoo model; None for a model outside the zoo."""
    name = split_model_name(model_name)[0]
    if name in _TASK_MODELS:
        return _TASK_MODELS[name].task
    return "classification" if _timm_family(name) else None


def model_family(model_name: str) -> Optional[str]:
    """The family (model card) of a zoo model, e.g. ``'hornet'`` or ``'rgt'``; None outside the zoo."""
    name = split_model_name(model_name)[0]
    if name in _TASK_MODELS:
        return _TASK_MODELS[name].family
    return _timm_family(name)


def _timm_family(name: str) -> Optional[str]:
    import timm

    for module, family in _FAMILY_MODULES.items():
        if name in timm.list_models(module=module):
            return family
    return None


def list_families() -> List[str]:
    """The zoo's families (one model card each), e.g. ``['hornet', 'sret', ...]``."""
    return list(_FAMILIES)


def list_models(
    pattern: str = "*",
    task: Optional[str] = None,
    family: Optional[str] = None,
) -> List[str]:
    """Names of the zoo's models (timm-registered families and task models), sorted.

    Args:
        pattern: wildcard filter, e.g. ``'hornet_*'``.
        task: ``'classification'``, ``'sr'`` or ``'cod'`` to list one task.
        family: a family (model card) name, e.g. ``'rgt'``.
    """
    import timm

    if task is not None and task not in TASKS:
        raise ValueError(f"list_models: task must be one of {TASKS}, received {task!r}")
    rows = [(entry.name, entry.task, entry.family) for entry in _TASK_MODELS.values()]
    for module, module_family in _FAMILY_MODULES.items():
        rows += [(name, "classification", module_family) for name in timm.list_models(module=module)]
    return sorted(
        name
        for name, model_task_name, model_family_name in rows
        if fnmatch.fnmatch(name, pattern) and task in (None, model_task_name) and family in (None, model_family_name)
    )


def _unknown_message(model_name: str) -> str:
    import difflib

    import timm

    name = split_model_name(model_name)[0]
    candidates = list(_TASK_MODELS) + list_models() + timm.list_models()
    close = difflib.get_close_matches(name, list(dict.fromkeys(candidates)), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; 'recurzoo list' shows the zoo"
    return f"unknown model {model_name!r}: neither a recurzoo model nor in timm's registry{hint}"


def create_model(
    model_name: str,
    pretrained: bool = False,
    pretrained_cfg: Optional[Union[str, Dict[str, Any], Any]] = None,
    pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
    checkpoint_path: Optional[str] = None,
    **kwargs: Any,
) -> nn.Module:
    """Build any zoo model or timm model by name, as ``timm.create_model`` does.

    Args:
        model_name: a registered name, optionally with a pretrained tag (``hornet_tiny_7x7.in1k``),
            or timm's ``hf-hub:``/``local-dir:`` sources.
        pretrained: load the tag's published weights (from timm's cache, or downloaded; offline it
            fails within seconds and names the file to place in the cache).
        pretrained_cfg: replaces the tag's pretrained cfg.
        pretrained_cfg_overlay: keys to change in it, e.g. ``dict(file='official.pth')`` for the
            authors' file downloaded by hand (the classifier is re-initialised when ``num_classes``
            differs from the cfg's, with a warning).
        checkpoint_path: your own checkpoint of this model (a fine-tuned ``state_dict``, a training
            checkpoint or safetensors), loaded strictly after the model is built, read safely by
            :mod:`recurzoo.checkpoint`.
        **kwargs: model arguments (``num_classes``, ``features_only``, ``device``, ``dtype``, ...);
            those set to None are dropped, as timm does.

    Raises:
        UnknownModelError: for a name neither the zoo nor timm registers, or a tag it does not have.
        CheckpointError: (a ``ValueError``) for a checkpoint that cannot be read or does not fit, and,
            within seconds, for pretrained weights that would have to be downloaded without network
            (the message names the file to place in which cache, or the option that takes a local file).
    """
    import timm

    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    name, tag = split_model_name(model_name)
    if model_name.startswith("local-dir:") and _local_architecture(model_name) in _TASK_MODELS:
        model = _create_task_model_from_folder(model_name, pretrained, pretrained_cfg_overlay, kwargs)
    elif ":" in model_name:  # hf-hub: and local-dir: sources of timm models
        _check_hub_source(model_name, pretrained, pretrained_cfg_overlay, kwargs.get("cache_dir"))
        model = timm.create_model(
            model_name, pretrained=pretrained, pretrained_cfg_overlay=pretrained_cfg_overlay, **kwargs
        )
    elif name in _TASK_MODELS:
        cfg = pretrained_cfg if pretrained_cfg is not None else get_pretrained_cfg(model_name)
        model = _TASK_MODELS[name].builder(
            pretrained=pretrained, pretrained_cfg=cfg, pretrained_cfg_overlay=pretrained_cfg_overlay, **kwargs
        )
        model._model_args = {key: value for key, value in kwargs.items() if key not in ("device", "dtype")}
    elif timm.is_model(name):
        _check_timm_tag(model_name)
        if pretrained and model_family(name) is None:  # the zoo's builders check their own downloads
            from recurzoo.checkpoint import timm_pretrained_overlay

            pretrained_cfg_overlay = timm_pretrained_overlay(
                model_name, pretrained_cfg, pretrained_cfg_overlay, cache_dir=kwargs.get("cache_dir")
            )
        model = timm.create_model(
            model_name,
            pretrained=pretrained,
            pretrained_cfg=pretrained_cfg,
            pretrained_cfg_overlay=pretrained_cfg_overlay,
            **kwargs,
        )
    else:
        raise UnknownModelError(_unknown_message(model_name))
    if checkpoint_path:
        from recurzoo.checkpoint import load_weights

        load_weights(model, checkpoint_path)
    return model


def _local_architecture(model_name: str) -> Optional[str]:
    """The architecture a ``local-dir:`` folder's ``config.json`` names (None when it has none)."""
    import json
    from pathlib import Path

    config = Path(model_name.partition(":")[2]) / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("architecture")
    except (OSError, ValueError, AttributeError):
        return None


def _create_task_model_from_folder(
    model_name: str, pretrained: bool, overlay: Optional[Dict[str, Any]], kwargs: Dict[str, Any]
) -> nn.Module:
    """A task model from a Hub folder (``config.json`` + weights) written by ``recurzoo convert``."""
    from timm.models._hub import load_model_config_from_path

    cfg, architecture, model_args = load_model_config_from_path(model_name.partition(":")[2])
    arguments = dict(model_args, **kwargs)
    model = _TASK_MODELS[architecture].builder(
        pretrained=pretrained, pretrained_cfg=cfg, pretrained_cfg_overlay=overlay, **arguments
    )
    model._model_args = {key: value for key, value in arguments.items() if key not in ("device", "dtype")}
    return model


def _check_timm_tag(model_name: str) -> None:
    """An UnknownModelError naming the known tags when ``model_name``'s tag is not one of timm's."""
    import timm
    from timm.models import get_pretrained_cfg as timm_pretrained_cfg

    name, tag = split_model_name(model_name)
    if not tag:
        return
    try:
        known_tag = timm_pretrained_cfg(model_name, allow_unregistered=False) is not None
    except RuntimeError:  # timm: "Invalid pretrained tag"
        known_tag = False
    if not known_tag:
        tags = ", ".join(timm.list_pretrained(f"{name}.*")) or "none"
        raise UnknownModelError(f"{model_name}: no such pretrained tag (known: {tags})")


def _check_hub_source(
    model_name: str, pretrained: bool, pretrained_cfg_overlay: Optional[Dict[str, Any]], cache_dir: Optional[str]
) -> None:
    """Fail fast where ``timm.create_model('hf-hub:...')`` would retry downloads without network."""
    from recurzoo.checkpoint import check_hub_model_available, hub_state_dict

    source, _, location = model_name.partition(":")
    if source != "hf-hub":
        return
    check_hub_model_available(location, cache_dir=cache_dir)
    if pretrained and not (pretrained_cfg_overlay or {}).get("file"):
        hub_state_dict(model_name, location, timeout=5.0, read=False, cache_dir=cache_dir)
