"""The one place that reads, unwraps, converts and loads model weights.

Every checkpoint the package reads goes through :func:`read_checkpoint`: a safetensors file, or a
PyTorch file loaded with ``torch.load(..., weights_only=True)``, which refuses any pickle that would
run code. The file's kind is recognised from its first bytes, so a text file named ``.pth``, an
empty or truncated file and a corrupt safetensors header each give one line that names the file,
what it is and what was expected.

:func:`unwrap_state_dict` takes the tensors out of a training checkpoint's wrapper;
:func:`family_filter` finds the ``checkpoint_filter_fn`` that converts the authors' layout for a
model (by model or by name); :func:`load_state_dict` and :func:`load_weights` load with one error
format (counts and the first few missing, unexpected and mismatched keys). :func:`pretrained_state_dict`
is what the zoo's model builders use for ``pretrained=True``. Every failure is a
:class:`CheckpointError` (a ``ValueError``) whose message is one line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import struct
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "FilterFn",
    "read_checkpoint",
    "read_safetensors_metadata",
    "read_state_dict",
    "unwrap_state_dict",
    "family_filter",
    "compare_state_dict",
    "Mismatch",
    "load_state_dict",
    "load_weights",
    "save_weights",
    "atomic_write",
    "probe_writable",
    "pretrained_state_dict",
    "timm_pretrained_overlay",
    "hub_state_dict",
    "check_hub_model_available",
    "hub_cached_path",
    "check_pretrained_fit",
]

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
FilterFn = Callable[[Dict[str, torch.Tensor], nn.Module], Dict[str, torch.Tensor]]

_EMA_KEYS = ("state_dict_ema", "model_ema", "params_ema")
_WRAPPER_KEYS = _EMA_KEYS + ("state_dict", "model", "params", "module")
_SHOWN_KEYS = 8  # keys named per kind in a mismatch message


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the model; the message is one line."""


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def _file_kind(head: bytes) -> str:
    """``'zip'`` (torch.save), ``'pickle'`` (legacy torch.save), ``'safetensors'``, ``'text'`` or ``'binary'``."""
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        header_length = struct.unpack("<Q", head[:8])[0]
        if 2 <= header_length < 100_000_000:
            return "safetensors"
    try:
        head.decode("utf-8")
        return "text"
    except UnicodeDecodeError:
        return "binary"


def _describe_head(head: bytes) -> str:
    text = head[:40].decode("utf-8", errors="replace").splitlines()[0] if head.strip() else ""
    return f"it starts with {text!r}" if text.strip() else f"it starts with bytes {head[:8].hex(' ')}"


def _check_file(path: Path) -> bytes:
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected a checkpoint file (.pth, .pt, .bin or .safetensors)")
    try:
        with path.open("rb") as handle:
            head = handle.read(64)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({error.strerror or error})") from None
    if not head:
        raise CheckpointError(f"{path}: is empty, expected a PyTorch checkpoint or a safetensors file")
    return head


def _read_safetensors(path: Path, map_location: Any) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    device = map_location if isinstance(map_location, str) else "cpu"
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({reason})") from None


def _read_torch(path: Path, map_location: Any) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        lines = str(error).strip().splitlines()
        reason = next((line.strip() for line in lines if "GLOBAL" in line or "Unsupported" in line), "")
        raise CheckpointError(
            f"{path}: refused to load: the file contains pickled objects that would run code"
            + (f" ({reason})" if reason else "")
            + "; only tensors are read: re-save it as torch.save(model.state_dict()) or as safetensors "
            "in an environment you trust"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, KeyError, ValueError, struct.error) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt ({reason})") from None


def read_checkpoint(path: PathLike, map_location: Any = "cpu") -> Any:
    """Everything stored in a checkpoint file (tensors and plain values), without running any code.

    A safetensors file gives its tensors; a PyTorch file is read with ``torch.load(weights_only=True)``
    (training checkpoints with optimizer state, step counters, ...). The kind is recognised from the
    file's first bytes, whatever its suffix.

    Raises:
        CheckpointError: for a missing, empty, text, truncated or corrupt file, or one that would run code.
    """
    path = Path(path)
    head = _check_file(path)
    kind = _file_kind(head)
    if kind == "safetensors":
        return _read_safetensors(path, map_location)
    if kind in ("zip", "pickle"):
        return _read_torch(path, map_location)
    what = "a text file" if kind == "text" else "not a checkpoint"
    expected = "a safetensors file" if path.suffix == ".safetensors" else "a PyTorch checkpoint or a safetensors file"
    raise CheckpointError(f"{path}: {what} ({_describe_head(head)}), expected {expected}")


def read_safetensors_metadata(path: PathLike) -> Dict[str, str]:
    """The string metadata of a safetensors file's header ({} for other files)."""
    path = Path(path)
    if _file_kind(_check_file(path)) != "safetensors":
        return {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({error})") from None


def unwrap_state_dict(checkpoint: Any, source: str = "checkpoint", use_ema: bool = True) -> Dict[str, torch.Tensor]:
    """The tensors of a model inside a checkpoint's wrapper, with DDP's ``module.`` prefix removed.

    Looks inside ``state_dict_ema``/``model_ema``/``params_ema`` (when ``use_ema``), then
    ``state_dict``/``model``/``params``/``module``, as timm, BasicSR and the authors' scripts store them.

    Raises:
        CheckpointError: when no tensors are found (``source`` names the file in the message).
    """
    keys = _WRAPPER_KEYS if use_ema else _WRAPPER_KEYS[len(_EMA_KEYS) :]
    while isinstance(checkpoint, Mapping):
        inner = next((checkpoint[key] for key in keys if isinstance(checkpoint.get(key), Mapping)), None)
        if inner is None:
            break
        checkpoint = inner
    if isinstance(checkpoint, Mapping):
        tensors = {str(key): value for key, value in checkpoint.items() if isinstance(value, torch.Tensor)}
        if tensors:
            if all(key.startswith("module.") for key in tensors):
                tensors = {key[len("module.") :]: value for key, value in tensors.items()}
            return tensors
    kind = type(checkpoint).__name__
    raise CheckpointError(
        f"{source}: holds no model weights (a {kind} without tensors; expected a state_dict, or one under "
        f"{'/'.join(_WRAPPER_KEYS)})"
    )


def read_state_dict(path: PathLike, use_ema: bool = True) -> Dict[str, torch.Tensor]:
    """The model weights in a checkpoint file: :func:`read_checkpoint` then :func:`unwrap_state_dict`."""
    return unwrap_state_dict(read_checkpoint(path), source=str(path), use_ema=use_ema)


# --------------------------------------------------------------------------------------------------
# Converting and loading
# --------------------------------------------------------------------------------------------------


def _inner_model(model: nn.Module) -> nn.Module:
    """The model inside timm's feature wrappers (``features_only``), else the model itself."""
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and type(model).__name__ in ("FeatureGetterNet", "FeatureListNet"):
        return inner
    return model


def family_filter(model: Union[nn.Module, str]) -> Optional[FilterFn]:
    """The ``checkpoint_filter_fn`` that converts other layouts (the authors') for a model.

    Found in the module that defines the model's class, or, for a name, the module that registers it
    (the zoo's task registry or timm's). None when the family has none.
    """
    if isinstance(model, str):
        from recurzoo.registry import model_builder

        module_name = model_builder(model).__module__
    else:
        module_name = type(_inner_model(model)).__module__
    return getattr(sys.modules.get(module_name), "checkpoint_filter_fn", None)


class Mismatch(NamedTuple):
    """How a state dict differs from a model's: key names and (key, checkpoint shape, model shape)."""

    missing: List[str]
    unexpected: List[str]
    shapes: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shapes)

    def describe(self, target: str) -> str:
        """One line: the counts and the first few keys of each kind ('' when nothing differs)."""
        shapes = [f"{key} {tuple(ours)} vs {tuple(theirs)}" for key, ours, theirs in self.shapes]
        parts = []
        for label, items in (
            ("missing keys", self.missing),
            ("unexpected keys", self.unexpected),
            ("shape mismatches (checkpoint vs model)", shapes),
        ):
            if items:
                more = f", ... ({len(items) - _SHOWN_KEYS} more)" if len(items) > _SHOWN_KEYS else ""
                parts.append(f"{len(items)} {label}: {', '.join(items[:_SHOWN_KEYS])}{more}")
        if not parts:
            return ""
        return f"checkpoint does not fit {target} (is it for another architecture or size?): " + "; ".join(parts)


def compare_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> Mismatch:
    """Missing keys, unexpected keys and shape mismatches of ``state_dict`` against ``model``."""
    expected = model.state_dict()
    return Mismatch(
        missing=sorted(set(expected) - set(state_dict)),
        unexpected=sorted(set(state_dict) - set(expected)),
        shapes=[
            (key, tuple(state_dict[key].shape), tuple(expected[key].shape))
            for key in sorted(set(expected) & set(state_dict))
            if state_dict[key].shape != expected[key].shape
        ],
    )


def _model_label(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or getattr(model, "name", None) or type(model).__name__


def load_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str = "checkpoint",
    strict: bool = True,
    filter_fn: Optional[FilterFn] = None,
    use_family_filter: bool = True,
) -> nn.Module:
    """Load ``state_dict`` into ``model``, converting other layouts with the family's filter.

    Args:
        model: the model (a ``features_only`` wrapper loads into the model it wraps).
        state_dict: the tensors, possibly still in a training checkpoint's wrapper.
        source: what the message calls the weights (the file).
        strict: missing or unexpected keys are an error too (shape mismatches always are).
        filter_fn: converts the layout; defaults to :func:`family_filter` of the model.
        use_family_filter: False loads the keys as they are.

    Raises:
        CheckpointError: one line with the counts and first keys of what does not fit.
    """
    target = _inner_model(model)
    state_dict = unwrap_state_dict(state_dict, source)
    filter_fn = filter_fn or (family_filter(target) if use_family_filter else None)
    if filter_fn is not None:
        state_dict = filter_fn(dict(state_dict), target)
    mismatch = compare_state_dict(target, state_dict)
    if mismatch.shapes or (strict and mismatch):
        raise CheckpointError(f"{source}: {mismatch.describe(_model_label(model))}")
    target.load_state_dict(state_dict, strict=False)
    return model


def load_weights(
    model: nn.Module,
    path: PathLike,
    strict: bool = True,
    filter_fn: Optional[FilterFn] = None,
    use_ema: bool = True,
) -> nn.Module:
    """Read a checkpoint file (:func:`read_state_dict`) and load it into ``model`` (:func:`load_state_dict`)."""
    return load_state_dict(model, read_state_dict(path, use_ema=use_ema), str(path), strict, filter_fn)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_permissions(path: PathLike) -> None:
    """Give ``path`` the permissions a plain ``open(path, 'w')`` or ``mkdir`` would have (``0o666`` or
    ``0o777`` less the umask), not the ``0o600``/``0o700`` of a temporary file or folder."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_umask())


def atomic_write(path: PathLike, write: Callable[[str], Any], overwrite: bool = True) -> Path:
    """Call ``write(temporary_path)`` and rename the result to ``path``; an interrupted write leaves nothing.

    Missing folders are created, and removed again when the write fails. The file gets the permissions
    a plain ``open(path, 'w')`` would (``0o666`` less the umask), not the ``0o600`` of a temporary file.
    With ``overwrite=False`` an existing ``path`` is never replaced, even by a file that appears while
    ``write`` runs: ``FileExistsError``.
    """
    import tempfile

    path = Path(path)
    created = _make_folders(path.parent)
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(handle)
        try:
            write(temporary)
            default_permissions(temporary)
            if overwrite:
                os.replace(temporary, path)
            else:
                _rename_without_replacing(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
    except BaseException:
        for folder in reversed(created):
            with contextlib.suppress(OSError):  # not empty: another writer uses it
                folder.rmdir()
        raise
    return path


@contextlib.contextmanager
def removed_on_failure(folder: PathLike, outputs: Sequence[PathLike]) -> Iterator[None]:
    """Outputs that stand or fall together: when the block raises or is interrupted, those of ``outputs``
    that did not exist before it and the folders it created (``folder`` and missing parents) are removed.
    Files that existed before are never removed (each output is written atomically: old or new, whole)."""
    folder = Path(folder)
    missing = [made for made in (folder, *folder.parents) if not made.exists()]  # innermost first
    new = [Path(path) for path in outputs if not os.path.lexists(path)]
    try:
        yield
    except BaseException:
        for path in new:
            with contextlib.suppress(OSError):
                path.unlink()
        for made in missing:
            with contextlib.suppress(OSError):  # not empty: something else writes there
                made.rmdir()
        raise


def probe_writable(folder: PathLike) -> None:
    """Raise the ``OSError`` that writing a file into ``folder`` (created when missing) would raise.

    Leaves nothing behind: the probe file and the folders it created are removed.
    """
    import tempfile

    folder = Path(folder)
    created = _make_folders(folder)
    try:
        handle, probe = tempfile.mkstemp(prefix=".probe.", suffix=".tmp", dir=folder)
        os.close(handle)
        os.remove(probe)
    finally:
        for made in reversed(created):
            with contextlib.suppress(OSError):
                made.rmdir()


def _make_folders(folder: Path) -> List[Path]:
    """Create ``folder`` and its missing parents; the folders this call created, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    created = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
            created.append(folder)
        except FileExistsError:
            if not folder.is_dir():
                raise
    return created


def _rename_without_replacing(source: str, target: Path) -> None:
    """Move ``source`` to ``target`` unless ``target`` exists (a hard link: atomic where supported)."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "exists and is not overwritten", str(target)) from None
    except OSError:  # a file system without hard links
        if target.exists():
            raise FileExistsError(errno.EEXIST, "exists and is not overwritten", str(target)) from None
        os.replace(source, target)


def save_weights(model: nn.Module, path: PathLike, config: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``model``'s weights as safetensors and its configuration beside them (``.json``).

    The configuration records the registered architecture, its pretrained cfg and ``config``. Both
    files are written atomically. Returns the path of the weights.
    """
    from safetensors.torch import save_model

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    atomic_write(path, lambda temporary: save_model(model, temporary))
    pretrained_cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    pretrained_cfg.pop("state_dict", None)
    record = {
        "architecture": pretrained_cfg.get("architecture", type(model).__name__),
        "pretrained_cfg": pretrained_cfg,
        "config": dict(config or {}),
    }
    text = json.dumps(record, indent=2, default=str, sort_keys=True) + "\n"
    atomic_write(path.with_suffix(".json"), lambda temporary: Path(temporary).write_text(text))
    return path


# --------------------------------------------------------------------------------------------------
# Pretrained weights of the zoo's builders
# --------------------------------------------------------------------------------------------------


def _weights_url(pretrained_cfg: Any) -> Tuple[Optional[str], Optional[str]]:
    """The cfg's download URL and the file name timm caches it under."""
    url = getattr(pretrained_cfg, "url", None)
    if isinstance(url, (tuple, list)):
        return url[0], url[1]
    if not url:
        return None, None
    from urllib.parse import urlparse

    return url, os.path.basename(urlparse(url).path)


def cached_weights_path(pretrained_cfg: Any) -> Optional[Path]:
    """Where timm keeps (or would download) the cfg's weights file; None when the cfg has no URL."""
    from timm.models._hub import get_cache_dir

    url, file_name = _weights_url(pretrained_cfg)
    return Path(get_cache_dir()) / file_name if url and file_name else None


def _connect_address(url: str) -> Tuple[str, int]:
    """The host and port a download of ``url`` connects to: its proxy's when one is configured."""
    from urllib.parse import urlparse
    from urllib.request import getproxies, proxy_bypass

    parts = urlparse(url)
    proxy = getproxies().get(parts.scheme)
    if proxy and not proxy_bypass(parts.hostname or ""):
        proxy_parts = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        return proxy_parts.hostname or "", proxy_parts.port or 8080
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def _reachable(url: str, timeout: float) -> bool:
    """Whether ``url``'s host (or proxy) accepts a connection within ``timeout`` seconds, name lookup included."""
    import socket
    import threading

    address = _connect_address(url)
    answer: List[bool] = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    probe = threading.Thread(target=connect, name="recurzoo-reachable", daemon=True)
    probe.start()
    probe.join(timeout)  # a name lookup ignores the socket's timeout; the wait here does not
    return bool(answer and answer[0])


def _hub_repository(hf_hub_id: str) -> Tuple[str, Optional[str]]:
    """``'timm/resnet18.a1_in1k@rev'`` -> ``('timm/resnet18.a1_in1k', 'rev')`` (timm's convention)."""
    repository, _, revision = hf_hub_id.partition("@")
    return repository, revision or None


def hub_cached_path(hf_hub_id: str, file_names: Sequence[str], cache_dir: Optional[PathLike] = None) -> Optional[Path]:
    """The first of ``file_names`` of a Hugging Face hub repository found in the local cache, else None."""
    from huggingface_hub import try_to_load_from_cache

    repository, revision = _hub_repository(hf_hub_id)
    for name in file_names:
        found = try_to_load_from_cache(repository, name, cache_dir=cache_dir, revision=revision)
        if isinstance(found, str):
            return Path(found)
    return None


def _hub_out_of_reach(
    subject: str, hf_hub_id: str, file_name: str, cache_dir: Optional[PathLike], local: str, timeout: float
) -> str:
    """Why ``hf_hub_id``'s ``file_name`` cannot be downloaded now ('' when it can), and what to do instead."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set"
    elif not _reachable(constants.ENDPOINT, timeout):
        why = f"{constants.ENDPOINT} is out of reach, offline?"
    else:
        return ""
    repository, revision = _hub_repository(hf_hub_id)
    cache = Path(cache_dir or constants.HF_HUB_CACHE) / f"models--{repository.replace('/', '--')}"
    return (
        f"{subject}: cannot download {file_name} of {repository} ({why}), and it is not in Hugging Face's cache "
        f"({cache}): fetch it where there is network (hf download {repository} {file_name}) and copy that cache "
        f"folder here, or download {constants.ENDPOINT}/{repository}/resolve/{revision or 'main'}/{file_name} by "
        f"hand and {local}"
    )


def check_hub_model_available(hf_hub_id: str, cache_dir: Optional[PathLike] = None, timeout: float = 5.0) -> None:
    """Raise, within seconds, when building ``hf-hub:<hf_hub_id>`` needs its ``config.json`` downloaded
    and that cannot happen (the message names the ``local-dir:`` alternative)."""
    if hub_cached_path(hf_hub_id, ["config.json"], cache_dir) is None:
        local = "build from a folder that holds it and the weights: create_model('local-dir:/path/to/folder')"
        problem = _hub_out_of_reach(f"hf-hub:{hf_hub_id}", hf_hub_id, "config.json", cache_dir, local, timeout)
        if problem:
            raise CheckpointError(problem)


def _url_out_of_reach(subject: str, url: str, cached: Optional[Path]) -> str:
    return (
        f"{subject}: cannot download the pretrained weights ({url} is out of reach): download the file by "
        f"hand and put it at {cached} (timm's cache), or pass "
        f"pretrained_cfg_overlay=dict(file='/path/to/file') to load it from anywhere"
    )


def pretrained_state_dict(
    variant: str, pretrained_cfg: Any, timeout: float = 5.0
) -> Optional[Tuple[Dict[str, torch.Tensor], str]]:
    """The weights ``pretrained=True`` loads for a zoo model and where they came from, read by this module.

    None for the sources timm reads itself.

    In order: ``pretrained_cfg.state_dict``; ``pretrained_cfg.file`` (a file downloaded by hand); the
    URL's file in timm's cache; otherwise the URL is downloaded into that cache with timm's
    downloader, after a probe of its host. Hub and local-folder sources (``hf_hub_id``,
    ``local-dir:``) are left to timm (None).

    Raises:
        CheckpointError: when the file cannot be read, or the weights' host is out of reach (within
            ``timeout`` seconds): the message names the file to place in timm's cache and the
            ``pretrained_cfg_overlay=dict(file=...)`` alternative.
    """
    cfg = pretrained_cfg
    if getattr(cfg, "state_dict", None) is not None:
        source = f"{variant} pretrained_cfg state_dict"
        return unwrap_state_dict(cfg.state_dict, source), source
    if getattr(cfg, "source", "") == "local-dir":  # a Hub folder on disk (timm's `local-dir:` names)
        return _read_hub_folder(Path(cfg.file))
    if getattr(cfg, "source", "") == "hf-hub":
        return None
    if getattr(cfg, "file", None):
        return read_state_dict(cfg.file), str(cfg.file)
    url, _ = _weights_url(cfg)
    if not url:
        if getattr(cfg, "hf_hub_id", None):
            return None
        raise CheckpointError(
            f"{variant}: no published weights for this tag; load a file with "
            f"pretrained_cfg_overlay=dict(file='/path/to/weights.pth'), or checkpoint_path= for your own"
        )
    cached = cached_weights_path(cfg)
    if cached is not None and cached.is_file():
        return read_state_dict(cached), str(cached)
    if not _reachable(url, timeout):
        raise CheckpointError(_url_out_of_reach(variant, url, cached))
    from timm.models._hub import download_cached_file

    downloaded = download_cached_file(cfg.url, progress=True)
    return read_state_dict(downloaded), str(downloaded)


def _read_hub_folder(folder: Path) -> Tuple[Dict[str, torch.Tensor], str]:
    """The weights of a Hugging Face Hub folder: ``model.safetensors``, else ``pytorch_model.bin``."""
    for name in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        if (folder / name).is_file():
            return read_state_dict(folder / name), str(folder / name)
    raise CheckpointError(f"{folder}: no model.safetensors or pytorch_model.bin in this Hub folder")


def check_pretrained_fit(
    state_dict: Mapping[str, torch.Tensor],
    model: nn.Module,
    pretrained_cfg: Mapping[str, Any],
    num_classes: int,
    in_chans: int,
    source: str,
) -> None:
    """Raise unless timm's ``load_pretrained`` will load ``state_dict`` (already converted) into ``model``.

    timm drops the classifier when ``num_classes`` differs from the cfg's and adapts the first conv
    to ``in_chans``; every other key must be present with its shape. A classifier left at its fresh
    initialisation is reported with a WARNING that names its keys.
    """
    classifiers = _as_sequence(pretrained_cfg.get("classifier"))
    drop_classifier = num_classes != pretrained_cfg.get("num_classes")
    adapted = set()
    if in_chans != (pretrained_cfg.get("input_size") or (3,))[0]:
        adapted = {f"{name}.weight" for name in _as_sequence(pretrained_cfg.get("first_conv"))}

    def classifier_key(key: str) -> bool:
        return key.rsplit(".", 1)[0] in classifiers

    mismatch = compare_state_dict(model, state_dict)
    if drop_classifier:
        mismatch = Mismatch(
            [key for key in mismatch.missing if not classifier_key(key)],
            [key for key in mismatch.unexpected if not classifier_key(key)],
            [shape for shape in mismatch.shapes if not classifier_key(shape[0])],
        )
    mismatch = Mismatch(mismatch.missing, mismatch.unexpected, [s for s in mismatch.shapes if s[0] not in adapted])
    if mismatch:
        raise CheckpointError(f"{source}: {mismatch.describe(_model_label(model) or 'the model')}")
    stored = [key for key in state_dict if classifier_key(key)]
    if drop_classifier and stored and num_classes:
        shapes = ", ".join(f"{key} {tuple(state_dict[key].shape)}" for key in stored)
        _logger.warning(
            f"{source}: the checkpoint's classifier ({shapes}) is not loaded: num_classes={num_classes} "
            f"differs from the pretrained cfg's {pretrained_cfg.get('num_classes')}, so it is re-initialised. "
            "To load your own fine-tuned checkpoint use recurzoo.create_model(name, num_classes=..., "
            "checkpoint_path=...)."
        )


def _as_sequence(value: Union[str, Sequence[str], None]) -> Tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def hub_state_dict(
    label: str,
    hub_location: Union[str, Sequence[str]],
    timeout: float,
    read: bool = True,
    cache_dir: Optional[PathLike] = None,
) -> Optional[Tuple[Dict[str, torch.Tensor], str]]:
    """A Hugging Face hub file (as timm names it) from the hub cache, else None after a probe of the hub.

    ``read=False`` (weights that timm loads with a custom loader, or only a check) looks for the file in
    the cache or probes the hub, reading nothing.

    Raises:
        CheckpointError: within ``timeout`` seconds when the file is not cached and the hub is out of
            reach (or ``HF_HUB_OFFLINE`` is set): the message names the file, the cache folder to fill
            and the ``pretrained_cfg_overlay=dict(file=...)`` alternative.
    """
    from timm.models._hub import HF_WEIGHTS_NAME, _get_safe_alternatives

    hub_id, file_name = (hub_location, HF_WEIGHTS_NAME) if isinstance(hub_location, str) else hub_location
    names = [*_get_safe_alternatives(file_name), file_name]  # timm tries the safetensors file first
    cached = hub_cached_path(hub_id, names, cache_dir)
    if cached is not None:
        return (read_state_dict(cached), str(cached)) if read else None
    local = f"pass pretrained_cfg_overlay=dict(file='/path/to/{names[0]}') to load it from anywhere"
    problem = _hub_out_of_reach(label, hub_id, names[0], cache_dir, local, timeout)
    if problem:
        raise CheckpointError(problem)
    return None


def timm_pretrained_overlay(
    model_name: str,
    pretrained_cfg: Any = None,
    pretrained_cfg_overlay: Optional[Mapping[str, Any]] = None,
    label: Optional[str] = None,
    timeout: float = 5.0,
    cache_dir: Optional[PathLike] = None,
) -> Dict[str, Any]:
    """The ``pretrained_cfg_overlay`` that lets ``timm.create_model(model_name, pretrained=True)`` load offline.

    The one offline check of pretrained weights: :func:`recurzoo.create_model` applies it to timm's
    models, the heads to their backbones and the training scripts to their teachers.

    The weights timm would fetch for the model's cfg (with ``pretrained_cfg`` and the overlay applied)
    are looked for first: a ``file`` named in the cfg, the URL's file in timm's cache or the hub file in
    the Hugging Face cache is read here (:func:`read_state_dict`) and returned as the overlay's
    ``state_dict``, so timm downloads nothing; a download is left to timm only after a probe found its
    host (as :func:`pretrained_state_dict` does for the zoo's models). Then the overlay is returned as given.

    Args:
        model_name: a timm model name, optionally with its pretrained tag (``pvt_v2_b2.in1k``).
        pretrained_cfg, pretrained_cfg_overlay: as ``timm.create_model`` takes them.
        label: what the message calls the model (default ``model_name``).
        timeout: seconds the probe of the weights' host may take.
        cache_dir: the Hugging Face cache to look in (default: the hub library's).

    Raises:
        CheckpointError: within ``timeout`` seconds when the weights are neither local nor in reach; the
            message names the file to fetch and where to put it, or the ``pretrained_cfg_overlay`` to pass.
    """
    from timm.models import resolve_pretrained_cfg, split_model_name_tag
    from timm.models._builder import _resolve_pretrained_source  # no public equivalent

    name, tag = split_model_name_tag(model_name)
    cfg = resolve_pretrained_cfg(
        name, pretrained_cfg=pretrained_cfg or tag or None, pretrained_cfg_overlay=pretrained_cfg_overlay
    )
    source, location = _resolve_pretrained_source(cfg.to_dict())
    label = label or model_name
    if source == "hf-hub":
        weights = hub_state_dict(label, location, timeout, read=not cfg.custom_load, cache_dir=cache_dir)
    elif cfg.custom_load:  # a format only the model's own loader reads (timm's npz files): probe, don't read
        weights = None
        url, cached = _weights_url(cfg)[0], cached_weights_path(cfg)
        if source == "url" and not (cached and cached.is_file()) and not _reachable(url, timeout):
            raise CheckpointError(
                f"{label}: cannot download the pretrained weights ({url} is out of reach): download the "
                f"file by hand and put it at {cached} (timm's cache)"
            )
    else:
        weights = pretrained_state_dict(label, cfg, timeout)
    overlay = dict(pretrained_cfg_overlay or {})
    if weights is not None:
        overlay["state_dict"] = weights[0]
    return overlay
