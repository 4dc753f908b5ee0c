"""recurzoo: recursive and recurrent vision backbones for timm, with task heads and exporters.

Importing this package registers every model of the zoo with timm's registry, so that
``timm.create_model('hornet_tiny_7x7')`` works after ``import recurzoo``. Nothing is downloaded.
"""

import pkgutil

# A source checkout keeps the code folders (backbones/, heads/, ...) beside this folder and the
# installer maps them into the package. When the checkout's root is the working directory, this
# bare folder is found first; extending the search path lets the installed subpackages resolve.
__path__ = pkgutil.extend_path(__path__, __name__)

from recurzoo import backbones  # noqa: E402,F401  (registers the models with timm)
from recurzoo.heads.camouflage import create_cod_model  # noqa: E402,F401
from recurzoo.heads.super_resolution import create_sr_model  # noqa: E402,F401
from recurzoo.official import build as build_official  # noqa: E402,F401

__version__ = "0.1.0"

__all__ = ["backbones", "build_official", "create_cod_model", "create_sr_model", "list_models", "__version__"]


def list_models(pattern: str = "*") -> list[str]:
    """Names of the models this package registers with timm, optionally filtered by a wildcard."""
    import fnmatch

    import timm

    ours = set()
    for module_name in backbones.FAMILY_MODULES:
        ours.update(timm.list_models(module=module_name.rsplit(".", 1)[-1]))
    return sorted(name for name in ours if fnmatch.fnmatch(name, pattern))
