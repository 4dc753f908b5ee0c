"""The authors' checkpoints as timm Hugging Face Hub folders: ``config.json``, ``model.safetensors``, ``README.md``.

:func:`convert` reads an official checkpoint through the family's filter (:mod:`recurzoo.checkpoint`), writes
the folder with timm's ``save_for_hf`` and a model card with the Hub's metadata block, loads the folder back
(``local-dir:``) and checks that it computes what the official checkpoint computes, on a real photograph.
:func:`convert_all` does every checkpoint found in a folder of downloads; :func:`push` publishes a folder
with timm's ``push_to_hf_hub`` machinery (Hugging Face's ``HfApi``), failing within seconds offline.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

import recurzoo
from recurzoo.checkpoint import CheckpointError, compare_state_dict, family_filter, read_state_dict
from recurzoo.registry import model_family, model_task, pretrained_cfgs, split_model_name

__all__ = ["ConvertResult", "convert", "convert_all", "find_model_for", "hub_card", "push", "CHECKPOINT_SUFFIXES"]

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
HUB_FILES = ("config.json", "model.safetensors", "README.md")
# The Hub's pipeline tag of each task.
PIPELINE_TAGS = {"classification": "image-classification", "sr": "image-to-image", "cod": "image-segmentation"}


@dataclass
class ConvertResult:
    """One conversion: the model, the folder written and how the reloaded folder compares with the checkpoint."""

    model: str
    checkpoint: str
    folder: Optional[str] = None
    max_abs_diff: Optional[float] = None
    error: str = ""
    files: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.error and self.max_abs_diff == 0.0

    def line(self) -> str:
        """One line for the summary table."""
        if self.error:
            return f"| `{Path(self.checkpoint).name}` | `{self.model or '?'}` | failed: {self.error} |"
        check = f"max abs diff {self.max_abs_diff:.1e}"
        return f"| `{Path(self.checkpoint).name}` | `{self.model}` | {self.folder} ({check}) |"


# --------------------------------------------------------------------------------------------------
# The model card
# --------------------------------------------------------------------------------------------------


def _template(model_name: str) -> Dict[str, Any]:
    from recurzoo.export.cards import load_template

    return load_template(model_family(model_name))


def _model_index(full_name: str, published: Sequence[Dict[str, Any]], task: str) -> List[Dict[str, Any]]:
    results = []
    for entry in published:
        results.append(
            {
                "task": {"type": PIPELINE_TAGS[task]},
                "dataset": {"name": entry["dataset"], "type": entry.get("dataset_id", entry["dataset"].lower())},
                "metrics": [
                    {"type": entry["metric"], "value": entry["value"], "name": entry.get("name", entry["metric"])}
                ],
                "source": {
                    "name": entry.get("source", "the authors' paper and repository"),
                    "url": entry.get("url", ""),
                },
            }
        )
    return [{"name": full_name, "results": results}] if results else []


def hub_card(model: nn.Module, full_name: str) -> str:
    """The ``README.md`` of a Hub folder: the metadata block (library, license, tags, datasets, paper, metrics)
    and how to load the folder."""
    import yaml

    name = split_model_name(full_name)[0]
    task = model_task(name) or "classification"
    template = _template(name)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    published = (template.get("published") or {}).get(full_name, [])
    arxiv = str(cfg.get("paper_ids") or "").replace("arXiv:", "")
    metadata: Dict[str, Any] = {
        "library_name": "timm",
        "license": cfg.get("license") or "other",
        "pipeline_tag": PIPELINE_TAGS[task],
        "tags": [PIPELINE_TAGS[task], "timm", "recurzoo", model_family(name)] + ([f"arxiv:{arxiv}"] if arxiv else []),
    }
    datasets = sorted({entry.get("dataset_id", entry["dataset"].lower()) for entry in published})
    if datasets:
        metadata["datasets"] = datasets
    index = _model_index(full_name, published, task)
    if index:
        metadata["model-index"] = index
    loader = "timm.create_model" if task == "classification" else "recurzoo.create_model"
    lines = [
        "---",
        yaml.safe_dump(metadata, sort_keys=False).strip(),
        "---",
        f"# {full_name}",
        "",
        str(template.get("summary", "")).strip(),
        "",
        f"- Paper: [{template.get('paper', '')}]({template.get('paper_url', '')})",
        f"- Official code and weights: {template.get('code_url', '')} ({template.get('license', '')})",
        "- Converted from the authors' checkpoint with `recurzoo convert`; the outputs equal the official "
        "checkpoint's through the family's filter on a real photograph.",
        "",
        "## Usage",
        "",
        "```python",
        "import recurzoo, timm" if task == "classification" else "import recurzoo",
        "",
        f"model = {loader}('local-dir:/path/to/this/folder', pretrained=True).eval()",
        f"# or from the Hub, once published: {loader}('hf-hub:ORG/NAME', pretrained=True)",
        "```",
        "",
    ]
    if published:
        lines += ["## Published results", "", "| dataset | metric | value |", "| --- | --- | --- |"]
        lines += [f"| {e['dataset']} | {e.get('name', e['metric'])} | {e['value']} |" for e in published] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Converting
# --------------------------------------------------------------------------------------------------


def _example_input(model: nn.Module) -> torch.Tensor:
    """The sample photograph at the model's input size, as the model takes it (normalised or in [0, 1])."""
    from recurzoo.export.models import photo_batch

    _, height, width = model.pretrained_cfg["input_size"]
    return photo_batch(model, 1, height, width)


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        output = model(x)
    return output[0] if isinstance(output, (list, tuple)) else output


def _write_folder(model: nn.Module, full_name: str, folder: Path, model_args: Dict[str, Any]) -> List[str]:
    """``save_for_hf`` and the card into ``folder`` (a fresh temporary folder)."""
    from timm.models import save_for_hf

    from recurzoo.checkpoint import default_permissions

    save_for_hf(model, str(folder), model_args=model_args or None, safe_serialization=True)
    (folder / "README.md").write_text(hub_card(model, full_name))
    for path in [folder, *folder.iterdir()]:
        default_permissions(path)
    return [str(folder / name) for name in HUB_FILES]


def convert(
    model_name: str,
    checkpoint: Union[str, Path],
    out_dir: Union[str, Path],
    model_kwargs: Optional[Dict[str, Any]] = None,
    overwrite: bool = False,
) -> ConvertResult:
    """Convert one official checkpoint into the Hub folder ``out_dir/<name.tag>`` and check it.

    Args:
        model_name: a zoo model, with the pretrained tag the weights are (``hornet_tiny_7x7.in1k``).
        checkpoint: the authors' file (or one of this package's), read through :mod:`recurzoo.checkpoint`.
        out_dir: the parent folder; the Hub folder is named after the model and tag.
        model_kwargs: architecture arguments that differ from the registered model's (recorded in ``config.json``).
        overwrite: replace an existing folder of that name.

    Raises:
        ValueError: an unknown model, a checkpoint that cannot be read or does not fit, or an existing folder
            without ``overwrite``.
    """
    name, tag = split_model_name(model_name)
    full_name = f"{name}.{tag}" if tag else name
    target = Path(out_dir) / full_name
    if target.exists() and not overwrite:
        raise ValueError(f"--out {target}: exists already (pass --overwrite to replace it)")
    if Path(checkpoint).resolve().is_relative_to(target.resolve()):
        raise ValueError(f"--out {target}: holds the input checkpoint {checkpoint}; choose another folder")
    model_kwargs = dict(model_kwargs or {})
    overlay: Dict[str, Any] = dict(file=str(checkpoint))
    if "num_classes" in model_kwargs:  # the checkpoint's own head: keep it, never re-initialise it
        overlay["num_classes"] = model_kwargs["num_classes"]
    model = recurzoo.create_model(full_name, pretrained=True, pretrained_cfg_overlay=overlay, **model_kwargs).eval()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{full_name}.", dir=target.parent))
    try:
        files = _write_folder(model, full_name, staging, model_kwargs)
        reloaded = recurzoo.create_model(f"local-dir:{staging}", pretrained=True).eval()
        x = _example_input(model)
        difference = (_outputs(reloaded, x) - _outputs(model, x)).abs().max().item()
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    files = [str(target / Path(path).name) for path in files]
    return ConvertResult(full_name, str(checkpoint), str(target), difference, files=files)


def _known_file_names() -> Dict[str, str]:
    """The cache file name of every zoo tag's download -> ``name.tag``."""
    from recurzoo.checkpoint import cached_weights_path

    names = {}
    for model in recurzoo.list_models():
        for full_name, cfg in pretrained_cfgs(model).items():
            path = cached_weights_path(cfg)
            if path is not None:
                names[path.name] = full_name
    return names


def _fits(model_name: str, state_dict: Dict[str, torch.Tensor]) -> bool:
    """True when ``state_dict`` (any layout the family's filter reads) loads into the model strictly."""
    try:
        with torch.device("meta"):
            model = recurzoo.create_model(model_name)
        filter_fn = family_filter(model)
        converted = filter_fn(dict(state_dict), model) if filter_fn is not None else state_dict
        return not compare_state_dict(model, converted)
    except (ValueError, RuntimeError, KeyError, TypeError, NotImplementedError):
        return False  # a filter that cannot read another family's layout: not this model


def find_model_for(path: Union[str, Path], candidates: Optional[Sequence[str]] = None) -> str:
    """The zoo model (with tag) a downloaded checkpoint is, by its file name, else by its keys and shapes.

    Raises:
        ValueError: when no zoo model fits.
    """
    path = Path(path)
    by_file = _known_file_names()
    if path.name in by_file:
        return by_file[path.name]
    stem = path.name.split(".")[0]
    zoo = candidates or recurzoo.list_models()
    if stem in zoo:
        return stem
    state_dict = read_state_dict(path)
    for name in zoo:
        if _fits(name, state_dict):
            tags = list(pretrained_cfgs(name))
            return tags[0] if len(tags) == 1 else name
    raise ValueError(f"{path}: no zoo model fits its {len(state_dict)} tensors (by file name, keys or shapes)")


def convert_all(
    download_dir: Union[str, Path],
    out_dir: Union[str, Path],
    overwrite: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> List[ConvertResult]:
    """Convert every checkpoint file in ``download_dir`` (matched to its model by :func:`find_model_for`).

    A file that fits no model, or fails, is reported in the summary and the others still convert.
    """
    from tqdm import tqdm

    folder = Path(download_dir)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder of downloaded checkpoints")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in CHECKPOINT_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no checkpoint files ({', '.join(CHECKPOINT_SUFFIXES)})")
    results = []
    for path in tqdm(files, desc="converting", unit="file", disable=not progress):
        try:
            results.append(convert(find_model_for(path), path, out_dir, overwrite=overwrite))
        except (ValueError, CheckpointError) as error:
            results.append(ConvertResult("", str(path), error=str(error)))
    echo("| file | model | Hub folder |")
    echo("| --- | --- | --- |")
    for result in results:
        echo(result.line())
    return results


def push(folder: Union[str, Path], repo_id: str, token: Optional[str] = None, timeout: float = 5.0) -> str:
    """Upload a converted folder to the Hugging Face Hub as ``repo_id``; returns the repository URL.

    Raises:
        ValueError: when the folder is not a converted Hub folder, or the Hub is out of reach (within ``timeout``).
    """
    from recurzoo.checkpoint import _reachable

    folder = Path(folder)
    missing = [name for name in HUB_FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{folder}: not a converted Hub folder (missing {', '.join(missing)})")
    if not _reachable("https://huggingface.co", timeout):
        raise ValueError(
            f"--push {repo_id}: huggingface.co is out of reach; the folder {folder} is ready to upload later"
        )
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Add model converted by recurzoo")
    return str(url)
