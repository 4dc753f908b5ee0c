"""recurzoo: recursive and recurrent vision backbones for timm, with task heads and exporters.

Importing this package registers the zoo: the classification families (HorNet, SReT, the recurrent
ViT, the RGT body) in timm's registry, so that ``timm.create_model('hornet_tiny_7x7')`` works, and
the task models (super-resolution, camouflaged-object detection) in the zoo's own registry.
:func:`create_model` builds any of them, and any timm model, by name. Nothing is downloaded.
"""

import pkgutil

# A source checkout keeps the code folders (backbones/, heads/, ...) beside this folder and the
# installer maps them into the package. When the checkout's root is the working directory, this
# bare folder is found first; extending the search path lets the installed subpackages resolve.
__path__ = pkgutil.extend_path(__path__, __name__)

from recurzoo import backbones  # noqa: E402  (registers the classification families with timm)
from recurzoo.heads import camouflage, super_resolution  # noqa: E402  (registers the task models)
from recurzoo.heads.camouflage import create_cod_model  # noqa: E402
from recurzoo.heads.super_resolution import create_sr_model  # noqa: E402
from recurzoo.official import build as build_official  # noqa: E402
from recurzoo.registry import create_model, list_models, model_family, model_task  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "backbones",
    "build_official",
    "camouflage",
    "create_cod_model",
    "create_model",
    "create_sr_model",
    "list_models",
    "model_family",
    "model_task",
    "super_resolution",
    "__version__",
]
