"""Installation layout: one import package, importable from any directory, the checkout root included."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
IMPORT_CHECK = (
    "import recurzoo, timm; "
    "m = timm.create_model('hornet_tiny_gf', features_only=True); "
    "print(recurzoo.__file__); print(m.feature_info.reduction())"
)


def _run(args, cwd, env=None):
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("cwd", [REPO_ROOT, Path("/")], ids=["checkout-root", "elsewhere"])
def test_installed_package_imports_from_any_directory(cwd):
    result = _run([sys.executable, "-c", IMPORT_CHECK], cwd)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[4, 8, 16, 32]"


@pytest.fixture(scope="module")
def regular_install(tmp_path_factory):
    """A non-editable install of the checkout into a private folder (dependencies from this venv)."""
    target = tmp_path_factory.mktemp("site")
    result = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--target",
            str(target),
            str(REPO_ROOT),
        ],
        cwd=tmp_path_factory.mktemp("build"),
    )
    if result.returncode != 0:
        pytest.fail(f"pip install . failed: {result.stderr[-2000:]}")
    return target


def test_regular_install_contains_only_the_recurzoo_package(regular_install):
    top_level = {p.name for p in regular_install.iterdir() if not p.name.endswith((".dist-info", ".egg-info"))}
    top_level.discard("bin")
    assert top_level == {"recurzoo"}
    for sub in ("backbones", "heads", "train", "export"):
        assert (regular_install / "recurzoo" / sub / "__init__.py").exists()


@pytest.mark.parametrize("cwd", [REPO_ROOT, Path("/")], ids=["checkout-root", "elsewhere"])
def test_regular_install_imports_from_any_directory(regular_install, cwd):
    env = dict(os.environ, PYTHONPATH=str(regular_install))
    # -c puts the working directory first on sys.path: at the checkout root, the bare recurzoo/
    # folder is found before the installed package and must not break the import.
    result = _run([sys.executable, "-c", IMPORT_CHECK], cwd, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[4, 8, 16, 32]"


def test_import_downloads_nothing_and_loads_no_exporter_training_or_plotting_library():
    """``import recurzoo`` stays about as quick as ``import timm``: the heavy optional libraries load only
    when a command needs them (asserted by module, not timed: a timing would follow the machine's load)."""
    heavy = ["onnx", "onnxruntime", "executorch", "torchao", "matplotlib", "fvcore", "albumentations"]
    heavy += ["pycocotools", "py_sod_metrics", "sklearn", "cv2"]
    code = (
        "import socket, sys\n"
        "def refuse(*a, **k): raise AssertionError('network used at import')\n"
        "socket.socket.connect = refuse; socket.create_connection = refuse\n"
        f"import recurzoo; print(sorted(set({heavy!r}) & set(sys.modules)))"
    )
    result = _run([sys.executable, "-c", code], "/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def _private_timm_imports() -> List[Tuple[str, str, str]]:
    """``(source file, private timm module, name)`` for every ``from timm.<...>._<module> import name``."""
    found = []
    for folder in ("recurzoo", "backbones", "heads", "train", "export"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("timm."):
                    if any(part.startswith("_") for part in node.module.split(".")):
                        found += [(str(path.relative_to(REPO_ROOT)), node.module, alias.name) for alias in node.names]
    return found


def test_timm_private_modules_are_used_only_for_names_timm_does_not_export():
    """A name timm exports from its public package (``timm.models.checkpoint_seq``) is imported from
    there, so a reorganisation of timm's private modules cannot break it."""
    imports = _private_timm_imports()
    assert imports, "the scan found no private imports at all: it is not reading the sources"
    public_too = []
    for source, module, name in imports:
        public = module.split("._")[0]
        if hasattr(importlib.import_module(public), name):
            public_too.append(f"{source}: {name} from {module} (public in {public})")
    assert not public_too, public_too
