"""The model families of recurzoo; importing this package registers them with timm."""

from recurzoo.backbones import (
    hornet,  # noqa: F401
    recurrent_vit,  # noqa: F401
    rgt,  # noqa: F401
    sret,  # noqa: F401
)
from recurzoo.heads import camouflage  # noqa: F401,E402  (MSRNet COD models over the backbones above)

# Modules whose ``@register_model`` functions make up the zoo (used by ``recurzoo.list_models``).
FAMILY_MODULES = (
    "recurzoo.backbones.hornet",
    "recurzoo.backbones.recurrent_vit",
    "recurzoo.backbones.sret",
    "recurzoo.backbones.rgt",
    "recurzoo.heads.camouflage",
)
